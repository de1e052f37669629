"""The planner (`python -m lyfast plan`) against a real training step, measured independently of its tracker.

    python -m benchmarks.plan_check [--models sdxl,flux] [--provider lyfast] [--setting lokr-f-1-r16]
                                    [--checkpointing blocks] [--dtype bf16] [--resolution 1024] [--device cuda]
                                    [--json OUT.json]

For each model: the plan (FakeTensors, on the CPU), then the same step for real on `--device` with random weights:
on CUDA the peak is `torch.cuda.max_memory_allocated` over the step (the allocator's own count, weights included),
on the CPU `LiveBytes` (below). `tests/test_plan.py` runs the CPU half on small configs; the GPU session
(`bash benchmarks/gpu_session.sh plan`) runs it at full size.
"""
from __future__ import annotations

import argparse
import json
import sys
import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from lyfast import plan
from lyfast.cli import dtype_name, items, resolution
from lyfast.models import MODELS, family, model_config
from lyfast.peers import SETTINGS

from .harness import run_info


class LiveBytes(TorchDispatchMode):
    """Live storage bytes over real tensors, written apart from the planner's tracker (PyTorch's MemTracker): the
    storages of `start_tensors` first, then every new storage an op returns, each once; a storage's bytes leave the
    count when it is freed (a weakref callback on the storage object, which PyTorch keeps while the storage lives)."""

    def __init__(self, start_tensors=()):
        super().__init__()
        self.live, self.current, self.peak = {}, 0, 0
        for t in start_tensors:
            self._add(t)
        self.peak = self.current

    def _add(self, t: torch.Tensor) -> None:
        st = t.untyped_storage()
        key = id(st)
        if key in self.live:
            return
        n = st.nbytes()
        self.live[key] = (weakref.ref(st, lambda _, key=key: self._free(key)), n)
        self.current += n
        self.peak = max(self.peak, self.current)

    def _free(self, key) -> None:
        _, n = self.live.pop(key)
        self.current -= n

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self._add(t)
        return out


def real_step(config: dict, provider: str, setting: str, dtype: torch.dtype, checkpointing: str, *,
              optimizer: str = "adamw", resolution: int = 1024, frames: int = 1, text_tokens: int = 77,
              device: str = "cpu") -> dict:
    """The planner's step for real (random weights): dict(peak, saved, base, adapters, states) in bytes; `saved` is
    what the forward added and keeps at its end, the inputs excluded (as the plan's saved_activation_bytes)."""
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # built in the compute dtype: a 12B model is not first made in fp32
    try:
        with torch.device(device):
            model = plan.build_from_config(config)  # no fake mode active: a real model
    finally:
        torch.set_default_dtype(default)
    plan.cast_(model, dtype)
    model.requires_grad_(False)
    if checkpointing == "blocks":
        model.enable_gradient_checkpointing()  # diffusers' own call, not the planner's helper
    model.train()
    params = plan.attach(model, provider, setting)
    opt = plan.make_optimizer(params, optimizer)
    ids = {id(p) for p in params}
    base = [p for p in model.parameters() if id(p) not in ids] + list(model.buffers())
    states = [v for s in opt.state.values() for v in s.values() if isinstance(v, torch.Tensor)]
    with torch.device(device):
        inputs = plan.model_inputs(model, resolution, frames, text_tokens, 1, dtype)
    for v in inputs.values():
        if isinstance(v, torch.Tensor) and v.is_floating_point():
            v.normal_()
    sizes = lambda ts: LiveBytes(ts).current  # noqa: E731
    record = dict(base=sizes(base), adapters=sizes(params), states=sizes(states))
    saved = {}
    if device == "cpu":
        counter = LiveBytes([*base, *params, *states, *(v for v in inputs.values() if isinstance(v, torch.Tensor))])
        start = counter.current
        with counter:
            plan.training_step(model, params, opt, inputs, dtype, optimizer,
                               on_forward_end=lambda: saved.setdefault("act", counter.current - start))
        return dict(record, peak=counter.peak, saved=saved["act"])
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    start = torch.cuda.memory_allocated()
    plan.training_step(model, params, opt, inputs, dtype, optimizer,
                       on_forward_end=lambda: saved.setdefault("act", torch.cuda.memory_allocated() - start))
    torch.cuda.synchronize()
    return dict(record, peak=torch.cuda.max_memory_allocated(), saved=saved["act"])


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", type=items(MODELS), default=["sdxl", "flux"])
    ap.add_argument("--provider", choices=plan.PLAN_PROVIDERS[:3], default="lyfast")
    ap.add_argument("--setting", choices=list(SETTINGS), default="lokr-f-1-r16")
    ap.add_argument("--checkpointing", choices=("none", "blocks"), default="blocks")
    ap.add_argument("--dtype", type=dtype_name, default="bfloat16")
    ap.add_argument("--resolution", type=resolution, default=1024)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    dtype = getattr(torch, args.dtype)
    records = []
    for model in args.models:
        fam = family(model)
        kw = dict(resolution=args.resolution, frames=fam.frames, text_tokens=fam.text_tokens)
        got = plan.plan_one(model, args.provider, args.setting, dtype=dtype, checkpointing=args.checkpointing, **kw)
        real = real_step(model_config(model), args.provider, args.setting, dtype, args.checkpointing,
                         device=args.device, **kw)
        rec = dict(model=model, provider=args.provider, setting=args.setting, checkpointing=args.checkpointing,
                   device=args.device, predicted_peak=got["peak_bytes"], measured_peak=real["peak"],
                   peak_error=got["peak_bytes"] / real["peak"] - 1, predicted_saved=got["saved_activation_bytes"],
                   measured_saved=real["saved"], base=[got["base_params_bytes"], real["base"]],
                   adapters=[got["adapter_params_bytes"], real["adapters"]])
        print(json.dumps(rec), flush=True)
        records.append(rec)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"run": run_info(args.dtype), "records": records}, f, indent=1)
    return records


if __name__ == "__main__":
    sys.exit(main() and 0)
