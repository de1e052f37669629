"""Activation-memory profile of lyfast adapters against lycoris-lora on the layers of a diffusion model.

`python -m lyfast profile-memory [--model sdxl|flux|flux2|sd35|qwen-image|cosmos|all]` builds the model from
its published diffusers config on the meta device (no download, no weights; SDXL's UNet by default, the
transformer configs ship in the repository's benchmarks/data/, see `MODELS`), traces every Linear/Conv2d
input shape with one meta forward at the family's stated resolution, frame and text-token count, then
materializes only the selected layers for real and measures, for one adapted layer and one training step:

* saved    - bytes autograd keeps for backward beyond the frozen base layer alone (saved-tensor hooks; each
             storage counted once; parameters and buffers excluded),
* transient - the largest tensor any op creates during forward+backward (a dispatch mode records every
             op output that does not alias an input),
* peak     - on CUDA, peak allocated bytes of the step above what was allocated before it.

"act" is the layer's activation size: max(bytes of its input, bytes of its output) in the profiled dtype.
diffusers, lycoris and peft are imported lazily; lycoris and peft (HF PEFT, `peft_config`) only to compare, and
only if installed.
The same functions back `benchmarks/memory.py`.
"""
from __future__ import annotations

import argparse
import copy
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.nn as nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from . import cli
from .models import MODELS, describe, describe_input, materialize, timed_geometries, tokens, trace_model
from .peers import PROVIDERS, SETTINGS, adapt, make_input
from .quantized import BASES, BaseUnavailable, quantize_layer


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


class LargeTensors(TorchDispatchMode):
    """Counts op outputs with at least `threshold` elements (`ops`: which ops made them): the W-size probe. A
    quantized layer's own dequantization counts too, so compare with the frozen layer's own count."""

    def __init__(self, threshold: int, shapes=None):
        super().__init__()
        self.threshold, self.count, self.ops = threshold, 0, []
        self.shapes = None if shapes is None else {tuple(s) for s in shapes}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if (isinstance(t, torch.Tensor) and t.numel() >= self.threshold
                    and (self.shapes is None or tuple(t.shape) in self.shapes)):
                self.count += 1
                self.ops.append(str(func.overloadpacket.__name__))
        return out


def large_tensors(layer: nn.Module, x: torch.Tensor, threshold: int, shapes=None) -> LargeTensors:
    """The LargeTensors record of one forward+backward of `layer` on `x` (upstream gradient of ones); with
    `shapes`, only outputs of those shapes count (W's, so activations of W's size do not)."""
    x = x.detach().requires_grad_(True)
    with LargeTensors(threshold, shapes) as probe:
        y = layer(x)
        y.backward(torch.ones_like(y))
    return probe


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
                   base: StepMemory | None = None, copy_layer: bool = True) -> StepMemory:
    """step_memory of `provider`'s adapter on `layer` with `saved` (and `peak`) taken beyond the frozen
    base layer alone (`base`: its step_memory, measured here if not given); `extra` holds the base's own.
    copy_layer=False adapts `layer` itself (see `adapt`)."""
    base = base or step_memory(layer, make_input(layer, shape))
    adapted, adapter = adapt(layer, provider, setting, copy_layer=copy_layer)
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


def _layer_names(model: str, traced: dict, layers: str | None) -> list[str]:
    """The module names `--layers` selects in one traced model."""
    if layers is None:
        return list(DEFAULT_LAYERS) if model == "sdxl" else timed_geometries(traced)
    if layers == "all":
        names, keys = [], set()
        for name, (mod, shape) in traced.items():
            key = (tuple(mod.weight.shape), getattr(mod, "stride", None), shape)
            if tokens(mod, shape) > 1 and key not in keys:
                keys.add(key)
                names.append(name)
        return names
    names = layers.split(",")
    if missing := [n for n in names if n not in traced]:
        raise ValueError(f"--layers: no Linear/Conv2d named {missing[0]!r} in {model} "
                         f"(e.g. {next(iter(traced))!r}), or use 'all'")
    return names


def profile_memory(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(prog="python -m lyfast profile-memory", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--settings", default=["loha-r8", "lokr-f-1-r16", "boft-b32"], type=cli.items(SETTINGS),
                    help=f"comma list of {', '.join(SETTINGS)}")
    ap.add_argument("--layers", default=None,
                    help="comma list of module names, or 'all' (one layer per distinct shape seeing more than "
                         "one token); default: SDXL's CPU benchmark layers, a transformer's timed_geometries")
    ap.add_argument("--model", default=["sdxl"], type=cli.items(MODELS, also=("all",)),
                    help=f"{', '.join(MODELS)}, a comma list, or all (each in turn)")
    ap.add_argument("--resolution", type=cli.resolution, default=None,
                    help="image pixels per side (latent = /8; default: the family's, 1024)")
    ap.add_argument("--frames", type=cli.positive(int), default=None, help="video frames (default: the family's, 1)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", type=cli.device)
    ap.add_argument("--dtype", default=None, type=cli.dtype_name,
                    help="float32 | bfloat16 | float16 (or fp32, bf16, fp16; default: bf16 on CUDA)")
    ap.add_argument("--base", default="bf16", choices=BASES,
                    help="the frozen layer: plain (bf16: in --dtype) or its Linear layers quantized by the library")
    ap.add_argument("--providers", default=["lyfast", "lycoris", "lycoris-bypass", "peft"], type=cli.items(PROVIDERS),
                    help="comma list of " + ", ".join(PROVIDERS) + "; absent or unfitting ones are listed as skipped")
    args = ap.parse_args(argv)
    dtype = getattr(torch, args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32"))

    models = list(MODELS) if "all" in args.model else args.model
    traced, names = {}, []
    for model in models:
        layers = trace_model(model, args.resolution, args.frames)
        prefix = f"{model}:" if len(models) > 1 else ""   # `--model all`: layer names say their model
        traced.update((prefix + k, v) for k, v in layers.items())
        names += [prefix + n for n in _layer_names(model, layers, args.layers)]
        print(f"{describe_input(model, args.resolution, args.frames)}.")
    print(f"Each layer materialized alone on {args.device} in "
          f"{str(dtype).split('.')[-1]}.\nsaved = bytes kept for backward beyond the frozen layer; "
          f"transient = largest tensor created in fwd+bwd; act = max(input, output) bytes.")
    print(f"{'layer':62s} {'shape':>22s} {'setting':13s} {'provider':8s} {'saved MiB':>9s} "
          f"{'x act':>6s} {'transient MiB':>13s} {'x act':>6s}" + ("  peak MiB" if "cuda" in args.device else ""))
    rows = []
    for name in names:
        meta, shape = traced[name]
        layer = materialize(meta, args.device, dtype)
        desc = describe(layer, shape)
        for setting in args.settings:
            for provider in args.providers:
                try:
                    if args.base == "bf16":
                        m = adapter_memory(layer, shape, provider, setting)
                    else:  # a fresh quantized copy per provider, adapted in place (not every library deep-copies)
                        m = adapter_memory(quantize_layer(copy.deepcopy(layer), args.base), shape, provider, setting,
                                           copy_layer=False)
                except (ValueError, ImportError, BaseUnavailable) as exc:
                    print(f"{name:62s} {desc:>22s} {setting:13s} {provider:8s} skipped: {exc}")
                    continue
                except Exception as exc:
                    if args.base == "bf16":
                        raise
                    print(f"{name:62s} {desc:>22s} {setting:13s} {provider:8s} skipped: cannot run on a {args.base} "
                          f"layer ({type(exc).__name__}: {str(exc).splitlines()[0][:100]})")
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
