"""Encoder or classifier -> a model file for onnxruntime, OpenVINO, LiteRT or ExecuTorch (fp32 /
fp16 / int8; edgessl.formats), or timm weights; each file checked in its own runtime.

What ships is the file, so what a user is told about it (parity, latency, kNN) is measured on
that file through the runtime that will run it (edgessl_edge.backends, the same code the
device runs). Preprocessing travels in its metadata (in the file where the format has a place
for it, and in MODEL.json beside it).
"""
from __future__ import annotations

import copy
import hashlib
import json
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from edgessl import data as data_lib
from edgessl import formats, isolate
from edgessl.student import CAP_SECONDS, distill, needs_adapting, rewrite_hard_activations
from edgessl.augment import normalize
from edgessl.config import Config
from edgessl.errors import EdgesslError
from edgessl.features import features
from edgessl.onnxrt import batch_of, latency_side_by_side, parity, speedups
from edgessl_edge.backends import Backend, open_model
from edgessl_edge.backends import latency as backend_latency
from edgessl.runfiles import atomic_write, record_export
from edgessl.rebuild import Classifier, check_run_data, is_classifier, load_run
from edgessl.version import __version__

# The export's own bar for an fp32 file: max abs diff <= 1e-4 of the feature scale
# (max(1, max |feature|): float32 rounding grows with magnitude) and cosine >= 0.99999.
FP32_MAX_ABS, FP32_MIN_COS = 1e-4, 0.99999


class Encoder(nn.Module):
    """What is exported: pooled backbone features h, or with the head the unit vector z."""

    def __init__(self, backbone: nn.Module, head: Optional[nn.Module] = None):
        super().__init__()
        self.backbone, self.head = backbone, head

    def forward(self, images: torch.Tensor) -> torch.Tensor:  # (B, 3, S, S) -> (B, D)
        h = self.backbone(images)
        return h if self.head is None else F.normalize(self.head(h), dim=1)


def export_module(model: nn.Module, with_head: bool) -> nn.Module:
    """A fine-tuned classifier exports whole (logits); a pretraining run exports its encoder."""
    if isinstance(model, Classifier):
        return model.eval()
    return Encoder(model.backbone, getattr(model, "head", None) if with_head else None).eval()


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


STUDENTS = "students"  # RUN/students/: the int8 students distilled from the run, kept for the next export
FIT_RULES = {"squash": "resize the whole image to input_size x input_size (aspect ratio not kept)",
             "crop": "centre square of the short side, resized to input_size x input_size"}


def metadata(cfg: Config, state: dict, encoder: Encoder, precision: str, ckpt: Path, batch) -> dict:
    import onnx

    size = state["backbone"]["image_size"]
    classifier = is_classifier(state)
    head = getattr(encoder, "head", None)
    dim = len(state["classes"]) if classifier else head[-1].out_features if head is not None \
        else state["backbone"]["feature_dim"]
    extra = {"kind": "classifier", "classes": state["classes"]} if classifier else {"kind": "encoder"}
    return {"format": "edgessl", "input": "images", "output": output_name(state), **extra,
            "input_size": [3, size, size], "layout": "NCHW", "channel_order": "RGB", "scale": 1 / 255,
            "mean": list(cfg.data.mean), "std": list(cfg.data.std),
            "resize": {"fit": cfg.data.fit, "rule": FIT_RULES[cfg.data.fit], "interpolation": "bicubic"},
            "feature_dim": dim, "normalized": head is not None, "with_head": head is not None,
            "backbone": state["backbone"]["timm_name"], "model_args": state["backbone"].get("model_args", {}),
            "output_stride": state["backbone"]["output_stride"],
            "method": cfg.method.name, "precision": precision, "batch": batch,
            "source_checkpoint_sha256": sha256(ckpt),
            "versions": {"edgessl": __version__, "torch": str(torch.__version__), "onnx": onnx.__version__}}


def output_name(state: dict) -> str:
    return "logits" if is_classifier(state) else "features"


def run_images(data: data_lib.ImageData, count: int, cfg: Config) -> np.ndarray:
    """`count` real images spread over `data`, normalised as in evaluation: float32 (count, 3, S, S)."""
    idx = torch.linspace(0, len(data) - 1, min(count, len(data))).long()
    return normalize(data.images[idx], cfg.data.mean, cfg.data.std).numpy()


def export_model(run_dir: str | Path, out: str | Path, precision: str = "fp32", calib: Optional[str] = None,
                 calib_count: int = 256, batch: str | int = "dynamic", opset: int = 18,
                 with_head: bool = False, knn: bool = True, adapt: Optional[bool] = None,
                 adapt_seconds: float = CAP_SECONDS, progress: Optional[bool] = None, fmt: str = "onnx",
                 timing: bool = True, students: Optional[dict] = None) -> dict:
    """Write MODEL (+ MODEL.json sidecar) for the runtime `fmt` names, check it against torch in
    that runtime, and return the report.

    int8 of a pretraining run whose backbone has hard-swish or squeeze-excite blocks
    (MobileNetV3), with `adapt` (None: the format's choice, formats.Format.int8_student): the
    exported network is a student without them (ReLU, mean gates folded) distilled from it for
    `adapt_seconds` (edgessl.student); the kNN change is then measured against the original
    network in torch fp32, so it states what the adaptation and int8 cost together. fp16 and
    int8 files are timed against the same runtime's fp32 file of the run, side by side
    (`speedup_vs_fp32`). A format with one batch size per file (LiteRT, ExecuTorch) writes
    batch 1 unless `batch` says otherwise. `timing=False` skips the side-by-side timing (and the
    fp32 file it needs). `students`: a dict shared by several exports of one run, so that the
    int8 student is distilled once for all of them (edgessl.benchmark)."""
    spec = formats.get(fmt)
    formats.check_precision(spec, precision)
    model, cfg, state = load_run(run_dir)
    out = Path(out)
    if not out.parent.exists():
        raise EdgesslError(f"folder {out.parent} does not exist")
    if out.suffix.lower() != spec.suffix:
        raise EdgesslError(f"--format {fmt} writes MODEL{spec.suffix}, not {out.name}")
    formats.require(spec)
    batch = 1 if batch == "dynamic" and not spec.dynamic_batch else batch
    knn = knn and not is_classifier(state)
    job = _prepare(model, cfg, state, precision, calib, calib_count, with_head, knn,
                   spec.int8_student if adapt is None else adapt, adapt_seconds, progress, students,
                   Path(run_dir) / STUDENTS, gate=adapt is None)
    meta = metadata(cfg, state, job.encoder, precision, Path(run_dir) / "checkpoint.pt", batch)
    meta["runtime"] = fmt
    if precision == "int8":
        meta["int8_weight_bits"] = formats.int8_weight_bits() if fmt == "onnx" else 8
        meta["int8_network"] = "relu_student" if job.adapted else "as_trained"
    if job.rejected:
        meta["student_rejected"] = job.rejected
    if job.adapted:
        a = job.adapted
        meta["adapted"] = {"hard_swish_to_relu": a["swapped"], "squeeze_excite_folded": a["se_folded"],
                           "distilled_seconds": a["seconds"], "distilled_steps": a["steps"],
                           "distillation_stopped": a["stopped"]}
    report = _write_checked(job, out, cfg, state, spec, precision, meta, batch, opset, knn, timing)
    record_export(run_dir, out, report)
    return report


@dataclass
class _Job:
    encoder: nn.Module  # what is exported (a ReLU student for an adapted int8 file)
    original: nn.Module  # the run's network: what the kNN change and the fp32 baseline are measured on
    adapted: Optional[dict]
    images: np.ndarray  # normalised calibration / parity images
    own: Optional[tuple]  # a pretraining run's own (train, held-out) images
    size: int
    rejected: Optional[dict] = None  # the int8 student's held-out kNN change, when it lost too much to ship
    knn_original: Optional[float] = None  # `original`'s torch fp32 kNN, where the int8 gate measured it already


def _prepare(model, cfg, state, precision, calib, calib_count, with_head, knn, adapt, adapt_seconds,
             progress, students: Optional[dict] = None, keep: Optional[Path] = None, gate: bool = False) -> _Job:
    """The images to calibrate and check with, and the network to export (the int8 student,
    distilled, or taken from `students` ({seconds: (student, report)}) where one was made before
    in this process, or continued from `keep` where one was saved: edgessl.student.distill).
    `gate` (the runtime's choice, not --adapt): a student that loses more than ADAPT_MAX_KNN_LOSS
    kNN points on the run's labelled held-out images, in torch fp32, gives way to the network as
    trained (student_knn_change)."""
    size = state["backbone"]["image_size"]
    own = None  # a pretraining run's own (train, held-out) images: calibration and the kNN change
    if not is_classifier(state) and (calib is None or knn):
        own = data_lib.load_split(cfg.data)
        check_run_data(state, *own, "export")
    fit = cfg.data.fit
    source = (data_lib.load(calib, size, fit=fit) if calib else own[0] if own else
              data_lib.load(cfg.data.spec, size, fit=fit))
    images = run_images(source, max(16, calib_count if precision == "int8" else 16), cfg)
    encoder = original = export_module(model, with_head)
    adapted = measured = None  # measured: `original`'s torch fp32 kNN, where the int8 gate took it
    if precision == "int8" and adapt and not is_classifier(state) and needs_adapting(model.backbone):
        if students is None or adapt_seconds not in students:
            made = distill(model.backbone, own[0].images if own else source.images, cfg, seconds=adapt_seconds,
                           progress=progress, keep=keep)
            students = {adapt_seconds: made} if students is None else students
            students.setdefault(adapt_seconds, made)
        if gate and knn and own:  # measured once per student (kept with it in `students`)
            student_knn_change(model.backbone, *students[adapt_seconds], cfg, *own)
        if not with_head:  # the gate measured the backbone: `original` without a head
            measured = students[adapt_seconds][1].get("knn_teacher")
        if gate and students[adapt_seconds][1].get("knn_change", 0) < -ADAPT_MAX_KNN_LOSS:
            report = students[adapt_seconds][1]
            return _Job(encoder, original, None, images, own, size, rejected={
                k: report[k] for k in ("knn_change", "knn_student", "knn_teacher", "steps", "seconds")},
                knn_original=measured)
        student, adapted = copy.deepcopy(students[adapt_seconds][0]), dict(students[adapt_seconds][1])
        encoder = Encoder(student, getattr(model, "head", None) if with_head else None).eval()
        with torch.no_grad():
            adapted["feature_cosine_to_original"] = float(torch.nn.functional.cosine_similarity(
                encoder(torch.from_numpy(images)), original(torch.from_numpy(images)), dim=1).mean())
    return _Job(encoder, original, adapted, images, own, size, knn_original=measured)


def student_knn_change(teacher: nn.Module, student: nn.Module, report: dict, cfg: Config,
                       train: data_lib.ImageData, val: Optional[data_lib.ImageData]) -> None:
    """Into the student's `report` (once): knn_teacher, knn_student and knn_change, the kNN top-1 of
    both backbones in torch fp32 on the run's held-out split; nothing where it has no labels."""
    from edgessl.knn import heldout_knn

    if "knn_change" in report or val is None or train.labels is None or val.labels is None:
        return
    acc = [heldout_knn(lambda x: features(net, x, cfg.data.mean, cfg.data.std), train, val, cfg.run.knn_k)
           for net in (teacher, student)]
    report.update(knn_teacher=acc[0], knn_student=acc[1], knn_change=acc[1] - acc[0])


def write_file(module: nn.Module, spec: formats.Format, precision: str, folder: Path, name: str, meta: dict,
               images: np.ndarray, batch, opset: int, output: str) -> Path:
    """Write `module` as FOLDER/NAME.SUFFIX (+ NAME.json) by `spec`'s writer; return the model path."""
    path = folder / f"{name}{spec.suffix}"
    isolate.step(f"writing {path.name}")
    if precision == "int8" and spec.relu6_forms:
        rewrite_hard_activations(module)  # the runtime's int8 ops: the relu6 forms, gates folded
    spec.writer(module, path, precision, images, batch, opset, output, meta)
    path.with_suffix(".json").write_text(json.dumps(meta, indent=1))
    return path


CRASH_HINT = ("--out is untouched; another --format or --precision may work, and ONEDNN_MAX_CPU_ISA=AVX2 keeps "
              "OpenVINO off its AVX-512 and AMX kernels")


def _write_checked(job: _Job, out: Path, cfg, state, spec: formats.Format, precision, meta, batch, opset,
                   knn, timing) -> dict:
    """Export, convert and check in a temporary folder, in a child process (a runtime's crash is one
    line: edgessl.isolate); only a file that passed replaces `out`."""
    with tempfile.TemporaryDirectory() as tmp:
        report, final = isolate.call(_write_and_check, job, Path(tmp), out, cfg, state, spec, precision, meta,
                                     batch, opset, knn, timing, what=f"the {spec.name} {precision} export of {out}",
                                     hint=CRASH_HINT)
        _move(final, out)
    return report


def _write_and_check(job: _Job, tmp: Path, out: Path, cfg, state, spec: formats.Format, precision, meta, batch,
                     opset, knn, timing) -> tuple[dict, Path]:
    with torch.no_grad():
        reference = job.encoder(torch.from_numpy(job.images[:16])).numpy()
    baseline = None  # the run's network as the fp32 export writes it: what fp16 / int8 are timed against
    if precision != "fp32" and timing:
        baseline = write_file(job.original, spec, "fp32", tmp, "baseline", {**meta, "precision": "fp32"},
                              job.images, batch, opset, output_name(state))
    final = write_file(job.encoder, spec, precision, tmp, precision, meta, job.images, batch, opset,
                       output_name(state))
    isolate.step(f"loading {final.name} in {spec.name}")
    model = open_model(final)
    isolate.step(f"checking {final.name} against torch")
    report = {"path": str(out), "format": spec.name, "size_bytes": _size(final), "precision": precision,
              **parity(reference, model.features(job.images[:16])),
              "latency_batch": model.fixed_batch or 1}
    isolate.step(f"timing {final.name}")
    report["latency_ms_p50"] = backend_latency(model, batch_of(job.images, report["latency_batch"]), 20)["p50"]
    if precision == "fp32" and (report["max_rel_diff"] > FP32_MAX_ABS or report["min_cosine"] < FP32_MIN_COS):
        raise EdgesslError(f"fp32 export failed its parity check (max abs diff {report['max_abs_diff']:.2e}, "
                           f"{report['max_rel_diff']:.2e} of the feature scale, "
                           f"min cosine {report['min_cosine']:.6f}); nothing written")
    if precision == "int8":
        report["int8_network"] = meta["int8_network"]
    if job.rejected:
        report["student_rejected"] = job.rejected
    if job.adapted:
        report["adapted"] = job.adapted
    if baseline is not None:
        report["speedup_vs_fp32"] = speedup_vs_fp32(baseline, final, job.images, batch, spec.threads)
    if knn:
        isolate.step(f"measuring the kNN change of {final.name}")
        report.update(knn_change(job.original, model, cfg, *job.own, torch_fp32=job.knn_original))
    if is_classifier(state):
        isolate.step(f"measuring the top-1 agreement of {final.name}")
        report.update(top1_agreement(job.encoder, model, cfg))
    return report, final


def _size(path: Path) -> int:
    return path.stat().st_size + (path.with_suffix(".bin").stat().st_size if path.suffix == ".xml" else 0)


def _move(final: Path, out: Path) -> None:
    """The checked file to `out`, each part written whole (OpenVINO's weights before its .xml)."""
    if final.suffix == ".xml":
        atomic_write(out.with_suffix(".bin"), final.with_suffix(".bin").read_bytes())
    atomic_write(out, final.read_bytes())
    atomic_write(out.with_suffix(".json"), final.with_suffix(".json").read_bytes())


def speedup_vs_fp32(fp32: Path, other: Path, images: np.ndarray, batch, threads=(1, 0)) -> dict:
    """{threads: {batch size: fp32's p50 / other's p50}} for 1 thread and the runtime's default
    (key 0), at batch 1 and 32 (or the file's fixed batch), the two files taking turns."""
    sizes = (1, 32) if batch == "dynamic" else (int(batch),)
    p50 = latency_side_by_side({"fp32": fp32, "other": other}, images, sizes, threads=threads)
    return speedups(p50, "fp32")["other"]


def speedup_line(up: dict) -> str:
    """'1.62x / 1.55x at batch 1 / 32 on 1 thread, ... on the runtime's default threads'."""
    sizes = " / ".join(str(b) for b in next(iter(up.values())))
    return ", ".join(" / ".join(f"{x:.2f}x" for x in per_b.values()) + f" at batch {sizes} on "
                     + ("the runtime's default threads" if str(t) == "0" else f"{t} thread{'s' * (str(t) != '1')}")
                     for t, per_b in up.items())


ADAPT_MAX_KNN_LOSS = 1.0  # kNN points an int8 student (or file) may lose: beyond it, the network as trained ships
# instead of the student (measured on the run's held-out split, in torch), and a file's check fails
MIN_TOP1_AGREEMENT = 0.99  # a classifier's int8 file agreeing less with torch fp32 is reported


def export_advice(report: dict) -> Optional[str]:
    """A warning line when an int8 export lost what a user would notice: an adapted (ReLU
    student) file more than ADAPT_MAX_KNN_LOSS kNN points against the original network, or a
    classifier whose top-1 class agrees with torch fp32 on under MIN_TOP1_AGREEMENT of the
    held-out images, or a file slower than the run's fp32 file at every batch size and thread count
    it was timed at; None otherwise."""
    agree, change, up = report.get("top1_agreement"), report.get("knn_change"), report.get("speedup_vs_fp32")
    if agree is not None and agree < MIN_TOP1_AGREEMENT:
        return (f"warning: int8 changes the top-1 class of {100 * (1 - agree):.1f} % of the held-out images; "
                f"the fp32 export keeps every one")
    if report.get("adapted") and change is not None and change < -ADAPT_MAX_KNN_LOSS:
        return (f"warning: the ReLU student loses {-change:.2f} kNN points against the original network; "
                f"--no-adapt exports the network as it is (closer to it, and slower in int8)")
    if report.get("precision") != "fp32" and up and max(x for per_b in up.values() for x in per_b.values()) < 1:
        return (f"warning: this {report['precision']} file ran slower than the run's fp32 file on this CPU "
                f"({speedup_line(up)}); the fp32 file is the faster one to ship here")
    return None


def top1_agreement(classifier: nn.Module, model: Backend, cfg: Config, most: int = 1024) -> dict:
    """How often the exported classifier's top-1 class is torch fp32's, on up to `most` held-out
    images of the pretraining run's data (its training images when it held none out)."""
    train, val = data_lib.load_split(cfg.data)
    data = val if val is not None else train
    x = run_images(data, most, cfg)
    with torch.no_grad():
        ref = classifier(torch.from_numpy(x)).argmax(1).numpy()
    got = model.features(x).argmax(1)
    return {"top1_agreement": float((ref == got).mean()), "agreement_images": len(x)}


def knn_change(encoder: nn.Module, model: Backend, cfg: Config, train: data_lib.ImageData,
               val: Optional[data_lib.ImageData], torch_fp32: Optional[float] = None) -> dict:
    """kNN top-1 of torch fp32 features (`torch_fp32` where it was measured) and of the exported file's,
    on the run's held-out split."""
    from edgessl.knn import heldout_knn

    if val is None or train.labels is None or val.labels is None:
        return {}
    def exported(images: torch.Tensor) -> torch.Tensor:  # the file in its own runtime
        return torch.from_numpy(np.concatenate([model.features(normalize(c, cfg.data.mean, cfg.data.std).numpy())
                                                for c in images.split(256)]))

    acc = {"torch_fp32": torch_fp32 if torch_fp32 is not None else
           heldout_knn(lambda x: features(encoder, x, cfg.data.mean, cfg.data.std), train, val, cfg.run.knn_k),
           "export": heldout_knn(exported, train, val, cfg.run.knn_k)}
    return {"knn_torch_fp32": acc["torch_fp32"], "knn_export": acc["export"],
            "knn_change": acc["export"] - acc["torch_fp32"]}


def export_timm(run_dir: str | Path, out_dir: str | Path) -> dict:
    """The backbone as timm weights: model.safetensors + config.json (timm's pretrained_cfg fields
    plus the stem change), loadable by edgessl.load_backbone(DIR) and, for a stock stem, by
    timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=..., num_classes=0))."""
    from safetensors.torch import save_file

    model, cfg, state = load_run(run_dir)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    bb = state["backbone"]
    save_file({k: v.contiguous() for k, v in model.backbone.state_dict().items()}, str(out / "model.safetensors"))
    config = {"architecture": bb["timm_name"], "model_args": model.backbone.model_args,
              "num_classes": 0, "num_features": bb["feature_dim"],
              "pretrained_cfg": {"input_size": [3, bb["image_size"], bb["image_size"]], "interpolation": "bicubic",
                                 "mean": list(cfg.data.mean), "std": list(cfg.data.std), "num_classes": 0,
                                 "crop_pct": 1.0},
              "edgessl": {"output_stride": bb["output_stride"], "stem_changes": model.backbone.stem_changes,
                          "method": cfg.method.name, "source_checkpoint_sha256": sha256(Path(run_dir) / "checkpoint.pt")}}
    (out / "config.json").write_text(json.dumps(config, indent=1))
    return {"path": str(out), "files": ["model.safetensors", "config.json"], "architecture": bb["timm_name"]}
