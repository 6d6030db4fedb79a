"""scripts/gpu_check.py's CPU dry run: every part runs and lands in the JSON and the table."""
import json
import subprocess
import sys

import pytest

from conftest import REPO


@pytest.mark.slow
def test_gpu_check_dry_run(tmp_path):
    r = subprocess.run([sys.executable, str(REPO / "scripts" / "gpu_check.py"), "--dry-run", "--out", str(tmp_path)],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    result = json.loads((tmp_path / "gpu_check.json").read_text())
    assert result["dry_run"] and result["device"] == "cpu"
    assert result["tests"]["returncode"] == 0 and "passed" in result["tests"]["summary"]
    rows = result["throughput"]
    assert {r["method"] for r in rows} == {"memdistill", "simclr"}
    assert all(r["images_per_s"] > 0 and r["peak_mem_mb"] > 0 and "error" not in r for r in rows)
    assert all(r["trained_px"] == r["size"] for r in rows)  # the size asked for, not the recipe's pick
    assert [r["mode"] for r in rows] == ["eager", "eager", "captured"]  # (a CPU's captured row steps eagerly)
    for method in ("memdistill", "simclr"):  # 13 held-out images (20% of 64): a kNN score is k of 13 right
        arm = result["equal_budget"][f"synthetic {method}"]
        assert arm["knn_top1"] * 13 / 100 == pytest.approx(round(arm["knn_top1"] * 13 / 100), abs=0.01)
        assert arm["epochs"] == 1 and "capture off (a CPU)" in arm["recipe"]
    table = (tmp_path / "gpu_check.md").read_text()
    assert table.count("| memdistill |") == 2 and "test suite:" in table
    r = subprocess.run([sys.executable, str(REPO / "scripts" / "gpu_check.py"), "--dry-run", "--out", str(tmp_path),
                        "--parts", "tests"], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr  # one part again: the others' results are kept
    again = json.loads((tmp_path / "gpu_check.json").read_text())
    assert again["throughput"] == rows and set(again["part_seconds"]) == {"tests", "throughput", "equal_budget"}
