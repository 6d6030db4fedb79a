"""int8 on one run: OpenVINO with per-channel against per-tensor activation scales (kNN change, ms
at batch 1 / 32 side by side), and the ReLU student distilled until it settles, at two caps.

    .venv/bin/python scripts/int8_student_stop.py RUN --out runs/int8_stop.json
"""
from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from edgessl import data as data_lib
from edgessl import formats
from edgessl.export import _prepare, export_model, knn_change, metadata, run_images, write_file
from edgessl.onnxrt import latency_side_by_side
from edgessl.runs import load_run
from edgessl_edge.backends import open_model


def openvino_scales(run: str, seconds: float) -> dict:
    model, cfg, state = load_run(run)
    job = _prepare(model, cfg, state, "int8", None, 256, False, True, True, seconds, False)
    meta = {**metadata(cfg, state, job.encoder, "int8", Path(run) / "checkpoint.pt", "dynamic"), "int8_weight_bits": 8}
    out, paths = {}, {}
    default = formats.openvino_int8_parameters
    with tempfile.TemporaryDirectory() as tmp:
        spec = formats.get("openvino")
        paths["fp32"] = write_file(job.original, spec, "fp32", Path(tmp), "fp32", meta, job.images, "dynamic", 18,
                                   "features")
        for name, params in (("per-channel", lambda: None), ("per-tensor", default)):
            formats.openvino_int8_parameters = params
            paths[name] = write_file(job.encoder, spec, "int8", Path(tmp), name, meta, job.images, "dynamic", 18,
                                     "features")
            out[name] = knn_change(job.original, open_model(paths[name]), cfg, *job.own)
        formats.openvino_int8_parameters = default
        x = run_images(job.own[0], 32, cfg)
        p50 = latency_side_by_side(paths, x, (1, 32), threads=(1,))
    for name in out:
        out[name]["ms"] = p50[name][1]
    out["fp32_ms"] = p50["fp32"][1]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run")
    ap.add_argument("--out", required=True)
    ap.add_argument("--caps", type=float, nargs="+", default=[120.0, 600.0])
    args = ap.parse_args()
    result = {"openvino": openvino_scales(args.run, 120.0)}
    print(json.dumps(result), flush=True)
    for cap in args.caps:
        with tempfile.TemporaryDirectory() as tmp:
            r = export_model(args.run, Path(tmp) / "m.onnx", "int8", adapt_seconds=cap, timing=False, progress=False)
        result[f"onnx_cap_{cap:g}"] = {k: r[k] for k in ("knn_torch_fp32", "knn_export", "knn_change")} | {
            "adapted": {k: r["adapted"][k] for k in ("steps", "seconds", "stopped")}}
        print(json.dumps(result[f"onnx_cap_{cap:g}"]), flush=True)
    Path(args.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
