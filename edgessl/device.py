"""Where and in what precision a run computes: device, autocast and peak memory.

"Mixed precision" is measured per device: on CUDA bf16 (or fp16 with a GradScaler);
on the CPU fp32, since bf16 autocast ran 2.4x slower than fp32 on the 2-core
AVX-512-without-AMX development machine (docs/benchmarks.md, "Step cost").
"""
from __future__ import annotations

import resource
from contextlib import nullcontext

import torch

from edgessl import distributed
from edgessl.errors import EdgesslError


def resolve_device(name: str) -> torch.device:
    """auto: CUDA when torch sees it (under torchrun, the process's LOCAL_RANK device), else CPU."""
    if name == "auto" or name == "cuda":
        if torch.cuda.is_available():
            return torch.device("cuda", distributed.local_rank())
        if name == "auto":
            return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise EdgesslError(f"unknown device {name!r} (auto, cpu, cuda, cuda:N)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise EdgesslError(f"device {name!r} asked for, but torch sees no CUDA device")
    return device


def resolve_precision(precision: str, device: torch.device) -> str:
    """auto: bf16 (or fp16 without bf16) on CUDA; fp32 on CPU."""
    if precision == "auto":
        if device.type == "cuda":
            return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        return "fp32"
    if precision == "fp16" and device.type != "cuda":
        raise EdgesslError("precision fp16 needs a CUDA device (GradScaler); use bf16 or fp32 on CPU")
    return precision


def autocast(device: torch.device, precision: str):
    """Mixed precision for the network; the bank, logits and losses are cast to fp32 in the method."""
    if precision == "fp32":
        return nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16 if precision == "bf16" else torch.float16)


def grad_scaler(device: torch.device, precision: str) -> torch.amp.GradScaler:
    """A GradScaler that is active for fp16 only (bf16 and fp32 need none)."""
    return torch.amp.GradScaler(device.type, enabled=precision == "fp16")


def peak_mem_mb(device: torch.device) -> float:
    """CUDA: peak allocated tensor memory. CPU: the process's peak resident set (ru_maxrss)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
