"""The data decides the recipe (edgessl.recipe): what each kind of data gets, that a given value
wins, what config.yaml stores, and that one fit (squash or crop) reaches the same pixels in
training, probe, the ONNX metadata and the torch-free runtime."""
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from conftest import REPO, SHARED_NPZ, make_npz, tiny_config
from edgessl import recipe
from edgessl.backbones import auto_downsample
from edgessl.config import from_dict, load_yaml
from edgessl.data import FASHION_MNIST_DIR, load

sys.path.insert(0, str(REPO / "export"))
import edgessl_edge  # noqa: E402

CPU, CUDA = torch.device("cpu"), torch.device("cuda")


def resolved(spec: str, device=CPU, **sections) -> dict:
    """{key: value} of every choice the rule makes for `spec` (as build makes them)."""
    cfg = from_dict({"data": {"spec": spec}, **sections})
    choices, train, _ = recipe.resolve(cfg, device)
    assert train.images.shape[-1] == cfg.data.image_size  # the data is loaded at the size picked
    return {c.key: c.value for c in choices}


def test_the_size_rule():
    assert recipe.image_size(32, CPU)[0] == 32  # small images: their own size
    assert recipe.image_size(28, CUDA)[0] == 28
    assert recipe.image_size(160, CPU)[0] == recipe.PHOTO_SIZE
    assert recipe.image_size(3000, CUDA)[0] == recipe.GPU_PHOTO_SIZE
    assert recipe.image_size(100, CUDA)[0] == 96  # never above the images' own short side, a multiple of 8


def test_background_fraction_against_a_naive_count():
    rng = np.random.default_rng(0)
    imgs = rng.integers(0, 256, (5, 3, 12, 12)).astype(np.uint8)
    imgs[:, :, :6] = 7  # the top half and the whole border row 0 one colour
    imgs[:, :, :, 0] = 7
    imgs[:, :, :, -1] = 7
    imgs[:, :, -1] = 7
    x = torch.from_numpy(imgs)
    naive = np.mean([(np.abs(im.astype(int) - 7).max(0) <= recipe.BACKGROUND_TOL).mean() for im in imgs])
    assert recipe.background_fraction(x) == pytest.approx(naive, abs=1e-6)


def test_arrays_get_today_s_default_and_plain_backgrounds_bigger_crops(tmp_path):
    natural = resolved(f"npz:{make_npz(tmp_path / 'n.npz', n=2048, size=32)}")
    assert natural == {"data.image_size": 32, "data.fit": recipe.FIT, "backbone.downsample": 16,
                       "augment.crop_scale": (0.2, 1.0), "method.negatives": "all", "optim.batch_size": 64,
                       "run.compile": False, "run.capture": False}  # 30 epochs of 2,048 images: too short to compile
    x = np.zeros((300, 28, 28), np.uint8)
    x[:, 8:20, 8:20] = 200  # an object in the middle of a black field
    np.savez(tmp_path / "plain.npz", x_train=x)
    plain = resolved(f"npz:{tmp_path / 'plain.npz'}")
    assert plain["augment.crop_scale"] == (0.5, 1.0) and plain["data.image_size"] == 28
    assert plain["optim.batch_size"] == 16  # 300 images: 16 steps an epoch at most batch 16


def test_the_shared_data_gets_its_hand_made_recipes():
    """CIFAR-10 file: exactly the default recipe before the rule; Fashion-MNIST: configs/fmnist.yaml."""
    if not SHARED_NPZ.exists() or not Path(FASHION_MNIST_DIR).is_dir():
        pytest.skip("needs ../shared and Debian's dataset-fashion-mnist")
    cifar = resolved(f"npz:{SHARED_NPZ}")
    compiler = shutil.which(os.environ.get("CXX", "g++")) is not None
    assert cifar == {"data.image_size": 32, "data.fit": recipe.FIT, "backbone.downsample": 16,
                     "augment.crop_scale": (0.2, 1.0), "method.negatives": "all", "optim.batch_size": 64,
                     "run.compile": compiler, "run.capture": False}
    fmnist = resolved("fashion-mnist")
    hand = load_yaml(REPO / "configs" / "fmnist.yaml")
    assert fmnist["augment.crop_scale"] == tuple(hand["augment"]["crop_scale"])
    assert fmnist["method.negatives"] == hand["method"]["negatives"]
    assert fmnist["data.image_size"] == 28 and fmnist["optim.batch_size"] == 64
    flowers = SHARED_NPZ.parent / "flowers" / "train"
    if flowers.is_dir():  # photos with a 160 px short side
        assert resolved(f"folder:{flowers}") == {
            "data.image_size": recipe.PHOTO_SIZE, "data.fit": recipe.FIT,
            "backbone.downsample": auto_downsample("mobilenetv3_small_100", recipe.PHOTO_SIZE),
            "augment.crop_scale": (0.2, 1.0), "method.negatives": "all", "optim.batch_size": 64,
            "run.compile": compiler, "run.capture": False}


def test_compile_is_picked_for_cpu_runs_long_enough_to_earn_it_back(monkeypatch):
    def pick(device=CPU, world=1, n=5000, size=32, **sections):
        return recipe.compile_choice(from_dict(sections), n, size, device, world)

    monkeypatch.setattr(recipe.shutil, "which", lambda name: "/usr/bin/" + name)
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX512")
    assert pick().value is True and pick().why == "a long run"  # 30 epochs x 5,000 images
    assert pick(n=3000).value is False  # 90,000 images of 32 px
    assert pick(n=3000, size=64).value is True  # the same count at 64 px costs 4x
    assert pick(optim={"minutes": 2}).value is False and pick(optim={"minutes": 2}).why == "2 minutes"
    assert pick(optim={"epochs": None, "minutes": 15}).value is True
    assert pick(optim={"epochs": 2}).value is False
    assert pick(device=CUDA).value is False and pick(world=2).value is False
    assert pick(augment={"start_size": 24}).why == "progressive resolution"
    assert pick(run={"compile": False}) == recipe.Choice("run.compile", False, "given", True)
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")  # or ATEN_CPU_CAPABILITY=avx2
    assert pick().value is False and pick().why.startswith("AVX2 kernels")
    monkeypatch.setattr(recipe.shutil, "which", lambda name: None)
    assert pick().value is False and pick().why == "no C++ compiler"


def photo_folder(root: Path, n: int = 12, size=(60, 40)) -> Path:
    """Non-square photos (landscape), a bright bar off centre so that squash and crop differ."""
    rng = np.random.default_rng(0)
    for i in range(n):
        (root / f"c{i % 2}").mkdir(parents=True, exist_ok=True)
        img = rng.integers(0, 256, (size[1], size[0], 3)).astype(np.uint8)
        img[:, :8] = 255
        Image.fromarray(img).save(root / f"c{i % 2}" / f"{i}.jpg", quality=92)
    return root


def test_a_folder_is_surveyed_from_headers_and_given_values_win(tmp_path):
    folder = photo_folder(tmp_path / "p", size=(300, 200))
    stats = recipe.survey(f"folder:{folder}")
    assert stats == {"files": 12, "short_side": 200, "aspect": 1.5}
    got = resolved(f"folder:{folder}")
    assert got["data.image_size"] == recipe.PHOTO_SIZE and got["optim.batch_size"] == 8
    cfg = from_dict({"data": {"spec": f"folder:{folder}", "image_size": 24, "fit": "crop"},
                     "augment": {"crop_scale": [0.3, 1.0]}, "method": {"negatives": 7}, "optim": {"batch_size": 4},
                     "run": {"compile": False, "capture": False}})
    choices = recipe.input_choices(cfg, CPU)
    recipe.apply(cfg, choices)
    choices += recipe.training_choices(cfg, load(f"folder:{folder}", 24).images, 24, CPU)
    assert all(c.given for c in choices if c.key != "backbone.downsample")
    assert {c.key: c.value for c in choices}["augment.crop_scale"] == (0.3, 1.0)
    line = recipe.summary(choices)
    assert line.startswith("recipe: ") and "\n" not in line and "--downsample" in line and "--fit" not in line


def test_pretrain_prints_the_line_and_stores_the_choices(tmp_path):
    from edgessl.train import pretrain

    folder = photo_folder(tmp_path / "p", n=24)
    cfg = tiny_config(f"folder:{folder}", data={"image_size": "auto"}, optim={"epochs": 1, "batch_size": "auto"})
    lines = []
    pretrain(cfg, tmp_path / "run", log=lines.append)
    line = next(x for x in lines if x.startswith("recipe: "))
    assert "image_size 40 (the images' own size (40 px))" in line and "--batch-size" in line
    stored = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert stored["data"]["image_size"] == 40 and stored["data"]["fit"] == recipe.FIT
    assert stored["optim"]["batch_size"] == 8 and stored["augment"]["crop_scale"] == [0.2, 1.0]
    assert stored["method"]["negatives"] == "all"


@pytest.mark.parametrize("fit", ["squash", "crop"])
def test_one_photo_is_the_same_tensor_in_training_probe_onnx_and_the_runtime(tmp_path, fit):
    """The rule that makes a photo square is stored with the run and travels into the ONNX
    metadata: training, `probe`, onnxruntime through edgessl and the edge runtime see one tensor."""
    from edgessl.augment import normalize
    from edgessl.exporter import export_model
    from edgessl.probe import featurizer
    from edgessl.train import pretrain

    folder = photo_folder(tmp_path / "p", n=16)
    pretrain(tiny_config(f"folder:{folder}", data={"image_size": 24, "fit": fit}, optim={"epochs": 1}),
             tmp_path / "run", log=lambda *_: None)
    export_model(tmp_path / "run", tmp_path / "m.onnx", knn=False)
    files = edgessl_edge.list_images(folder)
    photo = files[3]
    training = load(f"folder:{folder}", 24, fit=fit).images[3]  # what the run trained on
    run_f, onnx_f = featurizer(str(tmp_path / "run")), featurizer(str(tmp_path / "m.onnx"))
    assert run_f.fit == onnx_f.fit == fit and run_f.size == onnx_f.size == 24
    probe_side = load(f"folder:{folder}", run_f.size, fit=run_f.fit).images[3]  # what `probe` reads
    enc = edgessl_edge.Encoder(tmp_path / "m.onnx")
    assert enc.fit == fit
    edge_side = edgessl_edge.decode(photo, enc.size, enc.fit)
    assert torch.equal(training, probe_side) and np.array_equal(edge_side, training.permute(1, 2, 0).numpy())
    other = edgessl_edge.decode(photo, 24, "crop" if fit == "squash" else "squash")
    assert not np.array_equal(other, edge_side)  # the two fits really differ on this photo
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    torch_feats = run_f.fn(training[None])
    assert np.allclose(enc.embed([photo]), onnx_f.fn(training[None]).numpy(), atol=1e-5)
    assert np.allclose(enc.embed([photo]), torch_feats.numpy(), atol=1e-4)
    assert np.allclose(enc.preprocess(edge_side[None]), normalize(training[None], mean, std).numpy(), atol=1e-6)


def test_capture_is_picked_where_a_cuda_graph_can_hold_the_step():
    def pick(device=torch.device("cuda"), world=1, **sections):
        return recipe.capture_choice(from_dict({"data": {"spec": "npz:x"}, **sections}), device, world)

    assert pick(run={"precision": "bf16"}) == recipe.Choice("run.capture", True, "a launch-bound GPU step")
    assert pick(run={"precision": "fp32"}).value is True
    assert pick(device=torch.device("cpu")) == recipe.Choice("run.capture", False, "a CPU")
    assert pick(run={"precision": "fp16"}).value is False and "GradScaler" in pick(run={"precision": "fp16"}).why
    assert pick(world=2).value is False and pick(method={"cutmix_prob": 0.5}).value is False
    assert pick(run={"capture": False}) == recipe.Choice("run.capture", False, "given", True)


def test_the_usage_page_counts_the_auto_values_and_shows_the_line_the_code_prints(monkeypatch):
    """docs/usage.md, "What the data decides": the number of auto values it names is the config's,
    and its sample line is what `pretrain --data folder:flowers/train --minutes 15` prints on a CPU
    (one with a C++ compiler and AVX-512 kernels, where it compiles)."""
    monkeypatch.setattr(recipe.shutil, "which", lambda name: "/usr/bin/" + name)
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX512")
    from edgessl.config import auto_settings

    page = (REPO / "docs" / "usage.md").read_text()
    words = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven"]
    assert f"except {words[len(auto_settings())]} values that are `auto`" in page
    flowers = SHARED_NPZ.parent / "flowers" / "train"
    if not flowers.is_dir():
        pytest.skip("needs ../shared's flower photos")
    cfg = from_dict({"data": {"spec": f"folder:{flowers}"}, "optim": {"minutes": 15, "epochs": None}})
    line = recipe.summary(recipe.resolve(cfg, CPU)[0])
    block = page.split("    recipe: ", 1)[1].split("\n\n", 1)[0]
    assert "recipe: " + " ".join(block.split()) == line
