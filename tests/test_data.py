"""Dataset specs: every format decoded to (N, 3, H, W) uint8, row i = instance i; bad input named."""
import gzip
import os
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import make_npz
from edgessl import EdgesslError
from edgessl.data import absolute, load, split


def test_npz_default_keys(tiny_npz):
    d = load(f"npz:{tiny_npz}")
    assert d.images.shape == (48, 3, 16, 16) and d.images.dtype == torch.uint8
    assert d.labels.tolist()[:4] == [0, 1, 2, 0] and d.classes == ["0", "1", "2"]
    raw = np.load(tiny_npz)["x_train"]
    assert torch.equal(d.images[5], torch.from_numpy(raw[5]).permute(2, 0, 1))


def test_npz_named_keys_grayscale_and_resize(tmp_path):
    gray = np.random.default_rng(0).integers(0, 256, (10, 12, 12), dtype=np.uint8)
    np.savez(tmp_path / "g.npz", pics=gray, lab=np.arange(10))
    d = load(f"npz:{tmp_path / 'g.npz'}?x=pics&y=lab")
    assert d.images.shape == (10, 3, 12, 12)
    assert torch.equal(d.images[:, 0], d.images[:, 2]) and torch.equal(d.images[3, 1], torch.from_numpy(gray[3]))
    assert load(f"npz:{tmp_path / 'g.npz'}?x=pics", 24).images.shape == (10, 3, 24, 24)
    assert load(f"npz:{tmp_path / 'g.npz'}?x=pics").labels is None


@pytest.mark.parametrize("spec,msg", [
    ("nope:/x", "malformed dataset spec"), ("npz:", "needs a path"), ("npz:/does/not/exist.npz", "not found"),
    ("folder:/does/not/exist", "not found"),
])
def test_bad_specs(spec, msg):
    with pytest.raises(EdgesslError, match=msg):
        load(spec)


def test_npz_wrong_contents(tmp_path):
    np.savez(tmp_path / "f.npz", x=np.zeros((4, 8, 8, 3), dtype=np.float32))
    with pytest.raises(EdgesslError, match="must be uint8"):
        load(f"npz:{tmp_path / 'f.npz'}")
    np.savez(tmp_path / "k.npz", foo=np.zeros(3))
    with pytest.raises(EdgesslError, match="no images array"):
        load(f"npz:{tmp_path / 'k.npz'}")
    (tmp_path / "t.npz").write_bytes(b"PK\x03\x04garbage")
    with pytest.raises(EdgesslError, match="not a readable .npz"):
        load(f"npz:{tmp_path / 't.npz'}")
    make_npz(tmp_path / "q.npz")
    with pytest.raises(EdgesslError, match="unknown option"):
        load(f"npz:{tmp_path / 'q.npz'}?z=1")


def _cifar_dir(tmp_path):
    root = tmp_path / "cifar-10-batches-py"
    root.mkdir()
    rng = np.random.default_rng(0)
    for i in (1, 2):
        batch = {b"data": rng.integers(0, 256, (5, 3072), dtype=np.uint8), b"labels": [i, 0, 1, 2, 3]}
        with open(root / f"data_batch_{i}", "wb") as f:
            pickle.dump({k.decode(): v for k, v in batch.items()}, f)
    with open(root / "test_batch", "wb") as f:
        pickle.dump({"data": rng.integers(0, 256, (3, 3072), dtype=np.uint8), "labels": [9, 8, 7]}, f)
    with open(root / "batches.meta", "wb") as f:
        pickle.dump({"label_names": [f"c{i}" for i in range(10)]}, f)
    return tmp_path


def test_cifar10_pickle(tmp_path):
    root = _cifar_dir(tmp_path)
    d = load(f"cifar10:{root}")
    assert d.images.shape == (10, 3, 32, 32) and d.labels.tolist()[:5] == [1, 0, 1, 2, 3]
    assert d.classes[0] == "c0"
    assert load(f"cifar10:{root}?split=test").labels.tolist() == [9, 8, 7]


def test_cifar_pickle_runs_no_code(tmp_path):
    root = tmp_path / "cifar-10-batches-py"
    root.mkdir()
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    with open(root / "data_batch_1", "wb") as f:
        pickle.dump({"data": Evil(), "labels": [0]}, f)
    with pytest.raises(EdgesslError, match="refusing to load global"):
        load(f"cifar10:{tmp_path}")
    assert not marker.exists()


def _idx(path, arr):
    header = struct.pack(">HBB", 0, 8, arr.ndim) + struct.pack(f">{arr.ndim}I", *arr.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + arr.astype(np.uint8).tobytes())


def test_fashion_mnist_idx(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (7, 28, 28), dtype=np.uint8)
    _idx(tmp_path / "train-images-idx3-ubyte.gz", x)
    _idx(tmp_path / "train-labels-idx1-ubyte.gz", np.arange(7))
    d = load(f"fashion-mnist:{tmp_path}")
    assert d.images.shape == (7, 3, 28, 28) and torch.equal(d.images[2, 1], torch.from_numpy(x[2]))
    assert d.labels.tolist() == list(range(7)) and d.classes[9] == "ankle boot"
    (tmp_path / "t10k-images-idx3-ubyte.gz").write_bytes(b"junk")
    with pytest.raises(EdgesslError, match="not a gzip IDX"):
        load(f"fashion-mnist:{tmp_path}?split=test")


def test_download_keeps_a_folder_that_holds_the_data(tmp_path):
    """--download fetches nothing when DIR holds the files (in the release's or torchvision's layout):
    the loaders read them as they are; the tests never download."""
    from edgessl.config import DataConfig
    from edgessl.data import download, load_split

    (tmp_path / "c").mkdir()
    root = _cifar_dir(tmp_path / "c")
    train, _ = load_split(DataConfig(spec=f"cifar10:{root}", download=True, fit="squash"))
    assert len(train) == 10
    raw = tmp_path / "f" / "FashionMNIST" / "raw"  # where torchvision.datasets.FashionMNIST puts it
    raw.mkdir(parents=True)
    _idx(raw / "train-images-idx3-ubyte.gz", np.zeros((4, 28, 28)))
    _idx(raw / "train-labels-idx1-ubyte.gz", np.arange(4))
    download(f"fashion-mnist:{tmp_path / 'f'}")
    assert load(f"fashion-mnist:{tmp_path / 'f'}").images.shape == (4, 3, 28, 28)
    with pytest.raises(EdgesslError, match="--download fetches cifar10:DIR"):
        download(f"npz:{tmp_path / 'x.npz'}")
    with pytest.raises(EdgesslError, match=r"path not found: .*\(--download fetches it\)"):
        load(f"cifar10:{tmp_path / 'nothing'}")


def test_fashion_mnist_debian_package():
    if not os.path.isdir("/usr/share/datasets/fashion-mnist"):
        pytest.skip("Debian package dataset-fashion-mnist is not installed")
    d = load("fashion-mnist?split=test")
    assert d.images.shape == (10000, 3, 28, 28) and len(set(d.labels.tolist())) == 10


def test_folder_with_classes_and_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    root = tmp_path / "imgs"
    for cls, colour in (("cat", (255, 0, 0)), ("dog", (0, 0, 255))):
        (root / cls).mkdir(parents=True)
        for i in range(3):
            Image.new("RGB", (40, 30), colour).save(root / cls / f"{i}.png")
    Image.new("RGBA", (20, 20), (0, 255, 0, 128)).save(root / "dog" / "rgba.png")
    d = load(f"folder:{root}", 16)
    assert d.images.shape == (7, 3, 16, 16) and d.classes == ["cat", "dog"]
    assert d.labels.tolist() == [0, 0, 0, 1, 1, 1, 1]
    assert d.images[0, 0].float().mean() > 250 and d.images[0, 2].float().mean() < 5
    assert len(list((tmp_path / "cache" / "edgessl").glob("*.npy"))) == 1
    assert torch.equal(load(f"folder:{root}", 16).images, d.images)  # second load from the cache


def test_folder_16bit_png_is_scaled_not_saturated(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    root = tmp_path / "imgs"
    root.mkdir()
    Image.fromarray(np.full((8, 8), 32768, dtype=np.uint16)).save(root / "a.png")
    d = load(f"folder:{root}", 8)
    assert 120 <= int(d.images[0, 0, 0, 0]) <= 136


def test_folder_corrupt_image_is_named(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    root = tmp_path / "imgs"
    root.mkdir()
    Image.new("RGB", (8, 8)).save(root / "ok.png")
    (root / "broken.jpg").write_bytes(b"\xff\xd8\xffnot really")
    with pytest.raises(EdgesslError, match="broken.jpg"):
        load(f"folder:{root}", 8)


def test_split_is_fixed_and_disjoint(tiny_npz):
    d = load(f"npz:{tiny_npz}")
    a_train, a_val = split(d, 0.25, 0)
    b_train, b_val = split(d, 0.25, 0)
    assert len(a_val) == 12 and len(a_train) == 36
    assert torch.equal(a_val.images, b_val.images)
    _, c_val = split(d, 0.25, 1)
    assert not torch.equal(a_val.images, c_val.images)


def test_shared_cifar_file(shared_npz):
    d = load(f"npz:{shared_npz}")
    assert d.images.shape == (5170, 3, 32, 32) and len(d.classes) == 10 and d.classes[0] == "airplane"


def test_a_spec_is_stored_with_an_absolute_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert absolute("npz:a/../b.npz") == f"npz:{tmp_path / 'b.npz'}"
    assert absolute("fashion-mnist:d?split=test") == f"fashion-mnist:{tmp_path / 'd'}?split=test"
    assert absolute("folder:/x/y") == "folder:/x/y"
    assert absolute("folder:~/p") == f"folder:{Path.home() / 'p'}"
    for spec in ("fashion-mnist", "fashion-mnist?split=test", "", None):
        assert absolute(spec) == spec
