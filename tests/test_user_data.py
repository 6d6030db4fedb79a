"""A user's own folder: data that changes under a run, caches that rot, hostile files, two jobs
at one run directory, a full disk, and the edge runtime fuzzed. Each case ends in one clear
line (exit code 2 from the CLI) and loses nothing."""
import errno
import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import time
import zlib

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st
from PIL import Image

from conftest import REPO, make_npz, tiny_config
from edgessl import EdgesslError, cache as cache_lib, checkpoint
from edgessl.data import load
from edgessl.train import pretrain

sys.path.insert(0, str(REPO / "export"))
import edgessl_edge  # noqa: E402
from edgessl_edge.__main__ import main as edge_main  # noqa: E402


@pytest.fixture(autouse=True)
def _own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))


def cli(*args):
    return subprocess.run([sys.executable, "-m", "edgessl", *map(str, args)], capture_output=True, text=True,
                          timeout=300)


def one_line_error(r, *words):
    assert r.returncode == 2, (r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    for w in words:
        assert w in lines[0], (w, lines[0])
    return lines[0]


def photos(root, n=24, seed=0):
    rng = np.random.default_rng(seed)
    for i in range(n):
        c = i % 2
        (root / f"c{c}").mkdir(parents=True, exist_ok=True)
        img = np.clip(rng.normal(80 + 100 * c, 40, (20, 24, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(img).save(root / f"c{c}" / f"{i:03d}.png")
    return root


TINY_ARGS = ["--backbone", "mobilenetv3_small_050", "--batch-size", "8", "--epochs", "1", "--val-fraction", "0.25",
             "--image-size", "16"]


@pytest.fixture
def folder_run(tmp_path):
    folder = photos(tmp_path / "photos")
    run = tmp_path / "run"
    r = cli("pretrain", "--data", f"folder:{folder}", "--out", run, *TINY_ARGS)
    assert r.returncode == 0, r.stderr
    return folder, run


def _changes(folder):
    first = sorted(folder.rglob("*.png"))[0]
    return {
        "gained": (lambda: shutil.copy(first, folder / "c0" / "999.png"), "1 added: c0/999.png"),
        "lost": (lambda: first.unlink(), "1 removed: c0/000.png"),
        "renamed": (lambda: first.rename(folder / "c1" / "zzz.png"), "1 renamed to: c1/zzz.png"),
        "edited": (lambda: Image.new("RGB", (24, 20), (1, 2, 3)).save(first), "1 edited: c0/000.png"),
    }


@pytest.mark.parametrize("change", ["gained", "lost", "renamed", "edited"])
def test_a_changed_folder_is_named_file_by_file(tmp_path, change):
    from edgessl.data import check_identity, identity

    folder = photos(tmp_path / "photos")
    stored = identity(load(f"folder:{folder}", 16))
    act, named = _changes(folder)[change]
    act()
    with pytest.raises(EdgesslError, match="the images changed") as e:
        check_identity(stored, load(f"folder:{folder}", 16), "--resume")
    assert named in str(e.value)
    check_identity(identity(load(f"folder:{folder}", 16)), load(f"folder:{folder}", 16), "--resume")  # unchanged: ok


@pytest.mark.slow
def test_resume_export_finetune_and_report_refuse_a_changed_folder(folder_run, tmp_path):
    folder, run = folder_run
    before = (run / "checkpoint.pt").read_bytes()
    act, named = _changes(folder)["renamed"]
    act()
    line = one_line_error(cli("pretrain", "--out", run, "--resume"), "--resume", "changed")
    assert named in line, line
    one_line_error(cli("export", run, "--out", tmp_path / "m.onnx", "--precision", "int8"), "export", named)
    one_line_error(cli("finetune", run, "--out", tmp_path / "ft", "--labels-per-class", "2"), "finetune", named)
    assert (run / "checkpoint.pt").read_bytes() == before and not (tmp_path / "m.onnx").exists()
    from edgessl.report import write_report

    assert "Nearest neighbours" in (run / "report.html").read_text()  # as pretrain wrote it
    assert "Nearest neighbours" not in write_report(run, tmp_path / "r.html").read_text()  # no stale grid


def test_resume_refuses_a_reordered_npz(tiny_npz, tmp_path):
    cfg = tiny_config(f"npz:{tiny_npz}", optim={"epochs": 2})
    pretrain(cfg, tmp_path / "run", stop_at_step=2, log=lambda *_: None)
    with np.load(tiny_npz) as f:
        x, y = f["x_train"], f["y_train"]
    np.savez(tiny_npz, x_train=x[::-1], y_train=y[::-1])
    with pytest.raises(EdgesslError, match="another order"):
        pretrain(cfg, tmp_path / "run", resume=True, log=lambda *_: None)


def test_a_damaged_cache_is_rebuilt_never_trained_on(tmp_path, capfd):
    folder = photos(tmp_path / "photos")
    good = load(f"folder:{folder}", 16).images.clone()
    npy = cache_lib.cache_path(_listing(folder), 16, "squash")
    size = npy.stat().st_size
    for damage in ("overwrite 4 KB in the middle", "truncate", "half-written manifest"):
        if damage.startswith("overwrite"):
            with open(npy, "r+b") as f:
                f.seek(size // 2)
                f.write(os.urandom(4096))
        elif damage == "truncate":
            with open(npy, "r+b") as f:
                f.truncate(size // 3)
        else:
            npy.with_suffix(".json").write_text('{"root": "x", "cou')
        capfd.readouterr()
        again = load(f"folder:{folder}", 16).images
        assert torch.equal(again, good), damage
        assert "damaged" in capfd.readouterr().err, damage
        assert cache_lib.read_manifest(npy) is not None and npy.stat().st_size == size


def _listing(folder):
    files = sorted(p for p in folder.rglob("*.png"))
    return [(str(p.relative_to(folder)), p.stat().st_size, p.stat().st_mtime_ns) for p in files]


def test_two_processes_building_one_cache_do_not_corrupt_it(tmp_path):
    folder = photos(tmp_path / "photos", n=64)
    code = ("import sys, torch; from edgessl.data import load; "
            f"torch.save(load('folder:{folder}', 32).images, sys.argv[1])")
    procs = [subprocess.Popen([sys.executable, "-c", code, str(tmp_path / f"{i}.pt")]) for i in range(2)]
    assert [p.wait(timeout=120) for p in procs] == [0, 0]
    a, b = (torch.load(tmp_path / f"{i}.pt") for i in range(2))
    assert torch.equal(a, b) and a.shape == (64, 3, 32, 32)
    assert cache_lib.read_manifest(cache_lib.cache_path(_listing(folder), 32, "squash")) is not None
    assert not list(cache_lib.cache_dir().glob("*.tmp*"))


def test_cache_list_and_clean(tmp_path):
    folder = photos(tmp_path / "photos", n=8)
    load(f"folder:{folder}", 16)
    load(f"folder:{folder}", 24)
    r = cli("cache", "list")
    assert r.returncode == 0 and r.stdout.count(str(folder)) == 2 and "2 caches" in r.stdout
    assert "removed 0 caches" in cli("cache", "clean", "--older-than", "30").stdout
    assert "removed 2 caches" in cli("cache", "clean").stdout
    assert "0 caches" in cli("cache", "list").stdout


def _png_header(width, height):
    """A PNG that claims width x height and holds no pixels: a decompression bomb's header."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b""))


def test_hostile_and_absurd_files_are_named_or_handled(tmp_path):
    root = photos(tmp_path / "photos", n=8)
    (root / "c0" / "bomb.png").write_bytes(_png_header(40000, 40000))
    (root / "c0" / "huge.png").write_bytes(_png_header(12000, 12000))  # under Pillow's limit, over ours
    Image.new("RGB", (1, 10000)).save(root / "c0" / "strip.png")
    frames = [Image.new("RGB", (16, 16), c) for c in ((255, 0, 0), (0, 0, 255))]
    frames[0].save(root / "c1" / "anim.gif", save_all=True, append_images=frames[1:])
    (root / "c1" / "folder.jpg").mkdir()  # a directory with an image's name: not a file, not listed
    os.symlink(root, root / "c1" / "loop")  # a symlink loop: folders behind symlinks are not entered
    name = os.fsdecode(b"c1/\xff\xfebad.png")  # not valid UTF-8
    (root / name).write_bytes(b"not an image")
    r = cli("pretrain", "--data", f"folder:{root}", "--out", tmp_path / "run", *TINY_ARGS)
    assert r.returncode == 2 and "Traceback" not in r.stderr and not (tmp_path / "run").exists()
    assert "4 of 13 images" in r.stderr and "too large (12000x12000; at most 120 megapixels)" in r.stderr
    assert "Image size (1600000000 pixels)" in r.stderr
    assert "too small (1x10000" in r.stderr
    assert "\ufffd\ufffdbad.png" in r.stderr  # the undecodable name, printable
    data = load(f"folder:{root}", 16, bad_images="skip")
    assert len(data) == 9 and "c1/anim.gif" in data.files
    first = np.asarray(frames[0].resize((16, 16), Image.BICUBIC))
    assert np.array_equal(data.images[data.files.index("c1/anim.gif")].permute(1, 2, 0).numpy(), first)


@pytest.mark.slow
def test_a_second_run_into_one_out_is_refused_and_the_lock_dies_with_its_holder(tiny_npz, tmp_path):
    run = tmp_path / "run"
    args = ["pretrain", "--data", f"npz:{tiny_npz}", "--out", str(run), "--backbone", "mobilenetv3_small_050",
            "--batch-size", "8", "--epochs", "400"]
    first = subprocess.Popen([sys.executable, "-m", "edgessl", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while not (run / "checkpoint.pt").exists() and time.time() < deadline:
        time.sleep(0.2)
    one_line_error(cli(*args[:-2], "--epochs", "2"), "in use by edgessl pid", str(first.pid))
    one_line_error(cli("pretrain", "--out", run, "--resume"), "in use")
    first.send_signal(signal.SIGKILL)
    first.wait(timeout=60)
    r = cli("pretrain", "--out", run, "--resume", "--minutes", "0.01")
    assert r.returncode == 0, r.stderr


def test_a_full_disk_keeps_the_previous_checkpoint(tiny_npz, tmp_path, monkeypatch):
    from edgessl import runfiles

    cfg = tiny_config(f"npz:{tiny_npz}", optim={"epochs": 3})
    real, calls = runfiles.atomic_write, []

    def full_disk(path, data):
        if path.name == "checkpoint.pt":
            calls.append(path)
            if len(calls) == 2:  # the second epoch's checkpoint: the disk is full
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(path, data)

    monkeypatch.setattr(checkpoint, "atomic_write", full_disk)
    with pytest.raises(EdgesslError, match="No space left on device.*previous checkpoint is kept"):
        pretrain(cfg, tmp_path / "run", log=lambda *_: None)
    assert checkpoint.load(tmp_path / "run" / "checkpoint.pt")["position"]["epoch"] == 1
    monkeypatch.undo()
    pretrain(cfg, tmp_path / "run", resume=True, log=lambda *_: None)
    pretrain(cfg, tmp_path / "ref", log=lambda *_: None)
    a, b = (checkpoint.load(tmp_path / r / "checkpoint.pt") for r in ("run", "ref"))
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])


def test_same_seed_same_checkpoint_rng_states(tiny_npz, tmp_path):
    for name in ("a", "b"):
        pretrain(tiny_config(f"npz:{tiny_npz}", optim={"epochs": 1}), tmp_path / name, log=lambda *_: None)
    a, b = (checkpoint.load(tmp_path / r / "checkpoint.pt")["rng"] for r in ("a", "b"))
    assert torch.equal(a["numpy"]["keys"], b["numpy"]["keys"]) and a["numpy"]["pos"] == b["numpy"]["pos"]
    assert a["python"] == b["python"] and torch.equal(a["torch"], b["torch"])


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.one_of(st.binary(max_size=300), st.sampled_from(["png", "jpg", "gif"]).flatmap(
    lambda fmt: st.integers(1, 400).map(lambda cut: (fmt, cut)))))
def test_edge_decoding_raises_only_its_own_error(tmp_path, blob):
    if isinstance(blob, tuple):  # a real image cut short
        fmt, cut = blob
        Image.new("RGB", (40, 30), (10, 200, 30)).save(tmp_path / f"full.{fmt}")
        blob = (tmp_path / f"full.{fmt}").read_bytes()[:cut]
    path = tmp_path / "x.img"
    path.write_bytes(blob)
    try:
        out = edgessl_edge.decode(path, 16)
        assert out.shape == (16, 16, 3) and out.dtype == np.uint8
    except edgessl_edge.EdgeError:
        pass


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.sampled_from(["features", "labels", "classes", "model"]), st.sampled_from(["drop", "shape", "junk"]))
def test_edge_gallery_and_model_loading_fail_with_exit_2(edge_files, key, how):
    model, gallery, image, tmp = edge_files
    with np.load(gallery) as f:
        g = dict(f)
    if how == "drop":
        g.pop(key)
    elif how == "shape":
        g[key] = np.zeros((3, 5, 7))
    else:
        g[key] = np.array(["junk"])
    bad = tmp / "bad.npz"
    np.savez(bad, **g)
    code = edge_main(["classify", str(model), str(bad), str(image)])
    assert code == (0 if (key, how) == ("model", "drop") else 2)  # a gallery from before models were recorded


@pytest.fixture(scope="module")
def edge_files(tmp_path_factory):
    from edgessl.exporter import export_model

    tmp = tmp_path_factory.mktemp("edge_fuzz")
    npz = make_npz(tmp / "d.npz", n=24, size=16)
    pretrain(tiny_config(f"npz:{npz}", optim={"epochs": 1}), tmp / "run", log=lambda *_: None)
    export_model(tmp / "run", tmp / "m.onnx", knn=False)
    folder = photos(tmp / "labelled", n=6)
    assert edge_main(["build-gallery", str(tmp / "m.onnx"), str(folder), "--out", str(tmp / "g.npz")]) == 0
    (tmp / "garbage.onnx").write_bytes(os.urandom(200))
    assert edge_main(["embed", str(tmp / "garbage.onnx"), str(folder), "--out", str(tmp / "f.npy")]) == 2
    return tmp / "m.onnx", tmp / "g.npz", folder / "c0" / "000.png", tmp


def test_cache_lock_file_and_manifest_survive_json(tmp_path):
    """The manifest records the cache's size and checksum (what the integrity check compares)."""
    folder = photos(tmp_path / "photos", n=4)
    load(f"folder:{folder}", 16)
    npy = cache_lib.cache_path(_listing(folder), 16, "squash")
    manifest = json.loads(npy.with_suffix(".json").read_text())
    assert manifest["npy_bytes"] == npy.stat().st_size and manifest["npy_sha256"] == cache_lib.file_sha256(npy)
