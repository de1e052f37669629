"""LoHa parity with lycoris-lora 4.1.3: output, x.grad and every parameter grad (fp64, rel err <= 1e-10)."""

import pytest
import torch

from conftest import LAYER_KINDS, check_parity, make_pair

ALGO = "loha"
CONV_K3 = ("conv1d", "conv2d", "conv3d", "conv2d_groups2", "conv2d_strided", "conv1d_strided")


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("multiplier", [1.0, 0.5])
@pytest.mark.parametrize("bypass", [False, True], ids=["rebuild", "bypass"])
@pytest.mark.parametrize("layer", LAYER_KINDS)
def test_layer_grid(layer, bypass, multiplier, bias):
    pair = make_pair(ALGO, layer, bias=bias, multiplier=multiplier, bypass_mode=bypass)
    check_parity(pair)


@pytest.mark.parametrize("bypass", [False, True], ids=["rebuild", "bypass"])
@pytest.mark.parametrize("layer", CONV_K3 + ("conv2d_1x1", "linear"))
def test_tucker(layer, bypass):
    # use_tucker is honoured on k>1 convs and ignored on linear / 1x1 conv (LyCORIS: any(k != 1)).
    pair = make_pair(ALGO, layer, bypass_mode=bypass, use_tucker=True, lora_dim=3, alpha=2)
    has_t = hasattr(pair.lyco, "hada_t1") and isinstance(pair.lyco.hada_t1, torch.nn.Parameter)
    assert has_t == (layer in CONV_K3)
    check_parity(pair)


OPTIONS = [
    dict(use_scalar=True),
    dict(use_scalar=True, use_tucker=True),
    dict(rs_lora=True, lora_dim=4, alpha=2),
    dict(rs_lora=True, lora_dim=9, alpha=1),
    dict(alpha=0),
    dict(alpha=None),
    dict(alpha=1),
    dict(alpha=4),
    dict(alpha=7.5),
    dict(lora_dim=1, alpha=1),
    dict(lora_dim=8, alpha=3),
]


@pytest.mark.parametrize("bypass", [False, True], ids=["rebuild", "bypass"])
@pytest.mark.parametrize("layer", ["linear", "conv2d"])
@pytest.mark.parametrize("opts", OPTIONS, ids=lambda d: "-".join(f"{k}={v}" for k, v in d.items()))
def test_options(opts, layer, bypass):
    pair = make_pair(ALGO, layer, bypass_mode=bypass, **opts)
    assert pair.fast.scale == pytest.approx(pair.lyco.scale, rel=1e-12)
    check_parity(pair)


def test_tensor_alpha():
    # LyCORIS accepts a tensor alpha (converted with .float().numpy()).
    pair = make_pair(ALGO, "linear", alpha=torch.tensor(3.0, dtype=torch.bfloat16))
    assert float(pair.fast.alpha) == pytest.approx(float(pair.lyco.alpha))
    check_parity(pair)


@pytest.mark.parametrize("bypass", [False, True], ids=["rebuild", "bypass"])
def test_runtime_multiplier_and_mode_switch(bypass):
    """Users change .multiplier / .bypass_mode after construction (LycorisNetwork.set_multiplier)."""
    pair = make_pair(ALGO, "conv2d", bypass_mode=bypass)
    check_parity(pair, what="initial")
    for m in (0.25, 0.0, -1.0):
        pair.lyco.multiplier = pair.fast.multiplier = m
        from conftest import assert_results_match, run_adapted

        assert_results_match(
            run_adapted(pair.fast_layer, pair.fast, pair.x),
            run_adapted(pair.lyco_layer, pair.lyco, pair.x),
            pair.dtype,
            what=f"multiplier={m}",
        )
    pair.lyco.multiplier = pair.fast.multiplier = 0.7
    pair.lyco.bypass_mode = pair.fast.bypass_mode = not bypass
    check_parity(pair, what="after bypass_mode switch")


def test_batch_of_one_and_many_leading_dims():
    pair = make_pair(ALGO, "linear", input_shape=(1, 24))
    check_parity(pair, what="1 row")
    pair = make_pair(ALGO, "linear", input_shape=(2, 2, 3, 24), bypass_mode=True)
    check_parity(pair, what="4-D linear input")


@pytest.mark.parametrize("route", ["khatri_rao", "rowblock"])
@pytest.mark.parametrize("bypass", [False, True], ids=["rebuild", "bypass"])
@pytest.mark.parametrize(
    "layer,opts",
    [
        ("linear", {}),
        ("conv1d_strided", {}),
        ("conv2d", {}),
        ("conv3d", {}),
        ("conv2d_groups2", {}),
        ("conv2d_1x1", {}),
        ("conv2d", dict(use_tucker=True, lora_dim=3)),
        ("conv2d_groups2", dict(use_tucker=True, lora_dim=2)),
        ("linear", dict(use_scalar=True, lora_dim=7, alpha=3)),
    ],
    ids=lambda v: v if isinstance(v, str) else "-".join(f"{k}={x}" for k, x in v.items()) or "default",
)
def test_forced_routes(layer, opts, bypass, route):
    """lyfast LoHa has two ΔW-free routes (`module.route`): both must match LyCORIS."""
    pair = make_pair(ALGO, layer, bypass_mode=bypass, multiplier=0.7, **opts)
    pair.fast.route = route
    check_parity(pair)


DROPOUTS = [
    dict(rank_dropout=0.5),
    dict(rank_dropout=0.4, rank_dropout_scale=True),
    dict(module_dropout=0.5),
    dict(dropout=0.5),
    dict(dropout=0.3, rank_dropout=0.3, module_dropout=0.3, rank_dropout_scale=True),
]


@pytest.mark.parametrize("route", ["auto", "rowblock"])
@pytest.mark.parametrize("bypass", [False, True], ids=["rebuild", "bypass"])
@pytest.mark.parametrize("layer", ["linear", "conv2d_groups2"])
@pytest.mark.parametrize("opts", DROPOUTS, ids=lambda d: "-".join(f"{k}={v}" for k, v in d.items()))
def test_dropout_train_mode(opts, layer, bypass, route):
    from conftest import assert_outputs_vary, check_dropout_parity

    pair = make_pair(ALGO, layer, bypass_mode=bypass, **opts)
    pair.fast.route = route
    outs = check_dropout_parity(pair)
    # LoHa's plain `dropout` is a no-op in rebuild mode (LyCORIS prints a warning), active in bypass
    if not (opts == dict(dropout=0.5) and not bypass):
        assert_outputs_vary(outs)


def test_dropout_inactive_in_eval():
    pair = make_pair(ALGO, "linear", bypass_mode=True, dropout=0.5, rank_dropout=0.5, module_dropout=0.5)
    pair.lyco.eval(), pair.fast.eval()
    check_parity(pair)


@pytest.mark.parametrize("layer", ["linear", "conv2d"])
def test_backend_resolved_once_per_call(layer, monkeypatch):
    """lyfast.backend promises one `resolve` per public call; the module → linear_forward → delta_forward
    chain used to resolve it three times (twice off Triton)."""
    import lyfast.backend as backend

    calls = []
    real = backend.resolve
    monkeypatch.setattr(backend, "resolve", lambda *a, **k: calls.append(a) or real(*a, **k))
    pair = make_pair(ALGO, layer)
    calls.clear()
    pair.fast_layer(pair.x)
    assert len(calls) == 1, calls


@pytest.mark.parametrize("train_base", [False, True], ids=["frozen", "trainable"])
@pytest.mark.parametrize("route", ["khatri_rao", "rowblock"])
def test_linear_forward_layer_inside(route, train_base):
    """`linear_forward` on the PyTorch path (on Khatri-Rao the Linear layer inside `KhatriRaoDelta`, the
    adapter adding into its output and its dx in place) equals F.linear with W + ΔW in fp64: values and the
    gradients of x, the four factors, a tensor scale and, when they train, the layer's weight and bias."""
    from lyfast.functional import loha as floha

    gen = torch.Generator().manual_seed(2)
    new = lambda *s, grad=True: torch.randn(*s, generator=gen, dtype=torch.float64, requires_grad=grad)  # noqa: E731
    x = new(2, 5, 24)
    weight, bias = new(16, 24, grad=train_base), new(16, grad=train_base)
    fs = [new(16, 3), new(3, 24), new(16, 2), new(2, 24)]
    scale = torch.tensor(0.7, dtype=torch.float64, requires_grad=True)
    got = floha.linear_forward(x, weight, bias, *fs, scale=scale, route=route, backend="torch")
    want = torch.nn.functional.linear(x, weight + floha.diff_weight(*fs, scale=scale), bias)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    ins = (x, *fs, scale) + ((weight, bias) if train_base else ())
    g = torch.randn(want.shape, generator=gen, dtype=torch.float64)
    for a, b in zip(torch.autograd.grad(got, ins, g), torch.autograd.grad(want, ins, g)):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_khatri_rao_adds_base_in_its_last_gemm():
    """`delta_forward` with a linear layer's output as `base` (the module's path above another adapter):
    base + ΔW·x, and base's gradient is the output gradient, in fp64."""
    from lyfast.functional import loha as floha

    gen = torch.Generator().manual_seed(3)
    new = lambda *s: torch.randn(*s, generator=gen, dtype=torch.float64, requires_grad=True)  # noqa: E731
    x, base = new(2, 5, 24), new(2, 5, 16)
    fs = [new(16, 3), new(3, 24), new(16, 2), new(2, 24)]
    spec = floha.LayerSpec("linear", 16, 24)
    got = floha.delta_forward(x, *fs, spec=spec, route="khatri_rao", backend="torch", base=base)
    want = base + x @ floha.diff_weight(*fs).t()
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    g = torch.randn(want.shape, generator=gen, dtype=torch.float64)
    ins = (x, base, *fs)
    for a, b in zip(torch.autograd.grad(got, ins, g), torch.autograd.grad(want, ins, g)):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
