"""Issue 15's table: the PyTorch path against the frozen layer and the faster LyCORIS mode.

    PYTHONPATH=. python -m benchmarks.issue15_table [--reps 7] [--shapes ...] [--settings ...]

fp32, torch threads = 2, input requiring grad, frozen base layer, forward+backward. For each (layer,
setting) the four providers — frozen layer, lyfast, LyCORIS rebuild (its default training mode) and
LyCORIS bypass_mode=True — are timed interleaved, one call of each per round in a rotating order, so
that load from other processes on a shared machine hits all of them alike; each ratio is the median
over rounds of the per-round ratio. "vs lycoris" is against whichever LyCORIS mode has the lower
median time on that case. Beside them, "min×base" and "min/lyco" are the same ratios of each
provider's fastest round: on a machine shared with other jobs, the median still carries scheduling
stalls (a 2-thread op waits for its slower thread), the minimum is the least disturbed sample.
"""
from __future__ import annotations

import argparse
import copy
import math
import statistics
import time

import torch
import torch.nn as nn

SHAPES = {
    "sdxl-lin-1280": (lambda: nn.Linear(1280, 1280), (1, 1024, 1280)),
    "sdxl-lin-640-5120": (lambda: nn.Linear(640, 5120), (1, 1024, 640)),
    "sdxl-conv3-640": (lambda: nn.Conv2d(640, 640, 3, padding=1), (2, 640, 16, 16)),
    "dit-lin-3072": (lambda: nn.Linear(3072, 3072), (1, 1024, 3072)),
}
SETTINGS = {
    "loha-r8": ("loha", "LohaModule", dict(lora_dim=8, alpha=8)),
    "loha-r16": ("loha", "LohaModule", dict(lora_dim=16, alpha=16)),
    "loha-r32": ("loha", "LohaModule", dict(lora_dim=32, alpha=32)),
    "lokr-f-1-r16": ("lokr", "LokrModule", dict(lora_dim=16, alpha=16, factor=-1)),
    "lokr-full-f8": ("lokr", "LokrModule", dict(lora_dim=100000, alpha=1, factor=8)),
    "boft-b32": ("boft", "ButterflyOFTModule", dict(lora_dim=32, alpha=1)),
}
PROVIDERS = ("base", "lyfast", "lycoris-rebuild", "lycoris-bypass")
BEFORE = "lyfast-before"  # with --before DIR: DIR/lyfast_before, an older copy of the package, timed alongside


@torch.no_grad()
def _adapt(layer, provider, setting, seed=0):
    layer = copy.deepcopy(layer)
    if provider == "base":
        return layer
    mod, cls, kw = SETTINGS[setting]
    kw = dict(kw)
    if provider in ("lyfast", BEFORE):
        import importlib

        klass = getattr(importlib.import_module(provider.replace("-", "_")), cls)
    else:
        import importlib

        klass = getattr(importlib.import_module(f"lycoris.modules.{mod}"), cls)
        kw["bypass_mode"] = provider == "lycoris-bypass"
    args = [f"t_{setting}", layer, 1.0, kw.pop("lora_dim"), kw.pop("alpha"), 0.0, 0.0, 0.0, False]
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        adapter = klass(*args, **kw)
    gen = torch.Generator().manual_seed(seed)
    for p in adapter.parameters():
        p.copy_(torch.randn(p.shape, generator=gen) * (0.02 if mod == "boft" else 0.1))
    adapter.apply_to()
    layer._adapter = adapter  # keep it alive
    return layer


def time_interleaved(layers: dict, x: torch.Tensor, dy: torch.Tensor, reps: int) -> dict[str, list[float]]:
    """Seconds of `reps` forward+backward calls of each of `layers` (name -> module) on x, dy: one warm-up
    call each, then rounds of one call each in an order rotated every round."""
    names = list(layers)

    def once(layer):
        for p in layer.parameters():
            p.grad = None
        x.grad = None
        t0 = time.perf_counter()
        layer(x).backward(dy)
        return time.perf_counter() - t0

    for name in names:  # warm-up
        once(layers[name])
    times = {name: [] for name in names}
    for i in range(reps):
        for name in names[i % len(names):] + names[: i % len(names)]:
            times[name].append(once(layers[name]))
    return times


def measure(shape: str, setting: str, reps: int, providers=PROVIDERS) -> dict:
    make, in_shape = SHAPES[shape]
    torch.manual_seed(0)
    base = make().requires_grad_(False)
    layers = {p: _adapt(base, p, setting) for p in providers}
    x = torch.randn(in_shape).requires_grad_(True)
    with torch.no_grad():
        dy = torch.randn_like(base(x))

    times = time_interleaved(layers, x, dy, reps)
    med = {p: statistics.median(t) for p, t in times.items()}
    faster = min(("lycoris-rebuild", "lycoris-bypass"), key=med.get)
    ratio = lambda a, b: statistics.median(x / y for x, y in zip(times[a], times[b]))  # noqa: E731
    return dict(
        shape=shape, setting=setting, base_ms=med["base"] * 1e3, lyfast_ms=med["lyfast"] * 1e3,
        vs_base=ratio("lyfast", "base"), vs_lyco=ratio("lyfast", faster), faster=faster.split("-")[1],
        rebuild_vs_base=ratio("lycoris-rebuild", "base"), bypass_vs_base=ratio("lycoris-bypass", "base"),
        min_vs_base=min(times["lyfast"]) / min(times["base"]),
        min_vs_lyco=min(times["lyfast"]) / min(min(times["lycoris-rebuild"]), min(times["lycoris-bypass"])),
        **({"vs_before": ratio("lyfast", BEFORE), "min_vs_before": min(times["lyfast"]) / min(times[BEFORE])}
           if BEFORE in times else {}),
    )


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--shapes", default=",".join(SHAPES))
    ap.add_argument("--settings", default="loha-r8,lokr-f-1-r16,lokr-full-f8,boft-b32")
    ap.add_argument("--before", default=None, help="directory holding lyfast_before (an older lyfast, renamed)")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    providers = PROVIDERS
    if a.before:
        import sys

        sys.path.insert(0, a.before)
        providers = PROVIDERS + (BEFORE,)
    rows = []
    print(f"{'layer':18} {'setting':13} {'base ms':>8} {'lyfast ms':>9} {'×base':>6} {'/lyco':>6} "
          f"{'(mode)':8} {'rebuild×':>8} {'bypass×':>8} {'min×base':>8} {'min/lyco':>8}", flush=True)
    for s in a.shapes.split(","):
        for st in a.settings.split(","):
            r = measure(s, st, a.reps, providers)
            rows.append(r)
            print(f"{s:18} {st:13} {r['base_ms']:8.1f} {r['lyfast_ms']:9.1f} {r['vs_base']:6.2f} "
                  f"{r['vs_lyco']:6.2f} {r['faster']:8} {r['rebuild_vs_base']:8.2f} {r['bypass_vs_base']:8.2f} "
                  f"{r['min_vs_base']:8.2f} {r['min_vs_lyco']:8.2f}"
                  + (f"  new/before {r['vs_before']:.2f} (min {r['min_vs_before']:.2f})" if "vs_before" in r else ""),
                  flush=True)
    geo = lambda k: math.exp(statistics.fmean(math.log(r[k]) for r in rows))  # noqa: E731
    print(f"geomean ×base {geo('vs_base'):.2f}  /lycoris {geo('vs_lyco'):.2f}   "
          f"(minima: ×base {geo('min_vs_base'):.2f}  /lycoris {geo('min_vs_lyco'):.2f})")
    return rows


if __name__ == "__main__":
    main()
