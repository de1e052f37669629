"""What LoHa, LoKr and BOFT modules share: LyCORIS 4.1.3's module contract.

Kept from LyCORIS on purpose, because files, wrappers and training scripts depend on it:
  * constructor arguments and attribute names (`lora_name`, `multiplier`, `shape`, `dim`, `op`,
    `kw_dict`, `bypass_mode`, `org_module` held in a list so it is not a submodule, ...);
  * `state_dict()` returning `custom_state_dict()` and the load hooks;
  * wrapper stacking on the base layer through `_lycoris_wrappers` / `_lycoris_original_forward`, so
    lyfast and LyCORIS adapters can stack on one layer and `restore()` removes only itself;
  * the dropout semantics: bypass  y = W·x + drop(ΔW·x);  rebuild  y = (W + rank_drop(ΔW))·x.
Changed on purpose: `get_diff_weight` / `get_merged_weight` / `merge_to` reproduce the forward
exactly (LyCORIS 4.1.3 applies α/r twice there for LoHa and LoKr).
"""
from __future__ import annotations

import functools
import math
import operator
import warnings
from collections import OrderedDict

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..backend import transform_active
from ..functional import dora
from ..targeting import compute_dtype, is_quantized_base, linear_like, plain_weight
from ..functional.general import LayerSpec, output_row_mask

_OPS = {"linear": F.linear, "conv1d": F.conv1d, "conv2d": F.conv2d, "conv3d": F.conv3d}


def module_type_of(module: nn.Module) -> str:
    if linear_like(module):
        return "linear"
    for nd, cls in ((1, nn.Conv1d), (2, nn.Conv2d), (3, nn.Conv3d)):
        if isinstance(module, cls):
            return f"conv{nd}d"
    if isinstance(module, nn.LayerNorm):
        return "layernorm"
    if isinstance(module, nn.GroupNorm):
        return "groupnorm"
    return "unknown"


def input_padding(module: nn.Module):
    """(F.pad amounts, mode) for a conv whose padding the ΔW op cannot express as symmetric zero padding:
    a padding_mode other than 'zeros' (reflect/replicate/circular), or padding='same' with an even
    effective kernel (asymmetric). None otherwise. ΔW·x must be padded as the layer pads x, or a merged
    layer would differ from the adapted one (LyCORIS 4.1.3 pads ΔW·x with zeros whatever the mode)."""
    if not isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        return None
    asymmetric = module.padding == "same" and any(
        d * (k - 1) % 2 for d, k in zip(module.dilation, module.kernel_size))
    if module.padding_mode == "zeros" and not asymmetric:
        return None
    mode = "constant" if module.padding_mode == "zeros" else module.padding_mode
    return tuple(module._reversed_padding_repeated_twice), mode


def _unpadded_spec(conv: nn.Module) -> LayerSpec:
    """The conv's LayerSpec with padding 0 (its input is padded by `input_padding` instead)."""
    nd = len(conv.kernel_size)
    return LayerSpec(f"conv{nd}d", conv.out_channels, conv.in_channels // conv.groups, tuple(conv.kernel_size),
                     tuple(conv.stride), (0,) * nd, tuple(conv.dilation), conv.groups)


def batched_input(method):
    """Decorator for a module's forward-like method(x, ...): an unbatched conv input (C, *spatial) is
    given a batch dimension of 1 for the call and loses it again in the output."""

    @functools.wraps(method)
    def wrapper(self, x, *args, **kwargs):
        if self._unbatched(x):
            return method(self, x.unsqueeze(0), *args, **kwargs).squeeze(0)
        return method(self, x, *args, **kwargs)

    return wrapper


def holds_exactly(tensor: torch.Tensor, dtype: torch.dtype) -> bool:
    """Whether casting `tensor` to `dtype` keeps every value (an alpha may only be cast when this holds). A tensor
    without values (meta, or fake while a model is traced) is taken to hold: there is nothing to lose."""
    from torch._subclasses.fake_tensor import is_fake

    if tensor.device.type == "meta" or is_fake(tensor) or torch._C._get_dispatch_mode(
            torch._C._TorchDispatchModeKey.FAKE) is not None:
        return True
    return bool(torch.equal(tensor.detach().to(dtype).to(tensor.dtype), tensor.detach()))


def alpha_and_scale(alpha, lora_dim: int, rs_lora: bool):
    """LyCORIS's scale rule: alpha 0/None means alpha = lora_dim; scale = alpha / r (or / √r with
    rs_lora); the stored `alpha` buffer is alpha·r/r_factor so that file alpha / r == scale."""
    if isinstance(alpha, torch.Tensor):
        alpha = alpha.detach().float().numpy()  # as LyCORIS: bf16 tensors would not convert
    alpha = lora_dim if alpha is None or alpha == 0 else alpha
    r_factor = math.sqrt(lora_dim) if rs_lora else lora_dim
    return alpha / r_factor, torch.tensor(alpha * (lora_dim / r_factor))


class LycorisModule(nn.Module):
    """Base of lyfast's adapter modules (see the module docstring for the contract)."""

    name = "base"
    support_module = {"linear", "conv1d", "conv2d", "conv3d"}
    weight_list: list[str] = []
    weight_list_det: list[str] = []
    algo_title = "adapter"

    def __init__(
        self,
        lora_name,
        org_module: nn.Module,
        multiplier=1.0,
        dropout=0.0,
        rank_dropout=0.0,
        module_dropout=0.0,
        rank_dropout_scale=False,
        bypass_mode=None,
        **kwargs,
    ):
        super().__init__()
        self._register_load_state_dict_pre_hook(self.load_weight_prehook)
        self.register_load_state_dict_post_hook(self.load_weight_hook)
        self.lora_name = lora_name
        self.not_supported = False
        self.module = type(org_module)
        self.module_type = module_type_of(org_module)
        if self.module_type not in self.support_module:
            raise ValueError(
                f"{type(org_module).__name__} ({self.module_type}) is not supported in "
                f"{self.algo_title}: it adapts nn.Linear and nn.Conv1d/2d/3d layers"
            )
        # (F.pad amounts, mode) when the adapter pads a conv's input itself; its ΔW op then uses padding 0.
        self.input_padding = input_padding(org_module)
        if self.input_padding is not None:
            self.spec = _unpadded_spec(org_module)
        elif not isinstance(org_module, nn.Linear) and linear_like(org_module):  # an fp8-storage Linear look-alike
            self.spec = LayerSpec("linear", org_module.out_features, org_module.in_features)
        else:
            self.spec = LayerSpec.from_module(org_module)
        self.shape = self.spec.weight_shape
        self.dim = self.spec.out_features
        self.op = _OPS[self.module_type]
        self.kw_dict = (
            self.spec.conv_kwargs() | {"padding": org_module.padding} if self.spec.is_conv else {}
        )
        self.register_buffer("dtype_tensor", torch.tensor(0.0), persistent=False)

        # A quantized base (targeting.is_quantized_base: its weight is not to be read) always runs in bypass:
        # the layer's own forward and backward plus the adapter without ΔW, whatever bypass_mode says (LyCORIS
        # forces it for the classes it knows and lets the others rebuild from a packed weight). As LyCORIS, any
        # other Linear subclass runs in bypass when the caller chose no mode.
        self.is_quant = is_quantized_base(org_module)
        if self.is_quant or (isinstance(org_module, nn.Linear) and type(org_module).__name__ != "Linear"
                             and bypass_mode is None):
            bypass_mode = True
        self.bypass_mode = bypass_mode
        self.dropout = dropout
        self.rank_dropout = rank_dropout
        self.rank_dropout_scale = rank_dropout_scale
        self.module_dropout = module_dropout
        self.drop = nn.Identity() if dropout == 0 else nn.Dropout(dropout)
        self.rank_drop = nn.Identity() if rank_dropout == 0 else nn.Dropout(rank_dropout)
        self.multiplier = multiplier
        self.org_forward = org_module.forward
        self.org_module = [org_module]

    def _apply(self, fn, recurse=True):
        """As nn.Module's, except that the `alpha` buffer keeps its dtype (it still moves device) when the new
        dtype cannot hold its value exactly: alpha is a hyper-parameter the file carries, and a cast to fp16
        (kohya's `--full_fp16`) turned the 100000 that full-matrix LoKr recipes store into inf, a cast to bf16
        an alpha of 0.3 into 0.30078 (a different scale after reloading). Exact casts go through as LyCORIS's."""
        alpha = self._buffers.get("alpha")
        module = super()._apply(fn, recurse)
        moved = self._buffers.get("alpha")
        if (alpha is not None and moved is not None and moved.dtype != alpha.dtype
                and not holds_exactly(alpha, moved.dtype)):
            self._buffers["alpha"] = alpha.to(moved.device)
        return module

    # ------------------------------------------------------------------ state dict and files
    def custom_state_dict(self):
        return None

    def state_dict(self, *args, destination=None, prefix="", keep_vars=False):
        if args:  # positional (destination, prefix, keep_vars), as nn.Module still accepts
            destination = args[0] if destination is None else destination
            prefix = args[1] if len(args) > 1 and prefix == "" else prefix
            keep_vars = args[2] if len(args) > 2 else keep_vars
        if destination is None:
            destination = OrderedDict()
            destination._metadata = OrderedDict()
        if hasattr(destination, "_metadata"):
            destination._metadata[prefix[:-1]] = dict(version=self._version)
        custom = self.custom_state_dict()
        if custom is None:
            return super().state_dict(destination=destination, prefix=prefix, keep_vars=keep_vars)
        for key, value in custom.items():
            destination[f"{prefix}{key}"] = value
        return destination

    def load_weight_prehook(self, state_dict, prefix, local_metadata, strict, missing, unexpected, errors):
        pass

    def load_weight_hook(self, module, incompatible_keys):
        pass

    @classmethod
    def algo_check(cls, state_dict, lora_name):
        return any(f"{lora_name}.{k}" in state_dict for k in cls.weight_list_det)

    @classmethod
    def extract_state_dict(cls, state_dict, lora_name):
        return [state_dict.get(f"{lora_name}.{k}", None) for k in cls.weight_list]

    @classmethod
    def make_module_from_state_dict(cls, lora_name, orig_module, *weights):
        raise NotImplementedError

    def _copy_loaded(self, tensors: dict):
        """Copy loaded tensors into parameters, naming the key on any shape mismatch."""
        with torch.no_grad():
            for name, value in tensors.items():
                param = getattr(self, name)
                if tuple(param.shape) != tuple(value.shape):
                    raise ValueError(
                        f"{self.lora_name}.{name}: file shape {tuple(value.shape)} does not match the "
                        f"{tuple(param.shape)} this layer {self.shape} needs"
                    )
                param.copy_(value)

    # ------------------------------------------------------------------ properties
    @property
    def dtype(self):
        return self.dtype_tensor.dtype

    @property
    def device(self):
        return self.dtype_tensor.device

    @property
    def org_weight(self):
        """The base layer's weight; for a quantized base its dequantized copy (for merging and inspection)."""
        weight = self.org_module[0].weight
        return weight if not self.is_quant or plain_weight(weight) else self._dequantized_weight()

    def _dequantized_weight(self):
        from ..quantized import dequantized_weight

        return dequantized_weight(self.org_module[0]).to(compute_dtype(self.org_module[0]))

    @org_weight.setter
    def org_weight(self, value):
        self.org_module[0].weight.data.copy_(value)

    def _current_weight(self):
        """W0 detached (a quantized base's dequantized copy: merge and ΔW inspection only, never training)."""
        return self.org_weight.detach()

    # ------------------------------------------------------------------ wrapping the base layer
    def apply_to(self, **kwargs):
        """Wrap the base layer's forward (stacking on any adapter already there). Applying an adapter
        that is already applied does nothing (LyCORIS 4.1.3 wraps it around itself, so the next
        forward recurses forever)."""
        module = self.org_module[0]
        if self in getattr(module, "_lycoris_wrappers", ()):
            return
        if not hasattr(module, "_lycoris_original_forward"):
            module._lycoris_original_forward = module.forward
        wrappers = [w for w in getattr(module, "_lycoris_wrappers", []) if w is not self]
        self.org_forward = module.forward
        wrappers.append(self)
        module._lycoris_wrappers = wrappers
        module.forward = self.forward

    def restore(self):
        module = self.org_module[0]
        wrappers = list(getattr(module, "_lycoris_wrappers", []))
        original = getattr(module, "_lycoris_original_forward", self.org_forward)
        if self not in wrappers:
            module.forward = wrappers[-1].forward if wrappers else original
            return
        idx = wrappers.index(self)
        wrappers.pop(idx)
        if idx < len(wrappers):
            wrappers[idx].org_forward = self.org_forward
        if wrappers:
            module._lycoris_wrappers = wrappers
            module.forward = wrappers[-1].forward
        else:
            module.forward = original
            module.__dict__.pop("_lycoris_wrappers", None)
            module.__dict__.pop("_lycoris_original_forward", None)

    def is_mergeable(self) -> bool:
        """Whether merge_to can add ΔW into the layer's weight: a plain floating tensor, or a quantized one whose
        library lyfast requantizes (`quantized.merge_into`)."""
        from ..quantized import can_merge_into

        layer = self.org_module[0]
        return plain_weight(getattr(layer, "weight", None)) or can_merge_into(layer)

    def _ensure_mergeable(self):
        if not self.is_mergeable():
            raise RuntimeError(
                f"{self.lora_name}: merging into a quantized base layer ({type(self.org_module[0]).__name__}, weight "
                f"{type(self.org_module[0].weight).__name__}) is not supported: lyfast requantizes optimum-quanto, "
                "bitsandbytes 4-bit and torchao int8/float8 layers. Keep the adapter applied (bypass), or load the "
                "file into the unquantized model and merge there")

    def _wraps_base_layer(self) -> bool:
        """Whether org_forward is the base layer's own forward (no adapter stacked below)."""
        layer = self.org_module[0]
        original = layer.__dict__.get("_lycoris_original_forward")
        if original is not None:
            return self.org_forward == original
        return getattr(self.org_forward, "__self__", None) is layer

    def _runs_class_forward(self) -> bool:
        """Whether org_forward is the base layer's class forward bound to the layer itself: no adapter below
        and no replaced forward (a monkeypatch, accelerate's `cpu_offload` hooks, diffusers' layerwise casting
        all swap `layer.forward`), over a plain floating weight (not a quantized tensor subclass). Only then may
        an op compute the layer from its weight and bias instead of calling it."""
        layer, fn = self.org_module[0], self.org_forward
        weight = getattr(layer, "weight", None)
        return (getattr(fn, "__self__", None) is layer and getattr(fn, "__func__", None) is type(layer).forward
                and plain_weight(weight))

    def _wraps_plain_linear(self) -> bool:
        """Whether org_forward is exactly nn.Linear's forward on the base layer, so a fused op may compute
        it from the layer's weight and bias (quantized, custom or re-wrapped Linears never qualify)."""
        layer = self.org_module[0]
        return type(layer).forward is nn.Linear.forward and isinstance(layer, nn.Linear) and self._runs_class_forward()

    # ------------------------------------------------------------------ merging
    def delta_weight(self, multiplier=1.0, dtype=None) -> torch.Tensor:
        """ΔW exactly as the forward applies it (multiplier and scalar included), shape `self.shape`,
        computed in `dtype` (default: the parameters'). Materializes ΔW: for merging and
        inspection, never used by training."""
        raise NotImplementedError

    def get_diff_weight(self, multiplier=1.0, shape=None, device=None):
        diff = self.delta_weight(multiplier)
        if shape is not None:
            diff = diff.reshape(shape)
        if device is not None:
            diff = diff.to(device)
        return diff, None

    def get_merged_weight(self, multiplier=1.0, shape=None, device=None):
        diff, _ = self.get_diff_weight(multiplier, shape, device)
        weight = self.org_weight.to(device) if device is not None else self.org_weight
        dtype = torch.promote_types(weight.dtype, diff.dtype)
        return weight.to(dtype) + diff.to(dtype), None

    @torch.no_grad()
    def merge_to(self, multiplier=1.0, *, precise: bool = False):
        """Add ΔW·multiplier into the base layer's weight, so the plain layer then computes what the
        adapted forward computed. `precise` computes ΔW and the sum in fp64 before casting back."""
        self._ensure_mergeable()
        weight = self.org_module[0].weight
        diff = self.delta_weight(multiplier, dtype=torch.float64 if precise else None)
        if not plain_weight(weight):  # a quantized base: dequantize, add, quantize again (quantized.merge_into)
            from ..quantized import merge_into

            merge_into(self.org_module[0], diff.reshape(self.shape))
            return
        diff = diff.reshape(weight.shape).to(weight.device)
        dtype = torch.promote_types(weight.dtype, diff.dtype)  # never round W to the adapter's dtype
        weight.copy_((weight.to(dtype) + diff.to(dtype)).to(weight.dtype))

    @torch.no_grad()
    def onfly_merge(self, multiplier=1.0):
        if not plain_weight(self.org_module[0].weight):
            raise RuntimeError(f"{self.lora_name}: onfly_merge needs a plain weight to restore; "
                               f"{type(self.org_module[0]).__name__} is quantized (use merge_to, which requantizes)")
        self.cached_org_weight = self.org_weight.data.cpu().clone()
        self.merge_to(multiplier)

    @torch.no_grad()
    def onfly_restore(self):
        self.org_weight = self.cached_org_weight.to(self.org_weight)
        del self.cached_org_weight

    @torch.no_grad()
    def apply_max_norm(self, max_norm, device=None):
        return None, None

    # ------------------------------------------------------------------ forward helpers
    def _module_dropped(self) -> bool:
        return bool(self.module_dropout and self.training and torch.rand(1) < self.module_dropout)

    def _rank_dropout_mask(self, dtype) -> torch.Tensor:
        """Per output row keep-mask of rebuild-mode rank dropout (drawn like LyCORIS: rand(out))."""
        mask = (torch.rand(self.dim) > self.rank_dropout).to(dtype)
        if self.rank_dropout_scale:
            mask /= mask.mean()
        return mask

    def _padded(self, x: torch.Tensor) -> torch.Tensor:
        """x as the ΔW op must see it: padded here when the layer pads other than with symmetric zeros."""
        return x if self.input_padding is None else F.pad(x, *self.input_padding)

    def _unbatched(self, x: torch.Tensor) -> bool:
        """A conv input without its batch dimension, (C, *spatial), which nn.Conv accepts."""
        return self.spec.is_conv and x.dim() == len(self.spec.kernel_size) + 1

    def _empty_output(self, base: torch.Tensor) -> torch.Tensor:
        """The adapted output for an input with no elements: `base` with every trainable parameter
        joined to the graph through an empty slice, so each gets a zero gradient (as LyCORIS's ΔW path
        gives) and no backend ever sees a zero-size input."""
        zero = base.new_zeros(())
        for p in self.parameters():
            if p.requires_grad:
                zero = zero + p.reshape(-1)[:0].sum().to(base.dtype)
        return base + zero

    def bypass_forward(self, x, scale=1):
        return self.org_forward(x) + self.bypass_forward_diff(x, scale=scale)

    def bypass_forward_diff(self, x, scale=1):
        raise NotImplementedError

    def forward(self, *args, **kwargs):
        raise NotImplementedError


class DeltaModule(LycorisModule):
    """LoHa and LoKr: y = base(x) + ΔW·x·multiplier (bypass: drop(ΔW·x)), LyCORIS's α/r scale and an
    optional trainable `scalar` that files carry folded into the first factor; with `weight_decompose`,
    LyCORIS's DoRA in rebuild mode (`_dora_forward`, `functional.dora`)."""

    def _init_scale(self, alpha, lora_dim, rs_lora, use_scalar):
        self.scale, alpha_buf = alpha_and_scale(alpha, lora_dim, rs_lora)
        self.register_buffer("alpha", alpha_buf)
        if use_scalar:
            self.scalar = nn.Parameter(torch.tensor(0.0))
        else:
            self.register_buffer("scalar", torch.tensor(1.0), persistent=False)

    def load_weight_hook(self, module, incompatible_keys):
        missing = incompatible_keys.missing_keys
        missing[:] = [k for k in missing if "scalar" not in k]
        with torch.no_grad():
            self.scalar.fill_(1.0)  # files carry the scalar folded into the first factor

    def _delta(self, x, multiplier, bypass: bool, base=None):
        """ΔW·x·multiplier·scalar with this mode's dropout semantics; `base` + that when `base` (the
        frozen layer's output) is given, which a Triton kernel may add in its epilogue."""
        raise NotImplementedError

    @batched_input
    def bypass_forward_diff(self, x, scale=1):
        if x.numel() == 0:
            base = self.org_forward(x)
            return self._empty_output(torch.zeros_like(base))
        if transform_active():
            return self._transform_delta(x, self.scale * scale)
        return self._delta(self._padded(x), scale, bypass=True)

    def _fused_forward(self, x):
        """base(x) + ΔW·x through the algorithm's `linear_forward` (`_linear_forward`), or None: only for a
        plain Linear base layer, not with rank dropout in training (its mask multiplies ΔW·x alone), nor
        above another adapter."""
        if self.spec.is_conv or (self.training and self.rank_dropout) or not self._wraps_plain_linear():
            return None
        layer = self.org_module[0]
        return self._linear_forward(x, layer.weight, layer.bias, self.scalar.to(x) * (self.scale * self.multiplier))

    def _linear_forward(self, x, weight, bias, scale):
        """F.linear(x, weight, bias) + ΔW·x with ΔW scaled by `scale` (multiplier and scalar included)."""
        raise NotImplementedError

    def _diff_weight(self, scale, dtype=None):
        """ΔW·scalar·`scale`, shape `self.shape`, in `dtype` (default: the parameters'), built by ordinary
        differentiable ops (`functional.<algo>.diff_weight`)."""
        raise NotImplementedError

    def delta_weight(self, multiplier=1.0, dtype=None):
        if not self.wd:
            return self._diff_weight(self.scale * multiplier, dtype)
        return self._dora_merged_delta(self._diff_weight(self.scale, dtype), multiplier, dtype)

    def _transform_forward(self, x, *args, **kwargs):
        """The forward under a torch.func transform (`backend.transform_active`): base(x) + op(pad(x), ΔW) with ΔW
        built by ordinary ops, which every transform differentiates and batches (lyfast's autograd Functions
        have hand-written backwards only). Rebuild: ΔW·multiplier, or W' − W0 with DoRA; bypass: ΔW·multiplier
        (DoRA ignored, as the bypass forward). The numbers equal the ΔW-free forward's; the memory is
        LyCORIS's (ΔW is built)."""
        if self.bypass_mode:
            return self.org_forward(x) + self._transform_delta(x, self.scale * self.multiplier)
        if not self.wd:
            return self.org_forward(x, *args, **kwargs) + self._transform_delta(x, self.scale * self.multiplier)
        self._no_dropout_under_transform()
        base = self.org_forward(x, *args, **kwargs)
        return base + self.spec.apply(self._padded(x), self.delta_weight(self.multiplier).to(x.dtype))

    def _transform_delta(self, x, scale):
        """op(pad(x), ΔW·scalar·scale) with ΔW built (no DoRA), for `_transform_forward` and bypass_forward_diff."""
        self._no_dropout_under_transform()
        return self.spec.apply(self._padded(x), self._diff_weight(scale).to(x.dtype))

    def _no_dropout_under_transform(self):
        if self.training and (self.dropout or self.rank_dropout):
            raise RuntimeError(
                f"{self.lora_name}: dropout / rank_dropout in training under a torch.func transform (grad, vmap, "
                "jacrev, jvp) is not supported: call .eval() or set them to 0 for the transform")

    @batched_input
    def forward(self, x, *args, **kwargs):
        if self._module_dropped():
            return self.org_forward(x, *args, **kwargs)
        if x.numel() == 0:
            return self._empty_output(self.org_forward(x, *args, **kwargs))
        if transform_active():
            return self._transform_forward(x, *args, **kwargs)
        if self.bypass_mode:
            return self.org_forward(x) + self._delta(self._padded(x), self.multiplier, bypass=True)
        if self.wd:
            return self._dora_forward(x, *args, **kwargs)
        fused = None if (args or kwargs) else self._fused_forward(x)
        if fused is not None:
            return fused
        base = self.org_forward(x, *args, **kwargs)
        return self._delta(self._padded(x), self.multiplier, bypass=False, base=base)


    # ------------------------------------------------------------------ DoRA (weight_decompose)
    def _init_dora(self, weight_decompose, wd_on_out):
        """LyCORIS's `wd`, `wd_on_out` and the `dora_scale` parameter (W0's row or column norms, fp32)."""
        self.wd = bool(weight_decompose)
        self.wd_on_out = wd_on_out
        if not self.wd:
            return
        self.dora_norm_dims = len(self.shape) - 1
        if self.is_quant:
            # DoRA over a quantized base: W0's norms through the layer's own forward on basis blocks
            # (`dora.layer_norms_sq`), the forward through the layer (`dora_forward(weight_free=True)`); it is
            # DoRA's rebuild semantics without reading W, so the forced bypass (which would ignore DoRA) is lifted.
            if self.spec.is_conv:
                raise ValueError(
                    f"{self.lora_name}: weight_decompose (DoRA) on a quantized conv ({type(self.org_module[0]).__name__})"
                    " is not supported: dequantize that layer or train without dora_wd")
            self.bypass_mode = False
            with torch.no_grad():
                norm = self._quantized_norms_sq(None, zero_delta=True).sqrt().float().cpu()
            self.dora_scale = nn.Parameter(norm.reshape(-1, 1) if wd_on_out else norm.reshape(1, -1))
            return
        self.dora_scale = nn.Parameter(dora.initial_magnitude(self._current_weight(), wd_on_out))
        if self.bypass_mode:
            warnings.warn(
                f"{self.lora_name}: weight_decompose (DoRA) with bypass_mode: the forward ignores DoRA "
                "(dora_scale is neither applied nor trained), as LyCORIS 4.1.3 does",
                stacklevel=3,
            )

    def _quantized_norms_sq(self, row_scale, zero_delta=False):
        """`_dora_norms` over a quantized Linear, whose W0 only its forward gives (`dora.layer_norms_sq`)."""
        layer = self.org_module[0]
        cd = compute_dtype(layer)
        bias = layer.bias

        def columns(e):
            y = self.org_forward(e)
            return y if bias is None else y - bias.to(y.dtype)

        delta = (lambda e: e.new_zeros(e.shape[0], self.spec.out_features)) if zero_delta else self._dora_delta
        dtype = torch.float32 if zero_delta else self.dora_scale.dtype
        return dora.layer_norms_sq(columns, delta, self.spec.in_features, self.wd_on_out, dtype, cd,
                                   self.dtype_tensor.device, row_scale)

    def _dora_norms(self, weight, row_scale):
        """‖W0 + diag(row_scale)·ΔW‖² per row or column (wd_on_out) in dora_scale's dtype, without ΔW;
        ΔW with α/r and scalar, without the multiplier (`functional.dora`)."""
        raise NotImplementedError

    def _dora_delta(self, x):
        """ΔW·x with α/r and scalar, without the multiplier, on the PyTorch path."""
        raise NotImplementedError

    def _dora_forward(self, x, *args, **kwargs):
        """LyCORIS's rebuild-mode DoRA forward through `functional.dora.dora_forward` (no W0 + ΔW).
        Always the PyTorch path: the fused kernels have no DoRA epilogue, the norms are PyTorch here."""
        layer = self.org_module[0]
        mask = None
        if self.training and self.rank_dropout:
            mask = self._rank_dropout_mask(self.dora_scale.dtype)
        delta = self._dora_delta  # dora_forward hands it the padded input
        if mask is not None:
            delta = lambda v: output_row_mask(self._dora_delta(v), mask, self.spec)  # noqa: E731
        if self.is_quant:
            return dora.dora_forward(
                x, None, layer.bias, self.dora_scale, self._quantized_norms_sq(mask), spec=self.spec, delta=delta,
                multiplier=self.multiplier, wd_on_out=self.wd_on_out, weight_free=True,
                base_forward=lambda v: self.org_forward(v, *args, **kwargs))
        weight = self._current_weight()
        # op(pad(x), W0) + bias is the layer only for its own forward on a frozen weight (LyCORIS's delta uses
        # the detached W0, so a trainable W0 gets its gradient from the base call alone); the pad makes it so
        # for every padding mode.
        plain = (
            not (args or kwargs)
            and self._runs_class_forward()
            and type(layer).forward is _PLAIN_FORWARD.get(type(layer))
            and not layer.weight.requires_grad
        )
        return dora.dora_forward(
            x, weight, layer.bias, self.dora_scale, self._dora_norms(weight, mask), spec=self.spec, delta=delta,
            multiplier=self.multiplier, wd_on_out=self.wd_on_out,
            base_forward=None if plain else (lambda v: self.org_forward(v, *args, **kwargs)),
            pad=None if self.input_padding is None else self._padded,
        )

    def _dora_merged_delta(self, delta_weight, multiplier, dtype=None):
        """W' − W0 for merging, W' = LyCORIS's weight_decompose(W0 + ΔW) with ΔW (`delta_weight`) without
        the multiplier; in dora_scale's dtype as LyCORIS, or in `dtype` when given (a precise merge)."""
        scale = self.dora_scale if dtype is None else self.dora_scale.to(dtype)
        weight = self._current_weight().to(scale.device)
        merged = dora.weight_decompose(weight + delta_weight.to(weight.device), scale, multiplier, self.wd_on_out)
        return merged - weight.to(merged.dtype)


def check_rank(lora_dim, algo: str) -> int:
    """`lora_dim` as an int: a TypeError unless it is an integer, a ValueError unless it is >= 1
    (LyCORIS divides by it: ZeroDivisionError)."""
    try:
        rank = operator.index(lora_dim)
    except TypeError:
        raise TypeError(f"{algo} lora_dim must be an integer, got {lora_dim!r}") from None
    if isinstance(lora_dim, bool) or rank < 1:
        raise ValueError(f"{algo} lora_dim must be a positive integer, got {lora_dim!r}")
    return rank

def dora_kwargs(lora_name, org_module, dora_scale) -> dict:
    """Constructor kwargs for a file's `dora_scale`: {} without one, else weight_decompose=True and the
    wd_on_out its shape says — (out, 1, …) row norms, (1, in, 1, …) column norms — which LyCORIS 4.1.3 does
    not infer (it cannot reload its own wd_on_out=False files)."""
    if dora_scale is None:
        return {}
    shape = tuple(LayerSpec.from_module(org_module).weight_shape)
    ones = (1,) * (len(shape) - 2)
    rows, cols = (shape[0], 1, *ones), (1, shape[1], *ones)
    if tuple(dora_scale.shape) not in (rows, cols):
        raise ValueError(
            f"{lora_name}.dora_scale has shape {tuple(dora_scale.shape)}; for the layer weight {shape} DoRA "
            f"needs {rows} (row norms, wd_on_out=True) or {cols} (column norms, wd_on_out=False)"
        )
    return dict(weight_decompose=True, wd_on_out=tuple(dora_scale.shape) == rows)


_PLAIN_FORWARD = {nn.Linear: nn.Linear.forward, nn.Conv1d: nn.Conv1d.forward, nn.Conv2d: nn.Conv2d.forward,
                  nn.Conv3d: nn.Conv3d.forward}


def max_norm_ratio(orig_norm: torch.Tensor, max_norm: float):
    """LyCORIS's max-norm rule: (scaled?, ratio) bringing a norm above max_norm down to it; a
    ValueError for a max_norm that is not a positive number (LyCORIS fills the weights with NaN)."""
    try:
        value = float(max_norm)
    except (TypeError, ValueError):
        raise TypeError(f"max_norm must be a number, got {max_norm!r}") from None
    if not 0 < value < math.inf:
        raise ValueError(f"max_norm must be a positive finite number, got {max_norm!r}")
    norm = torch.clamp(orig_norm, max_norm / 2)
    desired = torch.clamp(norm, max=max_norm)
    return norm != desired, desired.cpu() / norm.cpu()


def warn_dropout_rebuild(dropout):
    if dropout:
        warnings.warn(
            "LoHa/LoKr `dropout` acts in bypass mode only (on ΔW·x); in rebuild mode it is a no-op, "
            "as in LyCORIS",
            stacklevel=3,
        )
