"""Fine-tuning arm that did not pay (docs/benchmarks.md, "Few labels and the unlabelled images"):
the pretraining method's own loss (memdistill against the run's bank and head) on each unlabelled
batch beside the labelled cross-entropy, with or without the propagated pseudo-labels.

    .venv/bin/python scripts/semi_joint.py runs/fl_tune ssl 0,1,2 1.0        # the method's loss
    .venv/bin/python scripts/semi_joint.py runs/fl_tune ssl+prop 0,1,2 1.0   # and the pseudo-labels

A prototype over edgessl.finetuning's internals (it replaces propagate_labels and semi_loss)."""
import sys, time, tempfile
from pathlib import Path
import torch
sys.path.insert(0, str(Path(__file__).resolve().parent))
from data_efficiency import run_split_specs
import edgessl.finetuning as ftm
from edgessl import checkpoint
from edgessl.augment import BatchAugment
from edgessl.config import AugmentConfig, MethodConfig
from edgessl.methods.memdistill import MemDistill

run, arm, seeds, W = sys.argv[1], sys.argv[2], [int(s) for s in sys.argv[3].split(",")], float(sys.argv[4])
state = checkpoint.load(Path(run) / "checkpoint.pt")
orig_prop = ftm.propagate_labels
ctx = {}

def propagate_labels(t):
    if "mem" not in ctx:
        cfg = MethodConfig(**{k: (tuple(v) if isinstance(v, list) else v) for k, v in state["config"]["method"].items()})
        mem = MemDistill(t.model.backbone, state["model"]["bank"].shape[0], cfg)
        mem.head.load_state_dict({k[5:]: v for k, v in state["model"].items() if k.startswith("head.")})
        mem.bank.copy_(state["model"]["bank"])
        a = state["config"]["augment"]
        ctx["mem"] = mem
        ctx["aug"] = BatchAugment(AugmentConfig(**{k: (tuple(v) if isinstance(v, list) else v) for k, v in a.items()}),
                                  state["backbone"]["image_size"], *ftm._norm(t.config))
        ctx["pending"] = None
    if "prop" in arm:
        return orig_prop(t)
    return (None, None)

def semi_loss(t, pseudo, li, ui):
    mem = ctx["mem"]
    if ctx["pending"] is not None:
        mem.update(ctx["pending"])
    loss = ftm.batch_loss(t, t.train.images, t.train.labels, li)
    if pseudo[0] is not None:
        loss = loss + ftm.batch_loss(t, t.unlabelled.images, pseudo[0], ui, pseudo[1])
    out = mem(ctx["aug"](t.unlabelled.images[ui]), ui)  # pool == the run's train split: bank rows = positions
    ctx["pending"] = out
    return loss + W * out["loss"]

ftm.propagate_labels = propagate_labels
ftm.semi_loss = semi_loss
res = {}
with tempfile.TemporaryDirectory() as tmp:
    tr, te = run_split_specs(run, Path(tmp))
    for s in seeds:
        ctx.clear()
        t0 = time.time()
        r = ftm.finetune(run, tr, te, Path(tmp) / f"o{s}", labels_per_class=10, seed=s, unlabelled="propagate",
                         log=lambda *_: None, **({"epochs": int(sys.argv[5])} if len(sys.argv) > 5 else {}))
        print(arm, W, s, r["test_top1"], round(time.time() - t0), flush=True)
