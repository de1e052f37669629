"""kohya-ss/sd-scripts entry point: `--network_module lyfast.kohya` (drop-in for `lycoris.kohya`).

`create_network`, `create_network_from_weights` and `LycorisNetworkKohya` follow lycoris-lora 4.1.3's
`lycoris.kohya`: the same `--network_args` (strings parsed into ints/floats/bools), presets, module names
(`lora_unet_*`, `lora_te_*`, or `lora_te1_*`/`lora_te2_*` for a list of text encoders) and the hooks
train_network.py calls. Only algo=loha|lokr|boft; anything else raises.
"""
from __future__ import annotations

import hashlib
import logging
from typing import Dict, List

import torch
import torch.nn as nn

from .config import PRESET, check_algo, parse_network_kwargs, resolve_preset
from .files import _named_layers, build_modules, load_state_dict_file, save_dtype, save_state_dict_file
from .network import LycorisNetwork, _max_norm
from .targeting import _algo_table, _module_factory, _short, _Targeting, _warn_unmatched

logger = logging.getLogger("lyfast")

__all__ = ["create_network", "create_network_from_weights", "LycorisNetworkKohya",
           "precalculate_safetensors_hashes"]


def _optional_float(value):
    return None if value is None else float(value)


def create_network(multiplier, network_dim, network_alpha, vae, text_encoder, unet, warn_on_unmatched=True,
                   **kwargs):
    """The network sd-scripts trains: `network_args` arrive as strings (e.g. {"algo": "loha",
    "conv_dim": "4", "use_tucker": "True"}). sd-scripts' `neuron_dropout` is ignored, as in LyCORIS
    (use the `dropout` network arg)."""
    kwargs.pop("neuron_dropout", None)
    parsed = parse_network_kwargs(kwargs, network_dim, network_alpha, kohya=True)
    preset = kwargs.get("preset", "full")
    LycorisNetworkKohya.apply_preset(preset)
    logger.info("Using rank adaptation algo: %s", parsed["network_module"])
    network = LycorisNetworkKohya(text_encoder, unet, multiplier=multiplier, warn_on_unmatched=warn_on_unmatched,
                                  **parsed)
    ratios = [_optional_float(kwargs.get(k)) for k in
              ("loraplus_lr_ratio", "loraplus_unet_lr_ratio", "loraplus_text_encoder_lr_ratio")]
    if any(r is not None for r in ratios):
        network.set_loraplus_lr_ratio(*ratios)
    return network


def _text_encoder_prefixes(text_encoder):
    if not text_encoder:
        return []
    if isinstance(text_encoder, (list, tuple)):
        return [(f"{LycorisNetworkKohya.LORA_PREFIX_TEXT_ENCODER}{i + 1}", te) for i, te in enumerate(text_encoder)]
    return [(LycorisNetworkKohya.LORA_PREFIX_TEXT_ENCODER, text_encoder)]


def create_network_from_weights(multiplier, file, vae, text_encoder, unet, weights_sd=None, for_inference=False,
                                **kwargs):
    """(network, weights_sd): the adapters stored in a LyCORIS/lyfast file rebuilt over `unet` and the
    text encoder(s). Bad keys raise naming the key; adapters for layers the models lack are reported."""
    if weights_sd is None:
        weights_sd = load_state_dict_file(file)
    unet_sd, te_sd, other = {}, {}, []
    for key, value in weights_sd.items():
        name = key.split(".", 1)[0]
        if name.startswith(LycorisNetworkKohya.LORA_PREFIX_UNET):
            unet_sd[key] = value
        elif name.startswith(LycorisNetworkKohya.LORA_PREFIX_TEXT_ENCODER):
            te_sd[key] = value
        else:
            other.append(key)
    if other:
        logger.warning("ignoring keys with neither the %s nor the %s prefix: %s", LycorisNetworkKohya.LORA_PREFIX_UNET,
                       LycorisNetworkKohya.LORA_PREFIX_TEXT_ENCODER, _short(sorted(other)))
    network = LycorisNetworkKohya(text_encoder, unet, init_only=True)
    network.multiplier = multiplier
    network.unet_loras = build_modules(unet_sd, _named_layers(LycorisNetworkKohya.LORA_PREFIX_UNET, unet), what="U-Net")
    te_layers: Dict[str, nn.Module] = {}
    for prefix, te in _text_encoder_prefixes(text_encoder):
        te_layers.update(_named_layers(prefix, te))
    if te_sd and not text_encoder:
        logger.warning("the file has %d text-encoder keys but no text encoder was given; they are not loaded",
                       len(te_sd))
    network.text_encoder_loras = build_modules(te_sd, te_layers, what="text encoder") if text_encoder else []
    network.loras = network.text_encoder_loras + network.unet_loras
    network.algo_table = _algo_table(network.loras)
    logger.info("%d U-Net and %d text-encoder modules loaded", len(network.unet_loras),
                len(network.text_encoder_loras))
    for lora in network.loras:
        lora.multiplier = multiplier
    return network, weights_sd


class LycorisNetworkKohya(LycorisNetwork):
    """LyCORIS adapters over a U-Net (or DiT) and its text encoder(s), for sd-scripts."""

    ENABLE_CONV = True
    UNET_TARGET_REPLACE_MODULE = list(PRESET["full"]["unet_target_module"])
    UNET_TARGET_REPLACE_NAME = list(PRESET["full"]["unet_target_name"])
    TEXT_ENCODER_TARGET_REPLACE_MODULE = list(PRESET["full"]["text_encoder_target_module"])
    TEXT_ENCODER_TARGET_REPLACE_NAME: List[str] = []
    LORA_PREFIX_UNET = "lora_unet"
    LORA_PREFIX_TEXT_ENCODER = "lora_te"
    MODULE_ALGO_MAP: Dict[str, dict] = {}
    NAME_ALGO_MAP: Dict[str, dict] = {}
    USE_FNMATCH = False
    TARGET_EXCLUDE_NAME: List[str] = []

    @classmethod
    def apply_preset(cls, preset):
        preset = resolve_preset(preset)
        for key, attr in (("enable_conv", "ENABLE_CONV"), ("unet_target_module", "UNET_TARGET_REPLACE_MODULE"),
                          ("unet_target_name", "UNET_TARGET_REPLACE_NAME"),
                          ("text_encoder_target_module", "TEXT_ENCODER_TARGET_REPLACE_MODULE"),
                          ("text_encoder_target_name", "TEXT_ENCODER_TARGET_REPLACE_NAME"),
                          ("module_algo_map", "MODULE_ALGO_MAP"), ("name_algo_map", "NAME_ALGO_MAP"),
                          ("use_fnmatch", "USE_FNMATCH"), ("exclude_name", "TARGET_EXCLUDE_NAME")):
            if key in preset:
                setattr(cls, attr, preset[key])
        return cls

    def __init__(
        self,
        text_encoder,
        unet,
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
        train_t5xxl=False,
        warn_on_unmatched=True,
        train_llm_adapter=False,
        **kwargs,
    ) -> None:
        init_only = kwargs.pop("init_only", False)
        nn.Module.__init__(self)
        self.weights_sd = None
        self.loraplus_lr_ratio = None
        self.loraplus_unet_lr_ratio = None
        self.loraplus_text_encoder_lr_ratio = None
        self.train_t5xxl = train_t5xxl
        self.text_encoder_loras: List[nn.Module] = []
        self.unet_loras: List[nn.Module] = []
        self.loras: List[nn.Module] = []
        self.algo_table: Dict[str, int] = {}
        if init_only:  # filled by create_network_from_weights
            self._set_hparams(multiplier, 0, 0, 1, 1, 0, 0, 0, False, False)
            return
        if train_norm:
            raise ValueError("train_norm=True (norm-layer training) is not supported by lyfast")
        network_module = check_algo(network_module)
        self._set_hparams(multiplier, lora_dim, conv_lora_dim if self.ENABLE_CONV else 0, alpha, conv_alpha,
                          dropout, rank_dropout, module_dropout, use_tucker, train_llm_adapter)
        cls = LycorisNetworkKohya
        targeting = _Targeting(self, _module_factory(self, kwargs), cls.MODULE_ALGO_MAP, cls.NAME_ALGO_MAP,
                               cls.USE_FNMATCH, cls.TARGET_EXCLUDE_NAME, fix_root_prefix=None)
        built: Dict[str, nn.Module] = {}

        te_matched_modules, te_matched_names = set(), set()
        for prefix, te in _text_encoder_prefixes(text_encoder):
            loras, mods, names = targeting.build(prefix, te, cls.TEXT_ENCODER_TARGET_REPLACE_MODULE,
                                                 cls.TEXT_ENCODER_TARGET_REPLACE_NAME, network_module, built)
            self.text_encoder_loras.extend(loras)
            te_matched_modules |= mods
            te_matched_names |= names
        logger.info("create LyCORIS (lyfast) for Text Encoder: %d modules.", len(self.text_encoder_loras))

        unet_modules = list(cls.UNET_TARGET_REPLACE_MODULE)
        if not self.train_llm_adapter and "LLMAdapterTransformerBlock" in unet_modules:
            unet_modules.remove("LLMAdapterTransformerBlock")
        self.unet_loras, unet_matched_modules, unet_matched_names = targeting.build(
            cls.LORA_PREFIX_UNET, unet, unet_modules, cls.UNET_TARGET_REPLACE_NAME, network_module, built)
        logger.info("create LyCORIS (lyfast) for U-Net: %d modules.", len(self.unet_loras))

        if warn_on_unmatched:
            if text_encoder:
                _warn_unmatched("Text Encoder: ", cls.TEXT_ENCODER_TARGET_REPLACE_MODULE, te_matched_modules,
                                cls.TEXT_ENCODER_TARGET_REPLACE_NAME, te_matched_names)
            _warn_unmatched("UNet: ", cls.UNET_TARGET_REPLACE_MODULE, unet_matched_modules,
                            cls.UNET_TARGET_REPLACE_NAME, unet_matched_names)
            if not self.text_encoder_loras and not self.unet_loras:
                logger.warning("No LyCORIS modules were created: check the preset/targets against the model.")
        self.loras = self.text_encoder_loras + self.unet_loras
        self.algo_table = _algo_table(self.loras)

    def apply_to(self, text_encoder, unet, apply_text_encoder=True, apply_unet=True):
        """Hook the adapters in; both parts by default, as sd-scripts' image generator calls it
        (`apply_to(text_encoders, unet)`, where LyCORIS 4.1.3 fails an assertion)."""
        if not apply_text_encoder:
            self.text_encoder_loras = []
        if not apply_unet:
            self.unet_loras = []
        self.loras = self.text_encoder_loras + self.unet_loras
        LycorisNetwork.apply_to(self)

    def merge_to(self, text_encoder, unet, weights_sd, dtype, device):
        """Merge into the models' weights (sd-scripts' merge path): parts without keys in `weights_sd` are
        dropped first, as in LyCORIS; the adapters are moved to `device` (LyCORIS ignores it)."""
        keys = list(weights_sd.keys())
        if not any(k.startswith(self.LORA_PREFIX_TEXT_ENCODER) for k in keys):
            self.text_encoder_loras = []
        if not any(k.startswith(self.LORA_PREFIX_UNET) for k in keys):
            self.unet_loras = []
        self.loras = self.text_encoder_loras + self.unet_loras
        if device is not None:  # ΔW is computed where the weights are; its dtype stays the adapters' own
            for lora in self.loras:
                lora.to(device)
        # What the applied network computes: each adapter at its own multiplier (sd-scripts' `--network_mul 0.5
        # --network_merge` builds the network at 0.5; LyCORIS 4.1.3 merges at 1.0 whatever it was built with).
        self._ensure_mergeable()
        for lora in self.loras:
            lora.merge_to(lora.multiplier)

    def apply_max_norm_regularization(self, max_norm_value, device):
        return _max_norm(self.unet_loras + self.text_encoder_loras, max_norm_value, device)

    def set_loraplus_lr_ratio(self, loraplus_lr_ratio, loraplus_unet_lr_ratio, loraplus_text_encoder_lr_ratio):
        # LyCORIS puts only parameters named like "lora_up" in the LoRA+ group; LoHa/LoKr/BOFT have none, so
        # the ratios are recorded but (as in LyCORIS 4.1.3) change no learning rate.
        self.loraplus_lr_ratio = loraplus_lr_ratio
        self.loraplus_unet_lr_ratio = loraplus_unet_lr_ratio
        self.loraplus_text_encoder_lr_ratio = loraplus_text_encoder_lr_ratio

    def prepare_optimizer_params(self, text_encoder_lr=None, unet_lr: float = 1e-4, learning_rate=None):
        """(param groups, descriptions) as LyCORIS: one group for the text encoder(s), one for the U-Net;
        a part whose learning rate resolves to None or 0 gets no group."""
        self.requires_grad_(True)
        groups, descriptions = [], []

        def add(loras, lr, ratio, label):
            plain, plus = [], []
            for lora in loras:
                for name, param in lora.named_parameters():
                    (plus if ratio is not None and "lora_up" in name else plain).append(param)
            for kind, params in (("", plain), ("plus", plus)):
                if not params:
                    continue
                group = {"params": params}
                if lr is not None:
                    group["lr"] = lr * ratio if kind == "plus" else lr
                if not group.get("lr"):
                    logger.info("NO LR skipping!")
                    continue
                groups.append(group)
                descriptions.append(label + (" " + kind if kind else ""))

        if self.text_encoder_loras:
            add(self.text_encoder_loras, text_encoder_lr if text_encoder_lr is not None else learning_rate,
                self.loraplus_text_encoder_lr_ratio or self.loraplus_lr_ratio, "textencoder")
        if self.unet_loras:
            add(self.unet_loras, unet_lr if unet_lr is not None else learning_rate,
                self.loraplus_unet_lr_ratio or self.loraplus_lr_ratio, "unet")
        return groups, descriptions

    def enable_gradient_checkpointing(self):
        pass

    def get_trainable_params(self, *args):
        return self.parameters()

    def save_weights(self, file, dtype, metadata):
        """As LycorisNetwork.save_weights; a .safetensors file also gets metadata["sshs_model_hash"] (LyCORIS's
        hash) and metadata["sshs_legacy_hash"] (sd-webui-additional-networks' legacy hash)."""
        dtype = save_dtype(dtype)
        state_dict = {k: v.detach() for k, v in self.state_dict().items()}
        if dtype is not None:
            state_dict = {k: v.clone().to("cpu").to(dtype) for k, v in state_dict.items()}
        if str(file).lower().endswith(".safetensors"):
            metadata = dict(metadata or {})
            metadata["sshs_model_hash"] = precalculate_safetensors_hashes(state_dict)
            metadata["sshs_legacy_hash"] = legacy_safetensors_hash(state_dict, metadata)
        save_state_dict_file(state_dict, file, None, metadata)


# ---------------------------------------------------------------------------------------------------------
# Hashes written into the metadata
# ---------------------------------------------------------------------------------------------------------
def _raw_bytes(tensor: torch.Tensor) -> bytes:
    """The tensor's data as safetensors stores it (C order, little endian)."""
    flat = tensor.detach().to("cpu").contiguous().reshape(-1)
    if flat.dtype == torch.bool:
        flat = flat.to(torch.uint8)
    return flat.view(torch.uint8).numpy().tobytes()


def precalculate_safetensors_hashes(state_dict) -> str:
    """LyCORIS's `sshs_model_hash`: "0x" + sha256 over each tensor's data, in state-dict order."""
    digest = hashlib.sha256()
    for tensor in state_dict.values():
        digest.update(_raw_bytes(tensor))
    return f"0x{digest.hexdigest()}"


def legacy_safetensors_hash(state_dict, metadata) -> str:
    """sd-scripts' legacy hash: sha256 of bytes [1 MiB, 1 MiB + 64 KiB) of the file written with only the
    `ss_*` metadata, first 8 hex digits."""
    from safetensors.torch import save

    blob = save({k: v.contiguous() for k, v in state_dict.items()},
                {k: v for k, v in (metadata or {}).items() if k.startswith("ss_")})
    return hashlib.sha256(blob[0x100000:0x110000]).hexdigest()[:8]
