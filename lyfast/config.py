"""Network kwargs and presets: how `create_lycoris` / kohya's `--network_args` are read.

The algorithm names, LyCORIS 4.1.3's kwarg spellings (old ones mapped to current), its built-in presets and
preset files, and the string-or-number parsing sd-scripts needs (it passes every network arg as a string).
"""
from __future__ import annotations

import copy
import logging
import os
from typing import Any, Dict


from .modules.boft import ButterflyOFTModule
from .modules.loha import LohaModule
from .modules.lokr import LokrModule

logger = logging.getLogger("lyfast")

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
    # LyCORIS reads conv_alpha as `float(kwargs.get(key, default) or default)`: a falsy value (0, 0.0, None, "")
    # means the linear alpha, but the *string* "0" (how sd-scripts passes every network arg) is truthy and means
    # 0, i.e. alpha = dim (scale 1). The same here. conv_dim 0 adapts no k>1 conv whether a string or a number
    # (LyCORIS turns the number 0 into linear_dim and adapts them: a warning says so).
    conv_dim = integer("conv_dim", linear_dim)
    conv_alpha = number("conv_alpha", linear_alpha) if kwargs.get("conv_alpha") else linear_alpha
    if kwargs.get("conv_alpha") is not None and not isinstance(kwargs["conv_alpha"], str) and kwargs["conv_alpha"] == 0:
        logger.warning("conv_alpha=0 (a number) means the linear alpha (%s), as in LyCORIS; pass conv_alpha=\"0\" "
                       "(a string, as sd-scripts does) for alpha = conv_dim", linear_alpha)
    if kwargs.get("conv_dim") is not None and not isinstance(kwargs["conv_dim"], str) and kwargs["conv_dim"] == 0:
        logger.warning("conv_dim=0 (a number): lyfast adapts no k>1 conv; LyCORIS would adapt them with linear_dim "
                       "(%s)", linear_dim)
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


