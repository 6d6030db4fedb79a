"""The training step captured whole: one CUDA graph of augment, forward, loss, backward, optimizer
step and bank update, replayed with each step's indices, learning rate and progress (PyTorch's
whole-network capture, torch.cuda.graph).

A GPU step of a small network is launch-bound: its kernels take a fraction of the step, Python,
the dispatcher and the launches the rest (docs/gpu.md). A replay launches the recorded kernels
without any of that. What a recorded step needs: nothing read from the device inside it (no host
sync), the same shapes every step, its random numbers drawn on the device, and its inputs in
tensors that stay where they are (`StaticStep.idx`, `.lr`, `.progress`). `why_not` names what
a run has that a graph cannot hold; such a run steps eagerly and says why.

The colour jitter's order of its four operations is drawn on the host: a captured step keeps
the order drawn when it was recorded (the factors themselves are drawn on the device each step).
"""
from __future__ import annotations

from typing import Callable, Optional

import torch

from edgessl.config import CAPTURE_WARMUP

WARMUP_STEPS = CAPTURE_WARMUP  # (config.py; edgessl.Trainer.capture_warmup)


def why_not(cfg, device: torch.device, precision: str, world: int, mapped: bool = False) -> Optional[str]:
    """Why this run's step cannot be one CUDA graph, or None when it can (`mapped`: the training
    images are a memory-mapped file on the host, read each step)."""
    m = cfg.method
    return ("CUDA graphs need a CUDA device" if device.type != "cuda" else
            "fp16's GradScaler decides on the host whether a step is skipped" if precision == "fp16" else
            "torchrun: the bank's collectives run outside a graph" if world > 1 else
            "the images are memory-mapped on the host" if mapped else
            "progressive resolution changes the input size" if cfg.augment.start_size is not None else
            "CutMix draws its box on the host" if m.name == "memdistill" and m.cutmix_prob > 0 else
            "optim.fused false: the for-each optimizer reads a tensor learning rate on the host"
            if not cfg.optim.fused else None)


class StaticStep:
    """`fn(idx, progress)` on static inputs: eager for its first `warmup` calls, then recorded as
    a CUDA graph once and replayed (`graph=False`: eager always, the same function; the CPU tests
    run it so). The optimizer's learning rate is the tensor `lr`. Returns what the training loop
    reads: the step's loss and parts (a copy: the next replay overwrites the graph's own) and
    whether the step was skipped (never: fp16 is not captured)."""

    def __init__(self, fn: Callable[[torch.Tensor, torch.Tensor], dict], optimizer: torch.optim.Optimizer,
                 batch: int, device: torch.device, graph: bool = True, warmup: int = WARMUP_STEPS,
                 log: Callable[[str], None] = print):
        self.fn, self.optimizer, self.use_graph, self.warmup, self.log = fn, optimizer, graph, warmup, log
        self.idx = torch.zeros(batch, dtype=torch.long, device=device)
        self.progress = torch.zeros((), dtype=torch.float64, device=device)  # (a float's own precision)
        self.lr = torch.zeros((), device=device)
        self.graph: Optional[torch.cuda.CUDAGraph] = None
        self.out: dict = {}
        self.calls = 0

    def __call__(self, idx: torch.Tensor, lr: float, progress: float) -> dict:
        self.idx.copy_(idx, non_blocking=True)
        self.lr.fill_(lr)
        self.progress.fill_(progress)
        if self.graph is not None:
            self.graph.replay()
        elif self.use_graph and self.calls >= self.warmup:
            self._capture()
        else:
            self._eager()
        self.calls += 1
        return {"values": self.out["values"].clone(), "parts": self.out["parts"], "skipped": False}

    def _bind_lr(self) -> None:
        """Every group's learning rate is the tensor `lr` (a resume's load_state_dict replaces it)."""
        for g in self.optimizer.param_groups:
            if g.get("lr_scale", 1.0) != 1.0:
                raise ValueError("StaticStep: a group with its own lr_scale")
            g["lr"] = self.lr

    def _eager(self) -> None:
        self._bind_lr()
        self.optimizer.zero_grad(set_to_none=True)
        if not self.use_graph:
            self.out = self.fn(self.idx, self.progress)
            return
        side = torch.cuda.Stream()  # the warm-up before a capture runs on a side stream (torch.cuda.graph's docs)
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            self.out = self.fn(self.idx, self.progress)
        torch.cuda.current_stream().wait_stream(side)

    def _capture(self) -> None:
        """Record the step, then replay it (a capture records kernels without running them). A step
        that cannot be recorded runs eagerly, now and from here on, with one line saying why."""
        self._bind_lr()
        self.optimizer.zero_grad(set_to_none=True)  # the graph's backward allocates the gradients it writes
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph):
                out = self.fn(self.idx, self.progress)
        except RuntimeError as e:
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            self.log(f"capture    off: the step could not be recorded as a CUDA graph ({first[:200]}); eager steps")
            self.use_graph = False
            torch.cuda.synchronize()
            self._eager()
            return
        self.graph, self.out = graph, out
        graph.replay()
