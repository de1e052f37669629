"""Adapters over one quantized frozen layer, per library x algorithm: does it run, its error against an fp64
ΔW reference, what it keeps for backward, its largest new tensor, and its time relative to the quantized
frozen layer alone and to LyCORIS in bypass mode (what LyCORIS runs on quantized layers) on the same layer.

    python -m benchmarks.quantized [--bases int8-torchao,...] [--settings lokr-f-1-r16,...] [--shape 1280x1280]
                                   [--tokens 1024] [--rounds 7] [--json OUT.json] [--md OUT.md]

Times are fwd+bwd medians over rounds interleaved across the providers of one cell (CPU here: the libraries'
CPU kernels, which is not how a GPU ranks them; the ratios to the frozen layer are what carries over).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F

from lyfast.peers import SETTINGS, adapt
from lyfast.profile import large_tensors, step_memory
from lyfast.quantized import BASES, BaseUnavailable, dequantized_weight, quantize_layer

from .harness import run_info

DEFAULT_SETTINGS = ("loha-r16", "lokr-f-1-r16", "lokr-full-f4", "boft-b32")
PROVIDERS = ("lyfast", "lycoris-bypass")


def _quantized(cin, cout, base, seed=0):
    torch.manual_seed(seed)
    layer = nn.Linear(cin, cout)
    return quantize_layer(layer, base).requires_grad_(False)


def _time(fns, rounds):
    """{name: median seconds} of fns (name -> callable), interleaved round by round."""
    samples = {k: [] for k in fns}
    for fn in fns.values():
        fn()  # warm-up
    for _ in range(rounds):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            samples[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in samples.items()}


def _fwdbwd(layer, x, dy):
    def run():
        x.grad = None
        layer(x).backward(dy)
    return run


def cell(base, setting, cin, cout, tokens, rounds):
    """One table row per provider for (base, setting)."""
    algo, _ = SETTINGS[setting]
    try:
        frozen = _quantized(cin, cout, base)
    except BaseUnavailable as e:
        return [dict(base=base, setting=setting, provider=p, works=False, error=str(e)) for p in PROVIDERS]
    x = torch.randn(1, tokens, cin, requires_grad=True)
    dy = torch.randn(1, tokens, cout)
    w_bytes = cin * cout * 4  # W in the compute dtype (fp32 here)
    rows, timed = [], {"frozen": _fwdbwd(frozen, x, dy)}
    base_mem = step_memory(frozen, x)
    half_w = cin * cout // 2
    w_shapes = [(cout, cin), (cin, cout)]
    base_large = large_tensors(frozen, x, half_w, w_shapes).count  # the layer's own (a dequantized W, ...)
    for provider in PROVIDERS:
        row = dict(base=base, setting=setting, provider=provider, layer=type(frozen).__name__)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                adapted, adapter = adapt(_quantized(cin, cout, base), provider, setting, copy_layer=False)
                mem = step_memory(adapted, x, adapter)
                err = _relative_error(adapted, adapter, frozen, x, algo)
                large = large_tensors(adapted, x, half_w, w_shapes)
        except Exception as e:  # a provider that cannot run this layer: recorded, not hidden
            row.update(works=False, error=f"{type(e).__name__}: {str(e).splitlines()[0][:160]}")
            rows.append(row)
            continue
        row.update(works=True, rel_error=err, saved_bytes=mem.saved - base_mem.saved,
                   largest_new_bytes=mem.transient, largest_new_op=mem.transient_op,
                   largest_new_over_w=mem.transient / w_bytes, base_largest_bytes=base_mem.transient,
                   w_sized_beyond_layer=large.count - base_large,
                   w_sized_ops=[op for op in large.ops])
        timed[provider] = _fwdbwd(adapted, x, dy)
        rows.append(row)
    times = _time(timed, rounds)
    for row in rows:
        if row.get("works"):
            t = times[row["provider"]]
            row.update(time_s=t, vs_frozen=t / times["frozen"])
            if "lycoris-bypass" in times:
                row["vs_lycoris_bypass"] = t / times["lycoris-bypass"]
    return rows


def _relative_error(adapted, adapter, frozen, x, algo):
    """max |(adapted − frozen)(x) − ref| / max |ref|, ref = ΔW·x in fp64 over the dequantized weight (BOFT:
    (W' − W)·x), ΔW from the adapter's own parameters through lyfast's fp64 reference."""
    import lyfast

    with torch.no_grad():
        got = (adapted(x) - frozen(x)).double()
        w = dequantized_weight(frozen).double()
        twin = nn.Linear(w.shape[1], w.shape[0], dtype=torch.float64).requires_grad_(False)
        twin.weight.copy_(w)
        cls = {"loha": lyfast.LohaModule, "lokr": lyfast.LokrModule, "boft": lyfast.ButterflyOFTModule}[algo]
        ref = F.linear(x.double(), _twin_module(cls, adapter, twin).delta_weight(1.0))
    return ((got - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item()


def _twin_module(cls, adapter, twin):
    """A lyfast module of `adapter`'s configuration over `twin` (fp64), from the adapter's state dict shapes."""
    name = adapter.lora_name
    sd = {f"{name}.{k}": v.double() for k, v in adapter.state_dict().items()}
    args = cls.extract_state_dict(sd, name)
    return cls.make_module_from_state_dict(name, twin, *args).double()


def markdown(rows):
    lines = ["| base | layer | setting | provider | works | rel. error vs fp64 | saved (MiB) | largest new / W | "
             "W-shaped tensors beyond the layer's own | time vs frozen | time vs LyCORIS bypass |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if not r.get("works"):
            lines.append(f"| {r['base']} | {r.get('layer', '')} | {r['setting']} | {r['provider']} | no: "
                         f"{r.get('error', '')[:90]} | | | | | | |")
            continue
        vs_l = f"{r['vs_lycoris_bypass']:.2f}" if "vs_lycoris_bypass" in r else "n/a"
        lines.append(f"| {r['base']} | {r['layer']} | {r['setting']} | {r['provider']} | yes | {r['rel_error']:.1e} | "
                     f"{r['saved_bytes'] / 2**20:.1f} | {r['largest_new_over_w']:.3f} ({r['largest_new_op']}) | "
                     f"{r['w_sized_beyond_layer']} | {r['vs_frozen']:.2f} | {vs_l} |")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)

    def listed(valid):
        def parse(text):
            items = [t for t in text.split(",") if t]
            bad = [t for t in items if t not in valid]
            if bad or not items:
                raise argparse.ArgumentTypeError(f"{','.join(bad) or text!r}: valid are {', '.join(valid)}")
            return items
        return parse

    def shape(text):
        try:
            cin, cout = (int(v) for v in text.lower().split("x"))
            assert cin > 0 and cout > 0
        except (ValueError, AssertionError):
            raise argparse.ArgumentTypeError(f"{text!r}: expected INxOUT with positive integers, e.g. 1280x1280")
        return cin, cout

    def positive(text):
        if not text.isdigit() or int(text) < 1:
            raise argparse.ArgumentTypeError(f"{text!r}: expected a positive integer")
        return int(text)

    ap.add_argument("--bases", type=listed([b for b in BASES if b != "bf16"]),
                    default=[b for b in BASES if b != "bf16"])
    ap.add_argument("--settings", type=listed(list(SETTINGS)), default=list(DEFAULT_SETTINGS))
    ap.add_argument("--shape", type=shape, default=(1280, 1280), help="INxOUT of the Linear layer")
    ap.add_argument("--tokens", type=positive, default=1024)
    ap.add_argument("--rounds", type=positive, default=7)
    ap.add_argument("--threads", type=positive, default=2)
    ap.add_argument("--json")
    ap.add_argument("--md")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = []
    for base in args.bases:
        for setting in args.settings:
            print(f"{base} {setting} ...", file=sys.stderr, flush=True)
            rows += cell(base, setting, *args.shape, args.tokens, args.rounds)
    table = markdown(rows)
    print(table)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(info=run_info("float32"), shape=list(args.shape), tokens=args.tokens, rows=rows), f,
                      indent=1)
    if args.md:
        with open(args.md, "w") as f:
            f.write(table + "\n")
    return rows


if __name__ == "__main__":
    main()
