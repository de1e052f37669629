"""`python -m benchmarks` (`make bench`): time lyfast vs lycoris vs the frozen base layer, measure memory,
write benchmarks/results/<device>-<date>.{json,md,png}.

Timing is benchmark.pedantic's method (untimed setup that clears grads, timed target with a CUDA sync inside,
warm-up rounds, median of the rounds), with the variants of one (shape, mode) interleaved round by round so
that load on a shared machine hits every variant alike and the ratios stay stable. Defaults: CPU = the CPU
subset of benchmarks/shapes.py in fp32 on 2 threads (about 6 minutes on 2 cores); CUDA = every SDXL UNet
shape at 1024x1024 in bf16. Memory is one forward+backward per layer at its real SDXL 1024x1024 size.
"""
from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import time

import torch

from lyfast.profile import SETTINGS

from .harness import CUDA, DEVICE, MODES, PROVIDERS, DoesNotFit, call, make_case, pin, run_info, unavailable, unpin
from .memory import layer_memory
from .report import write_report
from .shapes import at_unet_size, select


def parse(argv):
    ap = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--algos", default="all",
                    help="comma list of algorithms (loha, lokr, boft) or settings: " + ", ".join(SETTINGS))
    ap.add_argument("--shapes", default="unet" if CUDA else "cpu",
                    help="comma list: cpu (CPU subset), unet (all SDXL shapes), or names from benchmarks/shapes.py")
    ap.add_argument("--dtype", default="bfloat16" if CUDA else "float32")
    ap.add_argument("--providers", default=",".join(PROVIDERS), help="unavailable ones are skipped")
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    ap.add_argument("--budget", type=float, default=None,
                    help="timed seconds per variant and (shape, mode) (default 0.8 CPU, 0.3 CUDA)")
    ap.add_argument("--memory-at", choices=("unet", "bench", "none"), default="unet",
                    help="memory at the layer's real SDXL size (unet) or at the timed input (bench)")
    ap.add_argument("--quick", action="store_true",
                    help="fwdbwd only, 3+ rounds, memory at the timed input: a smoke run in about a minute")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    args = ap.parse_args(argv)
    if args.quick:
        args.modes, args.memory_at = "fwdbwd", "bench" if args.memory_at == "unet" else args.memory_at
        args.budget = args.budget or 0.1
    args.budget = args.budget or (0.3 if CUDA else 0.8)
    return args


def time_group(cases, budget: float, min_rounds: int, warmup: int = 2) -> list[list[float]]:
    """Interleaved rounds: each round calls every case once, in a fresh random order."""
    one = [max(min(call(c) for _ in range(warmup + 1)), 1e-6) for c in cases]
    rounds = max(min_rounds, min(200, int(budget * len(cases) / sum(one))))
    times = [[] for _ in cases]
    order = list(range(len(cases)))
    for _ in range(rounds):
        random.shuffle(order)
        for i in order:
            times[i].append(call(cases[i]))
    return times


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse(argv)
    torch.set_num_threads(args.threads)
    random.seed(0)
    device, dtype = DEVICE, getattr(torch, args.dtype)
    algos = args.algos.split(",")
    settings = [s for s, (a, _) in SETTINGS.items() if "all" in algos or s in algos or a in algos]
    shapes = select(args.shapes)
    modes = args.modes.split(",")
    providers, skipped = [], []
    for p in args.providers.split(","):
        why = unavailable(p)
        if why is None:
            providers.append(p)
        else:
            skipped.append({"provider": p, "reason": why})
    info = run_info(args.dtype)
    info["command"] = " ".join(["python -m benchmarks", *argv])
    print(f"{info['device']}, {args.dtype}, {torch.get_num_threads()} threads; torch {info['torch']}, "
          f"lyfast {info['lyfast']}, lycoris {info['lycoris']}, git {info['git_sha']}", flush=True)
    for s in skipped:
        print(f"  skipping provider {s['provider']}: {s['reason']}")
    variants = [("base", None)] * ("base" in providers) + [
        (p, s) for s in settings for p in providers if p != "base"]

    start, timings = time.perf_counter(), []
    groups = [(shape, mode) for shape in shapes.values() for mode in modes]
    for gi, (shape, mode) in enumerate(groups, 1):
        cases = []
        for p, s in variants:
            try:
                cases.append(make_case(shape, p, s, mode, device, dtype))
            except DoesNotFit as exc:
                if mode == modes[0]:
                    skipped.append({"provider": p, "setting": s, "shape": shape.name,
                                    "reason": str(exc)})
        times = time_group(cases, args.budget, 3 if args.quick else 5)
        for c, t in zip(cases, times):
            q = statistics.quantiles(t, n=4) if len(t) > 1 else [t[0]] * 3
            timings.append({"shape": shape.name, "tokens": shape.tokens, "unet_count": shape.count,
                            "mode": mode, "provider": c.provider, "setting": c.setting,
                            "algo": SETTINGS[c.setting][0] if c.setting else None,
                            "median_ms": 1e3 * statistics.median(t), "iqr_ms": 1e3 * (q[2] - q[0]),
                            "min_ms": 1e3 * min(t), "rounds": len(t)})
        summary = " ".join(f"{r['provider']}{'/' + r['setting'] if r['setting'] else ''}="
                           f"{r['median_ms']:.2f}" for r in timings[-len(cases):])
        print(f"[{gi}/{len(groups)} {time.perf_counter() - start:5.0f}s] {shape.name} {mode} "
              f"({timings[-1]['rounds']} rounds, ms) {summary}", flush=True)
        del cases

    memory = []
    if args.memory_at != "none":
        print(f"memory: one forward+backward per layer at the {args.memory_at} size", flush=True)
        for shape in shapes.values():
            mshape = at_unet_size(shape) if args.memory_at == "unet" else shape
            for p, s in variants:
                pin(p)
                try:
                    m = layer_memory(mshape, p, s, device, dtype)
                except ValueError:
                    continue   # setting does not fit the layer; already listed as skipped
                memory.append({"shape": shape.name, "memory_shape": mshape.name, "provider": p, "setting": s,
                               "algo": SETTINGS[s][0] if s else None, **m})
        print(f"memory done at {time.perf_counter() - start:.0f}s", flush=True)

    unpin()
    paths = write_report(info, vars(args), timings, memory, skipped, args.out)
    print(f"total {time.perf_counter() - start:.0f}s; wrote " + ", ".join(paths))
    return 0


if __name__ == "__main__":
    sys.exit(main())
