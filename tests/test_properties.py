"""Property-based tests (hypothesis): random layers, adapter options, inputs and dtypes.

Layers: Linear with and without bias; Conv1d/2d/3d with every nn.Conv option (kernel, stride, dilation,
groups, numeric/'same'/'valid' padding, every padding_mode). Adapters: random options of LoHa, LoKr and
BOFT. Inputs: random shapes including empty batches and unbatched inputs; fp64, fp32, bf16 and fp16.

Properties:
* parity: output, input gradient and every parameter gradient equal lycoris-lora 4.1.3's wherever LyCORIS
  is right (docs/coming_from_lycoris.md lists where it is not, and the test maps those cases onto LyCORIS's
  numbers or skips the comparison);
* merge: `merge_to(m)` then the plain layer equals the adapted forward at multiplier m;
* files: the state dict round-trips, through `load_state_dict` and through the file loader;
* half precision: in bf16/fp16 the output and input gradient are at most 2x as far from the fp64 result as
  LyCORIS's eager computation in the same dtype;
* errors: whatever fails, fails with a ValueError/TypeError (NotImplementedError for DoRA) and a message.

CI budget: examples are derandomized (the same ones every run, no example database) and few enough for
~60 s on 2 cores; `LYFAST_HYPOTHESIS_EXAMPLES=500` explores more locally. Failing examples that hypothesis
found are kept below as explicit tests (`test_found_*`).
"""
from __future__ import annotations

import copy
import math
import os
import warnings

import pytest
import torch
import torch.nn as nn

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, assume, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from conftest import (  # noqa: E402
    TOL,
    assert_close_rel,
    assert_results_match,
    bias_outside_adapter_,
    fast_cls,
    lyco_cls,
    randomize_,
    upstream_grad,
)

EXAMPLES = int(os.environ.get("LYFAST_HYPOTHESIS_EXAMPLES", "0"))
CLEAR_ERRORS = (ValueError, TypeError, NotImplementedError)


def budget(n: int):
    """`n` derandomized examples in CI (no deadline: first calls compile/warm caches), more on request."""
    return settings(max_examples=EXAMPLES or n, deadline=None, derandomize=True, database=None,
                    suppress_health_check=list(HealthCheck), print_blob=True)


# ------------------------------------------------------------------------------------------------ strategies
PADDING_MODES = ("zeros", "reflect", "replicate", "circular")


@st.composite
def layers(draw):
    """(layer constructor kwargs as a dict, input shape) for a random Linear / ConvNd."""
    kind = draw(st.sampled_from(["linear", "conv1d", "conv2d", "conv3d"]))
    bias = draw(st.booleans())
    out = draw(st.sampled_from([8, 12, 16, 24, 32]))
    if kind == "linear":
        fin = draw(st.sampled_from([4, 6, 8, 12, 16]))
        lead = draw(st.sampled_from([(), (0,), (1,), (3,), (2, 3), (2, 0), (0, 4)]))
        return dict(kind=kind, in_features=fin, out_features=out, bias=bias), (*lead, fin)
    nd = int(kind[4])
    groups = draw(st.sampled_from([1, 1, 2, 4]))
    assume(out % groups == 0)
    fin = groups * draw(st.sampled_from([1, 2, 3, 4]))
    k = tuple(draw(st.lists(st.integers(1, 3), min_size=nd, max_size=nd)))
    stride = tuple(draw(st.lists(st.integers(1, 2), min_size=nd, max_size=nd)))
    dilation = tuple(draw(st.lists(st.integers(1, 2), min_size=nd, max_size=nd)))
    padding = draw(st.one_of(st.sampled_from(["same", "valid"]), st.integers(0, 2),
                             st.lists(st.integers(0, 2), min_size=nd, max_size=nd).map(tuple)))
    if padding == "same":
        stride = (1,) * nd  # PyTorch allows 'same' with stride 1 only
    # zeros 3 times in 6: LyCORIS is compared only there (it pads ΔW·x with zeros whatever the mode)
    mode = draw(st.sampled_from(("zeros", "zeros", *PADDING_MODES)))
    spatial = tuple(draw(st.lists(st.integers(1, 6 if nd < 3 else 4), min_size=nd, max_size=nd)))
    batch = draw(st.sampled_from([None, 0, 1, 2]))  # None: unbatched (C, *spatial)
    shape = (fin, *spatial) if batch is None else (batch, fin, *spatial)
    cfg = dict(kind=kind, in_channels=fin, out_channels=out, kernel_size=k, stride=stride, padding=padding,
               dilation=dilation, groups=groups, bias=bias, padding_mode=mode)
    return cfg, shape


def build_layer(cfg, dtype, seed=0):
    cfg = dict(cfg)
    kind = cfg.pop("kind")
    torch.manual_seed(seed)
    if kind == "linear":
        layer = nn.Linear(**cfg)
    else:
        layer = {"conv1d": nn.Conv1d, "conv2d": nn.Conv2d, "conv3d": nn.Conv3d}[kind](**cfg)
    layer = layer.to(dtype).requires_grad_(False)
    if layer.bias is not None:
        with torch.no_grad():
            layer.bias.normal_(0, 0.5)
    return layer


ALGO_OPTIONS = {
    "loha": lambda: st.fixed_dictionaries(dict(
        lora_dim=st.integers(1, 6), alpha=st.sampled_from([0, 1, 2.5]), use_tucker=st.booleans(),
        use_scalar=st.booleans(), rs_lora=st.booleans(), bypass_mode=st.booleans(),
        weight_decompose=st.booleans(), wd_on_out=st.booleans())),
    "lokr": lambda: st.fixed_dictionaries(dict(
        lora_dim=st.integers(1, 8), alpha=st.sampled_from([0, 1, 2.5]), use_tucker=st.booleans(),
        use_scalar=st.booleans(), rs_lora=st.booleans(), bypass_mode=st.booleans(),
        factor=st.sampled_from([-1, 2, 4, 8]), decompose_both=st.booleans(), full_matrix=st.booleans(),
        unbalanced_factorization=st.booleans(), weight_decompose=st.booleans(), wd_on_out=st.booleans())),
    "boft": lambda: st.fixed_dictionaries(dict(
        lora_dim=st.sampled_from([2, 4, 6, 8, -1]), alpha=st.just(1), constraint=st.sampled_from([0, 0.01]),
        rescaled=st.booleans(), bypass_mode=st.booleans())),
}


@st.composite
def cases(draw, dtypes=(torch.float64, torch.float32)):
    algo = draw(st.sampled_from(sorted(ALGO_OPTIONS)))
    layer, shape = draw(layers())
    opts = draw(ALGO_OPTIONS[algo]())
    multiplier = draw(st.sampled_from([1.0, 0.5, 0.0]))
    dtype = draw(st.sampled_from(dtypes))
    return algo, layer, shape, opts, multiplier, dtype


# ------------------------------------------------------------------------------------------------ helpers
def make_fast(algo, layer, opts, multiplier=1.0):
    """The lyfast module, or pytest.skip-free rejection of the example when it (rightly) raises a clear error."""
    opts = dict(opts)
    pos = [multiplier, opts.pop("lora_dim"), opts.pop("alpha"), 0.0, 0.0, 0.0, opts.pop("use_tucker", False)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fast_cls(algo)("lycoris_p", layer, *pos, **opts)


def checked(fn, *args, **kwargs):
    """fn(...) or None when it raised one of the clear, typed errors with a message; anything else fails."""
    try:
        return fn(*args, **kwargs)
    except CLEAR_ERRORS as exc:
        assert str(exc).strip(), f"{type(exc).__name__} without a message"
        return None


def base_output(layer, shape, dtype):
    """A random input of `shape` and the frozen layer's output, or None if the layer itself rejects it."""
    x = torch.randn(shape, dtype=dtype, generator=torch.Generator().manual_seed(5))
    try:
        return x, layer(x)
    except RuntimeError:
        return None


def run(layer, module, x, g=None):
    x = x.detach().clone().requires_grad_(True)
    module.zero_grad(set_to_none=True)
    out = layer(x)
    g = upstream_grad(out) if g is None else g
    out.backward(g)
    grads = {n: (p.grad.detach() if p.grad is not None else torch.zeros_like(p)) for n, p in module.named_parameters()}
    return {"out": out.detach(), "x_grad": x.grad.detach(), "grads": grads}


def lycoris_is_right(algo, layer, fast, multiplier):
    """False where lyfast deliberately differs from LyCORIS 4.1.3 (docs/coming_from_lycoris.md)."""
    if getattr(layer, "padding_mode", "zeros") != "zeros":
        return False  # LyCORIS convolves ΔW with zero padding whatever the layer's padding_mode
    if algo == "lokr" and fast.bypass_mode and fast.spec.groups > 1:
        return False  # LyCORIS's LoKr conv bypass applies the layer's groups to its own regrouped input
    if algo == "lokr" and fast.use_w1 and fast.use_w2 and fast.rs_lora:
        return False  # LyCORIS trains full-matrix rs_lora with √r and reloads with 1
    if algo == "boft" and fast.rescaled and multiplier != 1:
        return False  # mapped onto LyCORIS by parity() instead
    return True


# ------------------------------------------------------------------------------------------------ properties
def lycoris_pair(algo, layer_cfg, shape, opts, multiplier, dtype):
    """(layer, lyfast layer + module, LyCORIS layer + module, input, LyCORIS's run, rescale grad_scale): the two
    adapters on copies of one layer, holding the same random parameters, applied; LyCORIS mapped onto what
    lyfast deliberately computes (BOFT: bias outside the adapter, rescale interpolated). Rejects examples
    where lyfast raises a clear error or LyCORIS cannot build or run them, or is wrong (lycoris_is_right)."""
    layer = build_layer(layer_cfg, dtype)
    fast_layer, lyco_layer = copy.deepcopy(layer), copy.deepcopy(layer)
    fast = checked(make_fast, algo, fast_layer, opts, multiplier)
    assume(fast is not None)
    if algo == "boft":  # LyCORIS's bypass rotates the bias; lyfast's does not (docs/coming_from_lycoris.md)
        bias_outside_adapter_(lyco_layer)
    o = dict(opts)
    pos = [multiplier, o.pop("lora_dim"), o.pop("alpha"), 0.0, 0.0, 0.0, o.pop("use_tucker", False)]
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            lyco = lyco_cls(algo)("lycoris_p", lyco_layer, *pos, **o)
    except Exception:
        assume(False)  # LyCORIS cannot build it: nothing to compare with
    fast.to(dtype), lyco.to(dtype)
    randomize_(lyco, seed=11)
    fast.load_state_dict(lyco.state_dict())
    with torch.no_grad():
        for n, p in fast.named_parameters():
            p.copy_(dict(lyco.named_parameters())[n])
    grad_scale = {}
    if algo == "boft" and fast.rescaled and multiplier != 1:
        with torch.no_grad():
            lyco.rescale.copy_(1 + (fast.rescale - 1) * multiplier)
        grad_scale = {"rescale": multiplier}
    assume(lycoris_is_right(algo, layer, fast, 1.0))
    xb = base_output(layer, shape, dtype)
    assume(xb is not None)
    x, base = xb
    fast.apply_to(), lyco.apply_to()
    try:
        ref = run(lyco_layer, lyco, x)
    except Exception:
        assume(False)  # LyCORIS fails on this input (e.g. unbatched BOFT bypass); lyfast is checked by merge
    assume(ref["out"].shape == base.shape)  # LyCORIS's BOFT bypass returns (1, out) for a 1-D Linear input
    return (fast_layer, fast), (lyco_layer, lyco), x, ref, grad_scale


def parity(algo, layer_cfg, shape, opts, multiplier, dtype):
    if algo == "boft":
        dtype = torch.float32  # LyCORIS's BOFT cannot run in fp64
    (fast_layer, fast), _, x, ref, grad_scale = lycoris_pair(algo, layer_cfg, shape, opts, multiplier, dtype)
    mine = run(fast_layer, fast, x, upstream_grad(ref["out"]))
    if ref["out"].numel() == 0:
        assert mine["out"].shape == ref["out"].shape
        for n, g in mine["grads"].items():
            assert torch.count_nonzero(g) == 0, n
        return
    assert_results_match(mine, ref, dtype, what=f"{algo} {layer_cfg} {opts} x{multiplier}", grad_scale=grad_scale)


def half_precision_error_within_eager(algo, layer_cfg, shape, opts, multiplier, dtype):
    """In bf16/fp16, lyfast's output and input gradient are at most 2x as far from the fp64 result as LyCORIS's
    eager computation in the same dtype (+ one rounding of the output's scale)."""
    ref_dtype = torch.float32 if algo == "boft" else torch.float64  # LyCORIS's BOFT cannot run in fp64
    fast_pair, lyco_pair, x, ref, _ = lycoris_pair(algo, layer_cfg, shape, opts, multiplier, ref_dtype)
    assume(ref["out"].numel() > 0)
    g = upstream_grad(ref["out"])
    results = {}
    for name, (layer_, module) in (("lyco", lyco_pair), ("fast", fast_pair)):
        layer_.to(dtype), module.to(dtype)
        try:
            results[name] = run(layer_, module, x.to(dtype), g.to(dtype))
        except Exception:
            if name == "lyco":
                    assume(False)  # LyCORIS cannot run this in half precision
            raise
    eps = torch.finfo(dtype).eps
    for key in ("out", "x_grad"):
        want = ref[key].double()
        scale = want.abs().max().item()
        eager = (results["lyco"][key].double() - want).abs().max().item()
        mine = (results["fast"][key].double() - want).abs().max().item()
        assert results["fast"][key].dtype == dtype, key
        assert mine <= 2 * eager + eps * scale, (
            f"{key}: lyfast {dtype} error {mine:.3g} > 2 x eager {eager:.3g} + eps*{scale:.3g}")


def adapted_output(algo, layer_cfg, shape, opts, multiplier, dtype, seed):
    """(layer, randomized lyfast module (restored), input, adapted output); rejects examples that fail clearly."""
    layer = build_layer(layer_cfg, dtype)
    fast = checked(make_fast, algo, layer, opts, multiplier)
    assume(fast is not None)
    fast.to(dtype)
    randomize_(fast, seed=seed)
    xb = base_output(layer, shape, dtype)
    assume(xb is not None)
    x, _ = xb
    fast.apply_to()
    fast.eval()
    adapted = layer(x)
    fast.restore()
    return layer, fast, x, adapted


def merge_equals_forward(algo, layer_cfg, shape, opts, multiplier, dtype):
    # a property of lyfast alone: fp64 for every algorithm
    layer, fast, x, adapted = adapted_output(algo, layer_cfg, shape, opts, multiplier, torch.float64, 3)
    assume(not (getattr(fast, "wd", False) and fast.bypass_mode))  # DoRA's bypass forward ignores DoRA (LyCORIS; warned)
    if algo == "boft" and fast.bypass_mode and fast.spec.groups > 1:
        with pytest.warns(UserWarning, match="grouped conv"):  # not mergeable: said so, not merged silently
            fast.merge_to(multiplier)
        return
    fast.merge_to(multiplier)
    merged = layer(x)
    assert merged.shape == adapted.shape
    if adapted.numel():
        assert_close_rel(merged, adapted, rtol=0, atol_rel=1e-9, name=f"merged {algo} {layer_cfg} {opts}")


def state_dict_round_trips(algo, layer_cfg, shape, opts, multiplier, dtype):
    # fp32: the file loader builds fp32 modules, as LyCORIS's does
    layer, fast, x, expected = adapted_output(algo, layer_cfg, shape, opts, multiplier, torch.float32, 4)
    sd = {k: v.detach().clone() for k, v in fast.state_dict().items()}

    twin = make_fast(algo, layer, opts, multiplier)
    twin.load_state_dict(sd)
    twin.apply_to()
    twin.eval()
    assert_same_fp32(layer(x), expected)
    twin.restore()

    cls = fast_cls(algo)
    pre = {f"lycoris_p.{k}": v for k, v in sd.items()}
    loaded = checked(cls.make_module_from_state_dict, "lycoris_p", layer, *cls.extract_state_dict(pre, "lycoris_p"))
    if loaded is None:
        return  # a layout the file cannot express is refused with a clear error
    loaded.multiplier = multiplier
    loaded.bypass_mode = fast.bypass_mode
    loaded.apply_to()
    loaded.eval()
    assert_same_fp32(layer(x), expected)


def assert_same_fp32(actual, expected):
    """fp32 results of the same layer computed again: 1e-5 relative to the output's scale."""
    scale = expected.abs().max().item() if expected.numel() else 0.0
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5 * max(1.0, scale))


# Each property runs on `budget(n)` examples; measured CI time in the module docstring's terms.
@budget(45)
@given(cases())
def test_parity_with_lycoris(case):
    parity(*case)


@budget(45)
@given(cases())
def test_merge_to_equals_adapted_forward(case):
    merge_equals_forward(*case)


@budget(35)
@given(cases())
def test_state_dict_round_trips(case):
    state_dict_round_trips(*case)


@budget(25)
@given(cases(dtypes=(torch.bfloat16, torch.float16)))
def test_half_precision_error_within_eager(case):
    half_precision_error_within_eager(*case)


# ------------------------------------------------------------------------------------------------ found by hypothesis
# Failing examples the properties found, kept as explicit tests (each failed before its fix).
REFLECT_CONV1D = dict(kind="conv1d", in_channels=1, out_channels=8, kernel_size=(1,), stride=(1,), padding=1,
                      dilation=(1,), groups=1, bias=False, padding_mode="reflect")
OPTS = {"loha": dict(lora_dim=1, alpha=0, use_tucker=False, use_scalar=False, rs_lora=False, bypass_mode=False),
        "lokr": dict(lora_dim=1, alpha=1, use_tucker=False, use_scalar=False, rs_lora=False, bypass_mode=False,
                     factor=-1, decompose_both=False, full_matrix=False, unbalanced_factorization=False),
        "boft": dict(lora_dim=2, alpha=1, constraint=0, rescaled=True, bypass_mode=False)}


@pytest.mark.parametrize("algo", sorted(OPTS))
@pytest.mark.parametrize("mode", ["reflect", "replicate", "circular"])
@pytest.mark.parametrize("groups", [1, 2])
def test_found_padding_mode_merge_equals_forward(algo, mode, groups):
    """Found: with padding_mode reflect/replicate/circular, ΔW·x was convolved with zero padding (as LyCORIS
    does), so the merged layer differed from the adapted one (LoHa 1e-2 relative on the example below). ΔW·x is
    now padded as the layer pads x."""
    cfg = dict(REFLECT_CONV1D, padding_mode=mode, in_channels=2 * groups, groups=groups)
    merge_equals_forward(algo, cfg, (2, 2 * groups, 3), OPTS[algo], 1.0, torch.float64)
    merge_equals_forward(algo, cfg, (2 * groups, 3), OPTS[algo], 0.5, torch.float64)  # unbatched too


@pytest.mark.parametrize("algo", sorted(OPTS))
@pytest.mark.parametrize("kernel,dilation", [((2, 3), (1, 1)), ((4, 1), (1, 2))])
def test_found_same_padding_with_even_kernel_matches_lycoris(algo, kernel, dilation):
    """Found: padding='same' with an even effective kernel (asymmetric padding) raised ValueError; LyCORIS
    handles it. The adapter now pads its input as the layer does."""
    cfg = dict(kind="conv2d", in_channels=4, out_channels=8, kernel_size=kernel, stride=(1, 1), padding="same",
               dilation=dilation, groups=1, bias=True, padding_mode="zeros")
    parity(algo, cfg, (2, 4, 5, 5), OPTS[algo], 1.0, torch.float64)
    merge_equals_forward(algo, cfg, (2, 4, 5, 5), OPTS[algo], 1.0, torch.float64)


@pytest.mark.parametrize("rescaled", [False, True])
@pytest.mark.parametrize("cfg,shape", [
    (dict(kind="conv2d", in_channels=1, out_channels=8, kernel_size=(1, 1), stride=(1, 1), padding="same",
          dilation=(1, 1), groups=1, bias=True, padding_mode="zeros"), (1, 1, 1)),
    (dict(kind="linear", in_features=4, out_features=8, bias=True), (3, 4)),
], ids=["found", "linear"])
def test_found_boft_bypass_keeps_bias_unrotated(cfg, shape, rescaled):
    """Found: BOFT bypass mode rotated the layer's bias with W·x (as LyCORIS does), so the bypass-trained model
    was not its merged (or reloaded, rebuild-mode) model: 48% relative off on the example hypothesis found."""
    opts = dict(OPTS["boft"], rescaled=rescaled, bypass_mode=True)
    merge_equals_forward("boft", cfg, shape, opts, 1.0, torch.float64)
    merge_equals_forward("boft", cfg, shape, opts, 0.5, torch.float64)
    batched = shape if cfg["kind"] == "linear" else (2, *shape)  # LyCORIS's BOFT bypass needs a batch dim
    parity("boft", cfg, batched, opts, 1.0, torch.float32)  # = LyCORIS with the bias added outside the adapter


def test_found_boft_bypass_on_grouped_conv_warns_on_merge():
    """Found: BOFT bypass on a grouped conv rotates outputs across groups, which no grouped weight holds, so
    merge_to silently merged a different model (rebuild mode; LyCORIS does the same). It now warns."""
    cfg = dict(kind="conv2d", in_channels=4, out_channels=8, kernel_size=(3, 3), stride=(1, 1), padding=1,
               dilation=(1, 1), groups=2, bias=True, padding_mode="zeros")
    layer, fast, x, adapted = adapted_output("boft", cfg, (2, 4, 3, 3), dict(OPTS["boft"], bypass_mode=True),
                                             1.0, torch.float64, 3)
    with pytest.warns(UserWarning, match="grouped conv"):
        fast.merge_to(1.0)


@pytest.mark.parametrize("kernel", [1, 3])
def test_found_lokr_bypass_on_grouped_conv_equals_rebuild(kernel):
    """Found (by the bf16 property, whose LyCORIS reference was off): LyCORIS 4.1.3's LoKr bypass on a grouped
    conv is not ΔW·x (it differs from its own rebuild mode by 0.36 / 1.6 absolute here). lyfast's bypass equals
    its rebuild mode, which equals LyCORIS's rebuild mode."""
    cfg = dict(kind="conv2d", in_channels=4, out_channels=8, kernel_size=(kernel, kernel), stride=(1, 1),
               padding=kernel // 2, dilation=(1, 1), groups=2, bias=True, padding_mode="zeros")
    opts = dict(OPTS["lokr"], lora_dim=2, factor=2)
    outs = {}
    for bypass in (False, True):
        _, _, x, outs[bypass] = adapted_output("lokr", cfg, (2, 4, 5, 5), dict(opts, bypass_mode=bypass), 1.0,
                                               torch.float64, 3)
    torch.testing.assert_close(outs[True], outs[False], rtol=1e-12, atol=1e-12)
    parity("lokr", cfg, (2, 4, 5, 5), opts, 1.0, torch.float64)  # rebuild mode: LyCORIS is right there
