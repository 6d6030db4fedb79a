"""A run at a glance: one self-contained HTML page (no network; images embedded as data URIs).

The resolved config, the summary, loss and kNN curves against epochs and minutes, throughput
and memory per epoch, nearest neighbours of held-out images, and the exports recorded in the
run directory (exports.json: what `edgessl export` and `edgessl check --against` measured).
"""
from __future__ import annotations

import base64
import csv
import html
import io
import json
from pathlib import Path
from typing import Optional

import torch
import yaml

from edgessl import data as data_lib
from edgessl.errors import EdgesslError
from edgessl.runfiles import BENCHMARK, EXPORTS, atomic_write
from edgessl.rebuild import check_run_data, is_classifier, read_state, run_config



def write_report(run_dir: str | Path, out: Optional[str | Path] = None, grid: bool = True) -> Path:
    """Write RUN_DIR/report.html (or `out`) and return its path: a pretraining run's page, or a
    fine-tuned classifier's (its labels, its curve, its test top-1)."""
    run_dir = Path(run_dir)
    state = read_state(run_dir)
    out = Path(out) if out else run_dir / "report.html"
    parts = _classifier_parts(run_dir, state) if is_classifier(state) else _pretraining_parts(run_dir, state, grid)
    parts += _exports(run_dir) + _benchmark(run_dir)
    config_yaml = ((run_dir / "config.yaml").read_text() if (run_dir / "config.yaml").exists() else
                   yaml.safe_dump(state["config"], sort_keys=False))  # a classifier: the checkpoint's
    parts += ["<h2>Resolved config</h2>", f"<pre>{html.escape(config_yaml)}</pre>"]
    page = ("<!doctype html><html><head><meta charset='utf-8'><title>edgessl report</title><style>"
            "body{font-family:sans-serif;margin:2em;max-width:1100px}table{border-collapse:collapse;margin:1em 0}"
            "td,th{border:1px solid #ccc;padding:4px 8px;text-align:left}img{max-width:100%}"
            "pre{background:#f4f4f4;padding:1em}</style></head><body>" + "\n".join(parts) + "</body></html>")
    atomic_write(out, page)
    return out


def _pretraining_parts(run_dir: Path, state: dict, grid: bool) -> list[str]:
    cfg = run_config(state)
    metrics = _rows(run_dir / "metrics.csv")
    pos = state["position"]
    base = pos.get("baselines", {})
    parts = [f"<h1>edgessl run {html.escape(str(run_dir))}</h1>",
             _table(["", ""], [["method", cfg.method.name], ["backbone", state["backbone"]["timm_name"]],
                               ["input size", f"{state['backbone']['image_size']} px, output stride "
                                              f"{state['backbone']['output_stride']}"],
                               ["data", html.escape(cfg.data.spec)], ["epochs / steps", f"{pos['epoch']} / {pos['step']}"],
                               ["training seconds", f"{pos['elapsed']:.0f}"],
                               ["kNN top-1 (held out)", _pct(pos.get("last_score"))],
                               ["kNN raw pixels / untrained", f"{_pct(base.get('knn_pixels'))} / "
                                                              f"{_pct(base.get('knn_untrained'))}"]])]
    if metrics:
        parts += ["<h2>Training</h2>", _img(_curves(metrics, base))]
    if grid:
        png = _neighbours(run_dir, cfg, state)
        if png:
            parts += ["<h2>Nearest neighbours</h2><p>Held-out images (first column), then their nearest "
                      "training images by the backbone's features; wrong labels in red.</p>", _img(png)]
    return parts


def _classifier_parts(run_dir: Path, state: dict) -> list[str]:
    """A fine-tuned classifier: where it came from, what it learned from, its test curve."""
    ft, pos = state["config"]["finetune"], state["position"]
    rows = _rows(run_dir / "metrics.csv")
    parts = [f"<h1>edgessl classifier {html.escape(str(run_dir))}</h1>",
             _table(["", ""], [["pretraining run", html.escape(str(ft["source"]))],
                               ["backbone", state["backbone"]["timm_name"]], ["classes", len(state["classes"])],
                               ["labelled images", ft["n_labelled"]],
                               ["unlabelled images", html.escape(str(ft.get("unlabelled", "none")))],
                               ["init", ft["init"]], ["epochs / steps", f"{pos['epoch']} / {pos['step']}"],
                               ["test top-1", _pct(pos["last_score"])]])]
    if rows:
        parts += ["<h2>Fine-tuning</h2>", _img(_finetune_curves(rows))]
    return parts


def _finetune_curves(rows: list[dict]) -> bytes:
    """Training loss and test top-1 against epochs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [int(r["epoch"]) for r in rows]
    fig, ax = plt.subplots(1, 2, figsize=(10, 3.2))
    ax[0].plot(epochs, [float(r["loss"]) for r in rows], marker=".")
    ax[0].set(xlabel="epoch", ylabel="training loss")
    ax[1].plot(epochs, [float(r["test_top1"] or "nan") for r in rows], marker="o")  # (no test set: empty)
    ax[1].set(xlabel="epoch", ylabel="test top-1 %")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    plt.close(fig)
    return buf.getvalue()


BENCHMARK_COLUMNS = ["format", "precision", "status", "MB", "kNN (change) / top-1 agreement", "ms b1, 1 thread",
                     "ms b32, 1 thread", "x ONNX fp32 b1 / b32", "int8 network"]


def benchmark_cells(r: dict) -> list[str]:
    """One row of `edgessl benchmark`'s table as text cells (BENCHMARK_COLUMNS)."""
    quality = (f"{r['knn_export']:.2f} % ({r['knn_change']:+.2f})" if "knn_export" in r else
               f"{100 * r['top1_agreement']:.1f} %" if "top1_agreement" in r else "")
    return [r["format"], r["precision"], r["status"] + (f": {r['reason']}" if r.get("reason") else ""),
            str(r.get("mb", "")), quality, *(f"{r[k]:.3f}" if k in r else "" for k in ("ms_b1", "ms_b32")),
            " / ".join(f"{r[k]:.2f}x" for k in ("speedup_b1", "speedup_b32") if k in r), _network(r)]


def _network(r: dict) -> str:
    """Which network an int8 row quantised, and why the network as trained where the student lost too much."""
    if "student_knn_change" in r:
        return f"{r['int8_network']} (the ReLU student's kNN {r['student_knn_change']:+.2f})"
    return r.get("int8_network") or ""


def _benchmark(run_dir: Path) -> list[str]:
    """`edgessl benchmark`'s table: every runtime x precision, timed side by side on one thread."""
    path = run_dir / BENCHMARK
    if not path.exists():
        return []
    rows = [[html.escape(c) for c in benchmark_cells(r)] for r in json.loads(path.read_text())]
    return ["<h2>Which file to ship (edgessl benchmark)</h2>", _table(BENCHMARK_COLUMNS, rows)]


def _rows(path: Path) -> list[dict]:
    if not path.exists():
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _pct(x) -> str:
    return "-" if x is None else f"{x:.2f} %"


def _table(header: list[str], rows: list[list]) -> str:
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header) if any(header) else ""
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table>{'<tr>' + head + '</tr>' if head else ''}{body}</table>"


def _img(png: bytes) -> str:
    return f"<img alt='plot' src='data:image/png;base64,{base64.b64encode(png).decode()}'>"


def _curves(rows: list[dict], base: dict) -> bytes:
    """Loss and kNN against epochs and minutes; images/s and peak memory per epoch."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def col(name, rs):
        return [float(r[name]) for r in rs]

    trained = [r for r in rows if r["epoch"] != "0"]
    knn = [r for r in rows if r.get("knn_top1")]
    fig, ax = plt.subplots(2, 3, figsize=(13, 6.5))
    for j, x in enumerate(("epoch", "seconds")):
        scale = 1 / 60 if x == "seconds" else 1
        label = "minutes" if x == "seconds" else "epoch"
        if trained:
            ax[0][j].plot([v * scale for v in col(x, trained)], col("loss", trained), marker=".")
        ax[0][j].set(xlabel=label, ylabel="training loss")
        if knn:
            ax[1][j].plot([v * scale for v in col(x, knn)], col("knn_top1", knn), marker="o", label="run")
        for key, style in (("knn_pixels", ":"), ("knn_untrained", "--")):
            if base.get(key) is not None:
                ax[1][j].axhline(base[key], ls=style, color="gray", label=key.replace("knn_", ""))
        ax[1][j].set(xlabel=label, ylabel="kNN top-1 %")
        if ax[1][j].get_legend_handles_labels()[0]:  # unlabelled data: no curve, no baselines, no legend
            ax[1][j].legend(fontsize=8)
    if trained:
        ax[0][2].plot(col("epoch", trained), col("images_per_s", trained), marker=".")
        ax[1][2].plot(col("epoch", trained), col("peak_mem_mb", trained), marker=".")
    ax[0][2].set(xlabel="epoch", ylabel="images/s")
    ax[1][2].set(xlabel="epoch", ylabel="peak memory MB")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    plt.close(fig)
    return buf.getvalue()


def _neighbours(run_dir: Path, cfg, state: dict) -> Optional[bytes]:
    """The probe's neighbour grid on the run's own split (held-out queries when there are some)."""
    from edgessl.probe import neighbour_grid, run_features

    try:
        train, val = data_lib.load_split(cfg.data)
        check_run_data(state, train, val, "report")
    except EdgesslError:
        return None  # the data moved or changed since the run: the page shows what it can without it
    if train.mapped:
        return None
    fn = run_features(run_dir).fn
    queries = val if val is not None else train
    pick = torch.linspace(0, len(queries) - 1, min(8, len(queries))).long()
    queries = queries.subset(pick)
    buf = io.BytesIO()
    neighbour_grid(fn(train.images).float(), fn(queries.images).float(), train, queries, buf)
    return buf.getvalue()


def _exports(run_dir: Path) -> list[str]:
    path = run_dir / EXPORTS
    if not path.exists():
        return []
    records = json.loads(path.read_text())
    fp32 = {r.get("check", {}).get("threads"): r for r in records.values() if r.get("precision") == "fp32"}
    rows = []
    for model, r in records.items():
        lat = r.get("check", {}).get("latency_ms", {})
        speed = ""
        ref = fp32.get(r.get("check", {}).get("threads"))
        if r.get("precision") != "fp32" and ref and lat and ref.get("check"):
            speed = " / ".join(f"b{b} {ref['check']['latency_ms'][b]['p50'] / lat[b]['p50']:.2f}x"
                               for b in lat if b in ref["check"]["latency_ms"])
        rows.append([html.escape(Path(model).name), r.get("precision", ""), f"{r.get('size_bytes', 0) / 2**20:.2f}",
                     f"{r.get('min_cosine', float('nan')):.5f}", _pct(r.get("knn_export")),
                     f"{r['knn_change']:+.2f}" if "knn_change" in r else "",
                     " / ".join(f"b{b} {v['p50']:.2f} ms" for b, v in lat.items()) or
                     (f"b{r['latency_batch']} {r['latency_ms_p50']:.2f} ms" if "latency_ms_p50" in r else ""), speed])
    return ["<h2>Exports</h2>", _table(["file", "precision", "MB", "min cosine vs torch", "kNN (its runtime)",
                                        "kNN change", "latency p50", "speed-up vs fp32"], rows)]
