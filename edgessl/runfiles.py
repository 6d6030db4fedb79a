"""The files of a run directory: atomic writes, the per-epoch and per-step CSV logs, and the
checks made before anything is written (exists, writable, disk space).

Rows are appended before the checkpoint that covers them is written, so on --resume a log
keeps exactly the rows its checkpoint covers (a line cut by a kill is dropped).
"""
from __future__ import annotations

import csv
import fcntl
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Optional, Union

from edgessl.errors import EdgesslError

MIN_FREE_BYTES = 200 * 2**20
_UMASK = os.umask(0o022)  # read the process umask (and put it back): atomic writes get the usual mode
os.umask(_UMASK)
EXPORTS = "exports.json"  # what export and check measured of a run's exported files
BENCHMARK = "benchmark.json"  # `edgessl benchmark`: every runtime x precision, timed side by side


def atomic_write(path: Path, data: Union[bytes, str, Callable]) -> None:
    """Write `path` all at once: a temp file in the same folder, fsync, rename, fsync the folder.

    `data` is bytes, text, or a function that writes into the open binary file (torch.save).
    A crash at any moment leaves the old file or the new one, never half of one."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), 0o666 & ~_UMASK)  # mkstemp makes 0600; a written file is 0644 as usual
            if callable(data):
                data(f)
            else:
                f.write(data.encode("utf-8", "surrogateescape") if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


class CsvLog:
    """A CSV file with a fixed header that rows are appended to."""

    def __init__(self, path: Path, fields: list[str]):
        self.path, self.fields = Path(path), list(fields)

    def create(self) -> None:
        self._write([])

    def append(self, *rows: dict) -> None:
        """Missing columns stay empty; a column the header does not name is an error, never dropped."""
        with open(self.path, "a", newline="") as f:
            csv.DictWriter(f, self.fields, restval="").writerows(rows)

    def rows(self) -> list[dict]:
        if not self.path.exists():
            return []
        with open(self.path, newline="") as f:
            return list(csv.DictReader(f))

    def keep(self, n: int) -> None:
        """Truncate to the first n rows (what a checkpoint covers); fewer than n is an error."""
        rows = self.rows()
        if len(rows) < n:
            raise EdgesslError(f"{self.path} has {len(rows)} rows, fewer than the checkpoint's {n}")
        self._write(rows[:n])

    def _write(self, rows: list[dict]) -> None:
        with open(self.path, "w", newline="") as f:
            w = csv.DictWriter(f, self.fields, extrasaction="ignore")
            w.writeheader()
            w.writerows(rows)


def check_run_dir(run_dir: Path, resume: bool, what: str = "checkpoint.pt", locked: bool = False) -> None:
    """Before anything is written: no other process is writing the run, a new run never
    overwrites one, a resume has one to continue, and the folder is writable with room for
    checkpoints. `locked`: the caller holds the run's lock itself."""
    run_dir = Path(run_dir)
    if run_dir.is_file():
        raise EdgesslError(f"{run_dir} is a file; give a run directory")
    holder = None if locked else lock_holder(run_dir)
    if holder:
        raise EdgesslError(f"{run_dir} is in use by {holder}; wait for it to end or choose another --out")
    ckpt = run_dir / what
    if resume and not ckpt.exists():
        raise EdgesslError(f"--resume: no checkpoint in {run_dir}")
    if not resume and ckpt.exists():
        raise EdgesslError(f"{run_dir} already holds a run; pass --resume to continue it or choose another --out")
    parent = run_dir if run_dir.exists() else next(p for p in run_dir.absolute().parents if p.exists())
    if not os.access(parent, os.W_OK):
        raise EdgesslError(f"cannot write to {parent}")
    if shutil.disk_usage(parent).free < MIN_FREE_BYTES:
        raise EdgesslError(f"less than {MIN_FREE_BYTES >> 20} MB free under {parent}")


def lock_holder(run_dir: Path) -> Optional[str]:
    """Who holds RUN_DIR/.lock now ("edgessl pid N" for a training, "another edgessl command" for
    the commands that write beside it), or None when nobody does."""
    path = Path(run_dir) / ".lock"
    if not path.exists():
        return None
    with open(path, "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            return f.read().strip() or "another edgessl command"
        fcntl.flock(f, fcntl.LOCK_UN)
    return None


_HELD: dict[Path, str] = {}  # the run locks this process holds: nested takes of one run are free


@contextmanager
def run_lock(run_dir: Path, shared: bool = False):
    """One writer of a run at a time, released when its process ends, however it ends (SIGKILL
    included): an exclusive lock on RUN_DIR/.lock while a run trains (pretrain, finetune), a
    shared one while a command writes beside it (export, check, benchmark, report, select).
    Shared holders run together (their files are their own; exports.json has its own lock); a
    training refuses while any of them runs, and they refuse while it trains."""
    run_dir = Path(run_dir)
    key = run_dir.resolve()
    if key in _HELD and (shared or _HELD[key] == "exclusive"):
        yield
        return
    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir / ".lock", "a+") as f:
        try:
            fcntl.flock(f, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "another edgessl command"
            raise EdgesslError(f"{run_dir} is in use by {holder}; wait for it to end"
                               + ("" if shared else " or choose another --out")) from None
        f.seek(0)
        f.truncate()  # (a holder killed with SIGKILL leaves its pid behind)
        if not shared:
            f.write(f"edgessl pid {os.getpid()}")
            f.flush()
        _HELD[key] = "shared" if shared else "exclusive"
        try:
            yield
        finally:
            del _HELD[key]
            if not shared:
                f.truncate(0)
            fcntl.flock(f, fcntl.LOCK_UN)


class RunFiles:
    """config.yaml, metrics.csv (per epoch), steps.csv (per step) and checkpoint.pt in one folder.

    `enabled` is False on every torchrun rank but 0: only rank 0 writes."""

    def __init__(self, run_dir: Path, metric_fields: list[str], enabled: bool = True):
        self.dir, self.enabled = Path(run_dir), enabled
        self.metrics = CsvLog(self.dir / "metrics.csv", metric_fields)
        self.steps = CsvLog(self.dir / "steps.csv", ["step", "loss"])
        self.ckpt = self.dir / "checkpoint.pt"

    def start(self, config_yaml: str, covered: Optional[tuple[int, int]] = None, skipped: tuple = ()) -> None:
        """A new run (covered None) starts empty logs; a resumed one keeps the (epochs + 1, steps)
        rows its checkpoint covers."""
        if not self.enabled:
            return
        self.dir.mkdir(parents=True, exist_ok=True)
        atomic_write(self.dir / "config.yaml", config_yaml)
        if skipped:  # --bad-images skip: what was left out, and why
            atomic_write(self.dir / "bad_images.txt", "".join(f"{f}\t{why}\n" for f, why in skipped))
        if covered is None:
            self.metrics.create()
            self.steps.create()
        else:
            self.metrics.keep(covered[0])
            self.steps.keep(covered[1])

    def add_metrics(self, row: dict) -> None:
        if self.enabled:
            self.metrics.append(row)

    def add_steps(self, rows: list[tuple[int, float]]) -> None:
        if self.enabled and rows:
            with open(self.steps.path, "a") as f:  # repr: the exact float, for the resume test
                f.writelines(f"{step},{loss!r}\n" for step, loss in rows)


def record_export(run_dir: str | Path, model_path: str | Path, entry: dict) -> None:
    """Merge `entry` into the run's exports.json under the model's resolved path. Read, merge and
    write under a lock on RUN_DIR/.exports.lock (waited for): exports into one run at once all land."""
    path = Path(run_dir) / EXPORTS
    with open(Path(run_dir) / ".exports.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            records = json.loads(path.read_text()) if path.exists() else {}
            key = str(Path(model_path).resolve())
            records[key] = {**records.get(key, {}), **entry}
            atomic_write(path, json.dumps(records, indent=1))
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
