"""lyfast.backend: the request (LYFAST_BACKEND / set_backend), availability probes and resolution."""
from __future__ import annotations

import pytest
import torch

import lyfast
from lyfast import backend as B


@pytest.fixture(autouse=True)
def _restore_backend():
    previous = lyfast.get_backend()
    yield
    lyfast.set_backend(previous)


def test_setter_round_trip_and_previous_value():
    lyfast.set_backend("torch")
    assert lyfast.get_backend() is B.Backend.TORCH
    assert lyfast.set_backend(B.Backend.TRITON) is B.Backend.TORCH
    assert lyfast.get_backend() == "triton"  # a str Enum compares with its value
    lyfast.set_backend(" AUTO ")
    assert lyfast.get_backend() is B.Backend.AUTO


def test_unknown_backend_is_rejected_with_the_choices():
    with pytest.raises(ValueError, match="expected one of"):
        lyfast.set_backend("tensorrt")


def test_env_var_is_read_and_validated(monkeypatch):
    """`_from_env` is what `lyfast.backend` evaluates at import."""
    monkeypatch.setenv("LYFAST_BACKEND", "Triton")
    assert B._from_env() is B.Backend.TRITON
    monkeypatch.setenv("LYFAST_BACKEND", "")
    assert B._from_env() is B.Backend.AUTO
    monkeypatch.setenv("LYFAST_BACKEND", "nope")
    with pytest.raises(ValueError, match="LYFAST_BACKEND='nope'"):
        B._from_env()


def test_none_restores_the_env_default(monkeypatch):
    monkeypatch.setenv("LYFAST_BACKEND", "torch")
    lyfast.set_backend("triton")
    lyfast.set_backend(None)
    assert lyfast.get_backend() is B.Backend.TORCH


def test_auto_is_torch_on_cpu(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # even when the interpreter could run the kernels
    assert B.resolve("cpu", "lokr", "auto") is B.Backend.TORCH
    lyfast.set_backend("auto")
    assert B.resolve(torch.device("cpu"), "boft") is B.Backend.TORCH


def test_torch_is_always_available():
    assert B.resolve("cpu", "loha", "torch") is B.Backend.TORCH
    assert B.available("torch", "cpu") == (True, "")


def test_explicit_triton_on_cpu_needs_the_interpreter(monkeypatch):
    pytest.importorskip("triton", reason="probe of an installed triton")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    ok, why = B.available("triton", "cpu")
    assert not ok and "TRITON_INTERPRET=1" in why
    with pytest.raises(B.BackendUnavailableError, match="'triton' was requested"):
        B.resolve("cpu", "lokr", "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert B.resolve("cpu", "lokr", "triton") is B.Backend.TRITON


def test_explicit_cuda_on_cpu_raises():
    with pytest.raises(B.BackendUnavailableError, match="'cuda' was requested"):
        B.resolve("cpu", "boft", "cuda")


def test_triton_missing_is_reported(monkeypatch):
    monkeypatch.setattr(B, "_HAS_TRITON", False)
    ok, why = B.available("triton", "cuda")
    assert not ok and "not installed" in why


def test_public_ops_resolve_once_and_fall_back_outside_the_kernels(monkeypatch):
    """An explicit triton request on a shape the kernels do not cover (fp64 here) runs the PyTorch path."""
    pytest.importorskip("triton", reason="the triton branch imports lyfast.kernels")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    from lyfast.functional import lokr
    from lyfast.functional.general import LayerSpec

    spec = LayerSpec("linear", 6, 6)
    x = torch.randn(2, 6, dtype=torch.float64)
    w1, w2 = torch.randn(2, 3, dtype=torch.float64), torch.randn(3, 2, dtype=torch.float64)
    got = lokr.delta_forward(x, w1, None, None, w2, None, None, spec=spec, backend="triton")
    want = lokr.delta_forward(x, w1, None, None, w2, None, None, spec=spec, backend="torch")
    assert torch.equal(got, want)
