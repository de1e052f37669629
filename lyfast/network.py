"""The LyCORIS-style network wrapper: `create_lycoris`, `create_lycoris_from_weights`, `LycorisNetwork`.

Same kwargs, aliases, presets, targeting and module names as lycoris-lora 4.1.3's `lycoris.wrapper`, so
swapping `import lycoris` for `import lyfast` changes nothing but speed. Only LoHa, LoKr and butterfly-OFT
exist here; every other algorithm name raises instead of silently becoming something else.

The network's three neighbours, one room each: `config.py` (kwargs, aliases, presets), `targeting.py` (which
layers get adapters, with which dim/alpha) and `files.py` (reading, writing and checking LyCORIS files). The
adapter of `a.b.c` is named `lycoris_a_b_c` and owns the state-dict keys `lycoris_a_b_c.<param>`.
"""
from __future__ import annotations

import fnmatch
import logging
import re
from typing import Any, Dict, List

import torch.nn as nn

from . import distributed
from .config import (  # noqa: F401  (re-exported: lyfast.network is where users and kohya.py find these names)
    MODULE_LIST, PRESET, SUPPORTED_ALGOS, VALID_PRESET_KEYS, check_algo, network_module_dict, parse_network_kwargs,
    resolve_preset, str_bool)
from .files import (  # noqa: F401
    _named_layers, build_modules, checked_weights, load_state_dict_file, save_dtype, save_state_dict_file)
from .targeting import (  # noqa: F401
    _algo_table, _is_fp8_weight_only_linear, _module_factory, _short, _Targeting, _warn_unmatched)

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
        """Check the whole file against every adapter first (before `apply_to` too, when the network's own
        state_dict is still empty), then copy: on any error nothing has changed and the message names the key."""
        weights_sd = checked_weights(weights_sd)
        own = {f"{lora.lora_name}.{k}": v for lora in self.loras for k, v in lora.state_dict().items()}
        if distributed.is_sharded(own):  # every rank read the whole file: each keeps its shard
            weights_sd = distributed.sharded_like(weights_sd, own)
        dora = sorted(k for k in weights_sd if k.rsplit(".", 1)[-1] == "dora_scale" and k not in own)
        if dora:  # dropping it (LyCORIS warns and does) would leave a model that differs from the file's by O(1)
            raise ValueError(f"{dora[0]}: the file is a DoRA adapter ({len(dora)} dora_scale keys) but this "
                             "network's adapters have no dora_scale: create the network with dora_wd=True "
                             "(weight_decompose) or load the file with create_lycoris_from_weights")
        for key, value in weights_sd.items():
            if key in own and tuple(value.shape) != tuple(own[key].shape):
                raise ValueError(f"{key}: the file's shape {tuple(value.shape)} does not match this network's "
                                 f"{tuple(own[key].shape)}; nothing was loaded")
        if not self._modules:  # before apply_to, as LyCORIS: loaded by apply_to (every key unexpected for now)
            return {"unexpected keys": list(weights_sd)} if weights_sd else {}
        missing, unexpected = self.load_state_dict(weights_sd, strict=False)
        state = {}
        if missing:
            state["missing keys"] = missing
        if unexpected:
            state["unexpected keys"] = unexpected
        if missing or unexpected:
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
        return all(lora.is_mergeable() for lora in self.loras)

    def _ensure_mergeable(self):
        for lora in self.loras:
            lora._ensure_mergeable()

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
        otherwise; every tensor (alpha included) is cast to `dtype` when given. Sharded by FSDP2 (see
        `lyfast.distributed`): every rank must call it; the shards are gathered, rank 0 writes, the others wait."""
        state = self.state_dict()
        if not distributed.is_sharded(state):
            save_state_dict_file(state, file, dtype, metadata)
            return
        state = distributed.gathered_state_dict(state)
        if distributed.is_main_process():
            save_state_dict_file(state, file, dtype, metadata)
        distributed.barrier()




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
