"""The benchmark's HF PEFT peer computes what lyfast computes (LoHa, LoKr), or the documented other function
(BOFT: the same butterfly matrix on the input side), so its timings compare like with like.

Each test builds both adapters through `lyfast.profile.adapt` (the benchmark's own path, so the PEFT config
mapping is what is tested), copies PEFT's random parameters into lyfast's and compares in fp64."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

pytest.importorskip("peft")

from lyfast import peers  # noqa: E402
from lyfast.functional import boft  # noqa: E402

F64 = dict(atol=1e-10, rtol=1e-10)


def _frozen(make) -> nn.Module:
    torch.manual_seed(0)
    return make().double().requires_grad_(False)


def _input(layer: nn.Module, tokens=3) -> torch.Tensor:
    shape = (tokens, layer.in_features) if isinstance(layer, nn.Linear) else (2, layer.in_channels, 5, 6)
    return peers.make_input(layer, shape, seed=1)


def _peft_params(wrapped) -> dict:
    """PEFT's trainable parameters by their LyCORIS name: layer.hada_w1_a.default -> hada_w1_a."""
    return {n.split(".")[1]: p for n, p in wrapped.named_parameters() if p.requires_grad}


LAYERS = {
    # 96 -> (8, 12) and 1280 -> (32, 40): lokr-f-1-r16 keeps w2 low rank (16 < 40/2), the full settings do not
    "linear": lambda: nn.Linear(96, 1280),
    "conv3x3": lambda: nn.Conv2d(16, 24, 3, padding=1),
}
SAME_FUNCTION = ("loha-r8", "loha-r32", "lokr-f-1-r16", "lokr-full-f4", "lokr-full-f8")


@pytest.mark.parametrize("setting", SAME_FUNCTION)
@pytest.mark.parametrize("kind", LAYERS)
def test_peft_loha_lokr_compute_the_lyfast_function(kind, setting):
    layer = _frozen(LAYERS[kind])
    if kind == "conv3x3" and setting == "lokr-full-f8":
        pytest.skip("PEFT and LyCORIS split 16 channels differently at factor 8 (test_mismatches_do_not_fit)")
    peft_layer, peft_adapter = peers.adapt(layer, "peft", setting)
    ours, adapter = peers.adapt(layer, "lyfast", setting)
    given = _peft_params(peft_layer)
    assert set(given) == {n for n, _ in adapter.named_parameters()}
    with torch.no_grad():
        for name, p in adapter.named_parameters():
            p.copy_(given[name])
    x = _input(layer)
    y_peft, y_ours = peft_layer(x), ours(x)
    assert (y_peft - layer(x)).abs().max() > 1e-3          # the adapters do something
    torch.testing.assert_close(y_ours, y_peft, **F64)
    g = torch.randn_like(y_ours)
    dx_peft, *d_peft = torch.autograd.grad(y_peft, [x, *given.values()], g)
    dx_ours, *d_ours = torch.autograd.grad(y_ours, [x, *(dict(adapter.named_parameters())[n] for n in given)], g)
    torch.testing.assert_close(dx_ours, dx_peft, **F64)
    for a, b in zip(d_ours, d_peft):
        torch.testing.assert_close(a, b, **F64)
    assert {id(p) for p in peft_adapter.parameters()} == {id(p) for p in given.values()}


@pytest.mark.parametrize("layer", [lambda: nn.Linear(64, 64), lambda: nn.Linear(64, 48),
                                   lambda: nn.Conv2d(64, 24, 3, padding=1)], ids=["square", "linear", "conv3x3"])
def test_peft_boft_is_the_lycoris_butterfly_on_the_input_side(layer):
    """PEFT's BOFT with LyCORIS's blocks (×-2, reordered by boft_sigma) rotates the input by LyCORIS's
    butterfly matrix B: y = s ⊙ (W·Bᵀ)·x + bias, where lyfast computes B·W·x + bias on the output side."""
    layer = _frozen(layer)
    peft_layer, _ = peers.adapt(layer, "peft", "boft-b32")
    params = _peft_params(peft_layer)
    m, n, b, _ = params["boft_R"].shape
    d = peers.peft_boft_dim(layer)
    assert n * b == d and 2 ** (m - 1) * b == layer.weight.shape[1] and m >= 2   # a real butterfly
    blocks = torch.randn(m, n, b, b, dtype=torch.float64) * 0.3
    sigma = peers.boft_sigma(b)
    with torch.no_grad():
        params["boft_R"].copy_(-2 * blocks[:, :, sigma][:, :, :, sigma])
    B = boft.butterfly_reference(torch.eye(d, dtype=torch.float64), boft.stage_matrices(blocks)).T
    torch.testing.assert_close(B @ B.T, torch.eye(d, dtype=torch.float64), **F64)
    s = params["boft_s"].reshape(-1)
    assert (s - 1).abs().max() > 1e-3
    w = (layer.weight.reshape(layer.out_channels if isinstance(layer, nn.Conv2d) else layer.out_features, d)
         @ B.T * s[:, None]).reshape(layer.weight.shape)
    x = _input(layer)
    expect = (F.linear(x, w, layer.bias) if isinstance(layer, nn.Linear)
              else F.conv2d(x, w, layer.bias, padding=layer.padding))
    torch.testing.assert_close(peft_layer(x), expect, **F64)
    if layer.weight.shape[0] == d and isinstance(layer, nn.Linear):   # square: lyfast's BOFT has the same B
        ours, adapter = peers.adapt(layer, "lyfast", "boft-b32")
        assert adapter.oft_blocks.shape == blocks.shape
        with torch.no_grad():
            adapter.oft_blocks.copy_(blocks)
        torch.testing.assert_close(ours(x), F.linear(x, B @ layer.weight, layer.bias), **F64)


def test_mismatches_do_not_fit():
    with pytest.raises(ValueError, match="no DoRA"):
        peers.adapt(nn.Linear(16, 16), "peft", "loha-r8-dora")
    with pytest.raises(ValueError, match="no DoRA"):
        peers.adapt(nn.Linear(16, 16), "peft", "lokr-f-1-r16-dora")
    # LyCORIS puts the smaller factor first (2, 8); PEFT gives (8, 2): other shapes, another function
    with pytest.raises(ValueError, match="differently"):
        peers.adapt(nn.Conv2d(16, 24, 3), "peft", "lokr-full-f8")
    with pytest.raises(ValueError, match="CPU limit"):   # PEFT rotates 5120 inputs densely: minutes a call
        peers.adapt(nn.Linear(5120, 1280, device="meta").to_empty(device="cpu"), "peft", "boft-b32")


def test_peft_case_runs_in_the_harness():
    from benchmarks import shapes
    from benchmarks.harness import DoesNotFit, call, make_case, unavailable

    assert unavailable("peft") is None
    shape = shapes.Shape("linear", 64, 64, (1, 4, 64))
    for setting in ("loha-r8", "lokr-full-f4", "boft-b32"):
        assert call(make_case(shape, "peft", setting, "fwdbwd", "cpu", torch.float32)) > 0
    with pytest.raises(DoesNotFit, match="no DoRA"):
        make_case(shape, "peft", "loha-r8-dora", "fwdbwd", "cpu", torch.float32)
