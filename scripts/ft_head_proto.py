"""Prototype arms for the labelled fine-tune: the head imprinted, a linear probe first (LP-FT), batch norm frozen.

    .venv/bin/python scripts/ft_head_proto.py RUN ARMS SEEDS PER_CLASS
"""
import sys, json, time, tempfile, torch, torch.nn.functional as F
from pathlib import Path
import edgessl.finetuning as FT
from edgessl.augment import normalize
from edgessl.config import finetune_config, to_dict
from edgessl.runs import load_encoder

run, arms, seeds, per_class = sys.argv[1], sys.argv[2].split(","), [int(s) for s in sys.argv[3].split(",")], int(sys.argv[4])
torch.set_num_threads(2)

@torch.no_grad()
def feats(t):
    t.model.eval(); m, s = FT._norm(t.config)
    return torch.cat([t.model.backbone(normalize(c, m, s)).float() for c in t.train.images.split(256)])

def imprint(t, scale):
    h = feats(t); C = len(t.classes)
    mu = torch.stack([h[t.train.labels == c].mean(0) for c in range(C)])
    w = F.normalize(mu, dim=1)
    # logits = scale * cos-ish: W h with unit rows; scale by 1/mean norm of h
    s = scale / h.norm(dim=1).mean()
    t.model.fc.weight.data.copy_(w * s); t.model.fc.bias.data.zero_()

def probe(t, steps=300):
    h = feats(t); y = t.train.labels
    fc = t.model.fc
    opt = torch.optim.LBFGS(fc.parameters(), lr=1, max_iter=steps)
    def closure():
        opt.zero_grad(); l = F.cross_entropy(fc(h), y) + 5e-4 * fc.weight.pow(2).sum(); l.backward(); return l
    opt.step(closure)

def freeze_bn(model):
    orig = model.train
    def train(mode=True):
        orig(mode)
        for m in model.backbone.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm): m.eval()
        return model
    model.train = train

results = {}
for arm in arms:
    for seed in seeds:
        ft = finetune_config({"train": "", "test": "", "label_fraction": None, "labels_per_class": per_class, "seed": seed, "unlabelled": "none"})
        torch.manual_seed(seed)
        enc, src_cfg, st = load_encoder(run, "pretrained")
        src = FT.Source(to_dict(src_cfg), st["backbone"], run, st.get("data"))
        t = FT.build(ft, src, None, enc)
        if "imprint" in arm: imprint(t, float(arm.split("imprint")[1].split("+")[0] or 10))
        if "lp" in arm: probe(t)
        if "bnfreeze" in arm: freeze_bn(t.model)
        t0 = time.time()
        with tempfile.TemporaryDirectory() as d:
            r = FT._train(t, Path(d) / "ft", None, False, None, lambda *a: None)
        results[f"{arm}/{seed}"] = r["test_top1"]
        print(arm, seed, r["test_top1"], round(time.time() - t0, 1), flush=True)
for arm in arms:
    v = [results[f"{arm}/{s}"] for s in seeds]
    print("MEAN", arm, per_class, [round(x, 2) for x in v], round(sum(v) / len(v), 2))
