"""The accuracy bound every fused kernel is held to, shared by the interpreter tests
(tests/test_triton_kernels.py) and the GPU suite (tests/test_gpu_kernels.py)."""
from __future__ import annotations

import torch

EPS = {torch.float32: 2.0**-23, torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}


def assert_within_eager(name, got, eager, ref, dtype, factor=2.0, ulps=8):
    """|got - ref| <= factor·|eager - ref| + ulps·eps(dtype)·max|ref| (max norms), verbose on failure."""
    assert got.dtype == eager.dtype, f"{name}: dtype {got.dtype}, eager path gives {eager.dtype}"
    assert got.shape == ref.shape, f"{name}: shape {tuple(got.shape)} != {tuple(ref.shape)}"
    ref = ref.double()
    err = (got.double() - ref).abs().max().item() if ref.numel() else 0.0
    base = (eager.double() - ref).abs().max().item() if ref.numel() else 0.0
    scale = ref.abs().max().item() if ref.numel() else 0.0
    tol = factor * base + ulps * EPS[dtype] * scale
    assert err <= tol, (
        f"{name} ({dtype}): max error {err:.3e} vs fp64 reference exceeds {tol:.3e} "
        f"(eager PyTorch error {base:.3e}, max|ref| {scale:.3e}, ratio {err / max(base, 1e-300):.2f})"
    )
