"""timm backbones: pooled widths read from the model, small-input stems, strict weights."""
import pytest
import torch

from edgessl import EdgesslError, create_backbone
from edgessl.backbones import ALIASES, resolve_name


@pytest.mark.parametrize("name,width,timm_name", [
    ("mobilenetv3", 1024, "mobilenetv3_small_100"),  # head_hidden_size, not num_features (576)
    ("mobilenetv4", 1280, "mobilenetv4_conv_small"),
    ("resnet18", 512, "resnet18"),
    ("mobilenetv3_small_050", 1024, "mobilenetv3_small_050"),
])
def test_pooled_width(name, width, timm_name):
    m = create_backbone(name, 32).eval()
    assert m.timm_name == timm_name and m.feature_dim == width
    assert m(torch.zeros(2, 3, 32, 32)).shape == (2, width)


@pytest.mark.parametrize("name,ds,fmap", [("mobilenetv3_small_050", 16, 2), ("mobilenetv3_small_050", 8, 4),
                                          ("mobilenetv3_small_050", 32, 1), ("resnet18", 8, 4),
                                          ("resnet10t", 16, 2)])
def test_downsample_sets_output_stride(name, ds, fmap):
    m = create_backbone(name, 32, ds).eval()
    assert m.output_stride == ds
    assert m.forward_features(torch.zeros(1, 3, 32, 32)).shape[-1] == fmap


def test_auto_stem_per_size():
    assert create_backbone("resnet18", 32).stem_changes == ["conv1: 7x7/2 -> 3x3/1", "maxpool: pool -> identity"]
    assert create_backbone("mobilenetv3_small_050", 32).output_stride == 16
    assert create_backbone("mobilenetv3_small_050", 224).stem_changes == []


@pytest.mark.parametrize("name", sorted(ALIASES))
def test_every_parameter_gets_a_finite_gradient(name):
    """timm's registry test, over every alias at the small-input stem pretraining uses."""
    torch.manual_seed(0)
    m = create_backbone(name, 32).train()
    out = m(torch.randn(4, 3, 32, 32))
    assert out.shape == (4, m.feature_dim) and torch.isfinite(out).all()
    out.pow(2).mean().backward()
    for pname, p in m.named_parameters():  # (not "non-zero": timm zero-inits ResNet's last BN per block)
        assert p.grad is not None and torch.isfinite(p.grad).all(), pname


def test_unknown_backbone_suggests_names():
    with pytest.raises(EdgesslError, match="did you mean .*mobilenetv3_small_100"):
        resolve_name("mobilenetv3_smal_100")


def test_init_weights_strict(tmp_path):
    from safetensors.torch import save_file

    src = create_backbone("mobilenetv3_small_050", 32)
    save_file({k: v.contiguous() for k, v in src.state_dict().items()}, tmp_path / "w.safetensors")
    dst = create_backbone("mobilenetv3_small_050", 32, init_weights=str(tmp_path / "w.safetensors"))
    for k, v in src.state_dict().items():
        assert torch.equal(v, dst.state_dict()[k]), k
    torch.save(create_backbone("resnet18", 224).state_dict(), tmp_path / "r.pth")
    with pytest.raises(EdgesslError, match="conv1.weight"):  # CIFAR stem: the 7x7 conv no longer fits
        create_backbone("resnet18", 32, init_weights=str(tmp_path / "r.pth"))
    (tmp_path / "bad.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(EdgesslError, match="cannot read init weights"):
        create_backbone("mobilenetv3_small_050", 32, init_weights=str(tmp_path / "bad.pth"))


def test_relu_alias_swaps_every_hard_swish_and_keeps_the_weights_shapes():
    stock, relu = create_backbone("mobilenetv3", 32), create_backbone("mobilenetv3-relu", 32)
    assert relu.timm_name == stock.timm_name == "mobilenetv3_small_100" and relu.model_args == {"act_layer": "relu"}
    kinds = {type(m).__name__ for m in relu.modules()}
    assert "Hardswish" not in kinds and "ReLU" in kinds
    assert "Hardswish" in {type(m).__name__ for m in stock.modules()}
    assert {k: v.shape for k, v in relu.state_dict().items()} == {k: v.shape for k, v in stock.state_dict().items()}
