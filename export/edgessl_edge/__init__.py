"""edgessl's edge runtime: run an exported encoder or classifier with numpy, Pillow and the
runtime of the file: onnxruntime (.onnx), OpenVINO (.xml), LiteRT (.tflite) or ExecuTorch (.pte).

No torch, torchvision, timm or edgessl (ExecuTorch's Python runtime aside, which imports torch):
`pip install ./export` (or "./export[openvino]", "[litert]", "[executorch]") on the device.
The preprocessing is read from the model's metadata and is exactly the one edgessl
evaluates with (edgessl_edge.image.decode, which edgessl's folder loader also uses, then x / 255,
(x - mean) / std); tests/test_edge.py checks the two give the same tensor.
"""
from edgessl_edge.image import IMAGE_SUFFIXES, EdgeError, decode, list_images

__version__ = "0.1.0"

_RUNTIME = {"Encoder", "build_gallery", "check_gallery", "classify", "predict"}
_BACKENDS = {"open_model", "RUNTIMES"}


def __getattr__(name):  # PEP 562: onnxruntime is imported only when the runtime is used
    if name in _RUNTIME:
        from edgessl_edge import runtime

        return getattr(runtime, name)
    if name in _BACKENDS:
        from edgessl_edge import backends

        return getattr(backends, name)
    raise AttributeError(f"module 'edgessl_edge' has no attribute {name!r}")


__all__ = ["IMAGE_SUFFIXES", "EdgeError", "Encoder", "build_gallery", "check_gallery", "classify", "decode",
           "list_images", "open_model", "predict", "RUNTIMES"]
