"""Probes: linear probe on separable data, torch and ONNX sources agree, baselines, CLI."""
import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import tiny_pretrained_run
from edgessl import EdgesslError
from edgessl.exporter import export_model
from edgessl.probe import linear_probe, probe

pytestmark = pytest.mark.numeric  # run again with the CPU capped to AVX2 (make test-avx2)


def test_linear_probe_separates_a_separable_set():
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(4, 16, generator=g) * 5
    y = torch.arange(200) % 4
    x = centres[y] + torch.randn(200, 16, generator=g)
    acc, wd = linear_probe(x[:160], y[:160], x[160:], y[160:], 4)
    assert acc == 100.0 and wd in (0.0, 1e-4, 1e-3, 1e-2, 1e-1)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("probe")
    train, test = tiny_pretrained_run(root)
    export_model(root / "run", root / "m.onnx", knn=False)
    return root, train, test


def test_torch_and_onnx_sources_agree(tiny):
    root, train, test = tiny
    a = probe(str(root / "run"), train, test, knn_k=5)
    b = probe(str(root / "m.onnx"), train, test, knn_k=5)
    assert a["knn_top1"] == b["knn_top1"] and a["feature_dim"] == b["feature_dim"] == 1024
    assert a["n_train"] == 60 and a["n_test"] == 30


def test_baseline_sources(tiny):
    root, train, test = tiny
    pix = probe("pixels", train, test, knn_k=5, linear=True)
    assert pix["feature_dim"] == 3 * 32 * 32 and pix["knn_top1"] > 80  # colour blobs: pixels separate them
    rnd = probe("random:mobilenetv3_small_050", train, test, knn_k=5)
    assert rnd["feature_dim"] == 1024
    with pytest.raises(EdgesslError, match="not a run directory"):
        probe(str(root / "nothing"), train, test)


def test_grid_png(tiny, tmp_path):
    root, train, test = tiny
    out = probe(str(root / "run"), train, test, knn_k=5, grid=str(tmp_path / "g.png"))
    assert out["grid"].endswith("g.png")
    from PIL import Image

    assert Image.open(tmp_path / "g.png").size == (round(1.3 * 9 * 110), round(1.45 * 8 * 110))  # 8 rows of 1 + 8


def test_grid_draws_the_images_and_marks_wrong_neighbours_red(tmp_path):
    """Features that point each query at its own class: no red title; at the other class: red titles,
    and the query's own pixels on the page."""
    from PIL import Image

    from edgessl.data import ImageData
    from edgessl.probe import neighbour_grid

    images = torch.zeros(20, 3, 16, 16, dtype=torch.uint8)
    labels = torch.arange(20) % 2
    images[labels == 1, 2] = 255  # class 1 pure blue, class 0 black
    data = ImageData(images, labels, ["black", "blue"], "test")
    feats = torch.nn.functional.one_hot(labels, 2).float()

    def red_and_blue(test_feats, name):
        neighbour_grid(feats, test_feats, data, data, tmp_path / name)
        px = np.asarray(Image.open(tmp_path / name).convert("RGB")).reshape(-1, 3).astype(int)
        red = ((px[:, 0] > 150) & (px[:, 1] < 80) & (px[:, 2] < 80)).sum()
        blue = ((px[:, 2] > 200) & (px[:, 0] < 40) & (px[:, 1] < 40)).sum()
        return red, blue

    red, blue = red_and_blue(feats, "right.png")
    assert red == 0 and blue > 5000  # the blue images are drawn
    red, _ = red_and_blue(1 - feats, "wrong.png")
    assert red > 50


@pytest.mark.slow
def test_cli_json(tiny):
    root, train, test = tiny
    r = subprocess.run([sys.executable, "-m", "edgessl", "probe", str(root / "m.onnx"), "--train", train,
                        "--test", test, "--knn-k", "5", "--linear", "--json"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout.strip().splitlines()[-1])
    for key in ("knn_top1", "linear_top1", "n_train", "n_test", "feature_dim", "seconds"):
        assert key in out
    assert np.isfinite(out["linear_top1"])
