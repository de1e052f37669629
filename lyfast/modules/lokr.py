"""LokrModule: LyCORIS 4.1.3's LoKr (`name = "kron"`) with its parameters, file format and numbers;
training goes through `lyfast.functional.lokr.delta_forward`, which never builds ΔW."""
from __future__ import annotations

import math
import warnings
from functools import lru_cache

import torch
import torch.nn as nn

from .. import backend as _backend
from ..functional import dora, lokr
from ..functional.general import add_base, factorization, output_row_mask
from .base import DeltaModule, check_rank, dora_kwargs, max_norm_ratio, warn_dropout_rebuild


@lru_cache(maxsize=None)
def _warn_full_matrix(lora_dim, dim, factor):
    warnings.warn(f"lora_dim {lora_dim} is too large for dim={dim} and factor={factor}, using full matrix mode.")


class LokrModule(DeltaModule):
    name = "kron"
    algo_title = "LoKr"
    weight_list = [
        "lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t1", "lokr_t2",
        "alpha", "dora_scale",
    ]
    weight_list_det = ["lokr_w1", "lokr_w1_a"]

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
        decompose_both=False,
        factor: int = -1,
        rank_dropout_scale=False,
        weight_decompose=False,
        wd_on_out=True,
        full_matrix=False,
        bypass_mode=None,
        rs_lora=False,
        unbalanced_factorization=False,
        **kwargs,
    ):
        lora_dim = check_rank(lora_dim, "LoKr")
        super().__init__(
            lora_name, org_module, multiplier, dropout, rank_dropout, module_dropout,
            rank_dropout_scale, bypass_mode,
        )
        factor = int(factor)
        self.lora_dim = lora_dim
        self.full_matrix = full_matrix
        self.rs_lora = rs_lora
        out_dim, in_dim, *k_size = self.shape
        in_m, in_n = factorization(in_dim, factor)
        out_l, out_k = factorization(out_dim, factor)
        if unbalanced_factorization:
            out_l, out_k = out_k, out_l
        self.tucker = bool(use_tucker) and any(k != 1 for k in k_size)

        # W1 (out_l, in_m): low rank only with decompose_both and a rank below half its size.
        self.use_w1 = not (decompose_both and lora_dim < max(out_l, in_m) / 2 and not full_matrix)
        if self.use_w1:
            self.lokr_w1 = nn.Parameter(torch.empty(out_l, in_m))
        else:
            self.lokr_w1_a = nn.Parameter(torch.empty(out_l, lora_dim))
            self.lokr_w1_b = nn.Parameter(torch.empty(lora_dim, in_m))
        # W2 (out_k, in_n[, *k]): low rank unless the rank reaches half its size or full_matrix.
        self.use_w2 = lora_dim >= max(out_k, in_n) / 2 or full_matrix
        if self.use_w2:
            if not full_matrix:
                _warn_full_matrix(lora_dim, max(in_dim, out_dim), factor)
            self.lokr_w2 = nn.Parameter(torch.empty(out_k, in_n, *k_size))
        elif self.tucker:
            self.lokr_t2 = nn.Parameter(torch.empty(lora_dim, lora_dim, *k_size))
            self.lokr_w2_a = nn.Parameter(torch.empty(lora_dim, out_k))
            self.lokr_w2_b = nn.Parameter(torch.empty(lora_dim, in_n))
        else:
            self.lokr_w2_a = nn.Parameter(torch.empty(out_k, lora_dim))
            self.lokr_w2_b = nn.Parameter(torch.empty(lora_dim, in_n * math.prod(k_size)))
        self._init_dora(weight_decompose, wd_on_out)
        warn_dropout_rebuild(dropout)

        if self.use_w1 and self.use_w2:
            alpha = lora_dim  # both factors full: scale 1
        # ... with rs_lora too: LyCORIS 4.1.3 trains with √r there, but a file holds no rank for two full
        # factors and every reload uses 1, so its files do not reproduce the trained network.
        self._init_scale(alpha, lora_dim, rs_lora and not (self.use_w1 and self.use_w2), use_scalar)

        # LyCORIS's initialization, in its order, so one seed gives the same factors.
        kaiming = lambda p: nn.init.kaiming_uniform_(p, a=math.sqrt(5))  # noqa: E731
        if self.use_w2:
            kaiming(self.lokr_w2) if use_scalar else nn.init.constant_(self.lokr_w2, 0)
        else:
            if self.tucker:
                kaiming(self.lokr_t2)
            kaiming(self.lokr_w2_a)
            kaiming(self.lokr_w2_b) if use_scalar else nn.init.constant_(self.lokr_w2_b, 0)
        if self.use_w1:
            kaiming(self.lokr_w1)
        else:
            kaiming(self.lokr_w1_a)
            kaiming(self.lokr_w1_b)

    # ------------------------------------------------------------------ files
    @classmethod
    @torch.no_grad()
    def make_module_from_state_dict(cls, lora_name, orig_module, w1, w1a, w1b, w2, w2a, w2b, t1, t2, alpha, dora_scale):
        """Build the module that these tensors describe, inferring the layout from their shapes.

        Unlike LyCORIS 4.1.3 this also loads files written with `unbalanced_factorization` and conv
        Tucker LoKr (LyCORIS cannot reload those): the factor sizes are read off the tensors and the
        constructor arguments that reproduce them are searched, then every shape is checked."""
        if alpha is None:
            raise ValueError(f"LoKr weights for {lora_name} lack {lora_name}.alpha")
        if w1 is None and (w1a is None or w1b is None):
            raise ValueError(f"LoKr weights for {lora_name} need lokr_w1 or both lokr_w1_a and lokr_w1_b")
        if w2 is None and (w2a is None or w2b is None):
            raise ValueError(f"LoKr weights for {lora_name} need lokr_w2 or both lokr_w2_a and lokr_w2_b")
        if t1 is not None:
            raise ValueError(f"{lora_name}.lokr_t1 is not part of the LoKr format (LyCORIS never writes it)")
        out_l, in_m = w1.shape if w1 is not None else (w1a.shape[0], w1b.shape[1])
        if w2 is not None:
            out_k, in_n = w2.shape[:2]
            rank = w1a.shape[1] if w1a is not None else None
        elif t2 is not None:
            out_k, in_n, rank = w2a.shape[1], w2b.shape[1], t2.shape[0]
        else:
            rank = w2a.shape[1]
            out_k, in_n = w2a.shape[0], w2b.shape[1] // max(1, math.prod(orig_module.weight.shape[2:]))
        kwargs = dict(use_tucker=t2 is not None, decompose_both=w1 is None)
        if rank is None:  # both factors full
            rank, kwargs["full_matrix"] = 1, True
        layout = _find_layout(orig_module.weight.shape[0], orig_module.weight.shape[1], (out_l, out_k), (in_m, in_n))
        if layout is None:
            raise ValueError(
                f"{lora_name}: LoKr factors ({out_l}x{in_m}) ⊗ ({out_k}x{in_n}) do not factor the layer "
                f"weight {tuple(orig_module.weight.shape)}"
            )
        factor, unbalanced = layout
        if w2 is not None and w1 is None and not rank >= max(out_k, in_n) / 2:
            raise ValueError(f"{lora_name}: full lokr_w2 with low-rank lokr_w1 needs rank >= {max(out_k, in_n) / 2}")
        module = cls(
            lora_name, orig_module, 1, rank, float(alpha), factor=factor, unbalanced_factorization=unbalanced,
            **kwargs, **dora_kwargs(lora_name, orig_module, dora_scale),
        )
        names = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2")
        given = dict(zip(names, (w1, w1a, w1b, w2, w2a, w2b, t2)))
        given = {k: v for k, v in given.items() if v is not None}
        have = {n for n in names if hasattr(module, n)}
        if set(given) != have:
            raise ValueError(f"{lora_name}: LoKr tensors {sorted(given)} do not form a layout (expected {sorted(have)})")
        if dora_scale is not None:
            given["dora_scale"] = dora_scale
        module._copy_loaded(given)
        return module

    def custom_state_dict(self):
        out = {"alpha": self.alpha}
        if self.wd:
            out["dora_scale"] = self.dora_scale
        if self.use_w1:
            out["lokr_w1"] = self.lokr_w1 * self.scalar
        else:
            out |= {"lokr_w1_a": self.lokr_w1_a * self.scalar, "lokr_w1_b": self.lokr_w1_b}
        if self.use_w2:
            out["lokr_w2"] = self.lokr_w2
        else:
            out |= {"lokr_w2_a": self.lokr_w2_a, "lokr_w2_b": self.lokr_w2_b}
            if self.tucker:
                out["lokr_t2"] = self.lokr_t2
        return out

    # ------------------------------------------------------------------ math
    def _factors(self, like=None):
        """(w1, w1a, w1b, w2, w2a, w2b, t2), absent ones None, cast with `.to(like)` when given."""
        get = lambda n: getattr(self, n, None)  # noqa: E731
        ws = [get("lokr_w1"), get("lokr_w1_a"), get("lokr_w1_b"), get("lokr_w2"), get("lokr_w2_a"), get("lokr_w2_b")]
        ws.append(self.lokr_t2 if self.tucker and not self.use_w2 else None)
        return [w if w is None or like is None else w.to(like) for w in ws]

    def _delta(self, x, multiplier, bypass: bool, base=None):
        scale = self.scalar.to(x) * (self.scale * multiplier)
        masked = not bypass and self.training and self.rank_dropout  # LyCORIS's LoKr bypass has none
        fuse = base if not (bypass or masked) else None
        y = lokr.delta_forward(x, *self._factors(x), scale=scale, spec=self.spec, base=fuse)
        if bypass:
            return add_base(self.drop(y), base)
        if masked:
            return add_base(output_row_mask(y, self._rank_dropout_mask(y.dtype), self.spec), base)
        return y

    def _linear_forward(self, x, weight, bias, scale):
        """Through `lokr.linear_forward`: one `KronDelta` with the layer inside on the PyTorch path, the
        layer's output added in the kernel's epilogue on Triton."""
        return lokr.linear_forward(x, weight, bias, *self._factors(x)[:6], scale=scale)

    def get_weight(self, shape=None):
        """ΔW·α/r (without scalar and multiplier), like LyCORIS's get_weight. Builds ΔW."""
        w = lokr.diff_weight(*self._factors(), scale=self.scale, kernel_size=self.spec.kernel_size)
        return w.reshape(self.shape if shape is None else shape)

    def _diff_weight(self, scale, dtype=None):
        factors = self._factors(dtype)
        scale = self.scalar.to(next(f for f in factors if f is not None).dtype) * scale
        return lokr.diff_weight(*factors, scale=scale, kernel_size=self.spec.kernel_size).reshape(self.shape)

    def _dora_norms(self, weight, row_scale):
        c1, c2 = lokr.canonical_factors(*self._factors(), kernel_size=self.spec.kernel_size)
        c1 = c1 * (self.scalar * self.scale)
        return dora.kron_norms_sq(weight, self.spec, c1, c2, self.wd_on_out, self.dora_scale.dtype, row_scale)

    def _dora_delta(self, x):
        scale = self.scalar.to(x) * self.scale
        return lokr.delta_forward(
            x, *self._factors(x), scale=scale, spec=self.spec, backend=_backend.Backend.TORCH
        )

    @torch.no_grad()
    def apply_max_norm(self, max_norm, device=None):
        """Scale every factor so ‖ΔW‖ <= max_norm (LyCORIS's rule), ‖ΔW‖ = ‖W1‖·‖W2‖·scale."""
        orig_norm = lokr.frobenius_norm(*self._factors(), scale=self.scale, kernel_size=self.spec.kernel_size)
        scaled, ratio = max_norm_ratio(orig_norm, max_norm)
        if scaled:
            n_factors = 4 - self.use_w1 - self.use_w2 + (not self.use_w2 and self.tucker)
            for f in self._factors():
                if f is not None:
                    f *= ratio ** (1 / n_factors)
        return scaled, orig_norm * ratio


def _find_layout(out_dim, in_dim, outs, ins):
    """(factor, unbalanced) for which LyCORIS's factorization gives out = outs and in = ins."""
    candidates = [-1, *sorted({*outs, *ins, *(2**i for i in range(1, 14))})]
    for factor in candidates:
        if factorization(in_dim, factor) != tuple(ins):
            continue
        out_l, out_k = factorization(out_dim, factor)
        if (out_l, out_k) == tuple(outs):
            return factor, False
        if (out_k, out_l) == tuple(outs):
            return factor, True
    return None
