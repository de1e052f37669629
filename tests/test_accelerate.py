"""lyfast.accelerate: LyCORIS modules swapped for lyfast's in place, with the same Parameters (so an optimizer
built before the swap keeps working), the same wrapper stacks and network bookkeeping, and the same outputs
and gradients as the LyCORIS run (fp64; BOFT in fp32 because LyCORIS's BOFT cannot run in fp64)."""
from __future__ import annotations

import pytest
import torch

import lycoris
import lycoris.kohya as lkohya
import lyfast
from lycoris.modules.locon import LoConModule
from lyco_models import one_thread  # noqa: F401  (autouse fixture)
from lyco_models import (assert_close, randomize_, run_unet, tiny_text_encoder, tiny_unet, token_ids,
                         unet_inputs)

CONFIGS = {
    "loha_tucker": dict(algo="loha", use_tucker=True, conv_dim=3, conv_alpha=1.5),
    "loha_scalar_bypass": dict(algo="loha", use_scalar=True, bypass_mode=True),
    "lokr_tucker_decompose_both": dict(algo="lokr", factor=4, decompose_both=True, use_tucker=True),
    "lokr_unbalanced": dict(algo="lokr", factor=4, unbalanced_factorization=True),
    "boft_rescaled": dict(algo="boft", rescaled=True, constraint=1e-2),
    "loha_dora_tucker": dict(algo="loha", use_tucker=True, conv_dim=3, dora_wd=True),
    "lokr_dora_columns": dict(algo="lokr", factor=4, dora_wd=True, wd_on_output=False),
}


def _setup(kwargs, dtype, multiplier=0.8):
    unet = tiny_unet(dtype)
    net = lycoris.create_lycoris(unet, multiplier, 2, 1.0, **kwargs)
    net.apply_to()
    net.to(dtype)
    randomize_(net)
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)  # stateful, and linear in the gradient
    return unet, net, opt


def _step(unet, net, opt, dtype):
    out = run_unet(unet, unet_inputs(dtype))
    out.square().mean().backward()
    grads = {k: p.grad.detach().clone() for k, p in net.named_parameters()}
    opt.step()
    return out.detach(), grads, {k: p.detach().clone() for k, p in net.named_parameters()}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_swap_keeps_outputs_grads_and_optimizer(name):
    kwargs = CONFIGS[name]
    dtype = torch.float32 if kwargs["algo"] == "boft" else torch.float64
    tol = 2e-5 if dtype == torch.float32 else 1e-10
    # BOFT's rescale follows the multiplier in lyfast (multiplier 0 = frozen model), LyCORIS applies it whole:
    # they agree at multiplier 1 only (docs/coming_from_lycoris.md).
    multiplier = 1.0 if kwargs.get("rescaled") else 0.8

    unet, net, opt = _setup(kwargs, dtype, multiplier)
    ref_out, ref_grads, ref_params = _step(unet, net, opt, dtype)

    unet, net, opt = _setup(kwargs, dtype, multiplier)
    params_before = [id(p) for p in net.parameters()]
    lyco_types = {type(lo) for lo in net.loras}
    n = lyfast.accelerate(net)
    assert n == len(net.loras) > 0
    assert all(type(lo).__module__.startswith("lyfast.") for lo in net.loras)
    assert not lyco_types & {type(m) for m in net.modules()}
    assert [id(p) for p in net.parameters()] == params_before
    assert [id(p) for g in opt.param_groups for p in g["params"]] == params_before
    assert all(lo.multiplier == multiplier and lo.bypass_mode == kwargs.get("bypass_mode", False) for lo in net.loras)

    out, grads, params = _step(unet, net, opt, dtype)
    assert_close(out, ref_out, tol, "output")
    assert set(grads) == set(ref_grads)
    for k in ref_grads:
        assert_close(grads[k], ref_grads[k], tol * 10, f"grad {k}")
        assert_close(params[k], ref_params[k], tol * 10, f"after step {k}")
    assert lyfast.accelerate(net) == 0  # nothing left to swap


def test_swap_kohya_network_with_text_encoders(tmp_path):
    te1, te2, unet = tiny_text_encoder(seed=1), tiny_text_encoder(seed=2), tiny_unet()
    net = lkohya.create_network(1.0, 4, 2.0, None, [te1, te2], unet, algo="lokr", factor="4", preset="attn-mlp",
                                module_dropout="0.0", rank_dropout="0.0")
    net.apply_to([te1, te2], unet, True, True)
    net.to(torch.float64)
    randomize_(net)
    net.eval()
    x, t, _ = unet_inputs()

    def output():
        with torch.no_grad():
            return run_unet(unet, (x, t, te1(token_ids()) + te2(token_ids(seed=9))))

    ref = output()
    before = {k: v.detach().clone() for k, v in net.state_dict().items()}
    n_te, n_unet = len(net.text_encoder_loras), len(net.unet_loras)
    assert lyfast.accelerate(net) == n_te + n_unet
    assert len(net.text_encoder_loras) == n_te and len(net.unet_loras) == n_unet
    assert net.loras == net.text_encoder_loras + net.unet_loras
    for lora in net.loras:
        assert type(lora).__module__ == "lyfast.modules.lokr"
        assert getattr(net, lora.lora_name) is lora
        base = lora.org_module[0]
        assert base._lycoris_wrappers == [lora] and base.forward == lora.forward
        assert not lora.training
    assert_close(output(), ref, 1e-12, "kohya network after swap")
    after = {k: v.detach() for k, v in net.state_dict().items()}
    assert list(after) == list(before) and all(torch.equal(after[k], before[k]) for k in before)
    net.save_weights(str(tmp_path / "after.safetensors"), torch.float32, {})  # LyCORIS's own save still works


def test_model_only_swap_keeps_stack_order():
    """Two LyCORIS networks on one model (LoCon under LoHa): only the LoHa modules change, stacks keep order."""
    unet = tiny_unet()
    inputs = unet_inputs()
    locon = lycoris.create_lycoris(unet, 1.0, 2, 1.0, algo="lora", preset="attn-mlp")
    locon.apply_to()
    loha = lycoris.create_lycoris(unet, 0.5, 2, 1.0, algo="loha", preset="attn-mlp")
    loha.apply_to()
    for net in (locon, loha):
        net.to(torch.float64)
        randomize_(net)
    with torch.no_grad():
        ref = run_unet(unet, inputs)
    old = list(loha.loras)
    n = lyfast.accelerate(unet)  # just the model: found through the layers' `_lycoris_wrappers`
    assert n == len(old)
    for lo in old:
        base = lo.org_module[0]
        bottom, top = base._lycoris_wrappers
        assert isinstance(bottom, LoConModule)
        assert type(top).__module__ == "lyfast.modules.loha" and top.lora_name == lo.lora_name
        assert top.org_forward == bottom.forward and base.forward == top.forward
        assert top.multiplier == 0.5 and top.hada_w1_a is lo.hada_w1_a
    with torch.no_grad():
        assert_close(run_unet(unet, inputs), ref, 1e-12, "stacked")
    # the network object still holds the LyCORIS modules (the model was passed): accelerate it too
    assert lyfast.accelerate(loha) == len(old)
    assert [lo.org_module[0]._lycoris_wrappers[1] for lo in old] == loha.loras  # the same lyfast modules
    # restore() of the lyfast modules unwinds the stack back to the LoCon layer
    loha.restore()
    locon.restore()
    assert all(not hasattr(lo.org_module[0], "_lycoris_wrappers") for lo in old)


def test_swap_below_another_wrapper():
    """A LyCORIS LoHa under a LoCon: the LoCon's org_forward is re-pointed at the new module."""
    unet = tiny_unet()
    loha = lycoris.create_lycoris(unet, 1.0, 2, 1.0, algo="loha", preset="attn-mlp")
    loha.apply_to()
    locon = lycoris.create_lycoris(unet, 1.0, 2, 1.0, algo="lora", preset="attn-mlp")
    locon.apply_to()
    for net in (loha, locon):
        net.to(torch.float64)
        randomize_(net)
    with torch.no_grad():
        ref = run_unet(unet, unet_inputs())
    assert lyfast.accelerate(loha) == len(loha.loras)
    for lo, top in zip(loha.loras, locon.loras):
        assert top.org_forward == lo.forward and lo.org_module[0]._lycoris_wrappers == [lo, top]
    with torch.no_grad():
        assert_close(run_unet(unet, unet_inputs()), ref, 1e-12, "under a LoCon")


def test_training_continues_after_swap():
    """Steps before and after the swap, one optimizer: the same trajectory as LyCORIS throughout."""
    kwargs = dict(algo="loha", use_tucker=True, conv_dim=3)
    runs = []
    for swap in (False, True):
        unet, net, opt = _setup(kwargs, torch.float64)
        for step in range(3):
            if swap and step == 1:
                lyfast.accelerate(net)
            opt.zero_grad()
            run_unet(unet, unet_inputs(seed=step)).square().mean().backward()
            opt.step()
        runs.append({k: v.detach().clone() for k, v in net.state_dict().items()})
    for k in runs[0]:
        assert_close(runs[1][k], runs[0][k], 1e-9, k)
