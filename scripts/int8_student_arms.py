"""int8 students of one run, each distilled and scored by kNN on the run's held-out split in torch fp32:
SE kept, the 120 s cosine rule, hard-swish kept, against the default on another run.

    .venv/bin/python scripts/int8_student_arms.py   # the runs of scripts/bench.py configs/bench/machine.yaml
"""
import sys, json, math, time
from pathlib import Path
import torch
from edgessl import data as data_lib
from edgessl.rebuild import load_run
import edgessl.student as S
from edgessl.knn import heldout_knn
from edgessl.features import features
from edgessl.exporter import Encoder
from edgessl.optim import guarded_step, set_lr
from edgessl.loop import Position
torch.set_num_threads(2)
real_train_for, real_swap = S.train_for, S.swap_hardswish

def cosine_for(seconds, opt, lr, loss_fn, probe_fn, desc, progress=None, pos=None, stop=None):
    start, steps = time.perf_counter(), 0
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    while (elapsed := time.perf_counter() - start) < seconds:
        set_lr(opt, lr * 0.5 * (1 + math.cos(math.pi * min(1.0, elapsed / seconds))))
        guarded_step(loss_fn(), opt, scaler, steps, torch.device("cpu"), read=True)
        steps += 1
    return {"steps": steps, "seconds": round(time.perf_counter() - start, 1), "stopped": "time cap",
            "loss_first": None, "loss_last": None, "probe_loss": float(probe_fn()), "position": Position()}

def go(run, arm):
    model, cfg, state = load_run(run)
    train, val = data_lib.load_split(cfg.data)
    f = lambda net: (lambda x: features(net, x, cfg.data.mean, cfg.data.std))
    S.train_for = cosine_for if arm == "cosine120" else real_train_for
    S.swap_hardswish = (lambda m: 0) if arm == "hswish_kept" else real_swap
    t0 = time.time()
    student, stats = S.distill(model.backbone, train.images, cfg, progress=False, fold_se=(arm != "se_kept"),
                               seconds=120 if arm == "cosine120" else S.CAP_SECONDS)
    out = {"run": Path(run).name, "arm": arm, "teacher": heldout_knn(f(Encoder(model.backbone).eval()), train, val, cfg.run.knn_k),
           "student_fp32": heldout_knn(f(Encoder(student).eval()), train, val, cfg.run.knn_k),
           **{k: stats[k] for k in ("steps", "seconds", "stopped", "probe_loss")}, "wall": round(time.time() - t0)}
    print(json.dumps(out), flush=True)

R = "runs/bench/machine/runs/"
for run, arm in [(R + "fp32_compiled_mobilenetv3_seed0_nall", "se_kept"),
                 (R + "fp32_compiled_mobilenetv3_seed0_nall", "cosine120"),
                 (R + "bf16_compiled_mobilenetv3_seed0_nall", "default"),
                 (R + "fp32_compiled_mobilenetv3_seed0_nall", "hswish_kept")]:
    go(run, arm)
