"""Per-GPU memory of adapter training under per-block FSDP2 (`lyfast.distributed`): adapters sharded with their
blocks against the same run with adapters replicated on every GPU, for a model family at full size.

    python -m benchmarks.fsdp_memory [--model flux2] [--settings lokr-full-f4] [--world-sizes 1,8]
                                     [--dtype bf16] [--optimizer-states 2] [--json OUT.json] [--md OUT.md]

The model is built from its published diffusers config on the meta device and the network is created there too
(no memory, no download); `lyfast.distributed.per_gpu_memory` counts, per GPU, what FSDP2's Shard(0) leaves on
rank 0 (the largest share): base weights (`--dtype`), adapter parameters, their gradients and the optimizer states
(fp32 master adapters, `--optimizer-states` per parameter: AdamW 2), and the transient of the largest block while it
runs (its parameters all-gathered in the compute dtype plus its adapters' whole gradients). Activations are not
counted here (they do not depend on the sharding; `python -m lyfast plan` traces them).
"""
from __future__ import annotations

import argparse
import json
import sys

import torch

from lyfast.cli import dtype_name, items, positive_items
from lyfast.distributed import per_gpu_memory
from lyfast.models import MODELS, build_model
from lyfast.peers import SETTINGS, network_kwargs

from .harness import run_info

GIB = 2**30
FIELDS = ("base_params", "adapter_params", "grads", "optimizer", "block_gathered")


def rows(model_name: str, setting: str, world_sizes, dtype: torch.dtype, optimizer_states: int) -> list[dict]:
    import lyfast

    model = build_model(model_name).to(dtype)
    with torch.device("meta"):  # the adapters' parameters too: shapes only
        net = lyfast.create_lycoris(model, 1.0, warn_on_unmatched=False, **network_kwargs(setting))
    out = []
    for world in world_sizes:
        for replicate in (False, True):
            mem = per_gpu_memory(model, net, world, replicate_adapters=replicate, compute_dtype=dtype,
                                 optimizer_states=optimizer_states)
            mem["total"] = sum(mem[k] for k in FIELDS)
            out.append(dict(model=model_name, setting=setting, world_size=world, adapters="replicated" if replicate
                            else "sharded", adapter_modules=len(net.loras), **mem))
    return out


def markdown(records: list[dict]) -> str:
    lines = ["| model | setting | GPUs | adapters | base weights | adapter params | grads | optimizer | "
             "largest block gathered | total (GiB) |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in records:
        cells = " | ".join(f"{r[k] / GIB:.2f}" for k in (*FIELDS, "total"))
        lines.append(f"| {r['model']} | {r['setting']} | {r['world_size']} | {r['adapters']} | {cells} |")
    return "\n".join(lines)


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=list(MODELS), default="flux2")
    ap.add_argument("--settings", type=items(SETTINGS), default=["lokr-full-f4"])
    ap.add_argument("--world-sizes", type=positive_items(int), default=[1, 8])
    ap.add_argument("--dtype", type=dtype_name, default="bfloat16", help="base weights and compute dtype")
    ap.add_argument("--optimizer-states", type=int, choices=range(0, 5), default=2,
                    help="fp32 states per adapter parameter (AdamW 2, SGD with momentum 1, SGD 0)")
    ap.add_argument("--json", default=None)
    ap.add_argument("--md", default=None)
    args = ap.parse_args(argv)
    dtype = getattr(torch, args.dtype)
    records = [r for s in args.settings for r in rows(args.model, s, args.world_sizes, dtype, args.optimizer_states)]
    table = markdown(records)
    print(table)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"run": run_info(args.dtype), "records": records}, f, indent=1)
    if args.md:
        with open(args.md, "w") as f:
            f.write(table + "\n")
    return records


if __name__ == "__main__":
    sys.exit(main() and 0)
