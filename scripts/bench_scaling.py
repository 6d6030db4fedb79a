"""Scaling out, measured: a folder larger than you want in RAM (memory vs memory-mapped
cache), and data parallelism (1 process x 2 threads vs torchrun 2 processes x 1 thread).

    .venv/bin/python scripts/bench_scaling.py --out runs/bench_scaling.json
    .venv/bin/python scripts/bench_scaling.py --table runs/bench_scaling.json

1. Generates --images PNG files at --size px (10 class folders; smooth random images, so
   PNG sizes are photo-like rather than noise) unless the folder exists.
2. Times the one-time decode into the on-disk cache (edgessl.data, fresh cache folder).
3. Batch loading alone (random batches of 64, gathered and augmented): storage=memory,
   storage=mmap with the cache in the page cache (warm), and mmap with the cache file's
   pages evicted first (cold, posix_fadvise DONTNEED).
4. Training steps (augment + forward + backward + bank update) from each storage, each in
   its own process so its peak RSS is its own.
5. `edgessl pretrain` on the shared CIFAR-10 file: one process with 2 threads against
   `torchrun --nproc-per-node 2` with one thread each, same global batch, images/s of the
   whole run (all ranks) as the run reports it.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from benchlib import REPO, SHARED_CIFAR, markdown



def make_folder(root: Path, n: int, size: int) -> None:
    from PIL import Image

    rng = np.random.default_rng(0)
    for c in range(10):
        (root / f"class{c}").mkdir(parents=True, exist_ok=True)
    for i in range(n):
        small = rng.integers(0, 256, (6, 6, 3), dtype=np.uint8)
        im = Image.fromarray(small).resize((size, size), Image.BICUBIC)
        im.save(root / f"class{i % 10}" / f"{i:06d}.png")


def evict(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def rss_parts() -> dict:
    """Current anonymous (must stay in RAM) and file-backed (the kernel may drop it) resident MB."""
    status = Path("/proc/self/status")
    if not status.exists():
        return {}
    fields = dict(line.split(":", 1) for line in status.read_text().splitlines() if ":" in line)
    return {k.lower() + "_mb": round(int(fields[k].split()[0]) / 1024) for k in ("RssAnon", "RssFile") if k in fields}


def child(args) -> dict:
    """One measurement in this process: loading alone, or training steps, from one storage."""
    import torch

    from edgessl.config import from_dict
    from edgessl.device import peak_mem_mb
    from edgessl.train import build, train_step

    torch.set_num_threads(args.threads)
    cfg = from_dict({"data": {"spec": f"folder:{args.dir}", "image_size": args.size, "storage": args.storage},
                     "optim": {"batch_size": 64}, "run": {"monitor_every": 0, "threads": args.threads}})
    t0 = time.perf_counter()
    s = build(cfg)
    build_s = time.perf_counter() - t0
    if args.cold:
        evict(next(Path(os.environ["XDG_CACHE_HOME"], "edgessl").glob("folder-*.npy")))
    g = torch.Generator().manual_seed(0)
    n = len(s.train)
    times = []
    if args.what == "load":
        for _ in range(args.batches):
            idx = torch.randint(0, n, (64,), generator=g)
            t = time.perf_counter()
            s.augment(s.train.images[idx])
            times.append(time.perf_counter() - t)
    else:
        s.model.train()
        for i in range(args.batches + 2):
            idx = torch.randint(0, n, (64,), generator=g)
            t = time.perf_counter()
            train_step(s, idx, 1e-3, i)
            if i >= 2:
                times.append(time.perf_counter() - t)
    return {"what": args.what, "storage": args.storage, "cold": args.cold, "images": n, "mapped": s.train.mapped,
            "batches": len(times), "build_s": round(build_s, 2),
            "images_per_s": round(64 * len(times) / sum(times), 1),
            "median_batch_ms": round(statistics.median(times) * 1e3, 2), "peak_rss_mb": round(peak_mem_mb(s.device)),
            **rss_parts()}


def run_child(args, what: str, storage: str, cold: bool, batches: int, env: dict) -> dict:
    cmd = [sys.executable, __file__, "--child", what, "--storage", storage, "--dir", str(args.dir),
           "--size", str(args.size), "--batches", str(batches), "--threads", str(args.threads)] + (["--cold"] if cold else [])
    r = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{r.stderr[-3000:]}")
    row = json.loads(r.stdout.strip().splitlines()[-1])
    print(f"  {what:5s} {storage:6s}{' cold' if cold else ''}: {row['images_per_s']:9.1f} images/s, "
          f"peak RSS {row['peak_rss_mb']} MB (now: anonymous {row.get('rssanon_mb')} MB, file {row.get('rssfile_mb')} MB)",
          flush=True)
    return row


def ddp_rows(args, work: Path) -> list[dict]:
    rows = []
    common = ["--data", f"npz:{SHARED_CIFAR}", "--epochs", str(args.ddp_epochs), "--json"]
    bin_dir = Path(sys.executable).parent
    for procs, batch in ((1, 64), (2, 32)):
        out = work / f"ddp{procs}"
        shutil.rmtree(out, ignore_errors=True)
        env = {**os.environ, "OMP_NUM_THREADS": str(2 // procs)}
        if procs == 1:
            cmd = [str(bin_dir / "edgessl"), "pretrain"]
        else:
            cmd = [str(bin_dir / "torchrun"), "--standalone", f"--nproc-per-node={procs}", "-m", "edgessl", "pretrain"]
        cmd += common + ["--out", str(out), "--batch-size", str(batch)]
        cfg = out.parent / f"ddp{procs}.yaml"
        cfg.write_text(f"run: {{threads: {2 // procs}, monitor_every: 0}}\n")
        cmd += ["--config", str(cfg)]
        r = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if r.returncode != 0:
            raise SystemExit(f"{' '.join(cmd)} failed:\n{r.stderr[-3000:]}")
        res = json.loads(r.stdout.strip().splitlines()[-1])
        rows.append({"processes": procs, "threads_per_process": 2 // procs, "batch_per_process": batch,
                     "global_batch": batch * procs, "epochs": res["epochs"], "seconds": res["seconds"],
                     "images_per_s": res["images_per_s"], "peak_mem_mb_rank0": res["peak_mem_mb"]})
        print(f"  ddp {procs} x {2 // procs} threads, batch {batch}: {res['images_per_s']} images/s", flush=True)
    return rows


def table(result: dict) -> str:
    storage = [[f"{'load + augment' if r['what'] == 'load' else 'train step'}, {r['storage']}"
                f"{' (cold page cache)' if r['cold'] else ''}", f"{r['images_per_s']:.0f}", r["peak_rss_mb"],
                r.get("rssanon_mb", "-"), r.get("rssfile_mb", "-")] for r in result["storage"]]
    base = result["ddp"][0]["images_per_s"] if result["ddp"] else None
    ddp = [[f"{r['processes']} process(es) x {r['threads_per_process']} thread(s), batch {r['batch_per_process']} each",
            r["global_batch"], f"{r['images_per_s']:.0f}", f"{r['images_per_s'] / base:.2f}x"] for r in result["ddp"]]
    return (markdown([f"measurement ({result['images']} images, {result['size']} px, batch 64)", "images/s",
                      "peak RSS MB", "anonymous MB at the end", "file-backed MB at the end"], storage, "lrrrr")
            + "\n\n" + markdown(["edgessl pretrain, shared CIFAR-10, 32 px", "global batch", "images/s",
                                   "vs 1 process"], ddp, "lrrr"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=50000)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--dir", type=Path, default=REPO / "runs" / "bench_scaling" / "images")
    ap.add_argument("--batches", type=int, default=200, help="batches timed for loading alone")
    ap.add_argument("--steps", type=int, default=20, help="training steps timed per storage")
    ap.add_argument("--ddp-epochs", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--skip-ddp", action="store_true")
    ap.add_argument("--keep-ddp", metavar="JSON", help="reuse the DDP rows of an earlier result file")
    ap.add_argument("--out", default="runs/bench_scaling.json")
    ap.add_argument("--table", metavar="JSON", help="print the Markdown table of a result file and exit")
    ap.add_argument("--child", choices=["load", "train"], help=argparse.SUPPRESS)
    ap.add_argument("--storage", default="memory", help=argparse.SUPPRESS)
    ap.add_argument("--cold", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        args.what = args.child
        print(json.dumps(child(args)))
        return
    if args.table:
        print(table(json.loads(Path(args.table).read_text())))
        return
    work = args.dir.parent
    if not args.dir.exists() or sum(1 for _ in args.dir.rglob("*.png")) != args.images:
        shutil.rmtree(args.dir, ignore_errors=True)
        t = time.perf_counter()
        make_folder(args.dir, args.images, args.size)
        print(f"generated {args.images} images in {time.perf_counter() - t:.0f} s", flush=True)
    cache = work / "cache"
    shutil.rmtree(cache, ignore_errors=True)
    env = {**os.environ, "XDG_CACHE_HOME": str(cache)}
    t = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import sys; from edgessl.data import load; "
                    f"load('folder:{args.dir}', {args.size}, storage='mmap')"], env=env, check=True)
    decode_s = time.perf_counter() - t
    cache_bytes = sum(p.stat().st_size for p in (cache / "edgessl").glob("*.npy"))
    print(f"decoded into the cache in {decode_s:.0f} s ({cache_bytes / 2**20:.0f} MB)", flush=True)
    rows = []
    for what, batches in (("load", args.batches), ("train", args.steps)):
        rows.append(run_child(args, what, "memory", False, batches, env))
        rows.append(run_child(args, what, "mmap", False, batches, env))
        rows.append(run_child(args, what, "mmap", True, batches, env))
    result = {"machine": {"cpu_count": os.cpu_count(), "platform": platform.platform()},
              "images": args.images, "size": args.size, "decode_s": round(decode_s, 1),
              "cache_mb": round(cache_bytes / 2**20), "storage": rows,
              "ddp": (json.loads(Path(args.keep_ddp).read_text())["ddp"] if args.keep_ddp
                      else [] if args.skip_ddp else ddp_rows(args, work))}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(table(result))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
