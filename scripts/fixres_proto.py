"""kNN of a run's frozen encoder at other input sizes than it trained at (FixRes).

    .venv/bin/python scripts/fixres_proto.py RUN 96,112,128,144
"""
import sys, time, torch
from edgessl import data as D
from edgessl.runs import load_encoder
from edgessl.train import extract_features
from edgessl.knn import heldout_knn
run = sys.argv[1]; sizes = [int(s) for s in sys.argv[2].split(",")]
enc, cfg, st = load_encoder(run); enc.eval()
torch.set_num_threads(2)
for s in sizes:
    c = cfg.data; c2 = type(c)(**{**c.__dict__, "image_size": s})
    tr, va = D.load_split(c2)
    t = time.time()
    f = lambda x: extract_features(enc, x, c.mean, c.std, 256, "cpu", "fp32")
    print(s, round(heldout_knn(f, tr, va, cfg.run.knn_k), 2), "pixels-free", round(time.time()-t,1), "s", flush=True)
