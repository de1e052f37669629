"""A diffusion-style training loop on a diffusers UNet2DConditionModel with LoHa / LoKr / BOFT adapters from
LyCORIS (``--impl lycoris``) or lyfast (``--impl lyfast``).

    python examples/train_unet.py --impl lyfast --algo loha --steps 10            # tiny UNet on CPU
    python examples/train_unet.py --impl lycoris --algo lokr --steps 10 --bf16
    python examples/train_unet.py --sdxl --impl lyfast --algo boft --bf16 --grad-checkpointing --resolution 1024

Each step: noise a random latent at a random timestep (DDPM-style linear beta schedule), predict the noise
with the frozen UNet plus trainable adapters, MSE loss, AdamW step. Reports the loss, the step time and
the peak memory (CUDA: ``torch.cuda.max_memory_allocated``; CPU: the bytes autograd saved for backward,
parameters excluded, counted once per storage).

The functions are importable (``build_unet``, ``attach_adapters``, ``make_batch``, ``train``) so the tests
can run the loop directly.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import time
from functools import partial

import torch
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
SDXL_CONFIG = os.path.join(HERE, os.pardir, "benchmarks", "data", "sdxl_unet_config.json")

TINY_UNET = dict(
    block_out_channels=(32, 64),
    layers_per_block=1,
    cross_attention_dim=32,
    attention_head_dim=8,
    sample_size=16,
    norm_num_groups=16,
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
)

# Per-algorithm defaults (LyCORIS kwargs). BOFT's lora_dim is the block count.
ALGO_KW = {
    "loha": dict(linear_dim=4, linear_alpha=2, conv_dim=2, conv_alpha=1),
    "lokr": dict(linear_dim=4, linear_alpha=2, conv_dim=2, conv_alpha=1, factor=4),
    "boft": dict(linear_dim=4, linear_alpha=1, conv_dim=4, conv_alpha=1),
}


# ------------------------------------------------------------------------------------------------------
# model and adapters
# ------------------------------------------------------------------------------------------------------
def build_unet(sdxl=False, dtype=torch.float32, device="cpu", seed=0, **overrides):
    """A frozen UNet2DConditionModel: the tiny CPU config, or the SDXL config (random weights)."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    if sdxl:
        with open(SDXL_CONFIG) as f:
            config = json.load(f)
        config.update(overrides)
        unet = UNet2DConditionModel.from_config(config)
    else:
        unet = UNet2DConditionModel(**{**TINY_UNET, **overrides})
    unet.to(device=device, dtype=dtype)
    unet.requires_grad_(False)
    return unet


def attach_adapters(unet, impl="lyfast", algo="loha", preset="full", multiplier=1.0, **kwargs):
    """``create_lycoris`` from ``impl`` ("lycoris" or "lyfast") with the same kwargs; applied; returns the
    network (its parameters are the only trainable ones). The network takes the UNet's dtype/device."""
    if impl == "lycoris":
        from lycoris import create_lycoris
    elif impl == "lyfast":
        from lyfast import create_lycoris
    else:
        raise ValueError(f"impl must be 'lycoris' or 'lyfast', not {impl!r}")
    kw = dict(ALGO_KW[algo])
    kw.update(kwargs)
    linear_dim, linear_alpha = kw.pop("linear_dim"), kw.pop("linear_alpha")
    net = create_lycoris(unet, multiplier, linear_dim, linear_alpha, algo=algo, preset=preset, **kw)
    net.apply_to()
    p = next(unet.parameters())
    net.to(device=p.device, dtype=p.dtype)
    net.requires_grad_(True)
    return net


def adapter_state(net):
    """{lora_name.param: detached clone} of every adapter parameter."""
    return {f"{lora.lora_name}.{n}": p.detach().clone() for lora in net.loras for n, p in lora.named_parameters()}


@torch.no_grad()
def load_adapter_state(net, state):
    """The inverse of ``adapter_state``: copy ``state``'s values into ``net``'s adapters (same names)."""
    for lora in net.loras:
        for n, p in lora.named_parameters():
            p.copy_(state[f"{lora.lora_name}.{n}"])


# ------------------------------------------------------------------------------------------------------
# data
# ------------------------------------------------------------------------------------------------------
def _added_cond(unet, batch, dtype, device, gen):
    cfg = unet.config
    if cfg.get("addition_embed_type") != "text_time":
        return None
    n_time = 6
    text_dim = cfg.projection_class_embeddings_input_dim - n_time * cfg.addition_time_embed_dim
    return {
        "text_embeds": torch.randn(batch, text_dim, generator=gen, dtype=torch.float64).to(device, dtype),
        "time_ids": torch.tensor([[1024.0, 1024.0, 0.0, 0.0, 1024.0, 1024.0]] * batch, dtype=dtype, device=device),
    }


def make_batch(unet, step, batch=2, size=None, seq=5, dtype=torch.float32, device="cpu", seed=1234,
               num_timesteps=1000):
    """A deterministic batch for ``step``: (noisy latents, timesteps, text context, added_cond, target noise).
    Values are drawn in fp64 on the CPU and cast, so runs in different dtypes see the same data."""
    cfg = unet.config
    size = size or cfg.sample_size
    gen = torch.Generator().manual_seed(seed + step)
    latents = torch.randn(batch, cfg.in_channels, size, size, generator=gen, dtype=torch.float64)
    noise = torch.randn(latents.shape, generator=gen, dtype=torch.float64)
    t = torch.randint(0, num_timesteps, (batch,), generator=gen)
    ctx = torch.randn(batch, seq, cfg.cross_attention_dim, generator=gen, dtype=torch.float64)
    betas = torch.linspace(1e-4, 0.02, num_timesteps, dtype=torch.float64)
    abar = torch.cumprod(1 - betas, 0)[t].view(-1, 1, 1, 1)
    noisy = abar.sqrt() * latents + (1 - abar).sqrt() * noise
    cast = lambda x: x.to(device=device, dtype=dtype)  # noqa: E731
    return cast(noisy), t.to(device), cast(ctx), _added_cond(unet, batch, dtype, device, gen), cast(noise)


# ------------------------------------------------------------------------------------------------------
# memory accounting
# ------------------------------------------------------------------------------------------------------
class SavedBytes:
    """Counts the bytes autograd saves for backward (parameters excluded, each storage once)."""

    def __init__(self):
        self.storages = {}

    def _pack(self, t):
        if not isinstance(t, torch.nn.Parameter):
            try:
                s = t.untyped_storage()
                self.storages[s.data_ptr()] = s.nbytes()
            except (RuntimeError, NotImplementedError):  # e.g. tensors without storage
                pass
        return t

    @property
    def bytes(self):
        return sum(self.storages.values())

    def __call__(self):
        return torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)


def checkpoint_func(use_reentrant):
    """A diffusers ``gradient_checkpointing_func`` with an explicit ``use_reentrant``."""
    def fn(module, *args):
        return torch.utils.checkpoint.checkpoint(module.__call__, *args, use_reentrant=use_reentrant)
    return fn


# ------------------------------------------------------------------------------------------------------
# the loop
# ------------------------------------------------------------------------------------------------------
def optimize(net, steps, lr, weight_decay, predict, bf16=False, log=None):
    """``steps`` AdamW steps on the adapters of ``net``; ``predict(step, dtype, device)`` runs the frozen model
    on step ``step``'s batch and returns (prediction, target) for an MSE loss. Returns dict(losses,
    step_times, peak_bytes, state)."""
    p = next(net.parameters())
    device, dtype = p.device, p.dtype
    opt = torch.optim.AdamW(net.prepare_optimizer_params(lr), lr=lr, weight_decay=weight_decay)
    cuda = device.type == "cuda"
    losses, times, peak = [], [], 0
    for step in range(steps):
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        counter = SavedBytes()
        start = time.perf_counter()
        amp = torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
        with amp, (contextlib.nullcontext() if cuda else counter()):
            pred, target = predict(step, dtype, device)
            loss = F.mse_loss(pred.float(), target.float()) if bf16 else F.mse_loss(pred, target)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize()
            peak = max(peak, torch.cuda.max_memory_allocated())
        else:
            peak = max(peak, counter.bytes)
        times.append(time.perf_counter() - start)
        losses.append(loss.item())
        if log:
            log(f"step {step}: loss {losses[-1]:.6f}  {times[-1] * 1e3:.1f} ms  peak {peak / 2**20:.1f} MiB")
    return dict(losses=losses, step_times=times, peak_bytes=peak, state=adapter_state(net))


def summary(res, device) -> str:
    """One line on an `optimize` result: mean step time after the first, peak memory, final loss."""
    t = res["step_times"][1:] or res["step_times"]
    what = "max_memory_allocated" if str(device).startswith("cuda") else "saved for backward"
    return (f"mean step time (after the first) {sum(t) / len(t) * 1e3:.1f} ms; "
            f"peak memory ({what}) {res['peak_bytes'] / 2**20:.1f} MiB; final loss {res['losses'][-1]:.6f}")


def train(unet, net, steps=5, lr=1e-3, batch=2, size=None, bf16=False, grad_checkpointing=False,
          use_reentrant=False, weight_decay=1e-2, seed=1234, log=None):
    """``steps`` AdamW steps on the adapters (epsilon prediction). Returns dict(losses, step_times, peak_bytes,
    state)."""
    def predict(step, dtype, device):
        x, t, ctx, added, target = make_batch(unet, step, batch, size, dtype=dtype, device=device, seed=seed)
        return unet(x, t, ctx, added_cond_kwargs=added).sample, target

    if grad_checkpointing:
        unet.enable_gradient_checkpointing(checkpoint_func(use_reentrant))
        unet.train()  # diffusers only checkpoints when grad is enabled
    try:
        return optimize(net, steps, lr, weight_decay, predict, bf16, log)
    finally:
        if grad_checkpointing:
            unet.disable_gradient_checkpointing()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--impl", choices=("lycoris", "lyfast"), default="lyfast")
    ap.add_argument("--algo", choices=("loha", "lokr", "boft"), default="loha")
    ap.add_argument("--preset", default="full")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--resolution", type=int, default=None, help="pixels (latent = resolution / 8)")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--bf16", action="store_true", help="bf16 autocast (fp32 master weights)")
    ap.add_argument("--grad-checkpointing", action="store_true")
    ap.add_argument("--reentrant", action="store_true", help="use_reentrant=True checkpointing")
    ap.add_argument("--sdxl", action="store_true", help="the SDXL UNet config (random weights; for a GPU)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", choices=("fp32", "fp64", "bf16"), default="fp32", help="weights dtype")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    dtype = {"fp32": torch.float32, "fp64": torch.float64, "bf16": torch.bfloat16}[args.dtype]
    unet = build_unet(args.sdxl, dtype=dtype, device=args.device, seed=args.seed)
    net = attach_adapters(unet, args.impl, args.algo, args.preset)
    n_params = sum(p.numel() for p in net.parameters())
    print(f"{args.impl} {args.algo} preset={args.preset}: {len(net.loras)} adapters, {n_params} parameters, "
          f"device {args.device}, {args.dtype}{' + bf16 autocast' if args.bf16 else ''}"
          f"{' + checkpointing' if args.grad_checkpointing else ''}")
    size = args.resolution // 8 if args.resolution else None
    res = train(unet, net, args.steps, args.lr, args.batch, size, args.bf16, args.grad_checkpointing,
                args.reentrant, seed=args.seed + 1234, log=print)
    print(summary(res, args.device))
    return res


if __name__ == "__main__":
    main()
