"""The LyCORIS-style network wrapper: `create_lycoris`, `create_lycoris_from_weights`, `LycorisNetwork`.

Same kwargs, aliases, presets, targeting and module names as lycoris-lora 4.1.3's `lycoris.wrapper`, so
swapping `import lycoris` for `import lyfast` changes nothing but speed. Only LoHa, LoKr and butterfly-OFT
exist here; every other algorithm name raises instead of silently becoming something else.

Targeting, in short: a module is adapted when its class name is in the preset's target modules (then every
Linear/Conv inside it, itself included, gets an adapter) or its path matches a target name (regex
`re.match`, or fnmatch with `use_fnmatch`). Linear and convs whose first kernel dim is 1 get
`linear_dim/linear_alpha`; other convs get `conv_dim/conv_alpha`, or nothing when `conv_dim` is 0.
The adapter of `a.b.c` is named `lycoris_a_b_c` and owns the state-dict keys `lycoris_a_b_c.<param>`.
"""
from __future__ import annotations

import copy
import fnmatch
import logging
import math
import os
import re
import tempfile
from typing import Any, Dict, List, Tuple

import torch
import torch.nn as nn

from .modules.boft import ButterflyOFTModule
from .modules.loha import LohaModule
from .modules.lokr import LokrModule

logger = logging.getLogger("lyfast")

__all__ = [
    "create_lycoris",
    "create_lycoris_from_weights",
    "LycorisNetwork",
    "network_module_dict",
    "MODULE_LIST",
    "PRESET",
    "VALID_PRESET_KEYS",
    "SUPPORTED_ALGOS",
]

network_module_dict = {"loha": LohaModule, "lokr": LokrModule, "boft": ButterflyOFTModule}
MODULE_LIST = [LohaModule, LokrModule, ButterflyOFTModule]
SUPPORTED_ALGOS = tuple(network_module_dict)

# Algorithms LyCORIS 4.1.3 knows and lyfast does not: named in errors so nobody gets a silent substitute.
_OTHER_LYCORIS_ALGOS = ("lora", "locon", "dylora", "glora", "full", "diag-oft", "ia3", "tlora")

# Old kwarg spellings LyCORIS still accepts, mapped to the current ones.
DEPRECATED_KWARGS = {
    "disable_conv_cp": "use_tucker",  # inverted meaning, see _parse_use_tucker
    "use_cp": "use_tucker",
    "use_conv_cp": "use_tucker",
    "constrain": "constraint",
}

VALID_PRESET_KEYS = (
    "enable_conv",
    "target_module",
    "target_name",
    "module_algo_map",
    "name_algo_map",
    "lora_prefix",
    "use_fnmatch",
    "unet_target_module",
    "unet_target_name",
    "text_encoder_target_module",
    "text_encoder_target_name",
    "exclude_name",
)

# ---------------------------------------------------------------------------------------------------------
# Built-in presets (the values of lycoris-lora 4.1.3's `lycoris.config.PRESET`). The generic wrapper only
# reads `enable_conv` from them (their target lists are the `unet_*` / `text_encoder_*` keys, which only
# the kohya network reads) -- the same as LyCORIS.
# ---------------------------------------------------------------------------------------------------------
_DIT_BLOCKS = [
    "HunYuanDiTBlock", "DoubleStreamBlock", "SingleStreamBlock", "SingleDiTBlock", "MMDoubleStreamBlock",
    "MMSingleStreamBlock", "WanAttentionBlock", "HunyuanVideoTransformerBlock",
    "HunyuanVideoSingleTransformerBlock", "JointTransformerBlock", "FinalLayer", "QwenImageTransformerBlock",
    "LensTransformerBlock", "Ideogram4TransformerBlock", "ZImageTransformerBlock", "AceStepEncoderLayer",
    "AceStepDiTLayer", "TextFusionBlock", "Block", "PatchEmbed", "TimestepEmbedding",
    "LLMAdapterTransformerBlock",
]
_UNET_BLOCKS_ALL = ["Transformer2DModel", "ResnetBlock2D", "Downsample2D", "Upsample2D", *_DIT_BLOCKS]
_UNET_NAMES_ALL = ["conv_in", "conv_out", "time_embedding.linear_1", "time_embedding.linear_2"]
_TE_BLOCKS_ALL = [
    "CLIPAttention", "CLIPSdpaAttention", "CLIPMLP", "MT5Block", "BertLayer", "Gemma2Attention",
    "Gemma2FlashAttention2", "Gemma2SdpaAttention", "Gemma2MLP", "Qwen3Attention", "Qwen3FlashAttention2",
    "Qwen3SdpaAttention", "Qwen3MLP",
]


def _preset(enable_conv, unet_module, unet_name, te_module, te_name=()):
    return {
        "enable_conv": enable_conv,
        "unet_target_module": list(unet_module),
        "unet_target_name": list(unet_name),
        "text_encoder_target_module": list(te_module),
        "text_encoder_target_name": list(te_name),
    }


PRESET: Dict[str, Dict[str, Any]] = {
    "full": _preset(True, _UNET_BLOCKS_ALL, _UNET_NAMES_ALL, _TE_BLOCKS_ALL),
    "full-lin": _preset(False, ["Transformer2DModel", "ResnetBlock2D", *_DIT_BLOCKS], _UNET_NAMES_ALL[2:],
                        _TE_BLOCKS_ALL),
    "attn-mlp": _preset(False, ["Transformer2DModel", *_DIT_BLOCKS], [], _TE_BLOCKS_ALL),
    "attn-only": _preset(False, ["CrossAttention", "SelfAttention"], [], [
        "CLIPAttention", "CLIPSdpaAttention", "BertAttention", "MT5LayerSelfAttention", "Gemma2Attention",
        "Gemma2FlashAttention2", "Gemma2SdpaAttention"]),
    "unet-only": _preset(True, _UNET_BLOCKS_ALL, _UNET_NAMES_ALL, []),
    "unet-transformer-only": _preset(False, ["Transformer2DModel", *_DIT_BLOCKS], [], []),
    "unet-convblock-only": _preset(True, ["ResnetBlock2D", "Downsample2D", "Upsample2D"], ["conv_in", "conv_out"],
                                   []),
}
# LyCORIS's "ia3" preset only makes sense with the IA3 algorithm, which lyfast does not implement.
_UNSUPPORTED_PRESETS = {"ia3": "ia3"}


# ---------------------------------------------------------------------------------------------------------
# kwarg parsing (kwargs may be strings: sd-scripts passes `--network_args` verbatim)
# ---------------------------------------------------------------------------------------------------------
_FALSE_STRINGS = frozenset({"false", "0", "no", "off", "none", ""})
_TRUE_STRINGS = frozenset({"true", "1", "yes", "on"})


def str_bool(value, name: str = "flag") -> bool:
    """A flag from a bool, number or string. Unlike LyCORIS (where every string but "false" is True),
    "0", "no", "off", "none" and "" are False too, and a string that is neither true nor false ("Ture")
    is a ValueError naming `name`."""
    if isinstance(value, str):
        word = value.strip().lower()
        if word in _FALSE_STRINGS:
            return False
        if word in _TRUE_STRINGS:
            return True
        raise ValueError(f"{name}={value!r} is not a boolean (true/false, 1/0, yes/no, on/off)")
    return bool(value)


def _as_int(value, default, name: str = "value"):
    """An integer from an int or a string ("4", "-1", "4.0"); a ValueError naming `name` for anything else
    ("2.7" is not silently truncated to 2, as in LyCORIS's int())."""
    if value is None or (isinstance(value, str) and value.strip() == ""):
        return default
    number = _as_float(value, default, name)
    if isinstance(value, bool) or not float(number).is_integer():
        raise ValueError(f"{name}={value!r} is not an integer")
    return int(number)


def _as_float(value, default, name: str = "value"):
    if value is None or (isinstance(value, str) and value.strip() == ""):
        return default
    try:
        return float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name}={value!r} is not a number") from None


def _apply_deprecated(kwargs: dict) -> dict:
    kwargs = dict(kwargs)
    for old in [k for k in kwargs if k in DEPRECATED_KWARGS]:
        logger.warning("%s is deprecated. Please use %s instead.", old, DEPRECATED_KWARGS[old])
        if old == "constrain":
            kwargs.setdefault("constraint", kwargs[old])
    return kwargs


def _parse_use_tucker(kwargs) -> bool:
    # `disable_conv_cp=True` means "no Tucker" (LyCORIS 4.1.3 remaps it onto use_tucker=True: inverted).
    enabled = any(str_bool(kwargs.get(k, False), k) for k in ("use_tucker", "use_cp", "use_conv_cp"))
    if "disable_conv_cp" in kwargs:
        enabled = enabled or not str_bool(kwargs["disable_conv_cp"], "disable_conv_cp")
    return enabled


def check_algo(algo) -> str:
    """Lower-cased algorithm name, or a ValueError naming it and the supported ones."""
    name = str(algo).lower()
    if name not in network_module_dict:
        known = " (a LyCORIS algorithm lyfast does not implement)" if name in _OTHER_LYCORIS_ALGOS else ""
        raise ValueError(
            f"algo {algo!r}{known} is not supported by lyfast; supported algorithms: "
            f"{', '.join(SUPPORTED_ALGOS)}. Use lycoris-lora for other algorithms."
        )
    return name


def parse_network_kwargs(kwargs: dict, linear_dim, linear_alpha, *, kohya: bool) -> dict:
    """Turn `create_lycoris` / `create_network` kwargs (strings allowed) into `LycorisNetwork` arguments."""
    kwargs = _apply_deprecated(kwargs)

    def flag(key, default=False):
        return str_bool(kwargs.get(key, default), key)

    def integer(key, default):
        return _as_int(kwargs.get(key), default, key)

    def number(key, default):
        return _as_float(kwargs.get(key), default, key)

    linear_dim = 4 if linear_dim is None else _as_int(linear_dim, 4, "linear_dim")
    conv_dim = integer("conv_dim", linear_dim)
    conv_alpha = number("conv_alpha", None) or linear_alpha
    algo = check_algo(kwargs.get("algo") or "lora")
    if flag("train_norm"):
        raise ValueError("train_norm=True (norm-layer training) is not supported by lyfast; use lycoris-lora "
                         "or leave train_norm off.")
    weight_decompose = str_bool(kwargs.get("dora_wd", kwargs.get("weight_decompose", False)), "dora_wd")
    if not kohya and "rs_lora" in kwargs:
        logger.warning("rs_lora is ignored by create_lycoris (as in LyCORIS 4.1.3); lyfast.kohya honours it.")
    out = dict(
        lora_dim=linear_dim,
        conv_lora_dim=conv_dim,
        alpha=linear_alpha,
        conv_alpha=conv_alpha,
        dropout=number("dropout", 0.0),
        rank_dropout=number("rank_dropout", 0.0),
        module_dropout=number("module_dropout", 0.0),
        use_tucker=_parse_use_tucker(kwargs),
        use_scalar=flag("use_scalar"),
        network_module=algo,
        train_norm=False,
        decompose_both=flag("decompose_both"),
        factor=integer("factor", -1),
        block_size=integer("block_size", 4) or 4,
        constraint=number("constraint", 0.0) or 0.0,
        rescaled=flag("rescaled"),
        weight_decompose=weight_decompose,
        wd_on_out=flag("wd_on_output", True),
        full_matrix=flag("full_matrix"),
        bypass_mode=flag("bypass_mode"),
        unbalanced_factorization=flag("unbalanced_factorization"),
        train_llm_adapter=flag("train_llm_adapter"),
    )
    if kohya:
        out["rs_lora"] = flag("rs_lora")
        out["train_t5xxl"] = flag("train_t5xxl")
    return out


class UnknownPresetKeyError(ValueError, KeyError):
    """A preset key lyfast (and LyCORIS) does not know: a ValueError like every lyfast input error, and the
    KeyError LyCORIS raises, for callers that catch that."""

    __str__ = ValueError.__str__  # KeyError's would wrap the message in quotes


def resolve_preset(preset) -> Dict[str, Any]:
    """A preset dict from a built-in name, a toml path, or a dict; unknown keys raise UnknownPresetKeyError
    (a ValueError, and a KeyError as in LyCORIS)."""
    if isinstance(preset, dict):
        data = copy.deepcopy(preset)
    elif preset in PRESET:
        data = copy.deepcopy(PRESET[preset])
    elif preset in _UNSUPPORTED_PRESETS:
        raise ValueError(f"preset {preset!r} targets the {_UNSUPPORTED_PRESETS[preset]} algorithm, which lyfast "
                         f"does not implement (supported: {', '.join(SUPPORTED_ALGOS)})")
    elif isinstance(preset, (str, os.PathLike)) and os.path.isfile(preset):
        data = _read_toml(preset)
    else:
        raise ValueError(f"unknown preset {preset!r}: not a built-in ({', '.join(PRESET)}) nor a toml file")
    unknown = [k for k in data if k not in VALID_PRESET_KEYS]
    if unknown:
        raise UnknownPresetKeyError(f"Unknown preset key(s) {unknown}. Valid keys: {VALID_PRESET_KEYS}")
    for key in _PRESET_LIST_KEYS:
        value = data.get(key)
        if isinstance(value, (str, bytes)) or not (value is None or isinstance(value, (list, tuple, set))):
            raise TypeError(f"preset {key} must be a list of strings, got {value!r}"
                            + (f" (write [{value!r}]: a string would be matched character by character)"
                               if isinstance(value, str) else ""))
        if value is not None and not all(isinstance(v, str) for v in value):
            raise TypeError(f"preset {key} must be a list of strings, got {value!r}")
    for key in ("module_algo_map", "name_algo_map"):
        for target, override in (data.get(key) or {}).items():
            if not isinstance(override, dict):
                raise ValueError(f"preset {key}[{target!r}] must be a table, got {override!r}")
            if "algo" in override:
                check_algo(override["algo"])
            typos = sorted(set(override) - _override_keys())
            if typos:
                raise ValueError(f"preset {key}[{target!r}] has unknown key(s) {typos}; valid keys: "
                                 f"{sorted(_override_keys())}")
    return data


_PRESET_LIST_KEYS = ("target_module", "target_name", "unet_target_module", "unet_target_name",
                     "text_encoder_target_module", "text_encoder_target_name", "exclude_name")


def _override_keys() -> set:
    """Keys a module_algo_map / name_algo_map override may set: `algo`, `dim`, `alpha` and the adapter
    constructors' keyword arguments."""
    import inspect

    keys = {"algo", "dim", "alpha"}
    for cls in MODULE_LIST:
        keys |= {n for n, p in inspect.signature(cls.__init__).parameters.items()
                 if p.kind is p.POSITIONAL_OR_KEYWORD}
    return keys - {"self", "lora_name", "org_module", "lora_dim", "multiplier"}


def _read_toml(path):
    try:
        import tomllib

        with open(path, "rb") as f:
            return tomllib.load(f)
    except ImportError:  # Python 3.10
        import toml

        return toml.load(path)


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


# ---------------------------------------------------------------------------------------------------------
# The network
# ---------------------------------------------------------------------------------------------------------
class LycorisNetwork(nn.Module):
    """A set of LoHa/LoKr/BOFT adapters over one model, with LyCORIS 4.1.3's API.

    Like LyCORIS, `apply_preset` sets *class* attributes (so it affects later networks too), adapters are
    created in `__init__` but only hooked into the model (and registered as submodules, hence in
    `state_dict()`/`parameters()`) by `apply_to()`.
    """

    ENABLE_CONV = True
    TARGET_REPLACE_MODULE = ["Linear", "Conv1d", "Conv2d", "Conv3d", "GroupNorm", "LayerNorm"]
    TARGET_REPLACE_NAME: List[str] = []
    LORA_PREFIX = "lycoris"
    MODULE_ALGO_MAP: Dict[str, Dict[str, Any]] = {}
    NAME_ALGO_MAP: Dict[str, Dict[str, Any]] = {}
    USE_FNMATCH = False
    TARGET_EXCLUDE_NAME: List[str] = []

    @classmethod
    def apply_preset(cls, preset):
        """Set the targeting class attributes from a preset (built-in name, toml path or dict)."""
        preset = resolve_preset(preset)
        for key, attr in (("enable_conv", "ENABLE_CONV"), ("target_module", "TARGET_REPLACE_MODULE"),
                          ("target_name", "TARGET_REPLACE_NAME"), ("module_algo_map", "MODULE_ALGO_MAP"),
                          ("name_algo_map", "NAME_ALGO_MAP"), ("lora_prefix", "LORA_PREFIX"),
                          ("use_fnmatch", "USE_FNMATCH"), ("exclude_name", "TARGET_EXCLUDE_NAME")):
            if key in preset:
                setattr(cls, attr, preset[key])
        return cls

    def __init__(
        self,
        module: nn.Module,
        multiplier=1.0,
        lora_dim=4,
        conv_lora_dim=4,
        alpha=1,
        conv_alpha=1,
        use_tucker=False,
        dropout=0,
        rank_dropout=0,
        module_dropout=0,
        network_module: str = "locon",
        norm_modules=None,
        train_norm=False,
        init_only=False,
        warn_on_unmatched=True,
        train_llm_adapter=False,
        **kwargs,
    ) -> None:
        super().__init__()
        self.weights_sd = None
        self.loras: List[nn.Module] = []
        self.algo_table: Dict[str, int] = {}
        if init_only:
            self._set_hparams(1, 0, 0, 1, 1, 0, 0, 0, False, False)
            return
        if train_norm:
            raise ValueError("train_norm=True (norm-layer training) is not supported by lyfast")
        network_module = check_algo(network_module)
        self._set_hparams(multiplier, lora_dim, conv_lora_dim if self.ENABLE_CONV else 0, alpha, conv_alpha,
                          dropout, rank_dropout, module_dropout, use_tucker, train_llm_adapter)
        make = _module_factory(self, kwargs)
        targeting = _Targeting(self, make, self.MODULE_ALGO_MAP, self.NAME_ALGO_MAP, self.USE_FNMATCH,
                               self.TARGET_EXCLUDE_NAME, fix_root_prefix=LycorisNetwork.LORA_PREFIX)
        target_modules = set(LycorisNetwork.TARGET_REPLACE_MODULE) | set(LycorisNetwork.MODULE_ALGO_MAP)
        if not self.train_llm_adapter:
            target_modules.discard("LLMAdapterTransformerBlock")
        target_names = list(dict.fromkeys([*LycorisNetwork.TARGET_REPLACE_NAME, *LycorisNetwork.NAME_ALGO_MAP]))
        self.loras, matched_modules, matched_names = targeting.build(
            LycorisNetwork.LORA_PREFIX, module, target_modules, target_names, network_module)
        logger.info("create LyCORIS (lyfast): %d modules.", len(self.loras))
        if warn_on_unmatched:
            _warn_unmatched("", target_modules, matched_modules, target_names, matched_names)
            if not self.loras:
                logger.warning("No LyCORIS modules were created: check the preset/targets against the model.")
        self.algo_table = _algo_table(self.loras)

    def _set_hparams(self, multiplier, lora_dim, conv_lora_dim, alpha, conv_alpha, dropout, rank_dropout,
                     module_dropout, use_tucker, train_llm_adapter):
        self.multiplier = multiplier
        self.lora_dim = lora_dim
        self.conv_lora_dim = int(conv_lora_dim)
        self.alpha = alpha
        self.conv_alpha = float(conv_alpha)
        self.dropout = dropout
        self.rank_dropout = rank_dropout
        self.module_dropout = module_dropout
        self.use_tucker = use_tucker
        self.train_llm_adapter = train_llm_adapter

    # --- LyCORIS 4.1.3 public methods -------------------------------------------------------------------
    def match_fn(self, pattern: str, name: str) -> bool:
        return fnmatch.fnmatch(name, pattern) if self.USE_FNMATCH else re.match(pattern, name) is not None

    def set_multiplier(self, multiplier):
        self.multiplier = multiplier
        for lora in self.loras:
            lora.multiplier = multiplier

    def load_weights(self, file):
        """Load a weight file into the (already created) adapters; returns LyCORIS's info dict and warns,
        naming them, about keys that were missing or not used."""
        self.weights_sd = load_state_dict_file(file)
        return self._load_weights_sd(self.weights_sd)

    def _load_weights_sd(self, weights_sd):
        weights_sd = checked_weights(weights_sd)
        own = set(self.state_dict())
        dora = sorted(k for k in weights_sd if k.rsplit(".", 1)[-1] == "dora_scale" and k not in own)
        if dora:  # dropping it (LyCORIS warns and does) would leave a model that differs from the file's by O(1)
            raise ValueError(f"{dora[0]}: the file is a DoRA adapter ({len(dora)} dora_scale keys) but this "
                             "network's adapters have no dora_scale: create the network with dora_wd=True "
                             "(weight_decompose) or load the file with create_lycoris_from_weights")
        missing, unexpected = self.load_state_dict(weights_sd, strict=False)
        state = {}
        if missing:
            state["missing keys"] = missing
        if unexpected:
            state["unexpected keys"] = unexpected
        if self._modules and (missing or unexpected):
            logger.warning("weights only partly loaded: missing keys %s; unexpected keys %s",
                           _short(missing), _short(unexpected))
        return state

    def apply_to(self):
        """Hook every adapter into its layer and register it as a submodule of the network."""
        for lora in self.loras:
            lora.apply_to()
            self.add_module(lora.lora_name, lora)
        if self.weights_sd:
            info = self._load_weights_sd(self.weights_sd)
            logger.info("weights are loaded: %s", info)

    def is_mergeable(self):
        return not any(_is_fp8_weight_only_linear(lora.org_module[0]) for lora in self.loras)

    def _ensure_mergeable(self):
        if not self.is_mergeable():
            raise RuntimeError("Merging LyCORIS modules into weight-only FP8 Linear is not supported.")

    def restore(self):
        for lora in self.loras:
            lora.restore()

    def merge_to(self, weight=1.0, *, precise: bool = False):
        self._ensure_mergeable()
        for lora in self.loras:
            lora.merge_to(weight, precise=precise)

    def onfly_merge(self, weight=1.0):
        self._ensure_mergeable()
        for lora in self.loras:
            lora.onfly_merge(weight)

    def onfly_restore(self):
        for lora in self.loras:
            lora.onfly_restore()

    def apply_max_norm_regularization(self, max_norm_value, device):
        """(number of adapters scaled down, mean norm, max norm) -- norms after scaling, as in LyCORIS."""
        return _max_norm(self.loras, max_norm_value, device)

    def enable_gradient_checkpointing(self):
        # Nothing to checkpoint inside an adapter; like LyCORIS, only the flag is set.
        for module in self.modules():
            module.grad_ckpt = True

    def prepare_optimizer_params(self, lr):
        self.requires_grad_(True)
        params = [p for lora in self.loras for p in lora.parameters()]
        group = {"params": params}
        if lr is not None:
            group["lr"] = lr
        return [group]

    def prepare_grad_etc(self, *args):
        self.requires_grad_(True)

    def on_epoch_start(self, *args):
        self.train()

    def on_step_start(self, *args):
        pass

    def get_trainable_params(self, *args):
        return self.parameters()

    def save_weights(self, file, dtype, metadata):
        """Save the adapters' state dict: safetensors for `*.safetensors` (with `metadata`), torch.save
        otherwise; every tensor (alpha included) is cast to `dtype` when given."""
        save_state_dict_file(self.state_dict(), file, dtype, metadata)


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


def _max_norm(loras, max_norm_value, device):
    scaled_count, norms = 0, []
    for lora in loras:
        scaled, norm = lora.apply_max_norm(max_norm_value, device)
        if scaled is None:
            continue
        norms.append(norm)
        scaled_count += scaled
    if scaled_count == 0:
        return 0, 0, 0
    return scaled_count, sum(norms) / len(norms), max(norms)


def _short(items, limit=8):
    items = list(items)
    return items if len(items) <= limit else items[:limit] + [f"... ({len(items) - limit} more)"]


# ---------------------------------------------------------------------------------------------------------
# Files
# ---------------------------------------------------------------------------------------------------------
def is_safetensors_file(file) -> bool:
    """Whether `file` holds safetensors data: an 8-byte little-endian header length, then a JSON object
    (decided from the content, not the suffix, so "model.SAFETENSORS" or a renamed file is read right)."""
    with open(file, "rb") as f:
        size = int.from_bytes(f.read(8).ljust(8, b"\0"), "little")
        if not 2 <= size <= os.fstat(f.fileno()).st_size - 8:
            return False
        header = f.read(size)
    return header.startswith(b"{") and header.rstrip().endswith(b"}")


def load_state_dict_file(file) -> Dict[str, torch.Tensor]:
    """A state dict from a safetensors file or a torch.save file, told apart by content. torch files are read
    with weights_only=True: a file that needs arbitrary unpickling is refused, never unpickled."""
    if is_safetensors_file(file):
        from safetensors.torch import load_file

        return load_file(file)
    with open(file, "rb") as f:  # a file object: torch.load would go by a ".safetensors" suffix itself
        try:
            return torch.load(f, map_location="cpu", weights_only=True)
        except Exception as exc:  # torch's message would suggest weights_only=False, i.e. running the file's code
            raise ValueError(f"{file}: neither a safetensors file nor a torch.save file of plain tensors "
                             f"({type(exc).__name__}); lyfast does not unpickle arbitrary objects") from None


_DTYPE_NAMES = {"float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
                "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
                "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
                "float64": torch.float64, "fp64": torch.float64, "double": torch.float64}


def save_dtype(dtype):
    """The floating dtype to save in: None, a floating torch.dtype, or its name ("float16", "bf16", ...);
    anything else (an integer or bool dtype would silently destroy the weights) is a ValueError/TypeError."""
    if dtype is None:
        return None
    if isinstance(dtype, str):
        name = dtype.lower().removeprefix("torch.")
        if name not in _DTYPE_NAMES:
            raise ValueError(f"dtype {dtype!r} is not a floating-point dtype name ({', '.join(_DTYPE_NAMES)})")
        return _DTYPE_NAMES[name]
    if not isinstance(dtype, torch.dtype):
        raise TypeError(f"dtype must be a torch.dtype, a dtype name or None, got {dtype!r}")
    if not dtype.is_floating_point:
        raise ValueError(f"dtype must be a floating-point dtype to save adapter weights, got {dtype}")
    return dtype


def save_state_dict_file(state_dict, file, dtype=None, metadata=None):
    """Write `state_dict` (cast to `dtype`) as safetensors when the suffix is .safetensors (any case), else
    with torch.save. Written to a temporary file in the same folder, then renamed over `file`, so a
    failure part-way (a full disk) leaves any old file intact."""
    if metadata is not None and len(metadata) == 0:
        metadata = None
    dtype = save_dtype(dtype)
    state_dict = {k: _detached(v, dtype) for k, v in state_dict.items()}
    file = os.fspath(file)
    folder = os.path.dirname(os.path.abspath(file))
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(file)}.", suffix=".tmp", dir=folder)
    os.close(fd)
    try:
        if file.lower().endswith(".safetensors"):
            from safetensors.torch import save_file

            save_file(state_dict, tmp, metadata or {})
        else:
            torch.save(state_dict, tmp)
        os.chmod(tmp, _file_mode(file))  # mkstemp makes it 0600; keep what a plain open() would give
        os.replace(tmp, file)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return state_dict


def _file_mode(file) -> int:
    if os.path.exists(file):
        return os.stat(file).st_mode & 0o7777
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def _detached(tensor, dtype):
    tensor = tensor.detach()
    if dtype is not None:
        tensor = tensor.clone().to("cpu").to(dtype)
    return tensor


# ---------------------------------------------------------------------------------------------------------
# Building adapters from a state dict (create_lycoris_from_weights, kohya create_network_from_weights)
# ---------------------------------------------------------------------------------------------------------
# Keys of LyCORIS algorithms lyfast does not implement -> the algorithm to name in the error.
_FOREIGN_KEYS = {
    "lora_up.weight": "lora/locon", "lora_down.weight": "lora/locon", "lora_mid.weight": "lora/locon (tucker)",
    "diff": "full", "diff_b": "full", "on_input": "ia3", "w_norm": "norm (train_norm)",
    "b_norm": "norm (train_norm)", "a1.weight": "glora", "a2.weight": "glora", "b1.weight": "glora",
    "b2.weight": "glora", "bm.weight": "glora", "lambda_layer": "tlora", "q_layer.weight": "tlora",
    "p_layer.weight": "tlora",
}


def checked_weights(weights_sd) -> Dict[str, torch.Tensor]:
    """A file's {key: tensor} made safe to load, naming the key on any problem: a Python number becomes a
    0-d tensor and an `alpha` of shape (1,) (written by some tools) a 0-d one; a value that is not a
    tensor is a TypeError, an alpha with several values or a NaN/Inf anywhere a ValueError."""
    if not isinstance(weights_sd, dict):
        raise TypeError(f"weights must be a dict of tensors, got {type(weights_sd).__name__}")
    out = {}
    for key, value in weights_sd.items():
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            value = torch.tensor(float(value))
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"{key}: expected a tensor, got {type(value).__name__}")
        if key.rsplit(".", 1)[-1] == "alpha":
            if value.numel() != 1:
                raise ValueError(f"{key}: alpha must hold one number, got shape {tuple(value.shape)}")
            value = value.reshape(())
        if (value.is_floating_point() or value.is_complex()) and not bool(torch.isfinite(value).all()):
            bad = "NaN" if bool(torch.isnan(value).any()) else "Inf"
            raise ValueError(f"{key} {tuple(value.shape)} contains {bad} values: the file is damaged")
        out[key] = value
    return out


def group_keys(weights_sd) -> Tuple[Dict[str, Dict[str, torch.Tensor]], List[str]]:
    """{lora_name: {param: tensor}} from `lora_name.param` keys, and the keys without a dot."""
    groups: Dict[str, Dict[str, torch.Tensor]] = {}
    loose = []
    for key, value in weights_sd.items():
        if "." not in key:
            loose.append(key)
            continue
        lora_name, param = key.split(".", 1)
        groups.setdefault(lora_name, {})[param] = value
    return groups, loose


def detect_algo(lora_name, params: Dict[str, torch.Tensor]):
    """The lyfast class for one adapter's keys; a clear error for anything else."""
    if "oft_blocks" in params and params["oft_blocks"].ndim == 3:
        raise ValueError(f"{lora_name}.oft_blocks is 3-D: a diag-oft (OFT) adapter, which lyfast does not "
                         f"implement (supported: {', '.join(SUPPORTED_ALGOS)})")
    for param in params:
        if param in _FOREIGN_KEYS:
            raise ValueError(f"{lora_name}.{param} belongs to the {_FOREIGN_KEYS[param]} algorithm, which lyfast "
                             f"does not implement (supported: {', '.join(SUPPORTED_ALGOS)})")
    found = [cls for cls in MODULE_LIST if cls.algo_check({f"{lora_name}.{k}": v for k, v in params.items()},
                                                           lora_name)]
    if not found:
        raise ValueError(f"cannot tell the algorithm of {lora_name} from its keys "
                         f"{sorted(lora_name + '.' + k for k in params)}")
    return found[0]


def _weight_shape(module) -> Tuple[int, ...]:
    if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        return (module.out_channels, module.in_channels // module.groups, *module.kernel_size)
    if isinstance(module, nn.Linear) or _is_fp8_weight_only_linear(module):
        return (module.out_features, module.in_features)
    raise ValueError(f"unsupported layer type {type(module).__name__}")


def _shape_error(lora_name, shape, detail):
    return ValueError(f"{lora_name}: {detail} (the layer's weight is {tuple(shape)})")


def _key(lora_name, param, t):
    return f"{lora_name}.{param} {tuple(t.shape)}"


def _check_loha(lora_name, p, shape):
    out, fan_in = shape[0], math.prod(shape[1:])
    if ("hada_t1" in p) != ("hada_t2" in p):
        which = "hada_t2" if "hada_t1" in p else "hada_t1"
        raise ValueError(f"{lora_name}.{which} is missing (a Tucker LoHa needs both hada_t1 and hada_t2)")
    ranks = []
    for i in (1, 2):
        a, b, t = p.get(f"hada_w{i}_a"), p.get(f"hada_w{i}_b"), p.get(f"hada_t{i}")
        for name, x in ((f"hada_w{i}_a", a), (f"hada_w{i}_b", b)):
            if x is None:
                raise ValueError(f"{lora_name}.{name} is missing (LoHa needs hada_w1_a/b and hada_w2_a/b)")
        if t is None:
            if a.ndim != 2 or b.ndim != 2 or a.shape[0] != out or b.shape != (a.shape[1], fan_in):
                raise _shape_error(lora_name, shape, f"{_key(lora_name, f'hada_w{i}_a', a)} and "
                                   f"{_key(lora_name, f'hada_w{i}_b', b)} do not give a ({out}, {fan_in}) product")
            ranks.append(a.shape[1])
        else:
            ok = (len(shape) > 2 and a.ndim == 2 and b.ndim == 2 and t.ndim == len(shape)
                  and a.shape[1] == out and b.shape[1] == shape[1] and t.shape[0] == a.shape[0]
                  and t.shape[1] == b.shape[0] and tuple(t.shape[2:]) == tuple(shape[2:]))
            if not ok:
                raise _shape_error(lora_name, shape, f"Tucker factors {_key(lora_name, f'hada_t{i}', t)}, "
                                   f"{_key(lora_name, f'hada_w{i}_a', a)}, {_key(lora_name, f'hada_w{i}_b', b)} "
                                   f"do not rebuild the weight")
            ranks.append(a.shape[0])
    if ranks[0] != ranks[1]:
        raise ValueError(f"{lora_name}: hada_w1 rank {ranks[0]} differs from hada_w2 rank {ranks[1]}")


def _check_lokr(lora_name, p, shape):
    if "lokr_t1" in p:
        raise ValueError(f"{lora_name}.lokr_t1: LyCORIS never uses a Tucker w1 and neither does lyfast")
    if "lokr_w1" in p:
        w1 = tuple(p["lokr_w1"].shape)
        if "lokr_w1_a" in p or "lokr_w1_b" in p:
            raise ValueError(f"{lora_name}: both lokr_w1 and lokr_w1_a/lokr_w1_b are present")
    else:
        a, b = p.get("lokr_w1_a"), p.get("lokr_w1_b")
        if b is None:
            raise ValueError(f"{lora_name}.lokr_w1_b is missing (lokr_w1_a needs it)")
        if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[0]:
            raise ValueError(f"{lora_name}: {_key(lora_name, 'lokr_w1_a', a)} and "
                             f"{_key(lora_name, 'lokr_w1_b', b)} cannot be multiplied")
        w1 = (a.shape[0], b.shape[1])
    if "lokr_w2" in p:
        w2 = tuple(p["lokr_w2"].shape)
        if any(k in p for k in ("lokr_w2_a", "lokr_w2_b", "lokr_t2")):
            raise ValueError(f"{lora_name}: both lokr_w2 and lokr_w2_a/lokr_w2_b are present")
    else:
        a, b, t = p.get("lokr_w2_a"), p.get("lokr_w2_b"), p.get("lokr_t2")
        for name, x in (("lokr_w2_a", a), ("lokr_w2_b", b)):
            if x is None:
                raise ValueError(f"{lora_name}.{name} is missing (LoKr needs lokr_w2 or lokr_w2_a/lokr_w2_b)")
        if t is None:
            if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[0]:
                raise ValueError(f"{lora_name}: {_key(lora_name, 'lokr_w2_a', a)} and "
                                 f"{_key(lora_name, 'lokr_w2_b', b)} cannot be multiplied")
            w2 = (a.shape[0], b.shape[1])
        else:
            if not (a.ndim == 2 and b.ndim == 2 and t.ndim >= 3 and t.shape[0] == a.shape[0]
                    and t.shape[1] == b.shape[0]):
                raise ValueError(f"{lora_name}: Tucker factors {_key(lora_name, 'lokr_t2', t)}, "
                                 f"{_key(lora_name, 'lokr_w2_a', a)}, {_key(lora_name, 'lokr_w2_b', b)} "
                                 f"do not fit together")
            w2 = (a.shape[1], b.shape[1], *t.shape[2:])
    if len(w1) != 2:
        raise _shape_error(lora_name, shape, f"LoKr w1 must be 2-D, got {w1}")
    ok = w1[0] * w2[0] == shape[0]
    if len(w2) == 2:
        ok = ok and w1[1] * w2[1] == math.prod(shape[1:])
    else:
        ok = ok and len(w2) == len(shape) and w1[1] * w2[1] == shape[1] and w2[2:] == tuple(shape[2:])
    if not ok:
        raise _shape_error(lora_name, shape, f"kron(w1 {w1}, w2 {w2}) does not fit; keys: "
                           f"{', '.join(_key(lora_name, k, v) for k, v in sorted(p.items()) if k.startswith('lokr_'))}")


def _check_boft(lora_name, p, shape):
    blocks = p["oft_blocks"]
    if blocks.ndim != 4 or blocks.shape[2] != blocks.shape[3] or blocks.shape[1] * blocks.shape[2] != shape[0]:
        raise _shape_error(lora_name, shape, f"{_key(lora_name, 'oft_blocks', blocks)} is not (stages, blocks, b, b) "
                           f"with blocks*b == {shape[0]} output channels")
    rescale = p.get("rescale")
    if rescale is not None and (rescale.numel() != shape[0] or rescale.shape[0] != shape[0]):
        raise _shape_error(lora_name, shape, f"{_key(lora_name, 'rescale', rescale)} is not one value per output "
                           f"channel")


_CHECKS = {LohaModule: _check_loha, LokrModule: _check_lokr, ButterflyOFTModule: _check_boft}


def _allowed_params(cls) -> set:
    return set(cls.weight_list) - {"lokr_t1"}


def build_module_from_params(cls, lora_name, params: Dict[str, torch.Tensor], orig_module):
    """One adapter from its keys, after checking them; every key must end up in the adapter."""
    unknown = sorted(set(params) - _allowed_params(cls))
    if unknown:
        raise ValueError(f"unknown keys for a {cls.name} adapter: {[f'{lora_name}.{k}' for k in unknown]}")
    if "alpha" not in params:
        raise ValueError(f"{lora_name}.alpha is missing (LyCORIS files always store alpha; it sets the scale)")
    shape = _weight_shape(orig_module)
    _CHECKS[cls](lora_name, params, shape)
    sd = {f"{lora_name}.{k}": v for k, v in params.items()}
    try:
        with torch.no_grad():
            module = cls.make_module_from_state_dict(lora_name, orig_module, *cls.extract_state_dict(sd, lora_name))
    except Exception as exc:
        raise ValueError(f"{lora_name}: cannot build a {cls.name} adapter from keys "
                         f"{[_key(lora_name, k, v) for k, v in params.items()]}: {exc}") from exc
    if module is None:
        raise ValueError(f"{lora_name}: {cls.__name__}.make_module_from_state_dict returned None")
    _check_built(module, lora_name, params)
    return module


def _check_built(module, lora_name, params):
    """The adapter must hold exactly the file's tensors: no key dropped, reshaped or re-laid-out."""
    with torch.no_grad():
        built = module.state_dict()
    dropped = sorted(set(params) - set(built))
    added = sorted(set(built) - set(params))
    if dropped or added:
        raise ValueError(f"{lora_name}: the built adapter does not use keys {dropped} / expects keys {added}")
    for k, v in params.items():
        mine = built[k]
        if tuple(mine.shape) != tuple(v.shape):
            raise ValueError(f"{lora_name}.{k}: file shape {tuple(v.shape)} but the adapter has "
                             f"{tuple(mine.shape)}")
        if k != "alpha" and not torch.equal(mine.detach().cpu(), v.detach().cpu().to(mine.dtype)):
            raise ValueError(f"{lora_name}.{k}: the adapter does not hold the file's values after loading")


def build_modules(weights_sd, named_layers: Dict[str, nn.Module], *, what="model"):
    """Adapters for every `lora_name` in `weights_sd` found in `named_layers` ({lora_name: layer}).

    Names the model lacks and keys without a dot are reported with a warning naming them."""
    groups, loose = group_keys(checked_weights(weights_sd))
    if loose:
        logger.warning("ignoring keys that belong to no adapter: %s", _short(sorted(loose)))
    absent = sorted(n for n in groups if n not in named_layers)
    if absent:
        logger.warning("%d adapters in the file have no matching layer in the %s and were not loaded: %s",
                       len(absent), what, _short(absent))
    modules = []
    for lora_name, params in groups.items():
        layer = named_layers.get(lora_name)
        if layer is None:
            continue
        cls = detect_algo(lora_name, params)
        modules.append(build_module_from_params(cls, lora_name, params, layer))
    return modules


def _named_layers(prefix, model) -> Dict[str, nn.Module]:
    return {f"{prefix}_{name}".replace(".", "_"): m for name, m in model.named_modules()}


# ---------------------------------------------------------------------------------------------------------
# Entry points
# ---------------------------------------------------------------------------------------------------------
def create_lycoris(module, multiplier=1.0, linear_dim=4, linear_alpha=1, warn_on_unmatched=True, **kwargs):
    """LoHa / LoKr / BOFT adapters over `module`, with lycoris-lora 4.1.3's kwargs.

    kwargs: algo (loha|lokr|boft), conv_dim, conv_alpha, dropout, rank_dropout, module_dropout,
    use_tucker (old: use_cp, use_conv_cp, disable_conv_cp), use_scalar, block_size, constraint (old:
    constrain), rescaled, dora_wd, wd_on_output, full_matrix, bypass_mode, unbalanced_factorization, decompose_both,
    factor, train_llm_adapter, preset (a built-in name, a toml path, or a dict). train_norm raises.
    """
    parsed = parse_network_kwargs(kwargs, linear_dim, linear_alpha, kohya=False)
    LycorisNetwork.apply_preset(kwargs.get("preset", "full"))
    logger.info("Using rank adaptation algo: %s", parsed["network_module"])
    return LycorisNetwork(module, multiplier=multiplier, warn_on_unmatched=warn_on_unmatched, **parsed)


def create_lycoris_from_weights(multiplier, file, module, weights_sd=None, **kwargs):
    """(network, weights_sd): the adapters stored in `file` (or `weights_sd`) rebuilt over `module`.

    Each adapter's algorithm and configuration come from its keys and shapes. Unknown keys, missing alpha,
    shapes that do not fit the layer, and keys of algorithms lyfast does not implement raise, naming the
    key; adapters for layers the model lacks are skipped with a warning naming them."""
    if weights_sd is None:
        weights_sd = load_state_dict_file(file)
    network = LycorisNetwork(module, init_only=True)
    network.multiplier = multiplier
    network.loras = build_modules(weights_sd, _named_layers(LycorisNetwork.LORA_PREFIX, module))
    network.algo_table = _algo_table(network.loras)
    logger.info("%d modules loaded", len(network.loras))
    for lora in network.loras:
        lora.multiplier = multiplier
    return network, weights_sd
