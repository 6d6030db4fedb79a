"""The torch-free edge runtime: same preprocessing as training evaluation, no torch import."""
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import REPO, make_npz, tiny_config
from edgessl.augment import normalize
from edgessl.data import load
from edgessl.exporter import export_model
from edgessl.train import pretrain

sys.path.insert(0, str(REPO / "export"))
import edgessl_edge  # noqa: E402

BLOCK = ("import sys; [sys.modules.__setitem__(m, None) for m in ('torch', 'torchvision', 'timm', 'edgessl')]; "
         "sys.path.insert(0, {export!r}); from edgessl_edge.__main__ import main; sys.exit(main({argv!r}))")


def image_folder(root: Path, shared_or_tiny: np.ndarray, labels) -> Path:
    """Real images as PNG and JPEG files (one EXIF-rotated), one subfolder per class."""
    for i, (img, y) in enumerate(zip(shared_or_tiny, labels)):
        (root / f"c{y}").mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(root / f"c{y}" / f"{i}.png")
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 on display
    Image.fromarray(shared_or_tiny[0]).save(root / "c0" / "rotated.jpg", exif=exif, quality=95)
    return root


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    root = tmp_path_factory.mktemp("edge")
    npz = make_npz(root / "tiny.npz", n=48, size=32)
    pretrain(tiny_config(f"npz:{npz}", optim={"epochs": 1}), root / "run", log=lambda *_: None)
    export_model(root / "run", root / "m.onnx", knn=False)
    arrays = np.load(npz)
    return root, root / "m.onnx", arrays["x_train"], arrays["y_train"]


def test_preprocessing_equals_training_evaluation(exported, tmp_path, monkeypatch, request):
    root, model, x, y = exported
    shared = REPO.parent / "shared" / "data" / "cifar10-5k-train.npz"
    if shared.exists():  # real photographs when the shared file is there
        with np.load(shared) as f:
            x, y = f["x_train"][:12], f["y_train"][:12] % 3
    folder = image_folder(tmp_path / "imgs", x[:12], y[:12])
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    torch_side = normalize(load(f"folder:{folder}", 32).images, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    enc = edgessl_edge.Encoder(model)
    files = edgessl_edge.list_images(folder)
    edge_side = enc.preprocess(np.stack([edgessl_edge.decode(p, 32) for p in files]))
    assert edge_side.shape == tuple(torch_side.shape)
    # the same normalisation in numpy and torch fp32: a rounding or two of values up to ~2.6
    assert np.abs(edge_side - torch_side.numpy()).max() <= 1e-6


def _run_torchless(*argv):
    code = BLOCK.format(export=str(REPO / "export"), argv=list(map(str, argv)))
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)


def test_runtime_works_without_torch(exported, tmp_path):
    root, model, x, y = exported
    folder = image_folder(tmp_path / "gallery", x[:24], y[:24])
    queries = image_folder(tmp_path / "queries", x[24:30], y[24:30])
    proof = subprocess.run([sys.executable, "-c", BLOCK.split("; sys.path")[0] + "; import torch"],
                           capture_output=True, text=True)
    assert proof.returncode != 0 and ("ImportError" in proof.stderr or "ModuleNotFoundError" in proof.stderr)
    r = _run_torchless("embed", model, queries, "--out", tmp_path / "f.npy")
    assert r.returncode == 0, r.stderr
    feats = np.load(tmp_path / "f.npy")
    assert feats.shape == (7, 1024)
    r = _run_torchless("build-gallery", model, folder, "--out", tmp_path / "g.npz")
    assert r.returncode == 0, r.stderr
    r = _run_torchless("classify", model, tmp_path / "g.npz", queries)
    assert r.returncode == 0, r.stderr
    assert len(r.stdout.strip().splitlines()) == 7 and all("\tc" in ln for ln in r.stdout.splitlines())


def test_runtime_matches_onnx_features_of_edgessl(exported, tmp_path):
    root, model, x, y = exported
    enc = edgessl_edge.Encoder(model)
    got = enc.embed_arrays(x[:5])
    from edgessl.onnxrt import ort_features, session

    expected = ort_features(session(model), normalize(torch.from_numpy(x[:5]).permute(0, 3, 1, 2),
                                                      (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)).numpy())
    # the same ONNX file in the same runtime; only the fp32 preprocessing differs (numpy against torch)
    assert np.abs(got - expected).max() <= 1e-5


def test_undecodable_image_is_named(exported, tmp_path):
    _, model, _, _ = exported
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"\xff\xd8\xff garbage")
    r = _run_torchless("embed", model, bad, "--out", tmp_path / "f.npy")
    assert r.returncode == 2 and "broken.jpg" in r.stderr and "Traceback" not in r.stderr
