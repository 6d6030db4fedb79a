"""Self-describing checkpoints: written atomically, loaded with weights_only=True.

A checkpoint is a plain dict of tensors, numbers, strings, lists and dicts (no
numpy arrays, no Namespace: weights_only=True rejects both), holding what a
run needs to continue exactly: resolved config, versions, position, model (backbone,
head, bank), optimizer, scaler and every RNG state.
"""
from __future__ import annotations

import io
import pickle
import random
import warnings
import zipfile
from pathlib import Path

import numpy as np
import torch

from edgessl.errors import EdgesslError
from edgessl.runfiles import atomic_write
from edgessl.version import __version__

FORMAT = "edgessl-checkpoint"
# 2: data.fit and data.image_size stored resolved; 3: method.negatives too; 4: one Position for every trainer
# (edgessl.loop) and run.threads / augment_threads / sync_every spell auto "auto" (upgrade())
FORMAT_VERSION = 4


def versions() -> dict:
    import timm

    return {"edgessl": __version__, "torch": str(torch.__version__), "timm": timm.__version__}


def rng_state() -> dict:
    np_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
        "python": _to_lists(random.getstate()),
    }


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))


def training_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer, scaler) -> dict:
    """What every run's checkpoint holds to continue bit for bit: weights (and buffers: a bank),
    optimizer, scaler and every RNG state. Pretraining, fine-tuning and the int8 student alike."""
    return {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(),
            "rng": rng_state()}


def restore_training(state: dict, model: torch.nn.Module, optimizer: torch.optim.Optimizer, scaler) -> None:
    """The inverse of training_state: weights loaded strictly, then optimizer, scaler and RNGs."""
    model.load_state_dict(state["model"], strict=True)
    optimizer.load_state_dict(state["optimizer"])
    scaler.load_state_dict(state["scaler"])
    set_rng_state(state["rng"])


def _to_lists(x):
    return [_to_lists(v) for v in x] if isinstance(x, tuple) else x


def save(state: dict, path: Path) -> None:
    """Write `state` to `path` atomically: temp file in the same folder, fsync, rename.

    A crash at any moment leaves either the old checkpoint or the new one, never half of one.
    """
    state = {"format": FORMAT, "format_version": FORMAT_VERSION, "versions": versions(), **state}
    buf = io.BytesIO()
    torch.save(state, buf)  # serialised in memory first: a full disk is then an OSError of the write
    try:
        atomic_write(Path(path), buf.getbuffer())
    except OSError as e:  # disk full, quota, a vanished folder: the previous checkpoint is untouched
        raise EdgesslError(f"cannot write the checkpoint {path} ({e.strerror or e}); the previous checkpoint "
                           "is kept and --resume continues from it") from None


def load(path: Path) -> dict:
    """Load an edgessl checkpoint safely; anything else is one clear EdgesslError."""
    path = Path(path)
    if not path.is_file():
        raise EdgesslError(f"no checkpoint at {path}")
    try:
        with warnings.catch_warnings():  # torch warns about the pickle protocol before refusing: one line here
            warnings.simplefilter("ignore")
            state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        why = next((ln.strip() for ln in str(e).splitlines() if "Unsupported global" in ln), type(e).__name__)
        raise EdgesslError(f"refusing to load {path}: it holds more than plain data ({why.split(' was not')[0]})") from None
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile) as e:
        raise EdgesslError(f"cannot read checkpoint {path}: truncated or not a torch file "
                           f"({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise EdgesslError(f"{path} is not an edgessl checkpoint")
    if state.get("format_version", 0) > FORMAT_VERSION:
        raise EdgesslError(f"{path} has checkpoint format {state['format_version']}; this edgessl reads "
                           f"up to {FORMAT_VERSION} (upgrade edgessl)")
    return upgrade(state)


def upgrade(state: dict) -> dict:
    """An older checkpoint in today's layout, in memory (the file is left as it is): the one place
    that knows what runs of earlier versions stored."""
    if state.get("format_version", 1) < 2:
        data = state.get("config", {}).get("data")
        if data is not None:
            if data.get("fit", "auto") == "auto":  # every run made before the fit was recorded squashed
                data["fit"] = "squash"
            if data.get("image_size") is None and "backbone" in state:  # before the recipe stored its pick
                data["image_size"] = state["backbone"]["image_size"]
        state["format_version"] = 2
    if state["format_version"] < 3:
        method = state.get("config", {}).get("method")
        if method is not None and method.get("negatives") == "auto" and "method_args" in state:
            # those runs resolved it at each step: every bank row up to 16,384 images, 4,096 sampled beyond
            method["negatives"] = "all" if state["method_args"]["num_samples"] <= 16_384 else 4096
        state["format_version"] = 3
    if state["format_version"] < 4:
        pos = state.get("position")
        if pos is not None and "last_knn" in pos:  # pretraining's position: its score had the monitor's name
            pos["last_score"] = pos.pop("last_knn")
        if pos is not None and "test_top1" in pos:  # fine-tuning's own position, saved at epoch ends only
            pos.update(elapsed=pos.pop("seconds", 0.0), last_score=pos.pop("test_top1"),
                       planned_epochs=pos.pop("planned", None))
        run = state.get("config", {}).get("run")
        for key in ("threads", "augment_threads", "sync_every"):
            if run is not None and run.get(key) == 0:  # their auto was spelled 0
                run[key] = "auto"
        state["format_version"] = 4
    return state
