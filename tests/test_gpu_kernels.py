"""GPU correctness of the fused backends on SDXL layer shapes, in fp32, bf16, fp16 and bf16 autocast over
fp32 weights (issue 4, part 6).

Skipped without CUDA (CI has no GPU). On a GPU: `python -m pytest tests/test_gpu_kernels.py`. Each case
builds one adapter module on an SDXL-shaped frozen nn.Linear, runs forward and backward

  * on the fused backend under test (Triton; CUDA when lyfast._C is built) in the case's dtype,
  * on the PyTorch backend in the same dtype (the eager error this repo's tolerance is stated against),
  * on the PyTorch backend in fp64 (the reference),

and requires every output and gradient (input and every adapter parameter) to be within 2× the eager
error of the fp64 reference (plus a few ulps of the result's scale), as tests/test_triton_kernels.py
does on the interpreter. LoHa is run at ranks whose routes differ (Khatri-Rao at r = 4; the cost model's
choice at 8, 16, 32, which is the tile-generation route on an H100 for most shapes), and each route
is also pinned.

LYFAST_GPU_TEST_DEVICE=cpu runs the same checks through Triton's interpreter on tiny shapes, to check
this file itself without a GPU (slow; not part of `make test`).
"""
from __future__ import annotations

import copy
import os

import pytest
import torch
import torch.nn as nn

import lyfast

DEVICE = os.environ.get("LYFAST_GPU_TEST_DEVICE", "cuda")
if DEVICE == "cuda" and not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU (LYFAST_GPU_TEST_DEVICE=cpu checks this file on tiny shapes)", allow_module_level=True)
pytest.importorskip("triton", reason="the Triton backend needs the `triton` package")

from kernel_checks import assert_within_eager  # noqa: E402

DTYPES = [torch.float32, torch.bfloat16, torch.float16, "amp-bf16"]  # amp: fp32 weights, bf16 autocast

# (in, out, tokens) of the SDXL layers at batch 1; tiny stand-ins on the interpreter.
if DEVICE == "cuda":
    SHAPES = {
        "1280x1280": (1280, 1280, 1024),
        "1280x10240": (1280, 10240, 1024),
        "5120x1280": (5120, 1280, 1024),
        "640x5120": (640, 5120, 4096),
        "2048x1280_text": (2048, 1280, 77),
    }
else:
    SHAPES = {"tiny": (64, 96, 5), "tiny_wide": (96, 64, 3)}

SETTINGS = {
    "loha-r4-kr": ("loha", dict(lora_dim=4, alpha=4), "khatri_rao"),
    "loha-r8": ("loha", dict(lora_dim=8, alpha=8), "auto"),
    "loha-r16-tile": ("loha", dict(lora_dim=16, alpha=16), "tile"),
    "loha-r32": ("loha", dict(lora_dim=32, alpha=32), "auto"),
    "lokr-f-1-r16": ("lokr", dict(lora_dim=16, alpha=16, factor=-1), None),
    "lokr-f8": ("lokr", dict(lora_dim=4, alpha=1, factor=8, decompose_both=True), None),
    "boft-b32": ("boft", dict(lora_dim=32, alpha=1, rescaled=True), None),
}
CLASSES = {"loha": lyfast.LohaModule, "lokr": lyfast.LokrModule, "boft": lyfast.ButterflyOFTModule}


def _backends():
    out = ["triton"]
    ok, _ = lyfast.backend.available("cuda", DEVICE, explicit=False) if DEVICE == "cuda" else (False, "")
    if ok:
        out.append("cuda")
    return out


@pytest.fixture(autouse=True)
def _restore_backend(monkeypatch):
    if DEVICE == "cpu":
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    previous = lyfast.get_backend()
    yield
    lyfast.set_backend(previous)


def _run(setting, shape, dtype, backend, seed=0):
    """(y, dx, *parameter grads) of the adapted layer in `dtype` on `backend` ("amp-bf16": fp32 layer,
    adapter and input under bf16 autocast, as mixed-precision training runs)."""
    amp = dtype == "amp-bf16"
    dtype = torch.float32 if amp else dtype
    algo, kwargs, route = SETTINGS[setting]
    d_in, d_out, tokens = SHAPES[shape]
    gen = torch.Generator().manual_seed(seed)
    layer = nn.Linear(d_in, d_out)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(d_out, d_in, generator=gen) / d_in**0.5)
        layer.bias.copy_(torch.randn(d_out, generator=gen) * 0.1)
    layer.requires_grad_(False)
    torch.manual_seed(seed)
    module = CLASSES[algo]("t", layer, 1.0, **kwargs)
    with torch.no_grad():  # a trained-looking adapter: every factor nonzero, ΔW a few % of W
        for name, p in sorted(module.named_parameters()):
            noise = torch.randn(p.shape, generator=gen)
            if name == "rescale":
                p.copy_(1 + 0.05 * noise)
            elif name == "oft_blocks":
                p.copy_(0.02 * noise)
            else:
                p.copy_(noise * (0.1 if name.endswith(("_a", "w1")) else 1.0) / p.shape[-1] ** 0.5)
    if route is not None:
        module.route = route
    layer, module = layer.to(DEVICE, dtype), module.to(DEVICE, dtype)
    module.apply_to()
    lyfast.set_backend(backend)
    x = torch.randn(tokens, d_in, generator=gen).to(DEVICE, dtype).requires_grad_()
    with torch.autocast(torch.device(DEVICE).type, dtype=torch.bfloat16, enabled=amp):
        y = layer(x)
    g = torch.randn(y.shape, generator=torch.Generator().manual_seed(seed + 1)).to(DEVICE, dtype)
    y.backward(g)
    names = [n for n, p in sorted(module.named_parameters()) if p.requires_grad]
    grads = [p.grad for n, p in sorted(module.named_parameters()) if p.requires_grad]
    return ["y", "dx", *names], [y.detach(), x.grad, *grads]


@pytest.mark.parametrize("backend", _backends())
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("setting", list(SETTINGS))
def test_fused_backend_matches_fp64_within_eager_error(setting, shape, dtype, backend):
    names, got = _run(setting, shape, dtype, backend)
    _, eager = _run(setting, shape, dtype, "torch")
    _, ref = _run(setting, shape, torch.float64, "torch")
    assert all(t.isfinite().all() for t in got), f"non-finite values on {backend}"
    for name, a, e, r in zip(names, got, eager, ref):
        # under autocast the output is bf16 and the gradients fp32 with bf16-level error
        assert_within_eager(name, a, e, r, torch.bfloat16 if dtype == "amp-bf16" else dtype)


def test_tile_route_is_used_where_the_cost_model_says():
    """The module's automatic route on this device, recorded for the log (the choice itself is the
    cost model's; this only checks the fused op actually runs when it picks the tile route)."""
    from lyfast.kernels import loha as kloha

    d_in, d_out, tokens = SHAPES[list(SHAPES)[0]]
    choice = kloha.choose_route(tokens, d_in, d_out, 16, 16, torch.bfloat16, torch.device(DEVICE))
    calls = []
    original = kloha.tile_forward
    kloha.tile_forward = lambda *a: calls.append(1) or original(*a)
    try:
        _run("loha-r16-tile", list(SHAPES)[0], torch.bfloat16, "triton")
    finally:
        kloha.tile_forward = original
    assert calls, "route='tile' on the Triton backend did not run the tile kernel"
    print(f"cost model on {DEVICE}: LoHa r16 {d_in}->{d_out} at {tokens} tokens -> {choice}")
