"""The runtime proper: an exported model in its runtime (edgessl_edge.backends), galleries, kNN and
classifier predictions."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np

from edgessl_edge.backends import open_model
from edgessl_edge.image import EdgeError, decode, list_images


class Encoder:
    """An exported edgessl model: `embed(paths)` -> (N, D) float32 outputs (features for an
    encoder, logits for a classifier; `kind` says which)."""

    def __init__(self, model_path, threads: int = 0):
        self.path = Path(model_path)
        self.backend = open_model(model_path, threads)
        self.meta = self.backend.meta
        self.size = self.meta["input_size"][-1]
        self.fit = self.meta.get("resize", {}).get("fit", "squash")  # how training made its images square
        self.mean = np.asarray(self.meta["mean"], dtype=np.float32).reshape(1, 3, 1, 1)
        self.std = np.asarray(self.meta["std"], dtype=np.float32).reshape(1, 3, 1, 1)
        self.kind = self.meta.get("kind", "encoder")

    @property
    def model_id(self) -> str:
        """sha256 of the model file: what a gallery records of the model it was built with."""
        h = hashlib.sha256()
        with open(self.path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        return h.hexdigest()

    def require(self, kind: str, command: str) -> None:
        if self.kind != kind:
            hint = ("use predict: it runs the classifier's own head" if self.kind == "classifier" else
                    "use classify with a gallery, or export a classifier from an `edgessl finetune` run")
            raise EdgeError(f"{self.path} is an {self.kind}; {command} needs an {kind} ({hint})")

    def preprocess(self, images_uint8: np.ndarray) -> np.ndarray:
        """(N, H, W, 3) uint8 -> (N, 3, H, W) float32, normalised as in training evaluation."""
        x = images_uint8.transpose(0, 3, 1, 2).astype(np.float32) / np.float32(255.0)
        return (x - self.mean) / self.std

    def embed_arrays(self, images_uint8: np.ndarray, batch_size: int = 32) -> np.ndarray:
        bs = self.backend.fixed_batch or batch_size
        out = [self.backend.features(self.preprocess(images_uint8[i:i + bs])) for i in range(0, len(images_uint8), bs)]
        return np.concatenate(out) if out else np.zeros((0, self.meta["feature_dim"]), np.float32)

    def embed(self, paths) -> np.ndarray:
        return self.embed_arrays(np.stack([_decode_named(p, self.size, self.fit) for p in paths]))


def _decode_named(path, size: int, fit: str = "squash") -> np.ndarray:
    try:
        return decode(path, size, fit)
    except EdgeError as e:
        raise EdgeError(f"{path}: {e}") from None


def build_gallery(encoder: Encoder, folder) -> dict:
    """Features of labelled images, one subfolder per class: {features, labels, classes, files,
    model} (model: the sha256 of the encoder file it was built with)."""
    encoder.require("encoder", "build-gallery")
    root = Path(folder)
    files = [p for p in list_images(root) if len(p.relative_to(root).parts) == 2]
    if not files:
        raise EdgeError(f"no labelled images in {root} (expected one subfolder per class)")
    classes = sorted({p.relative_to(root).parts[0] for p in files})
    feats = encoder.embed(files)
    return {"features": feats / np.linalg.norm(feats, axis=1, keepdims=True), "classes": np.array(classes),
            "labels": np.array([classes.index(p.relative_to(root).parts[0]) for p in files]),
            "model": np.array(encoder.model_id),
            "files": np.array([str(p) for p in files])}


def classify(gallery: dict, features: np.ndarray, k: int = 20, t: float = 0.1) -> np.ndarray:
    """Weighted kNN (cosine, votes exp(sim / t), NPID's protocol): class index per feature row."""
    q = features / np.linalg.norm(features, axis=1, keepdims=True)
    sim = q @ gallery["features"].T  # (Q, G)
    k = min(k, sim.shape[1])
    top = np.argsort(-sim, axis=1)[:, :k]
    votes = np.zeros((len(q), len(gallery["classes"])))
    for row in range(len(q)):
        np.add.at(votes[row], gallery["labels"][top[row]], np.exp(sim[row, top[row]] / t))
    return votes.argmax(1)


def check_gallery(gallery: dict, encoder: Encoder, gallery_path) -> None:
    """A gallery holds features of one model: used with another, kNN would compare unrelated spaces."""
    encoder.require("encoder", "classify")
    need = {"features", "labels", "classes"}
    if not need <= set(gallery):
        raise EdgeError(f"{gallery_path} is not an edgessl gallery (needs {', '.join(sorted(need))})")
    made_with = str(gallery["model"]) if "model" in gallery else None
    if made_with is not None and made_with != encoder.model_id:
        raise EdgeError(f"gallery {gallery_path} was built with another model (sha256 {made_with[:12]}), "
                        f"not {encoder.path} (sha256 {encoder.model_id[:12]}); rebuild it with build-gallery")
    f, y, c = gallery["features"], gallery["labels"], gallery["classes"]
    ok = (f.ndim == 2 and f.dtype.kind == "f" and f.shape[1] == encoder.meta["feature_dim"] and c.ndim == 1
          and y.shape == (f.shape[0],) and y.dtype.kind in "iu" and (y.size == 0 or 0 <= y.min() <= y.max() < len(c)))
    if not ok:
        raise EdgeError(f"gallery {gallery_path} is malformed ({f.shape} {f.dtype} features, {y.shape} {y.dtype} "
                        f"labels, {c.shape} classes); {encoder.path} makes {encoder.meta['feature_dim']}-d features")


def predict(model: Encoder, paths, top_k: int = 1) -> list[list[tuple[str, float]]]:
    """A fine-tuned classifier's top-k (class name, probability) for each image, from its metadata."""
    model.require("classifier", "predict")
    logits = model.embed(paths).astype(np.float64)
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    classes = model.meta["classes"]
    top = np.argsort(-p, axis=1)[:, :max(1, min(top_k, len(classes)))]
    return [[(classes[j], float(p[i, j])) for j in row] for i, row in enumerate(top)]
