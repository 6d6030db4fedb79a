"""Which onnxruntime int8 settings are fast on this CPU: one run's encoder, several
quantisation variants, latency at batch 1 and 32 against fp32 from the same process.

    .venv/bin/python scripts/int8_variants.py RUN_DIR --out runs/int8_variants.json

Variants: QDQ vs QOperator, U8S8 vs U8U8 vs S8S8, reduce_range on/off, convs only.
The chosen default (edgessl.export.quantize_int8) is QDQ U8S8 per-channel with reduce_range.
"""
from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np
import torch
from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
from onnxruntime.quantization.shape_inference import quant_pre_process

from edgessl.export import (Encoder, _batch_of, _latency, _torch_export, load_run, ort_features, parity,
                            rewrite_hard_activations, run_images, session)

U8, S8 = QuantType.QUInt8, QuantType.QInt8
VARIANTS = {
    "qdq u8s8 per-channel reduce_range (default)": dict(quant_format=QuantFormat.QDQ, activation_type=U8,
                                                        weight_type=S8, reduce_range=True, per_channel=True),
    "qdq u8s8 per-channel": dict(quant_format=QuantFormat.QDQ, activation_type=U8, weight_type=S8,
                                 reduce_range=False, per_channel=True),
    "qoperator u8s8 per-channel reduce_range": dict(quant_format=QuantFormat.QOperator, activation_type=U8,
                                                    weight_type=S8, reduce_range=True, per_channel=True),
    "qdq u8u8 per-tensor": dict(quant_format=QuantFormat.QDQ, activation_type=U8, weight_type=U8,
                                reduce_range=False, per_channel=False),
    "qdq s8s8 per-channel": dict(quant_format=QuantFormat.QDQ, activation_type=S8, weight_type=S8,
                                 reduce_range=False, per_channel=True),
    "qdq u8s8 convs and matmuls only": dict(quant_format=QuantFormat.QDQ, activation_type=U8, weight_type=S8,
                                            reduce_range=True, per_channel=True,
                                            op_types_to_quantize=["Conv", "Gemm", "MatMul"]),
}


class Reader(CalibrationDataReader):
    def __init__(self, images: np.ndarray):
        self.batches = iter([{"images": images[i:i + 32]} for i in range(0, len(images), 32)])

    def get_next(self):
        return next(self.batches, None)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run_dir")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default="runs/int8_variants.json")
    args = ap.parse_args()
    model, cfg, state = load_run(args.run_dir)
    size = state["backbone"]["image_size"]
    images = run_images(cfg, None, 256, size)
    encoder = Encoder(model.backbone).eval()
    with torch.no_grad():
        reference = encoder(torch.from_numpy(images[:64])).numpy()
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        _torch_export(encoder, d / "fp32.onnx", size, "dynamic", 18)
        base = {b: _latency(session(d / "fp32.onnx", args.threads), _batch_of(images, b), 40)["p50"] for b in (1, 32)}
        rows["fp32"] = {"p50_ms": base}
        rewrite_hard_activations(encoder)
        _torch_export(encoder, d / "rewritten.onnx", size, "dynamic", 18)
        quant_pre_process(str(d / "rewritten.onnx"), str(d / "pre.onnx"), skip_symbolic_shape=True)
        for name, kw in VARIANTS.items():
            path = d / "q.onnx"
            quantize_static(str(d / "pre.onnx"), str(path), Reader(images), **kw)
            sess = session(path, args.threads)
            lat = {b: _latency(sess, _batch_of(images, b), 40)["p50"] for b in (1, 32)}
            rows[name] = {"p50_ms": lat, "speedup": {b: round(base[b] / lat[b], 2) for b in lat},
                          "min_cosine": parity(reference, ort_features(sess, images[:64]))["min_cosine"]}
            print(f"{name:45s} b1 {rows[name]['speedup'][1]:.2f}x  b32 {rows[name]['speedup'][32]:.2f}x  "
                  f"min cosine {rows[name]['min_cosine']:.3f}", flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"run": args.run_dir, "backbone": state["backbone"], "rows": rows}, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
