"""int8 on one run, kNN change against torch fp32 on held-out images (--val): the ReLU student
distilled for a fixed time on a cosine schedule (the earlier rule) against until it settles
(adapt.train_for) at two caps; and OpenVINO with per-channel against per-tensor activation
scales (kNN change, ms at batch 1 / 32 on one thread, side by side with the fp32 IR).

    .venv/bin/python scripts/int8_student_stop.py RUN --val folder:VAL --out runs/int8_stop.json
"""
from __future__ import annotations

import argparse
import json
import math
import tempfile
import time
from pathlib import Path

from edgessl import adapt, formats
from edgessl import data as data_lib
from edgessl.export import _prepare, knn_change, metadata, run_images, write_file
from edgessl.onnxrt import latency_side_by_side
from edgessl.optim import guarded_step, set_lr
from edgessl.runs import load_run
from edgessl_edge.backends import open_model

real_train_for = adapt.train_for


def cosine_for(seconds, opt, lr, loss_fn, probe_fn, desc, progress=None) -> dict:
    """The earlier rule: a cosine from lr to 0 over the time budget, stopped by the clock."""
    import torch

    start, steps = time.perf_counter(), 0
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    while (elapsed := time.perf_counter() - start) < seconds:
        set_lr(opt, lr * 0.5 * (1 + math.cos(math.pi * min(1.0, elapsed / seconds))))
        guarded_step(loss_fn(), opt, scaler, steps, torch.device("cpu"), read=True)
        steps += 1
    return {"steps": steps, "seconds": round(time.perf_counter() - start, 1), "stopped": "time cap",
            "loss_first": None, "loss_last": None, "probe_loss": float(probe_fn())}


def student_files(run, val, arm, cap, tmp: Path, openvino: bool) -> dict:
    adapt.train_for = cosine_for if arm == "cosine" else real_train_for
    model, cfg, state = load_run(run)
    job = _prepare(model, cfg, state, "int8", None, 256, False, True, True, cap, False)
    meta = {**metadata(cfg, state, job.encoder, "int8", Path(run) / "checkpoint.pt", "dynamic"),
            "int8_weight_bits": 8}
    train = job.own[0]
    out = {"student": {k: job.adapted[k] for k in ("steps", "seconds", "stopped", "probe_loss")}}
    path = write_file(job.encoder, formats.get("onnx"), "int8", tmp, f"{arm}{cap:g}", meta, job.images, "dynamic",
                      18, "features")
    out["onnx"] = knn_change(job.original, open_model(path), cfg, train, val)
    if openvino:
        spec, default, paths = formats.get("openvino"), formats.openvino_int8_parameters, {}
        paths["fp32"] = write_file(job.original, spec, "fp32", tmp, "ovfp32", meta, job.images, "dynamic", 18,
                                   "features")
        for name, params in (("per-channel", lambda: None), ("per-tensor", default)):
            formats.openvino_int8_parameters = params
            paths[name] = write_file(job.encoder, spec, "int8", tmp, name, meta, job.images, "dynamic", 18,
                                     "features")
            out[f"openvino {name}"] = knn_change(job.original, open_model(paths[name]), cfg, train, val)
        formats.openvino_int8_parameters = default
        p50 = latency_side_by_side(paths, run_images(train, 32, cfg), (1, 32), threads=(1,))
        out["openvino ms b1 / b32 (1 thread)"] = {name: p50[name][1] for name in paths}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run")
    ap.add_argument("--val", required=True)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    _, cfg, state = load_run(args.run)
    val = data_lib.load(args.val, state["backbone"]["image_size"], fit=cfg.data.fit)
    result = {}
    with tempfile.TemporaryDirectory() as tmp:
        for arm, cap in (("cosine", 120.0), ("settle", 120.0), ("settle", 600.0)):
            result[f"{arm} {cap:g} s"] = student_files(args.run, val, arm, cap, Path(tmp), arm == "settle" and cap == 120)
            print(json.dumps({f"{arm} {cap:g} s": result[f"{arm} {cap:g} s"]}), flush=True)
    Path(args.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
