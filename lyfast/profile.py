"""Activation-memory profile of lyfast adapters against lycoris-lora on SDXL UNet layers.

`python -m lyfast profile-memory` builds the SDXL UNet from its config on the meta device (no download,
no weights), traces every Linear/Conv2d input shape with one meta forward at the chosen resolution, then
materializes only the selected layers for real and measures, for one adapted layer and one training step:

* saved    - bytes autograd keeps for backward beyond the frozen base layer alone (saved-tensor hooks; each
             storage counted once; parameters and buffers excluded),
* transient - the largest tensor any op creates during forward+backward (a dispatch mode records every
             op output that does not alias an input),
* peak     - on CUDA, peak allocated bytes of the step above what was allocated before it.

"act" is the layer's activation size: max(bytes of its input, bytes of its output) in the profiled dtype.
diffusers and lycoris are imported lazily; lycoris only to compare, and only if installed.
The same functions back `benchmarks/memory.py`.
"""
from __future__ import annotations

import argparse
import copy
import importlib
import math
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.nn as nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

# SDXL base UNet2DConditionModel: the keys of its config.json that differ from diffusers' defaults
# (builds the 2,567,463,684-parameter model; tests check it against the full JSON in benchmarks/data).
SDXL_UNET = {
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": 256,
    "attention_head_dim": [5, 10, 20],
    "block_out_channels": [320, 640, 1280],
    "cross_attention_dim": 2048,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "projection_class_embeddings_input_dim": 2816,
    "sample_size": 128,
    "transformer_layers_per_block": [1, 2, 10],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "upcast_attention": None,
    "use_linear_projection": True,
}
TEXT_TOKENS = 77
POOLED_TEXT = 1280   # SDXL's pooled text-encoder-2 embedding width

# The adapter settings of the performance issue: algorithm -> (class name, constructor kwargs).
SETTINGS = {
    "loha-r8": ("loha", dict(lora_dim=8, alpha=8)),
    "loha-r16": ("loha", dict(lora_dim=16, alpha=16)),
    "loha-r32": ("loha", dict(lora_dim=32, alpha=32)),
    "lokr-f-1-r16": ("lokr", dict(lora_dim=16, alpha=16, factor=-1)),
    "boft-b32": ("boft", dict(lora_dim=32, alpha=1)),
    # DoRA (weight_decompose, row norms), LyCORIS DoRA as the peer
    "loha-r8-dora": ("loha", dict(lora_dim=8, alpha=8, weight_decompose=True)),
    "lokr-f-1-r16-dora": ("lokr", dict(lora_dim=16, alpha=16, factor=-1, weight_decompose=True)),
}
_CLASSES = {"loha": ("loha", "LohaModule"), "lokr": ("lokr", "LokrModule"),
            "boft": ("boft", "ButterflyOFTModule")}


# ----------------------------------------------------------------------------------------------- UNet
def build_unet(config: dict | None = None):
    """The SDXL UNet (or `config`) on the meta device: shapes only, no memory."""
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        return UNet2DConditionModel.from_config(config or SDXL_UNET)


def trace_layers(unet, resolution: int = 1024, batch: int = 1) -> dict[str, tuple[nn.Module, tuple]]:
    """{module name: (Linear/Conv2d module, its input shape)} from one meta-device forward at `resolution`
    pixels (latent = resolution/8) with 77 text tokens; time/label embeddings see one token."""
    shapes, hooks = {}, []
    for name, mod in unet.named_modules():
        if isinstance(mod, (nn.Linear, nn.Conv2d)):
            hooks.append(mod.register_forward_pre_hook(
                lambda m, args, name=name: shapes.__setitem__(name, (m, tuple(args[0].shape)))))
    cfg, lat = unet.config, resolution // 8
    try:
        with torch.device("meta"), torch.no_grad():
            add = None
            if cfg.addition_embed_type == "text_time":   # SDXL: pooled text embedding + 6 size/crop ids
                n_time = (cfg.projection_class_embeddings_input_dim - POOLED_TEXT) // cfg.addition_time_embed_dim
                add = {"text_embeds": torch.empty(batch, POOLED_TEXT), "time_ids": torch.empty(batch, n_time)}
            unet(torch.empty(batch, cfg.in_channels, lat, lat), torch.tensor([1.0]),
                 torch.empty(batch, TEXT_TOKENS, cfg.cross_attention_dim), added_cond_kwargs=add)
    finally:
        for h in hooks:
            h.remove()
    return shapes


def tokens(layer: nn.Module, shape: tuple) -> int:
    """Tokens per batch a layer sees: rows of a Linear's input, pixels of a Conv2d's input."""
    return math.prod(shape[2:] if isinstance(layer, nn.Conv2d) else shape[1:-1])


def describe(layer: nn.Module, shape: tuple) -> str:
    """e.g. "linear 1280->10240 x1024" (tokens) or "conv3x3/2 320->320 @128x128" (input pixels)."""
    if isinstance(layer, nn.Conv2d):
        k, s = layer.kernel_size, layer.stride[0]
        return (f"conv{k[0]}x{k[1]}{f'/{s}' if s != 1 else ''} {layer.in_channels}->{layer.out_channels}"
                f" @{shape[-2]}x{shape[-1]}")
    return f"linear {layer.in_features}->{layer.out_features} x{tokens(layer, shape)}"


def materialize(layer: nn.Module, device="cpu", dtype=torch.float32) -> nn.Module:
    """A real, frozen, randomly initialised copy of a (meta) Linear/Conv2d layer."""
    real = copy.deepcopy(layer).to_empty(device=device)
    with torch.no_grad():
        real.float().reset_parameters()
    return real.to(dtype).requires_grad_(False)


# ------------------------------------------------------------------------------------------ adapters

def adapter_class(provider: str, algo: str):
    """The adapter class of `provider` ("lyfast" or "lycoris") for `algo`; raises ImportError if absent."""
    mod, cls = _CLASSES[algo]
    if provider == "lyfast":
        import lyfast
        return getattr(lyfast, cls)
    if provider == "lycoris":
        return getattr(importlib.import_module(f"lycoris.modules.{mod}"), cls)
    raise ValueError(f"unknown adapter provider {provider!r}")


@torch.no_grad()
def adapt(layer: nn.Module, provider: str, setting: str, seed: int = 0):
    """Wrap a copy of `layer` with `provider`'s adapter for `setting` (apply_to), its parameters random and
    non-zero. Returns (adapted layer, adapter or None for "base"). Raises ValueError when the setting does
    not fit the layer (e.g. BOFT block sizes) and ImportError when the provider is not installed."""
    layer = copy.deepcopy(layer)
    if provider == "base":
        return layer, None
    algo, kw = SETTINGS[setting]
    kw = dict(kw)
    args = [f"bench_{setting}", layer, 1.0, kw.pop("lora_dim"), kw.pop("alpha"), 0.0, 0.0, 0.0, False]
    adapter = adapter_class(provider, algo)(*args, **kw)
    gen = torch.Generator().manual_seed(seed)
    for p in adapter.parameters():
        # small random values: an identity-like BOFT rotation, no denormals, no zero factors
        p.copy_(torch.randn(p.shape, generator=gen) * (0.02 if algo == "boft" else 0.1))
    adapter.to(device=layer.weight.device, dtype=layer.weight.dtype)
    adapter.apply_to()
    return layer, adapter


def make_input(layer: nn.Module, shape: tuple, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    w = layer.weight
    return torch.randn(shape, generator=gen).to(w.device, w.dtype).requires_grad_(True)


# ------------------------------------------------------------------------------------------ measuring
class _Largest(TorchDispatchMode):
    """Records the largest op output that is a new allocation (not a view of / in-place on an input)."""

    def __init__(self):
        super().__init__()
        self.bytes, self.op = 0, None

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        ins = {_ptr(t) for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)}
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and _ptr(t) not in ins:
                n = t.numel() * t.element_size()
                if n > self.bytes:
                    self.bytes, self.op = n, str(func.overloadpacket.__name__)
        return out


def _ptr(t: torch.Tensor) -> int:
    try:
        return t.untyped_storage().data_ptr()
    except Exception:  # tensors without storage (subclasses, sparse)
        return id(t)


@contextmanager
def _saved(exclude):
    """Collects {storage ptr: bytes} of every tensor autograd saves, minus `exclude`'s storages."""
    skip = {_ptr(t) for t in exclude}
    seen: dict[int, int] = {}

    def pack(t):
        p = _ptr(t)
        if p not in skip:
            try:
                n = t.untyped_storage().nbytes()
            except Exception:
                n = t.numel() * t.element_size()
            seen[p] = max(seen.get(p, 0), n)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        yield seen


@dataclass
class StepMemory:
    saved: int            # bytes saved for backward (parameters/buffers excluded)
    transient: int        # largest tensor created in forward+backward
    transient_op: str | None
    peak: int | None      # CUDA: peak allocated bytes of the step beyond what existed before
    act: int              # max(input bytes, output bytes)
    extra: dict = field(default_factory=dict)


def step_memory(layer: nn.Module, x: torch.Tensor, adapter: nn.Module | None = None) -> StepMemory:
    """Memory of one forward+backward of `layer` (possibly adapted) on `x`."""
    params = [*layer.parameters(), *layer.buffers()]
    if adapter is not None:
        params += [*adapter.parameters(), *adapter.buffers()]
    cuda = x.is_cuda
    x.grad = None
    for p in params:
        p.grad = None
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    mode = _Largest()
    with _saved(params) as seen, mode:
        y = layer(x)
        saved = sum(seen.values())
        y.backward(torch.ones_like(y))
    peak = None
    if cuda:
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - before
    act = max(x.numel() * x.element_size(), y.numel() * y.element_size())
    return StepMemory(saved, mode.bytes, mode.op, peak, act)


def adapter_memory(layer: nn.Module, shape: tuple, provider: str, setting: str,
                   base: StepMemory | None = None) -> StepMemory:
    """step_memory of `provider`'s adapter on `layer` with `saved` (and `peak`) taken beyond the frozen
    base layer alone (`base`: its step_memory, measured here if not given); `extra` holds the base's own."""
    base = base or step_memory(layer, make_input(layer, shape))
    adapted, adapter = adapt(layer, provider, setting)
    m = step_memory(adapted, make_input(layer, shape), adapter)
    m.saved -= base.saved
    if m.peak is not None:
        m.peak -= base.peak
    m.extra = {"base_saved": base.saved, "base_transient": base.transient, "base_peak": base.peak}
    return m


# ------------------------------------------------------------------------------------------------ CLI
# One layer per shape the CPU micro-benchmark uses, at its real place in the UNet.
DEFAULT_LAYERS = (
    "down_blocks.2.attentions.0.transformer_blocks.0.attn1.to_q",      # linear 1280->1280
    "down_blocks.2.attentions.0.transformer_blocks.0.ff.net.0.proj",   # linear 1280->10240
    "down_blocks.2.attentions.0.transformer_blocks.0.ff.net.2",        # linear 5120->1280
    "down_blocks.1.attentions.0.transformer_blocks.0.ff.net.0.proj",   # linear 640->5120
    "down_blocks.2.attentions.0.transformer_blocks.0.attn2.to_k",      # linear 2048->1280, 77 tokens
    "mid_block.resnets.0.conv1",                                       # conv3x3 1280->1280
    "down_blocks.1.resnets.1.conv1",                                   # conv3x3 640->640
)


def _mib(n):
    return "-" if n is None else f"{n / 2**20:8.2f}"


def profile_memory(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(prog="python -m lyfast profile-memory", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--settings", default="loha-r8,lokr-f-1-r16,boft-b32",
                    help=f"comma list of {', '.join(SETTINGS)}")
    ap.add_argument("--layers", default=",".join(DEFAULT_LAYERS),
                    help="comma list of UNet module names, or 'all' (one layer per distinct shape)")
    ap.add_argument("--resolution", type=int, default=1024, help="image pixels per side (latent = /8)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default=None, help="float32 | bfloat16 | float16 (default: bf16 on CUDA)")
    ap.add_argument("--providers", default="lyfast,lycoris")
    args = ap.parse_args(argv)
    unknown = [name for name in args.settings.split(",") if name not in SETTINGS]
    if unknown:
        ap.error(f"--settings: unknown setting(s) {unknown}; choose from {', '.join(SETTINGS)}")
    dtype = getattr(torch, args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32"))

    traced = trace_layers(build_unet(), args.resolution)
    if args.layers == "all":
        names, keys = [], set()
        for name, (mod, shape) in traced.items():
            key = (tuple(mod.weight.shape), getattr(mod, "stride", None), shape)
            if tokens(mod, shape) > 1 and key not in keys:
                keys.add(key)
                names.append(name)
    else:
        names = args.layers.split(",")
    print(f"SDXL UNet at {args.resolution}x{args.resolution} (latent {args.resolution // 8}), batch 1, "
          f"{TEXT_TOKENS} text tokens; each layer materialized alone on {args.device} in "
          f"{str(dtype).split('.')[-1]}.\nsaved = bytes kept for backward beyond the frozen layer; "
          f"transient = largest tensor created in fwd+bwd; act = max(input, output) bytes.")
    print(f"{'layer':62s} {'shape':>22s} {'setting':13s} {'provider':8s} {'saved MiB':>9s} "
          f"{'x act':>6s} {'transient MiB':>13s} {'x act':>6s}" + ("  peak MiB" if "cuda" in args.device else ""))
    rows = []
    for name in names:
        meta, shape = traced[name]
        layer = materialize(meta, args.device, dtype)
        desc = describe(layer, shape)
        for setting in args.settings.split(","):
            for provider in args.providers.split(","):
                try:
                    m = adapter_memory(layer, shape, provider, setting)
                except (ValueError, ImportError) as exc:
                    print(f"{name:62s} {desc:>22s} {setting:13s} {provider:8s} skipped: {exc}")
                    continue
                rows.append(dict(layer=name, shape=desc, setting=setting, provider=provider, saved=m.saved,
                                 transient=m.transient, transient_op=m.transient_op, peak=m.peak, act=m.act))
                print(f"{name:62s} {desc:>22s} {setting:13s} {provider:8s} {_mib(m.saved):>9s} "
                      f"{m.saved / m.act:6.2f} {_mib(m.transient):>13s} {m.transient / m.act:6.2f}"
                      + (f"  {_mib(m.peak)}" if m.peak is not None else ""))
        del layer
    return rows


if __name__ == "__main__":
    profile_memory()
