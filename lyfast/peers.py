"""Adapter providers: the settings the benchmarks and tools compare and every peer's adapter for one of them —
lyfast (each backend), LyCORIS 4.1.3 (rebuild, bypass, its fused kernels) and HF PEFT (`peft_config`: the same
function for LoHa/LoKr, the same butterfly for BOFT)."""
from __future__ import annotations

import copy
import importlib

import torch
import torch.nn as nn



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


def network_kwargs(setting: str) -> dict:
    """create_lycoris kwargs (lyfast's and LyCORIS's) of a `lyfast.peers.SETTINGS` name."""
    algo, kw = SETTINGS[setting]
    out = dict(algo=algo, linear_dim=kw["lora_dim"], linear_alpha=kw["alpha"], conv_dim=kw["lora_dim"],
               conv_alpha=kw["alpha"])
    out.update({k: v for k, v in kw.items() if k not in ("lora_dim", "alpha")})
    return out
