"""Which images to label first: `select` picks from a run's unlabelled images, in priority order.

With few labels, which images carry them matters as much as how the classifier trains: images
that stand for many others beat a random draw (TypiClust, Hacohen et al. 2022, arXiv 2202.02794;
ProbCover, Yehuda et al. 2022, arXiv 2205.11320; MaxHerding, Bae et al. 2024, arXiv 2407.12212).
The default, graph, measures "stands for" as fine-tuning will use it: how far a label spreads
over the features' kNN graph (edgessl.semi). Every rule works on the run's L2-normalised backbone
features, computed once and kept with the run (RUN/features/); `select` writes the picks as a CSV
(rank, path) and the labelling page beside it (edgessl.labelpage).
"""
from __future__ import annotations

import csv
import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from edgessl import data as data_lib
from edgessl.config import SELECT_DEFAULT as DEFAULT_RULE, SELECT_RULES as RULES
from edgessl.errors import EdgesslError
from edgessl.runfiles import atomic_write
from edgessl.semi import knn_graph

TYPICAL_K = 20  # neighbours in an image's typicality (TypiClust's choice)
MIN_CLUSTER = 5  # clusters smaller than this are picked from last: outliers are not typical
PURITY = 0.95  # coverage: the largest ball radius at which 95 % of balls stay within one k-means cluster
HERDING_ROWS = 4096  # herding: the kernel's width is measured on at most this many images' neighbours
GREEDY_BATCH = 64  # herding, graph: stale gains re-scored at once (one matrix product instead of 64)
DIFFUSION = 0.8  # graph: the kernel's alpha (0.5 and 0.9 each led on one tuning split of three; docs/benchmarks.md)
GRAPH_ROWS = 16384  # graph: the dense kernel covers at most this many images (1 GiB)
KMEANS_ITERS = 100
CHUNK = 2048  # rows of a distance matrix computed at once


@dataclass
class Pool:
    """The images a selection picks from, with their features and their names."""

    features: torch.Tensor  # (N, D) float32, L2-normalised
    names: list[str]  # row i's path relative to the data folder (array data: its row number)
    data: data_lib.ImageData
    root: Optional[Path]  # the data folder (None for array data)
    cached: bool  # the features were read from the run's store


def pool(run_dir: str | Path, spec: Optional[str] = None) -> Pool:
    """The run's training images (or `spec`'s), embedded by the run's encoder once and kept in
    RUN/features/, keyed by the images and the checkpoint."""
    from edgessl.probe import run_features
    from edgessl.rebuild import read_state, run_config

    run_dir = Path(run_dir)
    state = read_state(run_dir)
    cfg = run_config(state).data
    if spec:
        data = data_lib.load(spec, state["backbone"]["image_size"], fit=cfg.fit)
    else:
        data, _ = data_lib.load_split(cfg)
        spec = cfg.spec
    root = data_lib.folder_root(spec)
    ckpt = (run_dir / "checkpoint.pt").stat()
    key = hashlib.sha256(json.dumps([data_lib.identity(data), ckpt.st_size, ckpt.st_mtime_ns]).encode()).hexdigest()
    store = run_dir / "features" / f"{key[:16]}.npy"
    cached = store.exists()
    if cached:
        feats = torch.from_numpy(np.load(store, allow_pickle=False))
    else:
        feats = run_features(run_dir).fn(data.images).float()
        store.parent.mkdir(exist_ok=True)
        atomic_write(store, lambda f: np.save(f, feats.numpy()))
    return Pool(F.normalize(feats, dim=1), names_of(data), data, root, cached)


def names_of(data: data_lib.ImageData) -> list[str]:
    """How picks.csv and labels.csv name each image: its path in the folder, or its row number."""
    return list(data.files) if data.files is not None else [str(i) for i in range(len(data))]


def pick(x: torch.Tensor, budget: int, rule: str = DEFAULT_RULE, labelled: Sequence[int] = (),
         seed: int = 0) -> list[int]:
    """`budget` row indices of the L2-normalised features `x`, in priority order, none in `labelled`.

    typical: k-means into (labelled + budget) clusters; from the clusters with the fewest labels,
    largest first, the most typical image (1 / mean distance to its TYPICAL_K nearest neighbours
    in its cluster). kmeans: the same clusters, the image nearest each centre. herding (MaxHerding,
    Bae et al. 2024, arXiv 2407.12212): greedily the image that most raises the mean, over all
    images, of a Gaussian kernel to the nearest pick (labelled images count as picks). graph: the
    same greedy under the diffusion kernel of the kNN graph that fine-tuning propagates labels
    over. coverage: balls of the largest radius at which PURITY of them stay within one k-means
    cluster; greedily the image whose ball holds the most images no chosen ball holds. random: a
    uniform draw."""
    labelled = sorted(set(int(i) for i in labelled))
    free = len(x) - len(labelled)
    if not 1 <= budget <= free:
        raise EdgesslError(f"--budget {budget} is not between 1 and the {free} images not yet labelled")
    if rule not in RULES:
        raise EdgesslError(f"unknown selection rule {rule!r} (known: {', '.join(RULES)})")
    g = torch.Generator().manual_seed(seed)
    if rule == "random":
        return _draw(len(x), labelled, budget, g).tolist()
    if rule == "coverage":
        return _coverage(x, budget, labelled, g)
    if rule == "herding":
        return _herding(x, budget, labelled, g)
    if rule == "graph":
        return _graph(x, budget, labelled, g)
    centres, assign = kmeans(x, len(labelled) + budget, g)
    if rule == "kmeans":
        score = -(x - centres[assign]).norm(dim=1)
    else:
        score = torch.zeros(len(x))
        for c in assign.unique().tolist():
            members = (assign == c).nonzero().flatten()
            score[members] = typicality(x[members])
    return _by_cluster(assign, score, budget, labelled)


def _draw(n: int, labelled: list[int], count: int, g: torch.Generator) -> torch.Tensor:
    """`count` of the n rows not in `labelled`, drawn uniformly with `g`, in the order drawn."""
    mask = torch.ones(n, dtype=torch.bool)
    mask[labelled] = False
    rows = mask.nonzero().flatten()
    return rows[torch.randperm(len(rows), generator=g)[:count]]


def _by_cluster(assign: torch.Tensor, score: torch.Tensor, budget: int, labelled: list[int]) -> list[int]:
    """Round-robin over the clusters: the one with the fewest labelled or picked images next (ties:
    clusters of MIN_CLUSTER or more first, then the largest), its best-scoring image not yet taken."""
    sizes = torch.bincount(assign)
    held = torch.bincount(assign[labelled], minlength=len(sizes)) if labelled else torch.zeros_like(sizes)
    taken = torch.zeros(len(assign), dtype=torch.bool)
    taken[labelled] = True
    left = torch.bincount(assign[~taken], minlength=len(sizes))  # images not yet taken, per cluster
    picks = []
    while len(picks) < budget:
        key = held.double() * 1e12 + (sizes < MIN_CLUSTER).double() * 1e9 - sizes.double()
        key[left == 0] = float("inf")
        c = int(key.argmin())
        left[c] -= 1
        members = ((assign == c) & ~taken).nonzero().flatten()
        i = int(members[score[members].argmax()])
        picks.append(i)
        taken[i] = True
        held[c] += 1
    return picks


def kmeans(x: torch.Tensor, k: int, g: torch.Generator, iters: int = KMEANS_ITERS) -> tuple[torch.Tensor, torch.Tensor]:
    """(centres, assignment): k-means++ seeding, then Lloyd's iterations until nothing moves."""
    k = min(k, len(x))
    first = int(torch.randint(len(x), (1,), generator=g))
    centres = [x[first]]
    d2 = (x - x[first]).pow(2).sum(1)
    for _ in range(1, k):
        i = int(torch.multinomial(d2.clamp(min=0) + 1e-12, 1, generator=g))
        centres.append(x[i])
        d2 = torch.minimum(d2, (x - x[i]).pow(2).sum(1))
    centres = torch.stack(centres)
    assign = nearest(x, centres)
    for _ in range(iters):
        counts = torch.bincount(assign, minlength=k)
        sums = torch.zeros_like(centres).index_add_(0, assign, x)
        centres = torch.where((counts > 0)[:, None], sums / counts.clamp(min=1)[:, None], centres)
        new = nearest(x, centres)
        if torch.equal(new, assign):
            break
        assign = new
    return centres, assign


def nearest(x: torch.Tensor, centres: torch.Tensor) -> torch.Tensor:
    return torch.cat([torch.cdist(c, centres).argmin(1) for c in x.split(CHUNK)])


def typicality(x: torch.Tensor, k: int = TYPICAL_K) -> torch.Tensor:
    """1 / mean distance to each row's k nearest other rows (a lone row: 0)."""
    if len(x) < 2:
        return torch.zeros(len(x))
    d = torch.cdist(x, x)
    d.fill_diagonal_(float("inf"))
    return 1.0 / (d.topk(min(k, len(x) - 1), largest=False).values.mean(1) + 1e-8)


def kernel_width(x: torch.Tensor, g: torch.Generator, k: int = TYPICAL_K) -> float:
    """The median distance from an image to its k-th nearest other image (over at most HERDING_ROWS
    images drawn with `g`): the scale at which an image's neighbourhood ends."""
    rows = x[torch.randperm(len(x), generator=g)[:HERDING_ROWS]] if len(x) > HERDING_ROWS else x
    kth = torch.cat([torch.cdist(c, x).topk(min(k + 1, len(x)), largest=False).values[:, -1]
                     for c in rows.split(CHUNK)])
    return max(float(kth.median()), 1e-3)


def _herding(x: torch.Tensor, budget: int, labelled: list[int], g: torch.Generator) -> list[int]:
    """Facility location under exp(-|a - b|^2 / 2 sigma^2), sigma = kernel_width(x)."""
    scale = 1.0 / kernel_width(x, g) ** 2  # for unit rows |a - b|^2 = 2 - 2 a.b
    return facility_location(lambda rows: torch.exp((x[rows] @ x.T - 1.0) * scale), len(x), budget, labelled)


def diffusion_kernel(x: torch.Tensor, alpha: float = DIFFUSION) -> torch.Tensor:
    """(I - alpha S)^-1 = sum_t alpha^t S^t over the kNN graph S that fine-tuning propagates labels
    over (edgessl.semi): how much of a label placed on image j reaches image i. Dense (N, N),
    symmetric, non-negative. I - alpha S is symmetric positive definite and well conditioned (its
    eigenvalues lie in [1 - alpha, 1 + alpha]): a Cholesky inverse in float32 (half inv's time)."""
    a = knn_graph(x).to_dense().mul_(-alpha)
    a.diagonal().add_(1.0)
    return torch.cholesky_inverse(torch.linalg.cholesky(a))


def _graph(x: torch.Tensor, budget: int, labelled: list[int], g: torch.Generator) -> list[int]:
    """Facility location under diffusion_kernel(x); above GRAPH_ROWS images, over the labelled
    images and a draw (with `g`) of the others, so the kernel stays at most GRAPH_ROWS squared."""
    rows = torch.arange(len(x))
    if len(x) > GRAPH_ROWS:
        drawn = _draw(len(x), labelled, max(GRAPH_ROWS - len(labelled), budget), g)
        rows = torch.cat([torch.tensor(labelled, dtype=torch.long), drawn])
    z = diffusion_kernel(x[rows])
    held = labelled if len(rows) == len(x) else list(range(len(labelled)))  # the labelled images' rows in z
    return rows[facility_location(lambda r: z[r], len(rows), budget, held)].tolist()


def facility_location(similarity, n: int, budget: int, labelled: list[int]) -> list[int]:
    """Greedy facility location: each step takes the row whose similarities (`similarity(rows)`:
    (len(rows), n), non-negative) most raise the sum over all n of each one's best similarity to a
    pick; labelled rows count as picks. The objective is submodular, so a gain only falls as picks
    are added: lazy greedy re-scores only the GREEDY_BATCH rows whose stale gains are the largest,
    and takes the best of them when its fresh gain is still the largest of all."""
    best = torch.zeros(n)  # each row's similarity to its most similar pick
    for c in torch.tensor(labelled, dtype=torch.long).split(CHUNK) if labelled else ():
        best = torch.maximum(best, similarity(c).max(0).values)
    gain = torch.cat([(similarity(c) - best).clamp(min=0).sum(1) for c in torch.arange(n).split(CHUNK)])
    gain[labelled] = -float("inf")
    picks = []
    while len(picks) < budget:
        top = gain.topk(min(GREEDY_BATCH, n - len(labelled) - len(picks))).indices
        rows = similarity(top)
        gain[top] = (rows - best).clamp(min=0).sum(1)
        j = int(gain[top].argmax())
        if gain[top[j]] < gain.max():
            continue  # every fresh gain fell below a stale one: score the new largest next
        picks.append(int(top[j]))
        best = torch.maximum(best, rows[j])
        gain[top[j]] = -float("inf")
    return picks


def _coverage(x: torch.Tensor, budget: int, labelled: list[int], g: torch.Generator) -> list[int]:
    _, assign = kmeans(x, max(2, budget), g)
    # a ball is pure while its radius is under the distance to the nearest image of another cluster
    other = torch.cat([torch.cdist(c, x).masked_fill(a[:, None] == assign[None], float("inf")).min(1).values
                       for c, a in zip(x.split(CHUNK), assign.split(CHUNK))])
    delta = float(torch.quantile(other[torch.isfinite(other)], 1 - PURITY)) if torch.isfinite(other).any() else 1.0
    balls = [row.nonzero().flatten() for c in x.split(CHUNK) for row in torch.cdist(c, x) < delta]
    gain = torch.tensor([len(b) for b in balls])  # the images in each ball that no chosen ball holds
    covered = torch.zeros(len(x), dtype=torch.bool)
    taken = torch.zeros(len(x), dtype=torch.bool)

    def take(i: int) -> None:
        taken[i] = True
        for u in balls[i][~covered[balls[i]]].tolist():
            covered[u] = True
            gain[balls[u]] -= 1  # the balls are symmetric: those that hold u are u's own neighbours

    for i in labelled:
        take(i)
    picks = []
    order = torch.randperm(len(x), generator=g)  # once every image is covered: the rest at random
    while len(picks) < budget:
        free = gain.masked_fill(taken, -1)
        i = int(free.argmax()) if free.max() > 0 else int(order[~taken[order]][0])
        take(i)
        picks.append(i)
    return picks


def read_paths(path: str | Path, what: str, label: bool = False) -> list[tuple[str, str]]:
    """(path, label) rows of a CSV with a path column (and a label column when `label`): picks.csv
    or labels.csv. Rows with an empty label are left out (an image the user did not label)."""
    path = Path(path)
    if not path.is_file():
        raise EdgesslError(f"{what} {path}: no such file")
    need = ("path", "label") if label else ("path",)
    try:
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            if reader.fieldnames is None or any(c not in reader.fieldnames for c in need):
                found = ", ".join(reader.fieldnames or []) or "nothing"
                raise EdgesslError(f"{what} {path} is not a CSV with the columns {' and '.join(need)} (found: {found})")
            rows = [((r["path"] or "").strip(), (r.get("label") or "").strip()) for r in reader]
    except (UnicodeDecodeError, csv.Error) as e:
        raise EdgesslError(f"{what} {path} is not a CSV file ({e})") from None
    return [(p, lab) for p, lab in rows if p and (lab or not label)]


def rows_of(paths: Sequence[str], names: list[str], root: Optional[Path], what: str) -> list[int]:
    """The row of each path (relative to `root`, or absolute inside it) among `names`."""
    index = {n: i for i, n in enumerate(names)}
    out = []
    for name in paths:
        rel = name
        if root is not None and Path(name).is_absolute():
            try:
                rel = str(Path(name).resolve().relative_to(root.resolve()))
            except ValueError:
                pass
        if rel not in index:
            where = f"under {root}" if root is not None else "(array data: rows are numbered from 0)"
            raise EdgesslError(f"{what}: {name!r} is not one of the run's training images {where}")
        out.append(index[rel])
    return out


def select(run_dir: str | Path, budget: int, out: Optional[str | Path] = None, data: Optional[str] = None,
           exclude: Optional[str | Path] = None, rule: str = DEFAULT_RULE, seed: int = 0) -> dict:
    """Pick `budget` images of the run's training images (or of `data`) to label first; with `out`,
    write OUT.csv (rank, path) and the labelling page OUT.html beside it. Where the images came
    with labels, result["known_labels"] holds the picks' (for measuring a rule, not for the page)."""
    if out is not None and Path(out).suffix != ".csv":
        raise EdgesslError(f"--out must end in .csv, got {Path(out).name}")
    if out is not None and not Path(out).parent.is_dir():
        raise EdgesslError(f"folder {Path(out).parent} does not exist")
    start = time.perf_counter()
    p = pool(run_dir, data)
    done = rows_of([q for q, _ in read_paths(exclude, "--exclude")], p.names, p.root, f"--exclude {exclude}") \
        if exclude else []
    embedded = time.perf_counter()
    picks = pick(p.features, budget, rule, done, seed)
    result = {"picks": [p.names[i] for i in picks], "rule": rule, "seed": seed, "pool": len(p.names),
              "excluded": len(done), "features_cached": p.cached, "embed_seconds": round(embedded - start, 2),
              "select_seconds": round(time.perf_counter() - embedded, 2)}
    if p.data.labels is not None:  # images that came labelled (a benchmark's picks, scored against them)
        result["known_labels"] = [p.data.classes[int(p.data.labels[i])] for i in picks]
    if out is not None:
        from edgessl.labelpage import write_page

        out = Path(out)
        lines = ["rank,path"] + [f"{r},{_csv_cell(name)}" for r, name in enumerate(result["picks"], 1)]
        atomic_write(out, "\n".join(lines) + "\n")
        result.update(csv=str(out), page=str(write_page(p, picks, out.with_suffix(".html"))))
    return result


def _csv_cell(text: str) -> str:
    return '"' + text.replace('"', '""') + '"' if any(c in text for c in ',"\n\r') else text
