"""Every runtime x precision for every backbone alias: `edgessl benchmark` on each, one table.

    .venv/bin/python scripts/bench_export.py --out runs/bench_export.json
    .venv/bin/python scripts/bench_export.py --runs RUN_DIR [RUN_DIR ...] --out runs/bench_export_trained.json

For each alias it makes a run (two training steps on the shared CIFAR-10 file at 32 px, 20%
held out: the weights are near their initialisation, so the speeds are the network's and the
kNN column is not a trained one's) and runs `edgessl benchmark` on it: onnx, openvino, litert
and executorch at fp32, fp16 and int8, each file checked in its runtime, all timed side by side
at batch 1 and 32 on one thread. `--runs` benchmarks trained run directories instead (their own
held-out split). Writes JSON and a Markdown table next to it.
"""
from __future__ import annotations

import argparse
import json
import platform
import tempfile
from pathlib import Path

from benchlib import SHARED_CIFAR
from edgessl.api import benchmark_table as markdown
import edgessl

ALIASES = ["mobilenetv3", "mobilenetv3-large", "mobilenetv4", "resnet18"]


def two_step_run(alias: str, data: str, work: Path) -> Path:
    run = work / alias
    edgessl.pretrain(out=run, data=data, val_fraction=0.2, image_size=32, backbone=alias, batch_size=32, epochs=1,
                     progress=False, log=lambda *_: None, **{"data.train_subset": 64, "run.monitor_every": 0})
    return run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=f"npz:{SHARED_CIFAR}")
    ap.add_argument("--only", nargs="*", help="aliases to run (default: all)")
    ap.add_argument("--runs", nargs="*", help="trained run directories to benchmark instead of two-step runs")
    ap.add_argument("--adapt-seconds", type=float, default=120.0)
    ap.add_argument("--out", default="runs/bench_export.json")
    args = ap.parse_args()
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        runs = [(Path(r).name, Path(r)) for r in args.runs or []] or [
            (a, None) for a in ALIASES if not args.only or a in args.only]
        for name, run in runs:
            run = run or two_step_run(name, args.data, Path(tmp))
            results[name] = edgessl.Run(run).benchmark(adapt_seconds=args.adapt_seconds)
            print(f"## {name}\n\n{markdown(results[name])}\n", flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"machine": platform.platform(), "results": results}, indent=1))
    out.with_suffix(".md").write_text("".join(f"## {k}\n\n{markdown(v)}\n\n" for k, v in results.items()))
    print(f"wrote {out} and {out.with_suffix('.md')}")


if __name__ == "__main__":
    main()
