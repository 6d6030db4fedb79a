"""Cost of one pretraining step, side by side in one process: the levers on the step (kernels,
precision, threads of the augmentation), backbones, methods, heads, and the share of the
step spent in the batched augmentation.

    .venv/bin/python scripts/bench_step.py --out runs/bench_step.json
    .venv/bin/python scripts/bench_step.py --only default "PyTorch's depthwise" --data folder:DIR --profile

Each variant runs the real train_step (augment + forward + backward + bank update) on
the shared CIFAR-10 file (or --data) after two warm-up steps; the variants take turns step
by step, so a busy machine slows them alike, and the first variant run is the baseline of
the table's last column. The augmentation alone is timed on the same batches. Writes one
JSON object (machine, torch, a row per variant) and prints a Markdown table.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch

from benchlib import SHARED_CIFAR
from edgessl.config import from_dict
from edgessl.train import build, train_step


# name -> config overrides, on an fp32 eager step with the for-loop optimizer (each lever alone) unless a variant
# sets run.precision, run.compile or optim.fused; the backbone's output stride is the recipe's for the input size
# unless set
EAGER_FP32 = {"precision": "fp32", "compile": False}
VARIANTS = {
    "mobilenetv3, fp32 eager (the step before bf16, compile and the fused optimizer)": {},
    "mobilenetv3 (default: the recipe's precision and compile here)": {"run": {"precision": "auto", "compile": "auto"},
                                                                       "optim": {"fused": True}},
    "mobilenetv3, fused optimizer": {"optim": {"fused": True}},
    "mobilenetv3, compiled, fused optimizer": {"run": {"compile": True}, "optim": {"fused": True}},
    "mobilenetv3, PyTorch's depthwise backward": {"run": {"fast_depthwise": False}},
    "mobilenetv3, batch 128": {"optim": {"batch_size": 128}},
    "mobilenetv3, progressive resolution's first steps (3/4 side)": {"start_fraction": 0.75},
    "mobilenetv3, bf16 autocast": {"run": {"precision": "bf16"}},
    "mobilenetv3, backbone compiled (torch.compile)": {"run": {"compile": True}},
    "mobilenetv3, bf16, compiled": {"run": {"precision": "bf16", "compile": True}},
    "mobilenetv3, channels-last": {"channels_last": True},
    "mobilenetv3, channels-last, bf16, compiled": {"channels_last": True, "run": {"precision": "bf16", "compile": True}},
    "mobilenetv3, augmentation on 1 thread": {"run": {"augment_threads": 1}},
    "mobilenetv3, output stride 8": {"backbone": {"downsample": 8}},
    "mobilenetv3, head 2048x3": {"method": {"head_dims": [2048, 2048, 2048]}},
    "mobilenetv3, ema bank update (NPID's)": {"method": {"bank_update": "ema"}},
    "mobilenetv3, SqrtKL and CutMix on": {"method": {"sqrtkl_weight": 20.0, "cutmix_prob": 1.0}},
    "mobilenetv3, supervised": {"method": {"name": "supervised"}},
    "mobilenetv3, simclr (2 views)": {"method": {"name": "simclr", "head_dims": [1024, 128]}},
    "mobilenetv3, byol (2 views)": {"method": {"name": "byol", "head_dims": [1024, 128]}},
    "mobilenetv4": {"backbone": {"name": "mobilenetv4"}},
    "resnet18 os16": {"backbone": {"name": "resnet18", "downsample": 16}},
    "resnet18 os16, bf16 autocast": {"backbone": {"name": "resnet18", "downsample": 16}, "run": {"precision": "bf16"}},
    "resnet18 os16, supervised": {"backbone": {"name": "resnet18", "downsample": 16}, "method": {"name": "supervised"}},
    "resnet18 os8 (CIFAR stem)": {"backbone": {"name": "resnet18", "downsample": 8}},
    "resnet18 os8 (CIFAR stem), supervised": {"backbone": {"name": "resnet18", "downsample": 8},
                                              "method": {"name": "supervised"}},
}


def build_variant(overrides: dict, data: str, batch: int, image_size):
    """A train Setup for the variant; `start_fraction`: progressive resolution starting at that
    fraction of the input side (known once the recipe has picked it), in 4 px; `channels_last`:
    the network's weights and activations in channels-last memory format."""
    base = {"data": {"spec": data, "image_size": image_size}, "optim": {"batch_size": batch, "fused": False},
            "run": {"monitor_every": 0, **EAGER_FP32}}
    for section, values in overrides.items():
        if section not in ("start_fraction", "channels_last"):
            base.setdefault(section, {}).update(values)
    s = build(from_dict(base))
    if "start_fraction" in overrides:
        s.cfg.augment.start_size = max(4, round(s.image_size * overrides["start_fraction"] / 4) * 4)
    if overrides.get("channels_last"):
        s.model.to(memory_format=torch.channels_last)
    s.model.train()
    return s


def time_step(s, i: int) -> tuple[float, float]:
    """One real train_step and the augmentation of the same batch alone: (step s, augment s)."""
    batch = s.cfg.optim.batch_size
    idx = torch.randint(0, len(s.train), (batch,), device=s.device)
    t0 = time.perf_counter()
    train_step(s, idx, 0.01, i, 10**9)  # a long schedule: a progressive run's early steps
    t1 = time.perf_counter()
    s.augment(s.train.images[idx])
    return t1 - t0, time.perf_counter() - t1


def profile(s, steps: int) -> list[dict]:
    """torch.profiler over `steps` more steps: self CPU time per (operator, input shapes), largest first."""
    from torch.profiler import ProfilerActivity, profile as torch_profile

    with torch_profile(activities=[ProfilerActivity.CPU], record_shapes=True) as p:
        for i in range(steps):
            time_step(s, 100 + i)
    ops = sorted(p.key_averages(group_by_input_shape=True), key=lambda e: -e.self_cpu_time_total)
    return [{"op": e.key, "shapes": str(e.input_shapes)[:120], "ms_per_step": round(e.self_cpu_time_total / 1e3 / steps, 2)}
            for e in ops]


def row(s, overrides: dict, times: list) -> dict:
    step, aug = (statistics.median(t[k] for t in times) for k in (0, 1))
    batch = s.cfg.optim.batch_size
    side = s.cfg.augment.start_size or s.image_size  # the crop's side (a progressive run's first steps)
    return {"overrides": overrides, "steps": len(times), "batch_size": batch, "image_size": side,
            "output_stride": s.model.backbone.output_stride,
            "step_ms": round(step * 1e3, 1), "images_per_s": round(batch / step, 1), "augment_ms": round(aug * 1e3, 2),
            "augment_share": round(aug / step, 4), "precision": s.precision, "compiled": s.cfg.run.compile is True,
            "device": str(s.device),
            "threads": torch.get_num_threads()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=f"npz:{SHARED_CIFAR}")
    ap.add_argument("--image-size", type=int, help="input size (default: the data's own, as pretrain picks it)")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--only", nargs="*", help="substrings of variant names to run")
    ap.add_argument("--profile", action="store_true",
                    help="also print where each variant's step time goes (torch.profiler, by operator and shape)")
    ap.add_argument("--out", default="runs/bench_step.json")
    args = ap.parse_args()
    names = [n for n in VARIANTS if not args.only or any(o in n for o in args.only)]
    setups = {n: build_variant(VARIANTS[n], args.data, args.batch_size, args.image_size) for n in names}
    times = {n: [] for n in names}
    for i in range(args.steps + 2):  # two warm-up steps; the CIFAR-stem ResNet takes every 4th turn only
        for n in names:
            if "os8 (CIFAR stem)" in n and i % 4 and i >= 2:
                continue
            t = time_step(setups[n], i)
            if i >= 2:
                times[n].append(t)
    rows = {n: row(setups[n], VARIANTS[n], times[n]) for n in names}
    if args.profile:
        for n in names:
            rows[n]["profile"] = profile(setups[n], 3)
            print(f"{n}: self CPU ms per step, top operators")
            for op in rows[n]["profile"][:12]:
                print(f"  {op['ms_per_step']:8.1f}  {op['op']}  {op['shapes']}")
    base = rows[names[0]]["images_per_s"]
    print(f"| variant | input | stride | precision | compiled | images/s | step ms | augmentation ms (share) "
          f"| x {names[0]} |")
    print("| --- | ---: | ---: | --- | --- | ---: | ---: | ---: | ---: |")
    for n, r in rows.items():
        print(f"| {n} | {r['image_size']} | {r['output_stride']} | {r['precision']} | {'yes' if r['compiled'] else 'no'} "
              f"| {r['images_per_s']:.0f} | {r['step_ms']:.0f} | {r['augment_ms']:.1f} ({100 * r['augment_share']:.1f}%) "
              f"| {r['images_per_s'] / base:.2f}x |")
    result = {"machine": {"cpu_count": os.cpu_count(), "platform": platform.platform(),
                          "processor": platform.processor()}, "torch": str(torch.__version__),
              "data": args.data, "variants": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
