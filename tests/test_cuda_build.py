"""The CUDA backend without a GPU: csrc/ compiles, and its Python side (lyfast/cuda_ops.py) behaves.

* every csrc/*.cu compiles with nvcc for sm_80 and sm_90a, spill-free and warning-free (-Xptxas -v
  figures are printed with `pytest -s`); bindings.cpp passes g++ -fsyntax-only against the torch wheel's
  headers. The CPU wheel lacks the generated c10/cuda/impl/cuda_cmake_macros.h, so a stub goes in a
  temporary include directory.
* the `lyfast::cuda_*` schemas, fake kernels, CPU reference kernels and autograd registrations exist
  without the compiled library and pass torch.library.opcheck; the reference kernels agree with
  lyfast.functional's autograd, which makes them the contract the CUDA kernels are tested against
  (tests/test_cuda_emulated.py runs the kernels themselves on the CPU).
* loading never compiles on a CPU machine, and `pip install .` stays pure Python.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from torch.library import opcheck

import lyfast.cuda_ops as cuda_ops
from lyfast.functional import boft as fboft
from lyfast.functional import lokr as flokr
from lyfast.functional.general import LayerSpec

ROOT = Path(__file__).resolve().parent.parent
CSRC = ROOT / "csrc"
CU_FILES = sorted(p.name for p in CSRC.glob("*.cu"))
ARCHS = {"sm_80": "arch=compute_80,code=sm_80", "sm_90a": "arch=compute_90a,code=sm_90a"}
NVCC = shutil.which("nvcc")
GXX = shutil.which("g++")
COMPILE_TIMEOUT = 300
OPS = torch.ops.lyfast

STUB = """#pragma once
// Stub of the header CMake generates for c10_cuda (absent from CPU wheels); a shared-library build.
#ifndef C10_CUDA_BUILD_SHARED_LIBS
#define C10_CUDA_BUILD_SHARED_LIBS
#endif
"""


# ----------------------------------------------------------------------------------------------------------
# Compilation
# ----------------------------------------------------------------------------------------------------------
def _torch_includes(stub_root: Path) -> list[str]:
    from torch.utils.cpp_extension import include_paths

    return [f"-I{stub_root}"] + [f"-I{p}" for p in include_paths()]


def _cuda_include() -> Path | None:
    for base in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"),
                 str(Path(NVCC).resolve().parent.parent) if NVCC else None, "/usr/local/cuda"):
        if base and (Path(base) / "include" / "cuda_runtime_api.h").is_file():
            return Path(base) / "include"
    return None


def _run(cmd: list[str]) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=COMPILE_TIMEOUT)
    except subprocess.TimeoutExpired as exc:
        return subprocess.CompletedProcess(cmd, -1, "", f"timed out after {COMPILE_TIMEOUT}s: {exc}")


@pytest.fixture(scope="module")
def builds(tmp_path_factory):
    """Every compile job once, two at a time (2-core CI): {(file, arch) or ("bindings.cpp", "g++"): result}."""
    tmp = tmp_path_factory.mktemp("cuda_build")
    stub = tmp / "stub" / "c10" / "cuda" / "impl" / "cuda_cmake_macros.h"
    stub.parent.mkdir(parents=True)
    stub.write_text(STUB)
    includes = _torch_includes(tmp / "stub")
    jobs = {}
    if NVCC:
        for name in CU_FILES:
            for arch, gencode in ARCHS.items():
                jobs[(name, arch)] = [
                    NVCC, "-c", "-std=c++17", "--expt-relaxed-constexpr", "-O3", "-lineinfo",
                    "-gencode", gencode, "-Xptxas", "-v", "-Xcompiler", "-Wall",
                    *includes, str(CSRC / name), "-o", str(tmp / f"{name}.{arch}.o"),
                ]
    cuda_inc = _cuda_include()
    if GXX and cuda_inc:
        # The standard torch's own extension builds use (C++20 for torch >= 2.10; fine for older ones too).
        jobs[("bindings.cpp", "g++")] = [GXX, "-fsyntax-only", "-std=c++20", "-Wall", "-Wextra", *includes,
                                         f"-I{cuda_inc}", str(CSRC / "bindings.cpp")]
    with ThreadPoolExecutor(max_workers=2) as pool:
        futures = {key: pool.submit(_run, cmd) for key, cmd in jobs.items()}
        return {key: f.result() for key, f in futures.items()}


PTXAS_FN = re.compile(r"Function properties for (\S+)\n\s*(\d+) bytes stack frame, (\d+) bytes spill stores, "
                      r"(\d+) bytes spill loads\n.*?Used (\d+) registers"
                      r"(?:, used \d+ barriers)?(?:, (\d+) bytes smem)?")


def _demangled_kernel(name: str) -> str:
    """`boft_bwd_kernel<bf16>` from an Itanium-mangled name (length-prefixed identifiers)."""
    for m in re.finditer(r"\d+", name):
        ident = name[m.end():m.end() + int(m.group())]
        if ident.endswith("_kernel") and ident.isidentifier():
            t = re.match(r"I(f|6__half|13__nv_bfloat16)E", name[m.end() + len(ident):])
            dtype = {"f": "f32", "6__half": "f16", "13__nv_bfloat16": "bf16"}
            return ident + (f"<{dtype[t.group(1)]}>" if t else "")
    return name


def ptxas_report(stderr: str) -> list[dict]:
    """Per-kernel registers, spills, stack and static shared memory from -Xptxas -v."""
    rows = []
    for m in PTXAS_FN.finditer(stderr):
        rows.append(dict(kernel=_demangled_kernel(m.group(1)), stack=int(m.group(2)), spill_st=int(m.group(3)),
                         spill_ld=int(m.group(4)), regs=int(m.group(5)), smem=int(m.group(6) or 0)))
    return rows


@pytest.mark.skipif(NVCC is None, reason="nvcc is not on PATH (install the CUDA toolkit to check csrc/ compiles)")
@pytest.mark.parametrize("arch", list(ARCHS))
@pytest.mark.parametrize("name", CU_FILES)
def test_cu_compiles(builds, name, arch):
    res = builds[(name, arch)]
    assert res.returncode == 0, f"nvcc {name} for {arch} failed:\n{res.stderr[-6000:]}"
    own_warnings = [ln for ln in res.stderr.splitlines() if "warning" in ln.lower() and "csrc" in ln]
    assert not own_warnings, "warnings in csrc:\n" + "\n".join(own_warnings)
    rows = ptxas_report(res.stderr)
    assert rows, f"no ptxas report for {name}:\n{res.stderr[-2000:]}"
    print(f"\n{name} {arch}:")
    for r in rows:
        print(f"  {r['kernel']:<28} {r['regs']:>3} regs  {r['spill_st']:>3}/{r['spill_ld']} B spill st/ld  "
              f"{r['stack']:>3} B stack  {r['smem']:>4} B static smem")
    spills = [r for r in rows if r["spill_st"] or r["spill_ld"]]
    assert not spills, f"register spills in {name} for {arch}: {spills}"


@pytest.mark.skipif(GXX is None, reason="g++ is not on PATH")
def test_bindings_syntax(builds):
    if ("bindings.cpp", "g++") not in builds:
        pytest.skip("no CUDA include directory (cuda_runtime_api.h) for the c10/cuda headers")
    res = builds[("bindings.cpp", "g++")]
    assert res.returncode == 0, f"g++ -fsyntax-only bindings.cpp failed:\n{res.stderr[-6000:]}"
    own = [ln for ln in res.stderr.splitlines() if "bindings.cpp" in ln and "warning" in ln]
    assert not own, "warnings in bindings.cpp:\n" + "\n".join(own)


def test_bindings_register_every_op():
    """bindings.cpp implements exactly the ops cuda_ops.py defines, for the CUDA key, and defines none."""
    src = (CSRC / "bindings.cpp").read_text()
    assert "TORCH_LIBRARY_IMPL(lyfast, CUDA, m)" in src
    assert not re.search(r"TORCH_LIBRARY(_FRAGMENT)?\s*\(", src), "schemas belong to lyfast/cuda_ops.py"
    assert set(re.findall(r'm\.impl\("(\w+)"', src)) == set(cuda_ops.OPS)
    assert "ATen/cuda/CUDAContext.h" not in src  # needs cuBLAS/cuSPARSE headers the CPU wheel lacks


# ----------------------------------------------------------------------------------------------------------
# Schemas, fakes, opcheck
# ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(cuda_ops.OPS))
def test_schema_registered(name):
    op = getattr(OPS, name).default
    assert str(op._schema) == f"lyfast::{name}{cuda_ops.OPS[name]}"


def _boft_args(dtype=torch.float32, spatial=1, m=3, n=4, b=6, batch=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(m, n, b, b, generator=g) * 0.2
    r = OPS.cuda_cayley((a - a.mT).contiguous())
    z = torch.randn(batch, n * b, spatial, generator=g).to(dtype)
    rescale = (1 + 0.1 * torch.randn(n * b, 1, generator=g)).to(dtype)
    return z, r, rescale


def _lokr_args(dtype=torch.float32, seed=0, lead=(2, 5), out_l=3, in_m=4, out_k=5, in_n=6):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*lead, in_m * in_n, generator=g).to(dtype)
    return x, torch.randn(out_l, in_m, generator=g).to(dtype), torch.randn(out_k, in_n, generator=g).to(dtype)


def test_fakes_on_cuda_devices():
    """Under FakeTensorMode the ops give the CUDA kernels' output metadata, no kernel runs."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        z = torch.empty(4, 24, 7, dtype=torch.bfloat16, device="cuda")
        r = torch.empty(3, 4, 6, 6, device="cuda")
        s = torch.empty(24, 1, 1, dtype=torch.bfloat16, device="cuda")
        out = OPS.cuda_boft_fwd(z, r, s)
        assert (out.shape, out.dtype, out.device.type) == (z.shape, z.dtype, "cuda")
        dz, dr, ds = OPS.cuda_boft_bwd(out, z, r, s, True, True, True)
        assert dz.shape == z.shape and dr.shape == r.shape and dr.dtype == torch.float32 and ds.shape == s.shape
        dz, dr, ds = OPS.cuda_boft_bwd(out, z, r, None, False, True, False)
        assert dz.numel() == 0 and ds.numel() == 0 and dr.shape == r.shape
        assert OPS.cuda_cayley(r).shape == r.shape and OPS.cuda_cayley_bwd(r, r).shape == r.shape
        x = torch.empty(2, 77, 24, dtype=torch.float16, device="cuda")
        w1, w2 = torch.empty(3, 4, device="cuda"), torch.empty(5, 6, device="cuda")
        y = OPS.cuda_lokr_fwd(x, w1, w2, 0.5)
        assert (y.shape, y.dtype) == ((2, 77, 15), torch.float16)
        dx, dw1, dw2 = OPS.cuda_lokr_bwd(y, x, w1, w2, 0.5, True, True)
        assert dx.shape == x.shape and dw1.shape == w1.shape and dw2.shape == w2.shape


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_opcheck_boft(dtype):
    z, r, s = _boft_args(dtype, spatial=5)
    q = (r - r.mT).contiguous()
    opcheck(OPS.cuda_cayley, (q.requires_grad_(),))
    opcheck(OPS.cuda_cayley_bwd, (r, torch.randn_like(r)))
    opcheck(OPS.cuda_boft_fwd, (z.requires_grad_(), r.requires_grad_(), s.requires_grad_()))
    opcheck(OPS.cuda_boft_fwd, (z.detach(), r.detach(), None))
    for needs in ((True, True, True), (False, True, False), (True, False, False)):
        opcheck(OPS.cuda_boft_bwd, (torch.randn_like(z), z.detach(), r.detach(), s.detach(), *needs))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_opcheck_lokr(dtype):
    x, w1, w2 = _lokr_args(dtype)
    opcheck(OPS.cuda_lokr_fwd, (x.requires_grad_(), w1.requires_grad_(), w2.requires_grad_(), 0.5))
    grad = torch.randn(2, 5, 15).to(dtype)
    for needs in ((True, True), (True, False), (False, True)):
        opcheck(OPS.cuda_lokr_bwd, (grad, x.detach(), w1.detach(), w2.detach(), 0.5, *needs))


# ----------------------------------------------------------------------------------------------------------
# The CPU reference kernels are the functional paths' math (so the emulated kernels are checked against
# what lyfast.functional computes).
# ----------------------------------------------------------------------------------------------------------
def _grads(out, inputs, seed=1):
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed)).to(out.dtype)
    return torch.autograd.grad(out, inputs, g)


def assert_close(a, e, rel, name):
    err = (a.double() - e.double()).abs().max().item()
    assert err <= rel * max(e.abs().max().item(), 1e-30), f"{name}: max |err| {err:.3e}"


@pytest.mark.parametrize("constraint", [0.0, 0.05])
def test_cayley_entry_matches_functional(constraint):
    g = torch.Generator().manual_seed(0)
    blocks = (torch.randn(3, 4, 6, 6, generator=g) * 0.1).requires_grad_()
    got = cuda_ops.cayley(blocks, constraint)
    ref = fboft.cayley(blocks, constraint)
    assert_close(got, ref, 1e-5, "R")
    (dg,), (dr,) = _grads(got, [blocks]), _grads(ref, [blocks])
    assert_close(dg, dr, 1e-4, "d blocks")


@pytest.mark.parametrize("layer", ["linear", "conv"])
@pytest.mark.parametrize("with_rescale", [True, False])
def test_butterfly_entry_matches_functional(layer, with_rescale):
    z, r, s = _boft_args()
    if layer == "linear":
        z, axis = torch.randn(2, 7, 24), -1  # (batch, tokens, channels)
    else:
        z, axis = torch.randn(2, 24, 3, 5), 1
    s = s if with_rescale else None
    leaves = [z.requires_grad_(), r.requires_grad_()] + ([s.requires_grad_()] if with_rescale else [])
    got = cuda_ops.butterfly(z, r, s, channel_axis=axis)
    ref = fboft.Butterfly.apply(z, r, s, axis)
    assert got.shape == z.shape
    assert_close(got, ref, 1e-6, "out")
    for a, e, name in zip(_grads(got, leaves), _grads(ref, leaves), ("dz", "dR", "drescale")):
        assert_close(a, e, 1e-5, name)


def test_kron_delta_entry_matches_functional():
    x, w1, w2 = _lokr_args()
    leaves = [x.requires_grad_(), w1.requires_grad_(), w2.requires_grad_()]
    scale = torch.tensor(0.7, requires_grad=True)
    spec = LayerSpec("linear", 15, 24)
    got = cuda_ops.kron_delta(x, w1 * scale, w2)  # the functional path folds the scale into W1
    ref = flokr.KronDelta.apply(x, w1 * scale, w2, spec)
    assert_close(got, ref, 1e-6, "y")
    names = ("dx", "dW1", "dW2", "dscale")
    for a, e, name in zip(_grads(got, leaves + [scale]), _grads(ref, leaves + [scale]), names):
        assert_close(a, e, 1e-5, name)


def test_lokr_reference_scale_argument():
    """The op's own `scale` (the CUDA kernels apply it in the epilogue) equals scaling W1."""
    x, w1, w2 = _lokr_args()
    leaves = [x.requires_grad_(), w1.requires_grad_(), w2.requires_grad_()]
    got = OPS.cuda_lokr_fwd(x, w1, w2, 0.3)
    ref = OPS.cuda_lokr_fwd(x, w1 * 0.3, w2, 1.0)
    assert_close(got, ref, 1e-6, "y")
    for a, e, name in zip(_grads(got, leaves), _grads(ref, leaves), ("dx", "dW1", "dW2")):
        assert_close(a, e, 1e-5, name)


@pytest.fixture
def cuda_route(monkeypatch):
    """Force the CUDA backend on CPU tensors: resolve() answers CUDA for backend="cuda" (TORCH otherwise) and
    the shape envelopes accept, so the hooks in lyfast.functional call lyfast.cuda_ops, whose ops then run
    their CPU reference kernels. Returns the names of the cuda_ops entry points that were called."""
    from lyfast import backend as B

    calls = []
    monkeypatch.setattr(B, "resolve", lambda device, op=None, backend=None:
                        B.Backend.CUDA if backend == "cuda" else B.Backend.TORCH)
    for name in ("boft_supported", "cayley_supported", "lokr_supported"):
        monkeypatch.setattr(cuda_ops, name, lambda *args: True)
    for name in ("butterfly", "cayley", "kron_delta"):
        fn = getattr(cuda_ops, name)
        monkeypatch.setattr(cuda_ops, name, lambda *a, _fn=fn, _name=name, **k: calls.append(_name) or _fn(*a, **k))
    return calls


@pytest.mark.parametrize("layer", ["linear", "conv"])
def test_rotate_hook(cuda_route, layer):
    z = torch.randn(2, 7, 24) if layer == "linear" else torch.randn(2, 24, 3, 5)
    axis = -1 if layer == "linear" else 1
    blocks = (torch.randn(3, 4, 6, 6, generator=torch.Generator().manual_seed(0)) * 0.1).requires_grad_()
    rescale = (1 + 0.1 * torch.randn(24, 1)).requires_grad_()
    leaves = [z.requires_grad_(), blocks, rescale]
    got = fboft.rotate(z, blocks, rescale, 0.05, 0.8, channel_axis=axis, backend="cuda")
    assert cuda_route == ["cayley", "butterfly"]
    ref = fboft.rotate(z, blocks, rescale, 0.05, 0.8, channel_axis=axis, backend="torch")
    assert_close(got, ref, 1e-5, "out")
    for a, e, name in zip(_grads(got, leaves), _grads(ref, leaves), ("dz", "d blocks", "drescale")):
        assert_close(a, e, 1e-4, name)


def test_lokr_hook(cuda_route):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 5, 24, generator=g).requires_grad_()
    w1 = torch.randn(3, 4, generator=g).requires_grad_()
    w2a, w2b = torch.randn(5, 2, generator=g).requires_grad_(), torch.randn(2, 6, generator=g).requires_grad_()
    spec = LayerSpec("linear", 15, 24)
    leaves = [x, w1, w2a, w2b]
    got = flokr.delta_forward(x, w1, None, None, None, w2a, w2b, None, 0.5, spec=spec, backend="cuda")
    assert cuda_route == ["kron_delta"]
    ref = flokr.delta_forward(x, w1, None, None, None, w2a, w2b, None, 0.5, spec=spec, backend="torch")
    assert_close(got, ref, 1e-6, "y")
    for a, e, name in zip(_grads(got, leaves), _grads(ref, leaves), ("dx", "dW1", "dW2a", "dW2b")):
        assert_close(a, e, 1e-5, name)


# ----------------------------------------------------------------------------------------------------------
# Loading, probes and packaging on a machine without CUDA
# ----------------------------------------------------------------------------------------------------------
@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the behaviour without a GPU")
def test_load_never_compiles_without_cuda(monkeypatch):
    def boom():
        raise AssertionError("load() must not compile on a machine without CUDA")

    monkeypatch.setattr(cuda_ops, "_jit_build", boom)
    assert cuda_ops.load(jit=False) is False
    assert cuda_ops.load(jit=True) is False
    why = cuda_ops.load_error()
    assert "CPU build" in why or "no CUDA device" in why
    assert not cuda_ops.loaded()


@pytest.mark.skipif(torch.version.cuda is not None, reason="checks a CPU build of torch")
def test_dispatch_without_the_extension(monkeypatch):
    """On a CPU machine an explicit `cuda` request fails with the reason and compiles nothing, also for
    CUDA-device calls; `auto` never picks CUDA (and probes without compiling)."""
    from lyfast import backend as B

    def boom():
        raise AssertionError("the dispatcher must not compile on a machine without CUDA")

    monkeypatch.setattr(cuda_ops, "_jit_build", boom)
    for device in ("cpu", "cuda"):
        with pytest.raises(B.BackendUnavailableError, match="'cuda' was requested"):
            B.resolve(device, "boft", "cuda")
    with pytest.raises(B.BackendUnavailableError, match="CPU build"):
        B.resolve("cuda", "lokr", "cuda")
    assert B.resolve("cpu", "lokr", "auto") == B.Backend.TORCH
    assert B.resolve("cuda", "boft", "auto") != B.Backend.CUDA
    assert B.implements(B.Backend.CUDA, "boft") and B.implements(B.Backend.CUDA, "lokr")
    assert not B.implements(B.Backend.CUDA, "loha")


def test_supported_predicates_reject_cpu_tensors():
    z, r, _ = _boft_args()
    x, w1, w2 = _lokr_args()
    assert not cuda_ops.boft_supported(z, r)
    assert not cuda_ops.cayley_supported(r)
    assert not cuda_ops.lokr_supported(x, w1, w2)


def test_setup_skips_extension_on_cpu_torch():
    """`pip install .` on a CPU machine is pure Python: get_extensions() returns nothing and says why."""
    env = dict(os.environ)
    env.pop("LYFAST_BUILD_CUDA", None)
    proc = subprocess.run([sys.executable, "setup.py", "--name"], cwd=ROOT, capture_output=True, text=True,
                          env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    if torch.version.cuda is None:
        assert "skipping the CUDA extension" in proc.stdout
    env["LYFAST_BUILD_CUDA"] = "0"
    proc = subprocess.run([sys.executable, "setup.py", "--name"], cwd=ROOT, capture_output=True, text=True,
                          env=env, timeout=120)
    assert "LYFAST_BUILD_CUDA=0, skipping the CUDA extension" in proc.stdout
