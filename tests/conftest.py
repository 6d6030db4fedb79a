"""Shared fixtures: tiny synthetic data, a tiny recipe, and the shared CIFAR-10 file."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from edgessl.config import Config, from_dict

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))  # the benchmark scripts import their shared `benchlib`
SHARED_NPZ = REPO.parent / "shared" / "data" / "cifar10-5k-train.npz"

torch.set_num_threads(1)  # tiny tensors: one thread is faster, and runs are repeatable


@pytest.fixture(autouse=True, scope="session")
def _cache_home(tmp_path_factory):
    """Folder caches go to a temporary folder, never the user's ~/.cache/edgessl."""
    os.environ["XDG_CACHE_HOME"] = str(tmp_path_factory.mktemp("xdg-cache"))


@pytest.fixture
def shared_npz() -> Path:
    if not SHARED_NPZ.exists():
        pytest.skip(f"shared data not found at {SHARED_NPZ} (../shared is absent)")
    return SHARED_NPZ


def make_npz(path: Path, n: int = 48, size: int = 16, classes: int = 3, seed: int = 0, **keys) -> Path:
    """Class-dependent colour blobs plus noise: learnable, tiny, deterministic."""
    rng = np.random.default_rng(seed)
    y = np.arange(n) % classes
    base = np.random.default_rng(0).integers(0, 256, (classes, 1, 1, 3))  # classes look alike across seeds
    x = np.clip(base[y] + rng.normal(0, 40, (n, size, size, 3)), 0, 255).astype(np.uint8)
    names = keys or {"x_train": x, "y_train": y}
    np.savez(path, **{k: (x if v is None else v) for k, v in names.items()})
    return path


@pytest.fixture
def tiny_npz(tmp_path) -> Path:
    return make_npz(tmp_path / "tiny.npz")


def tiny_config(spec: str, **sections) -> Config:
    """A recipe small enough for a CPU test: MobileNetV3-small-050, 16 px, batch 8, the default optimizer."""
    device = os.environ.get("EDGESSL_TEST_DEVICE", "cpu")  # scripts/gpu_check.py sets cuda
    base = {"data": {"spec": spec, "val_fraction": 0.25},
            "backbone": {"name": "mobilenetv3_small_050"},
            "method": {"head_dims": [32, 16]},
            "optim": {"batch_size": 8, "epochs": 2},
            # on a CPU fp32: "auto" is bf16 with AMX, and no test may depend on the CPU it runs on
            "run": {"knn_k": 5, "threads": 1, "augment_threads": 1, "report": False, "device": device,
                    "precision": "fp32" if device == "cpu" else "auto"}}
    for section, values in sections.items():
        base.setdefault(section, {}).update(values)
    return from_dict(base)


def tiny_pretrained_run(root: Path) -> tuple[str, str]:
    """A one-epoch tiny run in root/run on 32 px train data; (train spec, test spec) of labelled npz files."""
    from edgessl.train import pretrain

    train = make_npz(root / "train.npz", n=60, size=32, seed=0)
    test = make_npz(root / "test.npz", n=30, size=32, seed=1)
    pretrain(tiny_config(f"npz:{train}", optim={"epochs": 1}), root / "run", log=lambda *_: None)
    return f"npz:{train}", f"npz:{test}"


# torch 2.14.1's inductor, at one thread on AVX2 kernels (ATEN_CPU_CAPABILITY=avx2 on an AVX-512
# CPU, as `make test-avx2` runs), gave NaN features for a backbone with edgessl.depthwise in it;
# the recipe does not compile there (docs/benchmarks.md, "The step")
INDUCTOR_ON_AVX2 = pytest.mark.skipif(torch.backends.cpu.get_cpu_capability() == "AVX2",
                                      reason="inductor gives NaN at one thread on AVX2 kernels (torch 2.14.1)")


def sigterm_once_checkpointed(args: list, ckpt: Path) -> tuple[int, str, str]:
    """Run `edgessl ARGS` in a child, SIGTERM it once `ckpt` exists (its first checkpoint, plus half
    a second of training); (exit code, stdout, stderr)."""
    import signal
    import subprocess
    import time

    proc = subprocess.Popen([sys.executable, "-m", "edgessl", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    deadline = time.time() + 120
    while not ckpt.exists() and time.time() < deadline:
        time.sleep(0.2)
    time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    return proc.returncode, out, err
