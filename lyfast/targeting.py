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

import torch.nn as nn

from .config import check_algo, network_module_dict

logger = logging.getLogger("lyfast")

def _is_fp8_weight_only_linear(module) -> bool:
    return type(module).__name__ == "Fp8Linear" and all(
        hasattr(module, a) for a in ("in_features", "out_features", "weight", "weight_scale"))


def _linear_target(module, algo, weight_decompose=False) -> bool:
    if _is_fp8_weight_only_linear(module):  # LyCORIS routes these through bypass for loha/lokr only
        return algo in ("loha", "lokr") and (algo == "lokr" or not weight_decompose)
    return isinstance(module, nn.Linear)


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
        return [built[n] for n in names], matched_modules, matched_names


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

    def make(lora_name, module, algo, config):
        config = dict(config)
        dim = config.pop("dim", None)
        alpha = config.pop("alpha", None)
        use_tucker = config.pop("use_tucker", net.use_tucker)
        kwargs = {**root_kwargs, **config}
        algo = check_algo(algo)
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
