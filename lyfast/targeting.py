"""Which layers get adapters: LyCORIS 4.1.3's module walk and its per-layer dim/alpha rules, in one place.

A module is adapted when its class name is in the preset's target modules (then every Linear/Conv inside it,
itself included, gets an adapter) or its path matches a target name (regex `re.match`, or fnmatch with
`use_fnmatch`). Linear and convs whose first kernel dim is 1 get `linear_dim/linear_alpha`; other convs get
`conv_dim/conv_alpha`, or nothing when `conv_dim` is 0. The adapter of `a.b.c` is named `lycoris_a_b_c`.
"""
from __future__ import annotations

import fnmatch
import logging
import re
from typing import Dict, List

import torch
import torch.nn as nn
from torch.utils._python_dispatch import is_traceable_wrapper_subclass

logger = logging.getLogger("lyfast")

# This file imports nothing of lyfast at import time (config is imported where used): the modules read the
# definition below too, and config imports the modules.

# ---------------------------------------------------------------------------------------------------------
# Base layers whose weight lyfast must not read (quantized, fp8-storage, re-implemented forwards).
# ---------------------------------------------------------------------------------------------------------
_PLAIN_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
# A weight an op may read as it is: a float dtype matmuls take (not fp8 storage, not bitsandbytes' packed
# int8/uint8), and no tensor subclass that wraps packed data (torchao, optimum-quanto and float8 training
# tensors all flatten as wrapper subclasses; FakeTensors under torch.compile do not, so compiled graphs keep
# the fused routes).
PLAIN_WEIGHT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def plain_weight(weight) -> bool:
    """Whether `weight` is an ordinary floating tensor that F.linear / F.convNd may read directly."""
    return (isinstance(weight, torch.Tensor) and weight.dtype in PLAIN_WEIGHT_DTYPES
            and not is_traceable_wrapper_subclass(weight))


def linear_like(module) -> bool:
    """A Linear by behaviour: nn.Linear (any subclass) or a layer with in_features/out_features and a 2-D
    weight of that shape (fp8-storage layers such as ComfyUI's and OneTrainer's `Fp8Linear`)."""
    if isinstance(module, nn.Linear):
        return True
    weight = getattr(module, "weight", None)
    return (isinstance(getattr(module, "in_features", None), int) and isinstance(getattr(module, "out_features", None), int)
            and isinstance(weight, torch.Tensor) and tuple(weight.shape) == (module.out_features, module.in_features))


def is_quantized_base(module) -> bool:
    """Whether `module` is a base layer whose weight lyfast must not read, decided by behaviour, not by a
    list of class names (so a new quantization library needs no code change):

    * its weight is not a plain floating tensor: bitsandbytes `Linear4bit` (nf4/fp4, any subclass) and
      `Linear8bitLt` (packed uint8/int8), torchao `quantize_` layers (the module stays nn.Linear, the weight
      becomes an int8/int4/float8 tensor subclass), optimum-quanto `QLinear`/`QConv2d` once frozen, fp8-storage
      layers (a float8 weight with a scale);
    * or its class replaces nn.Linear's / nn.ConvNd's forward (optimum-quanto before freezing, torchao's
      `Float8Linear`, any Linear subclass that computes something of its own), or it is only Linear-like.

    Such layers get bypass semantics: the layer's own forward and backward plus the adapter computed without
    ΔW; merging into them is refused. Plain nn.Linear / nn.ConvNd layers over bf16/fp16/fp32/fp64 weights are
    not quantized bases."""
    plain = next((c for c in _PLAIN_LAYERS if isinstance(module, c)), None)
    if plain is None:
        return linear_like(module)
    return type(module).forward is not plain.forward or not plain_weight(getattr(module, "weight", None))


def compute_dtype(layer) -> torch.dtype:
    """The floating dtype `layer` computes in: its weight's when plain; for a quantized base its own
    `compute_dtype` (bitsandbytes), else its bias's, else fp32."""
    weight = getattr(layer, "weight", None)
    if plain_weight(weight):
        return weight.dtype
    for cand in (getattr(layer, "compute_dtype", None), getattr(getattr(layer, "bias", None), "dtype", None)):
        if isinstance(cand, torch.dtype) and cand.is_floating_point:
            return cand
    return torch.float32


def _layer_class_name(module) -> str:
    """The name a target_module list matches: the class's own, except that a quantized base layer answers to
    the plain class it stands for ("QLinear", "Linear4bit", "Float8Linear", "Fp8Linear" -> "Linear";
    "QConv2d" -> "Conv2d"), so presets select quantized layers as they select Linear/Conv (LyCORIS matches
    the class name only and adapts none of them)."""
    if is_quantized_base(module):
        plain = next((c for c in _PLAIN_LAYERS if isinstance(module, c)), nn.Linear)
        return plain.__name__
    return type(module).__name__


def _is_fp8_weight_only_linear(module) -> bool:  # the name kohya, files and network have used
    return not isinstance(module, nn.Linear) and linear_like(module)


def _linear_target(module, algo, weight_decompose=False) -> bool:
    """Whether `module` gets the linear dim/alpha: every Linear-like layer, quantized or not, except where
    the module would reject it (DoRA on a quantized conv, whose W0's norms lyfast cannot reach: skipped with
    a warning by the factory)."""
    return linear_like(module)


# ---------------------------------------------------------------------------------------------------------
# Module selection, shared by LycorisNetwork and the kohya network.
# ---------------------------------------------------------------------------------------------------------
class _Targeting:
    """Walks a model the way LyCORIS 4.1.3 does and builds one adapter per selected Linear/Conv.

    `make(lora_name, module, algo, config)` builds (or declines with None) one adapter. Names already
    built are skipped, so a layer reached twice (by class and by name) gets one adapter, not a crash.
    """

    def __init__(self, net, make, module_algo_map, name_algo_map, use_fnmatch, exclude, fix_root_prefix):
        self.net, self.make = net, make
        self.module_algo_map = module_algo_map or {}
        self.name_algo_map = name_algo_map or {}
        self.use_fnmatch = use_fnmatch
        self.exclude = list(exclude or [])
        self.fix_root_prefix = fix_root_prefix  # generic wrapper: "lycoris_.x" -> "lycoris.x"

    def match(self, pattern, name) -> bool:
        return fnmatch.fnmatch(name, pattern) if self.use_fnmatch else re.match(pattern, name) is not None

    def excluded(self, name) -> bool:
        return bool(name) and bool(self.exclude) and (
            name in self.exclude or any(self.match(p, name) for p in self.exclude))

    def conf_for_name(self, name):
        if name in self.name_algo_map:
            return self.name_algo_map[name]
        for pattern, conf in self.name_algo_map.items():
            if self.match(pattern, name):
                return conf
        return None

    def walk_block(self, prefix, block, algo, config, path, built: dict, names: list):
        """Adapters for every supported layer inside `block` (itself included)."""
        for name, module in block.named_modules():
            full = ".".join(p for p in (path, name) if p)
            if self.excluded(full):
                continue
            cls_name = type(module).__name__
            if module is not block and cls_name in self.module_algo_map:
                sub = self.module_algo_map[cls_name]
                self.walk_block(f"{prefix}_{name}", module, sub.get("algo", algo), sub, full, built, names)
                continue
            lora_name = f"{prefix}.{name}" if name else prefix
            if self.fix_root_prefix:
                lora_name = lora_name.replace(f"{self.fix_root_prefix}_.", f"{self.fix_root_prefix}.")
            lora_name = lora_name.replace(".", "_")
            if lora_name in built:
                continue
            lora = self.make(lora_name, module, algo, config)
            if lora is not None:
                built[lora_name] = lora
                names.append(lora_name)

    def build(self, prefix, root, target_modules, target_names, network_module, built=None):
        """(adapters in LyCORIS order, matched class names, matched name patterns)."""
        built = {} if built is None else built
        names: List[str] = []
        matched_modules, matched_names = set(), set()
        for name, module in root.named_modules():
            if self.excluded(name):
                continue
            cls_name = type(module).__name__
            name_hit = any(self.match(t, name) for t in target_names)
            if _layer_class_name(module) in target_modules and cls_name not in target_modules:
                cls_name = _layer_class_name(module)  # a quantized Linear/Conv matched as the plain class
            if cls_name in target_modules and not name_hit:
                matched_modules.add(cls_name)
                conf = self.module_algo_map.get(cls_name, {})
                self.walk_block(f"{prefix}_{name}", module, conf.get("algo", network_module), conf, name,
                                built, names)
            elif name in target_names or name_hit:
                matched_modules.add(cls_name)
                matched_names.update(t for t in target_names if t == name or self.match(t, name))
                conf = self.conf_for_name(name)
                lora_name = f"{prefix}.{name}".replace(".", "_")
                if lora_name in built:
                    if conf is not None:
                        logger.warning("name_algo_map entry for %r does not apply: the layer already got an "
                                       "adapter through its target_module block (exclude it there, or target "
                                       "it by name only)", name)
                    continue
                if conf is None:
                    conf = self.module_algo_map.get(cls_name, {})
                lora = self.make(lora_name, module, conf.get("algo", network_module), conf)
                if lora is not None:
                    built[lora_name] = lora
                    names.append(lora_name)
        loras = [built[n] for n in names]
        quantized = {}
        for lora in loras:
            if getattr(lora, "is_quant", False):
                quantized.setdefault(type(lora.org_module[0]).__name__, []).append(lora.lora_name)
        if quantized:  # once per build, as LyCORIS logs its forced bypass
            logger.info("%s: %d quantized base layers run in bypass (the layer's own forward plus the adapter, "
                        "no merge): %s", prefix, sum(map(len, quantized.values())),
                        ", ".join(f"{len(v)} {k}" for k, v in sorted(quantized.items())))
        return loras, matched_modules, matched_names


def _warn_unmatched(where, target_modules, matched_modules, target_names, matched_names):
    missing_modules = sorted(set(target_modules) - set(matched_modules))
    missing_names = sorted(set(target_names) - set(matched_names))
    if missing_modules:
        logger.warning("%sNo modules matched the following target module classes: %s", where, missing_modules)
    if missing_names:
        logger.warning("%sNo modules matched the following target names/patterns: %s", where, missing_names)


def _algo_table(loras) -> Dict[str, int]:
    table: Dict[str, int] = {}
    for lora in loras:
        table[type(lora).__name__] = table.get(type(lora).__name__, 0) + 1
    return table



def _module_factory(net, root_kwargs):
    """The per-layer constructor: LyCORIS's dim/alpha rules and positional argument order."""
    from .config import check_algo, network_module_dict

    skipped = []

    def make(lora_name, module, algo, config):
        config = dict(config)
        dim = config.pop("dim", None)
        alpha = config.pop("alpha", None)
        use_tucker = config.pop("use_tucker", net.use_tucker)
        kwargs = {**root_kwargs, **config}
        algo = check_algo(algo)
        if kwargs.get("weight_decompose") and is_quantized_base(module) and not linear_like(module):
            if not skipped:
                logger.warning("%s (%s): DoRA (dora_wd) on a quantized conv is not supported: no adapter on it (nor "
                               "on any other quantized conv; dequantize those layers or train without dora_wd)",
                               lora_name, type(module).__name__)
            skipped.append(lora_name)
            return None
        if _linear_target(module, algo, kwargs.get("weight_decompose", False)) and net.lora_dim > 0:
            dim, alpha = dim or net.lora_dim, alpha or net.alpha
        elif isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            if module.kernel_size[0] == 1 and net.lora_dim > 0:
                dim, alpha = dim or net.lora_dim, alpha or net.alpha
            elif net.conv_lora_dim > 0 or dim:
                dim, alpha = dim or net.conv_lora_dim, alpha or net.conv_alpha
            else:
                return None
        else:
            return None
        cls = network_module_dict[algo]
        return cls(lora_name, module, net.multiplier, dim, alpha, net.dropout, net.rank_dropout,
                   net.module_dropout, use_tucker, **kwargs)

    return make


def _short(items, limit=8):
    items = list(items)
    return items if len(items) <= limit else items[:limit] + [f"... ({len(items) - limit} more)"]
