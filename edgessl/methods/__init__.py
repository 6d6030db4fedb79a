"""Pretraining methods: one file each, the same small interface.

A method is an nn.Module with `forward(images, indices) -> {"loss", "parts", ...}` and
a no-grad `update(out)` hook the trainer calls after the optimizer step.
"""
from edgessl.methods.memdistill import MemDistill

METHODS = {"memdistill": MemDistill, "npid": MemDistill}

# Config overrides a method name implies (configs/npid.yaml repeats them; a test checks).
PRESETS = {
    "memdistill": {},
    # NPID (Wu et al. 2018) with a full softmax: every memdistill improvement off
    "npid": {"bank_init": "random", "bank_update": "ema", "sqrtkl_weight": 0.0, "cutmix_prob": 0.0},
}

__all__ = ["METHODS", "PRESETS", "MemDistill"]
