"""The CUDA kernels of csrc/ executed on the CPU, checked against the ops' reference contract.

There is no GPU in CI, so csrc/boft.cu and csrc/lokr.cu are compiled as C++ with g++ against
tests/cuda_emu/ (a CPU emulation of the CUDA runtime slice they use: every thread block runs as blockDim
std::threads sharing one shared-memory buffer and a real barrier) and called through ctypes. The kernels'
index math, tiling plans (rows per tile, checkpoints, tokens per tile, persistent grids, shared-memory
opt-in), barrier placement and atomics run as written; the expected values are the CPU reference kernels
of `lyfast.cuda_ops` (which test_cuda_build.py checks against lyfast.functional's autograd). Warp
lock-step, the GPU memory model and speed are not covered here.
"""
from __future__ import annotations

import ctypes
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

import lyfast.cuda_ops  # noqa: F401  (registers the ops and their CPU reference kernels)

ROOT = Path(__file__).resolve().parent.parent
CSRC = ROOT / "csrc"
EMU = Path(__file__).resolve().parent / "cuda_emu"
OPS = torch.ops.lyfast
DTYPE_CODE = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
H100_OPTIN = 227 * 1024

pytestmark = pytest.mark.skipif(shutil.which("g++") is None, reason="g++ is not on PATH")


def _emulated_source(path: Path) -> str:
    """`k<<<g, b, s, st>>>(args)` -> `::emu::launch(k, g, b, s, st, args)`; dynamic shared memory from the block."""
    src = path.read_text()
    src, launches = re.subn(r"(\w+)\s*<<<(.*?)>>>\s*\(", r"::emu::launch(\1, \2, ", src)
    src, smem = re.subn(r"extern __shared__ (\w+) (\w+)\[\];", r"\1* \2 = ::emu::dynamic_smem<\1>();", src)
    assert launches and smem, f"{path.name}: no kernel launch / dynamic shared memory found to emulate"
    return f'#line 1 "{path}"\n' + src


def _emulated_units(out: Path) -> list[Path]:
    units = [EMU / "emu_api.cpp"]
    for name in ("boft.cu", "lokr.cu"):
        unit = out / (name[:-3] + ".cpp")
        unit.write_text(_emulated_source(CSRC / name))
        units.append(unit)
    return units


def _gxx(units, out, *flags):
    cmd = ["g++", "-std=c++20", "-pthread", "-D__CUDACC__", f"-I{EMU}", f"-I{CSRC}", *flags, *map(str, units),
           "-o", str(out)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=240)


@pytest.fixture(scope="module")
def emu(tmp_path_factory):
    out = tmp_path_factory.mktemp("cuda_emu")
    lib = out / "libemu.so"
    proc = _gxx(_emulated_units(out), lib, "-O2", "-fPIC", "-shared")
    if proc.returncode != 0 and "_Float16" in proc.stderr:
        pytest.skip("this g++ has no _Float16 (needed by the fp16 emulation)")
    assert proc.returncode == 0, f"emulation build failed:\n{proc.stderr[-4000:]}"
    return Emulator(ctypes.CDLL(str(lib)))


class Emulator:
    """ctypes front of tests/cuda_emu/emu_api.cpp."""

    def __init__(self, lib):
        self.lib = lib
        lib.emu_last_error.restype = ctypes.c_char_p
        self.configure()

    def configure(self, smem_optin=H100_OPTIN, sms=2, blocks_per_sm=1, block_order=0):
        """Device limits the launchers plan for; `block_order` != 0 runs each grid's blocks in an order
        shuffled with that seed (0: grid order)."""
        self.lib.emu_configure(smem_optin, sms, blocks_per_sm)
        self.lib.emu_block_order(ctypes.c_uint(block_order))

    def cayley(self, q):
        r = torch.empty_like(q)
        b = q.shape[-1]
        self._typed("emu_cayley_forward", [q, r, q.numel() // (b * b), b], "ppqi")
        return r

    def cayley_bwd(self, r, g):
        dq = torch.empty_like(r)
        b = r.shape[-1]
        self._typed("emu_cayley_backward", [r, g, dq, r.numel() // (b * b), b], "pppqi")
        return dq

    def boft_fwd(self, z, r, rescale):
        m, n, b, _ = r.shape
        out = torch.empty_like(z)
        rt = r.mT.contiguous()
        s = rescale.float().contiguous() if rescale is not None else None
        self._typed("emu_boft_forward", [DTYPE_CODE[z.dtype], z, out, rt, s, *z.shape, m, n, b],
                    "ipppp" + "qqq" + "iii")
        return out

    def boft_bwd(self, grad, z, r, rescale, need_z, need_r, need_s):
        m, n, b, _ = r.shape
        dz = torch.empty_like(z) if need_z else None
        dr = torch.zeros_like(r) if need_r else None
        ds = torch.zeros(z.shape[1]) if need_s else None
        s = rescale.float().contiguous() if rescale is not None else None
        self._typed("emu_boft_backward",
                    [DTYPE_CODE[z.dtype], grad, z, r, r.mT.contiguous(), s, dz, dr, ds, *z.shape, m, n, b],
                    "i" + "p" * 8 + "qqq" + "iii")
        return dz, dr, ds

    def lokr_fwd(self, x, w1, w2, scale):
        y = x.new_empty((*x.shape[:-1], w1.shape[0] * w2.shape[0]))
        tokens = x.numel() // x.shape[-1]
        self._typed("emu_lokr_forward", [DTYPE_CODE[x.dtype], x, w1, w2, y, scale, tokens, *w1.shape, *w2.shape],
                    "ippppf" + "q" + "iiii")
        return y

    def lokr_bwd(self, grad, x, w1, w2, scale, need_x, need_w):
        dx = torch.empty_like(x) if need_x else None
        dw1 = torch.zeros_like(w1) if need_w else None
        dw2 = torch.zeros_like(w2) if need_w else None
        tokens = x.numel() // x.shape[-1]
        self._typed("emu_lokr_backward",
                    [DTYPE_CODE[x.dtype], grad, x, w1, w2, scale, dx, dw1, dw2, tokens, *w1.shape, *w2.shape],
                    "ipppp" + "f" + "ppp" + "q" + "iiii")
        return dx, dw1, dw2

    def _typed(self, fn, args, sig):
        ctypes_of = {"p": ctypes.c_void_p, "q": ctypes.c_int64, "i": ctypes.c_int, "f": ctypes.c_float}
        assert len(args) == len(sig), (fn, len(args), sig)
        f = getattr(self.lib, fn)
        f.argtypes = [ctypes_of[c] for c in sig]
        f.restype = ctypes.c_int
        vals = []
        for a, c in zip(args, sig):
            if c == "p":
                if a is not None:
                    assert a.is_contiguous() and a.device.type == "cpu"
                vals.append(None if a is None else a.data_ptr())
            else:
                vals.append(a)
        if f(*vals) != 0:
            raise RuntimeError(self.lib.emu_last_error().decode())


def assert_close(actual, expected, *, rel, name):
    a, e = actual.double(), expected.double()
    scale = max(e.abs().max().item(), 1e-30)
    err = (a - e).abs().max().item()
    assert torch.isfinite(a).all(), f"{name}: non-finite values"
    assert err <= rel * scale, f"{name}: max |err| {err:.3e} > {rel:g}·max|ref| ({rel * scale:.3e})"


# Tolerances: fp32 kernels vs the fp32 reference differ only in summation order. 16-bit outputs are the
# same fp32 result rounded once, so they may differ by one rounding step where the two fp32 values straddle
# a rounding boundary.
REL = {torch.float32: 2e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}


# ----------------------------------------------------------------------------------------------------------
# Cayley
# ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("b", [2, 6, 10, 64])
def test_cayley(emu, b):
    torch.manual_seed(b)
    a = torch.randn(5, b, b) * 0.3
    q = (a - a.mT).contiguous()
    r = emu.cayley(q)
    assert_close(r, OPS.cuda_cayley(q), rel=2e-5, name=f"R (b={b})")
    eye = torch.eye(b)
    assert_close(r @ r.mT, eye.expand_as(r), rel=1e-5, name="RRᵀ = I")
    g = torch.randn_like(r)
    assert_close(emu.cayley_bwd(r, g), OPS.cuda_cayley_bwd(r, g), rel=2e-5, name=f"dQ (b={b})")


def test_cayley_pivots(emu):
    """I − Q with a zero leading entry: plain Gauss–Jordan divides by zero, partial pivoting does not."""
    b = 6
    perm = torch.eye(b)[torch.randperm(b, generator=torch.Generator().manual_seed(0))]
    perm = perm[[1, 0, 2, 3, 4, 5]] if perm[0, 0] != 0 else perm.roll(1, 0)
    q = (torch.eye(b) - perm).unsqueeze(0).contiguous()  # I − Q = P
    r = emu.cayley(q)
    assert_close(r, 2 * perm.mT - torch.eye(b), rel=1e-6, name="R = 2Pᵀ − I")


# ----------------------------------------------------------------------------------------------------------
# BOFT butterfly
# ----------------------------------------------------------------------------------------------------------
# (channels, b, m, batch, spatial): full-width chunks, several chunks (m below its maximum), a conv-like
# spatial axis, the smallest block, an SDXL-like block of 10, a 1-row input, a single stage, a block of 64.
BOFT_CASES = [
    (24, 6, 3, 5, 1),
    (48, 6, 2, 7, 1),
    (16, 4, 3, 2, 9),
    (8, 2, 3, 3, 1),
    (80, 10, 4, 9, 1),
    (40, 10, 3, 1, 1),
    (12, 6, 1, 3, 1),
    (128, 64, 2, 3, 1),
]


def _boft_inputs(channels, b, m, batch, spatial, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    n = channels // b
    a = torch.randn(m, n, b, b, generator=g) * 0.2
    r = OPS.cuda_cayley((a - a.mT).contiguous())
    r = 0.8 * r + 0.2 * torch.eye(b)  # a multiplier: not orthogonal, as with scale != 1
    z = torch.randn(batch, channels, spatial, generator=g).to(dtype)
    rescale = (1 + 0.1 * torch.randn(channels, 1, generator=g)).to(dtype)
    grad = torch.randn(batch, channels, spatial, generator=g).to(dtype)
    return z, r.contiguous(), rescale, grad


@pytest.mark.parametrize("case", BOFT_CASES, ids=lambda c: "O{}-b{}-m{}-{}x{}".format(*c))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_boft_forward(emu, case, dtype):
    z, r, rescale, _ = _boft_inputs(*case, dtype)
    for s in (rescale, None):
        assert_close(emu.boft_fwd(z, r, s), OPS.cuda_boft_fwd(z, r, s), rel=REL[dtype], name=f"out {dtype}")


@pytest.mark.parametrize("case", BOFT_CASES, ids=lambda c: "O{}-b{}-m{}-{}x{}".format(*c))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_boft_backward(emu, case, dtype):
    z, r, rescale, grad = _boft_inputs(*case, dtype)
    dz, dr, ds = emu.boft_bwd(grad, z, r, rescale, True, True, True)
    rz, rr, rs = OPS.cuda_boft_bwd(grad, z, r, rescale, True, True, True)
    assert_close(dz, rz, rel=REL[dtype], name="dz")
    assert_close(dr, rr, rel=1e-4, name="dR")  # fp32 sums over rows in another order
    # the reference rounds drescale to rescale's dtype; the emulated call returns the fp32 sums
    assert_close(ds.reshape(rs.shape), rs.float(), rel=max(REL[rescale.dtype], 1e-4), name="drescale")


@pytest.mark.parametrize(
    "optin, what",
    [(4 * 1 * 80 * 4, "1 row per tile, 1 checkpoint: every stage input replayed"),
     (5 * 2 * 80 * 4, "2 rows per tile, 2 checkpoints"),
     (H100_OPTIN, "8 rows per tile, all checkpoints")],
    ids=["replay-all", "replay-some", "no-replay"],
)
@pytest.mark.parametrize("needs", [(True, True, True), (True, False, False), (False, True, False),
                                   (False, False, True)], ids=lambda n: "z{}r{}s{}".format(*map(int, n)))
def test_boft_backward_plans(emu, optin, what, needs):
    """Shared-memory limits force the backward's other plans (the replay from checkpoints)."""
    z, r, rescale, grad = _boft_inputs(80, 10, 4, 11, 1, torch.float32, seed=3)
    emu.configure(smem_optin=optin)
    try:
        got = emu.boft_bwd(grad, z, r, rescale, *needs)
    finally:
        emu.configure()
    ref = OPS.cuda_boft_bwd(grad, z, r, rescale, *needs)
    for name, g, e, need in zip(("dz", "dR", "drescale"), got, ref, needs):
        if need:
            assert_close(g.reshape(e.shape), e, rel=1e-4, name=f"{name} ({what})")


@pytest.mark.parametrize("sms", [1, 3, 8], ids=lambda n: f"{n}sm")
@pytest.mark.parametrize("case", [(80, 10, 4, 41, 1), (48, 6, 2, 13, 5)], ids=["1chunk-6tiles", "4chunks-conv"])
def test_boft_backward_bitwise_in_any_block_order(emu, case, sms):
    """dR and drescale are summed per row group in a fixed order, with no atomics, so they come out
    bit-identical whatever order the blocks run in (seeded shuffles of each grid stand in for a GPU's
    scheduler; with the former atomicAdd per row tile they differed), and match the reference whether one
    row group writes them directly (1 SM, or 4 chunks on 3 SMs) or 2-6 groups carry partials across their
    tiles and a second kernel sums them."""
    z, r, rescale, grad = _boft_inputs(*case, torch.float32, seed=7)
    runs = []
    try:
        for order in (0, 1, 2):
            emu.configure(sms=sms, block_order=order)
            runs.append(emu.boft_bwd(grad, z, r, rescale, True, True, True))
    finally:
        emu.configure()
    names = ("dz", "dR", "drescale")
    for name, got, ref in zip(names, runs[0], OPS.cuda_boft_bwd(grad, z, r, rescale, True, True, True)):
        assert_close(got.reshape(ref.shape), ref, rel=1e-4, name=f"{name} ({sms} SMs)")
    for order, run in enumerate(runs[1:], 1):
        differ = [n for n, a, b in zip(names, runs[0], run) if not torch.equal(a, b)]
        assert not differ, f"block order {order} changed {differ} ({sms} SMs)"


def test_boft_forward_small_smem(emu):
    z, r, rescale, _ = _boft_inputs(80, 10, 4, 6, 1, torch.float32)
    emu.configure(smem_optin=2 * 80 * 4)  # one row per tile
    try:
        out = emu.boft_fwd(z, r, rescale)
    finally:
        emu.configure()
    assert_close(out, OPS.cuda_boft_fwd(z, r, rescale), rel=2e-5, name="out (1 row per tile)")


def test_boft_chunk_too_large_is_an_error(emu):
    z, r, rescale, grad = _boft_inputs(80, 10, 4, 2, 1, torch.float32)
    emu.configure(smem_optin=4 * 80 * 4 - 4)
    try:
        with pytest.raises(RuntimeError, match="chunk too large"):
            emu.boft_bwd(grad, z, r, rescale, True, True, True)
    finally:
        emu.configure()


# ----------------------------------------------------------------------------------------------------------
# LoKr
# ----------------------------------------------------------------------------------------------------------
# (tokens, out_l, in_m, out_k, in_n): several persistent tiles, one token, square balanced factors,
# non-square odd factors.
LOKR_CASES = [(37, 3, 4, 5, 6), (1, 2, 2, 2, 2), (50, 8, 4, 6, 10), (19, 5, 7, 3, 9)]


def _lokr_inputs(tokens, out_l, in_m, out_k, in_n, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, in_m * in_n, generator=g).to(dtype)
    w1 = torch.randn(out_l, in_m, generator=g)
    w2 = torch.randn(out_k, in_n, generator=g)
    grad = torch.randn(tokens, out_l * out_k, generator=g).to(dtype)
    return x, w1, w2, grad


@pytest.mark.parametrize("case", LOKR_CASES, ids=lambda c: "t{}-{}x{}-{}x{}".format(*c))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_lokr_forward(emu, case, dtype):
    x, w1, w2, _ = _lokr_inputs(*case, dtype)
    assert_close(emu.lokr_fwd(x, w1, w2, 0.75), OPS.cuda_lokr_fwd(x, w1, w2, 0.75), rel=REL[dtype], name="y")


@pytest.mark.parametrize("case", LOKR_CASES, ids=lambda c: "t{}-{}x{}-{}x{}".format(*c))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("needs", [(True, True), (True, False), (False, True)],
                         ids=lambda n: "x{}w{}".format(*map(int, n)))
def test_lokr_backward(emu, case, dtype, needs):
    x, w1, w2, grad = _lokr_inputs(*case, dtype)
    got = emu.lokr_bwd(grad, x, w1, w2, 0.75, *needs)
    ref = OPS.cuda_lokr_bwd(grad, x, w1, w2, 0.75, *needs)
    need = (needs[0], needs[1], needs[1])
    for name, g, e, n in zip(("dx", "dW1", "dW2"), got, ref, need):
        if n:
            assert_close(g, e, rel=REL[dtype] if name == "dx" else 1e-4, name=name)


@pytest.mark.parametrize("tokens_per_tile", [1, 2, 16])
def test_lokr_tile_plans(emu, tokens_per_tile):
    """Tokens per tile (1, 2, 16) set through the shared-memory limit; grid of 3 persistent blocks."""
    x, w1, w2, grad = _lokr_inputs(23, 3, 4, 5, 6, torch.float32, seed=5)
    in_, out = 24, 15
    bwd = 2 * 3 * 4 + 3 * 5 * 6 + tokens_per_tile * (in_ + out) + 2 * tokens_per_tile * 4 * 5
    emu.configure(smem_optin=4 * bwd, sms=3)
    try:
        y = emu.lokr_fwd(x, w1, w2, 1.5)
        got = emu.lokr_bwd(grad, x, w1, w2, 1.5, True, True)
    finally:
        emu.configure()
    assert_close(y, OPS.cuda_lokr_fwd(x, w1, w2, 1.5), rel=2e-5, name="y")
    for name, g, e in zip(("dx", "dW1", "dW2"), got, OPS.cuda_lokr_bwd(grad, x, w1, w2, 1.5, True, True)):
        assert_close(g, e, rel=2e-5, name=name)


# ----------------------------------------------------------------------------------------------------------
# Races
# ----------------------------------------------------------------------------------------------------------
def test_no_data_races(tmp_path):
    """ThreadSanitizer over every launcher in the emulated runtime (cuda_emu/race_main.cpp): a shared-memory
    race between threads of one block, e.g. a missing __syncthreads, fails this test."""
    exe = tmp_path / "race_main"
    proc = _gxx(_emulated_units(tmp_path) + [EMU / "race_main.cpp"], exe, "-O1", "-g", "-fsanitize=thread")
    if proc.returncode != 0 and "tsan" in proc.stderr.lower():
        pytest.skip(f"ThreadSanitizer is not available: {proc.stderr[-300:]}")
    assert proc.returncode == 0, f"race-check build failed:\n{proc.stderr[-4000:]}"
    run = subprocess.run([str(exe)], capture_output=True, text=True, timeout=240)
    if "FATAL: ThreadSanitizer" in run.stderr:  # e.g. an address-space layout TSan cannot run in
        pytest.skip(f"ThreadSanitizer cannot run here: {run.stderr[:300]}")
    assert run.returncode == 0 and "ThreadSanitizer" not in run.stderr, run.stderr[-6000:]
    assert "race check finished" in run.stdout
