"""LoHa's PyTorch-path routes forced one by one against the route `choose_route` picks (issue 15, point 3).

    PYTHONPATH=. python -m benchmarks.loha_route_check [--reps 5] [--shapes sdxl-lin-1280,sdxl-conv3-640,...]

fp32, torch threads = 2, input requiring grad, frozen base layer, forward+backward. For every (layer,
rank) the frozen layer, lyfast with route "khatri_rao", lyfast with route "rowblock" and LyCORIS in
bypass mode are timed interleaved (`issue15_table.time_interleaved`); each is reported as its fastest round
over the frozen layer's fastest, beside the route "auto" would take.
"""
from __future__ import annotations

import argparse
import copy

import torch
import torch.nn as nn

from lyfast.functional.general import LayerSpec
from lyfast.functional.loha import choose_route
from lyfast.peers import adapt, make_input

from . import issue15_table

SHAPES = {
    **issue15_table.SHAPES,  # SDXL 1280² and 640→5120 at 1,024 tokens, conv3×3 640 at 2×16², DiT 3072²
    "sdxl-lin-2048-1280-77": (lambda: nn.Linear(2048, 1280), (2, 77, 2048)),
    "sdxl-conv3-1280": (lambda: nn.Conv2d(1280, 1280, 3, padding=1), (2, 1280, 8, 8)),
    "sdxl-conv3-320-64": (lambda: nn.Conv2d(320, 320, 3, padding=1), (1, 320, 64, 64)),
}
RANKS = (8, 16, 32)


def check(name: str, rank: int, reps: int) -> dict:
    make, shape = SHAPES[name]
    torch.manual_seed(0)
    layer = make().requires_grad_(False)
    cases = {"base": copy.deepcopy(layer)}
    for route in ("khatri_rao", "rowblock"):
        cases[route], adapter = adapt(layer, "lyfast", f"loha-r{rank}")
        adapter.route = route
    cases["lycoris-bypass"], _ = adapt(layer, "lycoris-bypass", f"loha-r{rank}")
    x = make_input(layer, shape)
    with torch.no_grad():
        dy = torch.randn_like(layer(x))
    best = {key: min(t) for key, t in issue15_table.time_interleaved(cases, x, dy, reps).items()}
    tokens = x.numel() // (x.shape[1] if x.dim() == 4 else x.shape[-1])
    auto = choose_route(LayerSpec.from_module(layer), rank, rank, tokens)
    return {"base_ms": best["base"] * 1e3, **{k: best[k] / best["base"] for k in cases if k != "base"}, "auto": auto}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--shapes", default=",".join(SHAPES))
    args = ap.parse_args(argv)
    torch.set_num_threads(2)
    print(f"{'layer':22s} rank  base ms  khatri_rao  rowblock  lycoris-bypass  auto")
    for name in args.shapes.split(","):
        for rank in RANKS:
            r = check(name, rank, args.reps)
            faster = "khatri_rao" if r["khatri_rao"] <= r["rowblock"] else "rowblock"
            mark = "" if r["auto"] == faster else "  (auto not the faster)"
            print(f"{name:22s} r{rank:<3d} {r['base_ms']:8.1f} {r['khatri_rao']:10.2f}x {r['rowblock']:8.2f}x "
                  f"{r['lycoris-bypass']:14.2f}x  {r['auto']}{mark}", flush=True)


if __name__ == "__main__":
    main()
