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

Config overrides are keywords: a section as a dict (`method={"temperature": 0.1}`), a dotted
key (`**{"optim.lr": 0.01}`), or a shortcut (`backbone`, `method`, `minutes`, `epochs`, ...;
SHORTCUTS). Errors are the EdgesslError the CLI prints.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np

from edgessl import config as config_lib
from edgessl.config import Config
from edgessl.errors import ConfigError, EdgesslError
from edgessl.methods import METHODS

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
    from edgessl.train import config_from_checkpoint

    given = nest(overrides)
    if resume:
        if config is not None:
            raise EdgesslError("--resume uses the run's stored config; drop --config")
        return config_lib.from_dict(given, config_from_checkpoint(out))
    recipe = config if isinstance(config, dict) else config_lib.load_yaml(config) if config else {}
    name = given.get("method", {}).get("name") or recipe.get("method", {}).get("name", "memdistill")
    if name not in METHODS:
        raise EdgesslError(f"unknown method {name!r} (known: {', '.join(METHODS)})")
    cfg = config_lib.from_dict({"method": {"name": name, **METHODS[name].preset}})
    config_lib.from_dict(recipe, cfg)
    if "minutes" in given.get("optim", {}) and "epochs" not in given.get("optim", {}):
        given["optim"]["epochs"] = None  # the schedule is fitted to the minute budget
    return config_lib.from_dict(given, cfg)


class Run:
    """A run directory (`edgessl pretrain` or `edgessl finetune`), opened from its checkpoint."""

    def __init__(self, path: str | Path, summary: Optional[dict] = None):
        from edgessl.runs import read_state

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
        from edgessl.runs import run_config

        return run_config(self._state)

    def export(self, out: str | Path, precision: str = "fp32", format: str = "onnx", **kwargs) -> dict:
        """`edgessl export RUN --out OUT --format FORMAT`: a file for that runtime (onnx, openvino,
        litert, executorch), checked in it; its report. The keywords are the CLI's option names."""
        from edgessl.export import export_model

        return export_model(self.path, out, precision, fmt=format, **kwargs)

    def benchmark(self, formats=("onnx", "openvino", "litert", "executorch"), precisions=("fp32", "fp16", "int8"),
                  **kwargs) -> list[dict]:
        """`edgessl benchmark RUN`: every runtime x precision, checked and timed; the table's rows."""
        from edgessl.benchmark import benchmark

        return benchmark(self.path, formats, precisions, **kwargs)

    def probe(self, train: str, test: str, knn_k: int = 200, linear: bool = False,
              grid: Optional[str] = None) -> dict:
        """kNN (and linear) top-1 of the run's frozen backbone features."""
        from edgessl.probe import probe

        return probe(str(self.path), train, test, knn_k, linear, grid)

    def embed(self, data: Optional[str] = None, progress: Optional[bool] = False) -> np.ndarray:
        """(N, D) backbone features of `data` (default: the run's training data), rows in its order."""
        from edgessl.embed import embed

        return embed(str(self.path), data or self.config.data.spec, progress=progress).features

    def select(self, budget: int, out: Optional[str | Path] = None, data: Optional[str] = None,
               exclude: Optional[str | Path] = None, rule: str = config_lib.SELECT_DEFAULT, seed: int = 0) -> dict:
        """`edgessl select RUN --budget N`: the `budget` images to label first, in priority order
        (result["picks"]: paths relative to the data folder); with `out` (a .csv) the picks and
        the labelling page are written."""
        from edgessl.selection import select

        return select(self.path, budget, out, data, exclude, rule, seed)

    def report(self, out: Optional[str | Path] = None) -> Path:
        from edgessl.report import write_report

        return write_report(self.path, out)


class Trainer:
    """A pretraining run's model, data, augmentation and optimizer, built exactly as `pretrain`
    builds them (the recipe's picks included), stepped by hand; it writes nothing. For benchmarks
    of the step and for notebooks:

        t = edgessl.Trainer(data="npz:cifar.npz", precision="fp32", batch_size=64)
        t.step()                        # one batch: augment, forward, backward, optimizer, bank update
        t.step(indices, lr=1e-3, step=10, total=1000)

    Keywords are config overrides, as for `pretrain`."""

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
    source = run.path if isinstance(run, Run) else run
    summary = tune(source, train, test, out, label_fraction, labels_per_class, resume=resume, progress=progress,
                   log=log, **settings)
    return Run(out, summary)
