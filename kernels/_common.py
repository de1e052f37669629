"""Shared pieces of the Triton kernels: the `jit` decorator, dtype/precision helpers, launch sizing and
ahead-of-time compilation.

`jit` makes a kernel that runs compiled on CUDA tensors and in Triton's interpreter on CPU tensors,
whatever TRITON_INTERPRET said when the module was imported. (`triton.jit` fixes the mode at decoration
time; that would make `import lyfast.kernels` order-dependent for the CPU tests and would leave no
compilable kernel object for the AOT check in the same process.) Which device may run is decided by
`lyfast.backend`, not here.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import threading
import os
import re
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import triton
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction
from triton.runtime.jit import JITFunction

TORCH_TO_TL = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}
SUPPORTED_DTYPES = tuple(TORCH_TO_TL)


_INTERPRETED: dict[int, InterpretedFunction] = {}
_interp_lock = threading.RLock()


def _interpreted(fn: JITFunction) -> InterpretedFunction:
    it = _INTERPRETED.get(id(fn))
    if it is None:
        it = _INTERPRETED[id(fn)] = InterpretedFunction(fn.fn)
    return it


@contextlib.contextmanager
def _interpreting():
    """While an interpreted launch runs, a call to any JITFunction (tl.zeros, tl.sum's combine function,
    our helpers) runs it in the interpreter. Outside, JITFunction.__call__ keeps Triton's behaviour (it
    only ever raises "cannot call @triton.jit'd outside of the scope of a kernel"), and compilation never
    calls it, so the compiled path is untouched. Needed because `triton.language`'s own @jit helpers are
    fixed to compiled mode when triton was imported without TRITON_INTERPRET=1."""
    from triton.runtime import interpreter

    builder = interpreter.interpreter_builder
    with _interp_lock:
        original = JITFunction.__call__
        patch_tensor = interpreter._patch_lang_tensor
        JITFunction.__call__ = _device_call
        builder.create_dot = functools.partial(_bf16_safe_dot, builder.create_dot)
        interpreter._patch_lang_tensor = functools.partial(_patch_index, patch_tensor)
        try:
            yield
        finally:
            JITFunction.__call__ = original
            del builder.create_dot  # back to the class's method
            interpreter._patch_lang_tensor = patch_tensor


def _device_call(fn: JITFunction, *args, **kwargs):
    """A @jit helper called inside an interpreted kernel. Like InterpretedFunction.__call__, but the
    interpreter's patches of triton.language for the helper's module are undone on return (Triton's own
    call leaves them in place, which is harmless in an interpret-only process and breaks compiling
    kernels later in this one)."""
    from triton.runtime import interpreter

    scope = interpreter._patch_lang(fn.fn)
    try:
        return _interpreted(fn).rewrite()(*args, **kwargs)
    finally:
        scope.restore()


def _patch_index(patch_tensor, tensor, scope):
    """Triton 3.6's interpreter turns a scalar argument into a 1-element array and calls int() on it in
    `range(0, N, B)`, which numpy >= 2.? rejects ("only 0-dimensional arrays can be converted"); 3.9
    squeezes first. Same fix here (the scope restores both patches in reverse order)."""
    patch_tensor(tensor, scope)
    scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))


def _bf16_safe_dot(create_dot, a, b, d, *args):
    """The interpreter keeps bf16 as raw uint16 and multiplies those bits in tl.dot (Triton 3.9); widen
    bf16 operands to fp32 first, which is exact and is what a tensor-core bf16 dot computes."""
    from triton.runtime.interpreter import TensorHandle

    def widen(h):
        if h.dtype.scalar == tl.bfloat16:
            import numpy as np

            return TensorHandle((h.data.astype(np.uint32) << 16).view(np.float32), tl.float32)
        return h

    return create_dot(widen(a), widen(b), d, *args)


class _DualJIT(JITFunction):
    """A JITFunction that launches through Triton's interpreter when its tensor arguments are on the CPU.
    The compiled path is JITFunction's own, run with the tensors' GPU as the current device."""

    def run(self, *args, grid, warmup, **kwargs):
        for a in (*args, *kwargs.values()):
            if isinstance(a, torch.Tensor):
                if a.device.type == "cpu":
                    with _interpreting():
                        return _interpreted(self).run(*args, grid=grid, warmup=warmup, **kwargs)
                if a.device.type == "cuda" and a.device.index not in (None, torch.cuda.current_device()):
                    # Triton launches on the current device: follow the tensors (a process driving
                    # several GPUs without torch.cuda.set_device would otherwise launch on the wrong one).
                    with torch.cuda.device(a.device):
                        return super().run(*args, grid=grid, warmup=warmup, **kwargs)
                break
        return super().run(*args, grid=grid, warmup=warmup, **kwargs)


def jit(fn):
    """`triton.jit` for lyfast kernels and helpers (see the module docstring)."""
    return _DualJIT(fn)


# ----------------------------------------------------------------------------------------------
# Helpers used inside kernels.
# ----------------------------------------------------------------------------------------------
@jit
def dot(a, b, PRECISION: tl.constexpr):
    """a @ b with fp32 accumulation; PRECISION is tl.dot's input_precision for fp32 operands."""
    return tl.dot(a, b, input_precision=PRECISION, out_dtype=tl.float32)


# ----------------------------------------------------------------------------------------------
# Host helpers.
# ----------------------------------------------------------------------------------------------
def next_pow2(n: int, floor: int = 1) -> int:
    return max(floor, triton.next_power_of_2(max(1, int(n))))


def precision_for(dtype: torch.dtype) -> str:
    """tl.dot input precision. Half operands multiply exactly in any mode ("tf32" is then inert). fp32
    operands use 3×TF32: fp32-level accuracy (~1e-6 relative) on tensor cores, whatever torch's
    float32_matmul_precision says. IEEE fp32 dots (CUDA-core FMA) are never used: in these fused tiles
    they spill thousands of bytes of registers per thread (AOT report), and a single fixed mode keeps the
    number of compiled variants (and the CI's AOT time) down."""
    return "tf32x3" if dtype == torch.float32 else "tf32"


@functools.lru_cache(maxsize=None)
def sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def launch_sms(device: torch.device) -> int | None:
    """SMs of the GPU that runs launches on `device` tensors; None off CUDA (Triton's interpreter runs
    programs one after another). The one place launch sizing asks the device (the AOT launch recorder in
    tests/launch_signatures.py answers it for a GPU it does not have)."""
    if device.type != "cuda":
        return None
    return sm_count(device.index if device.index is not None else torch.cuda.current_device())


# What kernels reach of the peaks, unless kernels/calibration.json has measured figures for the device
# (`python -m benchmarks.recalibrate`): assumed, not measured: cuBLAS GEMMs at SDXL/DiT widths about 70% of
# the tensor-core peak, any kernel 80% of the bandwidth, lyfast's Triton tile kernels (no TMA, no warp
# specialization) 80% of cuBLAS's rate.
CUBLAS_EFFICIENCY = 0.7
BANDWIDTH_EFFICIENCY = 0.8
TILE_VS_CUBLAS = 0.8


# Peak rates the route cost models weigh FLOPs and bytes against (datasheet figures, dense, no sparsity):
# half = bf16/fp16 tensor cores with fp32 accumulation; bandwidth = HBM/GDDR bytes per second. lyfast's
# fp32 dots run 3×TF32, and TF32 runs at half the half-precision rate: a sixth of it. Datasheet numbers,
# not measurements; what kernels reach of them is the efficiencies (assumed, or calibrated per device),
# and only the ratio between two routes of the same device matters for a choice.
@dataclass(frozen=True)
class Peaks:
    name: str
    half_flops: float
    bandwidth: float
    launch_s: float = 4e-6  # host time to issue one kernel launch (PyTorch + driver), a typical figure
    cublas_efficiency: float = CUBLAS_EFFICIENCY  # cuBLAS GEMMs' share of the tensor-core peak
    tile_vs_cublas: float = TILE_VS_CUBLAS  # lyfast's Triton kernels' rate over cuBLAS's
    calibrated_from: str | None = None  # the benchmark JSON the two efficiencies were fitted to, if any

    def flops(self, dtype: torch.dtype) -> float:
        return self.half_flops / 6 if dtype == torch.float32 else self.half_flops

    def seconds(self, flops: float, bytes_: float, dtype: torch.dtype, launches: int = 1,
                compute_efficiency: float = 1.0) -> float:
        """Time of `launches` kernels doing `flops` at `compute_efficiency` of the tensor-core peak and
        moving `bytes_` at BANDWIDTH_EFFICIENCY of the bandwidth (roofline, in all). Launches are issued
        asynchronously ahead of the GPU, so their host cost is hidden behind the work unless the work per
        launch is shorter than issuing one: the time is the larger of the two, not their sum."""
        work = max(flops / (self.flops(dtype) * compute_efficiency), bytes_ / (self.bandwidth * BANDWIDTH_EFFICIENCY))
        return max(work, launches * self.launch_s)

# Fitted efficiencies per exact device name, written by `python -m benchmarks.recalibrate RESULTS.json
# --write`: {name: {"cublas_efficiency": .., "tile_vs_cublas": .., "source": ..}}. LYFAST_CALIBRATION
# names another file (the recalibration test points it at a temporary one).
CALIBRATION_PATH = Path(os.environ.get("LYFAST_CALIBRATION") or Path(__file__).with_name("calibration.json"))


def read_calibration(path: Path = CALIBRATION_PATH) -> dict[str, dict]:
    """The calibration file's entries by device name; {} when the file does not exist."""
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        return {}


def calibrated(peaks: dict[str, Peaks], calibration: dict[str, dict]) -> dict[str, Peaks]:
    """`peaks` with each calibrated device's fitted efficiencies; other devices keep the assumed ones."""
    out = dict(peaks)
    for name, fit in calibration.items():
        if name in out:
            out[name] = dataclasses.replace(out[name], cublas_efficiency=fit["cublas_efficiency"],
                                            tile_vs_cublas=fit["tile_vs_cublas"], calibrated_from=fit.get("source"))
    return out


# Keyed by the exact `torch.cuda.get_device_name` string: SKUs sharing a chip differ in clocks, power and
# memory (H100 SXM / NVL / PCIe; L40 / L40S; A100 40 GB / 80 GB), so no substring matching.
DATASHEET_PEAKS = {p.name: p for p in (
    Peaks("NVIDIA H200", 989e12, 4.8e12),
    Peaks("NVIDIA H200 NVL", 835e12, 4.8e12),
    Peaks("NVIDIA GH200 480GB", 989e12, 4.0e12),
    Peaks("NVIDIA H100 80GB HBM3", 989e12, 3.35e12),  # H100 SXM5
    Peaks("NVIDIA H100 NVL", 835e12, 3.9e12),
    Peaks("NVIDIA H100 PCIe", 756e12, 2.0e12),
    Peaks("NVIDIA H800", 989e12, 3.35e12),
    Peaks("NVIDIA A100-SXM4-80GB", 312e12, 2.039e12),
    Peaks("NVIDIA A100-SXM4-40GB", 312e12, 1.555e12),
    Peaks("NVIDIA A100 80GB PCIe", 312e12, 1.935e12),
    Peaks("NVIDIA A100-PCIE-40GB", 312e12, 1.555e12),
    Peaks("NVIDIA L40S", 362e12, 0.864e12),
    Peaks("NVIDIA L40", 181e12, 0.864e12),
    Peaks("NVIDIA L4", 121e12, 0.3e12),
    Peaks("NVIDIA GeForce RTX 4090", 165e12, 1.008e12),
    Peaks("NVIDIA GeForce RTX 3090", 71e12, 0.936e12),
    Peaks("NVIDIA A10", 125e12, 0.6e12),
)}
PEAKS = calibrated(DATASHEET_PEAKS, read_calibration())
# An unnamed device is costed as the slowest common part of its compute capability (conservative: the
# tile route, which trades FLOPs for bytes, is then never favoured by rates the card may not have).
PEAKS_BY_CAPABILITY = {(9, 0): PEAKS["NVIDIA H100 PCIe"], (8, 0): PEAKS["NVIDIA A100-PCIE-40GB"],
                       (8, 9): PEAKS["NVIDIA L4"], (8, 6): PEAKS["NVIDIA GeForce RTX 3090"]}
FALLBACK_PEAKS = PEAKS["NVIDIA GeForce RTX 3090"]  # any other capability
# CPU tensors (the interpreter) are costed as an H100 SXM, so that tests on the CPU see the routes a
# Hopper GPU would take.
DEFAULT_PEAKS = PEAKS["NVIDIA H100 80GB HBM3"]


def peaks_for(name: str, capability: tuple[int, int]) -> Peaks:
    """The PEAKS entry for a device name, else the conservative one for its compute capability."""
    return PEAKS.get(name) or PEAKS_BY_CAPABILITY.get(tuple(capability), FALLBACK_PEAKS)


@functools.lru_cache(maxsize=None)
def _cuda_peaks(index: int) -> Peaks:
    return peaks_for(torch.cuda.get_device_name(index), torch.cuda.get_device_capability(index))


def device_peaks(device: torch.device) -> Peaks:
    """The peak rates the cost models use for tensors on `device` (see PEAKS)."""
    if device.type != "cuda":
        return DEFAULT_PEAKS
    return _cuda_peaks(device.index if device.index is not None else torch.cuda.current_device())


def persistent_programs(device: torch.device, work_items: int, per_sm: int = 2) -> int:
    """How many programs a grid-stride kernel launches: `per_sm` per SM on CUDA (at most `work_items`),
    at most 4 on the interpreter (it runs programs one after another; partial buffers stay tiny)."""
    sms = launch_sms(device)
    cap = 4 if sms is None else per_sm * sms
    return max(1, min(work_items, cap))


def or_empty(like: torch.Tensor, *tensors) -> tuple:
    """`tensors` with each None replaced by an empty tensor of its own: how a torch.library op returns a
    gradient nobody asked for (ops return tensors, and their returns may not alias one another)."""
    return tuple(like.new_empty(0) if t is None else t for t in tensors)


def rows_2d(t: torch.Tensor) -> torch.Tensor:
    """t as (rows, last) without copying when its leading dims collapse (a copy otherwise)."""
    return t.reshape(-1, t.shape[-1])


# ----------------------------------------------------------------------------------------------
# Ahead-of-time compilation of recorded launches (CI without a GPU; also a resource report on a GPU image).
# ----------------------------------------------------------------------------------------------
# A launch does not compile the kernel as written: Triton specializes every launch on its arguments
# (integers equal to 1 become compile-time constants; pointers and integers divisible by 16 carry a
# divisibility attribute; the options are parsed for the device), and each distinct specialization is a
# compiled variant of its own. So the AOT check replays launches recorded from the modules
# (tests/launch_signatures.py) through Triton's own `JITFunction.run`, with a driver that names the
# target instead of asking a GPU, and Triton's `knobs.runtime.jit_cache_hook`, which receives what the
# launch would compile (`specialization_data`) and stops it there. Each distinct specialization is
# then compiled once through `JITFunction.preload`, the path Triton itself uses to restore a kernel
# from that data. Nothing of the specialization rules is reimplemented here.

# Shared memory per block, opt-in maximum (bytes): the limit a launch may request.
SMEM_LIMIT = {80: 163 * 1024, 86: 99 * 1024, 89: 99 * 1024, 90: 227 * 1024}


@dataclass(frozen=True)
class DevicePointer:
    """A tensor argument as a launch's specialization sees it: its dtype and its address. CUDA's caching
    allocator hands out 512-byte-aligned blocks, so a tensor's address is `offset` = storage_offset ·
    element_size bytes past an aligned base; only its divisibility by 16 reaches the compiled kernel."""
    dtype: torch.dtype
    offset: int

    BASE = 1 << 21  # an aligned, non-null base address

    @staticmethod
    def of(t: torch.Tensor) -> "DevicePointer":
        return DevicePointer(t.dtype, t.storage_offset() * t.element_size())

    def data_ptr(self) -> int:
        return self.BASE + self.offset


class _TargetDriver:
    """Triton's active driver while launches are specialized or compiled for sm_`cc` without a GPU: it
    answers what `JITFunction.run` and `preload` ask a driver (device, stream, target). `phase` keeps
    the two apart: binder and kernel caches are per device, and a specialization must never find a
    compiled kernel in the cache (the launch would then go on to run it)."""

    def __init__(self, cc: int, phase: str):
        self.cc, self.phase = cc, phase

    def get_current_device(self):
        return f"aot-sm{self.cc}-{self.phase}"

    def get_current_stream(self, device=None):
        return 0

    def get_current_target(self):
        from triton.backends.compiler import GPUTarget

        return GPUTarget("cuda", self.cc, 32)


@contextlib.contextmanager
def _target(cc: int, phase: str):
    from triton.runtime.driver import driver

    previous = driver._active  # None until something asked for the (absent) GPU driver
    driver.set_active(_TargetDriver(cc, phase))
    try:
        yield
    finally:
        driver.set_active(previous)


def launch_specialization(kernel: JITFunction, args: tuple, kwargs: dict, cc: int) -> tuple[str, str]:
    """(key, specialization_data) of the variant that `kernel[grid](*args, **kwargs)` compiles on an
    sm_`cc` GPU, from Triton's own launch path (see above). Tensor arguments are passed as
    `DevicePointer`s. `key` is Triton's kernel-cache key: launches with equal keys share one binary."""
    from triton import knobs

    if cc not in SMEM_LIMIT:
        raise ValueError(f"cc: expected one of {sorted(SMEM_LIMIT)}, got {cc!r}")
    seen = {}

    def hook(*, key, compile, **_):
        seen.update(key=key, data=compile["specialization_data"])
        return True  # stop before compiling

    saved = knobs.runtime.jit_cache_hook
    knobs.runtime.jit_cache_hook = hook
    try:
        with _target(cc, "specialize"):
            JITFunction.run(kernel, *args, grid=(1,), warmup=False, **kwargs)
            kernel.device_caches.pop(_TargetDriver(cc, "specialize").get_current_device(), None)
    finally:
        knobs.runtime.jit_cache_hook = saved
    if not seen:
        raise RuntimeError(f"{kernel.__name__}: Triton's launch path did not reach compilation")
    return str(seen["key"]), seen["data"]


def compile_specialization(kernel: JITFunction, data: str, cc: int) -> dict:
    """Compile one `launch_specialization` for sm_`cc` through `JITFunction.preload`. Returns dict(
    shared=bytes, limit=the block's opt-in maximum, num_warps, num_stages, regs, stack, compile_s):
    registers per thread and per-thread stack bytes (register spills and local arrays) from cuobjdump,
    None if it is absent, and the compile's wall time here (a bound on a GPU's first-call compile of that
    variant: Triton then caches it on disk). Compile errors propagate."""
    phase = _TargetDriver(cc, "compile")
    with _target(cc, "compile"):
        start = time.perf_counter()
        try:
            compiled = kernel.preload(data)
        finally:
            kernel.device_caches.pop(phase.get_current_device(), None)
        seconds = time.perf_counter() - start
    regs, stack = _resource_usage(compiled.asm.get("cubin"))
    meta = compiled.metadata
    return dict(shared=int(meta.shared), limit=SMEM_LIMIT[cc], num_warps=int(meta.num_warps),
                num_stages=int(meta.num_stages), regs=regs, stack=stack, compile_s=round(seconds, 3))


def _resource_usage(cubin: bytes | None):
    """(registers per thread, stack bytes per thread) of a cubin via the cuobjdump Triton ships."""
    if not cubin:
        return None, None
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    if not os.path.exists(tool):
        return None, None
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        try:
            out = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True, text=True,
                                 timeout=60).stdout
        except (OSError, subprocess.SubprocessError):
            return None, None
    regs = re.search(r"REG:(\d+)", out)
    stack = re.search(r"STACK:(\d+)", out)
    return (int(regs.group(1)) if regs else None), (int(stack.group(1)) if stack else None)
