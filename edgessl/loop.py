"""The one training loop: pretraining, fine-tuning and the int8 student each hand it their steps.

A trainer gives the loop a `Steps` (its steps per epoch, one step, what an epoch's start and end
do, how to save). The loop owns the rest, the same for all three:
- where the run is, one typed `Position`, stored in every checkpoint; a resumed run continues
  from it and, on the CPU, ends with the uninterrupted run's numbers;
- the minute budget: planned from the speed of the first PLAN_AFTER_STEPS steps, re-fitted at
  each epoch end (edgessl.schedule), stopped at the first epoch end past it (a trainer whose
  budget is only a cap, the student, asks for no plan);
- the loss reads from the device, every `sync_every` steps in one wait: a NaN or inf among them
  stops the run, naming its step, before anything of them is saved;
- the checkpoints: at the trainer's epoch ends, every N steps or M minutes, and on SIGINT /
  SIGTERM at the next step boundary (`stop_signals`).
"""
from __future__ import annotations

import dataclasses
import signal
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from edgessl import distributed
from edgessl.optim import check_finite
from edgessl.schedule import PLAN_AFTER_STEPS, plan_epochs, replan_epochs

GPU_SYNC_EVERY = 32  # steps between two reads of the loss off the CPU (on the CPU a read is free: every step)


def sync_every(device: torch.device) -> int:
    """How often a trainer reads its loss from `device` (run.sync_every's auto)."""
    return 1 if device.type == "cpu" else GPU_SYNC_EVERY


@dataclass
class Position:
    """Where a run is. Stored in every checkpoint as a plain dict; a resume continues from it."""

    epoch: int = 0  # epochs done
    step: int = 0  # optimizer steps done
    epoch_step: int = 0  # steps done in the current epoch
    elapsed: float = 0.0  # training seconds so far, any work before the first step included
    calib_s: float = 0.0  # seconds of that work (pretraining's bank calibration): not part of a step's speed
    perm: Optional[torch.Tensor] = None  # the current epoch's order (None: not drawn yet)
    sums: dict = field(default_factory=dict)  # loss (and parts) summed over the current epoch
    # the trainer's own numbers across epochs (pretraining's kNN floors, the student's best read and halvings)
    baselines: dict = field(default_factory=dict)
    planned_epochs: Optional[int] = None  # None: a budget not yet planned (or none to plan)
    plan_at: Optional[list] = None  # [step, elapsed] when the budget was first planned
    skipped_steps: int = 0  # fp16 steps skipped by the GradScaler
    last_loss: Optional[float] = None  # the last epoch's mean loss
    last_score: Optional[float] = None  # the last epoch's score (kNN top-1, test top-1, the student's probe)
    epoch_state: dict = field(default_factory=dict)  # what the trainer draws at an epoch's start (pseudo-labels)
    settled: bool = False  # the trainer ended the run before its budget (the student stopped improving)

    @classmethod
    def from_state(cls, stored: dict) -> "Position":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in stored.items() if k in names})

    def state(self) -> dict:
        return dataclasses.asdict(self)


@dataclass
class Step:
    """One step's output: its loss and parts (`values`, on the device, read later) under `names`."""

    names: list
    values: torch.Tensor  # (1 + parts,) float
    skipped: object = False  # fp16: the GradScaler skipped it (a device flag, read with the loss)


@dataclass
class Steps:
    """What a trainer gives the loop."""

    steps_per_epoch: int
    step: Callable[[Position, int], Step]  # (position, the schedule's total steps) -> the step taken
    # (position, the epoch's loss sums, step log, images/s, last): its metrics and checkpoint; the position is
    # already the next epoch's start
    end_epoch: Callable[[Position, dict, list, float, bool], None]
    save: Callable[[Position, list], None]  # a checkpoint between epoch ends (a stop, or one due)
    begin_epoch: Callable[[Position], None] = lambda pos: None  # pos.perm, pos.epoch_state
    device: torch.device = torch.device("cpu")
    sync_every: int = 1  # read the losses every N steps (1: the step checked its own loss before updating)
    batch: int = 1  # images a step (on every rank together)
    budget: Optional[float] = None  # seconds: stop at the first epoch end past them
    plan: bool = True  # fit the epoch count to the budget (else the budget only caps the run)
    most_epochs: Optional[int] = None  # the plan's ceiling
    every_steps: int = 0  # also checkpoint every N steps ...
    every_minutes: float = 0.0  # ... and every M minutes (0: off)
    desc: str = "train"
    show: bool = False  # a progress bar on stderr


def total_steps(steps: Steps, pos: Position) -> int:
    """The schedule's length in steps: the planned epochs, or before a plan its ceiling."""
    epochs = pos.planned_epochs or steps.most_epochs
    return (epochs or 10**9) * steps.steps_per_epoch


def finished(steps: Steps, pos: Position) -> bool:
    if pos.settled or pos.planned_epochs is not None and pos.epoch >= pos.planned_epochs:
        return True
    return bool(steps.budget and pos.epoch > 0 and pos.epoch_step == 0
                and distributed.any_rank(pos.elapsed >= steps.budget, steps.device))


def run(steps: Steps, pos: Position, stop: Callable[[int], bool]) -> bool:
    """Epochs until the planned count, the budget or the trainer settles (at least one always
    runs); True when a stop request (`stop(step)`, a signal) ended it, checkpointed."""
    from tqdm import tqdm

    if pos.perm is not None:  # a resume mid-epoch: the epoch's draws, back on the device
        pos.perm = pos.perm.to(steps.device)
    pos.epoch_state = {k: v.to(steps.device) if isinstance(v, torch.Tensor) else v for k, v in pos.epoch_state.items()}
    with stop_signals() as signalled, tqdm(total=_bar_total(steps, pos), initial=pos.step, disable=not steps.show,
                                           leave=False, unit="step", desc=steps.desc, file=sys.stderr) as bar:
        asked = lambda step: stop(step) or bool(signalled)  # noqa: E731
        while not finished(steps, pos):
            if run_epoch(steps, pos, asked, bar) or distributed.any_rank(asked(pos.step), steps.device):
                return True
    return False


def _bar_total(steps: Steps, pos: Position) -> Optional[int]:
    epochs = pos.planned_epochs or steps.most_epochs
    return epochs * steps.steps_per_epoch if epochs else None


def run_epoch(steps: Steps, pos: Position, stop: Callable[[int], bool], bar) -> bool:
    """The rest of the current epoch; True when a stop request ended it early (checkpointed)."""
    if pos.epoch_step == 0:  # (a resume mid-epoch restored the epoch's draws)
        steps.begin_epoch(pos)
    t0 = t_epoch = time.perf_counter()
    done, step_log, unread = 0, [], []
    bar.set_description(f"{steps.desc} {pos.epoch + 1}/{pos.planned_epochs or '?'}")
    while pos.epoch_step < steps.steps_per_epoch:
        if steps.plan and steps.budget and pos.planned_epochs is None and pos.step == PLAN_AFTER_STEPS:
            read_steps(steps, pos, unread, step_log, bar)  # the plan times finished steps, not queued ones
            first_plan(steps, pos, time.perf_counter() - t0)
            bar.total = _bar_total(steps, pos)
        unread.append((pos.step, steps.step(pos, total_steps(steps, pos))))
        pos.step, pos.epoch_step, done = pos.step + 1, pos.epoch_step + 1, done + 1
        bar.update()
        if len(unread) >= steps.sync_every:
            read_steps(steps, pos, unread, step_log, bar)
        stopping = distributed.any_rank(stop(pos.step), steps.device)
        every, minutes = steps.every_steps, steps.every_minutes
        due = every and pos.step % every == 0 or minutes and time.perf_counter() - t0 >= minutes * 60
        if pos.epoch_step < steps.steps_per_epoch and (stopping or due):
            read_steps(steps, pos, unread, step_log, bar)  # a NaN among them stops the run before the save
            pos.elapsed += time.perf_counter() - t0
            steps.save(pos, step_log)
            t0, step_log = time.perf_counter(), []
            if stopping:
                return True
    read_steps(steps, pos, unread, step_log, bar)
    pos.elapsed += time.perf_counter() - t0
    replan(steps, pos)
    bar.total = _bar_total(steps, pos)
    last = pos.epoch + 1 == pos.planned_epochs or bool(
        steps.budget and distributed.any_rank(pos.elapsed >= steps.budget, steps.device))
    images_per_s = done * steps.batch / max(time.perf_counter() - t_epoch, 1e-9)
    sums = pos.sums
    pos.epoch, pos.perm, pos.epoch_step, pos.sums, pos.epoch_state = pos.epoch + 1, None, 0, {}, {}
    steps.end_epoch(pos, sums, step_log, images_per_s, last)
    return False


def read_steps(steps: Steps, pos: Position, unread: list, step_log: list, bar) -> None:
    """The unread steps' loss and parts, from the device in one wait: a NaN or inf among them stops
    the run here, naming its step, before anything of them is saved."""
    if not unread:
        return
    rows = torch.stack([s.values for _, s in unread]).tolist()
    for (step, s), row in zip(unread, rows):
        if steps.sync_every > 1:  # (every step: the step checked it before the optimizer step)
            check_finite(row[0], step, steps.device)
        for name, v in zip(s.names, row):
            pos.sums[name] = pos.sums.get(name, 0.0) + v
        step_log.append((step, row[0]))
        pos.skipped_steps += int(s.skipped)
    unread.clear()
    bar.set_postfix(loss=f"{rows[-1][0]:.3f}")


def first_plan(steps: Steps, pos: Position, epoch_s: float) -> None:
    """A budget's first plan, from the speed of the first steps (work before them excluded)."""
    planned = plan_epochs(steps.budget - pos.calib_s, pos.elapsed - pos.calib_s + epoch_s, pos.step,
                          steps.steps_per_epoch)
    pos.planned_epochs = _cap(steps, int(distributed.from_rank0(planned, steps.device)))
    pos.plan_at = [pos.step, pos.elapsed + epoch_s]


def replan(steps: Steps, pos: Position) -> None:
    """The first steps run slower (allocations, kernel selection): at an epoch end, re-fit the
    cosine to the speed of the steps since the plan, so a run fills its budget instead of ending early."""
    plan_step, plan_s = pos.plan_at or (None, None)
    if steps.budget and plan_step is not None and pos.step - plan_step >= PLAN_AFTER_STEPS:
        step_s = (pos.elapsed - plan_s) / (pos.step - plan_step)
        planned = replan_epochs(steps.budget, pos.elapsed, step_s, pos.epoch + 1, steps.steps_per_epoch)
        pos.planned_epochs = _cap(steps, int(distributed.from_rank0(planned, steps.device)))


def _cap(steps: Steps, epochs: int) -> int:
    return min(epochs, steps.most_epochs) if steps.most_epochs else epochs


@contextmanager
def stop_signals():
    """SIGINT / SIGTERM while training: finish the step, checkpoint, stop (the list fills up)."""
    received: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield received
        return
    previous = {sig: signal.signal(sig, lambda num, frame: received.append(num))
                for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield received
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
