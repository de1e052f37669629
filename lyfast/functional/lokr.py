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

import math

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
#
# With x viewed per token (linear) or per image (conv) as in_m groups of in_n channels, ΔW·x is c2
# applied to every group (`spec.apply`: one GEMM, or one conv over all groups — "the c2 op") and c1
# mixing the groups (`_mix`: one batched GEMM with c1 broadcast over the batch — "the c1 mix"). Both
# run on views that need no copy (the c2 op contracts the contiguous channel axis, the c1 mix the
# group axis through strides) and the result comes out in the layer's output layout: a step makes no
# permute copy. Which product runs first, forward and backward, is a cost rule (`kron_plan`).
# ----------------------------------------------------------------------------------------------
def _mix(c1: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """c1 (a, b) applied to every item of t (items, b, rest): (items, a, rest), one batched GEMM."""
    return torch.bmm(c1.expand(t.shape[0], *c1.shape), t)


def kron_plan(c1_shape, c2_shape, kernel_numel: int = 1, stride_numel: int = 1) -> tuple[bool, bool]:
    """(forward applies the c1 mix first, backward starts from V), by multiply-adds per output pixel.

    With p = ∏stride input pixels per output pixel, a c1 mix costs out_l·in_m·in_n·p on the input
    side ("mix_in") and out_l·in_m·out_k on the output side ("mix_out"); the c2 op on s groups costs
    s·out_k·in_n·∏k ("op(s)").
      forward   c1 first: mix_in + op(out_l)        c2 first: op(in_m) + mix_out
      backward  from V:   2·op(out_l) + 3·mix_in    V = c2-op-transposed(G); dx = c1ᵀ-mix(V),
                                                    dc1 = Σ V·xᵀ, dc2 from G and T = c1-mix(x)
                from P:   3·op(in_m) + 2·mix_out    P = c1ᵀ-mix(G); dx and dc2 from P and x,
                                                    dc1 = Σ G·Hᵀ with H = c2-op(x)
    """
    out_l, in_m = c1_shape
    out_k, in_n = c2_shape[:2]
    mix_in, mix_out = out_l * in_m * in_n * stride_numel, out_l * in_m * out_k
    op = out_k * in_n * kernel_numel
    c1_first = mix_in + out_l * op <= in_m * op + mix_out
    from_v = 2 * out_l * op + 3 * mix_in <= 3 * in_m * op + 2 * mix_out
    return c1_first, from_v


def _grouped(t: torch.Tensor, m: int, spec: LayerSpec) -> torch.Tensor:
    """An activation, (..., m·c) for linear or (n, m·c, *px) for convs, as (items, m, c·px)."""
    if spec.is_conv:
        return t.reshape(t.shape[0], m, -1)
    return t.reshape(-1, m, t.shape[-1] // m)


def _per_group(t: torch.Tensor, c: int, spatial, spec: LayerSpec) -> torch.Tensor:
    """(items, m, c·px) as the c2 op's operand: (items·m, c) for linear, (items·m, c, *px) for convs."""
    return t.reshape(-1, c, *spatial) if spec.is_conv else t.reshape(-1, c)


def _sum_outer(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Σ_items a_i·b_iᵀ for a (items, p, r), b (items, q, r): (p, q)."""
    return torch.bmm(a, b.mT).sum(0)


class KronDelta(torch.autograd.Function):
    """y = kron(c1, c2)·x per token (linear), or per pixel with c2 a conv kernel (conv); `base` + y
    when `base` is given (a linear layer's output, shaped like y: added by the last GEMM, beta = 1).

    With `weight` (and `bias`, optional) of a Linear layer instead of `base`, the layer itself runs
    inside: y = x·weightᵀ + bias + kron(c1, c2)·x, the adapter's last GEMM accumulating into the layer's
    output in place, and in backward the adapter's dx into the layer's g·weight in place: one
    activation-sized add and one allocation fewer each way. Measured through the module against
    F.linear + KronDelta with `base` (fp32, 2 CPU threads, fwd+bwd, 1,024 tokens, `issue15_table
    --before`, minima of 9 interleaved rounds): 0.99 / 0.99 of the time on 1280² f−1 / f8, 0.98 / 0.99 on
    640→5120, 0.99 / 0.98 on 3072². `weight` and `bias` get gradients when they require them.

    Saves x, c1 and c2 only (and `weight` when x needs its gradient): the intermediate of the two products is
    recomputed in backward (one product of input size) rather than kept for the whole step.
    """

    @staticmethod
    def forward(ctx, x, c1, c2, spec: LayerSpec, base=None, weight=None, bias=None):
        out_l, in_m = c1.shape
        out_k, in_n = c2.shape[:2]
        c1_first, from_v = kron_plan(c1.shape, c2.shape, spec.kernel_numel, math.prod(spec.stride))
        xg = _grouped(x, in_m, spec)
        items, sp_in = xg.shape[0], x.shape[2:] if spec.is_conv else ()
        own_base = weight is not None  # base is this call's own tensor: the adapter adds into it in place
        if own_base:
            base = torch.nn.functional.linear(x, weight, bias)
        if c1_first:
            t = _per_group(_mix(c1, xg), in_n, sp_in, spec)
            if base is not None and not spec.is_conv:
                b2 = base.reshape(-1, out_k)
                y = b2.addmm_(t, c2.mT) if own_base else torch.addmm(b2, t, c2.mT)
                base = None
            else:
                y = spec.apply(t, c2, groups=1)
        else:
            h = spec.apply(_per_group(xg, in_n, sp_in, spec), c2, groups=1)
            sp_out, h = h.shape[2:], h.reshape(items, in_m, -1)
            if base is not None and not spec.is_conv:
                b3, c1e = base.reshape(items, out_l, -1), c1.expand(items, out_l, in_m)
                y = b3.baddbmm_(c1e, h) if own_base else torch.baddbmm(b3, c1e, h)
                base = None
            else:
                y = _mix(c1, h).reshape(items * out_l, out_k, *sp_out)
        if spec.is_conv:
            y = y.reshape(items, spec.out_features, *y.shape[2:])
        else:
            y = y.reshape(*x.shape[:-1], spec.out_features)
        ctx.spec, ctx.from_v = spec, from_v
        ctx.save_for_backward(x, c1, c2, weight if ctx.needs_input_grad[0] else None)  # weight: for dx only
        return add_base(y, base)

    @staticmethod
    def backward(ctx, grad):
        x, c1, c2, weight = ctx.saved_tensors
        spec = ctx.spec
        out_l, in_m = c1.shape
        out_k, in_n = c2.shape[:2]
        need_x, need_c1, need_c2 = ctx.needs_input_grad[:3]
        need = (*ctx.needs_input_grad, False, False, False)  # base, weight, bias may be left out
        need_base, need_w, need_bias = need[4:7]
        xg = _grouped(x, in_m, spec)
        gg = _grouped(grad, out_l, spec)
        sp_in, sp_out = (x.shape[2:], grad.shape[2:]) if spec.is_conv else ((), ())
        dx = dc1 = dc2 = dw = d_bias = None
        # with the layer inside: its dx = g·weight, which the adapter's dx then accumulates into
        dx_base = grad.reshape(-1, grad.shape[-1]) @ weight if weight is not None and need_x else None
        if ctx.from_v:
            # T = c1-mix(x) is only the input of dc2's product; without dc2 any tensor of its shape will do
            t = _mix(c1, xg) if need_c2 else xg.new_empty((xg.shape[0], out_l, xg.shape[2]))
            v, dc2 = spec.backward(
                _per_group(gg, out_k, sp_out, spec), _per_group(t, in_n, sp_in, spec), c2,
                need_x or need_c1, need_c2, groups=1,
            )
            if need_x or need_c1:
                v = v.reshape(xg.shape[0], out_l, -1)
                if need_x and dx_base is not None:
                    dx = dx_base.view(xg.shape).baddbmm_(c1.mT.expand(xg.shape[0], in_m, out_l), v).view(x.shape)
                elif need_x:
                    dx = _mix(c1.mT, v).reshape(x.shape)
                dc1 = _sum_outer(v, xg) if need_c1 else None
        else:
            p = _mix(c1.mT, gg)
            dx, dc2 = spec.backward(
                _per_group(p, out_k, sp_out, spec), _per_group(xg, in_n, sp_in, spec), c2, need_x, need_c2, groups=1
            )
            if need_x:
                dx = dx.reshape(x.shape) if dx_base is None else dx_base.view(x.shape).add_(dx.view(x.shape))
            if need_c1:
                h = spec.apply(_per_group(xg, in_n, sp_in, spec), c2, groups=1)
                dc1 = _sum_outer(gg, h.reshape(xg.shape[0], in_m, -1))
        if need_w:
            dw = grad.reshape(-1, grad.shape[-1]).mT @ x.reshape(-1, x.shape[-1])
        if need_bias:
            d_bias = grad.reshape(-1, grad.shape[-1]).sum(0)
        grads = (dx, dc1, dc2, None, grad if need_base else None, dw, d_bias)
        return grads[: len(ctx.needs_input_grad)]


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
    return _delta_forward(x, *_canonical(w1, w1a, w1b, w2, w2a, w2b, t2, scale, spec), spec, backend, base)


def linear_forward(x, weight, bias, w1, w1a, w1b, w2, w2a, w2b, scale=1.0, *, backend=None):
    """F.linear(x, weight, bias) + ΔW·x for a Linear base layer, ΔW = kron(W1, W2)·scale.

    On the PyTorch path one `KronDelta` runs the layer and the adapter together (the adapter accumulates
    into the layer's output and, in backward, into its dx, in place); on the fused backends it is
    `F.linear` plus `delta_forward` with the layer's output added in the kernel's epilogue. Gradients flow
    to x, the factors and `scale`, and to `weight`/`bias` when they require grad.
    """
    if weight.dim() != 2:
        raise ValueError(f"linear_forward takes a Linear layer's 2-D weight, got {tuple(weight.shape)}")
    backend = _backend.resolve(x.device, "lokr", backend)
    spec = LayerSpec("linear", weight.shape[0], weight.shape[1])
    c1, c2 = _canonical(w1, w1a, w1b, w2, w2a, w2b, None, scale, spec)
    if backend != _backend.Backend.TORCH:
        return _delta_forward(x, c1, c2, spec, backend, torch.nn.functional.linear(x, weight, bias))
    _, x, (weight, bias, c1, c2) = autocast_inputs(x, weight, bias, c1, c2)
    with no_autocast(x):
        return KronDelta.apply(x, c1, c2, spec, None, weight, bias)


def _canonical(w1, w1a, w1b, w2, w2a, w2b, t2, scale, spec: LayerSpec):
    """(c1·scale, c2) from the factors, checked against the layer's weight shape."""
    c1, c2 = canonical_factors(w1, w1a, w1b, w2, w2a, w2b, t2, spec.kernel_size)
    c1 = c1 * scale
    if c1.shape[1] * c2.shape[1] != spec.in_features or c1.shape[0] * c2.shape[0] != spec.out_features:
        raise ValueError(
            f"LoKr factors {tuple(c1.shape)} ⊗ {tuple(c2.shape)} do not match the layer weight "
            f"{spec.weight_shape}"
        )
    return c1, c2


def _delta_forward(x, c1, c2, spec: LayerSpec, backend, base):
    """`delta_forward` on canonical factors and an already resolved backend (shared with `linear_forward`)."""
    _, x, (c1, c2) = autocast_inputs(x, c1, c2)
    with no_autocast(x):
        if spec.groups > 1:
            return row_block_delta(x, spec, KronRows, (c1, c2), base)
        if backend == _backend.Backend.TRITON and not spec.is_conv:
            from lyfast.kernels import lokr as triton_lokr  # imports triton and registers lyfast::lokr_*

            if triton_lokr.supports(x, c1, c2):
                fused = epilogue_base(base, x, spec.out_features)
                return add_base(torch.ops.lyfast.lokr_fwd(x, c1, c2, fused), None if fused is not None else base)
        if backend == _backend.Backend.CUDA and not spec.is_conv:
            from lyfast import cuda_ops  # lyfast::cuda_lokr_*; resolve() loaded the compiled kernels

            if cuda_ops.lokr_supported(x, c1, c2):
                return add_base(cuda_ops.kron_delta(x, c1, c2), base)
        fused = None if spec.is_conv else epilogue_base(base, x, spec.out_features)
        return add_base(KronDelta.apply(x, c1, c2, spec, fused), None if fused is not None else base)


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
    def rows_backward(lo, hi, d_rows, c1, c2, state=None):
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
