"""The CLI: --help everywhere, bad input as one line and exit 2, --json on the last line."""
import json
import subprocess
import sys

import pytest
from click.testing import CliRunner

from edgessl.cli import cli

COMMANDS = [[], ["pretrain"], ["export"], ["check"], ["probe"], ["finetune"], ["embed"], ["report"], ["cache"],
            ["cache", "list"], ["cache", "clean"]]


def run(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "edgessl", *args], capture_output=True, text=True, cwd=cwd,
                          timeout=300)


@pytest.mark.parametrize("cmd", COMMANDS, ids=lambda c: " ".join(c) or "edgessl")
def test_help_shows_defaults(cmd):
    r = CliRunner().invoke(cli, [*cmd, "--help"])
    assert r.exit_code == 0, r.output
    if cmd == ["pretrain"]:
        assert "[default: mobilenetv3]" in r.output and "--resume" in r.output and "[default: picked: 64, less for a small set]" in r.output


def test_console_help_runs():
    r = run("--help")
    assert r.returncode == 0 and "pretrain" in r.stdout


@pytest.mark.parametrize("args,msg", [
    (["--backbone", "mobilenetv3_smal_100"], "unknown backbone"),
    (["--data", "npz:/nope.npz"], "path not found"),
    (["--data", "bogus"], "malformed dataset spec"),
    (["--batch-size", "4096"], "larger than"),
    (["--config", "BAD"], "unknown config key 'optim.lrr'"),
])
def test_bad_input_is_one_line_exit_2(tiny_npz, tmp_path, args, msg):
    bad = tmp_path / "bad.yaml"
    bad.write_text("optim:\n  lrr: 1\n")
    args = [str(bad) if a == "BAD" else a for a in args]
    data = [] if "--data" in args else ["--data", f"npz:{tiny_npz}"]
    data += [] if "--batch-size" in args else ["--batch-size", "8"]
    out = tmp_path / "run"
    r = run("pretrain", *data, "--out", str(out), "--epochs", "1", *args)
    assert r.returncode == 2, r.stderr
    assert msg in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert not out.exists()


@pytest.mark.slow
def test_pretrain_json_and_resume(tiny_npz, tmp_path):
    out = tmp_path / "run"
    common = ["--data", f"npz:{tiny_npz}", "--out", str(out), "--backbone", "mobilenetv3_small_050",
              "--batch-size", "8", "--val-fraction", "0.25", "--method", "npid"]
    r = run("pretrain", *common, "--epochs", "1", "--json")
    assert r.returncode == 0, r.stderr
    summary = json.loads(r.stdout.strip().splitlines()[-1])
    for key in ("run_dir", "epochs", "steps", "seconds", "images_per_s", "peak_mem_mb", "final_loss"):
        assert key in summary, key
    assert summary["epochs"] == 1 and summary["method"] == "npid"
    assert "kNN top-1" in r.stdout
    again = run("pretrain", *common, "--epochs", "1")
    assert again.returncode == 2 and "already holds a run" in again.stderr
    resumed = run("pretrain", "--out", str(out), "--resume", "--json")
    assert resumed.returncode == 0, resumed.stderr
    assert json.loads(resumed.stdout.strip().splitlines()[-1])["steps"] == summary["steps"]


def test_npid_config_file_equals_method_flag(tiny_npz, tmp_path):
    from pathlib import Path

    cfg_path = Path(__file__).resolve().parents[1] / "configs" / "npid.yaml"
    r = run("pretrain", "--data", f"npz:{tiny_npz}", "--out", str(tmp_path / "r"), "--config", str(cfg_path),
            "--backbone", "mobilenetv3_small_050", "--batch-size", "8", "--epochs", "1")
    assert r.returncode == 0, r.stderr
    import yaml

    method = yaml.safe_load((tmp_path / "r" / "config.yaml").read_text())["method"]
    assert (method["name"], method["bank_init"], method["sqrtkl_weight"], method["cutmix_prob"]) == \
        ("npid", "random", 0.0, 0.0)
