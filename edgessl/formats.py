"""The runtimes an encoder or classifier ships to, and each one's own converter and int8 quantiser.

    onnx        onnxruntime   torch.onnx (edgessl.export), onnxruntime quantize_static
    openvino    OpenVINO IR   openvino.convert_model of the checked fp32 ONNX file, NNCF quantize
    litert      LiteRT        litert_torch.convert, its PT2E quantizer
    executorch  ExecuTorch    torch.export + the XNNPACK delegate, XNNPACKQuantizer (PT2E)

Every writer here gets the network in torch and real calibration images (normalised float32),
and writes one file; edgessl.export checks that file in its own runtime (edgessl_edge.backends)
before it replaces anything at --out.
"""
from __future__ import annotations

import importlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from edgessl import config
from edgessl.errors import EdgesslError
from edgessl_edge.backends import quiet_stderr


@dataclass(frozen=True)
class Format:
    name: str
    suffix: str
    precisions: tuple[str, ...]
    dynamic_batch: bool  # False: the file has one batch size (1 unless --batch says otherwise)
    int8_student: bool  # int8 of a hard-swish / squeeze-excite network exports the ReLU student
    packages: tuple[str, ...]  # what the writer imports beyond the core (the extra of the same name has them)
    why: str  # the int8 choice, in one line
    threads: tuple[int, ...] = (1, 0)  # thread counts it is timed at (0: the runtime's default)


# int8 of MobileNetV3 exports the ReLU student in every runtime: measured side by side on the demo
# recipe's run (docs/export.md, "The int8 network per runtime"), it was faster than the network
# as trained in each, and within a kNN point of torch fp32
FORMATS = {
    "onnx": Format("onnx", ".onnx", ("fp32", "fp16", "int8"), True, True, (),
                   "onnxruntime's CPU provider runs hard-swish and squeeze-excite in float between "
                   "Quantize/Dequantize pairs, so int8 exports a ReLU student distilled from the run"),
    "openvino": Format("openvino", ".xml", ("fp32", "fp16", "int8"), True, True, ("openvino", "nncf"),
                       "int8 exports the ReLU student: in OpenVINO it ran faster than the network as trained, "
                       "within a kNN point (docs/export.md)"),
    "litert": Format("litert", ".tflite", ("fp32", "int8"), False, True, ("litert_torch", "ai_edge_litert"),
                     "int8 exports the ReLU student: in LiteRT the network as trained ran slower than fp32 "
                     "(docs/export.md)"),
    "executorch": Format("executorch", ".pte", ("fp32", "int8"), False, True, ("executorch",),
                         "int8 exports the ReLU student: in ExecuTorch it ran faster than the network as trained "
                         "(docs/export.md)", threads=(0,)),
}
assert tuple(FORMATS) == config.FORMATS  # the names the API and the CLI offer
NO_FP16 = ("XNNPACK runs fp16 arithmetic only on CPUs with native fp16 (ARMv8.2 FP16, AVX512-FP16), so an "
           "fp16 file could not be checked on every CPU it may meet")


def get(name: str) -> Format:
    if name not in FORMATS:
        raise EdgesslError(f"unknown format {name!r} ({', '.join(FORMATS)}, timm)")
    return FORMATS[name]


def require(fmt: Format) -> None:
    """Import what the format's writer needs, or one line naming the extra that installs it."""
    for package in fmt.packages:
        try:
            with quiet():  # TensorFlow's oneDNN banner, torchao's registration warnings
                importlib.import_module(package)
        except ImportError as e:
            raise EdgesslError(f"{fmt.name} export needs {package} ({e}); pip install 'edgessl[{fmt.name}]'") from None


def check_precision(fmt: Format, precision: str) -> None:
    if precision not in fmt.precisions:
        reason = NO_FP16 if precision == "fp16" else "not offered"
        raise EdgesslError(f"{fmt.name} {precision}: {reason} ({fmt.name} writes {', '.join(fmt.precisions)})")


def quiet():
    """The converters print their progress and native logs on stdout and stderr; keep them off
    the user's terminal (an error still arrives as an exception)."""
    return quiet_stderr((1, 2))


def batches(images: np.ndarray, size: int) -> list[torch.Tensor]:
    """Calibration batches of exactly `size` images (the last one filled up by repeating)."""
    return [torch.from_numpy(np.ascontiguousarray(np.resize(images[i:i + size], (size, *images.shape[1:]))))
            for i in range(0, len(images), size)]


def write_openvino(onnx_fp32: Path, out: Path, precision: str, images: np.ndarray, meta: dict) -> None:
    """OpenVINO IR (out = MODEL.xml, its weights in MODEL.bin) from the checked fp32 ONNX file; int8
    by NNCF post-training quantisation on `images`, fp16 as fp16 weights (compress_to_fp16)."""
    import openvino as ov

    with quiet():
        model = ov.convert_model(str(onnx_fp32))
        if precision == "int8":
            import nncf

            fixed = model.inputs[0].partial_shape[0]
            size = fixed.get_length() if fixed.is_static else 32
            data = nncf.Dataset([b.numpy() for b in batches(images, size)])
            model = nncf.quantize(model, data, subset_size=len(images), preset=nncf.QuantizationPreset.MIXED,
                                  advanced_parameters=openvino_int8_parameters())
        model.set_rt_info(json.dumps(meta), ["edgessl"])
        ov.save_model(model, str(out), compress_to_fp16=precision == "fp16")


def openvino_int8_parameters():
    """Per-tensor activation scales. NNCF's default gives the input of a depthwise conv one scale per
    channel; OpenVINO's CPU plugin (2026.4) then ran the int8 1x1 conv that writes it through its AMX
    kernel into a SIGSEGV when the conv has 8 output pixels or fewer (batch 1 or 2 of a 32 px
    MobileNetV3-small-050). Per-tensor scales take the plugin's other path on every CPU, and the file
    is built on one CPU to run on another (docs/export.md, "On other CPUs")."""
    from nncf.quantization.advanced_parameters import AdvancedQuantizationParameters, QuantizationParameters

    return AdvancedQuantizationParameters(activations_quantization_params=QuantizationParameters(per_channel=False))


def pt2e_quantize(module: nn.Module, example: torch.Tensor, quantizer, images: np.ndarray,
                  fold: bool) -> nn.Module:
    """torch.export, PT2E observers from `quantizer`, calibration on `images`, convert (`fold`: the
    weights stored quantised; litert_torch wants them as float + quantize ops)."""
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    prepared = prepare_pt2e(torch.export.export(module, (example,)).module(), quantizer)
    with torch.no_grad():
        for b in batches(images, example.shape[0]):
            prepared(b)
    return convert_pt2e(prepared, fold_quantize=fold)


def write_litert(module: nn.Module, out: Path, precision: str, images: np.ndarray, batch: int) -> None:
    """A .tflite of batch `batch` by litert_torch.convert; int8: its PT2E quantizer, symmetric
    per-channel weights, static activations calibrated on `images`."""
    import litert_torch
    from litert_torch.quantize import pt2e_quantizer, quant_config

    example = torch.from_numpy(np.ascontiguousarray(np.resize(images, (batch, *images.shape[1:]))))
    with quiet(), torch.no_grad():
        if precision == "int8":
            quantizer = pt2e_quantizer.PT2EQuantizer().set_global(
                pt2e_quantizer.get_symmetric_quantization_config(is_per_channel=True))
            module = pt2e_quantize(module, example, quantizer, images, fold=False)
            model = litert_torch.convert(module, (example,), quant_config=quant_config.QuantConfig(
                pt2e_quantizer=quantizer))
        else:
            model = litert_torch.convert(module, (example,))
        model.export(str(out))


def write_executorch(module: nn.Module, out: Path, precision: str, images: np.ndarray, batch: int) -> None:
    """A .pte of batch `batch`, lowered to the XNNPACK delegate; int8: XNNPACKQuantizer (PT2E),
    symmetric per-channel weights, static activations calibrated on `images`."""
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import to_edge_transform_and_lower

    example = torch.from_numpy(np.ascontiguousarray(np.resize(images, (batch, *images.shape[1:]))))
    with quiet(), torch.no_grad():
        if precision == "int8":
            from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import (
                XNNPACKQuantizer, get_symmetric_quantization_config)

            quantizer = XNNPACKQuantizer().set_global(get_symmetric_quantization_config(is_per_channel=True))
            module = pt2e_quantize(module, example, quantizer, images, fold=True)
        program = to_edge_transform_and_lower(torch.export.export(module, (example,)),
                                              partitioner=[XnnpackPartitioner()]).to_executorch()
    out.write_bytes(program.buffer)
