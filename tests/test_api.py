"""The Python API and the commands built on it, used as the README shows them: pretrain, export,
probe, embed, finetune on the run's own split, the report page in a real browser, and the
fine-tuned classifier in the torch-free runtime."""
import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import edgessl
from conftest import REPO
from edgessl import ConfigError, EdgesslError

TINY = {"backbone": "mobilenetv3_small_050", "method": {"head_dims": [32, 16]}, "optim.batch_size": 8,
        "run.knn_k": 5, "run.threads": 1, "run.augment_threads": 1}


@pytest.fixture(scope="module")
def api_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("api")
    folder = root / "photos"
    rng = np.random.default_rng(0)
    for c, colour in enumerate([(200, 40, 40), (40, 200, 40), (40, 40, 200)]):
        (folder / f"class{c}").mkdir(parents=True)
        for i in range(16):
            img = np.clip(np.array(colour) + rng.normal(0, 40, (40, 48, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(img).save(folder / f"class{c}" / f"{i:02d}.png")
    run = edgessl.pretrain(data=f"folder:{folder}", out=root / "run", epochs=2, image_size=32, val_fraction=0.25,
                           progress=False, log=lambda *_: None, **TINY)
    return root, folder, run


def test_pretrain_returns_a_run_with_the_overrides_applied(api_run):
    root, _, run = api_run
    assert isinstance(run, edgessl.Run) and run.kind == "pretraining"
    cfg = run.config
    assert cfg.method.head_dims == [32, 16] and cfg.optim.batch_size == 8 and cfg.optim.epochs == 2
    assert cfg.backbone.name == "mobilenetv3_small_050" and cfg.data.image_size == 32
    assert run.summary["epochs"] == 2 and run.summary["report"] == str(root / "run" / "report.html")
    reopened = edgessl.Run(root / "run")
    assert reopened.config == cfg and reopened.summary is None


def test_overrides_are_strict():
    from edgessl.api import resolve_config

    with pytest.raises(ConfigError, match="optim.lrr"):
        resolve_config("x", **{"optim.lrr": 1.0})
    with pytest.raises(ConfigError, match="unknown config key 'colour'"):
        resolve_config("x", colour=1)
    with pytest.raises(EdgesslError, match="unknown method"):
        resolve_config("x", method="moco")
    cfg = resolve_config("x", method="npid", minutes=3)
    assert cfg.method.bank_init == "random" and cfg.optim.minutes == 3 and cfg.optim.epochs is None
    with pytest.raises(EdgesslError, match="no checkpoint"):
        edgessl.Run("/nonexistent/run")


def test_embed_rows_follow_the_data_and_equal_the_probe(api_run, tmp_path):
    root, folder, run = api_run
    from edgessl.embed import embed
    from edgessl.probe import featurizer

    feats = run.embed(f"folder:{folder}")
    assert feats.shape == (48, 1024)
    fn, size, _, fit = featurizer(str(root / "run"))
    from edgessl.data import load

    data = load(f"folder:{folder}", size, fit=fit)
    # the same fp32 network over other batches: only the summation order differs, ~1e-6 of features of size ~1
    assert np.allclose(feats, fn(data.images).numpy(), atol=1e-5)
    e = embed(str(root / "run"), f"folder:{folder}")
    assert e.files[0] == "class0/00.png" and e.files[-1] == "class2/15.png" and e.labels[-1] == 2


@pytest.mark.parametrize("suffix", [".npy", ".npz", ".csv"])
def test_embed_cli_writes_each_format(api_run, tmp_path, suffix):
    root, folder, run = api_run
    out = tmp_path / f"feats{suffix}"
    r = subprocess.run([sys.executable, "-m", "edgessl", "embed", str(root / "run"), "--data", f"folder:{folder}",
                        "--out", str(out)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    expected = run.embed(f"folder:{folder}")
    if suffix == ".npy":
        got, side = np.load(out), json.loads(out.with_suffix(".json").read_text())
        assert side["files"][5] == "class0/05.png" and side["labels"][20] == 1 and side["ids"] == list(range(48))
    elif suffix == ".npz":
        with np.load(out) as f:
            got = f["features"]
            assert list(f["classes"]) == ["class0", "class1", "class2"] and f["files"][47] == "class2/15.png"
    else:
        lines = out.read_text().splitlines()
        assert lines[0].startswith("id,file,label,f0,f1") and lines[1].startswith("0,class0/00.png,class0,")
        got = np.array([[float(v) for v in line.split(",")[3:]] for line in lines[1:]])
    # a float written by repr() and read back is exact; 1e-6 only absorbs the fp32 -> fp64 round trip
    assert np.allclose(got, expected, atol=1e-6)
    bad = subprocess.run([sys.executable, "-m", "edgessl", "embed", str(root / "run"), "--data", f"folder:{folder}",
                          "--out", str(tmp_path / "f.txt")], capture_output=True, text=True)
    assert bad.returncode == 2 and "must end in" in bad.stderr and len(bad.stderr.splitlines()) == 1


def test_export_probe_and_report_show_the_exports(api_run, tmp_path):
    root, folder, run = api_run
    fp32 = run.export(tmp_path / "m.onnx")
    # adapt=True: the student whatever its kNN on 12 held-out images (the gate: tests/test_export.py)
    int8 = run.export(tmp_path / "q.onnx", precision="int8", calib_count=16, adapt=True, adapt_seconds=2)
    assert fp32["max_rel_diff"] <= 1e-4 and int8["precision"] == "int8"  # the export's bar: 1e-4 of the feature scale
    assert int8["adapted"]["swapped"] > 0 and int8["adapted"]["steps"] > 0  # hard-swish network: a ReLU student
    r = run.probe(f"folder:{folder}", f"folder:{folder}", knn_k=5)
    assert r["n_train"] == r["n_test"] == 48 and r["feature_dim"] == 1024
    for model in ("m.onnx", "q.onnx"):
        assert subprocess.run([sys.executable, "-m", "edgessl", "check", str(tmp_path / model), "--against",
                               str(root / "run"), "--batch-sizes", "1,4"], capture_output=True).returncode == 0
    page = run.report(tmp_path / "report.html").read_text()
    assert "q.onnx" in page and "int8" in page and "speed-up vs fp32" in page and "b4 " in page
    assert page.count("data:image/png;base64,") >= 2  # curves and neighbours, embedded
    assert "http://" not in page and "https://" not in page and "<script" not in page  # nothing fetched


def test_report_renders_in_a_real_browser(api_run, tmp_path):
    root, _, _ = api_run
    r = subprocess.run([sys.executable, "-m", "edgessl", "report", str(root / "run"), "--out", str(tmp_path / "r.html")],
                       capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.strip() == f"wrote {tmp_path / 'r.html'}"
    assert "Nearest neighbours" in (tmp_path / "r.html").read_text()
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("chromium is not installed (Debian package chromium; .ci/run installs it when it can)")
    shot = tmp_path / "shot.png"
    subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                    "--disable-background-networking", "--disable-component-update", "--disable-sync",
                    f"--user-data-dir={tmp_path / 'profile'}", f"--screenshot={shot}", "--window-size=1000,1400",
                    (root / "run" / "report.html").as_uri()], capture_output=True, timeout=120)
    pixels = np.asarray(Image.open(shot).convert("L"), dtype=np.float64)
    assert pixels.shape == (1400, 1000)
    assert pixels.std() > 20 and (pixels < 100).mean() > 0.01  # text and plots, not a blank page


def test_finetune_on_the_runs_own_split_and_predict_on_the_edge(api_run, tmp_path):
    root, folder, run = api_run
    clf = edgessl.finetune(run, labels_per_class=4, out=tmp_path / "ft", epochs=2, batch_size=6, progress=False,
                           log=lambda *_: None)
    assert clf.kind == "classifier" and clf.summary["n_labelled"] == 12
    lines = []  # every label of the run's own split: auto would propagate, but nothing is left unlabelled
    every = edgessl.finetune(run, label_fraction=1.0, out=tmp_path / "all", epochs=1, batch_size=6, progress=False,
                             log=lines.append)
    assert every.summary["n_unlabelled"] == 0 and "every training image is labelled" in lines[0]
    assert clf.config.data.spec == run.config.data.spec
    model = tmp_path / "clf.onnx"
    clf.export(model)
    images = [folder / "class1" / "03.png", folder / "class2" / "09.png"]
    r = _edge(["predict", str(model), *map(str, images), "--top-k", "2", "--json"])
    assert r.returncode == 0, r.stderr
    rows = [json.loads(line) for line in r.stdout.splitlines()]
    assert [row["image"] for row in rows] == [str(p) for p in images]
    from edgessl.onnxrt import ort_features, session
    from edgessl.augment import normalize
    from edgessl.data import load

    # class1/03.png and class2/09.png in the sorted listing, made square as the run was (its recipe's fit)
    x = load(f"folder:{folder}", 32, fit=clf.config.data.fit).images[[19, 41]]
    logits = ort_features(session(model), normalize(x, clf.config.data.mean, clf.config.data.std).numpy())
    p = torch.softmax(torch.from_numpy(logits).double(), 1).numpy()
    for row, probs in zip(rows, p):
        best = int(probs.argmax())
        assert row["top"][0]["class"] == f"class{best}" and row["top"][0]["probability"] == pytest.approx(probs[best])
        assert len(row["top"]) == 2 and row["top"][0]["probability"] >= row["top"][1]["probability"]


def test_edge_refuses_a_model_of_the_wrong_kind_or_a_foreign_gallery(api_run, tmp_path):
    root, folder, run = api_run
    run.export(tmp_path / "a.onnx")
    run.export(tmp_path / "b.onnx", precision="fp16")
    r = _edge(["build-gallery", str(tmp_path / "a.onnx"), str(folder), "--out", str(tmp_path / "g.npz")])
    assert r.returncode == 0, r.stderr
    image = str(folder / "class0" / "00.png")
    ok = _edge(["classify", str(tmp_path / "a.onnx"), str(tmp_path / "g.npz"), image])
    assert ok.returncode == 0 and ok.stdout.strip().endswith("class0")
    wrong = _edge(["classify", str(tmp_path / "b.onnx"), str(tmp_path / "g.npz"), image])
    assert wrong.returncode == 2 and "g.npz" in wrong.stderr and "b.onnx" in wrong.stderr
    enc = _edge(["predict", str(tmp_path / "a.onnx"), image])
    assert enc.returncode == 2 and "a.onnx is an encoder" in enc.stderr


def _edge(argv):
    code = (f"import sys; sys.path.insert(0, {str(REPO / 'export')!r}); from edgessl_edge.__main__ import main; "
            f"sys.exit(main({argv!r}))")
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
