"""Batched augmentation: per-sample parameters, exact identities, CutMix area."""
import dataclasses

import pytest
import torch

from edgessl.augment import BatchAugment, _hsv_to_rgb, _rgb_to_hsv, crop_boxes, cutmix, normalize
from edgessl.config import IMAGENET_MEAN, IMAGENET_STD, AugmentConfig

OFF = AugmentConfig(crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), flip_prob=0.0, jitter_prob=0.0, grayscale_prob=0.0)


def images(b=16, size=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (b, 3, size, size), dtype=torch.uint8, generator=g)


def test_everything_off_is_plain_normalisation():
    x = images()
    out = BatchAugment(OFF, 16, IMAGENET_MEAN, IMAGENET_STD)(x)
    # the same fp32 arithmetic in another order: a few ulps of values up to ~2.6 (1 ulp there is 2.4e-7)
    assert torch.allclose(out, normalize(x, IMAGENET_MEAN, IMAGENET_STD), atol=1e-5)


def test_flip_always_is_exact_mirror():
    x = images()
    out = BatchAugment(dataclasses.replace(OFF, flip_prob=1.0), 16, (0, 0, 0), (1, 1, 1))(x)
    # x/255 against (x/255 - 0)/1: at most one fp32 rounding of values <= 1 (6e-8)
    assert torch.allclose(out, x.flip(-1).float() / 255, atol=1e-6)


def test_grayscale_always_gives_equal_channels():
    out = BatchAugment(dataclasses.replace(OFF, grayscale_prob=1.0), 16, (0, 0, 0), (1, 1, 1))(images())
    assert torch.allclose(out[:, 0], out[:, 1]) and torch.allclose(out[:, 1], out[:, 2])


def test_two_samples_get_different_parameters():
    """The same image twice in one batch must come out differently (per-sample draws)."""
    torch.manual_seed(0)
    x = images(1).expand(32, -1, -1, -1).contiguous()
    out = BatchAugment(AugmentConfig(crop_scale=(0.2, 1.0)), 16, IMAGENET_MEAN, IMAGENET_STD)(x)
    assert out.shape == (32, 3, 16, 16)
    distinct = {tuple(o.flatten()[:64].round(decimals=4).tolist()) for o in out}
    assert len(distinct) == 32
    boxes = crop_boxes(32, 16, 16, (0.2, 1.0), (3 / 4, 4 / 3), "cpu")
    assert len({tuple(b.tolist()) for b in boxes}) == 32


def test_crop_boxes_stay_inside_and_respect_scale():
    torch.manual_seed(1)
    b = crop_boxes(1000, 32, 32, (0.2, 1.0), (3 / 4, 4 / 3), "cpu")
    assert (b[:, 0] >= 0).all() and (b[:, 1] >= 0).all() and (b[:, 2] <= 32 + 1e-4).all() and (b[:, 3] <= 32 + 1e-4).all()
    area = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1]) / 1024
    assert area.min() >= 0.2 - 1e-4 and area.max() <= 1.0 + 1e-4


def test_hsv_round_trip():
    x = torch.rand(4, 3, 8, 8)
    # two conversions of about ten fp32 operations each on values in [0, 1]: tens of ulps at most
    assert torch.allclose(_hsv_to_rgb(_rgb_to_hsv(x)), x, atol=1e-5)


def test_cutmix_box_and_lambda_agree():
    torch.manual_seed(3)
    x = torch.zeros(6, 1, 10, 10) + torch.arange(6).view(6, 1, 1, 1).float()
    mixed, perm, lam = cutmix(x, 1.0)
    for i in range(6):
        own = (mixed[i] == i).float().mean().item()
        assert own == pytest.approx(lam) or perm[i] == i
    assert sorted(perm.tolist()) == list(range(6))
