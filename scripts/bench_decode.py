"""Decoding a folder into the cache: images/s, side by side in one run.

    .venv/bin/python scripts/bench_decode.py DIR [--size 64] [--out runs/bench_decode.json]

Rows: Pillow's full decode plus a bicubic resize, one process (how folders were decoded before
JPEG draft mode); edgessl's loader with one process; edgessl's loader on every core (the
default for folders of PARALLEL_FROM files or more). Each edgessl row builds a fresh cache and
includes listing the folder, decoding, writing and checksumming the cache.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from benchlib import markdown
from edgessl import data as data_lib
from edgessl_edge.image import IMAGE_SUFFIXES


def pillow_full(files: list[Path], size: int) -> float:
    t0 = time.perf_counter()
    for p in files:
        with Image.open(p) as im:
            np.asarray(ImageOps.exif_transpose(im).convert("RGB").resize((size, size), Image.BICUBIC))
    return time.perf_counter() - t0


def edgessl_load(folder: Path, size: int, parallel: bool) -> float:
    with tempfile.TemporaryDirectory() as cache:
        os.environ["XDG_CACHE_HOME"] = cache
        saved = data_lib.PARALLEL_FROM
        data_lib.PARALLEL_FROM = saved if parallel else 10**12
        try:
            t0 = time.perf_counter()
            data_lib.load(f"folder:{folder}", size)
            return time.perf_counter() - t0
        finally:
            data_lib.PARALLEL_FROM = saved


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("folder", type=Path)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--out", type=Path, default=Path("runs/bench_decode.json"))
    args = ap.parse_args()
    files = sorted(p for p in args.folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    n = len(files)
    rows = {"pillow full decode, 1 process": pillow_full(files, args.size),
            "edgessl, 1 process": edgessl_load(args.folder, args.size, parallel=False),
            f"edgessl, {os.cpu_count()} processes": edgessl_load(args.folder, args.size, parallel=True)}
    result = {"folder": str(args.folder), "images": n, "size": args.size, "cpus": os.cpu_count(),
              "machine": platform.platform(), "seconds": {k: round(v, 2) for k, v in rows.items()},
              "images_per_s": {k: round(n / v, 1) for k, v in rows.items()}}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    print(markdown(["decoding", "seconds", "images/s"],
                   [[k, f"{v:.1f}", f"{n / v:.0f}"] for k, v in rows.items()], "lrr"))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
