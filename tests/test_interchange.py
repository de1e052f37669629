"""Files move both ways between lyfast and lycoris-lora 4.1.3 with the same model output, and bad files fail
loudly, naming the key.

Per configuration: LyCORIS builds a network on the tiny U-Net, every adapter parameter gets random non-zero
values (seeded by key), and its output is the reference. lyfast builds the same network from the same
kwargs with the same values: same keys, shapes and tensors, same output. Each side's file is then loaded by
the other side's loader (`create_lycoris_from_weights`) and must reproduce the reference output.
"""
from __future__ import annotations

import logging

import pytest
import torch

import lycoris
import lyfast
from lyco_models import one_thread  # noqa: F401  (autouse fixture)
from lyco_models import assert_close, randomize_, run_unet, tiny_unet, unet_inputs

# name: (create kwargs, LyCORIS 4.1.3 reloads its own file?)
CONFIGS = {
    "loha": (dict(algo="loha"), True),
    "loha_tucker": (dict(algo="loha", use_tucker=True, conv_dim=3, conv_alpha=1), True),
    "loha_scalar_alpha8": (dict(algo="loha", use_scalar=True, linear_alpha=8), True),
    "lokr_lowrank": (dict(algo="lokr", factor=4), True),
    "lokr_decompose_both": (dict(algo="lokr", factor=4, decompose_both=True), True),
    "lokr_full_matrix": (dict(algo="lokr", full_matrix=True), True),
    "boft": (dict(algo="boft"), True),
    "boft_rescaled": (dict(algo="boft", rescaled=True, constraint=1e-3), True),
    # Files LyCORIS 4.1.3 writes but cannot load back (lyfast can):
    "lokr_default_conv": (dict(algo="lokr"), False),  # factor guessed wrong for k>1 convs (in_dim*k*k)
    "lokr_tucker": (dict(algo="lokr", factor=4, use_tucker=True), False),  # lora_dim read from w2_a.size(1)
    "lokr_unbalanced": (dict(algo="lokr", factor=4, unbalanced_factorization=True), False),
    # DoRA (dora_scale): row norms reload both ways; LyCORIS 4.1.3 cannot reload its column-norm files
    # (make_module_from_state_dict does not infer wd_on_out from dora_scale's shape), lyfast can.
    "loha_dora_tucker": (dict(algo="loha", dora_wd=True, use_tucker=True, conv_dim=3, conv_alpha=1), True),
    "lokr_dora": (dict(algo="lokr", factor=4, dora_wd=True), True),
    "loha_dora_columns": (dict(algo="loha", dora_wd=True, wd_on_output=False), False),
}


def _dtype(algo):
    # LyCORIS's BOFT inverts in fp32 whatever the parameter dtype (fp64 raises), so BOFT runs in fp32.
    return torch.float32 if algo == "boft" else torch.float64


def _tol(algo):
    return 3e-5 if algo == "boft" else 1e-12


def _build(lib, kwargs, dtype):
    unet = tiny_unet(dtype)
    kwargs = dict(kwargs)
    alpha = kwargs.pop("linear_alpha", 2)
    net = lib.create_lycoris(unet, 1.0, 2, alpha, **kwargs)
    net.apply_to()
    net.to(dtype)
    randomize_(net)
    net.eval()
    return unet, net


def _load(lib, file, dtype):
    unet = tiny_unet(dtype)
    net, _ = lib.create_lycoris_from_weights(1.0, str(file), unet)
    net.apply_to()
    net.to(dtype)
    net.eval()
    return unet, net


@pytest.mark.parametrize("name", list(CONFIGS))
def test_files_interchange_both_ways(name, tmp_path):
    kwargs, lycoris_reloads = CONFIGS[name]
    algo = kwargs["algo"]
    dtype, tol = _dtype(algo), _tol(algo)
    inputs = unet_inputs(dtype)
    with torch.no_grad():
        unet_l, net_l = _build(lycoris, kwargs, dtype)
        ref = run_unet(unet_l, inputs)
        unet_f, net_f = _build(lyfast, kwargs, dtype)
        assert_close(run_unet(unet_f, inputs), ref, tol, "lyfast network, same values")

        sd_l = {k: v.detach() for k, v in net_l.state_dict().items()}
        sd_f = {k: v.detach() for k, v in net_f.state_dict().items()}
        assert list(sd_f) == list(sd_l)
        for key in sd_l:
            assert sd_f[key].shape == sd_l[key].shape and sd_f[key].dtype == sd_l[key].dtype, key
            assert torch.equal(sd_f[key], sd_l[key]), key

        file_l, file_f = tmp_path / "lycoris.safetensors", tmp_path / "lyfast.safetensors"
        net_l.save_weights(str(file_l), None, None)
        net_f.save_weights(str(file_f), None, None)

        unet, net = _load(lyfast, file_l, dtype)  # LyCORIS file -> lyfast
        assert all(type(lo).__module__.startswith("lyfast.") for lo in net.loras)
        assert len(net.loras) == len(net_l.loras)
        assert_close(run_unet(unet, inputs), ref, tol, "LyCORIS file loaded by lyfast")

        if lycoris_reloads:  # lyfast file -> LyCORIS
            unet, net = _load(lycoris, file_f, dtype)
            assert len(net.loras) == len(net_f.loras)
            assert_close(run_unet(unet, inputs), ref, tol, "lyfast file loaded by LyCORIS")
        else:
            with pytest.raises((RuntimeError, AttributeError)):
                _load(lycoris, file_f, dtype)


def test_half_precision_and_pt_files(tmp_path):
    dtype = torch.float64
    inputs = unet_inputs(dtype)
    with torch.no_grad():
        unet, net = _build(lycoris, dict(algo="loha", use_tucker=True), dtype)
        for p in net.parameters():  # make the values fp16-exact so the fp16 file loses nothing
            p.copy_(p.half())
        ref = run_unet(unet, inputs)
        net.save_weights(str(tmp_path / "w16.safetensors"), torch.float16, {"k": "v"})
        net.save_weights(str(tmp_path / "w.pt"), torch.float16, None)
        for file in ("w16.safetensors", "w.pt"):
            u, n = _load(lyfast, tmp_path / file, dtype)
            assert_close(run_unet(u, inputs), ref, 1e-12, file)


# ---------------------------------------------------------------------------------------------------------
# Bad files
# ---------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def good():
    """A small model and a valid LoHa / LoKr / BOFT state dict for it."""
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Conv2d(8, 16, 3))
    sd = {}
    configs = (("loha", dict(linear_dim=4)), ("lokr", dict(linear_dim=2, factor=2)), ("boft", dict(linear_dim=4)))
    for algo, kw in configs:
        net = lyfast.create_lycoris(model, 1.0, linear_alpha=1, algo=algo, **kw)
        randomize_(net)
        sd[algo] = {k: v.detach().clone() for lo in net.loras for k, v in
                    ((f"{lo.lora_name}.{p}", t) for p, t in lo.state_dict().items())}
    return model, sd


def _load_sd(model, sd):
    return lyfast.create_lycoris_from_weights(1.0, None, model, weights_sd=sd)[0]


def test_good_files_load(good):
    model, sds = good
    for algo, sd in sds.items():
        assert len(_load_sd(model, sd).loras) == 2, algo


@pytest.mark.parametrize("algo", ["loha", "lokr", "boft"])
def test_missing_alpha_names_the_key(good, algo):
    model, sds = good
    sd = dict(sds[algo])
    del sd["lycoris_0.alpha"]
    with pytest.raises(ValueError, match=r"lycoris_0\.alpha"):
        _load_sd(model, sd)


@pytest.mark.parametrize("algo,key", [("loha", "lycoris_0.hada_w1_b"), ("loha", "lycoris_1.hada_w2_a"),
                                      ("lokr", "lycoris_0.lokr_w1"), ("lokr", "lycoris_1.lokr_w2_b"),
                                      ("boft", "lycoris_0.oft_blocks")])
def test_wrong_shape_names_key_and_shapes(good, algo, key):
    model, sds = good
    sd = dict(sds[algo])
    bad = sd[key]
    sd[key] = torch.zeros(*bad.shape[:-1], bad.shape[-1] + 2)
    with pytest.raises(ValueError) as err:
        _load_sd(model, sd)
    msg = str(err.value)
    assert key.split(".")[0] in msg and key.split(".")[1] in msg and str(tuple(sd[key].shape)) in msg


@pytest.mark.parametrize("algo,key", [("loha", "lycoris_0.hada_w1_b"), ("lokr", "lycoris_1.lokr_w2_a"),
                                      ("loha", "lycoris_1.hada_t2")])
def test_missing_factor_names_the_key(good, algo, key):
    model, sds = good
    sd = dict(sds[algo])
    if key.endswith("hada_t2"):
        sd["lycoris_1.hada_t1"] = torch.zeros(4, 4, 3, 3)  # a lone hada_t1
    else:
        del sd[key]
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        _load_sd(model, sd)


def test_unknown_key_names_it(good):
    model, sds = good
    sd = dict(sds["loha"], **{"lycoris_0.hada_w3_a": torch.zeros(2)})
    with pytest.raises(ValueError, match=r"lycoris_0\.hada_w3_a"):
        _load_sd(model, sd)
    sd = dict(sds["lokr"], **{"lycoris_0.scalar": torch.ones(())})
    with pytest.raises(ValueError, match=r"lycoris_0\.scalar"):
        _load_sd(model, sd)


def test_keys_for_missing_layers_warn(good, caplog):
    model, sds = good
    sd = dict(sds["loha"], **{"lycoris_7_proj.hada_w1_a": torch.zeros(2, 2), "lycoris_7_proj.alpha": torch.ones(())})
    with caplog.at_level(logging.WARNING, logger="lyfast"):
        net = _load_sd(model, sd)
    assert len(net.loras) == 2 and "lycoris_7_proj" in caplog.text


@pytest.mark.parametrize("keys,algo", [
    ({"lycoris_0.lora_up.weight": (32, 4), "lycoris_0.lora_down.weight": (4, 16)}, "lora"),
    ({"lycoris_0.oft_blocks": (8, 4, 4)}, "diag-oft"),
    ({"lycoris_0.diff": (32, 16)}, "full"),
    ({"lycoris_0.on_input": ()}, "ia3"),
    ({"lycoris_0.a1.weight": (4, 16)}, "glora"),
])
def test_other_algorithms_are_named(good, keys, algo):
    model, _ = good
    sd = {k: torch.zeros(s) for k, s in keys.items()}
    sd["lycoris_0.alpha"] = torch.tensor(1.0)
    with pytest.raises(ValueError, match=algo):
        _load_sd(model, sd)


def test_lycoris_own_loader_on_lyfast_only_keys_fails_loudly(good):
    """Sanity of the premise: a file with keys of both LoHa and LoKr for one layer is rejected."""
    model, sds = good
    sd = dict(sds["loha"])
    sd["lycoris_0.lokr_w1"] = torch.zeros(4, 4)
    with pytest.raises(ValueError, match=r"lycoris_0\.lokr_w1"):
        _load_sd(model, sd)


# ---------------------------------------------------------------------------------------------------------
# kohya files (lora_unet_* / lora_te_*), both ways
# ---------------------------------------------------------------------------------------------------------
KOHYA_ARGS = {
    "loha": {"algo": "loha", "conv_dim": "3", "conv_alpha": "1", "use_tucker": "True"},
    "lokr": {"algo": "lokr", "factor": "4", "decompose_both": "True"},
    "boft": {"algo": "boft", "rescaled": "True", "constraint": "0.01"},
}


@pytest.mark.parametrize("algo", list(KOHYA_ARGS))
def test_kohya_files_interchange_both_ways(algo, tmp_path):
    import lycoris.kohya as lkohya
    import lyfast.kohya as fkohya
    from lyco_models import tiny_text_encoder, token_ids, write_kohya_preset

    dtype, tol = _dtype(algo), _tol(algo)
    preset = write_kohya_preset(tmp_path / "preset.toml", ["Transformer2DModel", "Downsample2D"],
                                ["conv_in", "time_embedding.linear_1"], ["CLIPAttention", "CLIPMLP"])
    args = dict(KOHYA_ARGS[algo], preset=preset)
    x, t, _ = unet_inputs(dtype)

    def build(module):
        te, unet = tiny_text_encoder(dtype), tiny_unet(dtype)
        net = module.create_network(1.0, 4, 2.0, None, te, unet, **args)
        net.apply_to(te, unet, True, True)
        net.to(dtype)
        randomize_(net)
        net.eval()
        return te, unet, net

    def load(module, file):
        te, unet = tiny_text_encoder(dtype), tiny_unet(dtype)
        net, _ = module.create_network_from_weights(1.0, str(file), None, te, unet)
        net.apply_to(te, unet, True, True)
        net.to(dtype)
        net.eval()
        return te, unet, net

    def output(te, unet):
        return run_unet(unet, (x, t, te(token_ids())))

    with torch.no_grad():
        te, unet, net_l = build(lkohya)
        ref = output(te, unet)
        assert net_l.text_encoder_loras and net_l.unet_loras
        te, unet, net_f = build(fkohya)
        assert_close(output(te, unet), ref, tol, "lyfast.kohya network, same values")
        assert list(net_f.state_dict()) == list(net_l.state_dict())
        for name, net in (("lycoris", net_l), ("lyfast", net_f)):
            net.save_weights(str(tmp_path / f"{name}.safetensors"), None, None)
        te, unet, net = load(fkohya, tmp_path / "lycoris.safetensors")
        assert len(net.loras) == len(net_l.loras)
        assert_close(output(te, unet), ref, tol, "LyCORIS kohya file loaded by lyfast.kohya")
        te, unet, net = load(lkohya, tmp_path / "lyfast.safetensors")
        assert len(net.loras) == len(net_f.loras)
        assert_close(output(te, unet), ref, tol, "lyfast.kohya file loaded by lycoris.kohya")
