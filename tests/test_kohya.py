"""lyfast.kohya driven the way sd-scripts' train_network.py drives `--network_module lycoris.kohya`, and
compared with lycoris-lora 4.1.3's lycoris.kohya."""
from __future__ import annotations

import logging

import pytest
import torch
from safetensors import safe_open

import lycoris.kohya as lkohya
import lycoris.utils
import lyfast.kohya as fkohya
import lyfast.network as lnet
from lyco_models import one_thread  # noqa: F401  (autouse fixture)
from lyco_models import (assert_close, randomize_, run_unet, tiny_text_encoder, tiny_unet, token_ids,
                         unet_inputs, write_kohya_preset)

PRESETS = ["full", "full-lin", "attn-mlp", "attn-only", "unet-only", "unet-transformer-only", "unet-convblock-only"]


def lycoris_safe_preset(name, tmp_path):
    """LyCORIS 4.1.3's kohya network asserts on diffusers/SD1 U-Nets with the presets that name both the
    `TimestepEmbedding` class and `time_embedding.linear_*` (one layer, two adapters): give LyCORIS the same
    preset minus that class -- the layers it selects are the same."""
    preset = lnet.PRESET[name]
    if "TimestepEmbedding" not in preset["unet_target_module"] or not preset["unet_target_name"]:
        return name
    return write_kohya_preset(tmp_path / f"{name}.toml",
                              [m for m in preset["unet_target_module"] if m != "TimestepEmbedding"],
                              preset["unet_target_name"], preset["text_encoder_target_module"],
                              preset["text_encoder_target_name"], preset["enable_conv"])


def _layout(net):
    return [(lora.lora_name, type(lora).name, {k: tuple(v.shape) for k, v in lora.state_dict().items()},
             float(lora.alpha)) for lora in net.loras]


@pytest.fixture(scope="module")
def models():
    return tiny_text_encoder(torch.float32), tiny_unet(torch.float32)


@pytest.mark.parametrize("preset", PRESETS)
def test_targeting_matches_lycoris(models, preset, tmp_path):
    te, unet = models
    args = dict(algo="lokr", factor="4", conv_dim="2", conv_alpha="1", use_tucker="True", preset=preset)
    mine = fkohya.create_network(1.0, 4, 2.0, None, te, unet, **args)
    lyco_preset = lycoris_safe_preset(preset, tmp_path)
    theirs = lkohya.create_network(1.0, 4, 2.0, None, te, unet, **{**args, "preset": lyco_preset})
    assert _layout(mine) == _layout(theirs)
    assert [lo.lora_name for lo in mine.text_encoder_loras] == [lo.lora_name for lo in theirs.text_encoder_loras]
    assert [lo.lora_name for lo in mine.unet_loras] == [lo.lora_name for lo in theirs.unet_loras]


def test_full_preset_on_sd_unet_where_lycoris_asserts(models):
    te, unet = models
    with pytest.raises(AssertionError, match="duplicated lora name"):
        lkohya.create_network(1.0, 4, 1.0, None, te, unet, algo="loha")
    net = fkohya.create_network(1.0, 4, 1.0, None, te, unet, algo="loha")
    names = [lo.lora_name for lo in net.loras]
    assert len(names) == len(set(names)) and "lora_unet_time_embedding_linear_1" in names


def test_text_encoder_prefixes(models):
    te, unet = models
    te2 = tiny_text_encoder(torch.float32, seed=1)
    single = fkohya.create_network(1.0, 4, 1.0, None, te, unet, algo="loha", preset="attn-mlp")
    assert single.text_encoder_loras and all(lo.lora_name.startswith("lora_te_") for lo in single.text_encoder_loras)
    pair = fkohya.create_network(1.0, 4, 1.0, None, [te, te2], unet, algo="loha", preset="attn-mlp")
    theirs = lkohya.create_network(1.0, 4, 1.0, None, [te, te2], unet, algo="loha", preset="attn-mlp")
    assert _layout(pair) == _layout(theirs)
    prefixes = {lo.lora_name.split("_layers")[0] for lo in pair.text_encoder_loras}
    assert prefixes == {"lora_te1", "lora_te2"}


def test_string_network_args_parse_like_lycoris(models, tmp_path):
    te, unet = models
    args = {"algo": "loha", "conv_dim": "4", "conv_alpha": "1", "use_tucker": "True", "dropout": "0.0",
            "rank_dropout": "0.1", "module_dropout": "0", "rs_lora": "True", "preset": "unet-convblock-only"}
    mine = fkohya.create_network(1.0, 8, 4.0, None, te, unet, neuron_dropout=0.3, **args)
    theirs = lkohya.create_network(1.0, 8, 4.0, None, te, unet, neuron_dropout=0.3, **args)
    assert _layout(mine) == _layout(theirs)
    for a, b in zip(mine.loras, theirs.loras):
        assert (a.scale, a.dropout, a.rank_dropout, a.module_dropout) == (b.scale, b.dropout, b.rank_dropout,
                                                                        b.module_dropout)
    with pytest.raises(ValueError, match="lora"):
        fkohya.create_network(1.0, 4, 1.0, None, te, unet, algo="lora")
    with pytest.raises(ValueError, match="diag-oft"):
        fkohya.create_network(1.0, 4, 1.0, None, te, unet, algo="diag-oft")
    with pytest.raises(ValueError, match="train_norm"):
        fkohya.create_network(1.0, 4, 1.0, None, te, unet, algo="loha", train_norm="True")


def test_prepare_optimizer_params_like_lycoris(models):
    te, unet = models
    args = dict(algo="loha", preset="attn-mlp", loraplus_lr_ratio="4")
    mine = fkohya.create_network(1.0, 4, 1.0, None, te, unet, **args)
    theirs = lkohya.create_network(1.0, 4, 1.0, None, te, unet, **args)
    for net in (mine, theirs):
        net.apply_to(te, unet, True, True)
    for call in [(1e-5, 1e-4, 1e-3), (None, 1e-4, 1e-3), (None, None, 2e-3), (0, 1e-4, None), (None, 1e-4, None)]:
        p_mine, d_mine = mine.prepare_optimizer_params(*call)
        p_theirs, d_theirs = theirs.prepare_optimizer_params(*call)
        assert d_mine == d_theirs, call
        assert [g.get("lr") for g in p_mine] == [g.get("lr") for g in p_theirs], call
        assert [len(list(g["params"])) for g in p_mine] == [len(list(g["params"])) for g in p_theirs], call
    for net in (mine, theirs):
        net.restore()


def _sd_scripts_train(module, te, unet, steps=3, **net_kwargs):
    """The calls train_network.py makes, in its order."""
    net = module.create_network(1.0, 4, 2.0, None, te, unet, neuron_dropout=None, **net_kwargs)
    net.apply_to(te, unet, True, True)
    net.to(torch.float64)
    randomize_(net, scale=0.1)
    net.enable_gradient_checkpointing()
    try:
        params, _descriptions = net.prepare_optimizer_params(1e-3, 1e-3, 1e-3)
    except TypeError:
        params = net.prepare_optimizer_params(1e-3, 1e-3)
    opt = torch.optim.AdamW(params, lr=1e-3)
    net.prepare_grad_etc(te, unet)
    net.on_epoch_start(te, unet)
    x, t, _ = unet_inputs()
    ids = token_ids()
    for _ in range(steps):
        net.on_step_start(te, unet)
        loss = run_unet(unet, (x, t, te(ids))).square().mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(list(net.get_trainable_params()), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        net.apply_max_norm_regularization(1.0, "cpu")
    return net


def _eval_output(te, unet):
    x, t, _ = unet_inputs()
    with torch.no_grad():
        return run_unet(unet, (x, t, te(token_ids())))


NETWORK_ARGS = {"algo": "loha", "conv_dim": "4", "conv_alpha": "1", "use_tucker": "True"}


def test_sd_scripts_flow_and_reload(tmp_path):
    te, unet = tiny_text_encoder(), tiny_unet()
    args = dict(NETWORK_ARGS, preset="attn-mlp")  # keep it quick: attention + text encoder
    net = _sd_scripts_train(fkohya, te, unet, **args)
    net.eval()
    with torch.no_grad():  # saved as fp32 (sd-scripts' save_precision): compare with the fp32-rounded adapters
        for p in net.parameters():
            p.copy_(p.float())
    trained = _eval_output(te, unet)
    file = tmp_path / "trained.safetensors"
    net.save_weights(str(file), torch.float32, {"ss_network_module": "lyfast.kohya", "ss_network_dim": "4"})

    with safe_open(str(file), "pt") as f:
        meta = f.metadata()
        saved = {k: f.get_tensor(k) for k in f.keys()}
    assert meta["ss_network_module"] == "lyfast.kohya"
    state = {k: v.detach().float() for k, v in net.state_dict().items()}
    assert meta["sshs_model_hash"] == lycoris.utils.precalculate_safetensors_hashes(state)
    assert len(meta["sshs_legacy_hash"]) == 8
    assert set(saved) == set(state)

    for module in (fkohya, lkohya):  # lyfast's file loads in lyfast and in LyCORIS
        te2, unet2 = tiny_text_encoder(), tiny_unet()
        loaded, sd = module.create_network_from_weights(1.0, str(file), None, te2, unet2, for_inference=True)
        loaded.apply_to(te2, unet2, True, True)
        loaded.to(torch.float64)
        loaded.eval()
        assert_close(_eval_output(te2, unet2), trained, 1e-12, module.__name__)


def test_training_matches_lycoris_kohya(tmp_path):
    """Same init, same data, three AdamW steps with max-norm: the same trained adapters as lycoris.kohya."""
    # conv (Tucker), linear and text-encoder adapters, few of them: quick
    preset = write_kohya_preset(tmp_path / "small.toml", ["Downsample2D", "Upsample2D"],
                                ["conv_in", "conv_out", "time_embedding.linear_1"], ["CLIPMLP"])
    runs = {}
    for module in (fkohya, lkohya):
        te, unet = tiny_text_encoder(), tiny_unet()
        net = _sd_scripts_train(module, te, unet, steps=2, preset=preset, **NETWORK_ARGS)
        net.eval()
        runs[module.__name__] = (_eval_output(te, unet), {k: v.detach() for k, v in net.state_dict().items()})
    (out_f, sd_f), (out_l, sd_l) = runs["lyfast.kohya"], runs["lycoris.kohya"]
    assert set(sd_f) == set(sd_l)
    for k in sd_l:
        assert_close(sd_f[k], sd_l[k], 1e-9, k)
    assert_close(out_f, out_l, 1e-9, "output")


def test_load_weights_and_merge_to(tmp_path):
    te, unet = tiny_text_encoder(), tiny_unet()
    net = fkohya.create_network(1.0, 4, 2.0, None, te, unet, algo="lokr", factor="4", preset="attn-mlp")
    net.apply_to(te, unet, True, True)
    net.to(torch.float64)
    randomize_(net)
    net.eval()
    ref = _eval_output(te, unet)
    file = tmp_path / "w.safetensors"
    net.save_weights(str(file), None, None)

    te2, unet2 = tiny_text_encoder(), tiny_unet()
    other = fkohya.create_network(1.0, 4, 2.0, None, te2, unet2, algo="lokr", factor="4", preset="attn-mlp")
    other.apply_to(te2, unet2, True, True)
    other.to(torch.float64)
    assert other.load_weights(str(file)) == {}
    other.eval()
    assert_close(_eval_output(te2, unet2), ref, 1e-12, "load_weights")

    te3, unet3 = tiny_text_encoder(), tiny_unet()
    merged, sd = fkohya.create_network_from_weights(1.0, str(file), None, te3, unet3, for_inference=True)
    assert merged.is_mergeable()
    for lora in merged.loras:  # not submodules before apply_to (as in LyCORIS): cast each one
        lora.to(torch.float64)
    merged.merge_to(te3, unet3, sd, torch.float64, "cpu")
    assert_close(_eval_output(te3, unet3), ref, 1e-10, "merge_to")


def test_from_weights_reports_foreign_prefix_and_missing_layers(tmp_path, caplog):
    te, unet = tiny_text_encoder(torch.float32), tiny_unet(torch.float32)
    net = fkohya.create_network(1.0, 4, 1.0, None, te, unet, algo="loha", preset="attn-mlp")
    sd = {k: v.detach() for lo in net.loras for k, v in
          ((f"{lo.lora_name}.{p}", t) for p, t in lo.state_dict().items())}
    sd["lora_unet_no_such_layer.hada_w1_a"] = torch.zeros(4, 4)
    sd["something_else.weight"] = torch.zeros(1)
    with caplog.at_level(logging.WARNING, logger="lyfast"):
        loaded, _ = fkohya.create_network_from_weights(1.0, None, None, te, unet, weights_sd=sd)
    assert len(loaded.loras) == len(net.loras)
    assert "lora_unet_no_such_layer" in caplog.text and "something_else.weight" in caplog.text
