"""GPU check: one command for a machine with a CUDA GPU; one JSON and one Markdown table.

    .venv/bin/python scripts/gpu_check.py --out runs/gpu_check        # a CUDA machine, about 8 minutes
    python3 scripts/gpu_check.py --plan short --out runs/gpu_check    # one call of a 15-minute GPU budget
    .venv/bin/python scripts/gpu_check.py --dry-run --out /tmp/gc     # the CPU, tiny sizes, seconds (CI)

1. the tests that build a model through conftest's tiny_config, with EDGESSL_TEST_DEVICE set to the
   device (they train on it); the rest of the suite (CLI, export, the edge runtime) runs on the CPU in CI;
2. training-step throughput and peak memory: methods x backbones x input sizes x precisions,
   eager, torch.compile'd, and captured whole as one CUDA graph (run.capture), each on synthetic
   images of that size (only the step is timed; the device is synchronised around the timed steps,
   not inside them; a captured row's warm-up holds its capture);
3. an equal-budget kNN: memdistill against SimCLR (the recipe's defaults, so captured where the
   recipe captures) for --minutes each on the shared CIFAR-10 file and the flower photos, 20%
   held out (split_seed 1).
--parts runs some of the three (each writes its part of the JSON, so a call of at most 10 minutes holds one).
Nothing here assumes a CPU count or a GPU model. A part that fails is recorded with its error
and the script goes on.
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np
import torch

from benchlib import REPO, SHARED_CIFAR, markdown
import edgessl

# test files whose models train on EDGESSL_TEST_DEVICE (conftest.tiny_config); left out: torchrun's, and
# test_export / test_edge, which train too but test onnxruntime and the edge runtime, both on the CPU
DEVICE_TESTS = ["tests/test_capture.py", "tests/test_train.py", "tests/test_baselines.py", "tests/test_reliability.py",
                "tests/test_recipe.py", "tests/test_bench.py", "tests/test_mmap.py", "tests/test_user_data.py"]
# full: every method x backbone x size x precision eagerly; compiled: the default precision only (each
# compilation costs tens of seconds). A part stops starting new rows (new arms) past its allowance
# (seconds), so the whole check stays near 8 minutes; rows not run
# are recorded as skipped.
FULL = {"methods": ["memdistill", "supervised", "simclr", "byol"], "backbones": ["mobilenetv3", "resnet18"],
        "sizes": [32, 224], "precisions": ["fp32", "bf16", "fp16"], "compiled": [("memdistill", "bf16"),
        ("supervised", "bf16")], "captured": [("memdistill", "fp32"), ("memdistill", "bf16"), ("supervised", "bf16"),
        ("simclr", "bf16")], "batch": 128, "steps": 10, "warmup": 3, "tests": DEVICE_TESTS,
        "allowance": {"tests": 150, "eager": 150, "compiled": 80, "captured": 90, "equal_budget": 600}}
# short: one call of a 15-minute GPU budget (machine start included): the capture tests, memdistill's
# step eager against captured at 32 px, then the equal budget
SHORT = {**FULL, "methods": ["memdistill"], "sizes": [32], "precisions": ["fp32", "bf16"], "compiled": [],
         "captured": [("memdistill", "fp32"), ("memdistill", "bf16")], "tests": ["tests/test_capture.py"],
         "allowance": {"tests": 90, "eager": 60, "compiled": 0, "captured": 60, "equal_budget": 240}}
DRY = {"methods": ["memdistill", "simclr"], "backbones": ["mobilenetv3_small_050"], "sizes": [16],
       "precisions": ["fp32"], "compiled": [], "captured": [("memdistill", "fp32")], "batch": 8, "steps": 2,
       "warmup": 1, "tests": ["tests/test_losses.py"],
       "allowance": {"tests": 120, "eager": 60, "compiled": 60, "captured": 60, "equal_budget": 600}}
PLANS = {"full": FULL, "short": SHORT}
MODES = ("eager", "compiled", "captured")


def synthetic(root: Path, size: int, n: int) -> str:
    path = root / f"synthetic{size}_{n}.npz"
    if not path.exists():
        rng = np.random.default_rng(0)
        np.savez(path, x=rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8), y=np.arange(n) % 10)
    return f"npz:{path}"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def step_rate(method: str, backbone: str, size: int, precision: str, mode: str, plan: dict, device: str,
              work: Path) -> dict:
    b, steps = plan["batch"], plan["steps"]
    warmup = max(plan["warmup"], edgessl.Trainer.capture_warmup + 2) if mode == "captured" else plan["warmup"]
    spec = synthetic(work, size, b * (steps + warmup + 1))
    t = edgessl.Trainer({"data": {"spec": spec, "image_size": size},  # pinned: auto trains 224 px photos at 128 px
                         "backbone": {"name": backbone}, "method": {"name": method},
                         "optim": {"batch_size": b, "epochs": 1},
                         "run": {"device": device, "precision": precision, "compile": mode == "compiled",
                                 "capture": mode == "captured", "monitor_every": 0, "report": False}})
    batches = torch.arange(len(t.images), device=t.device).split(b)
    t0 = time.perf_counter()
    for i in range(warmup):  # compilation, capture, allocator and kernel selection happen here
        t.step(batches[i], 1e-3, i, 100)
    sync(t.device)
    warm_s = time.perf_counter() - t0
    if t.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(t.device)
    t0 = time.perf_counter()
    for i in range(steps):
        t.step(batches[warmup + i], 1e-3, warmup + i, 100)
    sync(t.device)
    dt = time.perf_counter() - t0
    return {"trained_px": t.config.data.image_size, "images_per_s": round(b * steps / dt, 1),
            "step_ms": round(1e3 * dt / steps, 2), "warmup_s": round(warm_s, 2),
            "peak_mem_mb": round(torch.cuda.max_memory_allocated(t.device) / 2**20 if t.device.type == "cuda"
                                 else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)}  # (CPU: peak RSS)


def throughput(plan: dict, device: str, work: Path) -> list[dict]:
    todo = [(m, b, s, p, "eager") for m, b, s, p in itertools.product(plan["methods"], plan["backbones"],
                                                                       plan["sizes"], plan["precisions"])]
    for mode in ("compiled", "captured"):
        todo += [(m, b, s, p, mode) for (m, p), b, s in itertools.product(plan[mode], plan["backbones"], plan["sizes"])]
    rows, started = [], dict.fromkeys(MODES)
    for method, backbone, size, precision, mode in todo:
        row = {"method": method, "backbone": backbone, "size": size, "precision": precision, "mode": mode}
        started[mode] = started[mode] or time.perf_counter()
        if time.perf_counter() - started[mode] > plan["allowance"][mode]:
            row["error"] = "skipped: past this part's time allowance"
            rows.append(row)
            continue
        try:
            row.update(step_rate(method, backbone, size, precision, mode, plan, device, work))
        except Exception as e:  # a combination a device cannot run (fp16 on a CPU, memory): recorded, not fatal
            row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


def equal_budget(minutes: float, dry: bool, device: str, work: Path, allowance: float, save) -> dict:
    """memdistill and SimCLR on each data set; `save(out)` after every arm, so a
    call stopped by its limit keeps the arms it finished. No arm starts past `allowance` seconds."""
    out, t0 = {}, time.perf_counter()
    flowers = SHARED_CIFAR.parent / "flowers" / "train"
    sets = {"cifar": f"npz:{SHARED_CIFAR}", **({"flowers": f"folder:{flowers}"} if flowers.is_dir() else {})}
    sets = sets if not dry else {"synthetic": synthetic(work, 16, 64)}
    arms = [(name, method) for name in sets for method in ("memdistill", "simclr")]
    for name, method in arms:
        key = f"{name} {method}"
        if time.perf_counter() - t0 > allowance:
            out[key] = {"error": "skipped: past this part's time allowance"}
        else:
            out[key] = own_arm(sets[name], method, minutes, dry, device, work / f"knn_{name}_{method}")
        save(out)
    return out


def own_arm(data: str, method: str, minutes: float, dry: bool, device: str, run: Path) -> dict:
    budget = {"epochs": 1} if dry else {"epochs": None, "minutes": minutes}
    extra = {"backbone": {"name": "mobilenetv3_small_050"}, "optim": {"batch_size": 8, **budget}} if dry else \
        {"optim": budget}
    config = {"data": {"spec": data, "val_fraction": 0.2, "split_seed": 1}, "method": {"name": method}, **extra,
              "run": {"device": device, "monitor_every": 10**6, "report": False,  # kNN at the end only
                      "knn_k": 5 if dry else 200}}
    try:
        lines = []
        r = edgessl.pretrain(out=run, config=config, progress=False, log=lines.append).summary
        return {**{k: round(r[k], 2) if isinstance(r[k], float) else r[k] for k in (
            "knn_top1", "knn_pixels", "knn_untrained", "epochs", "seconds", "images_per_s", "peak_mem_mb")},
            "recipe": next((x for x in lines if x.startswith("recipe:")), ""),
            "capture_note": next((x for x in lines if x.startswith("capture ")), "")}
    except Exception as e:
        return {"error": f"{type(e).__name__}: {e}"[:300]}


def test_suite(dry: bool, device: str, files: list, allowance: float) -> dict:
    workers = max(1, min(8, (os.cpu_count() or 1) // 2))
    args = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"] + (
        files if dry else ["-m", "not slow", "-n", str(workers), *files])
    t0 = time.perf_counter()
    try:
        r = subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=allowance,
                           env={**os.environ, "EDGESSL_TEST_DEVICE": device})
        code, tail = r.returncode, (r.stdout.strip().splitlines() or [""])[-1]
    except subprocess.TimeoutExpired:
        code, tail = None, f"stopped after its {allowance:.0f} s allowance"
    return {"returncode": code, "summary": tail, "seconds": round(time.perf_counter() - t0, 1)}


def table(result: dict) -> str:
    rows = [[r["method"], r["backbone"], r["size"], r["precision"], r["mode"],
             r.get("images_per_s", "-"), r.get("step_ms", "-"), r.get("peak_mem_mb", "-"), r.get("warmup_s", "-"),
             r.get("error", "")] for r in result.get("throughput", [])]
    text = [f"GPU check on {result['device_name']} ({result['device']}), torch {result['torch']}"
            f"{' (dry run)' if result['dry_run'] else ''}", "",
            markdown(["method", "backbone", "px", "precision", "step", "images/s", "step ms", "peak MB",
                      "warm-up s", "error"], rows, "lllllrrrrl"), ""]
    knn = [[m] + [r.get(k, "-") for k in ("knn_top1", "knn_pixels", "knn_untrained", "epochs", "seconds",
                                          "images_per_s")] + [r.get("error", "")]
           for m, r in result.get("equal_budget", {}).items()]
    tests = result.get("tests", {"summary": "not run", "returncode": "-", "seconds": "-"})
    text += [markdown(["data and method", "kNN top-1", "raw pixels", "untrained", "epochs", "seconds", "images/s",
                       "error"],
                      knn, "lrrrrrrl"), "",
             f"test suite: {tests['summary']} (exit {tests['returncode']}, {tests['seconds']} s)"]
    return "\n".join(text)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=REPO / "runs" / "gpu_check")
    ap.add_argument("--dry-run", action="store_true", help="CPU, tiny sizes: checks the script itself")
    ap.add_argument("--minutes", type=float, default=1.0,
                    help="budget of each equal-budget run (2 methods x 2 data sets)")
    ap.add_argument("--device", default=None, help="default: cuda (cpu with --dry-run)")
    ap.add_argument("--parts", default="tests,throughput,equal_budget", help="which parts to run (comma-separated)")
    ap.add_argument("--plan", default="full", choices=sorted(PLANS),
                    help="full: every row (two calls of 10 minutes); short: what one call of a 15-minute GPU budget holds")
    args = ap.parse_args()
    device = args.device or ("cpu" if args.dry_run else "cuda")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("error: no CUDA device visible to torch (use --dry-run to check the script on the CPU)")
    plan = DRY if args.dry_run else PLANS[args.plan]
    args.out.mkdir(parents=True, exist_ok=True)
    result = {"dry_run": args.dry_run, "device": device, "torch": torch.__version__, "machine": platform.platform(),
              "device_name": torch.cuda.get_device_name(0) if device.startswith("cuda") else platform.processor()
              or "cpu", "cpus": os.cpu_count()}
    previous = args.out / "gpu_check.json"  # with --parts, the parts an earlier call ran are kept
    if previous.exists() and args.parts != ap.get_default("parts"):
        result = {**json.loads(previous.read_text()), **result}
    started, result["part_seconds"] = time.perf_counter(), result.get("part_seconds", {})

    def save(**parts) -> None:  # after every part (and arm): a check stopped by a limit keeps what it measured
        result.update(parts, seconds=round(time.perf_counter() - started, 1))
        (args.out / "gpu_check.json").write_text(json.dumps(result, indent=1))

    with tempfile.TemporaryDirectory() as tmp:
        for part, fn in (("tests", lambda: test_suite(args.dry_run, device, plan["tests"], plan["allowance"]["tests"])),
                         ("throughput", lambda: throughput(plan, device, Path(tmp))),
                         ("equal_budget", lambda: equal_budget(args.minutes, args.dry_run, device, Path(tmp),
                                                               plan["allowance"]["equal_budget"],
                                                               lambda arms: save(equal_budget=arms)))):
            if part not in args.parts.split(","):
                continue
            t0 = time.perf_counter()
            try:
                result[part] = fn()
            except Exception:
                result[part] = {"error": traceback.format_exc(limit=3)}
            result["part_seconds"][part] = round(time.perf_counter() - t0, 1)
            save()
    (args.out / "gpu_check.md").write_text(table(result) + "\n")
    print(table(result))
    print(f"wrote {args.out / 'gpu_check.json'} and {args.out / 'gpu_check.md'} ({result['seconds']} s)")


if __name__ == "__main__":
    main()
