"""Native code in a child process (edgessl.isolate): a crash there is one EdgesslError line naming
the runtime, the file, the precision, the signal and the step, the caller's process lives on,
--out is untouched, and `edgessl benchmark` marks the row and finishes its table."""
import ctypes
import importlib.util
import json
import os
import signal
import sys

import pytest
import torch
from torch import nn

from conftest import make_npz, tiny_config
from edgessl import EdgesslError, exporter as export
from edgessl.isolate import NativeCrash, call, step
from edgessl.train import pretrain


def segfault():
    step("reading address 0")
    ctypes.string_at(0)  # a real SIGSEGV in native code


def add(a, b):
    return a + b


def refuse():
    raise EdgesslError("a line from the child")


def test_result_exception_and_signals_cross_the_process_boundary():
    assert call(add, 2, 3, what="x", hint="y") == 5
    with pytest.raises(EdgesslError, match="^a line from the child$"):
        call(refuse, what="x", hint="y")
    with pytest.raises(NativeCrash) as e:
        call(segfault, what="the thing", hint="try the other thing")
    assert e.value.signal == "SIGSEGV" and e.value.step == "reading address 0"
    assert str(e.value) == ("the thing crashed in native code (SIGSEGV) while reading address 0; "
                            "try the other thing")
    with pytest.raises(NativeCrash, match=r"\(SIGABRT\) while starting"):
        call(os.abort, what="x", hint="y")
    assert os.getpid() and torch.ones(1).item() == 1.0  # this process lives on


class DiesWhenConverted(nn.Module):
    """The run's network, fine in torch, killing the converter that traces it: SIGSEGV in native
    code under torch.onnx's tracer (onnx, openvino), abort() under torch.export (litert, executorch)."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        if torch.jit.is_tracing():
            ctypes.string_at(0)
        if torch.compiler.is_exporting():
            os.abort()
        return self.inner(x)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("isolate")
    npz = make_npz(root / "tiny.npz", n=32, size=16)
    pretrain(tiny_config(f"npz:{npz}", optim={"epochs": 1}, run={"precision": "fp32"}), root / "run",
             log=lambda *_: None)
    return root / "run"


@pytest.fixture
def dying_converter(monkeypatch):
    real = export.export_module
    monkeypatch.setattr(export, "export_module", lambda model, with_head: DiesWhenConverted(real(model, with_head)))


def test_a_crashing_export_is_one_line_and_leaves_out_untouched(run_dir, tmp_path, dying_converter, monkeypatch,
                                                                capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "m.onnx").write_bytes(b"the user's earlier file")
    with pytest.raises(NativeCrash) as e:  # the API: an EdgesslError, and this process lives on
        export.export_model(run_dir, out / "m.onnx", knn=False, timing=False)
    assert e.value.signal == "SIGSEGV" and e.value.step == "writing fp32.onnx"
    assert f"the onnx fp32 export of {out / 'm.onnx'} crashed in native code (SIGSEGV)" in str(e.value)
    assert "--out is untouched" in str(e.value) and "ONEDNN_MAX_CPU_ISA=AVX2" in str(e.value)
    assert sorted(p.name for p in out.iterdir()) == ["m.onnx"] and (out / "m.onnx").read_bytes().startswith(b"the")
    from edgessl.cli import main  # the CLI: one line on stderr, exit 2

    monkeypatch.setattr(sys, "argv", ["edgessl", "export", str(run_dir), "--out", str(out / "m.onnx")])
    with pytest.raises(SystemExit) as code:
        main()
    err = capsys.readouterr().err
    assert code.value.code == 2 and err.count("\n") == 1 and err.startswith("error: the onnx fp32 export of")
    assert "SIGSEGV" in err and (out / "m.onnx").read_bytes().startswith(b"the")


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("executorch") is None, reason="executorch not installed")
def test_benchmark_marks_the_crashed_row_and_finishes(run_dir, dying_converter):
    """onnx converts under torch.onnx's tracer (SIGSEGV), executorch under torch.export (abort):
    each row says so, and the table and benchmark.json are written."""
    from edgessl.benchmark import benchmark

    rows = benchmark(run_dir, ("onnx", "executorch"), ("fp32",), progress=False)
    assert [(r["format"], r["status"], r["signal"]) for r in rows] == [("onnx", "crashed", "SIGSEGV"),
                                                                      ("executorch", "crashed", "SIGABRT")]
    assert rows[0]["reason"] == "SIGSEGV while writing fp32.onnx"
    assert json.loads((run_dir / "benchmark.json").read_text()) == rows


def test_signal_names():
    from edgessl.isolate import signal_name

    assert signal_name(-signal.SIGSEGV) == "SIGSEGV" and signal_name(-signal.SIGKILL) == "SIGKILL"
