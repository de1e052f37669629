"""LoKr: ΔW = kron(W1, W2) · scale, applied without building ΔW.

Factor layouts are LyCORIS's (`lokr_w1` → w1, `lokr_w2_a` → w2a, ...):
  W1 (out_l, in_m) = w1, or w1a (out_l, r) @ w1b (r, in_m)
  W2 (out_k, in_n[, *k]) = w2, or w2a (out_k, r) @ w2b (r, in_n·∏k) (conv kernel flattened into w2b),
     or Tucker: w2a (r, out_k), w2b (r, in_n), t2 (r, r, *k), W2[p,c,k] = Σ_ij t2[i,j,k] w2a[i,p] w2b[j,c]
ΔW[(l,k),(m,n)] = W1[l,m]·W2[k,n]; for convs W2 carries the kernel and W1 is broadcast over it.

Linear layers use the Kronecker–vector identity kron(W1, W2)·vec(X) = vec(W1·X·W2ᵀ) with X the
input viewed as (in_m, in_n). Convs split the input channels into in_m groups of in_n, convolve all of
them with W2 as one batched conv, then mix the groups with W1. Grouped convs (rare) take the
row-block route of `general.RowBlockDelta`. The small W1 and W2 are built by ordinary autograd.
"""
from __future__ import annotations

import torch

from .. import backend as _backend
from .general import add_base, epilogue_base, LayerSpec, RowGenerator, autocast_inputs, no_autocast, row_block_delta


# ----------------------------------------------------------------------------------------------
# Reference (pure PyTorch, builds ΔW).
# ----------------------------------------------------------------------------------------------
def canonical_factors(w1, w1a, w1b, w2, w2a, w2b, t2=None, kernel_size=()):
    """(W1 (out_l, in_m), W2 (out_k, in_n, *kernel_size)) from whichever factors are present."""
    c1 = w1 if w1 is not None else w1a @ w1b
    if w2 is not None:
        c2 = w2
    elif t2 is not None:
        c2 = torch.einsum("ij...,ip,jr->pr...", t2, w2a, w2b)
    else:
        c2 = (w2a @ w2b).reshape(w2a.shape[0], -1, *kernel_size)
    return c1, c2


def diff_weight(w1, w1a, w1b, w2, w2a, w2b, t2=None, scale=1.0, kernel_size=()) -> torch.Tensor:
    """ΔW = kron(W1, W2) · scale, shape (out, in, *kernel_size)."""
    c1, c2 = canonical_factors(w1, w1a, w1b, w2, w2a, w2b, t2, kernel_size)
    c1 = c1.reshape(*c1.shape, *([1] * (c2.dim() - 2)))
    return torch.kron(c1, c2.contiguous()) * scale


# ----------------------------------------------------------------------------------------------
# Autograd Function.
# ----------------------------------------------------------------------------------------------
class KronDelta(torch.autograd.Function):
    """y = kron(W1, W2)·x per token (linear) or per pixel after a batched conv with W2 (conv).

    Saves x, W1 and W2 only: the (tokens, in_m, out_k) intermediate H = X·W2ᵀ is recomputed in
    backward for dW1 (one small product) instead of being kept for the whole step.
    """

    @staticmethod
    def forward(ctx, x, c1, c2, spec: LayerSpec):
        out_l, in_m = c1.shape
        ctx.spec = spec
        ctx.save_for_backward(x, c1, c2)
        h, n, spatial = _inner(x, c2, in_m, spec)
        z = c1 @ h  # (n, out_l, out_k·pixels)
        return z.reshape(n, spec.out_features, *spatial) if spec.is_conv else z.reshape(*x.shape[:-1], -1)

    @staticmethod
    def backward(ctx, grad):
        x, c1, c2 = ctx.saved_tensors
        spec = ctx.spec
        out_l, in_m = c1.shape
        out_k = c2.shape[0]
        need_x, need_c1, need_c2 = ctx.needs_input_grad[:3]
        if spec.is_conv:
            n = x.shape[0]
            g = grad.reshape(n, out_l, -1)
            p = (c1.mT @ g).reshape(n * in_m, out_k, *grad.shape[2:])
            xg = x.reshape(n * in_m, -1, *x.shape[2:])
            dxg, dc2 = spec.backward(p, xg, c2, need_x, need_c2)
            dx = dxg.reshape(x.shape) if need_x else None
        else:
            g = grad.reshape(-1, out_l, out_k)
            p = c1.mT @ g  # (N, in_m, out_k)
            xr = x.reshape(-1, in_m, x.shape[-1] // in_m)
            dx = (p @ c2).reshape(x.shape) if need_x else None
            dc2 = p.reshape(-1, out_k).mT @ xr.reshape(-1, xr.shape[-1]) if need_c2 else None
        dc1 = None
        if need_c1:
            h = _inner(x, c2, in_m, spec)[0]
            dc1 = torch.einsum("nlj,nmj->lm", g, h)
        return dx, dc1, dc2, None


def _inner(x, c2, in_m, spec):
    """H = X·W2ᵀ for every input-channel group as (n, in_m, out_k·pixels), n, output spatial size."""
    if spec.is_conv:
        n = x.shape[0]
        h = spec.apply(x.reshape(n * in_m, -1, *x.shape[2:]), c2, groups=1)
        return h.reshape(n, in_m, -1), n, h.shape[2:]
    xr = x.reshape(-1, in_m, x.shape[-1] // in_m)
    return xr @ c2.mT, xr.shape[0], ()


# ----------------------------------------------------------------------------------------------
# Public op.
# ----------------------------------------------------------------------------------------------
def delta_forward(
    x, w1, w1a, w1b, w2, w2a, w2b, t2=None, scale=1.0, *, spec: LayerSpec, backend=None, base=None
):
    """ΔW·x (op(x, ΔW) for convs) with ΔW = kron(W1, W2)·scale, never built whole; `base` + ΔW·x when
    `base` (the frozen layer's output) is given, added in the Triton kernel's epilogue where it runs.

    `scale` may be a tensor (a trainable scalar gets its gradient); it is folded into W1.
    `backend` overrides `lyfast.set_backend` for this call (see `lyfast.backend`).
    """
    backend = _backend.resolve(x.device, "lokr", backend)
    c1, c2 = canonical_factors(w1, w1a, w1b, w2, w2a, w2b, t2, spec.kernel_size)
    c1 = c1 * scale
    in_total = spec.in_features
    if c1.shape[1] * c2.shape[1] != in_total or c1.shape[0] * c2.shape[0] != spec.out_features:
        raise ValueError(
            f"LoKr factors {tuple(c1.shape)} ⊗ {tuple(c2.shape)} do not match the layer weight "
            f"{spec.weight_shape}"
        )
    _, x, (c1, c2) = autocast_inputs(x, c1, c2)
    with no_autocast(x):
        if spec.groups > 1:
            return add_base(row_block_delta(x, spec, KronRows, (c1, c2)), base)
        if backend == _backend.Backend.TRITON and not spec.is_conv:
            from lyfast.kernels import lokr as triton_lokr  # imports triton and registers lyfast::lokr_*

            if triton_lokr.supports(x, c1, c2):
                fused = epilogue_base(base, x, spec.out_features)
                return add_base(torch.ops.lyfast.lokr_fwd(x, c1, c2, fused), None if fused is not None else base)
        if backend == _backend.Backend.CUDA and not spec.is_conv:
            from lyfast import cuda_ops  # lyfast::cuda_lokr_*; resolve() loaded the compiled kernels

            if cuda_ops.lokr_supported(x, c1, c2):
                return add_base(cuda_ops.kron_delta(x, c1, c2), base)
        return add_base(KronDelta.apply(x, c1, c2, spec), base)


class KronRows(RowGenerator):
    """ΔW[o] = c1[o // out_k] ⊗ c2[o % out_k] for rows o in [lo, hi) (grouped convs)."""

    @staticmethod
    def _pick(lo, hi, c1, c2):
        rows = torch.arange(lo, hi, device=c1.device)
        out_k = c2.shape[0]
        return rows // out_k, rows % out_k

    @staticmethod
    def rows(lo, hi, c1, c2):
        i1, i2 = KronRows._pick(lo, hi, c1, c2)
        a, b = c1[i1], c2[i2].reshape(hi - lo, -1)  # (rows, in_m), (rows, in_n·∏k)
        return (a.unsqueeze(2) * b.unsqueeze(1)).reshape(hi - lo, -1)

    @staticmethod
    def rows_backward(lo, hi, d_rows, c1, c2):
        i1, i2 = KronRows._pick(lo, hi, c1, c2)
        a, b = c1[i1], c2[i2].reshape(hi - lo, -1)
        d3 = d_rows.reshape(hi - lo, a.shape[1], b.shape[1])
        dc1 = torch.zeros_like(c1).index_add_(0, i1, torch.einsum("rmj,rj->rm", d3, b))
        dc2 = torch.zeros_like(c2).index_add_(0, i2, torch.einsum("rmj,rm->rj", d3, a).reshape(-1, *c2.shape[1:]))
        return dc1, dc2


def frobenius_norm(w1, w1a, w1b, w2, w2a, w2b, t2=None, scale=1.0, kernel_size=()) -> torch.Tensor:
    """‖ΔW‖_F without ΔW: ‖kron(A, B)‖ = ‖A‖·‖B‖."""
    c1, c2 = canonical_factors(w1, w1a, w1b, w2, w2a, w2b, t2, kernel_size)
    return c1.norm() * c2.norm() * abs(scale)
