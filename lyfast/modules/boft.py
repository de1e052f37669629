"""ButterflyOFTModule: LyCORIS 4.1.3's BOFT (`name = "boft"`) with its parameters, file format and
numbers; training rotates the base layer's output with `lyfast.functional.boft.rotate`, never an
O×O rotation or an O×I weight.

Both modes rotate the weight only, y = rescale ⊙ R(W·x) + bias = rotate(base − bias) + bias: rebuild as in
LyCORIS, bypass unlike LyCORIS 4.1.3 (which rotates the bias too, so its bypass model is not the model its
file describes). Bypass differs from rebuild in how it gets W·x: from the wrapped forward's output.
"""
from __future__ import annotations

import logging
import warnings

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from ..functional import boft
from ..functional.general import power2factorization
from .base import LycorisModule, batched_input, max_norm_ratio

logger = logging.getLogger("lyfast")


def butterfly_factor(dimension: int, factor: int = -1) -> tuple[int, int]:
    """(block_size, block_num) of LyCORIS's BOFT factorization, or a ValueError naming the width."""
    size, num = power2factorization(dimension, factor)
    if num == 0:
        raise ValueError(
            f"BOFT cannot split {dimension} channels with lora_dim (max block size) {factor}: it needs "
            f"an even block size <= {factor} with {dimension} / block size a power of two"
        )
    return size, num


class ButterflyOFTModule(LycorisModule):
    name = "boft"
    algo_title = "BOFT"
    weight_list = ["oft_blocks", "rescale", "alpha"]
    weight_list_det = ["oft_blocks"]

    def __init__(
        self,
        lora_name,
        org_module: nn.Module,
        multiplier=1.0,
        lora_dim=4,
        alpha=1,
        dropout=0.0,
        rank_dropout=0.0,
        module_dropout=0.0,
        use_tucker=False,
        use_scalar=False,
        rank_dropout_scale=False,
        constraint=0,
        rescaled=False,
        bypass_mode=None,
        **kwargs,
    ):
        super().__init__(
            lora_name, org_module, multiplier, dropout, rank_dropout, module_dropout,
            rank_dropout_scale, bypass_mode,
        )
        out_dim = self.dim
        try:
            b, n = butterfly_factor(out_dim, lora_dim)
        except ValueError as exc:
            raise ValueError(f"{lora_name} ({type(org_module).__name__} with {out_dim} outputs): {exc}") from None
        self.block_size = self.boft_b = b
        self.block_num = n
        self.boft_m = n.bit_length()  # log2(n) + 1 stages
        self.rescaled = rescaled
        self.constraint = constraint * out_dim
        self.register_buffer("alpha", torch.tensor(constraint))
        self.oft_blocks = nn.Parameter(torch.zeros(self.boft_m, n, b, b))
        if rescaled:
            self.rescale = nn.Parameter(torch.ones(out_dim, *(1,) * (org_module.weight.dim() - 1)))

    # ------------------------------------------------------------------ files
    @classmethod
    def algo_check(cls, state_dict, lora_name):
        blocks = state_dict.get(f"{lora_name}.oft_blocks")
        return blocks is not None and blocks.ndim == 4

    @classmethod
    @torch.no_grad()
    def make_module_from_state_dict(cls, lora_name, orig_module, oft_blocks, rescale, alpha):
        if oft_blocks is None or oft_blocks.ndim != 4:
            raise ValueError(f"{lora_name}.oft_blocks must be 4-D (m, n, b, b) for BOFT")
        if alpha is None:
            raise ValueError(f"BOFT weights for {lora_name} lack {lora_name}.alpha (the constraint)")
        module = cls(lora_name, orig_module, 1, lora_dim=oft_blocks.shape[2], constraint=float(alpha),
                     rescaled=rescale is not None)
        tensors = {"oft_blocks": oft_blocks} | ({"rescale": rescale} if rescale is not None else {})
        module._copy_loaded(tensors)
        return module

    # ------------------------------------------------------------------ math
    def _rescale(self, multiplier=1.0):
        """`rescale` interpolated toward 1 by the multiplier, as the rotation is toward I, so multiplier 0
        is the frozen layer (LyCORIS 4.1.3 applies the full rescale at every multiplier)."""
        if not self.rescaled:
            return None
        return self.rescale if multiplier == 1 else 1 + (self.rescale - 1) * multiplier

    def _rotate(self, z, multiplier):
        axis = 1 if self.spec.is_conv else -1
        return boft.rotate(z, self.oft_blocks, self._rescale(multiplier), self.constraint, multiplier, channel_axis=axis)

    def _bias_view(self, bias):
        return bias.view(-1, *(1,) * len(self.spec.kernel_size)) if self.spec.is_conv else bias

    @batched_input
    def bypass_forward_diff(self, x, scale=1):
        base = self.org_forward(x)
        if x.numel() == 0:
            return self._empty_output(torch.zeros_like(base))
        return self._rotate_weight_part(base, scale) - base

    @batched_input
    def forward(self, x, *args, **kwargs):
        if self._module_dropped():
            return self.org_forward(x, *args, **kwargs)
        if x.numel() == 0:
            return self._empty_output(self.org_forward(x, *args, **kwargs))
        if self.bypass_mode:
            return self._rotate_weight_part(self.org_forward(x), self.multiplier)
        base = self.org_forward(x, *args, **kwargs)
        if self.spec.groups > 1:
            return base + checkpoint(self._grouped_rebuild_delta, self._padded(x), self.multiplier,
                                     use_reentrant=False)
        if not self._wraps_base_layer():
            # Another adapter sits below: rebuild adds (W' − W)·x to *its* output, so W·x is needed
            # on its own (one more base product) rather than rotating the lower adapter's delta.
            plain = self.spec.apply(self._padded(x), self._current_weight().to(x.dtype))
            return base + (self._rotate(plain, self.multiplier) - plain)
        return self._rotate_weight_part(base, self.multiplier)

    def _rotate_weight_part(self, base, multiplier):
        """R(base − bias) + bias: the rotation acts on W·x, the layer's bias passes unrotated, in both modes,
        so bypass and rebuild are one model and a merged (weight-only) layer equals either. LyCORIS 4.1.3's
        bypass rotates the bias too, so a model trained in bypass differs from its file reloaded."""
        bias = getattr(self.org_module[0], "bias", None)
        if bias is None:
            return self._rotate(base, multiplier)
        # Not detached: base carries the bias, so its gradient reaches the bias rotated (Rᵀg); the
        # subtraction takes that back and the addition gives the bias its own g.
        bias = self._bias_view(bias.to(base.dtype))
        return self._rotate(base - bias, multiplier) + bias

    def _grouped_rebuild_delta(self, x, multiplier):
        """(W' − W)·x for a grouped conv without W': rows of W' mix output channels across groups
        while each row still meets only its own group's input, so every group's input is
        convolved with all rows of W, rotated, and the group's own rows kept. Costs `groups` base
        convs; run under checkpoint so only x is saved."""
        g, n = self.spec.groups, x.shape[0]
        weight = self._current_weight().to(x.dtype)
        every = self.spec.apply(x.reshape(n * g, -1, *x.shape[2:]), weight, groups=1)  # (n·g, O, ...)
        delta = self._rotate(every, multiplier) - every
        delta = delta.reshape(n, g, g, self.dim // g, *delta.shape[2:])
        own = torch.diagonal(delta, dim1=1, dim2=2).movedim(-1, 1)  # (n, g, O/g, ...)
        return own.reshape(n, self.dim, *own.shape[3:])

    def get_r(self):
        """The Cayley rotations (m, n, b, b) (LyCORIS's get_r)."""
        return boft.cayley(self.oft_blocks, self.constraint)

    def delta_weight(self, multiplier=1.0, dtype=None):
        blocks = self.oft_blocks if dtype is None else self.oft_blocks.to(dtype)
        r = boft.stage_matrices(blocks, self.constraint, multiplier)
        w = self.org_weight.detach()
        rescale = self._rescale(multiplier)
        rotated = boft.rotate_weight(w, r, None if rescale is None else rescale.to(r.dtype))
        return (rotated - w.to(r.dtype)).to(blocks.dtype)

    def merge_to(self, multiplier=1.0, *, precise: bool = False):
        """As LycorisModule.merge_to (the rebuild-mode weight R·W). Warns in bypass mode on a grouped conv:
        there bypass rotates the output across groups, which no grouped weight can express, so the merged
        layer is the rebuild-mode model, not the bypass one (the same holds in LyCORIS 4.1.3)."""
        if self.bypass_mode and self.spec.groups > 1:
            warnings.warn(
                f"{self.lora_name}: BOFT bypass mode on a grouped conv (groups={self.spec.groups}) rotates the "
                "output across groups, which a grouped weight cannot hold; merge_to merges the rebuild-mode "
                "model instead, so the merged layer differs from the bypass forward",
                stacklevel=2,
            )
        super().merge_to(multiplier, precise=precise)

    def get_merged_weight(self, multiplier=1.0, shape=None, device=None):
        diff, _ = self.get_diff_weight(multiplier, shape, device)
        w = self.org_weight if device is None else self.org_weight.to(device)
        return (w.to(diff.dtype) + diff).to(self.oft_blocks.dtype), None

    @torch.no_grad()
    def apply_max_norm(self, max_norm, device=None):
        orig_norm = self.oft_blocks.to(device).norm()
        scaled, ratio = max_norm_ratio(orig_norm, max_norm)
        if scaled:
            self.oft_blocks *= ratio.to(self.oft_blocks.device)
        return scaled, orig_norm * ratio
