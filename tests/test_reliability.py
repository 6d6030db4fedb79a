"""Reliability and safety: kill -9 and resume exactly, malicious checkpoints, bad images,
disk checks, determinism, and fuzzed spec / config parsers."""
import json
import os
import pickle
import random
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st
from PIL import Image

from conftest import tiny_config
from edgessl import EdgesslError, checkpoint
from edgessl.config import ConfigError, from_dict
from edgessl.data import load
from edgessl.runfiles import check_run_dir
from edgessl.train import pretrain

TIMING = ("seconds", "images_per_s", "peak_mem_mb")


def cli(*args, **kw):
    return subprocess.run([sys.executable, "-m", "edgessl", *map(str, args)], capture_output=True, text=True,
                          timeout=300, **kw)


def strip_timing(path):
    import csv

    with open(path, newline="") as f:
        return [{k: v for k, v in r.items() if k not in TIMING} for r in csv.DictReader(f)]


def _mtime(path):
    try:
        return path.stat().st_mtime_ns
    except FileNotFoundError:
        return None


@pytest.mark.slow
def test_kill_9_anywhere_then_resume_is_bit_exact(tiny_npz, tmp_path):
    """SIGKILL at random moments of training (many land inside a checkpoint write: one is
    written every step); each time the previous checkpoint loads, and the resumed run equals an
    uninterrupted one: every step's loss, the weights and the bank. The kill is timed from the
    run's own progress (its first new checkpoint), not from the wall clock, so a faster or
    slower machine still kills mid-training."""
    common = ["--data", f"npz:{tiny_npz}", "--backbone", "mobilenetv3_small_050", "--batch-size", "8",
              "--epochs", "8", "--val-fraction", "0.25", "--seed", "3"]
    ref = tmp_path / "ref"
    cfg = tmp_path / "every_step.yaml"
    cfg.write_text("run:\n  checkpoint_every_steps: 1\n  threads: 1\n")
    assert cli("pretrain", *common, "--out", ref, "--config", cfg).returncode == 0
    run, ckpt = tmp_path / "run", tmp_path / "run" / "checkpoint.pt"
    rng = random.Random(0)
    kills, resumes = 0, 0
    for attempt in range(12):
        args = ["pretrain", *common, "--out", run, "--config", cfg] if not ckpt.exists() else \
            ["pretrain", "--out", run, "--resume"]
        resumes += args[-1] == "--resume"
        before = _mtime(ckpt)
        proc = subprocess.Popen([sys.executable, "-m", "edgessl", *map(str, args)], stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 120
        while proc.poll() is None and _mtime(ckpt) == before and time.monotonic() < deadline:
            time.sleep(0.005)  # training has not written a new checkpoint yet
        time.sleep(rng.uniform(0.0, 0.3))
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            kills += 1
        proc.wait(timeout=120)
        if ckpt.exists():
            checkpoint.load(ckpt)  # never half a checkpoint
        if proc.returncode == 0:
            break
    else:
        assert cli("pretrain", "--out", run, "--resume").returncode == 0
    assert kills >= 2 and resumes >= 2, (kills, resumes)
    assert strip_timing(ref / "steps.csv") == strip_timing(run / "steps.csv")
    assert strip_timing(ref / "metrics.csv") == strip_timing(run / "metrics.csv")
    a, b = (checkpoint.load(d / "checkpoint.pt")["model"] for d in (ref, run))
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_malicious_checkpoint_runs_no_code(tiny_npz, tmp_path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    run = tmp_path / "run"
    run.mkdir()
    with open(run / "checkpoint.pt", "wb") as f:
        torch.save({"format": "edgessl-checkpoint", "payload": Evil()}, f)
    r = cli("pretrain", "--out", run, "--resume")
    assert r.returncode == 2 and "refusing to load" in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr  # no pickle-protocol warning before it
    r = cli("export", run, "--out", tmp_path / "m.onnx")
    assert r.returncode == 2 and "refusing to load" in r.stderr
    with open(tmp_path / "raw.pkl", "wb") as f:
        pickle.dump(Evil(), f)
    with pytest.raises(EdgesslError, match="refusing to load|not a torch file"):
        checkpoint.load(tmp_path / "raw.pkl")
    assert not marker.exists()


def test_truncated_checkpoint_is_refused(tiny_npz, tmp_path):
    pretrain(tiny_config(f"npz:{tiny_npz}", optim={"epochs": 1}), tmp_path / "run", log=lambda *_: None)
    data = (tmp_path / "run" / "checkpoint.pt").read_bytes()
    (tmp_path / "run" / "checkpoint.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(EdgesslError, match="truncated or not a torch file"):
        checkpoint.load(tmp_path / "run" / "checkpoint.pt")


def bad_folder(root):
    rng = np.random.default_rng(0)
    good = {}
    root.mkdir()
    arr = rng.integers(0, 256, (40, 30, 3), dtype=np.uint8)
    Image.fromarray(arr).save(root / "rgb.png")
    Image.fromarray(arr).convert("RGBA").save(root / "rgba.png")
    Image.fromarray(arr).convert("P").save(root / "palette.png")
    Image.fromarray(arr).convert("L").save(root / "gray.png")
    Image.fromarray(arr).convert("CMYK").save(root / "cmyk.jpg")
    Image.fromarray((arr[..., 0].astype(np.uint16) * 257)).save(root / "deep16.png")
    marked = np.zeros((20, 40, 3), dtype=np.uint8)
    marked[:, :20] = 255  # left half white; orientation 6 rotates it to the top on display
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(marked).save(root / "exif.jpg", exif=exif, quality=95)
    good.update({p.name: p for p in root.iterdir()})
    (root / "empty.png").write_bytes(b"")
    Image.fromarray(arr).save(root / "trunc.jpg")
    (root / "trunc.jpg").write_bytes((root / "trunc.jpg").read_bytes()[:300])
    (root / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(200)))
    (root / "notes.jpg").write_text("this is not an image")
    Image.fromarray(arr[:4, :4]).save(root / "tiny.png")
    return good, {"empty.png", "trunc.jpg", "corrupt.png", "notes.jpg", "tiny.png"}


def test_bad_images_fail_lists_every_one_before_training(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    _, bad = bad_folder(tmp_path / "imgs")
    r = cli("pretrain", "--data", f"folder:{tmp_path / 'imgs'}", "--out", tmp_path / "run", "--image-size", "16",
            "--batch-size", "4", "--backbone", "mobilenetv3_small_050", "--epochs", "1",
            env={**os.environ, "XDG_CACHE_HOME": str(tmp_path / "cache")})
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "5 of 12 images" in r.stderr
    for name in bad:
        assert name in r.stderr, name
    assert not (tmp_path / "run").exists()


def test_bad_images_skip_trains_on_the_rest(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    good, bad = bad_folder(tmp_path / "imgs")
    cfg = tiny_config(f"folder:{tmp_path / 'imgs'}", data={"spec": f"folder:{tmp_path / 'imgs'}",
                                                            "bad_images": "skip", "image_size": 16,
                                                            "val_fraction": 0.0},
                      optim={"epochs": 1, "batch_size": 4})
    pretrain(cfg, tmp_path / "run", log=lambda *_: None)
    listed = (tmp_path / "run" / "bad_images.txt").read_text().splitlines()
    assert {os.path.basename(line.split("\t")[0]) for line in listed} == bad
    assert checkpoint.load(tmp_path / "run" / "checkpoint.pt")["model"]["bank"].shape[0] == len(good)


def test_images_that_decode_are_converted_correctly(tmp_path):
    good, _ = bad_folder(tmp_path / "imgs")
    d = load(f"folder:{tmp_path / 'imgs'}", 16, bad_images="skip")
    names = sorted(good)
    img = {n: d.images[i] for i, n in enumerate(names)}
    assert torch.equal(img["gray.png"][0], img["gray.png"][1])  # grayscale -> 3 equal channels
    assert int(img["deep16.png"][0].max()) > 200  # 16-bit scaled, not saturated to 255 everywhere
    assert int(img["deep16.png"][0].min()) < 60
    assert (img["rgba.png"].float() - img["rgb.png"].float()).abs().max() == 0  # alpha dropped
    top, bottom = img["exif.jpg"][:, :8].float().mean(), img["exif.jpg"][:, 8:].float().mean()
    assert top > 200 and bottom < 50  # EXIF orientation applied: the white half is on top
    assert (img["cmyk.jpg"].float() - img["rgb.png"].float()).abs().mean() < 20


def test_run_dir_must_be_writable_with_free_space(tmp_path, monkeypatch):
    import shutil
    from collections import namedtuple

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(10**9, 10**9 - 10**6, 10**6))
    with pytest.raises(EdgesslError, match="free"):
        check_run_dir(tmp_path / "run", resume=False)
    monkeypatch.undo()
    monkeypatch.setattr(os, "access", lambda p, mode: False)
    with pytest.raises(EdgesslError, match="cannot write"):
        check_run_dir(tmp_path / "run", resume=False)


def test_same_seed_same_metrics(tiny_npz, tmp_path):
    for name in ("a", "b"):
        pretrain(tiny_config(f"npz:{tiny_npz}", optim={"epochs": 2}), tmp_path / name, log=lambda *_: None)
    assert strip_timing(tmp_path / "a" / "metrics.csv") == strip_timing(tmp_path / "b" / "metrics.csv")
    assert (tmp_path / "a" / "steps.csv").read_text() == (tmp_path / "b" / "steps.csv").read_text()


def test_cli_usage_errors_are_one_line(tmp_path):
    r = cli("pretrain", "--out", tmp_path / "r", "--method", "mocov9")
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "mocov9" in r.stderr
    r = cli("export", tmp_path, "--out", tmp_path / "m.onnx")
    assert r.returncode == 2 and "no checkpoint" in r.stderr


KINDS = st.sampled_from(["npz", "cifar10", "cifar100", "fashion-mnist", "folder", "bogus", "", "NPZ"])
TEXT = st.text(alphabet=st.characters(blacklist_categories=["Cs"], blacklist_characters="\x00"), max_size=20)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(kind=KINDS, sep=st.sampled_from([":", "", "?", ":?"]), tail=TEXT)
def test_fuzz_dataset_specs(tmp_path, kind, sep, tail):
    """Any spec gives data or an EdgesslError, never another exception (paths stay under tmp)."""
    rel = tail.replace("/", "_").replace("..", "_")
    spec = f"{kind}{sep}{tmp_path}/{rel}" if sep.startswith(":") else f"{kind}{sep}{rel}"
    try:
        load(spec)
    except EdgesslError:
        pass


VALUES = st.recursive(st.none() | st.booleans() | st.integers(-5, 10**6) | st.floats(allow_nan=True) | TEXT,
                      lambda inner: st.lists(inner, max_size=3) | st.dictionaries(TEXT, inner, max_size=3),
                      max_leaves=6)
SECTIONS = st.sampled_from(["data", "augment", "backbone", "method", "optim", "run", "nope"])
KEYS = st.sampled_from(["lr", "epochs", "temperature", "negatives", "head_dims", "crop_scale", "minutes",
                        "bank_update", "seed", "image_size", "spec", "bad_images", "downsample", "nothing"])


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(SECTIONS, st.dictionaries(KEYS, VALUES, max_size=3) | VALUES, max_size=3))
def test_fuzz_config(overrides):
    try:
        from_dict(overrides)
    except ConfigError:
        pass


def test_checkpointing_often_does_not_change_the_run(tiny_npz, tmp_path):
    often = tiny_config(f"npz:{tiny_npz}", optim={"epochs": 2}, run={"checkpoint_every_minutes": 1e-9,
                                                                     "knn_k": 5, "threads": 1})
    pretrain(often, tmp_path / "often", log=lambda *_: None)
    pretrain(tiny_config(f"npz:{tiny_npz}", optim={"epochs": 2}), tmp_path / "plain", log=lambda *_: None)
    assert (tmp_path / "often" / "steps.csv").read_text() == (tmp_path / "plain" / "steps.csv").read_text()


RACE = ("import sys; from edgessl.runfiles import record_export\n"
        "for i in range(25): record_export(sys.argv[1], f'{sys.argv[2]}-{i}.onnx', {'n': i})")


def test_exports_into_one_run_at_once_all_land_in_exports_json(tmp_path):
    """Four processes each recording 25 exports into one run at the same time: all 100 entries
    are in exports.json (a read-merge-write without the lock loses some)."""
    procs = [subprocess.Popen([sys.executable, "-c", RACE, str(tmp_path), f"p{k}"]) for k in range(4)]
    assert [p.wait() for p in procs] == [0] * 4
    records = json.loads((tmp_path / "exports.json").read_text())
    assert len(records) == 100 and {r["n"] for r in records.values()} == set(range(25))


HOLD = ("import sys, time; from edgessl.runfiles import run_lock\n"
        "with run_lock(sys.argv[1], shared=sys.argv[2] == 'shared'):\n"
        "    print('held', flush=True); time.sleep(120)")


@pytest.fixture(scope="module")
def locked_run(tmp_path_factory):
    from conftest import tiny_pretrained_run

    root = tmp_path_factory.mktemp("lock")
    train, _ = tiny_pretrained_run(root)
    return root / "run", train


def hold(run_dir, mode: str) -> subprocess.Popen:
    """Another process holding the run's lock, as a training (exclusive) or a writer beside it (shared) does."""
    p = subprocess.Popen([sys.executable, "-c", HOLD, str(run_dir), mode], stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "held"
    return p


WRITERS = {"export": ["export", "RUN", "--out", "OUT/m.onnx"], "report": ["report", "RUN", "--out", "OUT/r.html"],
           "select": ["select", "RUN", "--budget", "3", "--out", "OUT/p.csv"],
           "benchmark": ["benchmark", "RUN", "--formats", "onnx", "--precisions", "fp32"],
           "check": ["check", "OUT/none.onnx", "--against", "RUN"]}


@pytest.mark.parametrize("command", WRITERS)
def test_every_command_that_writes_into_a_run_waits_for_its_training(locked_run, tmp_path, command):
    """While a training holds the run (its exclusive lock), each command that writes into the run
    is refused with one line naming the holder, before it writes anything."""
    run_dir, _ = locked_run
    before = sorted(p.name for p in run_dir.iterdir())
    holder = hold(run_dir, "exclusive")
    try:
        r = cli(*[str(run_dir) if a == "RUN" else a.replace("OUT", str(tmp_path)) for a in WRITERS[command]])
    finally:
        holder.kill()
        holder.wait()
    assert r.returncode == 2 and r.stderr.strip() == (
        f"error: {run_dir} is in use by edgessl pid {holder.pid}; wait for it to end"), r.stderr
    assert sorted(p.name for p in run_dir.iterdir()) == before and not list(tmp_path.iterdir())


def test_a_training_waits_for_the_commands_writing_beside_it_and_they_share(locked_run, tmp_path):
    """A shared holder (an export in progress) lets a report write, and refuses a resume of the run."""
    run_dir, _ = locked_run
    holder = hold(run_dir, "shared")
    try:
        shared = cli("report", run_dir, "--out", tmp_path / "r.html")
        resume = cli("pretrain", "--out", run_dir, "--resume")
    finally:
        holder.kill()
        holder.wait()
    assert shared.returncode == 0 and (tmp_path / "r.html").exists(), shared.stderr
    assert resume.returncode == 2 and resume.stderr.strip() == (
        f"error: {run_dir} is in use by another edgessl command; wait for it to end or choose another --out")


def test_two_exports_into_one_run_at_once_both_land(locked_run, tmp_path):
    run_dir, _ = locked_run
    procs = [subprocess.Popen([sys.executable, "-m", "edgessl", "export", str(run_dir), "--out",
                               str(tmp_path / f"m{k}.onnx")], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                              text=True) for k in range(2)]
    assert [p.wait(timeout=300) for p in procs] == [0, 0], [p.stderr.read() for p in procs]
    records = json.loads((run_dir / "exports.json").read_text())
    assert {str((tmp_path / f"m{k}.onnx").resolve()) for k in range(2)} <= set(records)
