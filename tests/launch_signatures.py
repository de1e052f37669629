"""The Triton launches lyfast's modules make on SDXL and DiT layers, recorded without a GPU, and their
ahead-of-time compiles exactly as a launch on sm_80 / sm_90 would compile them.

Recording (`record`): LoKr, LoHa and BOFT modules wrap Linear layers of the SDXL UNet's and of a DiT's
shapes and run forward and backward on the Triton backend, in bf16, fp16, fp32 and bf16 autocast over
fp32 weights, over every flag a launch sees (bias or none; which of input, adapter and base weight want
gradients; rescale on or off and trainable or frozen; each LoHa route and rank class; LoKr factor
shapes; batch 1 and 2, so one-token and 77-token layers meet both "equal to 1" and "not a multiple of
16"). The tensors are FakeTensors (shapes, strides and storage offsets, no data: the 10240-wide layers
cost nothing) and the lyfast custom ops run their real host code on them, down to each kernel's
`run`, which here records (kernel, arguments, options, grid) instead of launching. Launch sizing sees a
132-SM GPU (H100 / H200): `_common.launch_sms` is the one place it asks.

Compiling (`compile_report`): each recorded launch is specialized by Triton's own launch path for each
target (`_common.launch_specialization`); launches with one key share a binary, so each distinct key
is compiled once (`_common.compile_specialization`), in parallel. The recorded launches give some 700
distinct variants per target (dimensions and strides take every class across shapes and factor
layouts); the CI compiles a cover of them (`cover`: every kernel config and every class each argument
takes, ~60 per target), a full run all of them.

Commands (the repository root as working directory):
  python tests/launch_signatures.py --out R.json [--all] [--time-compiles]
      record, specialize and compile (the CI's cover of the variants, or --all of them) under the
      importable Triton; benchmarks/results/triton_aot_resources_triton<version>.json are written with
      --time-compiles (an empty Triton cache: compile_s is a real compile's time)
  python tests/launch_signatures.py --route-table docs/loha_routes.md
tests/test_triton_aot.py runs the first under the installed Triton and, in a subprocess, under Triton 3.6.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import dataclasses
import datetime
import importlib
import itertools
import json
import multiprocessing
import os
import sys
import warnings

import torch
import torch.nn as nn

if __package__ in (None, ""):  # run as a script: the repository root on the path
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import lyfast  # noqa: E402
from lyfast.kernels import _common  # noqa: E402

KERNEL_MODULES = ("lokr", "loha", "boft")
CCS = (80, 90)
GPU_SMS = 132  # H100 SXM / H200: what launch sizing sees while recording

# (in, out, tokens per sample, bias): every distinct Linear of the SDXL UNet at 1024² (from
# benchmarks.shapes.unet_shapes(), checked by tests/test_triton_aot.py), then a DiT (SD3/Flux-like) block
# at 4096 image tokens: attention 3072², MLP 3072→12288→3072, a 2048-wide block, and the adaLN
# modulation layer (one token per sample).
SDXL_LINEARS = (
    (1280, 1280, 1024, False), (2048, 1280, 77, False), (640, 640, 4096, False), (1280, 10240, 1024, True),
    (5120, 1280, 1024, True), (2048, 640, 77, False), (640, 5120, 4096, True), (2560, 640, 4096, True),
    (1280, 1280, 1, True), (1280, 320, 1, True), (1280, 640, 1, True), (320, 1280, 1, True),
    (2816, 1280, 1, True),
)
DIT_LINEARS = (
    (3072, 3072, 4096, True), (3072, 12288, 4096, True), (12288, 3072, 4096, True),
    (2048, 2048, 4096, True), (2048, 8192, 4096, True), (3072, 18432, 1, True),
)
LINEARS = SDXL_LINEARS + DIT_LINEARS

# Precision modes: (parameter dtype, autocast dtype or None).
PRECISIONS = {
    "bf16": (torch.bfloat16, None), "fp16": (torch.float16, None), "fp32": (torch.float32, None),
    "autocast-bf16": (torch.float32, torch.bfloat16),
}
# Who wants gradients: the layer input, the adapter's parameters, the frozen layer's weight.
GRADS = tuple(g for g in itertools.product((True, False), repeat=3) if any(g))

# Adapter configurations (module class name, kwargs, LoHa route).
ADAPTERS = (
    *(("LokrModule", dict(lora_dim=r, factor=f, **extra), None)
      for f in (-1, 4, 8, 16) for r, extra in ((8, {}), (4, dict(decompose_both=True)), (1, dict(full_matrix=True)))),
    ("LokrModule", dict(lora_dim=8, factor=-1, rank_dropout=0.1), None),
    *(("LohaModule", dict(lora_dim=r), route) for r in (4, 8, 16, 32, 64) for route in ("auto", "tile", "khatri_rao")),
    ("LohaModule", dict(lora_dim=8, rank_dropout=0.1), "auto"),
    *(("ButterflyOFTModule", dict(lora_dim=b, rescaled=s), None) for b in (8, 16, 32, 64) for s in (False, True)),
)
DEFAULT_ADAPTERS = (
    ("LokrModule", dict(lora_dim=8, factor=-1), None),
    ("LohaModule", dict(lora_dim=8), "tile"),
    ("LohaModule", dict(lora_dim=8), "khatri_rao"),
    ("ButterflyOFTModule", dict(lora_dim=32, rescaled=True), None),
)


@dataclasses.dataclass
class Launch:
    kernel: str  # "module.attribute" under lyfast.kernels
    args: tuple  # tensors as _common.DevicePointer
    kwargs: dict
    grid: tuple
    case: str


def kernel_object(name: str):
    module, attr = name.split(".")
    return getattr(importlib.import_module(f"lyfast.kernels.{module}"), attr)


def _kernel_names(helpers: bool = True) -> dict:
    """id → "module.attribute" of the @jit functions of the kernel modules; without `helpers` only the
    launched ones (named *_kernel, the kernels' convention; the others are called inside kernels)."""
    names = {}
    for module in KERNEL_MODULES:
        mod = importlib.import_module(f"lyfast.kernels.{module}")
        for attr, value in vars(mod).items():
            if isinstance(value, _common._DualJIT) and (helpers or attr.endswith("_kernel")):
                names[id(value)] = f"{module}.{attr}"
    return names


@contextlib.contextmanager
def _recording(launches: list, case: list):
    """Kernel `run` records instead of launching; the lyfast custom ops run their real (launching) code
    on FakeTensors in place of their fake kernels; launch sizing sees a GPU_SMS-SM device; the Triton
    backend may take CPU tensors (TRITON_INTERPRET=1, as lyfast.backend documents)."""
    from torch._library.custom_ops import CustomOpDef

    names = _kernel_names()
    ops = [v for m in KERNEL_MODULES for v in vars(importlib.import_module(f"lyfast.kernels.{m}")).values()
           if isinstance(v, CustomOpDef)]

    def record(self, *args, grid, warmup, **kwargs):
        ptrs = tuple(_common.DevicePointer.of(a) if isinstance(a, torch.Tensor) else a for a in args)
        launches.append(Launch(names[id(self)], ptrs, dict(kwargs), tuple(grid), case[0]))

    sizing = [(m, importlib.import_module(f"lyfast.kernels.{m}")) for m in ("_common",) + KERNEL_MODULES]
    saved_sizing = [(mod, mod.launch_sms) for _, mod in sizing if hasattr(mod, "launch_sms")]
    saved_fakes = [(op, op._abstract_fn) for op in ops]
    saved_run = _common._DualJIT.run
    saved_env = os.environ.get("TRITON_INTERPRET")
    previous = lyfast.set_backend("triton")
    try:
        _common._DualJIT.run = record
        for op in ops:
            op._abstract_fn = op._init_fn
        for mod, _ in saved_sizing:
            mod.launch_sms = lambda device: GPU_SMS
        os.environ["TRITON_INTERPRET"] = "1"
        yield
    finally:
        _common._DualJIT.run = saved_run
        for op, fn in saved_fakes:
            op._abstract_fn = fn
        for mod, fn in saved_sizing:
            mod.launch_sms = fn
        if saved_env is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = saved_env
        lyfast.set_backend(previous)


def _drive(mode, cls_name, kwargs, route, linear, precision, grads, batch):
    """One adapted layer forward and backward on FakeTensors."""
    cin, cout, tokens, bias = linear
    dtype, autocast = PRECISIONS[precision]
    want_x, want_adapter, want_w = grads
    layer = nn.Linear(cin, cout, bias=bias, device="meta", dtype=dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # LoKr's "using full matrix mode"
        adapter = getattr(lyfast, cls_name)("layer", layer, **kwargs).to(dtype=dtype)
    if route is not None:
        adapter.route = route
    with mode:
        layer.to_empty(device="cpu")
        adapter.to_empty(device="cpu")
        adapter.apply_to()
        adapter.train()
        layer.requires_grad_(False)
        layer.weight.requires_grad_(want_w)
        for p in adapter.parameters():
            p.requires_grad_(want_adapter)
        shape = (batch, cin) if tokens == 1 else (batch, tokens, cin)
        x = torch.empty(shape, dtype=dtype, requires_grad=want_x)
        with torch.autocast("cpu", dtype=autocast or torch.bfloat16, enabled=autocast is not None):
            y = layer(x)
        y.backward(torch.empty_like(y))


def cases():
    """(adapter, linear, precision, grads, batch) of every recorded configuration.

    * shapes: every layer shape in bf16, fp16 and fp32 with the usual gradients (input and adapter), for
      the default adapter of each algorithm and LoHa route; in bf16 also at batch 2 where a sample has 1
      or 77 tokens (the token count then changes class: 1 / not a multiple of 16 / a multiple of 16);
    * flags: on one layer of each token class, every adapter configuration in bf16 and fp32, and every
      other gradient combination for the default adapters, in bf16, fp32 and bf16 autocast."""
    for adapter, linear, precision in itertools.product(DEFAULT_ADAPTERS, LINEARS, ("bf16", "fp16", "fp32")):
        for batch in (1, 2) if linear[2] in (1, 77) and precision == "bf16" else (1,):
            yield adapter, linear, precision, (True, True, False), batch
    classes = [(1280, 1280, 1, True), (2048, 1280, 77, False), (1280, 10240, 1024, True)]
    for adapter, linear, precision in itertools.product(ADAPTERS, classes, ("bf16", "fp32")):
        yield adapter, linear, precision, (True, True, False), 1
    for adapter, linear, precision, grads in itertools.product(DEFAULT_ADAPTERS, classes,
                                                               ("bf16", "fp32", "autocast-bf16"), GRADS):
        if grads != (True, True, False) or precision == "autocast-bf16":
            yield adapter, linear, precision, grads, 1


def record() -> list[Launch]:
    """Every launch of `cases()`. A configuration the module rejects (BOFT block sizes that do not
    divide a width) is skipped, as a user could not build it either."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    launches, case = [], [""]
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    with _recording(launches, case):
        for (cls_name, kwargs, route), linear, precision, grads, batch in cases():
            case[0] = (f"{cls_name}({', '.join(f'{k}={v}' for k, v in kwargs.items())}"
                       f"{', route=' + route if route else ''}) on Linear({linear[0]}, {linear[1]}, "
                       f"bias={linear[3]}) x{batch * linear[2]} tokens, {precision}, grads(x, adapter, W)={grads}")
            try:
                _drive(mode, cls_name, kwargs, route, linear, precision, grads, batch)
            except ValueError as exc:
                if "BOFT cannot split" not in str(exc):
                    raise
    return launches


def specialize(launches: list[Launch], ccs=CCS) -> list[dict]:
    """One entry per distinct (kernel, target, Triton key): the specialization data to compile, how many
    recorded launches share it and one of them as an example."""
    out: dict = {}
    same: dict = {}  # identical arguments specialize identically: Triton's binder runs once per distinct call
    for launch in launches:
        kernel = kernel_object(launch.kernel)
        call = (launch.kernel, repr(launch.args), repr(sorted(launch.kwargs.items())))
        for cc in ccs:
            if (call, cc) not in same:
                same[call, cc] = _common.launch_specialization(kernel, launch.args, launch.kwargs, cc)
            key, data = same[call, cc]
            entry = out.setdefault((launch.kernel, cc, key), dict(kernel=launch.kernel, cc=cc, data=data, launches=0,
                                                                  example=launch.case, grid=list(launch.grid)))
            entry["launches"] += 1
    return list(out.values())


def _compile_one(entry: dict) -> dict:
    kernel = kernel_object(entry["kernel"])
    spec = json.loads(entry["data"])
    consts = {k[0] if len(k) == 1 else tuple(k): v for k, v in zip(spec["constant_keys"], spec["constant_vals"])}
    names = list(kernel.arg_names)
    signature = {n: (consts.get(names.index(n), consts.get(n)) if t == "constexpr" else t)
                 for n, t in spec["signature"].items()}
    divisible = [names[k[0]] for k, v in zip(spec["attrs_keys"], spec["attrs_vals"])
                 if any(a[0] == "tt.divisibility" for a in v)]
    row = dict(kernel=entry["kernel"], cc=entry["cc"], launches=entry["launches"], example=entry["example"],
               grid=entry["grid"], signature=signature, divisible_by_16=divisible, error=None)
    try:
        row |= _common.compile_specialization(kernel, entry["data"], entry["cc"])
    except Exception as exc:  # reported, not raised: the caller lists every failure at once
        row["error"] = f"{type(exc).__name__}: {str(exc).strip().splitlines()[-1] if str(exc).strip() else ''}"
        row["error_detail"] = str(exc)[-2000:]
    return row


def compile_report(entries: list[dict], workers: int = 2) -> list[dict]:
    if workers <= 1:
        return [_compile_one(e) for e in entries]
    ctx = multiprocessing.get_context("fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn")
    with concurrent.futures.ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as pool:
        return list(pool.map(_compile_one, entries))


def _features(entry: dict) -> set:
    """What a compile of `entry` exercises: its kernel config (constexpr parameters, options and the
    pointers' element types: fp16 is another mma than bf16) and, for each runtime argument, the class a
    launch gave it (constant 1, divisible by 16, neither)."""
    kernel = kernel_object(entry["kernel"])
    names = list(kernel.arg_names)
    spec = json.loads(entry["data"])
    consts = {names[k[0]]: v for k, v in zip(spec["constant_keys"], spec["constant_vals"])}
    divisible = {names[k[0]] for k, v in zip(spec["attrs_keys"], spec["attrs_vals"]) if v}
    declared = {n for n, p in zip(names, kernel.params) if p.is_constexpr}
    pointers = [t for t in spec["signature"].values() if isinstance(t, str) and t.startswith("*")]
    config = json.dumps([{n: consts[n] for n in sorted(declared)}, spec["options"].get("num_warps"),
                         spec["options"].get("num_stages"), pointers], sort_keys=True, default=str)
    out = {(entry["kernel"], entry["cc"], "config", config)}
    for n in names:
        if n not in declared:
            out.add((entry["kernel"], entry["cc"], n, "1" if n in consts else "D" if n in divisible else "-"))
    return out


def cover(entries: list[dict]) -> list[dict]:
    """A subset of `entries` (greedy set cover, deterministic) that still compiles every kernel config
    and every class each runtime argument takes in them: the CI's share of the full report."""
    feats = [_features(e) for e in entries]
    need = set().union(*feats) if feats else set()
    chosen = []
    while need:
        best = max(range(len(entries)), key=lambda i: (len(feats[i] & need), -i))
        chosen.append(best)
        need -= feats[best]
    return [entries[i] for i in sorted(chosen)]


def dump_launches(launches: list[Launch], path: str) -> None:
    def enc(v):
        if isinstance(v, _common.DevicePointer):
            return {"pointer": str(v.dtype).removeprefix("torch."), "offset": v.offset}
        return v

    with open(path, "w") as f:
        json.dump([dict(kernel=la.kernel, args=[enc(a) for a in la.args], kwargs=la.kwargs, grid=list(la.grid),
                        case=la.case) for la in launches], f)


def load_launches(path: str) -> list[Launch]:
    def dec(v):
        if isinstance(v, dict) and "pointer" in v:
            return _common.DevicePointer(getattr(torch, v["pointer"]), v["offset"])
        return v

    with open(path) as f:
        return [Launch(d["kernel"], tuple(dec(a) for a in d["args"]), d["kwargs"], tuple(d["grid"]), d["case"])
                for d in json.load(f)]


def report(launches: list[Launch], ccs=CCS, workers: int = 2, everything: bool = False) -> dict:
    """Specialize `launches` for `ccs` and compile each distinct variant (`everything`) or their cover."""
    import triton

    entries = specialize(launches, ccs)
    chosen = entries if everything else cover(entries)
    rows = compile_report(chosen, workers)
    return dict(device="none: ahead-of-time compilation of recorded launches (ptxas)", ccs=list(ccs),
                triton=triton.__version__, torch=torch.__version__, date=datetime.date.today().isoformat(),
                recorded_launches=len(launches), variants=len(entries),
                compiled="every variant" if everything else "a cover of the variants (see `cover`)", compiles=rows)


# Spills known and left for now, by kernel, each with its reason (measured on the cover of the variants).
KNOWN_SPILLS: dict = {}  # none: the BOFT phase backward's (8-40 B on sm_90) were removed 2026-11-30, see kernels/boft.py


def failures(rep: dict, known_spills: dict = KNOWN_SPILLS) -> list[str]:
    """Compile errors, shared memory above the block limit, and register spills of kernels not in
    `known_spills`."""
    out = []
    for r in rep["compiles"]:
        where = f"{r['kernel']} sm_{r['cc']} [{r['example']}]"
        known = r["kernel"] in known_spills
        if r["error"]:
            out.append(f"{where}: {r['error']}")
        elif r["shared"] > r["limit"]:
            out.append(f"{where}: {r['shared']} B shared > {r['limit']} B")
        elif r["stack"] and not known:
            out.append(f"{where}: {r['stack']} B stack per thread (spills)")
    return out


ROUTE_DEVICES = ("NVIDIA H100 80GB HBM3", "NVIDIA H200", "NVIDIA A100-SXM4-80GB", "NVIDIA L40S")


def route_doc() -> str:
    """docs/loha_routes.md: LoHa's Triton route per SDXL and DiT layer (`lyfast.kernels.loha.route_table`)."""
    from lyfast.kernels import loha

    layers = [(cin, cout, batch * tokens) for cin, cout, tokens, _ in LINEARS for batch in (1, 8)]
    out = [
        "# LoHa routes on the Triton backend (SDXL and DiT Linear layers)",
        "",
        "Generated by `python tests/launch_signatures.py --route-table docs/loha_routes.md` (a test checks it",
        "is current). `lyfast.kernels.loha.choose_route` picks, per layer, the cheaper of route (a) (cuBLAS",
        "base GEMMs + the Khatri-Rao kernels) and the tile route (one GEMM generating ΔW tile by tile) in a",
        "roofline model of training (forward + backward with dx, bf16): datasheet peaks per exact device",
        "name (`_common.PEAKS`), cuBLAS at a share of the tensor-core peak and lyfast's Triton kernels at a",
        f"share of cuBLAS's rate (stated per device below), every kernel at {_common.BANDWIDTH_EFFICIENCY:.0%} of the "
        "bandwidth, launch costs",
        "hidden unless a kernel's work is shorter than issuing it. Efficiencies not fitted to a GPU benchmark",
        "(`python -m benchmarks.recalibrate`, kernels/calibration.json) are assumed: a GPU session's benchmark",
        "must confirm those choices before they are trusted.",
        "",
        "Each cell: the route, and in parentheses the modelled time of the tile route over route (a)'s.",
        "Route (a) is refused where F and K would reach the weight's size (r² >= min(in, out)): \"tile\";",
        f"ranks above the tile kernel's {loha.TILE_MAX_RANK} take route (a) where it is allowed (its PyTorch form",
        "above the Khatri-Rao kernels' R = 128), else the PyTorch \"rowblock\" route. Tokens: SDXL at 1024²",
        "and a DiT at 4096 image tokens, batch 1 and 8.",
        "",
    ]
    for name in ROUTE_DEVICES:
        pk = _common.PEAKS[name]
        where = f"fitted to {pk.calibrated_from}" if pk.calibrated_from else "assumed"
        out += [f"## {name}", "", f"cuBLAS at {pk.cublas_efficiency:.0%} of the tensor-core peak, Triton kernels at "
                f"{pk.tile_vs_cublas:.0%} of cuBLAS ({where}).", "", loha.route_table(layers, peaks=pk), ""]
    return "\n".join(out)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="report JSON to write")
    parser.add_argument("--route-table", help="write docs/loha_routes.md here instead of compiling")
    parser.add_argument("--launches", help="recorded launches (JSON from --save-launches) instead of recording")
    parser.add_argument("--save-launches", help="also write the recorded launches here")
    parser.add_argument("--all", action="store_true", help="compile every variant, not the CI's cover")
    parser.add_argument("--cc", type=int, nargs="+", default=list(CCS))
    parser.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1))
    parser.add_argument("--time-compiles", action="store_true",
                        help="compile into an empty Triton cache, so that compile_s times real compiles")
    args = parser.parse_args(argv)
    if args.route_table:
        with open(args.route_table, "w") as f:
            f.write(route_doc())
        return 0
    if not args.out:
        parser.error("--out is required unless --route-table is given")
    torch.set_num_threads(1)
    launches = load_launches(args.launches) if args.launches else record()
    if args.save_launches:
        dump_launches(launches, args.save_launches)
    if args.time_compiles:
        import tempfile

        os.environ["TRITON_CACHE_DIR"] = tempfile.mkdtemp(prefix="lyfast-aot-cache-")
    rep = report(launches, tuple(args.cc), args.workers, args.all)
    with open(args.out, "w") as f:
        json.dump(rep, f, indent=1)
    bad = failures(rep)
    print(f"triton {rep['triton']}: {rep['recorded_launches']} launches, {rep['variants']} variants, "
          f"{len(rep['compiles'])} compiled, {len(bad)} failures -> {args.out}")
    for line in bad:
        print("  " + line)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
