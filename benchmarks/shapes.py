"""The one shape registry of the benchmarks: every distinct Linear/Conv2d of a model family.

Built from the family's published diffusers config (`data/*.json`, listed in `lyfast.models.MODELS`) on the
meta device, with one meta forward at the family's stated input (1024x1024, batch 1; SDXL: 77 text tokens,
latent 128x128, so 320-wide blocks see 16384 tokens, 640-wide 4096, 1280-wide 1024 and cross-attention K/V
the 77 text tokens; Flux/Qwen-Image/Cosmos/Flux 2/SD3.5: 4096 image tokens plus 512 (SD3.5: 333) text
tokens; time, label and modulation layers see 1).

`cpu_subset(model)` is the micro-benchmark set for a 2-core CPU, every shape checked to exist in the model:
SDXL's five linear shapes at 77 tokens and two 3x3 convolutions at 8x8 pixels (64 tokens); a transformer's
`lyfast.models.timed_geometries` (its most frequent Linear geometry and, of the others, the one with the
largest FLOP share, weights up to 4x SDXL's largest) at 77 tokens. Memory covers every shape
(`python -m lyfast profile-memory --model M --layers all`).
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from functools import lru_cache
from pathlib import Path

import torch
import torch.nn as nn

from lyfast.models import MODELS as PROFILE_MODELS
from lyfast.models import timed_geometries, trace_model

CONFIG = Path(__file__).with_name("data") / "sdxl_unet_config.json"
MODELS = tuple(PROFILE_MODELS)
RESOLUTION = 1024
CPU_TOKENS = 77          # linear rows in the CPU subset
CPU_PIXELS = (8, 8)      # conv input size in the CPU subset


@dataclass(frozen=True)
class Shape:
    """One layer shape and the input it sees (batch 1). `count` = how many model layers have it; `bias` =
    whether most of them have a bias (the geometry alone identifies a shape)."""

    kind: str            # "linear" | "conv"
    cin: int
    cout: int
    input: tuple         # full input shape: (1, tokens, cin) or (1, cin, H, W)
    kernel: int = 1
    stride: int = 1
    padding: int = 0
    count: int = 1
    bias: bool = True
    example: str = ""    # one model module name with this shape

    @property
    def tokens(self) -> int:
        lead = self.input[2:] if self.kind == "conv" else self.input[1:-1]
        return int(torch.Size(lead).numel())

    @property
    def name(self) -> str:
        if self.kind == "linear":
            return f"linear-{self.cin}-{self.cout}-t{self.tokens}"
        s = f"s{self.stride}-" if self.stride != 1 else ""
        return f"conv{self.kernel}x{self.kernel}-{self.cin}-{self.cout}-{s}{self.input[2]}x{self.input[3]}"

    def layer(self, device="cpu", dtype=torch.float32, seed: int = 0, quant_base: str = "bf16") -> nn.Module:
        """A frozen layer of this shape with seeded default initialisation; a Linear quantized by `quant_base`'s
        library unless it is "bf16" (`lyfast.quantized`; BaseUnavailable when it cannot be built here)."""
        torch.manual_seed(seed)
        if self.kind == "linear":
            mod = nn.Linear(self.cin, self.cout, bias=self.bias)
        else:
            mod = nn.Conv2d(self.cin, self.cout, self.kernel, self.stride, self.padding, bias=self.bias)
        mod = mod.to(device, dtype).requires_grad_(False)
        if quant_base == "bf16":
            return mod
        from lyfast.quantized import BaseUnavailable, quantize_layer

        if self.kind != "linear":
            raise BaseUnavailable(f"{quant_base}: only Linear layers are quantized, {self.name} is a conv")
        return quantize_layer(mod, quant_base).requires_grad_(False)


@lru_cache(maxsize=None)
def model_shapes(model: str = "sdxl", resolution: int | None = None) -> tuple[Shape, ...]:
    """Every distinct (layer shape, input shape) of `model`, most frequent first."""
    groups: dict[Shape, list[tuple[str, bool]]] = {}   # geometry -> [(module name, has bias)]
    for name, (mod, shape) in trace_model(model, resolution).items():
        if isinstance(mod, nn.Linear):
            s = Shape("linear", mod.in_features, mod.out_features, shape)
        else:
            s = Shape("conv", mod.in_channels, mod.out_channels, shape, kernel=mod.kernel_size[0],
                      stride=mod.stride[0], padding=mod.padding[0])
        groups.setdefault(s, []).append((name, mod.bias is not None))
    shapes = [replace(s, count=len(g), example=g[0][0], bias=2 * sum(b for _, b in g) >= len(g))
              for s, g in groups.items()]
    return tuple(sorted(shapes, key=lambda s: -s.count))


def unet_shapes(resolution: int = RESOLUTION) -> tuple[Shape, ...]:
    """model_shapes of the SDXL UNet."""
    return model_shapes("sdxl", resolution)


def at_model_size(shape: Shape, model: str = "sdxl") -> Shape:
    """`shape` at the model's real token count: itself if it is a registry entry, else the most frequent
    entry with its geometry seeing more than one token."""
    reg = model_shapes(model)
    if shape in reg:
        return shape
    hits = [s for s in reg if (s.kind, s.cin, s.cout, s.kernel, s.stride) ==
            (shape.kind, shape.cin, shape.cout, shape.kernel, shape.stride) and s.tokens > 1]
    if not hits:
        raise LookupError(f"no {shape.kind} {shape.cin}->{shape.cout} k{shape.kernel} layer in {model}")
    return hits[0]   # the registry is sorted most frequent first


def at_unet_size(shape: Shape) -> Shape:
    return at_model_size(shape, "sdxl")


def _subset_shape(model: str, kind: str, cin: int, cout: int, kernel: int = 1) -> Shape:
    """The model's own shape (bias, padding, count), fed the small CPU input."""
    s = at_model_size(Shape(kind, cin, cout, (), kernel=kernel), model)
    return replace(s, input=(1, CPU_TOKENS, cin) if kind == "linear" else (1, cin, *CPU_PIXELS))


CPU_SUBSET_SPEC = {
    "linear-1280-1280": ("linear", 1280, 1280),
    "linear-1280-10240": ("linear", 1280, 10240),
    "linear-5120-1280": ("linear", 5120, 1280),
    "linear-640-5120": ("linear", 640, 5120),
    "linear-2048-1280": ("linear", 2048, 1280),
    "conv3x3-1280-1280": ("conv", 1280, 1280, 3),
    "conv3x3-640-640": ("conv", 640, 640, 3),
}


@lru_cache(maxsize=None)
def subset_spec(model: str = "sdxl") -> dict[str, tuple]:
    """{CPU subset name: (kind, cin, cout[, kernel])} of `model`."""
    if model == "sdxl":
        return dict(CPU_SUBSET_SPEC)
    traced = trace_model(model)
    out = {}
    for name in timed_geometries(traced):
        mod = traced[name][0]
        out[f"linear-{mod.in_features}-{mod.out_features}"] = ("linear", mod.in_features, mod.out_features)
    return out


def cpu_subset(model: str = "sdxl") -> dict[str, Shape]:
    return {name: _subset_shape(model, *spec) for name, spec in subset_spec(model).items()}


def select(spec: str, model: str = "sdxl") -> dict[str, Shape]:
    """Shapes of `model` by a comma list of: "cpu" (its CPU subset), "model" (alias "unet": every shape seeing
    more than one token, real token counts), CPU subset names, or registry names (`Shape.name`)."""
    out: dict[str, Shape] = {}
    subset = subset_spec(model)
    for item in filter(None, spec.split(",")):
        if item == "cpu":
            out.update(cpu_subset(model))
        elif item in ("model", "unet"):
            out.update((s.name, s) for s in model_shapes(model) if s.tokens > 1)
        elif item in subset:
            out[item] = _subset_shape(model, *subset[item])
        else:
            hits = [s for s in model_shapes(model) if s.name == item]
            if not hits:
                raise KeyError(f"unknown {model} shape {item!r}: use cpu, model, {', '.join(subset)} "
                               f"or a registry name such as {model_shapes(model)[0].name}")
            out[item] = hits[0]
    return out


if __name__ == "__main__":   # python -m benchmarks.shapes [model]
    import sys

    for s in model_shapes(sys.argv[1] if len(sys.argv) > 1 else "sdxl"):
        print(f"{s.count:4d}  {s.name:36s} tokens {s.tokens:6d}  e.g. {s.example}")
