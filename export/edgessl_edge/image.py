"""Image files -> uint8 arrays: the one decoder edgessl trains with and the edge runtime serves with.

Pillow and numpy only. Decoding: EXIF orientation applied, 16-bit images scaled (not
saturated) to 8 bits, alpha dropped, RGB, then made size x size by one of two fits:

    squash  bicubic resize of the whole image to size x size (the aspect ratio is not kept)
    crop    the centre square of the short side, bicubic resize to size x size (timm's
            evaluation rule with crop_pct 1: nothing of the short side is cut)
"""
from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm"}
MIN_SIDE = 8  # smaller images are reported as bad, not upscaled from a few pixels
MAX_PIXELS = 120_000_000  # above the largest phone sensors (108 MP); Pillow's own bomb limit is 179 MP


class EdgeError(Exception):
    """An input the runtime cannot use (a file that is not an image, a model without metadata)."""


FITS = ("squash", "crop")


def fit_square(im, size: int, fit: str):
    """A Pillow image made size x size by `fit` (squash | crop), bicubic."""
    from PIL import Image

    if fit == "crop":
        w, h = im.size
        s = min(w, h)
        left, top = (w - s) // 2, (h - s) // 2
        return im.resize((size, size), Image.BICUBIC, box=(left, top, left + s, top + s))
    if fit != "squash":
        raise EdgeError(f"unknown fit {fit!r} (known: {', '.join(FITS)})")
    return im.resize((size, size), Image.BICUBIC)


def decode(path, size: int, fit: str = "squash") -> np.ndarray:
    """One image file -> (size, size, 3) uint8 by `fit`. EdgeError says why a file cannot be used.

    The size is read from the header before any pixel is decoded: a file that claims more
    than MAX_PIXELS (a decompression bomb) or less than MIN_SIDE a side is refused. An
    animated image gives its first frame."""
    from PIL import Image, ImageOps

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # our own limit below
            with Image.open(path) as im:
                w, h = im.size
                if min(w, h) < MIN_SIDE:
                    raise EdgeError(f"too small ({w}x{h}; at least {MIN_SIDE} px a side)")
                if w * h > MAX_PIXELS:
                    raise EdgeError(f"too large ({w}x{h}; at most {MAX_PIXELS // 10**6} megapixels)")
                if im.format == "JPEG":  # decode at 1/2 to 1/8 scale in the DCT, never below size x size
                    im.draft(None, (size, size))  # keep the mode (L, RGB, CMYK); .convert below
                im = ImageOps.exif_transpose(im)
                if im.mode in ("I;16", "I;16B", "I;16L", "I"):
                    a = np.asarray(im, dtype=np.float64)
                    im = Image.fromarray(np.clip(a / (65535.0 if a.max() > 255 else 255.0) * 255.0 + 0.5, 0, 255)
                                         .astype(np.uint8))
                return np.asarray(fit_square(im.convert("RGB"), size, fit), dtype=np.uint8)
    except EdgeError:
        raise
    except Image.DecompressionBombError as e:  # Pillow refuses at open: more than twice its own limit
        raise EdgeError(f"too large (a decompression bomb: {e})") from None
    except Exception as e:  # whatever a broken or hostile file makes Pillow raise is that file's problem
        raise EdgeError(f"cannot decode ({type(e).__name__}: {e})") from None


def list_images(folder) -> list[Path]:
    """Image files under `folder` (by suffix), sorted: the order edgessl indexes a folder in."""
    root = Path(folder)
    if not root.is_dir():
        raise EdgeError(f"not a folder: {root}")
    return sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())


def decode_rows(npy: str, paths: list[str], first: int, size: int, fit: str = "squash") -> dict[int, str]:
    """Decode `paths` into rows first, first + 1, ... of the (N, size, size, 3) uint8 .npy at `npy`
    (a decoding worker: Pillow and numpy only); {row: why} for the files that cannot be used."""
    arr = np.load(npy, mmap_mode="r+")
    bad = {}
    for k, path in enumerate(paths):
        try:
            arr[first + k] = decode(path, size, fit)
        except EdgeError as e:
            bad[first + k] = str(e)
    arr.flush()
    return bad
