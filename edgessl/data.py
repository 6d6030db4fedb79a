"""Dataset specs -> uint8 image tensors held whole in memory (airbench's data path).

A spec names where images come from:

    npz:PATH[?x=KEY&y=KEY]   uint8 NHWC / NHW array (+ optional labels)
    cifar10:DIR, cifar100:DIR the python-pickle release, read without running pickle code
    fashion-mnist[:DIR]       gzip IDX (default: Debian's dataset-fashion-mnist folder)
    folder:DIR                image files (one subfolder per class, optional), decoded
                              once at the image size into a uint8 .npy cache on disk,
                              with a JSON manifest (files, sizes, mtimes)

Every loader returns an `ImageData` whose row i is instance i: the memory bank is
indexed by that position, so no loader ever skips or substitutes an image.

A folder larger than memory is not read into RAM: its cache is memory-mapped
(`MappedImages`) and each batch gathers its rows from the page cache, as nanoGPT reads
its token file. storage="auto" maps a cache larger than a quarter of physical memory.
"""
from __future__ import annotations

import gzip
import hashlib
import os
import pickle
import struct
import sys
import urllib.parse
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from edgessl.config import FITS, PLAIN_FIT
from edgessl.cache import folder_cache
from edgessl.errors import EdgesslError
from edgessl_edge.image import IMAGE_SUFFIXES, decode_rows  # the runtime's decoder: one implementation

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_CLASSES = ["t-shirt/top", "trouser", "pullover", "dress", "coat",
                         "sandal", "shirt", "sneaker", "bag", "ankle boot"]
FOLDER_DEFAULT_SIZE = 64  # a folder loaded without a size (probe's pixels and random: sources, no --image-size)
DECODE_CHUNK = 256  # files per decoding job
PARALLEL_FROM = 2048  # folders this large are decoded on every core (smaller: the start-up costs more)


class MappedImages:
    """A memory-mapped (N, H, W, 3) uint8 cache seen as (N, 3, H, W), rows gathered on demand.

    Supports what the data path uses of a uint8 tensor: shape, len, indexing by an int, a
    slice or an index tensor (the batch lands on the index's device), split into chunks,
    subset (a view of some rows, nothing read) and to(device) (a no-op: the rows stay on
    disk until a batch asks for them)."""

    def __init__(self, array: np.ndarray, rows: Optional[np.ndarray] = None):
        self.array, self.rows = array, rows
        n = len(rows) if rows is not None else array.shape[0]
        self.shape = torch.Size((n, array.shape[3], array.shape[1], array.shape[2]))
        self.dtype = torch.uint8

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, idx) -> torch.Tensor:
        device = idx.device if isinstance(idx, torch.Tensor) else torch.device("cpu")
        if isinstance(idx, torch.Tensor):
            idx = idx.cpu().numpy()
        elif isinstance(idx, slice):
            idx = np.arange(len(self))[idx]
        idx = np.asarray(idx, dtype=np.int64)
        if idx.size and (idx.min() < -len(self) or idx.max() >= len(self)):
            raise IndexError(f"index out of range for {len(self)} images")
        rows = self.rows[idx] if self.rows is not None else idx % len(self)
        order = np.argsort(rows, axis=None, kind="stable")  # read the file front to back
        out = np.empty((rows.size,) + self.array.shape[1:], dtype=np.uint8)
        out[order] = self.array[rows.reshape(-1)[order]]
        batch = torch.from_numpy(out.reshape(rows.shape + self.array.shape[1:]))
        return batch.movedim(-1, -3).contiguous().to(device)

    def split(self, size: int):
        return (self[i:i + size] for i in range(0, len(self), size))

    def subset(self, index) -> "MappedImages":
        index = index.cpu().numpy() if isinstance(index, torch.Tensor) else np.asarray(index)
        return MappedImages(self.array, self.rows[index] if self.rows is not None else index)

    def to(self, device) -> "MappedImages":
        return self


@dataclass
class ImageData:
    images: torch.Tensor  # (N, 3, H, W) uint8, or MappedImages for a memory-mapped folder cache
    labels: Optional[torch.Tensor]  # (N,) int64, or None when unlabelled
    classes: list[str]
    spec: str
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (file, reason) left out
    files: Optional[list[str]] = None  # folder specs: row i's file, relative to the folder
    source_identity: Optional[dict] = field(default=None, repr=False, compare=False)  # identity() of what
    # this set was split from (load_split): what a checkpoint records of the run's data

    def __len__(self) -> int:
        return self.images.shape[0]

    def subset(self, index: torch.Tensor) -> "ImageData":
        labels = self.labels[index] if self.labels is not None else None
        images = self.images.subset(index) if self.mapped else self.images[index]
        files = [self.files[i] for i in index.tolist()] if self.files is not None else None
        return ImageData(images, labels, self.classes, self.spec, self.skipped, files, self.source_identity)

    @property
    def mapped(self) -> bool:
        return isinstance(self.images, MappedImages)

    def to(self, device) -> "ImageData":
        labels = self.labels.to(device) if self.labels is not None else None
        return ImageData(self.images.to(device), labels, self.classes, self.spec, self.skipped, self.files,
                         self.source_identity)


def load(spec: str, image_size: Optional[int] = None, bad_images: str = "fail", storage: str = "auto",
         fit: str = PLAIN_FIT) -> ImageData:
    """Decode a dataset spec once into an ImageData on the CPU, size x size by `fit` (squash |
    crop: edgessl_edge.image; arrays of another size are resized by the same rule).

    bad_images (folder specs): "fail" raises one error listing every file that cannot be
    used and why; "skip" leaves them out and lists them in ImageData.skipped.
    storage (folder specs): "memory" reads the cache into RAM, "mmap" maps it, "auto" maps
    it when it is larger than a quarter of physical memory."""
    kind, sep, rest = spec.partition(":")
    if not sep and "?" in kind:  # fashion-mnist?split=test: options without a path
        kind, rest = kind.split("?", 1)[0], "?" + kind.split("?", 1)[1]
    loaders = {"npz": _load_npz, "cifar10": _load_cifar, "cifar100": _load_cifar,
               "fashion-mnist": _load_fashion_mnist, "folder": _load_folder}
    if kind not in loaders:
        raise EdgesslError(f"malformed dataset spec {spec!r}: expected one of "
                           "npz:PATH, cifar10:DIR, cifar100:DIR, fashion-mnist[:DIR], folder:DIR")
    if not rest and kind != "fashion-mnist":
        raise EdgesslError(f"malformed dataset spec {spec!r}: {kind}: needs a path")
    skipped: list[tuple[str, str]] = []
    files = None
    if kind == "folder":
        images, labels, classes, skipped, files = _load_folder(rest, image_size, bad_images, storage, fit)
    else:
        images, labels, classes = loaders[kind](kind, rest, image_size)
    if images.shape[1] == 1:  # grayscale replicated to 3 channels: the stock RGB stem stays
        images = images.expand(-1, 3, -1, -1)
    size = image_size or max(images.shape[-2:])
    if images.shape[-2:] != (size, size):
        images = _resize(images, size, fit)
    if not isinstance(images, MappedImages):
        images = images.contiguous()
    if labels is not None:
        labels = torch.as_tensor(np.asarray(labels).astype(np.int64).reshape(-1))
        if labels.shape[0] != images.shape[0]:
            raise EdgesslError(f"dataset {spec!r}: {images.shape[0]} images but {labels.shape[0]} labels")
        if not classes:
            classes = [str(c) for c in range(int(labels.max()) + 1)] if len(labels) else []
    if images.shape[0] == 0:
        raise EdgesslError(f"dataset {spec!r} holds no images")
    return ImageData(images, labels, list(classes), spec, skipped, files)


def load_split(cfg) -> tuple[ImageData, Optional[ImageData]]:
    """The (train, held-out) images a DataConfig describes: `spec`, then `val_spec` or a seeded
    `val_fraction` of it, then an optional fixed `train_subset` of the train split."""
    if not cfg.spec:
        raise EdgesslError("no training data: give a dataset spec (--data npz:PATH, folder:DIR, ...)")
    if cfg.fit not in FITS:  # the recipe (edgessl.recipe) resolves it before anything loads
        raise ValueError(f"data.fit {cfg.fit!r} is not resolved: the recipe picks it before loading")
    fit = cfg.fit
    if cfg.download:
        download(cfg.spec)
    size = None if cfg.image_size == "auto" else cfg.image_size  # an array's own size until the recipe picks
    train = load(cfg.spec, size, cfg.bad_images, cfg.storage, fit)
    train.source_identity = identity(train)
    val = None
    if cfg.val_spec:
        val = load(cfg.val_spec, train.images.shape[-1], cfg.bad_images, cfg.storage, fit)
        val.source_identity = identity(val)
    elif cfg.val_fraction > 0:
        train, val = split(train, cfg.val_fraction, cfg.split_seed)
    n = cfg.train_subset
    if n is not None:
        if not 1 <= n <= len(train):
            raise EdgesslError(f"data.train_subset {n} is not between 1 and the {len(train)} training images")
        train = train.subset(torch.randperm(len(train), generator=torch.Generator().manual_seed(
            cfg.split_seed))[:n].sort().values)
    return train, val


# what --download fetches through torchvision, and a file that shows a folder already holds it
DOWNLOADS = {"cifar10": ("CIFAR10", "cifar-10-batches-py/data_batch_1"),
             "cifar100": ("CIFAR100", "cifar-100-python/train"),
             "fashion-mnist": ("FashionMNIST", "FashionMNIST/raw/train-images-idx3-ubyte.gz")}


def download(spec: str) -> None:
    """cifar10:DIR, cifar100:DIR, fashion-mnist:DIR: fetch the data set into DIR through
    torchvision (its progress bar on stderr) unless DIR holds it already."""
    kind, _, rest = spec.partition(":")
    root = Path(os.path.expanduser(rest.partition("?")[0])) if rest else None
    if kind not in DOWNLOADS or root is None:
        raise EdgesslError(f"--download fetches cifar10:DIR, cifar100:DIR or fashion-mnist:DIR, not {spec!r}")
    name, marker = DOWNLOADS[kind]
    if (root / marker).exists() or (root / Path(marker).name).exists():
        return
    import torchvision.datasets

    try:
        getattr(torchvision.datasets, name)(str(root), train=True, download=True)
    except Exception as e:  # no network, a proxy, a full disk: one line, and what else to pass
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise EdgesslError(f"{spec}: the download failed ({first[:200]}); give a folder that holds the data "
                           f"({kind}:DIR), or other images (folder:DIR, npz:PATH)") from None


def identity(data: ImageData) -> dict:
    """What a checkpoint records of the images its bank rows stand for: the count, a short hash
    of each row's decoded pixels in row order, and for a folder each row's file."""
    rows = [hashlib.blake2b(row.tobytes(), digest_size=8).hexdigest()
            for chunk in data.images.split(1024) for row in chunk.contiguous().numpy()]
    return {"count": len(data), "rows": rows, "files": list(data.files) if data.files is not None else None}


def check_identity(stored: Optional[dict], data: ImageData, what: str) -> None:
    """Refuse, naming the change, when `data` (or what it was split from) is not row for row the
    images `stored` describes (row i of a memory bank is image i: a silent change of order
    would corrupt the run)."""
    if stored is None:  # a checkpoint written before identities were recorded
        return
    now = data.source_identity or identity(data)
    if now["rows"] == stored["rows"]:
        return
    raise EdgesslError(f"{what}: the images changed since the checkpoint ({describe_change(stored, now)}); "
                       "the run's bank and splits no longer line up with them")


def describe_change(old: dict, new: dict, most: int = 3) -> str:
    def names(xs):
        xs = sorted(xs)
        return ", ".join(xs[:most]) + (f" and {len(xs) - most} more" if len(xs) > most else "")

    parts = [f"{old['count']} images then, {new['count']} now"] if old["count"] != new["count"] else []
    if old.get("files") is not None and new.get("files") is not None:
        before, after = dict(zip(old["files"], old["rows"])), dict(zip(new["files"], new["rows"]))
        added, removed = set(after) - set(before), set(before) - set(after)
        edited = {f for f in set(before) & set(after) if before[f] != after[f]}
        gone = {before[r]: r for r in removed}  # pixels of the removed files -> their old names
        renamed = {f for f in added if after[f] in gone}
        removed -= {gone[after[f]] for f in renamed}
        for label, group in (("renamed to", renamed), ("added", added - renamed), ("removed", removed),
                             ("edited", edited)):
            if group:
                parts.append(f"{len(group)} {label}: {names(group)}")
        if not (added or removed or edited):
            parts.append("the same files in another order")
    elif sorted(old["rows"]) == sorted(new["rows"]):
        parts.append("the same images in another order")
    else:
        differ = sum(a != b for a, b in zip(old["rows"], new["rows"]))
        parts.append(f"{differ} of the first {min(old['count'], new['count'])} images differ")
    return "; ".join(parts)


def split(data: ImageData, val_fraction: float, seed: int) -> tuple[ImageData, ImageData]:
    """Hold out a fixed, seeded fraction (its own seed: the split does not move with the run's)."""
    n_val = int(round(len(data) * val_fraction))
    if n_val < 1 or n_val >= len(data):
        raise EdgesslError(f"val_fraction {val_fraction} leaves no train or no val images out of {len(data)}")
    perm = torch.randperm(len(data), generator=torch.Generator().manual_seed(seed))
    return data.subset(perm[:-n_val].sort().values), data.subset(perm[-n_val:].sort().values)


def absolute(spec: Optional[str]) -> Optional[str]:
    """`spec` with its path made absolute, as a run stores it: the run then reads the same images
    from any working directory (a spec without a path, or none, is returned as it is)."""
    kind, sep, rest = (spec or "").partition(":")
    path, q, query = rest.partition("?")
    if not sep or not path:
        return spec
    return f"{kind}:{os.path.abspath(os.path.expanduser(path))}{q}{query}"


def folder_root(spec: str) -> Optional[Path]:
    """The folder a folder:DIR spec names, what its files' paths are relative to (None for other specs)."""
    kind, _, rest = spec.partition(":")
    return Path(os.path.expanduser(rest)) if kind == "folder" else None


def _path(p: str, spec_kind: str) -> Path:
    path = Path(os.path.expanduser(p))
    if not path.exists():
        hint = " (--download fetches it)" if spec_kind in DOWNLOADS else ""
        raise EdgesslError(f"{spec_kind}: path not found: {path}{hint}")
    return path


def _load_npz(kind, rest, image_size):
    path_s, _, query = rest.partition("?")
    names = dict(urllib.parse.parse_qsl(query))
    unknown = set(names) - {"x", "y"}
    if unknown:
        raise EdgesslError(f"malformed dataset spec npz:{rest}: unknown option(s) {', '.join(sorted(unknown))} "
                           "(known: x, y)")
    path = _path(path_s, "npz")
    try:
        with np.load(path, allow_pickle=False) as f:  # no pickle: an .npz cannot run code
            keys = list(f.keys())
            xk = names.get("x") or next((k for k in ("x", "images", "x_train", "x_test") if k in keys), None)
            if xk is None or xk not in keys:
                raise EdgesslError(f"{path}: no images array (looked for {names.get('x') or 'x, images, x_train, x_test'}; "
                                   f"found {', '.join(keys) or 'nothing'})")
            pair = {"x": "y", "images": "labels", "x_train": "y_train", "x_test": "y_test"}
            yk = names.get("y") or pair.get(xk)
            if names.get("y") and yk not in keys:
                raise EdgesslError(f"{path}: no labels array {yk!r} (found {', '.join(keys)})")
            images = f[xk]
            labels = f[yk] if yk in keys else None
            classes = [str(c) for c in f["classes"]] if "classes" in keys else []
    except EdgesslError:
        raise
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
        raise EdgesslError(f"{path}: not a readable .npz file ({e})") from None
    if images.dtype != np.uint8:
        raise EdgesslError(f"{path}: images array {xk!r} must be uint8, got {images.dtype}")
    if images.ndim == 3:
        images = images[..., None]
    if images.ndim != 4 or images.shape[-1] not in (1, 3):
        raise EdgesslError(f"{path}: images array {xk!r} must be NHWC (C=1 or 3) or NHW, got shape {images.shape}")
    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2), labels, classes


class _ArraysOnlyUnpickler(pickle.Unpickler):
    """Unpickles dicts/lists/bytes/numpy arrays; any other global (os.system ...) is refused."""

    _ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
                ("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "scalar"),
                ("numpy._core.multiarray", "scalar"), ("_codecs", "encode")}

    def find_class(self, module, name):
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load global {module}.{name}")


def _unpickle(path: Path) -> dict:
    try:
        with open(path, "rb") as f:
            return _ArraysOnlyUnpickler(f, encoding="latin1").load()
    except (pickle.UnpicklingError, EOFError, OSError, ValueError, TypeError) as e:
        raise EdgesslError(f"{path}: not a CIFAR python-pickle batch ({e})") from None


def _split_query(kind, rest) -> tuple[str, str]:
    path_s, _, query = rest.partition("?")
    opts = dict(urllib.parse.parse_qsl(query))
    which = opts.pop("split", "train")
    if opts or which not in ("train", "test"):
        raise EdgesslError(f"malformed dataset spec {kind}:{rest}: the only option is split=train|test")
    return path_s, which


def _load_cifar(kind, rest, image_size):
    """cifar10:DIR[?split=test] or cifar100:DIR[?split=test]."""
    path_s, which = _split_query(kind, rest)
    root = _path(path_s, kind)
    sub = Path(DOWNLOADS[kind][1]).parent
    if (root / sub).is_dir():
        root = root / sub
    if kind == "cifar10":
        files = sorted(root.glob("data_batch_*")) if which == "train" else [root / "test_batch"]
        meta, label_key, names_key = root / "batches.meta", "labels", "label_names"
    else:
        files = [root / which]
        meta, label_key, names_key = root / "meta", "fine_labels", "fine_label_names"
    if not files or not all(f.exists() for f in files):
        raise EdgesslError(f"{kind}: no batch files in {root} (--download fetches them)")
    xs, ys = [], []
    for f in files:
        d = _unpickle(f)
        xs.append(np.asarray(d["data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
        ys.append(np.asarray(d[label_key]))
    classes = [str(c) for c in _unpickle(meta)[names_key]] if meta.exists() else []
    return torch.from_numpy(np.concatenate(xs)), np.concatenate(ys), classes


def _read_idx(path: Path) -> np.ndarray:
    try:
        with gzip.open(path, "rb") as f:
            raw = f.read()
        zero, dtype_code, ndim = struct.unpack(">HBB", raw[:4])
        if zero != 0 or dtype_code != 0x08:
            raise ValueError("not a uint8 IDX file")
        dims = struct.unpack(f">{ndim}I", raw[4:4 + 4 * ndim])
        return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)
    except (OSError, ValueError, struct.error, EOFError) as e:
        raise EdgesslError(f"{path}: not a gzip IDX file ({e})") from None


def _load_fashion_mnist(kind, rest, image_size):
    """fashion-mnist[:DIR][?split=train|test]."""
    dir_s, which = _split_query(kind, rest)
    root = _path(dir_s or FASHION_MNIST_DIR, "fashion-mnist")
    if (root / "FashionMNIST" / "raw").is_dir():  # where torchvision downloads it
        root = root / "FashionMNIST" / "raw"
    prefix = "train" if which == "train" else "t10k"
    images = _read_idx(root / f"{prefix}-images-idx3-ubyte.gz")
    labels = _read_idx(root / f"{prefix}-labels-idx1-ubyte.gz")
    return torch.from_numpy(images.copy())[:, None], labels, FASHION_MNIST_CLASSES


def _load_folder(rest: str, image_size: Optional[int], bad_images: str, storage: str, fit: str):
    """Image files under DIR (labels from first-level subfolders when every file has one).

    Every file is decoded and checked before anything trains; a broken file is never
    replaced by another (the bank is indexed by image). The decoded images live in a
    cache keyed by the listing (relative path, size, mtime of every file, and the image
    size), so a changed folder builds a new one."""
    root = _path(rest, "folder")
    if not root.is_dir():
        raise EdgesslError(f"folder: {root} is not a directory")
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not files:
        raise EdgesslError(f"folder: no image files under {root}")
    size = image_size or FOLDER_DEFAULT_SIZE
    listing = [(str(p.relative_to(root)), st.st_size, st.st_mtime_ns) for p in files for st in [p.stat()]]
    cache, manifest = folder_cache(root, listing, size, lambda tmp: _decode_into(tmp, files, listing, size, fit), fit)
    skipped = [(str(root / f), why) for f, why in manifest["skipped"]]
    if skipped and bad_images == "fail":
        listing_s = "\n".join(f"  {printable(f)}: {why}" for f, why in skipped)
        raise EdgesslError(f"{len(skipped)} of {len(files)} images under {root} cannot be used "
                           f"(--bad-images skip trains on the rest):\n{listing_s}")
    if manifest["count"] == 0:
        raise EdgesslError(f"folder: none of the {len(files)} images under {root} can be used")
    array = np.load(cache, mmap_mode="r", allow_pickle=False)[:manifest["count"]]  # (N, H, W, 3)
    if storage == "mmap" or storage == "auto" and array.nbytes > _physical_memory() // 4:
        images = MappedImages(array)
    else:
        images = torch.from_numpy(np.array(array)).permute(0, 3, 1, 2)  # read into RAM (a copy, writable)
    bad = {f for f, _ in manifest["skipped"]}
    parts = [Path(f).parts for f, _, _ in listing if f not in bad]
    classes = sorted({q[0] for q in parts if len(q) > 1}) if all(len(q) > 1 for q in parts) else []
    labels = np.array([classes.index(q[0]) for q in parts]) if classes else None
    return images, labels, classes, skipped, [f for f, _, _ in listing if f not in bad]


def _decode_into(tmp: Path, files: list[Path], listing: list, size: int, fit: str) -> tuple[int, list]:
    """Decode every file straight into an on-disk .npy (never the whole set in RAM), on every
    core for a large folder: (count, skipped). Rows keep the listing's order; the rows of files
    that cannot be used are squeezed out afterwards."""
    from tqdm import tqdm

    out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=(len(files), size, size, 3))
    del out
    chunks = [range(i, min(i + DECODE_CHUNK, len(files))) for i in range(0, len(files), DECODE_CHUNK)]
    workers = min(len(chunks), os.cpu_count() or 1) if len(files) >= PARALLEL_FROM else 1
    show = sys.stderr.isatty() and len(files) >= PARALLEL_FROM
    bad: dict[int, str] = {}
    with tqdm(total=len(files), disable=not show, unit="img", desc="decoding", leave=False) as bar:
        if workers == 1:
            for rows in chunks:
                bad.update(decode_rows(str(tmp), [str(files[r]) for r in rows], rows.start, size, fit))
                bar.update(len(rows))
        else:
            import multiprocessing
            from concurrent.futures import ProcessPoolExecutor

            # fork where there is one: workers run Pillow and numpy only (no OpenMP, safe after a fork);
            # spawn would re-import the caller's main module (torch) in every worker
            method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
            with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context(method)) as pool:
                jobs = [pool.submit(decode_rows, str(tmp), [str(files[r]) for r in rows], rows.start, size, fit)
                        for rows in chunks]
                for job, rows in zip(jobs, chunks):
                    bad.update(job.result())
                    bar.update(len(rows))
    arr = np.load(tmp, mmap_mode="r+")
    count = 0
    for i in range(len(files)):  # squeeze out the bad rows, in order (nothing moves when none is bad)
        if i in bad:
            continue
        if count != i:
            arr[count] = arr[i]
        count += 1
    arr.flush()
    del arr
    return count, [(listing[i][0], bad[i]) for i in sorted(bad)]


def printable(name: str) -> str:
    """A file name as text that can be printed: bytes that are not UTF-8 shown as U+FFFD."""
    return name.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


def _physical_memory() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 8 << 30


def _resize(images: torch.Tensor, size: int, fit: str) -> torch.Tensor:
    """Antialiased bilinear resize by `fit` (crop: the centre square first), in chunks (uint8 in, uint8 out)."""
    import torch.nn.functional as F

    if fit == "crop":
        h, w = images.shape[-2:]
        s = min(h, w)
        images = images[..., (h - s) // 2:(h - s) // 2 + s, (w - s) // 2:(w - s) // 2 + s]
    out = []
    for chunk in images.split(1024):
        x = F.interpolate(chunk.float(), size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        out.append(x.round_().clamp_(0, 255).to(torch.uint8))
    return torch.cat(out)


def describe(data: ImageData) -> str:
    n, c, h, w = data.images.shape
    lab = f", {len(data.classes)} classes" if data.labels is not None else ", unlabelled"
    mapped = ", memory-mapped" if data.mapped else ""
    return f"{n} images {h}x{w}{lab}{mapped} ({data.spec})"
