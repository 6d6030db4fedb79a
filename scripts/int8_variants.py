"""Which onnxruntime int8 settings are fast on this CPU: one run's encoder, several
quantisation variants, latency at batch 1 and 32 against fp32 from the same process.

    .venv/bin/python scripts/int8_variants.py RUN_DIR --out runs/int8_variants.json

Variants: QDQ vs QOperator, U8S8 vs U8U8 vs S8S8, reduce_range on/off, convs only, all on the
graph with hard-swish rewritten as x * relu6(x + 3) / 6 (what `edgessl export` does); then the
default settings on the graph as torch exports it (HardSigmoid left in float between Q/DQ), and
with each hard-sigmoid / hard-swish replaced by a 256-entry uint8 lookup table (Cast + Gather,
`lut_activations`), also with onnxruntime's NHWC layout transformer switched off (it wraps
each Gather in Transposes). The chosen default (edgessl.export.quantize_int8) is QDQ U8S8
per-channel, 8-bit weights (7, reduce_range, on x86 without VNNI), on the rewritten graph; the
graph forms use it.
"""
from __future__ import annotations

import argparse
import collections
import json
import tempfile
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper
from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
from onnxruntime.quantization.shape_inference import quant_pre_process

from edgessl.data import load_split
from edgessl.export import Encoder, int8_weight_bits, rewrite_hard_activations, run_images, topological_sort, torch_export
from edgessl.onnxrt import batch_of, latency, ort_features, parity, session
from edgessl.runs import load_run

U8, S8 = QuantType.QUInt8, QuantType.QInt8
RR7 = "qdq u8s8 per-channel reduce_range (7-bit weights: the default on x86 without VNNI)"
RR8 = "qdq u8s8 per-channel (8-bit weights: the default elsewhere)"
VARIANTS = {
    RR7: dict(quant_format=QuantFormat.QDQ, activation_type=U8, weight_type=S8, reduce_range=True, per_channel=True),
    RR8: dict(quant_format=QuantFormat.QDQ, activation_type=U8, weight_type=S8, reduce_range=False, per_channel=True),
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


def lut_activations(src: Path, dst: Path) -> int:
    """Replace every quantised hard-sigmoid, and hard-swish = x * hard-sigmoid(x), of a QDQ graph
    by a 256-entry table from x's uint8 code to the output's: DQ -> HardSigmoid -> Q (-> DQ ->
    Mul with DQ(x) -> Q) becomes Cast(int32) -> Gather. Returns how many were replaced."""
    model = onnx.load(str(src))
    g = model.graph
    init = {i.name: numpy_helper.to_array(i) for i in g.initializer}
    producer = {o: n for n in g.node for o in n.output}
    consumers = collections.defaultdict(list)
    for n in g.node:
        for i in n.input:
            consumers[i].append(n)

    def only(tensor: str, op: str):
        c = consumers[tensor]
        return c[0] if len(c) == 1 and c[0].op_type == op else None

    def qparams(n) -> tuple[float, int]:
        return float(init[n.input[1]]), int(init[n.input[2]]) if len(n.input) > 2 else 0

    drop, new, count = set(), [], 0
    for n in g.node:
        if n.op_type != "HardSigmoid":
            continue
        dq, q = producer.get(n.input[0]), only(n.output[0], "QuantizeLinear")
        if dq is None or dq.op_type != "DequantizeLinear" or q is None:
            continue
        attr = {a.name: a.f for a in n.attribute}
        scale, zero = qparams(dq)
        x = (np.arange(256) - zero) * scale
        y = np.clip(attr.get("alpha", 0.2) * x + attr.get("beta", 0.5), 0, 1)
        dq2 = only(q.output[0], "DequantizeLinear")
        mul = dq2 and only(dq2.output[0], "Mul")
        other = mul and producer.get(next(i for i in mul.input if i != dq2.output[0]))
        mul_q = mul and only(mul.output[0], "QuantizeLinear")
        if mul_q and other is not None and other.op_type == "DequantizeLinear" and other.input[0] == dq.input[0]:
            last = mul_q  # hard-swish: the table maps x straight to x * hard-sigmoid(x)
            y = x * y
            drop |= {id(q), id(dq2), id(mul)} | ({id(other)} if len(consumers[other.output[0]]) == 1 else set())
        else:
            last = q
        s_out, z_out = qparams(last)
        drop |= {id(n), id(last)} | ({id(dq)} if len(consumers[dq.output[0]]) == 1 else set())
        name = f"lut{count}"
        g.initializer.append(numpy_helper.from_array(
            np.clip(np.round(y / s_out) + z_out, 0, 255).astype(np.uint8), name + "_table"))
        new += [helper.make_node("Cast", [dq.input[0]], [name + "_index"], to=TensorProto.INT32),
                helper.make_node("Gather", [name + "_table", name + "_index"], [last.output[0]], axis=0)]
        count += 1
    kept = [n for n in g.node if id(n) not in drop] + new
    del g.node[:]
    g.node.extend(kept)
    topological_sort(g)
    onnx.checker.check_model(model)
    onnx.save(model, str(dst))
    return count


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run_dir")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--only", nargs="*", help="substrings of the quantisation VARIANTS to run (the graph forms "
                                              "after them always run)")
    ap.add_argument("--out", default="runs/int8_variants.json")
    args = ap.parse_args()
    model, cfg, state = load_run(args.run_dir)
    size = state["backbone"]["image_size"]
    images = run_images(load_split(cfg.data)[0], 256, cfg)
    encoder = Encoder(model.backbone).eval()
    with torch.no_grad():
        reference = encoder(torch.from_numpy(images[:64])).numpy()
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        torch_export(encoder, d / "fp32.onnx", size, "dynamic", 18)
        base = {b: latency(session(d / "fp32.onnx", args.threads), batch_of(images, b), 40)["p50"] for b in (1, 32)}
        rows["fp32"] = {"p50_ms": base}
        quant_pre_process(str(d / "fp32.onnx"), str(d / "pre_stock.onnx"), skip_symbolic_shape=True)
        default = VARIANTS[RR7 if int8_weight_bits() == 7 else RR8]
        quantize_static(str(d / "pre_stock.onnx"), str(d / "stock.onnx"), Reader(images), **default)
        replaced = lut_activations(d / "stock.onnx", d / "lut.onnx")
        rewrite_hard_activations(encoder)
        torch_export(encoder, d / "rewritten.onnx", size, "dynamic", 18)
        quant_pre_process(str(d / "rewritten.onnx"), str(d / "pre.onnx"), skip_symbolic_shape=True)

        def quantised():  # (name, file, onnxruntime graph transformers switched off)
            for name, kw in VARIANTS.items():
                if not args.only or any(o in name for o in args.only):
                    quantize_static(str(d / "pre.onnx"), str(d / "q.onnx"), Reader(images), **kw)
                    yield name, d / "q.onnx", ()
            yield "default, hard-swish as exported (no rewrite)", d / "stock.onnx", ()
            yield "default, hard-swish as lookup tables", d / "lut.onnx", ()
            # the NHWC layout pass wraps each Gather in two Transposes: the tables without it
            yield "default, hard-swish as lookup tables, NHWC transformer off", d / "lut.onnx", ("NhwcTransformer",)
            yield "default, hard-swish as exported, NHWC transformer off", d / "stock.onnx", ("NhwcTransformer",)

        for name, path, off in quantised():
            sess = session(path, args.threads, off)
            lat = {b: latency(sess, batch_of(images, b), 40)["p50"] for b in (1, 32)}
            rows[name] = {"p50_ms": lat, "speedup": {b: round(base[b] / lat[b], 2) for b in lat},
                          "min_cosine": parity(reference, ort_features(sess, images[:64]))["min_cosine"]}
            print(f"{name:45s} b1 {rows[name]['speedup'][1]:.2f}x  b32 {rows[name]['speedup'][32]:.2f}x  "
                  f"min cosine {rows[name]['min_cosine']:.3f}", flush=True)
        rows["default, hard-swish as lookup tables"]["replaced"] = replaced
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"run": args.run_dir, "backbone": state["backbone"], "rows": rows}, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
