"""A flow-matching training loop on a diffusers FluxTransformer2DModel (a DiT) with LoKr / LoHa / BOFT adapters
from LyCORIS (``--impl lycoris``) or lyfast (``--impl lyfast``), in LyCORIS's rebuild or bypass mode.

    python examples/train_dit.py --impl lyfast --algo lokr --steps 10              # tiny Flux-class DiT, CPU
    python examples/train_dit.py --impl lycoris --algo lokr --bypass --steps 10    # SimpleTuner's usual mode
    python examples/train_dit.py --flux --impl lyfast --algo lokr --bf16 --resolution 1024   # Flux.1-dev (GPU)

The default recipe is the one most DiT LyCORIS runs use (SimpleTuner's examples): full-matrix LoKr,
linear_dim 10000, linear_alpha 1, factor 16, on every Linear layer of the transformer (LyCORIS's default
targeting). Each step: rectified flow as Flux trainers run it: sigma = sigmoid(randn) per sample, the packed
latents x_sigma = (1 - sigma) x0 + sigma noise, the transformer predicts noise - x0, MSE loss, AdamW step.
Reports the loss, the step time and the peak memory as examples/train_unet.py does.

The functions are importable (``build_transformer``, ``make_batch``, ``train``; ``attach_adapters``,
``adapter_state``, ``load_adapter_state`` and the step loop ``optimize`` are train_unet's) so the tests can run
the loop directly.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from train_unet import adapter_state, attach_adapters, load_adapter_state, optimize, summary  # noqa: E402,F401

FLUX_CONFIG = os.path.join(HERE, os.pardir, "benchmarks", "data", "flux1_dev_transformer_config.json")

# A Flux.1 transformer with the same blocks (one double-stream, one single-stream), 32 wide.
TINY_FLUX = dict(
    patch_size=1,
    in_channels=16,            # 2x2 packed 4-channel latents
    num_layers=1,
    num_single_layers=1,
    attention_head_dim=16,
    num_attention_heads=2,
    joint_attention_dim=32,
    pooled_projection_dim=16,
    guidance_embeds=False,
    axes_dims_rope=(4, 6, 6),  # sums to attention_head_dim
)

# LyCORIS kwargs per algorithm: LoKr as SimpleTuner trains DiTs (full matrix: linear_dim >= half of every
# factor side, alpha 1); LoHa and BOFT at small ranks for the tiny model. BOFT's lora_dim is the block count;
# LyCORIS refuses BOFT on the tiny model (its 32-wide layers and 96/192-wide modulations share no block size).
ALGO_KW = {
    "lokr": dict(linear_dim=10000, linear_alpha=1, factor=16),
    "loha": dict(linear_dim=4, linear_alpha=2),
    "boft": dict(linear_dim=4, linear_alpha=1),
}


def build_transformer(flux=False, dtype=torch.float32, device="cpu", seed=0, **overrides):
    """A frozen FluxTransformer2DModel: the tiny CPU config, or Flux.1-dev's (random weights)."""
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(seed)
    if flux:
        with open(FLUX_CONFIG) as f:
            config = {**json.load(f), **overrides}
        model = FluxTransformer2DModel.from_config(config)
    else:
        model = FluxTransformer2DModel(**{**TINY_FLUX, **overrides})
    model.to(device=device, dtype=dtype)
    model.requires_grad_(False)
    return model


def _ids(n_text, side, device, dtype):
    """Flux's position ids: text tokens at 0, image token (i, j) at (0, i, j)."""
    grid = torch.stack(torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij"), -1).reshape(-1, 2)
    img = torch.cat([torch.zeros(side * side, 1), grid.float()], 1)
    return img.to(device, dtype), torch.zeros(n_text, 3, device=device, dtype=dtype)


def make_batch(model, step, batch=2, side=4, seq=8, dtype=torch.float32, device="cpu", seed=1234):
    """A deterministic batch for ``step``: dict(forward kwargs) and the flow-matching target. ``side`` is the
    packed latent grid (image pixels / 16). Values are drawn in fp64 on the CPU and cast, so runs in
    different dtypes see the same data."""
    cfg = model.config
    gen = torch.Generator().manual_seed(seed + step)
    x0 = torch.randn(batch, side * side, cfg.in_channels, generator=gen, dtype=torch.float64)
    noise = torch.randn(x0.shape, generator=gen, dtype=torch.float64)
    sigma = torch.sigmoid(torch.randn(batch, generator=gen, dtype=torch.float64))
    ctx = torch.randn(batch, seq, cfg.joint_attention_dim, generator=gen, dtype=torch.float64)
    pooled = torch.randn(batch, cfg.pooled_projection_dim, generator=gen, dtype=torch.float64)
    noisy = (1 - sigma.view(-1, 1, 1)) * x0 + sigma.view(-1, 1, 1) * noise
    cast = lambda x: x.to(device=device, dtype=dtype)  # noqa: E731
    img_ids, txt_ids = _ids(seq, side, device, dtype)
    kw = dict(hidden_states=cast(noisy), encoder_hidden_states=cast(ctx), pooled_projections=cast(pooled),
              timestep=cast(sigma), img_ids=img_ids, txt_ids=txt_ids)
    if cfg.guidance_embeds:
        kw["guidance"] = torch.full((batch,), 3.5, device=device, dtype=dtype)
    return kw, cast(noise - x0)


def train(model, net, steps=5, lr=1e-3, batch=2, side=4, bf16=False, weight_decay=1e-2, seed=1234, log=None):
    """``steps`` AdamW steps on the adapters (flow matching). Returns dict(losses, step_times, peak_bytes,
    state)."""
    def predict(step, dtype, device):
        kw, target = make_batch(model, step, batch, side, dtype=dtype, device=device, seed=seed)
        return model(**kw).sample, target

    return optimize(net, steps, lr, weight_decay, predict, bf16, log)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--impl", choices=("lycoris", "lyfast"), default="lyfast")
    ap.add_argument("--algo", choices=tuple(ALGO_KW), default="lokr")
    ap.add_argument("--bypass", action="store_true", help="bypass_mode=True (LyCORIS; lyfast ignores the mode)")
    ap.add_argument("--factor", type=int, default=None, help="LoKr factor (default 16; -1 = balanced)")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--resolution", type=int, default=None, help="pixels (packed latent grid = resolution / 16)")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--bf16", action="store_true", help="bf16 autocast (fp32 master weights)")
    ap.add_argument("--flux", action="store_true", help="the Flux.1-dev config (12B, random weights; for a GPU)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", choices=("fp32", "fp64", "bf16"), default="fp32", help="weights dtype")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    dtype = {"fp32": torch.float32, "fp64": torch.float64, "bf16": torch.bfloat16}[args.dtype]
    model = build_transformer(args.flux, dtype=dtype, device=args.device, seed=args.seed)
    kw = dict(ALGO_KW[args.algo], bypass_mode=args.bypass)
    if args.factor is not None:
        kw["factor"] = args.factor
    net = attach_adapters(model, args.impl, args.algo, "full", **kw)
    n_params = sum(p.numel() for p in net.parameters())
    print(f"{args.impl} {args.algo}{' bypass' if args.bypass else ''}: {len(net.loras)} adapters, {n_params} "
          f"parameters, device {args.device}, {args.dtype}{' + bf16 autocast' if args.bf16 else ''}")
    side = args.resolution // 16 if args.resolution else 4
    res = train(model, net, args.steps, args.lr, args.batch, side, args.bf16, seed=args.seed + 1234, log=print)
    print(summary(res, args.device))
    return res


if __name__ == "__main__":
    main()
