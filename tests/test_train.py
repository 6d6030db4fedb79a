"""End to end on tiny data: artefacts, exact resume, budgets, NaN, schedules."""
import csv

import pytest
import torch
import yaml

from conftest import INDUCTOR_ON_AVX2, REPO, tiny_config
from edgessl import EdgesslError, checkpoint
from edgessl.schedule import lr_at, plan_epochs, replan_epochs, size_at
from edgessl.train import pretrain

pytestmark = pytest.mark.numeric  # run again with the CPU capped to AVX2 (make test-avx2)


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def quiet(*_):
    pass


def test_two_epochs_write_every_artefact(tiny_npz, tmp_path):
    cfg = tiny_config(f"npz:{tiny_npz}")
    run = tmp_path / "run"
    logged = []
    out = pretrain(cfg, run, log=logged.append)
    assert {p.name for p in run.iterdir()} == {"config.yaml", "metrics.csv", "steps.csv", "checkpoint.pt", ".lock"}
    assert yaml.safe_load((run / "config.yaml").read_text())["optim"]["epochs"] == 2
    rows = read_csv(run / "metrics.csv")
    assert [r["epoch"] for r in rows] == ["0", "1", "2"]  # epoch 0: the untrained network
    for r in rows[1:]:
        for key in ("loss", "loss_id", "loss_sqrtkl", "lr", "seconds", "images_per_s", "peak_mem_mb", "knn_top1"):
            assert r[key] != "", key
    assert len(read_csv(run / "steps.csv")) == out["steps"] == 2 * (36 // 8)
    assert out["epochs"] == 2 and out["final_loss"] > 0 and out["knn_pixels"] is not None
    state = checkpoint.load(run / "checkpoint.pt")
    assert state["position"]["step"] == 8 and state["config"]["optim"]["batch_size"] == 8
    assert state["backbone"]["timm_name"] == "mobilenetv3_small_050"
    assert torch.allclose(state["model"]["bank"].norm(dim=1), torch.ones(36), atol=1e-5)


@pytest.mark.parametrize("zeroed", [False, True])
def test_the_summary_notes_features_no_better_than_pixels(tiny_npz, tmp_path, zeroed):
    """Held-out images that are the training images, k=1: raw pixels find each one itself (100%). So
    does a network with features (no note); one whose weights are all zero, trained at a negligible
    rate, gives every image the same features, ties everywhere, and gets the note."""
    from safetensors.torch import save_file

    from edgessl.backbones import create_backbone

    init = None
    if zeroed:
        init = tmp_path / "zero.safetensors"
        save_file({k: torch.zeros_like(v) for k, v in create_backbone("mobilenetv3_small_050", 16).state_dict().items()},
                  init)
    cfg = tiny_config(f"npz:{tiny_npz}", data={"val_fraction": 0.0, "val_spec": f"npz:{tiny_npz}"},
                      backbone={"init_weights": str(init) if init else None},
                      optim={"epochs": 1, **({"lr": 1e-12} if zeroed else {})}, run={"knn_k": 1})
    logged = []
    out = pretrain(cfg, tmp_path / "run", log=logged.append)
    assert out["knn_pixels"] == 100.0 and (out["knn_top1"] == 100.0) != zeroed
    assert ("note       trained kNN is not above raw pixels" in logged[-1]) == zeroed


def test_last_epoch_is_always_monitored(tiny_npz, tmp_path):
    cfg = tiny_config(f"npz:{tiny_npz}", run={"monitor_every": 5, "knn_k": 5, "threads": 1})
    out = pretrain(cfg, tmp_path / "run", log=quiet)
    rows = read_csv(tmp_path / "run" / "metrics.csv")
    assert rows[1]["knn_top1"] == "" and rows[2]["knn_top1"] != ""
    assert out["knn_top1"] == pytest.approx(float(rows[2]["knn_top1"]), abs=0.01)


def test_training_lowers_loss_and_moves_the_bank(tiny_npz, tmp_path):
    from edgessl.train import build, calibrate

    # bank momentum 0.5: at this size (16 px, batch 8, 24 steps) the default 0.2's larger bank step left the
    # loss of the last steps above the first (7.3 -> 8.2 against 7.3 -> 6.3 at 0.5)
    cfg = tiny_config(f"npz:{tiny_npz}", optim={"epochs": 6},
                      method={"head_dims": [32, 16], "cutmix_prob": 0.0, "bank_momentum": 0.5})
    s = build(cfg)  # the same seed: the run's own untrained network and calibrated bank
    calibrate(s)
    start = s.model.bank.clone()
    pretrain(cfg, tmp_path / "run", log=quiet)
    losses = [float(r["loss"]) for r in read_csv(tmp_path / "run" / "steps.csv")]
    assert sum(losses[-4:]) < sum(losses[:4])
    bank = checkpoint.load(tmp_path / "run" / "checkpoint.pt")["model"]["bank"]
    assert torch.allclose(bank.norm(dim=1), torch.ones(len(bank)), atol=1e-5)
    moved = (bank * start).sum(1)  # cosine of each row with where it started
    assert bool((moved < 0.999).all()), "every row is scored each step under `all`: every row moves"


def _bank_after(cfg, run):
    pretrain(cfg, run, log=quiet)
    return checkpoint.load(run / "checkpoint.pt")["model"]["bank"]


def test_calibrated_bank_differs_from_random(tiny_npz, tmp_path):
    torch.manual_seed(0)
    a = _bank_after(tiny_config(f"npz:{tiny_npz}", optim={"epochs": 1}), tmp_path / "a")
    b = _bank_after(tiny_config(f"npz:{tiny_npz}", optim={"epochs": 1},
                                method={"head_dims": [32, 16], "bank_init": "random"}), tmp_path / "b")
    # calibrated rows start as features of similar images: far more similar to one another than random rows
    assert (a @ a.T).mean() > (b @ b.T).mean() + 0.1


@pytest.mark.parametrize("stop", [5, 4])  # mid-epoch, and exactly at an epoch end
@pytest.mark.parametrize("update", ["ema", "grad"])
def test_resume_is_bit_exact(tiny_npz, tmp_path, stop, update):
    cfg = tiny_config(f"npz:{tiny_npz}", optim={"epochs": 3},
                      method={"head_dims": [32, 16], "bank_update": update})
    pretrain(cfg, tmp_path / "full", log=quiet)
    pretrain(cfg, tmp_path / "cut", stop_at_step=stop, log=quiet)
    assert checkpoint.load(tmp_path / "cut" / "checkpoint.pt")["position"]["step"] == stop
    pretrain(cfg, tmp_path / "cut", resume=True, log=quiet)
    full_steps, cut_steps = (read_csv(tmp_path / r / "steps.csv") for r in ("full", "cut"))
    assert len(full_steps) == 12 and full_steps == cut_steps  # every loss equal, bit for bit (repr)
    a, b = (checkpoint.load(tmp_path / r / "checkpoint.pt") for r in ("full", "cut"))
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    drop = ("seconds", "images_per_s", "peak_mem_mb")
    strip = [{k: v for k, v in r.items() if k not in drop} for r in read_csv(tmp_path / "full" / "metrics.csv")]
    assert strip == [{k: v for k, v in r.items() if k not in drop} for r in read_csv(tmp_path / "cut" / "metrics.csv")]


def test_progressive_resolution_schedule():
    assert [size_at(s, 12, 16, 8, 0.5) for s in range(12)] == [8, 8, 8, 12, 12, 12, 16, 16, 16, 16, 16, 16]
    assert [size_at(s, 10, 32, 24, 1.0) for s in (0, 4, 5, 9, 10)] == [24, 24, 28, 28, 32]
    assert size_at(0, 10, 32, None) == size_at(0, 10, 32, 32) == size_at(0, 10, 32, 40) == 32  # off


def test_progressive_resolution_trains_small_first_and_resumes_bit_exact(tiny_npz, tmp_path, monkeypatch):
    from edgessl.augment import BatchAugment

    sides, augment = [], BatchAugment._augment
    monkeypatch.setattr(BatchAugment, "_augment", lambda self, x, size: sides.append(size) or augment(self, x, size))
    cfg = tiny_config(f"npz:{tiny_npz}", optim={"epochs": 3}, augment={"start_size": 8, "ramp": 0.5})
    pretrain(cfg, tmp_path / "full", log=quiet)
    assert sides == [8, 8, 8, 12, 12, 12, 16, 16, 16, 16, 16, 16]
    pretrain(cfg, tmp_path / "cut", stop_at_step=5, log=quiet)
    pretrain(cfg, tmp_path / "cut", resume=True, log=quiet)
    assert read_csv(tmp_path / "full" / "steps.csv") == read_csv(tmp_path / "cut" / "steps.csv")
    a, b = (checkpoint.load(tmp_path / r / "checkpoint.pt")["model"] for r in ("full", "cut"))
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
@INDUCTOR_ON_AVX2
def test_a_compiled_run_learns_like_eager_and_resumes_bit_exact(tiny_npz, tmp_path):
    """run.compile: the first step's loss equals eager's (to float rounding: the same weights,
    batch and augmentation), and a compiled run resumes bit for bit."""
    cfg = tiny_config(f"npz:{tiny_npz}", optim={"epochs": 2}, run={"compile": True, "precision": "fp32"})
    pretrain(cfg, tmp_path / "full", log=quiet)
    pretrain(tiny_config(f"npz:{tiny_npz}", optim={"epochs": 2}, run={"compile": False, "precision": "fp32"}),
             tmp_path / "eager", stop_at_step=1, log=quiet)
    assert yaml.safe_load((tmp_path / "full" / "config.yaml").read_text())["run"]["compile"] is True
    first = [read_csv(tmp_path / r / "steps.csv")[0] for r in ("full", "eager")]
    assert float(first[0]["loss"]) == pytest.approx(float(first[1]["loss"]), rel=1e-5)
    pretrain(cfg, tmp_path / "cut", stop_at_step=5, log=quiet)
    pretrain(cfg, tmp_path / "cut", resume=True, log=quiet)
    assert read_csv(tmp_path / "full" / "steps.csv") == read_csv(tmp_path / "cut" / "steps.csv")
    a, b = (checkpoint.load(tmp_path / r / "checkpoint.pt")["model"] for r in ("full", "cut"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_resume_refuses_a_changed_recipe(tiny_npz, tmp_path):
    cfg = tiny_config(f"npz:{tiny_npz}", optim={"epochs": 1})
    pretrain(cfg, tmp_path / "run", log=quiet)
    with pytest.raises(EdgesslError, match="optim.lr"):
        pretrain(tiny_config(f"npz:{tiny_npz}", optim={"epochs": 1, "lr": 0.5}), tmp_path / "run", resume=True)
    with pytest.raises(EdgesslError, match="already holds a run"):
        pretrain(cfg, tmp_path / "run")
    with pytest.raises(EdgesslError, match="no checkpoint"):
        pretrain(cfg, tmp_path / "other", resume=True)


def test_nan_stops_before_the_bank_takes_it(tiny_npz, tmp_path, monkeypatch):
    from edgessl.methods.memdistill import MemDistill

    cfg = tiny_config(f"npz:{tiny_npz}", optim={"epochs": 2})
    pretrain(cfg, tmp_path / "run", stop_at_step=2, log=quiet)
    good = checkpoint.load(tmp_path / "run" / "checkpoint.pt")
    real_embed = MemDistill.embed
    monkeypatch.setattr(MemDistill, "embed", lambda self, x: real_embed(self, x) * float("nan"))
    with pytest.raises(EdgesslError, match="at step 2"):
        pretrain(cfg, tmp_path / "run", resume=True, log=quiet)
    after = checkpoint.load(tmp_path / "run" / "checkpoint.pt")
    assert torch.equal(after["model"]["bank"], good["model"]["bank"])


def test_batch_larger_than_dataset(tiny_npz, tmp_path):
    with pytest.raises(EdgesslError, match="larger than the 36 training images"):
        pretrain(tiny_config(f"npz:{tiny_npz}", optim={"batch_size": 64}), tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_minutes_budget_plans_the_schedule(tiny_npz, tmp_path, monkeypatch):
    """The planner is asked once, after the first steps, with the budget in seconds, the steps
    timed and the epoch's length, and the run trains exactly the epochs it answers (the replan at
    each epoch end keeps them here)."""
    from edgessl import loop

    asked = []
    monkeypatch.setattr(loop, "PLAN_AFTER_STEPS", 2)
    monkeypatch.setattr(loop, "plan_epochs", lambda *args: asked.append(args) or 3)
    monkeypatch.setattr(loop, "replan_epochs", lambda budget, elapsed, step_s, done, per_epoch: 3)
    cfg = tiny_config(f"npz:{tiny_npz}", optim={"epochs": None, "minutes": 0.5}, run={"monitor_every": 0})
    out = pretrain(cfg, tmp_path / "run", log=quiet)
    (budget_s, elapsed_s, steps, per_epoch), = asked
    assert 29 < budget_s <= 30.0 and 0 < elapsed_s < 30  # (the bank's calibration is not training time)
    assert steps == 2 and per_epoch == 36 // 8
    position = checkpoint.load(tmp_path / "run" / "checkpoint.pt")["position"]
    assert out["epochs"] == position["epoch"] == position["planned_epochs"] == 3
    assert position["step"] == 3 * per_epoch


def test_lr_schedule_is_pure():
    assert lr_at(0, 100, 0, 1.0) == 1.0
    assert lr_at(50, 100, 0, 1.0) == pytest.approx(0.5)
    assert lr_at(100, 100, 0, 1.0) == pytest.approx(0.0)
    assert lr_at(4, 100, 10, 1.0) == pytest.approx(0.5)
    assert lr_at(10 + 45, 100, 10, 2.0) == pytest.approx(1.0)
    assert plan_epochs(60.0, 1.0, 10, 10) == 60  # 0.1 s a step, 10 steps an epoch: 60 epochs in a minute
    assert plan_epochs(1.0, 10.0, 10, 10) == 1
    # 30 s left at 0.1 s a step, 10 steps an epoch: 30 more epochs after the 5 done
    assert replan_epochs(60.0, 30.0, 0.1, 5, 10) == 35
    assert replan_epochs(60.0, 59.5, 0.1, 5, 10) == 6  # under an epoch left: one more, ending past the budget
    assert replan_epochs(60.0, 61.0, 0.1, 5, 10) == 5  # the budget is spent: this epoch was the last


def test_minutes_budget_is_replanned_when_the_first_steps_misjudge_it(tiny_npz, tmp_path, monkeypatch):
    from edgessl import loop

    # a first plan of one epoch, as slow warm-up steps can give; the budget holds several epochs
    monkeypatch.setattr(loop, "PLAN_AFTER_STEPS", 2)
    monkeypatch.setattr(loop, "plan_epochs", lambda *args: 1)
    cfg = tiny_config(f"npz:{tiny_npz}", optim={"epochs": None, "minutes": 0.05}, run={"monitor_every": 0})
    out = pretrain(cfg, tmp_path / "run", log=quiet)
    assert out["epochs"] > 1 and out["seconds"] >= 3.0
    position = checkpoint.load(tmp_path / "run" / "checkpoint.pt")["position"]
    assert position["planned_epochs"] == out["epochs"] == position["epoch"]


def test_checkpoint_loader_refuses_foreign_files(tmp_path):
    (tmp_path / "trunc.pt").write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(EdgesslError, match="truncated or not a torch file"):
        checkpoint.load(tmp_path / "trunc.pt")
    torch.save({"model": {}}, tmp_path / "foreign.pt")
    with pytest.raises(EdgesslError, match="not an edgessl checkpoint"):
        checkpoint.load(tmp_path / "foreign.pt")
    checkpoint.save({"x": 1}, tmp_path / "ok.pt")
    assert checkpoint.load(tmp_path / "ok.pt")["x"] == 1
    state = torch.load(tmp_path / "ok.pt", weights_only=True)
    state["format_version"] = 99
    torch.save(state, tmp_path / "new.pt")
    with pytest.raises(EdgesslError, match="format 99"):
        checkpoint.load(tmp_path / "new.pt")


def test_a_format_1_checkpoint_is_upgraded_on_load(tmp_path):
    """Runs stored before the fit and the input size were recorded: squash, and the backbone's size."""
    checkpoint.save({"config": {"data": {"spec": "npz:x", "fit": "auto", "image_size": None}},
                     "backbone": {"image_size": 40}}, tmp_path / "old.pt")
    state = torch.load(tmp_path / "old.pt", weights_only=True)
    state["format_version"] = 1
    torch.save(state, tmp_path / "old.pt")
    up = checkpoint.load(tmp_path / "old.pt")
    assert (up["config"]["data"]["fit"], up["config"]["data"]["image_size"], up["format_version"]) == \
        ("squash", 40, checkpoint.FORMAT_VERSION)
    checkpoint.save({"config": {"data": {"fit": "crop", "image_size": 96}}}, tmp_path / "new.pt")
    assert checkpoint.load(tmp_path / "new.pt")["config"]["data"] == {"fit": "crop", "image_size": 96}


def test_a_format_3_checkpoint_gets_the_one_position_and_the_one_spelling_of_auto(tmp_path):
    """Format 3 spelled the machine's auto 0 and kept fine-tuning's position in a dict of its own:
    the upgrade gives today's (a 0 is refused now), and a resume reads one Position from either."""
    from edgessl.config import from_dict
    from edgessl.errors import ConfigError
    from edgessl.loop import Position

    run = {"threads": 0, "augment_threads": 2, "sync_every": 0}
    checkpoint.save({"config": {"run": run}, "position": {"epoch": 3, "step": 30, "last_knn": 41.5}}, tmp_path / "a.pt")
    checkpoint.save({"position": {"epoch": 2, "step": 8, "seconds": 1.5, "test_top1": 60.0, "planned": 4}},
                    tmp_path / "b.pt")
    for name in ("a.pt", "b.pt"):
        state = torch.load(tmp_path / name, weights_only=True)
        state["format_version"] = 3
        torch.save(state, tmp_path / name)
    a, b = checkpoint.load(tmp_path / "a.pt"), checkpoint.load(tmp_path / "b.pt")
    assert a["config"]["run"] == {"threads": "auto", "augment_threads": 2, "sync_every": "auto"}
    assert Position.from_state(a["position"]) == Position(epoch=3, step=30, last_score=41.5)
    assert Position.from_state(b["position"]) == Position(epoch=2, step=8, elapsed=1.5, last_score=60.0,
                                                          planned_epochs=4)
    for key in ("threads", "augment_threads", "sync_every"):
        with pytest.raises(ConfigError, match=f"run.{key}' is out of range: 0"):
            from_dict({"run": {key: 0}})


@pytest.mark.parametrize("rows,negatives", [(5000, "all"), (20000, 4096)])
def test_a_format_2_checkpoint_gets_the_negatives_its_steps_used(tmp_path, rows, negatives):
    """Runs stored before the recipe recorded its negatives pick resolved "auto" at each step by
    the bank's size: the upgrade stores what those steps used (a method refuses "auto")."""
    checkpoint.save({"config": {"method": {"negatives": "auto"}}, "method_args": {"num_samples": rows}},
                    tmp_path / "old.pt")
    state = torch.load(tmp_path / "old.pt", weights_only=True)
    state["format_version"] = 2
    torch.save(state, tmp_path / "old.pt")
    assert checkpoint.load(tmp_path / "old.pt")["config"]["method"]["negatives"] == negatives


@pytest.mark.slow
def test_sigterm_checkpoints_at_a_step_boundary_and_resumes(tiny_npz, tmp_path):
    """A signal mid-run: the step finishes, a checkpoint is written, exit 130; --resume goes on."""
    from conftest import sigterm_once_checkpointed

    run = tmp_path / "run"
    code, out, err = sigterm_once_checkpointed(
        ["pretrain", "--data", f"npz:{tiny_npz}", "--out", str(run), "--backbone", "mobilenetv3_small_050",
         "--batch-size", "8", "--epochs", "400"], run / "checkpoint.pt")
    assert code == 130, err
    assert "Traceback" not in err and "--resume continues" in out
    step = checkpoint.load(run / "checkpoint.pt")["position"]["step"]
    assert 0 < step < 400 * 6
    assert len(read_csv(run / "steps.csv")) == step


def test_reading_the_loss_every_few_steps_changes_nothing_but_the_waits(tiny_npz, tmp_path, monkeypatch):
    """run.sync_every 3 (what a GPU gets): one read per 3 steps and per epoch end instead of one per step,
    and the same metrics, steps and weights as reading every step; a resume across it is exact."""
    from edgessl import loop

    reads = []
    real = loop.read_steps
    monkeypatch.setattr(loop, "read_steps", lambda s, pos, unread, *a: (reads.append(len(unread)) if unread else None,
                                                                         real(s, pos, unread, *a)))
    every = pretrain(tiny_config(f"npz:{tiny_npz}"), tmp_path / "every", log=quiet)
    assert reads == [1] * 8  # 2 epochs of 4 steps
    reads.clear()
    cfg = tiny_config(f"npz:{tiny_npz}", run={"sync_every": 3})
    pretrain(cfg, tmp_path / "third", stop_at_step=6, log=quiet)  # stops (and reads) inside epoch 2
    pretrain(cfg, tmp_path / "third", resume=True, log=quiet)
    assert reads == [3, 1, 2, 2]  # steps 0-2, 3 (epoch end), 4-5 (the stop), 6-7 (resumed, epoch end)
    third = checkpoint.load(tmp_path / "third" / "checkpoint.pt")
    first = checkpoint.load(tmp_path / "every" / "checkpoint.pt")
    for k, v in first["model"].items():
        assert torch.equal(v, third["model"][k]), k
    assert read_csv(tmp_path / "every" / "steps.csv") == read_csv(tmp_path / "third" / "steps.csv")
    assert [r["loss"] for r in read_csv(tmp_path / "every" / "metrics.csv")] == \
        [r["loss"] for r in read_csv(tmp_path / "third" / "metrics.csv")]
    assert every["final_loss"] == pytest.approx(float(read_csv(tmp_path / "third" / "metrics.csv")[-1]["loss"]))


def test_a_nan_read_late_still_leaves_the_checkpoint_from_before_it(tiny_npz, tmp_path, monkeypatch):
    from edgessl.methods.memdistill import MemDistill

    cfg = tiny_config(f"npz:{tiny_npz}", optim={"epochs": 2}, run={"sync_every": 8})
    pretrain(cfg, tmp_path / "run", stop_at_step=1, log=quiet)
    good = checkpoint.load(tmp_path / "run" / "checkpoint.pt")
    real_embed = MemDistill.embed
    monkeypatch.setattr(MemDistill, "embed", lambda self, x: real_embed(self, x) * float("nan"))
    with pytest.raises(EdgesslError, match="loss is nan at step 1"):  # read at the epoch end, 3 steps later
        pretrain(cfg, tmp_path / "run", resume=True, log=quiet)
    after = checkpoint.load(tmp_path / "run" / "checkpoint.pt")
    assert after["position"]["step"] == 1 and torch.equal(after["model"]["bank"], good["model"]["bank"])


@pytest.mark.parametrize("fused", [False, True])
def test_optimizer_step_reports_a_skipped_fp16_step_without_reading_the_scale(fused):
    from edgessl.optim import optimizer_step

    w = torch.nn.Parameter(torch.ones(3))
    opt = torch.optim.SGD([w], lr=0.1, fused=fused)  # a fused kernel unscales and skips inside its own step
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    ok = optimizer_step((w * 2).sum(), opt, scaler)
    assert isinstance(ok, torch.Tensor) and not bool(ok) and torch.allclose(w.detach(), torch.full((3,), 0.8))
    bad = optimizer_step((w * float("inf")).sum(), opt, scaler)
    assert bool(bad) and scaler.get_scale() == 512.0 and torch.allclose(w.detach(), torch.full((3,), 0.8))
    plain = torch.amp.GradScaler("cpu", enabled=False)
    assert optimizer_step((w * 2).sum(), opt, plain) is False and torch.allclose(w.detach(), torch.full((3,), 0.6))


@pytest.mark.parametrize("name", ["adamw", "sgd"])
def test_the_fused_optimizer_makes_the_for_loops_update(name):
    from edgessl.config import from_dict
    from edgessl.train import pretraining_optimizer as make_optimizer

    torch.manual_seed(0)
    # no bias before the BatchNorm: its gradient is float noise, which Adam would scale up to lr-sized steps
    nets = [torch.nn.Sequential(torch.nn.Linear(6, 5, bias=False), torch.nn.BatchNorm1d(5), torch.nn.Linear(5, 3))
            for _ in range(2)]
    nets[1].load_state_dict(nets[0].state_dict())
    start = nets[0][0].weight.detach().clone()
    opts = [make_optimizer(from_dict({"optim": {"name": name, "lr": 0.05, "fused": fused}}), net)
            for net, fused in zip(nets, (True, False))]
    assert opts[0].defaults["fused"] and not opts[1].defaults["fused"]
    for _ in range(5):
        x = torch.randn(8, 6)
        for net, opt in zip(nets, opts):
            opt.zero_grad()
            net(x).square().sum().backward()
            opt.step()
    assert (nets[0][0].weight - start).abs().max() > 0.05  # five steps moved the weights ...
    for a, b in zip(nets[0].parameters(), nets[1].parameters()):  # ... alike, to float rounding
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_the_usage_page_names_exactly_the_keys_a_resume_may_change():
    import re

    from edgessl.train import BUDGET_KEYS

    page = (REPO / "docs" / "usage.md").read_text()
    named = re.search(r"resume keys: (.*?)\);", page, re.S).group(1)
    assert set(re.findall(r"`([a-z_]+\.[a-z_]+)`", named)) == {f"{s}.{k}" for s, k in BUDGET_KEYS}


def test_one_weight_decay_rule_with_a_learning_rate_scale_per_part():
    """param_groups, which pretraining, fine-tuning and the int8 student all use: weight decay on
    kernels and matrices only, in every part, each part's pair with its learning-rate scale."""
    from edgessl.optim import make_optimizer, param_groups

    body = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
    head = torch.nn.Linear(4, 2)
    groups = param_groups(torch.nn.Sequential(body, head), 0.1, {body: 0.5, head: 1.0})
    assert [(g["weight_decay"], g["lr_scale"], [tuple(p.shape) for p in g["params"]]) for g in groups] == [
        (0.1, 0.5, [(4, 3, 3, 3)]), (0.0, 0.5, [(4,), (4,), (4,)]), (0.1, 1.0, [(2, 4)]), (0.0, 1.0, [(2,)])]
    opt = make_optimizer(groups, "sgd", 0.2, nesterov=True)
    from edgessl.optim import set_lr

    set_lr(opt, 0.2)
    assert [g["lr"] for g in opt.param_groups] == [0.1, 0.1, 0.2, 0.2] and opt.defaults["nesterov"]
