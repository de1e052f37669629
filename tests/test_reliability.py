"""Regression tests for the defects that adversarial use found (issue 12), one or more per defect, numbered as
in the issue. Each failed on the code before its fix."""
from __future__ import annotations

import copy
import logging
import os
import pickle

import pytest
import torch
import torch.nn as nn

import lycoris
import lyfast
import lyfast.kohya as fkohya
import lyfast.network as lnet
from conftest import ALGOS, fast_cls, lyco_cls, randomize_
from lyco_models import one_thread  # noqa: F401  (autouse fixture)
from lyco_models import tiny_text_encoder, tiny_unet

NAME = "lycoris_test"


def _model(dtype=torch.float64, seed=0):
    """Two Linear layers and a 3x3 conv: what the default targeting adapts."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(16, 32), nn.Linear(32, 16), nn.Conv2d(16, 32, 3, padding=1)).to(dtype)
    return model.requires_grad_(False)


def _net(model, algo="loha", **kw):
    net = lyfast.create_lycoris(model, 1.0, 4, 2, algo=algo, **kw)
    net.apply_to()
    net.to(next(model.parameters()).dtype)
    with torch.no_grad():  # fp32-exact values: a file loader builds fp32 modules first, as LyCORIS does
        for p in net.parameters():
            p.copy_(torch.randn_like(p).mul(0.2 if p.ndim > 0 else 1).float())
    return net


def _run(model, x):
    return torch.cat([model[1](model[0](x)).flatten(), model[2](torch.ones(1, 16, 3, 3, dtype=x.dtype)).flatten()])


def _adapter(algo, layer, dtype=torch.float64, seed=0, **kw):
    torch.manual_seed(seed)
    layer = layer.to(dtype).requires_grad_(False)
    lora_dim = {"boft": 4}.get(algo, 4)
    m = fast_cls(algo)(NAME, layer, 1.0, lora_dim, 2, **kw).to(dtype)
    randomize_(m, seed=seed)
    with torch.no_grad():  # fp32-exact, as file loaders build fp32 modules
        for p in m.parameters():
            p.copy_(p.float())
    m.apply_to()
    return layer, m


# --------------------------------------------------------------------------------------------------- 1
@pytest.mark.parametrize("layer", [nn.Linear(16, 32), nn.Conv2d(8, 32, 3, padding=1)], ids=["linear", "conv2d"])
@pytest.mark.parametrize("rescaled", [False, True])
def test_1_boft_rebuild_trainable_bias_gets_g_like_lycoris(layer, rescaled):
    """BOFT rebuild mode rotates the weight only: a trainable bias gets g, not Rᵀg (LyCORIS is right)."""
    x = torch.randn(3, *((16,) if isinstance(layer, nn.Linear) else (8, 5, 5)))
    grads = {}
    for lib, cls in (("lyco", lyco_cls("boft")), ("fast", fast_cls("boft"))):
        lin = copy.deepcopy(layer).requires_grad_(True)
        m = cls(NAME, lin, 1.0, 4, 1.0, rescaled=rescaled)
        randomize_(m, seed=3, block_scale=0.3)
        m.apply_to()
        out = lin(x)
        g = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
        (out * g).sum().backward()
        grads[lib] = (lin.bias.grad.clone(), lin.weight.grad.clone(), g)
    g = grads["fast"][2]
    expected = g.sum(0) if g.dim() == 2 else g.sum((0, 2, 3))
    torch.testing.assert_close(grads["fast"][0], expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grads["fast"][0], grads["lyco"][0], rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------------------------------- 2
@pytest.mark.parametrize("ext", [".safetensors", ".pt"])
def test_2_load_weights_refuses_dora_scale_naming_the_key(tmp_path, ext):
    """load_weights must not drop dora_scale with a warning (the model would differ from the file's by O(1)):
    a network without DoRA adapters refuses the file naming the key; the file's own loader builds DoRA ones."""
    net = _net(_model())
    sd = {k: v.detach() for k, v in net.state_dict().items()}
    key = f"{net.loras[0].lora_name}.dora_scale"
    sd[key] = torch.ones(32, 1, dtype=torch.float64)
    file = str(tmp_path / f"dora{ext}")
    lnet.save_state_dict_file(sd, file)
    other = _net(_model())
    with pytest.raises(ValueError, match=key.replace(".", r"\.") + ".*dora_wd=True"):
        other.load_weights(file)
    loaded, _ = lyfast.create_lycoris_from_weights(1.0, file, _model())
    module = next(m for m in loaded.loras if m.lora_name == key.rsplit(".", 1)[0])
    assert module.wd and torch.equal(module.dora_scale.detach().to(sd[key].dtype), sd[key])


# -------------------------------------------------------------------------------------------------- 15
@pytest.mark.parametrize("layer", [nn.Linear(16, 32), nn.Conv2d(8, 32, 3, padding=1, bias=False)],
                         ids=["linear", "conv2d"])
@pytest.mark.parametrize("bypass", [False, True])
def test_15_boft_rescaled_multiplier_zero_is_the_frozen_model(layer, bypass):
    """sd-scripts' differential output preservation relies on multiplier 0 giving the frozen model."""
    layer, m = _adapter("boft", copy.deepcopy(layer), rescaled=True, bypass_mode=bypass)
    with torch.no_grad():
        m.rescale.mul_(1.5)
    x = torch.randn(2, *((16,) if isinstance(layer, nn.Linear) else (8, 4, 4)), dtype=torch.float64)
    adapted = layer(x)
    m.multiplier = 0.0
    frozen = layer(x)
    m.restore()
    assert (adapted - layer(x)).abs().max() > 0.1  # the adapter does something at multiplier 1
    torch.testing.assert_close(frozen, layer(x), rtol=0, atol=1e-12)


def test_15_boft_rescaled_merge_equals_forward_at_any_multiplier():
    layer, m = _adapter("boft", nn.Linear(16, 32), rescaled=True)
    x = torch.randn(3, 16, dtype=torch.float64)
    m.multiplier = 0.4
    adapted = layer(x)
    m.restore()
    m.merge_to(0.4)
    torch.testing.assert_close(layer(x), adapted, rtol=1e-10, atol=1e-10)


def test_15_boft_rescaled_multiplier_one_still_matches_lycoris():
    outs = []
    for cls in (lyco_cls("boft"), fast_cls("boft")):
        lin = nn.Linear(16, 32).requires_grad_(False)
        torch.manual_seed(0)
        lin.reset_parameters()
        m = cls(NAME, lin, 1.0, 4, 1.0, rescaled=True)
        randomize_(m, seed=2)
        m.apply_to()
        outs.append(lin(torch.ones(2, 16)))
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("decompose_both", [False, True])
def test_15_lokr_full_matrix_rs_lora_file_reloads_as_trained(tmp_path, decompose_both):
    """LoKr with both factors full (full_matrix) and rs_lora: the saved file must rebuild the trained network
    (LyCORIS trains with √r but every reload, its own included, uses 1)."""
    layer, m = _adapter("lokr", nn.Linear(16, 32), full_matrix=True, rs_lora=True, decompose_both=decompose_both)
    x = torch.randn(3, 16, dtype=torch.float64)
    trained = layer(x)
    sd = {f"{NAME}.{k}": v.detach() for k, v in m.state_dict().items()}
    fresh = nn.Linear(16, 32).double().requires_grad_(False)
    fresh.load_state_dict(layer.state_dict())
    net, _ = lyfast.create_lycoris_from_weights(1.0, None, nn.Sequential(fresh), weights_sd=
                                                {k.replace(NAME, "lycoris_0"): v for k, v in sd.items()})
    net.apply_to()
    net.to(torch.float64)
    torch.testing.assert_close(fresh(x), trained, rtol=1e-12, atol=1e-12)
    assert m.scale == 1.0


# --------------------------------------------------------------------------------------------------- 3
EMPTY_CASES = [
    ("linear", lambda: nn.Linear(16, 32), (0, 16)),
    ("linear_tokens", lambda: nn.Linear(16, 32), (2, 0, 16)),
    ("conv2d", lambda: nn.Conv2d(16, 32, 3, padding=1), (0, 16, 5, 5)),
    ("conv1d", lambda: nn.Conv1d(16, 32, 3), (0, 16, 7)),
]


@pytest.mark.parametrize("algo", ALGOS)
@pytest.mark.parametrize("case", EMPTY_CASES, ids=lambda c: c[0])
@pytest.mark.parametrize("bypass", [False, True])
def test_3_zero_size_batches_forward_and_backward(algo, case, bypass):
    _, make, shape = case
    layer, m = _adapter(algo, make(), bypass_mode=bypass)
    x = torch.zeros(shape, dtype=torch.float64, requires_grad=True)
    out = layer(x)
    m.restore()
    assert out.shape == layer(x).shape
    out.sum().backward()
    assert x.grad is not None and x.grad.shape == x.shape
    for name, p in m.named_parameters():
        assert p.grad is not None and torch.count_nonzero(p.grad) == 0, name


@pytest.mark.parametrize("algo", ALGOS)
@pytest.mark.parametrize("case", EMPTY_CASES, ids=lambda c: c[0])
def test_3_zero_size_batch_under_triton_interpreter_backend(algo, case, monkeypatch):
    """The empty batch never reaches a backend (the Triton interpreter crashed on it)."""
    pytest.importorskip("triton")
    _, make, shape = case
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    previous = lyfast.set_backend("triton")
    try:
        layer, m = _adapter(algo, make(), dtype=torch.float32)
        x = torch.zeros(shape, requires_grad=True)
        out = layer(x)
        out.sum().backward()
    finally:
        lyfast.set_backend(previous)
    assert out.numel() == 0 and x.grad.shape == x.shape


# --------------------------------------------------------------------------------------------------- 4
UNBATCHED = [
    ("conv1d", lambda: nn.Conv1d(16, 32, 3, padding=1), (16, 7)),
    ("conv2d", lambda: nn.Conv2d(16, 32, 3, padding=1), (16, 5, 5)),
    ("conv3d", lambda: nn.Conv3d(8, 32, 3, padding=1), (8, 3, 4, 4)),
    ("conv2d_groups", lambda: nn.Conv2d(16, 32, 3, padding=1, groups=2), (16, 5, 5)),
]


@pytest.mark.parametrize("algo", ALGOS)
@pytest.mark.parametrize("case", UNBATCHED, ids=lambda c: c[0])
def test_4_unbatched_conv_input_equals_batch_of_one(algo, case):
    """nn.Conv and LyCORIS accept (C, *spatial); lyfast gave "size of tensor a (5) must match ...". """
    _, make, shape = case
    layer, m = _adapter(algo, make())
    x = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    out = layer(x)
    g = torch.randn(out.shape, dtype=torch.float64)
    (out * g).sum().backward()
    grads = {n: p.grad.clone() for n, p in m.named_parameters()}
    m.zero_grad()
    xb = x.detach().unsqueeze(0).requires_grad_(True)
    ref = layer(xb)
    (ref * g.unsqueeze(0)).sum().backward()
    torch.testing.assert_close(out, ref.squeeze(0), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(x.grad, xb.grad.squeeze(0), rtol=1e-12, atol=1e-12)
    for n, p in m.named_parameters():
        torch.testing.assert_close(grads[n], p.grad, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("algo", ALGOS)
@pytest.mark.parametrize("bypass", [False, True])
def test_4_one_dimensional_linear_input_keeps_its_shape(algo, bypass):
    """nn.Linear takes (in,) and returns (out,); LyCORIS's BOFT bypass returns (1, out) (found by the bf16
    property)."""
    layer, m = _adapter(algo, nn.Linear(16, 32), bypass_mode=bypass)
    x = torch.randn(16, dtype=torch.float64)
    out = layer(x)
    assert out.shape == (32,)
    torch.testing.assert_close(out, layer(x.unsqueeze(0)).squeeze(0), rtol=1e-12, atol=1e-12)


# --------------------------------------------------------------------------------------------------- 5
@pytest.mark.parametrize("algo", ALGOS)
def test_5_apply_to_twice_is_harmless(algo):
    layer, m = _adapter(algo, nn.Linear(16, 32))
    x = torch.randn(2, 16, dtype=torch.float64)
    once = layer(x)
    m.apply_to()
    torch.testing.assert_close(layer(x), once, rtol=0, atol=0)
    m.restore()
    assert layer.forward.__func__ is nn.Linear.forward


def test_5_network_apply_to_twice_is_harmless():
    model = _model()
    x = torch.randn(2, 16, dtype=torch.float64)
    base = _run(model, x)
    net = _net(model)
    once = _run(model, x)
    net.apply_to()
    torch.testing.assert_close(_run(model, x), once, rtol=0, atol=0)
    net.restore()
    torch.testing.assert_close(_run(model, x), base, rtol=0, atol=0)


# --------------------------------------------------------------------------------------------------- 6, 14
@pytest.mark.parametrize("alpha", [lambda a: a.reshape(1), lambda a: float(a)], ids=["shape1", "python_float"])
def test_6_14_alpha_of_shape_1_or_python_float_loads(alpha):
    """create_lycoris_from_weights rejected alpha (1,) (files in the wild have it) and raised AttributeError
    on a Python float alpha."""
    model = _model()
    x = torch.randn(2, 16, dtype=torch.float64)
    net = _net(model, algo="lokr")
    ref = _run(model, x)
    sd = {k: (alpha(v.detach()) if k.endswith(".alpha") else v.detach()) for k, v in net.state_dict().items()}
    fresh = _model()
    loaded, _ = lyfast.create_lycoris_from_weights(1.0, None, fresh, weights_sd=sd)
    loaded.apply_to()
    loaded.to(torch.float64)
    torch.testing.assert_close(_run(fresh, x), ref, rtol=1e-12, atol=1e-12)
    other = _net(_model(), algo="lokr")  # and load_weights' path
    assert other._load_weights_sd(sd) == {}


def test_6_alpha_with_several_values_names_the_key():
    net = _net(_model())
    sd = {k: v.detach() for k, v in net.state_dict().items()}
    key = next(k for k in sd if k.endswith(".alpha"))
    sd[key] = torch.ones(2)
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        lyfast.create_lycoris_from_weights(1.0, None, _model(), weights_sd=sd)


def test_14_non_tensor_value_names_the_key():
    net = _net(_model())
    sd = {k: v.detach() for k, v in net.state_dict().items()}
    key = next(k for k in sd if not k.endswith(".alpha"))
    sd[key] = "garbage"
    with pytest.raises(TypeError, match=key.replace(".", r"\.")):
        lyfast.create_lycoris_from_weights(1.0, None, _model(), weights_sd=sd)


# --------------------------------------------------------------------------------------------------- 7
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize("algo", ALGOS)
def test_7_nan_or_inf_in_a_file_names_the_key(tmp_path, bad, algo):
    net = _net(_model(), algo=algo)
    sd = {k: v.detach().clone() for k, v in net.state_dict().items()}
    key = sorted(k for k in sd if not k.endswith(".alpha"))[0]
    sd[key].view(-1)[0] = bad
    file = str(tmp_path / "bad.safetensors")
    lnet.save_state_dict_file(sd, file)
    what = "NaN" if bad != bad else "Inf"
    with pytest.raises(ValueError, match=f"{key.replace('.', r'[.]')}.*{what}"):
        lyfast.create_lycoris_from_weights(1.0, file, _model())
    other = _net(_model(), algo=algo)
    with pytest.raises(ValueError, match=f"{key.replace('.', r'[.]')}.*{what}"):
        other.load_weights(file)


# --------------------------------------------------------------------------------------------------- 8
@pytest.mark.parametrize("ext", [".pt", ".safetensors"])
def test_8_failed_save_leaves_the_old_file_intact(tmp_path, monkeypatch, ext):
    net = _net(_model())
    file = tmp_path / f"w{ext}"
    net.save_weights(str(file), None, None)
    before = file.read_bytes()

    def full_disk(obj, f, *args, **kwargs):
        with open(f, "wb") as fh:
            fh.write(b"partial")
        raise OSError(28, "No space left on device")

    import safetensors.torch

    monkeypatch.setattr(torch, "save", full_disk)
    monkeypatch.setattr(safetensors.torch, "save_file", full_disk)
    with torch.no_grad():
        next(net.parameters()).add_(1)
    with pytest.raises(OSError, match="No space"):
        net.save_weights(str(file), None, None)
    assert file.read_bytes() == before
    assert os.listdir(tmp_path) == [file.name]  # no temporary file left behind


def test_8_saved_file_mode_is_a_plain_files(tmp_path):
    net = _net(_model())
    file = tmp_path / "w.pt"
    net.save_weights(str(file), None, None)
    umask = os.umask(0)
    os.umask(umask)
    assert file.stat().st_mode & 0o777 == 0o666 & ~umask


# --------------------------------------------------------------------------------------------------- 9
@pytest.mark.parametrize("algo", ALGOS)
@pytest.mark.parametrize("max_norm", [0.0, -1.0, float("nan"), float("inf")])
def test_9_max_norm_must_be_positive(algo, max_norm):
    net = _net(_model(), algo=algo)
    before = [p.detach().clone() for p in net.parameters()]
    with pytest.raises(ValueError, match="max_norm"):
        net.apply_max_norm_regularization(max_norm, "cpu")
    assert all(torch.equal(a, b.detach()) for a, b in zip(before, net.parameters()))


# -------------------------------------------------------------------------------------------------- 10
def test_10_accelerate_warns_about_what_it_cannot_speed_up(caplog):
    model = _model(torch.float32)
    net = lycoris.create_lycoris(model, 1.0, 4, 1, algo="locon")
    net.apply_to()
    with caplog.at_level(logging.WARNING, logger="lyfast"):
        assert lyfast.accelerate(net) == 0
    assert "LoConModule" in caplog.text and "not accelerated" in caplog.text


def test_10_accelerate_warns_when_nothing_is_there(caplog):
    with caplog.at_level(logging.WARNING, logger="lyfast"):
        assert lyfast.accelerate(_model()) == 0
    assert "nothing was accelerated" in caplog.text


@pytest.mark.parametrize("obj", [None, 3, "net"])
def test_10_accelerate_rejects_what_is_not_a_network(obj):
    with pytest.raises(TypeError, match="accelerate"):
        lyfast.accelerate(obj)


# -------------------------------------------------------------------------------------------------- 11
@pytest.fixture(scope="module")
def kohya_models():
    return tiny_text_encoder(torch.float32), tiny_unet(torch.float32)


@pytest.mark.parametrize("args,key", [
    (dict(factor="2.7"), "factor"), (dict(conv_dim="3.5"), "conv_dim"), (dict(dropout="lots"), "dropout"),
    (dict(use_tucker="Ture"), "use_tucker"), (dict(rescaled="maybe"), "rescaled"),
])
def test_11_network_args_are_parsed_strictly(kohya_models, args, key):
    te, unet = kohya_models
    with pytest.raises(ValueError, match=key):
        fkohya.create_network(1.0, 4, 1.0, None, te, unet, algo="lokr", preset="attn-mlp", **args)


def test_11_integral_strings_still_parse(kohya_models):
    te, unet = kohya_models
    net = fkohya.create_network(1.0, 4, 1.0, None, te, unet, algo="lokr", preset="attn-mlp", factor="4.0",
                                use_tucker="yes")
    assert net.loras and all(lo.lokr_w1.shape[1] in (4, 8) for lo in net.loras if hasattr(lo, "lokr_w1"))


# -------------------------------------------------------------------------------------------------- 12
def test_12_upper_case_safetensors_suffix_is_read_and_written_as_safetensors(tmp_path):
    from safetensors.torch import load_file

    net = _net(_model())
    file = str(tmp_path / "W.SAFETENSORS")
    net.save_weights(file, None, {"k": "v"})
    assert set(load_file(file)) == set(net.state_dict())  # really a safetensors file
    other = _net(_model(), algo="loha")
    assert other.load_weights(file) == {}


def test_12_format_is_read_from_content_not_suffix(tmp_path):
    net = _net(_model())
    file = str(tmp_path / "weights.bin")
    from safetensors.torch import save_file

    save_file({k: v.detach().contiguous() for k, v in net.state_dict().items()}, file)
    assert set(lnet.load_state_dict_file(file)) == set(net.state_dict())


@pytest.mark.parametrize("zipfile", [True, False], ids=["zip", "legacy"])
def test_12_torch_file_named_safetensors_is_read_as_torch(tmp_path, zipfile):
    net = _net(_model())
    file = str(tmp_path / "misnamed.safetensors")
    torch.save({k: v.detach() for k, v in net.state_dict().items()}, file, _use_new_zipfile_serialization=zipfile)
    assert set(lnet.load_state_dict_file(file)) == set(net.state_dict())


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_12_unpicklable_file_is_refused_without_suggesting_weights_only_false(tmp_path):
    file = tmp_path / "evil.SAFETENSORS"
    with open(file, "wb") as f:
        pickle.dump({"x": _Evil()}, f)
    with pytest.raises(ValueError) as info:
        lnet.load_state_dict_file(str(file))
    assert "weights_only=False" not in str(info.value) and "evil.SAFETENSORS" in str(info.value)


# -------------------------------------------------------------------------------------------------- 13
@pytest.fixture
def restore_presets():
    yield
    cls = lyfast.LycorisNetwork
    cls.TARGET_REPLACE_MODULE = ["Linear", "Conv1d", "Conv2d", "Conv3d", "GroupNorm", "LayerNorm"]
    cls.TARGET_REPLACE_NAME, cls.TARGET_EXCLUDE_NAME = [], []
    cls.MODULE_ALGO_MAP, cls.NAME_ALGO_MAP = {}, {}


@pytest.mark.parametrize("key", ["module_algo_map", "name_algo_map"])
def test_13_override_key_typo_raises(restore_presets, key):
    preset = {"target_module": ["Linear"], key: {"Linear" if key == "module_algo_map" else "0": {"factr": 2}}}
    with pytest.raises(ValueError, match="factr"):
        lyfast.create_lycoris(_model(), 1.0, 4, 1, algo="lokr", preset=preset)


@pytest.mark.parametrize("key", ["target_module", "target_name", "exclude_name", "unet_target_module"])
def test_13_target_list_given_as_string_raises(restore_presets, key):
    with pytest.raises(TypeError, match=f"{key}.*list"):
        lyfast.create_lycoris(_model(), 1.0, 4, 1, algo="loha", preset={key: "Linear"})


class _Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(16, 16)

    def forward(self, x):
        return self.proj(x)


def test_13_name_override_shadowed_by_a_block_warns(restore_presets, caplog):
    model = nn.Sequential(_Block())
    preset = {"target_module": ["_Block"], "name_algo_map": {"0.proj": {"algo": "lokr"}}}
    with caplog.at_level(logging.WARNING, logger="lyfast"):
        lyfast.create_lycoris(model, 1.0, 4, 1, algo="loha", preset=preset)
    assert "0.proj" in caplog.text and "does not apply" in caplog.text


# -------------------------------------------------------------------------------------------------- 14
@pytest.mark.parametrize("algo", ["loha", "lokr"])
@pytest.mark.parametrize("dim,exc", [(0, ValueError), (-2, ValueError), (2.5, TypeError), (True, ValueError)])
def test_14_bad_lora_dim_names_it(algo, dim, exc):
    with pytest.raises(exc, match="lora_dim"):
        fast_cls(algo)(NAME, nn.Linear(16, 32), 1.0, dim, 1)


@pytest.mark.parametrize("name,dtype", [("float16", torch.float16), ("bf16", torch.bfloat16)])
def test_14_save_weights_accepts_dtype_names(tmp_path, name, dtype):
    net = _net(_model())
    file = str(tmp_path / "w.safetensors")
    net.save_weights(file, name, None)
    assert {v.dtype for v in lnet.load_state_dict_file(file).values()} == {dtype}


@pytest.mark.parametrize("dtype,exc", [(torch.int32, ValueError), (torch.bool, ValueError), ("int8", ValueError),
                                       (3, TypeError)])
def test_14_save_weights_rejects_non_float_dtypes(tmp_path, dtype, exc):
    net = _net(_model())
    with pytest.raises(exc, match="dtype"):
        net.save_weights(str(tmp_path / "w.safetensors"), dtype, None)
    assert not os.listdir(tmp_path)


def test_14_kohya_save_weights_rejects_non_float_dtypes(tmp_path, kohya_models):
    te, unet = kohya_models
    net = fkohya.create_network(1.0, 4, 1.0, None, te, unet, algo="loha", preset="attn-mlp")
    net.apply_to(te, unet, True, True)
    with pytest.raises(ValueError, match="dtype"):
        net.save_weights(str(tmp_path / "w.safetensors"), torch.int64, None)


def test_14_profile_memory_unknown_setting_is_a_usage_error(capsys):
    from lyfast.profile import profile_memory

    with pytest.raises(SystemExit):
        profile_memory(["--settings", "nope"])
    assert "nope" in capsys.readouterr().err


# -------------------------------------------------------------------------------------------------- 16
def test_16_kohya_apply_to_without_flags_applies_both(kohya_models):
    """sd-scripts' gen_img.py calls network.apply_to(text_encoders, unet)."""
    te, unet = copy.deepcopy(kohya_models[0]), copy.deepcopy(kohya_models[1])
    net = fkohya.create_network(1.0, 4, 1.0, None, te, unet, algo="loha", preset="attn-mlp")
    n_te, n_unet = len(net.text_encoder_loras), len(net.unet_loras)
    net.apply_to(te, unet)
    assert n_te and n_unet and len(net.loras) == n_te + n_unet
    assert all(lora.org_module[0].forward == lora.forward for lora in net.loras)
