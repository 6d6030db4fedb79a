"""One exported model file in the runtime its suffix names, numpy in and out.

    .onnx    onnxruntime      metadata in the file
    .xml     OpenVINO (+.bin) metadata in the file (rt_info "edgessl")
    .tflite  LiteRT           metadata in MODEL.json beside it
    .pte     ExecuTorch       metadata in MODEL.json beside it; its Python runtime imports torch

Each runtime is an optional package; a missing one is one line naming the pip extra.
"""
from __future__ import annotations

import contextlib
import importlib
import json
import os
import time
from pathlib import Path
from typing import Optional

import numpy as np

from edgessl_edge.image import EdgeError

RUNTIMES = {".onnx": "onnxruntime", ".xml": "openvino", ".tflite": "litert", ".pte": "executorch"}
MODULES = {"onnxruntime": "onnxruntime", "openvino": "openvino", "litert": "ai_edge_litert.interpreter",
           "executorch": "executorch.runtime"}
EXTRAS = {"openvino": "openvino", "litert": "litert", "executorch": "executorch"}  # pip extras of both packages
META_KEY = "edgessl"


def runtime_of(path) -> str:
    """The runtime a model file is for, from its suffix."""
    suffix = Path(path).suffix.lower()
    if suffix not in RUNTIMES:
        raise EdgeError(f"{path}: unknown model suffix {suffix!r} (expected {', '.join(RUNTIMES)})")
    return RUNTIMES[suffix]


def import_runtime(runtime: str):
    """The runtime's Python module, or one EdgeError line naming the extra that installs it."""
    try:
        with quiet_stderr():  # ExecuTorch's cpuinfo lines on import
            return importlib.import_module(MODULES[runtime])
    except ImportError as e:
        hint = ("pip install onnxruntime" if runtime == "onnxruntime" else
                f"pip install 'edgessl-edge[{EXTRAS[runtime]}]' (or 'edgessl[{EXTRAS[runtime]}]')")
        raise EdgeError(f"{runtime} is not installed ({e}); {hint}") from None


@contextlib.contextmanager
def quiet_stderr(fds: tuple[int, ...] = (2,)):
    """Silence what native code prints on file descriptors `fds` (stderr by default) meanwhile:
    LiteRT's "Created TensorFlow Lite XNNPACK delegate", ExecuTorch's cpuinfo lines, the
    converters' progress."""
    saved = [os.dup(fd) for fd in fds]
    try:
        with open(os.devnull, "w") as null:
            for fd in fds:
                os.dup2(null.fileno(), fd)
            yield
    finally:
        for fd, copy in zip(fds, saved):
            os.dup2(copy, fd)
            os.close(copy)


def sidecar_metadata(path: Path) -> dict:
    side = path.with_suffix(".json")
    if not side.is_file():
        raise EdgeError(f"{path} has no edgessl metadata ({side.name} beside it; export it with `edgessl export`)")
    try:
        return json.loads(side.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise EdgeError(f"{side} is not edgessl metadata ({e})") from None


class Backend:
    """A loaded model file: `meta`, `fixed_batch` (an int, or None for any batch), `run(x)` on one
    float32 (B, 3, S, S) batch, `features(x)` on any number of images."""

    runtime = ""
    meta: dict
    fixed_batch: Optional[int] = None

    def run(self, x: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def features(self, images: np.ndarray, batch_size: int = 64) -> np.ndarray:
        """(N, 3, S, S) float32 -> (N, D): in batches, the last one padded for a fixed-batch file."""
        bs = self.fixed_batch or batch_size
        out = []
        for i in range(0, len(images), bs):
            chunk = np.ascontiguousarray(images[i:i + bs], dtype=np.float32)
            n = len(chunk)
            if self.fixed_batch and n < bs:
                chunk = np.concatenate([chunk, np.repeat(chunk[-1:], bs - n, 0)])
            out.append(self.run(chunk)[:n])
        return np.concatenate(out) if out else np.zeros((0, self.meta["feature_dim"]), np.float32)


class OnnxBackend(Backend):
    runtime = "onnxruntime"

    def __init__(self, path: Path, threads: int):
        ort = import_runtime("onnxruntime")
        opts = ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads = threads
        self.session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        raw = self.session.get_modelmeta().custom_metadata_map.get(META_KEY)
        self.meta = json.loads(raw) if raw is not None else sidecar_metadata(path)
        first = self.session.get_inputs()[0]
        self.name, self.fixed_batch = first.name, first.shape[0] if isinstance(first.shape[0], int) else None

    def run(self, x):
        return self.session.run(None, {self.name: x})[0]


class OpenVinoBackend(Backend):
    """fp32 arithmetic (INFERENCE_PRECISION_HINT f32): OpenVINO would otherwise run bf16 on CPUs
    that have it, and an fp32 file would not be the network it claims to be."""
    runtime = "openvino"

    def __init__(self, path: Path, threads: int):
        ov = import_runtime("openvino")
        core = ov.Core()
        model = core.read_model(str(path))
        self.meta = (json.loads(model.get_rt_info([META_KEY]).astype(str)) if model.has_rt_info([META_KEY])
                     else sidecar_metadata(path))
        first = model.inputs[0].partial_shape[0]
        self.fixed_batch = first.get_length() if first.is_static else None
        config = {"INFERENCE_PRECISION_HINT": "f32", **({"INFERENCE_NUM_THREADS": threads} if threads else {})}
        self.request = core.compile_model(model, "CPU", config).create_infer_request()

    def run(self, x):
        self.request.infer({0: x})
        return self.request.get_output_tensor(0).data.copy()


class LiteRtBackend(Backend):
    """A fixed-batch file; an int8 file may take int8 input and give int8 output, (de)quantised
    here with the scale and zero point the file records."""
    runtime = "litert"

    def __init__(self, path: Path, threads: int):
        interpreter = import_runtime("litert")
        self.meta = sidecar_metadata(path)
        with quiet_stderr():
            self.interpreter = interpreter.Interpreter(model_path=str(path), num_threads=threads or None)
            self.interpreter.allocate_tensors()
        self.input = self.interpreter.get_input_details()[0]
        self.output = self.interpreter.get_output_details()[0]
        self.fixed_batch = int(self.input["shape"][0])

    def run(self, x):
        dtype, (scale, zero) = self.input["dtype"], self.input["quantization"]
        if np.issubdtype(dtype, np.integer) and scale:
            info = np.iinfo(dtype)
            x = np.clip(np.round(x / scale) + zero, info.min, info.max).astype(dtype)
        self.interpreter.set_tensor(self.input["index"], x)
        self.interpreter.invoke()
        y = self.interpreter.get_tensor(self.output["index"])
        scale, zero = self.output["quantization"]
        return (y.astype(np.float32) - zero) * scale if np.issubdtype(y.dtype, np.integer) and scale else y.copy()


class ExecuTorchBackend(Backend):
    """ExecuTorch's Python runtime takes torch tensors (it imports torch); on a device its C++
    runtime reads the same .pte. Its XNNPACK thread pool is one per process and cannot be resized
    once a file has run (a file loaded before a resize hangs), so `threads` is honoured for the
    first .pte of a process; another count after that is an EdgeError."""
    runtime = "executorch"
    pool_in_use = False  # set once a .pte has loaded in this process

    def __init__(self, path: Path, threads: int):
        runtime = import_runtime("executorch")
        self.meta = sidecar_metadata(path)
        set_executorch_threads(threads, path.name)
        with quiet_stderr():
            self.method = runtime.Runtime.get().load_program(str(path)).load_method("forward")
        ExecuTorchBackend.pool_in_use = True
        batch = self.meta.get("batch")
        self.fixed_batch = int(batch) if str(batch).isdigit() else 1

    def run(self, x):
        import torch

        return self.method.execute([torch.from_numpy(x)])[0].numpy()


def set_executorch_threads(threads: int, name: str = "a .pte file") -> None:
    """Size ExecuTorch's process-wide thread pool (0: leave it); only before a .pte has loaded."""
    if not threads:
        return
    import_runtime("executorch")
    with quiet_stderr():  # its cpuinfo lines, printed when the thread pool starts
        from executorch.extension.pybindings import portable_lib

        pool = portable_lib._threadpool_get_thread_count()
        if threads != pool and not ExecuTorchBackend.pool_in_use:
            portable_lib._unsafe_reset_threadpool(threads)
    if threads != pool and ExecuTorchBackend.pool_in_use:
        raise EdgeError(f"ExecuTorch's thread pool of this process runs {pool} threads and cannot be "
                        f"resized to {threads}; load {name} in a new process")


BACKENDS = {"onnxruntime": OnnxBackend, "openvino": OpenVinoBackend, "litert": LiteRtBackend,
            "executorch": ExecuTorchBackend}


def open_model(path, threads: int = 0) -> Backend:
    """Load a model file in its runtime (picked by suffix); a missing, corrupt or truncated file is
    one EdgeError line."""
    p = Path(path)
    runtime = runtime_of(p)
    if not p.is_file():
        raise EdgeError(f"no model file at {p}")
    import_runtime(runtime)
    try:
        return BACKENDS[runtime](p, threads)
    except EdgeError:
        raise
    except Exception as e:  # each runtime raises its own types for a file it cannot read
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise EdgeError(f"{p} is not a valid {runtime} model ({reason})") from None


def latency(model: Backend, batch: np.ndarray, iters: int, warmup: int = 3) -> dict:
    """Milliseconds per run of `batch`: p50 / p90 / p99 over `iters` timed runs."""
    for _ in range(warmup):
        model.run(batch)
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        model.run(batch)
        times.append((time.perf_counter() - t0) * 1e3)
    p50, p90, p99 = np.percentile(times, [50, 90, 99])
    return {"p50": round(float(p50), 3), "p90": round(float(p90), 3), "p99": round(float(p99), 3)}
