"""Several GPUs: FSDP2 that shards each adapter with the block of the layer it adapts.

An adapter's forward is called from its layer's patched `forward`, never through the adapter's own `__call__`,
so FSDP2 hooks on an adapter never run, and `fully_shard(block)` does not see adapters that only the network
owns. `place_in_layers(net)` makes each adapter a submodule of its layer as well (attribute
`lycoris_adapters`, a ModuleDict keyed by the adapter's LyCORIS name); `fully_shard(block)` — by hand, or
through accelerate's FSDP2 plugin with transformer-based auto-wrap — then puts the adapter's parameters into
that block's group: DTensor shards at rest, unsharded by the block's pre-forward / pre-backward hooks,
resharded after, with the block's MixedPrecisionPolicy and reshard_after_forward.

Opt-in, because being a submodule of the base model has consequences a trainer may not expect: training scripts
freeze and cast the base after `apply_to` (kohya's `unet.requires_grad_(False); unet.to(weight_dtype)`, which
would freeze the adapters and cast them to fp16/fp8). Call it after the base is frozen and cast, before
`fully_shard`. The network keeps owning the adapters too: `net.parameters()`, `net.state_dict()` (LyCORIS
keys), `save_weights` / `load_weights` and kohya are unchanged; the base model's own `state_dict()` gains no
adapter key (a user saving the UNet does not save the adapters into it) and its `load_state_dict(strict=True)`
does not ask for them.

Checkpoints in a sharded run: `net.save_weights` gathers every shard (all ranks call it; rank 0 writes, the
others wait) and `net.load_weights` places each rank's shard (`gathered_state_dict`, `sharded_like`); resume
adapters + optimizer with `torch.distributed.checkpoint` through `get_state_dict(net, optimizer)` (see
docs/training.md).
"""
from __future__ import annotations

from typing import Dict

import torch
import torch.nn as nn

ATTR = "lycoris_adapters"


def place_in_layers(net: nn.Module) -> nn.Module:
    """Register every adapter of `net` (after `net.apply_to()`) as a submodule of its base layer, so that
    `fully_shard` on the block containing the layer shards the adapter with it. Idempotent; returns `net`."""
    if not net.loras:
        raise ValueError("place_in_layers: the network has no adapters (nothing was targeted)")
    for lora in net.loras:
        if net._modules.get(lora.lora_name) is not lora:
            raise ValueError(f"place_in_layers: {lora.lora_name} is not applied: call net.apply_to() first")
        scalars = [n for n, p in lora.named_parameters() if p.dim() == 0]
        if scalars:  # fully_shard raises its own error deep inside, after some blocks were sharded
            raise ValueError(f"place_in_layers: {lora.lora_name}.{scalars[0]} is a 0-d trainable parameter "
                             "(use_scalar=True), which FSDP2 cannot shard; create the network without use_scalar")
        layer = lora.org_module[0]
        if _is_sharded(layer):
            raise ValueError(f"place_in_layers: the layer of {lora.lora_name} is already sharded by fully_shard; "
                             "call place_in_layers before fully_shard")
        adapters = layer._modules.get(ATTR)
        if adapters is None:
            adapters = nn.ModuleDict()
            layer.add_module(ATTR, adapters)
            layer.register_state_dict_post_hook(_drop_adapter_keys)
            layer.register_load_state_dict_post_hook(_ignore_adapter_keys)
        adapters[lora.lora_name] = lora
    return net


def blocks_of(model: nn.Module) -> list:
    """The blocks users shard one by one (what accelerate's transformer-based auto-wrap picks for diffusers
    models): every element of the model's top-level ModuleLists (`transformer_blocks`, `single_transformer_blocks`,
    `down_blocks`, `up_blocks`, ...) and a `mid_block`."""
    blocks = []
    for name, child in model.named_children():
        if isinstance(child, nn.ModuleList):
            blocks.extend(child)
        elif name == "mid_block" and child is not None:
            blocks.append(child)
    return blocks


def shard(model: nn.Module, net: nn.Module, blocks=None, **fully_shard_kwargs) -> nn.Module:
    """The whole recipe: `place_in_layers(net)`, `fully_shard` on every block (`blocks_of(model)` by default), then
    on the root, with `fully_shard_kwargs` (mp_policy, reshard_after_forward for the blocks, mesh, ...) and the
    quantized base weights FSDP2 cannot split kept whole (`quantized_base_params`). Returns the model."""
    from torch.distributed.fsdp import fully_shard

    place_in_layers(net)
    kw = dict(fully_shard_kwargs)
    kw["ignored_params"] = set(kw.get("ignored_params") or ()) | quantized_base_params(model)
    for block in blocks_of(model) if blocks is None else blocks:
        fully_shard(block, **kw)
    kw.pop("reshard_after_forward", None)  # the root's default (None: not resharded after forward)
    fully_shard(model, **kw)
    return model


def per_gpu_memory(model: nn.Module, net: nn.Module, world_size: int, *, blocks=None, replicate_adapters=False,
                   compute_dtype=None, optimizer_states: int = 2) -> Dict[str, int]:
    """Bytes one GPU holds under per-block FSDP2 over `world_size` GPUs (the model and network may live on the meta
    device): `base_params` (every base parameter's Shard(0) share on rank 0, the largest; quantized weights FSDP2
    cannot split whole), `adapter_params`, `grads` (the adapters', in their dtype), `optimizer` (`optimizer_states`
    tensors per adapter parameter, e.g. AdamW's two moments), and `block_gathered`, the transient of the largest
    block while it runs: its parameters all-gathered in `compute_dtype` (MixedPrecisionPolicy.param_dtype; default
    their own) plus its adapters' whole gradients before the reduce-scatter. `replicate_adapters=True`: the same run
    with every adapter whole on every GPU (adapters in no block: DDP-style, or the old root-group recipe)."""
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    adapter_ids = {id(p) for lora in net.loras for p in lora.parameters()}
    whole = {id(p) for p in quantized_base_params(model)}

    def nbytes(p, dtype=None):
        return p.numel() * (dtype or p.dtype).itemsize

    def share(p):
        return stored_bytes(p) if id(p) in whole else shard_bytes(p, world_size)

    base = sum(share(p) for p in model.parameters() if id(p) not in adapter_ids)
    adapters = [p for lora in net.loras for p in lora.parameters()]
    held = sum(nbytes(p) if replicate_adapters else share(p) for p in adapters)
    gathered = 0
    for block in blocks_of(model) if blocks is None else blocks:
        inside = {id(m) for m in block.modules()}
        own = [p for lora in net.loras if id(lora.org_module[0]) in inside for p in lora.parameters()]
        size = sum(nbytes(p, compute_dtype if p.is_floating_point() else None) for p in block.parameters()
                   if id(p) not in adapter_ids)
        if not replicate_adapters:  # gathered with the block (compute dtype), whole gradients until reduce-scatter
            size += sum(nbytes(p, compute_dtype) + nbytes(p) for p in own)
        gathered = max(gathered, size)
    return {"base_params": base, "adapter_params": held, "grads": held, "optimizer": optimizer_states * held,
            "block_gathered": gathered, "adapter_count": sum(p.numel() for p in adapters)}


def shard_bytes(p: torch.Tensor, world_size: int) -> int:
    """Bytes of FSDP2's Shard(0) share of `p` on rank 0, the largest (torch.chunk: ceil(rows / world_size) rows);
    a 0-d tensor whole."""
    if p.dim() == 0:
        return p.numel() * p.element_size()
    return p.numel() // max(p.shape[0], 1) * -(-p.shape[0] // world_size) * p.element_size()


def stored_bytes(t: torch.Tensor) -> int:
    """Bytes a tensor stores: a wrapper subclass (torchao's Int8Tensor, quanto's QBytesTensor: `dtype` is the
    logical one) counts its inner tensors (int8 data, scales), a plain tensor numel x itemsize."""
    if type(t) not in (torch.Tensor, nn.Parameter) and hasattr(t, "__tensor_flatten__"):
        names, _ = t.__tensor_flatten__()
        return sum(stored_bytes(getattr(t, n)) for n in names)
    return t.numel() * t.dtype.itemsize


def quantized_base_params(model: nn.Module) -> set:
    """The weights of `model`'s quantized base layers (`targeting.is_quantized_base`) stored in a tensor subclass or
    fp8. FSDP2 cannot split torchao's Int8Tensor / Float8Tensor or bitsandbytes' Params4bit (optimum-quanto's
    QBytesTensor it can); passed as `fully_shard(..., ignored_params=...)` (as `shard` does) they stay whole on every
    rank (a quantized base is already small) while the adapters in the same block are sharded."""
    from .targeting import is_quantized_base

    return {p for m in model.modules() if is_quantized_base(m) for p in m.parameters(recurse=False)
            if type(p) not in (torch.Tensor, nn.Parameter) or p.dtype in _FP8}


_FP8 = tuple(getattr(torch, n) for n in ("float8_e4m3fn", "float8_e5m2") if hasattr(torch, n))


def _is_sharded(module: nn.Module) -> bool:
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in module.parameters(recurse=False))


def _drop_adapter_keys(module, state_dict, prefix, local_metadata):
    """The layer's state_dict without its adapters (they are saved by the network, with LyCORIS keys)."""
    start = f"{prefix}{ATTR}."
    for key in [k for k in state_dict if k.startswith(start)]:
        del state_dict[key]
    for key in [k for k in getattr(state_dict, "_metadata", {}) if k.startswith(start[:-1])]:
        del state_dict._metadata[key]


def _ignore_adapter_keys(module, incompatible_keys):
    """A base-model state dict (which has no adapter keys) loads strictly into a model with placed adapters."""
    incompatible_keys.missing_keys[:] = [k for k in incompatible_keys.missing_keys if f"{ATTR}." not in k]


def is_sharded(state_dict: Dict[str, torch.Tensor]) -> bool:
    from torch.distributed.tensor import DTensor

    return any(isinstance(v, DTensor) for v in state_dict.values())


def gathered_state_dict(state_dict: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Every DTensor of `state_dict` as the whole tensor (a collective: every rank must call it, in the same order
    of keys, which the network's state_dict has)."""
    from torch.distributed.tensor import DTensor

    return {k: v.full_tensor() if isinstance(v, DTensor) else v for k, v in state_dict.items()}


def sharded_like(full: Dict[str, torch.Tensor], own: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """`full` (whole tensors, e.g. read from a file by every rank) with each tensor whose counterpart in `own` is
    a DTensor made into a DTensor with the same mesh and placements (each rank keeps its own shard)."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    out = {}
    for key, value in full.items():
        target = own.get(key)
        if isinstance(target, DTensor) and not isinstance(value, DTensor):
            value = distribute_tensor(value.to(device=target.device, dtype=target.dtype), target.device_mesh,
                                      target.placements)
        out[key] = value
    return out


def is_main_process() -> bool:
    return not (torch.distributed.is_available() and torch.distributed.is_initialized()) or \
        torch.distributed.get_rank() == 0


def barrier() -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
