"""Butterfly-OFT parity with lycoris-lora 4.1.3 (fp32: LyCORIS inverts I - Q in fp32 whatever the dtype)."""

import pytest
import torch
import torch.nn as nn

from conftest import (
    LAYER_KINDS,
    assert_results_match,
    check_parity,
    make_pair,
    match_lyco_rescale_,
    run_adapted,
)

ALGO = "boft"


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("multiplier", [1.0, 0.5])
@pytest.mark.parametrize("bypass", [False, True], ids=["rebuild", "bypass"])
@pytest.mark.parametrize("layer", LAYER_KINDS)
def test_layer_grid(layer, bypass, multiplier, bias):
    pair = make_pair(ALGO, layer, bias=bias, multiplier=multiplier, bypass_mode=bypass)
    check_parity(pair)


# (out features, lora_dim (max block size)) -> expected oft_blocks shape (from LyCORIS's power2factorization)
BLOCKS = [
    (32, 2, (5, 16, 2, 2)),
    (32, 4, (4, 8, 4, 4)),
    (32, 8, (3, 4, 8, 8)),
    (32, 16, (2, 2, 16, 16)),
    (40, 10, (3, 4, 10, 10)),
    (40, 20, (2, 2, 20, 20)),
    (48, 6, (4, 8, 6, 6)),
]


@pytest.mark.parametrize("bypass", [False, True], ids=["rebuild", "bypass"])
@pytest.mark.parametrize("layer", ["linear", "conv2d"])
@pytest.mark.parametrize("out,lora_dim,shape", BLOCKS, ids=lambda v: str(v))
def test_block_sizes(out, lora_dim, shape, layer, bypass):
    if layer == "linear":
        base, xs = nn.Linear(20, out), (2, 3, 20)
    else:
        base, xs = nn.Conv2d(12, out, 3, padding=1), (2, 12, 5, 5)
    pair = make_pair(ALGO, base, input_shape=xs, bypass_mode=bypass, lora_dim=lora_dim)
    assert tuple(pair.lyco.oft_blocks.shape) == shape
    assert tuple(pair.fast.oft_blocks.shape) == shape
    check_parity(pair)


def _blocks_norm(pair):
    b = pair.lyco.oft_blocks.detach()
    q = b - b.transpose(-1, -2)
    return float(torch.norm(q))


@pytest.mark.parametrize("bypass", [False, True], ids=["rebuild", "bypass"])
@pytest.mark.parametrize("layer", ["linear", "conv2d", "conv1d_strided"])
@pytest.mark.parametrize("mode", ["inactive", "active"])
def test_constraint(mode, layer, bypass):
    # constraint is stored unscaled in `alpha`, the effective clamp is constraint * out_dim on ||Q||_F
    # (one norm over all stages/blocks). Blocks are randomized at 0.1 -> ||Q|| ~ 2.5 for out=32, lora_dim 4.
    constraint = 1.0 if mode == "inactive" else 0.02  # 0.02 * 32 = 0.64 < ||Q||: the clamp is active
    pair = make_pair(ALGO, layer, bypass_mode=bypass, constraint=constraint, multiplier=0.8)
    qn = _blocks_norm(pair)
    assert pair.lyco.constraint == pytest.approx(constraint * 32)
    assert (qn > pair.lyco.constraint) == (mode == "active"), (qn, pair.lyco.constraint)
    check_parity(pair)


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("bypass", [False, True], ids=["rebuild", "bypass"])
@pytest.mark.parametrize("layer", ["linear", "conv1d", "conv2d", "conv3d", "conv2d_groups2"])
def test_rescaled(layer, bypass, bias):
    pair = make_pair(ALGO, layer, bias=bias, bypass_mode=bypass, rescaled=True, multiplier=0.5)
    assert "rescale" in dict(pair.fast.named_parameters())
    check_parity(pair)


@pytest.mark.parametrize("bypass", [False, True], ids=["rebuild", "bypass"])
def test_rescaled_constraint_lora8(bypass):
    pair = make_pair(
        ALGO, "conv2d", bypass_mode=bypass, rescaled=True, constraint=0.01, lora_dim=8, multiplier=1.0
    )
    assert _blocks_norm(pair) > pair.lyco.constraint
    check_parity(pair)


def test_unused_args_accepted():
    """alpha / dropout / rank_dropout / use_tucker / use_scalar / rank_dropout_scale are accepted and unused."""
    pair = make_pair(
        ALGO, "linear", alpha=5, dropout=0.3, rank_dropout=0.2, use_tucker=True,
        use_scalar=True, rank_dropout_scale=True, some_unknown_kwarg=1,
    )
    pair.lyco.eval(), pair.fast.eval()
    check_parity(pair)


@pytest.mark.parametrize("bypass", [False, True], ids=["rebuild", "bypass"])
def test_runtime_multiplier(bypass):
    pair = make_pair(ALGO, "conv2d", bypass_mode=bypass, rescaled=True)
    rescale = pair.fast.rescale.detach().clone()
    for m in (1.0, 0.3, 0.0, 1.7):
        with torch.no_grad():
            pair.fast.rescale.copy_(rescale)
        grad_scale = match_lyco_rescale_(pair, m)
        assert_results_match(
            run_adapted(pair.fast_layer, pair.fast, pair.x),
            run_adapted(pair.lyco_layer, pair.lyco, pair.x),
            pair.dtype,
            what=f"multiplier={m}",
            grad_scale=grad_scale,
        )


@pytest.mark.parametrize("bypass", [False, True], ids=["rebuild", "bypass"])
@pytest.mark.parametrize("layer", ["linear", "conv2d"])
def test_module_dropout_train_mode(layer, bypass):
    """BOFT honours module_dropout only (dropout / rank_dropout are accepted and ignored)."""
    from conftest import assert_outputs_vary, check_dropout_parity

    pair = make_pair(ALGO, layer, bypass_mode=bypass, module_dropout=0.5, dropout=0.3, rank_dropout=0.3)
    assert_outputs_vary(check_dropout_parity(pair))


@pytest.mark.parametrize("channel_axis", [-1, 1])
@pytest.mark.parametrize("block", [2, 6])
@pytest.mark.parametrize("stages", [1, 2, 3, 4])
def test_stage_groups_match_reference(stages, block, channel_axis):
    """Merged stage pairs (`stage_groups`) and the rescale folded into the last pass, against LyCORIS's
    one-permutation-per-stage loop: values and all gradients in fp64, for even and odd stage counts (a
    last stage left alone) and b/2 != 2."""
    from lyfast.functional import boft as fboft

    gen = torch.Generator().manual_seed(stages)
    n = 8
    r = fboft.stage_matrices(torch.randn(stages, n, block, block, generator=gen, dtype=torch.float64) * 0.3)
    r = r.detach().requires_grad_(True)
    s = torch.randn(n * block, 1, generator=gen, dtype=torch.float64)
    s[1] = 0.0  # rescale is folded into the last pass's rows: a zero must not break its gradients
    s.requires_grad_(True)
    shape = (2, 3, n * block) if channel_axis == -1 else (2, n * block, 3)
    z = torch.randn(*shape, generator=gen, dtype=torch.float64, requires_grad=True)
    got = fboft.Butterfly.apply(z, r, s, channel_axis)
    want = fboft.butterfly_reference(z, r, s, channel_axis=channel_axis)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    g = torch.randn(want.shape, generator=gen, dtype=torch.float64)
    for a, e in zip(torch.autograd.grad(got, (z, r, s), g), torch.autograd.grad(want, (z, r, s), g)):
        torch.testing.assert_close(a, e, rtol=1e-11, atol=1e-11)
