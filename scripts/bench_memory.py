"""Memory a training step needs, per method: the peak above the process that holds the data and model.

    .venv/bin/python scripts/bench_memory.py --out runs/bench_memory.json

Peak process RSS (what bench.py reports) is mostly PyTorch itself and the decoded dataset at
32 px; the paper's "less memory" claim is about what a step adds: activations of one view
or two, a target network, optimizer state. Each (method, batch size) runs in a fresh process:
build the run, then on CPU reset the kernel's peak-RSS mark (/proc/self/clear_refs) and run
a few real train_steps; the step memory is VmHWM minus the RSS before the first step. On CUDA
the same with torch.cuda's peak-allocation counters. Writes one JSON object.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

from benchlib import SHARED_CIFAR

METHODS = ["supervised", "memdistill", "npid", "simclr", "byol"]


def _status_kb(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{key} not in /proc/self/status")


def measure_one(method: str, batch: int, data: str, steps: int, image_size: int | None) -> dict:
    import torch

    from edgessl.config import from_dict
    from edgessl.methods import PRESETS
    from edgessl.device import peak_mem_mb
    from edgessl.train import build, train_step

    s = build(from_dict({"method": {"name": method, **PRESETS[method]},
                         "data": {"spec": data, "image_size": image_size},
                         "optim": {"batch_size": batch}, "run": {"monitor_every": 0}}))
    s.model.train()
    cuda = s.device.type == "cuda"
    if cuda:
        torch.cuda.synchronize(s.device)
        torch.cuda.reset_peak_memory_stats(s.device)
        before = torch.cuda.memory_allocated(s.device)
    else:
        Path("/proc/self/clear_refs").write_text("5")  # VmHWM := current RSS
        before = _status_kb("VmRSS") * 1024
    for i in range(steps):
        idx = torch.randint(0, len(s.train), (batch,), device=s.device)
        train_step(s, idx, 0.01, i)
    if cuda:
        torch.cuda.synchronize(s.device)
        peak = peak_mem_mb(s.device) * 2**20  # the counter bench.py reports, reset above
    else:
        peak = _status_kb("VmHWM") * 1024
    return {"method": method, "batch_size": batch, "image_size": s.image_size, "device": str(s.device),
            "precision": s.precision, "steps": steps, "before_mb": round(before / 2**20, 1),
            "peak_mb": round(peak / 2**20, 1), "step_mb": round((peak - before) / 2**20, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=f"npz:{SHARED_CIFAR}")
    ap.add_argument("--methods", nargs="*", default=METHODS)
    ap.add_argument("--batch-sizes", default="64,256")
    ap.add_argument("--image-size", type=int, default=None, help="resize the data (default: its own size)")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--out", default="runs/bench_memory.json")
    ap.add_argument("--one", nargs=2, metavar=("METHOD", "BATCH"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        print(json.dumps(measure_one(args.one[0], int(args.one[1]), args.data, args.steps, args.image_size)))
        return
    rows = []
    for batch in [int(b) for b in args.batch_sizes.split(",")]:
        for method in args.methods:
            cmd = [sys.executable, __file__, "--one", method, str(batch), "--data", args.data,
                   "--steps", str(args.steps)] + (["--image-size", str(args.image_size)] if args.image_size else [])
            out = subprocess.run(cmd, capture_output=True, text=True)
            if out.returncode:
                sys.exit(f"{method} batch {batch} failed: {out.stderr.strip().splitlines()[-1]}")
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
            r = rows[-1]
            print(f"{method:11s} batch {batch:4d}: step memory {r['step_mb']:8.1f} MB  "
                  f"(process {r['before_mb']:.0f} -> {r['peak_mb']:.0f} MB)", flush=True)
    for batch in {r["batch_size"] for r in rows}:
        ref = {r["method"]: r["step_mb"] for r in rows if r["batch_size"] == batch}
        for r in rows:
            if r["batch_size"] == batch and "memdistill" in ref and ref.get(r["method"]):
                r["memdistill_over_this"] = round(ref["memdistill"] / r["step_mb"], 3)
    result = {"machine": {"cpu_count": os.cpu_count(), "platform": platform.platform()}, "rows": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
