"""The one shape registry of the benchmarks: every distinct Linear/Conv2d of the SDXL UNet.

Built from `data/sdxl_unet_config.json` (the SDXL base UNet2DConditionModel config, kept in the repo) on the
meta device, with one meta forward at 1024x1024 (latent 128x128, batch 1, 77 text tokens) to read each layer's
input shape: 320-wide blocks see 128x128 = 16384 tokens, 640-wide 64x64 = 4096, 1280-wide 32x32 = 1024;
cross-attention K/V projections see the 77 text tokens; time/label embedding layers see 1.

`CPU_SUBSET` is the micro-benchmark set for a 2-core CPU: the five linear shapes at 77 tokens and the two
3x3 convolutions at 8x8 pixels (64 tokens), each checked to exist in the UNet.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, replace
from functools import lru_cache
from pathlib import Path

import torch
import torch.nn as nn

CONFIG = Path(__file__).with_name("data") / "sdxl_unet_config.json"
RESOLUTION = 1024
CPU_TOKENS = 77          # linear rows in the CPU subset
CPU_PIXELS = (8, 8)      # conv input size in the CPU subset


@dataclass(frozen=True)
class Shape:
    """One layer shape and the input it sees (batch 1). `count` = how many UNet layers have it; `bias` =
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
    example: str = ""    # one UNet module name with this shape

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

    def layer(self, device="cpu", dtype=torch.float32, seed: int = 0) -> nn.Module:
        """A frozen layer of this shape with seeded default initialisation."""
        torch.manual_seed(seed)
        if self.kind == "linear":
            mod = nn.Linear(self.cin, self.cout, bias=self.bias)
        else:
            mod = nn.Conv2d(self.cin, self.cout, self.kernel, self.stride, self.padding, bias=self.bias)
        return mod.to(device, dtype).requires_grad_(False)


@lru_cache(maxsize=None)
def unet_shapes(resolution: int = RESOLUTION) -> tuple[Shape, ...]:
    """Every distinct (layer shape, input shape) of the SDXL UNet, most frequent first."""
    from lyfast.profile import build_unet, trace_layers

    traced = trace_layers(build_unet(json.loads(CONFIG.read_text())), resolution)
    groups: dict[Shape, list[tuple[str, bool]]] = {}   # geometry -> [(module name, has bias)]
    for name, (mod, shape) in traced.items():
        if isinstance(mod, nn.Linear):
            s = Shape("linear", mod.in_features, mod.out_features, shape)
        else:
            s = Shape("conv", mod.in_channels, mod.out_channels, shape, kernel=mod.kernel_size[0],
                      stride=mod.stride[0], padding=mod.padding[0])
        groups.setdefault(s, []).append((name, mod.bias is not None))
    shapes = [replace(s, count=len(g), example=g[0][0], bias=2 * sum(b for _, b in g) >= len(g))
              for s, g in groups.items()]
    return tuple(sorted(shapes, key=lambda s: -s.count))


def at_unet_size(shape: Shape) -> Shape:
    """`shape` at the UNet's real token count: itself if it is a registry entry, else the entry with its
    geometry (the most frequent input size)."""
    if shape in unet_shapes():
        return shape
    for s in unet_shapes():
        if (s.kind, s.cin, s.cout, s.kernel, s.stride) == (shape.kind, shape.cin, shape.cout, shape.kernel,
                                                           shape.stride) and s.tokens > 1:
            return s
    raise LookupError(f"no {shape.kind} {shape.cin}->{shape.cout} k{shape.kernel} layer in the SDXL UNet")


def _subset_shape(kind: str, cin: int, cout: int, kernel: int = 1) -> Shape:
    """The UNet's own shape (bias, padding, count), fed the small CPU input."""
    s = at_unet_size(Shape(kind, cin, cout, (), kernel=kernel))
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


def cpu_subset() -> dict[str, Shape]:
    return {name: _subset_shape(*spec) for name, spec in CPU_SUBSET_SPEC.items()}


def select(spec: str) -> dict[str, Shape]:
    """Shapes by a comma list of: "cpu" (the CPU subset), "unet" (every UNet shape seeing more than one
    token, real token counts), CPU subset names, or registry names (`Shape.name`)."""
    out: dict[str, Shape] = {}
    for item in filter(None, spec.split(",")):
        if item == "cpu":
            out.update(cpu_subset())
        elif item == "unet":
            out.update((s.name, s) for s in unet_shapes() if s.tokens > 1)
        elif item in CPU_SUBSET_SPEC:
            out[item] = _subset_shape(*CPU_SUBSET_SPEC[item])
        else:
            hits = [s for s in unet_shapes() if s.name == item]
            if not hits:
                raise KeyError(f"unknown shape {item!r}: use cpu, unet, {', '.join(CPU_SUBSET_SPEC)} "
                               f"or a registry name such as {unet_shapes()[0].name}")
            out[item] = hits[0]
    return out


if __name__ == "__main__":
    for s in unet_shapes():
        print(f"{s.count:4d}  {s.name:36s} tokens {s.tokens:6d}  e.g. {s.example}")
