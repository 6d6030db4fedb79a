"""OpenVINO int8 of a fine-tuned classifier under NNCF's options: top-1 agreement with torch fp32.

    .venv/bin/python scripts/int8_nncf_options.py RUN_DIR [--counts 256 1024]

The classifier is exported to ONNX as `edgessl export` does, converted by OpenVINO, quantised by
nncf.quantize with each option on `count` of the run's training images, and run in OpenVINO on
up to 1024 held-out images. Prints one line per setting and writes nothing.
"""
from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import nncf
import openvino as ov
import torch

from edgessl import data as data_lib
from edgessl.export import export_module, run_images, torch_export
from edgessl.runs import load_run
from edgessl_edge.backends import open_model


def settings(model) -> dict:
    last = [op.get_friendly_name() for op in model.get_ordered_ops() if op.get_type_name() == "MatMul"][-1:]
    return {"mixed": dict(preset=nncf.QuantizationPreset.MIXED),
            "performance": dict(preset=nncf.QuantizationPreset.PERFORMANCE),
            "mixed, full bias correction": dict(preset=nncf.QuantizationPreset.MIXED, fast_bias_correction=False),
            "mixed, last layer in float": dict(preset=nncf.QuantizationPreset.MIXED,
                                               ignored_scope=nncf.IgnoredScope(names=last))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run")
    ap.add_argument("--counts", type=int, nargs="+", default=[256, 1024])
    args = ap.parse_args()
    model, cfg, state = load_run(args.run)
    classifier = export_module(model, False)
    train, val = data_lib.load_split(cfg.data)
    x = run_images(val if val is not None else train, 1024, cfg)
    with torch.no_grad():
        want = classifier(torch.from_numpy(x)).argmax(1).numpy()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        torch_export(classifier, tmp / "fp32.onnx", x.shape[-1], "dynamic", 18, "logits")
        (tmp / "int8.json").write_text(json.dumps({"feature_dim": len(state["classes"])}))
        for count in args.counts:
            calib = run_images(train, count, cfg)
            data = nncf.Dataset([calib[i:i + 32] for i in range(0, len(calib), 32)])
            for name, options in settings(ov.convert_model(str(tmp / "fp32.onnx"))).items():
                q = nncf.quantize(ov.convert_model(str(tmp / "fp32.onnx")), data, subset_size=count, **options)
                ov.save_model(q, str(tmp / "int8.xml"), compress_to_fp16=False)
                got = open_model(tmp / "int8.xml").features(x).argmax(1)
                print(f"{count} calibration images, {name}: {100 * (got == want).mean():.2f} % agreement", flush=True)


if __name__ == "__main__":
    main()
