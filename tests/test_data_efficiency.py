"""scripts/data_efficiency.py on a tiny run: its own split, every (fraction, init, seed) once,
JSON + PNG, resumable, and a table whose numbers come from the JSON."""
import importlib.util
import json
import sys

import pytest

from conftest import REPO, tiny_pretrained_run


def script():
    spec = importlib.util.spec_from_file_location("data_efficiency", REPO / "scripts" / "data_efficiency.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_data_efficiency_runs_its_grid_and_resumes(tmp_path, monkeypatch):
    tiny_pretrained_run(tmp_path)
    mod = script()
    out = tmp_path / "eff.json"
    argv = ["data_efficiency.py", str(tmp_path / "run"), "--fractions", "0.5,1.0", "--seeds", "0,1",
            "--epochs", "1", "--out", str(out)]
    monkeypatch.setattr(sys, "argv", argv)
    mod.main()
    results = json.loads(out.read_text())
    assert sorted(results) == sorted(f"{f}/{i}/{s}" for f in (0.5, 1.0)
                                    for i in ("semi", "pretrained", "random", "linear") for s in (0, 1))
    # the run's own split: 60 images, 25% held out -> 45 labelled, 15 test
    assert {r["n_labelled"] for r in results.values() if r["fraction"] == 1.0} == {45}
    assert all(r["test_top1"] * 15 / 100 == pytest.approx(round(r["test_top1"] * 15 / 100))  # k of 15 right
               for r in results.values())
    assert out.with_suffix(".png").stat().st_size > 1000
    mtime = out.stat().st_mtime_ns
    mod.main()  # everything is in the JSON: nothing runs again
    assert json.loads(out.read_text()) == results and out.stat().st_mtime_ns == mtime
    lines = mod.table(results).splitlines()
    assert len(lines) == 4 and lines[3].startswith("| 100% | 45 | ")
    semi, pre = ([r["test_top1"] for r in results.values() if r["fraction"] == 1.0 and r["init"] == arm]
                 for arm in ("semi", "pretrained"))
    assert f"{sum(semi) / 2:.2f} ±" in lines[3] and f"{sum(pre) / 2:.2f} ±" in lines[3]
    assert f"| {(sum(semi) - sum(pre)) / 2:+.2f} |" in lines[3]  # the gain of the unlabelled images
    lin = [r["test_top1"] for r in results.values() if r["fraction"] == 1.0 and r["init"] == "linear"]
    assert f"{sum(lin) / 2:.2f} ±" in lines[3]  # the linear probe on the same labelled images


def test_data_efficiency_per_class_counts(tmp_path, monkeypatch):
    tiny_pretrained_run(tmp_path)
    mod = script()
    out = tmp_path / "few.json"
    monkeypatch.setattr(sys, "argv", ["data_efficiency.py", str(tmp_path / "run"), "--per-class", "4", "--seeds", "0",
                                      "--epochs", "1", "--out", str(out)])
    mod.main()
    results = json.loads(out.read_text())
    assert sorted(results) == ["4/class/linear/0", "4/class/pretrained/0", "4/class/random/0", "4/class/semi/0"]
    assert {r["n_labelled"] for r in results.values()} == {12}  # 3 classes x 4
    assert mod.table(results).splitlines()[2].startswith("| 4/class | 12 | ")
    semi = results["4/class/semi/0"]
    assert semi["n_unlabelled"] == 45 and semi["unlabelled"] == "label propagation"  # the run's training images
