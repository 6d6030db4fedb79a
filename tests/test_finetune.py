"""Fine-tuning: exact stratified subsets, an end-to-end run, its ONNX classifier export."""
import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import tiny_pretrained_run
from edgessl import EdgesslError, checkpoint
from edgessl.check import check
from edgessl.exporter import export_model
from edgessl.onnxrt import read_metadata, session
from edgessl.rebuild import load_run
from edgessl.finetuning import AUTO_MIN_PER_CLASS, AUTO_P, finetune, stratified_subset, unlabelled_mode

pytestmark = pytest.mark.numeric  # run again with the CPU capped to AVX2 (make test-avx2)


def test_stratified_subset_sizes_are_exact():
    labels = torch.tensor([0] * 50 + [1] * 30 + [2] * 20)
    idx = stratified_subset(labels, seed=0, fraction=0.1)
    assert [int((labels[idx] == c).sum()) for c in range(3)] == [5, 3, 2]
    idx = stratified_subset(labels, seed=0, per_class=4)
    assert [int((labels[idx] == c).sum()) for c in range(3)] == [4, 4, 4]
    assert torch.equal(idx, stratified_subset(labels, seed=0, per_class=4))
    assert not torch.equal(idx, stratified_subset(labels, seed=1, per_class=4))
    assert [int((labels[stratified_subset(labels, 0, fraction=0.01)] == c).sum()) for c in range(3)] == [1, 1, 1]
    with pytest.raises(EdgesslError, match="fewer than"):
        stratified_subset(labels, seed=0, per_class=25)


def test_auto_trains_the_unlabelled_images_from_five_labels_a_class_on_average():
    def labels(*counts):
        return torch.cat([torch.full((n,), c) for c, n in enumerate(counts)])

    assert AUTO_MIN_PER_CLASS == 5
    assert unlabelled_mode("auto", labels(4, 4, 4)) == ("none", "auto: 4.0 labels a class on average, fewer than 5")
    assert unlabelled_mode("auto", labels(5, 5, 5)) == ("propagate", "auto: 5.0 labels a class on average, at least 5")
    assert unlabelled_mode("auto", labels(2, 3, 4, 7, 9))[0] == "propagate"  # uneven picks: 5 on average
    assert unlabelled_mode("auto", labels(1, 4, 9))[0] == "none"  # 4.7
    assert unlabelled_mode("none", labels(9, 9)) == ("none", "") and unlabelled_mode("propagate", labels(1)) == (
        "propagate", "")


def test_auto_propagates_below_five_when_held_out_labels_say_the_unlabelled_images_help():
    """Below five labels a class on average the held-out duel decides, by a sign test at AUTO_P;
    at five and above it is never asked."""
    two = torch.tensor([0, 0, 1, 1, 2, 2])
    assert AUTO_P == 0.05
    assert unlabelled_mode("auto", two, lambda: (6, 0)) == ("propagate", "auto: 2.0 labels a class on average, "
                                                            "fewer than 5; on held-out labels propagation beat the "
                                                            "class means 6 to 0, p = 0.016")
    assert unlabelled_mode("auto", two, lambda: (4, 0)) == ("none", "auto: 2.0 labels a class on average, fewer "
                                                            "than 5; on held-out labels propagation beat the class "
                                                            "means 4 to 0, p = 0.062, not below 0.05")
    assert unlabelled_mode("auto", two, lambda: (5, 0))[0] == "propagate"  # p = 0.031
    assert unlabelled_mode("auto", two, lambda: (0, 0)) == ("none", "auto: 2.0 labels a class on average, fewer "
                                                            "than 5; on held-out labels propagation and the class "
                                                            "means never disagreed")
    assert unlabelled_mode("auto", two, lambda: (9, 3))[0] == "none"  # p = 0.073
    assert unlabelled_mode("auto", two, lambda: (12, 3))[0] == "propagate"  # p = 0.018

    def never():
        raise AssertionError("asked at five labels a class")

    assert unlabelled_mode("auto", torch.arange(3).repeat(5), never)[0] == "propagate"
    assert unlabelled_mode("none", two, never) == ("none", "")


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    root = tmp_path_factory.mktemp("ft")
    train, test = tiny_pretrained_run(root)
    return root, train, test


def test_finetune_end_to_end_and_classifier_export(pretrained, tmp_path):
    root, train, test = pretrained
    r = finetune(root / "run", train, test, tmp_path / "ft", labels_per_class=8, epochs=4, batch_size=8,
                 log=lambda *_: None)
    assert r["n_labelled"] == 24 and r["epochs"] == 4
    assert r["unlabelled"] == "label propagation" and r["n_unlabelled"] == 45  # auto at 8 a class: the run's own
    rows = (tmp_path / "ft" / "metrics.csv").read_text().splitlines()
    assert rows[0].startswith("epoch,step,loss") and len(rows) == 5
    assert float(rows[-1].split(",")[-1]) == pytest.approx(r["test_top1"], abs=0.005)
    # the reported accuracy is the saved classifier's on the test images
    from edgessl.data import load
    from edgessl.finetuning import evaluate

    clf, cfg, _ = load_run(tmp_path / "ft")
    data = load(test, 32)
    assert evaluate(clf, data, cfg.data.mean, cfg.data.std, torch.device("cpu"), "fp32") == pytest.approx(
        r["test_top1"])
    from edgessl.report import write_report

    page = write_report(tmp_path / "ft").read_text()  # the classifier's page: its numbers and its curve
    assert "edgessl classifier" in page and f"{r['test_top1']:.2f} %" in page and "<td>labelled images</td><td>24" in page
    assert page.count("data:image/png;base64,") == 1 and "labels_per_class: 8" in page  # the stored settings
    assert "unlabelled: propagate" in page  # what auto decided, stored
    out = tmp_path / "clf.onnx"
    report = export_model(tmp_path / "ft", out)
    # fp32 in torch and in onnxruntime, summed in other orders: rounding grows with the logits' size,
    # so the bar is 1e-4 of max(1, max |logit|) (the export's own, FP32_MAX_ABS)
    assert report["max_rel_diff"] <= 1e-4
    meta = read_metadata(out)
    assert meta["kind"] == "classifier" and meta["classes"] == ["0", "1", "2"] and meta["output"] == "logits"
    model, _, _ = load_run(tmp_path / "ft")
    x = np.random.default_rng(0).standard_normal((5, 3, 32, 32)).astype(np.float32)
    logits = session(out).run(None, {"images": x})[0]
    with torch.no_grad():
        want = model(torch.from_numpy(x)).numpy()
    assert np.abs(logits - want).max() <= 1e-4 * max(1.0, np.abs(want).max())
    assert logits.shape == (5, 3)
    assert check(out, against=str(tmp_path / "ft"), batch_sizes=(1,), iters=2)["max_rel_diff"] <= 1e-4
    q = export_model(tmp_path / "ft", tmp_path / "clf8.onnx", precision="int8", calib_count=16)
    # agreement of int8 and torch fp32 top-1 on the pretraining run's 15 held-out images (25% of 60)
    assert q["agreement_images"] == 15 and q["top1_agreement"] * 15 == pytest.approx(round(q["top1_agreement"] * 15))


@pytest.mark.slow
def test_random_init_cli(pretrained, tmp_path):
    root, train, test = pretrained
    r = subprocess.run([sys.executable, "-m", "edgessl", "finetune", str(root / "run"), "--train", train, "--test",
                        test, "--out", str(tmp_path / "scratch"), "--label-fraction", "0.5", "--epochs", "1",
                        "--batch-size", "8", "--init", "random", "--json"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["init"] == "random" and out["n_labelled"] == 30
    r = subprocess.run([sys.executable, "-m", "edgessl", "finetune", str(root / "run"), "--train", train, "--test",
                        test, "--out", str(tmp_path / "x"), "--label-fraction", "0.5", "--labels-per-class", "2"],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "give one of" in r.stderr


def test_a_few_labels_alone_are_tested_every_few_epochs_and_at_the_last(pretrained, tmp_path, monkeypatch):
    """One-step epochs beside 30 test images: a test pass every `every` epochs and at the last, so
    the passes cost at most TEST_SHARE of the training; the result equals testing every epoch."""
    import math

    from edgessl import finetuning

    root, train, test = pretrained
    classes = 3
    every = math.ceil(30 / (finetuning.TEST_SHARE * 3 * classes))  # 30 test images, one label a class, one step
    assert every > 2
    kw = dict(labels_per_class=1, epochs=every + 2, batch_size=8, unlabelled="none", log=lambda *_: None)
    r = finetune(root / "run", train, test, tmp_path / "few", **kw)
    assert r["n_labelled"] == classes and r["test_top1"] is not None
    rows = [line.split(",") for line in (tmp_path / "few" / "metrics.csv").read_text().splitlines()[1:]]
    assert [int(row[0]) for row in rows if row[-1]] == [every, every + 2]
    monkeypatch.setattr(finetuning, "TEST_SHARE", 1e9)  # every epoch
    each = finetune(root / "run", train, test, tmp_path / "each", **kw)
    assert all(row.split(",")[-1] for row in (tmp_path / "each" / "metrics.csv").read_text().splitlines()[1:])
    assert each["test_top1"] == r["test_top1"]
    a, b = (checkpoint.load(tmp_path / d / "checkpoint.pt")["model"] for d in ("few", "each"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def _rows_without_seconds(path):
    rows = [r.split(",") for r in path.read_text().splitlines()]
    col = rows[0].index("seconds")
    return [r[:col] + r[col + 1:] for r in rows]


@pytest.mark.slow
@pytest.mark.parametrize("unlabelled", ["propagate", "none"])
def test_finetune_resume_is_bit_exact(pretrained, tmp_path, unlabelled):
    """Stopped inside epoch 3 of 4 and resumed: the metrics (but wall-clock seconds) and the final
    weights equal an uninterrupted run's, with the unlabelled images (the epoch's pseudo-labels
    and order restored from the checkpoint) and without."""
    root, train, test = pretrained
    kw = dict(labels_per_class=6, epochs=4, batch_size=6, seed=1, unlabelled=unlabelled, log=lambda *_: None)
    full = finetune(root / "run", train, test, tmp_path / "full", **kw)
    assert full["n_unlabelled"] == (45 if unlabelled == "propagate" else 0)  # the run's 60 - 25% held out
    steps = checkpoint.load(tmp_path / "full" / "checkpoint.pt")["position"]["step"]
    stopped = finetune(root / "run", train, test, tmp_path / "part", stop_at_step=steps // 2 + 1, **kw)
    assert stopped["stopped_early"] and stopped["epochs"] == 2  # inside epoch 3: its draws are in the checkpoint
    assert len((tmp_path / "part" / "metrics.csv").read_text().splitlines()) == 3
    with open(tmp_path / "part" / "metrics.csv", "a") as f:
        f.write("3,99,0.0,0.0,0.0,0.0\n")  # a row written after the checkpoint, before a kill
    resumed = finetune(None, "", "", tmp_path / "part", resume=True, log=lambda *_: None)  # settings from the run
    assert resumed["test_top1"] == full["test_top1"] and resumed["epochs"] == 4
    assert _rows_without_seconds(tmp_path / "part" / "metrics.csv") == \
        _rows_without_seconds(tmp_path / "full" / "metrics.csv")
    a, b = (checkpoint.load(tmp_path / d / "checkpoint.pt")["model"] for d in ("full", "part"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    r = subprocess.run([sys.executable, "-m", "edgessl", "finetune", "--out", str(tmp_path / "nothing"), "--resume"],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "--resume: no checkpoint in" in r.stderr
    r = subprocess.run([sys.executable, "-m", "edgessl", "finetune", "--out", str(tmp_path / "full"), "--resume",
                        "--json"], capture_output=True, text=True)  # already finished: nothing left to train
    assert r.returncode == 0 and json.loads(r.stdout.strip().splitlines()[-1])["test_top1"] == full["test_top1"]


@pytest.mark.slow
def test_sigterm_checkpoints_a_finetune_at_a_step_boundary(pretrained, tmp_path):
    """The one loop's stop: a signal mid-run finishes the step, writes the checkpoint, exits 130;
    --resume continues from that step."""
    from conftest import sigterm_once_checkpointed

    root, train, test = pretrained
    out = tmp_path / "ft"
    code, stdout, err = sigterm_once_checkpointed(
        ["finetune", str(root / "run"), "--train", train, "--test", test, "--out", str(out), "--labels-per-class",
         "8", "--batch-size", "8", "--epochs", "2000"], out / "checkpoint.pt")  # (after its first epoch)
    assert code == 130, err
    assert "Traceback" not in err and "--resume continues" in stdout
    pos = checkpoint.load(out / "checkpoint.pt")["position"]
    assert 0 < pos["step"] < 2000 * 6 and pos["planned_epochs"] == 2000
    rows = (out / "metrics.csv").read_text().splitlines()
    assert len(rows) == 1 + pos["epoch"]  # the epochs the checkpoint covers, no more


def test_finetune_holds_the_run_lock_while_it_trains(pretrained, tmp_path):
    """Another process asking while the run trains finds it locked by this one; after, nobody holds it."""
    import os

    from edgessl.runfiles import lock_holder

    root, train, test = pretrained
    seen = []
    r = finetune(root / "run", train, test, tmp_path / "ft", labels_per_class=2, epochs=1, batch_size=4,
                 log=lambda line: seen.append((line, lock_holder(tmp_path / "ft"))))
    assert r["n_unlabelled"] == 0 and "no unlabelled images (auto: 2.0 labels a class on average, fewer than 5; " \
        "on held-out labels propagation" in seen[0][0]  # the duel asked, and it kept the labelled images alone
    seen = [h for _, h in seen]
    assert seen and all(h == f"edgessl pid {os.getpid()}" for h in seen)
    assert lock_holder(tmp_path / "ft") is None


@pytest.mark.slow
def test_the_unlabelled_images_labels_never_enter(tmp_path):
    """The pool of unlabelled images is the pretraining run's own data: rewriting that data's labels
    (the same pixels, every label wrong) changes nothing of a fine-tuning run, weight for weight."""
    from conftest import make_npz, tiny_config
    from edgessl.train import pretrain

    data = make_npz(tmp_path / "pool.npz", n=48, size=32, seed=0)
    pretrain(tiny_config(f"npz:{data}", optim={"epochs": 1}), tmp_path / "run", log=lambda *_: None)
    train = make_npz(tmp_path / "train.npz", n=30, size=32, seed=2)
    test = make_npz(tmp_path / "test.npz", n=15, size=32, seed=1)
    kw = dict(labels_per_class=3, epochs=2, batch_size=6, unlabelled="propagate", log=lambda *_: None)
    clean = finetune(tmp_path / "run", f"npz:{train}", f"npz:{test}", tmp_path / "clean", **kw)
    with np.load(data) as f:
        x, y = f["x_train"], f["y_train"]
    np.savez(data, x_train=x, y_train=(y + 1) % 3)  # every label of the pool wrong
    poisoned = finetune(tmp_path / "run", f"npz:{train}", f"npz:{test}", tmp_path / "poisoned", **kw)
    assert clean["n_unlabelled"] == poisoned["n_unlabelled"] == 36 and clean["test_top1"] == poisoned["test_top1"]
    a, b = (checkpoint.load(tmp_path / d / "checkpoint.pt")["model"] for d in ("clean", "poisoned"))
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("plan,epochs", [(2, 2), (50, 3)])
def test_a_finetune_minute_budget_is_planned_by_the_loop_capped_by_epochs(pretrained, tmp_path, monkeypatch, plan,
                                                                          epochs):
    """--minutes: the one planner is asked once, after the first steps, with the budget in seconds,
    and the run trains what it answers, at most --epochs (3 here)."""
    from edgessl import loop

    asked = []
    monkeypatch.setattr(loop, "PLAN_AFTER_STEPS", 2)
    monkeypatch.setattr(loop, "plan_epochs", lambda *args: asked.append(args) or plan)
    monkeypatch.setattr(loop, "replan_epochs", lambda *args: plan)
    root, train, test = pretrained
    r = finetune(root / "run", train, test, tmp_path / "ft", labels_per_class=8, epochs=3, batch_size=8,
                 minutes=0.5, unlabelled="none", log=lambda *_: None)
    (budget_s, _, steps, per_epoch), = asked
    assert budget_s == 30.0 and steps == 2 and per_epoch == 24 // 8
    pos = checkpoint.load(tmp_path / "ft" / "checkpoint.pt")["position"]
    assert r["epochs"] == pos["epoch"] == pos["planned_epochs"] == epochs and pos["step"] == epochs * per_epoch
