"""`edgessl check MODEL.onnx`: an exported ONNX file through onnxruntime, in a child process
(edgessl.isolate): parity against the run it came from, latency per batch size, and with
--profile the time per operator type."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np
import torch

from edgessl import data as data_lib
from edgessl import isolate
from edgessl.augment import normalize
from edgessl.exporter import export_module
from edgessl.onnxrt import latency, ort_features, parity, read_metadata, session
from edgessl.runfiles import record_export
from edgessl.rebuild import load_run


def check(model_path: str | Path, against: Optional[str] = None, data: Optional[str] = None,
          batch_sizes: tuple[int, ...] = (1, 8, 32), threads: Optional[int] = None, iters: int = 30,
          profile: bool = False) -> dict:
    """Parity against a run (when given) and latency per batch size, through onnxruntime (in a child
    process: edgessl.isolate); with `profile`, onnxruntime's profiler summarised per operator type
    at the first batch size."""
    report = isolate.call(_check, model_path, against, data, batch_sizes, threads, iters, profile,
                          what=f"onnxruntime on {model_path}", hint="the file may be for another onnxruntime "
                          "or CPU; ONEDNN_MAX_CPU_ISA=AVX2 keeps torch off its AVX-512 and AMX kernels")
    if against:  # the run's report shows what its exports measured
        record_export(against, model_path, {"precision": report["precision"], "check": report})
    return report


def _check(model_path, against, data, batch_sizes, threads, iters, profile) -> dict:
    meta = read_metadata(model_path)
    sess = session(model_path, threads)
    size = meta["input_size"][-1]
    fixed = sess.get_inputs()[0].shape[0]
    report: dict = {"path": str(model_path), "precision": meta["precision"],
                    "provider": sess.get_providers()[0], "threads": threads or 0}
    if meta.get("adapted"):
        report["adapted"] = meta["adapted"]
    if against:
        model, cfg, _ = load_run(against)
        d = data_lib.load(data or cfg.data.spec, size, fit=cfg.data.fit)
        idx = torch.linspace(0, len(d) - 1, min(64, len(d))).long()
        images = normalize(d.images[idx], meta["mean"], meta["std"]).numpy()
        encoder = export_module(model, meta["with_head"])
        with torch.no_grad():
            reference = encoder(torch.from_numpy(images)).numpy()
        report.update(parity(reference, ort_features(sess, images)))
    rng = np.random.default_rng(0)
    sizes = [fixed] if isinstance(fixed, int) else list(batch_sizes)
    report["latency_ms"], report["images_per_s"] = {}, {}
    for b in sizes:
        x = rng.standard_normal((b, 3, size, size)).astype(np.float32)
        lat = latency(sess, x, iters)
        report["latency_ms"][str(b)] = lat
        report["images_per_s"][str(b)] = round(b / lat["p50"] * 1e3, 1)
    if profile:
        from edgessl.onnxrt import profile as ort_profile

        b = sizes[0]
        report["profile"] = ort_profile(model_path, rng.standard_normal((b, 3, size, size)).astype(np.float32),
                                        iters, threads)
    return report
