"""Where and in what precision a run computes: device, autocast and peak memory.

"Mixed precision" is measured per device: on CUDA bf16 (or fp16 with a GradScaler); on a
CPU with bf16 matrix units (Intel AMX) bf16, and fp32 on other CPUs, where bf16 autocast
ran slower than fp32. The step's numbers on both kinds of CPU, with the depthwise convolutions
kept in fp32 (edgessl.depthwise) and with the backbone compiled: docs/benchmarks.md, "The step".
"""
from __future__ import annotations

import os
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


def cpu_has_amx() -> bool:
    """Whether this CPU has bf16 matrix units (Intel AMX) that oneDNN's convolutions use: not when
    ONEDNN_MAX_CPU_ISA caps oneDNN below them (AVX2, AVX512_CORE_BF16, ...)."""
    cap = os.environ.get("ONEDNN_MAX_CPU_ISA", "").upper()
    if cap and cap not in ("ALL", "DEFAULT") and "AMX" not in cap:
        return False
    amx = getattr(torch.cpu, "_is_amx_tile_supported", None)  # private in torch 2.x: absent means no
    bf16 = getattr(torch.cpu, "_is_avx512_bf16_supported", None)
    return bool(amx and bf16 and amx() and bf16())


def cpu_features() -> str:
    """What the precision rule reads off this CPU, as `lscpu` names it (AVX2, AVX-512, VNNI,
    AVX512-BF16, AMX), and a oneDNN cap when one is set."""
    names = {"_is_avx2_supported": "AVX2", "_is_avx512_supported": "AVX-512", "_is_vnni_supported": "VNNI",
             "_is_avx512_bf16_supported": "AVX512-BF16", "_is_amx_tile_supported": "AMX"}
    have = [name for fn, name in names.items() if getattr(torch.cpu, fn, lambda: False)()]
    cap = os.environ.get("ONEDNN_MAX_CPU_ISA")
    return " ".join(have or ["no AVX2"]) + (f", ONEDNN_MAX_CPU_ISA={cap}" if cap else "")


def precision_why(precision: str, device: torch.device) -> str:
    """Why the run computes in the precision it does: given, or what auto read off the device."""
    if precision != "auto":
        return "given"
    if device.type == "cuda":
        return "a CUDA device"
    return f"auto: {cpu_features()}"


def resolve_precision(precision: str, device: torch.device) -> str:
    """auto: bf16 (or fp16 without bf16) on CUDA; on a CPU, bf16 with AMX and fp32 without."""
    if precision == "auto":
        if device.type == "cuda":
            return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        return "bf16" if cpu_has_amx() else "fp32"
    if precision == "fp16" and device.type != "cuda":
        raise EdgesslError("precision fp16 needs a CUDA device (GradScaler); use bf16 or fp32 on CPU")
    return precision


def autocast(device: torch.device, precision: str):
    """Mixed precision for the backbone; the methods compute their heads, scores and losses in fp32
    inside it (full_precision). While a CUDA graph is being recorded, without autocast's cache of
    cast weights, as torch.cuda.make_graphed_callables requires of autocast."""
    if precision == "fp32":
        return nullcontext()
    capturing = device.type == "cuda" and torch.cuda.is_current_stream_capturing()
    return torch.autocast(device.type, dtype=torch.bfloat16 if precision == "bf16" else torch.float16,
                          cache_enabled=not capturing)


def full_precision(x: torch.Tensor):
    """Autocast off on x's device: a head, the scores against a bank and a loss in fp32 under a
    bf16 / fp16 step. bf16 holds a cosine near 1 in steps of 2^-8, 0.056 in a logit at
    temperature 0.07; the head and the scores are a small share of a step's work."""
    return torch.autocast(x.device.type, enabled=False)


def grad_scaler(device: torch.device, precision: str) -> torch.amp.GradScaler:
    """A GradScaler that is active for fp16 only (bf16 and fp32 need none)."""
    return torch.amp.GradScaler(device.type, enabled=precision == "fp16")


def peak_mem_mb(device: torch.device) -> float:
    """CUDA: peak allocated tensor memory. CPU: the process's peak resident set (ru_maxrss)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
