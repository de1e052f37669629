"""LoKr (linear layers) in Triton: y = vec(W1 · X · W2ᵀ) per token, X the token's input viewed (in_m, in_n).

Names follow `lyfast.functional.lokr`: c1 = W1 (out_l, in_m) with the scale folded in, c2 = W2 (out_k, in_n).

Forward (`_kron_fwd_kernel`): a program owns BT tokens and a block of BK output columns k. It forms
H = X·c2ᵀ for its BT·in_m rows as one GEMM (looping over in_n), keeps H in registers, re-lays it out as
(in_m, BT·BK) and multiplies by c1 — both small products in one kernel; the (tokens, in_m, out_k)
intermediate never reaches memory. The frozen layer's output, when given, is added in the fp32 epilogue
(y = base + γ·vec(W1·X·W2ᵀ) in one pass). The same kernel computes dx = vec(c1ᵀ·G·c2) from the output gradient
G with the factors' strides transposed.

Backward (`_kron_bwd_kernel`): a program owns a (out_k, in_n) block of dW2 and a group of token tiles; per
tile it forms P = c1ᵀ·G (in registers) and H = X·c2ᵀ (the H block of its (k, n) block: dW1 is linear in
H, so per-block partial H gives an exact partial dW1), accumulates dW2 += Pᵀ·X and dW1 += G·Hᵀ in fp32
registers, and when one column block covers all of out_k it also writes dx = P·c2 (one pass over G and X).
Factor gradients are reduced DETERMINISTICALLY in two stages, not with fp32 atomics: each program stores
its fp32 partial sums to its own slot and one torch.sum over the slots follows. The buffers are small
(about two programs per SM, each holding a dW1-sized and a dW2-block-sized partial), and the result is
bit-reproducible run to run on a given GPU, which atomics (whose order varies) are not.

Layout of this file: kernels → plans/launchers → torch.library ops (fake kernels, autograd).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ._common import SUPPORTED_DTYPES, jit, next_pow2, or_empty, persistent_programs, precision_for



# ----------------------------------------------------------------------------------------------
# Kernels.
# ----------------------------------------------------------------------------------------------
@jit
def _kron_fwd_kernel(
    x_ptr, a_ptr, b_ptr, y_ptr, base_ptr,
    T, M, N, L, K,
    sx_t, sx_m, sx_n,
    sa_l, sa_m,
    sb_k, sb_n,
    sy_t, sy_l, sy_k,
    sz_t, sz_l, sz_k, has_base,
    BT: tl.constexpr, MP: tl.constexpr, BN: tl.constexpr, BL: tl.constexpr, BK: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """Y_t[l, k] = Σ_m A[l, m] Σ_n X_t[m, n] B[k, n] (+ BASE_t[l, k] when has_base, in the fp32 epilogue)
    for BT tokens t and BK columns k. has_base is a runtime argument,
    but a launch specializes it to a constant when it is 1: two compiled variants."""
    pid_t = tl.program_id(0)
    pid_k = tl.program_id(1)
    rows = tl.arange(0, BT * MP)  # (token, m) pairs
    tok = pid_t * BT + rows // MP
    m = rows % MP
    row_ok = (tok < T) & (m < M)
    x_row = x_ptr + tok.to(tl.int64) * sx_t + m * sx_m
    k = pid_k * BK + tl.arange(0, BK)
    k_ok = k < K

    h = tl.zeros((BT * MP, BK), dtype=tl.float32)
    for n0 in range(0, N, BN):
        n = n0 + tl.arange(0, BN)
        n_ok = n < N
        xt = tl.load(x_row[:, None] + n[None, :] * sx_n, mask=row_ok[:, None] & n_ok[None, :], other=0.0)
        bt = tl.load(b_ptr + k[None, :] * sb_k + n[:, None] * sb_n, mask=k_ok[None, :] & n_ok[:, None], other=0.0)
        h += tl.dot(xt, bt, input_precision=PRECISION)
    # (BT·MP, BK) → (MP, BT·BK): the second product contracts m for every (token, k) column at once.
    hp = tl.reshape(tl.permute(tl.reshape(h.to(x_ptr.dtype.element_ty), (BT, MP, BK)), (1, 0, 2)), (MP, BT * BK))

    cols = tl.arange(0, BT * BK)
    ctok = pid_t * BT + cols // BK
    ck = pid_k * BK + cols % BK
    col_ok = (ctok < T) & (ck < K)
    y_col = y_ptr + ctok.to(tl.int64) * sy_t + ck * sy_k
    z_col = base_ptr + ctok.to(tl.int64) * sz_t + ck * sz_k
    mm = tl.arange(0, MP)
    for l0 in range(0, L, BL):
        l = l0 + tl.arange(0, BL)
        l_ok = l < L
        at = tl.load(a_ptr + l[:, None] * sa_l + mm[None, :] * sa_m, mask=l_ok[:, None] & (mm < M)[None, :], other=0.0)
        yt = tl.dot(at, hp, input_precision=PRECISION)
        if has_base:
            yt += tl.load(z_col[None, :] + l[:, None] * sz_l, mask=l_ok[:, None] & col_ok[None, :], other=0.0).to(tl.float32)
        tl.store(y_col[None, :] + l[:, None] * sy_l, yt.to(y_ptr.dtype.element_ty), mask=l_ok[:, None] & col_ok[None, :])


@jit
def _kron_bwd_kernel(
    g_ptr, x_ptr, a_ptr, b_ptr, dx_ptr, da_ptr, db_ptr,
    T, M, N, L, K, TILES,
    sg_t, sg_l, sg_k,
    sx_t, sx_m, sx_n,
    sa_l, sa_m,
    sb_k, sb_n,
    sdx_t, sdx_m, sdx_n,
    fuse_dx,
    BT: tl.constexpr, MP: tl.constexpr, LP: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """Partial dA = Σ G_t·H_tᵀ and dB = Σ P_tᵀ·X_t over this program's token tiles, for its (k, n) block,
    with P_t = Aᵀ·G_t and H_t = X_t·Bᵀ (block); with fuse_dx (one k block covers K) also dX_t = P_t·B.
    fuse_dx is a runtime argument, but a launch specializes it to a constant when it is 1: two compiled
    variants."""
    pid_g = tl.program_id(0)
    pid_k = tl.program_id(1)
    pid_n = tl.program_id(2)
    groups = tl.num_programs(0)
    dt = x_ptr.dtype.element_ty

    k = pid_k * BK + tl.arange(0, BK)
    k_ok = k < K
    n = pid_n * BN + tl.arange(0, BN)
    n_ok = n < N
    ll = tl.arange(0, LP)
    mm = tl.arange(0, MP)
    # Aᵀ (MP, LP) and the B block as (BN, BK) and (BK, BN): loaded once per program.
    at = tl.load(a_ptr + ll[None, :] * sa_l + mm[:, None] * sa_m, mask=(ll < L)[None, :] & (mm < M)[:, None], other=0.0)
    b_nk = tl.load(b_ptr + k[None, :] * sb_k + n[:, None] * sb_n, mask=k_ok[None, :] & n_ok[:, None], other=0.0)

    rows = tl.arange(0, BT * MP)
    cols = tl.arange(0, BT * BK)
    da = tl.zeros((LP, MP), dtype=tl.float32)
    db = tl.zeros((BK, BN), dtype=tl.float32)
    for tile in range(pid_g, TILES, groups):
        # G tile as (LP, BT·BK): column (token, k).
        ctok = tile * BT + cols // BK
        ck = pid_k * BK + cols % BK
        col_ok = (ctok < T) & (ck < K)
        gt = tl.load(
            g_ptr + ctok.to(tl.int64)[None, :] * sg_t + ck[None, :] * sg_k + ll[:, None] * sg_l,
            mask=col_ok[None, :] & (ll < L)[:, None], other=0.0,
        )
        # X tile as (BT·MP, BN): row (token, m).
        rtok = tile * BT + rows // MP
        rm = rows % MP
        row_ok = (rtok < T) & (rm < M)
        xt = tl.load(
            x_ptr + rtok.to(tl.int64)[:, None] * sx_t + rm[:, None] * sx_m + n[None, :] * sx_n,
            mask=row_ok[:, None] & n_ok[None, :], other=0.0,
        )
        # P = Aᵀ·G per token, as (BT·MP, BK).
        p = tl.dot(at, gt, input_precision=PRECISION).to(dt)
        p = tl.reshape(tl.permute(tl.reshape(p, (MP, BT, BK)), (1, 0, 2)), (BT * MP, BK))
        db += tl.dot(tl.trans(p), xt, input_precision=PRECISION)
        # H block = X·Bᵀ per token, as (MP, BT·BK); dA += G·Hᵀ.
        h = tl.dot(xt, b_nk, input_precision=PRECISION).to(dt)
        h = tl.reshape(tl.permute(tl.reshape(h, (BT, MP, BK)), (1, 0, 2)), (MP, BT * BK))
        da += tl.dot(gt, tl.trans(h), input_precision=PRECISION)
        if fuse_dx:
            dxt = tl.dot(p, tl.trans(b_nk), input_precision=PRECISION)
            tl.store(
                dx_ptr + rtok.to(tl.int64)[:, None] * sdx_t + rm[:, None] * sdx_m + n[None, :] * sdx_n,
                dxt.to(dx_ptr.dtype.element_ty), mask=row_ok[:, None] & n_ok[None, :],
            )
    # Partial slots: da (groups, k blocks, n blocks, L, M), db (groups, K, N); both fp32.
    slot = (pid_g * tl.num_programs(1) + pid_k) * tl.num_programs(2) + pid_n
    tl.store(da_ptr + slot.to(tl.int64) * (L * M) + ll[:, None] * M + mm[None, :], da,
             mask=(ll < L)[:, None] & (mm < M)[None, :])
    tl.store(db_ptr + pid_g.to(tl.int64) * (K * N) + k[:, None] * N + n[None, :], db,
             mask=k_ok[:, None] & n_ok[None, :])


# ----------------------------------------------------------------------------------------------
# Plans and launchers.
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class FwdConfig:
    BT: int
    MP: int
    BN: int
    BL: int
    BK: int
    num_warps: int = 4
    num_stages: int = 2


@dataclass(frozen=True)
class BwdConfig:
    BT: int
    MP: int
    LP: int
    BN: int
    BK: int
    num_warps: int = 4
    num_stages: int = 2


# Tiles per padded width W (in_m for the forward; max(in_m, out_l) for the backward): (BT, BK, BN/BL).
# BT·W rows feed the first GEMM (64, or 128 when W is 128) and BT·BK <= 128 output columns per program,
# so every fp32 accumulator is <= 4096 elements. Widths of the streamed dimensions (in_n, out_l, out_k)
# are masked, so one config per W serves every shape (each launch still compiles a variant per
# specialization: tests/launch_signatures.py). W < 32 is padded to 32 (the kernels are memory-bound; the
# padded rows cost only tensor-core time).
_TILES = {32: (2, 64, 32), 64: (1, 64, 32), 128: (1, 32, 32)}
# fp32 operands (3×TF32: each dot operand split in two, registers about tripled). Backward at W = 32: the
# half-precision tile (BT=2, BK=64) spilled 10 KB per thread on sm_80 and 2.9 KB on sm_90 for launched
# signatures, (1, 32) still 40 B on sm_90; (1, 16) spills nothing on either. At W = 64 every backward tile
# tried spills (BK=16: 200-232 B; BN=16 too: 8-128 B), from the 64×64 Aᵀ tile and its split halves held
# across the token loop, so `supports` stops fp32 at W = 32 (the PyTorch path takes wider fp32 factors);
# the wider entries serve only direct calls of the op (the interpreter tests). The forward: _FWD_TILES_FP32.
# With Triton 3.9 the W = 32 tile (1, 16, 32) spills 32 B per thread on sm_90 for two launched fp32 variants
# (SDXL 640→640 factor -1 and 2048→1280 factor 4; 255 registers): BN = 16 takes it to 172 registers and no
# spill (4 warps instead kept BN = 32 at exactly 255 registers, no headroom), issue 20 item 13.
_BWD_TILES_FP32 = {32: (1, 16, 16), 64: (1, 16, 16), 128: (1, 16, 16)}
# Half-precision backward at W = 128: BK = 32 spilled 56 B per thread on sm_90 for launched signatures
# (SDXL 1280→10240, factor -1); BK = 16 spills nothing on sm_80 or sm_90. At W = 32 the forward's (2, 64)
# spilled 8 B on sm_80 (bf16/fp16, 640→640 x4096, Triton 3.9, all-variant compile); (1, 64): 205 registers,
# none.
_BWD_TILES = {**_TILES, 32: (1, 64, 32), 128: (1, 16, 32)}
# fp32 forward (3×TF32) at W = 32: (2, 64) spilled 80-88 B per thread on sm_80 for launched 1- and 1024-token
# signatures (Triton 3.9); (1, 64) still 8 B on sm_90; (2, 32) spills nothing on either (198-202 / 124-147
# registers). Only W = 32 takes fp32 (`supports`); the wider entries serve direct calls of the op.
_FWD_TILES_FP32 = {**_TILES, 32: (2, 32, 32)}
_MAX_W = {2: 128, 4: 32}


def _width(n: int) -> int:
    return next_pow2(n, 32)


def fwd_config(M: int, N: int, L: int, K: int, dtype: torch.dtype = torch.bfloat16) -> FwdConfig:
    mp = _width(M)
    bt, bk, bn = (_FWD_TILES_FP32 if dtype == torch.float32 else _TILES)[mp]
    return FwdConfig(BT=bt, MP=mp, BN=bn, BL=bn, BK=bk, num_warps=8 if mp == 128 else 4)


def bwd_config(M: int, N: int, L: int, K: int, dtype: torch.dtype = torch.bfloat16) -> BwdConfig:
    w = max(_width(M), _width(L))
    bt, bk, bn = (_BWD_TILES_FP32 if dtype == torch.float32 else _BWD_TILES)[w]
    return BwdConfig(BT=bt, MP=w, LP=w, BN=bn, BK=bk, num_warps=8)


def supports(x: torch.Tensor, c1: torch.Tensor, c2: torch.Tensor) -> bool:
    """Shapes and dtypes the kernels cover (linear LoKr with W1 and W2 whole-tile-sized on one side)."""
    return (
        x.dtype in SUPPORTED_DTYPES
        and c1.dtype == x.dtype
        and c2.dtype == x.dtype
        and c1.dim() == 2
        and c2.dim() == 2
        and x.shape[-1] == c1.shape[1] * c2.shape[1]
        and _width(max(c1.shape)) <= _MAX_W[x.element_size()]
        and x.device == c1.device == c2.device
    )


def _kron_apply(x2: torch.Tensor, a, a_strides, b, b_strides, M, N, L, K, out_dtype, base=None) -> torch.Tensor:
    """Y_t = A·X_t·Bᵀ (+ base2[t] when `base` (T, L·K) is given) for X_t = x2[t] viewed (M, N) row-major;
    returns (T, L·K)."""
    T = x2.shape[0]
    y = torch.empty(T, L * K, device=x2.device, dtype=out_dtype)
    if T == 0:
        return y
    cfg = fwd_config(M, N, L, K, x2.dtype)
    grid = (triton.cdiv(T, cfg.BT), triton.cdiv(K, cfg.BK))
    sxt, sxc = x2.stride()
    z = y if base is None else base
    _kron_fwd_kernel[grid](
        x2, a, b, y, z,
        T, M, N, L, K,
        sxt, N * sxc, sxc,
        *a_strides, *b_strides,
        y.stride(0), K, 1,
        z.stride(0), K * z.stride(1), z.stride(1), int(base is not None),
        BT=cfg.BT, MP=cfg.MP, BN=cfg.BN, BL=cfg.BL, BK=cfg.BK, PRECISION=precision_for(x2.dtype),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return y


def kron_forward(x: torch.Tensor, c1: torch.Tensor, c2: torch.Tensor, base: torch.Tensor | None = None) -> torch.Tensor:
    """vec(c1·X·c2ᵀ) per token of x (..., in_m·in_n) → (..., out_l·out_k), in x's dtype; plus `base` (same
    shape and dtype as the result: the frozen layer's output) added in the kernel's epilogue."""
    (L, M), (K, N) = c1.shape, c2.shape
    x2 = x.reshape(-1, x.shape[-1])
    base2 = None if base is None else base.reshape(-1, L * K)
    y = _kron_apply(x2, c1, c1.stride(), c2, c2.stride(), M, N, L, K, x.dtype, base2)
    return y.reshape(*x.shape[:-1], L * K)


def kron_backward(grad, x, c1, c2, need_x: bool = True, need_factors: bool = True):
    """(dx, dc1, dc2) of `kron_forward` (None where not needed); factor grads in fp32 then the factor dtype."""
    (L, M), (K, N) = c1.shape, c2.shape
    g2 = grad.reshape(-1, grad.shape[-1])
    x2 = x.reshape(-1, x.shape[-1])
    T = x2.shape[0]
    cfg = bwd_config(M, N, L, K, x.dtype)
    dx = dc1 = dc2 = None
    fused_dx = need_x and need_factors and K <= cfg.BK
    if need_x and not fused_dx:
        # dX_t = c1ᵀ·G_t·c2: the forward kernel with A = c1ᵀ (M × L) and B = c2ᵀ (N × K).
        dx = _kron_apply(g2, c1, (c1.stride(1), c1.stride(0)), c2, (c2.stride(1), c2.stride(0)), L, K, M, N, x.dtype)
    if need_factors:
        tiles = triton.cdiv(T, cfg.BT)
        nk, nn = triton.cdiv(K, cfg.BK), triton.cdiv(N, cfg.BN)
        # About two programs per SM in all; each group of token tiles has one program per (k, n) block.
        groups = max(1, min(tiles, persistent_programs(x.device, tiles * nk * nn, per_sm=2) // (nk * nn)))
        da = torch.zeros(groups, nk, nn, L, M, device=x.device, dtype=torch.float32)
        db = torch.zeros(groups, K, N, device=x.device, dtype=torch.float32)
        dxbuf = torch.empty(T, M * N, device=x.device, dtype=x.dtype) if fused_dx else x2
        if T:
            _kron_bwd_kernel[(groups, nk, nn)](
                g2, x2, c1, c2, dxbuf, da, db,
                T, M, N, L, K, tiles,
                g2.stride(0), K * g2.stride(1), g2.stride(1),
                x2.stride(0), N * x2.stride(1), x2.stride(1),
                *c1.stride(), *c2.stride(),
                dxbuf.stride(0), N * dxbuf.stride(1), dxbuf.stride(1), int(fused_dx),
                BT=cfg.BT, MP=cfg.MP, LP=cfg.LP, BN=cfg.BN, BK=cfg.BK,
                PRECISION=precision_for(x.dtype), num_warps=cfg.num_warps, num_stages=cfg.num_stages,
            )
        dc1 = da.sum(dim=(0, 1, 2)).to(c1.dtype)
        dc2 = db.sum(dim=0).to(c2.dtype)
        if fused_dx:
            dx = dxbuf
    if dx is not None:
        dx = dx.reshape(x.shape)
    return dx, dc1, dc2


# ----------------------------------------------------------------------------------------------
# torch.library ops: opaque to torch.compile, with fake kernels and autograd.
# ----------------------------------------------------------------------------------------------
@torch.library.custom_op("lyfast::lokr_fwd", mutates_args=())
def lokr_fwd(x: torch.Tensor, c1: torch.Tensor, c2: torch.Tensor, base: torch.Tensor | None = None) -> torch.Tensor:
    """y = vec(c1·X·c2ᵀ) per token (linear LoKr, ΔW = kron(c1, c2) never built), plus `base` if given."""
    return kron_forward(x, c1, c2, base)


@lokr_fwd.register_fake
def _(x, c1, c2, base=None):
    return x.new_empty(*x.shape[:-1], c1.shape[0] * c2.shape[0])


@torch.library.custom_op("lyfast::lokr_bwd", mutates_args=())
def lokr_bwd(
    grad: torch.Tensor, x: torch.Tensor, c1: torch.Tensor, c2: torch.Tensor, need_x: bool, need_factors: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dx, dc1, dc2) of lokr_fwd; a gradient not asked for comes back as an empty tensor."""
    return or_empty(x, *kron_backward(grad, x, c1, c2, need_x, need_factors))


@lokr_bwd.register_fake
def _(grad, x, c1, c2, need_x, need_factors):
    needs = ((x, need_x), (c1, need_factors), (c2, need_factors))
    return or_empty(x, *(torch.empty_like(t) if need else None for t, need in needs))


def _setup_context(ctx, inputs, output):
    x, c1, c2 = inputs[:3]  # `base` is absent from `inputs` when the caller left it out
    ctx.save_for_backward(x, c1, c2)


def _backward(ctx, grad):
    x, c1, c2 = ctx.saved_tensors
    need_x, need_c1, need_c2, *need_base = ctx.needs_input_grad
    dx, dc1, dc2 = torch.ops.lyfast.lokr_bwd(grad, x, c1, c2, need_x, need_c1 or need_c2)
    d_base = [grad if need else None for need in need_base]  # base + y: its gradient is the output's
    return (dx if need_x else None, dc1 if need_c1 else None, dc2 if need_c2 else None, *d_base)


lokr_fwd.register_autograd(_backward, setup_context=_setup_context)
