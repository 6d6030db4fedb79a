"""Folders larger than memory: the memory-mapped cache gives the same images, batches and
training as the in-memory path; a changed folder rebuilds it; an interrupted build leaves nothing."""
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import tiny_config
from edgessl import checkpoint
from edgessl.data import MappedImages, load, split
from edgessl.train import pretrain


def noise_folder(root, n=24, size=20, classes=("a", "b", "c")):
    rng = np.random.default_rng(0)
    for i in range(n):
        d = root / classes[i % len(classes)]
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(d / f"{i:03d}.png")
    return root


@pytest.fixture
def folder(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    return noise_folder(tmp_path / "imgs")


def test_mapped_rows_equal_the_in_memory_tensor(folder):
    mem = load(f"folder:{folder}", 16, storage="memory")
    mapped = load(f"folder:{folder}", 16, storage="mmap")
    assert mapped.mapped and not mem.mapped and isinstance(mapped.images, MappedImages)
    assert mapped.images.shape == mem.images.shape == (24, 3, 16, 16)
    assert torch.equal(mapped.labels, mem.labels) and mapped.classes == mem.classes == ["a", "b", "c"]
    idx = torch.tensor([7, 0, 23, 7, 3])  # unsorted, repeated
    assert torch.equal(mapped.images[idx], mem.images[idx])
    assert torch.equal(mapped.images[5], mem.images[5]) and torch.equal(mapped.images[-1], mem.images[-1])
    assert torch.equal(mapped.images[2:9], mem.images[2:9])
    assert torch.equal(torch.cat(list(mapped.images.split(10))), mem.images)
    with pytest.raises(IndexError):
        mapped.images[torch.tensor([24])]
    # a split is a view of rows, and stays one
    (mt, mv), (tt, tv) = split(mapped, 0.25, 3), split(mem, 0.25, 3)
    assert mt.mapped and mv.mapped
    assert torch.equal(mt.images[torch.arange(len(mt))], tt.images) and torch.equal(mv.images[1:4], tv.images[1:4])
    sub = mt.subset(torch.tensor([4, 1]))
    assert torch.equal(sub.images[torch.arange(2)], tt.images[[4, 1]])


def test_manifest_and_changed_folder_rebuilds(folder, tmp_path):
    first = load(f"folder:{folder}", 16, storage="mmap")
    manifests = list((tmp_path / "cache" / "edgessl").glob("*.json"))
    assert len(manifests) == 1
    m = json.loads(manifests[0].read_text())
    assert m["count"] == 24 and m["image_size"] == 16 and len(m["files"]) == 24
    assert m["files"][0][0] == os.path.join("a", "000.png") and m["skipped"] == []
    target = folder / "a" / "000.png"
    Image.new("RGB", (20, 20), (255, 255, 255)).save(target)
    os.utime(target, ns=(1, 1))  # a new size and mtime
    second = load(f"folder:{folder}", 16, storage="mmap")
    assert len(list((tmp_path / "cache" / "edgessl").glob("*.npy"))) == 2
    assert int(second.images[0].min()) == 255 and not torch.equal(first.images[0], second.images[0])
    assert torch.equal(first.images[1:], second.images[1:])


def test_interrupted_cache_build_leaves_nothing(folder, tmp_path, monkeypatch):
    import edgessl_edge.image as image_lib

    real, calls = image_lib.decode, []

    def flaky(path, size, fit="squash"):
        calls.append(path)
        if len(calls) == 5:
            raise KeyboardInterrupt
        return real(path, size, fit)

    monkeypatch.setattr(image_lib, "decode", flaky)
    with pytest.raises(KeyboardInterrupt):
        load(f"folder:{folder}", 16, storage="mmap")
    assert [p.name for p in (tmp_path / "cache" / "edgessl").iterdir() if p.suffix != ".lock"] == []  # the lock stays
    monkeypatch.setattr(image_lib, "decode", real)
    assert torch.equal(load(f"folder:{folder}", 16, storage="mmap").images[0:24],
                       load(f"folder:{folder}", 16, storage="memory").images)


def test_training_from_the_mapped_cache_equals_in_memory(folder, tmp_path):
    states = {}
    for storage in ("memory", "mmap"):
        cfg = tiny_config(f"folder:{folder}", data={"image_size": 16, "storage": storage})
        pretrain(cfg, tmp_path / storage, log=lambda *_: None)
        states[storage] = checkpoint.load(tmp_path / storage / "checkpoint.pt")["model"]
    for k, v in states["memory"].items():
        assert torch.equal(v, states["mmap"][k]), k


def test_parallel_decoding_equals_one_process_bad_rows_squeezed_out(tmp_path, monkeypatch):
    """Workers write disjoint rows of the cache; a file that cannot be used leaves no gap."""
    from edgessl import data as data_lib

    root = tmp_path / "many"
    root.mkdir()
    rng = np.random.default_rng(1)
    for i in range(40):
        Image.fromarray(rng.integers(0, 256, (30, 20, 3), dtype=np.uint8)).save(root / f"{i:02d}.jpg")
    (root / "05.jpg").write_bytes(b"broken")
    (root / "33.jpg").write_bytes(b"")
    monkeypatch.setattr(data_lib, "DECODE_CHUNK", 7)
    monkeypatch.setattr(data_lib, "PARALLEL_FROM", 10**9)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "one"))
    one = load(f"folder:{root}", 16, bad_images="skip")
    monkeypatch.setattr(data_lib, "PARALLEL_FROM", 1)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "two"))
    two = load(f"folder:{root}", 16, bad_images="skip")
    assert len(one) == len(two) == 38 and torch.equal(one.images, two.images)
    assert [f for f, _ in two.skipped] == [str(root / "05.jpg"), str(root / "33.jpg")]
    assert "05.jpg" not in two.files and two.files[5] == "06.jpg"
