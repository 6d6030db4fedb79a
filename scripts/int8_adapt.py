"""int8 for hard-swish networks: swap hard-swish for ReLU and distil, measured side by side.

    .venv/bin/python scripts/int8_adapt.py RUN_DIR [--seconds 120] [--threads 1] [--out runs/int8_adapt.json]

Rows, all through onnxruntime in this one process: the run's fp32 export; its int8 export as
`edgessl export --precision int8` writes it today (hard activations rewritten as relu6 forms);
the ReLU student (hard-swish swapped, distilled for --seconds on the run's training images) in
fp32 and in int8. Each with p50 latency at batch 1 and 32, the speed-up over the fp32 export,
and kNN top-1 on the run's held-out split.
"""
from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np
import onnxruntime
import torch

from benchlib import markdown
from edgessl import data as data_lib
from edgessl.adapt import distill
from edgessl.augment import normalize
from edgessl.export import Encoder, quantize_int8, rewrite_hard_activations, run_images, torch_export
from edgessl.knn import knn_accuracy
from edgessl.onnxrt import batch_of, latency, ort_features, session
from edgessl.runs import load_run


def features(sess, data, cfg) -> torch.Tensor:
    return torch.from_numpy(np.concatenate([ort_features(sess, normalize(c, cfg.data.mean, cfg.data.std).numpy())
                                            for c in data.images.split(256)]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run_dir", type=Path)
    ap.add_argument("--seconds", type=float, default=120.0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--gate", action="store_true", help="also swap the SE gates' hard-sigmoid for sigmoid")
    ap.add_argument("--out", type=Path, default=Path("runs/int8_adapt.json"))
    args = ap.parse_args()
    model, cfg, state = load_run(args.run_dir)
    size = state["backbone"]["image_size"]
    train, val = data_lib.load_split(cfg.data)
    calib = run_images(train, 256, cfg)
    teacher = model.backbone.eval()
    student, stats = distill(teacher, train.images, cfg, seconds=args.seconds, gate=args.gate)
    print(f"distilled: {stats}", flush=True)
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        def build(name, net, int8):
            fp32 = Path(tmp) / f"{name}.fp32.onnx"
            enc = Encoder(net).eval()
            if int8:
                rewrite_hard_activations(enc)
            torch_export(enc, fp32, size, "dynamic", 18)
            if not int8:
                return fp32
            q = Path(tmp) / f"{name}.int8.onnx"
            quantize_int8(fp32, q, calib)
            return q

        files = {"fp32 export": build("teacher", teacher, False),
                 "int8 export today (relu6 rewrite)": build("teacher_q", teacher, True),
                 "ReLU student, fp32": build("student", student, False),
                 "ReLU student, int8": build("student_q", student, True)}
        x = calib
        for name, path in files.items():
            sess = session(path, args.threads)
            lat = {b: latency(sess, batch_of(x, b), 40)["p50"] for b in (1, 32)}
            knn = knn_accuracy(features(sess, train, cfg), train.labels, features(sess, val, cfg), val.labels,
                               len(train.classes), cfg.run.knn_k)
            rows[name] = {"p50_ms": lat, "knn_top1": knn, "size_mb": round(path.stat().st_size / 2**20, 2)}
            print(name, rows[name], flush=True)
    base = rows["fp32 export"]
    for r in rows.values():
        r["speedup"] = {b: round(base["p50_ms"][b] / r["p50_ms"][b], 2) for b in (1, 32)}
        r["knn_change"] = round(r["knn_top1"] - base["knn_top1"], 2)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"run": str(args.run_dir), "threads": args.threads, "gate": args.gate,
                                    "distill": stats,
                                    "onnxruntime": onnxruntime.__version__, "rows": rows}, indent=1))
    print(markdown(["file", "p50 b1 ms", "p50 b32 ms", "speed-up b1 / b32", "kNN top-1", "change", "MB"],
                   [[k, r["p50_ms"][1], r["p50_ms"][32], f"{r['speedup'][1]}x / {r['speedup'][32]}x",
                     f"{r['knn_top1']:.2f}", f"{r['knn_change']:+.2f}", r["size_mb"]] for k, r in rows.items()],
                   "lrrrrrr"))


if __name__ == "__main__":
    main()
