"""LohaModule: LyCORIS 4.1.3's LoHa (`name = "loha"`) with its parameters, file format and numbers;
training goes through `lyfast.functional.loha.delta_forward`, which never builds ΔW."""
from __future__ import annotations

import torch
import torch.nn as nn

from .. import backend as _backend
from ..functional import dora, loha
from ..functional.general import add_base, output_row_mask
from .base import DeltaModule, check_rank, dora_kwargs, max_norm_ratio, warn_dropout_rebuild


class LohaModule(DeltaModule):
    name = "loha"
    algo_title = "LoHa"
    weight_list = ["hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2", "alpha", "dora_scale"]
    weight_list_det = ["hada_w1_a"]

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
        weight_decompose=False,
        wd_on_out=True,
        bypass_mode=None,
        rs_lora=False,
        **kwargs,
    ):
        lora_dim = check_rank(lora_dim, "LoHa")
        super().__init__(
            lora_name, org_module, multiplier, dropout, rank_dropout, module_dropout,
            rank_dropout_scale, bypass_mode,
        )
        self.lora_dim = lora_dim
        self.rs_lora = rs_lora
        self.route = "auto"  # LoHa route: "auto" | "khatri_rao" | "rowblock" | "tile" (functional.loha)
        out_dim, in_dim, *k_size = self.shape
        self.tucker = bool(use_tucker) and any(k != 1 for k in k_size)
        if self.tucker:
            self.hada_t1 = nn.Parameter(torch.empty(lora_dim, lora_dim, *k_size))
            self.hada_w1_a = nn.Parameter(torch.empty(lora_dim, out_dim))
            self.hada_w1_b = nn.Parameter(torch.empty(lora_dim, in_dim))
            self.hada_t2 = nn.Parameter(torch.empty(lora_dim, lora_dim, *k_size))
            self.hada_w2_a = nn.Parameter(torch.empty(lora_dim, out_dim))
            self.hada_w2_b = nn.Parameter(torch.empty(lora_dim, in_dim))
        else:
            flat_in = in_dim * self.spec.kernel_numel
            self.hada_w1_a = nn.Parameter(torch.empty(out_dim, lora_dim))
            self.hada_w1_b = nn.Parameter(torch.empty(lora_dim, flat_in))
            self.hada_w2_a = nn.Parameter(torch.empty(out_dim, lora_dim))
            self.hada_w2_b = nn.Parameter(torch.empty(lora_dim, flat_in))
        self._init_dora(weight_decompose, wd_on_out)
        warn_dropout_rebuild(dropout)

        self._init_scale(alpha, lora_dim, rs_lora, use_scalar)

        # LyCORIS's initialization, in its order, so one seed gives the same factors.
        if self.tucker:
            nn.init.normal_(self.hada_t1, std=0.1)
            nn.init.normal_(self.hada_t2, std=0.1)
        nn.init.normal_(self.hada_w1_b, std=1)
        nn.init.normal_(self.hada_w1_a, std=0.1)
        nn.init.normal_(self.hada_w2_b, std=1)
        if use_scalar:
            nn.init.normal_(self.hada_w2_a, std=0.1)
        else:
            nn.init.constant_(self.hada_w2_a, 0)

    # ------------------------------------------------------------------ files
    @classmethod
    @torch.no_grad()
    def make_module_from_state_dict(cls, lora_name, orig_module, w1a, w1b, w2a, w2b, t1, t2, alpha, dora_scale):
        for key, value in (("hada_w1_a", w1a), ("hada_w1_b", w1b), ("hada_w2_a", w2a), ("hada_w2_b", w2b)):
            if value is None:
                raise ValueError(f"LoHa weights for {lora_name} lack {lora_name}.{key}")
        if alpha is None:
            raise ValueError(f"LoHa weights for {lora_name} lack {lora_name}.alpha")
        if (t1 is None) != (t2 is None):
            raise ValueError(f"LoHa weights for {lora_name} have only one of hada_t1 / hada_t2")
        module = cls(
            lora_name, orig_module, 1, w1b.size(0), float(alpha), use_tucker=t1 is not None,
            **dora_kwargs(lora_name, orig_module, dora_scale),
        )
        if t1 is not None and not module.tucker:
            raise ValueError(f"{lora_name}.hada_t1 given but {type(orig_module).__name__} has no k>1 kernel")
        tensors = {"hada_w1_a": w1a, "hada_w1_b": w1b, "hada_w2_a": w2a, "hada_w2_b": w2b}
        if t1 is not None:
            tensors |= {"hada_t1": t1, "hada_t2": t2}
        if dora_scale is not None:
            tensors["dora_scale"] = dora_scale
        module._copy_loaded(tensors)
        return module

    def custom_state_dict(self):
        out = {"alpha": self.alpha}
        if self.wd:
            out["dora_scale"] = self.dora_scale
        out["hada_w1_a"] = self.hada_w1_a * self.scalar
        out |= {"hada_w1_b": self.hada_w1_b, "hada_w2_a": self.hada_w2_a, "hada_w2_b": self.hada_w2_b}
        if self.tucker:
            out |= {"hada_t1": self.hada_t1, "hada_t2": self.hada_t2}
        return out

    # ------------------------------------------------------------------ math
    def _factors(self, like=None):
        """(w1a, w1b, w2a, w2b, t1, t2), cast with `.to(like)` when given (a tensor or a dtype)."""
        ws = [self.hada_w1_a, self.hada_w1_b, self.hada_w2_a, self.hada_w2_b]
        ws += [self.hada_t1, self.hada_t2] if self.tucker else [None, None]
        return [w if w is None or like is None else w.to(like) for w in ws]

    def _delta(self, x, multiplier, bypass: bool, base=None):
        scale = self.scalar.to(x) * (self.scale * multiplier)
        masked = self.training and self.rank_dropout
        fuse = base if not (bypass or masked) else None
        y = loha.delta_forward(x, *self._factors(x), scale=scale, spec=self.spec, route=self.route, base=fuse)
        if fuse is not None:
            return y
        if masked:
            y = output_row_mask(y, self._rank_dropout_mask(y.dtype), self.spec)
        return add_base(self.drop(y) if bypass else y, base)

    def _linear_forward(self, x, weight, bias, scale):
        """Through `loha.linear_forward`, which resolves the backend once for the call: on Triton one op (the
        tile-generation GEMM when the cost model picks it); on the PyTorch Khatri-Rao route the layer inside
        `KhatriRaoDelta`; elsewhere F.linear + ΔW·x."""
        return loha.linear_forward(x, weight, bias, *self._factors(x)[:4], scale=scale, route=self.route)

    def get_weight(self, shape=None):
        """ΔW·α/r (without scalar and multiplier), like LyCORIS's get_weight. Builds ΔW."""
        w = loha.diff_weight(*self._factors(), scale=self.scale)
        return w.reshape(self.shape if shape is None else shape)

    def _diff_weight(self, scale, dtype=None):
        factors = self._factors(dtype)
        return loha.diff_weight(*factors, scale=self.scalar.to(factors[0].dtype) * scale).reshape(self.shape)

    def _dora_norms(self, weight, row_scale):
        w1a, w1b, w2a, w2b, t1, t2 = self._factors()
        a1, b1 = loha.canonical_factors(w1a, w1b, t1)
        a2, b2 = loha.canonical_factors(w2a, w2b, t2)
        a1 = a1 * (self.scalar * self.scale)
        return dora.hada_norms_sq(weight, self.spec, a1, b1, a2, b2, self.wd_on_out, self.dora_scale.dtype, row_scale)

    def _dora_delta(self, x):
        scale = self.scalar.to(x) * self.scale
        return loha.delta_forward(
            x, *self._factors(x), scale=scale, spec=self.spec, route=self.route, backend=_backend.Backend.TORCH
        )

    @torch.no_grad()
    def apply_max_norm(self, max_norm, device=None):
        """Scale `scalar` so ‖ΔW‖ <= max_norm (LyCORIS's rule), with ‖ΔW‖ computed without ΔW."""
        orig_norm = loha.frobenius_norm(*self._factors(), scale=self.scale) * self.scalar.abs()
        scaled, ratio = max_norm_ratio(orig_norm, max_norm)
        if scaled:
            self.scalar *= ratio
        return scaled, orig_norm * ratio
