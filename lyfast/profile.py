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
import importlib
import json
import math
import types
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from . import cli
from .quantized import BASES, BaseUnavailable, quantize_layer

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
    # full-matrix LoKr as SimpleTuner trains DiTs (linear_dim 10000-100000, alpha 1): lora_dim >= half of
    # every factor's side, so both Kronecker factors are full matrices (LyCORIS then uses scale 1)
    "lokr-full-f4": ("lokr", dict(lora_dim=100000, alpha=1, factor=4)),
    "lokr-full-f8": ("lokr", dict(lora_dim=100000, alpha=1, factor=8)),
    "lokr-full-f16": ("lokr", dict(lora_dim=100000, alpha=1, factor=16)),
    "boft-b32": ("boft", dict(lora_dim=32, alpha=1)),
    # DoRA (weight_decompose, row norms), LyCORIS DoRA as the peer
    "loha-r8-dora": ("loha", dict(lora_dim=8, alpha=8, weight_decompose=True)),
    "lokr-f-1-r16-dora": ("lokr", dict(lora_dim=16, alpha=16, factor=-1, weight_decompose=True)),
}
# The adapter providers `adapt` builds (lyfast's backends, LyCORIS's modes, HF PEFT).
PROVIDERS = ("lyfast", "lyfast-triton", "lyfast-cuda", "lycoris", "lycoris-bypass", "lycoris-fused", "peft")
_CLASSES = {"loha": ("loha", "LohaModule"), "lokr": ("lokr", "LokrModule"),
            "boft": ("boft", "ButterflyOFTModule")}


# ------------------------------------------------------------------------------------- model families
DATA = Path(__file__).resolve().parent.parent / "benchmarks" / "data"


@dataclass(frozen=True)
class Family:
    """A model family: its published diffusers config (a JSON file in benchmarks/data whose `_name_or_path`
    names the source repository) and the input its layers are traced at: `resolution` pixels per side,
    `frames` video frames (1 = an image) and `text_tokens` text-encoder tokens, batch 1."""

    config: str
    resolution: int
    text_tokens: int
    frames: int = 1

    def load_config(self) -> dict:
        path = DATA / self.config
        if not path.is_file():
            raise FileNotFoundError(f"model config {path} not found: the configs ship in the repository's "
                                    "benchmarks/data/ (run from a clone)")
        return json.loads(path.read_text())


# Adding a family = its config file in benchmarks/data + one line here (+ an input builder in `_INPUTS` if
# its diffusers class is new). Text tokens: SDXL's CLIP 77; Flux/Flux 2/Qwen-Image's pipelines' 512
# (max_sequence_length); SD3.5's 77 CLIP + 256 T5 = 333; Cosmos-Predict2's 512 T5 tokens.
MODELS = {
    "sdxl": Family("sdxl_unet_config.json", 1024, TEXT_TOKENS),
    "flux": Family("flux1_dev_transformer_config.json", 1024, 512),
    "flux2": Family("flux2_dev_transformer_config.json", 1024, 512),
    "sd35": Family("sd35_large_transformer_config.json", 1024, 333),
    "qwen-image": Family("qwen_image_transformer_config.json", 1024, 512),
    "cosmos": Family("cosmos_predict2_2b_transformer_config.json", 1024, 512),
}


def family(model: str) -> Family:
    if model not in MODELS:
        raise ValueError(f"unknown model {model!r}: expected one of {', '.join(MODELS)}")
    return MODELS[model]


def build_model(model: str = "sdxl"):
    """The family's diffusers model from its config on the meta device: shapes only, no memory."""
    import diffusers

    if model == "sdxl":
        return build_unet()   # embedded (tests check it equals the JSON): profiles SDXL without a clone
    cfg = family(model).load_config()
    with torch.device("meta"):
        return getattr(diffusers, cfg["_class_name"]).from_config(cfg)


def build_unet(config: dict | None = None):
    """The SDXL UNet (or `config`) on the meta device: shapes only, no memory."""
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        return UNet2DConditionModel.from_config(config or SDXL_UNET)


def _unet_inputs(cfg, lat: int, frames: int, text: int, batch: int) -> dict:
    add = None
    if cfg.addition_embed_type == "text_time":   # SDXL: pooled text embedding + 6 size/crop ids
        n_time = (cfg.projection_class_embeddings_input_dim - POOLED_TEXT) // cfg.addition_time_embed_dim
        add = {"text_embeds": torch.empty(batch, POOLED_TEXT), "time_ids": torch.empty(batch, n_time)}
    return dict(sample=torch.empty(batch, cfg.in_channels, lat, lat), timestep=torch.tensor([1.0]),
                encoder_hidden_states=torch.empty(batch, text, cfg.cross_attention_dim), added_cond_kwargs=add)


# Flux, Flux 2 and Qwen-Image pack 2x2 latent pixels into one token (latent = pixels/8, so pixels/16 per side)
def _flux_inputs(cfg, lat: int, frames: int, text: int, batch: int) -> dict:
    n = (lat // 2) ** 2
    kw = dict(hidden_states=torch.empty(batch, n, cfg.in_channels), timestep=torch.ones(batch),
              encoder_hidden_states=torch.empty(batch, text, cfg.joint_attention_dim),
              img_ids=torch.zeros(n, 3), txt_ids=torch.zeros(text, 3),
              guidance=torch.ones(batch) if cfg.guidance_embeds else None)
    if "pooled_projection_dim" in cfg:           # Flux.1: pooled CLIP embedding
        kw["pooled_projections"] = torch.empty(batch, cfg.pooled_projection_dim)
    else:                                        # Flux 2: 4-axis position ids, no pooled embedding
        kw.update(img_ids=torch.zeros(batch, n, 4), txt_ids=torch.zeros(batch, text, 4))
    return kw


def _sd3_inputs(cfg, lat: int, frames: int, text: int, batch: int) -> dict:
    return dict(hidden_states=torch.empty(batch, cfg.in_channels, lat, lat), timestep=torch.ones(batch),
                encoder_hidden_states=torch.empty(batch, text, cfg.joint_attention_dim),
                pooled_projections=torch.empty(batch, cfg.pooled_projection_dim))


def _qwen_inputs(cfg, lat: int, frames: int, text: int, batch: int) -> dict:
    return dict(hidden_states=torch.empty(batch, (lat // 2) ** 2, cfg.in_channels), timestep=torch.ones(batch),
                encoder_hidden_states=torch.empty(batch, text, cfg.joint_attention_dim),
                encoder_hidden_states_mask=torch.ones(batch, text), img_shapes=[[(1, lat // 2, lat // 2)]] * batch)


def _cosmos_inputs(cfg, lat: int, frames: int, text: int, batch: int) -> dict:
    import diffusers.models.transformers.transformer_cosmos as cosmos

    if not hasattr(cosmos, "transforms"):
        # diffusers resizes the padding mask with torchvision, imported only if installed; on the meta device
        # any nearest resize gives the same shapes
        cosmos.transforms = types.SimpleNamespace(
            InterpolationMode=types.SimpleNamespace(NEAREST="nearest"),
            functional=types.SimpleNamespace(
                resize=lambda x, size, interpolation: nn.functional.interpolate(x, size=size, mode="nearest")))
    t = 1 + (frames - 1) // 4                    # Wan VAE: 4x temporal compression after the first frame
    return dict(hidden_states=torch.empty(batch, cfg.in_channels, t, lat, lat), timestep=torch.ones(batch),
                encoder_hidden_states=torch.empty(batch, text, cfg.text_embed_dim),
                padding_mask=torch.zeros(1, 1, lat, lat))


_INPUTS = {"UNet2DConditionModel": _unet_inputs, "FluxTransformer2DModel": _flux_inputs,
           "Flux2Transformer2DModel": _flux_inputs, "SD3Transformer2DModel": _sd3_inputs,
           "QwenImageTransformer2DModel": _qwen_inputs, "CosmosTransformer3DModel": _cosmos_inputs}


def trace_layers(model, resolution: int = 1024, batch: int = 1, frames: int = 1,
                 text_tokens: int = TEXT_TOKENS) -> dict[str, tuple[nn.Module, tuple]]:
    """{module name: (Linear/Conv2d module, its input shape)} from one meta-device forward of a (meta)
    diffusers model at `resolution` pixels (latent = resolution/8), `frames` frames and `text_tokens` text
    tokens; time/label embeddings and modulation layers see one token."""
    name = type(model).__name__
    if name not in _INPUTS:
        raise ValueError(f"no input builder for {name}: known classes {', '.join(_INPUTS)}")
    shapes, hooks = {}, []
    for mname, mod in model.named_modules():
        if isinstance(mod, (nn.Linear, nn.Conv2d)):
            hooks.append(mod.register_forward_pre_hook(
                lambda m, args, mname=mname: shapes.__setitem__(mname, (m, tuple(args[0].shape)))))
    try:
        with torch.device("meta"), torch.no_grad():
            model(**_INPUTS[name](model.config, resolution // 8, frames, text_tokens, batch))
    finally:
        for h in hooks:
            h.remove()
    return shapes


def trace_model(model: str = "sdxl", resolution: int | None = None, frames: int | None = None):
    """trace_layers of a family at its stated input (or `resolution` / `frames`)."""
    fam = family(model)
    return trace_layers(build_model(model), resolution or fam.resolution, frames=frames or fam.frames,
                        text_tokens=fam.text_tokens)


def describe_input(model: str, resolution: int | None = None, frames: int | None = None) -> str:
    fam = family(model)
    frames = frames or fam.frames
    res = resolution or fam.resolution
    source = "stabilityai/stable-diffusion-xl-base-1.0 unet" if model == "sdxl" else \
        fam.load_config().get("_name_or_path", fam.config)
    return (f"{model} ({source}) at {res}x{res}"
            f"{f', {frames} frames' if frames > 1 else ''}, batch 1, {fam.text_tokens} text tokens")


def timed_geometries(traced: dict, max_weight: int = 4 * 1280 * 10240) -> list[str]:
    """The layers a 2-core CPU times for a transformer family, one module name per geometry (the instance
    seeing the most tokens): among Linear layers seeing more than one token, the most frequent (in, out)
    geometry (attention projections) and, of the others used more than once, the one with the largest share
    of forward FLOPs (sum of tokens x in x out over its layers: the MLP), leaving out a
    geometry with more than `max_weight` weights (4x SDXL's largest timed layer: over ~1 s per fwd+bwd at 77
    tokens on 2 cores; the memory profile still covers it)."""
    count: dict = {}
    flops: dict = {}
    widest: dict = {}
    for name, (mod, shape) in traced.items():
        n = tokens(mod, shape)
        if not isinstance(mod, nn.Linear) or n <= 1 or mod.weight.numel() > max_weight:
            continue
        g = tuple(mod.weight.shape)
        count[g] = count.get(g, 0) + 1
        flops[g] = flops.get(g, 0) + n * mod.weight.numel()
        if n > widest.get(g, ("", 0))[1]:
            widest[g] = (name, n)
    first = max(count, key=count.get)
    flops = {g: f for g, f in flops.items() if g != first and count[g] > 1}   # block layers, not embedders
    return [widest[g][0] for g in [first, *([max(flops, key=flops.get)] if flops else [])]]


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
def adapt(layer: nn.Module, provider: str, setting: str, seed: int = 0, copy_layer: bool = True):
    """Wrap a copy of `layer` with `provider`'s adapter for `setting` (apply_to), its parameters random and
    non-zero; `provider` is "base", "lyfast[-backend]", "lycoris[-fused]" (rebuild mode, LyCORIS's default),
    "lycoris-bypass" (bypass_mode=True: the adapter's own path on x added to the frozen layer's output) or
    "peft" (HF PEFT's LoHa/LoKr/BOFT layer, configured by `peft_config`; the adapted layer is then a
    `PeftWrapped` holding it, the adapter that layer's trainable parameters).
    Returns (adapted layer, adapter or None for "base"). Raises ValueError when the setting does
    not fit the layer (e.g. BOFT block sizes) and ImportError when the provider is not installed.
    copy_layer=False adapts `layer` itself (quantized layers, which not every library can deep-copy)."""
    layer = copy.deepcopy(layer) if copy_layer else layer
    if provider == "base":
        return layer, None
    algo, kw = SETTINGS[setting]
    if provider == "peft":
        return _peft_adapt(layer, algo, kw, seed)
    kw = dict(kw, bypass_mode=True) if provider == "lycoris-bypass" else dict(kw)
    args = [f"bench_{setting}", layer, 1.0, kw.pop("lora_dim"), kw.pop("alpha"), 0.0, 0.0, 0.0, False]
    adapter = adapter_class(provider.partition("-")[0], algo)(*args, **kw)
    gen = torch.Generator().manual_seed(seed)
    for p in adapter.parameters():
        # small random values: an identity-like BOFT rotation, no denormals, no zero factors
        p.copy_(torch.randn(p.shape, generator=gen) * (0.02 if algo == "boft" else 0.1))
    from .targeting import compute_dtype

    adapter.to(device=layer.weight.device, dtype=compute_dtype(layer))
    adapter.apply_to()
    return layer, adapter


# ------------------------------------------------------------------------------------------ HF PEFT
class PeftWrapped(nn.Module):
    """One layer as PEFT targets it: the module named "layer", called with the layer's input; `weight` is
    the frozen base weight (as on the layers the other providers adapt in place)."""

    def __init__(self, layer: nn.Module):
        super().__init__()
        self.layer = layer

    @property
    def weight(self) -> torch.Tensor:
        return self.layer.weight

    def forward(self, x):
        return self.layer(x)


def boft_sigma(b: int) -> list[int]:
    """The within-block reorder between LyCORIS's and PEFT's butterfly blocks: both libraries couple the
    same channels in every stage, LyCORIS in the order (c0, c_k, c1, c_k+1, ...) (pairs across the two
    halves), PEFT in (c0, c1, ..., c_k, c_k+1, ...) (the two halves in turn). PEFT block = LyCORIS block
    indexed [sigma][:, sigma]."""
    return [2 * q + t for t in (0, 1) for q in range(b // 2)]


def peft_config(layer: nn.Module, algo: str, kw: dict):
    """The PEFT config computing the same function as LyCORIS's `algo` adapter with constructor `kw` on
    `layer` (LoHa, LoKr), or the same butterfly structure (BOFT); ValueError where PEFT cannot.

    * LoHa: LoHaConfig(r, alpha): ΔW = (w1a·w1b) ⊙ (w2a·w2b) · alpha/r in both, conv weights flattened
      to (out, in·k·k) in both (PEFT's use_effective_conv2d and LyCORIS's use_tucker off).
    * LoKr: LoKrConfig(r, alpha, decompose_factor=factor). PEFT scales by alpha/r always; LyCORIS uses
      scale 1 when both Kronecker factors are full matrices, so PEFT gets alpha = r there (the full-matrix
      settings' alpha 1 at r 100000 would otherwise scale ΔW by 1e-5). PEFT's factorization does not put
      the smaller factor first when dimension < factor², LyCORIS's does: such a layer raises.
    * BOFT: PEFT rotates the layer's input side, W' = s ⊙ (W·Bᵀ), where LyCORIS rotates the output,
      W' = B·W: a different function. PEFT gets LyCORIS's block size rule (largest even b <= lora_dim,
      power-of-two block count n) on the input channels and m = log2(n) + 1 butterfly factors, so its
      rotation is exactly LyCORIS's butterfly matrix B over in_features (over in·k·k for a conv, k² times
      the blocks) when its boft_R are LyCORIS's blocks ×(-2) reordered by `boft_sigma`; for a square Linear
      that is LyCORIS's (m, n, b) for the layer. PEFT's per-output scale boft_s (always trained) is
      LyCORIS's `rescaled` option, off in these settings.
    * DoRA (weight_decompose): PEFT 0.21.2's LoHa and LoKr have none: raises."""
    import peft

    if kw.get("weight_decompose"):
        raise ValueError(f"PEFT {peft.__version__}'s {algo} has no DoRA (weight_decompose)")
    common = dict(target_modules=["layer"])
    if algo == "loha":
        return peft.LoHaConfig(r=kw["lora_dim"], alpha=kw["alpha"], **common)
    if isinstance(layer, nn.Conv2d):
        dims = (layer.in_channels // layer.groups, layer.out_channels)
    else:
        dims = (layer.in_features, layer.out_features)
    if algo == "lokr":
        from peft.tuners.lokr.layer import factorization as peft_factorization

        from .functional.general import factorization

        r, factor = kw["lora_dim"], kw["factor"]
        if any(peft_factorization(d, factor) != factorization(d, factor) for d in dims):
            raise ValueError(f"PEFT's LoKr splits {dims} differently from LyCORIS at factor {factor}")
        out_k, in_n = (factorization(d, factor)[1] for d in reversed(dims))
        full = r >= max(out_k, in_n) / 2          # w2 full; w1 is full unless decompose_both (off)
        return peft.LoKrConfig(r=r, alpha=r if full else kw["alpha"], decompose_factor=factor, **common)
    from .modules.boft import butterfly_factor

    b, n = butterfly_factor(dims[0], kw["lora_dim"])
    return peft.BOFTConfig(boft_block_size=b, boft_n_butterfly_factor=n.bit_length(), **common)


class _TorchBlockDiag:
    """PEFT's `fbd_cuda` extension (FastBlockDiag: (N, D, H, H) blocks -> (N, D·H, D·H) block-diagonal
    matrices, and the blocks' gradient back) in PyTorch, the same values. Without the extension PEFT 0.21.2
    drops to one butterfly factor (plain block OFT), so this keeps its BOFT the configured m-stage butterfly
    where the extension cannot be built (no CUDA device, no CUDA toolkit or no ninja)."""

    @staticmethod
    def forward(blocks):
        return [torch.stack([torch.block_diag(*stage.unbind()) for stage in blocks])]

    @staticmethod
    def backward(grad, blocks):
        n, d, h, _ = blocks.shape
        return [grad.view(n, d, h, d, h).diagonal(dim1=1, dim2=3).permute(0, 3, 1, 2)]


def _peft_block_diag() -> None:
    """Decide PEFT's block-diagonal route once, before it tries itself: on a CUDA machine with a CUDA
    toolkit and ninja, PEFT compiles fbd_cuda as it does by default; elsewhere it would try to compile (or
    fail to) and then silently use one factor, so `_TorchBlockDiag` takes the extension's place."""
    from peft.tuners.boft import layer as boft_layer

    if boft_layer._FBD_CUDA is not None:
        return
    from torch.utils.cpp_extension import CUDA_HOME, is_ninja_available

    if not (torch.cuda.is_available() and CUDA_HOME and is_ninja_available()):
        boft_layer._FBD_CUDA = _TorchBlockDiag


# PEFT's BOFT forward multiplies m permutation and block-diagonal D x D matrices densely (D = in_features,
# in*k*k for a conv), so its cost grows as m*D^3: fwd+bwd took 2.2 s at D=1280, m=7 (77 tokens or 1024, the
# products dominate) on 2 CPU threads against 0.2 s at D=640, m=6. Layers beyond that are skipped on the CPU.
PEFT_BOFT_CPU_MAX = 7 * 1280**3


def peft_boft_dim(layer: nn.Module) -> int:
    """The dimension PEFT's BOFT rotates: in_features, or in_channels*k*k for a conv."""
    if isinstance(layer, nn.Conv2d):
        return layer.in_channels * layer.kernel_size[0] * layer.kernel_size[1]
    return layer.in_features


def _peft_adapt(layer: nn.Module, algo: str, kw: dict, seed: int):
    """adapt() for provider "peft": (PeftWrapped(layer) with PEFT's adapter injected, a ParameterList of
    its trainable parameters), in the layer's device and dtype (PEFT's own fp32 autocast of bf16 adapters
    is get_peft_model's, not used: every provider runs in the benchmark's dtype)."""
    import peft

    config = peft_config(layer, algo, kw)
    if algo == "boft":
        d, m = peft_boft_dim(layer), config.boft_n_butterfly_factor
        if layer.weight.device.type == "cpu" and m * d**3 > PEFT_BOFT_CPU_MAX:
            raise ValueError(f"PEFT's BOFT builds its {d}x{d} rotation densely ({m} factors, ~{3 * m} "
                             f"{d}^3 products a forward): over the CPU limit of {m}x{d}^3 <= 7x1280^3")
        _peft_block_diag()
    wrapped = peft.inject_adapter_in_model(config, PeftWrapped(layer))
    gen = torch.Generator().manual_seed(seed)
    for name, p in wrapped.named_parameters():
        if p.requires_grad:   # as adapt(); boft_s (an output scale) around 1
            noise = torch.randn(p.shape, generator=gen) * (0.02 if algo == "boft" else 0.1)
            p.copy_(noise + 1 if name.startswith("layer.boft_s") else noise)
    wrapped.to(device=layer.weight.device, dtype=layer.weight.dtype)
    return wrapped, nn.ParameterList(p for p in wrapped.parameters() if p.requires_grad)


def make_input(layer: nn.Module, shape: tuple, seed: int = 0) -> torch.Tensor:
    from .targeting import compute_dtype

    gen = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=gen).to(layer.weight.device, compute_dtype(layer)).requires_grad_(True)


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
