"""DoRA (`weight_decompose`) for LoHa and LoKr, computed without W0 + ΔW.

LyCORIS 4.1.3 (`functional/general.py::_weight_decompose`, called by the LoHa/LoKr modules) adapts a
layer with weight W0 to

    W = W0 + ΔW                  (ΔW with α/r and `scalar`, rank-dropout rows; NOT the multiplier)
    n = ‖W‖ per output row (wd_on_out=True) or per input column over (out, *kernel) (False),
        computed in dora_scale's dtype, plus torch.finfo(that dtype).eps after the square root
    s = dora_scale / n;   s ← multiplier·(s − 1) + 1  when multiplier != 1
    W' = W · s                   (norm not detached: gradients flow through n into the factors)

and runs base(x) + op(x, W' − W0). With a per-row s that is  s ⊙ (W0·x + ΔW·x) + bias; with a
per-input-channel s it is the layer applied to the rescaled input x ⊙ s plus ΔW·(x ⊙ s). So only the
norms need W, and ‖W0_i + ΔW_i‖² is a reduction over rows that `RowBlockNorms` computes from ΔW
generated at most 1/8 of its rows at a time (the row generators of the LoHa and LoKr row-block
routes), forward and backward: no weight-sized tensor is allocated.

This file: the LyCORIS reference (`weight_decompose`, builds W; for merging and tests) → the magnitude
initialisation → the norm Function → the public op `dora_forward`.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch

from .general import MAX_BLOCK_FRACTION, LayerSpec, RowGenerator, row_blocks
from .loha import HadaRows, khatri_rao_factors
from .lokr import KronRows


# ----------------------------------------------------------------------------------------------
# Reference (builds W0 + ΔW): merge, tests.
# ----------------------------------------------------------------------------------------------
def weight_decompose(weight, dora_scale, multiplier=1.0, wd_on_out=True) -> torch.Tensor:
    """W' = W · (multiplier·(dora_scale/‖W‖ − 1) + 1), exactly as LyCORIS 4.1.3's `_weight_decompose`:
    W cast to dora_scale's dtype, norm per out row (wd_on_out) or per in column, + that dtype's eps."""
    weight = weight.to(dora_scale.dtype)
    return weight * _broadcast(magnitude_scale(_norm_sq(weight, wd_on_out), dora_scale, multiplier), weight, wd_on_out)


def initial_magnitude(weight: torch.Tensor, wd_on_out: bool) -> torch.Tensor:
    """dora_scale's initial value as LyCORIS makes it: W0's norms in fp32 on the CPU, shape (out, 1, …)
    for wd_on_out else (1, in, 1, …)."""
    w = weight.detach().cpu().clone().float()
    return _broadcast(_norm(w, wd_on_out), w, wd_on_out)


def _norm(weight, wd_on_out):
    """Norms per row (wd_on_out) or per column over (out, *kernel), as a vector."""
    if wd_on_out:
        return torch.linalg.vector_norm(weight.reshape(weight.shape[0], -1), dim=1)
    return torch.linalg.vector_norm(weight.transpose(0, 1).reshape(weight.shape[1], -1), dim=1)


def _norm_sq(weight, wd_on_out):
    return _norm(weight, wd_on_out) ** 2


def _broadcast(vec, weight, wd_on_out):
    """A per-row / per-column vector shaped to multiply `weight`: (out, 1, …) or (1, in, 1, …)."""
    ones = [1] * (weight.dim() - 2)
    return vec.reshape(-1, 1, *ones) if wd_on_out else vec.reshape(1, -1, *ones)


def magnitude_scale(norm_sq, dora_scale, multiplier=1.0) -> torch.Tensor:
    """s = dora_scale / (√norm_sq + eps), then multiplier·(s − 1) + 1 when multiplier != 1 — LyCORIS's
    steps in its order (eps of dora_scale's dtype added after the root), as a vector."""
    norm = norm_sq.sqrt() + torch.finfo(dora_scale.dtype).eps
    s = dora_scale.reshape(-1).to(norm.device) / norm
    if multiplier != 1:
        s = multiplier * (s - 1) + 1
    return s


# ----------------------------------------------------------------------------------------------
# Norms of W0 + ΔW from row blocks.
# ----------------------------------------------------------------------------------------------
class RowBlockNorms(torch.autograd.Function):
    """Squared norms of W0 + diag(row_scale)·ΔW per output row (wd_on_out) or per input column over
    (out, *kernel), with ΔW[lo:hi] = gen.rows(lo, hi, *factors) made one row block (<= 1/8 of the rows)
    at a time, in `dtype`.

    Saves the factors only (W0 is the frozen layer's, row_scale a mask). Backward regenerates each block:
    d‖·‖²/dΔW = 2·(W0 + ΔW)·g, mapped to the factors by gen.rows_backward. Peak extra memory: a few
    blocks. W0 gets no gradient (the base layer is frozen; LyCORIS detaches it too).
    """

    @staticmethod
    def forward(ctx, weight, row_scale, spec: LayerSpec, gen: type[RowGenerator], wd_on_out: bool, dtype, *factors):
        out = torch.zeros(weight.shape[0] if wd_on_out else weight.shape[1], dtype=dtype, device=weight.device)
        for lo, hi, w in _blocks(weight, row_scale, spec, gen, dtype, factors):
            sq = w * w
            if wd_on_out:
                out[lo:hi] = sq.sum(1)
            else:
                out += sq.reshape(hi - lo, weight.shape[1], -1).sum((0, 2))
        ctx.spec, ctx.gen, ctx.wd_on_out, ctx.dtype = spec, gen, wd_on_out, dtype
        ctx.save_for_backward(weight, row_scale, *factors)
        return out

    @staticmethod
    def backward(ctx, grad):
        with torch.autocast(grad.device.type, enabled=False):  # a backward called under autocast too
            return RowBlockNorms._backward(ctx, grad)

    @staticmethod
    def _backward(ctx, grad):
        weight, row_scale, *factors = ctx.saved_tensors
        need = ctx.needs_input_grad[6:]
        dfs: list[torch.Tensor | None] = [None] * len(factors)
        if not any(need):
            return (None,) * (6 + len(factors))
        kernel = weight[0, 0].numel()
        g_col = None if ctx.wd_on_out else grad.repeat_interleave(kernel)  # (in·∏k,)
        for lo, hi, w in _blocks(weight, row_scale, ctx.spec, ctx.gen, ctx.dtype, factors):
            d = w * (2 * grad[lo:hi, None] if ctx.wd_on_out else 2 * g_col)
            if row_scale is not None:
                d = d * row_scale[lo:hi, None].to(d.dtype)
            got = ctx.gen.rows_backward(lo, hi, d, *factors)
            dfs = [a if b is None else b if a is None else a + b for a, b in zip(dfs, got)]
        dfs = [d if n else None for d, n in zip(dfs, need)]
        return (None, None, None, None, None, None, *dfs)


def _blocks(weight, row_scale, spec, gen, dtype, factors):
    """(lo, hi, W0[lo:hi] + ΔW[lo:hi]) flattened per row, in `dtype`, one row block at a time."""
    for lo, hi, _, _ in row_blocks(spec):
        rows = gen.rows(lo, hi, *factors)
        if row_scale is not None:
            rows = rows * row_scale[lo:hi, None].to(rows.dtype)
        yield lo, hi, weight[lo:hi].reshape(hi - lo, -1).to(dtype) + rows


def norms_sq(weight, spec: LayerSpec, gen: type[RowGenerator], factors: Sequence[torch.Tensor], wd_on_out: bool,
             dtype, row_scale=None) -> torch.Tensor:
    """‖W0_i + ΔW_i‖² per row or column (see `RowBlockNorms`); factors are cast to `dtype` here."""
    factors = [f.to(dtype) for f in factors]
    with torch.autocast(weight.device.type, enabled=False):  # in `dtype`, as LyCORIS's norm
        return RowBlockNorms.apply(weight.detach(), row_scale, spec, gen, wd_on_out, dtype, *factors)


def hada_norms_sq(weight, spec: LayerSpec, a1, b1, a2, b2, wd_on_out: bool, dtype, row_scale=None) -> torch.Tensor:
    """`norms_sq` for LoHa's canonical factors (ΔW = (a1 b1) ⊙ (a2 b2), scale in a1), in closed form through
    the Khatri-Rao form ΔW = F·K (F out × R, K R × in·∏k, R = r1·r2) while R <= 8·(r1 + r2) and
F, K are at most 1/8 of the weight:

        rows:     ‖W0_o‖² + 2·F_o·(W0 Kᵀ)_o + F_o (K Kᵀ) F_oᵀ
        columns:  Σ_k [ ‖W0_:j‖² + 2·(Fᵀ W0)_:j·K_:j + K_:jᵀ (FᵀF) K_:j ]   (j = (c, k) flattened)

    One GEMM with W0 (R·out·in·∏k multiply-adds, W0 read once) instead of generating ΔW row blocks forward and
    backward; autograd differentiates it (W0 is detached, so nothing weight-sized is saved or made). Measured
    on linear 1280→1280, r = 8, 1 CPU thread: the norms' forward+backward 20 ms against 35 ms by row blocks.
    Row blocks (`RowBlockNorms`) at larger R, and when W0's dtype is not `dtype` (casting W0 would copy it).
    """
    r1, r2 = a1.shape[1], a2.shape[1]
    small = r1 * r2 * MAX_BLOCK_FRACTION <= min(a1.shape[0], b1.shape[1])  # F, K, W0·Kᵀ: <= 1/8 of W0
    if not small or r1 * r2 > 8 * (r1 + r2) or weight.dtype != dtype:
        return norms_sq(weight, spec, HadaRows, (a1, b1, a2, b2), wd_on_out, dtype, row_scale)
    with torch.autocast(weight.device.type, enabled=False):  # in `dtype`, as LyCORIS's norm
        f, k = khatri_rao_factors(*(t.to(dtype) for t in (a1, b1, a2, b2)))
        if row_scale is not None:
            f = f * row_scale.to(dtype)[:, None]
        w0 = weight.detach().reshape(weight.shape[0], -1)
        if wd_on_out:
            w0sq = torch.linalg.vector_norm(w0, dim=1) ** 2
            return w0sq + 2 * (f * (w0 @ k.t())).sum(1) + ((f @ (k @ k.t())) * f).sum(1)
        w0sq = torch.linalg.vector_norm(w0, dim=0) ** 2
        per_j = w0sq + 2 * ((f.t() @ w0) * k).sum(0) + (((f.t() @ f) @ k) * k).sum(0)
        return per_j.reshape(weight.shape[1], -1).sum(1)


def kron_norms_sq(weight, spec: LayerSpec, c1, c2, wd_on_out: bool, dtype, row_scale=None) -> torch.Tensor:
    """`norms_sq` for LoKr's ΔW = kron(c1, c2) (c1 (L, M), c2 (K, in_n, *k), scale in c1). Row norms in
    closed form while M >= 8, with W0 viewed as (L, K, M, N) (N = in_n·∏k), row o = (l, k):

        ‖W0_o‖² + 2·c1[l]·(W0[l, k] c2[k]) + ‖c1[l]‖²‖c2[k]‖²

    one batched matrix-vector product over W0 (W0 read once) instead of generating ΔW row blocks forward and
    backward; its broadcast c2 and the gradient it returns are L·K·N = 1/M of the weight. Column norms,
    M < 8 and a W0 dtype other than `dtype`: row blocks (`RowBlockNorms` with `lokr.KronRows`)."""
    L, M = c1.shape
    K = c2.shape[0]
    if not wd_on_out or M < MAX_BLOCK_FRACTION or weight.dtype != dtype:
        return norms_sq(weight, spec, KronRows, (c1, c2), wd_on_out, dtype, row_scale)
    with torch.autocast(weight.device.type, enabled=False):  # in `dtype`, as LyCORIS's norm
        c1, c2 = c1.to(dtype), c2.to(dtype).reshape(K, -1)
        w0 = weight.detach().reshape(L, K, M, -1)
        inner = ((w0 @ c2[:, :, None]).squeeze(-1) * c1[:, None, :]).sum(-1)  # (L, K)
        quad = (c1 * c1).sum(1)[:, None] * (c2 * c2).sum(1)[None, :]
        w0sq = torch.linalg.vector_norm(weight.detach().reshape(L * K, -1), dim=1) ** 2
        if row_scale is None:
            return w0sq + (2 * inner + quad).reshape(-1)
        rs = row_scale.to(dtype)
        return w0sq + 2 * inner.reshape(-1) * rs + quad.reshape(-1) * rs * rs


# ----------------------------------------------------------------------------------------------
# Norms over a base layer whose weight is not readable (quantized), from column blocks.
# ----------------------------------------------------------------------------------------------
def layer_norms_sq(columns: Callable[[torch.Tensor], torch.Tensor], delta: Callable[[torch.Tensor], torch.Tensor],
                   in_features: int, wd_on_out: bool, dtype, compute_dtype, device, row_scale=None) -> torch.Tensor:
    """‖W0 + diag(row_scale)·ΔW‖² per row (wd_on_out) or column for a Linear whose W0 is only reachable through
    its forward: columns(E) = E·W0ᵀ (the layer on basis rows, bias removed; a quantized layer dequantizes only
    what its own forward does), delta(E) = E·ΔWᵀ (the adapter's ΔW-free product). In blocks of at most 1/8 of
    the columns, each under checkpoint so backward regenerates it: nothing W-sized is made or kept by lyfast.
    The block's product is in `compute_dtype` (the layer's), the squares and sums in `dtype`."""
    from torch.utils.checkpoint import checkpoint

    step = max(1, in_features // MAX_BLOCK_FRACTION)
    eye = torch.eye(in_features, dtype=compute_dtype, device=device)

    def block(lo, hi):
        e = eye[lo:hi]
        dw = delta(e)
        if row_scale is not None:
            dw = dw * row_scale.to(dw.dtype)
        cols = (columns(e) + dw).to(dtype)  # (hi − lo, out): W0 + ΔW for these input columns, transposed
        return (cols * cols).sum(0 if wd_on_out else 1)

    parts = [checkpoint(block, lo, min(lo + step, in_features), use_reentrant=False)
             for lo in range(0, in_features, step)]
    return torch.stack(parts).sum(0) if wd_on_out else torch.cat(parts)


# ----------------------------------------------------------------------------------------------
# Public op.
# ----------------------------------------------------------------------------------------------
def dora_forward(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    dora_scale: torch.Tensor,
    norm_sq: torch.Tensor,
    *,
    spec: LayerSpec,
    delta: Callable[[torch.Tensor], torch.Tensor],
    multiplier=1.0,
    wd_on_out=True,
    base_forward: Callable[[torch.Tensor], torch.Tensor] | None = None,
    pad: Callable[[torch.Tensor], torch.Tensor] | None = None,
    weight_free: bool = False,
) -> torch.Tensor:
    """The DoRA-adapted layer's output, LyCORIS's base(x) + op(x, W' − W0) (see the module docstring),
    without W0 + ΔW.

    weight, bias: the frozen layer's W0 and bias. norm_sq: ‖W0 + ΔW‖² per row / column in dora_scale's
    dtype (`norms_sq`, `hada_norms_sq`). delta(x) = ΔW·x (op(x, ΔW) for convs), rank dropout applied to its
    output channels as it was in the norms. base_forward: the layer's forward when it is not the plain
    layer op(x, W0) + bias (another adapter stacked below, a custom forward); then
    y = base_forward(x) + (s − 1)·op(x, W0) + s·ΔW·x (rows) or base_forward(x) + op(x⊙s − x, W0) + ΔW·(x⊙s)
    (columns), which costs one more product with W0. pad: the layer's own input padding where `spec` has
    padding 0 because the layer pads otherwise (reflect/replicate/circular, 'same' with an even kernel): the
    W0 and ΔW products see pad(x), base_forward sees x. A per-input-channel scale commutes with every padding
    mode (each pads a channel from itself, or with zeros), so pad(x ⊙ s) = pad(x) ⊙ s. weight_free: W0 is not
    readable (a quantized base; `weight` is ignored): every W0 product is base_forward's, y = s ⊙ (base(x) − b
    + ΔW·x) + b (rows) or base(x ⊙ s) + ΔW·(x ⊙ s) (columns).
    """
    xp = x if pad is None else pad(x)
    if weight_free:
        s = magnitude_scale(norm_sq, dora_scale, multiplier)
        if wd_on_out:
            b = 0 if bias is None else bias
            y = base_forward(x)
            return (y - b + delta(xp)) * s.to(y.dtype) + b
        xs = x * s.to(x.dtype)
        return base_forward(xs) + delta(xs if pad is None else pad(xs))
    s = magnitude_scale(norm_sq, dora_scale, multiplier)
    view = (-1,) + (1,) * len(spec.kernel_size) if spec.is_conv else (-1,)
    if wd_on_out:
        y0 = spec.apply(xp, weight)
        dy = delta(xp)
        sv = s.to(y0.dtype).reshape(view)
        if base_forward is None:
            y = (y0 + dy) * sv
            return y if bias is None else y + bias.to(y.dtype).reshape(view)
        return base_forward(x) + y0 * (sv - 1) + dy * sv
    # columns: W·diag(s) applied to x is W applied to x scaled per input channel (groups share s)
    sx = s.repeat(spec.groups) if spec.groups > 1 else s
    xs = xp * sx.to(x.dtype).reshape(view)
    if base_forward is None:
        y0 = spec.apply(xs, weight)
        dy = delta(xs)
        y = y0 + dy
        return y if bias is None else y + bias.to(y.dtype).reshape(view)
    return base_forward(x) + spec.apply(xs - xp, weight) + delta(xs)
