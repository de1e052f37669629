"""Regression tests for issue 20 (reliability, round 3), one or more per item, numbered as in the issue. Each
failed on the code before its fix."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from conftest import fast_cls, randomize_
from lyco_models import one_thread  # noqa: F401  (autouse fixture)

NAME = "lycoris_test"


def _adapted_linear(algo, dtype=torch.float64, seed=0, **kw):
    torch.manual_seed(seed)
    layer = nn.Linear(16, 32).to(dtype).requires_grad_(False)
    m = fast_cls(algo)(NAME, layer, 1.0, 4, 2, **kw).to(dtype)
    randomize_(m, seed=seed)
    return layer, m


# --------------------------------------------------------------------------------------------------- 3
@pytest.mark.parametrize("algo", ["loha", "lokr", "boft"])
@pytest.mark.parametrize("dora", [False, True], ids=["plain", "dora"])
@pytest.mark.parametrize("multiplier", [0.0, 0.7])
def test_3_replaced_forward_is_called_not_recomputed_from_the_weight(algo, dora, multiplier):
    """A replaced `layer.forward` (monkeypatch; accelerate's cpu_offload and diffusers' layerwise casting do the
    same) is what the adapter adds to: the adapted layer is the replaced forward plus the same contribution as on
    the plain layer (LoHa/LoKr, DoRA included: DoRA at multiplier 0 still adds ΔW·x, as LyCORIS), and BOFT at
    multiplier 0 is exactly the replaced forward."""
    if algo == "boft" and dora:
        pytest.skip("BOFT has no DoRA in LyCORIS 4.1.3")
    if algo == "boft" and multiplier:
        pytest.skip("BOFT rotates the layer's output: not base + delta")
    kw = {"weight_decompose": True} if dora else {}
    layer, m = _adapted_linear(algo, **kw)
    reference = nn.Linear.forward.__get__(layer)
    layer.forward = lambda x: reference(x) * 2 + 1  # the layer computes something else than F.linear(x, W, b)
    m.multiplier = multiplier
    m.apply_to()
    x = torch.randn(3, 16, dtype=torch.float64)
    out = layer(x)
    replaced = reference(x) * 2 + 1
    if algo == "boft":
        torch.testing.assert_close(out, replaced, rtol=0, atol=0)
        return
    plain, m2 = _adapted_linear(algo, **kw)
    m2.multiplier = multiplier
    m2.apply_to()
    contribution = plain(x) - nn.Linear.forward(plain, x)
    torch.testing.assert_close(out - replaced, contribution, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("algo", ["loha", "lokr"])
def test_3_diffusers_layerwise_casting_runs_and_adds_the_same_contribution(algo):
    """diffusers' layerwise casting stores W in fp8 and upcasts it in a hook around forward: the adapted layer
    must call that forward (reading W directly gave a dtype error)."""
    hooks = pytest.importorskip("diffusers.hooks")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32)).requires_grad_(False)
    hooks.apply_layerwise_casting(model, storage_dtype=torch.float8_e4m3fn, compute_dtype=torch.float32)
    layer = model[0]
    m = fast_cls(algo)(NAME, layer, 1.0, 4, 2)
    randomize_(m, seed=1)
    m.apply_to()
    x = torch.randn(3, 16)
    out = layer(x)
    m.restore()
    base = layer(x)  # the hooked forward alone
    delta = out - base
    expected = m.delta_weight(1.0).float() @ x.T
    torch.testing.assert_close(delta, expected.T, rtol=1e-5, atol=1e-5)
