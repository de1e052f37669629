"""The Triton kernels (lyfast.kernels) against the PyTorch path, on CPU through Triton's interpreter.

Every kernel's forward and every gradient is compared with the fp64 PyTorch reference; the error must be
at most ~2× that of the eager PyTorch path run in the same dtype (plus a few ulps of the result's scale,
so that an exact eager result does not demand an exact kernel). Shapes are small and awkward: widths
that are not powers of two, several column/row blocks, one token, non-contiguous inputs, leading batch
dims. Also: `torch.library.opcheck` on every op, the modules end to end, and `torch.compile(fullgraph)`.

TRITON_INTERPRET=1 is set per test (monkeypatch), not at import: lyfast's kernels pick the interpreter
from the tensors' device themselves (`kernels/_common.py`), and the variable only tells
`lyfast.backend` that an explicit "triton" request may run on CPU tensors.
"""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn

pytest.importorskip("triton", reason="the Triton backend needs the `triton` package")

import lyfast  # noqa: E402
from lyfast.functional import boft as fboft  # noqa: E402
from lyfast.functional import loha as floha  # noqa: E402
from lyfast.functional import lokr as flokr  # noqa: E402
from lyfast.functional.general import LayerSpec  # noqa: E402
from lyfast.kernels import boft as kboft  # noqa: E402
from lyfast.kernels import loha as kloha  # noqa: E402
from lyfast.kernels import lokr as klokr  # noqa: E402

from kernel_checks import EPS, assert_within_eager  # noqa: E402


@pytest.fixture(autouse=True)
def _interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    previous = lyfast.set_backend("triton")
    yield
    lyfast.set_backend(previous)


# ----------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------
def _run(fn, inputs, grad_seed=7):
    """fn(*inputs) and the gradients of <out, g> w.r.t. every input that requires grad."""
    leaves = [t.detach().clone().requires_grad_(t.requires_grad) if t is not None else None for t in inputs]
    out = fn(*leaves)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(grad_seed), dtype=torch.float64)
    wanted = [t for t in leaves if t is not None and t.requires_grad]
    grads = torch.autograd.grad(out, wanted, g.to(out.dtype)) if wanted else ()
    return [out.detach(), *grads]


def _as64(inputs):
    return [t.detach().double().requires_grad_(t.requires_grad) if t is not None else None for t in inputs]


def _compare(names, fused, eager, ref, dtype):
    assert len(fused) == len(eager) == len(ref) == len(names)
    for n, a, e, r in zip(names, fused, eager, ref):
        assert_within_eager(n, a, e, r, dtype)


DTYPES = [torch.float32, torch.bfloat16, torch.float16]


# ----------------------------------------------------------------------------------------------
# LoKr
# ----------------------------------------------------------------------------------------------
# (out_l, in_m, out_k, in_n, leading dims): one dx-fused backward tile; several k blocks (dx unfused)
# with in_m padded to 64; several in_n chunks with one token; in_m padded to 128.
LOKR_CASES = {
    "small": (5, 3, 6, 7, (2, 3)),
    "k_blocks": (33, 40, 70, 9, (3,)),
    "n_chunks_one_token": (2, 2, 3, 70, (1,)),
    "wide_in_m": (4, 100, 3, 2, (2,)),
}


def _lokr_inputs(case, dtype, seed=0, x_grad=True, w_grad=True):
    out_l, in_m, out_k, in_n, lead = LOKR_CASES[case]
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(*lead, in_m * in_n, generator=gen).to(dtype).requires_grad_(x_grad)
    c1 = (torch.randn(out_l, in_m, generator=gen) / in_m**0.5).to(dtype).requires_grad_(w_grad)
    c2 = (torch.randn(out_k, in_n, generator=gen) / in_n**0.5).to(dtype).requires_grad_(w_grad)
    return [x, c1, c2]


def _lokr_torch(x, c1, c2):
    spec = LayerSpec("linear", c1.shape[0] * c2.shape[0], x.shape[-1])
    return flokr.KronDelta.apply(x, c1, c2, spec)


def _check_lokr(inputs, dtype, names=("y", "dx", "dc1", "dc2")):
    fused = _run(torch.ops.lyfast.lokr_fwd, inputs)
    eager = _run(_lokr_torch, inputs)
    ref = _run(_lokr_torch, _as64(inputs))
    _compare(names[: len(fused)], fused, eager, ref, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_lokr_small_all_dtypes(dtype):
    _check_lokr(_lokr_inputs("small", dtype), dtype)


@pytest.mark.parametrize("case", ["k_blocks", "n_chunks_one_token", "wide_in_m"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_lokr_tiling(case, dtype):
    _check_lokr(_lokr_inputs(case, dtype), dtype)


def test_lokr_non_contiguous_input():
    x, c1, c2 = _lokr_inputs("small", torch.float32)
    xt = x.detach().reshape(-1, 21).t().contiguous().t().requires_grad_()  # (6, 21) with strides (1, 6)
    assert not xt.is_contiguous()
    _check_lokr([xt, c1, c2], torch.float32)


def test_lokr_only_some_gradients():
    """need_x only → dx from the forward kernel with transposed factors; factors only → no dx."""
    _check_lokr(_lokr_inputs("small", torch.float32, w_grad=False), torch.float32, ("y", "dx"))
    _check_lokr(_lokr_inputs("k_blocks", torch.float32, x_grad=False), torch.float32, ("y", "dc1", "dc2"))


def test_lokr_no_tokens():
    x, c1, c2 = _lokr_inputs("small", torch.float32)
    x = torch.zeros(0, x.shape[-1], requires_grad=True)
    y = torch.ops.lyfast.lokr_fwd(x, c1, c2)
    assert y.shape == (0, 30)
    dx, dc1, dc2 = torch.autograd.grad(y.sum(), (x, c1, c2))
    assert dx.shape == x.shape and not dc1.any() and not dc2.any()


def test_lokr_out_of_envelope_is_refused_by_supports():
    x, c1, c2 = _lokr_inputs("small", torch.float32)
    assert klokr.supports(x, c1, c2)
    assert not klokr.supports(x.double(), c1.double(), c2.double())
    assert not klokr.supports(x, c1.bfloat16(), c2)
    big = torch.randn(200, 3)  # out_l > 128
    assert not klokr.supports(x, big, c2)


# ----------------------------------------------------------------------------------------------
# LoHa (Khatri-Rao route)
# ----------------------------------------------------------------------------------------------
# (in, out, r1, r2, leading dims): R padded to 32 with two output blocks; R = 64 exactly; R = 121
# (padded to 128) with three output blocks; a single token.
LOHA_CASES = {
    "r15": (37, 70, 3, 5, (2, 3)),
    "r64": (24, 32, 8, 8, (5,)),
    "r121": (20, 130, 11, 11, (3,)),
    "one_token": (65, 9, 2, 2, (1,)),
}


def _loha_inputs(case, dtype, seed=0):
    d_in, d_out, r1, r2, lead = LOHA_CASES[case]
    gen = torch.Generator().manual_seed(seed)
    a1, b1 = torch.randn(d_out, r1, generator=gen), torch.randn(r1, d_in, generator=gen)
    a2, b2 = torch.randn(d_out, r2, generator=gen), torch.randn(r2, d_in, generator=gen)
    f, k = floha.khatri_rao_factors(a1 / r1, b1, a2 / r2, b2 / d_in**0.5)
    x = torch.randn(*lead, d_in, generator=gen)
    return [t.to(dtype).requires_grad_() for t in (x, f, k)]


def _loha_torch(x, f, k):
    return (x @ k.t()) @ f.t()  # the PyTorch route (a) on given F and K


def _check_loha(inputs, dtype):
    fused = _run(kloha.khatri_rao_delta, inputs)
    eager = _run(_loha_torch, inputs)
    ref = _run(_loha_torch, _as64(inputs))
    _compare(("y", "dx", "dF", "dK")[: len(fused)], fused, eager, ref, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_loha_kr_all_dtypes(dtype):
    _check_loha(_loha_inputs("r15", dtype), dtype)


@pytest.mark.parametrize("case", ["r64", "r121", "one_token"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_loha_kr_tiling(case, dtype):
    _check_loha(_loha_inputs(case, dtype), dtype)


def test_loha_kr_non_contiguous_and_partial_grads():
    x, f, k = _loha_inputs("r15", torch.float32)
    xt = x.detach().reshape(-1, 37).t().contiguous().t().requires_grad_()
    _check_loha([xt, f, k], torch.float32)
    _check_loha([x.detach(), f, k], torch.float32)  # no dx: the kernel skips the dx loop
    _check_loha([x, f.detach(), k.detach()], torch.float32)


# ----------------------------------------------------------------------------------------------
# The frozen layer's output added in the LoKr / LoHa Khatri-Rao kernels' epilogue
# ----------------------------------------------------------------------------------------------
def _with_base(inputs, out_features, dtype, seed=11):
    lead = inputs[0].shape[:-1]
    base = torch.randn(*lead, out_features, generator=torch.Generator().manual_seed(seed)).to(dtype)
    return [*inputs, base.requires_grad_()]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_lokr_base_epilogue(dtype):
    inputs = _with_base(_lokr_inputs("k_blocks", dtype), 33 * 70, dtype)
    fused = _run(torch.ops.lyfast.lokr_fwd, inputs)
    eager = _run(lambda x, c1, c2, b: b + _lokr_torch(x, c1, c2), inputs)
    ref = _run(lambda x, c1, c2, b: b + _lokr_torch(x, c1, c2), _as64(inputs))
    _compare(("y", "dx", "dc1", "dc2", "dbase"), fused, eager, ref, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_loha_kr_base_epilogue(dtype):
    inputs = _with_base(_loha_inputs("r121", dtype), 130, dtype)  # three output blocks, split columns
    fused = _run(kloha.khatri_rao_delta, inputs)
    eager = _run(lambda x, f, k, b: b + _loha_torch(x, f, k), inputs)
    ref = _run(lambda x, f, k, b: b + _loha_torch(x, f, k), _as64(inputs))
    _compare(("y", "dx", "dF", "dK", "dbase"), fused, eager, ref, dtype)


@pytest.mark.parametrize("algo", ["lokr", "loha"])
def test_modules_pass_the_base_output_to_the_kernel(monkeypatch, algo):
    """In rebuild mode the module hands the frozen layer's output to the kernel (one pass over it fewer),
    except with rank dropout in training, whose mask applies to ΔW·x alone."""
    module_of = {"lokr": klokr, "loha": kloha}[algo]
    name = {"lokr": "kron_forward", "loha": "kr_forward"}[algo]
    seen = []
    original = getattr(module_of, name)
    monkeypatch.setattr(module_of, name, lambda *a: seen.append(a[-1] is not None) or original(*a))
    for rank_dropout, want in ((0.0, True), (0.5, False)):
        seen.clear()
        base = nn.Linear(24, 32).requires_grad_(False)
        kwargs = dict(lora_dim=2, alpha=1.5, rank_dropout=rank_dropout)
        module = (lyfast.LokrModule if algo == "lokr" else lyfast.LohaModule)("t", base, 1.0, **kwargs)
        if algo == "loha":
            module.route = "khatri_rao"
        module.apply_to()
        base(torch.randn(3, 24))
        assert seen == [want], (rank_dropout, seen)


# ----------------------------------------------------------------------------------------------
# LoHa (tile-generation route: base layer and adapter in one GEMM)
# ----------------------------------------------------------------------------------------------
# (in, out, r1, r2, leading dims, bias): several output and reduction tiles in fp32, one token tile;
# ranks 8/8 over more tokens than one tile (token splits of the factor kernel, atomics); r2 = 17 padded
# to 32 with a single token; r = 40 padded to 64 (the widest rank), widths not powers of two.
TILE_CASES = {
    "small": (37, 70, 3, 5, (2, 3), True),
    "tokens": (70, 33, 8, 8, (130,), False),
    "one_token": (9, 20, 2, 17, (1,), True),
    "r40": (50, 19, 40, 7, (3, 2), True),
}


def _tile_inputs(case, dtype, seed=0):
    d_in, d_out, r1, r2, lead, bias = TILE_CASES[case]
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(*lead, d_in, generator=gen)
    w = torch.randn(d_out, d_in, generator=gen) / d_in**0.5
    b = torch.randn(d_out, generator=gen) if bias else None
    a1, b1 = torch.randn(d_out, r1, generator=gen) / r1, torch.randn(r1, d_in, generator=gen)
    a2, b2 = torch.randn(d_out, r2, generator=gen) / r2, torch.randn(r2, d_in, generator=gen) / d_in**0.5
    return [t if t is None else t.to(dtype).requires_grad_() for t in (x, w, b, a1, b1, a2, b2)]


def _tile_torch(x, w, b, a1, b1, a2, b2):
    """The eager composition the fused op replaces: the base layer plus LoHa's ΔW·x (route (a))."""
    spec = LayerSpec("linear", w.shape[0], w.shape[1])
    return torch.nn.functional.linear(x, w, b) + floha.KhatriRaoDelta.apply(x, a1, b1, a2, b2, spec)


def _check_tile(inputs, dtype):
    names = [n for n, t in zip(("dx", "dW0", "dbias", "da1", "db1", "da2", "db2"), inputs) if t is not None and t.requires_grad]
    fused = _run(kloha.tile_linear, inputs)
    eager = _run(_tile_torch, inputs)
    ref = _run(_tile_torch, _as64(inputs))
    _compare(["y", *names], fused, eager, ref, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_loha_tile_all_dtypes(dtype):
    _check_tile(_tile_inputs("small", dtype), dtype)


@pytest.mark.parametrize("case", ["tokens", "one_token", "r40"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_loha_tile_tiling(case, dtype):
    _check_tile(_tile_inputs(case, dtype), dtype)


def test_loha_tile_non_contiguous_and_partial_grads():
    x, w, b, a1, b1, a2, b2 = _tile_inputs("small", torch.float32)
    xt = x.detach().reshape(-1, 37).t().contiguous().t().reshape(2, 3, 37).requires_grad_()  # strided rows
    wt = w.detach().t().contiguous().t()  # column-major weight, frozen
    _check_tile([xt, wt, b, a1, b1, a2, b2], torch.float32)
    _check_tile([x.detach(), w.detach(), None, a1, b1, a2, b2], torch.float32)  # factors only
    _check_tile([x, w, b.detach(), a1.detach(), b1.detach(), a2.detach(), b2.detach()], torch.float32)  # no factors


def test_loha_tile_no_tokens():
    x, w, b, a1, b1, a2, b2 = _tile_inputs("small", torch.float32)
    x0 = torch.zeros(0, 37, requires_grad=True)
    y = kloha.tile_linear(x0, w, b, a1, b1, a2, b2)
    assert y.shape == (0, 70)
    grads = torch.autograd.grad(y.sum(), [x0, w, a1, b2])
    assert grads[0].shape == (0, 37) and all(not g.any() for g in grads[1:])


def test_loha_tile_supports_envelope():
    x, w, b, a1, b1, a2, b2 = [t.detach() for t in _tile_inputs("small", torch.float32)]
    assert kloha.supports_tile(x, w, b, a1, b1, a2, b2)
    assert not kloha.supports_tile(x.double(), w.double(), b.double(), a1.double(), b1.double(), a2.double(), b2.double())
    assert not kloha.supports_tile(x.half(), w, b, a1, b1, a2, b2)  # mixed dtypes
    wide = torch.randn(70, 65)
    assert not kloha.supports_tile(x, w, b, wide, wide.t().contiguous()[:, :37], a2, b2)  # r1 = 65 > 64


def test_loha_route_cost_model():
    """The roofline model's choices: the tile route where F and K would reach the weight's size (route (a)
    is then refused); route (a) with its small-rank kernels when the deterministic flag forbids atomics;
    the rowblock PyTorch route above the tile kernel's rank; and every choice is one of the named routes."""
    cpu = torch.device("cpu")
    assert kloha.choose_route(1024, 64, 64, 8, 8, torch.bfloat16, cpu) == "tile"  # R = 64 = in: no route (a)
    assert kloha.choose_route(1024, 64, 64, 80, 80, torch.bfloat16, cpu) == "rowblock"
    torch.use_deterministic_algorithms(True)
    try:
        assert kloha.choose_route(1024, 1280, 1280, 4, 4, torch.bfloat16, cpu) == "khatri_rao"
    finally:
        torch.use_deterministic_algorithms(False)
    costs = kloha.route_costs(4096, 640, 5120, 16, 16, torch.bfloat16, cpu)
    assert set(costs) == {"khatri_rao", "tile"} and all(v > 0 for v in costs.values())
    # More tokens never make a route cheaper.
    for route in costs:
        small = kloha.route_costs(1024, 640, 5120, 16, 16, torch.bfloat16, cpu)[route]
        assert small <= costs[route]


def test_loha_linear_forward_routes_agree():
    """`linear_forward` (base + adapter) gives the same output and gradients on every route and backend."""
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 5, 24, generator=gen)
    w, b = torch.randn(16, 24, generator=gen) * 0.2, torch.randn(16, generator=gen)
    fs = [torch.randn(16, 3, generator=gen), torch.randn(3, 24, generator=gen),
          torch.randn(16, 2, generator=gen), torch.randn(2, 24, generator=gen)]
    scale = torch.tensor(0.7, requires_grad=True)
    results = {}
    for backend, route in (("torch", "auto"), ("torch", "tile"), ("triton", "tile"), ("triton", "khatri_rao"),
                           ("triton", "rowblock"), ("triton", "auto")):
        leaves = [t.clone().requires_grad_() for t in [x, *fs]]
        s = scale.detach().clone().requires_grad_()
        y = floha.linear_forward(leaves[0], w, b, *leaves[1:], scale=s, route=route, backend=backend)
        grads = torch.autograd.grad(y.square().sum(), [*leaves, s])
        results[(backend, route)] = [y, *grads]
    want = results.pop(("torch", "auto"))
    for key, got in results.items():
        for i, (a, e) in enumerate(zip(got, want)):
            torch.testing.assert_close(a, e, rtol=1e-4, atol=1e-4, msg=lambda m: f"{key} tensor {i}: {m}")
    with pytest.raises(ValueError, match="unknown LoHa route"):
        floha.linear_forward(x, w, b, *fs, route="fused")
    torch.use_deterministic_algorithms(True)
    try:
        with pytest.raises(RuntimeError, match="not deterministic"):
            floha.linear_forward(x, w, b, *fs, route="tile", backend="triton")
        floha.linear_forward(x, w, b, *fs, route="auto", backend="triton")  # picks a deterministic route
    finally:
        torch.use_deterministic_algorithms(False)


# ----------------------------------------------------------------------------------------------
# BOFT
# ----------------------------------------------------------------------------------------------
# (z shape, channel axis, b, m, rescale): odd b packed several blocks per chunk; conv layout (axis 1);
# the full butterfly (m = log2(n) + 1) with b = 4; b = 24 (chunk padded to 32); b = 16 over many rows.
BOFT_CASES = {
    "b6_m3": ((3, 2, 24), -1, 6, 3, True),
    "conv_axis1": ((2, 16, 3, 3), 1, 8, 2, False),
    "full_butterfly": ((1, 64), -1, 4, 5, True),
    "b24": ((5, 96), -1, 24, 3, True),
    "b16_rows": ((40, 64), -1, 16, 3, True),
    "b4_rows": ((70, 64), -1, 4, 5, True),
}


def _boft_inputs(case, dtype, seed=0):
    shape, axis, b, m, resc = BOFT_CASES[case]
    gen = torch.Generator().manual_seed(seed)
    channels = shape[axis]
    n = channels // b
    blocks = torch.randn(m, n, b, b, generator=gen) * 0.2
    r = fboft.stage_matrices(blocks, 0.0, 0.8).detach().requires_grad_()
    z = torch.randn(*shape, generator=gen).to(dtype).requires_grad_()
    s = (1 + 0.1 * torch.randn(channels, generator=gen)).to(dtype).requires_grad_() if resc else None
    return [z, r, s], axis


def _check_boft(case, dtype):
    inputs, axis = _boft_inputs(case, dtype)
    fused = _run(lambda z, r, s: torch.ops.lyfast.boft_fwd(z, r, s, axis), inputs)
    eager = _run(lambda z, r, s: fboft.Butterfly.apply(z, r, s, axis), inputs)
    ref = _run(lambda z, r, s: fboft.Butterfly.apply(z, r, s, axis), _as64(inputs))
    names = ("y", "dz", "dr", "drescale")[: len(fused)]
    # dr is fp32 on every path (the stage matrices are fp32); compare it at fp32 precision.
    for n, a, e, rf in zip(names, fused, eager, ref):
        assert_within_eager(n, a, e, rf, a.dtype if a.dtype in EPS else dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_boft_all_dtypes(dtype):
    _check_boft("b6_m3", dtype)


@pytest.mark.parametrize("case", ["conv_axis1", "full_butterfly", "b24", "b16_rows"])
def test_boft_shapes(case):
    _check_boft(case, torch.float32)


@pytest.mark.parametrize("case", ["b16_rows", "b4_rows"])
def test_boft_phases_row_chunks_and_row_groups(case, monkeypatch):
    """The plan wide layers get, on small ones: several phases (channel sets of 2 stages), several row chunks
    (32 rows: the chunk buffers' budget shrunk) and several row groups (dR/drescale partials summed after);
    each result within eager's error, and bit-identical when run again."""
    monkeypatch.setattr(kboft, "MAX_PHASE_STAGES", 2)
    monkeypatch.setattr(kboft, "WORKING_SET", 32 * 64 * 4)
    monkeypatch.setattr(kboft, "FAKE_SMS", 64)
    shape, axis, b, m, _ = BOFT_CASES[case]
    p = kboft.plan(torch.device("cpu"), shape[0], shape[1] // b, b, m)
    assert len(p.phases) > 1 and p.chunk_rows < shape[0] and p.groups > 1, p
    _check_boft(case, torch.float32)
    inputs, axis = _boft_inputs(case, torch.float32)
    once, twice = (_run(lambda z, r, s: torch.ops.lyfast.boft_fwd(z, r, s, axis), inputs) for _ in range(2))
    assert all(torch.equal(a, b_) for a, b_ in zip(once, twice))


def test_boft_bf16_wide_blocks():
    _check_boft("b24", torch.bfloat16)


def test_boft_partial_grads_and_non_contiguous():
    (z, r, s), axis = _boft_inputs("b6_m3", torch.float32)
    zt = z.detach().reshape(6, 24).t().contiguous().t().reshape(3, 2, 24)  # strided view (lead dims collapse)
    for inputs in ([zt.requires_grad_(), r.detach(), s.detach()], [z.detach(), r, s], [z, r.detach(), None]):
        fused = _run(lambda a, b_, c: torch.ops.lyfast.boft_fwd(a, b_, c, axis), inputs)
        ref = _run(lambda a, b_, c: fboft.Butterfly.apply(a, b_, c, axis), _as64(inputs))
        eager = _run(lambda a, b_, c: fboft.Butterfly.apply(a, b_, c, axis), inputs)
        for a, e, rf in zip(fused, eager, ref):
            assert_within_eager("boft", a, e, rf, torch.float32)


@pytest.mark.parametrize("b", [2, 6, 16, 24, 64])
def test_boft_cayley_kernel(b):
    """One launch per batch of blocks: R and dQ against the fp64 reference, within 2× the PyTorch
    path's fp32 error (the same unpivoted elimination, so usually bit-equal)."""
    blocks = torch.randn(2, 3, b, b, generator=torch.Generator().manual_seed(b)) * 0.3
    q = fboft.skew(blocks).requires_grad_()
    fused = _run(torch.ops.lyfast.boft_cayley, [q])
    eager = _run(fboft.Cayley.apply, [q])
    ref = _run(fboft.Cayley.apply, _as64([q]))
    _compare(("R", "dQ"), fused, eager, ref, torch.float32)


@pytest.mark.parametrize("constraint", [0.0, 0.5])
def test_boft_cayley_with_constraint_and_half_blocks(constraint):
    blocks = (torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(1)) * 0.3).bfloat16().requires_grad_()
    got = _run(lambda t: kboft.cayley(t, constraint), [blocks])
    want = _run(lambda t: fboft.cayley(t, constraint), [blocks])
    assert got[0].dtype == torch.float32
    for a, e in zip(got, want):
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-6)
    assert kboft.cayley_supported(blocks) and not kboft.cayley_supported(blocks.double())
    assert not kboft.cayley_supported(torch.zeros(1, 66, 66))


# ----------------------------------------------------------------------------------------------
# torch.library: schemas, fake kernels, autograd registration
# ----------------------------------------------------------------------------------------------
def _opcheck(op, args):
    torch.library.opcheck(op, args, test_utils=("test_schema", "test_autograd_registration", "test_faketensor",
                                                 "test_aot_dispatch_dynamic"))


def test_opcheck_lokr():
    x, c1, c2 = _lokr_inputs("small", torch.float32)
    _opcheck(torch.ops.lyfast.lokr_fwd.default, (x, c1, c2))
    _opcheck(torch.ops.lyfast.lokr_fwd.default, (x, c1, c2, torch.randn(2, 3, 30, requires_grad=True)))
    g = torch.randn(2, 3, 30)
    for need_x, need_w in ((True, True), (True, False), (False, True)):
        _opcheck(torch.ops.lyfast.lokr_bwd.default, (g, x.detach(), c1.detach(), c2.detach(), need_x, need_w))


def test_opcheck_loha():
    x, f, k = _loha_inputs("one_token", torch.float32)
    _opcheck(torch.ops.lyfast.loha_kr_fwd.default, (x, f, k))
    _opcheck(torch.ops.lyfast.loha_kr_fwd.default, (x, f, k, torch.randn(1, 9, requires_grad=True)))
    p = (x.detach().reshape(-1, 65) @ k.detach().t()).contiguous()
    g = torch.randn(1, 9)
    _opcheck(torch.ops.lyfast.loha_kr_bwd.default, (g, x.detach(), p, f.detach(), k.detach(), True, True, True))
    _opcheck(torch.ops.lyfast.loha_kr_bwd.default, (g, x.detach(), p, f.detach(), k.detach(), False, True, False))


def test_opcheck_loha_tile():
    x, w, b, a1, b1, a2, b2 = _tile_inputs("small", torch.float32)
    _opcheck(torch.ops.lyfast.loha_tile_fwd.default, (x, w.detach(), b, a1, b1, a2, b2))
    _opcheck(torch.ops.lyfast.loha_tile_fwd.default, (x, w, None, a1, b1, a2, b2))
    g = torch.randn(2, 3, 70)
    fs = [t.detach() for t in (a1, b1, a2, b2)]
    for need in ((True, False, True), (False, True, True), (True, True, False)):
        _opcheck(torch.ops.lyfast.loha_tile_bwd.default, (g, x.detach(), w.detach(), *fs, *need))


def test_opcheck_boft_cayley():
    q = fboft.skew(torch.randn(2, 6, 6)).requires_grad_()
    _opcheck(torch.ops.lyfast.boft_cayley.default, (q,))


@pytest.mark.parametrize("with_rescale", [True, False])
def test_opcheck_boft(with_rescale):
    (z, r, s), axis = _boft_inputs("b6_m3", torch.float32)
    s = s if with_rescale else None
    _opcheck(torch.ops.lyfast.boft_fwd.default, (z, r, s, axis))
    g = torch.randn_like(z)
    args = (g, z.detach(), r.detach(), None if s is None else s.detach(), axis, True, True, with_rescale)
    _opcheck(torch.ops.lyfast.boft_bwd.default, args)


# ----------------------------------------------------------------------------------------------
# Modules end to end, and torch.compile
# ----------------------------------------------------------------------------------------------
MODULES = {
    "lokr": (lambda base: lyfast.LokrModule("t", base, 1.0, lora_dim=2, alpha=1.5)),
    "lokr_factor": (lambda base: lyfast.LokrModule("t", base, 1.0, lora_dim=4, alpha=2, factor=4, decompose_both=True)),
    "loha": (lambda base: lyfast.LohaModule("t", base, 1.0, lora_dim=3, alpha=2)),
    "boft": (lambda base: lyfast.ButterflyOFTModule("t", base, 1.0, lora_dim=4, alpha=1, rescaled=True)),
}


def _adapted(algo, base, seed=0):
    base = copy.deepcopy(base).requires_grad_(False)
    module = MODULES[algo](base)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=gen) * (0.1 if name == "oft_blocks" else 0.3)
            p.copy_(noise + (1.0 if name == "rescale" else 0.0))
    module.apply_to()
    return base, module


def _module_step(algo, layer, x, backend):
    lyfast.set_backend(backend)
    base, module = _adapted(algo, layer)
    x = x.detach().clone().requires_grad_()
    y = base(x)
    y.backward(torch.randn(y.shape, generator=torch.Generator().manual_seed(3)))
    return [y.detach(), x.grad] + [p.grad for _, p in sorted(module.named_parameters())]


@pytest.mark.parametrize("algo", list(MODULES))
@pytest.mark.parametrize("layer", ["linear", "conv2d"])
def test_modules_triton_matches_torch(algo, layer):
    """Linear layers run the kernels (convs: BOFT's kernel, LoHa/LoKr the PyTorch path); fp32 results and
    every gradient match the PyTorch backend to fp32 rounding."""
    torch.manual_seed(0)
    if layer == "linear":
        base, x = nn.Linear(24, 32), torch.randn(2, 3, 24)
    else:
        base, x = nn.Conv2d(8, 16, 3, padding=1), torch.randn(2, 8, 4, 4)
    want = _module_step(algo, base, x, "torch")
    got = _module_step(algo, base, x, "triton")
    for i, (a, b) in enumerate(zip(got, want)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=lambda m: f"{algo}/{layer} tensor {i}: {m}")


def _count_tile_calls(monkeypatch):
    calls = []
    original = kloha.tile_forward
    monkeypatch.setattr(kloha, "tile_forward", lambda *a: calls.append(1) or original(*a))
    return calls


@pytest.mark.parametrize("trainable_base", [False, True])
def test_loha_module_tile_route_fuses_the_base_layer(monkeypatch, trainable_base):
    """A LoHa module on a plain Linear runs base + adapter as lyfast::loha_tile_fwd; output and every
    gradient (the base layer's own weight and bias too, when they train) match the PyTorch backend."""
    calls = _count_tile_calls(monkeypatch)
    torch.manual_seed(0)
    layer, x = nn.Linear(24, 40), torch.randn(3, 5, 24)

    def step(backend):
        lyfast.set_backend(backend)
        torch.manual_seed(1)
        base = copy.deepcopy(layer).requires_grad_(trainable_base)
        module = lyfast.LohaModule("t", base, 0.8, lora_dim=6, alpha=3, use_scalar=True)
        with torch.no_grad():
            for p in module.parameters():
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())) * 0.2)
        module.route = "tile"
        module.apply_to()
        xi = x.clone().requires_grad_()
        y = base(xi)
        y.backward(torch.randn(y.shape, generator=torch.Generator().manual_seed(3)))
        params = [p.grad for _, p in sorted(module.named_parameters())]
        return [y.detach(), xi.grad, *params] + ([base.weight.grad, base.bias.grad] if trainable_base else [])

    want = step("torch")
    assert not calls
    got = step("triton")
    assert len(calls) == 1
    for i, (a, b) in enumerate(zip(got, want)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=lambda m: f"tensor {i}: {m}")


class _Int8Linear(nn.Linear):  # a Linear subclass with its own forward: never fused
    def forward(self, x):
        return super().forward(x) * 1.0


def test_loha_module_tile_route_only_where_it_is_exact(monkeypatch):
    """No fusion over a Linear subclass with its own forward, above another adapter, with rank dropout in
    training, in bypass mode, or for a conv; results still match the PyTorch backend."""
    calls = _count_tile_calls(monkeypatch)
    torch.manual_seed(0)
    x = torch.randn(2, 16)

    def run(make):
        out = []
        for backend in ("torch", "triton"):
            lyfast.set_backend(backend)
            torch.manual_seed(5)
            base, modules = make()
            y = base(x)
            out.append(y)
        torch.testing.assert_close(out[1], out[0], rtol=1e-5, atol=1e-5)

    def sub():
        base = _Int8Linear(16, 8)
        m = lyfast.LohaModule("t", base, 1.0, lora_dim=2)
        m.route = "tile"
        m.apply_to()
        return base, [m]

    def stacked():
        base = nn.Linear(16, 8)
        lower = lyfast.LokrModule("lo", base, 1.0, lora_dim=2)
        lower.apply_to()
        upper = lyfast.LohaModule("up", base, 1.0, lora_dim=2)
        nn.init.normal_(upper.hada_w2_a)
        upper.route = "tile"
        upper.apply_to()
        return base, [lower, upper]

    def rank_dropout():
        base = nn.Linear(16, 8)
        m = lyfast.LohaModule("t", base, 1.0, lora_dim=2, rank_dropout=0.5)
        nn.init.normal_(m.hada_w2_a)
        m.route = "tile"
        m.apply_to()
        return base, [m]

    def bypass():
        base = nn.Linear(16, 8)
        m = lyfast.LohaModule("t", base, 1.0, lora_dim=2, bypass_mode=True)
        m.route = "tile"
        m.apply_to()
        return base, [m]

    for make in (sub, stacked, rank_dropout, bypass):
        run(make)
        assert not calls, make.__name__
    # the same rank-dropout module in eval mode does fuse
    lyfast.set_backend("triton")
    base, (m,) = rank_dropout()
    m.eval()
    base(x)
    assert len(calls) == 1


def test_loha_module_tile_route_under_autocast(monkeypatch):
    """bf16 autocast over fp32 parameters: bf16 output from the fused op, fp32 gradients."""
    calls = _count_tile_calls(monkeypatch)
    base = nn.Linear(24, 16).requires_grad_(False)
    m = lyfast.LohaModule("t", base, 1.0, lora_dim=4)
    nn.init.normal_(m.hada_w2_a)
    m.route = "tile"
    m.apply_to()
    x = torch.randn(4, 24)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = base(x)
    assert calls and y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in m.parameters() if p.requires_grad)
    lyfast.set_backend("torch")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y_torch = base(x)
    torch.testing.assert_close(y.float(), y_torch.float(), rtol=0.03, atol=0.03)


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Linear(24, 32), nn.Linear(32, 32), nn.Linear(32, 24)
        self.requires_grad_(False)
        self.adapters = nn.ModuleList()
        for algo, layer in (("lokr", self.a), ("boft", self.b), ("loha", self.c)):
            gen = torch.Generator().manual_seed(len(self.adapters))
            module = MODULES[algo](layer)
            with torch.no_grad():
                for name, p in module.named_parameters():
                    p.add_(torch.randn(p.shape, generator=gen) * 0.1)
            module.apply_to()
            self.adapters.append(module)

    def forward(self, x):
        return self.c(torch.relu(self.b(self.a(x))))


@pytest.mark.parametrize("loha_route", ["tile", "khatri_rao"])
def test_torch_compile_fullgraph_runs_the_custom_ops(loha_route):
    """fullgraph=True: no graph break; the lyfast ops appear as opaque nodes; values and grads match eager.
    LoHa on both Triton routes (the tile route replaces the base layer's own linear)."""
    torch.manual_seed(0)
    net = _Net()
    net.adapters[2].route = loha_route
    x = torch.randn(2, 5, 24, requires_grad=True)
    y0 = net(x)
    g0 = torch.autograd.grad(y0.sum(), [x, *net.adapters.parameters()])

    seen = set()

    def record(gm, example_inputs):
        seen.update(getattr(n.target, "_qualified_op_name", str(n.target)) for n in gm.graph.nodes if n.op == "call_function")
        from torch._dynamo.backends.debugging import aot_eager

        return aot_eager(gm, example_inputs)

    torch._dynamo.reset()
    compiled = torch.compile(net, fullgraph=True, backend=record)
    y1 = compiled(x)
    g1 = torch.autograd.grad(y1.sum(), [x, *net.adapters.parameters()])
    assert {"lyfast::lokr_fwd", "lyfast::boft_fwd", "lyfast::boft_cayley", {"tile": "lyfast::loha_tile_fwd", "khatri_rao": "lyfast::loha_kr_fwd"}[loha_route]} <= seen, seen
    torch.testing.assert_close(y1, y0)
    for a, b in zip(g1, g0):
        torch.testing.assert_close(a, b)
