"""Model families: diffusers configs (SDXL's UNet embedded, the DiTs' in benchmarks/data), built on the meta
device, their inputs at a resolution, and the layers a forward traces. Shared by `python -m lyfast profile-memory`,
`python -m lyfast plan` and `python -m benchmarks`."""
from __future__ import annotations

import copy
import json
import math
import types
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn


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


def model_inputs(model: nn.Module, resolution: int, frames: int, text_tokens: int, batch: int, dtype) -> dict:
    name = type(model).__name__
    if name not in _INPUTS:
        raise ValueError(f"no input builder for {name}: known classes {', '.join(_INPUTS)}")
    kw = _INPUTS[name](model.config, resolution // 8, frames, text_tokens, batch)
    cast = lambda t: t.to(dtype) if isinstance(t, torch.Tensor) and t.is_floating_point() else t  # noqa: E731
    return {k: ({kk: cast(vv) for kk, vv in v.items()} if isinstance(v, dict) else cast(v)) for k, v in kw.items()}


def model_config(model_name: str) -> dict:
    """The family's diffusers config (SDXL's is embedded here: SDXL_UNET)."""
    if model_name == "sdxl":
        return {**SDXL_UNET, "_class_name": "UNet2DConditionModel"}
    return family(model_name).load_config()


def build_from_config(config: dict) -> nn.Module:
    """A model of a known family from a diffusers config dict, constructed in the active mode and device: under a
    FakeTensorMode its parameters are FakeTensors (shapes, no memory; the planner builds it so because a meta model
    cannot be converted: `to_empty` swaps tensors), else real ones."""
    import diffusers

    name = config.get("_class_name")
    if name not in _INPUTS:
        raise ValueError(f"config _class_name {name!r}: the planner knows {', '.join(_INPUTS)}")
    return getattr(diffusers, name).from_config(config)
