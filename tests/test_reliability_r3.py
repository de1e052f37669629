"""Regression tests for issue 20 (reliability, round 3), one or more per item, numbered as in the issue. Each
failed on the code before its fix."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from conftest import fast_cls, randomize_
from lyco_models import one_thread  # noqa: F401  (autouse fixture)

NAME = "lycoris_test"


def _adapted_linear(algo, dtype=torch.float64, seed=0, **kw):
    torch.manual_seed(seed)
    layer = nn.Linear(16, 32).to(dtype).requires_grad_(False)
    m = fast_cls(algo)(NAME, layer, 1.0, 4, 2, **kw).to(dtype)
    randomize_(m, seed=seed)
    return layer, m


# --------------------------------------------------------------------------------------------------- 3
@pytest.mark.parametrize("algo", ["loha", "lokr", "boft"])
@pytest.mark.parametrize("dora", [False, True], ids=["plain", "dora"])
@pytest.mark.parametrize("multiplier", [0.0, 0.7])
def test_3_replaced_forward_is_called_not_recomputed_from_the_weight(algo, dora, multiplier):
    """A replaced `layer.forward` (monkeypatch; accelerate's cpu_offload and diffusers' layerwise casting do the
    same) is what the adapter adds to: the adapted layer is the replaced forward plus the same contribution as on
    the plain layer (LoHa/LoKr, DoRA included: DoRA at multiplier 0 still adds ΔW·x, as LyCORIS), and BOFT at
    multiplier 0 is exactly the replaced forward."""
    if algo == "boft" and dora:
        pytest.skip("BOFT has no DoRA in LyCORIS 4.1.3")
    if algo == "boft" and multiplier:
        pytest.skip("BOFT rotates the layer's output: not base + delta")
    kw = {"weight_decompose": True} if dora else {}
    layer, m = _adapted_linear(algo, **kw)
    reference = nn.Linear.forward.__get__(layer)
    layer.forward = lambda x: reference(x) * 2 + 1  # the layer computes something else than F.linear(x, W, b)
    m.multiplier = multiplier
    m.apply_to()
    x = torch.randn(3, 16, dtype=torch.float64)
    out = layer(x)
    replaced = reference(x) * 2 + 1
    if algo == "boft":
        torch.testing.assert_close(out, replaced, rtol=0, atol=0)
        return
    plain, m2 = _adapted_linear(algo, **kw)
    m2.multiplier = multiplier
    m2.apply_to()
    contribution = plain(x) - nn.Linear.forward(plain, x)
    torch.testing.assert_close(out - replaced, contribution, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("algo", ["loha", "lokr"])
def test_3_diffusers_layerwise_casting_runs_and_adds_the_same_contribution(algo):
    """diffusers' layerwise casting stores W in fp8 and upcasts it in a hook around forward: the adapted layer
    must call that forward (reading W directly gave a dtype error)."""
    hooks = pytest.importorskip("diffusers.hooks")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32)).requires_grad_(False)
    hooks.apply_layerwise_casting(model, storage_dtype=torch.float8_e4m3fn, compute_dtype=torch.float32)
    layer = model[0]
    m = fast_cls(algo)(NAME, layer, 1.0, 4, 2)
    randomize_(m, seed=1)
    m.apply_to()
    x = torch.randn(3, 16)
    out = layer(x)
    m.restore()
    base = layer(x)  # the hooked forward alone
    delta = out - base
    expected = m.delta_weight(1.0).float() @ x.T
    torch.testing.assert_close(delta, expected.T, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------------------------------- 2
SAVE_DTYPES = ["float32", "float16", "bfloat16", "float64"]
RECIPES = {  # (linear_dim, linear_alpha, kwargs): the recipes users run
    "loha": (4, 2, dict(algo="loha")),
    "lokr": (4, 2, dict(algo="lokr")),
    "lokr-full": (100000, 1, dict(algo="lokr", full_matrix=True)),  # alpha stored as lora_dim = 100000
    "boft": (4, 1, dict(algo="boft")),
}


def _small_model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(16, 32), nn.Linear(32, 16), nn.Conv2d(16, 32, 3, padding=1)).requires_grad_(False)


def _outputs(model):
    torch.manual_seed(7)
    x, img = torch.randn(3, 16), torch.randn(1, 16, 3, 3)
    with torch.no_grad():
        return torch.cat([model[1](model[0](x)).flatten(), model[2](img).flatten()])


def _trained(recipe):
    import lyfast

    dim, alpha, kw = RECIPES[recipe]
    model = _small_model()
    net = lyfast.create_lycoris(model, 1.0, dim, alpha, **kw)
    net.apply_to()
    torch.manual_seed(1)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn_like(p) * 0.2)
    return model, net


def _reload_both(file, lyfast, lycoris):
    """The outputs of the model with the file loaded by lyfast, and by LyCORIS."""
    outs = []
    for lib in (lyfast, lycoris):
        model = _small_model()
        net, _ = lib.create_lycoris_from_weights(1.0, str(file), model)
        net.apply_to()
        outs.append(_outputs(model))
    return outs


@pytest.mark.parametrize("save_dtype", SAVE_DTYPES)
@pytest.mark.parametrize("recipe", list(RECIPES))
def test_2_every_save_dtype_reloads_in_lyfast_and_lycoris_as_trained(tmp_path, recipe, save_dtype):
    import lycoris
    import lyfast

    model, net = _trained(recipe)
    trained, base = _outputs(model), None
    net.restore()
    base = _outputs(model)
    file = tmp_path / "net.safetensors"
    net.save_weights(str(file), getattr(torch, save_dtype), {})
    reloaded, lyco = _reload_both(file, lyfast, lycoris)
    contribution = (trained - base).abs().max().item()
    eps = torch.finfo(getattr(torch, save_dtype)).eps
    # the file holds the factors rounded once to the save dtype: a few roundings of the contribution
    assert (reloaded - trained).abs().max().item() <= 64 * eps * contribution + 1e-6 * contribution
    torch.testing.assert_close(lyco, reloaded, rtol=1e-5, atol=1e-5 * contribution)


def test_2_full_fp16_network_keeps_alpha_and_its_file_reloads(tmp_path):
    """kohya's --full_fp16 casts the network to fp16: alpha stays float32 (100000 would become inf) and the
    fp16 file reloads as trained."""
    import lycoris
    import lyfast

    model, net = _trained("lokr-full")
    net.to(torch.float16)
    assert all(torch.isfinite(m.alpha) and m.alpha.dtype == torch.float32 for m in net.loras)
    net.to(torch.float32)
    trained = _outputs(model)
    file = tmp_path / "net.safetensors"
    net.save_weights(str(file), torch.float16, {})
    reloaded, lyco = _reload_both(file, lyfast, lycoris)
    torch.testing.assert_close(reloaded, trained, rtol=0, atol=0)
    torch.testing.assert_close(lyco, reloaded, rtol=1e-5, atol=1e-5)


def test_2_a_weight_that_overflows_the_save_dtype_is_an_error_naming_the_key(tmp_path):
    model, net = _trained("loha")
    with torch.no_grad():
        net.loras[0].hada_w1_a[0, 0] = 1e6
    file = tmp_path / "net.safetensors"
    with pytest.raises(ValueError, match=r"hada_w1_a.*overflow torch.float16"):
        net.save_weights(str(file), torch.float16, {})
    assert not file.exists()
    net.save_weights(str(file), torch.bfloat16, {})  # bf16 holds it


def test_2_older_fp16_full_matrix_lokr_file_with_inf_alpha_loads(tmp_path):
    """Files written before the fix (alpha inf, unused for two full factors) load, as LyCORIS loads them."""
    import lyfast
    from safetensors.torch import save_file

    model, net = _trained("lokr-full")
    trained = _outputs(model)
    sd = {k: (torch.tensor(float("inf")) if k.endswith(".alpha") else v.half()) for k, v in net.state_dict().items()}
    save_file(sd, str(tmp_path / "old.safetensors"))
    model2 = _small_model()
    net2, _ = lyfast.create_lycoris_from_weights(1.0, str(tmp_path / "old.safetensors"), model2)
    net2.apply_to()
    torch.testing.assert_close(_outputs(model2), trained, rtol=2e-3, atol=2e-3)


# --------------------------------------------------------------------------------------------------- 1
def test_1_half_precision_cpu_convs_run_without_onednn():
    """oneDNN's fp16 CPU conv segfaults on some Intel CPUs: the suite runs PyTorch's native kernels."""
    assert not torch.backends.mkldnn.enabled
    conv = nn.Conv2d(6, 32, (2, 1), stride=(2, 2), padding=(2, 1), dilation=(2, 2), groups=2, bias=False).half()
    assert conv(torch.randn(6, 5, 1).half()).shape == (32, 4, 2)  # the crashing geometry


def test_1_a_crashing_test_fails_and_the_run_goes_on(tmp_path):
    """`make test`'s pytest-xdist: a segfault fails its test, the other tests still run and pass."""
    import subprocess
    import sys

    (tmp_path / "test_crash.py").write_text(
        "import os, signal\n\n"
        "def test_a_crash():\n    os.kill(os.getpid(), signal.SIGSEGV)\n\n"
        "def test_after():\n    assert True\n")
    run = subprocess.run([sys.executable, "-m", "pytest", "-n", "1", "-p", "no:cacheprovider", "-q", str(tmp_path)],
                         capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert run.returncode == 1, run.stdout[-2000:]
    assert "1 failed, 1 passed" in run.stdout, run.stdout[-2000:]


# --------------------------------------------------------------------------------------------------- 4
def _conv_adapters(lib, **kw):
    net = lib.create_lycoris(_small_model(), 1.0, 4, 2, algo="loha", **kw)
    return {lora.lora_name: (lora.scale, float(lora.alpha)) for lora in net.loras if "2" in lora.lora_name}


@pytest.mark.parametrize("kw", [dict(conv_alpha="0"), dict(conv_alpha=0), dict(conv_alpha="0.0"), dict(conv_alpha=0.0),
                                dict(conv_alpha="3"), dict(conv_alpha=None), dict(conv_dim="0"),
                                dict(conv_dim="8", conv_alpha="0"), dict(conv_dim=8, conv_alpha=0)], ids=repr)
def test_4_conv_dim_and_alpha_zero_as_string_or_number_match_lycoris(kw):
    """LyCORIS: the string "0" (what kohya passes) is 0 -- conv_alpha "0" gives alpha = dim, scale 1; the number
    0 means the network's value. lyfast gives the same adapters with the same scale."""
    import lycoris
    import lyfast

    mine, theirs = _conv_adapters(lyfast, **kw), _conv_adapters(lycoris, **kw)
    assert set(mine) == set(theirs)  # (conv_dim=0 as a number: lyfast adapts no conv, LyCORIS does; see below)
    for name in theirs:
        assert mine[name] == pytest.approx(theirs[name]), name


def test_4_kohya_conv_alpha_string_zero_matches_lycoris():
    import lycoris.kohya as lkohya

    import lyfast.kohya as fkohya
    from lyco_models import tiny_text_encoder, tiny_unet

    args = dict(algo="loha", conv_dim="4", conv_alpha="0", preset="unet-convblock-only")
    nets = [k.create_network(1.0, 4, 1, None, tiny_text_encoder(), tiny_unet(), **args) for k in (fkohya, lkohya)]
    scales = [sorted((m.lora_name, m.scale) for m in n.unet_loras if "conv" in m.lora_name) for n in nets]
    assert scales[0] and scales[0] == scales[1]


def test_4_conv_dim_number_zero_adapts_no_conv_and_warns_that_lycoris_differs(caplog):
    import lyfast

    with caplog.at_level("WARNING", logger="lyfast"):
        assert _conv_adapters(lyfast, conv_dim=0) == {}
    assert "LyCORIS would adapt them" in caplog.text


# --------------------------------------------------------------------------------------------------- 5
@pytest.mark.parametrize("multiplier", [0.5, 0.0, 1.3])
def test_5_kohya_merge_to_merges_at_the_network_multiplier(tmp_path, multiplier):
    """sd-scripts' gen_img `--network_mul 0.5 --network_merge`: create_network_from_weights(0.5, ...) then
    merge_to(...): the merged model equals the applied network at 0.5 (LyCORIS merges at 1.0)."""
    import lyfast.kohya as fkohya
    from conftest import randomize_ as randomize
    from lyco_models import tiny_text_encoder, tiny_unet

    te, unet = tiny_text_encoder(torch.float64), tiny_unet(torch.float64)
    net = fkohya.create_network(1.0, 4, 2.0, None, te, unet, algo="loha", preset="attn-mlp")
    net.apply_to(te, unet, True, True)
    net.to(torch.float64)
    randomize(net)
    file = tmp_path / "w.safetensors"
    net.save_weights(str(file), None, None)

    def output(te_, unet_):
        torch.manual_seed(3)
        ids = torch.randint(0, 16, (1, 5))
        with torch.no_grad():
            return te_(ids)[0].flatten()

    applied_te, applied_unet = tiny_text_encoder(torch.float64), tiny_unet(torch.float64)
    applied, _ = fkohya.create_network_from_weights(multiplier, str(file), None, applied_te, applied_unet)
    applied.apply_to(applied_te, applied_unet, True, True)
    applied.to(torch.float64)
    want = output(applied_te, applied_unet)
    te3, unet3 = tiny_text_encoder(torch.float64), tiny_unet(torch.float64)
    merged, sd = fkohya.create_network_from_weights(multiplier, str(file), None, te3, unet3, for_inference=True)
    for lora in merged.loras:
        lora.to(torch.float64)
    merged.merge_to(te3, unet3, sd, torch.float64, "cpu")
    got = output(te3, unet3)
    base = output(tiny_text_encoder(torch.float64), tiny_unet(torch.float64))
    assert (want - base).abs().max() > 1e-3 or multiplier == 0
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


# --------------------------------------------------------------------------------------------------- 6
PADDINGS = [dict(padding=1, padding_mode="reflect"), dict(padding=1, padding_mode="replicate"),
            dict(padding=(1, 2), padding_mode="circular"), dict(padding="same", kernel_size=4),
            dict(padding="same", kernel_size=(2, 3), padding_mode="reflect"), dict(padding="same", dilation=2)]


@pytest.mark.parametrize("algo", ["loha", "lokr"])
@pytest.mark.parametrize("wd_on_out", [True, False], ids=["rows", "columns"])
@pytest.mark.parametrize("conv", PADDINGS, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
@pytest.mark.parametrize("stacked", [False, True], ids=["own-forward", "replaced-forward"])
def test_6_dora_on_padded_convs_equals_the_merged_conv(algo, wd_on_out, conv, stacked):
    """DoRA on a conv that pads otherwise than with symmetric zeros crashed (W0 applied to the unpadded input),
    and wd_on_out=False raised. The adapted conv must equal the conv with the merged weight W' (LyCORIS's
    weight_decompose(W0 + ΔW), same padding): output and every gradient. Also with a replaced forward (the
    base_forward branch)."""
    cfg = dict(kernel_size=3)
    cfg.update(conv)
    torch.manual_seed(0)
    layer = nn.Conv2d(6, 8, **cfg).double().requires_grad_(False)
    m = fast_cls(algo)(NAME, layer, 0.8, 4, 2, weight_decompose=True, wd_on_out=wd_on_out).double()
    randomize_(m, seed=4)
    twin = nn.Conv2d(6, 8, **cfg).double().requires_grad_(False)
    twin.load_state_dict(layer.state_dict())
    ref_mod = fast_cls(algo)(NAME, twin, 0.8, 4, 2, weight_decompose=True, wd_on_out=wd_on_out).double()
    ref_mod.load_state_dict(m.state_dict())
    if stacked:
        own = nn.Conv2d.forward.__get__(layer)
        layer.forward = lambda v: own(v)
    m.apply_to()
    x = torch.randn(2, 6, 7, 9, dtype=torch.float64, requires_grad=True)
    out = layer(x)
    g = torch.randn_like(out)
    grads = torch.autograd.grad(out, [x, *m.parameters()], g)

    # the merged conv: W0 + (W' − W0) at the multiplier, with the layer's own padding
    xr = x.detach().clone().requires_grad_(True)
    merged_weight = layer.weight.detach() + ref_mod.delta_weight(0.8)
    ref = layer._conv_forward(xr, merged_weight, layer.bias)
    ref_grads = torch.autograd.grad(ref, [xr, *ref_mod.parameters()], g)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    names = ["x", *(n for n, _ in m.named_parameters())]
    for name, a, b in zip(names, grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10, msg=lambda msg: f"grad of {name}: {msg}")


# --------------------------------------------------------------------------------------------------- 7, 9
def _dora_file(tmp_path, algo="loha"):
    import lyfast

    model = _small_model()
    net = lyfast.create_lycoris(model, 1.0, 4, 2, algo=algo, dora_wd=True)
    net.apply_to()
    torch.manual_seed(2)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    file = tmp_path / "dora.safetensors"
    net.save_weights(str(file), None, {})
    return model, file


@pytest.mark.parametrize("algo", ["loha", "lokr"])
def test_7_load_weights_before_apply_to_with_a_dora_file(tmp_path, algo):
    """LyCORIS's order: create with dora_wd, load_weights, then apply_to: the model is the trained one."""
    import lyfast

    model, file = _dora_file(tmp_path, algo)
    trained = _outputs(model)
    fresh = _small_model()
    net = lyfast.create_lycoris(fresh, 1.0, 4, 2, algo=algo, dora_wd=True)
    net.load_weights(str(file))
    net.apply_to()
    torch.testing.assert_close(_outputs(fresh), trained, rtol=1e-6, atol=1e-6)


def test_7_kohya_load_weights_before_apply_to_with_a_dora_file(tmp_path):
    import lyfast.kohya as fkohya
    from lyco_models import tiny_text_encoder, tiny_unet

    def network(te, unet):
        return fkohya.create_network(1.0, 4, 2.0, None, te, unet, algo="loha", dora_wd="True", preset="attn-mlp")

    def output(te):
        with torch.no_grad():
            return te(torch.arange(5).reshape(1, 5))[0]

    te, unet = tiny_text_encoder(), tiny_unet()
    net = network(te, unet)
    net.apply_to(te, unet, True, True)
    torch.manual_seed(2)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    trained = output(te)
    net.save_weights(str(tmp_path / "k.safetensors"), None, None)
    te2, unet2 = tiny_text_encoder(), tiny_unet()
    other = network(te2, unet2)
    other.load_weights(str(tmp_path / "k.safetensors"))
    other.apply_to(te2, unet2, True, True)
    torch.testing.assert_close(output(te2), trained, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("applied", [True, False], ids=["after_apply_to", "before_apply_to"])
def test_9_a_failed_load_changes_nothing_and_names_the_key(tmp_path, applied):
    import lyfast
    from safetensors.torch import load_file, save_file

    model, net = _trained("loha")
    sd = load_file(str(_save(net, tmp_path)))
    bad = sorted(k for k in sd if sd[k].ndim)[-1]  # late in the file: the keys before it would be copied first
    sd[bad] = torch.zeros(*[n + 1 for n in sd[bad].shape])
    save_file(sd, str(tmp_path / "bad.safetensors"))
    fresh = _small_model()
    other = lyfast.create_lycoris(fresh, 1.0, 4, 2, algo="loha")
    if applied:
        other.apply_to()
    before = {k: v.clone() for lora in other.loras for k, v in lora.state_dict().items()}
    with pytest.raises(ValueError, match=bad.replace(".", r"\.")):
        other.load_weights(str(tmp_path / "bad.safetensors"))
    after = {k: v for lora in other.loras for k, v in lora.state_dict().items()}
    assert all(torch.equal(before[k], after[k]) for k in before)


def _save(net, tmp_path):
    file = tmp_path / "net.safetensors"
    net.save_weights(str(file), None, {})
    return file


# --------------------------------------------------------------------------------------------------- 10
FUNC_CASES = [(algo, kind, mode) for algo in ("loha", "lokr", "boft") for kind in ("linear", "conv")
              for mode in ("rebuild", "bypass", "dora") if not (algo == "boft" and mode == "dora")]


@pytest.mark.parametrize("algo,kind,mode", FUNC_CASES, ids=["-".join(c) for c in FUNC_CASES])
def test_10_torch_func_transforms_equal_autograd(algo, kind, mode):
    """torch.func (grad, vmap of grad for per-sample gradients, jacrev, jvp, vmap) failed on every adapter (the
    autograd Functions have no setup_context). Each must equal plain autograd on the ΔW-free forward, in fp64."""
    from torch.func import functional_call, grad, jacrev, jvp, vmap

    torch.manual_seed(0)
    layer = (nn.Linear(8, 16) if kind == "linear" else nn.Conv2d(4, 8, 3, padding=1)).double().requires_grad_(False)
    kw = {"bypass_mode": mode == "bypass", "weight_decompose": mode == "dora"}
    m = fast_cls(algo)(NAME, layer, 0.7, 4, 2, **kw).double()
    randomize_(m, seed=2)
    m.apply_to()
    m.eval()
    shape = (3, 8) if kind == "linear" else (3, 4, 5, 5)
    x = torch.randn(shape, dtype=torch.float64)
    params = {k: v.detach() for k, v in m.named_parameters()}

    def loss(p, xi):
        return functional_call(m, p, (xi,)).pow(2).sum()

    def close(a, b, what):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11, msg=lambda msg: f"{what}: {msg}")

    # grad over the adapter parameters == autograd's
    got = grad(loss)(params, x)
    want = torch.autograd.grad(layer(x).pow(2).sum(), list(m.parameters()))
    for (name, g), w in zip(got.items(), want):
        close(g, w, f"grad {name}")
    # per-sample gradients (vmap of grad) == one autograd call per sample
    per_sample = vmap(grad(loss), in_dims=(None, 0))(params, x.unsqueeze(1))
    for i in range(shape[0]):
        want = torch.autograd.grad(layer(x[i:i + 1]).pow(2).sum(), list(m.parameters()))
        for (name, g), w in zip(per_sample.items(), want):
            close(g[i], w, f"per-sample grad {name}[{i}]")
    # jacrev and jvp over the input == autograd's Jacobian
    x0 = x[:1]
    jac = torch.autograd.functional.jacobian(layer, x0)
    close(jacrev(layer)(x0), jac, "jacrev")
    tangent = torch.randn_like(x0)
    out, tan_out = jvp(layer, (x0,), (tangent,))
    close(out, layer(x0), "jvp primal")
    close(tan_out, (jac.reshape(out.numel(), -1) @ tangent.reshape(-1)).reshape(out.shape), "jvp tangent")
    # vmap of the layer == the batched call
    close(vmap(layer)(x.unsqueeze(1)).squeeze(1), layer(x), "vmap")


def test_10_dropout_in_training_under_a_transform_names_it():
    from torch.func import functional_call, grad

    layer = nn.Linear(8, 16).double().requires_grad_(False)
    m = fast_cls("lokr")(NAME, layer, 1.0, 4, 2, rank_dropout=0.5).double()
    m.apply_to()
    params = {k: v.detach() for k, v in m.named_parameters()}
    with pytest.raises(RuntimeError, match="rank_dropout in training under a torch.func transform"):
        grad(lambda p: functional_call(m, p, (torch.randn(2, 8, dtype=torch.float64),)).sum())(params)


# --------------------------------------------------------------------------------------------------- 12
@pytest.mark.parametrize("keep", [0.5, 0.95])
def test_12_truncated_safetensors_error_names_the_file(tmp_path, keep):
    import lycoris  # noqa: F401  (the kohya loader below imports it lazily in sd-scripts; lyfast needs none)
    import lyfast
    import lyfast.kohya as fkohya

    model, net = _trained("loha")
    file = _save(net, tmp_path)
    data = file.read_bytes()
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(ValueError, match="cut.safetensors"):
        lyfast.create_lycoris_from_weights(1.0, str(cut), _small_model())
    other = lyfast.create_lycoris(_small_model(), 1.0, 4, 2, algo="loha")
    with pytest.raises(ValueError, match="cut.safetensors"):
        other.load_weights(str(cut))
    with pytest.raises(ValueError, match="cut.safetensors"):
        fkohya.create_network_from_weights(1.0, str(cut), None, None, _small_model())


def test_12_boft_width_error_names_the_layer():
    with pytest.raises(ValueError, match=f"{NAME}.*24 outputs.*cannot split 24"):
        fast_cls("boft")(NAME, nn.Linear(16, 24), 1.0, 4, 1)


@pytest.mark.parametrize("bypass", [False, True])
def test_12_boft_on_a_linear_subclass_with_its_own_forward_rotates_what_it_computes(bypass):
    """A Linear subclass whose forward is not F.linear: BOFT calls the layer (never F.linear on its weight),
    rotates its weight part and passes its bias; at multiplier 0 it is exactly the layer."""
    class Scaled(nn.Linear):
        def forward(self, x):
            return super().forward(x) * 3

    torch.manual_seed(0)
    layer = Scaled(16, 32).double().requires_grad_(False)
    m = fast_cls("boft")(NAME, layer, 0.0, 4, 1, bypass_mode=bypass).double()
    randomize_(m, seed=1)
    x = torch.randn(4, 16, dtype=torch.float64)
    want = layer(x)
    m.apply_to()
    torch.testing.assert_close(layer(x), want, rtol=0, atol=1e-12)
