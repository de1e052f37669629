"""apply_to / restore stacking, merge_to, get_diff_weight / get_merged_weight and apply_max_norm.

LyCORIS 4.1.3's LoHa/LoKr get_diff_weight / get_merged_weight / merge_to apply alpha/r twice (a known bug);
lyfast applies it once, so merges are checked against LyCORIS's *forward* (merged plain layer == adapted
forward), never against lycoris.merge_to.
"""

import copy

import pytest
import torch

from conftest import (
    assert_close_rel,
    assert_results_match,
    copy_params_by_name_,
    fast_cls,
    layer_op,
    lyco_cls,
    make_input,
    make_layer,
    make_pair,
    match_lyco_rescale_,
    randomize_,
    run_adapted,
)

MERGE_CASES = [
    ("loha", "linear", dict(lora_dim=4, alpha=2)),
    ("loha", "conv2d", dict(lora_dim=4, alpha=1)),
    ("loha", "conv2d_groups2", dict(lora_dim=3, alpha=2, use_tucker=True)),
    ("loha", "conv1d_strided", dict(lora_dim=2, alpha=8, use_scalar=True)),
    ("loha", "conv3d", dict(lora_dim=4, alpha=2, rs_lora=True)),
    ("lokr", "linear", dict(lora_dim=2, alpha=1)),
    ("lokr", "linear", dict(lora_dim=1, alpha=3, decompose_both=True, factor=4, use_scalar=True)),
    ("lokr", "conv2d", dict(lora_dim=1, alpha=0.5, use_tucker=True)),
    ("lokr", "conv2d_groups2", dict(lora_dim=1, alpha=2)),
    ("lokr", "conv1d", dict(lora_dim=8, alpha=3)),  # both full: scale 1
    ("boft", "linear", dict(lora_dim=4)),
    ("boft", "conv2d", dict(lora_dim=8, rescaled=True, constraint=0.02)),
    ("boft", "conv2d_groups2", dict(lora_dim=2, rescaled=True)),
    ("boft", "conv3d", dict(lora_dim=4)),
]
MERGE_IDS = [f"{a}-{l}-" + "-".join(f"{k}={v}" for k, v in kw.items()) for a, l, kw in MERGE_CASES]


def _lyco_rebuild_out(pair, multiplier):
    match_lyco_rescale_(pair, multiplier)
    pair.lyco.bypass_mode = False
    return run_adapted(pair.lyco_layer, pair.lyco, pair.x, backward=False)["out"]


@pytest.mark.parametrize("precise", [False, True], ids=["plain", "precise"])
@pytest.mark.parametrize("multiplier", [1.0, 0.6])
@pytest.mark.parametrize("algo,layer,kw", MERGE_CASES, ids=MERGE_IDS)
def test_merge_to_equals_adapted_forward(algo, layer, kw, multiplier, precise):
    pair = make_pair(algo, layer, multiplier=1.0, apply=False, **kw)
    pair.lyco.apply_to()
    expected = _lyco_rebuild_out(pair, multiplier)
    # lyfast module not applied: merge it into its layer, then run the *plain* layer
    pair.fast.merge_to(multiplier, precise=precise)
    assert pair.fast_layer.weight.dtype == pair.dtype
    got = run_adapted(pair.fast_layer, None, pair.x, backward=False)["out"]
    assert_close_rel(got, expected, dtype=pair.dtype, name=f"merged layer (x{multiplier})")
    # the bias is untouched by all three algorithms
    if pair.base_layer.bias is not None:
        assert torch.equal(pair.fast_layer.bias, pair.base_layer.bias)


@pytest.mark.parametrize("algo,layer,kw", [c for c in MERGE_CASES if c[0] != "boft"][:4], ids=MERGE_IDS[:4])
def test_lycoris_merge_has_double_scale(algo, layer, kw):
    """Guard for the comparison above: LyCORIS's own merge_to disagrees with its forward when alpha != r."""
    pair = make_pair(algo, layer, apply=False, **kw)
    if pair.lyco.scale == 1:
        pytest.skip("scale 1: LyCORIS's merge is right")
    pair.lyco.apply_to()
    expected = _lyco_rebuild_out(pair, 1.0)
    pair.lyco.restore()
    pair.lyco.merge_to(1.0)
    merged = run_adapted(pair.lyco_layer, None, pair.x, backward=False)["out"]
    assert (merged - expected).abs().max() > 1e-6


@pytest.mark.parametrize("multiplier", [1.0, 0.35])
@pytest.mark.parametrize("algo,layer,kw", MERGE_CASES, ids=MERGE_IDS)
def test_diff_and_merged_weight_consistent_with_forward(algo, layer, kw, multiplier):
    pair = make_pair(algo, layer, apply=False, **kw)
    pair.lyco.apply_to()
    expected = _lyco_rebuild_out(pair, multiplier)
    w, b = pair.base_layer.weight, pair.base_layer.bias
    op = layer_op(pair.base_layer)
    with torch.no_grad():
        diff, diff_bias = pair.fast.get_diff_weight(multiplier=multiplier, shape=w.shape)
        merged, merged_bias = pair.fast.get_merged_weight(multiplier=multiplier, shape=w.shape)
    assert diff_bias is None and merged_bias is None
    assert tuple(diff.shape) == tuple(w.shape) and tuple(merged.shape) == tuple(w.shape)
    x = pair.x.detach()
    assert_close_rel(op(x, w + diff.to(w.dtype), b), expected, dtype=pair.dtype, name="op(x, W + diff)")
    assert_close_rel(op(x, merged.to(w.dtype), b), expected, dtype=pair.dtype, name="op(x, merged)")
    if algo == "boft":  # LyCORIS's BOFT diff/merged weights are right (no double scale): compare directly
        with torch.no_grad():
            ldiff = pair.lyco.get_diff_weight(multiplier=multiplier, shape=w.shape)[0]
        # Both compute diff = rotated − W: its rounding is relative to W, not to the (smaller) diff, so the
        # diffs are compared as merged weights (fp32: 1 element of 6,912 was 3.7e-8 off a 1.6e-2 diff once
        # stage pairs changed the rounding order; the weights themselves agree within 1e-7 of max|W|).
        assert_close_rel(w + diff.to(w.dtype), w + ldiff.to(w.dtype), dtype=pair.dtype,
                         name="BOFT get_diff_weight vs LyCORIS (as W + diff)")
    elif not kw.get("use_scalar"):
        # LyCORIS's get_diff_weight is lyfast's times alpha/r once more (its double-scale bug)
        with torch.no_grad():
            ldiff = pair.lyco.get_diff_weight(multiplier=multiplier, shape=w.shape)[0]
        assert_close_rel(diff * pair.lyco.scale, ldiff, dtype=pair.dtype, name="LyCORIS diff = lyfast diff * scale")


def test_get_diff_weight_default_shape_is_layer_shape():
    pair = make_pair("loha", "conv2d", apply=False)
    diff, _ = pair.fast.get_diff_weight()
    assert diff.numel() == pair.base_layer.weight.numel()


def test_onfly_merge_and_restore():
    pair = make_pair("lokr", "conv2d", apply=False, lora_dim=2, alpha=3)
    pair.lyco.apply_to()
    expected = _lyco_rebuild_out(pair, 0.5)
    w0 = pair.fast_layer.weight.detach().clone()
    pair.fast.onfly_merge(0.5)
    assert_close_rel(run_adapted(pair.fast_layer, None, pair.x, backward=False)["out"], expected, name="onfly")
    pair.fast.onfly_restore()
    assert torch.equal(pair.fast_layer.weight, w0)


# ---------------------------------------------------------------------------------------------- stacking
STACKS = [
    (("loha", dict(lora_dim=4, alpha=2)), ("lokr", dict(lora_dim=2, alpha=1)), torch.float64),
    (("lokr", dict(lora_dim=2, alpha=1, bypass_mode=True)), ("loha", dict(lora_dim=2, alpha=1)), torch.float64),
    (("loha", dict(lora_dim=4, alpha=2, bypass_mode=True)), ("boft", dict(lora_dim=4)), torch.float32),
    (("boft", dict(lora_dim=8, rescaled=True)), ("lokr", dict(lora_dim=2, alpha=1)), torch.float32),
    (("loha", dict(lora_dim=4, alpha=2)), ("loha", dict(lora_dim=2, alpha=2, bypass_mode=True)), torch.float64),
]


def _build_stack(spec, layer_kind, dtype):
    base = make_layer(layer_kind, dtype=dtype)
    x = make_input(layer_kind, dtype=dtype)
    fl, ll = copy.deepcopy(base), copy.deepcopy(base)
    fast_mods, lyco_mods = [], []
    for i, (algo, kw) in enumerate(spec):
        kw = dict(kw)
        lyco = lyco_cls(algo)(f"a{i}", ll, 1.0, **kw).to(dtype)
        fast = fast_cls(algo)(f"a{i}", fl, 1.0, **kw).to(dtype)
        randomize_(lyco, seed=10 + i)
        fast.load_state_dict(lyco.state_dict())
        copy_params_by_name_(fast, lyco)
        lyco_mods.append(lyco)
        fast_mods.append(fast)
    return base, x, fl, ll, fast_mods, lyco_mods


def _stack_results(layer, mods, x):
    res = run_adapted(layer, None, x)
    res["grads"] = {
        f"{i}.{n}": p.grad.detach().clone() for i, m in enumerate(mods) for n, p in m.named_parameters()
    }
    for m in mods:
        m.zero_grad(set_to_none=True)
    return res


@pytest.mark.parametrize("restore_first", [0, 1], ids=["restore-lower", "restore-upper"])
@pytest.mark.parametrize("layer_kind", ["linear", "conv2d"])
@pytest.mark.parametrize("spec", STACKS, ids=lambda s: "+".join(a for a, _ in s[:2]) if isinstance(s, tuple) else None)
def test_stack_two_adapters_and_restore(spec, layer_kind, restore_first):
    *mods_spec, dtype = spec
    base, x, fl, ll, fast_mods, lyco_mods = _build_stack(mods_spec, layer_kind, dtype)
    for m in fast_mods + lyco_mods:
        m.apply_to()
    assert_results_match(_stack_results(fl, fast_mods, x), _stack_results(ll, lyco_mods, x), dtype, what="both")
    # restore one: only the other stays, in either order
    fast_mods[restore_first].restore()
    lyco_mods[restore_first].restore()
    keep = 1 - restore_first
    fr = _stack_results(fl, [fast_mods[keep]], x)
    lr = _stack_results(ll, [lyco_mods[keep]], x)
    assert_results_match(fr, lr, dtype, what="after restoring one")
    # the remaining adapter alone (fresh layer) gives the same as the survivor of the stack
    fresh = copy.deepcopy(base)
    solo = fast_cls(mods_spec[keep][0])("solo", fresh, 1.0, **mods_spec[keep][1]).to(dtype)
    copy_params_by_name_(solo, fast_mods[keep])
    solo.apply_to()
    assert_close_rel(run_adapted(fresh, None, x, backward=False)["out"], fr["out"], dtype=dtype, name="survivor")
    # restore the other: the plain layer again
    fast_mods[keep].restore()
    assert torch.equal(
        run_adapted(fl, None, x, backward=False)["out"], run_adapted(base, None, x, backward=False)["out"]
    )
    assert "_lycoris_wrappers" not in fl.__dict__
    # and applying again works: the lower adapter alone, as in LyCORIS
    lyco_mods[keep].restore()
    fast_mods[0].apply_to()
    lyco_mods[0].apply_to()
    assert_results_match(
        _stack_results(fl, [fast_mods[0]], x), _stack_results(ll, [lyco_mods[0]], x), dtype, what="re-applied"
    )


def test_restore_without_apply_is_harmless():
    # (apply_to twice on the same module recurses forever in LyCORIS 4.1.3 too: not tested)
    pair = make_pair("loha", "linear", apply=False)
    pair.fast.restore()
    assert torch.equal(
        run_adapted(pair.fast_layer, None, pair.x, backward=False)["out"],
        run_adapted(pair.base_layer, None, pair.x, backward=False)["out"],
    )
    pair.apply()
    assert_results_match(
        run_adapted(pair.fast_layer, pair.fast, pair.x), run_adapted(pair.lyco_layer, pair.lyco, pair.x), pair.dtype
    )


# ---------------------------------------------------------------------------------------------- max norm
MAXNORM_CASES = [
    ("loha", "linear", dict(lora_dim=4, alpha=4)),
    ("loha", "conv2d", dict(lora_dim=3, alpha=3, use_tucker=True)),
    ("loha", "conv2d", dict(lora_dim=4, alpha=4, use_scalar=True)),
    ("loha", "linear", dict(lora_dim=4, alpha=2)),  # alpha != r: LyCORIS's max-norm uses the single scale
    ("lokr", "linear", dict(lora_dim=2, alpha=2)),
    ("lokr", "conv2d", dict(lora_dim=1, alpha=1, use_tucker=True)),
    ("lokr", "linear", dict(lora_dim=1, alpha=1, decompose_both=True, factor=4)),
    ("lokr", "linear", dict(lora_dim=8)),  # both full
    ("lokr", "conv2d", dict(lora_dim=2, alpha=0.5)),
    ("boft", "linear", dict(lora_dim=4)),
    ("boft", "conv2d", dict(lora_dim=8, rescaled=True)),
]
MAXNORM_IDS = [f"{a}-{l}-" + "-".join(f"{k}={v}" for k, v in kw.items()) for a, l, kw in MAXNORM_CASES]


@pytest.mark.parametrize("ratio", [0.3, 0.75, 3.0])
@pytest.mark.parametrize("algo,layer,kw", MAXNORM_CASES, ids=MAXNORM_IDS)
def test_apply_max_norm(algo, layer, kw, ratio):
    pair = make_pair(algo, layer, **kw)
    _, norm0 = copy.deepcopy(pair.lyco).apply_max_norm(1e30)
    max_norm = float(norm0) * ratio
    ls, ln = pair.lyco.apply_max_norm(max_norm, torch.device("cpu"))
    fs, fn = pair.fast.apply_max_norm(max_norm, torch.device("cpu"))
    assert bool(fs) == bool(ls) == (ratio < 1)
    assert float(fn) == pytest.approx(float(ln), rel=1e-9 if pair.dtype == torch.float64 else 1e-5)
    assert_results_match(
        run_adapted(pair.fast_layer, pair.fast, pair.x),
        run_adapted(pair.lyco_layer, pair.lyco, pair.x),
        pair.dtype,
        what="after apply_max_norm",
    )
