"""BOFT in Triton: out = rescale ⊙ B_{m-1}(⋯B_0(z)) on z's channel axis, all m stages in one launch.

Names follow `lyfast.functional.boft`: r (m, n, b, b) the stage matrices (Cayley'd and multiplier-
interpolated, fp32), rescale (O,) optional, z viewed as (batch, O, pixels) — a token of a linear layer is
a batch row with one pixel.

Stage i (k = 2^i·b/2) mixes channel c·2k + x·k + t·b/2 + a (x ∈ {0,1}, t < 2^i, a < b/2) of block
(c·2^i + t) with block row j = 2a + x (see the functional module). In the kernels a stage is a loop over
chunks of NB whole blocks: the chunk's channels are gathered by that index arithmetic (the stride
permutation costs no copy), and the chunk is multiplied by the block-diagonal matrix of its NB blocks as
one (rows × CH)·(CH × CH) tensor-core product, CH = NB·b padded to a power of two >= 16 (b < 16 packs
several blocks into one product instead of wasting a 16-wide tile on each).

Every stage mixes channels across the whole row (the last one spans 2^(m-1)·b channels), so a stage
must see the previous stage complete: each program runs its row blocks through all m stages with fp32
ping-pong buffers of its own (BR rows × O, in global memory that stays in L2) and a CTA barrier between
stages. z is read once, y written once; only the per-program buffers see the intermediate stages.

Backward (`_butterfly_bwd_kernel`): per row block, one forward sweep recomputes and stores the m-1 stage
inputs in the program's buffers (nothing kept from the forward pass), then the reverse sweep forms
dR_i = Σ_rows g ⊗ h_i on each block and g ← R_iᵀ·g, writing dz at stage 0. dR and drescale are reduced
deterministically: fp32 partial sums per program (read-modify-write by that program only), summed after.

Cayley (`_cayley_kernel`, op lyfast::boft_cayley): R = 2·(I − Q)⁻¹ − I for every b×b block in one
launch, one program per block, Gauss-Jordan in registers. The PyTorch path's vectorized elimination takes
b steps of four small kernels each (~130 launches per BOFT layer per step at b = 32), which on a GPU would
cost more than the layer itself. Its backward, ½(I + R)ᵀ·dR·(I + R)ᵀ, is two batched matmuls in PyTorch.

Layout of this file: kernels → plans/launchers → torch.library ops (fake kernels, autograd).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ._common import SUPPORTED_DTYPES, jit, next_pow2, or_empty, persistent_programs, precision_for

MAX_BLOCK = 64  # b <= 64: a chunk's block-diagonal matrix is at most 64×64
# Per-program buffers are BR × O fp32 each; cap their total so a wide layer does not allocate GBs.
SCRATCH_BUDGET = 256 * 1024 * 1024


# ----------------------------------------------------------------------------------------------
# Kernels.
# ----------------------------------------------------------------------------------------------
@jit
def _cayley_kernel(q_ptr, r_ptr, b, sq_n, sq_i, sq_j, sr_n, sr_i, sr_j, BP: tl.constexpr):
    """R = 2·(I − Q)⁻¹ − I for one b×b block per program: unpivoted Gauss-Jordan on A = I − Q in fp32
    registers (A and its inverse as BP×BP tiles; padding rows/columns are identity, so they never mix
    in). Unpivoted is safe: A's symmetric part is I, so every pivot is >= 1 (see
    `lyfast.functional.boft._inverse_unpivoted`, the PyTorch path's same elimination)."""
    blk = tl.program_id(0).to(tl.int64)
    i = tl.arange(0, BP)
    ok = (i < b)[:, None] & (i < b)[None, :]
    eye = tl.where(i[:, None] == i[None, :], 1.0, 0.0)
    q = tl.load(q_ptr + blk * sq_n + i[:, None] * sq_i + i[None, :] * sq_j, mask=ok, other=0.0).to(tl.float32)
    a = eye - q
    inv = eye
    for k in range(0, b):
        is_row = (i == k)[:, None]
        is_col = (i == k)[None, :]
        a_row = tl.sum(tl.where(is_row, a, 0.0), axis=0)
        inv_row = tl.sum(tl.where(is_row, inv, 0.0), axis=0)
        pivot = tl.sum(tl.where(i == k, a_row, 0.0), axis=0)
        a_row = a_row / pivot
        inv_row = inv_row / pivot
        col = tl.sum(tl.where(is_col, a, 0.0), axis=1)
        col = tl.where(i == k, 0.0, col)  # row k is replaced by the scaled pivot row, not updated
        a = tl.where(is_row, a_row[None, :], a - col[:, None] * a_row[None, :])
        inv = tl.where(is_row, inv_row[None, :], inv - col[:, None] * inv_row[None, :])
    tl.store(r_ptr + blk * sr_n + i[:, None] * sr_i + i[None, :] * sr_j, 2.0 * inv - eye, mask=ok)


@jit
def _chunk_channels(i, q, nb, b, CHP: tl.constexpr):
    """Channels of chunk q (NB blocks) at stage i, in block order: (channel, block, row j, valid)."""
    u = tl.arange(0, CHP)
    valid = u < nb * b
    blk = q * nb + u // b
    j = u % b
    half = b // 2
    t_count = 1 << i  # 2^i blocks side by side inside a chunk of 2k channels
    k = t_count * half
    c = blk // t_count
    t = blk % t_count
    ch = c * 2 * k + (j % 2) * k + t * half + j // 2
    return ch, blk, j, valid


@jit
def _block_diag(r_ptr, i, n, b, blk, j, valid, TRANSPOSE: tl.constexpr):
    """The chunk's block-diagonal stage matrix as (CHP, CHP): rows index the input position u, columns the
    output position u' (D^T, so that out = in @ D^T); with TRANSPOSE rows are u' and columns u (D)."""
    if TRANSPOSE:
        row_j, col_j = j[:, None], j[None, :]
    else:
        row_j, col_j = j[None, :], j[:, None]
    same = (blk[:, None] == blk[None, :]) & valid[:, None] & valid[None, :]
    # int32 offsets (r has m·n·b² < 2^31 elements): a CHP×CHP tile of 64-bit pointers costs registers.
    offs = (i * n + blk[:, None]) * (b * b) + row_j * b + col_j
    return tl.load(r_ptr + offs, mask=same, other=0.0)


@jit
def _butterfly_fwd_kernel(
    z_ptr, r_ptr, s_ptr, y_ptr, buf_ptr,
    ROWS, S, O, n, b, m, nb, has_rescale,
    sz_b, sz_c, sz_s,
    sy_b, sy_c, sy_s,
    BR: tl.constexpr, CHP: tl.constexpr, PRECISION: tl.constexpr,
):
    """has_rescale stays a runtime flag here (a launch makes 1 a constant, 0 stays an argument): as a constexpr
    its 0 variant spilled 16 B/thread in fp32 on sm_90 (AOT of the launches, tests/launch_signatures.py)."""
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    tiles = tl.cdiv(ROWS, BR)
    chunks = n // nb
    lr = tl.arange(0, BR)
    buf = buf_ptr + pid.to(tl.int64) * (2 * BR * O)  # two BR × O fp32 buffers of this program
    for tile in range(pid, tiles, nprog):
        rows = tile * BR + lr
        row_ok = rows < ROWS
        rb = (rows // S).to(tl.int64)
        rs = rows % S
        z_row = z_ptr + rb * sz_b + rs * sz_s
        y_row = y_ptr + rb * sy_b + rs * sy_s
        for i in range(0, m):
            src = buf + ((i + 1) % 2) * (BR * O)
            dst = buf + (i % 2) * (BR * O)
            for q in range(0, chunks):
                ch, blk, j, valid = _chunk_channels(i, q, nb, b, CHP)
                mask = row_ok[:, None] & valid[None, :]
                if i == 0:
                    h = tl.load(z_row[:, None] + ch[None, :] * sz_c, mask=mask, other=0.0).to(tl.float32)
                else:
                    h = tl.load(src + lr[:, None] * O + ch[None, :], mask=mask, other=0.0)
                dt = _block_diag(r_ptr, i, n, b, blk, j, valid, False)
                out = tl.dot(h, dt, input_precision=PRECISION)
                if i == m - 1:
                    if has_rescale != 0:
                        out = out * tl.load(s_ptr + ch, mask=valid, other=0.0).to(tl.float32)[None, :]
                    tl.store(y_row[:, None] + ch[None, :] * sy_c, out.to(y_ptr.dtype.element_ty), mask=mask)
                else:
                    tl.store(dst + lr[:, None] * O + ch[None, :], out, mask=mask)
            tl.debug_barrier()  # stage i complete before stage i + 1 (or the next row block) reads


@jit
def _butterfly_bwd_kernel(
    g_ptr, z_ptr, r_ptr, s_ptr, dz_ptr, dr_ptr, ds_ptr, buf_ptr,
    ROWS, S, O, n, b, m, nb,
    sg_b, sg_c, sg_s,
    sz_b, sz_c, sz_s,
    sd_b, sd_c, sd_s,
    HAS_RESCALE: tl.constexpr, NEED_S: tl.constexpr, NEED_Z: tl.constexpr,
    BR: tl.constexpr, CHP: tl.constexpr, PRECISION: tl.constexpr,
):
    """Buffers of this program: slots 0..m-2 hold the stage inputs h_1..h_{m-1}; slots m-1 and m the
    gradient ping-pong. dr_ptr (programs, m, n, b, b) and ds_ptr (programs, O) are its fp32 partials."""
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    tiles = tl.cdiv(ROWS, BR)
    chunks = n // nb
    lr = tl.arange(0, BR)
    slot = BR * O
    buf = buf_ptr + pid.to(tl.int64) * ((m + 1) * slot)
    dr = dr_ptr + pid.to(tl.int64) * (m * n * b * b)
    ds = ds_ptr + pid.to(tl.int64) * O
    for tile in range(pid, tiles, nprog):
        rows = tile * BR + lr
        row_ok = rows < ROWS
        rb = (rows // S).to(tl.int64)
        rs = rows % S
        z_row = z_ptr + rb * sz_b + rs * sz_s
        g_row = g_ptr + rb * sg_b + rs * sg_s
        d_row = dz_ptr + rb * sd_b + rs * sd_s
        # Forward sweep: h_{i+1} = B_i(h_i) into slot i; the last stage only feeds d rescale.
        # The flags are constexpr: a launch turns any integer argument equal to 1 into a compile-time
        # constant anyway, so a runtime flag never gave one compiled variant (and `(flag != 0).to(...)`
        # on a specialized 1 is a Python bool, which crashed the compile).
        last = m - 1 + NEED_S
        for i in range(0, last):
            for q in range(0, chunks):
                ch, blk, j, valid = _chunk_channels(i, q, nb, b, CHP)
                mask = row_ok[:, None] & valid[None, :]
                if i == 0:
                    h = tl.load(z_row[:, None] + ch[None, :] * sz_c, mask=mask, other=0.0).to(tl.float32)
                else:
                    h = tl.load(buf + (i - 1) * slot + lr[:, None] * O + ch[None, :], mask=mask, other=0.0)
                out = tl.dot(h, _block_diag(r_ptr, i, n, b, blk, j, valid, False), input_precision=PRECISION)
                if i == m - 1:  # h_m: d rescale = Σ_rows grad ⊙ h_m
                    gr = tl.load(g_row[:, None] + ch[None, :] * sg_c, mask=mask, other=0.0).to(tl.float32)
                    part = tl.load(ds + ch, mask=valid, other=0.0) + tl.sum(gr * out, axis=0)
                    tl.store(ds + ch, part, mask=valid)
                else:
                    tl.store(buf + i * slot + lr[:, None] * O + ch[None, :], out, mask=mask)
            tl.debug_barrier()
        # Reverse sweep: g_i = R_iᵀ-stage(g_{i+1}); dR_i += g_{i+1} ⊗ h_i per block.
        for ii in range(0, m):
            i = m - 1 - ii
            g_src = buf + (m - 1 + (i + 1) % 2) * slot
            g_dst = buf + (m - 1 + i % 2) * slot
            for q in range(0, chunks):
                ch, blk, j, valid = _chunk_channels(i, q, nb, b, CHP)
                mask = row_ok[:, None] & valid[None, :]
                if i == m - 1:
                    g = tl.load(g_row[:, None] + ch[None, :] * sg_c, mask=mask, other=0.0).to(tl.float32)
                    if HAS_RESCALE != 0:
                        g = g * tl.load(s_ptr + ch, mask=valid, other=0.0).to(tl.float32)[None, :]
                else:
                    g = tl.load(g_src + lr[:, None] * O + ch[None, :], mask=mask, other=0.0)
                if i == 0:
                    h = tl.load(z_row[:, None] + ch[None, :] * sz_c, mask=mask, other=0.0).to(tl.float32)
                else:
                    h = tl.load(buf + (i - 1) * slot + lr[:, None] * O + ch[None, :], mask=mask, other=0.0)
                # (u', u) outer products summed over rows; keep the diagonal blocks: dR[blk, j', j].
                gh = tl.dot(tl.trans(g), h, input_precision=PRECISION)
                same = (blk[:, None] == blk[None, :]) & valid[:, None] & valid[None, :]
                dr_off = (i * n + blk[:, None]) * (b * b) + j[:, None] * b + j[None, :]
                tl.store(dr + dr_off, tl.load(dr + dr_off, mask=same, other=0.0) + gh, mask=same)
                if (i > 0) | (NEED_Z != 0):
                    gin = tl.dot(g, _block_diag(r_ptr, i, n, b, blk, j, valid, True), input_precision=PRECISION)
                    if i == 0:
                        tl.store(d_row[:, None] + ch[None, :] * sd_c, gin.to(dz_ptr.dtype.element_ty), mask=mask)
                    else:
                        tl.store(g_dst + lr[:, None] * O + ch[None, :], gin, mask=mask)
            tl.debug_barrier()


# ----------------------------------------------------------------------------------------------
# Plans and launchers.
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Config:
    BR: int  # rows per block (the dot's M)
    CHP: int  # padded chunk width
    NB: int  # blocks per chunk
    num_warps: int = 4
    num_stages: int = 1


def config(n: int, b: int) -> Config:
    """Pack whole blocks into >= 16-wide chunks (b = 4 → 4 blocks per 16×16 product); 32 rows per block
    keeps the per-program buffers small while the chunk matrix is reused over 32 rows."""
    nb = 1
    while nb * 2 * b <= 16 and nb * 2 <= n:
        nb *= 2
    chp = next_pow2(nb * b, 16)
    return Config(BR=32, CHP=chp, NB=nb, num_warps=4 if chp <= 32 else 8)


def supports(z: torch.Tensor, r: torch.Tensor, rescale, channel_axis: int) -> bool:
    m, n, b, _ = r.shape
    axis = channel_axis % z.dim()
    return (
        z.dtype in SUPPORTED_DTYPES
        and r.dtype == torch.float32
        and (rescale is None or (rescale.dtype in SUPPORTED_DTYPES and rescale.numel() == z.shape[channel_axis]))
        and b <= MAX_BLOCK
        and (axis == z.dim() - 1 or axis == 1)
        and z.device == r.device
    )


def cayley_supported(blocks: torch.Tensor) -> bool:
    """The Cayley kernel takes square blocks up to MAX_BLOCK wide whose solve runs in fp32 (half and fp32
    blocks; fp64 stays on the PyTorch path, in fp64)."""
    return blocks.dim() >= 2 and blocks.shape[-1] == blocks.shape[-2] <= MAX_BLOCK and blocks.dtype in SUPPORTED_DTYPES


def cayley_forward(q: torch.Tensor) -> torch.Tensor:
    """R = (I + Q)(I − Q)⁻¹ per b×b block of fp32 q (..., b, b), one program per block."""
    b = q.shape[-1]
    q3 = q.reshape(-1, b, b)
    r = torch.empty_like(q3)
    if q3.shape[0]:
        _cayley_kernel[(q3.shape[0],)](q3, r, b, *q3.stride(), *r.stride(), BP=next_pow2(b, 16),
                                       num_warps=4 if b > 32 else 2)
    return r.reshape(q.shape)


def _as_bos(t: torch.Tensor, channel_axis: int) -> torch.Tensor:
    """(batch, O, pixels) view (copy only if the dims do not collapse)."""
    axis = channel_axis % t.dim()
    if axis == t.dim() - 1:
        return t.reshape(-1, t.shape[-1], 1)
    return t.reshape(t.shape[0], t.shape[1], -1)


def _programs(device, rows: int, cfg: Config, slots: int, O: int) -> int:
    tiles = triton.cdiv(rows, cfg.BR)
    by_memory = max(1, SCRATCH_BUDGET // (slots * cfg.BR * O * 4))
    return max(1, min(persistent_programs(device, tiles, per_sm=1), by_memory))


def butterfly_forward(z: torch.Tensor, r: torch.Tensor, rescale, channel_axis: int) -> torch.Tensor:
    m, n, b, _ = r.shape
    cfg = config(n, b)
    z3 = _as_bos(z, channel_axis)
    B, O, S = z3.shape
    y = torch.empty(z.shape, device=z.device, dtype=z.dtype)
    y3 = _as_bos(y, channel_axis)
    rows = B * S
    if rows == 0:
        return y
    r = r.contiguous()
    progs = _programs(z.device, rows, cfg, 2, O)
    buf = torch.empty(progs, 2, cfg.BR, O, device=z.device, dtype=torch.float32)
    s = rescale.reshape(-1).float() if rescale is not None else r
    _butterfly_fwd_kernel[(progs,)](
        z3, r, s, y3, buf,
        rows, S, O, n, b, m, cfg.NB, int(rescale is not None),
        *z3.stride(), *y3.stride(),
        BR=cfg.BR, CHP=cfg.CHP, PRECISION=precision_for(torch.float32),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return y


def butterfly_backward(grad, z, r, rescale, channel_axis: int, need_z=True, need_r=True, need_s=True):
    """(dz, dr, drescale) of `butterfly_forward`; dr in fp32, drescale (O,) in rescale's dtype."""
    m, n, b, _ = r.shape
    cfg = config(n, b)
    z3 = _as_bos(z, channel_axis)
    g3 = _as_bos(grad, channel_axis)
    B, O, S = z3.shape
    dz = torch.empty(z.shape, device=z.device, dtype=z.dtype)
    d3 = _as_bos(dz, channel_axis)
    rows = B * S
    r = r.contiguous()
    has_s = rescale is not None
    progs = _programs(z.device, max(rows, 1), cfg, m + 1, O)
    dr = torch.zeros(progs, m, n, b, b, device=z.device, dtype=torch.float32)
    ds = torch.zeros(progs, O, device=z.device, dtype=torch.float32)
    if rows:
        buf = torch.empty(progs, m + 1, cfg.BR, O, device=z.device, dtype=torch.float32)
        s = rescale.reshape(-1).float() if has_s else r
        _butterfly_bwd_kernel[(progs,)](
            g3, z3, r, s, d3, dr, ds, buf,
            rows, S, O, n, b, m, cfg.NB,
            *g3.stride(), *z3.stride(), *d3.stride(),
            HAS_RESCALE=int(has_s), NEED_S=int(has_s and need_s), NEED_Z=int(need_z),
            BR=cfg.BR, CHP=cfg.CHP, PRECISION=precision_for(torch.float32),
            num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )
    else:
        dz.zero_()
    d_rescale = ds.sum(0).to(rescale.dtype).reshape(rescale.shape) if has_s and need_s else None
    return (dz if need_z else None), (dr.sum(0) if need_r else None), d_rescale


# ----------------------------------------------------------------------------------------------
# torch.library ops: opaque to torch.compile, with fake kernels and autograd.
# ----------------------------------------------------------------------------------------------
@torch.library.custom_op("lyfast::boft_fwd", mutates_args=())
def boft_fwd(z: torch.Tensor, r: torch.Tensor, rescale: torch.Tensor | None, channel_axis: int) -> torch.Tensor:
    """rescale ⊙ B_{m-1}(⋯B_0(z)) on z's channel axis (-1 or 1), r (m, n, b, b) fp32; z's dtype out."""
    return butterfly_forward(z, r, rescale, channel_axis)


@boft_fwd.register_fake
def _(z, r, rescale, channel_axis):
    return torch.empty_like(z, memory_format=torch.contiguous_format)


@torch.library.custom_op("lyfast::boft_bwd", mutates_args=())
def boft_bwd(
    grad: torch.Tensor, z: torch.Tensor, r: torch.Tensor, rescale: torch.Tensor | None, channel_axis: int,
    need_z: bool, need_r: bool, need_rescale: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dz, dr, drescale) of boft_fwd; a gradient not asked for comes back as an empty tensor."""
    return or_empty(z, *butterfly_backward(grad, z, r, rescale, channel_axis, need_z, need_r, need_rescale))


@boft_bwd.register_fake
def _(grad, z, r, rescale, channel_axis, need_z, need_r, need_rescale):
    return or_empty(
        z,
        torch.empty_like(z, memory_format=torch.contiguous_format) if need_z else None,
        torch.empty_like(r) if need_r else None,
        torch.empty_like(rescale) if need_rescale and rescale is not None else None,
    )


def _setup_context(ctx, inputs, output):
    z, r, rescale, channel_axis = inputs
    ctx.channel_axis = channel_axis
    ctx.save_for_backward(z, r, rescale)


def _backward(ctx, grad):
    z, r, rescale = ctx.saved_tensors
    need_z, need_r, need_s = ctx.needs_input_grad[:3]
    need_s = bool(need_s and rescale is not None)
    dz, dr, ds = torch.ops.lyfast.boft_bwd(grad, z, r, rescale, ctx.channel_axis, need_z, need_r, need_s)
    return (dz if need_z else None, dr if need_r else None, ds if need_s else None, None)


boft_fwd.register_autograd(_backward, setup_context=_setup_context)


@torch.library.custom_op("lyfast::boft_cayley", mutates_args=())
def boft_cayley(q: torch.Tensor) -> torch.Tensor:
    """R = (I + Q)(I − Q)⁻¹ for each skew-symmetric fp32 block of q (..., b, b), b <= MAX_BLOCK. One launch
    instead of the PyTorch path's b elimination steps (four small kernels each)."""
    return cayley_forward(q)


@boft_cayley.register_fake
def _(q):
    return torch.empty_like(q)


def _cayley_setup_context(ctx, inputs, output):
    ctx.save_for_backward(output)  # the butterfly saves R too: one storage for both


def _cayley_backward(ctx, grad):
    from lyfast.functional.boft import cayley_backward

    (r,) = ctx.saved_tensors
    return cayley_backward(r, grad)


boft_cayley.register_autograd(_cayley_backward, setup_context=_cayley_setup_context)


def cayley(blocks: torch.Tensor, constraint: float = 0.0) -> torch.Tensor:
    """`lyfast.functional.boft.cayley` with the solve in one Triton launch (fp32)."""
    from lyfast.functional.boft import skew

    return torch.ops.lyfast.boft_cayley(skew(blocks, constraint).float())
