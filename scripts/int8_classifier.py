"""How often a fine-tuned classifier's int8 file keeps torch fp32's top-1 class, by quantisation setting.

    .venv/bin/python scripts/int8_classifier.py FINETUNE_RUN [--qat-seconds 60] [--sensitivity] [--out runs/int8_classifier.json]

Agreement on up to 1024 held-out images of the run's data (what `edgessl export` reports), for:
weights alone rounded in torch to 7 and 8 bits per channel (no activation quantisation: the
ceiling of post-training weights); onnxruntime QDQ files with 7-bit weights (reduce_range)
and 8-bit weights, 1024 calibration images instead of 256, entropy and percentile
calibration, and the first conv and the final layer kept in float; and the classifier fine-tuned for
--qat-seconds with int8 simulated (`quantization_aware`: weights rounded per channel, every
conv and linear input rounded to uint8 over its calibrated range, straight-through gradients)
to give the original's logits, then quantised the same way. The top-1 margin
quantiles (logit 1 minus logit 2) say how close the classes already are. `--sensitivity`
also keeps each Conv / Gemm in float alone, ranks them by agreement on 1024 training images,
and keeps the top 1, 2, 4 and 8 in float (chosen on training images, reported on held-out).
"""
from __future__ import annotations

import argparse
import copy
import json
import tempfile
from pathlib import Path
from typing import Optional

import numpy as np
import onnx
import torch
import torch.nn.functional as F
from torch import nn
from onnxruntime.quantization import CalibrationMethod
from onnxruntime.quantization.shape_inference import quant_pre_process

from edgessl import data as data_lib
from edgessl.adapt import train_for
from edgessl.augment import normalize
from edgessl.config import Config
from edgessl.export import export_module, quantize_int8, rewrite_hard_activations, run_images, torch_export
from edgessl.onnxrt import ort_features, session
from edgessl.runs import load_run


class WeightFakeQuant(nn.Module):
    """A parametrization: the weight as onnxruntime's QDQ stores it (symmetric per output
    channel, scale max |w| / (2^(bits-1) - 1)), rounded in the forward, straight through backward."""

    def __init__(self, bits: int):
        super().__init__()
        self.top = 2 ** (bits - 1) - 1

    def forward(self, w):
        scale = (w.detach().abs().flatten(1).amax(1).clamp_min(1e-8) / self.top).float()
        return torch.fake_quantize_per_channel_affine(w, scale, torch.zeros_like(scale, dtype=torch.int32), 0,
                                                      -self.top, self.top)


@torch.no_grad()
def weights_rounded(net: nn.Module, bits: int) -> nn.Module:
    """A copy with every conv and linear weight rounded as onnxruntime stores it (WeightFakeQuant)."""
    net, rounding = copy.deepcopy(net), WeightFakeQuant(bits)
    for m in net.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            m.weight.copy_(rounding(m.weight))
    return net


def input_fake_quant(ranges: dict):
    """A forward pre-hook rounding a layer's input to uint8 over its calibrated (min, max), as
    onnxruntime's QuantizeLinear does (min-max calibration, the range widened to hold 0)."""
    def hook(module, inputs):
        lo, hi = ranges[module]
        scale = max((hi - lo) / 255.0, 1e-8)
        zero = int(min(255, max(0, round(-lo / scale))))
        return (torch.fake_quantize_per_tensor_affine(inputs[0], scale, zero, 0, 255), *inputs[1:])
    return hook


def quantization_aware(classifier: nn.Module, images: torch.Tensor, cfg: Config, seconds: float = 60.0,
                       weight_bits: int = 8, batch_size: int = 64, lr: float = 1e-4, seed: int = 0,
                       progress: Optional[bool] = None) -> tuple:
    """(classifier', stats): a copy of `classifier` fine-tuned for `seconds` with int8 simulated
    (every conv and linear weight rounded per channel to `weight_bits`, every conv and linear
    input to uint8 over its min-max range on 256 of `images`) so that its logits match the
    original's (mean squared error) on `images` (uint8 N x 3 x S x S) as deployed, flipped at
    random. BatchNorm statistics stay frozen; the float weights are returned, which onnxruntime's
    calibration then rounds the same way."""
    from torch.nn.utils import parametrize

    torch.manual_seed(seed)
    teacher = classifier.eval()
    student = copy.deepcopy(teacher).eval()
    layers = [m for m in student.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    ranges = {}

    def observe(module, inputs):
        lo, hi = float(inputs[0].min()), float(inputs[0].max())
        old = ranges.get(module, (0.0, 0.0))  # the range always holds 0
        ranges[module] = (min(old[0], lo), max(old[1], hi))

    idx = torch.linspace(0, len(images) - 1, min(256, len(images))).long()
    calib = normalize(images[idx], cfg.data.mean, cfg.data.std)
    hooks = [m.register_forward_pre_hook(observe) for m in layers]
    with torch.no_grad():
        for chunk in calib.split(64):
            student(chunk)
    for h in hooks:
        h.remove()
    hooks = [m.register_forward_pre_hook(input_fake_quant(ranges)) for m in layers]
    for m in layers:
        parametrize.register_parametrization(m, "weight", WeightFakeQuant(weight_bits))
    opt = torch.optim.AdamW([p for p in student.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)

    def loss():
        batch = images[torch.randint(0, len(images), (batch_size,))]
        flip = torch.rand(batch_size) < 0.5
        x = normalize(torch.where(flip.view(-1, 1, 1, 1), batch.flip(-1), batch), cfg.data.mean, cfg.data.std)
        with torch.no_grad():
            target = teacher(x)
        return F.mse_loss(student(x), target)

    try:
        stats = train_for(seconds, opt, lr, loss, "int8: quantisation-aware tuning", progress)
    finally:
        for h in hooks:
            h.remove()
        for m in layers:
            parametrize.remove_parametrizations(m, "weight", leave_parametrized=False)
    return student.eval(), stats


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run_dir")
    ap.add_argument("--sensitivity", action="store_true")
    ap.add_argument("--qat-seconds", type=float, default=60.0, help="quantisation-aware tuning row (0: none)")
    ap.add_argument("--out", type=Path, default=Path("runs/int8_classifier.json"))
    args = ap.parse_args()
    model, cfg, state = load_run(args.run_dir)
    train, val = data_lib.load_split(cfg.data)
    held, seen = run_images(val if val is not None else train, 1024, cfg), run_images(train, 1024, cfg)
    net = export_module(model, False)
    with torch.no_grad():
        logits = net(torch.from_numpy(held)).numpy()
        ref_seen = net(torch.from_numpy(seen)).numpy().argmax(1)
    ref = logits.argmax(1)
    top2 = np.sort(logits, 1)[:, -2:]
    rows = {"top-1 margin quantiles 1/5/10/50 %": np.quantile(top2[:, 1] - top2[:, 0], [.01, .05, .1, .5]).round(3).tolist()}
    for bits in (7, 8):
        with torch.no_grad():
            got = weights_rounded(net, bits)(torch.from_numpy(held)).numpy().argmax(1)
        rows[f"torch, weights alone rounded to {bits} bits"] = float((got == ref).mean())
    with tempfile.TemporaryDirectory() as tmp:
        rewritten = copy.deepcopy(net)
        rewrite_hard_activations(rewritten)
        fp32, pre = Path(tmp) / "fp32.onnx", Path(tmp) / "pre.onnx"
        torch_export(rewritten, fp32, state["backbone"]["image_size"], "dynamic", 18, "logits")
        quant_pre_process(str(fp32), str(pre), skip_symbolic_shape=True)  # the node names quantize_int8 sees
        layers = [n.name for n in onnx.load(str(pre)).graph.node if n.op_type in ("Conv", "Gemm", "MatMul")]

        def agreement(calib: int = 256, float_nodes=(), bits: int = 8, **kw) -> tuple:
            q = Path(tmp) / "q.onnx"
            quantize_int8(fp32, q, run_images(train, calib, cfg), bits, nodes_to_exclude=list(float_nodes), **kw)
            sess = session(q)
            return (float((ort_features(sess, held).argmax(1) == ref).mean()),
                    float((ort_features(sess, seen).argmax(1) == ref_seen).mean()))

        settings = {"int8, 7-bit weights (reduce_range)": dict(bits=7),
                    "int8, 8-bit weights": {},
                    "int8, 8-bit weights, 1024 calibration images": dict(calib=1024),
                    "int8, 8-bit weights, entropy calibration": dict(calibrate_method=CalibrationMethod.Entropy),
                    "int8, 8-bit weights, percentile 99.999 calibration": dict(
                        calibrate_method=CalibrationMethod.Percentile, extra_options={"CalibPercentile": 99.999}),
                    "int8, 8-bit weights, first conv and final layer in float": dict(float_nodes=(layers[0], layers[-1]))}
        for name, kw in settings.items():
            rows[name] = agreement(**kw)[0]
            print(f"{name:60s} {rows[name]:.4f}", flush=True)
        if args.qat_seconds:
            tuned, stats = quantization_aware(net, train.images, cfg, seconds=args.qat_seconds, progress=False)
            with torch.no_grad():
                rows["torch fp32 after quantisation-aware tuning"] = float(
                    (tuned(torch.from_numpy(held)).numpy().argmax(1) == ref).mean())
            rewrite_hard_activations(tuned)
            torch_export(tuned, Path(tmp) / "tuned.onnx", state["backbone"]["image_size"], "dynamic", 18, "logits")
            quantize_int8(Path(tmp) / "tuned.onnx", Path(tmp) / "tuned_q.onnx", run_images(train, 256, cfg), 8)
            name = f"int8, 8-bit weights, after {args.qat_seconds:.0f} s of quantisation-aware tuning ({stats['steps']} steps)"
            rows[name] = float((ort_features(session(Path(tmp) / "tuned_q.onnx"), held).argmax(1) == ref).mean())
            print(f"{name:60s} {rows[name]:.4f}", flush=True)
        if args.sensitivity:
            ranked = sorted(((agreement(float_nodes=(n,))[1], n) for n in layers), reverse=True)
            rows["sensitivity (training-image agreement with one layer in float)"] = ranked[:8]
            for k in (1, 2, 4, 8):
                rows[f"int8, 8-bit weights, the {k} most sensitive layers in float"] = agreement(
                    float_nodes=[n for _, n in ranked[:k]])[0]
                print(k, rows[f"int8, 8-bit weights, the {k} most sensitive layers in float"], flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"run": args.run_dir, "images": len(held), "rows": rows}, indent=1))
    for k, v in rows.items():
        print(f"| {k} | {v} |")


if __name__ == "__main__":
    main()
