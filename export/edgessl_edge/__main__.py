"""python -m edgessl_edge {embed, build-gallery, classify, predict}: see --help."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from edgessl_edge.image import EdgeError, list_images
from edgessl_edge.runtime import Encoder, build_gallery, check_gallery, classify, predict


def _paths(items) -> list[Path]:
    out = []
    for item in map(Path, items):
        out += list_images(item) if item.is_dir() else [item]
    return out


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m edgessl_edge", description=__doc__)
    sub = ap.add_subparsers(dest="cmd", required=True)
    e = sub.add_parser("embed", help="features of images or folders -> .npy")
    e.add_argument("model")
    e.add_argument("images", nargs="+")
    e.add_argument("--out", required=True)
    g = sub.add_parser("build-gallery", help="labelled folder (one subfolder per class) -> gallery .npz")
    g.add_argument("model")
    g.add_argument("folder")
    g.add_argument("--out", required=True)
    c = sub.add_parser("classify", help="kNN-classify images against a gallery")
    c.add_argument("model")
    c.add_argument("gallery")
    c.add_argument("images", nargs="+")
    c.add_argument("--k", type=int, default=20)
    p_ = sub.add_parser("predict", help="class names and probabilities from a fine-tuned classifier")
    p_.add_argument("model")
    p_.add_argument("images", nargs="+")
    p_.add_argument("--top-k", type=int, default=1)
    p_.add_argument("--json", action="store_true", help="one JSON object per image")
    for p in (e, g, c, p_):
        p.add_argument("--threads", type=int, default=0)
    return ap


def run(args: argparse.Namespace) -> None:
    enc = Encoder(args.model, args.threads)
    if args.cmd == "embed":
        feats = enc.embed(_paths(args.images))
        np.save(args.out, feats)
        print(f"wrote {args.out}: {feats.shape[0]} x {feats.shape[1]} features")
    elif args.cmd == "build-gallery":
        gallery = build_gallery(enc, args.folder)
        np.savez(args.out, **gallery)
        print(f"wrote {args.out}: {len(gallery['labels'])} images, {len(gallery['classes'])} classes")
    elif args.cmd == "predict":
        paths = _paths(args.images)
        for path, top in zip(paths, predict(enc, paths, args.top_k)):
            if args.json:
                print(json.dumps({"image": str(path), "top": [{"class": c, "probability": p} for c, p in top]}))
            else:
                print(f"{path}\t" + "\t".join(f"{c} {p:.3f}" for c, p in top))
    else:
        gallery = load_gallery(args.gallery, enc)
        paths = _paths(args.images)
        for path, cls in zip(paths, classify(gallery, enc.embed(paths), args.k)):
            print(f"{path}\t{gallery['classes'][cls]}")


def load_gallery(path: str, enc: Encoder) -> dict:
    try:
        with np.load(path, allow_pickle=False) as f:
            gallery = dict(f)
    except Exception as err:  # not an .npz, a truncated zip, pickled objects: all "not a gallery"
        raise EdgeError(f"{path} is not a gallery .npz ({err})") from None
    check_gallery(gallery, enc, path)
    return gallery


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    try:
        run(args)
    except (EdgeError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
