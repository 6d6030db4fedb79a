"""Native code run in a child process, so that its crash is one EdgesslError line, not the end of
the user's process.

A runtime's converter, quantiser or session (OpenVINO, onnxruntime, LiteRT, ExecuTorch) is C++;
a bug in it is a SIGSEGV or an abort that no `try` catches. `call(fn, *args)` runs fn in a fresh
Python (`python -m edgessl.isolate`, never a fork: the runtimes' thread pools do not survive one,
and never multiprocessing's spawn, which re-imports the user's script), the arguments and the
result pickled through files. An exception raised in the child is raised again in the parent; a
child killed by a signal raises NativeCrash naming the signal and the step it was in (`step`).
"""
from __future__ import annotations

import os
import pickle
import signal
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable

from edgessl.errors import EdgesslError

STEP_FILE = "EDGESSL_ISOLATE_STEP"  # the child writes the step it is in there


class NativeCrash(EdgesslError):
    """A child running native code died of a signal (`signal`: its name, e.g. SIGSEGV) in `step`."""

    def __init__(self, message: str, signal_name: str, step: str):
        super().__init__(message)
        self.signal, self.step = signal_name, step

    def __reduce__(self):
        return type(self), (str(self), self.signal, self.step)


def step(name: str) -> None:
    """Say which step the child is in (converting, quantising, checking, timing); a no-op outside one."""
    path = os.environ.get(STEP_FILE)
    if path:
        Path(path).write_text(name)


def signal_name(returncode: int) -> str:
    try:
        return signal.Signals(-returncode).name
    except ValueError:
        return f"signal {-returncode}"


def call(fn: Callable[..., Any], *args: Any, what: str, hint: str) -> Any:
    """fn(*args) in a child Python; its result, or its exception raised here. `what` names the work
    for a crash's line ("openvino int8 export of m.xml"), `hint` what to try instead. The child's
    own stderr (native logs, a crash's last words) is kept off the user's terminal."""
    import torch

    with tempfile.TemporaryDirectory(prefix="edgessl-isolate-") as tmp:
        job, result, stage, log = (Path(tmp) / n for n in ("job.pkl", "result.pkl", "step", "stderr"))
        with open(job, "wb") as f:  # the path first: the child needs it to unpickle fn
            pickle.dump((list(sys.path), torch.get_num_threads()), f)
            pickle.dump((fn, args), f, protocol=pickle.HIGHEST_PROTOCOL)
        here = str(Path(__file__).resolve().parents[1])  # edgessl importable however the parent found it
        env = {**os.environ, STEP_FILE: str(stage),
               "PYTHONPATH": os.pathsep.join(filter(None, (here, os.environ.get("PYTHONPATH"))))}
        with open(log, "wb") as err:
            rc = subprocess.run([sys.executable, "-m", "edgessl.isolate", str(job), str(result)], env=env,
                                stdin=subprocess.DEVNULL, stderr=err).returncode
        if rc == 0 and result.is_file():
            ok, value = pickle.loads(result.read_bytes())
            if ok:
                return value
            raise value
        where = stage.read_text() if stage.is_file() else "starting"
        how = signal_name(rc) if rc < 0 else f"exit code {rc}"
        last = (log.read_text(errors="replace").strip().splitlines() or [""])[-1][:160]
        raise NativeCrash(f"{what} crashed in native code ({how}) while {where}"
                          f"{f' (its last words: {last})' if rc > 0 and last else ''}; {hint}",
                          how, where)


def _child(job: str, result: str) -> None:
    with open(job, "rb") as f:
        sys.path[:], threads = pickle.load(f)
        import torch

        torch.set_num_threads(threads)
        fn, args = pickle.load(f)
    try:
        out = (True, fn(*args))
    except BaseException as e:  # noqa: BLE001 - handed to the parent, which raises it
        out = (False, e)
    try:
        data = pickle.dumps(out, protocol=pickle.HIGHEST_PROTOCOL)
    except Exception as e:  # noqa: BLE001 - its line instead
        line = f"{type(out[1]).__name__}: {out[1]}" if not out[0] else f"{fn.__name__}'s result does not pickle ({e})"
        data = pickle.dumps((False, EdgesslError(line[:300])))
    Path(result).write_bytes(data)


if __name__ == "__main__":
    _child(*sys.argv[1:3])
