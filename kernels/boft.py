"""BOFT in Triton: out = rescale ⊙ B_{m-1}(⋯B_0(z)) on z's channel axis, the m stages in a few phases.

Names follow `lyfast.functional.boft`: r (m, n, b, b) the stage matrices (Cayley'd and multiplier-
interpolated, fp32), rescale (O,) optional, z viewed as (batch, O, pixels) — a token of a linear layer is
a batch row with one pixel.

Stage i (k = 2^i·b/2) mixes channel c·2k + x·k + t·b/2 + a (x ∈ {0,1}, t < 2^i, a < b/2) of block
(c·2^i + t) with block row j = 2a + x (see the functional module). In the kernels a stage is a loop over
chunks of NB whole blocks: the chunk's channels are gathered by that index arithmetic (the stride
permutation costs no copy), and the chunk is multiplied by the block-diagonal matrix of its NB blocks as
one (rows × CH)·(CH × CH) tensor-core product, CH = NB·b padded to a power of two >= 16 (b < 16 packs
several blocks into one product instead of wasting a 16-wide tile on each).

Phases (issue 11, point 5). Write a channel as a + (b/2)·u (a < b/2, u < 2n): stage i mixes a with bit i
of u. So stages i0 … i0+ms-1 mix only a and bits i0 … i0+ms-1 of u: on every set of channels that agree in
u's other bits (sets = n / 2^(ms-1), each b·2^(ms-1) channels wide) they run as a butterfly of their own.
A phase is one launch over (row tile, set) work items on persistent programs; within an item the stages
ping-pong through that program's own fp32 buffers (BR rows × the set's width: L1/L2-resident), with a CTA
barrier between stages. Phases are the fewest runs of consecutive stages whose backward scratch,
(ms + 1)·BR_BWD·b·2^(ms-1)·4 bytes, fits PROGRAM_SCRATCH (128 KiB): at lora_dim 32 (b = 20) m = 7, 9, 10
split as 4+3, 5+4, 5+5. Between phases the rows pass through fp32 chunk buffers, and rows are processed in
chunks of C rows with (phases − 1)·C·O·4 <= WORKING_SET (24 MiB), so what one phase writes the next
reads from L2. The working set is therefore at most WORKING_SET + SMs·PROGRAM_SCRATCH (24 + 16.5 MiB on
132 SMs, under H100/H200's 50 MB L2), whatever the row count; before it was programs × slots × 32 rows ×
O × 4 (41–255 MiB at 8,192 rows, `python -m benchmarks.boft_working_set` prints both).

Expected effect (a model, not measured; docs/gpu.md says what a GPU session must time): each stage still
reads and writes its rows once in fp32 (8 B per element per stage), but from a per-program buffer of
<= 128 KiB instead of a 41–255 MiB scratch that spills to HBM, and a phase boundary adds one more such
pass through the L2-resident chunk buffers. HBM then sees z (and grad) read, y (or dz) written, so at
1280→10240 × 8,192 rows bf16 the forward's HBM bytes fall from up to (4 + 8·(m − 1))·rows·O ≈ 6.4 GB (the
old scratch, 5× the L2, in HBM) to ~4·rows·O ≈ 0.34 GB, and the 8·m B/element of stage traffic moves to
L1/L2 (a few times HBM's bandwidth on Hopper). The cost:
k launches per chunk in the forward, 2k − 1 in the backward (28 and 42 at 10240, each some µs of GPU work).

Backward (`_phase_bwd_kernel`), per row chunk: the forward of every phase but the last is recomputed into
the chunk buffers, then each phase's backward runs from the last phase down, writing its input's gradient
over that input (the chunk buffer, or dz for the first phase). Per work item (row group, set): for each
row tile of the group, a forward sweep stores the stage inputs in the program's slots, and the reverse
sweep forms dR_i = Σ_rows g ⊗ h_i on the set's blocks and g ← R_iᵀ·g. A row group is a fixed run of row
tiles, and each (group, set) item is one program's, so its fp32 partial of dR (and of drescale, in the last
phase) is read-modify-written by that item alone, in tile order, over the chunks in stream order; after
the last chunk the partials are summed over groups by torch.sum over dim 0 (a fixed order on CUDA): no
atomics, bit-reproducible. Groups: enough that groups × sets >= SMs for the phase with the fewest sets (at
least one program per SM: 132 in every phase at 1280–10240), within PARTIAL_BUDGET (64 MiB; 12–39 MiB at
1280–10240 × 8,192 rows, before 91–141 MiB) and the chunk's row tiles.

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

from ._common import SUPPORTED_DTYPES, jit, launch_sms, next_pow2, or_empty, persistent_programs, precision_for

MAX_BLOCK = 64  # b <= 64: a chunk's block-diagonal matrix is at most 64×64


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
def _chunk_channels(i, q, nb, b, CHP: tl.constexpr, U0: tl.constexpr = 0):
    """Channels of chunk q (NB blocks) at stage i, in block order: (channel, block, row j, valid) for the
    chunk positions U0 … U0+CHP-1 (U0 > 0: a column piece of a wider chunk)."""
    u = U0 + tl.arange(0, CHP)
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
def _set_channels(i, q, nb, b, w, lo_sets, n_loc, CHP: tl.constexpr, U0: tl.constexpr = 0):
    """Chunk q of local stage i in set w of a phase (see the module docstring): (global channel, the
    program's own channel, global block, block row j, valid), for chunk positions U0 … U0+CHP-1. The set's
    n_loc blocks run the phase's stages as a butterfly of their own; global u = lo + lo_sets·(u_loc +
    2·n_loc·hi), w = hi·lo_sets + lo."""
    ch, blk, j, valid = _chunk_channels(i, q, nb, b, CHP, U0)
    half = b // 2
    lo = w % lo_sets
    hi = w // lo_sets
    gch = ch % half + half * (lo + lo_sets * (ch // half + 2 * n_loc * hi))
    gblk = lo + lo_sets * (blk + n_loc * hi)
    return gch, ch, gblk, j, valid


@jit
def _row_ptrs(ptr, rows, row0, S, s_b, s_s):
    """Row pointers of a (batch, O, pixels) view for rows row0 + rows (64-bit batch offsets)."""
    g = row0 + rows
    return ptr + (g // S).to(tl.int64) * s_b + (g % S) * s_s


@jit
def _phase_fwd_kernel(
    x_ptr, r_ptr, s_ptr, y_ptr, buf_ptr,
    ROWS, x_row0, x_S, y_row0, y_S,
    n, b, i0, ms, nb, lo_sets, has_rescale,
    sx_b, sx_c, sx_s,
    sy_b, sy_c, sy_s,
    BR: tl.constexpr, CHP: tl.constexpr, PRECISION: tl.constexpr,
):
    """Stages i0 … i0+ms-1 on ROWS rows: y = rescale? ⊙ B_{i0+ms-1}(⋯B_{i0}(x)). Work items (row tile, set)
    over persistent programs; the stages of one item ping-pong through this program's two BR × OL fp32
    buffers (OL = the set's width). has_rescale stays a runtime flag (a launch makes 1 a constant, 0 stays
    an argument): as a constexpr its 0 variant spilled 16 B/thread in fp32 on sm_90."""
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    n_loc = 1 << (ms - 1)
    OL = n_loc * b
    sets = n // n_loc
    tiles = tl.cdiv(ROWS, BR)
    chunks = n_loc // nb
    lr = tl.arange(0, BR)
    buf = buf_ptr + pid.to(tl.int64) * (2 * BR * OL)
    for item in range(pid, tiles * sets, nprog):
        w = item % sets  # neighbouring programs take one row tile's sets: its rows are read once from HBM
        rows = (item // sets) * BR + lr
        row_ok = rows < ROWS
        x_row = _row_ptrs(x_ptr, rows, x_row0, x_S, sx_b, sx_s)
        y_row = _row_ptrs(y_ptr, rows, y_row0, y_S, sy_b, sy_s)
        for i in range(0, ms):
            src = buf + ((i + 1) % 2) * (BR * OL)
            dst = buf + (i % 2) * (BR * OL)
            for q in range(0, chunks):
                gch, ch, gblk, j, valid = _set_channels(i, q, nb, b, w, lo_sets, n_loc, CHP)
                mask = row_ok[:, None] & valid[None, :]
                if i == 0:
                    h = tl.load(x_row[:, None] + gch[None, :] * sx_c, mask=mask, other=0.0).to(tl.float32)
                else:
                    h = tl.load(src + lr[:, None] * OL + ch[None, :], mask=mask, other=0.0)
                dt = _block_diag(r_ptr, i0 + i, n, b, gblk, j, valid, False)
                out = tl.dot(h, dt, input_precision=PRECISION)
                if i == ms - 1:
                    if has_rescale != 0:
                        out = out * tl.load(s_ptr + gch, mask=valid, other=0.0).to(tl.float32)[None, :]
                    tl.store(y_row[:, None] + gch[None, :] * sy_c, out.to(y_ptr.dtype.element_ty), mask=mask)
                else:
                    tl.store(dst + lr[:, None] * OL + ch[None, :], out, mask=mask)
            tl.debug_barrier()  # stage i complete before stage i + 1 (or the next item) reads


@jit
def _phase_bwd_kernel(
    g_ptr, x_ptr, r_ptr, s_ptr, dx_ptr, dr_ptr, ds_ptr, buf_ptr,
    ROWS, g_row0, g_S, x_row0, x_S, d_row0, d_S,
    m, n, b, i0, ms, nb, lo_sets, groups,
    sg_b, sg_c, sg_s,
    sx_b, sx_c, sx_s,
    sd_b, sd_c, sd_s,
    HAS_RESCALE: tl.constexpr, NEED_S: tl.constexpr, NEED_X: tl.constexpr,
    BR: tl.constexpr, CHP: tl.constexpr, KC: tl.constexpr, PRECISION: tl.constexpr,
):
    """Backward of one phase (stages i0 … i0+ms-1): g the gradient of its output, x its input, dx the
    gradient of its input (dx may be x itself: an item reads its rows and channels of x before it writes
    them, and no other item touches them). Work items (row group, set); a group is a fixed run of row
    tiles, so dR/drescale partial `grp` (dr_ptr (groups, m, n, b, b), ds_ptr (groups, O), fp32) is
    read-modify-written by one item only, in tile order: no atomics, and the same sums on every run.
    Buffers of this program: slots 0..ms-2 the stage inputs, slots ms-1 and ms the gradient ping-pong.
    The flags are constexpr: a launch turns any integer argument equal to 1 into a compile-time constant
    anyway (and `(flag != 0).to(...)` on a specialized 1 is a Python bool, which crashed the compile)."""
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    n_loc = 1 << (ms - 1)
    OL = n_loc * b
    sets = n // n_loc
    tiles = tl.cdiv(ROWS, BR)
    per_group = tl.cdiv(tiles, groups)
    chunks = n_loc // nb
    lr = tl.arange(0, BR)
    slot = BR * OL
    buf = buf_ptr + pid.to(tl.int64) * ((ms + 1) * slot)
    for item in range(pid, groups * sets, nprog):
        grp = item // sets
        w = item % sets
        dr = dr_ptr + grp.to(tl.int64) * (m * n * b * b)
        ds = ds_ptr + grp.to(tl.int64) * (n * b)
        for tile in range(grp * per_group, tl.minimum((grp + 1) * per_group, tiles)):
            rows = tile * BR + lr
            row_ok = rows < ROWS
            x_row = _row_ptrs(x_ptr, rows, x_row0, x_S, sx_b, sx_s)
            g_row = _row_ptrs(g_ptr, rows, g_row0, g_S, sg_b, sg_s)
            d_row = _row_ptrs(dx_ptr, rows, d_row0, d_S, sd_b, sd_s)
            # Forward sweep: the stage inputs into slots 0..ms-2; the last stage only feeds d rescale.
            # The stage-input load below (also in the reverse sweep and the forward kernel) stays inline: as a
            # shared @jit helper it made Triton 3.6 spill 16 B/thread in a CHP-64 rescale variant on sm_90.
            last = ms - 1 + NEED_S
            for i in range(0, last):
                for q in range(0, chunks):
                    gch, ch, gblk, j, valid = _set_channels(i, q, nb, b, w, lo_sets, n_loc, CHP)
                    mask = row_ok[:, None] & valid[None, :]
                    if i == 0:
                        h = tl.load(x_row[:, None] + gch[None, :] * sx_c, mask=mask, other=0.0).to(tl.float32)
                    else:
                        h = tl.load(buf + (i - 1) * slot + lr[:, None] * OL + ch[None, :], mask=mask, other=0.0)
                    out = tl.dot(h, _block_diag(r_ptr, i0 + i, n, b, gblk, j, valid, False),
                                 input_precision=PRECISION)
                    if i == ms - 1:  # the output before rescale: d rescale = Σ_rows grad ⊙ out
                        gr = tl.load(g_row[:, None] + gch[None, :] * sg_c, mask=mask, other=0.0).to(tl.float32)
                        part = tl.load(ds + gch, mask=valid, other=0.0) + tl.sum(gr * out, axis=0)
                        tl.store(ds + gch, part, mask=valid)
                    else:
                        tl.store(buf + i * slot + lr[:, None] * OL + ch[None, :], out, mask=mask)
                tl.debug_barrier()
            # Reverse sweep: g ← stage_iᵀ(g); dR_i += g ⊗ h_i per block.
            for ii in range(0, ms):
                i = ms - 1 - ii
                g_src = buf + (ms - 1 + (i + 1) % 2) * slot
                g_dst = buf + (ms - 1 + i % 2) * slot
                for q in range(0, chunks):
                    gch, ch, gblk, j, valid = _set_channels(i, q, nb, b, w, lo_sets, n_loc, CHP)
                    mask = row_ok[:, None] & valid[None, :]
                    if i == 0:
                        h = tl.load(x_row[:, None] + gch[None, :] * sx_c, mask=mask, other=0.0).to(tl.float32)
                    else:
                        h = tl.load(buf + (i - 1) * slot + lr[:, None] * OL + ch[None, :], mask=mask, other=0.0)
                    gin = tl.zeros((BR, CHP), dtype=tl.float32)
                    # g's columns u' in pieces of KC: dR's rows u' and gin's K run piece by piece, so a KC × CHP
                    # slab of dR and of R is live instead of CHP × CHP (`bwd_piece`). Each dR entry is still one
                    # sum over the tile's rows; gin sums its pieces in a fixed order: still bit-reproducible.
                    for kc in tl.static_range(0, CHP // KC):
                        kch, kl, kblk, kj, kvalid = _set_channels(i, q, nb, b, w, lo_sets, n_loc, KC, kc * KC)
                        kmask = row_ok[:, None] & kvalid[None, :]
                        if i == ms - 1:
                            g = tl.load(g_row[:, None] + kch[None, :] * sg_c, mask=kmask, other=0.0).to(tl.float32)
                            if HAS_RESCALE != 0:
                                g = g * tl.load(s_ptr + kch, mask=kvalid, other=0.0).to(tl.float32)[None, :]
                        else:
                            g = tl.load(g_src + lr[:, None] * OL + kl[None, :], mask=kmask, other=0.0)
                        # (u', u) outer products summed over rows; keep the diagonal blocks: dR[blk, j', j].
                        gh = tl.dot(tl.trans(g), h, input_precision=PRECISION)
                        same = (kblk[:, None] == gblk[None, :]) & kvalid[:, None] & valid[None, :]
                        rj = (kblk[:, None] * b + kj[:, None]) * b + j[None, :]  # (blk·b + j')·b + j
                        dr_off = (i0 + i) * n * (b * b) + rj
                        tl.store(dr + dr_off, tl.load(dr + dr_off, mask=same, other=0.0) + gh, mask=same)
                        if (i > 0) | (NEED_X != 0):
                            # R's rows j' of this piece, columns j: gin[:, u] += Σ_u' g[:, u'] R[blk, j', j].
                            rt = tl.load(r_ptr + ((i0 + i) * n * (b * b) + rj), mask=same, other=0.0)
                            gin = tl.dot(g, rt, acc=gin, input_precision=PRECISION)
                    if (i > 0) | (NEED_X != 0):
                        if i == 0:
                            tl.store(d_row[:, None] + gch[None, :] * sd_c, gin.to(dx_ptr.dtype.element_ty), mask=mask)
                        else:
                            tl.store(g_dst + lr[:, None] * OL + ch[None, :], gin, mask=mask)
                tl.debug_barrier()


# ----------------------------------------------------------------------------------------------
# Plans and launchers.
# ----------------------------------------------------------------------------------------------
BR_FWD = 32  # rows per tile in the forward (the dots' M)
BR_BWD = 16  # in the backward: its ms + 1 slots per program are the larger scratch
# Per-program scratch cap: the backward's (ms + 1) slots of BR_BWD × OL fp32 (OL = b·2^(ms-1), the set's
# width) decide the most stages one phase may hold; 132 programs × 128 KiB = 16.5 MiB on an H100/H200.
PROGRAM_SCRATCH = 128 * 1024
# Row-chunk buffers between phases: (phases − 1) × chunk rows × O fp32 stay within this, so that what one
# phase writes the next reads from L2 (H100/H200: 50 MB, beside the programs' scratch above).
WORKING_SET = 24 * 1024 * 1024
# dR partials of the backward, (groups, m, n, b, b) fp32: at most this much, and at least one group.
PARTIAL_BUDGET = 64 * 1024 * 1024
MAX_PHASE_STAGES = None  # tests set it to force several phases on small widths
FAKE_SMS = 8  # the interpreter's stand-in SM count when sizing row groups (it runs programs one by one)


@dataclass(frozen=True)
class Plan:
    """How a butterfly of m stages on O = n·b channels runs on `rows` rows (see the module docstring)."""
    phases: tuple  # (first stage, stages) per phase
    NB: int  # blocks per chunk
    CHP: int  # padded chunk width
    num_warps: int
    chunk_rows: int  # rows per launch of each phase (a multiple of BR_FWD)
    groups: int  # backward row groups per chunk: the dR/drescale partials
    sms: int  # the SM count the plan was sized for

    def width(self, b: int) -> int:
        """The widest set's channel count, OL = b·2^(ms-1): the per-program scratch's row length."""
        return b << (max(ms for _, ms in self.phases) - 1)


def bwd_piece(chp: int) -> int:
    """KC, the column piece of g in the backward's reverse sweep: dR's rows and gin's K run in pieces of at
    most 32, so at CHP = 64 a 32 × 64 slab of dR and of R is live instead of 64 × 64 (measured on the AOT
    cover, sm_90: 255 registers and 16-40 B stack per thread before, 226-250 and none after; pieces of 16
    at CHP = 32 spilled 56-88 B, so CHP <= 32 runs whole)."""
    return min(chp, 32)


# The backward's launches ask for ptxas's full 255 registers (.maxnreg): left to itself ptxas capped some
# variants at 96, 128 or 168 registers (2-4 warps) and spilled 8-56 B per thread; with it none spills (AOT
# cover, Triton 3.6 and 3.9, sm_80 and sm_90, 2026-11-30). Not the forward's: there it made a Triton 3.9
# sm_90 CHP = 32 variant spill 24 B (it removed 3.6's 8 B at CHP = 16 on sm_80, not a CI target).
MAXNREG = 255


def phase_stages(b: int) -> int:
    """The most stages one phase holds: (ms + 1)·BR_BWD·b·2^(ms-1)·4 bytes <= PROGRAM_SCRATCH."""
    if MAX_PHASE_STAGES:
        return MAX_PHASE_STAGES
    ms = 1
    while (ms + 2) * BR_BWD * (b << ms) * 4 <= PROGRAM_SCRATCH:
        ms += 1
    return ms


def plan(device, rows: int, n: int, b: int, m: int) -> Plan:
    """Phases: ceil(m / phase_stages(b)) runs of consecutive stages, as even as possible. Chunk rows:
    (phases − 1) · chunk · O · 4 <= WORKING_SET (all rows when there is one phase). Groups: enough row
    groups that groups × sets >= SMs for the phase with the fewest sets, within PARTIAL_BUDGET and the
    chunk's row tiles."""
    k = -(-m // phase_stages(b))
    sizes = [m // k + (1 if p < m % k else 0) for p in range(k)]
    phases = tuple((sum(sizes[:p]), s) for p, s in enumerate(sizes))
    n_min = 1 << (min(sizes) - 1)
    nb = 1
    while nb * 2 * b <= 16 and nb * 2 <= n_min:
        nb *= 2
    chp = next_pow2(nb * b, 16)
    O = n * b
    rows = max(rows, 1)
    chunk = rows if k == 1 else max(BR_FWD, WORKING_SET // ((k - 1) * O * 4) // BR_FWD * BR_FWD)
    chunk = min(chunk, -(-rows // BR_FWD) * BR_FWD)
    sms = launch_sms(device) or FAKE_SMS
    fewest_sets = min(n >> (s - 1) for s in sizes)
    by_memory = max(1, PARTIAL_BUDGET // (m * O * b * 4))
    groups = max(1, min(-(-sms // fewest_sets), triton.cdiv(chunk, BR_BWD), by_memory))
    return Plan(phases, nb, chp, 2 if chp <= 16 else 4 if chp <= 32 else 8, chunk, groups, sms)


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


def _fwd_launch(x3, x_row0, y3, y_row0, rows, r, s, has_s, i0, ms, p: Plan, buf, progs):
    m, n, b, _ = r.shape
    items = triton.cdiv(rows, BR_FWD) * (n >> (ms - 1))
    _phase_fwd_kernel[(min(progs, items),)](
        x3, r, s, y3, buf,
        rows, x_row0, x3.shape[2], y_row0, y3.shape[2],
        n, b, i0, ms, p.NB, 1 << i0, int(has_s),
        *x3.stride(), *y3.stride(),
        BR=BR_FWD, CHP=p.CHP, PRECISION=precision_for(torch.float32), num_warps=fwd_warps(p), num_stages=1,
    )


def fwd_warps(p: Plan) -> int:
    """Warps of a forward phase: 8 (its dots are always fp32 in 3×TF32, whatever the chunk width). Measured on
    the launched variants (all-variant compile): 32-wide chunks at 4 warps held 255 registers and spilled 8-16 B
    per thread on sm_90 under Triton 3.9 (8 warps: 214-235 registers, none); 16-wide chunks spilled 8 B at 2
    warps on sm_80 (3.9 and 3.6) and at 4 warps on sm_90 under Triton 3.6, the GPU image's (8 warps: <= 96
    registers, none on either target or version); issue 20 item 13."""
    return max(p.num_warps, 8)


def _fwd_programs(device, p: Plan, n: int) -> int:
    most = triton.cdiv(p.chunk_rows, BR_FWD) * max(n >> (ms - 1) for _, ms in p.phases)
    return persistent_programs(device, most, per_sm=1)


def butterfly_forward(z: torch.Tensor, r: torch.Tensor, rescale, channel_axis: int) -> torch.Tensor:
    m, n, b, _ = r.shape
    z3 = _as_bos(z, channel_axis)
    B, O, S = z3.shape
    y = torch.empty(z.shape, device=z.device, dtype=z.dtype)
    y3 = _as_bos(y, channel_axis)
    rows = B * S
    if rows == 0:
        return y
    r = r.contiguous()
    p = plan(z.device, rows, n, b, m)
    k = len(p.phases)
    progs = _fwd_programs(z.device, p, n)
    buf = torch.empty(progs, 2, BR_FWD, p.width(b), device=z.device, dtype=torch.float32)
    # Between phases: a ping-pong of chunk-row buffers, (chunk, O, 1) fp32 views.
    tmp = torch.empty(min(k - 1, 2), p.chunk_rows, O, 1, device=z.device, dtype=torch.float32)
    s = rescale.reshape(-1).float() if rescale is not None else r
    for r0 in range(0, rows, p.chunk_rows):
        rc = min(p.chunk_rows, rows - r0)
        for pi, (i0, ms) in enumerate(p.phases):
            src, src_row0 = (z3, r0) if pi == 0 else (tmp[(pi - 1) % 2], 0)
            dst, dst_row0 = (y3, r0) if pi == k - 1 else (tmp[pi % 2], 0)
            _fwd_launch(src, src_row0, dst, dst_row0, rc, r, s, pi == k - 1 and rescale is not None, i0, ms, p,
                        buf, progs)
    return y


def butterfly_backward(grad, z, r, rescale, channel_axis: int, need_z=True, need_r=True, need_s=True):
    """(dz, dr, drescale) of `butterfly_forward`; dr in fp32, drescale (O,) in rescale's dtype. Per row
    chunk: the phases but the last recomputed forward into the chunk buffers, then each phase's backward
    from the last down, each writing its input's gradient over that input. dR/drescale: fp32 partials per
    row group, summed over groups in a fixed order (torch.sum over dim 0) after the last chunk."""
    m, n, b, _ = r.shape
    z3 = _as_bos(z, channel_axis)
    g3 = _as_bos(grad, channel_axis)
    B, O, S = z3.shape
    dz = torch.empty(z.shape, device=z.device, dtype=z.dtype)
    d3 = _as_bos(dz, channel_axis)
    rows = B * S
    r = r.contiguous()
    has_s = rescale is not None
    p = plan(z.device, rows, n, b, m)
    k = len(p.phases)
    dr = torch.zeros(p.groups, m, n, b, b, device=z.device, dtype=torch.float32)
    ds = torch.zeros(p.groups, O, device=z.device, dtype=torch.float32)
    if rows:
        s = rescale.reshape(-1).float() if has_s else r
        f_progs = _fwd_programs(z.device, p, n) if k > 1 else 0
        b_progs = persistent_programs(z.device, p.groups * max(n >> (ms - 1) for _, ms in p.phases), per_sm=1)
        ms_max = max(ms for _, ms in p.phases)
        # One scratch for both kinds of launch (stream-ordered): the recomputing forward's 2 slots of BR_FWD
        # rows per program, the backward's ms + 1 slots of BR_BWD rows.
        slots = max(f_progs * 2 * BR_FWD, b_progs * (ms_max + 1) * BR_BWD)
        buf = torch.empty(slots * p.width(b), device=z.device, dtype=torch.float32)
        tmp = torch.empty(k - 1, p.chunk_rows, O, 1, device=z.device, dtype=torch.float32)
        for r0 in range(0, rows, p.chunk_rows):
            rc = min(p.chunk_rows, rows - r0)
            for pi, (i0, ms) in enumerate(p.phases[:-1]):
                src, src_row0 = (z3, r0) if pi == 0 else (tmp[pi - 1], 0)
                _fwd_launch(src, src_row0, tmp[pi], 0, rc, r, s, False, i0, ms, p, buf, f_progs)
            for pi in reversed(range(k)):
                i0, ms = p.phases[pi]
                x, x_row0 = (z3, r0) if pi == 0 else (tmp[pi - 1], 0)
                g, g_row0 = (g3, r0) if pi == k - 1 else (tmp[pi], 0)
                dx, d_row0 = (d3, r0) if pi == 0 else (tmp[pi - 1], 0)
                last = pi == k - 1
                items = p.groups * (n >> (ms - 1))
                _phase_bwd_kernel[(min(b_progs, items),)](
                    g, x, r, s, dx, dr, ds, buf,
                    rc, g_row0, g.shape[2], x_row0, x.shape[2], d_row0, dx.shape[2],
                    m, n, b, i0, ms, p.NB, 1 << i0, p.groups,
                    *g.stride(), *x.stride(), *dx.stride(),
                    HAS_RESCALE=int(last and has_s), NEED_S=int(last and has_s and need_s),
                    NEED_X=int(need_z) if pi == 0 else 1,
                    BR=BR_BWD, CHP=p.CHP, KC=bwd_piece(p.CHP), PRECISION=precision_for(torch.float32),
                    num_warps=p.num_warps, num_stages=1, maxnreg=MAXNREG,
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
