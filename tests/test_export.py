"""ONNX export and check on a tiny trained run: parity, shapes, metadata, int8/fp16, timm weights."""
import json
import subprocess
import sys

import numpy as np
import onnx
import pytest
import torch

from conftest import make_npz, tiny_config
from edgessl import EdgesslError, checkpoint, load_backbone
from edgessl.check import check
from edgessl.exporter import Encoder, export_model, export_timm
from edgessl.formats import int8_weight_bits
from edgessl.onnxrt import read_metadata, session
from edgessl.rebuild import load_run
from edgessl.train import pretrain

pytestmark = pytest.mark.numeric  # run again with the CPU capped to AVX2 (make test-avx2)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("export")
    npz = make_npz(root / "tiny.npz", n=64, size=32)
    # fp32: the run's monitor then computes the same features as the export's torch fp32 reference
    # (under bf16 the monitor's features are bf16 and a borderline query can flip)
    cfg = tiny_config(f"npz:{npz}", optim={"epochs": 1, "batch_size": 8}, run={"precision": "fp32"})
    pretrain(cfg, root / "run", log=lambda *_: None)
    return root / "run"


def torch_features(run_dir, x, with_head=False):
    model, _, _ = load_run(run_dir)
    with torch.no_grad():
        return Encoder(model.backbone, model.head if with_head else None).eval()(torch.from_numpy(x)).numpy()


def test_fp32_parity_dynamic_batch(run_dir, tmp_path):
    out = tmp_path / "m.onnx"
    report = export_model(run_dir, out)
    # fp32 in torch and in onnxruntime sum in other orders: float32 rounding grows with depth and
    # with the features' size, so the bar is the export's own, 1e-4 of max(1, max |feature|)
    assert report["max_rel_diff"] <= 1e-4 and report["min_cosine"] >= 0.99999
    onnx.checker.check_model(onnx.load(str(out)))
    sess = session(out)
    assert sess.get_inputs()[0].name == "images" and sess.get_outputs()[0].name == "features"
    for b in (1, 5):
        x = np.random.default_rng(b).standard_normal((b, 3, 32, 32)).astype(np.float32)
        got = sess.run(None, {"images": x})[0]
        assert got.shape == (b, 1024)
        want = torch_features(run_dir, x)
        assert np.abs(got - want).max() <= 1e-4 * max(1.0, np.abs(want).max())


def test_fixed_batch_and_head(run_dir, tmp_path):
    out = tmp_path / "fixed.onnx"
    export_model(run_dir, out, batch=4, with_head=True, knn=False)
    sess = session(out)
    assert sess.get_inputs()[0].shape == [4, 3, 32, 32]
    x = np.random.default_rng(0).standard_normal((4, 3, 32, 32)).astype(np.float32)
    got = sess.run(None, {"images": x})[0]
    # an fp32 L2 normalisation of 16 values: a norm of 1 within a few ulps
    assert got.shape == (4, 16) and np.allclose(np.linalg.norm(got, axis=1), 1, atol=1e-5)
    assert np.abs(got - torch_features(run_dir, x, with_head=True)).max() <= 1e-4  # unit vectors: scale 1
    assert read_metadata(out)["with_head"] is True


def test_metadata_round_trip(run_dir, tmp_path):
    out = tmp_path / "m.onnx"
    export_model(run_dir, out, knn=False)
    meta = read_metadata(out)
    assert meta == json.loads(out.with_suffix(".json").read_text())
    assert meta["input_size"] == [3, 32, 32] and meta["channel_order"] == "RGB" and meta["feature_dim"] == 1024
    assert meta["backbone"] == "mobilenetv3_small_050" and meta["method"] == "memdistill"
    assert len(meta["source_checkpoint_sha256"]) == 64 and meta["versions"]["onnx"] == onnx.__version__
    assert meta["mean"] == pytest.approx([0.485, 0.456, 0.406])


@pytest.mark.parametrize("precision,min_cos", [("fp16", 0.999), ("int8", 0.8)])
def test_reduced_precision(run_dir, tmp_path, precision, min_cos):
    out = tmp_path / f"{precision}.onnx"
    # adapt=True (--adapt): the student ships whatever its held-out kNN, which on 16 queries moves by 6.25
    # points a query (the gate that may refuse it: test_a_student_that_loses_knn_gives_way_to_the_network)
    report = export_model(run_dir, out, precision=precision, calib_count=32, adapt_seconds=3,
                          adapt=True if precision == "int8" else None)
    assert report["min_cosine"] >= min_cos
    assert read_metadata(out)["precision"] == precision
    # the torch fp32 kNN the change is measured from is the run's own last monitor point
    final_knn = float((run_dir / "metrics.csv").read_text().splitlines()[-1].split(",")[-1])
    assert report["knn_torch_fp32"] == pytest.approx(final_knn, abs=0.01)
    assert report["knn_change"] == pytest.approx(report["knn_export"] - report["knn_torch_fp32"])
    assert report["knn_export"] * 16 / 100 == pytest.approx(round(report["knn_export"] * 16 / 100))  # of 16 queries
    if precision == "int8":
        ops = {n.op_type for n in onnx.load(str(out)).graph.node}
        assert "QuantizeLinear" in ops and "HardSwish" not in ops and "HardSigmoid" not in ops
        assert "ReduceMean" not in ops  # the squeeze-excite pools are folded away with their blocks
        assert report["adapted"]["swapped"] == 19 and report["adapted"]["se_folded"] == 9
        assert 0 < report["adapted"]["feature_cosine_to_original"] <= 1
        assert read_metadata(out)["adapted"]["squeeze_excite_folded"] == 9
        bits = read_metadata(out)["int8_weight_bits"]
        weights = [onnx.numpy_helper.to_array(t) for t in onnx.load(str(out)).graph.initializer
                   if t.data_type == onnx.TensorProto.INT8 and len(t.dims) == 4]
        top = max(int(np.abs(w.astype(np.int32)).max()) for w in weights)  # per-channel symmetric: a full channel
        assert bits == int8_weight_bits() and (top == 127 if bits == 8 else 63 <= top <= 64)
    else:
        assert "adapted" not in report
    up = report["speedup_vs_fp32"]  # timed against the run's fp32 export, 1 thread and the default
    assert set(up) == {1, 0} and all(set(per_b) == {1, 32} and min(per_b.values()) > 0 for per_b in up.values())


def test_check_reports_parity_and_latency(run_dir, tmp_path):
    out = tmp_path / "m.onnx"
    export_model(run_dir, out, knn=False)
    report = check(out, against=str(run_dir), batch_sizes=(1, 3), iters=3)
    assert report["max_rel_diff"] <= 1e-4 and report["min_cosine"] >= 0.99999  # the export's bar (above)
    assert set(report["latency_ms"]) == {"1", "3"} and report["latency_ms"]["3"]["p50"] > 0
    assert report["images_per_s"]["1"] > 0 and report["provider"] == "CPUExecutionProvider"


@pytest.mark.slow
def test_bad_onnx_inputs(tmp_path):
    (tmp_path / "text.onnx").write_text("hello")
    with pytest.raises(EdgesslError, match="not a valid ONNX model"):
        read_metadata(tmp_path / "text.onnx")
    plain = tmp_path / "plain.onnx"
    from onnx import TensorProto, helper

    io = [helper.make_tensor_value_info(name, TensorProto.FLOAT, [1, 3, 8, 8]) for name in ("x", "y")]
    onnx.save(helper.make_model(helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "plain", io[:1], io[1:])),
              str(plain))  # a valid ONNX file that no edgessl export wrote
    with pytest.raises(EdgesslError, match="no edgessl metadata"):
        read_metadata(plain)
    r = subprocess.run([sys.executable, "-m", "edgessl", "check", str(tmp_path / "text.onnx")],
                       capture_output=True, text=True)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr
    r = subprocess.run([sys.executable, "-m", "edgessl", "export", str(tmp_path), "--out", str(tmp_path / "x.onnx")],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "no checkpoint" in r.stderr


def test_timm_weights_round_trip(tmp_path):
    npz = make_npz(tmp_path / "tiny.npz", n=32, size=32)
    # downsample 32 keeps timm's stock stem, so timm itself can load the file too
    cfg = tiny_config(f"npz:{npz}", optim={"epochs": 1}, backbone={"name": "mobilenetv3_small_050", "downsample": 32})
    pretrain(cfg, tmp_path / "run", log=lambda *_: None)
    export_timm(tmp_path / "run", tmp_path / "timm")
    model, _, _ = load_run(tmp_path / "run")
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = model.backbone.eval()(x)
        assert torch.equal(load_backbone(tmp_path / "timm").eval()(x), expected)
        import timm

        plain = timm.create_model("mobilenetv3_small_050", pretrained=True, num_classes=0, pretrained_cfg_overlay=dict(
            file=str(tmp_path / "timm" / "model.safetensors"), num_classes=0))
        assert torch.equal(plain.eval()(x), expected)


def test_timm_export_of_an_alias_with_model_args(tmp_path):
    npz = make_npz(tmp_path / "tiny.npz", n=32, size=32)
    cfg = tiny_config(f"npz:{npz}", optim={"epochs": 1}, backbone={"name": "mobilenetv3-relu"})
    pretrain(cfg, tmp_path / "run", log=lambda *_: None)
    export_timm(tmp_path / "run", tmp_path / "timm")
    assert json.loads((tmp_path / "timm" / "config.json").read_text())["model_args"] == {"act_layer": "relu"}
    model, _, _ = load_run(tmp_path / "run")
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        loaded = load_backbone(tmp_path / "timm").eval()
        assert "Hardswish" not in {type(m).__name__ for m in loaded.modules()}
        assert torch.equal(loaded(x), model.backbone.eval()(x))


def test_check_profile_names_the_float_islands_of_an_int8_graph(run_dir, tmp_path):
    fp32, int8 = tmp_path / "m.onnx", tmp_path / "q.onnx"
    export_model(run_dir, fp32, knn=False)
    export_model(run_dir, int8, precision="int8", calib_count=16, knn=False, adapt=False)
    p = check(int8, batch_sizes=(2,), iters=3, profile=True)["profile"]
    ops = {r["op"] for r in p["ops"]}
    assert "QLinearConv" in ops and p["batch"] == 2 and p["iters"] == 3
    assert sum(r["share"] for r in p["ops"]) == pytest.approx(1.0, abs=0.01)
    assert p["float_islands"] and all(not r["op"].startswith(("QLinear", "QuantizeLinear", "DequantizeLinear"))
                                      for r in p["float_islands"])
    assert p["float_share"] == pytest.approx(sum(r["share"] for r in p["float_islands"]), abs=1e-3)
    plain = check(fp32, batch_sizes=(2,), iters=3, profile=True)["profile"]
    assert plain["float_islands"] == [] and "Conv" in {r["op"] for r in plain["ops"]}
    r = subprocess.run([sys.executable, "-m", "edgessl", "check", str(int8), "--batch-sizes", "1", "--profile"],
                       capture_output=True, text=True)
    assert r.returncode == 0 and "float island" in r.stdout and "QLinearConv" in r.stdout


def test_hardswish_student_is_relu_and_distillation_moves_it_towards_the_teacher(run_dir):
    from edgessl.student import distill, needs_adapting, swap_hardswish
    from edgessl.data import load_split

    model, cfg, _ = load_run(run_dir)
    teacher = model.backbone.eval()
    assert needs_adapting(teacher)
    probe = __import__("copy").deepcopy(teacher)
    n = sum(isinstance(m, torch.nn.Hardswish) for m in teacher.modules())
    assert swap_hardswish(probe) == n > 0 and needs_adapting(probe)  # its squeeze-excite blocks are left
    train, _ = load_split(cfg.data)
    student, stats = distill(teacher, train.images, cfg, seconds=3.0, batch_size=8, progress=False)
    assert stats["swapped"] == n and stats["se_folded"] == 9 and stats["steps"] > 3 and not needs_adapting(student)
    assert stats["loss_last"] < stats["loss_first"]
    assert needs_adapting(teacher)  # the teacher itself is untouched
    assert not any(type(m).__name__ == "DepthwiseConv2d" for m in student.modules())  # plain convs again


def test_a_stopped_student_continues_exactly_and_a_finished_one_is_reused(run_dir, tmp_path):
    """The student steps through the one loop: stopped at step 70 (inside its second check) and
    continued to step 130, it has the weights, optimizer and counters of one stopped at 130 without
    a break. Its file is named by what it learns from; a finished student is reused, not retrained."""
    from edgessl.data import load_split
    from edgessl.student import distill

    model, cfg, _ = load_run(run_dir)
    train, _ = load_split(cfg.data)
    kw = dict(seconds=600.0, batch_size=8, progress=False)
    with pytest.raises(EdgesslError, match="stopped at step 130"):
        distill(model.backbone, train.images, cfg, keep=tmp_path / "a", stop_at_step=130, **kw)
    with pytest.raises(EdgesslError, match="stopped at step 70; it is kept in .*the same export continues it"):
        distill(model.backbone, train.images, cfg, keep=tmp_path / "b", stop_at_step=70, **kw)
    with pytest.raises(EdgesslError, match="stopped at step 130"):
        distill(model.backbone, train.images, cfg, keep=tmp_path / "b", stop_at_step=130, **kw)
    (a,), (b,) = (list((tmp_path / d).iterdir()) for d in "ab")
    assert a.name == b.name
    sa, sb = checkpoint.load(a), checkpoint.load(b)
    assert all(torch.equal(sa["model"][k], sb["model"][k]) for k in sa["model"])
    assert sa["position"]["baselines"] == sb["position"]["baselines"] and sb["position"]["step"] == 130
    assert torch.equal(sa["optimizer"]["state"][0]["exp_avg"], sb["optimizer"]["state"][0]["exp_avg"])
    first, stats = distill(model.backbone, train.images, cfg, keep=tmp_path / "c", **{**kw, "seconds": 1.0})
    again, same = distill(model.backbone, train.images, cfg, keep=tmp_path / "c", **{**kw, "seconds": 1.0})
    assert same == stats and stats["stopped"] == "time cap"
    assert all(torch.equal(x, y) for x, y in zip(first.state_dict().values(), again.state_dict().values()))
    distill(model.backbone, train.images, cfg, keep=tmp_path / "c", **{**kw, "seconds": 1.0, "lr": 2e-3})
    assert len(list((tmp_path / "c").iterdir())) == 2  # another setting, another student


def test_a_signal_stops_the_student_and_saves_it(run_dir, tmp_path, monkeypatch):
    """SIGTERM during the distillation (raised here by the student's first probe read, at step 50):
    the loop finishes the step, the student is saved, and Stopped (the CLI's exit 130) says where."""
    import signal
    import threading

    from edgessl import student as student_lib
    from edgessl.data import load_split
    from edgessl.errors import Stopped

    if threading.current_thread() is not threading.main_thread():
        pytest.skip("signal handlers are installed from the main thread only")
    real = student_lib.clean_probe

    def probe_then_signal(*args, **kwargs):
        probe = real(*args, **kwargs)
        return lambda: signal.raise_signal(signal.SIGTERM) or probe()

    monkeypatch.setattr(student_lib, "clean_probe", probe_then_signal)
    model, cfg, _ = load_run(run_dir)
    train, _ = load_split(cfg.data)
    with pytest.raises(Stopped, match=f"stopped at step {student_lib.CHECK_EVERY}; it is kept in"):
        student_lib.distill(model.backbone, train.images, cfg, seconds=600.0, batch_size=8, progress=False,
                            keep=tmp_path)
    (saved,) = tmp_path.iterdir()
    assert checkpoint.load(saved)["position"]["step"] == student_lib.CHECK_EVERY
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the loop put the handler back


def test_se_blocks_fold_to_their_mean_gate_exactly():
    import copy

    from edgessl.student import fold_se_means, squeeze_excite_blocks
    from edgessl.backbones import create_backbone

    torch.manual_seed(0)
    net = create_backbone("mobilenetv3", 32).eval()
    x = torch.randn(6, 3, 32, 32)
    blocks = squeeze_excite_blocks(net)
    assert len(blocks) == 9
    # the naive mean gate of the first block: its input captured, the gate computed sample by sample
    seen = []
    hook = blocks[0][1].register_forward_hook(lambda m, inp, out: seen.append(inp[0]))
    with torch.no_grad():
        net(x)
    hook.remove()
    se = blocks[0][1]
    with torch.no_grad():
        naive = torch.stack([se.gate(se.conv_expand(se.act1(se.conv_reduce(s.mean((1, 2), keepdim=True)[None]))))
                             .flatten() for s in seen[0]]).mean(0)
    folded = copy.deepcopy(net)
    assert fold_se_means(folded, x, batch_size=4) == 9 and not squeeze_excite_blocks(folded)
    first = squeeze_excite_blocks(net)[0][2]  # the conv after the first block, in the unfolded network
    conv = folded.get_submodule([n for n, m in net.named_modules() if m is first][0])
    # one fp32 product each side, the gate's mean summed in another order: a few ulps
    torch.testing.assert_close(conv.weight, first.weight * naive.view(1, -1, 1, 1), rtol=1e-6, atol=1e-7)
    # when every gate is the same for every image (no input to the reduce conv), the fold is exact
    const = copy.deepcopy(net)
    for _, se, _ in squeeze_excite_blocks(const):
        torch.nn.init.zeros_(se.conv_reduce.weight)
        torch.nn.init.normal_(se.conv_reduce.bias)
    want = const(x).detach()
    fold_se_means(const, torch.randn(3, 3, 32, 32))
    # an exact fold up to fp32 reordering through the network's ~50 layers
    torch.testing.assert_close(const(x).detach(), want, rtol=1e-5, atol=1e-5)


def test_folded_se_gates_compute_the_same_features_and_export_as_clip(tmp_path):
    import copy

    from edgessl.backbones import create_backbone
    from edgessl.student import HardSigmoidRelu6, fold_se_gates, rewrite_hard_activations
    from edgessl.formats import torch_export

    torch.manual_seed(0)
    net = create_backbone("mobilenetv3", 32).eval()
    for m in net.modules():  # gates off their init: every part of the fold is exercised
        if hasattr(m, "conv_expand"):
            torch.nn.init.normal_(m.conv_expand.bias, 0.0, 2.0)
    x = torch.randn(4, 3, 32, 32)
    gates = sum(isinstance(getattr(m, "gate", None), torch.nn.Hardsigmoid) for m in net.modules())
    folded = copy.deepcopy(net)
    assert fold_se_gates(folded) == gates > 0 and fold_se_gates(folded) == 0  # every gate, once
    with torch.no_grad():
        want, got = net(x), folded(x)
    # hard-sigmoid folded into the next conv: the same fp32 values, reassociated
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    rewritten = copy.deepcopy(net)
    assert rewrite_hard_activations(rewritten) > gates
    assert not any(isinstance(m, (torch.nn.Hardsigmoid, HardSigmoidRelu6)) for m in rewritten.modules())
    torch_export(Encoder(rewritten).eval(), tmp_path / "m.onnx", 32, "dynamic", 18)
    ops = [n.op_type for n in onnx.load(str(tmp_path / "m.onnx")).graph.node]
    assert "HardSigmoid" not in ops and "HardSwish" not in ops and ops.count("Clip") >= gates
    # onnxruntime's kernels against torch's, fp32 through the whole network: the export parity bar
    assert session(tmp_path / "m.onnx").run(None, {"images": x.numpy()})[0] == pytest.approx(want.numpy(), abs=1e-4)


def test_adapted_int8_export_warns_when_the_student_loses_more_than_a_point():
    from edgessl.exporter import export_advice

    adapted = {"adapted": {"seconds": 120.0, "steps": 600}}
    assert export_advice({**adapted, "knn_change": -0.4}) is None
    assert export_advice({"knn_change": -5.0}) is None  # not adapted: plain int8 says its change already
    line = export_advice({**adapted, "knn_change": -5.61})
    assert "5.61 kNN points" in line and "--no-adapt" in line


def test_a_student_that_loses_knn_gives_way_to_the_network(run_dir, tmp_path, monkeypatch):
    """The runtime's choice of int8 network is gated on the student's held-out kNN in torch fp32: a
    bound it cannot meet ships the network as trained, saying why; --adapt ships the student anyway."""
    from click.testing import CliRunner

    from edgessl import exporter, knn
    from edgessl.cli import cli
    from edgessl.data import load_split
    from edgessl.knn import heldout_knn
    from edgessl_edge.backends import open_model

    monkeypatch.setattr(exporter, "ADAPT_MAX_KNN_LOSS", -101.0)  # a student would have to gain 101 points
    measured = []  # the networks whose held-out kNN was measured: the real function, counted
    monkeypatch.setattr(knn, "heldout_knn", lambda *a, **k: measured.append(1) or heldout_knn(*a, **k))
    r = CliRunner().invoke(cli, ["export", str(run_dir), "--out", str(tmp_path / "a.onnx"), "--precision", "int8",
                                 "--adapt-seconds", "1", "--json"])
    assert r.exit_code == 0, r.output
    report = json.loads(r.output.strip().splitlines()[-1])
    rejected = report["student_rejected"]
    assert report["int8_network"] == "as_trained" and "adapted" not in report
    assert rejected["knn_teacher"] == report["knn_torch_fp32"]  # the same kNN, the same torch net
    # the gate measured the network's kNN in this process; the check (a child process) takes it, not again
    model, cfg, _ = load_run(run_dir)
    own, onnx_file, taken = load_split(cfg.data), open_model(tmp_path / "a.onnx"), len(measured)
    again = exporter.knn_change(exporter.export_module(model, False), onnx_file, cfg, *own,
                                torch_fp32=rejected["knn_teacher"])
    assert len(measured) == taken + 1 and again == {k: report[k] for k in again}
    assert exporter.knn_change(exporter.export_module(model, False), onnx_file, cfg, *own) == again
    assert len(measured) == taken + 3
    assert rejected["knn_change"] == pytest.approx(rejected["knn_student"] - rejected["knn_teacher"])
    assert f"the ReLU student lost {-rejected['knn_change']:.2f} kNN points" in r.output
    meta = read_metadata(tmp_path / "a.onnx")
    assert meta["int8_network"] == "as_trained" and meta["student_rejected"] == rejected
    ops = {n.op_type for n in onnx.load(str(tmp_path / "a.onnx")).graph.node}
    assert "GlobalAveragePool" in ops  # the squeeze-excite blocks are still there: the network as trained
    from edgessl.benchmark import benchmark, markdown

    (row,) = benchmark(run_dir, ("onnx",), ("int8",), adapt_seconds=1, progress=False)
    assert row["int8_network"] == "as_trained" and row["student_knn_change"] == rejected["knn_change"]
    assert f"as_trained (the ReLU student's kNN {rejected['knn_change']:+.2f})" in markdown([row])
    forced = export_model(run_dir, tmp_path / "b.onnx", precision="int8", adapt=True, adapt_seconds=1, timing=False)
    assert forced["int8_network"] == "relu_student" and "student_rejected" not in forced
    monkeypatch.setattr(exporter, "ADAPT_MAX_KNN_LOSS", 101.0)  # any student passes
    kept = export_model(run_dir, tmp_path / "c.onnx", precision="int8", adapt_seconds=1, timing=False)
    assert kept["int8_network"] == "relu_student" and kept["adapted"]["knn_change"] == rejected["knn_change"]


def test_a_file_slower_than_fp32_everywhere_it_was_timed_says_so():
    from edgessl.exporter import export_advice

    slow = {1: {1: 0.85, 32: 0.96}, 0: {1: 0.9, 32: 0.8}}
    line = export_advice({"precision": "int8", "speedup_vs_fp32": slow})
    assert line == ("warning: this int8 file ran slower than the run's fp32 file on this CPU (0.85x / 0.96x at batch "
                    "1 / 32 on 1 thread, 0.90x / 0.80x at batch 1 / 32 on the runtime's default threads); the fp32 "
                    "file is the faster one to ship here")
    assert export_advice({"precision": "int8", "speedup_vs_fp32": {**slow, 0: {1: 0.9, 32: 1.01}}}) is None
    assert export_advice({"precision": "fp16", "speedup_vs_fp32": {"1": {"1": 0.43}}}).startswith("warning: this fp16")
    lost = export_advice({"precision": "int8", "speedup_vs_fp32": slow, "adapted": {"steps": 9}, "knn_change": -3.0})
    assert "3.00 kNN points" in lost  # what the file lost comes before what it costs


def test_int8_classifier_warns_when_under_99_percent_of_top1_classes_agree():
    from edgessl.exporter import export_advice

    assert export_advice({"top1_agreement": 0.995, "agreement_images": 1024}) is None
    line = export_advice({"top1_agreement": 0.954, "agreement_images": 1024})
    assert "4.6 % of the held-out images" in line and "fp32" in line


def test_neighbour_kl_against_a_naive_loop_and_an_exact_value():
    import math

    from edgessl.student import neighbour_kl

    torch.manual_seed(0)
    s, t, bank = torch.randn(5, 7), torch.randn(5, 7), torch.nn.functional.normalize(torch.randn(11, 7), dim=1)
    naive = 0.0
    for i in range(5):
        zs, zt = s[i] / s[i].norm(), t[i] / t[i].norm()
        es = [math.exp(float(zs @ b) / 0.1) for b in bank]
        et = [math.exp(float(zt @ b) / 0.1) for b in bank]
        naive += sum(a / sum(et) * math.log((a / sum(et)) / (c / sum(es))) for a, c in zip(et, es))
    assert neighbour_kl(s, t, bank, 0.1).item() == pytest.approx(naive / 5, rel=1e-5)
    assert neighbour_kl(t, t, bank, 0.1).item() == pytest.approx(0.0, abs=1e-6)  # the teacher against itself
    # bank (e0, e1), teacher e0, student e1, tau 1: p_t = (a, b), p_s = (b, a), a = 1 / (1 + 1/e), b = 1 - a
    e = torch.eye(2)
    assert neighbour_kl(e[1:], e[:1], e, 1.0).item() == pytest.approx(
        (1 / (1 + math.e**-1)) * math.log((1 / (1 + math.e**-1)) / (1 / (1 + math.e))) +
        (1 / (1 + math.e)) * math.log((1 / (1 + math.e)) / (1 / (1 + math.e**-1))), rel=1e-6)


def test_int8_weights_keep_eight_bits_unless_x86_lacks_vnni(monkeypatch):
    import platform

    from edgessl import formats as export  # (the ONNX writer's)

    monkeypatch.setattr(platform, "machine", lambda: "aarch64")
    assert export.int8_weight_bits() == 8
    monkeypatch.setattr(platform, "machine", lambda: "x86_64")
    monkeypatch.setattr(torch.cpu, "_is_vnni_supported", lambda: False, raising=False)
    assert export.int8_weight_bits() == 7  # pmaddubsw's int16 sums: onnxruntime's reduce_range
    monkeypatch.setattr(torch.cpu, "_is_vnni_supported", lambda: True, raising=False)
    assert export.int8_weight_bits() == 8


def test_int8_export_with_a_fixed_batch_calibrates_in_that_batch(run_dir, tmp_path):
    out = tmp_path / "b2.onnx"
    report = export_model(run_dir, out, precision="int8", calib_count=5, batch=2, knn=False, adapt_seconds=1)
    sess = session(out)
    assert sess.get_inputs()[0].shape[0] == 2 and read_metadata(out)["batch"] == 2
    assert report["min_cosine"] > 0.9 and set(report["speedup_vs_fp32"][1]) == {2}


def test_the_student_stops_when_it_settles_not_when_the_clock_says():
    """train_for reads the probe every CHECK_EVERY steps; a probe that never improves after its first
    read halves the learning rate every PATIENCE reads and settles after DECAYS halvings: exactly
    (1 + PATIENCE * (DECAYS + 1)) * CHECK_EVERY steps, however fast the CPU. The clock is a cap."""
    from edgessl import student as adapt

    w = torch.nn.Parameter(torch.ones(4))
    opt = torch.optim.SGD([w], lr=0.1)
    reads = []
    probe = lambda: reads.append(float(opt.param_groups[0]["lr"])) or 1.0  # noqa: E731
    stats = adapt.train_for(600.0, opt, 0.1, lambda: (w ** 2).sum(), probe, "test", progress=False)
    assert stats["stopped"] == "settled" and stats["probe_loss"] == 1.0
    assert stats["steps"] == (1 + adapt.PATIENCE * (adapt.DECAYS + 1)) * adapt.CHECK_EVERY
    assert reads == [0.1] * 3 + [0.05] * 2 + [0.025] * 2 + [0.0125] * 2  # the rate each read saw
    capped = adapt.train_for(1e-9, opt, 0.1, lambda: (w ** 2).sum(), probe, "test", progress=False)
    assert capped["stopped"] == "time cap" and capped["steps"] == adapt.CHECK_EVERY  # the cap is read at a check
    from edgessl.cli import cli  # the CLI's default cap is the library's (it does not import torch to read it)

    for command in ("export", "benchmark"):
        (option,) = [p for p in cli.commands[command].params if p.name == "adapt_seconds"]
        assert option.default == adapt.CAP_SECONDS
