"""int8 of one run in onnxruntime and OpenVINO: the network as trained, the ReLU student and a student
that keeps hard-swish (SE folded), each file's kNN change and p50 ms at batch 1 / 32 on one thread, side by side.

    .venv/bin/python scripts/int8_network_speed.py RUN
"""
import sys, json, copy, time, tempfile
from pathlib import Path
import torch
from edgessl import formats
import edgessl.student as S
from edgessl.exporter import _prepare, knn_change, metadata, write_file, Encoder
from edgessl.onnxrt import latency_side_by_side
from edgessl.rebuild import load_run
from edgessl.knn import heldout_knn
from edgessl.features import features
from edgessl_edge.backends import open_model
torch.set_num_threads(2)
run = sys.argv[1]
model, cfg, state = load_run(run)
job = _prepare(model, cfg, state, "int8", None, 256, False, True, False, 600, False)
train, val = job.own
meta = {**metadata(cfg, state, job.encoder, "int8", Path(run) / "checkpoint.pt", "dynamic"), "int8_weight_bits": 8}
f = lambda net: (lambda x: features(net, x, cfg.data.mean, cfg.data.std))
nets = {"as_trained": job.original}
real = S.swap_hardswish
for name, swap in (("relu_student", real), ("hswish_student", lambda m: 0)):
    S.swap_hardswish = swap
    st, stats = S.distill(model.backbone, train.images, cfg, progress=False)
    torch.save(st, f"/tmp/d/{name}.pt")
    nets[name] = Encoder(st).eval()
    print(json.dumps({name: {"fp32_knn": heldout_knn(f(nets[name]), train, val, cfg.run.knn_k), "steps": stats["steps"]}}), flush=True)
S.swap_hardswish = real
with tempfile.TemporaryDirectory() as tmp:
    for fmt in ("onnx", "openvino"):
        spec = formats.get(fmt)
        paths = {"fp32": write_file(copy.deepcopy(job.original), spec, "fp32", Path(tmp), f"{fmt}_fp32", {**meta, "precision": "fp32"}, job.images, "dynamic", 18, "features")}
        for name, net in nets.items():
            paths[name] = write_file(copy.deepcopy(net), spec, "int8", Path(tmp), f"{fmt}_{name}", meta, job.images, "dynamic", 18, "features")
            print(json.dumps({fmt: name, **knn_change(job.original, open_model(paths[name]), cfg, train, val)}), flush=True)
        p50 = latency_side_by_side(paths, job.images[:32], (1, 32), threads=(1,))
        print(json.dumps({fmt: {n: p50[n][1] for n in paths}}), flush=True)
