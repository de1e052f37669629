"""The CUDA C++ backend's Python side: op schemas, fake and CPU reference kernels, autograd, loading.

Ops (namespace `lyfast`, prefixed `cuda_` so they never meet the Triton backend's names):

    cuda_cayley(q) -> R                       R = solve(I − Q, I + Q) per (b, b) block, fp32, b <= 64
    cuda_cayley_bwd(r, grad) -> dQ            ½ (I + Rᵀ) · grad · (I + Rᵀ)
    cuda_boft_fwd(z, r, rescale?) -> out      out = rescale ⊙ B_{m-1}(⋯B_0(z)) on z (batch, O, spatial)
    cuda_boft_bwd(grad, z, r, rescale?, need_z, need_r, need_rescale) -> (dz, dr, drescale)
    cuda_lokr_fwd(x, w1, w2, scale) -> y      y = scale · vec(W1 · X · W2ᵀ) per token, X = x viewed (in_m, in_n)
    cuda_lokr_bwd(grad, x, w1, w2, scale, need_x, need_w) -> (dx, dw1, dw2)

A gradient that was not asked for comes back as an empty (0-element) tensor. Activations may be fp32, bf16
or fp16 (fp32 arithmetic inside); stage matrices are fp32; the LoKr factors any float dtype (used as fp32).

The schemas, fake kernels (for torch.compile / FakeTensor), CPU reference kernels (the contract, written
independently of `lyfast.functional`, which imports this module and not the other way round; they make
`torch.library.opcheck` and the tests run on CPU) and the
autograd formulas all live here, so they exist without the compiled library. `lyfast._C` (csrc/, built
by setup.py where a CUDA toolkit and CUDA torch are present) only adds the CUDA kernels. Where it was not
built, `load(jit=True)` compiles csrc/ with torch.utils.cpp_extension; only an explicit request for the
CUDA backend does that, `auto` never compiles (see lyfast/backend.py).

LoHa has no CUDA kernel, by design: its Khatri-Rao route is two skinny GEMMs (x·Kᵀ, then ·Fᵀ with
r1·r2 ≈ 64 columns), about 64 FLOP per byte moved at SDXL widths in bf16. That is above the ~20 FLOP/B an
H100 sustains on fp32 CUDA cores from HBM and far below its tensor-core balance (~300), so the GEMMs that
cuBLAS and Triton's tl.dot run on tensor cores are already bound by memory, and a CUDA-core kernel would be
~3× slower; matching them takes hand-written mma/wgmma, with nothing left to fuse (generating K costs
r1·r2·in MACs once per step). The CUDA kernels here use fp32 CUDA cores too; see csrc/ for where that
leaves BOFT and LoKr.
"""
from __future__ import annotations

import importlib.util
import logging
import os
import threading
from functools import lru_cache
from pathlib import Path

import torch

from .functional.general import as_bos, skew  # the only lyfast.functional import: it imports nothing back

logger = logging.getLogger("lyfast")

__all__ = [
    "OPS",
    "load",
    "loaded",
    "load_error",
    "cayley",
    "butterfly",
    "kron_delta",
    "boft_supported",
    "lokr_supported",
]

# ----------------------------------------------------------------------------------------------------------
# Schemas.
# ----------------------------------------------------------------------------------------------------------
OPS = {
    "cuda_cayley": "(Tensor q) -> Tensor",
    "cuda_cayley_bwd": "(Tensor r, Tensor grad) -> Tensor",
    "cuda_boft_fwd": "(Tensor z, Tensor r, Tensor? rescale) -> Tensor",
    "cuda_boft_bwd": "(Tensor grad, Tensor z, Tensor r, Tensor? rescale, bool need_z, bool need_r, "
    "bool need_rescale) -> (Tensor, Tensor, Tensor)",
    "cuda_lokr_fwd": "(Tensor x, Tensor w1, Tensor w2, float scale) -> Tensor",
    "cuda_lokr_bwd": "(Tensor grad, Tensor x, Tensor w1, Tensor w2, float scale, bool need_x, bool need_w) "
    "-> (Tensor, Tensor, Tensor)",
}

_lib = torch.library.Library("lyfast", "FRAGMENT")  # noqa: TOR901 (kept alive for the process)
for _name, _schema in OPS.items():
    _lib.define(_name + _schema)

ACTIVATION_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
MAX_CAYLEY_BLOCK = 64  # Gauss-Jordan on [I − Q | I + Q] in shared memory


def _none(like: torch.Tensor) -> torch.Tensor:
    return like.new_empty((0,))


def _lokr_out_shape(x, w1, w2):
    return (*x.shape[:-1], w1.shape[0] * w2.shape[0])


# ----------------------------------------------------------------------------------------------------------
# Fake kernels: shapes, dtypes and devices of the CUDA kernels' outputs (all contiguous).
# ----------------------------------------------------------------------------------------------------------
@torch.library.register_fake("lyfast::cuda_cayley", lib=_lib)
def _(q):
    return torch.empty(q.shape, dtype=q.dtype, device=q.device)


@torch.library.register_fake("lyfast::cuda_cayley_bwd", lib=_lib)
def _(r, grad):
    return torch.empty(r.shape, dtype=r.dtype, device=r.device)


@torch.library.register_fake("lyfast::cuda_boft_fwd", lib=_lib)
def _(z, r, rescale):
    return torch.empty(z.shape, dtype=z.dtype, device=z.device)


@torch.library.register_fake("lyfast::cuda_boft_bwd", lib=_lib)
def _(grad, z, r, rescale, need_z, need_r, need_rescale):
    dz = torch.empty(z.shape, dtype=z.dtype, device=z.device) if need_z else _none(z)
    dr = torch.empty(r.shape, dtype=torch.float32, device=r.device) if need_r else _none(r)
    if need_rescale:
        ds = torch.empty(rescale.shape, dtype=rescale.dtype, device=rescale.device)
    else:
        ds = _none(rescale if rescale is not None else r)
    return dz, dr, ds


@torch.library.register_fake("lyfast::cuda_lokr_fwd", lib=_lib)
def _(x, w1, w2, scale):
    return torch.empty(_lokr_out_shape(x, w1, w2), dtype=x.dtype, device=x.device)


@torch.library.register_fake("lyfast::cuda_lokr_bwd", lib=_lib)
def _(grad, x, w1, w2, scale, need_x, need_w):
    dx = torch.empty(x.shape, dtype=x.dtype, device=x.device) if need_x else _none(x)
    dw1 = torch.empty(w1.shape, dtype=w1.dtype, device=w1.device) if need_w else _none(w1)
    dw2 = torch.empty(w2.shape, dtype=w2.dtype, device=w2.device) if need_w else _none(w2)
    return dx, dw1, dw2


# ----------------------------------------------------------------------------------------------------------
# CPU reference kernels: the contract the CUDA kernels implement, in fp32, written independently of
# lyfast.functional (which imports this module, never the other way round).
# ----------------------------------------------------------------------------------------------------------
@torch.library.impl("lyfast::cuda_cayley", "cpu", lib=_lib)
def _cayley_cpu(q):
    eye = torch.eye(q.shape[-1], dtype=q.dtype)
    return torch.linalg.solve(eye - q, eye + q).contiguous()


@torch.library.impl("lyfast::cuda_cayley_bwd", "cpu", lib=_lib)
def _cayley_bwd_cpu(r, grad):
    p = (torch.eye(r.shape[-1], dtype=r.dtype) + r).mT
    return (0.5 * (p @ grad.to(r.dtype) @ p)).contiguous()


def _stage_channels(i, n, b, device):
    """Stage i's blocks as channel indices (n·b: block-major, rows in LyCORIS's order, its stride permutation)."""
    return torch.arange(n * b, device=device).reshape(-1, 2, 2**i * (b // 2)).transpose(1, 2).reshape(-1)


def _gather(h, idx, n):
    return h.index_select(-1, idx).unflatten(-1, (n, -1))


def _scatter(like, idx, blocks):
    return torch.zeros_like(like).index_copy(-1, idx, blocks.flatten(-2))


def _boft_stages(z, r):
    """B_{m-1}(⋯B_0(z)) on z (batch, O, pixels) in fp32, one gather and scatter of the channels per stage,
    written apart from lyfast.functional's passes (which it checks); also each stage's gathered input."""
    m, n, b, _ = r.shape
    h, inputs = z.float().transpose(1, 2), []  # (batch, pixels, O)
    for i in range(m):
        idx = _stage_channels(i, n, b, z.device)
        inputs.append(_gather(h, idx, n))
        h = _scatter(h, idx, torch.einsum("nij,...nj->...ni", r[i].float(), inputs[-1]))
    return h, inputs


@torch.library.impl("lyfast::cuda_boft_fwd", "cpu", lib=_lib)
def _boft_fwd_cpu(z, r, rescale):
    h = _boft_stages(z, r)[0]
    if rescale is not None:
        h = h * rescale.float().reshape(-1)
    return h.transpose(1, 2).to(z.dtype).contiguous()


@torch.library.impl("lyfast::cuda_boft_bwd", "cpu", lib=_lib)
def _boft_bwd_cpu(grad, z, r, rescale, need_z, need_r, need_rescale):
    m, n, b, _ = r.shape
    h, inputs = _boft_stages(z, r)
    g = grad.float().transpose(1, 2)
    ds = _none(rescale if rescale is not None else r)
    if rescale is not None:
        if need_rescale:
            ds = (g * h).sum((0, 1)).reshape(rescale.shape).to(rescale.dtype)
        g = g * rescale.float().reshape(-1)
    dr = torch.empty(r.shape, dtype=torch.float32, device=r.device)
    for i in reversed(range(m)):
        idx = _stage_channels(i, n, b, z.device)
        gb = _gather(g, idx, n)
        dr[i] = torch.einsum("...ni,...nj->nij", gb, inputs[i])
        g = _scatter(g, idx, torch.einsum("nij,...ni->...nj", r[i].float(), gb))
    dz = g.transpose(1, 2).to(z.dtype).contiguous() if need_z else _none(z)
    return dz, dr if need_r else _none(r), ds


def _lokr_tokens(x, w1):
    """x as (tokens, in_m, in_n) in fp32."""
    return x.float().reshape(-1, w1.shape[1], x.shape[-1] // w1.shape[1])


@torch.library.impl("lyfast::cuda_lokr_fwd", "cpu", lib=_lib)
def _lokr_fwd_cpu(x, w1, w2, scale):
    y = scale * (w1.float() @ _lokr_tokens(x, w1) @ w2.float().mT)  # per token W1·X·W2ᵀ
    return y.reshape(_lokr_out_shape(x, w1, w2)).to(x.dtype)


@torch.library.impl("lyfast::cuda_lokr_bwd", "cpu", lib=_lib)
def _lokr_bwd_cpu(grad, x, w1, w2, scale, need_x, need_w):
    xt, a, b = _lokr_tokens(x, w1), w1.float(), w2.float()
    g = grad.float().reshape(xt.shape[0], a.shape[0], b.shape[0])  # per token G = scale·∂L/∂(W1·X·W2ᵀ)
    dx = (scale * (a.mT @ g @ b)).reshape(x.shape).to(x.dtype) if need_x else _none(x)
    if not need_w:
        return dx, _none(w1), _none(w2)
    dw1 = scale * torch.einsum("tlk,tmn,kn->lm", g, xt, b)
    dw2 = scale * torch.einsum("tlk,tmn,lm->kn", g, xt, a)
    return dx, dw1.to(w1.dtype), dw2.to(w2.dtype)


# ----------------------------------------------------------------------------------------------------------
# Autograd: each forward op's backward is its `_bwd` op (no double backward).
# ----------------------------------------------------------------------------------------------------------
def _cayley_setup(ctx, inputs, output):
    ctx.save_for_backward(output)


def _cayley_backward(ctx, grad):
    (r,) = ctx.saved_tensors
    return torch.ops.lyfast.cuda_cayley_bwd(r, grad)


def _boft_setup(ctx, inputs, output):
    z, r, rescale = inputs
    ctx.has_rescale = rescale is not None
    ctx.save_for_backward(z, r, rescale)


def _boft_backward(ctx, grad):
    z, r, rescale = ctx.saved_tensors
    need_z, need_r, need_s = ctx.needs_input_grad[:3]
    need_s = bool(need_s and ctx.has_rescale)
    dz, dr, ds = torch.ops.lyfast.cuda_boft_bwd(grad, z, r, rescale, need_z, need_r, need_s)
    return (dz if need_z else None, dr.to(r.dtype) if need_r else None, ds if need_s else None)


def _lokr_setup(ctx, inputs, output):
    x, w1, w2, scale = inputs
    ctx.scale = scale
    ctx.save_for_backward(x, w1, w2)


def _lokr_backward(ctx, grad):
    x, w1, w2 = ctx.saved_tensors
    need_x = ctx.needs_input_grad[0]
    need_w = ctx.needs_input_grad[1] or ctx.needs_input_grad[2]
    dx, dw1, dw2 = torch.ops.lyfast.cuda_lokr_bwd(grad, x, w1, w2, ctx.scale, need_x, need_w)
    return (dx if need_x else None, dw1 if need_w else None, dw2 if need_w else None, None)


torch.library.register_autograd("lyfast::cuda_cayley", _cayley_backward, setup_context=_cayley_setup, lib=_lib)
torch.library.register_autograd("lyfast::cuda_boft_fwd", _boft_backward, setup_context=_boft_setup, lib=_lib)
torch.library.register_autograd("lyfast::cuda_lokr_fwd", _lokr_backward, setup_context=_lokr_setup, lib=_lib)


# ----------------------------------------------------------------------------------------------------------
# Loading the CUDA kernels.
# ----------------------------------------------------------------------------------------------------------
_state = {"loaded": False, "error": "not loaded yet", "tried_jit": False}
_lock = threading.Lock()
CSRC = Path(__file__).resolve().parent.parent / "csrc"  # a source checkout / editable install


def _prebuilt_path() -> str | None:
    try:
        spec = importlib.util.find_spec("lyfast._C")
    except (ImportError, ValueError):
        return None
    return spec.origin if spec is not None and spec.origin else None


def _jit_build() -> None:
    from torch.utils.cpp_extension import load as cpp_load

    if not CSRC.is_dir():
        raise RuntimeError(
            f"lyfast._C was not built and the CUDA sources ({CSRC}) are not next to the package; reinstall "
            "from a source checkout with `pip install --no-build-isolation .` on a machine with a CUDA "
            "toolkit (or `pip install -e .` to allow a JIT build)"
        )
    sources = sorted(str(p) for p in CSRC.glob("*.cu")) + [str(CSRC / "bindings.cpp")]
    logger.warning("lyfast: compiling the CUDA extension from %s (first use of LYFAST_BACKEND=cuda; "
                   "this takes a minute or two and is cached by torch.utils.cpp_extension)", CSRC)
    cpp_load(
        name="lyfast_cuda",
        sources=sources,
        extra_cflags=["-O3"],
        extra_cuda_cflags=["-O3", "-lineinfo", "--expt-relaxed-constexpr"],
        is_python_module=False,  # registers the ops through torch.ops.load_library
        verbose=os.environ.get("LYFAST_VERBOSE_BUILD", "0") == "1",
    )


def load(jit: bool = False) -> bool:
    """Make the CUDA kernels of the `lyfast::cuda_*` ops available; True on success.

    Loads the prebuilt `lyfast._C`; where there is none and `jit` is True, compiles csrc/ once per process
    (torch caches the build on disk). Never raises: on failure `load_error()` says why. Without a CUDA torch
    and a visible GPU it fails at once, without compiling.
    """
    if _state["loaded"]:
        return True
    with _lock:
        if _state["loaded"]:
            return True
        if torch.version.cuda is None:
            _state["error"] = f"torch {torch.__version__} is a CPU build"
            return False
        if not torch.cuda.is_available():
            _state["error"] = "no CUDA device is visible"
            return False
        path = _prebuilt_path()
        try:
            if path is not None:
                torch.ops.load_library(path)
            elif not jit:
                _state["error"] = "the CUDA extension lyfast._C was not built (LYFAST_BACKEND=cuda JIT-builds it)"
                return False
            elif _state["tried_jit"]:
                return False  # the error of the first attempt stands
            else:
                _state["tried_jit"] = True
                _jit_build()
        except Exception as exc:  # a broken build or an ABI mismatch: report, do not crash the caller
            _state["error"] = f"{type(exc).__name__}: {exc}"
            logger.warning("lyfast: CUDA extension unavailable: %s", _state["error"])
            return False
        _state["loaded"], _state["error"] = True, ""
        return True


def loaded() -> bool:
    """Whether the CUDA kernels are registered in this process (no loading is attempted)."""
    return _state["loaded"]


def load_error() -> str:
    """Why the last `load` failed ("" after a success)."""
    return _state["error"]


# ----------------------------------------------------------------------------------------------------------
# Shape envelopes: where the kernels run (shared-memory plans in csrc/*.cu; keep the two in step).
# ----------------------------------------------------------------------------------------------------------
@lru_cache(maxsize=None)
def _smem_optin(index: int) -> int:
    return int(torch.cuda.get_device_properties(index).shared_memory_per_block_optin)


def _optin(device: torch.device) -> int:
    return _smem_optin(device.index if device.index is not None else torch.cuda.current_device())


def boft_supported(z: torch.Tensor, r: torch.Tensor) -> bool:
    """The fused butterfly takes z (CUDA, fp32/bf16/fp16) and fp32 stage matrices r (m, n, b, b) when four
    fp32 rows of one chunk (2^(m-1)·b channels) fit in shared memory (the backward's minimum)."""
    if z.device.type != "cuda" or z.dtype not in ACTIVATION_DTYPES or r.dtype != torch.float32:
        return False
    m, _, b, _ = r.shape
    return 16 * (2 ** (m - 1)) * b <= _optin(z.device)


def cayley_supported(blocks: torch.Tensor) -> bool:
    return blocks.device.type == "cuda" and blocks.dtype in ACTIVATION_DTYPES and blocks.shape[-1] <= MAX_CAYLEY_BLOCK


def lokr_supported(x: torch.Tensor, c1: torch.Tensor, c2: torch.Tensor) -> bool:
    """Linear-layer LoKr with 2-D factors whose backward working set (both factors, W2ᵀ, two gradient
    accumulators and one token's rows, fp32) fits in shared memory."""
    if x.device.type != "cuda" or x.dtype not in ACTIVATION_DTYPES or c1.dim() != 2 or c2.dim() != 2:
        return False
    if c1.dtype not in ACTIVATION_DTYPES or c2.dtype not in ACTIVATION_DTYPES:
        return False
    out_l, in_m = c1.shape
    out_k, in_n = c2.shape
    floats = 2 * out_l * in_m + 3 * out_k * in_n + in_m * in_n + out_l * out_k + 2 * in_m * out_k
    return 4 * floats <= _optin(x.device)


# ----------------------------------------------------------------------------------------------------------
# Entry points for lyfast.functional (same contracts as the PyTorch paths they replace).
# ----------------------------------------------------------------------------------------------------------
def cayley(blocks: torch.Tensor, constraint: float = 0.0) -> torch.Tensor:
    """`lyfast.functional.boft.cayley` with the batched solve on the GPU (fp32)."""
    return torch.ops.lyfast.cuda_cayley(skew(blocks, constraint).float())


def butterfly(z: torch.Tensor, r: torch.Tensor, rescale=None, channel_axis: int = -1) -> torch.Tensor:
    """`lyfast.functional.boft.Butterfly.apply(z, r, rescale, channel_axis)` in one fused kernel each way."""
    out = torch.ops.lyfast.cuda_boft_fwd(as_bos(z, channel_axis), r, rescale)
    return out.reshape(z.shape)


def kron_delta(x: torch.Tensor, c1: torch.Tensor, c2: torch.Tensor) -> torch.Tensor:
    """`lyfast.functional.lokr.KronDelta.apply(x, c1, c2, spec)` for a linear layer: vec(c1·X·c2ᵀ) per token."""
    return torch.ops.lyfast.cuda_lokr_fwd(x, c1, c2, 1.0)
