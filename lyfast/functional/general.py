"""Shared pieces of the functional layer.

* LyCORIS's two factorizations (`factorization` for LoKr, `power2factorization` for BOFT), with the
  exact tie-breaking of lycoris-lora 4.1.3, because they decide parameter shapes and so file layouts.
* `LayerSpec`: what the adapted layer does with a weight (F.linear or F.convNd and its arguments);
  every functional op takes one, so one op serves Linear and Conv1d/2d/3d (groups included).
* `as_bos` and `skew`: the two primitives the CUDA backend's Python side (`lyfast.cuda_ops`) shares
  with this package; it imports them from here and nothing else from `lyfast.functional`, so imports
  run one way (functional → backends).
* `RowBlockDelta`: y = op(x, ΔW) for a ΔW that is *generated* a bounded block of rows at a time and
  never held whole, forward or backward. It is the general route (LoHa at large rank, grouped convs);
  the algorithm files add the structured routes that need no ΔW rows at all.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

# ΔW rows generated at once by RowBlockDelta: at most this fraction of the weight.
MAX_BLOCK_FRACTION = 8


def factorization(dimension: int, factor: int = -1) -> tuple[int, int]:
    """Split `dimension` into (m, n), m <= n, m*n == dimension, as LyCORIS 4.1.3 does.

    With factor > 0 dividing the dimension the split is (factor, dimension // factor) ordered;
    otherwise m grows through divisors while m + n shrinks and m stays <= factor (factor < 0
    means no bound), which lands on the most balanced split.
    """
    if factor > 0 and dimension % factor == 0:
        m, n = factor, dimension // factor
        return (n, m) if m > n else (m, n)
    bound = dimension if factor < 0 else factor
    m, n = 1, dimension
    while m < n:
        cand = m + 1
        while dimension % cand:
            cand += 1
        cand_n = dimension // cand
        if cand + cand_n > m + n or cand > bound:
            break
        m, n = cand, cand_n
    return (n, m) if m > n else (m, n)


def power2factorization(dimension: int, factor: int = -1) -> tuple[int | None, int]:
    """Split `dimension` into (block_size, block_num) with block_num a power of two and
    block_size the largest even number <= factor (factor -1: no bound) that allows it.
    Returns (None, 0) when no such split exists, as LyCORIS 4.1.3 does."""
    bound = dimension if factor == -1 else factor
    best = 0
    size = 0
    while size <= bound:
        size += 2
        while dimension % size and size < dimension:
            size += 2
        if size > bound:
            break
        num = dimension // size
        if num > 0 and num & (num - 1) == 0:
            best = num
    if best == 0:
        return None, 0
    return dimension // best, best


@dataclass(frozen=True)
class LayerSpec:
    """How the adapted layer applies a weight: F.linear (kind "linear") or F.convNd.

    A conv weight is (out, in // groups, *kernel); a linear weight is (out, in). The activation's
    channel axis is the last one for linear and axis 1 for convs.
    """

    kind: str
    out_features: int
    in_features: int  # per group for convs
    kernel_size: tuple[int, ...] = ()
    stride: tuple[int, ...] = ()
    padding: tuple[int, ...] = ()
    dilation: tuple[int, ...] = ()
    groups: int = 1

    @classmethod
    def from_module(cls, module: nn.Module) -> "LayerSpec":
        if isinstance(module, nn.Linear):
            return cls("linear", module.out_features, module.in_features)
        for nd, conv in ((1, nn.Conv1d), (2, nn.Conv2d), (3, nn.Conv3d)):
            if isinstance(module, conv):
                return cls(
                    f"conv{nd}d",
                    module.out_channels,
                    module.in_channels // module.groups,
                    tuple(module.kernel_size),
                    tuple(module.stride),
                    _numeric_padding(module),
                    tuple(module.dilation),
                    module.groups,
                )
        raise ValueError(
            f"{type(module).__name__} is not supported: lyfast adapts nn.Linear and nn.Conv1d/2d/3d"
        )

    @property
    def is_conv(self) -> bool:
        return self.kind != "linear"

    @property
    def weight_shape(self) -> tuple[int, ...]:
        return (self.out_features, self.in_features, *self.kernel_size)

    @property
    def kernel_numel(self) -> int:
        return math.prod(self.kernel_size)

    @property
    def channel_axis(self) -> int:
        return 1 if self.is_conv else -1

    def conv_kwargs(self, groups: int | None = None) -> dict:
        return dict(
            stride=self.stride,
            padding=self.padding,
            dilation=self.dilation,
            groups=self.groups if groups is None else groups,
        )

    def apply(self, x: torch.Tensor, weight: torch.Tensor, groups: int | None = None) -> torch.Tensor:
        """op(x, weight) without bias; `groups` overrides the layer's (row blocks use 1)."""
        if not self.is_conv:
            return F.linear(x, weight)
        conv = (F.conv1d, F.conv2d, F.conv3d)[len(self.kernel_size) - 1]
        return conv(x, weight, None, **self.conv_kwargs(groups))

    def backward(
        self,
        grad: torch.Tensor,
        x: torch.Tensor,
        weight: torch.Tensor,
        need_input: bool,
        need_weight: bool,
        groups: int | None = None,
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(d x, d weight) of `apply(x, weight, groups)` given its output gradient."""
        if not self.is_conv:
            dx = grad @ weight if need_input else None
            dw = grad.reshape(-1, grad.shape[-1]).mT @ x.reshape(-1, x.shape[-1]) if need_weight else None
            return dx, dw
        nd = len(self.kernel_size)
        dx, dw, _ = torch.ops.aten.convolution_backward(
            grad, x, weight, None, list(self.stride), list(self.padding), list(self.dilation),
            False, [0] * nd, self.groups if groups is None else groups,
            [need_input, need_weight, False],
        )
        return dx, dw


def _numeric_padding(conv: nn.Module) -> tuple[int, ...]:
    pad = conv.padding
    if isinstance(pad, str):
        if pad == "valid":
            return (0,) * len(conv.kernel_size)
        total = [d * (k - 1) for d, k in zip(conv.dilation, conv.kernel_size)]
        if any(t % 2 for t in total):
            raise ValueError(
                f"padding='same' with an even effective kernel {conv.kernel_size} pads asymmetrically; "
                "lyfast supports symmetric padding only"
            )
        return tuple(t // 2 for t in total)
    return tuple(pad)


def row_blocks(spec: LayerSpec, max_rows: int | None = None) -> list[tuple[int, int, int, int]]:
    """Row blocks (lo, hi, in_lo, in_hi) covering ΔW's output rows: none crosses a group (so each
    meets one input-channel slice [in_lo, in_hi)) and none holds more than 1/MAX_BLOCK_FRACTION of
    the rows unless a single row already is that much."""
    out, groups = spec.out_features, spec.groups
    per_group = out // groups
    if max_rows is None:
        max_rows = max(1, out // MAX_BLOCK_FRACTION)
    blocks = []
    for g in range(groups):
        in_lo, in_hi = g * spec.in_features, (g + 1) * spec.in_features
        for lo in range(g * per_group, (g + 1) * per_group, max_rows):
            blocks.append((lo, min(lo + max_rows, (g + 1) * per_group), in_lo, in_hi))
    return blocks


def _channel_slice(t: torch.Tensor, spec: LayerSpec, lo: int, hi: int) -> torch.Tensor:
    return t[:, lo:hi] if spec.is_conv else t[..., lo:hi]


class RowGenerator:
    """How RowBlockDelta makes ΔW rows from factors: `rows(lo, hi, *factors)` gives ΔW[lo:hi]
    (flattened per row) and `rows_backward(lo, hi, d_rows, *factors, state=)` the factors' gradients of
    ⟨d_rows, ΔW[lo:hi]⟩ (None where a factor gets none), `state` from `rows_and_state`. Closed forms,
    not autograd.grad, so the backward also traces under torch.compile."""

    @staticmethod
    def rows(lo, hi, *factors):
        raise NotImplementedError

    @staticmethod
    def rows_backward(lo, hi, d_rows, *factors, state=None):
        raise NotImplementedError

    @classmethod
    def rows_and_state(cls, lo, hi, *factors):
        """(ΔW[lo:hi], what `rows_backward` may reuse instead of recomputing it, or None)."""
        return cls.rows(lo, hi, *factors), None


class RowBlockDelta(torch.autograd.Function):
    """y = op(x, ΔW) with ΔW[lo:hi] = gen.rows(lo, hi, *factors) produced one row block at a time;
    `base` + op(x, ΔW) when `base` (a linear layer's output, shaped like y) is given.

    Saves x and the factors only; backward regenerates each block, takes d x and dΔW-block from the
    layer's own backward and maps dΔW-block to the factors with gen.rows_backward. Peak extra
    memory: one block of ΔW (<= 1/8 of the weight) and its gradient.

    Linear layers (groups 1) make no pass beyond the GEMMs' own: each block's product is added in
    place into its column slice of y (a copy of `base`, or zeros) and of dx (`addmm_` writes a strided
    slice without a copy; `mm(out=slice)` copies). The first version concatenated the block outputs,
    added `base` after, and summed 8 full-size block dx's: LoHa r32 on 1280->1280 at 1,024 tokens went
    from 3.13x to 2.95x the frozen layer (fwd+bwd, 2 CPU threads, interleaved); at 2x77 tokens no change.
    """

    @staticmethod
    def forward(ctx, x, spec: LayerSpec, gen: type[RowGenerator], base, *factors):
        blocks = row_blocks(spec)
        ctx.spec, ctx.gen, ctx.blocks = spec, gen, blocks
        ctx.save_for_backward(x, *factors)
        if not spec.is_conv:
            x2 = x.reshape(-1, x.shape[-1])
            rows_out = (x2.shape[0], spec.out_features)
            y = base.reshape(rows_out).clone() if base is not None else x2.new_zeros(rows_out)
            for lo, hi, _, _ in blocks:
                y[:, lo:hi].addmm_(x2, gen.rows(lo, hi, *factors).to(x.dtype).t())
            return y.reshape(*x.shape[:-1], spec.out_features)
        outs = []
        for lo, hi, in_lo, in_hi in blocks:
            rows = gen.rows(lo, hi, *factors).reshape(hi - lo, *spec.weight_shape[1:]).to(x.dtype)
            xs = x if spec.groups == 1 else _channel_slice(x, spec, in_lo, in_hi)
            outs.append(spec.apply(xs, rows, groups=1))
        return torch.cat(outs, dim=spec.channel_axis)

    @staticmethod
    def backward(ctx, grad):
        x, *factors = ctx.saved_tensors
        spec = ctx.spec
        need_x, need_base = ctx.needs_input_grad[0], ctx.needs_input_grad[3]
        need_f = any(ctx.needs_input_grad[4:])
        linear = not spec.is_conv
        dx = None if linear or not need_x else torch.zeros_like(x)
        if linear:
            x2, g2 = x.reshape(-1, x.shape[-1]), grad.reshape(-1, grad.shape[-1])
        dfs: list[torch.Tensor | None] = [None] * len(factors)
        for lo, hi, in_lo, in_hi in ctx.blocks:
            rows, state = ctx.gen.rows_and_state(lo, hi, *factors)
            rows = rows.reshape(hi - lo, *spec.weight_shape[1:])
            if linear:
                gs, rows_x = g2[:, lo:hi], rows.to(x.dtype)
                if need_x:
                    dx = gs @ rows_x if dx is None else dx.addmm_(gs, rows_x)
                # as (x2ᵀ·gs)ᵀ: gsᵀ·x2 on the strided column slice ran at 2.96 ms per 160-row block of a
                # 1280-wide layer at 1,024 tokens, x2ᵀ·gs at 2.19 (the full-width product costs 2.13/8)
                drows = (x2.t() @ gs).t() if need_f else None
            else:
                xs = x if spec.groups == 1 else _channel_slice(x, spec, in_lo, in_hi)
                gs = _channel_slice(grad, spec, lo, hi)
                dxs, drows = spec.backward(gs, xs, rows.to(x.dtype), need_x, need_f, groups=1)
                if need_x:
                    if spec.groups == 1:
                        dx += dxs
                    else:
                        _channel_slice(dx, spec, in_lo, in_hi).add_(dxs)
            if need_f:
                got = ctx.gen.rows_backward(lo, hi, drows.reshape(hi - lo, -1).to(rows.dtype), *factors, state=state)
                dfs = [a if b is None else b if a is None else a + b for a, b in zip(dfs, got)]
        if linear and need_x:
            dx = dx.reshape(x.shape)
        dfs = [d if n else None for d, n in zip(dfs, ctx.needs_input_grad[4:])]
        return (dx, None, None, grad if need_base else None, *dfs)


def row_block_delta(x: torch.Tensor, spec: LayerSpec, gen: type[RowGenerator], factors: Sequence[torch.Tensor],
                    base: torch.Tensor | None = None):
    """`base` + op(x, ΔW) (op(x, ΔW) without `base`) through RowBlockDelta (see there)."""
    fused = None if spec.is_conv else epilogue_base(base, x, spec.out_features)
    return add_base(RowBlockDelta.apply(x, spec, gen, fused, *factors), None if fused is not None else base)


def autocast_inputs(x: torch.Tensor, *tensors):
    """Under autocast, the dtype the adapter computes in (autocast's, as the frozen layer's matmul
    would) with x and the factors cast to it; else x's dtype and the tensors as they are.

    The autograd Functions then run with autocast off: their backward runs outside autocast, so
    mixing bf16 activations with fp32 factors there would fail; the casts here carry the gradients
    back to each factor's own dtype.
    """
    dev = x.device.type
    if x.is_floating_point() and torch.is_autocast_enabled(dev):
        dtype = torch.get_autocast_dtype(dev)
        return dtype, x.to(dtype), [t if t is None else t.to(dtype) for t in tensors]
    return x.dtype, x, list(tensors)


def no_autocast(x: torch.Tensor):
    return torch.autocast(x.device.type, enabled=False)


def add_base(delta: torch.Tensor, base: torch.Tensor | None) -> torch.Tensor:
    """base + ΔW·x (the adapter's output unchanged when there is no base output to add)."""
    return delta if base is None else base + delta


def epilogue_base(base: torch.Tensor | None, x: torch.Tensor, out_features: int) -> torch.Tensor | None:
    """`base` when a linear kernel can add it in its epilogue (x's dtype and device, shape (..., out)
    matching x's tokens), else None (the caller then adds it with `add_base`)."""
    if base is None or base.dtype != x.dtype or base.device != x.device:
        return None
    return base if base.shape == (*x.shape[:-1], out_features) else None


def as_bos(t: torch.Tensor, channel_axis: int) -> torch.Tensor:
    """View t as (batch, O, pixels) with O the channel axis (axis 1 for convs, last for linear)."""
    if channel_axis in (-1, t.dim() - 1):
        return t.reshape(-1, t.shape[-1], 1)
    if channel_axis == 0:
        return t.reshape(1, t.shape[0], -1)
    return t.reshape(t.shape[0], t.shape[1], -1)


def skew(blocks: torch.Tensor, constraint: float = 0.0) -> torch.Tensor:
    """BOFT's Q = blocks − blocksᵀ in at least fp32, norm-clamped to `constraint` if > 0: the input of
    the Cayley transform on every backend."""
    dtype = torch.promote_types(blocks.dtype, torch.float32)
    q = (blocks - blocks.mT).to(dtype)
    if constraint and constraint > 0:
        q_norm = torch.linalg.vector_norm(q) + 1e-8
        q = q * torch.where(q_norm > constraint, constraint / q_norm, torch.ones_like(q_norm))
    return q


def output_row_mask(out: torch.Tensor, mask: torch.Tensor, spec: LayerSpec) -> torch.Tensor:
    """Scale output channels by a per-row mask: op(x, diag(mask)·ΔW) == mask ⊙ op(x, ΔW)."""
    shape = (-1,) + (1,) * len(spec.kernel_size) if spec.is_conv else (-1,)
    return out * mask.to(out.dtype).view(shape)
