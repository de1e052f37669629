"""DoRA (`weight_decompose`, `wd_on_out`) for LoHa and LoKr: lycoris-lora 4.1.3's numbers and files,
without W0 + ΔW (lyfast.functional.dora).

* Parity in fp64 with LyCORIS: output, x.grad and every parameter gradient (dora_scale included) for LoHa
  and LoKr on Linear / Conv (Tucker, grouped) × wd_on_out True/False × multiplier 1 and != 1; multiplier 0,
  no bias, use_scalar, rank and module dropout (same RNG draws), a stack over another adapter and a
  trainable base weight (the routes that call the layer's own forward), bypass mode (DoRA ignored, as
  LyCORIS does, with a warning), eps of the dtype (tiny norms).
* dora_scale's initial value, the state-dict layout and loading both ways, make_module_from_state_dict of
  row- and column-norm files, merge_to / get_merged_weight equal to the forward.
* `RowBlockNorms` under torch.autograd.gradcheck; no weight-sized tensor in forward + backward (the
  TorchDispatchMode probe of test_no_delta_weight), with LyCORIS DoRA as the control the probe catches.
* kohya network_args `dora_wd` / `wd_on_output`: same layout as lycoris.kohya and the same training steps.
"""
from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn as nn

import lycoris.kohya as lkohya
import lyfast.kohya as fkohya
from conftest import (assert_close_rel, assert_outputs_vary, check_dropout_parity, check_parity, fast_cls,
                      lyco_cls, make_layer, make_pair, randomize_, run_adapted)
from lyfast.functional import dora, loha, lokr
from lyfast.functional.general import LayerSpec

# (algo, layer kind, extra kwargs)
GRID = [
    ("loha", "linear", {}),
    ("loha", "conv2d", {}),
    ("loha", "conv2d", dict(use_tucker=True)),
    ("loha", "conv1d_strided", dict(use_scalar=True)),
    ("loha", "conv2d_groups2", {}),
    ("lokr", "linear", {}),
    ("lokr", "linear", dict(decompose_both=True, factor=4, use_scalar=True)),
    ("lokr", "conv2d", {}),
    ("lokr", "conv2d", dict(use_tucker=True)),
    ("lokr", "conv2d_groups2", {}),
]


def _gid(case):
    algo, kind, kw = case
    return "-".join([algo, kind] + [f"{k}={v}" for k, v in kw.items()])


@pytest.mark.parametrize("multiplier", [1.0, 0.6])
@pytest.mark.parametrize("wd_on_out", [True, False], ids=["rows", "columns"])
@pytest.mark.parametrize("case", GRID, ids=_gid)
def test_parity_with_lycoris(case, wd_on_out, multiplier):
    algo, kind, kw = case
    pair = make_pair(algo, kind, multiplier=multiplier, weight_decompose=True, wd_on_out=wd_on_out, **kw)
    assert pair.fast.dora_scale.shape == pair.lyco.dora_scale.shape
    fr, _ = check_parity(pair)
    assert torch.count_nonzero(fr["grads"]["dora_scale"]) > 0


# LoHa layers where R = r1·r2 = 4 is <= 1/8 of out and in·∏k: the closed-form norms (`hada_norms_sq`)
CLOSED = {
    "linear": (lambda: nn.Linear(40, 48), (2, 3, 40), {}),
    "conv2d": (lambda: nn.Conv2d(8, 40, 3, padding=1), (2, 8, 5, 5), {}),
    "conv2d_tucker": (lambda: nn.Conv2d(8, 40, 3, padding=1), (2, 8, 5, 5), dict(use_tucker=True)),
}


@pytest.mark.parametrize("multiplier", [1.0, 0.6])
@pytest.mark.parametrize("wd_on_out", [True, False], ids=["rows", "columns"])
@pytest.mark.parametrize("kind", list(CLOSED))
def test_parity_with_lycoris_closed_form(kind, wd_on_out, multiplier, monkeypatch):
    make, shape, kw = CLOSED[kind]
    monkeypatch.setattr(dora, "norms_sq", None)  # the row-block route would now fail: closed form only
    pair = make_pair("loha", make(), multiplier=multiplier, input_shape=shape, lora_dim=2, alpha=1.5,
                     weight_decompose=True, wd_on_out=wd_on_out, **kw)
    check_parity(pair)


# LoKr layers with in_m = 8: the closed-form row norms (`kron_norms_sq`)
CLOSED_KRON = {
    "linear": (lambda: nn.Linear(64, 48), (2, 3, 64), {}),
    "linear_decompose_both": (lambda: nn.Linear(64, 48), (2, 3, 64), dict(decompose_both=True, factor=8,
                                                                          use_scalar=True)),
    "conv2d_tucker": (lambda: nn.Conv2d(64, 40, 3, padding=1), (2, 64, 4, 4), dict(use_tucker=True)),
}


@pytest.mark.parametrize("multiplier", [1.0, 0.6])
@pytest.mark.parametrize("kind", list(CLOSED_KRON))
def test_parity_with_lycoris_lokr_closed_form(kind, multiplier, monkeypatch):
    make, shape, kw = CLOSED_KRON[kind]
    monkeypatch.setattr(dora, "norms_sq", None)  # the row-block route would now fail: closed form only
    pair = make_pair("lokr", make(), multiplier=multiplier, input_shape=shape, lora_dim=2, alpha=1.5,
                     weight_decompose=True, **kw)
    check_parity(pair)


@pytest.mark.parametrize("masked", [False, True], ids=["plain", "row_scale"])
def test_kron_closed_form_equals_row_blocks(masked):
    spec = LayerSpec("conv2d", 12, 16, (3,), groups=1)
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(*spec.weight_shape, generator=g, dtype=torch.float64)
    c1 = torch.randn(3, 8, generator=g, dtype=torch.float64).requires_grad_(True)
    c2 = torch.randn(4, 2, 3, generator=g, dtype=torch.float64).requires_grad_(True)
    row_scale = (torch.rand(12, generator=g, dtype=torch.float64) > 0.3) * 1.5 if masked else None
    cot = torch.randn(12, generator=g, dtype=torch.float64)
    got = dora.kron_norms_sq(weight, spec, c1, c2, True, torch.float64, row_scale)
    ref = dora.norms_sq(weight, spec, lokr.KronRows, (c1, c2), True, torch.float64, row_scale)
    assert_close_rel(got, ref, name="norms")
    for a, b, n in zip(torch.autograd.grad((got * cot).sum(), (c1, c2)), torch.autograd.grad((ref * cot).sum(), (c1, c2)),
                       ("c1", "c2")):
        assert_close_rel(a, b, name=f"grad of {n}")


@pytest.mark.parametrize("masked", [False, True], ids=["plain", "row_scale"])
@pytest.mark.parametrize("wd_on_out", [True, False], ids=["rows", "columns"])
@pytest.mark.parametrize("spec", [LayerSpec("linear", 40, 48), LayerSpec("conv2d", 64, 4, (3, 3), groups=2)],
                         ids=["linear", "conv-groups"])
def test_hada_closed_form_equals_row_blocks(spec, wd_on_out, masked):
    """Value and factor gradients of the closed-form LoHa norms against the row-block Function."""
    g = torch.Generator().manual_seed(0)
    d = spec.in_features * spec.kernel_numel
    weight = torch.randn(*spec.weight_shape, generator=g, dtype=torch.float64)
    factors = [torch.randn(*s, generator=g, dtype=torch.float64).requires_grad_(True)
               for s in ((spec.out_features, 2), (2, d), (spec.out_features, 2), (2, d))]
    row_scale = (torch.rand(spec.out_features, generator=g, dtype=torch.float64) > 0.3) * 1.5 if masked else None
    cot = torch.randn(spec.out_features if wd_on_out else spec.in_features, generator=g, dtype=torch.float64)
    got = dora.hada_norms_sq(weight, spec, *factors, wd_on_out, torch.float64, row_scale)
    ref = dora.norms_sq(weight, spec, loha.HadaRows, factors, wd_on_out, torch.float64, row_scale)
    assert_close_rel(got, ref, name="norms")
    for a, b, i in zip(torch.autograd.grad((got * cot).sum(), factors), torch.autograd.grad((ref * cot).sum(), factors),
                       range(4)):
        assert_close_rel(a, b, name=f"grad of factor {i}")


@pytest.mark.parametrize("wd_on_out", [True, False], ids=["rows", "columns"])
@pytest.mark.parametrize("algo", ["loha", "lokr"])
def test_multiplier_zero_and_no_bias(algo, wd_on_out):
    """Multiplier 0 leaves ΔW applied (LyCORIS interpolates only the magnitude); a layer without bias."""
    pair = make_pair(algo, "conv2d", bias=False, multiplier=0.0, weight_decompose=True, wd_on_out=wd_on_out)
    check_parity(pair)


@pytest.mark.parametrize("wd_on_out", [True, False], ids=["rows", "columns"])
@pytest.mark.parametrize("algo,kind", [("loha", "linear"), ("lokr", "conv2d")])
def test_rank_and_module_dropout(algo, kind, wd_on_out):
    """Rank dropout masks ΔW's rows inside the norms too; the RNG is drawn as LyCORIS draws it."""
    pair = make_pair(algo, kind, multiplier=0.7, weight_decompose=True, wd_on_out=wd_on_out, rank_dropout=0.4,
                     rank_dropout_scale=True)
    assert_outputs_vary(check_dropout_parity(pair))
    pair = make_pair(algo, kind, weight_decompose=True, wd_on_out=wd_on_out, module_dropout=0.5)
    assert_outputs_vary(check_dropout_parity(pair))


@pytest.mark.parametrize("wd_on_out", [True, False], ids=["rows", "columns"])
@pytest.mark.parametrize("algo", ["loha", "lokr"])
def test_stacked_and_trainable_base(algo, wd_on_out):
    """Over another adapter (org_forward is not the layer's) and with a trainable W0: the routes that call
    the layer's forward and add op(x, W0) terms; W0's gradient as LyCORIS gives it."""
    pair = make_pair(algo, "conv2d", multiplier=0.8, weight_decompose=True, wd_on_out=wd_on_out, apply=False)
    for layer in (pair.lyco_layer, pair.fast_layer):
        below = lyco_cls("loha")("lycoris_below", layer, 1.0, 2, 1.0).to(pair.dtype)
        randomize_(below, seed=5)
        below.apply_to()
    pair.apply()
    check_parity(pair, what="stacked")

    pair = make_pair(algo, "linear", multiplier=0.8, weight_decompose=True, wd_on_out=wd_on_out)
    for layer in (pair.lyco_layer, pair.fast_layer):
        layer.weight.requires_grad_(True)
    check_parity(pair, what="trainable W0")
    assert_close_rel(pair.fast_layer.weight.grad, pair.lyco_layer.weight.grad, name="W0.grad")


@pytest.mark.parametrize("algo", ["loha", "lokr"])
def test_bypass_mode_ignores_dora_like_lycoris(algo):
    with pytest.warns(UserWarning, match="bypass_mode"):
        pair = make_pair(algo, "linear", multiplier=0.8, weight_decompose=True, bypass_mode=True)
    fr, _ = check_parity(pair)
    assert fr["grads"]["dora_scale"] is None


@pytest.mark.parametrize("wd_on_out", [True, False], ids=["rows", "columns"])
def test_eps_of_the_dtype(wd_on_out):
    """Norms near finfo(fp64).eps: eps added after the root, of dora_scale's dtype, shows at 1e-3."""
    pair = make_pair("lokr", "conv2d", weight_decompose=True, wd_on_out=wd_on_out, apply=False)
    with torch.no_grad():
        for layer in (pair.lyco_layer, pair.fast_layer, pair.base_layer):
            layer.weight.mul_(1e-14)
        for mod in (pair.lyco, pair.fast):
            for name, p in mod.named_parameters():
                p.mul_(1e-14 if name == "lokr_w1" else 1.0)
    pair.apply()
    norms = dora._norm_sq(pair.fast_layer.weight + pair.fast.get_weight().detach(), wd_on_out).sqrt()
    assert norms.max() < 1e-12  # eps = 2.2e-16 is then >= 1e-4 of the norm
    check_parity(pair)


# ------------------------------------------------------------------------------------------------ init and files
@pytest.mark.parametrize("wd_on_out", [True, False], ids=["rows", "columns"])
@pytest.mark.parametrize("algo,kind", [("loha", "linear"), ("loha", "conv2d_groups2"), ("lokr", "conv3d")])
def test_initial_dora_scale_and_state_dict(algo, kind, wd_on_out):
    layer = make_layer(kind)
    lyco = lyco_cls(algo)("lycoris_test", copy.deepcopy(layer), 1.0, 2, 1.0, weight_decompose=True,
                          wd_on_out=wd_on_out)
    fast = fast_cls(algo)("lycoris_test", copy.deepcopy(layer), 1.0, 2, 1.0, weight_decompose=True,
                          wd_on_out=wd_on_out)
    assert fast.dora_scale.dtype == lyco.dora_scale.dtype == torch.float32
    assert isinstance(fast.dora_scale, nn.Parameter) and fast.dora_scale.requires_grad
    assert torch.equal(fast.dora_scale, lyco.dora_scale)
    assert (fast.wd, fast.wd_on_out, fast.dora_norm_dims) == (lyco.wd, lyco.wd_on_out, lyco.dora_norm_dims)
    sd_l, sd_f = lyco.state_dict(), fast.state_dict()
    assert list(sd_f) == list(sd_l)
    randomize_(lyco, seed=2)
    fast.load_state_dict(lyco.state_dict())
    assert torch.equal(fast.dora_scale, lyco.dora_scale)
    randomize_(fast, seed=3)
    lyco.load_state_dict(fast.state_dict())
    assert torch.equal(fast.dora_scale, lyco.dora_scale)


@pytest.mark.parametrize("wd_on_out", [True, False], ids=["rows", "columns"])
@pytest.mark.parametrize("algo,kind,kw", [("loha", "conv2d", dict(use_tucker=True)), ("lokr", "linear", {})])
def test_make_module_from_state_dict(algo, kind, kw, wd_on_out):
    """LyCORIS's file with dora_scale → a lyfast module with the same wd_on_out and outputs. (LyCORIS 4.1.3
    cannot rebuild its own column-norm files: it does not infer wd_on_out.)"""
    pair = make_pair(algo, kind, weight_decompose=True, wd_on_out=wd_on_out, **kw)
    with torch.no_grad():  # the rebuilt module holds fp32 parameters before .to(fp64): fp32-exact values
        for p in pair.lyco.parameters():
            p.copy_(p.float())
    sd = {f"lycoris_test.{k}": v.detach() for k, v in pair.lyco.state_dict().items()}
    cls = fast_cls(algo)
    layer = copy.deepcopy(pair.base_layer)
    mod = cls.make_module_from_state_dict("lycoris_test", layer, *cls.extract_state_dict(sd, "lycoris_test"))
    mod.to(pair.dtype)
    assert mod.wd and mod.wd_on_out == wd_on_out
    mod.apply_to()
    ref = run_adapted(pair.lyco_layer, pair.lyco, pair.x, backward=False)
    got = run_adapted(layer, mod, pair.x, backward=False)
    assert_close_rel(got["out"], ref["out"], name="rebuilt from the state dict")


@pytest.mark.parametrize("multiplier", [1.0, 0.6])
@pytest.mark.parametrize("wd_on_out", [True, False], ids=["rows", "columns"])
@pytest.mark.parametrize("algo,kind,kw", [("loha", "conv2d", dict(use_tucker=True, use_scalar=True)),
                                          ("lokr", "linear", {}), ("lokr", "conv2d_groups2", {})])
def test_merge_equals_forward(algo, kind, kw, wd_on_out, multiplier):
    pair = make_pair(algo, kind, multiplier=multiplier, weight_decompose=True, wd_on_out=wd_on_out, **kw)
    ref = run_adapted(pair.lyco_layer, pair.lyco, pair.x, backward=False)["out"]
    merged, _ = pair.fast.get_merged_weight(multiplier)
    layer = copy.deepcopy(pair.base_layer)
    with torch.no_grad():
        layer.weight.copy_(merged.reshape(layer.weight.shape))
    assert_close_rel(layer(pair.x), ref, name="get_merged_weight")
    pair.fast.restore()
    for precise in (False, True):
        layer = copy.deepcopy(pair.base_layer)
        mod = copy.deepcopy(pair.fast)
        mod.org_module = [layer]
        mod.merge_to(multiplier, precise=precise)
        assert_close_rel(layer(pair.x), ref, name=f"merge_to(precise={precise})")


# ------------------------------------------------------------------------------------------------ the norm Function
def _norm_cases():
    torch.manual_seed(0)
    d = dict(dtype=torch.float64)
    lin = LayerSpec("linear", 12, 10)
    conv = LayerSpec("conv2d", 8, 3, (3, 3), (1, 1), (1, 1), (1, 1), groups=2)
    hada_lin = (torch.randn(12, 2, **d), torch.randn(2, 10, **d), torch.randn(12, 3, **d), torch.randn(3, 10, **d))
    hada_conv = (torch.randn(8, 2, **d), torch.randn(2, 27, **d), torch.randn(8, 2, **d), torch.randn(2, 27, **d))
    kron_lin = (torch.randn(3, 2, **d), torch.randn(4, 5, **d))
    kron_conv = (torch.randn(2, 3, **d), torch.randn(4, 1, 3, 3, **d))
    return [("hada-linear", lin, loha.HadaRows, hada_lin, (12, 10)),
            ("hada-conv-groups", conv, loha.HadaRows, hada_conv, (8, 3, 3, 3)),
            ("kron-linear", lin, lokr.KronRows, kron_lin, (12, 10)),
            ("kron-conv", conv, lokr.KronRows, kron_conv, (8, 3, 3, 3))]


@pytest.mark.parametrize("masked", [False, True], ids=["plain", "row_scale"])
@pytest.mark.parametrize("wd_on_out", [True, False], ids=["rows", "columns"])
@pytest.mark.parametrize("case", _norm_cases(), ids=lambda c: c[0])
def test_row_block_norms_gradcheck_and_value(case, wd_on_out, masked):
    _, spec, gen, factors, wshape = case
    weight = torch.randn(*wshape, dtype=torch.float64)
    row_scale = (torch.rand(wshape[0], dtype=torch.float64) > 0.3).double() * 1.5 if masked else None
    factors = [f.clone().requires_grad_(True) for f in factors]

    def fn(*fs):
        return dora.norms_sq(weight, spec, gen, fs, wd_on_out, torch.float64, row_scale)

    # the value: squared norms of the built W0 + diag(row_scale)·ΔW
    full = gen.rows(0, wshape[0], *factors).detach()
    if row_scale is not None:
        full = full * row_scale[:, None]
    ref = dora._norm_sq(weight + full.reshape(wshape), wd_on_out)
    assert_close_rel(fn(*factors), ref, name="norms")
    assert torch.autograd.gradcheck(fn, tuple(factors))


# ------------------------------------------------------------------------------------------------ memory
@pytest.mark.parametrize("wd_on_out", [True, False], ids=["rows", "columns"])
@pytest.mark.parametrize("case", [("loha", dict(lora_dim=4, alpha=2), dict(route="khatri_rao")),
                                  ("loha", dict(lora_dim=16, alpha=2), dict(route="rowblock")),
                                  ("loha", dict(lora_dim=3, alpha=2, use_tucker=True), {}),
                                  ("lokr", dict(lora_dim=4, alpha=2, rank_dropout=0.3), {}),
                                  ("lokr", dict(lora_dim=2, alpha=2, use_tucker=True, use_scalar=True), {})],
                         ids=lambda c: f"{c[0]}-{'-'.join(f'{k}={v}' for k, v in {**c[1], **c[2]}.items())}")
def test_no_weight_sized_tensor(case, wd_on_out):
    from test_no_delta_weight import _check_no_weight_sized, build

    algo, kw, attrs = case
    kinds = ("conv", "conv_groups2") if kw.get("use_tucker") else ("linear", "conv", "conv_groups2")
    for kind in kinds:
        layer, mod, x = build(algo, kind, dict(kw, weight_decompose=True, wd_on_out=wd_on_out), attrs, False)
        mod.train()
        assert x.numel() * 8 <= layer.weight.numel()
        _check_no_weight_sized(layer, mod, x)


@pytest.mark.parametrize("algo", ["loha", "lokr"])
def test_probe_catches_lycoris_dora(algo):
    """Control: LyCORIS's DoRA builds W0 + ΔW, and the probe sees it."""
    from test_no_delta_weight import build, record_fwd_bwd

    layer, mod, x = build(algo, "linear", dict(lora_dim=4, alpha=2, weight_decompose=True), {}, bypass=False,
                          use_lyco=True)
    assert record_fwd_bwd(layer, x).largest()[1] >= layer.weight.numel()


# ------------------------------------------------------------------------------------------------ kohya
DORA_ARGS = {"algo": "lokr", "factor": "4", "conv_dim": "4", "conv_alpha": "1", "use_tucker": "True",
             "dora_wd": "True", "wd_on_output": "False"}


def test_kohya_dora_network_args_like_lycoris(tmp_path):
    """sd-scripts' network_args dora_wd / wd_on_output as strings: the layout and state dict of lycoris.kohya,
    the same output with the same values, and LyCORIS's column-norm DoRA file (which LyCORIS 4.1.3 cannot
    rebuild) loads in lyfast.kohya with that output. (Gradients: the module parity tests above.)"""
    from lyco_models import assert_close, tiny_text_encoder, tiny_unet
    from lyco_models import randomize_ as randomize_by_name_
    from test_kohya import _eval_output, _layout

    runs = {}
    for module in (fkohya, lkohya):
        te, unet = tiny_text_encoder(), tiny_unet()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            net = module.create_network(0.7, 4, 2.0, None, te, unet, preset="attn-mlp", **DORA_ARGS)
        net.apply_to(te, unet, True, True)
        net.to(torch.float64)
        with torch.no_grad():  # same values by name; fp32-exact, as the file's loader builds fp32 modules
            randomize_by_name_(net)
            for p in net.parameters():
                p.copy_(p.float())
        net.eval()
        assert net.loras and all(lo.wd and not lo.wd_on_out for lo in net.loras)
        runs[module.__name__] = (net, _eval_output(te, unet))
    (net_f, out_f), (net_l, out_l) = runs["lyfast.kohya"], runs["lycoris.kohya"]
    assert _layout(net_f) == _layout(net_l)
    sd_f, sd_l = net_f.state_dict(), net_l.state_dict()
    assert list(sd_f) == list(sd_l) and any(k.endswith(".dora_scale") for k in sd_f)
    assert_close(out_f, out_l, 1e-10, "output")

    file = tmp_path / "dora.safetensors"
    net_l.save_weights(str(file), None, None)
    te2, unet2 = tiny_text_encoder(), tiny_unet()
    loaded, _ = fkohya.create_network_from_weights(0.7, str(file), None, te2, unet2, for_inference=True)
    loaded.apply_to(te2, unet2, True, True)
    loaded.to(torch.float64)
    loaded.eval()
    assert_close(_eval_output(te2, unet2), out_l, 1e-10, "LyCORIS DoRA file loaded by lyfast.kohya")

    te3, unet3 = tiny_text_encoder(), tiny_unet()  # load_weights into a fresh DoRA network
    other = fkohya.create_network(0.7, 4, 2.0, None, te3, unet3, preset="attn-mlp", **DORA_ARGS)
    other.apply_to(te3, unet3, True, True)
    other.to(torch.float64)
    assert other.load_weights(str(file)) == {}
    other.eval()
    assert_close(_eval_output(te3, unet3), out_l, 1e-10, "load_weights")


# ------------------------------------------------------------------------------------------------ backends
@pytest.mark.parametrize("algo", ["loha", "lokr"])
def test_fused_backends_route_dora_to_pytorch(algo, monkeypatch):
    """With the Triton backend requested (Triton's CPU interpreter), a DoRA module never reaches a Triton
    kernel (none has a DoRA epilogue): it runs the PyTorch path and keeps LyCORIS's numbers."""
    pytest.importorskip("triton")
    import lyfast
    from lyfast.kernels import loha as kloha
    from lyfast.kernels import lokr as klokr

    def refuse(*args, **kwargs):
        raise AssertionError("a Triton kernel was asked to run a DoRA module")

    for mod, name in ((kloha, "supports"), (kloha, "supports_tile"), (klokr, "supports")):
        monkeypatch.setattr(mod, name, refuse)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    previous = lyfast.set_backend("triton")
    try:
        pair = make_pair(algo, "linear", multiplier=0.6, weight_decompose=True, lora_dim=2, alpha=1.5)
        check_parity(pair)
        pair.fast.wd = False  # control: the same module without DoRA does ask the Triton kernels
        with pytest.raises(AssertionError, match="Triton kernel"):
            run_adapted(pair.fast_layer, pair.fast, pair.x)
    finally:
        lyfast.set_backend(previous)


@pytest.mark.parametrize("wd_on_out", [True, False], ids=["rows", "columns"])
@pytest.mark.parametrize("algo,kind,kw", [("loha", "linear", {}), ("lokr", "conv2d", {}),
                                          ("loha", CLOSED["linear"], {})], ids=["loha", "lokr-conv", "loha-closed"])
def test_autocast_bf16_within_lycoris_error(algo, kind, kw, wd_on_out):
    """fp32 modules under CPU autocast (bf16): output and gradients within 2x LyCORIS's own autocast error
    against LyCORIS in fp64 (the norms are computed in dora_scale's dtype, outside autocast, as LyCORIS's)."""
    from kernel_checks import assert_within_eager

    shape = None
    if isinstance(kind, tuple):
        kind, shape = kind[0](), kind[1]
        kw = dict(lora_dim=2, alpha=1.5)
    pair = make_pair(algo, kind, multiplier=0.8, dtype=torch.float32, input_shape=shape, weight_decompose=True,
                     wd_on_out=wd_on_out, **kw)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = run_adapted(pair.fast_layer, pair.fast, pair.x)
        eager = run_adapted(pair.lyco_layer, pair.lyco, pair.x)
    pair.lyco.double()
    pair.lyco_layer.double()
    ref = run_adapted(pair.lyco_layer, pair.lyco, pair.x.double())
    assert_within_eager("output", got["out"], eager["out"], ref["out"], torch.bfloat16)
    assert_within_eager("x.grad", got["x_grad"], eager["x_grad"], ref["x_grad"], torch.bfloat16)
    for name, g in ref["grads"].items():
        assert_within_eager(f"grad of {name}", got["grads"][name], eager["grads"][name], g, torch.bfloat16)


@pytest.mark.parametrize("wd_on_out", [True, False], ids=["rows", "columns"])
def test_norms_are_computed_outside_autocast(wd_on_out):
    """LyCORIS takes the norm in dora_scale's dtype whatever autocast says; so do both norm routes."""
    spec = LayerSpec("linear", 40, 48)
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(40, 48, generator=g)
    factors = [torch.randn(*s, generator=g) for s in ((40, 2), (2, 48), (40, 2), (2, 48))]
    routes = {"closed": lambda: dora.hada_norms_sq(weight, spec, *factors, wd_on_out, torch.float32),
              "rowblock": lambda: dora.norms_sq(weight, spec, loha.HadaRows, factors, wd_on_out, torch.float32)}
    for name, fn in routes.items():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = fn()
        assert got.dtype == torch.float32 and torch.equal(got, fn()), name
