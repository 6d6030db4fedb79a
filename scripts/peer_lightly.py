"""lightly-train's SimCLR as a peer at an equal budget (an optional dependency: `pip install lightly-train`).

The peer trains the same backbone module an edgessl run trained (timm, with the run's stem for
its image size) on the same training images at the same size, with lightly-train's own SimCLR
recipe (its augmentation, batch size, optimizer and precision), stopped by Lightning's max_time.
Its exported weights are then scored by the kNN edgessl's runs report: the run's held-out images,
the same k. Used by scripts/gpu_check.py's equal-budget part; by hand:

    .venv/bin/python scripts/peer_lightly.py RUN_DIR --minutes 1 --out runs/peer.json
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from edgessl.augment import normalize
from edgessl.backbones import create_backbone, load_weights
from edgessl.config import IMAGENET_MEAN, IMAGENET_STD
from edgessl.data import load_split
from edgessl.knn import heldout_knn
from edgessl.runs import read_state, run_config


def write_images(images: torch.Tensor, folder: Path) -> None:
    """uint8 (N, 3, S, S) -> N PNG files: lightly-train reads a folder of image files."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    for i, img in enumerate(images.permute(0, 2, 3, 1).numpy()):
        Image.fromarray(img).save(folder / f"{i:06d}.png")


def lightly_simclr(run_dir: str | Path, minutes: float, device: str, work: Path, dry: bool = False) -> dict:
    """kNN top-1 of lightly-train's SimCLR on `run_dir`'s backbone, images and split, trained for
    `minutes` (one epoch with `dry`); an 'error' entry when lightly-train is missing or fails."""
    try:
        import lightly_train
    except ImportError:
        return {"error": "skipped: lightly-train is not installed (pip install lightly-train)"}
    state = read_state(run_dir)
    cfg = run_config(state)
    train, val = load_split(cfg.data)
    size, stride = state["backbone"]["image_size"], state["backbone"]["output_stride"]
    write_images(train.images, work / "images")
    model = create_backbone(cfg.backbone.name, size, stride)
    cuda = device.startswith("cuda")
    t0 = time.perf_counter()
    lightly_train.pretrain(
        out=str(work / "out"), data=str(work / "images"), model=model, method="simclr", overwrite=True, seed=0,
        epochs=1 if dry else 100_000, accelerator="gpu" if cuda else "cpu", devices=1,
        precision="bf16-mixed" if cuda else "32-true", transform_args={"image_size": (size, size)},
        **({"batch_size": 8, "num_workers": 0} if dry else {"trainer_args": {"max_time": {"seconds": 60 * minutes}}}))
    seconds = time.perf_counter() - t0
    trained = create_backbone(cfg.backbone.name, size, stride)
    load_weights(trained, str(work / "out" / "exported_models" / "exported_last.pt"))
    trained.eval()

    @torch.no_grad()
    def features(x):
        return torch.cat([trained(normalize(c, IMAGENET_MEAN, IMAGENET_STD)) for c in x.split(256)])

    knn = heldout_knn(features, train, val, cfg.run.knn_k)
    return {"knn_top1": round(knn, 2) if knn is not None else None, "seconds": round(seconds, 1),
            "what": f"lightly-train {lightly_train.__version__} simclr, "
            f"{cfg.backbone.name} at {size} px"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run_dir")
    ap.add_argument("--minutes", type=float, default=1.0)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dry-run", action="store_true", help="one epoch, batch 8")
    ap.add_argument("--work", type=Path, default=Path("runs/peer_lightly"))
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    r = lightly_simclr(args.run_dir, args.minutes, args.device, args.work, args.dry_run)
    print(json.dumps(r))
    if args.out:
        args.out.write_text(json.dumps(r, indent=1))


if __name__ == "__main__":
    main()
