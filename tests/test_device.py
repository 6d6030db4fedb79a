"""What `precision auto` becomes on a CPU: bf16 only where oneDNN may use AMX."""
import pytest
import torch

from edgessl.device import cpu_has_amx, resolve_precision


@pytest.mark.parametrize("cap,amx", [("", True), ("AVX2", False), ("avx512_core_bf16", False),
                                     ("AVX512_CORE_AMX", True), ("ALL", True)])
def test_auto_precision_follows_the_cpu_and_onednn_cap(monkeypatch, cap, amx):
    for name in ("_is_amx_tile_supported", "_is_avx512_bf16_supported"):
        monkeypatch.setattr(torch.cpu, name, lambda: True, raising=False)
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", cap)
    assert cpu_has_amx() is amx
    assert resolve_precision("auto", torch.device("cpu")) == ("bf16" if amx else "fp32")
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    assert not cpu_has_amx() and resolve_precision("auto", torch.device("cpu")) == "fp32"


def test_the_run_line_names_what_auto_read(monkeypatch):
    from edgessl.device import precision_why

    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True, raising=False)
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    why = precision_why("auto", torch.device("cpu"))
    assert why.startswith("auto: ") and "AMX" in why and why.endswith(", ONEDNN_MAX_CPU_ISA=AVX2")
    assert precision_why("fp32", torch.device("cpu")) == "given"
