"""Learning-rate schedule and minute-budget planning: pure functions of the step and the clock."""
from __future__ import annotations

import math

PLAN_AFTER_STEPS = 10  # with a minute budget and no epoch count, the schedule is planned after this


def lr_at(step: int, total_steps: int, warmup_steps: int, base_lr: float) -> float:
    """Linear warm-up then cosine decay to zero: a pure function of the step."""
    if step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return base_lr * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def plan_epochs(budget_s: float, elapsed_s: float, steps: int, steps_per_epoch: int) -> int:
    """Epochs that fill a minute budget, from the speed of the first steps (the cosine ends there)."""
    return max(1, math.ceil(budget_s / (elapsed_s / steps * steps_per_epoch)))


def replan_epochs(budget_s: float, elapsed_s: float, step_s: float, epochs_done: int, steps_per_epoch: int) -> int:
    """At an epoch end: the epochs done plus those that fit in what is left of the budget at
    step_s seconds a step (the last one ends past the budget, as the first plan's does)."""
    left = budget_s - elapsed_s
    return epochs_done if left <= 0 else epochs_done + math.ceil(left / (step_s * steps_per_epoch))


def size_at(step: int, total_steps: int, full: int, start=None, ramp: float = 0.5, multiple: int = 4) -> int:
    """Progressive resolution: the training crop's side at `step`, growing linearly from `start`
    to `full` over the first `ramp` of `total_steps`, rounded down to `multiple` (None: `full`)."""
    if not start or start >= full or step >= ramp * total_steps:
        return full
    side = start + (full - start) * step / (ramp * total_steps)
    return max(start, int(side) // multiple * multiple)
