"""LoHa (linear layers) in Triton, both routes; `choose_route` (a roofline model) picks one per shape.

Route (a), Khatri-Rao: y = base + (x·Kᵀ)·Fᵀ with P = x·Kᵀ kept in registers (this part of the docstring).
Route (b), tile generation: y = x·(W0 + ΔW)ᵀ + bias, the frozen layer and the adapter in one GEMM (see
the section "Route (b)" below).

Names follow `lyfast.functional.loha`: F (out, R) = face-split(w1a·scale, w2a) and K (R, in) =
Khatri-Rao(w1b, w2b), R = r1·r2. F and K are small (R ≪ in, out) and built by ordinary autograd in the
functional layer; these kernels are the part that touches activations. Generating F and K tile by tile
instead would trade an L2 read of each (R·in or out·R elements per token tile) for as many multiplies:
no byte or FLOP saved. What it would save is the few small launches that build them and contract their
gradients (about four each way). That is left until a GPU can measure whether those launches matter
next to the route's two GEMM-sized passes.

Forward (`_kr_kernel`): a program owns BT tokens, accumulates P = x·Kᵀ over `in` in fp32 registers,
then streams F in column blocks writing y = P·Fᵀ, plus the frozen layer's output when given (added in
the fp32 epilogue: the module's `base + ΔW·x` costs no separate pass): x is read once and y written
once; P (tokens × R, in x's dtype) is also stored, because backward needs it and it is R/in the size
of x. When there are too few token tiles to fill the GPU, the output columns are split over a second
grid axis and P is recomputed per split (R·in extra FLOPs per token per split).

Backward: the same kernel with the roles swapped forms dP = g·F in registers (streaming g and F once)
and writes dx = dP·K, plus dP itself; the two factor-side products dF = gᵀ·P and dK = dPᵀ·x are long
reductions over tokens with small outputs, left to torch.matmul (cuBLAS: split-K, deterministic), as
the PyTorch path does.

Layout of this file: kernels → plans/launchers → torch.library ops (fake kernels, autograd).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ._common import (SUPPORTED_DTYPES, Peaks, device_peaks, jit, launch_sms, next_pow2, or_empty,
                      precision_for)

MAX_RANK = 128  # r1·r2 padded; beyond it P no longer fits registers and the PyTorch path runs


# ----------------------------------------------------------------------------------------------
# Kernels.
# ----------------------------------------------------------------------------------------------
@jit
def _kr_kernel(
    a_ptr, m1_ptr, m2_ptr, out_ptr, p_ptr, base_ptr,
    T, K, N, R, cols_per_split, need_out, has_base,
    sa_t, sa_k, sm1_r, sm1_k, sm2_r, sm2_n, so_t, so_n, sp_t, sp_r, sz_t, sz_n,
    BT: tl.constexpr, RP: tl.constexpr, BK: tl.constexpr, BN: tl.constexpr, PRECISION: tl.constexpr,
):
    """P = a·M1ᵀ for BT tokens (fp32 registers; stored once, in a's dtype), then out = P·M2 (+ base when
    has_base) over this program's columns, skipped unless need_out. Both directions are this kernel:
      forward   a = x, M1 = K,  M2 = Fᵀ   (P = x·Kᵀ, y = P·Fᵀ + base)
      backward  a = g, M1 = Fᵀ, M2 = K    (dP = g·F, dx = dP·K)
    need_out and has_base are runtime arguments, but a launch specializes a flag equal to 1 into a constant:
    each value is a compiled variant of its own (tests/launch_signatures.py compiles both)."""
    pid_t = tl.program_id(0)
    pid_n = tl.program_id(1)
    tok = pid_t * BT + tl.arange(0, BT)
    tok_ok = tok < T
    tok64 = tok.to(tl.int64)
    rr = tl.arange(0, RP)
    r_ok = rr < R
    p = tl.zeros((BT, RP), dtype=tl.float32)
    for k0 in range(0, K, BK):
        k = k0 + tl.arange(0, BK)
        k_ok = k < K
        at = tl.load(a_ptr + tok64[:, None] * sa_t + k[None, :] * sa_k, mask=tok_ok[:, None] & k_ok[None, :], other=0.0)
        mt = tl.load(m1_ptr + rr[None, :] * sm1_r + k[:, None] * sm1_k, mask=r_ok[None, :] & k_ok[:, None], other=0.0)
        p += tl.dot(at, mt, input_precision=PRECISION)
    pc = p.to(a_ptr.dtype.element_ty)
    if pid_n == 0:
        tl.store(p_ptr + tok64[:, None] * sp_t + rr[None, :] * sp_r, pc, mask=tok_ok[:, None] & r_ok[None, :])
    if need_out:
        n_lo = pid_n * cols_per_split
        n_hi = tl.minimum(n_lo + cols_per_split, N)
        for n0 in range(n_lo, n_hi, BN):
            n = n0 + tl.arange(0, BN)
            n_ok = n < n_hi
            mt = tl.load(m2_ptr + rr[:, None] * sm2_r + n[None, :] * sm2_n, mask=r_ok[:, None] & n_ok[None, :], other=0.0)
            ot = tl.dot(pc, mt, input_precision=PRECISION)
            if has_base:  # the frozen layer's output, added in the fp32 epilogue
                ot += tl.load(base_ptr + tok64[:, None] * sz_t + n[None, :] * sz_n, mask=tok_ok[:, None] & n_ok[None, :],
                              other=0.0).to(tl.float32)
            tl.store(out_ptr + tok64[:, None] * so_t + n[None, :] * so_n, ot.to(out_ptr.dtype.element_ty),
                     mask=tok_ok[:, None] & n_ok[None, :])


# ----------------------------------------------------------------------------------------------
# Plans and launchers.
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Config:
    BT: int
    RP: int
    BK: int = 64  # reduction step of P = a·M1ᵀ
    BN: int = 64  # column step of out = P·M2
    num_warps: int = 4
    num_stages: int = 2


# RP -> BT: the fp32 P tile (BT × RP) stays <= 4096 elements. R is padded to at least 64: the P product
# still reads 2 bytes of x per 128 FLOPs (memory-bound on an H100), and one fewer variant to compile.
_BT = {64: 64, 128: 32}


def config(rank: int, dtype: torch.dtype = torch.bfloat16) -> Config:
    rp = next_pow2(rank, 64)
    # 8 warps at both widths: with the base-output epilogue, 4 warps at RP=64 spill ~500 B per thread on
    # sm_90 (AOT report); 8 do not. fp32 (3×TF32) at RP=64 takes 32-token tiles: 64 spilled 4.7 KB per
    # thread on sm_80; 32 spill nothing on sm_80 or sm_90.
    bt = 32 if dtype == torch.float32 else _BT[rp]
    return Config(BT=bt, RP=rp, num_warps=8)


def supports(x: torch.Tensor, f: torch.Tensor, k: torch.Tensor) -> bool:
    return (
        x.dtype in SUPPORTED_DTYPES
        and f.dtype == x.dtype
        and k.dtype == x.dtype
        and f.dim() == 2
        and k.dim() == 2
        and f.shape[1] == k.shape[0]
        and k.shape[1] == x.shape[-1]
        and next_pow2(k.shape[0], 64) <= MAX_RANK
        and x.device == f.device == k.device
    )


def _splits(device: torch.device, tiles: int, width: int, block: int, min_blocks: int = 1) -> int:
    """Splits of `width` (at least `min_blocks` blocks each) so that tiles × splits fills about two waves
    of SMs."""
    sms = launch_sms(device)
    if sms is None:
        return 1 if width <= block else 2  # exercise the split path on the interpreter too
    want = triton.cdiv(2 * sms, max(tiles, 1))
    return max(1, min(want, triton.cdiv(width, min_blocks * block)))


def _split_width(width: int, splits: int, block: int) -> int:
    return triton.cdiv(triton.cdiv(width, splits), block) * block


def _kr_run(a2d, m1, m1_strides, m2, m2_strides, R: int, N: int, base=None, need_out=True):
    """(out, P) of `_kr_kernel` on a2d (T, K): P (T, R) and out (T, N) (None unless need_out), a2d's dtype."""
    T, K = a2d.shape
    p = torch.empty(T, R, device=a2d.device, dtype=a2d.dtype)
    out = torch.empty(T, N, device=a2d.device, dtype=a2d.dtype) if need_out else None
    if T:
        cfg = config(R, a2d.dtype)
        tiles = triton.cdiv(T, cfg.BT)
        splits = _splits(a2d.device, tiles, N, cfg.BN) if need_out else 1
        width = _split_width(N, splits, cfg.BN)
        o = out if need_out else p
        z = o if base is None else base
        _kr_kernel[(tiles, triton.cdiv(N, width))](
            a2d, m1, m2, o, p, z,
            T, K, N, R, width, int(need_out), int(base is not None),
            *a2d.stride(), *m1_strides, *m2_strides, *o.stride(), *p.stride(), *z.stride(),
            BT=cfg.BT, RP=cfg.RP, BK=cfg.BK, BN=cfg.BN, PRECISION=precision_for(a2d.dtype),
            num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )
    return out, p


def kr_forward(x: torch.Tensor, f: torch.Tensor, k: torch.Tensor, base: torch.Tensor | None = None):
    """(y, P): y = (x·Kᵀ)·Fᵀ (+ base, the frozen layer's output, when given) per token of x (..., in) →
    (..., out); P = x·Kᵀ as (tokens, R); x's dtype."""
    OUT, R = f.shape
    IN = k.shape[1]
    x2 = x.reshape(-1, IN)
    base2 = None if base is None else base.reshape(-1, OUT)
    y, p = _kr_run(x2, k, k.stride(), f, (f.stride(1), f.stride(0)), R, OUT, base2)
    return y.reshape(*x.shape[:-1], OUT), p


def kr_backward(grad, x, p, f, k, need_x=True, need_f=True, need_k=True):
    """(dx, dF, dK) of `kr_forward` given P from it; None where not needed."""
    OUT, R = f.shape
    IN = k.shape[1]
    g2 = grad.reshape(-1, OUT)
    dx = dp = None
    if need_x or need_k:
        dx, dp = _kr_run(g2, f, (f.stride(1), f.stride(0)), k, k.stride(), R, IN, need_out=need_x)
    df = (g2.mT @ p).to(f.dtype) if need_f else None
    dk = (dp.mT @ x.reshape(-1, IN)).to(k.dtype) if need_k else None
    return (dx.reshape(x.shape) if need_x else None), df, dk


# ----------------------------------------------------------------------------------------------
# torch.library ops: opaque to torch.compile, with fake kernels and autograd.
# ----------------------------------------------------------------------------------------------
@torch.library.custom_op("lyfast::loha_kr_fwd", mutates_args=())
def loha_kr_fwd(
    x: torch.Tensor, f: torch.Tensor, k: torch.Tensor, base: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(y, P) with y = (x·Kᵀ)·Fᵀ (LoHa's ΔW·x, ΔW = F·K never built) plus `base` if given, and P = x·Kᵀ
    (tokens, R)."""
    return kr_forward(x, f, k, base)


@loha_kr_fwd.register_fake
def _(x, f, k, base=None):
    tokens = x.numel() // x.shape[-1] if x.shape[-1] else 0
    return x.new_empty(*x.shape[:-1], f.shape[0]), x.new_empty(tokens, f.shape[1])


@torch.library.custom_op("lyfast::loha_kr_bwd", mutates_args=())
def loha_kr_bwd(
    grad: torch.Tensor, x: torch.Tensor, p: torch.Tensor, f: torch.Tensor, k: torch.Tensor,
    need_x: bool, need_f: bool, need_k: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dx, dF, dK) of loha_kr_fwd's y; a gradient not asked for comes back as an empty tensor."""
    return or_empty(x, *kr_backward(grad, x, p, f, k, need_x, need_f, need_k))


@loha_kr_bwd.register_fake
def _(grad, x, p, f, k, need_x, need_f, need_k):
    return or_empty(x, *(torch.empty_like(t) if need else None for t, need in ((x, need_x), (f, need_f), (k, need_k))))


def _setup_context(ctx, inputs, output):
    x, f, k = inputs[:3]  # `base` is absent from `inputs` when the caller left it out
    ctx.mark_non_differentiable(output[1])
    ctx.save_for_backward(x, output[1], f, k)


def _backward(ctx, grad_y, grad_p):
    x, p, f, k = ctx.saved_tensors
    need_x, need_f, need_k, *need_base = ctx.needs_input_grad
    dx, df, dk = torch.ops.lyfast.loha_kr_bwd(grad_y, x, p, f, k, need_x, need_f, need_k)
    d_base = [grad_y if need else None for need in need_base]  # base + y: its gradient is the output's
    return (dx if need_x else None, df if need_f else None, dk if need_k else None, *d_base)


loha_kr_fwd.register_autograd(_backward, setup_context=_setup_context)


def khatri_rao_delta(x: torch.Tensor, f: torch.Tensor, k: torch.Tensor, base: torch.Tensor | None = None) -> torch.Tensor:
    """y = (x·Kᵀ)·Fᵀ (+ base) through lyfast::loha_kr_fwd (differentiable in x, F, K and base)."""
    return torch.ops.lyfast.loha_kr_fwd(x, f, k, base)[0]


# ----------------------------------------------------------------------------------------------
# Route (b), tile generation: the frozen base layer and the adapter in one GEMM.
# ----------------------------------------------------------------------------------------------
# y = x·(W0 + ΔW)ᵀ + bias with ΔW = (a1·b1) ⊙ (a2·b2) (scale folded into a1), a (out, r) and b (r, in)
# being LoHa's canonical factors. Each ΔW tile is generated in registers from the four factor tiles (two
# rank-r dots) and added to the W0 tile before the main dot, so the adapter costs the base layer's GEMM
# plus r1+r2 extra reduction columns per generated tile, and no ΔW ever reaches memory.
#   forward  `_tile_gemm_kernel`  y tiles (BT × BN), loop over `in`; the generated tile is ΔWᵀ (BK, BN)
#   dx       `_tile_gemm_kernel`  dx tiles (BT × BN) = g·(W0 + ΔW), loop over `out` (strides swapped)
#   factors  `_tile_dfac_kernel`  D = gᵀ·x tiles (BO × BC) over all tokens (= dW0 when the weight trains),
#            then contracted at once with the regenerated halves: E1 = D ⊙ (a2·b2), da1 += E1·b1ᵀ,
#            db1 += a1ᵀ·E1 (and symmetrically). Partial sums are added with fp32 ATOMICS into (out × r) and
#            (r × in) buffers: the deterministic alternative (one partial per tile row/column, summed after)
#            needs buffers of 2·r/BO of the weight per half, i.e. half a weight at r = 32 — the transient
#            this route exists to avoid. Each element receives in/BC (da) or out/BO (db) fp32 additions, so
#            run-to-run differences stay at fp32 rounding; under torch.use_deterministic_algorithms the
#            cost model never picks this route.
# Numerics: W0 + ΔW is rounded once to the activation dtype before the main dot (one dot, not two: a
# second dot for ΔW alone would double the GEMM this route is built to share). In bf16 the output and dx
# so carry one extra rounding of the weight: on the interpreter cases 1.3–2.5× eager's error (4× on a
# single-token case whose eager error happened to be small), all within the tests' bound of 2× eager
# plus 8 ulps of the result's scale. The factor gradients are contracted in fp32 and come out at
# 0.2–1.0× eager's error.
@jit
def _grouped(pid, tiles_t, tiles_n, GROUP: tl.constexpr):
    """(token tile, column tile) of program `pid` in grouped order: GROUP token tiles in a row take the
    same column tiles, so their weight and factor tiles are re-read from L2, not DRAM."""
    per_group = GROUP * tiles_n
    first_t = (pid // per_group) * GROUP
    size = tl.minimum(tiles_t - first_t, GROUP)
    return first_t + (pid % per_group) % size, (pid % per_group) // size


@jit
def _tile_gemm_kernel(
    a_ptr, w_ptr, bias_ptr, l1_ptr, r1_ptr, l2_ptr, r2_ptr, out_ptr,
    T, K, N, R1, R2,
    sa_t, sa_k, sw_k, sw_n, sl1_k, sl1_r, sr1_r, sr1_n, sl2_k, sl2_r, sr2_r, sr2_n, so_t, so_n,
    HAS_BIAS: tl.constexpr, BT: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
    R1P: tl.constexpr, R2P: tl.constexpr, GROUP: tl.constexpr, PRECISION: tl.constexpr,
):
    """out[t, n] = Σ_k a[t, k]·(W[k, n] + (L1·R1)[k, n]·(L2·R2)[k, n]) (+ bias[n]): one GEMM whose right
    operand is generated tile by tile. Forward and dx are this kernel with the strides swapped:
      forward  a = x, W = W0ᵀ, L = bᵀ, R = aᵀ  (K = in, N = out)
      dx       a = g, W = W0,  L = a,  R = b   (K = out, N = in)
    The R tiles (r × BN) stay fixed over the reduction; the L tiles (BK × r) stream with it."""
    pid_t, pid_n = _grouped(tl.program_id(0), tl.cdiv(T, BT), tl.cdiv(N, BN), GROUP)

    tok = pid_t * BT + tl.arange(0, BT)
    tok_ok = tok < T
    tok64 = tok.to(tl.int64)
    n = pid_n * BN + tl.arange(0, BN)
    n_ok = n < N
    p1 = tl.arange(0, R1P)
    p2 = tl.arange(0, R2P)
    r1t = tl.load(r1_ptr + p1[:, None] * sr1_r + n[None, :] * sr1_n, mask=(p1 < R1)[:, None] & n_ok[None, :], other=0.0)
    r2t = tl.load(r2_ptr + p2[:, None] * sr2_r + n[None, :] * sr2_n, mask=(p2 < R2)[:, None] & n_ok[None, :], other=0.0)
    acc = tl.zeros((BT, BN), dtype=tl.float32)
    for k0 in range(0, K, BK):
        k = k0 + tl.arange(0, BK)
        k_ok = k < K
        at = tl.load(a_ptr + tok64[:, None] * sa_t + k[None, :] * sa_k, mask=tok_ok[:, None] & k_ok[None, :], other=0.0)
        wt = tl.load(w_ptr + k[:, None] * sw_k + n[None, :] * sw_n, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        l1t = tl.load(l1_ptr + k[:, None] * sl1_k + p1[None, :] * sl1_r, mask=k_ok[:, None] & (p1 < R1)[None, :], other=0.0)
        l2t = tl.load(l2_ptr + k[:, None] * sl2_k + p2[None, :] * sl2_r, mask=k_ok[:, None] & (p2 < R2)[None, :], other=0.0)
        d = tl.dot(l1t, r1t, input_precision=PRECISION) * tl.dot(l2t, r2t, input_precision=PRECISION)  # ΔW tile (BK, BN)
        wc = (wt.to(tl.float32) + d).to(a_ptr.dtype.element_ty)
        acc += tl.dot(at, wc, input_precision=PRECISION)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(out_ptr + tok64[:, None] * so_t + n[None, :] * so_n, acc.to(out_ptr.dtype.element_ty),
             mask=tok_ok[:, None] & n_ok[None, :])


@jit
def _tile_dfac_kernel(
    g_ptr, x_ptr, a1_ptr, b1_ptr, a2_ptr, b2_ptr, dw_ptr, da1_ptr, db1_ptr, da2_ptr, db2_ptr,
    T, IN, OUT, R1, R2, tok_per_split,
    sg_t, sg_o, sx_t, sx_c, sa1_o, sa1_r, sb1_r, sb1_c, sa2_o, sa2_r, sb2_r, sb2_c, sdw_o, sdw_c,
    NEED_W: tl.constexpr, NEED_F: tl.constexpr, BT: tl.constexpr, BO: tl.constexpr, BC: tl.constexpr,
    R1P: tl.constexpr, R2P: tl.constexpr, PRECISION: tl.constexpr,
):
    pid_o = tl.program_id(0)
    pid_c = tl.program_id(1)
    pid_s = tl.program_id(2)
    o = pid_o * BO + tl.arange(0, BO)
    o_ok = o < OUT
    c = pid_c * BC + tl.arange(0, BC)
    c_ok = c < IN
    t_lo = pid_s * tok_per_split
    t_hi = tl.minimum(t_lo + tok_per_split, T)
    dtile = tl.zeros((BO, BC), dtype=tl.float32)  # D = gᵀ·x over this split's tokens
    for t0 in range(t_lo, t_hi, BT):
        t = t0 + tl.arange(0, BT)
        t_ok = t < t_hi
        t64 = t.to(tl.int64)
        gt = tl.load(g_ptr + t64[None, :] * sg_t + o[:, None] * sg_o, mask=o_ok[:, None] & t_ok[None, :], other=0.0)
        xt = tl.load(x_ptr + t64[:, None] * sx_t + c[None, :] * sx_c, mask=t_ok[:, None] & c_ok[None, :], other=0.0)
        dtile += tl.dot(gt, xt, input_precision=PRECISION)
    if NEED_W:  # the host launches one split when dW0 is wanted: this program owns the tile
        tl.store(dw_ptr + o[:, None] * sdw_o + c[None, :] * sdw_c, dtile.to(dw_ptr.dtype.element_ty),
                 mask=o_ok[:, None] & c_ok[None, :])
    if NEED_F:
        p1 = tl.arange(0, R1P)
        p2 = tl.arange(0, R2P)
        p1_ok = p1 < R1
        p2_ok = p2 < R2
        a1t = tl.load(a1_ptr + o[:, None] * sa1_o + p1[None, :] * sa1_r, mask=o_ok[:, None] & p1_ok[None, :], other=0.0)
        a2t = tl.load(a2_ptr + o[:, None] * sa2_o + p2[None, :] * sa2_r, mask=o_ok[:, None] & p2_ok[None, :], other=0.0)
        b1t = tl.load(b1_ptr + p1[:, None] * sb1_r + c[None, :] * sb1_c, mask=p1_ok[:, None] & c_ok[None, :], other=0.0)
        b2t = tl.load(b2_ptr + p2[:, None] * sb2_r + c[None, :] * sb2_c, mask=p2_ok[:, None] & c_ok[None, :], other=0.0)
        d1 = tl.dot(a1t, b1t, input_precision=PRECISION)
        d2 = tl.dot(a2t, b2t, input_precision=PRECISION)
        e1 = dtile * d2  # dL/d(a1·b1) on this tile
        e2 = dtile * d1
        # The contractions' left operands are fp32 sums. With half activations a "tf32" dot truncated them
        # to 10 mantissa bits: a systematic ~7e-4 underestimate of every factor gradient (issue 11).
        # bf16: rounded to bf16 (round-to-nearest: unbiased; the gradients leave in bf16 anyway). 3×TF32
        # here cost 270–570 B/thread of spills at r = 16–32 (AOT, sm_80/90); bf16 operands spill none and
        # halve the shared memory. fp16: bf16 operands would drop 3 of the factors' mantissa bits (da1
        # 11× eager's error on the interpreter), so fp16 and fp32 contract in fp32 by 3×TF32 (fp16 at
        # r = 64 then spills 0.8 KB/thread on sm_90, 3.3 KB on sm_80).
        if g_ptr.dtype.element_ty == tl.bfloat16:
            e1c, e2c = e1.to(tl.bfloat16), e2.to(tl.bfloat16)
            da1 = tl.dot(e1c, tl.trans(b1t), input_precision=PRECISION)  # (BO, R1P)
            db1 = tl.dot(tl.trans(a1t), e1c, input_precision=PRECISION)  # (R1P, BC)
            da2 = tl.dot(e2c, tl.trans(b2t), input_precision=PRECISION)
            db2 = tl.dot(tl.trans(a2t), e2c, input_precision=PRECISION)
        else:
            a1f, b1f = a1t.to(tl.float32), b1t.to(tl.float32)
            a2f, b2f = a2t.to(tl.float32), b2t.to(tl.float32)
            da1 = tl.dot(e1, tl.trans(b1f), input_precision="tf32x3")
            db1 = tl.dot(tl.trans(a1f), e1, input_precision="tf32x3")
            da2 = tl.dot(e2, tl.trans(b2f), input_precision="tf32x3")
            db2 = tl.dot(tl.trans(a2f), e2, input_precision="tf32x3")
        # Relaxed: the sums are only read after the kernel ends, so no ordering is needed (the default
        # acq_rel atomics also fence every add).
        tl.atomic_add(da1_ptr + o[:, None] * R1 + p1[None, :], da1, mask=o_ok[:, None] & p1_ok[None, :], sem="relaxed")
        tl.atomic_add(db1_ptr + p1[:, None] * IN + c[None, :], db1, mask=p1_ok[:, None] & c_ok[None, :], sem="relaxed")
        tl.atomic_add(da2_ptr + o[:, None] * R2 + p2[None, :], da2, mask=o_ok[:, None] & p2_ok[None, :], sem="relaxed")
        tl.atomic_add(db2_ptr + p2[:, None] * IN + c[None, :], db2, mask=p2_ok[:, None] & c_ok[None, :], sem="relaxed")


@dataclass(frozen=True)
class TileConfig:
    """fwd/dx: BT tokens × BN output columns per program, BK-wide reduction steps. dfac: BN out rows ×
    BK in columns per program, BT-token reduction steps."""
    BT: int
    BN: int
    BK: int
    num_warps: int
    num_stages: int
    GROUP: int = 8


# r1, r2 padded. 32: at 64 the factor kernel spilled 64-72 B per thread on sm_80 in bf16 and 48-488 B
# (sm_90, sm_80) in fp32, the fp32 GEMM 8-128 B, for launched signatures (AOT report); the kernels still
# take 64 when called directly, `supports_tile` and `choose_route` send r > 32 elsewhere.
TILE_MAX_RANK = 32


def tile_rank(r: int) -> int:
    return next_pow2(r, 16)  # tl.dot's reduction dimension is at least 16


def tile_configs(dtype: torch.dtype) -> dict[str, TileConfig]:
    """Launch configs of the three tile kernels ("fwd", "dx", "dfac"), chosen from the AOT report of the
    launches the modules make (tests/launch_signatures.py: specialized as a launch specializes them,
    sm_80 and sm_90; ptxas registers and spill bytes; no GPU timing yet): the largest tiles that spill
    nothing on either at the ranks the modules launch. Half dtypes: 128-token × 64-column output tiles with
    32-wide reduction steps; 128×128 (the usual Hopper GEMM tile) spilled 8-64 B per thread on sm_80 at
    r = 16-32 with any stage count, and 128 × 64 regenerates no more ΔW than 128 × 128 (generation scales
    with the tile's columns; halving the tokens per tile would double it). The factor kernel keeps D, both
    halves and E (fp32, BN × BK) live, so it stays at 64×64. fp32 runs 3×TF32 dots, whose split operands
    triple the registers: tiles of a quarter the size, at 8 warps (4 spilled 24-112 B per thread on sm_90
    at r = 32)."""
    if dtype == torch.float32:
        return dict(fwd=TileConfig(BT=64, BN=32, BK=32, num_warps=8, num_stages=2),
                    dx=TileConfig(BT=64, BN=64, BK=32, num_warps=8, num_stages=2),
                    # BK 16, num_stages 1: (32, 32, 2 stages) spilled 8 B per thread on sm_80 at r = 8, 1 stage
                    # then 16 B on sm_90 at r = 32, BT = 16 sat at 253-255 registers (Triton 3.9, all-variant
                    # compile); BK = 16 with 1 stage: 172-189 registers at r = 32, 94 at r = 8, none spill.
                    dfac=TileConfig(BT=32, BN=32, BK=16, num_warps=8, num_stages=1))
    half = dict(fwd=TileConfig(BT=128, BN=64, BK=32, num_warps=8, num_stages=4),
                dx=TileConfig(BT=128, BN=64, BK=32, num_warps=8, num_stages=3),
                dfac=TileConfig(BT=64, BN=64, BK=64, num_warps=8, num_stages=2))
    if dtype == torch.float16:  # contractions in 3×TF32 (see the kernel): 64×64 spilled 224-320 B, 64×32 48 B
        half["dfac"] = TileConfig(BT=64, BN=32, BK=64, num_warps=8, num_stages=2)
    return half


def supports_tile(x, weight, bias, a1, b1, a2, b2) -> bool:
    """Whether the tile kernels take these operands: one supported dtype throughout, 2-D factors that
    fit (out, r)/(r, in) with r <= TILE_MAX_RANK, one device."""
    tensors = (x, weight, a1, b1, a2, b2) + (() if bias is None else (bias,))
    if x.dtype not in SUPPORTED_DTYPES or any(t.dtype != x.dtype or t.device != x.device for t in tensors):
        return False
    if weight.dim() != 2 or any(t.dim() != 2 for t in (a1, b1, a2, b2)):
        return False
    out, inp = weight.shape
    return (
        x.shape[-1] == inp
        and a1.shape[0] == a2.shape[0] == out
        and b1.shape[1] == b2.shape[1] == inp
        and a1.shape[1] == b1.shape[0]
        and a2.shape[1] == b2.shape[0]
        and max(tile_rank(a1.shape[1]), tile_rank(a2.shape[1])) <= TILE_MAX_RANK
        and (bias is None or bias.shape == (out,))
    )


def _factor_args(a1, b1, a2, b2):
    return (*a1.stride(), *b1.stride(), *a2.stride(), *b2.stride())


def _tile_gemm(a2d, w_strides, weight, bias, factors, factor_strides, N: int, cfg: TileConfig):
    """`_tile_gemm_kernel` on a2d (T, K) → (T, N) in a2d's dtype. `factors` = (L1, R1, L2, R2) and
    `w_strides`/`factor_strides` are the strides the kernel reads them with (see its docstring)."""
    T, K = a2d.shape
    out = torch.empty(T, N, device=a2d.device, dtype=a2d.dtype)
    if T:
        R1, R2 = factors[0].numel() // K, factors[2].numel() // K  # L1, L2 are K × r as read
        _tile_gemm_kernel[(triton.cdiv(T, cfg.BT) * triton.cdiv(N, cfg.BN),)](
            a2d, weight, weight if bias is None else bias, *factors, out,
            T, K, N, R1, R2,
            *a2d.stride(), *w_strides, *factor_strides, *out.stride(),
            HAS_BIAS=bias is not None, BT=cfg.BT, BN=cfg.BN, BK=cfg.BK, R1P=tile_rank(R1), R2P=tile_rank(R2),
            GROUP=cfg.GROUP, PRECISION=precision_for(a2d.dtype), num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )
    return out


def tile_forward(x, weight, bias, a1, b1, a2, b2):
    """x·(W0 + ΔW)ᵀ + bias, ΔW = (a1·b1) ⊙ (a2·b2), for x (..., in) → (..., out) in x's dtype."""
    OUT, IN = weight.shape
    t = lambda m: (m.stride(1), m.stride(0))  # noqa: E731 (the operand read transposed)
    y = _tile_gemm(x.reshape(-1, IN), t(weight), weight, bias, (b1, a1, b2, a2),
                   (*t(b1), *t(a1), *t(b2), *t(a2)), OUT, tile_configs(x.dtype)["fwd"])
    return y.reshape(*x.shape[:-1], OUT)


def tile_backward(grad, x, weight, a1, b1, a2, b2, need_x=True, need_w=False, need_f=True):
    """(dx, dW0, da1, db1, da2, db2) of `tile_forward` (bias excluded); None where not needed."""
    OUT, IN = weight.shape
    R1, R2 = a1.shape[1], a2.shape[1]
    g2 = grad.reshape(-1, OUT)
    x2 = x.reshape(-1, IN)
    T = g2.shape[0]
    cfgs = tile_configs(x.dtype)
    prec = precision_for(x.dtype)
    r1p, r2p = tile_rank(R1), tile_rank(R2)
    dx = None
    if need_x:
        dx = _tile_gemm(g2, weight.stride(), weight, None, (a1, b1, a2, b2), _factor_args(a1, b1, a2, b2), IN,
                        cfgs["dx"]).reshape(x.shape)
    dw = (torch.empty_like(weight) if T else torch.zeros_like(weight)) if need_w else None  # every tile is stored
    bufs = [torch.zeros(shape, device=x.device, dtype=torch.float32) for shape in ((OUT, R1), (R1, IN), (OUT, R2), (R2, IN))] if need_f else None
    if T and (need_w or need_f):
        cfg = cfgs["dfac"]
        tiles = triton.cdiv(OUT, cfg.BN) * triton.cdiv(IN, cfg.BK)
        # dW0 needs one split (its tiles are stored, not added); otherwise >= 4 token steps per split.
        splits = 1 if need_w else _splits(x.device, tiles, T, cfg.BT, min_blocks=4)
        per_split = triton.cdiv(triton.cdiv(T, splits), cfg.BT) * cfg.BT
        dwa = dw if need_w else weight
        da1, db1, da2, db2 = bufs if need_f else (weight,) * 4
        _tile_dfac_kernel[(triton.cdiv(OUT, cfg.BN), triton.cdiv(IN, cfg.BK), triton.cdiv(T, per_split))](
            g2, x2, a1, b1, a2, b2, dwa, da1, db1, da2, db2,
            T, IN, OUT, R1, R2, per_split,
            *g2.stride(), *x2.stride(), *_factor_args(a1, b1, a2, b2), *dwa.stride(),
            NEED_W=need_w, NEED_F=need_f, BT=cfg.BT, BO=cfg.BN, BC=cfg.BK, R1P=r1p, R2P=r2p, PRECISION=prec,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )
    grads = [b.to(f.dtype) for b, f in zip(bufs, (a1, b1, a2, b2))] if need_f else [None] * 4
    return (dx, dw, *grads)


# ----------------------------------------------------------------------------------------------
# Route choice: a roofline cost model against the device's peak rates (no timing, no first-call tuning).
# ----------------------------------------------------------------------------------------------
def route_costs(tokens: int, in_features: int, out_features: int, r1: int, r2: int, dtype: torch.dtype,
                device: torch.device, training: bool = True, peaks: Peaks | None = None) -> dict[str, float]:
    """Estimated seconds of the whole adapted layer (frozen base included) for each Triton-side route.

    "khatri_rao": cuBLAS base GEMMs + the Khatri-Rao kernels (or the PyTorch route (a) above MAX_RANK)
    + the adds of the adapter's output into the base's; "tile": the three tile kernels, with the ΔW halves
    regenerated once per token tile (forward, dx) and once per factor tile. Training = forward + backward
    with dx; the frozen base's own dW is never needed. Roofline per kernel (`_common.Peaks.seconds`):
    cuBLAS at `peaks.cublas_efficiency` of the tensor-core peak, lyfast's Triton kernels at
    `peaks.tile_vs_cublas` of that (assumed, or calibrated per device), every kernel at BANDWIDTH_EFFICIENCY
    of the bandwidth, launch costs hidden unless a kernel's
    work is shorter; DRAM bytes count each operand once (tiles re-read from L2). `peaks` overrides the
    device's entry (the route table in docs/loha_routes.md is computed for named devices)."""
    pk = peaks or device_peaks(device)
    T, C, O, R = tokens, in_features, out_features, r1 * r2
    e = torch.empty((), dtype=dtype).element_size()
    cublas = dict(compute_efficiency=pk.cublas_efficiency)
    ours = dict(compute_efficiency=pk.cublas_efficiency * pk.tile_vs_cublas)
    gemm = lambda: pk.seconds(2 * T * C * O, e * (T * C + O * C + T * O), dtype, **cublas)  # noqa: E731
    # Route (a): base GEMM(s), then the K·x and F·P kernel reading the base output into its epilogue.
    kr = gemm() + pk.seconds(2 * T * R * (C + O), e * (T * C + 2 * T * R + 2 * T * O), dtype, launches=3, **ours)
    if training:
        kr += gemm()  # base dx
        kr += pk.seconds(2 * T * R * (2 * C + 2 * O), e * (2 * T * O + 2 * T * C + 2 * T * R), dtype, launches=6,
                         **ours)
        kr += pk.seconds(0, 3 * e * T * C, dtype)  # dx of the base and of the adapter added
    cfg = tile_configs(dtype)
    gen = 2 * O * C * (tile_rank(r1) + tile_rank(r2))  # one generation of every ΔW tile (two half dots)
    tile = pk.seconds(2 * T * C * O + gen * triton.cdiv(T, cfg["fwd"].BT), e * (T * C + O * C + T * O), dtype, **ours)
    tile += pk.seconds(0, 2 * e * (O + C) * (r1 + r2), dtype, launches=2)  # a1 scaled, casts of the factors
    if training:
        tile += pk.seconds(2 * T * C * O + gen * triton.cdiv(T, cfg["dx"].BT), e * (T * C + O * C + T * O), dtype,
                           **ours)
        tile += pk.seconds(2 * T * C * O + 3 * gen, e * (T * C + T * O) + 8 * (O + C) * (r1 + r2), dtype, **ours)
    return {"khatri_rao": kr, "tile": tile}


def choose_route(tokens: int, in_features: int, out_features: int, r1: int, r2: int, dtype: torch.dtype,
                 device: torch.device, training: bool = True, peaks: Peaks | None = None) -> str:
    """"tile" or "khatri_rao" for a Linear layer on the Triton backend: the lower of `route_costs`.
    Route (a) only while F and K stay smaller than the weight (as on the PyTorch path), and never the
    tile route when torch.use_deterministic_algorithms is on (its factor gradients use atomics)."""
    kr_ok = r1 * r2 < min(in_features, out_features)
    tile_ok = tile_rank(max(r1, r2)) <= TILE_MAX_RANK and not torch.are_deterministic_algorithms_enabled()
    if not tile_ok:
        return "khatri_rao" if kr_ok else "rowblock"
    if not kr_ok:
        return "tile"
    costs = route_costs(tokens, in_features, out_features, r1, r2, dtype, device, training, peaks)
    return "tile" if costs["tile"] < costs["khatri_rao"] else "khatri_rao"


def route_table(layers, ranks=(4, 8, 16, 32, 64), dtype: torch.dtype = torch.bfloat16, peaks: Peaks | None = None) -> str:
    """Markdown table of `choose_route` in training for `layers` ((in, out, tokens) each) at LoHa ranks
    `ranks` (r1 = r2) on `peaks` (default: the interpreter's, an H100 SXM), each cell the route and the
    modelled time of the tile route over route (a)'s."""
    pk = peaks or device_peaks(torch.device("cpu"))
    cpu = torch.device("cpu")
    lines = ["| layer | tokens | " + " | ".join(f"r={r}" for r in ranks) + " |",
             "|---|---:|" + "---|" * len(ranks)]
    for cin, cout, tokens in layers:
        cells = []
        for r in ranks:
            route = choose_route(tokens, cin, cout, r, r, dtype, cpu, True, pk)
            if r * r < min(cin, cout) and tile_rank(r) <= TILE_MAX_RANK and route in ("tile", "khatri_rao"):
                costs = route_costs(tokens, cin, cout, r, r, dtype, cpu, True, pk)
                route += f" ({costs['tile'] / costs['khatri_rao']:.2f})"
            cells.append(route)
        lines.append(f"| {cin}→{cout} | {tokens} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


@torch.library.custom_op("lyfast::loha_tile_fwd", mutates_args=())
def loha_tile_fwd(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
    a1: torch.Tensor, b1: torch.Tensor, a2: torch.Tensor, b2: torch.Tensor,
) -> torch.Tensor:
    """x·(W0 + ΔW)ᵀ + bias with ΔW = (a1·b1) ⊙ (a2·b2) generated tile by tile (never in memory)."""
    return tile_forward(x, weight, bias, a1, b1, a2, b2)


@loha_tile_fwd.register_fake
def _(x, weight, bias, a1, b1, a2, b2):
    return x.new_empty(*x.shape[:-1], weight.shape[0])


@torch.library.custom_op("lyfast::loha_tile_bwd", mutates_args=())
def loha_tile_bwd(
    grad: torch.Tensor, x: torch.Tensor, weight: torch.Tensor,
    a1: torch.Tensor, b1: torch.Tensor, a2: torch.Tensor, b2: torch.Tensor,
    need_x: bool, need_w: bool, need_f: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dx, dW0, da1, db1, da2, db2) of loha_tile_fwd (bias aside); what is not asked for is empty."""
    return or_empty(x, *tile_backward(grad, x, weight, a1, b1, a2, b2, need_x, need_w, need_f))


@loha_tile_bwd.register_fake
def _(grad, x, weight, a1, b1, a2, b2, need_x, need_w, need_f):
    needs = ((x, need_x), (weight, need_w), *((t, need_f) for t in (a1, b1, a2, b2)))
    return or_empty(x, *(torch.empty_like(t) if need else None for t, need in needs))


def _tile_setup_context(ctx, inputs, output):
    x, weight, bias, a1, b1, a2, b2 = inputs
    ctx.bias_dtype = None if bias is None else bias.dtype
    ctx.save_for_backward(x, weight, a1, b1, a2, b2)


def _tile_backward(ctx, grad):
    x, weight, a1, b1, a2, b2 = ctx.saved_tensors
    need_x, need_w, need_b = ctx.needs_input_grad[:3]
    need_f = any(ctx.needs_input_grad[3:])
    dx, dw, da1, db1, da2, db2 = torch.ops.lyfast.loha_tile_bwd(grad, x, weight, a1, b1, a2, b2, need_x, need_w, need_f)
    db = grad.reshape(-1, grad.shape[-1]).sum(0).to(ctx.bias_dtype) if need_b else None
    f = (lambda t: t) if need_f else (lambda t: None)
    return (dx if need_x else None, dw if need_w else None, db, f(da1), f(db1), f(da2), f(db2))


loha_tile_fwd.register_autograd(_tile_backward, setup_context=_tile_setup_context)


def tile_linear(x, weight, bias, a1, b1, a2, b2) -> torch.Tensor:
    """x·(W0 + ΔW)ᵀ + bias through lyfast::loha_tile_fwd (differentiable in x, W0, bias and the factors)."""
    return torch.ops.lyfast.loha_tile_fwd(x, weight, bias, a1, b1, a2, b2)
