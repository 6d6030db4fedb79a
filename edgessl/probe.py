"""Frozen-feature probes: weighted kNN and a linear classifier, on a run, an ONNX file, an
untrained network (`random:BACKBONE`) or raw centred pixels (`pixels`).

An ONNX source is run through onnxruntime with the preprocessing from its metadata, so
the accuracy reported for a shipped model is measured on that model.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Callable, NamedTuple, Optional

import torch
import torch.nn.functional as F

from edgessl import data as data_lib
from edgessl.augment import normalize
from edgessl.config import IMAGENET_MEAN, IMAGENET_STD, PLAIN_FIT
from edgessl.errors import EdgesslError
from edgessl.features import features
from edgessl.knn import knn_predict

WEIGHT_DECAYS = (0.0, 1e-4, 1e-3, 1e-2, 1e-1)  # L2 grid for the linear probe, chosen on a train split


class Featurizer(NamedTuple):
    fn: Callable[[torch.Tensor], torch.Tensor]  # uint8 (N, 3, H, W) -> features (N, D)
    size: Optional[int]  # the input size it needs (None: any)
    what: str  # a description
    fit: Optional[str] = None  # how its images were made square (squash | crop; None: not fixed)


def featurizer(source: str) -> Featurizer:
    """The features of a probe source, and the input size and fit it was trained with."""
    if source == "pixels":
        return Featurizer(lambda x: x.flatten(1).float(), None, "raw pixels")
    if source.startswith("random:"):
        return untrained_features(source[len("random:"):])
    path = Path(source)
    if path.suffix == ".onnx":
        return onnx_features(path)
    if path.is_dir():
        return run_features(path)
    raise EdgesslError(f"probe source {source!r} is not a run directory, a .onnx file, random:BACKBONE or pixels")


def untrained_features(name: str):
    from edgessl.backbones import create_backbone

    cache: dict = {}

    @torch.no_grad()
    def run(x):  # the untrained network as pretrain builds it, for the data's own size
        size = x.shape[-1]
        if size not in cache:
            torch.manual_seed(0)
            cache[size] = create_backbone(name, size).eval()
        return features(cache[size], x, IMAGENET_MEAN, IMAGENET_STD)

    return Featurizer(run, None, f"untrained {name}")


def run_features(run_dir: Path):
    from edgessl.rebuild import load_run

    model, cfg, state = load_run(run_dir)
    backbone = model.backbone.eval()

    def run(x):
        return features(backbone, x, cfg.data.mean, cfg.data.std)

    return Featurizer(run, state["backbone"]["image_size"], f"run {run_dir} (torch)", cfg.data.fit)


def onnx_features(path: Path):
    from edgessl.onnxrt import ort_features, read_metadata, session

    meta = read_metadata(path)
    sess = session(path)

    def run(x):
        return torch.from_numpy(ort_features(sess, normalize(x, meta["mean"], meta["std"]).numpy()))

    return Featurizer(run, meta["input_size"][-1], f"{path} (onnxruntime, {meta['precision']})",
                      meta["resize"].get("fit", "squash"))


def linear_probe(train_f: torch.Tensor, train_y: torch.Tensor, test_f: torch.Tensor, test_y: torch.Tensor,
                 num_classes: int, seed: int = 0) -> tuple[float, float]:
    """Multinomial logistic regression on standardised frozen features, trained to convergence
    with L-BFGS; the L2 weight is chosen on a held-out fifth of the train set. Returns
    (test top-1 %, the chosen weight decay)."""
    mu, sd = train_f.mean(0), train_f.std(0).clamp(min=1e-6)
    tr, te = (train_f - mu) / sd, (test_f - mu) / sd
    perm = torch.randperm(len(tr), generator=torch.Generator().manual_seed(seed))
    n_val = max(1, len(tr) // 5)
    fit, val = perm[n_val:], perm[:n_val]
    best = max(WEIGHT_DECAYS, key=lambda wd: _accuracy(_fit(tr[fit], train_y[fit], num_classes, wd), tr[val],
                                                       train_y[val]))
    return _accuracy(_fit(tr, train_y, num_classes, best), te, test_y), best


def _fit(x: torch.Tensor, y: torch.Tensor, num_classes: int, wd: float) -> torch.nn.Linear:
    torch.manual_seed(0)
    head = torch.nn.Linear(x.shape[1], num_classes).double()
    x = x.double()
    opt = torch.optim.LBFGS(head.parameters(), lr=1.0, max_iter=500, tolerance_grad=1e-9,
                            tolerance_change=1e-12, history_size=20, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(head(x), y) + wd * head.weight.pow(2).sum() / 2
        loss.backward()
        return loss

    opt.step(closure)
    return head


def _accuracy(head: torch.nn.Linear, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return 100.0 * (head(x.double()).argmax(1) == y).double().mean().item()


def probe(source: str, train_spec: Optional[str], test_spec: Optional[str], knn_k: int = 200,
          linear: bool = False, grid: Optional[str] = None, image_size: Optional[int] = None,
          fit: str = PLAIN_FIT) -> dict:
    """kNN (and linear) top-1 of `source`'s features: train split as memory, test split as queries
    (neither given, for a run: the run's own training images and held-out split). A run or an ONNX
    file sees its images as it was trained (its input size and fit); `image_size` and `fit` are for
    the sources that have none (pixels, random:BACKBONE)."""
    start = time.perf_counter()
    fn, size, what, own_fit = featurizer(source)
    size, fit = size or image_size, own_fit or fit
    if train_spec is None and test_spec is None:
        if not Path(source).is_dir():
            raise EdgesslError("probing needs --train and --test (only a run has its own split)")
        from edgessl.rebuild import read_state, run_config

        train, test = data_lib.load_split(run_config(read_state(source)).data)
        if test is None:
            raise EdgesslError(f"{source} holds no images out (--val-fraction 0): give --train and --test")
    else:
        train = data_lib.load(train_spec, size, fit=fit)
        test = data_lib.load(test_spec, size or train.images.shape[-1], fit=fit)
    if train.labels is None or test.labels is None:
        raise EdgesslError("probing needs labels in both --train and --test")
    ftr, fte = fn(train.images).float(), fn(test.images).float()
    if source == "pixels":  # centred by the train mean, the floor a run must beat
        mu = ftr.mean(0)
        ftr, fte = ftr - mu, fte - mu
    classes = max(len(train.classes), int(train.labels.max()) + 1, int(test.labels.max()) + 1)
    scores = knn_predict(ftr, train.labels, fte, classes, knn_k)
    out = {"source": source, "what": what, "n_train": len(train), "n_test": len(test),
           "feature_dim": ftr.shape[1], "knn_k": knn_k,
           "knn_top1": 100.0 * (scores.argmax(1) == test.labels).float().mean().item()}
    if classes > 5:
        top5 = scores.topk(5, dim=1).indices
        out["knn_top5"] = 100.0 * (top5 == test.labels[:, None]).any(1).float().mean().item()
    if linear:
        out["linear_top1"], out["linear_weight_decay"] = linear_probe(ftr, train.labels, fte, test.labels, classes)
    if grid:
        neighbour_grid(ftr, fte, train, test, grid)
        out["grid"] = grid
    out["seconds"] = round(time.perf_counter() - start, 2)
    return out


def neighbour_grid(ftr: torch.Tensor, fte: torch.Tensor, train, test, path, rows: int = 8, k: int = 8) -> None:
    """8 test images, each followed by its 8 nearest training images, class names in the margin
    (wrong ones in red; none for unlabelled data). `path`: a file name or a binary file object."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    queries = torch.linspace(0, len(test) - 1, min(rows, len(test))).long()
    sim = F.normalize(fte[queries], dim=1) @ F.normalize(ftr, dim=1).T  # (rows, N)
    nn_idx = sim.topk(min(k, len(train)), dim=1).indices
    labelled = train.labels is not None and test.labels is not None
    names = (train.classes or [str(i) for i in range(int(train.labels.max()) + 1)]) if labelled else []

    def name(data, i):
        return names[int(data.labels[i])] if labelled else ""

    fig, axes = plt.subplots(len(queries), nn_idx.shape[1] + 1, figsize=(1.3 * (nn_idx.shape[1] + 1),
                                                                         1.45 * len(queries)), squeeze=False)
    for r, q in enumerate(queries.tolist()):
        cells = [(test.images[q], name(test, q), "query")] + [
            (train.images[j], name(train, j), "") for j in nn_idx[r].tolist()]
        for c, (img, label, tag) in enumerate(cells):
            ax = axes[r][c]
            ax.imshow(img.permute(1, 2, 0).numpy())
            ok = c == 0 or label == name(test, q)
            ax.set_title(f"{tag} {label}".strip(), fontsize=7, color="black" if ok else "red")
            ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=110, format="png")
    plt.close(fig)
