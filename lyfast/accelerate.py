"""`lyfast.accelerate(obj)`: swap LyCORIS's LoHa / LoKr / BOFT modules for lyfast's, in place.

For code that already built a LyCORIS network (or applied LyCORIS adapters to a model) and an optimizer:
after `lyfast.accelerate(net)` the same Parameter objects live in lyfast modules, so the optimizer, its
state and any `.grad` stay valid, and outputs and gradients are those of the LyCORIS run (except where
lyfast deliberately differs, listed in docs/coming_from_lycoris.md: BOFT's rescale at multipliers other than
1 and its bias in bypass mode, convs with a non-zero padding_mode).
"""
from __future__ import annotations

import logging
from typing import Dict, List

import torch
import torch.nn as nn

from .targeting import is_quantized_base

logger = logging.getLogger("lyfast")

__all__ = ["accelerate"]

# Plain attributes carried from the LyCORIS module to its replacement (when both have them).
_CARRIED_ATTRS = ("lora_name", "multiplier", "bypass_mode", "dropout", "rank_dropout", "rank_dropout_scale",
                  "module_dropout", "is_quant", "scale", "rs_lora", "constraint", "org_forward")


def _lycoris_classes() -> Dict[type, type]:
    from lycoris.modules.boft import ButterflyOFTModule as LycoBOFT
    from lycoris.modules.loha import LohaModule as LycoLoha
    from lycoris.modules.lokr import LokrModule as LycoLokr

    from .modules import ButterflyOFTModule, LohaModule, LokrModule

    return {LycoLoha: LohaModule, LycoLokr: LokrModule, LycoBOFT: ButterflyOFTModule}


def accelerate(obj) -> int:
    """Replace every LyCORIS LoHa/LoKr/BOFT module reachable from `obj` by its lyfast equivalent, in place;
    returns how many were swapped.

    `obj` is a LyCORIS network (`lycoris.LycorisNetwork`, `lycoris.kohya.LycorisNetworkKohya`), a model whose
    layers carry applied LyCORIS adapters, or any nn.Module / object holding them. Kept as they were: the
    Parameter objects (assigned, not copied, so optimizers stay valid), buffers (alpha, a non-learned
    scalar), multiplier, bypass mode, dropout settings, scale, a `use_scalar` scalar, the order of the
    wrapper stack on each base layer (`_lycoris_wrappers`, `forward`, the `org_forward` chain), the
    network's `loras` / `unet_loras` / `text_encoder_loras` lists and submodule registrations, and
    train/eval mode, and DoRA's `dora_scale` and `wd_on_out` (`weight_decompose` modules are swapped too).
    A module already swapped through another holder (say the model first, then the network object) is
    replaced by the same lyfast module, never by a second copy.
    """
    if not isinstance(obj, nn.Module) and not any(hasattr(obj, a) for a in _ADAPTER_LISTS):
        raise TypeError(f"lyfast.accelerate needs a LyCORIS network, a model carrying LyCORIS adapters or an "
                        f"adapter module, got {type(obj).__name__}")
    classes = _lycoris_classes()
    olds = _find_adapters(obj, lambda m: type(m) in classes)
    _warn_not_accelerated(obj, classes, bool(olds))
    swapped: Dict[int, nn.Module] = {}
    for old in olds:
        new = old.__dict__.get("_lyfast_replacement")  # swapped earlier through another holder
        if new is None:
            new = _convert(old, classes[type(old)])
            old.__dict__["_lyfast_replacement"] = new  # plain attribute: not a submodule of `old`
        swapped[id(old)] = new
        _relink_wrappers(old, new)
    if swapped:
        _replace_references(obj, swapped)
    logger.info("lyfast.accelerate: %d LyCORIS modules replaced by lyfast modules", len(swapped))
    return len(swapped)


_ADAPTER_LISTS = ("loras", "unet_loras", "text_encoder_loras")


def _warn_not_accelerated(obj, classes, found_any: bool):
    """WARNING naming the LyCORIS modules that stay as they are (algorithms lyfast does not implement), or
    saying that `obj` holds no adapter lyfast could swap: a caller who asked for speed must know."""
    from lycoris.modules.base import LycorisBaseModule

    from .modules.base import LycorisModule

    others = _find_adapters(obj, lambda m: isinstance(m, LycorisBaseModule) and type(m) not in classes)
    if others:
        counts: Dict[str, int] = {}
        for m in others:
            counts[type(m).__name__] = counts.get(type(m).__name__, 0) + 1
        logger.warning("lyfast.accelerate: %d LyCORIS modules not accelerated (%s): lyfast implements only "
                       "LoHa, LoKr and BOFT, so they keep running as LyCORIS modules", len(others),
                       ", ".join(f"{n} x{c}" for n, c in sorted(counts.items())))
    elif not found_any:
        if _find_adapters(obj, lambda m: isinstance(m, LycorisModule)):
            logger.info("lyfast.accelerate: %s already holds lyfast modules only", type(obj).__name__)
        else:
            logger.warning("lyfast.accelerate: no LyCORIS adapter found in %s, nothing was accelerated",
                           type(obj).__name__)


def _find_adapters(obj, wanted) -> List[nn.Module]:
    found: Dict[int, nn.Module] = {}

    def add(m):
        if wanted(m) and id(m) not in found:
            found[id(m)] = m

    for attr in _ADAPTER_LISTS:
        for m in getattr(obj, attr, None) or []:
            add(m)
    if isinstance(obj, nn.Module):
        for m in obj.modules():
            add(m)
            for w in m.__dict__.get("_lycoris_wrappers", None) or []:
                add(w)
    else:
        add(obj)
    return list(found.values())


def _convert(old: nn.Module, cls) -> nn.Module:
    """The lyfast module with `old`'s configuration and `old`'s own Parameter objects."""
    base = old.org_module[0]
    with torch.no_grad():
        sd = {f"{old.lora_name}.{k}": v.detach() for k, v in old.state_dict().items()}
        new = cls.make_module_from_state_dict(old.lora_name, base, *cls.extract_state_dict(sd, old.lora_name))
    old_params = {n: p for n, p in old._parameters.items() if p is not None}
    new_params = {n for n, p in new._parameters.items() if p is not None}
    scalar_param = "scalar" in old_params
    if new_params != set(old_params) - {"scalar"}:
        raise RuntimeError(f"{old.lora_name}: lyfast {cls.__name__} has parameters {sorted(new_params)}, the "
                           f"LyCORIS module {sorted(old_params)}")
    for name, param in old_params.items():
        mine = getattr(new, name)
        if tuple(mine.shape) != tuple(param.shape):
            raise RuntimeError(f"{old.lora_name}.{name}: lyfast shape {tuple(mine.shape)} vs LyCORIS "
                               f"{tuple(param.shape)}")
        setattr(new, name, param)  # the same Parameter object (replaces a `scalar` buffer too)
    for name, buf in old._buffers.items():
        if buf is not None and name in new._buffers and not (scalar_param and name == "scalar"):
            new._buffers[name] = buf.detach().clone()
    # Buffers only lyfast has follow the LyCORIS module's device.
    device = old.dtype_tensor.device if "dtype_tensor" in old._buffers else None
    for name, buf in new._buffers.items():
        if buf is not None and device is not None and buf.device != device and name not in old._buffers:
            new._buffers[name] = buf.to(device)
    for attr in _CARRIED_ATTRS:
        if hasattr(old, attr) and hasattr(new, attr):
            setattr(new, attr, getattr(old, attr))
    # LyCORIS detects some quantized layers only (not torchao's tensor subclasses, not bnb Linear4bit): lyfast's
    # own definition decides, and a quantized base runs in bypass as it would have been built by lyfast.
    new.is_quant = is_quantized_base(base)
    if new.is_quant and not getattr(new, "wd", False):
        new.bypass_mode = True
    for attr in ("drop", "rank_drop"):
        if isinstance(getattr(old, attr, None), nn.Module) and attr in new._modules:
            new._modules[attr] = getattr(old, attr)
    new.train(old.training)
    return new


def _relink_wrappers(old, new):
    """Put `new` where `old` was in the base layer's wrapper stack and forward chain."""
    base = old.org_module[0]
    wrappers = base.__dict__.get("_lycoris_wrappers")
    old_forward = old.forward
    if wrappers:
        for i, w in enumerate(wrappers):
            if w is old:
                wrappers[i] = new
        for w in wrappers:
            if w is not new and getattr(w, "org_forward", None) == old_forward:
                w.org_forward = new.forward
    if base.__dict__.get("forward") == old_forward:
        base.forward = new.forward


def _replace_references(obj, swapped: Dict[int, nn.Module]):
    """Network lists and submodule registrations that pointed at the old modules."""

    def fix_lists(holder):
        try:
            items = list(vars(holder).items())
        except TypeError:  # no __dict__
            return
        for attr, value in items:
            if isinstance(value, list) and any(id(v) in swapped for v in value):
                value[:] = [swapped.get(id(v), v) for v in value]

    fix_lists(obj)
    if isinstance(obj, nn.Module):
        for module in list(obj.modules()):
            for key, child in list(module._modules.items()):
                if child is not None and id(child) in swapped:
                    module._modules[key] = swapped[id(child)]
            if module is not obj and any(isinstance(v, list) for v in vars(module).values()):
                fix_lists(module)
