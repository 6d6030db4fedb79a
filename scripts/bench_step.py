"""Cost of one pretraining step, side by side in one process: the levers on the step (kernels,
precision, compilation, storage), backbones, methods and heads; the share of the step spent in
the batched augmentation; with --memory, the memory a step adds, each variant in its own process.

    .venv/bin/python scripts/bench_step.py --out runs/bench_step.json
    .venv/bin/python scripts/bench_step.py --only default "PyTorch's depthwise" --data folder:DIR --profile
    .venv/bin/python scripts/bench_step.py --only "fp32 eager" simclr byol --memory --batch-size 128

Each variant is an `edgessl.Trainer` (the model, data and optimizer `pretrain` builds) on the
shared CIFAR-10 file (or --data) stepped after two warm-up steps; the variants take turns step
by step, so a busy machine slows them alike, and the first variant is the baseline of the
table's last column. The augmentation alone is timed on the same batches. --memory: on a CPU
the kernel's peak-RSS mark is reset (/proc/self/clear_refs) before the first step and the step
memory is VmHWM minus the RSS then; on CUDA, torch.cuda's peak allocation. Writes one JSON
object (machine, torch, a row per variant) and prints a Markdown table.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from benchlib import SHARED_CIFAR, markdown
from edgessl import Trainer

# name -> config overrides, on an fp32 eager step with the for-loop optimizer (each lever alone) unless a variant
# sets run.precision, run.compile or optim.fused; the backbone's output stride is the recipe's for the input size
# unless set
EAGER_FP32 = {"precision": "fp32", "compile": False}
VARIANTS = {
    "mobilenetv3, fp32 eager (the step without bf16, compile and the fused optimizer)": {},
    "mobilenetv3 (default: the recipe's precision and compile here)": {"run": {"precision": "auto", "compile": "auto"},
                                                                       "optim": {"fused": True}},
    "mobilenetv3, fused optimizer": {"optim": {"fused": True}},
    "mobilenetv3, compiled, fused optimizer": {"run": {"compile": True}, "optim": {"fused": True}},
    "mobilenetv3, PyTorch's depthwise backward": {"run": {"fast_depthwise": False}},
    "mobilenetv3, batch 128": {"optim": {"batch_size": 128}},
    "mobilenetv3, progressive resolution's first steps (3/4 side)": {"start_fraction": 0.75},
    "mobilenetv3, bf16 autocast": {"run": {"precision": "bf16"}},
    "mobilenetv3, bf16 compiled, fused optimizer": {"run": {"precision": "bf16", "compile": True},
                                                     "optim": {"fused": True}},
    "mobilenetv3, backbone compiled (torch.compile)": {"run": {"compile": True}},
    "mobilenetv3, channels-last": {"channels_last": True},
    "mobilenetv3, augmentation on 1 thread": {"run": {"augment_threads": 1}},
    "mobilenetv3, memory-mapped storage (folder data)": {"data": {"storage": "mmap"}},
    "mobilenetv3, output stride 8": {"backbone": {"downsample": 8}},
    "mobilenetv3, head 2048x3": {"method": {"head_dims": [2048, 2048, 2048]}},
    "mobilenetv3, ema bank update (NPID's)": {"method": {"bank_update": "ema"}},
    "mobilenetv3, SqrtKL and CutMix on": {"method": {"sqrtkl_weight": 20.0, "cutmix_prob": 1.0}},
    "mobilenetv3, supervised": {"method": {"name": "supervised"}},
    "mobilenetv3, simclr (2 views)": {"method": {"name": "simclr"}},
    "mobilenetv3, byol (2 views)": {"method": {"name": "byol"}},
    "mobilenetv4": {"backbone": {"name": "mobilenetv4"}},
    "resnet18 os16": {"backbone": {"name": "resnet18", "downsample": 16}},
    "resnet18 os16, supervised": {"backbone": {"name": "resnet18", "downsample": 16}, "method": {"name": "supervised"}},
    "resnet18 os8 (CIFAR stem)": {"backbone": {"name": "resnet18", "downsample": 8}},
}


def build_variant(overrides: dict, data: str, batch: int, image_size) -> Trainer:
    """The variant's Trainer; `start_fraction`: progressive resolution starting at that fraction of
    the input side, in 4 px; `channels_last`: weights and activations in channels-last memory format."""
    config = {"data": {"spec": data, "image_size": image_size or "auto"}, "optim": {"batch_size": batch, "fused": False},
              "run": {"monitor_every": 0, **EAGER_FP32}}
    for section, values in overrides.items():
        if section not in ("start_fraction", "channels_last"):
            config.setdefault(section, {}).update(values)
    t = Trainer(config)
    if "start_fraction" in overrides:
        side = t.config.data.image_size
        t.config.augment.start_size = max(4, round(side * overrides["start_fraction"] / 4) * 4)
    if overrides.get("channels_last"):
        t.model.to(memory_format=torch.channels_last)
    return t


def time_step(t: Trainer, i: int) -> tuple[float, float]:
    """One real step and the augmentation of the same batch alone: (step s, augment s)."""
    idx = torch.randint(0, len(t.images), (t.config.optim.batch_size,), device=t.device)
    t0 = time.perf_counter()
    t.step(idx, 0.01, i)  # a long schedule: a progressive run's early steps
    t1 = time.perf_counter()
    t.augment(t.images[idx])
    return t1 - t0, time.perf_counter() - t1


def profile(t: Trainer, steps: int) -> list[dict]:
    """torch.profiler over `steps` more steps: self CPU time per (operator, input shapes), largest first."""
    from torch.profiler import ProfilerActivity, profile as torch_profile

    with torch_profile(activities=[ProfilerActivity.CPU], record_shapes=True) as p:
        for i in range(steps):
            time_step(t, 100 + i)
    ops = sorted(p.key_averages(group_by_input_shape=True), key=lambda e: -e.self_cpu_time_total)
    return [{"op": e.key, "shapes": str(e.input_shapes)[:120],
             "ms_per_step": round(e.self_cpu_time_total / 1e3 / steps, 2)} for e in ops]


def _status_kb(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{key} not in /proc/self/status")


def step_memory(t: Trainer, steps: int) -> dict:
    """MB a step adds above the process that holds the data and the model (this process alone)."""
    cuda = t.device.type == "cuda"
    if cuda:
        torch.cuda.synchronize(t.device)
        torch.cuda.reset_peak_memory_stats(t.device)
        before = torch.cuda.memory_allocated(t.device)
    else:
        Path("/proc/self/clear_refs").write_text("5")  # VmHWM := current RSS
        before = _status_kb("VmRSS") * 1024
    for i in range(steps):
        t.step(step=i)
    if cuda:
        torch.cuda.synchronize(t.device)
        peak = torch.cuda.max_memory_allocated(t.device)
    else:
        peak = _status_kb("VmHWM") * 1024
    return {"before_mb": round(before / 2**20, 1), "peak_mb": round(peak / 2**20, 1),
            "step_mb": round((peak - before) / 2**20, 1)}


def row(t: Trainer, overrides: dict, times: list) -> dict:
    step, aug = (statistics.median(x[k] for x in times) for k in (0, 1))
    batch = t.config.optim.batch_size
    side = t.config.augment.start_size or t.config.data.image_size  # the crop's side (a progressive run's first steps)
    return {"overrides": overrides, "steps": len(times), "batch_size": batch, "image_size": side,
            "output_stride": t.model.backbone.output_stride, "step_ms": round(step * 1e3, 1),
            "images_per_s": round(batch / step, 1), "augment_ms": round(aug * 1e3, 2),
            "augment_share": round(aug / step, 4), "precision": t.precision, "compiled": t.config.run.compile is True,
            "device": str(t.device), "threads": torch.get_num_threads()}


def memory_rows(args, names: list[str]) -> dict:
    """Each variant's step memory, measured in a fresh process of its own (its peak is its own)."""
    rows = {}
    for n in names:
        cmd = [sys.executable, __file__, "--one-memory", n, "--data", args.data, "--batch-size", str(args.batch_size),
               "--steps", str(args.steps)] + (["--image-size", str(args.image_size)] if args.image_size else [])
        out = subprocess.run(cmd, capture_output=True, text=True)
        if out.returncode:
            sys.exit(f"{n} failed: {(out.stderr.strip().splitlines() or ['?'])[-1]}")
        rows[n] = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"{n}: step memory {rows[n]['step_mb']:.1f} MB (process {rows[n]['before_mb']:.0f} -> "
              f"{rows[n]['peak_mb']:.0f} MB)", flush=True)
    return rows


def timing_rows(args, names: list[str]) -> dict:
    trainers = {n: build_variant(VARIANTS[n], args.data, args.batch_size, args.image_size) for n in names}
    times = {n: [] for n in names}
    for i in range(args.steps + 2):  # two warm-up steps; the CIFAR-stem ResNet takes every 4th turn only
        for n in names:
            if "os8 (CIFAR stem)" in n and i % 4 and i >= 2:
                continue
            x = time_step(trainers[n], i)
            if i >= 2:
                times[n].append(x)
    rows = {n: row(trainers[n], VARIANTS[n], times[n]) for n in names}
    if args.profile:
        for n in names:
            rows[n]["profile"] = profile(trainers[n], 3)
            print(f"{n}: self CPU ms per step, top operators")
            for op in rows[n]["profile"][:12]:
                print(f"  {op['ms_per_step']:8.1f}  {op['op']}  {op['shapes']}")
    base = rows[names[0]]["images_per_s"]
    print(markdown(["variant", "input", "stride", "precision", "compiled", "images/s", "step ms",
                    "augmentation ms (share)", f"x {names[0]}"],
                   [[n, r["image_size"], r["output_stride"], r["precision"], "yes" if r["compiled"] else "no",
                     f"{r['images_per_s']:.0f}", f"{r['step_ms']:.0f}",
                     f"{r['augment_ms']:.1f} ({100 * r['augment_share']:.1f}%)", f"{r['images_per_s'] / base:.2f}x"]
                    for n, r in rows.items()], "lrrllrrrr"))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=f"npz:{SHARED_CIFAR}")
    ap.add_argument("--image-size", type=int, help="input size (default: the data's own, as pretrain picks it)")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--only", nargs="*", help="substrings of variant names to run")
    ap.add_argument("--profile", action="store_true",
                    help="also print where each variant's step time goes (torch.profiler, by operator and shape)")
    ap.add_argument("--memory", action="store_true", help="the step memory of each variant instead of its time")
    ap.add_argument("--one-memory", help=argparse.SUPPRESS)
    ap.add_argument("--out", default="runs/bench_step.json")
    args = ap.parse_args()
    if args.one_memory:
        t = build_variant(VARIANTS[args.one_memory], args.data, args.batch_size, args.image_size)
        print(json.dumps({"batch_size": args.batch_size, "precision": t.precision, **step_memory(t, args.steps)}))
        return
    names = [n for n in VARIANTS if not args.only or any(o in n for o in args.only)]
    rows = memory_rows(args, names) if args.memory else timing_rows(args, names)
    result = {"machine": {"cpu_count": os.cpu_count(), "platform": platform.platform(),
                          "processor": platform.processor()}, "torch": str(torch.__version__),
              "data": args.data, "measure": "memory" if args.memory else "time", "variants": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
