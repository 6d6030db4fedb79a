"""edgessl: single-view self-supervised pretraining of small timm backbones, shipped to the edge.

    import edgessl
    run = edgessl.pretrain(data="folder:photos", out="runs/r1", minutes=15)
    run.export("model.onnx", precision="int8")
    clf = edgessl.finetune(run, labels_per_class=10, out="runs/ft")

See edgessl/api.py. Heavy modules are imported on first use, so `import edgessl` is light.
"""
from edgessl.errors import ConfigError, EdgesslError
from edgessl.version import __version__

_API = {"Run", "Trainer", "pretrain", "finetune", "check"}


def __getattr__(name):  # PEP 562: edgessl.pretrain & co. import torch only when first used
    if name in _API:
        from edgessl import api

        return getattr(api, name)
    raise AttributeError(f"module 'edgessl' has no attribute {name!r}")


def create_backbone(name, image_size=32, downsample="auto", init_weights=None, model_args=None):
    """timm backbone with pooled features and a small-input stem; see edgessl.backbones."""
    from edgessl.backbones import create_backbone as _create

    return _create(name, image_size, downsample, init_weights, model_args)


def load_backbone(folder):
    """The backbone of `edgessl export RUN_DIR --format timm --out DIR`, as a timm module."""
    from edgessl.backbones import load_backbone as _load

    return _load(folder)


__all__ = ["__version__", "Run", "Trainer", "pretrain", "finetune", "check", "create_backbone", "load_backbone",
           "ConfigError", "EdgesslError"]
