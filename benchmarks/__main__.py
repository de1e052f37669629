"""`python -m benchmarks` (`make bench`): time lyfast vs lycoris (rebuild and bypass mode) vs HF PEFT vs the
frozen base layer, measure memory, write benchmarks/results/<device>-<date>-<model>.{json,md,png}.

`--model sdxl|flux|flux2|sd35|qwen-image|cosmos|all` (default sdxl; a comma list or all runs each in turn,
each with its own --minutes) picks the shape registry of benchmarks/shapes.py.

Timing is benchmark.pedantic's method (untimed setup that clears grads, timed target with a CUDA sync inside,
warm-up call, medians) with every sample of a variant paired with a sample of the frozen base layer taken
just before it, variants interleaved in random order: ratios are medians of the paired ratios, so load on a
shared machine hits both sides alike. Defaults: CPU = the CPU subset of benchmarks/shapes.py in fp32 on 2
threads, rounds sized to finish in --minutes (9 per model); CUDA = every shape of the model at 1024x1024 in
bf16. Memory is one forward+backward per layer at its real 1024x1024 size (`--memory-at model`; on the CPU a
transformer's layers are measured at the timed input instead: at 4096+ tokens one step of a 3072x12288 layer
takes seconds per variant on 2 cores; `python -m lyfast profile-memory --model M` measures them at full size).
"""
from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import time

import torch

from lyfast import cli
from lyfast.peers import SETTINGS
from lyfast.quantized import BASES, BaseUnavailable

from .harness import CUDA, DEVICE, MODES, PROVIDERS, DoesNotFit, call, make_case, pin, run_info, unavailable, unpin
from .memory import base_memory, layer_memory
from .report import write_report
from .shapes import MODELS, at_model_size, select


ALGOS = tuple(dict.fromkeys(algo for algo, _ in SETTINGS.values()))


def parse(argv):
    ap = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--algos", default="all", type=cli.items([*ALGOS, *SETTINGS], also=("all",)),
                    help="comma list of algorithms (loha, lokr, boft) or settings: " + ", ".join(SETTINGS))
    ap.add_argument("--model", default="sdxl", type=cli.items(MODELS, also=("all",)),
                    help=f"{', '.join(MODELS)}, a comma list, or all")
    ap.add_argument("--shapes", default="model" if CUDA else "cpu",
                    help="comma list: cpu (the model's CPU subset), model (all its shapes), or names from "
                         "benchmarks/shapes.py")
    ap.add_argument("--dtype", default="bfloat16" if CUDA else "float32", type=cli.dtype_name,
                    help="float32|bfloat16|float16 (or fp32, bf16, fp16)")
    ap.add_argument("--base", default="bf16", choices=BASES,
                    help="the frozen layer: bf16 (plain, in --dtype) or quantized by its library (Linear shapes "
                         "only; providers that cannot run on it are skipped with the reason)")
    ap.add_argument("--providers", default=list(PROVIDERS), type=cli.items(PROVIDERS),
                    help="comma list of " + ", ".join(PROVIDERS) + "; unavailable ones are skipped; the frozen "
                         "base layer is always timed as the reference")
    # CPU: fwd+bwd only by default, so 8 settings x (lyfast, lycoris rebuild, lycoris bypass) fit the 9 minutes
    # that 5 settings x 2 providers x 3 modes used to take (peft's rounds shrink with the others to fit --minutes)
    ap.add_argument("--modes", default=list(MODES) if CUDA else ["fwdbwd"], type=cli.items(MODES),
                    help=f"comma list of {', '.join(MODES)} (default: all on CUDA, fwdbwd on the CPU)")
    ap.add_argument("--threads", type=cli.positive(int), default=2, help="torch CPU threads")
    ap.add_argument("--budget", type=cli.positive(float), default=None,
                    help="seconds per variant and (shape, mode), setup included (default 0.5 CPU, 0.3 CUDA)")
    ap.add_argument("--minutes", type=cli.positive(float), default=None,
                    help="time limit per model: rounds shrink (to 3 at least) to fit it (default 9 on CPU, none "
                         "on CUDA)")
    ap.add_argument("--memory-at", choices=("auto", "model", "unet", "bench", "none"), default="auto",
                    help="memory at the layer's real size in the model (model; unet = model), at the timed input "
                         "(bench), or auto: model, except bench for a transformer on the CPU")
    ap.add_argument("--quick", action="store_true",
                    help="fwdbwd only, 3+ rounds, memory at the timed input: a smoke run in about a minute")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    args = ap.parse_args(argv)
    args.models = list(MODELS) if "all" in args.model else args.model
    for model in args.models:
        try:
            select(args.shapes, model)
        except KeyError as exc:
            ap.error(f"--shapes: {exc.args[0]}")
    if args.memory_at == "unet":
        args.memory_at = "model"
    if args.quick:
        args.modes, args.memory_at = ["fwdbwd"], "bench" if args.memory_at in ("model", "auto") else args.memory_at
        args.budget = args.budget or 0.1
    args.budget = args.budget or (0.3 if CUDA else 0.5)
    if args.minutes is None and not CUDA:
        args.minutes = 9.0
    return args


def time_group(base, cases, budget: float, min_rounds: int, deadline: float):
    """Paired, interleaved timing. Every sample of a case directly follows a sample of the frozen base
    layer, so the ratio t(case)/t(base) of each pair cancels load drifts on a shared machine; each round
    visits the cases still short of their rounds in a fresh random order. After a warm-up call, one
    timed call (setup included) sets each case's rounds from `budget` seconds per case (at least
    `min_rounds`), shrunk (down to 3) to end by `deadline` (a perf_counter time).
    Returns (base times, [case times], [paired ratios])."""
    for c in (base, *cases):
        call(c)
    one = []
    for c in (base, *cases):
        t0 = time.perf_counter()
        call(c)
        one.append(time.perf_counter() - t0)
    pair = [one[0] + t for t in one[1:]]
    want = [max(min_rounds, min(200, int(budget / p))) for p in pair]
    cost = sum(w * p for w, p in zip(want, pair))
    if cost > deadline - time.perf_counter():
        shrink = max(deadline - time.perf_counter(), 0.0) / cost
        want = [max(3, int(w * shrink)) for w in want]
    base_t, case_t, ratio = [], [[] for _ in cases], [[] for _ in cases]
    while todo := [i for i, w in enumerate(want) if len(case_t[i]) < w]:
        random.shuffle(todo)
        for i in todo:
            tb, tc = call(base), call(cases[i])
            base_t.append(tb)
            case_t[i].append(tc)
            ratio[i].append(tc / tb)
    return base_t, case_t, ratio


def _stats(t: list[float]) -> dict:
    q = statistics.quantiles(t, n=4) if len(t) > 1 else [t[0]] * 3
    return {"median_ms": 1e3 * statistics.median(t), "iqr_ms": 1e3 * (q[2] - q[0]), "min_ms": 1e3 * min(t),
            "rounds": len(t)}


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse(argv)
    torch.set_num_threads(args.threads)
    for model in args.models:
        run_model(model, args, argv)
    return 0


def run_model(model: str, args, argv) -> None:
    """One model's timing, memory and report."""
    random.seed(0)
    device, dtype = DEVICE, getattr(torch, args.dtype)
    algos = args.algos
    settings = [s for s, (a, _) in SETTINGS.items() if "all" in algos or s in algos or a in algos]
    shapes = select(args.shapes, model)
    memory_at = args.memory_at
    if memory_at == "auto":
        memory_at = "bench" if model != "sdxl" and not CUDA else "model"
    modes = args.modes
    providers, skipped = [], []
    for p in args.providers:
        why = unavailable(p)
        if why is None:
            providers.append(p)
        else:
            skipped.append({"provider": p, "reason": why})
    info = run_info(args.dtype)
    info["model"] = model
    info["base"] = args.base
    info["command"] = " ".join(["python -m benchmarks", *argv])
    print(f"{model}: {info['device']}, {args.dtype}, {torch.get_num_threads()} threads; torch {info['torch']}, "
          f"lyfast {info['lyfast']}, lycoris {info['lycoris']}, peft {info['peft']}, git {info['git_sha']}", flush=True)
    for s in skipped:
        print(f"  skipping provider {s['provider']}: {s['reason']}")
    variants = [(p, s) for s in settings for p in providers if p != "base"]

    start, timings = time.perf_counter(), []
    groups = [(shape, mode) for shape in shapes.values() for mode in modes]
    # timing gets 75% of the time limit, the memory pass (one step per layer) the rest
    end = start + 0.75 * 60 * args.minutes if args.minutes else float("inf")
    for gi, (shape, mode) in enumerate(groups, 1):
        cases = []
        for p, s in variants:
            try:
                cases.append(make_case(shape, p, s, mode, device, dtype, args.base))
            except DoesNotFit as exc:
                if mode == modes[0]:
                    skipped.append({"provider": p, "setting": s, "shape": shape.name, "reason": str(exc)})
        try:
            base = make_case(shape, "base", None, mode, device, dtype, args.base)
        except DoesNotFit as exc:
            if mode == modes[0]:
                skipped.append({"provider": "base", "shape": shape.name, "reason": str(exc)})
            continue
        group_end = time.perf_counter() + (end - time.perf_counter()) / (len(groups) - gi + 1)
        base_t, case_t, ratio = time_group(base, cases, args.budget, 3 if args.quick else 5, group_end)
        row = {"model": model, "shape": shape.name, "tokens": shape.tokens, "model_count": shape.count,
               "mode": mode}
        timings.append({**row, "provider": "base", "setting": None, "algo": None, **_stats(base_t)})
        line = f"base {timings[-1]['median_ms']:.2f} ms;"
        for c, t, r in zip(cases, case_t, ratio):
            timings.append({**row, "provider": c.provider, "setting": c.setting, "algo": SETTINGS[c.setting][0],
                            **_stats(t), "ratio_base": statistics.median(r)})
            line += f" {c.provider}/{c.setting} x{timings[-1]['ratio_base']:.2f}"
        print(f"[{gi}/{len(groups)} {time.perf_counter() - start:4.0f}s] {shape.name} {mode}: {line}", flush=True)
        del cases, base

    memory = []
    if memory_at != "none":
        print(f"memory: one forward+backward per layer at the {memory_at} size", flush=True)
        for shape in shapes.values():
            mshape = at_model_size(shape, model) if memory_at == "model" else shape
            try:
                base = base_memory(mshape, device, dtype, args.base)
            except BaseUnavailable:
                continue   # already listed as skipped
            for p, s in [("base", None), *variants]:
                pin(p)
                try:
                    m = layer_memory(mshape, p, s, device, dtype, base, args.base)
                except ValueError:
                    continue   # setting does not fit the layer; already listed as skipped
                except Exception:
                    if args.base == "bf16":
                        raise
                    continue   # a peer that cannot run on the quantized layer; already listed as skipped
                memory.append({"shape": shape.name, "memory_shape": mshape.name, "provider": p, "setting": s,
                               "algo": SETTINGS[s][0] if s else None, **m})
        print(f"memory done at {time.perf_counter() - start:.0f}s", flush=True)

    unpin()
    info["load_avg_1m_end"] = run_info(args.dtype)["load_avg_1m"]
    paths = write_report(info, {**vars(args), "model": model, "memory_at": memory_at}, timings, memory, skipped,
                         args.out)
    print(f"{model}: total {time.perf_counter() - start:.0f}s; wrote " + ", ".join(paths))


if __name__ == "__main__":
    sys.exit(main())
