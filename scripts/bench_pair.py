"""Where a torchrun pair's step time goes on a small CPU: the step, and each collective it waits on.

    torchrun --standalone --nproc-per-node 2 scripts/bench_pair.py [--steps 20] [--out runs/bench_pair.json]

Each rank builds the default pretraining setup on the shared CIFAR-10 file (one thread, batch
32 per rank, as `edgessl pretrain` under torchrun) and times, median over --steps: the whole
train_step (DistributedDataParallel's gradient all-reduce overlapped with the backward, the
bank gradient all-reduced after it); the same step's forward and backward with the gradient
reduction skipped (`no_sync`) and the bank update left out, which is what one process alone
would pay; and, alone, a gloo all-reduce of the gradients' size, of the bank gradient's size
(N x d) and of one float (what each step's stop check costs). Rank 0 prints a table and writes JSON.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
import torch.distributed as dist

from benchlib import SHARED_CIFAR
from edgessl.config import from_dict
from edgessl.train import build, train_step


def median_ms(fn, steps: int) -> float:
    times = []
    for i in range(steps + 2):
        dist.barrier()
        t0 = time.perf_counter()
        fn(i)
        if i >= 2:
            times.append(time.perf_counter() - t0)
    return round(statistics.median(times) * 1e3, 2)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=f"npz:{SHARED_CIFAR}")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--out", default="runs/bench_pair.json")
    args = ap.parse_args()
    cfg = from_dict({"data": {"spec": args.data, "val_fraction": 0.2, "split_seed": 1},
                     "optim": {"batch_size": 32}, "run": {"threads": 1, "augment_threads": 1, "monitor_every": 0}})
    s = build(cfg)
    s.model.train()
    rank, world = dist.get_rank(), dist.get_world_size()
    idx = lambda i: torch.arange(32) + (i * 64 + 32 * rank) % (len(s.train) - 32)  # noqa: E731

    def local(i):  # forward + backward without the gradient all-reduce (one process's own work)
        raw = s.train.images[idx(i)]
        with s.forward.no_sync():
            out = s.forward(s.augment(raw), idx(i).to(s.device), None)
            out["loss"].backward()
        s.optimizer.zero_grad(set_to_none=True)

    grads = torch.zeros(sum(p.numel() for p in s.model.parameters() if p.requires_grad))
    bank = torch.zeros_like(s.model.bank)
    one = torch.zeros(1)
    rows = {"train_step (the pair's step)": median_ms(lambda i: train_step(s, idx(i), 1e-4, i, 10**6), args.steps),
            "forward + backward, no reduction": median_ms(local, args.steps),
            f"all-reduce of the gradients ({grads.numel() * 4 / 2**20:.1f} MB)":
                median_ms(lambda i: dist.all_reduce(grads), args.steps),
            f"all-reduce of the bank gradient ({bank.numel() * 4 / 2**20:.1f} MB)":
                median_ms(lambda i: dist.all_reduce(bank), args.steps),
            "all-reduce of one float (the stop check)": median_ms(lambda i: dist.all_reduce(one), args.steps)}
    if rank == 0:
        print(f"| {world} ranks x 1 thread, batch 32 each | median ms |\n| --- | ---: |")
        for name, ms in rows.items():
            print(f"| {name} | {ms} |")
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"world": world, "torch": torch.__version__, "ms": rows}, indent=1))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
