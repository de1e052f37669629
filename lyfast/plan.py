"""Will it fit, and how fast? One training step of a whole diffusion model, traced with FakeTensors.

    python -m lyfast plan --model flux --settings lokr-full-f4,loha-r16 [--providers lyfast,lycoris,lycoris-bypass,peft]
        [--resolution 1024] [--frames 1] [--batch 1] [--dtype bf16] [--checkpointing none|blocks]
        [--optimizer adamw|adamw8bit|sgd] [--world-size N] [--gpu h100|h200|...] [--gpu-memory 24GiB]
        [--config FILE.json] [--json OUT.json] [--plot OUT.png]

The model is built from its diffusers config on the meta device and materialized as FakeTensors (shapes, no
memory); each provider's adapters are attached over the whole model with LyCORIS's default preset ("full": every
Linear and Conv, what `create_lycoris` does without a preset); then one steady-state training step runs for real
code but fake data: the forward under autocast (`--dtype`, fp32 master adapters, as kohya's and SimpleTuner's mixed
precision), the loss, the backward, the optimizer step (its states already exist, as from the second step on).
PyTorch's `MemTracker` (torch.distributed._tools) follows every tensor's storage through the step and categorizes
it; its peak is the step's peak. Reported per provider x setting (bytes):

* peak_bytes: the largest sum of live storages during the step (the allocator's rounding and fragmentation, and
  the CUDA context, are not in it);
* at that moment: base_params_bytes (base weights and buffers), adapter_params_bytes, optimizer_bytes (states),
  grad_bytes (gradients alive), activation_bytes (forward tensors alive: what autograd keeps for backward, and the
  outputs) and transient_bytes (the rest: temporaries of the ops running then); they sum to peak_bytes;
* saved_activation_bytes: what the forward added that is alive at its end (what autograd keeps for backward);
* peak_module: the innermost module running at the peak; adapter_params: the adapters' parameter count;
* est_step_seconds: an estimate, not a measurement: every traced op's FLOPs (PyTorch's flop counter) and bytes
  (inputs + outputs) against the roofline of the named GPU with the peaks and calibrated efficiencies that
  lyfast's kernel dispatch uses (kernels/_common.py).

lyfast is traced on its PyTorch path (the CPU's); what its GPU kernels keep for backward is not traced.
"""
from __future__ import annotations

import argparse
import json
import math
import re
import sys
import time
import warnings
from contextlib import contextmanager, nullcontext

import torch
import torch.nn as nn

from .cli import dtype_name, items, positive, resolution as resolution_type
from .models import MODELS, _INPUTS, build_from_config, family, model_config, model_inputs
from .peers import SETTINGS, network_kwargs

PLAN_PROVIDERS = ("lyfast", "lycoris", "lycoris-bypass", "peft")
OPTIMIZERS = ("adamw", "adamw8bit", "sgd")  # make_optimizer allocates their states
GPUS = {"h100": "NVIDIA H100 80GB HBM3", "h200": "NVIDIA H200", "a100": "NVIDIA A100-SXM4-80GB",
        "l40s": "NVIDIA L40S", "rtx4090": "NVIDIA GeForce RTX 4090", "rtx3090": "NVIDIA GeForce RTX 3090"}
PRESET = "full"


def memory_size(text: str) -> int:
    """24GiB, 80GB, 24 (GiB) -> bytes."""
    m = re.fullmatch(r"\s*([0-9.]+)\s*(GiB|GB|MiB|MB|G|M)?\s*", text, re.I)
    if not m or float(m.group(1)) <= 0:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a size such as 24GiB, 80GB or 24 (GiB)")
    unit = (m.group(2) or "GiB").lower()
    return int(float(m.group(1)) * {"gib": 2**30, "g": 2**30, "gb": 10**9, "mib": 2**20, "m": 2**20,
                                    "mb": 10**6}[unit])


# ------------------------------------------------------------------------------------- adapters per provider
def attach(model: nn.Module, provider: str, setting: str) -> list[nn.Parameter]:
    """Attach `provider`'s adapters for `setting` over the whole model (preset PRESET); their parameters (fp32)."""
    kw = network_kwargs(setting)
    algo = kw.pop("algo")
    dim, alpha = kw.pop("linear_dim"), kw.pop("linear_alpha")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if provider == "lyfast":
            import lyfast

            net = lyfast.create_lycoris(model, 1.0, dim, alpha, algo=algo, preset=PRESET, warn_on_unmatched=False, **kw)
        elif provider in ("lycoris", "lycoris-bypass"):
            import lycoris

            with _small_constants():
                net = lycoris.create_lycoris(model, 1.0, dim, alpha, algo=algo, preset=PRESET,
                                             bypass_mode=provider == "lycoris-bypass", **kw)
        elif provider == "peft":
            return _attach_peft(model, algo, setting)
        else:
            raise ValueError(f"unknown provider {provider!r}: valid are {', '.join(PLAN_PROVIDERS)}")
        net.apply_to()
    params = [p for p in net.parameters() if p.requires_grad]
    for p in params:  # fp32 master adapters
        p.data = p.data.float()
    if not params:
        raise ValueError(f"{provider} {setting}: no layer was adapted")
    return params


@contextmanager
def _small_constants(limit: int = 8):
    """LyCORIS's constructors read values (its conv LoHa: `torch.tensor(kernel_size).prod().item()`): FakeTensorMode
    keeps the values of tensors made from Python numbers up to CONSTANT_NUMEL_LIMIT elements (1 by default), so
    `.item()` on them works while LyCORIS builds its modules."""
    from torch._subclasses import fake_tensor

    before = fake_tensor.CONSTANT_NUMEL_LIMIT
    fake_tensor.CONSTANT_NUMEL_LIMIT = max(before, limit)
    try:
        yield
    finally:
        fake_tensor.CONSTANT_NUMEL_LIMIT = before


def _attach_peft(model: nn.Module, algo: str, setting: str) -> list[nn.Parameter]:
    """PEFT's own LoHa / LoKr / BOFT at the setting's rank, alpha and factor over every Linear and Conv2d (the
    whole-model recipe a PEFT user writes; per layer, `peers.peft_config` is the one computing LyCORIS's function)."""
    import peft

    from .peers import _peft_block_diag

    kw = SETTINGS[setting][1]
    targets = [n for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    if algo == "loha":
        config = peft.LoHaConfig(r=kw["lora_dim"], alpha=kw["alpha"], target_modules=targets)
    elif algo == "lokr":  # full-matrix settings: PEFT scales by alpha / r always, LyCORIS by 1 (peers.peft_config)
        full = kw["lora_dim"] >= 10000
        config = peft.LoKrConfig(r=kw["lora_dim"], alpha=kw["lora_dim"] if full else kw["alpha"],
                                 decompose_factor=kw["factor"], target_modules=targets)
    else:
        config = peft.BOFTConfig(boft_block_size=kw["lora_dim"], target_modules=targets)
        _peft_block_diag()
    # PEFT moves each new adapter to its base layer's device with Module.to, which swaps FakeTensor parameters and
    # fails (the fake mode holds weak references to them); the device is already the same, so while PEFT injects,
    # a Module.to to the device the module is on returns the module (the dtype is set to fp32 below)
    to = nn.Module.to

    def same_device_to(self, *args, **kwargs):
        if len(args) == 1 and not kwargs and isinstance(args[0], (str, torch.device)) and all(
                p.device == torch.device(args[0]) for p in self.parameters()):
            return self
        return to(self, *args, **kwargs)

    nn.Module.to = same_device_to
    try:
        peft.inject_adapter_in_model(config, model)
    finally:
        nn.Module.to = to
    from peft.tuners.tuners_utils import BaseTunerLayer

    for module in model.modules():  # PEFT draws torch.rand(1) for module dropout in training mode, a value a
        if isinstance(module, BaseTunerLayer):  # FakeTensor cannot give; at module_dropout 0 eval computes the same
            module.training = False
    params = [p for n, p in model.named_parameters() if p.requires_grad]
    for p in params:
        p.data = p.data.float()
    return params


# ------------------------------------------------------------------------------------- the step
def _enable_checkpointing(model: nn.Module) -> None:
    """diffusers' block gradient checkpointing (torch.utils.checkpoint, non-reentrant)."""
    model.enable_gradient_checkpointing()


def make_optimizer(params, optimizer: str) -> torch.optim.Optimizer:
    """The optimizer with its states already allocated (a steady-state step)."""
    if optimizer == "sgd":
        return torch.optim.SGD(params, lr=1e-4)
    opt = torch.optim.AdamW(params, lr=1e-4, foreach=False)
    for p in params:
        if optimizer == "adamw8bit":  # bitsandbytes' layout: two uint8 states + one fp32 scale per 256 values
            blocks = math.ceil(p.numel() / 256)
            opt.state[p] = {"step": torch.zeros(()), "state1": torch.empty(p.shape, dtype=torch.uint8),
                            "state2": torch.empty(p.shape, dtype=torch.uint8),
                            "absmax1": torch.empty(blocks), "absmax2": torch.empty(blocks)}
        else:
            opt.state[p] = {"step": torch.zeros(()), "exp_avg": torch.zeros_like(p),
                            "exp_avg_sq": torch.zeros_like(p)}
    return opt


def optimizer_step(opt, optimizer: str) -> None:
    """The optimizer's step with its allocations: torch's SGD; AdamW as torch's single-tensor AdamW computes it (its
    own step reads `step` with .item(), which FakeTensors cannot answer): per parameter, in place on the states,
    one temporary the size of the parameter (the denominator)."""
    if optimizer == "sgd":
        opt.step()
        return
    if optimizer == "adamw":
        with torch.no_grad():
            for group in opt.param_groups:
                beta1, beta2 = group["betas"]
                for p in group["params"]:
                    if p.grad is None:
                        continue
                    state = opt.state[p]
                    p.mul_(1 - group["lr"] * group["weight_decay"])
                    state["exp_avg"].lerp_(p.grad, 1 - beta1)
                    state["exp_avg_sq"].mul_(beta2).addcmul_(p.grad, p.grad, value=1 - beta2)
                    denom = state["exp_avg_sq"].sqrt().add_(group["eps"])
                    p.addcdiv_(state["exp_avg"], denom, value=-group["lr"])
        return
    # bitsandbytes' 8-bit step runs in its own kernel on the states in place: one fp32 copy of a parameter's
    # update at a time is what it allocates
    with torch.no_grad():
        for group in opt.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    p.add_(p.grad.float(), alpha=-group["lr"])


def training_step(model, params, opt, inputs, dtype, optimizer: str, on_forward_end=None):
    """One step: forward under autocast (`dtype` unless fp32), a mean-square loss in fp32, backward, optimizer
    step, gradients freed. `on_forward_end()` is called with the activations alive."""
    ctx = torch.autocast(params[0].device.type, dtype=dtype) if dtype != torch.float32 else nullcontext()
    with ctx:
        out = model(**inputs)
    out = out.sample if hasattr(out, "sample") else out[0]
    loss = out.float().square().mean()
    del out
    if on_forward_end is not None:
        on_forward_end()
    loss.backward()
    optimizer_step(opt, optimizer)
    opt.zero_grad(set_to_none=True)


# ------------------------------------------------------------------------------------- tracking
def _tracker_class():
    from torch.distributed._tools.mem_tracker import MemTracker, _MemRefType

    class Tracker(MemTracker):
        """MemTracker with two changes, both for whole frozen models: (1) grad hooks only on parameters that
        require grad (torch 2.13 registers one on every parameter of a tracked module, which raises on a frozen
        base: "cannot register a hook on a tensor that doesn't require gradient"); (2) the per-module peak update
        (every tracked module, at every op: hours on a 12B model) replaced by the global peak and the innermost
        module running at it."""

        def __init__(self):
            super().__init__()
            self.peak_module = ""

        def _track_module_params_and_buffers(self, module, install_grad_hooks=True):
            out = super()._track_module_params_and_buffers(module, install_grad_hooks=False)
            if install_grad_hooks:
                for param in module.parameters():
                    if param.requires_grad and self._param_to_grad_hook_handles.get(param) is None:
                        def hook(grad):
                            self._update_and_maybe_create_winfos(grad, _MemRefType.GRAD)
                        self._param_to_grad_hook_handles[param] = (
                            param.register_hook(hook),
                            param.register_post_accumulate_grad_hook(lambda p: hook(p.grad)))
            return out

        def _update_peak_stats(self, peak_state):
            for dev, snap in self._curr_mem_snap.items():
                if self._peak_mem.get(dev, 0) < snap["Total"]:
                    self._peak_mem[dev] = snap["Total"]
                    self._peak_mem_snap[dev] = dict(snap)
                    parents = [p for p in self._mod_tracker.parents if p != "Global"]
                    self.peak_module = max(parents, key=len) if parents else ""

        def current(self, key: str) -> int:
            return sum(snap.get(key, 0) for snap in self._curr_mem_snap.values())

    return Tracker


class Roofline(torch.utils._python_dispatch.TorchDispatchMode):
    """Sums, over every op, the roofline time of its FLOPs (PyTorch's flop counter formulas) and bytes (inputs and
    outputs) on `peaks` (kernels._common.Peaks): an estimate of the step's GPU time."""

    def __init__(self, peaks):
        super().__init__()
        from torch.utils.flop_counter import flop_registry

        self.peaks, self.registry, self.seconds, self.flops = peaks, flop_registry, 0.0, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        leaves = [t for t in torch.utils._pytree.tree_leaves((args, kwargs, out)) if isinstance(t, torch.Tensor)]
        nbytes = sum(t.numel() * t.element_size() for t in leaves)
        flops = 0
        fn = self.registry.get(func._overloadpacket)
        if fn is not None:
            flops = fn(*args, **kwargs, out_val=out)
        dtype = next((t.dtype for t in leaves if t.is_floating_point()), torch.float32)
        efficiency = self.peaks.cublas_efficiency if flops else 1.0
        self.flops += flops
        self.seconds += self.peaks.seconds(flops, nbytes, dtype, compute_efficiency=efficiency)
        return out


def plan_one(model_name: str | None, provider: str, setting: str, *, config: dict | None = None,
             resolution: int | None = None, frames: int | None = None, batch: int = 1, dtype=torch.bfloat16,
             checkpointing: str = "none", optimizer: str = "adamw", gpu: str = "h100", world_size: int = 1,
             text_tokens: int | None = None, keep: dict | None = None) -> dict:
    """The plan of one provider x setting (see the module docstring for the fields)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from .kernels._common import PEAKS

    fam = family(model_name) if model_name else None
    resolution = resolution or (fam.resolution if fam else 1024)
    frames = frames or (fam.frames if fam else 1)
    text_tokens = text_tokens or (fam.text_tokens if fam else 77)
    start = time.perf_counter()
    with FakeTensorMode(allow_non_fake_inputs=True):
        model = build_from_config(config if config is not None else model_config(model_name))
        cast_(model, dtype)
        model.requires_grad_(False)
        if checkpointing == "blocks":
            _enable_checkpointing(model)
        model.train()
        params = attach(model, provider, setting)
        opt = make_optimizer(params, optimizer)
        inputs_fn = lambda: model_inputs(model, resolution, frames, text_tokens, batch, dtype)  # noqa: E731
        adapter_ids = {id(p) for p in params}
        base_bytes = _bytes([*(p for p in model.parameters() if id(p) not in adapter_ids), *model.buffers()])
        adapter_bytes = _bytes(params)
        state_bytes = _bytes(v for s in opt.state.values() for v in s.values() if isinstance(v, torch.Tensor))
        tracker = _tracker_class()()
        tracker.track_external(model, opt)
        # the adapters: parameters, with grad hooks (their forward runs inside the layer's, never through their own
        # __call__, so the tracker's module hooks would never install them)
        holder = nn.Module()
        holder.params = nn.ParameterList(params)
        tracker._track_module_params_and_buffers(holder, install_grad_hooks=True)
        saved = {}
        roof = Roofline(PEAKS[GPUS[gpu]])
        with tracker, roof:
            inputs = inputs_fn()
            before = tracker.current("Activation")  # the inputs: not what the forward keeps
            training_step(model, params, opt, inputs, dtype, optimizer,
                          on_forward_end=lambda: saved.setdefault("act", tracker.current("Activation") - before))
            del inputs
        if keep is not None:
            keep.update(model=model, params=params)
    snap = {k: sum(s.get(k, 0) for s in tracker._peak_mem_snap.values()) for k in
            ("Total", "Parameter", "Buffer", "Gradient", "Activation", "Temp", "Optstate", "Other")}
    peak = snap["Total"]
    grads, act = snap["Gradient"], snap["Activation"]
    transient = peak - base_bytes - adapter_bytes - state_bytes - grads - act
    return dict(model=model_name or (config or {}).get("_class_name"), provider=provider, setting=setting,
                resolution=resolution, frames=frames, batch=batch, dtype=str(dtype).replace("torch.", ""),
                checkpointing=checkpointing, optimizer=optimizer, world_size=world_size,
                peak_bytes=peak, base_params_bytes=base_bytes, adapter_params_bytes=adapter_bytes,
                optimizer_bytes=state_bytes, grad_bytes=grads, activation_bytes=act, transient_bytes=transient,
                saved_activation_bytes=saved.get("act", 0), peak_module=tracker.peak_module,
                adapter_params=sum(p.numel() for p in params), gpu=GPUS[gpu],
                est_step_seconds=roof.seconds, step_flops=roof.flops,
                trace_seconds=time.perf_counter() - start)


def _bytes(tensors) -> int:
    """Bytes of the distinct storages of `tensors` (PyTorch keeps one Python object per live storage)."""
    seen = {}
    for t in tensors:
        st = t.untyped_storage()
        seen[id(st)] = (st, st.nbytes())
    return sum(n for _, n in seen.values())


def cast_(module: nn.Module, dtype: torch.dtype) -> None:
    """Floating parameters and buffers to `dtype` in place (`Module.to` swaps FakeTensor parameters, which fails
    once the fake mode holds a weak reference to them)."""
    for t in [*module.parameters(), *module.buffers()]:
        if t.is_floating_point():
            t.data = t.data.to(dtype)


# ------------------------------------------------------------------------------------- sharding, quantized bases
# Bytes per weight element of the quantized base formats (lyfast.quantized.BASES): the data plus its scales
# (torchao int8 / fp8 weight-only: one bf16 scale per output row; bitsandbytes nf4: 4 bits + one fp32 absmax per 64).
QUANTIZED_BYTES = {"int8-torchao": 1.0, "fp8-torchao": 1.0, "int8-quanto": 1.0, "fp8-quanto": 1.0,
                   "nf4-bnb": 0.5 + 4 / 64}


def with_world_size(rec: dict, model: nn.Module, params: list, world_size: int) -> dict:
    """`rec` per GPU under per-block FSDP2 over `world_size` GPUs (lyfast.distributed): base weights sharded; lyfast's
    adapters, gradients and optimizer states sharded with their blocks (other providers' adapters are not in the
    model's blocks: replicated); plus the largest block all-gathered while it runs. Activations per GPU unchanged
    (each GPU its own batch). Substituted into the traced single-GPU step, not traced under FSDP."""
    from .distributed import blocks_of, shard_bytes

    if world_size == 1:
        return rec
    ids = {id(p) for p in params}
    base = sum(shard_bytes(p, world_size) for p in model.parameters() if id(p) not in ids) + \
        sum(b.numel() * b.element_size() for b in model.buffers())
    ratio = (sum(shard_bytes(p, world_size) for p in params) / max(rec["adapter_params_bytes"], 1)
             if rec["provider"] == "lyfast" else 1.0)
    gathered = max((sum(p.numel() * p.element_size() for p in b.parameters()) for b in blocks_of(model)), default=0)
    out = dict(rec, world_size=world_size, base_params_bytes=base)
    for key in ("adapter_params_bytes", "optimizer_bytes", "grad_bytes"):
        out[key] = int(rec[key] * ratio)
    out["transient_bytes"] = rec["transient_bytes"] + gathered
    out["peak_bytes"] = sum(out[k] for k in PARTS)
    return out


def with_base(rec: dict, model: nn.Module, base: str) -> dict:
    """`rec` with the base's nn.Linear weights stored as `base` (QUANTIZED_BYTES; estimated from the format, the
    trace ran on the unquantized weights). The layers' dequantized copy at run time is in the transient on the
    CPU libraries; GPU kernels fuse it."""
    if base == "bf16":
        return dict(rec, base=base)
    linear = [m.weight for m in model.modules() if isinstance(m, nn.Linear)]
    saved = sum(w.numel() * w.element_size() - int(w.numel() * QUANTIZED_BYTES[base]) for w in linear)
    out = dict(rec, base=base, base_params_bytes=rec["base_params_bytes"] - saved)
    out["peak_bytes"] = sum(out[k] for k in PARTS)
    return out


PARTS = ("base_params_bytes", "adapter_params_bytes", "optimizer_bytes", "grad_bytes", "activation_bytes",
         "transient_bytes")


# ------------------------------------------------------------------------------------- command line
GIB = 2**30


def table(records: list[dict], gpu_memory: int | None = None) -> str:
    head = ("| model | provider | setting | ckpt | peak GiB | base | adapters | optimizer | grads | activations | "
            "transient | saved act. | adapter params | est. step s |" + (" fits |" if gpu_memory else ""))
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in records:
        if "error" in r:
            lines.append(f"| {r['model']} | {r['provider']} | {r['setting']} | {r['checkpointing']} | "
                         f"skipped: {r['error']} |")
            continue
        cells = " | ".join(f"{r[k] / GIB:.2f}" for k in ("peak_bytes", *PARTS, "saved_activation_bytes"))
        fit = ""
        if gpu_memory:
            fit = " yes |" if r["peak_bytes"] <= gpu_memory else f" no: {r.get('suggestion', '')} |"
        lines.append(f"| {r['model']} | {r['provider']} | {r['setting']} | {r['checkpointing']} | {cells} | "
                     f"{r['adapter_params'] / 1e6:.1f}M | {r['est_step_seconds']:.2f} |{fit}")
    return "\n".join(lines)


def pivot(records: list[dict]) -> str:
    """Peak GiB per provider side by side, one row per model x setting x checkpointing (the README's table)."""
    providers = list(dict.fromkeys(r["provider"] for r in records))
    rows = {}
    for r in records:
        key = (r["model"], r["setting"], r["checkpointing"])
        rows.setdefault(key, {})[r["provider"]] = r
    head = "| model | setting | checkpointing | " + " | ".join(f"{p} peak GiB" for p in providers) + \
        " | adapter params | est. step s (lyfast) |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for (model, setting, ckpt), by in rows.items():
        cells = [f"{by[p]['peak_bytes'] / GIB:.1f}" if p in by and "error" not in by[p] else "—" for p in providers]
        ok = next((r for r in by.values() if "error" not in r), None)
        count = f"{ok['adapter_params'] / 1e6:.0f}M" if ok else "—"
        est = f"{by['lyfast']['est_step_seconds']:.2f}" if "lyfast" in by and "error" not in by["lyfast"] else "—"
        lines.append(f"| {model} | {setting} | {ckpt} | " + " | ".join(cells) + f" | {count} | {est} |")
    return "\n".join(lines)


def plot(records: list[dict], path: str) -> str | None:
    """Stacked bars (the breakdown at the peak), providers side by side per setting; None, or why it was skipped."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        return f"plot skipped: matplotlib is not installed ({e})"
    recs = [r for r in records if "error" not in r]
    labels = [f"{r['setting']}\n{r['provider']}\n{r['checkpointing']}" for r in recs]
    fig, ax = plt.subplots(figsize=(max(6, 0.7 * len(recs)), 5))
    bottom = [0.0] * len(recs)
    for key in PARTS:
        values = [r[key] / GIB for r in recs]
        ax.bar(range(len(recs)), values, bottom=bottom, label=key.replace("_bytes", "").replace("_", " "))
        bottom = [b + v for b, v in zip(bottom, values)]
    ax.set_xticks(range(len(recs)), labels, fontsize=7)
    ax.set_ylabel("GiB at the step's peak")
    ax.set_title(f"{recs[0]['model']} {recs[0]['resolution']}px batch {recs[0]['batch']} {recs[0]['dtype']}" if recs else "")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return None


def suggest(rec: dict, gpu_memory: int, model: nn.Module, params: list) -> str:
    """The cheapest change that fits, in the order users reach for them: block checkpointing (traced again by the
    caller), a quantized base, more GPUs (lyfast shards adapters too)."""
    for base in ("int8-torchao", "nf4-bnb"):
        if with_base(rec, model, base)["peak_bytes"] <= gpu_memory:
            return f"--base {base}"
    for world in (2, 4, 8, 16, 32, 64):
        if with_world_size(rec, model, params, world)["peak_bytes"] <= gpu_memory:
            return f"--world-size {world}"
    return "nothing listed fits"


def main(argv=None) -> list[dict]:
    from .quantized import BASES

    ap = argparse.ArgumentParser(prog="python -m lyfast plan", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=list(MODELS), default="flux")
    ap.add_argument("--config", default=None, help="a diffusers config JSON of a known family (any size)")
    ap.add_argument("--settings", type=items(SETTINGS), default=["lokr-full-f4", "loha-r16"])
    ap.add_argument("--providers", type=items(PLAN_PROVIDERS), default=list(PLAN_PROVIDERS[:3]))
    ap.add_argument("--resolution", type=resolution_type, default=None)
    ap.add_argument("--frames", type=positive(int), default=None)
    ap.add_argument("--batch", type=positive(int), default=1)
    ap.add_argument("--dtype", type=dtype_name, default="bfloat16")
    ap.add_argument("--base", choices=BASES, default="bf16")
    ap.add_argument("--checkpointing", type=items(("none", "blocks")), default=["none"])
    ap.add_argument("--optimizer", choices=OPTIMIZERS, default="adamw")
    ap.add_argument("--world-size", type=positive(int), default=1)
    ap.add_argument("--gpu", choices=list(GPUS), default="h100")
    ap.add_argument("--gpu-memory", type=memory_size, default=None)
    ap.add_argument("--json", default=None)
    ap.add_argument("--plot", default=None)
    args = ap.parse_args(argv)
    config = None
    if args.config:
        try:
            with open(args.config) as f:
                config = json.load(f)
        except (OSError, ValueError) as e:
            ap.error(f"--config {args.config}: {e}")
        if config.get("_class_name") not in _INPUTS:
            ap.error(f"--config {args.config}: _class_name {config.get('_class_name')!r} is not one of "
                     f"{', '.join(_INPUTS)}")
    if args.base != "bf16" and "lycoris" in args.providers:
        ap.error(f"--base {args.base}: LyCORIS runs a quantized base in bypass mode only (its rebuild mode needs a "
                 "plain weight): use --providers lycoris-bypass")
    dtype = getattr(torch, args.dtype)
    records = []
    jobs = [(c, p, s) for c in args.checkpointing for s in args.settings for p in args.providers]
    for i, (ckpt, provider, setting) in enumerate(jobs, 1):
        print(f"[{i}/{len(jobs)}] tracing {provider} {setting} checkpointing={ckpt} ...", file=sys.stderr,
              flush=True)
        try:
            rec, model, params = _plan_kept(args, config, provider, setting, ckpt, dtype)
        except Exception as e:  # one provider failing (e.g. PEFT refusing a layer) must not lose the others
            records.append(dict(model=args.model if config is None else config["_class_name"], provider=provider,
                                setting=setting, checkpointing=ckpt, error=f"{type(e).__name__}: {str(e)[:160]}"))
            print(f"    skipped: {records[-1]['error']}", file=sys.stderr)
            continue
        rec = with_world_size(with_base(rec, model, args.base), model, params, args.world_size)
        if args.gpu_memory and rec["peak_bytes"] > args.gpu_memory:
            rec["suggestion"] = suggest(rec, args.gpu_memory, model, params)
            if ckpt == "none" and "blocks" not in args.checkpointing:
                alt, _, _ = _plan_kept(args, config, provider, setting, "blocks", dtype)
                alt = with_world_size(with_base(alt, model, args.base), model, params, args.world_size)
                if alt["peak_bytes"] <= args.gpu_memory:
                    rec["suggestion"] = "--checkpointing blocks"
        print(f"    peak {rec['peak_bytes'] / GIB:.2f} GiB in {rec['trace_seconds']:.1f} s", file=sys.stderr)
        records.append(rec)
    print(table(records, args.gpu_memory))
    if len(args.providers) > 1:
        print()
        print(pivot(records))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(records, f, indent=1)
    if args.plot:
        why = plot(records, args.plot)
        if why:
            print(why, file=sys.stderr)
    return records


def _plan_kept(args, config, provider, setting, ckpt, dtype):
    """plan_one, and the fake model and adapter parameters it traced (for the per-GPU and base substitutions)."""
    kept = {}
    rec = plan_one(None if config else args.model, provider, setting, config=config, resolution=args.resolution,
                   frames=args.frames, batch=args.batch, dtype=dtype, checkpointing=ckpt, optimizer=args.optimizer,
                   gpu=args.gpu, keep=kept)
    return rec, kept["model"], kept["params"]
