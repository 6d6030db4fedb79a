"""The Python API: what the CLI calls, one path for both.

    import edgessl
    run = edgessl.pretrain(data="folder:photos", out="runs/r1", backbone="mobilenetv3", minutes=15)
    run.export("model.onnx", precision="int8")     # the export report (dict)
    run.probe(train="folder:labelled", test="folder:test")
    feats = run.embed("folder:photos")             # (N, d) numpy, rows in the data's order
    clf = edgessl.finetune(run, labels_per_class=10, out="runs/ft")  # unlabelled="auto": + the run's other images
    run.select(budget=50, out="picks.csv")         # the photos to label first, and a page to label them in
    clf = edgessl.finetune(run, labels="labels.csv", out="runs/ft2")  # the page's download
    run = edgessl.Run("runs/r1")                   # open an existing run
    edgessl.check("model.onnx", against=run.path)  # parity and latency through onnxruntime
    edgessl.api.probe("model.onnx", train=..., test=...), edgessl.api.embed("pixels", data=...)  # any source

Every command of the CLI is a call here with the CLI's option names as keywords and the same
input checks (one EdgesslError line); the CLI's defaults are these signatures' defaults.
Config overrides are keywords: a section as a dict (`method={"temperature": 0.1}`), a dotted
key (`**{"optim.lr": 0.01}`), or a shortcut (`backbone`, `method`, `minutes`, `epochs`, ...;
SHORTCUTS). Errors are the EdgesslError the CLI prints.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from edgessl import config as config_lib
from edgessl.config import Config
from edgessl.errors import ConfigError, EdgesslError
from edgessl.methods import METHODS
from edgessl.runfiles import run_lock

# shortcut keyword (a flag's name: --val-data -> val_data) -> (section, key), from the declarations in config.py
SHORTCUTS = {config_lib.shortcut(f): tuple(key.split(".")) for key, f in config_lib.flagged().items()}


def nest(overrides: dict) -> dict:
    """Shortcuts, dotted keys and section dicts -> one nested overrides dict."""
    nested: dict = {}
    for key, value in overrides.items():
        if key in SHORTCUTS and not isinstance(value, dict):
            section, name = SHORTCUTS[key]
        elif "." in key:
            section, _, name = key.partition(".")
        elif key in config_lib.to_sections():
            if not isinstance(value, dict):
                raise ConfigError(f"config section '{key}' must be a mapping, got {value!r}")
            for name, v in value.items():
                nested.setdefault(key, {})[name] = v
            continue
        else:
            raise ConfigError(f"unknown config key '{key}' (sections: {', '.join(config_lib.to_sections())}; "
                              f"shortcuts: {', '.join(SHORTCUTS)})")
        nested.setdefault(section, {})[name] = value
    return nested


def resolve_config(out: str | Path, config: Optional[str | Path | dict] = None, resume: bool = False,
                   **overrides) -> Config:
    """The run's config: stored (resume) or the defaults, the method's preset, a YAML recipe (or
    dict), then the overrides. A minute budget without an epoch count fits the schedule to it."""
    from edgessl.rebuild import read_state, run_config

    given = nest(overrides)
    if resume:
        if config is not None:
            raise EdgesslError("--resume uses the run's stored config; drop --config")
        return config_lib.from_dict(given, run_config(read_state(out)))
    recipe = config if isinstance(config, dict) else config_lib.load_yaml(config) if config else {}
    name = given.get("method", {}).get("name") or recipe.get("method", {}).get("name", "memdistill")
    if name not in METHODS:
        raise EdgesslError(f"unknown method {name!r} (known: {', '.join(METHODS)})")
    _method_owns(name, recipe, given)
    cfg = config_lib.from_dict({"method": {"name": name, **METHODS[name].preset}})
    config_lib.from_dict(recipe, cfg)
    if "minutes" in given.get("optim", {}) and "epochs" not in given.get("optim", {}):
        given["optim"]["epochs"] = None  # the schedule is fitted to the minute budget
    return config_lib.from_dict(given, cfg)


def _method_owns(name: str, *layers: dict) -> None:
    """Each method owns its settings: one the method does not read is refused for it, with its flag."""
    owned = METHODS[name].settings
    flags = {k.split(".")[1]: f.metadata["flag"] for k, f in config_lib.flagged().items() if k.startswith("method.")}
    for layer in layers:
        for key in layer.get("method") or {}:
            if key != "name" and key not in owned:
                shown = f"{flags[key]} (method.{key})" if key in flags else f"method.{key}"
                raise ConfigError(f"{shown} is not a setting of {name} (its settings: {', '.join(owned) or 'none'})")


class Run:
    """A run directory (`edgessl pretrain` or `edgessl finetune`), opened from its checkpoint."""

    def __init__(self, path: str | Path, summary: Optional[dict] = None):
        from edgessl.rebuild import read_state

        self.path = Path(path)
        self._state = read_state(self.path)
        self.summary = summary  # what the training call that made it returned, if this process made it

    def __repr__(self) -> str:
        return f"edgessl.Run({str(self.path)!r}, {self.kind})"

    @property
    def kind(self) -> str:
        return "classifier" if self._state.get("kind") == "classifier" else "pretraining"

    @property
    def config(self) -> Config:
        from edgessl.rebuild import run_config

        return run_config(self._state)

    def export(self, out: str | Path, format: str = "onnx", precision: str = "fp32", calib: Optional[str] = None,
               calib_count: int = 256, batch: str | int = "dynamic", opset: int = 18, with_head: bool = False,
               adapt: Optional[bool] = None, adapt_seconds: float = config_lib.ADAPT_SECONDS) -> dict:
        """`edgessl export RUN --out OUT --format FORMAT`: a file for that runtime (onnx, openvino,
        litert, executorch), checked in it, or with format="timm" a folder of timm weights; the
        report. The keywords are the CLI's option names."""
        from edgessl import exporter as export_lib

        _one_of(format, (*config_lib.FORMATS, "timm"), "--format")
        _one_of(precision, config_lib.PRECISIONS, "--precision")
        batch = _batch(batch)
        _positive(calib_count, "--calib-count")
        _positive(adapt_seconds, "--adapt-seconds")
        with run_lock(self.path, shared=True):
            if format == "timm":
                return export_lib.export_timm(self.path, out)
            return export_lib.export_model(self.path, out, precision, calib, calib_count, batch, opset, with_head,
                                           adapt=adapt, adapt_seconds=adapt_seconds, fmt=format)

    def benchmark(self, formats: str | Sequence[str] = ",".join(config_lib.FORMATS),
                  precisions: str | Sequence[str] = ",".join(config_lib.PRECISIONS),
                  adapt_seconds: float = config_lib.ADAPT_SECONDS, both_int8: bool = False,
                  progress: Optional[bool] = None) -> list[dict]:
        """`edgessl benchmark RUN`: every runtime x precision, checked and timed; the table's rows
        (also RUN/benchmark.json, the files in RUN/benchmark/)."""
        from edgessl.benchmark import benchmark

        fmts, precs = _names(formats), _names(precisions)
        bad = [f for f in fmts if f not in config_lib.FORMATS] + [p for p in precs if p not in config_lib.PRECISIONS]
        if bad or not fmts or not precs:
            raise EdgesslError(f"unknown format or precision {', '.join(bad) or '(none given)'} "
                               f"(formats: {', '.join(config_lib.FORMATS)}; "
                               f"precisions: {', '.join(config_lib.PRECISIONS)})")
        _positive(adapt_seconds, "--adapt-seconds")
        with run_lock(self.path, shared=True):
            return benchmark(self.path, fmts, precs, adapt_seconds, progress, both_int8)

    def probe(self, train: Optional[str] = None, test: Optional[str] = None, knn_k: int = config_lib.KNN_K,
              linear: bool = False, grid: Optional[str] = None) -> dict:
        """kNN (and linear) top-1 of the run's frozen backbone features on `train`/`test` specs, or
        with neither on the run's own split (its training images, its held-out ones)."""
        return probe(str(self.path), train, test, knn_k, linear, grid)

    def embed(self, data: Optional[str] = None, progress: Optional[bool] = False) -> np.ndarray:
        """(N, D) backbone features of `data` (default: the run's training data), rows in its order."""
        return embed(str(self.path), data or self.config.data.spec, progress=progress).features

    def select(self, budget: int, out: Optional[str | Path] = None, data: Optional[str] = None,
               exclude: Optional[str | Path] = None, rule: str = config_lib.SELECT_DEFAULT, seed: int = 0) -> dict:
        """`edgessl select RUN --budget N`: the `budget` images to label first, in priority order
        (result["picks"]: paths relative to the data folder); with `out` (a .csv) the picks and
        the labelling page are written. The features are kept in RUN/features/."""
        from edgessl.selection import select

        if isinstance(budget, bool) or not isinstance(budget, int) or budget < 1:
            raise EdgesslError(f"--budget must be a positive integer, got {budget!r}")
        _one_of(rule, config_lib.SELECT_RULES, "--rule")
        with run_lock(self.path, shared=True):
            return select(self.path, budget, out, data, exclude, rule, seed)

    def report(self, out: Optional[str | Path] = None) -> Path:
        """`edgessl report RUN`: the run's self-contained HTML page (default RUN/report.html)."""
        from edgessl.report import write_report

        with run_lock(self.path, shared=True):
            return write_report(self.path, out)


def check(model: str | Path, against: Optional[str | Path] = None, data: Optional[str] = None,
          batch_sizes: str | Sequence[int] = "1,8,32", threads: int = 0, profile: bool = False) -> dict:
    """`edgessl check MODEL.onnx`: parity against a run (`against`) and latency per batch size
    through onnxruntime; with `profile`, the time per operator type. Recorded in the run's exports."""
    from edgessl.check import check as check_file

    if isinstance(batch_sizes, str):
        try:
            batch_sizes = [int(b) for b in batch_sizes.split(",")]
        except ValueError:
            raise EdgesslError(f"--batch-sizes must be integers separated by commas, got {batch_sizes!r}") from None
    if not batch_sizes or any(isinstance(b, bool) or not isinstance(b, int) or b < 1 for b in batch_sizes):
        raise EdgesslError(f"--batch-sizes must be positive integers, got {batch_sizes!r}")
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 0:
        raise EdgesslError(f"--threads must be 0 (the runtime's default) or more, got {threads!r}")
    if against is None:
        return check_file(model, None, data, tuple(batch_sizes), threads or None, profile=profile)
    Run(against)  # a wrong run directory is one line before anything is written
    with run_lock(Path(against), shared=True):
        return check_file(model, str(against), data, tuple(batch_sizes), threads or None, profile=profile)


def probe(source: str | Path, train: Optional[str], test: Optional[str], knn_k: int = config_lib.KNN_K, linear: bool = False,
          grid: Optional[str | Path] = None, image_size: Optional[int] = None, fit: str = config_lib.PLAIN_FIT) -> dict:
    """`edgessl probe SOURCE`: kNN (and linear) top-1 of frozen features; SOURCE is a run
    directory, a .onnx file, random:BACKBONE or pixels. `image_size` and `fit` are for the sources
    that have none of their own (pixels, random:BACKBONE)."""
    from edgessl.probe import probe as probe_features

    if isinstance(knn_k, bool) or not isinstance(knn_k, int) or knn_k < 1:
        raise EdgesslError(f"--knn-k must be at least 1, got {knn_k!r}")
    _one_of(fit, config_lib.FITS, "--fit")
    if (train is None) != (test is None):
        raise EdgesslError("probing needs both --train and --test, or neither for a run's own split")
    return probe_features(str(source), train, test, knn_k, linear, grid, image_size, fit)


def embed(source: str | Path, data: str, out: Optional[str | Path] = None, bad_images: str = "fail",
          progress: Optional[bool] = None):
    """`edgessl embed SOURCE --data SPEC`: the features of every image, in the data's order (an
    edgessl.embed.Embedding: features, ids, files, labels); with `out` (.npy, .npz or .csv)
    also written."""
    import edgessl.embed as embed_lib  # (edgessl.api.embed, not the edgessl.embed module, is the API)

    _one_of(bad_images, ("fail", "skip"), "--bad-images")
    e = embed_lib.embed(str(source), data, bad_images=bad_images, progress=progress)
    if out is not None:
        embed_lib.save(e, out)
    return e


def benchmark_table(rows: list[dict]) -> str:
    """The Markdown table `edgessl benchmark` prints of Run.benchmark's rows."""
    from edgessl.benchmark import markdown

    return markdown(rows)


def caches() -> list[dict]:
    """`edgessl cache list`: one dict per decoded-folder cache (bytes, count, image_size, last_used, root)."""
    from edgessl import cache as cache_lib

    return cache_lib.list_caches()


def cache_dir() -> Path:
    from edgessl import cache as cache_lib

    return cache_lib.cache_dir()


def clean_caches(older_than: float = 0.0) -> list:
    """`edgessl cache clean`: remove the caches not used for `older_than` days (0: all); what was removed."""
    from edgessl import cache as cache_lib

    if isinstance(older_than, bool) or not isinstance(older_than, (int, float)) or older_than < 0:
        raise EdgesslError(f"--older-than must be 0 or more days, got {older_than!r}")
    return cache_lib.clean(older_than)


def _one_of(value, allowed: Sequence, option: str) -> None:
    if value not in allowed:
        raise EdgesslError(f"{option} must be one of {', '.join(map(str, allowed))}, got {value!r}")


def _positive(value, option: str) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise EdgesslError(f"{option} must be positive, got {value!r}")


def _batch(batch: str | int) -> str | int:
    """'dynamic' or a positive batch size (an int, or its digits as the CLI passes them)."""
    if batch == "dynamic":
        return batch
    if isinstance(batch, str) and batch.isdigit():
        batch = int(batch)
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
        raise EdgesslError(f"--batch must be 'dynamic' or a positive integer, got {batch!r}")
    return batch


def _names(value: str | Sequence[str]) -> list[str]:
    """A comma-separated option (the CLI's) or a sequence (Python's) -> its names."""
    return [v for v in (value.split(",") if isinstance(value, str) else value) if v]


class Trainer:
    """A pretraining run's model, data, augmentation and optimizer, built exactly as `pretrain`
    builds them (the recipe's picks included), stepped by hand; it writes nothing. For benchmarks
    of the step and for notebooks:

        t = edgessl.Trainer(data="npz:cifar.npz", precision="fp32", batch_size=64)
        t.step()                        # one batch: augment, forward, backward, optimizer, bank update
        t.step(indices, lr=1e-3, step=10, total=1000)

    Keywords are config overrides, as for `pretrain`."""

    capture_warmup = config_lib.CAPTURE_WARMUP  # with run.capture: the eager steps before the step is captured

    def __init__(self, config: Optional[str | Path | dict] = None, **overrides):
        from edgessl.train import build

        self._s = build(resolve_config("", config, **overrides))
        self._s.model.train()

    config = property(lambda self: self._s.cfg, doc="the resolved Config")
    model = property(lambda self: self._s.model, doc="the method module (backbone, head, bank)")
    device = property(lambda self: self._s.device)
    precision = property(lambda self: self._s.precision, doc="the precision the step runs in")
    images = property(lambda self: self._s.train.images, doc="(N, 3, S, S) uint8 training images")
    choices = property(lambda self: self._s.choices, doc="what the recipe picked (recipe.Choice)")

    def augment(self, images, side: Optional[int] = None):
        """The step's augmentation of uint8 `images` (normalised floats at `side` px, default the input size)."""
        return self._s.augment(images, side)

    def step(self, indices=None, lr: Optional[float] = None, step: int = 0, total: int = 10**9) -> dict:
        """One training step on `indices` (default: a random batch of the configured size) at `lr`
        (default the config's), `step` of `total`; returns the method's output, the loss on the device."""
        import torch

        from edgessl.train import train_step

        s = self._s
        if indices is None:
            indices = torch.randint(0, len(s.train), (s.cfg.optim.batch_size,), device=s.device)
        return train_step(s, indices, s.cfg.optim.lr if lr is None else lr, step, total)


def pretrain(data: Optional[str] = None, out: str | Path = "", *, config: Optional[str | Path | dict] = None,
             resume: bool = False, progress: Optional[bool] = None, log=print, **overrides) -> Run:
    """Pretrain (or with resume=True continue) a run in `out`; returns it as a Run."""
    from edgessl.train import pretrain as train_run

    if not out:
        raise EdgesslError("pretrain needs out= (the run directory)")
    if data is not None:
        overrides["data"] = data
    cfg = resolve_config(out, config, resume, **overrides)
    summary = train_run(cfg, out, resume=resume, progress=progress, log=log)
    return Run(out, summary)


def finetune(run: Run | str | Path | None, train: str = "", test: str = "", out: str | Path = "", *,
             label_fraction: Optional[float] = None, labels_per_class: Optional[int] = None,
             resume: bool = False, progress: Optional[bool] = None, log=print, **settings) -> Run:
    """Fine-tune a pretraining run's encoder with a linear head (`train`/`test` specs, or neither
    for the run's own split); `settings` are FinetuneConfig keys. Returns the classifier run."""
    from edgessl.finetuning import finetune as tune

    if not out:
        raise EdgesslError("finetune needs out= (the classifier's run directory)")
    if not resume and not run:
        raise EdgesslError("finetune needs RUN_DIR (and --train and --test, or neither for the run's own split), "
                           "or --out DIR --resume")
    source = run.path if isinstance(run, Run) else run
    summary = tune(source, train, test, out, label_fraction, labels_per_class, resume=resume, progress=progress,
                   log=log, **settings)
    return Run(out, summary)
