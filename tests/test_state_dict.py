"""State-dict interchange with lycoris-lora 4.1.3, in both directions, and loading through
``make_module_from_state_dict`` (the path create_lycoris_from_weights / kohya use)."""

import copy

import pytest
import torch
import torch.nn as nn

from conftest import (
    assert_close_rel,
    assert_results_match,
    copy_params_by_name_,
    fast_cls,
    lyco_cls,
    make_input,
    make_layer,
    make_pair,
    randomize_,
    run_adapted,
)

NAME = "lycoris_unet_block_0_proj"

# (algo, layer, kwargs) covering every key layout LyCORIS writes for the three algorithms
CONFIGS = [
    ("loha", "linear", dict(lora_dim=4, alpha=2)),
    ("loha", "conv2d", dict(lora_dim=4, alpha=2)),
    ("loha", "conv2d", dict(lora_dim=3, alpha=1, use_tucker=True)),
    ("loha", "conv3d", dict(lora_dim=2, alpha=1, use_tucker=True)),
    ("loha", "conv1d", dict(lora_dim=4, alpha=8, use_scalar=True)),
    ("loha", "linear", dict(lora_dim=9, alpha=2, rs_lora=True)),
    ("loha", "conv2d_1x1", dict(lora_dim=4, alpha=0, use_tucker=True)),
    ("lokr", "linear", dict(lora_dim=2, alpha=1)),
    ("lokr", "linear", dict(lora_dim=1, alpha=1, decompose_both=True, factor=4)),
    ("lokr", "linear", dict(lora_dim=8)),  # both full
    ("lokr", "linear", dict(lora_dim=2, full_matrix=True)),
    ("lokr", "linear", dict(lora_dim=2, alpha=3, use_scalar=True, rs_lora=True)),
    ("lokr", "conv2d", dict(lora_dim=1, alpha=1)),  # flattened w2_b
    ("lokr", "conv2d", dict(lora_dim=1, alpha=1, factor=8, decompose_both=True)),
    ("lokr", "conv1d", dict(lora_dim=2, alpha=1, use_scalar=True)),
    ("lokr", "conv3d", dict(lora_dim=2, full_matrix=True)),
    ("lokr", "linear", dict(lora_dim=1, alpha=1, unbalanced_factorization=True, factor=4)),
    ("lokr", "conv2d", dict(lora_dim=1, alpha=1, use_tucker=True)),
    ("boft", "linear", dict(lora_dim=4)),
    ("boft", "linear", dict(lora_dim=8, constraint=1e-3, rescaled=True)),
    ("boft", "conv2d", dict(lora_dim=2, rescaled=True)),
    ("boft", "conv3d", dict(lora_dim=16, constraint=0.5)),
]
CFG_IDS = [f"{a}-{l}-" + "-".join(f"{k}={v}" for k, v in kw.items()) for a, l, kw in CONFIGS]

# configurations LyCORIS 4.1.3 writes but cannot reload itself (LYCORIS_FACTS §12.3); lyfast must.
LYCO_CANNOT_RELOAD = [
    ("lokr", "linear", dict(lora_dim=1, alpha=1, unbalanced_factorization=True, factor=4)),
    ("lokr", "linear", dict(lora_dim=1, alpha=2, unbalanced_factorization=True, factor=8)),
    ("lokr", "conv2d", dict(lora_dim=1, alpha=1, unbalanced_factorization=True, factor=4)),
    ("lokr", "linear", dict(lora_dim=3, alpha=2, unbalanced_factorization=True, decompose_both=True)),
    ("lokr", "conv2d", dict(lora_dim=1, alpha=1, use_tucker=True)),
    ("lokr", "conv1d", dict(lora_dim=1, alpha=0.5, use_tucker=True)),
    ("lokr", "conv3d", dict(lora_dim=1, alpha=1, use_tucker=True, rs_lora=True)),
    ("lokr", "conv2d", dict(lora_dim=1, alpha=1, use_tucker=True, unbalanced_factorization=True, factor=4)),
    # not in LYCORIS_FACTS §12.3: a non-default factor on a plain (flattened w2_b) conv, e.g. 24->32 k3 factor 8
    ("lokr", "conv2d", dict(lora_dim=1, alpha=1, factor=8)),
    ("lokr", "conv2d", dict(lora_dim=1, alpha=2, factor=8, decompose_both=True)),
]
CANNOT_IDS = ["-".join([l] + [f"{k}={v}" for k, v in kw.items()]) for _, l, kw in LYCO_CANNOT_RELOAD]


def _fresh_pair(algo, layer, kw, dtype=None):
    """Modules as constructed (no .to(dtype)), to compare buffer dtypes as LyCORIS creates them."""
    base = make_layer(layer, dtype=torch.float32)
    pos_kw = dict(kw)
    lyco = lyco_cls(algo)(NAME, copy.deepcopy(base), 1.0, **pos_kw)
    fast = fast_cls(algo)(NAME, copy.deepcopy(base), 1.0, **pos_kw)
    return lyco, fast


def _assert_rewritten_equal(fast_sd, lyco_sd, what="rewritten: "):
    """A module rebuilt from a file writes the same tensors back. `alpha` is compared by value only (LyCORIS's
    BOFT loader itself turns an int64 constraint 0 into fp32), and not at all for a both-full LoKr, whose
    scale is 1 whatever alpha says (LyCORIS rewrites it as lora_dim=1)."""
    both_full = any(k.endswith("lokr_w1") for k in lyco_sd) and any(k.endswith("lokr_w2") for k in lyco_sd)
    a_key = next(k for k in lyco_sd if k.endswith(".alpha") or k == "alpha")
    if not both_full:
        assert float(fast_sd[a_key]) == pytest.approx(float(lyco_sd[a_key]), rel=1e-6), f"{what}alpha value"
    rest_f = {k: v for k, v in fast_sd.items() if k != a_key}
    rest_l = {k: v for k, v in lyco_sd.items() if k != a_key}
    assert a_key in fast_sd, f"{what}alpha missing"
    _assert_sd_equal(rest_f, rest_l, what=what)


def _assert_sd_equal(fast_sd, lyco_sd, *, values=True, what=""):
    assert set(fast_sd) == set(lyco_sd), (
        f"{what}keys differ: lyfast-only {sorted(set(fast_sd) - set(lyco_sd))}, "
        f"lycoris-only {sorted(set(lyco_sd) - set(fast_sd))}"
    )
    for k, v in lyco_sd.items():
        f = fast_sd[k]
        assert tuple(f.shape) == tuple(v.shape), f"{what}{k}: shape {tuple(f.shape)} vs {tuple(v.shape)}"
        assert f.dtype == v.dtype, f"{what}{k}: dtype {f.dtype} vs {v.dtype}"
        if values:
            assert torch.equal(f.detach(), v.detach()), (
                f"{what}{k}: values differ (max abs diff {(f.detach() - v.detach()).abs().max().item():.3e})"
            )


@pytest.mark.parametrize("algo,layer,kw", CONFIGS, ids=CFG_IDS)
def test_format_matches_fresh_module(algo, layer, kw):
    """Same keys, shapes and dtypes as LyCORIS straight after construction (incl. the `alpha` buffer)."""
    lyco, fast = _fresh_pair(algo, layer, kw)
    _assert_sd_equal(fast.state_dict(), lyco.state_dict(), values=False)
    # the alpha buffer's value is part of the format (alpha * r / r_factor; BOFT: the unscaled constraint)
    assert float(fast.state_dict()["alpha"]) == pytest.approx(float(lyco.state_dict()["alpha"]), rel=1e-7)
    if algo != "boft":
        assert fast.scale == pytest.approx(lyco.scale, rel=1e-12)


@pytest.mark.parametrize("algo,layer,kw", CONFIGS, ids=CFG_IDS)
def test_lycoris_to_lyfast_to_lycoris(algo, layer, kw):
    pair = make_pair(algo, layer, apply=False, **kw)
    lyco_sd = pair.lyco.state_dict()
    # lyfast's state dict after loading LyCORIS's (and after copying a non-unit use_scalar scalar by name):
    # identical tensors, `use_scalar` folded into hada_w1_a / lokr_w1(_a)
    _assert_sd_equal(pair.fast.state_dict(), lyco_sd, what="lyfast<-lycoris: ")
    fresh = fast_cls(algo)(NAME, copy.deepcopy(pair.base_layer), 1.0, **kw).to(pair.dtype)
    missing, unexpected = fresh.load_state_dict(lyco_sd)
    assert not missing and not unexpected, (missing, unexpected)
    _assert_sd_equal(fresh.state_dict(), lyco_sd, what="fresh lyfast<-lycoris: ")
    # and back into a fresh LyCORIS module
    back = lyco_cls(algo)(NAME, copy.deepcopy(pair.base_layer), 1.0, **kw).to(pair.dtype)
    back.load_state_dict(fresh.state_dict())
    _assert_sd_equal(back.state_dict(), lyco_sd, what="lycoris<-lyfast: ")


@pytest.mark.parametrize("algo,layer,kw", CONFIGS, ids=CFG_IDS)
def test_lyfast_to_lycoris_same_forward(algo, layer, kw):
    """Randomize lyfast, load its state dict into LyCORIS: identical tensors and forward."""
    pair = make_pair(algo, layer, apply=False, **kw)
    randomize_(pair.fast, seed=99)
    sd = pair.fast.state_dict()
    pair.lyco.load_state_dict(sd)
    _assert_sd_equal(pair.lyco.state_dict(), sd, what="lycoris<-lyfast: ")
    # scalar (if any) is reset to 1 by both loaders; make parameters identical for the grad comparison
    pair.fast.load_state_dict(sd)
    copy_params_by_name_(pair.fast, pair.lyco)
    pair.apply()
    assert_results_match(
        run_adapted(pair.fast_layer, pair.fast, pair.x),
        run_adapted(pair.lyco_layer, pair.lyco, pair.x),
        pair.dtype,
    )


def _prefixed(sd, name=NAME):
    return {f"{name}.{k}": v.detach().clone() for k, v in sd.items()}


@torch.no_grad()
def _round_to_fp32_(module):
    """make_module_from_state_dict builds fp32 parameters (like LyCORIS) before copying the file's tensors in:
    make the saved values fp32-representable (reload LyCORIS's own state dict rounded through fp32; this also
    folds a use_scalar scalar into w1_a) so the fp64 comparison stays exact."""
    sd = {k: v.detach() if k == "alpha" else v.detach().float().to(v.dtype) for k, v in module.state_dict().items()}
    module.load_state_dict(sd)
    return module


def _lyco_make_from_sd(algo, sd_prefixed, layer_module, name=NAME):
    cls = lyco_cls(algo)
    with torch.no_grad():  # lycoris.modules.make_module runs under no_grad
        return cls.make_module_from_state_dict(name, layer_module, *cls.extract_state_dict(sd_prefixed, name))


def _make_from_sd(algo, sd_prefixed, layer_module, name=NAME):
    cls = fast_cls(algo)
    assert cls.algo_check(sd_prefixed, name)
    params = cls.extract_state_dict(sd_prefixed, name)
    with torch.no_grad():
        return cls.make_module_from_state_dict(name, layer_module, *params)


def _lyco_forward_from(pair):
    """LyCORIS's forward for the saved module, with the scale a loader derives from the file (alpha is stored
    as an fp32 tensor, so alpha/r can differ from the constructor's Python-float scale by ~1e-8 relative)."""
    if pair.algo != "boft" and not (getattr(pair.lyco, "use_w1", False) and getattr(pair.lyco, "use_w2", False)):
        pair.lyco.scale = float(pair.lyco.alpha) / pair.lyco.lora_dim
    pair.lyco.multiplier = 1.0
    pair.lyco.bypass_mode = False
    pair.lyco.apply_to()
    return run_adapted(pair.lyco_layer, pair.lyco, pair.x, backward=False)["out"]


@pytest.mark.parametrize("algo,layer,kw", CONFIGS, ids=CFG_IDS)
def test_make_module_from_state_dict(algo, layer, kw):
    pair = make_pair(algo, layer, apply=False, **kw)
    _round_to_fp32_(pair.lyco)
    sd = _prefixed(pair.lyco.state_dict())
    # lyfast's class exposes LyCORIS's registry attributes (weight_list order is the positional order)
    assert fast_cls(algo).weight_list == lyco_cls(algo).weight_list
    assert fast_cls(algo).weight_list_det == lyco_cls(algo).weight_list_det
    mod = _make_from_sd(algo, sd, pair.fast_layer).to(pair.dtype)
    assert mod.multiplier == 1
    mod.apply_to()
    out = run_adapted(pair.fast_layer, None, pair.x, backward=False)["out"]
    assert_close_rel(out, _lyco_forward_from(pair), dtype=pair.dtype, name="make_module_from_state_dict forward")
    # the rebuilt module writes the same file back
    _assert_rewritten_equal(_prefixed(mod.state_dict()), sd)


@pytest.mark.parametrize("algo,layer,kw", LYCO_CANNOT_RELOAD, ids=CANNOT_IDS)
def test_reload_files_lycoris_cannot(algo, layer, kw):
    pair = make_pair(algo, layer, apply=False, **kw)
    _round_to_fp32_(pair.lyco)
    sd = _prefixed(pair.lyco.state_dict())
    mod = _make_from_sd(algo, sd, pair.fast_layer).to(pair.dtype)
    _assert_rewritten_equal(_prefixed(mod.state_dict()), sd, what="rebuilt from file: ")
    mod.apply_to()
    out = run_adapted(pair.fast_layer, None, pair.x, backward=False)["out"]
    assert_close_rel(out, _lyco_forward_from(pair), dtype=pair.dtype, name="reloaded forward")


@pytest.mark.parametrize("file_dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("algo,layer,kw", [CONFIGS[1], CONFIGS[12], CONFIGS[19]], ids=["loha", "lokr", "boft"])
def test_saved_in_low_precision(algo, layer, kw, file_dtype):
    """save_weights(dtype=...) casts every tensor incl. alpha; loading such a file reproduces LyCORIS."""
    pair = make_pair(algo, layer, apply=False, **kw)
    sd = {k: v.to(file_dtype) for k, v in _prefixed(pair.lyco.state_dict()).items()}
    ref = _lyco_make_from_sd(algo, sd, pair.lyco_layer).to(pair.dtype)
    ref.apply_to()
    expected = run_adapted(pair.lyco_layer, None, pair.x, backward=False)["out"]
    mod = _make_from_sd(algo, sd, pair.fast_layer).to(pair.dtype)
    mod.apply_to()
    out = run_adapted(pair.fast_layer, None, pair.x, backward=False)["out"]
    assert_close_rel(out, expected, dtype=pair.dtype, name=f"{file_dtype} file forward")


@pytest.mark.parametrize("algo,layer,kw", [CONFIGS[2], CONFIGS[13], CONFIGS[19]], ids=["loha", "lokr", "boft"])
def test_safetensors_file_roundtrip(tmp_path, algo, layer, kw):
    from safetensors.torch import load_file, save_file

    pair = make_pair(algo, layer, apply=False, **kw)
    _round_to_fp32_(pair.lyco)
    copy_params_by_name_(pair.fast, pair.lyco)
    path = tmp_path / "adapter.safetensors"
    save_file({k: v.detach().contiguous() for k, v in _prefixed(pair.fast.state_dict()).items()}, str(path))
    sd = load_file(str(path))
    assert lyco_cls(algo).algo_check(sd, NAME)
    mod = _make_from_sd(algo, sd, pair.fast_layer).to(pair.dtype)
    mod.apply_to()
    assert_close_rel(
        run_adapted(pair.fast_layer, None, pair.x, backward=False)["out"],
        _lyco_forward_from(pair),
        dtype=pair.dtype,
        name="safetensors reload",
    )


def test_use_scalar_folded():
    pair = make_pair("loha", "linear", apply=False, use_scalar=True)
    s = float(pair.fast.scalar.detach())
    assert s != 1.0
    sd = pair.fast.state_dict()
    assert "scalar" not in sd
    assert torch.equal(sd["hada_w1_a"], (pair.fast.hada_w1_a * pair.fast.scalar).detach())
    pair.fast.load_state_dict(sd)  # scalar reset to 1, folded value kept in w1_a
    assert float(pair.fast.scalar) == 1.0
    assert torch.equal(pair.fast.hada_w1_a.detach(), sd["hada_w1_a"])

    pair = make_pair("lokr", "linear", apply=False, use_scalar=True, decompose_both=True, lora_dim=1, factor=4)
    sd = pair.fast.state_dict()
    assert torch.equal(sd["lokr_w1_a"], (pair.fast.lokr_w1_a * pair.fast.scalar).detach())
    assert torch.equal(sd["lokr_w1_b"], pair.fast.lokr_w1_b.detach())
