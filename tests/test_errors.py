"""Bad input raises clear, specific errors."""

import copy

import pytest
import torch
import torch.nn as nn

from conftest import ALGOS, fast_cls, make_layer, make_pair

NAME = "lycoris_bad"


@pytest.mark.parametrize("algo", ALGOS)
@pytest.mark.parametrize(
    "module",
    [nn.Embedding(10, 8), nn.LayerNorm(8), nn.GroupNorm(2, 8), nn.ConvTranspose2d(4, 4, 3), nn.MultiheadAttention(8, 2)],
    ids=lambda m: type(m).__name__,
)
def test_unsupported_module_type(algo, module):
    with pytest.raises(ValueError, match=type(module).__name__):
        fast_cls(algo)(NAME, module, 1.0, 4, 1)


@pytest.mark.parametrize(
    "out,lora_dim",
    [(640, 4), (640, 8), (768, 4), (320, 8), (24, 4), (96, 2), (30, 2)],
)
def test_boft_width_without_power_of_two_factorization(out, lora_dim):
    layer = nn.Linear(16, out)
    with pytest.raises(ValueError, match=str(out)):
        fast_cls("boft")(NAME, layer, 1.0, lora_dim, 1)


def test_boft_valid_widths_do_not_raise():
    for out, lora_dim in [(640, 10), (640, 16), (768, 6), (320, 10), (1280, 10)]:
        fast_cls("boft")(NAME, nn.Linear(8, out), 1.0, lora_dim, 1)


CFG = {"loha": dict(lora_dim=4, alpha=2), "lokr": dict(lora_dim=2), "boft": dict(lora_dim=4, rescaled=True)}


def _sd(algo, layer="conv2d"):
    pair = make_pair(algo, layer, apply=False, **CFG[algo])
    return pair, {k: v.detach().clone() for k, v in pair.lyco.state_dict().items()}


@pytest.mark.parametrize("algo", ALGOS)
def test_load_state_dict_wrong_shape_names_key(algo):
    pair, sd = _sd(algo)
    key = next(k for k in sd if k != "alpha")
    sd[key] = torch.zeros(*(s + 1 for s in sd[key].shape), dtype=sd[key].dtype)
    with pytest.raises(RuntimeError, match=key):
        pair.fast.load_state_dict(sd)


@pytest.mark.parametrize("algo", ALGOS)
def test_load_state_dict_missing_key_names_key(algo):
    pair, sd = _sd(algo)
    key = sorted(k for k in sd if k != "alpha")[-1]
    del sd[key]
    with pytest.raises(RuntimeError, match=key):
        pair.fast.load_state_dict(sd)


@pytest.mark.parametrize("algo", ALGOS)
def test_load_state_dict_unexpected_key_names_key(algo):
    pair, sd = _sd(algo)
    sd["hada_w9_z"] = torch.zeros(3)
    with pytest.raises(RuntimeError, match="hada_w9_z"):
        pair.fast.load_state_dict(sd)


@pytest.mark.parametrize("algo", ALGOS)
def test_load_state_dict_non_strict_reports_missing(algo):
    pair, sd = _sd(algo)
    key = sorted(k for k in sd if k != "alpha")[-1]
    del sd[key]
    result = pair.fast.load_state_dict(sd, strict=False)
    assert key in result.missing_keys
    assert not any("scalar" in k for k in result.missing_keys)


@pytest.mark.parametrize("algo", ["loha", "lokr"])
def test_dora_file_with_wrong_dora_scale_shape(algo):
    """A dora_scale that is neither (out, 1) nor (1, in) for the layer is refused, naming the key."""
    pair, sd = _sd(algo, "linear")
    pre = {f"{NAME}.{k}": v for k, v in sd.items()}
    pre[f"{NAME}.dora_scale"] = torch.ones(31, 1, dtype=torch.float64)
    cls = fast_cls(algo)
    with pytest.raises(ValueError, match=r"dora_scale.*\(31, 1\).*\(32, 1\)"):
        cls.make_module_from_state_dict(NAME, copy.deepcopy(pair.base_layer), *cls.extract_state_dict(pre, NAME))


@pytest.mark.parametrize("algo", ALGOS)
def test_make_module_from_state_dict_missing_alpha(algo):
    pair, sd = _sd(algo)
    pre = {f"{NAME}.{k}": v for k, v in sd.items() if k != "alpha"}
    cls = fast_cls(algo)
    params = cls.extract_state_dict(pre, NAME)
    with pytest.raises(ValueError, match="alpha"):
        cls.make_module_from_state_dict(NAME, copy.deepcopy(pair.base_layer), *params)


@pytest.mark.parametrize("algo", ALGOS)
def test_make_module_from_state_dict_missing_weight(algo):
    pair, sd = _sd(algo)
    first = {"loha": "hada_w2_b", "lokr": "lokr_w2", "boft": "oft_blocks"}[algo]
    pre = {f"{NAME}.{k}": v for k, v in sd.items() if not k.startswith(first)}
    cls = fast_cls(algo)
    params = cls.extract_state_dict(pre, NAME)
    with pytest.raises(ValueError, match=first):
        cls.make_module_from_state_dict(NAME, copy.deepcopy(pair.base_layer), *params)


@pytest.mark.parametrize("algo", ALGOS)
def test_make_module_from_state_dict_wrong_layer(algo):
    """Weights for a 24->32 conv applied to a layer of another shape: a clear error, not silent garbage."""
    pair, sd = _sd(algo)
    pre = {f"{NAME}.{k}": v for k, v in sd.items()}
    cls = fast_cls(algo)
    other = nn.Conv2d(16, 64, 3, padding=1).double()
    with pytest.raises(ValueError, match=NAME):
        cls.make_module_from_state_dict(NAME, other, *cls.extract_state_dict(pre, NAME))


def test_unknown_preset_key_is_a_value_error_and_a_key_error():
    import lyfast.network as lnet

    for exc in (ValueError, KeyError):
        with pytest.raises(exc, match="targt_module"):
            lnet.resolve_preset({"targt_module": ["Linear"]})
