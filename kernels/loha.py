"""LoHa (linear layers), Khatri-Rao route, in Triton: y = (x·Kᵀ)·Fᵀ with P = x·Kᵀ kept in registers.

Names follow `lyfast.functional.loha`: F (out, R) = face-split(w1a·scale, w2a) and K (R, in) =
Khatri-Rao(w1b, w2b), R = r1·r2. F and K are small (R ≪ in, out) and built by ordinary autograd in the
functional layer; these kernels are the part that touches activations.

Forward (`_kr_fwd_kernel`): a program owns BT tokens, accumulates P = x·Kᵀ over `in` in fp32 registers,
then streams F in column blocks writing y = P·Fᵀ: x is read once and y written once; P (tokens × R, in
x's dtype) is also stored, because backward needs it and it is R/in the size of x. When there are too
few token tiles to fill the GPU, the output columns are split over a second grid axis and P is
recomputed per split (R·in extra FLOPs per token per split).

Backward: `_kr_bwd_kernel` forms dP = g·F in registers (streaming g and F once) and writes dx = dP·K,
plus dP itself; the two factor-side products dF = gᵀ·P and dK = dPᵀ·x are long reductions over tokens
with small outputs, left to torch.matmul (cuBLAS: split-K, deterministic), as the PyTorch path does.

Layout of this file: kernels → plans/launchers → torch.library ops (fake kernels, autograd).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ._common import SUPPORTED_DTYPES, jit, next_pow2, precision_for, sm_count

MAX_RANK = 128  # r1·r2 padded; beyond it P no longer fits registers and the PyTorch path runs


# ----------------------------------------------------------------------------------------------
# Kernels.
# ----------------------------------------------------------------------------------------------
@jit
def _kr_fwd_kernel(
    x_ptr, k_ptr, f_ptr, y_ptr, p_ptr,
    T, IN, OUT, R, cols_per_split,
    sx_t, sx_c, sk_r, sk_c, sf_o, sf_r, sy_t, sy_c, sp_t, sp_r,
    BT: tl.constexpr, RP: tl.constexpr, BC: tl.constexpr, BO: tl.constexpr, PRECISION: tl.constexpr,
):
    pid_t = tl.program_id(0)
    pid_o = tl.program_id(1)
    tok = pid_t * BT + tl.arange(0, BT)
    tok_ok = tok < T
    tok64 = tok.to(tl.int64)
    rr = tl.arange(0, RP)
    r_ok = rr < R
    p = tl.zeros((BT, RP), dtype=tl.float32)
    for c0 in range(0, IN, BC):
        c = c0 + tl.arange(0, BC)
        c_ok = c < IN
        xt = tl.load(x_ptr + tok64[:, None] * sx_t + c[None, :] * sx_c, mask=tok_ok[:, None] & c_ok[None, :], other=0.0)
        kt = tl.load(k_ptr + rr[None, :] * sk_r + c[:, None] * sk_c, mask=r_ok[None, :] & c_ok[:, None], other=0.0)
        p += tl.dot(xt, kt, input_precision=PRECISION)
    pc = p.to(x_ptr.dtype.element_ty)
    if pid_o == 0:
        tl.store(p_ptr + tok64[:, None] * sp_t + rr[None, :] * sp_r, pc, mask=tok_ok[:, None] & r_ok[None, :])
    o_lo = pid_o * cols_per_split
    o_hi = tl.minimum(o_lo + cols_per_split, OUT)
    for o0 in range(o_lo, o_hi, BO):
        o = o0 + tl.arange(0, BO)
        o_ok = o < o_hi
        ft = tl.load(f_ptr + o[None, :] * sf_o + rr[:, None] * sf_r, mask=o_ok[None, :] & r_ok[:, None], other=0.0)
        yt = tl.dot(pc, ft, input_precision=PRECISION)
        tl.store(y_ptr + tok64[:, None] * sy_t + o[None, :] * sy_c, yt.to(y_ptr.dtype.element_ty),
                 mask=tok_ok[:, None] & o_ok[None, :])


@jit
def _kr_bwd_kernel(
    g_ptr, k_ptr, f_ptr, dx_ptr, dp_ptr,
    T, IN, OUT, R, cols_per_split, need_x,
    sg_t, sg_o, sk_r, sk_c, sf_o, sf_r, sdx_t, sdx_c, sdp_t, sdp_r,
    BT: tl.constexpr, RP: tl.constexpr, BC: tl.constexpr, BO: tl.constexpr, PRECISION: tl.constexpr,
):
    pid_t = tl.program_id(0)
    pid_c = tl.program_id(1)
    tok = pid_t * BT + tl.arange(0, BT)
    tok_ok = tok < T
    tok64 = tok.to(tl.int64)
    rr = tl.arange(0, RP)
    r_ok = rr < R
    dp = tl.zeros((BT, RP), dtype=tl.float32)
    for o0 in range(0, OUT, BO):
        o = o0 + tl.arange(0, BO)
        o_ok = o < OUT
        gt = tl.load(g_ptr + tok64[:, None] * sg_t + o[None, :] * sg_o, mask=tok_ok[:, None] & o_ok[None, :], other=0.0)
        ft = tl.load(f_ptr + o[:, None] * sf_o + rr[None, :] * sf_r, mask=o_ok[:, None] & r_ok[None, :], other=0.0)
        dp += tl.dot(gt, ft, input_precision=PRECISION)
    dpc = dp.to(g_ptr.dtype.element_ty)
    if pid_c == 0:
        tl.store(dp_ptr + tok64[:, None] * sdp_t + rr[None, :] * sdp_r, dpc, mask=tok_ok[:, None] & r_ok[None, :])
    if need_x:
        c_lo = pid_c * cols_per_split
        c_hi = tl.minimum(c_lo + cols_per_split, IN)
        for c0 in range(c_lo, c_hi, BC):
            c = c0 + tl.arange(0, BC)
            c_ok = c < c_hi
            kt = tl.load(k_ptr + rr[:, None] * sk_r + c[None, :] * sk_c, mask=r_ok[:, None] & c_ok[None, :], other=0.0)
            dxt = tl.dot(dpc, kt, input_precision=PRECISION)
            tl.store(dx_ptr + tok64[:, None] * sdx_t + c[None, :] * sdx_c, dxt.to(dx_ptr.dtype.element_ty),
                     mask=tok_ok[:, None] & c_ok[None, :])


# ----------------------------------------------------------------------------------------------
# Plans and launchers.
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Config:
    BT: int
    RP: int
    BC: int = 64
    BO: int = 64
    num_warps: int = 4
    num_stages: int = 2


# RP -> BT: the fp32 P tile (BT × RP) stays <= 4096 elements. R is padded to at least 64: the P product
# still reads 2 bytes of x per 128 FLOPs (memory-bound on an H100), and one fewer variant to compile.
_BT = {64: 64, 128: 32}


def config(rank: int) -> Config:
    rp = next_pow2(rank, 64)
    return Config(BT=_BT[rp], RP=rp, num_warps=4 if rp <= 64 else 8)


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


def _splits(device: torch.device, tiles: int, width: int, block: int) -> int:
    """Second-axis splits so that tiles × splits fills about two waves of SMs."""
    if device.type != "cuda":
        return 1 if width <= block else 2  # exercise the split path on the interpreter too
    want = triton.cdiv(2 * sm_count(device.index or 0), max(tiles, 1))
    return max(1, min(want, triton.cdiv(width, block)))


def _split_width(width: int, splits: int, block: int) -> int:
    return triton.cdiv(triton.cdiv(width, splits), block) * block


def kr_forward(x: torch.Tensor, f: torch.Tensor, k: torch.Tensor):
    """(y, P): y = (x·Kᵀ)·Fᵀ per token of x (..., in) → (..., out); P = x·Kᵀ as (tokens, R); x's dtype."""
    OUT, R = f.shape
    IN = k.shape[1]
    x2 = x.reshape(-1, IN)
    T = x2.shape[0]
    y = torch.empty(T, OUT, device=x.device, dtype=x.dtype)
    p = torch.empty(T, R, device=x.device, dtype=x.dtype)
    if T:
        cfg = config(R)
        tiles = triton.cdiv(T, cfg.BT)
        splits = _splits(x.device, tiles, OUT, cfg.BO)
        width = _split_width(OUT, splits, cfg.BO)
        _kr_fwd_kernel[(tiles, triton.cdiv(OUT, width))](
            x2, k, f, y, p,
            T, IN, OUT, R, width,
            *x2.stride(), *k.stride(), *f.stride(), *y.stride(), *p.stride(),
            BT=cfg.BT, RP=cfg.RP, BC=cfg.BC, BO=cfg.BO, PRECISION=precision_for(x.dtype),
            num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )
    return y.reshape(*x.shape[:-1], OUT), p


def kr_backward(grad, x, p, f, k, need_x=True, need_f=True, need_k=True):
    """(dx, dF, dK) of `kr_forward` given P from it; None where not needed."""
    OUT, R = f.shape
    IN = k.shape[1]
    g2 = grad.reshape(-1, OUT)
    T = g2.shape[0]
    dx = torch.empty(T, IN, device=x.device, dtype=x.dtype) if need_x else None
    dp = torch.empty(T, R, device=x.device, dtype=grad.dtype)
    if T and (need_x or need_k):
        cfg = config(R)
        tiles = triton.cdiv(T, cfg.BT)
        splits = _splits(x.device, tiles, IN, cfg.BC) if need_x else 1
        width = _split_width(IN, splits, cfg.BC)
        dxa = dx if need_x else dp
        _kr_bwd_kernel[(tiles, triton.cdiv(IN, width))](
            g2, k, f, dxa, dp,
            T, IN, OUT, R, width, int(need_x),
            *g2.stride(), *k.stride(), *f.stride(), *dxa.stride(), *dp.stride(),
            BT=cfg.BT, RP=cfg.RP, BC=cfg.BC, BO=cfg.BO, PRECISION=precision_for(x.dtype),
            num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )
    elif need_x:
        dx.zero_()
    df = (g2.mT @ p).to(f.dtype) if need_f else None
    dk = (dp.mT @ x.reshape(-1, IN)).to(k.dtype) if need_k else None
    return (dx.reshape(x.shape) if need_x else None), df, dk


# ----------------------------------------------------------------------------------------------
# torch.library ops: opaque to torch.compile, with fake kernels and autograd.
# ----------------------------------------------------------------------------------------------
@torch.library.custom_op("lyfast::loha_kr_fwd", mutates_args=())
def loha_kr_fwd(x: torch.Tensor, f: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(y, P) with y = (x·Kᵀ)·Fᵀ (LoHa's ΔW·x, ΔW = F·K never built) and P = x·Kᵀ (tokens, R)."""
    return kr_forward(x, f, k)


@loha_kr_fwd.register_fake
def _(x, f, k):
    tokens = x.numel() // x.shape[-1] if x.shape[-1] else 0
    return x.new_empty(*x.shape[:-1], f.shape[0]), x.new_empty(tokens, f.shape[1])


@torch.library.custom_op("lyfast::loha_kr_bwd", mutates_args=())
def loha_kr_bwd(
    grad: torch.Tensor, x: torch.Tensor, p: torch.Tensor, f: torch.Tensor, k: torch.Tensor,
    need_x: bool, need_f: bool, need_k: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dx, dF, dK) of loha_kr_fwd's y; a gradient not asked for comes back as an empty tensor."""
    dx, df, dk = kr_backward(grad, x, p, f, k, need_x, need_f, need_k)
    empty = lambda: x.new_empty(0)  # noqa: E731 (one per output: returns may not alias)
    return (dx if dx is not None else empty(), df if df is not None else empty(), dk if dk is not None else empty())


@loha_kr_bwd.register_fake
def _(grad, x, p, f, k, need_x, need_f, need_k):
    empty = lambda: x.new_empty(0)  # noqa: E731 (one per output: returns may not alias)
    return (
        torch.empty_like(x) if need_x else empty(),
        torch.empty_like(f) if need_f else empty(),
        torch.empty_like(k) if need_k else empty(),
    )


def _setup_context(ctx, inputs, output):
    x, f, k = inputs
    ctx.mark_non_differentiable(output[1])
    ctx.save_for_backward(x, output[1], f, k)


def _backward(ctx, grad_y, grad_p):
    x, p, f, k = ctx.saved_tensors
    need_x, need_f, need_k = ctx.needs_input_grad
    dx, df, dk = torch.ops.lyfast.loha_kr_bwd(grad_y, x, p, f, k, need_x, need_f, need_k)
    return (dx if need_x else None, df if need_f else None, dk if need_k else None)


loha_kr_fwd.register_autograd(_backward, setup_context=_setup_context)


def khatri_rao_delta(x: torch.Tensor, f: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """y = (x·Kᵀ)·Fᵀ through lyfast::loha_kr_fwd (differentiable in x, F and K)."""
    return torch.ops.lyfast.loha_kr_fwd(x, f, k)[0]


# ----------------------------------------------------------------------------------------------
# Variants for ahead-of-time compilation (tests/test_triton_aot.py).
# ----------------------------------------------------------------------------------------------
def aot_variants():
    """Every config `config` can return (R padded to 64 or 128), in bf16 and fp32 (3×TF32), and fp16
    (bf16's bytes and layouts, another mma instruction) at the widest."""
    cases = [(config(rp), dt, "tf32" if dt == "bf16" else "tf32x3") for rp in _BT for dt in ("bf16", "fp32")]
    cases += [(config(128), "fp16", "tf32")]
    ints = ("T", "IN", "OUT", "R", "cols_per_split")
    out = []
    for c, dtype, prec in cases:
        ptr = "*" + dtype
        ce = dict(BT=c.BT, RP=c.RP, BC=c.BC, BO=c.BO, PRECISION=prec)
        args = dict(x_ptr=ptr, k_ptr=ptr, f_ptr=ptr, y_ptr=ptr, p_ptr=ptr)
        args |= {n: "i32" for n in ints + ("sx_t", "sx_c", "sk_r", "sk_c", "sf_o", "sf_r", "sy_t", "sy_c", "sp_t", "sp_r")}
        out.append((f"loha_kr_fwd[{dtype},{prec},RP={c.RP}]", _kr_fwd_kernel, args, ce, c.num_warps, c.num_stages))
        args = dict(g_ptr=ptr, k_ptr=ptr, f_ptr=ptr, dx_ptr=ptr, dp_ptr=ptr)
        args |= {n: "i32" for n in ints + ("need_x", "sg_t", "sg_o", "sk_r", "sk_c", "sf_o", "sf_r", "sdx_t", "sdx_c",
                                           "sdp_t", "sdp_r")}
        out.append((f"loha_kr_bwd[{dtype},{prec},RP={c.RP}]", _kr_bwd_kernel, args, ce, c.num_warps, c.num_stages))
    return out
