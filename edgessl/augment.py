"""Batched single-view augmentation on the training device, per-sample random parameters.

uint8 (B, 3, H, W) in, normalised float (B, 3, S, S) out. No PIL, no per-image loop:
crops are one torchvision.ops.roi_align call, colour ops are a few element-wise
kernels over the batch. Small element-wise kernels can run
far slower on two threads than on one, so `threads` can pin the augmentation alone;
scripts/bench_step.py measures both (docs/benchmarks.md, "The step").
"""
from __future__ import annotations

import math
import random
from contextlib import contextmanager, nullcontext

import torch
from torchvision.ops import roi_align

from edgessl.config import AugmentConfig

_GRAY = (0.299, 0.587, 0.114)  # ITU-R 601 luma, as torchvision's rgb_to_grayscale
JITTER_OPS = ("brightness", "contrast", "saturation", "hue")


@contextmanager
def num_threads(n: int):
    """Temporarily set torch's intra-op threads (n = 0: leave as is)."""
    before = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        if n:
            torch.set_num_threads(before)


def standardize(x: torch.Tensor, mean, std) -> torch.Tensor:
    """float (B, 3, H, W) in [0, 1] -> (x - mean) / std, timm's convention."""
    m = torch.tensor(mean, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    s = torch.tensor(std, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    return (x - m) / s


def normalize(images: torch.Tensor, mean, std) -> torch.Tensor:
    """uint8 (B, 3, H, W) -> normalised float: the evaluation (and export) preprocessing."""
    return standardize(images.float() / 255.0, mean, std)


def crop_boxes(b: int, h: int, w: int, scale, ratio, device, tries: int = 10) -> torch.Tensor:
    """RandomResizedCrop's box sampling, vectorised: (B, 4) boxes x1, y1, x2, y2 in pixels.

    Like torchvision: up to `tries` draws of (area fraction, log aspect ratio) per sample,
    the first that fits wins; a sample with none that fits keeps the whole image.
    """
    area = torch.empty(b, tries, device=device).uniform_(*scale) * (h * w)
    log_r = torch.empty(b, tries, device=device).uniform_(math.log(ratio[0]), math.log(ratio[1]))
    cw, ch = (area * log_r.exp()).sqrt(), (area / log_r.exp()).sqrt()  # (B, T)
    fits = (cw <= w) & (ch <= h)
    first = torch.where(fits.any(1), fits.float().argmax(1), torch.full((b,), -1, device=device))
    pick = first.clamp(min=0)[:, None]
    cw = torch.where(first >= 0, cw.gather(1, pick)[:, 0], torch.full((b,), float(w), device=device))
    ch = torch.where(first >= 0, ch.gather(1, pick)[:, 0], torch.full((b,), float(h), device=device))
    x1 = torch.rand(b, device=device) * (w - cw)
    y1 = torch.rand(b, device=device) * (h - ch)
    return torch.stack([x1, y1, x1 + cw, y1 + ch], 1)


def _gray(x: torch.Tensor) -> torch.Tensor:  # (B, 3, H, W) -> (B, 1, H, W)
    return x[:, 0:1] * _GRAY[0] + x[:, 1:2] * _GRAY[1] + x[:, 2:3] * _GRAY[2]


def _rgb_to_hsv(x: torch.Tensor) -> torch.Tensor:
    r, g, b = x.unbind(1)
    maxc, minc = x.amax(1), x.amin(1)
    delta = maxc - minc
    s = delta / maxc.clamp(min=1e-8)
    d = delta.clamp(min=1e-8)
    h = torch.where(maxc == r, (g - b) / d, torch.where(maxc == g, 2.0 + (b - r) / d, 4.0 + (r - g) / d))
    h = torch.where(delta > 0, (h / 6.0) % 1.0, torch.zeros_like(h))
    return torch.stack([h, s, maxc], 1)


def _hsv_to_rgb(x: torch.Tensor) -> torch.Tensor:
    h, s, v = x.unbind(1)
    k = (torch.tensor([5.0, 3.0, 1.0], device=x.device).view(1, 3, 1, 1) + h[:, None] * 6.0) % 6.0
    return v[:, None] - v[:, None] * s[:, None] * (torch.minimum(k, 4.0 - k).clamp(0.0, 1.0))


def _blend(x: torch.Tensor, other: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """factor * x + (1 - factor) * other, per sample, clamped to [0, 1] (torchvision's _blend)."""
    return (factor.view(-1, 1, 1, 1) * x + (1 - factor.view(-1, 1, 1, 1)) * other).clamp_(0.0, 1.0)


def color_jitter(x: torch.Tensor, strength, apply: torch.Tensor) -> torch.Tensor:
    """ColorJitter(brightness, contrast, saturation, hue) with per-sample factors on [0, 1] images.

    Samples where `apply` is False keep identity factors. The order of the four ops is
    drawn per batch (torchvision draws it per image; per batch keeps one kernel per op).
    """
    b = x.shape[0]
    bri, con, sat, hue = strength

    def factor(s):  # (B,) uniform in [1 - s, 1 + s], 1 where not applied
        f = torch.empty(b, device=x.device).uniform_(max(0.0, 1 - s), 1 + s)
        return torch.where(apply, f, torch.ones_like(f))

    ops = {
        "brightness": lambda x, f=factor(bri): _blend(x, torch.zeros_like(x), f),
        "contrast": lambda x, f=factor(con): _blend(x, _gray(x).mean((1, 2, 3), keepdim=True), f),
        "saturation": lambda x, f=factor(sat): _blend(x, _gray(x), f),
        "hue": lambda x, f=torch.where(apply, torch.empty(b, device=x.device).uniform_(-hue, hue),
                                       torch.zeros(b, device=x.device)): _shift_hue(x, f),
    }
    for name in jitter_order():
        x = ops[name](x)
    return x


def jitter_order() -> list[str]:
    """A batch's order of the four jitter operations, drawn on the host from torch's RNG (resumable;
    a CUDA graph keeps the order it was recorded with: edgessl.capture)."""
    order = list(JITTER_OPS)
    random.Random(int(torch.randint(0, 2**31, (1,)))).shuffle(order)
    return order


def _shift_hue(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    hsv = _rgb_to_hsv(x)
    hsv[:, 0] = (hsv[:, 0] + shift.view(-1, 1, 1)) % 1.0
    return _hsv_to_rgb(hsv)


class BatchAugment:
    """The single training view: crop, flip, colour jitter, grayscale, normalise."""

    def __init__(self, cfg: AugmentConfig, size: int, mean, std, threads: int = 1):
        if cfg.crop_scale == "auto":  # the recipe picks it from the data when a run starts
            raise ValueError("BatchAugment needs a crop_scale range; 'auto' is resolved by edgessl.recipe")
        self.cfg, self.size, self.mean, self.std, self.threads = cfg, size, mean, std, threads

    def __call__(self, images: torch.Tensor, size: int = 0) -> torch.Tensor:
        """uint8 (B, 3, H, W) -> float (B, 3, S, S), S = `size` or the training size."""
        with num_threads(self.threads) if images.device.type == "cpu" else nullcontext():
            return self._augment(images, size or self.size)

    def _augment(self, images: torch.Tensor, size: int) -> torch.Tensor:
        c, dev = self.cfg, images.device
        b, _, h, w = images.shape
        boxes = crop_boxes(b, h, w, c.crop_scale, c.crop_ratio, dev)  # (B, 4)
        rois = torch.cat([torch.arange(b, device=dev, dtype=boxes.dtype)[:, None], boxes], 1)  # (B, 5)
        # adaptive sampling: one bilinear sample per output pixel when upsampling a crop (as
        # RandomResizedCrop), an average over ceil(crop/out) samples when shrinking
        x = roi_align(images.float(), rois, (size, size), 1.0, sampling_ratio=0, aligned=True)
        x = x.div_(255.0).clamp_(0.0, 1.0)  # (B, 3, S, S) in [0, 1]
        flip = torch.rand(b, device=dev) < c.flip_prob
        x = torch.where(flip.view(-1, 1, 1, 1), x.flip(-1), x)
        x = color_jitter(x, c.jitter, torch.rand(b, device=dev) < c.jitter_prob)
        gray = torch.rand(b, device=dev) < c.grayscale_prob
        x = torch.where(gray.view(-1, 1, 1, 1), _gray(x).expand(-1, 3, -1, -1), x)
        return standardize(x, self.mean, self.std)


def cutmix(x: torch.Tensor, alpha: float) -> tuple[torch.Tensor, torch.Tensor, float]:
    """CutMix on one batch: paste a box from image perm[i] into image i.

    Returns the mixed batch, perm (B,), and lam, the area fraction that stays image i's
    own (corrected for the box clipped at the border, as in the CutMix paper).
    """
    b, _, h, w = x.shape
    lam = float(torch.distributions.Beta(alpha, alpha).sample())
    cut_h, cut_w = int(h * math.sqrt(1 - lam)), int(w * math.sqrt(1 - lam))
    cy, cx = int(torch.randint(h, (1,))), int(torch.randint(w, (1,)))
    y1, y2 = max(cy - cut_h // 2, 0), min(cy + cut_h // 2, h)
    x1, x2 = max(cx - cut_w // 2, 0), min(cx + cut_w // 2, w)
    perm = torch.randperm(b, device=x.device)
    mixed = x.clone()
    mixed[:, :, y1:y2, x1:x2] = x[perm, :, y1:y2, x1:x2]
    return mixed, perm, 1.0 - (y2 - y1) * (x2 - x1) / (h * w)
