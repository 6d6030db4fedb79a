"""Features out: `embed(source, spec)` gives the rows `probe` measures, with their identity.

SOURCE is what `probe` takes (a run directory, a .onnx file, random:BACKBONE, pixels), so the
numbers are the probe's. Rows follow the data's order: row i is image i of the spec (for a
folder, its sorted file list without the files the bad-images policy left out).
"""
from __future__ import annotations

import csv
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np

from edgessl import data as data_lib
from edgessl.config import PLAIN_FIT
from edgessl.errors import EdgesslError
from edgessl.probe import featurizer
from edgessl.runfiles import atomic_write

FORMATS = (".npy", ".npz", ".csv")


@dataclass
class Embedding:
    features: np.ndarray  # (N, D) float32
    ids: np.ndarray  # (N,) row index in the data
    files: Optional[list[str]]  # folder specs: each row's file, relative to the folder
    labels: Optional[np.ndarray]  # (N,) when the data has labels
    classes: list[str]
    source: str
    spec: str


def embed(source: str, spec: str, batch_size: int = 256, progress: Optional[bool] = None,
          bad_images: str = "fail") -> Embedding:
    """Features of every image of `spec` under `source`, in the data's order."""
    from tqdm import tqdm

    f = featurizer(source)
    fn = f.fn
    data = data_lib.load(spec, f.size, bad_images, fit=f.fit or PLAIN_FIT)
    show = sys.stderr.isatty() if progress is None else progress
    chunks = []
    with tqdm(total=len(data), disable=not show, unit="img", desc="embed", leave=False) as bar:
        for start in range(0, len(data), batch_size):
            chunk = data.images[start:start + batch_size]
            chunks.append(fn(chunk).float().numpy())
            bar.update(len(chunk))
    labels = data.labels.numpy() if data.labels is not None else None
    return Embedding(np.concatenate(chunks).astype(np.float32), np.arange(len(data)), data.files, labels,
                     list(data.classes), source, spec)


def save(e: Embedding, path: str | Path) -> Path:
    """.npy (+ a .json sidecar with ids, files, labels), .npz (everything) or .csv (one row per image)."""
    path = Path(path)
    if path.suffix not in FORMATS:
        raise EdgesslError(f"--out must end in {', '.join(FORMATS)}, got {path.name}")
    if not path.parent.exists():
        raise EdgesslError(f"folder {path.parent} does not exist")
    meta = {"source": e.source, "data": e.spec, "rows": len(e.ids), "dim": int(e.features.shape[1]),
            "classes": e.classes}
    if path.suffix == ".npy":
        atomic_write(path, lambda f: np.save(f, e.features))
        side = {**meta, "ids": e.ids.tolist(), "files": e.files,
                "labels": e.labels.tolist() if e.labels is not None else None}
        atomic_write(path.with_suffix(".json"), json.dumps(side, indent=1))
    elif path.suffix == ".npz":
        arrays = {"features": e.features, "ids": e.ids, "classes": np.array(e.classes, dtype=str)}
        if e.files is not None:
            arrays["files"] = np.array(e.files, dtype=str)
        if e.labels is not None:
            arrays["labels"] = e.labels
        atomic_write(path, lambda f: np.savez(f, **arrays))
    else:
        atomic_write(path, _csv_text(e))
    return path


def _csv_text(e: Embedding) -> str:
    import io

    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["id", "file", "label"] + [f"f{j}" for j in range(e.features.shape[1])])
    for i in range(len(e.ids)):
        label = e.classes[e.labels[i]] if e.labels is not None and e.classes else (
            int(e.labels[i]) if e.labels is not None else "")
        w.writerow([int(e.ids[i]), e.files[i] if e.files else "", label] + [repr(float(v)) for v in e.features[i]])
    return buf.getvalue()
