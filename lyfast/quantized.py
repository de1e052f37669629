"""Quantized frozen bases, built by the real libraries: what `--base` means in the benchmarks, the profiler
and the tests.

lyfast itself needs none of this to train on a quantized model: `targeting.is_quantized_base` recognizes any
such layer by behaviour and the modules run it in bypass. This file only *makes* quantized bases the way
SimpleTuner / ai-toolkit / diffusers users make them, so that every consumer quantizes one way:

=================  ==========================================================  ====================
`base`             library call                                                 layers after
=================  ==========================================================  ====================
``bf16``           none (the model as given)                                   nn.Linear
``int8-torchao``   ``torchao.quantization.quantize_(m, Int8WeightOnlyConfig())``  nn.Linear, Int8Tensor
``fp8-torchao``    ``quantize_(m, Float8WeightOnlyConfig())``                  nn.Linear, Float8Tensor
``int8-quanto``    ``optimum.quanto.quantize(m, weights=qint8); freeze(m)``    QLinear
``fp8-quanto``     ``quantize(m, weights=qfloat8); freeze(m)``                 QLinear
``nf4-bnb``        every nn.Linear replaced by ``bnb.nn.Linear4bit(nf4)``      Linear4bit
=================  ==========================================================  ====================

The libraries are optional imports: asking for a base whose library is missing (or cannot run on the device)
raises `BaseUnavailable` with the reason, which benchmark cells report as a skip.
"""
from __future__ import annotations

import torch
import torch.nn as nn

BASES = ("bf16", "int8-torchao", "fp8-torchao", "int8-quanto", "fp8-quanto", "nf4-bnb")


class BaseUnavailable(RuntimeError):
    """The quantized base cannot be built here (library missing or unsupported on the device)."""


def _check(base: str) -> None:
    if base not in BASES:
        raise ValueError(f"unknown base {base!r}; valid: {', '.join(BASES)}")


def _torchao(model: nn.Module, config_name: str) -> nn.Module:
    try:
        from torchao.quantization import quantize_
        import torchao.quantization as tq
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise BaseUnavailable(f"torchao is not installed ({e})") from e
    quantize_(model, getattr(tq, config_name)(), filter_fn=lambda m, _name: type(m) is nn.Linear)
    return model


def _quanto(model: nn.Module, weights: str) -> nn.Module:
    from ._checkout import prefer_installed_kernels

    prefer_installed_kernels()  # optimum-quanto imports transformers, which imports the PyPI `kernels`
    try:
        from optimum import quanto
    except ImportError as e:  # pragma: no cover
        raise BaseUnavailable(f"optimum-quanto is not installed ({e})") from e
    frozen = {name for name, p in model.named_parameters() if not p.requires_grad}
    quanto.quantize(model, weights=getattr(quanto, weights))
    quanto.freeze(model)
    # freeze() makes new weight Parameters that require grad: a frozen base would then compute weight gradients in
    # every backward (and quanto's weight-grad view fails on a non-contiguous grad: Flux's attention outputs)
    for name, p in model.named_parameters():
        if name in frozen:
            p.requires_grad_(False)
    return model


def _bnb_nf4(model: nn.Module) -> nn.Module:
    try:
        import bitsandbytes as bnb
    except ImportError as e:  # pragma: no cover
        raise BaseUnavailable(f"bitsandbytes is not installed ({e})") from e
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is not nn.Linear:
                continue
            w = child.weight.detach()
            layer = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=child.bias is not None,
                                      compute_dtype=w.dtype, quant_type="nf4", device="meta")
            layer.weight = bnb.nn.Params4bit(w.float().cpu(), requires_grad=False, quant_type="nf4")
            if child.bias is not None:
                layer.bias = nn.Parameter(child.bias.detach().clone(), requires_grad=False)
            try:
                layer = layer.to(w.device)  # bitsandbytes packs the weight on this move
            except Exception as e:  # pragma: no cover - backend-dependent
                raise BaseUnavailable(f"bitsandbytes cannot quantize nf4 on {w.device}: {e}") from e
            setattr(parent, name, layer)
    return model


def quantize_base(model: nn.Module, base: str) -> nn.Module:
    """Quantize every plain nn.Linear of `model` in place as `base` says (see the table above) and return it.
    The model's floating dtype is the compute dtype. Raises ValueError for an unknown base, BaseUnavailable
    when its library is missing."""
    _check(base)
    if base == "bf16":
        return model
    if base == "int8-torchao":
        return _torchao(model, "Int8WeightOnlyConfig")
    if base == "fp8-torchao":
        return _torchao(model, "Float8WeightOnlyConfig")
    if base == "int8-quanto":
        return _quanto(model, "qint8")
    if base == "fp8-quanto":
        return _quanto(model, "qfloat8")
    return _bnb_nf4(model)


def quantize_layer(layer: nn.Module, base: str) -> nn.Module:
    """One nn.Linear quantized as `base` (the libraries replace children, so it is quantized inside a
    holder): the quantized layer, possibly of another class."""
    holder = nn.Sequential(layer)
    quantize_base(holder, base)
    return holder[0]


def dequantized_weight(layer: nn.Module) -> torch.Tensor:
    """The weight a quantized base layer computes with, dequantized whole by its library (for references,
    tests and merging in user code; lyfast's forward and backward never call this)."""
    weight = layer.weight
    if hasattr(weight, "quant_state"):  # bitsandbytes Params4bit
        import bitsandbytes.functional as bnbf
        return bnbf.dequantize_4bit(weight.data, weight.quant_state)
    if hasattr(weight, "dequantize") and type(weight) is not torch.Tensor and type(weight) is not nn.Parameter:
        return weight.dequantize()  # torchao and optimum-quanto tensor subclasses
    if hasattr(layer, "weight_scale"):  # fp8 storage with a scale (ComfyUI / OneTrainer Fp8Linear)
        return weight.float() * layer.weight_scale.float()
    return weight.detach()


# ---------------------------------------------------------------------------------------------------------
# Merging into a quantized layer: dequantize, add ΔW, quantize again with the layer's own settings.
# ---------------------------------------------------------------------------------------------------------
def _torchao_granularity(weight):
    from torchao.quantization.granularity import PerRow, PerTensor

    block = list(weight.block_size)
    if block == [1, weight.shape[1]]:
        return PerRow()
    if block == list(weight.shape):
        return PerTensor()
    return None


def _merge_kind(layer) -> str | None:
    """Which requantizing merge fits `layer`'s weight: "quanto", "bnb4", "torchao-int8", "torchao-float8", or None."""
    weight = getattr(layer, "weight", None)
    name = type(weight).__name__
    if hasattr(layer, "weight_qtype") and hasattr(layer, "freeze") and hasattr(weight, "dequantize"):
        return "quanto"
    if hasattr(weight, "quant_state") and hasattr(weight, "blocksize"):
        return "bnb4"
    if name in ("Int8Tensor", "Float8Tensor") and _torchao_granularity(weight) is not None:
        return "torchao-int8" if name == "Int8Tensor" else "torchao-float8"
    return None


def can_merge_into(layer) -> bool:
    """Whether `merge_into` can requantize this quantized layer (its library and settings are known)."""
    try:
        return _merge_kind(layer) is not None
    except Exception:  # an unknown layout
        return False


@torch.no_grad()
def merge_into(layer: nn.Module, delta: torch.Tensor) -> None:
    """W ← quantize(dequantize(W) + delta), quantized again as the layer was: optimum-quanto (its own qtype
    through `freeze`), bitsandbytes 4-bit (same quant_type, blocksize, compress_statistics), torchao Int8Tensor
    / Float8Tensor with per-row or per-tensor scales (same granularity, fp8 dtype, activation settings).
    The merged weight is rounded once more to the quantized format: the merge loses what one quantization of
    W + ΔW loses (for int8 per-row about 1/254 of each row's largest entry; nf4 about 1/14 of each 64-block's).
    Raises RuntimeError naming the class for any other layer."""
    kind = _merge_kind(layer)
    if kind is None:
        raise RuntimeError(
            f"merging into {type(layer).__name__} (weight {type(layer.weight).__name__}) is not supported: lyfast "
            "requantizes optimum-quanto, bitsandbytes 4-bit and torchao int8/float8 (per-row or per-tensor) layers. "
            "Keep the adapter applied (bypass), or load the file into the unquantized model and merge there")
    weight = layer.weight
    merged = (dequantized_weight(layer).float() + delta.to(weight.device).float())
    if kind == "quanto":
        layer.weight = nn.Parameter(merged.to(layer.bias.dtype if layer.bias is not None else torch.float32),
                                    requires_grad=False)
        layer.freeze()
    elif kind == "bnb4":
        import bitsandbytes as bnb

        state = weight.quant_state
        layer.weight = bnb.nn.Params4bit(merged.cpu(), requires_grad=False, quant_type=state.quant_type,
                                         blocksize=state.blocksize, compress_statistics=weight.compress_statistics)
        layer.to(weight.device)  # bitsandbytes packs on the move
    elif kind == "torchao-int8":
        new = type(weight).from_hp(merged.to(weight.dtype), _torchao_granularity(weight),
                                   act_quant_kwargs=weight.act_quant_kwargs)
        layer.weight = nn.Parameter(new, requires_grad=False)
    else:
        new = type(weight).from_hp(merged.to(weight.dtype), float8_dtype=weight.qdata.dtype,
                                   granularity=_torchao_granularity(weight), mm_config=weight.mm_config,
                                   kernel_preference=weight.kernel_preference, act_quant_kwargs=weight.act_quant_kwargs)
        layer.weight = nn.Parameter(new, requires_grad=False)
