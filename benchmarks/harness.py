"""What the pytest-benchmark suite and `python -m benchmarks` share: providers, one timed case, run metadata.

A case is one (shape, provider, setting, mode) with an untimed `setup` and a timed `target`, exactly as fed to
`benchmark.pedantic`: the input requires grad, the base layer is frozen, adapter parameters are random and
non-zero, gradients are cleared in `setup`; on CUDA the target ends with `torch.cuda.synchronize()`.

On CUDA `call` does not time one synchronized call with the host clock: the first H200 run (2026-11-30,
benchmarks/results/nvidia-h200-2026-11-30-gpu-suite.json) measured the frozen 1280×1280 layer at 1,024 tokens
at 0.46 ms that way — the host's setup and synchronization, ~40× the GEMM — so every ratio was ~1. It
enqueues `Case.iters` steps back to back between two CUDA events (the host running ahead of the GPU, as in
training) with `iters` set once so a sample spans >= 2 ms of GPU time, and returns the time per step.
"""
from __future__ import annotations

import datetime
import importlib
import importlib.metadata
import importlib.util
import math
import os
import platform
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from lyfast.peers import adapt, make_input

from .shapes import Shape

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
# lycoris = LyCORIS's default rebuild mode (ΔW built, then one layer call), lycoris-bypass = bypass_mode=True,
# peft = HF PEFT's LoHa/LoKr/BOFT (lyfast.peers.peft_config: same function for LoHa/LoKr, same butterfly for
# BOFT on the input side; DoRA settings do not fit)
PROVIDERS = ("base", "lyfast", "lyfast-triton", "lyfast-cuda", "lycoris", "lycoris-bypass", "lycoris-fused", "peft")
MODES = ("fwd", "bwd", "fwdbwd")
_LYCORIS_ENV = os.environ.get("LYCORIS_KERNEL_BACKEND")


def unavailable(provider: str) -> str | None:
    """Why `provider` cannot run here, or None."""
    if provider == "base":
        return None
    if provider not in PROVIDERS:
        return f"unknown provider {provider!r} (known: {', '.join(PROVIDERS)})"
    family, _, kind = provider.partition("-")
    try:
        importlib.import_module(family)
    except ImportError as exc:
        return f"{family} not importable: {exc}"
    if family == "lyfast" and kind:
        from lyfast.backend import available
        ok, why = available(kind, DEVICE)
        return None if ok else why
    if provider == "lycoris-fused":
        if not CUDA:
            return "lycoris' fused kernels need a CUDA device"
        from lycoris.kernels.dispatch import fused_backends
        if not fused_backends(torch.device("cuda")):
            return "lycoris reports no fused backend (triton/tilelang) on this device"
    return None


def pin(provider: str) -> None:
    """Make `provider`'s backend the active one: lyfast's process-wide request, or lycoris' environment
    variable (read at every call; its torch path for rebuild and bypass mode); PEFT has no backend switch
    (its BOFT block-diagonal route is fixed when the adapter is built, see lyfast.peers._peft_block_diag).
    Cases of several providers are interleaved, so every setup pins."""
    family, _, kind = provider.partition("-")
    if family == "lyfast":
        from lyfast.backend import set_backend
        set_backend(kind or "torch")
    elif family == "lycoris":
        os.environ["LYCORIS_KERNEL_BACKEND"] = "auto" if kind == "fused" else "torch"


def unpin() -> None:
    """Back to the process' own backend settings."""
    if "lyfast.backend" in sys.modules:
        sys.modules["lyfast.backend"].set_backend(None)
    if _LYCORIS_ENV is None:
        os.environ.pop("LYCORIS_KERNEL_BACKEND", None)
    else:
        os.environ["LYCORIS_KERNEL_BACKEND"] = _LYCORIS_ENV


@dataclass
class Case:
    provider: str
    setting: str | None
    mode: str
    setup: Callable[[], tuple | None]   # -> None or ((args), {}) for target
    target: Callable
    step: Callable | None = None        # CUDA: one untimed-setup + target step without a synchronize
    iters: int = 0                      # CUDA: steps per sample (0: not calibrated yet)


class DoesNotFit(Exception):
    """The adapter setting cannot be built for this layer (e.g. a BOFT block size)."""


def make_case(shape: Shape, provider: str, setting: str | None, mode: str, device, dtype,
              quant_base: str = "bf16") -> Case:
    """The case of `provider`'s `setting` adapter (None: the frozen base layer) on `shape` in `mode`, over the
    layer quantized as `quant_base` (`lyfast.quantized`). A provider that cannot run on that quantized layer (or a
    library that cannot quantize here) raises DoesNotFit with the reason."""
    from lyfast.quantized import BaseUnavailable

    pin(provider)
    try:
        layer = shape.layer(device, dtype, quant_base=quant_base)
    except BaseUnavailable as exc:
        raise DoesNotFit(str(exc)) from exc
    if setting is not None:
        try:
            layer, adapter = adapt(layer, provider, setting, copy_layer=False)  # a fresh layer: adapted in place
        except ValueError as exc:
            raise DoesNotFit(f"{setting} does not fit {shape.name}: {exc}") from exc
        params = [*layer.parameters(), *adapter.parameters()]
    else:
        params = [*layer.parameters()]
    x = make_input(layer, shape.input)
    params.append(x)
    if quant_base != "bf16" and setting is not None:
        try:  # a peer that does not handle the quantized layer fails here, not in the middle of the timing
            layer(x).sum().backward()
        except Exception as exc:
            raise DoesNotFit(f"{provider} cannot run on a {quant_base} layer: {type(exc).__name__}: "
                             f"{str(exc).splitlines()[0][:120]}") from exc
    with torch.no_grad():
        dy = torch.randn_like(layer(x))
    cuda = torch.device(device).type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)

    def clear():
        pin(provider)
        for p in params:
            p.grad = None

    # prepare(): the untimed part of a call (bwd: its forward), returning run's arguments; run: the timed part.
    if mode == "fwd":
        prepare, run = (lambda: ()), (lambda: layer(x))
    elif mode == "bwd":
        prepare, run = (lambda: (layer(x),)), (lambda y: y.backward(dy))
    elif mode == "fwdbwd":
        prepare, run = (lambda: ()), (lambda: layer(x).backward(dy))
    else:
        raise ValueError(f"unknown mode {mode!r} (known: {', '.join(MODES)})")

    def setup():
        clear()
        args = prepare()
        sync()
        return args, {}

    def target(*args):
        run(*args)
        sync()

    def step(start=None, end=None):  # CUDA: prepare is enqueued before `start`, so only `run` is timed
        clear()
        args = prepare()
        if start is not None:
            start.record()
        run(*args)
        if end is not None:
            end.record()

    return Case(provider, setting, mode, setup, target, step if cuda else None)


CUDA_SAMPLE_SECONDS = 2e-3  # GPU time per CUDA sample: well above event resolution and launch jitter


def _cuda_steps(case: Case, iters: int) -> float:
    """Seconds of GPU time per step over `iters` steps, each between its own pair of events (so the untimed
    part of a step, e.g. bwd mode's forward, stays out), enqueued without synchronizing in between."""
    pairs = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(iters)]
    torch.cuda.synchronize()
    for start, end in pairs:
        case.step(start, end)
    pairs[-1][1].synchronize()
    return sum(s.elapsed_time(e) for s, e in pairs) / 1e3 / iters


def call(case: Case) -> float:
    """One sample of the case's time per call. CPU: one setup + target timed by the host clock (the span
    benchmark.pedantic times). CUDA: the mean of `case.iters` back-to-back steps timed by CUDA events,
    `iters` fixed at the first call so that a sample spans CUDA_SAMPLE_SECONDS (see the module docstring)."""
    if case.step is not None:
        if not case.iters:
            one = _cuda_steps(case, 3)
            case.iters = max(1, min(1000, math.ceil(CUDA_SAMPLE_SECONDS / max(one, 1e-7))))
        return _cuda_steps(case, case.iters)
    args, kwargs = case.setup() or ((), {})
    t0 = time.perf_counter()
    case.target(*args, **kwargs)
    return time.perf_counter() - t0


# ------------------------------------------------------------------------------------------ metadata
def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def git_sha() -> str:
    root = Path(__file__).resolve().parent.parent
    try:
        sha = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=root, capture_output=True,
                             text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True).stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def device_name() -> str:
    if CUDA:
        return torch.cuda.get_device_name()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"CPU {line.split(':', 1)[1].strip()}"
    except OSError:
        pass
    return f"CPU {platform.processor() or platform.machine()}"


def _load() -> float | None:
    """1-minute load average: on a shared CPU machine, other work skews times (ratios less so)."""
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None


def run_info(dtype: str) -> dict:
    """What every stored number carries: device, dtype, threads, versions, git sha, date."""
    return {"device": device_name(), "cuda": CUDA, "dtype": dtype, "threads": torch.get_num_threads(),
            "torch": torch.__version__, "lycoris": _version("lycoris-lora"), "peft": _version("peft"),
            "lyfast": _version("lyfast"), "diffusers": _version("diffusers"), "git_sha": git_sha(),
            "load_avg_1m": _load(), "routing": _routing(),
            "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds")}


def _routing() -> dict | None:
    """On CUDA, the cost model's efficiencies in force for this device (they chose the LoHa routes timed
    here): `python -m benchmarks.recalibrate` inverts the routes these picked, not today's file's."""
    if not CUDA:
        return None
    from lyfast.kernels import _common

    pk = _common.peaks_for(torch.cuda.get_device_name(), torch.cuda.get_device_capability())
    return {"cublas_efficiency": pk.cublas_efficiency, "tile_vs_cublas": pk.tile_vs_cublas}
