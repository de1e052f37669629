"""lyfast.create_lycoris / LycorisNetwork against lycoris-lora 4.1.3's wrapper: kwargs, presets, targeting,
module names and shapes, network methods, and the errors lyfast gives where LyCORIS would substitute."""
from __future__ import annotations

import logging

import pytest
import torch
import torch.nn as nn

import lycoris
import lycoris.config
import lyfast
import lyfast.network as lnet
from lyco_models import one_thread  # noqa: F401  (autouse fixture)
from lyco_models import assert_close, randomize_, run_unet, tiny_unet, unet_inputs

PRESETS = ["full", "full-lin", "attn-mlp", "attn-only", "unet-only", "unet-transformer-only", "unet-convblock-only"]
ALGO_KW = {
    "loha": dict(algo="loha", use_tucker=True),
    "lokr": dict(algo="lokr", factor=4, decompose_both=True),
    "boft": dict(algo="boft", rescaled=True, constraint=1e-3),
    "loha_dora": dict(algo="loha", use_tucker=True, dora_wd=True, wd_on_output=False),
}


def _shapes(net):
    return [(lora.lora_name, type(lora).name, {k: tuple(v.shape) for k, v in lora.state_dict().items()},
             float(getattr(lora, "scale", 1.0)), float(lora.alpha)) for lora in net.loras]


@pytest.fixture(scope="module")
def unet():
    return tiny_unet(torch.float32)


def test_preset_data_equals_lycoris():
    for name in PRESETS:
        assert lnet.PRESET[name] == lycoris.config.PRESET[name], name
    assert set(lnet.VALID_PRESET_KEYS) == set(lycoris.config_sdk.VALID_PRESET_KEYS)


@pytest.mark.parametrize("algo", list(ALGO_KW))
@pytest.mark.parametrize("preset", PRESETS)
def test_targeting_and_shapes_match_lycoris(unet, preset, algo):
    kw = dict(ALGO_KW[algo], preset=preset, conv_dim=2, conv_alpha=0.5)
    mine = lyfast.create_lycoris(unet, 1.0, 4, 2, **kw)
    theirs = lycoris.create_lycoris(unet, 1.0, 4, 2, **kw)
    assert mine.loras, "the tiny U-Net must get adapters"
    assert _shapes(mine) == _shapes(theirs)
    assert all(type(lora).__module__.startswith("lyfast.") for lora in mine.loras)


def test_string_kwargs_and_aliases(unet):
    base = dict(algo="loha", conv_dim="2", conv_alpha="1", preset="full")
    theirs = lycoris.create_lycoris(unet, 1.0, 4, 1, use_tucker=True, conv_dim=2, conv_alpha=1.0, algo="loha")
    for alias in ("use_tucker", "use_cp", "use_conv_cp"):
        mine = lyfast.create_lycoris(unet, 1.0, "4", 1, **base, **{alias: "True"})
        assert _shapes(mine) == _shapes(theirs), alias
    # `constrain` is the old spelling of `constraint`
    mine = lyfast.create_lycoris(unet, 1.0, 4, 1, algo="boft", constrain="0.5")
    assert all(lora.constraint == 0.5 * lora.dim for lora in mine.loras)
    # LoKr string flags/ints (sd-scripts style) parse to the same modules as typed ones
    mine = lyfast.create_lycoris(unet, 1.0, 4, 1, algo="lokr", factor="4", decompose_both="True", full_matrix="False")
    theirs = lycoris.create_lycoris(unet, 1.0, 4, 1, algo="lokr", factor=4, decompose_both=True)
    assert _shapes(mine) == _shapes(theirs)


def test_false_strings_are_false(unet):
    # LyCORIS 4.1.3 treats every string except "false" as True, and passes decompose_both through unparsed.
    plain = _shapes(lyfast.create_lycoris(unet, 1.0, 4, 1, algo="lokr", factor=4))
    for value in ("False", "false", "0", "no", "off"):
        assert _shapes(lyfast.create_lycoris(unet, 1.0, 4, 1, algo="lokr", factor=4, decompose_both=value,
                                             use_tucker=value)) == plain


def test_conv_dim_zero_skips_k_gt_1_convs(unet):
    for zero in (0, "0"):
        net = lyfast.create_lycoris(unet, 1.0, 4, 1, algo="loha", conv_dim=zero)
        for lora in net.loras:
            layer = lora.org_module[0]
            assert not isinstance(layer, nn.Conv2d) or layer.kernel_size[0] == 1, lora.lora_name
    theirs = lycoris.create_lycoris(unet, 1.0, 4, 1, algo="loha", conv_dim="0")
    assert _shapes(lyfast.create_lycoris(unet, 1.0, 4, 1, algo="loha", conv_dim="0")) == _shapes(theirs)


@pytest.mark.parametrize("algo", ["lora", "locon", "LoCon", "ia3", "dylora", "full", "diag-oft", "glora", "tlora",
                                  "nonsense", None])
def test_unsupported_algo_raises(unet, algo):
    with pytest.raises(ValueError) as err:
        lyfast.create_lycoris(unet, 1.0, 4, 1, algo=algo)
    shown = str(algo or "lora").lower()
    assert shown in str(err.value).lower() and "loha, lokr, boft" in str(err.value)


def test_unsupported_features_raise(unet):
    with pytest.raises(ValueError, match="train_norm"):
        lyfast.create_lycoris(unet, 1.0, 4, 1, algo="loha", train_norm=True)
    with pytest.raises(ValueError, match="ia3"):
        lyfast.create_lycoris(unet, 1.0, 4, 1, algo="loha", preset="ia3")
    with pytest.raises(ValueError, match="unknown preset"):
        lyfast.create_lycoris(unet, 1.0, 4, 1, algo="loha", preset="no-such-preset")
    with pytest.raises(ValueError, match="loha"):
        lyfast.LycorisNetwork(unet)  # LyCORIS's default network_module is "locon"


def test_toml_preset_matches_lycoris(unet, tmp_path):
    path = tmp_path / "preset.toml"
    path.write_text(
        'target_module = ["Transformer2DModel", "ResnetBlock2D"]\n'
        'target_name = ["conv_in", "time_embedding.linear_.*"]\n'
        'exclude_name = ["down_blocks.0.resnets.0.conv_shortcut"]\n'
        '[module_algo_map.Attention]\nalgo = "lokr"\ndim = 2\nfactor = 4\n'
        '[name_algo_map."conv_in"]\nalgo = "loha"\ndim = 3\nalpha = 3\n'
    )
    try:
        mine = lyfast.create_lycoris(unet, 1.0, 4, 1, algo="loha", preset=str(path))
        theirs = lycoris.create_lycoris(unet, 1.0, 4, 1, algo="loha", preset=str(path))
        assert _shapes(mine) == _shapes(theirs)
        assert {type(lora).name for lora in mine.loras} == {"loha", "kron"}
    finally:  # apply_preset sets class attributes (as in LyCORIS): put the defaults back
        for cls in (lyfast.LycorisNetwork, lycoris.LycorisNetwork):
            cls.TARGET_REPLACE_MODULE = ["Linear", "Conv1d", "Conv2d", "Conv3d", "GroupNorm", "LayerNorm"]
            cls.TARGET_REPLACE_NAME, cls.TARGET_EXCLUDE_NAME = [], []
            cls.MODULE_ALGO_MAP, cls.NAME_ALGO_MAP = {}, {}


def test_preset_override_with_unsupported_algo_raises(tmp_path, unet):
    path = tmp_path / "bad.toml"
    path.write_text('target_module = ["Linear"]\n[module_algo_map.Attention]\nalgo = "lora"\n')
    with pytest.raises(ValueError, match="lora"):
        lyfast.create_lycoris(unet, 1.0, 4, 1, algo="loha", preset=str(path))


def test_network_methods():
    unet = tiny_unet()
    inputs = unet_inputs()
    base_out = run_unet(unet, inputs)
    net = lyfast.create_lycoris(unet, 0.5, 4, 2, algo="loha", conv_dim=2, conv_alpha=1)
    assert net.is_mergeable()
    net.apply_to()
    net.to(torch.float64)
    randomize_(net)
    assert set(dict(net.named_children())) == {lora.lora_name for lora in net.loras}
    assert all(lora.multiplier == 0.5 for lora in net.loras)
    adapted = run_unet(unet, inputs)
    assert (adapted - base_out).abs().max() > 1e-3

    net.set_multiplier(1.0)
    assert all(lora.multiplier == 1.0 for lora in net.loras)
    full = run_unet(unet, inputs)

    groups = net.prepare_optimizer_params(1e-3)
    assert len(groups) == 1 and groups[0]["lr"] == 1e-3
    assert {id(p) for p in groups[0]["params"]} == {id(p) for p in net.parameters()}
    assert {id(p) for p in net.get_trainable_params()} == {id(p) for p in net.parameters()}
    net.prepare_grad_etc()
    assert all(p.requires_grad for p in net.parameters())
    net.eval()
    net.on_epoch_start()
    assert net.training
    net.enable_gradient_checkpointing()
    net.on_step_start()

    # restore() gives the base model back; apply_to() puts the adapters back
    net.restore()
    assert_close(run_unet(unet, inputs), base_out, 0, "restored")
    net.apply_to()
    assert_close(run_unet(unet, inputs), full, 1e-13, "re-applied")

    # merge_to bakes exactly what the forward computes (α/r applied once)
    net.restore()
    net.merge_to(1.0)
    assert_close(run_unet(unet, inputs), full, 1e-10, "merged")


def test_max_norm_regularization():
    unet = tiny_unet()
    net = lyfast.create_lycoris(unet, 1.0, 4, 2, algo="lokr", factor=4)
    net.apply_to()
    net.to(torch.float64)
    randomize_(net, scale=1.0)
    norms = [lora.get_diff_weight(1.0)[0].norm().item() for lora in net.loras]
    limit = sorted(norms)[len(norms) // 2]
    scaled, mean_norm, max_norm = net.apply_max_norm_regularization(limit, "cpu")
    assert scaled > 0 and max_norm <= limit * (1 + 1e-9)
    after = [lora.get_diff_weight(1.0)[0].norm().item() for lora in net.loras]
    assert max(after) <= limit * (1 + 1e-9)


@pytest.mark.parametrize("ext", [".safetensors", ".pt"])
def test_save_and_load_weights(tmp_path, ext):
    unet = tiny_unet()
    net = lyfast.create_lycoris(unet, 1.0, 4, 2, algo="loha", use_scalar=True)
    net.apply_to()
    net.to(torch.float64)
    randomize_(net)
    inputs = unet_inputs()
    ref = run_unet(unet, inputs)
    file = tmp_path / f"w{ext}"
    net.save_weights(str(file), torch.float64, {"note": "x"} if ext == ".safetensors" else None)
    sd = lnet.load_state_dict_file(str(file))
    assert not any("scalar" in k for k in sd)  # the scalar is folded into hada_w1_a, as in LyCORIS

    fresh = tiny_unet()
    other = lyfast.create_lycoris(fresh, 1.0, 4, 2, algo="loha", use_scalar=True)
    other.apply_to()
    other.to(torch.float64)
    info = other.load_weights(str(file))
    assert info == {}
    assert_close(run_unet(fresh, inputs), ref, 1e-12, "load_weights")


def test_load_weights_reports_partial_loads(tmp_path, caplog):
    unet = tiny_unet()
    net = lyfast.create_lycoris(unet, 1.0, 4, 2, algo="loha")
    net.apply_to()
    sd = {k: v.detach() for k, v in net.state_dict().items()}
    dropped = next(iter(sd))
    del sd[dropped]
    sd["lycoris_not_a_layer.hada_w1_a"] = torch.zeros(2, 2)
    file = tmp_path / "partial.safetensors"
    lnet.save_state_dict_file(sd, str(file))
    with caplog.at_level(logging.WARNING, logger="lyfast"):
        info = net.load_weights(str(file))
    assert dropped in info["missing keys"] and "lycoris_not_a_layer.hada_w1_a" in info["unexpected keys"]
    assert dropped in caplog.text and "lycoris_not_a_layer.hada_w1_a" in caplog.text


def test_bypass_and_dropout_settings_reach_modules(unet):
    net = lyfast.create_lycoris(unet, 1.0, 4, 1, algo="loha", bypass_mode="True", dropout="0.1",
                                rank_dropout="0.2", module_dropout="0.3")
    theirs = lycoris.create_lycoris(unet, 1.0, 4, 1, algo="loha", bypass_mode="True", dropout="0.1",
                                    rank_dropout="0.2", module_dropout="0.3")
    for a, b in zip(net.loras, theirs.loras):
        assert (a.bypass_mode, a.dropout, a.rank_dropout, a.module_dropout) == \
               (b.bypass_mode, b.dropout, b.rank_dropout, b.module_dropout)
