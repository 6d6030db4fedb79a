"""The runtimes an encoder or classifier ships to, and each one's own converter and int8 quantiser.

    onnx        onnxruntime   torch.onnx (edgessl.exporter), onnxruntime quantize_static
    openvino    OpenVINO IR   openvino.convert_model of the checked fp32 ONNX file, NNCF quantize
    litert      LiteRT        litert_torch.convert, its PT2E quantizer
    executorch  ExecuTorch    torch.export + the XNNPACK delegate, XNNPACKQuantizer (PT2E)

Every writer here (Format.writer: one signature) gets the network in torch and real calibration
images (normalised float32), and writes one file; edgessl.exporter checks that file in its own runtime (edgessl_edge.backends)
before it replaces anything at --out.
"""
from __future__ import annotations

import importlib
import json
import platform
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from edgessl import config, isolate
from edgessl.errors import EdgesslError
from edgessl.onnxrt import META_KEY, batch_of
from edgessl.runfiles import atomic_write
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
    relu6_forms: bool = False  # int8 rewrites hard-swish / hard-sigmoid into ops the runtime quantises (edgessl.student)

    @property
    def writer(self):
        """write_NAME(module, out, precision, images, batch, opset, output, meta): the file, from torch."""
        return globals()[f"write_{self.name}"]


# int8 of MobileNetV3 exports the ReLU student in every runtime: measured side by side on the demo
# recipe's run (docs/export.md, "The int8 network per runtime"), it was faster than the network
# as trained in each, and within a kNN point of torch fp32
FORMATS = {
    "onnx": Format("onnx", ".onnx", ("fp32", "fp16", "int8"), True, True, (),
                   "onnxruntime's CPU provider runs hard-swish and squeeze-excite in float between "
                   "Quantize/Dequantize pairs, so int8 exports a ReLU student distilled from the run",
                   relu6_forms=True),
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


def write_onnx(module: nn.Module, out: Path, precision: str, images: np.ndarray, batch, opset: int, output: str,
               meta: dict) -> None:
    """An ONNX file by torch.onnx: fp32 as exported, fp16 by onnxruntime's converter, int8 by its
    static QDQ quantiser calibrated on `images`; the metadata inside (edgessl_edge reads it)."""
    fp32 = out.with_name(out.stem + ".fp32.onnx")
    torch_export(module, fp32, images.shape[-1], batch, opset, output)
    if precision == "int8":
        isolate.step(f"quantising {out.name}")
        quantize_int8(fp32, out, images, meta["int8_weight_bits"])
    elif precision == "fp16":
        convert_fp16(fp32, out)
    else:
        fp32.rename(out)
    write_onnx_metadata(out, meta)


def write_onnx_metadata(path: Path, meta: dict) -> None:
    import onnx

    model = onnx.load(str(path))
    del model.metadata_props[:]
    model.metadata_props.add(key=META_KEY, value=json.dumps(meta))
    model.producer_name = "edgessl"
    onnx.checker.check_model(model)
    model = onnx.shape_inference.infer_shapes(model, strict_mode=True)
    atomic_write(path, model.SerializeToString())


class _Calibration:
    """onnxruntime CalibrationDataReader over real images, in batches of `batch` (a file with a
    fixed batch gets exactly that many: the last batch is filled up by repeating images)."""

    def __init__(self, images: np.ndarray, name: str, batch: int = 32, fixed: bool = False):
        self.batches = iter([{name: batch_of(images[i:i + batch], batch) if fixed else images[i:i + batch]}
                             for i in range(0, len(images), batch)])

    def get_next(self):
        return next(self.batches, None)

    def rewind(self):  # pragma: no cover - only some calibrators rewind
        pass


def int8_weight_bits() -> int:
    """8, or 7 on an x86 CPU without VNNI: there onnxruntime's U8S8 kernels sum pairs of uint8 x
    int8 products in int16 (pmaddubsw), which full-range weights can saturate, so its docs advise
    `reduce_range`. With VNNI (and on ARM) the sums are int32 and the eighth bit is accuracy
    (docs/export.md)."""
    if platform.machine().lower() not in ("x86_64", "amd64", "i386", "i686"):
        return 8
    vnni = getattr(torch.cpu, "_is_vnni_supported", None)  # private in torch 2.x: absent means no
    return 8 if vnni and vnni() else 7


def quantize_int8(fp32_path: Path, out: Path, calib: np.ndarray, weight_bits: int = 8, **options) -> None:
    """Static QDQ: uint8 activations, int8 per-channel weights (7 bits: `reduce_range`), calibrated
    on `calib` (min-max). U8S8 is onnxruntime's fast path; S8S8 ran 4-6x slower on the CPUs
    measured (docs/export.md). `options` go to onnxruntime's quantize_static
    (calibrate_method, nodes_to_exclude, ...)."""
    import onnx
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    fixed = onnx.load(str(fp32_path)).graph.input[0].type.tensor_type.shape.dim[0].dim_value  # 0: dynamic
    reader = type("Reader", (_Calibration, CalibrationDataReader), {})(calib, "images", fixed or 32, bool(fixed))
    with tempfile.TemporaryDirectory() as tmp:
        pre = Path(tmp) / "pre.onnx"
        quant_pre_process(str(fp32_path), str(pre), skip_symbolic_shape=True)
        quantize_static(str(pre), str(out), reader, quant_format=QuantFormat.QDQ, per_channel=True,
                        reduce_range=weight_bits == 7, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        **options)


def convert_fp16(fp32_path: Path, out: Path) -> None:
    """fp16 weights and activations, float32 input and output (keep_io_types)."""
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = convert_float_to_float16(onnx.load(str(fp32_path)), keep_io_types=True)
    topological_sort(model.graph)  # the converter appends its input Casts after their consumers
    onnx.save(model, str(out))


def topological_sort(graph) -> None:
    """Reorder graph.node so every node follows the producers of its inputs (ONNX requires it)."""
    produced = {i.name for i in graph.input} | {i.name for i in graph.initializer} | {""}
    pending, ordered = list(graph.node), []
    while pending:
        ready = [n for n in pending if all(i in produced for i in n.input)]
        if not ready:
            raise EdgesslError("fp16 conversion produced a graph with a cycle or a dangling input")
        for n in ready:
            ordered.append(n)
            produced.update(n.output)
        pending = [n for n in pending if all(n is not r for r in ready)]
    del graph.node[:]
    graph.node.extend(ordered)


def torch_export(encoder: nn.Module, path: Path, size: int, batch, opset: int, output: str = "features") -> None:
    """The TorchScript-based exporter (dynamo=False): parity <= 8e-6 on these backbones
    (docs/export.md), sub-second, and no onnxscript dependency; the dynamo exporter failed
    on timm's MobileNetV3 with a dynamic batch here."""
    import warnings

    fixed = batch != "dynamic"
    dummy = torch.zeros(int(batch) if fixed else 2, 3, size, size)  # batch >= 2: no batch-1 specialisation
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(encoder, (dummy,), str(path), input_names=["images"], output_names=[output],
                          opset_version=opset, dynamo=False, external_data=False,
                          dynamic_axes=None if fixed else {"images": {0: "batch"}, output: {0: "batch"}})


def write_openvino(module: nn.Module, out: Path, precision: str, images: np.ndarray, batch, opset: int, output: str,
                   meta: dict) -> None:
    """OpenVINO IR (out = MODEL.xml, its weights in MODEL.bin) from the fp32 ONNX file torch.onnx
    writes; int8 by NNCF post-training quantisation on `images`, fp16 as fp16 weights (compress_to_fp16)."""
    import openvino as ov

    onnx_fp32 = out.with_name(out.stem + ".fp32.onnx")
    torch_export(module, onnx_fp32, images.shape[-1], batch, opset, output)
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


def write_litert(module: nn.Module, out: Path, precision: str, images: np.ndarray, batch, opset: int, output: str,
                 meta: dict) -> None:
    """A .tflite of batch `batch` by litert_torch.convert; int8: its PT2E quantizer, symmetric
    per-channel weights, static activations calibrated on `images`."""
    import litert_torch
    from litert_torch.quantize import pt2e_quantizer, quant_config

    example = torch.from_numpy(np.ascontiguousarray(np.resize(images, (int(batch), *images.shape[1:]))))
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


def write_executorch(module: nn.Module, out: Path, precision: str, images: np.ndarray, batch, opset: int,
                     output: str, meta: dict) -> None:
    """A .pte of batch `batch`, lowered to the XNNPACK delegate; int8: XNNPACKQuantizer (PT2E),
    symmetric per-channel weights, static activations calibrated on `images`."""
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import to_edge_transform_and_lower

    example = torch.from_numpy(np.ascontiguousarray(np.resize(images, (int(batch), *images.shape[1:]))))
    with quiet(), torch.no_grad():
        if precision == "int8":
            from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import (
                XNNPACKQuantizer, get_symmetric_quantization_config)

            quantizer = XNNPACKQuantizer().set_global(get_symmetric_quantization_config(is_per_channel=True))
            module = pt2e_quantize(module, example, quantizer, images, fold=True)
        program = to_edge_transform_and_lower(torch.export.export(module, (example,)),
                                              partitioner=[XnnpackPartitioner()]).to_executorch()
    out.write_bytes(program.buffer)
