"""THE backend dispatch: which implementation runs a fused op.

    Backend.TORCH   the pure-PyTorch path in `lyfast.functional` (always present; the reference)
    Backend.TRITON  the kernels in `lyfast.kernels` (needs `triton`; CUDA tensors, or CPU tensors run by
                    Triton's interpreter when TRITON_INTERPRET=1 and triton was asked for explicitly)
    Backend.CUDA    the compiled extension `lyfast._C` (only when it was built)
    Backend.AUTO    TORCH for CPU tensors; on CUDA the first available entry of `AUTO_ORDER` whose kernel
                    plan accepts the shape (see `lyfast.kernels.<algo>.plan`), else TORCH

The request comes from `set_backend(...)`, else the environment variable LYFAST_BACKEND (read once, at
import), else "auto". A public op (`delta_forward`, `rotate`) calls `resolve` once and passes the result
down; nothing below it looks at the setting again. Asking explicitly for a backend that cannot run here
raises `BackendUnavailableError` saying why. A backend that is available but has no kernel for a given
shape (a conv layer, fp64, a factor too wide for one tile) leaves that call on the PyTorch path: missing
coverage is simply absent, never an error.

No timing happens here: the `auto` choice is the committed preference order below plus each kernel's
own shape envelope (a plan), so a first call never stalls to tune. Within the Triton backend, LoHa's
route per shape (Khatri-Rao kernels or the tile-generation GEMM) is a roofline cost model against the
device's datasheet peaks (`lyfast.kernels.loha.choose_route`), also without timing.
"""
from __future__ import annotations

import enum
import importlib.util
import os

import torch

__all__ = [
    "Backend",
    "BackendUnavailableError",
    "set_backend",
    "get_backend",
    "available",
    "resolve",
    "interpreting",
    "transform_active",
]

ENV_VAR = "LYFAST_BACKEND"


class Backend(str, enum.Enum):
    AUTO = "auto"
    TORCH = "torch"
    TRITON = "triton"
    CUDA = "cuda"

    def __str__(self) -> str:  # "triton", not "Backend.TRITON", in messages
        return self.value


class BackendUnavailableError(RuntimeError):
    """An explicitly requested backend cannot run the call (not installed, or wrong device)."""


# Fused backends tried by `auto` on CUDA, fastest first. No measured table exists yet (no GPU in the
# sessions that wrote the kernels). Triton comes first: its LoKr/LoHa kernels use tensor cores
# (tl.dot) while csrc/ runs fp32 CUDA-core FMAs, estimated ~2x slower at SDXL widths. Replace with a
# measured per-shape table when there is one.
AUTO_ORDER: tuple[Backend, ...] = (Backend.TRITON, Backend.CUDA)


def _parse(value) -> Backend:
    if isinstance(value, Backend):
        return value
    try:
        return Backend(str(value).strip().lower())
    except ValueError:
        raise ValueError(
            f"unknown lyfast backend {value!r}; expected one of {[b.value for b in Backend]}"
        ) from None


def _from_env() -> Backend:
    value = os.environ.get(ENV_VAR, "").strip()
    if not value:
        return Backend.AUTO
    try:
        return _parse(value)
    except ValueError as exc:
        raise ValueError(f"{ENV_VAR}={value!r}: {exc}") from None


_requested: Backend = _from_env()

# Probes that never change during a process (find_spec imports nothing). Filled eagerly where cheap, so
# that a call traced by torch.compile only reads module globals.
_HAS_TRITON: bool | None = importlib.util.find_spec("triton") is not None
_HAS_CUDA_EXT: bool | None = None
_CUDA_PROBES: dict[bool, tuple[bool, str]] = {}  # explicit -> (ok, why), kept once it succeeded


def set_backend(backend: str | Backend | None) -> Backend:
    """Set the process-wide request ("auto", "torch", "triton", "cuda"); None restores LYFAST_BACKEND's
    value (or "auto"). Returns the previous request. Availability is checked per call, not here."""
    global _requested
    previous = _requested
    _requested = _from_env() if backend is None else _parse(backend)
    return previous


def get_backend() -> Backend:
    """The current request (may be AUTO); `resolve` turns it into the backend a call uses."""
    return _requested


def _triton_importable() -> bool:
    global _HAS_TRITON
    if _HAS_TRITON is None:
        _HAS_TRITON = importlib.util.find_spec("triton") is not None
    return _HAS_TRITON


_CUDA_OPS: list = []  # [module or None] once probed


def _cuda_ops():
    """`lyfast.cuda_ops` (the CUDA backend's loader and op schemas) if this install has it, else None."""
    if not _CUDA_OPS:
        found = importlib.util.find_spec("lyfast.cuda_ops") is not None
        _CUDA_OPS.append(importlib.import_module("lyfast.cuda_ops") if found else None)
    return _CUDA_OPS[0]


def _cuda_ext(explicit: bool) -> tuple[bool, str]:
    """Whether the CUDA kernels can be loaded. `auto` only takes a prebuilt lyfast._C; an explicit
    request lets `lyfast.cuda_ops.load(jit=True)` compile csrc/ once."""
    global _HAS_CUDA_EXT
    if explicit in _CUDA_PROBES:
        return _CUDA_PROBES[explicit]
    ops = _cuda_ops()
    if ops is not None:
        ok = ops.load(jit=explicit)
        if ok or not explicit:  # auto probes once; a failed explicit load may be retried by the loader
            _CUDA_PROBES[explicit] = (ok, "" if ok else ops.load_error())
        return ok, "" if ok else ops.load_error()
    if _HAS_CUDA_EXT is None:
        try:
            _HAS_CUDA_EXT = importlib.util.find_spec("lyfast._C") is not None
        except (ImportError, ValueError):
            _HAS_CUDA_EXT = False
    return _HAS_CUDA_EXT, "" if _HAS_CUDA_EXT else "the CUDA extension lyfast._C was not built"


def _cuda_implements() -> frozenset[str]:
    ops = _cuda_ops()
    if ops is None:
        return frozenset()
    return frozenset(name.split("_")[1] for name in getattr(ops, "OPS", ()) if name.endswith("_fwd"))


def transform_active() -> bool:
    """Whether a torch.func transform (grad, vmap, jacrev, jvp, functionalize) is running this call. lyfast's
    autograd Functions (and the Triton / CUDA ops) have hand-written backwards with no vmap or forward-mode
    rules, so under a transform the modules compute through ordinary PyTorch ops instead (LyCORIS's math,
    ΔW built): see `LycorisModule._transform_forward` and the BOFT module's rotation."""
    # torch.compile's trace answers True here (its own interpreter), and there the custom ops with fake kernels
    # are what must be traced: a compiled graph is not a torch.func transform.
    return not torch.compiler.is_compiling() and torch._C._functorch.peek_interpreter_stack() is not None


def interpreting() -> bool:
    """True when TRITON_INTERPRET=1: Triton kernels may then run on CPU tensors (slowly; for tests)."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "on", "yes")


def available(backend: str | Backend, device: torch.device | str, explicit: bool = True) -> tuple[bool, str]:
    """(can `backend` run on tensors of `device` here, and if not, why). `explicit=False` is the `auto`
    probe: it never triggers a build."""
    backend = _parse(backend)
    device = torch.device(device)
    if backend in (Backend.TORCH, Backend.AUTO):
        return True, ""
    if backend == Backend.TRITON:
        if not _triton_importable():
            return False, "the `triton` package is not installed (pip install 'lyfast[triton]')"
        if device.type == "cuda":
            return True, ""
        if device.type == "cpu" and interpreting():
            return True, ""
        hint = " (set TRITON_INTERPRET=1 to run the kernels on CPU tensors in Triton's interpreter)"
        return False, f"Triton kernels need CUDA tensors, got {device.type} tensors" + (
            hint if device.type == "cpu" else ""
        )
    # Backend.CUDA
    if device.type != "cuda":
        return False, f"the CUDA extension needs CUDA tensors, got {device.type} tensors"
    ok, why = _cuda_ext(explicit)
    return ok, why


# Which fused ops each backend has kernels for ("lokr", "loha", "boft"); `auto` skips a backend that
# lacks the op, an explicit request for it falls back to the PyTorch path for that op.
TRITON_OPS = frozenset({"lokr", "loha", "boft"})


def implements(backend: Backend, op: str) -> bool:
    if backend == Backend.TRITON:
        return op in TRITON_OPS
    if backend == Backend.CUDA:
        return op in _cuda_implements()
    return True


def resolve(device: torch.device | str, op: str | None = None, backend: str | Backend | None = None) -> Backend:
    """The backend a call of `op` on `device` uses: TORCH, TRITON or CUDA (never AUTO).

    `backend` overrides the process-wide request for this call. AUTO gives TORCH off CUDA and the
    first available entry of AUTO_ORDER implementing `op` on CUDA (the op then still checks its
    kernel's shape plan). An explicit request that cannot run raises BackendUnavailableError; one that
    runs but has no kernel for `op` gives TORCH.
    """
    req = _requested if backend is None else _parse(backend)
    device = torch.device(device)
    if req == Backend.TORCH:
        return req
    if req != Backend.AUTO:
        ok, why = available(req, device)
        if not ok:
            raise BackendUnavailableError(
                f"lyfast backend {req.value!r} was requested (set_backend / {ENV_VAR}) but cannot run: {why}"
            )
        return req if op is None or implements(req, op) else Backend.TORCH
    if device.type != "cuda":
        return Backend.TORCH
    for cand in AUTO_ORDER:
        if (op is None or implements(cand, op)) and available(cand, device, explicit=False)[0]:
            return cand
    return Backend.TORCH
