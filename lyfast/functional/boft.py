"""BOFT (butterfly orthogonal fine-tuning): W' = diag(rescale) · B_{m-1} ⋯ B_0 · W, applied to the
layer's output, y' = rescale ⊙ B_{m-1}(⋯ B_0(W·x)), never as an O×O or O×I matrix.

`blocks` is LyCORIS's `oft_blocks` (m, n, b, b): m stages of n = O / b Cayley-orthogonal b×b blocks,
R = (I + Q)(I − Q)⁻¹ with Q = blocks − blocksᵀ; with `constraint` > 0 one Frobenius norm over all of Q
is clamped to it. A multiplier s interpolates every stage toward identity: R_s = s·R + (1 − s)·I.

Stage i (k = 2^i·b/2) mixes, inside every chunk of 2k output channels, the channels
c·2k + x·k + t·b/2 + a (x ∈ {0,1}, t < 2^i, a < b/2) of one block (c, t) with block row 2a + x — the
stride permutation of LyCORIS's loop written as a 6-D view, so a stage is one einsum on the
activation and no permuted copy is kept.
"""
from __future__ import annotations

import torch

from .. import backend as _backend
from .general import as_bos, skew


# ----------------------------------------------------------------------------------------------
# Cayley and the per-stage matrices.
# ----------------------------------------------------------------------------------------------
def cayley(blocks: torch.Tensor, constraint: float = 0.0) -> torch.Tensor:
    """R = (I + Q)(I − Q)⁻¹ per block, Q = blocks − blocksᵀ (norm-clamped to `constraint` if > 0).

    Computed in at least fp32 (LyCORIS forces fp32 here; fp64 stays fp64). The clamp is a `where`,
    not a Python branch, so it needs no host sync; values and gradients equal the branch's.
    """
    return Cayley.apply(skew(blocks, constraint))


def _inverse_unpivoted(a: torch.Tensor) -> torch.Tensor:
    """Batched Gauss-Jordan inverse without pivoting, vectorized over the batch.

    Safe for A = I − Q with Q skew-symmetric: xᵀAx = |x|² for every x, a property each Schur
    complement of the elimination inherits, so every pivot is >= 1 and no growth occurs.
    LAPACK's per-matrix calls cost tens of µs each on CPU (measured 0.2–5 s for the 5,120 blocks
    of a 10240-wide SDXL layer, forward plus backward); b vectorized rank-1 updates (one baddbmm
    each) take ~1 ms for the 448 blocks of a 1280-wide layer. Also measured (2 threads, 448 / 2,304 /
    1,024 blocks of 20 / 20 / 24): batched torch.linalg.inv 2.4 / 12.8 / 7.1 ms and a Cholesky inverse of
    I + QᵀQ 1.3 / 6.8 / 4.2 ms against 2.2 / 5.0 / 4.1 ms here; an in-place n×n elimination (one
    rank-1 update a pivot, half the data) 0.90–0.97 of the time with ~1.7× the rounding error.
    """
    shape, n = a.shape, a.shape[-1]
    a = a.reshape(-1, n, n)
    aug = torch.cat([a, torch.eye(n, dtype=a.dtype, device=a.device).expand_as(a)], dim=-1)
    for k in range(n):
        row = aug[:, k : k + 1, :] / aug[:, k : k + 1, k : k + 1]
        aug.baddbmm_(aug[:, :, k : k + 1].clone(), row, alpha=-1)
        aug[:, k : k + 1, :] = row
    return aug[:, :, n:].reshape(shape)


class Cayley(torch.autograd.Function):
    """R = (I − Q)⁻¹(I + Q) for skew-symmetric Q (equal to (I + Q)(I − Q)⁻¹: the factors commute).

    With A = I − Q: R = A⁻¹(2I − A) = 2A⁻¹ − I, so one inverse and no product; backward is
    dQ = A⁻ᵀ·dR·(I + Rᵀ) = ½·(I + R)ᵀ·dR·(I + R)ᵀ. Saves only its output R, which the butterfly
    saves anyway (one storage for both).
    """

    @staticmethod
    def forward(ctx, q):
        eye = torch.eye(q.shape[-1], dtype=q.dtype, device=q.device)
        r = 2 * _inverse_unpivoted(eye - q) - eye
        ctx.save_for_backward(r)
        return r

    @staticmethod
    def backward(ctx, grad):
        (r,) = ctx.saved_tensors
        return cayley_backward(r, grad)


def cayley_solve(blocks: torch.Tensor, constraint: float = 0.0) -> torch.Tensor:
    """`cayley` through torch.linalg.solve: ordinary differentiable ops, for torch.func transforms (the
    `Cayley` Function has no vmap or forward-mode rule)."""
    q = skew(blocks, constraint)
    eye = torch.eye(q.shape[-1], dtype=q.dtype, device=q.device)
    return torch.linalg.solve(eye - q, eye + q)


def cayley_backward(r: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """dQ = ½·(I + R)ᵀ·dR·(I + R)ᵀ from Cayley's output R (every backend's Cayley backward)."""
    p = (r + torch.eye(r.shape[-1], dtype=r.dtype, device=r.device)).mT
    return 0.5 * (p @ grad @ p)


def stage_matrices(
    blocks: torch.Tensor, constraint: float = 0.0, scale: float = 1.0, cayley_fn=None
) -> torch.Tensor:
    """The (m, n, b, b) matrices the stages apply: Cayley R interpolated toward I by `scale`.
    `cayley_fn` replaces `cayley` (same contract; the Triton or CUDA backend's one-launch batched solve)."""
    r = (cayley_fn or cayley)(blocks, constraint)
    if scale != 1:
        eye = torch.eye(r.shape[-1], dtype=r.dtype, device=r.device)
        r = r * scale + (1 - scale) * eye
    return r


# ----------------------------------------------------------------------------------------------
# Reference: LyCORIS's loop of explicit permutations, used by tests and merge.
# ----------------------------------------------------------------------------------------------
def butterfly_reference(y: torch.Tensor, r: torch.Tensor, rescale=None, channel_axis: int = -1):
    """rescale ⊙ B_{m-1}(⋯B_0(y)) on `channel_axis` with explicit stride permutations."""
    m, _, b, _ = r.shape
    h = y.movedim(channel_axis, -1).to(r.dtype)
    for i in range(m):
        k = 2**i * (b // 2)
        h = h.unflatten(-1, (-1, 2, k)).transpose(-2, -1).flatten(-3).unflatten(-1, (-1, b))
        h = torch.einsum("nij,...nj->...ni", r[i], h)
        h = h.flatten(-2).unflatten(-1, (-1, k, 2)).transpose(-2, -1).flatten(-3)
    if rescale is not None:
        h = h * rescale.reshape(-1)
    return h.movedim(-1, channel_axis)


def rotate_weight(weight: torch.Tensor, r: torch.Tensor, rescale=None) -> torch.Tensor:
    """W' = diag(rescale) · B_{m-1}⋯B_0 · W (output channels on dim 0), in r's dtype: for merging."""
    h = _apply_stages(weight.to(r.dtype).reshape(weight.shape[0], -1), r)
    if rescale is not None:
        h = h * rescale.to(r.dtype).reshape(-1, 1)
    return h.reshape(weight.shape)


# ----------------------------------------------------------------------------------------------
# Stages in a channel-major block layout.
#
# The activation is held channel-major, (O, M) with M = tokens·pixels, and between passes in the
# *block layout* of the next pass, (blocks, rows, M). A pass is then one bmm with its (permuted)
# block matrices, and moving from one pass's output to the next pass's input is one permute-copy.
# Measured on 2 CPU threads (77 tokens, 1280 channels, b = 20): 50–75 µs a stage, against 140 µs
# for an einsum on the (tokens, channels) layout, which copies both ways.
#
# Whole-activation passes are memory-bound at 1,024 tokens (a 21 MB pass of 640→5120 reads and writes
# DRAM: ~6.8 ms a 2b-block bmm and ~4 ms a permute-copy, against 2.9 and 0.35 ms when cached), yet three
# ways around that measured no faster (2 threads, fp32, fwd+bwd through the module, interleaved):
# - the passes run column chunk by column chunk (2–10 MiB, the layer's bias folded into the chunks'
#   copies) so each chunk stays in cache: 1.07 / 1.16 / 1.00 / 1.06× the time of whole passes on
#   1280² / 640→5120 / conv3×3 640 / 3072². The bmm on 102 columns ran at half the rate
#   (0.81 ms a call for a tenth of the work) and the chunks' 6-D copies move short runs;
# - a fused Linear + butterfly taking z channel-major from the base GEMM itself (W·xᵀ, and dx = dzᵀ·W),
#   which saves the transposes of z and dz: 1.04 / 0.99 / 1.00× on 640→5120 / 1280² / 3072² once its
#   output is made contiguous (downstream `.view`s need that);
# - two reused buffers per sweep (bmm out= and copies into them) instead of fresh tensors each pass:
#   0.97–1.02×. Run-to-run spread comes from glibc instead: with MALLOC_MMAP_THRESHOLD_=32 MiB and
#   trimming off, BOFT on 1280² measured 1.64× the frozen layer against 1.88× in a default run;
# - fewer, larger passes end to end (group matrices built for any grouping, fwd+bwd through F.linear
#   at 1,024 tokens, × the frozen layer): pairs 2.97 / 1.87 / 1.47, triples 2.95 / 1.99 / 1.52, quads
#   3.33 / 2.14 / 1.63 on 640→5120 / 1280² / 3072²; at 154 tokens on 1280², 3.5 / 4.2 / 4.7.
# ----------------------------------------------------------------------------------------------
def _to_channel_major(t: torch.Tensor, channel_axis: int) -> torch.Tensor:
    bos = as_bos(t, channel_axis)
    return bos.permute(1, 0, 2).reshape(bos.shape[1], -1)


def _from_channel_major(h: torch.Tensor, like: torch.Tensor, channel_axis: int) -> torch.Tensor:
    # Kept as two copies after the last pass (back to channel order, then this transpose): one 6-D
    # permute-copy straight to (n, O, s) reads M-strided and measured 1.04-1.07x slower end to end on
    # BOFT b32 at 1,024 tokens (2 CPU threads); torch's 2-D transpose copy is blocked.
    bos = as_bos(like, channel_axis)
    return h.reshape(bos.shape[1], bos.shape[0], bos.shape[2]).permute(1, 0, 2).reshape(like.shape)


def _block_mats(r: torch.Tensor, inverse: bool = False) -> torch.Tensor:
    """Stage matrices with rows and columns ordered (pair index, half-block index) instead of
    LyCORIS's interleaved 2·(b/2-index) + pair index; `inverse` maps back (for gradients)."""
    *lead, b, _ = r.shape
    h = b // 2
    dims = (2, h, 2, h) if inverse else (h, 2, h, 2)
    return r.reshape(*lead, *dims).transpose(-4, -3).transpose(-2, -1).reshape(r.shape)


# Stage groups. Write a channel as (c, q, a): a < b/2, q a binary number whose digit i is the pair index
# x of stage i. Stage i mixes (digit i, a) for every value of the other digits; stages i and i+1
# together mix (digits i+1, i, a), so their product is ONE block-diagonal stage of n/2 blocks of 2b
# channels — the same multiply-adds as the two (2b per channel either way) in one pass over the
# activation instead of two (one bmm and one permute-copy fewer). Three stages would cost 4b instead of
# 3b multiply-adds per channel.
# Cost rule (`stage_groups`): pairs (i, i+1) from stage 0 on, with the last stage alone when m is odd;
# never triples. A pass is a bmm plus a permute-copy of the activation: on 1024 tokens × 5120 channels
# (b = 20, 9 stages → 5 passes) a 2b-block bmm took 11 ms (≈ the large GEMMs' rate) and a permute-copy
# 2 ms (1 CPU thread, minima); fwd+bwd of the whole adapter went from 3.6× to 2.6× the frozen layer
# (2 threads, together with folding rescale into the last pass below). Triples measured slower too
# (2 threads, 1024 tokens × 5120 channels, b = 20, minima): the channel-major bmm took 3.16 ms at
# 2b = 40 (two stages: 1.58 ms a stage) and 5.67 ms at 4b = 80 (three stages: 1.89 ms a stage).
#
# The group starting at stage i with j stages (block size B = 2^(j-1)·b) holds the activation
# channel-major as (blocks, B, M) with block (c, t) = (digits above i+j, digits below i) and rows
# (digits i+j-1 … i, a): the view (C, 2^j, 2^i, b/2, M) of the (O, M) channel order with its axes 1
# and 2 swapped.
def stage_groups(m: int) -> list[tuple[int, int]]:
    """(first stage, number of stages) of each pass: pairs, and the last stage alone when m is odd."""
    return [(i, min(2, m - i)) for i in range(0, m, 2)]


def _pair(low: torch.Tensor, high: torch.Tensor, i: int) -> torch.Tensor:
    """Stages i (`low`) and i+1 (`high`), block matrices (n, b, b) in (x, a) order, as one stage of
    n/2 blocks (2b, 2b), rows (x', x, a): M = S_{i+1}·S_i."""
    n, b, _ = low.shape
    h, t = b // 2, 2**i
    lo = low.reshape(n // (2 * t), 2, t, 2, h, 2, h)  # (c, x', t | x, a | z, a3)
    hi = high.reshape(n // (2 * t), 2, t, 2, h, 2, h)  # (c, x, t | x', a | z', a2)
    return torch.einsum("cxtpaqe,cqtxezd->ctpxaqzd", hi, lo).reshape(n // 2, 2 * b, 2 * b)


def _pair_backward(dm: torch.Tensor, low: torch.Tensor, high: torch.Tensor, i: int):
    """Gradients of `_pair`'s two inputs from the merged stage's gradient dm."""
    n, b, _ = low.shape
    h, t = b // 2, 2**i
    lo = low.reshape(n // (2 * t), 2, t, 2, h, 2, h)
    hi = high.reshape(n // (2 * t), 2, t, 2, h, 2, h)
    dm = dm.reshape(n // (2 * t), t, 2, 2, h, 2, 2, h)
    d_hi = torch.einsum("ctpxaqzd,cqtxezd->cxtpaqe", dm, lo)
    d_lo = torch.einsum("ctpxaqzd,cxtpaqe->cqtxezd", dm, hi)
    return d_lo.reshape(low.shape), d_hi.reshape(high.shape)


def _group_mats(rp: torch.Tensor, groups) -> list[torch.Tensor]:
    return [rp[i] if j == 1 else _pair(rp[i], rp[i + 1], i) for i, j in groups]


def _relayout(h: torch.Tensor, i: int, j: int, b: int, to_blocks: bool) -> torch.Tensor:
    """(O, M) channel order ↔ the layout of the group (i, j), as a (blocks, B, M) view or copy."""
    o, m = h.numel() // h.shape[-1], h.shape[-1]
    t, g = 2**i, 2**j
    dims = (o // (g * t * (b // 2)), g, t) if to_blocks else (o // (g * t * (b // 2)), t, g)
    out = h.reshape(*dims, b // 2, m).transpose(1, 2)
    return out.reshape(o // (g * b // 2), g * b // 2, m) if to_blocks else out.reshape(o, m)


def _next_group(out: torch.Tensor, i: int, j: int, j_next: int, b: int) -> torch.Tensor:
    """Group (i, j)'s output as group (i+j, j_next)'s input layout (and back: self-inverse in that
    the same call maps the second's layout to the first's with j and j_next swapped)."""
    nb, bb, m = out.shape
    o = nb * bb
    t, g, g2 = 2**i, 2**j, 2**j_next
    v = out.reshape(o // (g2 * t * g * (b // 2)), g2, t, g, b // 2, m).permute(0, 3, 2, 1, 4, 5)
    return v.reshape(o // (g2 * b // 2), g2 * b // 2, m)


def _apply_groups(h: torch.Tensor, mats, groups, b: int, inputs_only: bool = False):
    """The grouped stages applied to channel-major h (O, M); with inputs_only, the passes' inputs in
    their layouts instead (the last pass itself is not run)."""
    cur = _relayout(h, *groups[0], b, to_blocks=True)
    inputs = []
    for k, ((i, j), mat) in enumerate(zip(groups, mats)):
        if inputs_only:
            inputs.append(cur)
            if k + 1 == len(groups):
                return inputs
        out = torch.bmm(mat, cur)
        cur = _next_group(out, i, j, groups[k + 1][1], b) if k + 1 < len(groups) else out
    return _relayout(cur, *groups[-1], b, to_blocks=False)


def _apply_stages(h: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """B_{m-1}⋯B_0 applied to channel-major h (O, M)."""
    groups = stage_groups(r.shape[0])
    return _apply_groups(h, _group_mats(_block_mats(r), groups), groups, r.shape[2])


def _pass_mats(r: torch.Tensor, rescale):
    """(groups, block matrices in (x, a) order, each pass's matrices, the last pass's matrices before
    rescale, rescale in the last pass's row layout or None). rescale, a diagonal after the last
    stage, is folded into the rows of the last pass's matrices: no pass over the activation of its
    own, forward or backward (it took 2 of them, plus a recomputed last pass, in backward)."""
    groups = stage_groups(r.shape[0])
    rp = _block_mats(r)
    mats = _group_mats(rp, groups)
    plain_last, s_rows = mats[-1], None
    if rescale is not None:
        s_rows = _relayout(rescale.to(r.dtype).reshape(-1, 1), *groups[-1], r.shape[2], to_blocks=True)
        mats[-1] = plain_last * s_rows
    return groups, rp, mats, plain_last, s_rows


class Butterfly(torch.autograd.Function):
    """out = rescale ⊙ B_{m-1}(⋯B_0(z)) on z's channel axis, in passes of `stage_groups`.

    Saves z (one activation) and the small stage matrices; backward recomputes the passes' inputs
    from z in one forward sweep (held only during backward) rather than keeping them from forward.
    Computes in the stage matrices' dtype (≥ fp32) and returns z's dtype.
    """

    @staticmethod
    def forward(ctx, z, r, rescale, channel_axis: int):
        groups, _, mats, _, _ = _pass_mats(r, rescale)
        h = _apply_groups(_to_channel_major(z.to(r.dtype), channel_axis), mats, groups, r.shape[2])
        ctx.channel_axis = channel_axis
        ctx.save_for_backward(z, r, rescale)
        return _from_channel_major(h, z, channel_axis).to(z.dtype)

    @staticmethod
    def backward(ctx, grad):
        z, r, rescale = ctx.saved_tensors
        b = r.shape[2]
        axis = ctx.channel_axis
        need_z, need_r, need_s = ctx.needs_input_grad[:3]
        need_s = need_s and rescale is not None
        groups, rp, mats, plain_last, s_rows = _pass_mats(r, rescale)
        inputs = _apply_groups(_to_channel_major(z.to(r.dtype), axis), mats, groups, b, inputs_only=True)
        g = _relayout(_to_channel_major(grad.to(r.dtype), axis), *groups[-1], b, to_blocks=True)
        drp = torch.empty_like(rp) if need_r else None
        d_rescale = None
        for k in reversed(range(len(groups))):
            i, j = groups[k]
            last = k + 1 == len(groups)
            if need_r or (last and need_s):
                dm = torch.bmm(g, inputs[k].mT)
                if last and s_rows is not None:  # mats[-1] = s_rows ⊙ M: dM = s_rows ⊙ dm, ds = Σ_col dm ⊙ M
                    if need_s:
                        d_rescale = _relayout((dm * plain_last).sum(-1, keepdim=True), i, j, b, to_blocks=False)
                    dm = dm * s_rows
                if need_r:
                    if j == 1:
                        drp[i] = dm
                    else:
                        drp[i], drp[i + 1] = _pair_backward(dm, rp[i], rp[i + 1], i)
            inputs[k] = None  # free as we go
            if k == 0 and not need_z:
                break
            g = torch.bmm(mats[k].mT, g)
            if k > 0:
                g = _next_group(g, groups[k - 1][0], j, groups[k - 1][1], b)
        dz = None
        if need_z:
            dz = _from_channel_major(_relayout(g, *groups[0], b, to_blocks=False), z, axis).to(z.dtype)
        if d_rescale is not None:
            d_rescale = d_rescale.reshape(rescale.shape).to(rescale.dtype)
        return dz, _block_mats(drp, inverse=True) if need_r else None, d_rescale, None


# ----------------------------------------------------------------------------------------------
# Public op.
# ----------------------------------------------------------------------------------------------
def rotate(z, blocks, rescale=None, constraint=0.0, scale=1.0, *, channel_axis: int = -1, backend=None):
    """rescale ⊙ B_{m-1}(⋯B_0(z)) with the stages built from `blocks` (see module docstring).
    `backend` overrides `lyfast.set_backend` for this call (see `lyfast.backend`). Runs with autocast
    off: the Cayley solve and the stages compute in >= fp32 and return z's dtype."""
    with torch.autocast(z.device.type, enabled=False):
        return _rotate(z, blocks, rescale, constraint, scale, channel_axis, backend)


def _rotate(z, blocks, rescale, constraint, scale, channel_axis, backend):
    if _backend.transform_active():  # torch.func: the reference's ordinary ops, which transforms batch
        r = stage_matrices(blocks, constraint, scale, cayley_solve)
        return butterfly_reference(z, r, rescale, channel_axis).to(z.dtype)
    backend = _backend.resolve(z.device, "boft", backend)
    cuda_ops = None
    cayley_fn = None
    if backend == _backend.Backend.CUDA:
        from lyfast import cuda_ops  # lyfast::cuda_boft_*, cuda_cayley; resolve() loaded the kernels

        cayley_fn = cuda_ops.cayley if cuda_ops.cayley_supported(blocks) else None
    elif backend == _backend.Backend.TRITON:
        from lyfast.kernels import boft as triton_boft  # imports triton and registers lyfast::boft_*

        cayley_fn = triton_boft.cayley if triton_boft.cayley_supported(blocks) else None
    r = stage_matrices(blocks, constraint, scale, cayley_fn)
    m, n, b, _ = r.shape
    channels = z.shape[channel_axis]
    if n * b != channels or b % 2 or n & (n - 1) or 2 ** (m - 1) > n:
        raise ValueError(
            f"BOFT blocks of shape {tuple(blocks.shape)} do not fit {channels} channels "
            "(need n·b == channels, b even, n a power of two, 2^(m-1) <= n)"
        )
    if backend == _backend.Backend.TRITON:
        if triton_boft.supports(z, r, rescale, channel_axis):
            return torch.ops.lyfast.boft_fwd(z, r, rescale, channel_axis)
    if cuda_ops is not None and cuda_ops.boft_supported(z, r):
        return cuda_ops.butterfly(z, r, rescale, channel_axis)
    return Butterfly.apply(z, r, rescale, channel_axis)
