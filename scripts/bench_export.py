"""ONNX export benchmark: size, latency, parity and kNN of fp32 / fp16 / int8, side by side.

    .venv/bin/python scripts/bench_export.py --out runs/bench_export.json
    .venv/bin/python scripts/bench_export.py --runs RUN_DIR [RUN_DIR ...] --out runs/bench_export_trained.json

For each backbone and input size it makes a run (one training step on the shared CIFAR-10
file, 20% held out: the weights are near their initialisation),
exports it at each precision, and measures through onnxruntime: p50 latency at batch 1 and 32
on one thread, the speed-up over the run's fp32 export that `edgessl export` itself measures
(the two files taking turns, on 1 thread and on onnxruntime's default), parity with torch,
and kNN top-1 on the held-out split. Writes JSON and a Markdown table next to it. `--runs` measures trained
run directories instead (their own held-out split), so int8's kNN change is a trained one's.
"""
from __future__ import annotations

import argparse
import json
import platform
import tempfile
from pathlib import Path

import onnxruntime

from benchlib import SHARED_CIFAR, markdown
from edgessl.export import check, export_model
from edgessl.runs import load_run
import edgessl

MODELS = [("mobilenetv3_small_100", 32), ("mobilenetv3_large_100", 32), ("mobilenetv3-relu", 32), ("resnet18", 32),
          ("mobilenetv4_conv_small", 32), ("mobilenetv3_small_100", 224)]


def one_step_run(name: str, size: int, data: str, work: Path) -> Path:
    run = work / f"{name}-{size}"
    edgessl.pretrain(out=run, data=data, val_fraction=0.2, image_size=size, backbone=name, batch_size=32, epochs=1,
                     progress=False, log=lambda *_: None, **{"data.train_subset": 64, "run.monitor_every": 0})
    return run  # two steps: the export's speed and parity do not depend on training


def bench_model(run: Path, name: str, size: int, work: Path, threads: int, iters: int) -> dict:
    rows = {}
    for precision in ("fp32", "fp16", "int8"):
        path = work / f"{run.name}-{precision}.onnx"
        exp = export_model(run, path, precision=precision)
        chk = check(path, batch_sizes=(1, 32), threads=threads, iters=iters)
        rows[precision] = {"size_mb": round(exp["size_bytes"] / 2**20, 2), "max_abs_diff": exp["max_abs_diff"],
                           "min_cosine": exp["min_cosine"], "knn_top1": exp.get("knn_export"),
                           "knn_change": exp.get("knn_change"), "adapted": exp.get("adapted"),
                           "p50_ms": {b: chk["latency_ms"][b]["p50"] for b in ("1", "32")}}
        if "speedup_vs_fp32" in exp:  # {threads: {batch: x}}, threads 0: onnxruntime's default
            rows[precision]["speedup"] = {str(t): {str(b): x for b, x in per_b.items()}
                                          for t, per_b in exp["speedup_vs_fp32"].items()}
        print(f"{name} {size}px {precision}: {rows[precision]}", flush=True)
    return rows


def table(results: dict) -> str:
    rows = []
    for key, by_precision in results.items():
        name, size = key.rsplit("@", 1)
        for p, r in by_precision.items():
            sp = [f"{r['speedup'][t]['1']}x / {r['speedup'][t]['32']}x" if "speedup" in r else "1x"
                  for t in ("1", "0")]
            knn = "" if r["knn_top1"] is None else round(r["knn_top1"], 2)
            rows.append([name, size, p, r["size_mb"], r["p50_ms"]["1"], r["p50_ms"]["32"], *sp,
                         f"{r['min_cosine']:.4f}", knn])
    return markdown(["backbone", "px", "precision", "MB", "p50 b1 ms", "p50 b32 ms", "speed-up b1 / b32, 1 thread",
                     "default threads", "min cosine", "kNN top-1"], rows, "lrlrrrrrrr")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=f"npz:{SHARED_CIFAR}")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--iters", type=int, default=50)
    ap.add_argument("--only", nargs="*", help="substrings of backbone names to run")
    ap.add_argument("--runs", nargs="*", help="trained run directories to measure instead of one-step runs")
    ap.add_argument("--out", default="runs/bench_export.json")
    args = ap.parse_args()
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, size in ([] if args.runs else MODELS):
            if args.only and not any(o in name for o in args.only):
                continue
            run = one_step_run(name, size, args.data, Path(tmp))
            results[f"{name}@{size}"] = bench_model(run, name, size, Path(tmp), args.threads, args.iters)
        for run in args.runs or []:
            cfg = edgessl.Run(run).config
            size = load_run(run)[2]["backbone"]["image_size"]
            results[f"{cfg.backbone.name}@{size} ({Path(run).name})"] = bench_model(
                Path(run), cfg.backbone.name, size, Path(tmp), args.threads, args.iters)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"machine": platform.platform(), "onnxruntime": onnxruntime.__version__,
                               "threads": args.threads, "results": results}, indent=1))
    out.with_suffix(".md").write_text(table(results) + "\n")
    print(table(results))
    print(f"wrote {out} and {out.with_suffix('.md')}")


if __name__ == "__main__":
    main()
