"""onnxruntime helpers shared by export, check and probe: sessions, batched inference,
parity, latency and the edgessl metadata of a file."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import numpy as np

from edgessl.errors import EdgesslError

META_KEY = "edgessl"


def read_metadata(model_path: str | Path) -> dict:
    """The edgessl metadata of an ONNX file; a file that is not one is an EdgesslError."""
    import onnx

    p = Path(model_path)
    if not p.is_file():
        raise EdgesslError(f"no ONNX file at {p}")
    try:
        model = onnx.load(str(p), load_external_data=False)
    except Exception as e:  # onnx raises DecodeError and friends: all mean "not a model"
        raise EdgesslError(f"{p} is not a valid ONNX model ({type(e).__name__})") from None
    props = {x.key: x.value for x in model.metadata_props}
    if META_KEY not in props:
        raise EdgesslError(f"{p} has no edgessl metadata (export it with `edgessl export`)")
    inputs = model.graph.input
    dims = [d.dim_value or d.dim_param for d in inputs[0].type.tensor_type.shape.dim] if inputs else []
    if len(inputs) != 1 or len(dims) != 4 or dims[1] != 3:
        raise EdgesslError(f"{p}: expected one input of shape (batch, 3, H, W), got {dims}")
    return json.loads(props[META_KEY])


def session(path: str | Path, threads: Optional[int] = None, disabled_optimizers: tuple[str, ...] = ()):
    """A CPU session; `disabled_optimizers` names graph transformers onnxruntime must not run
    (e.g. "NhwcTransformer")."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"],
                                **({"disabled_optimizers": list(disabled_optimizers)} if disabled_optimizers else {}))


def _runner(sess):
    """An onnxruntime session as an edge-runtime backend (edgessl_edge.backends.Backend): run(x), features(x)."""
    from edgessl_edge.backends import Backend

    first = sess.get_inputs()[0]
    runner = Backend()
    runner.run = lambda x: sess.run(None, {first.name: x})[0]
    runner.fixed_batch = first.shape[0] if isinstance(first.shape[0], int) else None
    return runner


def ort_features(sess, images: np.ndarray, batch_size: int = 64) -> np.ndarray:
    """Run a float32 (N, 3, S, S) array through the session in batches: (N, D)."""
    return _runner(sess).features(images, batch_size)


def parity(a: np.ndarray, b: np.ndarray) -> dict:
    """a: reference (N, D), b: candidate. max_rel_diff is max abs diff over max(1, max |a|)."""
    cos = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1) + 1e-12)
    diff = float(np.abs(a - b).max())
    return {"max_abs_diff": diff, "max_rel_diff": diff / max(1.0, float(np.abs(a).max())),
            "min_cosine": float(cos.min())}


def batch_of(images: np.ndarray, b: int) -> np.ndarray:
    """A batch of exactly b rows from `images`, repeating them when there are fewer."""
    return np.ascontiguousarray(np.resize(images, (b, *images.shape[1:])))


def latency(sess, batch: np.ndarray, iters: int, warmup: int = 3) -> dict:
    """Milliseconds per run of `batch` through `sess`: p50 / p90 / p99 over `iters` timed runs."""
    from edgessl_edge.backends import latency as backend_latency

    return backend_latency(_runner(sess), batch, iters, warmup)


def latency_side_by_side(paths: dict, images: np.ndarray, batch_sizes=(1, 32), threads=(1, 0),
                         rounds: int = 5, calls: int = 10) -> dict:
    """p50 milliseconds {name: {threads: {batch: ms}}} of every model file in `paths` ({name: path},
    each in the runtime its suffix names), the files taking turns in `rounds` rounds of `calls`
    calls each (median of the rounds' p50s), so a slow spell of a shared machine hits them all
    alike. threads 0: the runtime's default."""
    from edgessl_edge.backends import latency as backend_latency
    from edgessl_edge.backends import open_model

    p50: dict = {name: {} for name in paths}
    for t in threads:  # one thread count at a time: ExecuTorch's thread pool is one per process
        models = {name: open_model(path, t) for name, path in paths.items()}
        times = {name: {b: [] for b in batch_sizes} for name in paths}
        for _ in range(rounds):
            for name, model in models.items():
                for b in batch_sizes:
                    times[name][b].append(backend_latency(model, batch_of(images, b), calls, warmup=1)["p50"])
        for name in paths:
            p50[name][t] = {b: round(float(np.median(times[name][b])), 4) for b in batch_sizes}
        del models
    return p50


def speedups(p50: dict, base: str) -> dict:
    """{name: {threads: {batch: base's p50 / name's p50}}} from latency_side_by_side's result."""
    return {name: {t: {b: round(p50[base][t][b] / ms, 2) for b, ms in per_t.items()} for t, per_t in rows.items()}
            for name, rows in p50.items()}


# what runs in integers in a QDQ int8 graph once onnxruntime has fused it; anything else there is float
INT8_OPS = ("QLinear", "QuantizeLinear", "DequantizeLinear", "ConvInteger", "MatMulInteger", "QGemm",
            "DynamicQuantizeLinear", "QAttention")


def profile(path: str | Path, batch: np.ndarray, iters: int = 20, threads: Optional[int] = None) -> dict:
    """onnxruntime's own profiler over `iters` runs of `batch`, summed per operator type:
    [{op, nodes, calls, ms (per run), share}], slowest first, and the float islands of an int8
    graph (operators that run in float between Dequantize and Quantize)."""
    import tempfile

    import onnxruntime as ort

    with tempfile.TemporaryDirectory() as tmp:
        opts = ort.SessionOptions()
        opts.enable_profiling = True
        opts.profile_file_prefix = str(Path(tmp) / "ort")
        if threads:
            opts.intra_op_num_threads = threads
        sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        name = sess.get_inputs()[0].name
        sess.run(None, {name: batch})  # warm-up, profiled too: dropped below by run count
        for _ in range(iters):
            sess.run(None, {name: batch})
        events = json.loads(Path(sess.end_profiling()).read_text())
    per_op: dict = {}
    for e in events:
        if e.get("cat") != "Node" or not e.get("name", "").endswith("_kernel_time"):
            continue
        op = e["args"].get("op_name", "?")
        row = per_op.setdefault(op, {"op": op, "nodes": set(), "us": 0.0, "calls": 0})
        row["nodes"].add(e["name"])
        row["us"] += e["dur"]
        row["calls"] += 1
    total = sum(r["us"] for r in per_op.values()) or 1.0
    rows = sorted(per_op.values(), key=lambda r: -r["us"])
    out = [{"op": r["op"], "nodes": len(r["nodes"]), "calls": r["calls"], "ms": round(r["us"] / 1e3 / (iters + 1), 4),
            "share": round(r["us"] / total, 4)} for r in rows]
    quantized = any(r["op"].startswith(INT8_OPS) for r in out)
    islands = [r for r in out if quantized and not r["op"].startswith(INT8_OPS)]
    return {"iters": iters, "batch": int(batch.shape[0]), "ops": out, "float_islands": islands,
            "float_share": round(sum(r["share"] for r in islands), 4)}
