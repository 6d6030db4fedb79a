"""The CLI: --help everywhere, bad input as one line and exit 2, --json on the last line."""
import json
import subprocess
import sys

import pytest
import click
from click.testing import CliRunner

from edgessl.cli import cli
from click.core import UNSET
from edgessl.config import Config, FinetuneConfig, flagged

COMMANDS = [[], ["pretrain"], ["export"], ["benchmark"], ["check"], ["probe"], ["finetune"], ["select"], ["embed"],
            ["report"], ["cache"], ["cache", "list"], ["cache", "clean"]]


def run(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "edgessl", *args], capture_output=True, text=True, cwd=cwd,
                          timeout=300)


def test_every_command_is_listed():
    def names(group, prefix=()):
        for name, sub in group.commands.items():
            yield [*prefix, name]
            if isinstance(sub, click.Group):
                yield from names(sub, (*prefix, name))

    assert sorted(map(tuple, names(cli))) == sorted(tuple(c) for c in COMMANDS if c)


@pytest.mark.parametrize("cmd", COMMANDS, ids=lambda c: " ".join(c) or "edgessl")
def test_help_names_every_option_with_its_default(cmd):
    """--help shows each option and each default a user would otherwise have to guess."""
    r = CliRunner().invoke(cli, [*cmd, "--help"])
    assert r.exit_code == 0 and r.output.startswith("Usage: "), r.output
    command = cli
    for name in cmd:
        command = command.commands[name]
    flat = " ".join(r.output.split())
    for p in command.params:
        if isinstance(p, click.Option):
            assert p.opts[0] in flat, p.opts[0]
            shown = p.show_default or command.context_settings.get("show_default") or cli.context_settings.get(
                "show_default")
            if shown and not p.is_flag and p.default not in (None, UNSET, "", ()):
                assert "[default: " in flat, p.opts[0]


@pytest.mark.parametrize("name,cls", [("pretrain", Config), ("finetune", FinetuneConfig)])
def test_options_are_the_declared_settings(name, cls):
    """Each flag config.py declares is an option with its help, its rule when the data picks it
    (and then no fixed default), and the command has no setting option that is not declared."""
    command = cli.commands[name]
    options = {p.opts[0]: p for p in command.params if isinstance(p, click.Option)}
    declared = {f.metadata["flag"]: f for f in flagged(cls).values()}
    assert set(options) - set(declared) == {"--out", "--config", "--resume", "--json"} - \
        ({"--config"} if name == "finetune" else set())
    for flag, f in declared.items():
        opt = options[flag]
        assert opt.help.startswith(f.metadata["help"]), flag
        if f.metadata["auto"]:
            assert f"[default: picked: {f.metadata['auto']}]" in opt.help and opt.default in (None, UNSET), flag
        elif f.default not in (None, "", False):
            assert opt.default == f.default, flag


def test_flags_parse_to_config_values():
    """The text of a flag becomes the value the config takes (ints, ranges, on/off), via the API's shortcuts."""
    from edgessl import api
    from edgessl.config import from_dict

    args = ["--out", "x", "--downsample", "16", "--compile", "off", "--crop-scale", "0.3,1", "--negatives", "128",
            "--image-size", "48", "--fit", "squash", "--method", "npid", "--download", "--minutes", "2"]
    params = cli.commands["pretrain"].make_context("pretrain", args).params
    given = {k: params[k] for k in ("downsample", "compile", "crop_scale", "negatives", "image_size", "fit",
                                    "method", "download", "minutes")}
    cfg = from_dict(api.nest(given))
    assert (cfg.backbone.downsample, cfg.run.compile, cfg.augment.crop_scale, cfg.method.negatives) == \
        (16, False, (0.3, 1.0), 128)
    assert (cfg.data.image_size, cfg.data.fit, cfg.method.name, cfg.data.download, cfg.optim.minutes) == \
        (48, "squash", "npid", True, 2.0)
    with pytest.raises(click.BadParameter, match="MIN,MAX"):
        cli.commands["pretrain"].make_context("pretrain", ["--out", "x", "--crop-scale", "0.3"])


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
def test_a_healthy_run_prints_nothing_on_stderr(tmp_path):
    """Unlabelled images (no kNN curve for the report's legend), compiled on a CPU (inductor's C++
    build): stdout has the run, stderr nothing."""
    import numpy as np

    np.savez(tmp_path / "u.npz", x=np.random.default_rng(0).integers(0, 256, (32, 16, 16, 3), dtype=np.uint8))
    r = run("pretrain", "--data", f"npz:{tmp_path / 'u.npz'}", "--out", str(tmp_path / "run"), "--epochs", "1",
            "--backbone", "mobilenetv3_small_050", "--batch-size", "8", "--compile", "on", "--precision", "fp32")
    assert r.returncode == 0 and r.stderr == "", r.stderr
    assert "report" in r.stdout and (tmp_path / "run" / "report.html").exists()


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
    """configs/npid.yaml and --method npid give the same resolved recipe."""
    from pathlib import Path

    import yaml

    cfg_path = Path(__file__).resolve().parents[1] / "configs" / "npid.yaml"
    common = ["--data", f"npz:{tiny_npz}", "--backbone", "mobilenetv3_small_050", "--batch-size", "8",
              "--epochs", "1"]
    methods = []
    for name, how in (("file", ["--config", str(cfg_path)]), ("flag", ["--method", "npid"])):
        r = run("pretrain", *common, "--out", str(tmp_path / name), *how)
        assert r.returncode == 0, r.stderr
        methods.append(yaml.safe_load((tmp_path / name / "config.yaml").read_text())["method"])
    assert methods[0] == methods[1]
    assert (methods[0]["name"], methods[0]["bank_init"], methods[0]["bank_update"]) == ("npid", "random", "ema")


def test_usage_page_states_the_declared_rules_and_every_flag():
    """docs/usage.md holds the recipe table made from config.py and names every option of every command."""
    from conftest import REPO
    from edgessl.config import auto_table

    page = (REPO / "docs" / "usage.md").read_text()
    assert auto_table() in page

    def commands(group):
        for sub in group.commands.values():
            yield from commands(sub) if isinstance(sub, click.Group) else [sub]

    missing = [f"{c.name} {o}" for c in commands(cli) for p in c.params if isinstance(p, click.Option)
               for o in p.opts + p.secondary_opts if o not in page]
    assert not missing


# each command and the API call it is a shell over
API_OF = {"export": ("Run", "export"), "benchmark": ("Run", "benchmark"), "select": ("Run", "select"),
          "report": ("Run", "report"), "check": (None, "check"), "probe": (None, "probe"), "embed": (None, "embed"),
          "cache clean": (None, "clean_caches")}


@pytest.mark.parametrize("name", API_OF)
def test_the_options_are_the_apis_keywords_with_its_defaults(name):
    """Every option of a command is a keyword of its API call, and the option's default is the
    keyword's: the defaults are declared once."""
    import inspect

    from edgessl import api

    owner, fn = API_OF[name]
    params = inspect.signature(getattr(api.Run if owner else api, fn)).parameters
    command = cli
    for part in name.split():
        command = command.commands[part]
    options = [p for p in command.params if isinstance(p, click.Option) and p.name != "as_json"]
    assert options
    for p in options:
        assert p.name in params, f"{name} {p.opts[0]}: no keyword {p.name!r}"
        keyword = params[p.name].default
        if p.default not in (None, UNSET) and not p.is_flag and not p.required:
            assert p.default == keyword, f"{name} {p.opts[0]}: {p.default!r} != {keyword!r}"


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    from conftest import tiny_pretrained_run

    root = tmp_path_factory.mktemp("cli")
    train, _ = tiny_pretrained_run(root)
    return root / "run", train


BAD = [  # (argv, the API call, the one line both give)
    (["export", "RUN", "--out", "OUT/m.onnx", "--batch", "abc"], lambda api, run, data, out: api.Run(run).export(
        out / "m.onnx", batch="abc"), "--batch must be 'dynamic' or a positive integer, got 'abc'"),
    (["export", "RUN", "--out", "OUT/m.onnx", "--adapt-seconds", "0"], lambda api, run, data, out: api.Run(
        run).export(out / "m.onnx", adapt_seconds=0.0), "--adapt-seconds must be positive, got 0.0"),
    (["benchmark", "RUN", "--formats", "onnx,tensorrt"], lambda api, run, data, out: api.Run(run).benchmark(
        formats="onnx,tensorrt"), "unknown format or precision tensorrt (formats: onnx, openvino, litert, "
     "executorch; precisions: fp32, fp16, int8)"),
    (["check", "OUT/m.onnx", "--against", "RUN", "--batch-sizes", "1,x"], lambda api, run, data, out: api.check(
        out / "m.onnx", against=run, batch_sizes="1,x"), "--batch-sizes must be integers separated by commas, "
     "got '1,x'"),
    (["probe", "RUN", "--train", "DATA", "--test", "DATA", "--knn-k", "0"], lambda api, run, data, out: api.probe(
        run, data, data, knn_k=0), "--knn-k must be at least 1, got 0"),
    (["select", "RUN", "--budget", "0", "--out", "OUT/p.csv"], lambda api, run, data, out: api.Run(run).select(
        0, out / "p.csv"), "--budget must be a positive integer, got 0"),
    (["cache", "clean", "--older-than", "-1"], lambda api, run, data, out: api.clean_caches(-1.0),
     "--older-than must be 0 or more days, got -1.0"),
]


@pytest.mark.parametrize("argv,call,message", BAD, ids=[" ".join(b[0][:1] + b[0][-2:]) for b in BAD])
def test_the_api_checks_its_input_with_the_clis_line(tiny_run, tmp_path, argv, call, message):
    """The same bad value through the CLI and through Python: one line, the same words, nothing written."""
    from edgessl import api

    run_dir, data = tiny_run
    r = run(*[str(run_dir) if a == "RUN" else data if a == "DATA" else a.replace("OUT", str(tmp_path))
              for a in argv])
    assert r.returncode == 2 and r.stderr.strip() == f"error: {message}", r.stderr
    with pytest.raises(api.EdgesslError) as e:
        call(api, run_dir, data, tmp_path)
    assert str(e.value) == message
    assert not list(tmp_path.iterdir())


def test_a_setting_the_method_does_not_read_is_refused_for_it(tiny_npz, tmp_path):
    """Each method owns its settings: a memory-bank setting for SimCLR or BYOL is one line, from the
    CLI and from Python alike, and SimCLR's recipe picks no negatives."""
    import edgessl
    from edgessl import ConfigError

    r = run("pretrain", "--data", f"npz:{tiny_npz}", "--out", str(tmp_path / "r"), "--method", "simclr",
            "--negatives", "64", "--epochs", "1")
    assert r.returncode == 2 and r.stderr.strip() == (
        "error: --negatives (method.negatives) is not a setting of simclr (its settings: head_dims, temperature)")
    with pytest.raises(ConfigError, match=r"^method.sqrtkl_weight is not a setting of byol \(its settings: "
                                          r"head_dims, predictor_dims, byol_momentum\)$"):
        edgessl.pretrain(data=f"npz:{tiny_npz}", out=tmp_path / "b", method={"name": "byol", "sqrtkl_weight": 1.0})
    assert not (tmp_path / "r").exists() and not (tmp_path / "b").exists()
    picks = edgessl.Trainer(data=f"npz:{tiny_npz}", method="simclr", batch_size=8, precision="fp32").choices
    assert "method.negatives" not in {c.key for c in picks} and "optim.batch_size" in {c.key for c in picks}
    picks = edgessl.Trainer(data=f"npz:{tiny_npz}", batch_size=8, precision="fp32").choices
    assert "method.negatives" in {c.key for c in picks}


def test_a_stop_request_is_exit_130_and_bad_input_exit_2(monkeypatch, capsys):
    """cli.main's mapping: Stopped (work saved to continue from, e.g. an int8 student) is one
    'stopped:' line and exit 130; any other EdgesslError one 'error:' line and exit 2."""
    from edgessl import cli as cli_module
    from edgessl.errors import EdgesslError, Stopped

    for error, code, line in ((Stopped("kept in RUN/students/x.pt"), 130, "stopped: kept in RUN/students/x.pt"),
                              (EdgesslError("no such run"), 2, "error: no such run")):
        class Failing:  # a run whose export raises `error`
            def __init__(self, path, error=error):
                self.error = error

            def export(self, *args, **kwargs):
                raise self.error

        monkeypatch.setattr(cli_module, "Run", Failing)
        monkeypatch.setattr(sys, "argv", ["edgessl", "export", "RUN", "--out", "x.onnx"])
        with pytest.raises(SystemExit) as e:
            cli_module.main()
        assert e.value.code == code and capsys.readouterr().err.strip() == line
