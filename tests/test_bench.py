"""scripts/bench.py on a tiny grid: one record per run with its curve, plots, resumable,
and data.train_subset takes a fixed subset."""
import importlib.util
import json
import sys

import pytest

from conftest import REPO, tiny_config
from edgessl.data import load_split


def bench_module():
    spec = importlib.util.spec_from_file_location("bench", REPO / "scripts" / "bench.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_bench_grid_json_plots_and_resume(tiny_npz, tmp_path, monkeypatch):
    tiny = {"backbone": {"name": "mobilenetv3_small_050"}, "method": {"head_dims": [32, 16]},
            "optim": {"batch_size": 8}, "run": {"knn_k": 5, "threads": 1, "augment_threads": 1}}
    spec = tmp_path / "tiny.yaml"
    spec.write_text(json.dumps({"data": f"npz:{tiny_npz}", "val_fraction": 0.25, "budget": {"epochs": 2},
                                "monitor_every": 1, "linear": True, "overrides": tiny,
                                "methods": {"memdistill": {}, "npid-tau0.1": {"method": "npid", "seeds": [1],
                                                                              "overrides": {"method": {"temperature": 0.1}}}},
                                "backbones": ["mobilenetv3_small_050"], "seeds": [0], "train_sizes": [24]}))
    out = tmp_path / "out"
    bench = bench_module()
    monkeypatch.setattr(sys, "argv", ["bench.py", str(spec), "--out", str(out)])
    bench.main()
    results = json.loads((out / "results.json").read_text())
    # an entry's own seeds replace the spec's
    assert sorted(results) == ["memdistill|mobilenetv3_small_050|seed0|n24", "npid-tau0.1|mobilenetv3_small_050|seed1|n24"]
    for r in results.values():
        assert r["epochs"] == 2 and r["train_size"] == 24
        assert r["linear_top1"] * 12 / 100 == pytest.approx(round(r["linear_top1"] * 12 / 100))  # k of 12 right
        assert [round(t, 6) for t, _ in r["curve"]][0] == 0.0 and len(r["curve"]) == 3  # untrained + 2 epochs
        assert r["curve"][-1][1] == pytest.approx(r["knn_top1"], abs=0.01)
    npid_cfg = (out / "runs" / "npid-tau0.1_mobilenetv3_small_050_seed1_n24" / "config.yaml").read_text()
    assert "temperature: 0.1" in npid_cfg and "bank_init: random" in npid_cfg and "\n  seed: 1\n" in npid_cfg
    assert (out / "knn_vs_minutes.png").stat().st_size > 1000 and (out / "throughput_memory.png").exists()
    md = bench.table(results)
    assert "| memdistill | mobilenetv3_small_050 | 24 | 1 | 2 |" in md and md.count("\n") == 3
    before = (out / "results.json").read_text()
    bench.main()  # resumable: nothing left to run, nothing changes
    assert (out / "results.json").read_text() == before


def test_train_subset_is_fixed_and_disjoint_from_validation(tiny_npz):
    cfg = tiny_config(f"npz:{tiny_npz}", data={"train_subset": 10, "fit": "squash"})  # (as the recipe resolves it)
    a, val = load_split(cfg.data)
    b, _ = load_split(cfg.data)
    assert len(a) == 10 and a.images.equal(b.images)
    full, _ = load_split(tiny_config(f"npz:{tiny_npz}", data={"fit": "squash"}).data)
    rows = {tuple(x.flatten().tolist()) for x in full.images}
    assert all(tuple(x.flatten().tolist()) in rows for x in a.images)
    assert not any(tuple(x.flatten().tolist()) in rows for x in val.images)


def test_spec_with_an_unknown_entry_key_is_refused(tmp_path):
    spec = tmp_path / "bad.yaml"
    spec.write_text(json.dumps({"data": "npz:x.npz", "budget": {"epochs": 1},
                                "methods": {"memdistill": {"seed": [1]}}}))
    with pytest.raises(SystemExit, match="method 'memdistill': unknown keys \\['seed'\\]"):
        bench_module().load_spec(spec)


@pytest.mark.parametrize("path", sorted((REPO / "configs" / "bench").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_spec_resolves_to_valid_configs(path):
    bench = bench_module()
    spec = bench.load_spec(path)
    """Every arm of a spec is a valid config (run_config validates it), and no two arms are the same
    run under two names (a copy-pasted arm would spend its hours measuring nothing)."""
    from edgessl.api import resolve_config
    from edgessl.config import to_dict

    for backbone in spec["backbones"]:
        arms = {key: to_dict(resolve_config("", bench.run_config(spec, entry or {}, key, backbone, spec["seeds"][0],
                                                                 None)))
                for key, entry in spec["methods"].items()}
        same = [(a, b) for i, a in enumerate(arms) for b in list(arms)[i + 1:] if arms[a] == arms[b]]
        assert not same, same


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status and clear_refs")
def test_bench_step_memory_two_views_need_more(shared_npz, tmp_path):
    """scripts/bench_step.py --memory, each variant in its own process: SimCLR's second view must show
    up as more step memory than memdistill's one view (measured: 1.8x at batch 64), and the record
    must add up (peak = before + step)."""
    import subprocess
    out = tmp_path / "mem.json"
    subprocess.run([sys.executable, str(REPO / "scripts" / "bench_step.py"), "--data", f"npz:{shared_npz}", "--memory",
                    "--only", "fp32 eager", "simclr", "--batch-size", "128", "--steps", "2", "--out", str(out)],
                   check=True, capture_output=True, text=True)
    rows = json.loads(out.read_text())["variants"]
    for r in rows.values():
        assert r["step_mb"] > 0 and r["peak_mb"] == pytest.approx(r["before_mb"] + r["step_mb"], abs=0.2)
    one, two = (next(r for n, r in rows.items() if k in n) for k in ("fp32 eager", "simclr"))
    assert two["step_mb"] > 1.3 * one["step_mb"]


def test_chain_table_pairs_changes_by_seed():
    bench = bench_module()
    results = {f"{k}|s{s}": {"method_key": k, "seed": s, "knn_top1": v}
               for k, vals in {"a": [10.0, 20.0, 30.0], "b": [13.0, 21.0, 35.0]}.items() for s, v in enumerate(vals)}
    results["b|s3"] = {"method_key": "b", "seed": 3, "knn_top1": 99.0}  # no partner in a: not in the change
    md = bench.chain_table(results, ["a", "b"]).splitlines()
    assert md[2] == "| a | 3 | 20.00 ± 10.00 | - |"
    # per-seed changes 3, 1, 5: mean 3, sample sd 2 (the unpaired means differ by 22)
    assert md[3] == "| b | 4 | 42.00 ± 39.07 | +3.00 ± 2.00 |"
    with pytest.raises(SystemExit, match="no results for \\['c'\\]"):
        bench.chain_table(results, ["a", "c"])
    # two data sizes: one labelled chain each, pairs only within a size
    sized = {f"{k}|{n}|s{s}": {"method_key": k, "seed": s, "knn_top1": v + n, "backbone": "m", "train_size": n}
             for n in (100, 200) for k, vals in {"a": [1.0, 2.0], "b": [4.0, 4.0]}.items() for s, v in enumerate(vals)}
    md = bench.chain_table(sized, ["a", "b"]).splitlines()
    assert md[0].startswith("| backbone | train images | step |") and len(md) == 6
    assert md[3] == "| m | 100 | b | 2 | 104.00 ± 0.00 | +2.50 ± 0.71 |"
    assert md[5] == "| m | 200 | b | 2 | 204.00 ± 0.00 | +2.50 ± 0.71 |"


def script_module(name):
    spec = importlib.util.spec_from_file_location(name, REPO / "scripts" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_bench_seeds_picks_part_of_the_grid(tiny_npz, tmp_path, monkeypatch):
    tiny = {"backbone": {"name": "mobilenetv3_small_050"}, "method": {"head_dims": [32, 16]},
            "optim": {"batch_size": 8}, "run": {"knn_k": 5, "threads": 1, "augment_threads": 1, "report": False}}
    spec = tmp_path / "tiny.yaml"
    spec.write_text(json.dumps({"data": f"npz:{tiny_npz}", "val_fraction": 0.25, "budget": {"epochs": 1},
                                "overrides": tiny, "methods": {"memdistill": {}, "npid": {}}, "seeds": [0, 1]}))
    monkeypatch.setattr(sys, "argv", ["bench.py", str(spec), "--out", str(tmp_path / "out"), "--seeds", "1",
                                      "--only", "npid"])
    bench_module().main()
    assert list(json.loads((tmp_path / "out" / "results.json").read_text())) == ["npid|mobilenetv3|seed1|nall"]


def test_bench_step_takes_turns_and_profiles_each_variant(tiny_npz, tmp_path, monkeypatch):
    out = tmp_path / "step.json"
    monkeypatch.setattr(sys, "argv", ["bench_step.py", "--data", f"npz:{tiny_npz}", "--only", "fp32 eager",
                                      "PyTorch's depthwise", "--steps", "2", "--batch-size", "8", "--profile",
                                      "--out", str(out)])
    script_module("bench_step").main()
    rows = json.loads(out.read_text())["variants"]
    fast, plain = rows["mobilenetv3, fp32 eager (the step without bf16, compile and the fused optimizer)"], \
        rows["mobilenetv3, PyTorch's depthwise backward"]
    assert plain["overrides"] == {"run": {"fast_depthwise": False}} and fast["overrides"] == {}
    assert fast["precision"] == plain["precision"] == "fp32" and not fast["compiled"]  # each lever alone
    for r in (fast, plain):
        assert r["steps"] == 2 and r["batch_size"] == 8 and r["images_per_s"] > 0 and r["profile"]
    ops = [{op["op"] for op in r["profile"]} for r in (fast, plain)]
    # the lever is really switched: only the default's backward runs edgessl.depthwise (a CPU lever)
    assert fast["device"] != "cpu" or (any("DepthwiseConv2d" in op for op in ops[0])
                                       and not any("DepthwiseConv2d" in op for op in ops[1]))
    assert not any("fused" in op for op in ops[0] | ops[1])  # the baseline's for-loop optimizer, as before
