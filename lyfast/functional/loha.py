"""LoHa: ΔW = ((w1a @ w1b) ⊙ (w2a @ w2b)) · scale, applied without building ΔW.

Factor layouts are LyCORIS's (`hada_w1_a` → w1a, ...):
  plain:  w1a (out, r1), w1b (r1, in·∏k)                     (conv kernels flattened into w1b)
  Tucker: w1a (r1, out), w1b (r1, in), t1 (r1, r1, *k)       ΔW1[o,c,k] = Σ_ij t1[i,j,k] w1b[j,c] w1a[i,o]
Both reduce to the canonical pair A (out, r) @ B (r, in·∏k) (`canonical_factors`), so one code path
serves both.

Two routes, chosen per shape by `choose_route` (a FLOP model):
  (a) Khatri-Rao: ΔW = F·K with F[o,(p,q)] = A1[o,p]·A2[o,q] (out × r1·r2) and
      K[(p,q),c] = B1[p,c]·B2[q,c] (r1·r2 × in·∏k), so ΔW·x = F·(K·x) — for convs a conv with K as
      r1·r2 output channels (repeated per group), then a grouped 1×1 conv with F.
      Per output pixel it costs r1·r2·(in·∏k + out) instead of out·in·∏k.
  (b) Row blocks: regenerate ΔW a block of rows (<= 1/8 of it) at a time (`RowBlockDelta`), for
      ranks where r1·r2 makes (a) dearer than one dense product.
  (b') Tile generation (Triton, Linear layers): `linear_forward` runs the frozen base layer and the
      adapter as ONE GEMM, x·(W0 + ΔW)ᵀ + bias, each ΔW tile generated in registers
      (`lyfast.kernels.loha`); a roofline cost model there picks it or (a) per shape. On the PyTorch
      path "tile" means (b).
"""
from __future__ import annotations

import torch

from .. import backend as _backend
from .general import add_base, epilogue_base, LayerSpec, RowGenerator, autocast_inputs, no_autocast, row_block_delta

ROUTES = ("auto", "khatri_rao", "rowblock", "tile")


# ----------------------------------------------------------------------------------------------
# Reference (pure PyTorch, builds ΔW): used by merge, tests and benchmarks.
# ----------------------------------------------------------------------------------------------
def diff_weight(w1a, w1b, w2a, w2b, t1=None, t2=None, scale=1.0) -> torch.Tensor:
    """ΔW = ((w1a @ w1b) ⊙ (w2a @ w2b)) · scale; shape (out, in·∏k), or (out, in, *k) with Tucker."""
    if t1 is not None:
        w1 = torch.einsum("ij...,jc,io->oc...", t1, w1b, w1a)
        w2 = torch.einsum("ij...,jc,io->oc...", t2, w2b, w2a)
    else:
        w1, w2 = w1a @ w1b, w2a @ w2b
    return w1 * w2 * scale


def canonical_factors(wa, wb, t=None):
    """(A, B) with A (out, r) and B (r, in·∏k) such that A @ B is this half's (out, in·∏k) matrix."""
    if t is None:
        return wa, wb
    b = torch.einsum("ij...,jc->ic...", t, wb)
    return wa.t(), b.reshape(b.shape[0], -1)


def khatri_rao_factors(a1, b1, a2, b2, scale=1.0):
    """F (out, r1·r2) = face-split(a1, a2)·scale and K (r1·r2, in·∏k) = Khatri-Rao(b1, b2)."""
    f = (a1[:, :, None] * a2[:, None, :]).reshape(a1.shape[0], -1)
    if not (isinstance(scale, (int, float)) and scale == 1):  # no extra launch for the usual 1.0
        f = f * scale
    k = (b1[:, None, :] * b2[None, :, :]).reshape(-1, b1.shape[1])
    return f, k


def choose_route(spec: LayerSpec, r1: int, r2: int, tokens: int) -> str:
    """Cheaper route by a FLOP model (forward + backward ≈ 3 passes; generation in route (b) runs
    once in forward and again in backward with its own gradient, ≈ 4 passes). Route (a) is only
    taken while F (out × r1·r2) and K (r1·r2 × in·∏k) stay smaller than the weight.

    Checked against both routes forced (fp32, 2 CPU threads, fwd+bwd with dx, × the frozen layer;
    `python -m benchmarks.loha_route_check`): the rule picked the faster route in all 21 cases of the
    2026-11-30 run (r = 8/16/32 on 1280², 640→5120 and 3072² at 1,024 tokens, 2048→1280 at 2×77 tokens,
    conv3×3 640 at 2×16², 1280 at 2×8², 320 at 64²); conv3×3 640 at r = 32 is a near-tie that an
    earlier run measured the other way (rowblock 4.15-4.26×, Khatri-Rao 4.07-4.79×). Route (a) is at its
    FLOP bound: r = 16 on 1280² costs 1 + 1.5·r²(in + out)/(in·out) = 1.60× and measured 1.68-1.71×; at
    r = 32 no ΔW-free route is below ~2.5× on 1,024 tokens (route (b) runs the layer's three GEMMs again),
    where it measured 2.96-3.04×, LyCORIS's bypass mode (which builds ΔW) 2.84×.
    """
    in_total = spec.in_features * spec.groups * spec.kernel_numel
    weight = spec.out_features * spec.in_features * spec.kernel_numel
    if r1 * r2 >= min(spec.out_features, spec.in_features * spec.kernel_numel):
        return "rowblock"
    kr = 3 * tokens * r1 * r2 * (in_total + spec.out_features)
    dense = 3 * tokens * weight + 4 * weight * (r1 + r2)
    return "khatri_rao" if kr <= dense else "rowblock"


# ----------------------------------------------------------------------------------------------
# Autograd Function: route (a).
# ----------------------------------------------------------------------------------------------
class KhatriRaoDelta(torch.autograd.Function):
    """y = F · (K · x) with F = face-split(a1, a2) and K = Khatri-Rao(b1, b2) built inside.

    P = op(x, K) (r1·r2 channels per group), y = F-mix of P per group. Saves x, P (r1·r2 channels
    per group: small) and the four canonical factors; F and K (out × r1·r2 and r1·r2 × in·∏k) are
    rebuilt in backward instead of kept, which on 77-token cross-attention layers would otherwise
    outweigh the activation. Factor gradients in closed form:
      da1[o,p] = Σ_q dF[o,p,q]·a2[o,q],   db1[p,c] = Σ_q dK[p,q,c]·b2[q,c]   (and symmetrically).

    Linear layers only: `base` + y when `base` (the layer's output, shaped like y) is given, added by
    the last GEMM (beta = 1); or, with the layer's `weight` (and `bias`) instead, the layer runs inside:
    y = x·weightᵀ + bias + F·(K·x), the adapter's last GEMM accumulating into the layer's output and, in
    backward, its dx into the layer's g·weight, in place (one activation-sized add and allocation fewer
    each way, as `lokr.KronDelta`); `weight` and `bias` get gradients when they require them. Measured
    through the module as `lokr.KronDelta`'s: 0.98 / 0.98 of the time at r8 / r16 on 1280², 0.97 / 0.96 on
    640→5120, within noise (0.99–1.01) on 3072².
    """

    @staticmethod
    def forward(ctx, x, a1, b1, a2, b2, spec: LayerSpec, base=None, weight=None, bias=None):
        f, k = khatri_rao_factors(a1, b1, a2, b2)
        if spec.is_conv:
            p = spec.apply(x, _conv_k(k, spec))
            y = _mix(p, f, spec.groups)
        else:
            p = x @ k.t()
            if weight is not None:
                y = torch.nn.functional.linear(x, weight, bias)
                y.view(-1, y.shape[-1]).addmm_(p.reshape(-1, p.shape[-1]), f.t())
            elif base is not None:
                y = torch.addmm(base.reshape(-1, base.shape[-1]), p.reshape(-1, p.shape[-1]), f.t()).view(base.shape)
            else:
                y = p @ f.t()
        ctx.spec = spec
        ctx.save_for_backward(x, p, a1, b1, a2, b2, weight if ctx.needs_input_grad[0] else None)  # for dx only
        return y

    @staticmethod
    def backward(ctx, grad):
        x, p, a1, b1, a2, b2, weight = ctx.saved_tensors
        spec = ctx.spec
        need_x = ctx.needs_input_grad[0]
        need_base, need_w, need_bias = (*ctx.needs_input_grad, False, False, False)[6:9]  # may be left out
        need_f = any(ctx.needs_input_grad[1:5:2])
        need_k = any(ctx.needs_input_grad[2:5:2])
        f, k = khatri_rao_factors(a1, b1, a2, b2)
        g, r = spec.groups, f.shape[1]
        if spec.is_conv:
            n = grad.shape[0]
            grad3 = grad.reshape(n, g, spec.out_features // g, -1)
            dp = (f.reshape(g, -1, r).mT @ grad3).reshape(p.shape)
            df = torch.einsum("ngos,ngrs->gor", grad3, p.reshape(n, g, r, -1)).reshape(f.shape) if need_f else None
            dx, dkw = spec.backward(dp, x, _conv_k(k, spec), need_x, need_k)
            dk = (dkw.reshape(g, r, -1).sum(0) if g > 1 else dkw.reshape(r, -1)) if need_k else None
        else:
            dp = grad @ f
            df = grad.reshape(-1, grad.shape[-1]).mT @ p.reshape(-1, r) if need_f else None
            if need_x and weight is not None:  # the layer's dx, the adapter's accumulated into it
                g2 = grad.reshape(-1, grad.shape[-1])
                dx = (g2 @ weight).addmm_(dp.reshape(-1, r), k).view(x.shape)
            else:
                dx = dp @ k if need_x else None
            dk = dp.reshape(-1, r).mT @ x.reshape(-1, x.shape[-1]) if need_k else None
        da1 = db1 = da2 = db2 = None
        # Multiply-and-sum, not einsum: einsum lowers these to bmm's batched over out (or in) with a
        # 1-wide result each, which on the CPU ran as 1,280 tiny products plus copies — 12 ms of a 25 ms
        # step at r = 32 on a 1280-wide layer (measured); one broadcast multiply and one sum take ~1 ms.
        if need_f:
            df3 = df.reshape(-1, a1.shape[1], a2.shape[1])
            da1 = (df3 * a2[:, None, :]).sum(2)
            da2 = (df3 * a1[:, :, None]).sum(1)
        if need_k:
            dk3 = dk.reshape(b1.shape[0], b2.shape[0], -1)
            db1 = (dk3 * b2[None]).sum(1)
            db2 = (dk3 * b1[:, None]).sum(0)
        g2 = grad.reshape(-1, grad.shape[-1])
        dw = g2.mT @ x.reshape(-1, x.shape[-1]) if need_w else None
        d_bias = g2.sum(0) if need_bias else None
        grads = (dx, da1, db1, da2, db2, None, grad if need_base else None, dw, d_bias)
        return grads[: len(ctx.needs_input_grad)]


def _conv_k(k: torch.Tensor, spec: LayerSpec) -> torch.Tensor:
    """K as conv weights (r1·r2 per group, repeated for every group): (groups·r1·r2, in, *k)."""
    kw = k.reshape(k.shape[0], spec.in_features, *spec.kernel_size)
    return kw.repeat(spec.groups, *([1] * (kw.dim() - 1))) if spec.groups > 1 else kw


def _mix(p: torch.Tensor, f: torch.Tensor, groups: int) -> torch.Tensor:
    """Grouped 1×1 conv of p (n, groups·r, *sp) with f (out, r): (n, out, *sp)."""
    n, r = p.shape[0], f.shape[1]
    y = f.reshape(groups, -1, r) @ p.reshape(n, groups, r, -1)
    return y.reshape(n, f.shape[0], *p.shape[2:])


# ----------------------------------------------------------------------------------------------
# Public op.
# ----------------------------------------------------------------------------------------------
def delta_forward(
    x, w1a, w1b, w2a, w2b, t1=None, t2=None, scale=1.0, *, spec: LayerSpec, route="auto", backend=None, base=None
):
    """ΔW·x (op(x, ΔW) for convs) with ΔW = ((w1a @ w1b) ⊙ (w2a @ w2b)) · scale, never built whole;
    `base` + ΔW·x when `base` (the frozen layer's output) is given, added in the Triton Khatri-Rao
    kernel's epilogue where it runs.

    `scale` may be a tensor (a trainable scalar gets its gradient). Factors are used in x's dtype.
    `route` is "auto" (FLOP model), "khatri_rao" or "rowblock" ("tile" runs as "rowblock" here: the
    tile kernel needs the base layer, see `linear_forward`). `backend` overrides
    `lyfast.set_backend` for this call (see `lyfast.backend`).
    """
    if route not in ROUTES:
        raise ValueError(f"unknown LoHa route {route!r}; expected one of {ROUTES}")
    backend = _backend.resolve(x.device, "loha", backend)
    return _delta_forward(x, w1a, w1b, w2a, w2b, t1, t2, scale, spec, route, backend, base)


def _delta_forward(x, w1a, w1b, w2a, w2b, t1, t2, scale, spec: LayerSpec, route: str, backend, base, layer=()):
    """`delta_forward` on an already resolved backend (shared with `linear_forward`). With `layer`, a
    Linear layer's (weight, bias), the result is that layer's output plus ΔW·x (`base` is then None):
    on the PyTorch Khatri-Rao route computed inside `KhatriRaoDelta`, elsewhere by F.linear first."""
    if route == "tile":  # the fused tile kernel needs the base layer (`linear_forward`); alone it is (b)
        route = "rowblock"
    a1, b1 = canonical_factors(w1a, w1b, t1)
    a2, b2 = canonical_factors(w2a, w2b, t2)
    a1 = a1 * scale
    if route == "auto":
        tokens = x.numel() // (x.shape[1] if spec.is_conv else x.shape[-1])  # input pixels
        route = choose_route(spec, a1.shape[1], a2.shape[1], tokens)
    _, x, cast = autocast_inputs(x, a1, b1, a2, b2, *layer)
    factors, layer = cast[:4], tuple(cast[4:])
    with no_autocast(x):
        if layer and route == "rowblock":
            base = torch.nn.functional.linear(x, *layer)
        if route == "rowblock":
            return row_block_delta(x, spec, HadaRows, factors, base)
        if backend == _backend.Backend.TRITON and not spec.is_conv:
            from lyfast.kernels import loha as triton_loha  # imports triton, registers lyfast::loha_*

            f, k = khatri_rao_factors(*factors)
            if triton_loha.supports(x, f, k):
                if layer:
                    base = torch.nn.functional.linear(x, *layer)
                fused = epilogue_base(base, x, spec.out_features)
                y = triton_loha.khatri_rao_delta(x, f, k, fused)
                return add_base(y, None if fused is not None else base)
        if layer:
            return KhatriRaoDelta.apply(x, *factors, spec, None, *layer)
        fused = None if spec.is_conv else epilogue_base(base, x, spec.out_features)
        return add_base(KhatriRaoDelta.apply(x, *factors, spec, fused), None if fused is not None else base)


def linear_forward(
    x, weight, bias, w1a, w1b, w2a, w2b, scale=1.0, *, route="auto", backend=None
):
    """F.linear(x, weight, bias) + ΔW·x for a Linear base layer, ΔW = ((w1a @ w1b) ⊙ (w2a @ w2b))·scale.

    On the Triton backend the base layer and the adapter can run as one GEMM with ΔW generated tile by
    tile (route "tile", `lyfast.kernels.loha.tile_linear`); "auto" asks the kernels' roofline cost model
    (`lyfast.kernels.loha.choose_route`) for "tile" or "khatri_rao". Otherwise (other backends, routes,
    dtypes, or ranks above the tile kernel's) it is `F.linear` plus `delta_forward`. Gradients flow to x,
    the factors and `scale`, and to `weight`/`bias` when they require grad.
    """
    if route not in ROUTES:
        raise ValueError(f"unknown LoHa route {route!r}; expected one of {ROUTES}")
    if w1a.dim() != 2 or weight.dim() != 2:
        raise ValueError(
            f"linear_forward takes a Linear layer's 2-D weight and plain LoHa factors, got weight "
            f"{tuple(weight.shape)} and hada_w1_a {tuple(w1a.shape)}"
        )
    backend = _backend.resolve(x.device, "loha", backend)
    spec = LayerSpec("linear", weight.shape[0], weight.shape[1])
    if backend == _backend.Backend.TRITON and route in ("auto", "tile"):
        from lyfast.kernels import loha as triton_loha  # imports triton, registers lyfast::loha_*

        if route == "auto":
            training = torch.is_grad_enabled() and any(
                t.requires_grad for t in (x, weight, w1a, w1b, w2a, w2b) + ((scale,) if torch.is_tensor(scale) else ())
            )
            dtype = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype
            route = triton_loha.choose_route(
                x.numel() // max(x.shape[-1], 1), weight.shape[1], weight.shape[0], w1a.shape[1], w2a.shape[1],
                dtype, x.device, training,
            )
        elif torch.are_deterministic_algorithms_enabled():
            raise RuntimeError(
                "LoHa route 'tile' sums its factor gradients with fp32 atomics, which is not deterministic, "
                "but torch.use_deterministic_algorithms(True) is set: use route 'auto' or 'khatri_rao'"
            )
        if route == "tile":
            _, xc, (wc, bc, a1, b1, a2, b2) = autocast_inputs(x, weight, bias, w1a * scale, w1b, w2a, w2b)
            if triton_loha.supports_tile(xc, wc, bc, a1, b1, a2, b2):
                with no_autocast(xc):
                    return triton_loha.tile_linear(xc, wc, bc, a1, b1, a2, b2)
            route = "auto"
    return _delta_forward(x, w1a, w1b, w2a, w2b, None, None, scale, spec, route, backend, None, (weight, bias))


class HadaRows(RowGenerator):
    """ΔW[lo:hi] = (a1[lo:hi] @ b1) ⊙ (a2[lo:hi] @ b2) on the canonical factors (scale in a1)."""

    @staticmethod
    def _halves(lo, hi, a1, b1, a2, b2):
        return a1[lo:hi] @ b1, a2[lo:hi] @ b2

    @staticmethod
    def rows(lo, hi, *factors):
        h1, h2 = HadaRows._halves(lo, hi, *factors)
        return h1 * h2

    @staticmethod
    def rows_and_state(lo, hi, *factors):
        # backward keeps the two halves: its factor gradients need both, and recomputing them was two
        # of the ten (rows × in × r) products of a step
        h1, h2 = HadaRows._halves(lo, hi, *factors)
        return h1 * h2, (h1, h2)

    @staticmethod
    def rows_backward(lo, hi, d_rows, a1, b1, a2, b2, state=None):
        h1, h2 = state if state is not None else HadaRows._halves(lo, hi, a1, b1, a2, b2)
        t1 = d_rows * h2  # dL/d(a1 b1) on these rows
        t2 = d_rows * h1
        da1, da2 = torch.zeros_like(a1), torch.zeros_like(a2)
        da1[lo:hi] = t1 @ b1.t()
        da2[lo:hi] = t2 @ b2.t()
        return da1, a1[lo:hi].t() @ t1, da2, a2[lo:hi].t() @ t2


def frobenius_norm(w1a, w1b, w2a, w2b, t1=None, t2=None, scale=1.0) -> torch.Tensor:
    """‖ΔW‖_F without ΔW: ‖F·K‖² = trace((FᵀF)(KKᵀ)), both r1·r2 × r1·r2."""
    a1, b1 = canonical_factors(w1a, w1b, t1)
    a2, b2 = canonical_factors(w2a, w2b, t2)
    f, k = khatri_rao_factors(a1, b1, a2, b2, scale)
    return ((f.t() @ f) * (k @ k.t())).sum().clamp_min(0).sqrt()
