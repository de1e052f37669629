"""One rank of the FSDP2 tests (tests/test_distributed.py launches it with torch.distributed.run, gloo, CPU).

    python -m torch.distributed.run --nproc-per-node 2 tests/distributed_worker.py --out r.json --cases flux-lokr-full

Each case builds the model and network twice from the same seeds: a single-process reference trained on the whole
batch on every rank, and the sharded run (`lyfast.distributed.place_in_layers`, `fully_shard` per block, then the
root) where each rank trains on its half. Rank 0 writes one record per case: losses, the largest differences of
the adapters (gathered) from the reference, the tolerance, shard fractions, and what the hooks saw. Every check that
needs a number is decided in the test, not here.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

import torch
import torch.distributed as dist

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "examples"), os.path.join(ROOT, "tests")]
from lyfast._checkout import prefer_installed_kernels  # noqa: E402

prefer_installed_kernels()  # before diffusers: the checkout's kernels/ shadows the package transformers imports

ALGOS = {  # recipe -> create_lycoris kwargs (tiny models: small ranks; LoKr as SimpleTuner trains DiTs)
    "loha": dict(algo="loha", linear_dim=4, linear_alpha=2, conv_dim=4, conv_alpha=2),
    "lokr-f-1": dict(algo="lokr", linear_dim=4, linear_alpha=2, conv_dim=4, conv_alpha=2, factor=-1),
    "lokr-full": dict(algo="lokr", linear_dim=10000, linear_alpha=1, factor=4, full_matrix=True),
    "boft": dict(algo="boft", linear_dim=8, linear_alpha=1),
}
STEPS, BATCH = 3, 4


def build(model_name: str, recipe: str, base: str | None = None):
    """(model, net, blocks, batch_fn): the frozen model (its Linears quantized as `base` says, see
    lyfast.quantized.BASES) with the network applied; the same seeds on every call."""
    import lyfast

    if model_name == "flux":
        from train_dit import build_transformer, make_batch

        model = build_transformer(seed=0)
        blocks = [*model.transformer_blocks, *model.single_transformer_blocks]

        def batch_fn(step, lo, hi):
            kw, target = make_batch(model, step, BATCH, side=4, seq=8)
            return {k: (v[lo:hi] if v.dim() and v.shape[0] == BATCH and "ids" not in k else v) for k, v in kw.items()}, \
                target[lo:hi]
    else:
        from lyco_models import UNET_KW
        from diffusers import UNet2DConditionModel

        torch.manual_seed(0)
        model = UNet2DConditionModel(**UNET_KW)
        model.requires_grad_(False)
        blocks = [*model.down_blocks, model.mid_block, *model.up_blocks]

        def batch_fn(step, lo, hi):
            gen = torch.Generator().manual_seed(100 + step)
            x = torch.randn(BATCH, 4, 16, 16, generator=gen)
            ctx = torch.randn(BATCH, 8, 32, generator=gen)
            t = torch.randint(0, 1000, (BATCH,), generator=gen)
            target = torch.randn(BATCH, 4, 16, 16, generator=gen)
            return dict(sample=x[lo:hi], timestep=t[lo:hi], encoder_hidden_states=ctx[lo:hi]), target[lo:hi]
    if base is not None:
        from lyfast.quantized import quantize_base

        quantize_base(model, base)
    torch.manual_seed(1)
    net = lyfast.create_lycoris(model, **ALGOS[recipe])
    net.apply_to()
    with torch.no_grad():  # non-zero everywhere, so every factor's gradient is exercised from step 1
        for p in net.parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())) * 0.02)
    return model, net, blocks, batch_fn


def out_of(result):
    return result.sample if hasattr(result, "sample") else result[0]


def train(model, net, batch_fn, parts, steps=STEPS, opt=None, clip=None, start=0, world=1, mixed=False):
    """AdamW steps on the adapters, each step's gradient accumulated over `parts` ((lo, hi) slices of the batch,
    each loss weighted 1/len(parts)); returns (losses (whole-batch means over the ranks), grad norms, optimizer).

    `mixed`: the single-process equivalent of FSDP2's MixedPrecisionPolicy(bf16 params, fp32 reduce): fp32 master
    adapters for AdamW, every parameter and floating input in bf16 for forward and backward, each part's gradient
    taken to fp32 before it is summed."""
    params = list(net.parameters())
    if mixed:
        master = [p.detach().clone().requires_grad_() for p in params]
        for p in model.parameters():
            p.data = p.data.to(torch.bfloat16)
    opt = opt or torch.optim.AdamW(master if mixed else params, lr=1e-2, weight_decay=1e-2)
    losses, norms = [], []
    for step in range(start, start + steps):
        value = torch.zeros(())
        if mixed:
            for p, m in zip(params, master):
                p.data = m.detach().to(torch.bfloat16)
            acc = [torch.zeros_like(m) for m in master]
        for lo, hi in parts:
            kw, target = batch_fn(step, lo, hi)
            if mixed:
                kw = {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in kw.items()}
            loss = torch.nn.functional.mse_loss(out_of(model(**kw)).float(), target.float()) / len(parts)
            loss.backward()
            value += loss.detach()
            if mixed:
                for a, p in zip(acc, params):
                    a += p.grad.float()
                    p.grad = None
        if mixed:
            for m, a in zip(master, acc):
                m.grad = a
        if clip is not None:
            norms.append(float(torch.nn.utils.clip_grad_norm_(list(net.parameters()), clip)))
        opt.step()
        opt.zero_grad(set_to_none=True)
        if world > 1:
            dist.all_reduce(value)
            value /= world
        losses.append(float(value))
    if mixed:
        for p, m in zip(params, master):
            p.data = m.detach()
    return losses, norms, opt


def state(net):
    from lyfast.distributed import gathered_state_dict

    return {k: v.detach().float().clone() for k, v in gathered_state_dict(net.state_dict()).items()}


def max_diff(a, b):
    """The largest difference of any tensor, relative to that tensor's largest value in `b`."""
    return max(float((a[k] - b[k]).abs().max() / b[k].abs().max().clamp_min(1e-30)) for k in a)


def shard(model, net, blocks, mp=None, reshard=True, keep_base=True, place=True):
    """`lyfast.distributed.shard` (placement, `fully_shard` per block, then the root) as users call it; the worker's
    own list of blocks must be what `blocks_of` finds. By hand where a case needs what the helper does not do:
    `place=False` plants the defect the tests must catch (adapters left out of the blocks: each rank trains its own
    unsynchronised copy); `keep_base=False` shards the quantized base weights too (optimum-quanto's can be)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    from lyfast import distributed

    assert {id(b) for b in distributed.blocks_of(model)} == {id(b) for b in blocks}, "blocks_of differs"
    kw = dict(mp_policy=mp or MixedPrecisionPolicy(), reshard_after_forward=reshard)
    if place and keep_base:
        distributed.shard(model, net, **kw)
        return
    if place:
        distributed.place_in_layers(net)
    for block in blocks:
        fully_shard(block, **kw)
    kw.pop("reshard_after_forward")
    fully_shard(model, **kw)


def _rows(n, rank, world):
    """Rows of a dim-0 size `n` that FSDP2's Shard(0) gives `rank` (torch.chunk: ceil(n / world) per rank)."""
    size = -(-n // world)
    return max(0, min(size, n - rank * size))


class Watch:
    """Forward pre-hooks on every adapted layer: which adapters hold unsharded parameters while a layer runs
    (must be at most the running block's and the root group's), and in which dtype they compute."""

    def __init__(self, model, net, blocks):
        from torch.distributed.tensor import DTensor

        self.DTensor = DTensor
        owner = {}
        for i, block in enumerate(blocks):
            for m in block.modules():
                owner[id(m)] = i
        self.block_of = {lora.lora_name: owner.get(id(lora.org_module[0])) for lora in net.loras}
        self.net, self.violations, self.dtypes, self.calls = net, [], set(), 0
        self.handles = [lora.org_module[0].register_forward_pre_hook(self.hook(lora)) for lora in net.loras]

    def hook(self, lora):
        def pre(module, args):
            self.calls += 1
            running = self.block_of[lora.lora_name]
            for other in self.net.loras:
                params = list(other.parameters())
                if params and not any(isinstance(p, self.DTensor) for p in params):
                    block = self.block_of[other.lora_name]
                    if block is not None and block != running:
                        self.violations.append((lora.lora_name, other.lora_name))
            self.dtypes |= {str(p.dtype) for p in lora.parameters()}
        return pre

    def remove(self):
        for h in self.handles:
            h.remove()


def references(model_name, recipe, base, world, clip=None, mixed=False):
    """The single-process reference: the whole batch at once, and the same batch as the ranks' parts accumulated (the
    fp32 reordering a sharded run also has). Returns the record fields: losses, grad norms, `ref` (the adapters
    after the parts run) and `ref_diff` (the whole-batch run's largest relative difference from it: the tolerance)."""
    parts = [(r * BATCH // world, (r + 1) * BATCH // world) for r in range(world)]
    rec, states = {}, {}
    for label, split in (("whole", [(0, BATCH)]), ("halves", parts)):
        model, net, _, batch_fn = build(model_name, recipe, base)
        rec[f"ref_losses_{label}"], rec[f"ref_norms_{label}"], _ = train(model, net, batch_fn, split, clip=clip,
                                                                          mixed=mixed)
        states[label] = state(net)
    rec["ref"], rec["ref_diff"], rec["adapters"] = states["halves"], max_diff(states["whole"], states["halves"]), \
        len(net.loras)
    return rec


def run_case(case, rank, world, tmp):
    from torch.distributed.fsdp import MixedPrecisionPolicy
    from torch.distributed.tensor import DTensor

    name, _, feature = case.partition(":")
    model_name, recipe = name.split("-", 1)
    feature = feature or "train"
    base = feature.partition("=")[2].split("+")[0] if feature.startswith("base=") else None
    keep_base = base is None or feature.endswith("+keep")
    lo, hi = rank * BATCH // world, (rank + 1) * BATCH // world
    rec = {"case": case}

    rec.update(references(model_name, recipe, base, world, clip=1.0 if feature == "clip" else None,
                          mixed=feature == "bf16"))
    ref, clip = rec.pop("ref"), (1.0 if feature == "clip" else None)
    init_model, init_net, _, _ = build(model_name, recipe, base)
    rec["base_keys"] = len(init_model.state_dict())

    model, net, blocks, batch_fn = build(model_name, recipe, base)
    from lyfast.distributed import per_gpu_memory

    predicted = per_gpu_memory(model, net, world, blocks=blocks)
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if feature == "bf16" else None
    shard(model, net, blocks, mp=mp, reshard=feature != "noreshard", keep_base=keep_base,
          place=feature != "plant-no-place")
    sd_keys = model.state_dict().keys()
    rec["base_keys_after"] = len(sd_keys)
    rec["adapter_keys_in_base"] = sum("lycoris" in k for k in sd_keys)
    rec["net_keys_equal"] = sorted(net.state_dict()) == sorted(init_net.state_dict())
    local = sum(p.to_local().numel() if isinstance(p, DTensor) else p.numel() for p in net.parameters())
    total = sum(p.numel() for p in net.parameters())
    rec["expected_local"] = sum(p.numel() // max(p.shape[0], 1) * _rows(p.shape[0], rank, world) for p in net.parameters())
    rec["local"] = local
    rec["all_dtensor"] = all(isinstance(p, DTensor) for p in net.parameters())
    adapter_ids = {id(p) for p in net.parameters()}
    base_params = [p for p in model.parameters() if id(p) not in adapter_ids]
    rec["base_sharded"] = sum(isinstance(p, DTensor) for p in base_params) / len(base_params)
    rec["rest_dtypes"] = sorted({str(p.to_local().dtype) for p in net.parameters() if isinstance(p, DTensor)})
    counts = torch.tensor([local])
    dist.all_reduce(counts)
    rec["shard_fraction"], rec["shards_cover"] = local / total, int(counts) >= total
    if feature == "compile":  # each sharded block compiled (FSDP2's hooks stay outside the compiled forward)
        for block in blocks:
            block.compile(backend="aot_eager")
    watch = Watch(model, net, blocks)
    losses, norms, opt = train(model, net, batch_fn, [(lo, hi)], clip=clip, world=world)
    watch.remove()
    rec["losses"], rec["norms"] = losses, norms
    rec["violations"], rec["dtypes"], rec["calls"] = watch.violations[:5], sorted(watch.dtypes), watch.calls
    got = state(net)
    rec["max_diff"] = max_diff(got, ref)
    if feature in ("train", "base=int8-torchao+keep"):  # quanto and bnb weights have no storage to count
        def local_bytes(tensors):  # each storage once (gradient shards may be views of one reduce-scatter output)
            storages = {}
            for t in tensors:
                t = t.to_local() if isinstance(t, DTensor) else t
                if hasattr(t, "__tensor_flatten__") and type(t) not in (torch.Tensor, torch.nn.Parameter):
                    t = [getattr(t, n) for n in t.__tensor_flatten__()[0]]  # a quantized weight's data, scales
                for u in t if isinstance(t, list) else [t]:
                    storages[u.untyped_storage().data_ptr()] = u.untyped_storage().nbytes()
            return sum(storages.values())

        adapter_params = list(net.parameters())
        measured = {"base_params": local_bytes(p for p in model.parameters() if id(p) not in adapter_ids),
                    "adapter_params": local_bytes(adapter_params),
                    "optimizer": local_bytes(v for p in adapter_params for v in opt.state[p].values() if v.dim())}
        with torch.no_grad():  # one more backward for the gradients' shards (the optimizer freed them)
            kw, target = batch_fn(0, lo, hi)
        torch.nn.functional.mse_loss(out_of(model(**kw)).float(), target.float()).backward()
        measured["grads"] = local_bytes(p.grad for p in adapter_params)
        opt.zero_grad(set_to_none=True)
        rec["memory"] = {k: [predicted[k], measured[k]] for k in measured} if rank == 0 else None

    if feature == "save":  # save gathered, reload into a fresh sharded network, the base's state_dict untouched
        path = os.path.join(tmp, "adapters.safetensors")
        net.save_weights(path, torch.float32, {"case": case})
        from safetensors.torch import load_file

        if rank == 0:
            saved = load_file(path)
            rec["file_equal"] = sorted(saved) == sorted(got) and max_diff(saved, got) == 0
        m2, n2, b2, _ = build(model_name, recipe, base)
        shard(m2, n2, b2)
        info = n2.load_weights(path)
        rec["load_info"] = {k: len(v) for k, v in info.items()}
        rec["reload_diff"] = max_diff(state(n2), got)
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        # a base checkpoint (no adapter keys) loads strictly into the sharded model with placed adapters
        set_model_state_dict(m2, init_model.state_dict(), options=StateDictOptions(full_state_dict=True, strict=True))
    if feature == "dcp":  # resume adapters + AdamW state through torch.distributed.checkpoint
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

        ckpt = os.path.join(tmp, "ckpt")
        msd, osd = get_state_dict(net, opt)
        dcp.save({"model": msd, "optim": osd}, checkpoint_id=ckpt)
        cont, _, _ = train(model, net, batch_fn, [(lo, hi)], steps=2, opt=opt, start=STEPS, world=world)
        uninterrupted = state(net)
        m2, n2, b2, batch_fn2 = build(model_name, recipe, base)
        shard(m2, n2, b2)
        opt2 = torch.optim.AdamW(n2.parameters(), lr=1e-2, weight_decay=1e-2)
        msd2, osd2 = get_state_dict(n2, opt2)
        loaded = {"model": msd2, "optim": osd2}
        dcp.load(loaded, checkpoint_id=ckpt)
        set_state_dict(n2, opt2, model_state_dict=loaded["model"], optim_state_dict=loaded["optim"])
        resumed, _, _ = train(m2, n2, batch_fn2, [(lo, hi)], steps=2, opt=opt2, start=STEPS, world=world)
        rec["resume_losses"], rec["cont_losses"] = resumed, cont
        rec["resume_diff"] = max_diff(state(n2), uninterrupted)
    return rec


def accelerate_run(out, recipe="lokr-full"):
    """Under `accelerate launch` with an FSDP2 config (transformer-based auto-wrap on the Flux block classes):
    `accelerator.prepare(model, optimizer)` shards the placed adapters with their blocks; the adapters after the
    steps equal the single-process reference; save_weights writes the gathered file."""
    from accelerate import Accelerator
    from torch.distributed.tensor import DTensor

    from lyfast.distributed import place_in_layers

    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    if getattr(accelerator.state, "fsdp_plugin", None) is None:
        # accelerate runs FSDP only on accelerators (`accelerate launch` takes `use_cpu` to multi-CPU DDP and
        # AcceleratorState sets the FSDP plugin for GPU-like types only): on the CPU the run switches the state to
        # FSDP with the plugin docs/training.md's config file gives, so the rest is accelerate's own FSDP2 path.
        from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

        accelerator.state.distributed_type = DistributedType.FSDP
        accelerator.state.fsdp_plugin = FullyShardedDataParallelPlugin(
            fsdp_version=2, auto_wrap_policy="transformer_based_wrap", reshard_after_forward=True,
            transformer_cls_names_to_wrap=["FluxTransformerBlock", "FluxSingleTransformerBlock"])
    rank, world = accelerator.process_index, accelerator.num_processes
    halves = [(r * BATCH // world, (r + 1) * BATCH // world) for r in range(world)]
    rec = references("flux", recipe, None, world)
    ref = rec.pop("ref")
    model, net, _, batch_fn = build("flux", recipe)
    place_in_layers(net)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-2, weight_decay=1e-2)
    model, opt = accelerator.prepare(model, opt)
    rec.update({"fsdp_version": accelerator.state.fsdp_plugin.fsdp_version,
                "blocks_sharded": sorted({type(m).__name__ for m in model.modules()
                                          if type(m).__name__.startswith("FSDP")}),
                "all_dtensor": all(isinstance(p, DTensor) for p in net.parameters()),
                "optimizer_is_net": all(a is b for a, b in zip(opt.param_groups[0]["params"], net.parameters()))})
    losses = []
    lo, hi = halves[rank]
    for step in range(STEPS):
        kw, target = batch_fn(step, lo, hi)
        loss = torch.nn.functional.mse_loss(out_of(model(**kw)).float(), target.float())
        accelerator.backward(loss)
        opt.step()
        opt.zero_grad()
        losses.append(float(accelerator.reduce(loss.detach(), "mean")))
    got = state(net)
    path = os.path.join(os.path.dirname(out), "accelerate_adapters.safetensors")
    net.save_weights(path, torch.float32, None)
    if accelerator.is_main_process:
        from safetensors.torch import load_file

        rec.update(losses=losses, max_diff=max_diff(got, ref), world=world,
                   file_diff=max_diff(load_file(path), got))
        with open(out, "w") as f:
            json.dump(rec, f, indent=1)
    accelerator.wait_for_everyone()
    accelerator.end_training()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--cases", default="")
    ap.add_argument("--accelerate", action="store_true", help="the accelerate launch run (accelerate_run)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    if args.accelerate:
        return accelerate_run(args.out)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    records = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp_list = [tmp]
        dist.broadcast_object_list(tmp_list)  # one directory for all ranks (rank 0's)
        for case in args.cases.split(","):
            records.append(run_case(case, rank, world, tmp_list[0]))
            dist.barrier()
    if rank == 0:
        with open(args.out, "w") as f:
            json.dump(records, f, indent=1)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
