"""Where the time goes: torch.profiler's top ops of one provider's fwd+bwd, per shape and setting.

    python -m benchmarks.top_ops --shapes linear-1280-10240 --algos boft --providers base,lyfast
"""
from __future__ import annotations

import argparse

import torch
from torch.profiler import ProfilerActivity, profile

from lyfast.peers import SETTINGS

from .harness import CUDA, DEVICE, call, make_case, unpin
from .shapes import select


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.top_ops", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="sdxl", help="model family of the shapes (benchmarks/shapes.py)")
    ap.add_argument("--shapes", default="cpu")
    ap.add_argument("--algos", default="loha-r8,lokr-f-1-r16,boft-b32")
    ap.add_argument("--providers", default="lyfast")
    ap.add_argument("--mode", default="fwdbwd")
    ap.add_argument("--dtype", default="bfloat16" if CUDA else "float32")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--calls", type=int, default=5)
    ap.add_argument("--rows", type=int, default=12)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    algos = args.algos.split(",")
    settings = [s for s, (a, _) in SETTINGS.items() if s in algos or a in algos]
    activities = [ProfilerActivity.CPU] + [ProfilerActivity.CUDA] * CUDA
    for name, shape in select(args.shapes, args.model).items():
        for provider in args.providers.split(","):
            for setting in [None] if provider == "base" else settings:
                case = make_case(shape, provider, setting, args.mode, DEVICE, getattr(torch, args.dtype))
                for _ in range(2):
                    call(case)
                with profile(activities=activities) as prof:
                    total = sum(call(case) for _ in range(args.calls))
                print(f"\n=== {name} {provider} {setting or ''} {args.mode}: "
                      f"{1e3 * total / args.calls:.2f} ms per call")
                print(prof.key_averages().table(sort_by="self_cuda_time_total" if CUDA else "self_cpu_time_total",
                                                row_limit=args.rows))
    unpin()


if __name__ == "__main__":
    main()
