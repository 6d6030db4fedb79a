"""Which file to ship: every runtime x precision of one run, written, checked and timed side by side.

Each (format, precision) is a real export (edgessl.export.export_model) into RUN/benchmark/, so
its parity, kNN change (an encoder) or top-1 agreement (a classifier) are measured in its own
runtime. Then every file that was written is timed at batch 1 and 32 on one thread, all files
taking turns (edgessl.onnxrt.latency_side_by_side), and compared with ONNX fp32. LiteRT and
ExecuTorch files have one batch size, so a batch-32 copy of each is written for the b32 column.
The int8 student (MobileNetV3) is distilled once and shared by every runtime's file.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

from edgessl import formats
from edgessl.errors import EdgesslError
from edgessl.export import ADAPT_MAX_KNN_LOSS, MIN_TOP1_AGREEMENT, export_model
from edgessl.runfiles import BENCHMARK, atomic_write
from edgessl_edge.backends import set_executorch_threads
from edgessl_edge.image import EdgeError


def benchmark(run_dir: str | Path, fmts=tuple(formats.FORMATS), precisions=("fp32", "fp16", "int8"),
              adapt_seconds: float = 120.0, progress: Optional[bool] = None, both_int8: bool = False) -> list[dict]:
    """One row per format x precision (status ok / check failed / failed, with its reason);
    written to RUN/benchmark.json as well. `both_int8`: a second int8 row per format with the
    other network (the ReLU student where the runtime quantises the network as trained, and
    the reverse), so the choice can be measured."""
    from tqdm import tqdm

    run_dir = Path(run_dir)
    if "executorch" in fmts:  # its one thread pool per process: 1 thread, as every row is timed
        try:
            set_executorch_threads(1)
        except EdgeError:
            pass  # not installed: its rows fail with the line that says so
    folder = run_dir / "benchmark"
    folder.mkdir(exist_ok=True)
    jobs = [(f, p, None) for f in fmts for p in precisions]
    if both_int8 and "int8" in precisions:
        jobs += [(f, "int8", not formats.FORMATS[f].int8_student) for f in fmts if f in formats.FORMATS]
    rows, b32 = [], {}
    students: dict = {}  # the int8 student, distilled once for every runtime (and batch-32 copy)
    for fmt, precision, adapt in tqdm(jobs, desc="benchmark", unit="file", disable=progress is False):
        row = {"format": fmt, "precision": precision}
        rows.append(row)
        try:
            spec = formats.get(fmt)
            name = precision if adapt is None else f"{precision}-{'student' if adapt else 'as-trained'}"
            path = folder / f"{name}{spec.suffix}"
            report = export_model(run_dir, path, precision, adapt=adapt, adapt_seconds=adapt_seconds, fmt=fmt,
                                  timing=False, progress=False, students=students)
            if not spec.dynamic_batch:  # the b32 column needs a batch-32 file of the same network
                b32[id(row)] = folder / f"{name}-b32{spec.suffix}"
                export_model(run_dir, b32[id(row)], precision, batch=32, knn=False, timing=False, adapt=adapt,
                             adapt_seconds=adapt_seconds, fmt=fmt, progress=False, students=students)
        except (EdgesslError, EdgeError) as e:
            row.update(status="failed", reason=str(e))
            continue
        except Exception as e:  # a converter's own crash: its line, not ours
            row.update(status="failed", reason=f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:200]}")
            continue
        row.update(_checked(report), path=str(path))
    _time(rows, b32)
    atomic_write(run_dir / BENCHMARK, json.dumps(rows, indent=1))
    return rows


def _checked(report: dict) -> dict:
    """The row's status and numbers from an export report: 'check failed' when int8 lost more
    than the export's own bars (kNN points, top-1 agreement)."""
    row = {"status": "ok", "mb": round(report["size_bytes"] / 2**20, 2), "min_cosine": report["min_cosine"],
           "int8_network": report.get("int8_network")}
    for key in ("knn_export", "knn_change", "top1_agreement"):
        if key in report:
            row[key] = report[key]
    if report.get("knn_change", 0) < -ADAPT_MAX_KNN_LOSS:
        row.update(status="check failed", reason=f"kNN {report['knn_change']:+.2f} points against torch fp32")
    if report.get("top1_agreement", 1) < MIN_TOP1_AGREEMENT:
        row.update(status="check failed", reason=f"top-1 agrees with torch fp32 on "
                                                 f"{100 * report['top1_agreement']:.1f} % of held-out images")
    return row


def _time(rows: list[dict], b32: dict) -> None:
    """ms at batch 1 and 32 on one thread, every written file taking turns; the speed-up over ONNX fp32."""
    import numpy as np

    from edgessl.onnxrt import latency_side_by_side
    from edgessl_edge.backends import open_model

    written = [r for r in rows if "path" in r]
    if not written:
        return
    size = open_model(written[0]["path"]).meta["input_size"][-1]
    images = np.random.default_rng(0).standard_normal((32, 3, size, size)).astype(np.float32)
    base = next((i for i, r in enumerate(written) if (r["format"], r["precision"]) == ("onnx", "fp32")), None)
    for batch in (1, 32):
        paths = {i: b32.get(id(r), r["path"]) if batch == 32 else r["path"] for i, r in enumerate(written)}
        p50 = latency_side_by_side(paths, images, (batch,), threads=(1,))
        for i, r in enumerate(written):
            r[f"ms_b{batch}"] = p50[i][1][batch]
            if base is not None:
                r[f"speedup_b{batch}"] = round(p50[base][1][batch] / r[f"ms_b{batch}"], 2)


def markdown(rows: list[dict]) -> str:
    """The table as Markdown: format, precision, status, MB, kNN or agreement, ms at b1 / b32 on 1
    thread, x ONNX fp32, which network int8 quantised."""
    from edgessl.report import BENCHMARK_COLUMNS, benchmark_cells

    lines = ["| " + " | ".join(BENCHMARK_COLUMNS) + " |", "|" + "---|" * len(BENCHMARK_COLUMNS)]
    return "\n".join(lines + ["| " + " | ".join(c.replace("|", "/") for c in benchmark_cells(r)) + " |" for r in rows])
