"""Which file to ship: every runtime x precision of one run, written, checked and timed side by side.

Each (format, precision) is a real export (edgessl.exporter.export_model) into RUN/benchmark/, so
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

from edgessl import exporter, formats, isolate
from edgessl.student import CAP_SECONDS
from edgessl.errors import EdgesslError
from edgessl.exporter import export_model
from edgessl.runfiles import BENCHMARK, atomic_write
from edgessl_edge.backends import set_executorch_threads
from edgessl_edge.image import EdgeError


def benchmark(run_dir: str | Path, fmts=tuple(formats.FORMATS), precisions=("fp32", "fp16", "int8"),
              adapt_seconds: float = CAP_SECONDS, progress: Optional[bool] = None,
              both_int8: bool = False) -> list[dict]:
    """One row per format x precision (status ok / check failed / failed, with its reason);
    written to RUN/benchmark.json as well. `both_int8`: a second int8 row per format with the
    other network (the ReLU student where the runtime quantises the network as trained, and
    the reverse), so the choice can be measured."""
    from tqdm import tqdm

    run_dir = Path(run_dir)
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
        except isolate.NativeCrash as e:  # the runtime died; the table goes on without it
            row.update(status="crashed", signal=e.signal, reason=f"{e.signal} while {e.step}")
            continue
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
    if "student_rejected" in report:  # the student lost too much on the held-out split: the network shipped
        row["student_knn_change"] = report["student_rejected"]["knn_change"]
    for key in ("knn_export", "knn_change", "top1_agreement"):
        if key in report:
            row[key] = report[key]
    if report.get("knn_change", 0) < -exporter.ADAPT_MAX_KNN_LOSS:  # the exporter's bars, read where they live
        row.update(status="check failed", reason=f"kNN {report['knn_change']:+.2f} points against torch fp32")
    if report.get("top1_agreement", 1) < exporter.MIN_TOP1_AGREEMENT:
        row.update(status="check failed", reason=f"top-1 agrees with torch fp32 on "
                                                 f"{100 * report['top1_agreement']:.1f} % of held-out images")
    return row


def _time(rows: list[dict], b32: dict) -> None:
    """ms at batch 1 and 32 on one thread, every written file taking turns, in a child process; the
    speed-up over ONNX fp32. When the runtimes crash there, each file is run alone to find the one
    that did: its row is marked crashed and the others are timed again."""
    written = [r for r in rows if "path" in r]
    while written:
        files = [(r["path"], str(b32.get(id(r), r["path"]))) for r in written]
        try:
            ms = isolate.call(timings, files, what="the benchmark's timing", hint="each file is run alone next")
            break
        except isolate.NativeCrash:
            crashed = {i: e for i, e in enumerate(_crash_alone(f) for f in files) if e is not None}
            if not crashed:
                raise
            for i, e in crashed.items():
                written[i].update(status="crashed", signal=e.signal, reason=f"{e.signal} while {e.step}")
            written = [r for i, r in enumerate(written) if i not in crashed]
    else:
        return
    base = next((i for i, r in enumerate(written) if (r["format"], r["precision"]) == ("onnx", "fp32")), None)
    for i, r in enumerate(written):
        for batch in (1, 32):
            r[f"ms_b{batch}"] = ms[i][batch]
            if base is not None:
                r[f"speedup_b{batch}"] = round(ms[base][batch] / r[f"ms_b{batch}"], 2)


def _crash_alone(file: tuple[str, str]) -> Optional[isolate.NativeCrash]:
    try:
        isolate.call(timings, [file], what=file[0], hint="")
    except isolate.NativeCrash as e:
        return e
    return None


def timings(files: list[tuple[str, str]]) -> list[dict]:
    """[{1: ms, 32: ms}] for each (batch-1 file, batch-32 file): p50 on one thread, taking turns."""
    import numpy as np

    from edgessl.onnxrt import latency_side_by_side
    from edgessl_edge.backends import open_model

    if any(f.endswith(".pte") for pair in files for f in pair):
        set_executorch_threads(1)  # its one thread pool per process, at the one thread every file runs on
    size = open_model(files[0][0]).meta["input_size"][-1]
    images = np.random.default_rng(0).standard_normal((32, 3, size, size)).astype(np.float32)
    out: list[dict] = [{} for _ in files]
    for batch in (1, 32):
        isolate.step(f"timing at batch {batch}")
        p50 = latency_side_by_side({i: f[batch == 32] for i, f in enumerate(files)}, images, (batch,), threads=(1,))
        for i in range(len(files)):
            out[i][batch] = p50[i][1][batch]
    return out


def markdown(rows: list[dict]) -> str:
    """The table as Markdown: format, precision, status, MB, kNN or agreement, ms at b1 / b32 on 1
    thread, x ONNX fp32, which network int8 quantised."""
    from edgessl.report import BENCHMARK_COLUMNS, benchmark_cells

    lines = ["| " + " | ".join(BENCHMARK_COLUMNS) + " |", "|" + "---|" * len(BENCHMARK_COLUMNS)]
    return "\n".join(lines + ["| " + " | ".join(c.replace("|", "/") for c in benchmark_cells(r)) + " |" for r in rows])
