"""edgessl: single-view self-supervised pretraining of small timm backbones, shipped to the edge."""

__version__ = "0.1.0"

from edgessl.errors import ConfigError, EdgesslError  # noqa: E402


def create_backbone(name, image_size=32, downsample="auto", init_weights=None, model_args=None):
    """timm backbone with pooled features and a small-input stem; see edgessl.backbones."""
    from edgessl.backbones import create_backbone as _create

    return _create(name, image_size, downsample, init_weights, model_args)


def load_backbone(folder):
    """The backbone of `edgessl export RUN_DIR --format timm --out DIR`, as a timm module."""
    from edgessl.backbones import load_backbone as _load

    return _load(folder)


__all__ = ["__version__", "create_backbone", "load_backbone", "ConfigError", "EdgesslError"]
