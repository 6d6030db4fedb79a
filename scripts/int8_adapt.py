"""int8 for hard-swish networks: swap hard-swish for ReLU and distil, measured side by side.

    .venv/bin/python scripts/int8_adapt.py RUN_DIR [--seconds 120] [--threads 1,0] [--neighbours 1] [--seed 0]
        [--out runs/int8_adapt.json]

Rows, all through onnxruntime in this one process: the run's fp32 export; its int8 export
without adaptation (hard activations rewritten as relu6 forms, SE gates' hard-sigmoid folded
into their convs); a ReLU student that keeps the squeeze-excite blocks, in int8; the ReLU
student with the blocks folded to their mean gates (`edgessl export --precision int8`), in
fp32 and in int8. Each student is distilled for --seconds on the run's training images. Each
row with p50 latency at batch 1 and 32 for every thread count in --threads (0: onnxruntime's
default), the files taking turns, the speed-up over the fp32 export at the same thread count,
and kNN top-1 on the run's held-out split.
"""
from __future__ import annotations

import argparse
import copy
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
from edgessl.export import Encoder, int8_weight_bits, quantize_int8, rewrite_hard_activations, run_images, torch_export
from edgessl.knn import knn_accuracy
from edgessl.onnxrt import latency_side_by_side, ort_features, session, speedups
from edgessl.runs import load_run

ROUNDS = 4  # latency rounds of 10 calls per file, batch size and thread count, the median reported


def features(sess, data, cfg) -> torch.Tensor:
    return torch.from_numpy(np.concatenate([ort_features(sess, normalize(c, cfg.data.mean, cfg.data.std).numpy())
                                            for c in data.images.split(256)]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run_dir", type=Path)
    ap.add_argument("--seconds", type=float, default=120.0)
    ap.add_argument("--threads", default="1", help="comma-separated onnxruntime thread counts, 0: its default")
    ap.add_argument("--neighbours", type=float, default=1.0, help="weight of the neighbour loss (0: cosine alone)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=Path("runs/int8_adapt.json"))
    args = ap.parse_args()
    threads = [int(t) for t in args.threads.split(",")]
    model, cfg, state = load_run(args.run_dir)
    size = state["backbone"]["image_size"]
    train, val = data_lib.load_split(cfg.data)
    calib = run_images(train, 256, cfg)
    teacher = model.backbone.eval()
    kw = dict(seconds=args.seconds, neighbours=args.neighbours, seed=args.seed)
    kept, kept_stats = distill(teacher, train.images, cfg, fold_se=False, **kw)
    student, stats = distill(teacher, train.images, cfg, **kw)
    print(f"distilled: SE kept {kept_stats}, SE folded {stats}", flush=True)
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        def build(name, net, rewrite=None):
            fp32 = Path(tmp) / f"{name}.fp32.onnx"
            enc = Encoder(copy.deepcopy(net)).eval()
            if rewrite:
                rewrite(enc)
            torch_export(enc, fp32, size, "dynamic", 18)
            if not rewrite:
                return fp32
            q = Path(tmp) / f"{name}.int8.onnx"
            quantize_int8(fp32, q, calib, int8_weight_bits())
            return q

        files = {"fp32 export": build("teacher", teacher),
                 "int8, no adaptation": build("teacher_q", teacher, rewrite_hard_activations),
                 "ReLU student, SE kept, int8": build("kept_q", kept, rewrite_hard_activations),
                 "ReLU student, SE folded, fp32": build("student", student),
                 "ReLU student, SE folded, int8 (the export)": build("student_q", student, rewrite_hard_activations)}
        p50 = latency_side_by_side(files, calib, (1, 32), threads, rounds=ROUNDS)
        for name, path in files.items():
            sess = session(path, threads[0] or None)
            rows[name] = {"size_mb": round(path.stat().st_size / 2**20, 2), "p50_ms": p50[name],
                          "knn_top1": knn_accuracy(features(sess, train, cfg), train.labels, features(sess, val, cfg),
                                                   val.labels, len(train.classes), cfg.run.knn_k)}
            print(name, rows[name], flush=True)
    base = rows["fp32 export"]
    for name, up in speedups({k: r["p50_ms"] for k, r in rows.items()}, "fp32 export").items():
        rows[name]["speedup"] = up
        rows[name]["knn_change"] = round(rows[name]["knn_top1"] - base["knn_top1"], 2)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"run": str(args.run_dir), "threads": args.threads, "seconds": args.seconds,
                                    "neighbours": args.neighbours, "seed": args.seed,
                                    "distill": {"se_kept": kept_stats, "se_folded": stats},
                                    "onnxruntime": onnxruntime.__version__, "rows": rows}, indent=1))
    head = [h for t in threads for h in (f"p50 b1 / b32 ms, {t or 'default'} thr", "speed-up")]
    print(markdown(["file", *head, "kNN top-1", "change", "MB"],
                   [[k, *[c for t in threads for c in (f"{r['p50_ms'][t][1]} / {r['p50_ms'][t][32]}",
                                                      f"{r['speedup'][t][1]}x / {r['speedup'][t][32]}x")],
                     f"{r['knn_top1']:.2f}", f"{r['knn_change']:+.2f}", r["size_mb"]] for k, r in rows.items()],
                   "l" + "rr" * len(threads) + "rrr"))


if __name__ == "__main__":
    main()
