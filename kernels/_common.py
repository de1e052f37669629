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
import functools
import inspect
import threading
import os
import re
import subprocess
import tempfile
import time
from dataclasses import dataclass

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


# Peak rates the route cost models weigh FLOPs and bytes against (datasheet figures, dense, no sparsity):
# half = bf16/fp16 tensor cores with fp32 accumulation; bandwidth = HBM/GDDR bytes per second. lyfast's
# fp32 dots run 3×TF32, and TF32 runs at half the half-precision rate: a sixth of it. Datasheet numbers,
# not measurements: only the ratio between two routes of the same device matters for a choice.
@dataclass(frozen=True)
class Peaks:
    name: str
    half_flops: float
    bandwidth: float
    launch_s: float = 4e-6  # per kernel launch (host + ramp), a typical H100 figure

    def flops(self, dtype: torch.dtype) -> float:
        return self.half_flops / 6 if dtype == torch.float32 else self.half_flops

    def seconds(self, flops: float, bytes_: float, dtype: torch.dtype, launches: int = 1) -> float:
        """Roofline time of `launches` kernels doing `flops` and moving `bytes_` between them."""
        return max(flops / self.flops(dtype), bytes_ / self.bandwidth) + launches * self.launch_s


PEAKS = {  # matched against torch.cuda.get_device_name, first hit wins
    "H200": Peaks("H200", 989e12, 4.8e12),
    "H100 PCIe": Peaks("H100 PCIe", 756e12, 2.0e12),
    "H100": Peaks("H100 SXM", 989e12, 3.35e12),
    "H800": Peaks("H800", 989e12, 3.35e12),
    "A100": Peaks("A100", 312e12, 2.0e12),
    "L40": Peaks("L40S", 362e12, 0.864e12),
    "4090": Peaks("RTX 4090", 165e12, 1.0e12),
    "A10": Peaks("A10", 125e12, 0.6e12),
}
# By compute capability major when the name is not in the table; CPU tensors (the interpreter) are costed
# as an H100, so that tests on the CPU see the routes a Hopper GPU would take.
PEAKS_BY_MAJOR = {9: PEAKS["H100"], 8: PEAKS["A100"]}
DEFAULT_PEAKS = PEAKS["H100"]


@functools.lru_cache(maxsize=None)
def _cuda_peaks(index: int) -> Peaks:
    name = torch.cuda.get_device_name(index)
    for key, peaks in PEAKS.items():
        if key in name:
            return peaks
    major = torch.cuda.get_device_capability(index)[0]
    return PEAKS_BY_MAJOR.get(major, DEFAULT_PEAKS if major > 9 else PEAKS["A10"])


def device_peaks(device: torch.device) -> Peaks:
    """The peak rates the cost models use for tensors on `device` (see PEAKS)."""
    if device.type != "cuda":
        return DEFAULT_PEAKS
    return _cuda_peaks(device.index if device.index is not None else torch.cuda.current_device())


def persistent_programs(device: torch.device, work_items: int, per_sm: int = 2) -> int:
    """How many programs a grid-stride kernel launches: `per_sm` per SM on CUDA (at most `work_items`),
    at most 4 on the interpreter (it runs programs one after another; partial buffers stay tiny)."""
    if device.type == "cuda":
        cap = per_sm * sm_count(device.index if device.index is not None else torch.cuda.current_device())
    else:
        cap = 4
    return max(1, min(work_items, cap))


def or_empty(like: torch.Tensor, *tensors) -> tuple:
    """`tensors` with each None replaced by an empty tensor of its own: how a torch.library op returns a
    gradient nobody asked for (ops return tensors, and their returns may not alias one another)."""
    return tuple(like.new_empty(0) if t is None else t for t in tensors)


def rows_2d(t: torch.Tensor) -> torch.Tensor:
    """t as (rows, last) without copying when its leading dims collapse (a copy otherwise)."""
    return t.reshape(-1, t.shape[-1])


# ----------------------------------------------------------------------------------------------
# Ahead-of-time compilation (CI without a GPU; also a resource report on a GPU image).
# ----------------------------------------------------------------------------------------------
# Shared memory per block, opt-in maximum (bytes): the limit a launch may request.
SMEM_LIMIT = {80: 163 * 1024, 86: 99 * 1024, 89: 99 * 1024, 90: 227 * 1024}


def arg_type(value) -> str:
    """Triton signature type of a launch argument (tensors as pointers, ints as i32/i64, floats fp32)."""
    if isinstance(value, torch.Tensor):
        return "*" + TORCH_TO_TL.get(value.dtype, {torch.int32: "i32", torch.int64: "i64"}.get(value.dtype, "fp32"))
    if isinstance(value, str):  # already a Triton type ("*bf16", "i32", "fp32")
        return value
    if isinstance(value, bool):
        return "i1"
    if isinstance(value, int):
        return "i64" if abs(value) >= 2**31 else "i32"
    if isinstance(value, float):
        return "fp32"
    raise TypeError(f"cannot type launch argument {value!r}")


def aot_compile(kernel: JITFunction, args: dict, constexprs: dict, cc: int, num_warps: int = 4, num_stages: int = 2):
    """Compile `kernel` for sm_`cc` without a GPU. `args` maps every runtime parameter to a Triton type
    string ("*bf16", "i32", "fp32") or an example value; `constexprs` maps every constexpr parameter to its
    value. Returns dict(shared=bytes, num_warps, regs, stack, compile_s): registers per thread and
    per-thread stack bytes (register spills and local arrays), both from cuobjdump, None if it is absent,
    and the compile's wall time here (a bound on a GPU's first-call compile of that variant: Triton then
    caches it on disk).

    Triton 3.3+ (3.6 in the GPU image, 3.9 on PyPI) takes a name-keyed signature with "constexpr"
    entries and `constexprs=`; older releases took `constants=` — both are handled."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    names = list(kernel.arg_names)
    missing = [n for n in names if n not in args and n not in constexprs]
    if missing:
        raise ValueError(f"{kernel.__name__}: no type or value for parameters {missing}")
    params = inspect.signature(ASTSource.__init__).parameters
    if "constexprs" in params:
        sig = {n: ("constexpr" if n in constexprs else arg_type(args[n])) for n in names}
        src = ASTSource(fn=kernel, signature=sig, constexprs=dict(constexprs))
    else:  # Triton <= 3.2
        sig = {n: arg_type(args[n]) for n in names if n not in constexprs}
        src = ASTSource(fn=kernel, signature=sig, constants=dict(constexprs))
    options = dict(num_warps=num_warps, num_stages=num_stages)
    start = time.perf_counter()
    compiled = triton.compile(src, target=GPUTarget("cuda", cc, 32), options=options)
    seconds = time.perf_counter() - start
    regs, stack = _resource_usage(compiled.asm.get("cubin"))
    return dict(shared=int(compiled.metadata.shared), num_warps=num_warps, regs=regs, stack=stack,
                compile_s=round(seconds, 3))


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


AOT_MODULES = ("lokr", "boft", "loha")


def _aot_one(job):
    module, index, cc = job
    import importlib

    name, kernel, args, constexprs, num_warps, num_stages = importlib.import_module(
        f"{__package__}.{module}").aot_variants()[index]
    try:
        res = aot_compile(kernel, args, constexprs, cc, num_warps, num_stages)
        err = None
    except Exception as exc:  # reported, not raised: the caller lists every failure at once
        res, err = {}, f"{type(exc).__name__}: {exc}"
    return dict(name=name, cc=cc, error=err, limit=SMEM_LIMIT[cc], **res)


def aot_report(ccs=(80, 90), modules=AOT_MODULES, workers: int = 1) -> list[dict]:
    """Compile every variant of every kernel module for each compute capability; one dict per
    (variant, cc): name, cc, shared (bytes), limit, num_warps, regs, stack (bytes), error."""
    import importlib

    jobs = [(m, i, cc) for m in modules for i in range(len(importlib.import_module(f"{__package__}.{m}").aot_variants()))
            for cc in ccs]
    if workers <= 1:
        return [_aot_one(j) for j in jobs]
    import concurrent.futures
    import multiprocessing

    ctx = multiprocessing.get_context("fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn")
    with concurrent.futures.ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as pool:
        return list(pool.map(_aot_one, jobs))
