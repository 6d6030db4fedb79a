"""torchrun data parallelism on CPU (gloo): two processes keep one bank and one set of
weights, and follow a one-process run with twice the batch."""
import json
import subprocess
import sys

import pytest
import torch

from conftest import tiny_config
from edgessl.config import to_dict

pytestmark = pytest.mark.slow  # every test here starts torchrun processes

WORKER = """
import atexit, json, os, sys, torch
# runs after edgessl's own exit handler (last in, first out): is the process group gone by then?
atexit.register(lambda: open(f"{sys.argv[2]}/exit{os.environ['RANK']}.txt", "w").write(
    str(torch.distributed.is_initialized())))
from edgessl.config import from_dict
from edgessl.train import pretrain
keep = {}
cfg, out, stop, resume = from_dict(json.loads(sys.argv[1])), sys.argv[2], int(sys.argv[3]), sys.argv[4] == "1"
pretrain(cfg, out, resume=resume, stop_at_step=stop or None, progress=False, log=lambda *_: None, keep=keep)
rank, world = keep["setup"].rank, keep["setup"].world  # (the group is left when the run ends)
torch.save({"model": keep["setup"].model.state_dict(), "world": world}, f"{sys.argv[2]}/rank{rank}.pt")
"""

NO_AUGMENT = {"crop_scale": [1.0, 1.0], "crop_ratio": [1.0, 1.0], "flip_prob": 0.0, "jitter_prob": 0.0,
              "grayscale_prob": 0.0}


def torchrun(tmp_path, nproc, cfg, out, stop=0, resume=False):
    worker = tmp_path / "worker.py"
    worker.write_text(WORKER)
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
                        str(worker), json.dumps(to_dict(cfg)), str(out), str(stop), str(int(resume))],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    # each rank left the group before interpreter teardown (gloo's threads torn down later can abort)
    assert all((out / f"exit{i}.txt").read_text() == "False" for i in range(nproc))
    return [torch.load(out / f"rank{i}.pt", weights_only=True)["model"] for i in range(nproc)]


def weights_and_bank(state):
    """Everything but BatchNorm running statistics (each rank keeps its own, like DDP's default)."""
    return {k: v for k, v in state.items() if "running_" not in k and "num_batches_tracked" not in k}


def test_two_ranks_keep_one_bank_and_one_set_of_weights(tiny_npz, tmp_path):
    # the grad update with all negatives (an all-reduce) and with 6 sampled ones (a gather of rows that repeat)
    for update, negatives in (("grad", "all"), ("grad", 6), ("ema", "all")):
        cfg = tiny_config(f"npz:{tiny_npz}", optim={"epochs": 2, "batch_size": 4},
                          method={"bank_update": update, "cutmix_prob": 1.0, "negatives": negatives},
                          run={"monitor_every": 0})
        update = f"{update}-{negatives}"
        a, b = (weights_and_bank(s) for s in torchrun(tmp_path, 2, cfg, tmp_path / update))
        assert a.keys() == b.keys() and "bank" in a
        assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])][:5]
        first = torch.load(tmp_path / update / "checkpoint.pt", weights_only=True)
        assert first["position"]["step"] == 2 * (36 // 8)  # 36 training images, global batch 2 x 4


def test_two_ranks_follow_one_rank_with_twice_the_batch(tiny_npz, tmp_path):
    """Same data order, no augmentation: after 4 steps the weights of 2 x batch 4 are within
    1e-2 of 1 x batch 8 (measured 5e-3) and the bank rows a mean cosine >= 0.75 with its rows
    (0.85; the difference is BatchNorm's batch statistics over 4 images instead of 8: CPU has no
    SyncBatchNorm), far closer than a run with another seed. Measured at bank momentum 0.5: the
    default 0.2 steps the bank 1.6x as far, so the BatchNorm difference moves its rows further
    (0.68)."""
    base = dict(optim={"epochs": 1, "batch_size": 4}, augment=NO_AUGMENT,
                method={"cutmix_prob": 0.0, "bank_init": "random", "bank_momentum": 0.5}, run={"monitor_every": 0})
    two = weights_and_bank(torchrun(tmp_path, 2, tiny_config(f"npz:{tiny_npz}", **base), tmp_path / "two")[0])
    one_cfg = tiny_config(f"npz:{tiny_npz}", **{**base, "optim": {"epochs": 1, "batch_size": 8}})
    one = weights_and_bank(torchrun(tmp_path, 1, one_cfg, tmp_path / "one")[0])
    other = tiny_config(f"npz:{tiny_npz}", **{**base, "optim": {"epochs": 1, "batch_size": 8},
                                              "run": {"monitor_every": 0, "seed": 1}})
    far = weights_and_bank(torchrun(tmp_path, 1, other, tmp_path / "other")[0])
    def gap(a, b):  # (largest weight difference, mean cosine between bank rows)
        w = max((a[k] - b[k]).abs().max().item() for k in b if k != "bank")
        return w, torch.nn.functional.cosine_similarity(a["bank"], b["bank"]).mean().item()

    (w_near, bank_near), (w_far, bank_far) = gap(two, one), gap(far, one)
    print(f"2x4 vs 1x8: weights {w_near:.2e}, bank cosine {bank_near:.4f}; another seed: {w_far:.2e}, {bank_far:.4f}")
    # all-reduce sums in another order (fp32 noise, amplified by AdamW's sign-like first steps); a seed apart is 5x more
    assert w_near <= 1e-2 and w_near < w_far / 5
    assert bank_near >= 0.75 and bank_near > bank_far + 0.5


def test_resume_under_two_ranks(tiny_npz, tmp_path):
    """Stopped at step 3 of 8 (checkpoint written by rank 0), resumed by two ranks: the run ends
    at step 8 with one bank and one set of weights."""
    cfg = tiny_config(f"npz:{tiny_npz}", optim={"epochs": 2, "batch_size": 4}, run={"monitor_every": 0})
    torchrun(tmp_path, 2, cfg, tmp_path / "run", stop=3)
    assert torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)["position"]["step"] == 3
    a, b = (weights_and_bank(s) for s in torchrun(tmp_path, 2, cfg, tmp_path / "run", resume=True))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)["position"]["step"] == 8
    assert len((tmp_path / "run" / "steps.csv").read_text().splitlines()) == 1 + 8


def test_sync_bn_on_cpu_is_one_clear_error(tiny_npz, tmp_path):
    cfg = tiny_config(f"npz:{tiny_npz}", optim={"batch_size": 4}, run={"sync_bn": True, "monitor_every": 0})
    worker = tmp_path / "worker.py"
    worker.write_text(WORKER)
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                        str(worker), json.dumps(to_dict(cfg)), str(tmp_path / "run"), "0", "0"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode != 0 and "run.sync_bn needs CUDA devices" in r.stderr
    assert not (tmp_path / "run" / "checkpoint.pt").exists()


def test_two_ranks_stream_their_shards_from_the_mapped_cache(tmp_path, monkeypatch):
    """Per-rank shards gathered from a memory-mapped folder cache train exactly as from RAM."""
    from test_mmap import noise_folder

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    folder = noise_folder(tmp_path / "imgs")
    states = {}
    for storage in ("memory", "mmap"):
        cfg = tiny_config(f"folder:{folder}", data={"image_size": 16, "storage": storage, "val_fraction": 0.0},
                          optim={"epochs": 1, "batch_size": 4}, run={"monitor_every": 0})
        states[storage] = torchrun(tmp_path, 2, cfg, tmp_path / storage)
    for rank in range(2):
        for k, v in states["memory"][rank].items():
            assert torch.equal(v, states["mmap"][rank][k]), (rank, k)


DYING_WORKER = """
import json, os, sys
from edgessl import train
from edgessl.config import from_dict
real = train.train_step
def dying(s, idx, lr, step, *rest):
    if s.rank == 1 and step == 3:
        os._exit(3)  # a rank that dies mid-run, without a word to the others
    return real(s, idx, lr, step, *rest)
train.train_step = dying
train.pretrain(from_dict(json.loads(sys.argv[1])), sys.argv[2], progress=False, log=lambda *_: None)
"""


def test_a_dead_rank_ends_the_run_with_an_error_not_a_hang(tiny_npz, tmp_path):
    import os
    import time

    from edgessl import checkpoint

    cfg = tiny_config(f"npz:{tiny_npz}", optim={"epochs": 4, "batch_size": 4},
                      run={"monitor_every": 0, "checkpoint_every_steps": 2})
    worker = tmp_path / "dying.py"
    worker.write_text(DYING_WORKER)
    t0 = time.monotonic()
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                        str(worker), json.dumps(to_dict(cfg)), str(tmp_path / "run")],
                       capture_output=True, text=True, timeout=240, env={**os.environ, "EDGESSL_DIST_TIMEOUT": "20"})
    assert r.returncode != 0 and time.monotonic() - t0 < 200
    assert "exitcode  : 3" in r.stderr or "exit code 3" in r.stderr or "exitcode: 3" in r.stderr, r.stderr[-2000:]
    ckpt = tmp_path / "run" / "checkpoint.pt"  # what rank 0 left is a whole checkpoint or none
    if ckpt.exists():
        assert checkpoint.load(ckpt)["position"]["step"] in (2,)
    assert not list((tmp_path / "run").glob("*.tmp*"))


def test_a_dead_rank_without_torchrun_fails_the_other_within_the_timeout(tiny_npz, tmp_path):
    """No agent to kill the survivor (a rank on another node): the collective itself must fail."""
    import os
    import socket
    import time

    cfg = tiny_config(f"npz:{tiny_npz}", optim={"epochs": 4, "batch_size": 4}, run={"monitor_every": 0})
    worker = tmp_path / "dying.py"
    worker.write_text(DYING_WORKER)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    procs = []
    t0 = time.monotonic()
    for rank in range(2):
        env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2",
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "EDGESSL_DIST_TIMEOUT": "20"}
        procs.append(subprocess.Popen([sys.executable, str(worker), json.dumps(to_dict(cfg)), str(tmp_path / "run")],
                                      env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    outs = [p.communicate(timeout=180) for p in procs]
    assert procs[1].returncode == 3
    assert procs[0].returncode not in (0, None) and time.monotonic() - t0 < 150, outs[0][1][-2000:]
    assert "rank 0 of 2: a collective failed, another process probably died" in outs[0][1]
