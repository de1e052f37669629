"""LoKr parity with lycoris-lora 4.1.3: output, x.grad and every parameter grad (fp64, rel err <= 1e-10)."""

import pytest
import torch

from lyfast.functional.general import LayerSpec

from conftest import (
    LAYER_KINDS,
    assert_results_match,
    check_parity,
    make_pair,
    run_adapted,
)

ALGO = "lokr"


def lyco_bypass_is_wrong(layer, bypass):
    # LyCORIS 4.1.3's LoKr conv bypass regroups input channels ignoring `groups`: with groups > 1 it returns a
    # wrong result (non-Tucker, max diff ~2.4 vs its own rebuild on conv2d_groups2) or raises (Tucker).
    return bypass and layer == "conv2d_groups2"


def check_lokr_parity(pair, layer, bypass, **kw):
    """Parity against LyCORIS; where LyCORIS's own bypass is wrong, against its rebuild mode instead
    (rebuild and bypass are the same function of x and the parameters)."""
    if lyco_bypass_is_wrong(layer, bypass):
        pair.lyco.bypass_mode = False
    return check_parity(pair, **kw)


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("multiplier", [1.0, 0.5])
@pytest.mark.parametrize("bypass", [False, True], ids=["rebuild", "bypass"])
@pytest.mark.parametrize("layer", LAYER_KINDS)
def test_layer_grid(layer, bypass, multiplier, bias):
    pair = make_pair(ALGO, layer, bias=bias, multiplier=multiplier, bypass_mode=bypass)
    check_lokr_parity(pair, layer, bypass)


def test_lycoris_groups_bypass_really_is_wrong():
    """Guards the fallback above: if LyCORIS's grouped-conv bypass ever agreed with its rebuild, compare to it."""
    pair = make_pair(ALGO, "conv2d_groups2", bypass_mode=True)
    by = run_adapted(pair.lyco_layer, pair.lyco, pair.x, backward=False)["out"]
    pair.lyco.bypass_mode = False
    rb = run_adapted(pair.lyco_layer, pair.lyco, pair.x, backward=False)["out"]
    assert (by - rb).abs().max() > 1e-3


FACTOR_LAYERS = {
    # in=32/out=64 so factors 2, 4, 8 all divide both sides
    "linear": (lambda bias: torch.nn.Linear(32, 64, bias=bias), (2, 3, 32)),
    "conv2d": (lambda bias: torch.nn.Conv2d(32, 64, 3, padding=1, bias=bias), (2, 32, 5, 5)),
}


def make_factor_pair(layer, bypass, **kw):
    ctor, shape = FACTOR_LAYERS[layer]
    return make_pair(ALGO, ctor(True), bypass_mode=bypass, input_shape=shape, **kw)


OPTIONS = [
    dict(factor=-1),
    dict(factor=2),
    dict(factor=4),
    dict(factor=8),
    dict(factor=3),  # does not divide: falls back to the search with a cap
    dict(factor=8, decompose_both=True, lora_dim=1),
    dict(factor=-1, decompose_both=True, lora_dim=1),
    dict(full_matrix=True),
    dict(full_matrix=True, decompose_both=True),
    dict(unbalanced_factorization=True, factor=4),
    dict(unbalanced_factorization=True, factor=8, lora_dim=1),
    dict(unbalanced_factorization=True, factor=4, decompose_both=True, lora_dim=1),
    dict(use_scalar=True),
    dict(use_scalar=True, decompose_both=True, lora_dim=1, factor=8),
    dict(use_scalar=True, full_matrix=True),
    dict(rs_lora=True, lora_dim=2, alpha=3),
    dict(alpha=0),
    dict(alpha=None),
    dict(alpha=5.0),
    dict(lora_dim=16, alpha=3),  # rank too large for both factors -> both full -> scale 1
]


@pytest.mark.parametrize("bypass", [False, True], ids=["rebuild", "bypass"])
@pytest.mark.parametrize("layer", list(FACTOR_LAYERS))
@pytest.mark.parametrize("opts", OPTIONS, ids=lambda d: "-".join(f"{k}={v}" for k, v in d.items()))
def test_options(opts, layer, bypass):
    pair = make_factor_pair(layer, bypass, **opts)
    assert pair.fast.scale == pytest.approx(pair.lyco.scale, rel=1e-12)
    check_parity(pair)


def test_unbalanced_w1_decomposed_w2_full():
    """unbalanced + decompose_both with a rank between the two halves: w1 factored, w2 full."""
    pair = make_pair(ALGO, "linear", unbalanced_factorization=True, decompose_both=True, lora_dim=3)
    names = {n for n, _ in pair.lyco.named_parameters()}
    assert names == {"lokr_w1_a", "lokr_w1_b", "lokr_w2"}, names
    check_parity(pair)


def test_both_full_scale_is_one():
    pair = make_pair(ALGO, "linear", lora_dim=8, alpha=2)
    assert pair.lyco.use_w1 and pair.lyco.use_w2
    assert pair.lyco.scale == 1.0 and pair.fast.scale == 1.0
    assert float(pair.fast.alpha) == float(pair.lyco.alpha) == 8.0
    check_parity(pair)


CONV_K3 = ("conv1d", "conv2d", "conv3d", "conv2d_groups2", "conv2d_strided", "conv1d_strided")


@pytest.mark.parametrize("bypass", [False, True], ids=["rebuild", "bypass"])
@pytest.mark.parametrize("layer", CONV_K3 + ("conv2d_1x1",))
def test_conv_tucker(layer, bypass):
    pair = make_pair(ALGO, layer, bypass_mode=bypass, use_tucker=True, lora_dim=1, alpha=0.5)
    expect_tucker = layer != "conv2d_1x1"
    assert hasattr(pair.lyco, "lokr_t2") == expect_tucker
    check_lokr_parity(pair, layer, bypass)


@pytest.mark.parametrize("bypass", [False, True], ids=["rebuild", "bypass"])
@pytest.mark.parametrize("layer", CONV_K3)
def test_conv_flattened_w2b(layer, bypass):
    pair = make_pair(ALGO, layer, bypass_mode=bypass, lora_dim=1, alpha=1)
    w2b = pair.lyco.lokr_w2_b
    ksz = pair.lyco.shape[2:]
    assert w2b.dim() == 2 and w2b.shape[1] % int(torch.tensor(ksz).prod()) == 0
    check_lokr_parity(pair, layer, bypass)


@pytest.mark.parametrize("bypass", [False, True], ids=["rebuild", "bypass"])
def test_conv_tucker_scalar_rs(bypass):
    ctor, shape = FACTOR_LAYERS["conv2d"]
    pair = make_pair(
        ALGO, ctor(True), input_shape=shape, bypass_mode=bypass,
        use_tucker=True, use_scalar=True, rs_lora=True, lora_dim=2, alpha=3, factor=4,
    )
    assert hasattr(pair.lyco, "lokr_t2")
    check_parity(pair)


@pytest.mark.parametrize("bypass", [False, True], ids=["rebuild", "bypass"])
def test_runtime_multiplier(bypass):
    pair = make_pair(ALGO, "conv2d", bypass_mode=bypass)
    for m in (1.0, 0.3, 0.0, -2.0):
        pair.lyco.multiplier = pair.fast.multiplier = m
        assert_results_match(
            run_adapted(pair.fast_layer, pair.fast, pair.x),
            run_adapted(pair.lyco_layer, pair.lyco, pair.x),
            pair.dtype,
            what=f"multiplier={m}",
        )


DROPOUTS = [
    dict(rank_dropout=0.5),
    dict(rank_dropout=0.4, rank_dropout_scale=True),
    dict(module_dropout=0.5),
    dict(dropout=0.5),
    dict(dropout=0.3, rank_dropout=0.3, module_dropout=0.3, rank_dropout_scale=True),
]


@pytest.mark.parametrize("bypass", [False, True], ids=["rebuild", "bypass"])
@pytest.mark.parametrize("layer", ["linear", "conv1d_strided"])
@pytest.mark.parametrize("opts", DROPOUTS, ids=lambda d: "-".join(f"{k}={v}" for k, v in d.items()))
def test_dropout_train_mode(opts, layer, bypass):
    """Rebuild: rank dropout masks ΔW's output rows (drawn as rand(out)); bypass ignores rank dropout and
    applies nn.Dropout to ΔW·x; module dropout draws rand(1) first."""
    from conftest import assert_outputs_vary, check_dropout_parity

    pair = make_pair(ALGO, layer, bypass_mode=bypass, **opts)
    outs = check_dropout_parity(pair)
    only_rank = "dropout" not in opts and "module_dropout" not in opts
    if not ((opts == dict(dropout=0.5) and not bypass) or (bypass and only_rank)):
        assert_outputs_vary(outs)


@pytest.mark.parametrize("bypass", [False, True], ids=["rebuild", "bypass"])
def test_dropout_decomposed_both_tucker(bypass):
    from conftest import check_dropout_parity

    ctor, shape = FACTOR_LAYERS["conv2d"]
    pair = make_pair(
        ALGO, ctor(True), input_shape=shape, bypass_mode=bypass, use_tucker=True, decompose_both=True,
        lora_dim=1, factor=8, rank_dropout=0.5, rank_dropout_scale=True, dropout=0.2,
    )
    check_dropout_parity(pair)


PLAN_LAYERS = {
    # (spec, x shape, c1 shape, c2 shape): in_m·in_n and out_l·out_k match the layer
    "linear": (LayerSpec("linear", 6 * 5, 4 * 3), (2, 3, 12), (6, 4), (5, 3)),
    "conv2d_strided": (
        LayerSpec("conv2d", 6 * 5, 4 * 3, (3, 3), (2, 2), (1, 1), (1, 1)), (2, 12, 5, 6), (6, 4), (5, 3, 3, 3),
    ),
}


@pytest.mark.parametrize("with_base", [False, True], ids=["delta", "base"])
@pytest.mark.parametrize("from_v", [False, True], ids=["bwd_from_P", "bwd_from_V"])
@pytest.mark.parametrize("c1_first", [False, True], ids=["c2_first", "c1_first"])
@pytest.mark.parametrize("layer", list(PLAN_LAYERS))
def test_every_kron_plan(layer, c1_first, from_v, with_base, monkeypatch):
    """Each order `kron_plan` can pick (forward and backward) equals the dense kron(W1, W2) layer in
    fp64, values and gradients (the SDXL shapes take only some of them)."""
    from lyfast.functional import lokr as flokr

    spec, xs, s1, s2 = PLAN_LAYERS[layer]
    monkeypatch.setattr(flokr, "kron_plan", lambda *a, **k: (c1_first, from_v))
    gen = torch.Generator().manual_seed(0)
    x, c1, c2 = (torch.randn(s, generator=gen, dtype=torch.float64, requires_grad=True) for s in (xs, s1, s2))
    dense = lambda x, c1, c2: spec.apply(x, flokr.diff_weight(c1, None, None, c2, None, None))  # noqa: E731
    base = dense(x, c1, c2).detach().normal_(generator=gen).requires_grad_(True) if with_base else None
    got = flokr.KronDelta.apply(x, c1, c2, spec, base)
    want = dense(x, c1, c2) + (base if with_base else 0)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    ins = (x, c1, c2) + ((base,) if with_base else ())
    g = torch.randn(want.shape, generator=gen, dtype=torch.float64)
    for a, b in zip(torch.autograd.grad(got, ins, g), torch.autograd.grad(want, ins, g)):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("train_base", [False, True], ids=["frozen", "trainable"])
@pytest.mark.parametrize("from_v", [False, True], ids=["bwd_from_P", "bwd_from_V"])
@pytest.mark.parametrize("c1_first", [False, True], ids=["c2_first", "c1_first"])
def test_linear_forward_every_kron_plan(c1_first, from_v, train_base, monkeypatch):
    """`linear_forward` on the PyTorch path (the Linear layer inside `KronDelta`, the adapter adding into
    its output and its dx in place) equals F.linear + the dense kron(W1, W2) layer in fp64 for each
    order `kron_plan` can pick: values and the gradients of x, both factors, a tensor scale and, when
    they train, the layer's weight and bias."""
    from lyfast.functional import lokr as flokr

    spec, xs, s1, s2 = PLAN_LAYERS["linear"]
    monkeypatch.setattr(flokr, "kron_plan", lambda *a, **k: (c1_first, from_v))
    gen = torch.Generator().manual_seed(1)
    x, c1, c2 = (torch.randn(s, generator=gen, dtype=torch.float64, requires_grad=True) for s in (xs, s1, s2))
    weight = torch.randn(spec.weight_shape, generator=gen, dtype=torch.float64, requires_grad=train_base)
    bias = torch.randn(spec.out_features, generator=gen, dtype=torch.float64, requires_grad=train_base)
    scale = torch.tensor(0.7, dtype=torch.float64, requires_grad=True)
    got = flokr.linear_forward(x, weight, bias, c1, None, None, c2, None, None, scale=scale, backend="torch")
    want = torch.nn.functional.linear(x, weight + flokr.diff_weight(c1, None, None, c2, None, None, scale=scale), bias)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    ins = (x, c1, c2, scale) + ((weight, bias) if train_base else ())
    g = torch.randn(want.shape, generator=gen, dtype=torch.float64)
    for a, b in zip(torch.autograd.grad(got, ins, g), torch.autograd.grad(want, ins, g)):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_module_runs_linear_layer_inside_kron_delta(monkeypatch):
    """On a plain Linear the module's training forward is one `KronDelta` with the layer's weight and bias
    inside (no separate F.linear), and not under rank dropout or above another adapter."""
    from lyfast.functional import lokr as flokr

    calls = []
    real = flokr.KronDelta.apply
    monkeypatch.setattr(flokr.KronDelta, "apply", lambda *a: calls.append(len(a) > 5 and a[5] is not None) or real(*a))
    pair = make_pair(ALGO, "linear")
    run_adapted(pair.fast_layer, pair.fast, pair.x)
    assert calls == [True]
    calls.clear()
    pair = make_pair(ALGO, "linear", rank_dropout=0.5)
    pair.fast.train()
    run_adapted(pair.fast_layer, pair.fast, pair.x)
    assert calls == [False]
