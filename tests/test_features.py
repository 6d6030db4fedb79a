"""The one path from images to features: eval mode restored, batches equal one pass, fp32 out."""
import pytest
import torch
from torch import nn

from edgessl.augment import normalize
from edgessl.features import features

pytestmark = pytest.mark.numeric


def test_features_in_eval_mode_in_batches_equal_one_pass_and_the_mode_is_restored():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Dropout(0.5), nn.AdaptiveAvgPool2d(1),
                        nn.Flatten()).train()
    net[1].running_mean.uniform_(-1, 1)  # eval mode must use these, not the batch's statistics
    images = torch.randint(0, 256, (10, 3, 8, 8), dtype=torch.uint8)
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    got = features(net, images, mean, std, batch_size=3)
    assert net.training and got.dtype == torch.float32 and got.shape == (10, 4)
    with torch.no_grad():
        one_pass = net.eval()(normalize(images, mean, std))
    torch.testing.assert_close(got, one_pass, rtol=1e-6, atol=1e-6)  # fp32, the same kernels per sample
    bf16 = features(net.train(), images, mean, std, precision="bf16")
    assert bf16.dtype == torch.float32 and net.training
    # bf16 keeps 8 bits of mantissa: a 27-term conv and a mean of 36 values stay within 2^-6 relative
    torch.testing.assert_close(bf16, one_pass, rtol=2 ** -6, atol=2 ** -6)
    assert features(net, images[:0], mean, std).shape[0] == 0
