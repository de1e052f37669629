"""Ahead-of-time compilation of every Triton kernel variant the launchers can pick, for sm_80 and sm_90,
without a GPU: `triton.compile(ASTSource(...), target=GPUTarget("cuda", cc, 32))` through ptxas.

Fails on any compile error and on shared memory above the per-block opt-in limit (163 KB on sm_80,
227 KB on sm_90). Registers and per-thread stack bytes (spills, from cuobjdump) are reported, not
asserted: spills cost speed, not correctness, and only a GPU can say how much. `pytest -s` prints the table;
LYFAST_AOT_REPORT=path.json also writes it (with the Triton version) for benchmarks/results/.
"""
from __future__ import annotations

import datetime
import json
import os

import pytest

triton = pytest.importorskip("triton", reason="AOT compilation needs the `triton` package")

from lyfast.kernels import _common  # noqa: E402

CCS = (80, 90)


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    saved = os.environ.get("TRITON_CACHE_DIR")
    if os.environ.get("LYFAST_AOT_REPORT"):  # time real compiles for the report, not Triton's disk cache
        os.environ["TRITON_CACHE_DIR"] = str(tmp_path_factory.mktemp("triton-cache"))
    try:
        return _common.aot_report(CCS, workers=min(4, os.cpu_count() or 1))
    finally:
        if saved is None:
            os.environ.pop("TRITON_CACHE_DIR", None)
        else:
            os.environ["TRITON_CACHE_DIR"] = saved


def test_every_variant_compiles_within_shared_memory(report):
    assert {r["cc"] for r in report} == set(CCS)
    names = {r["name"] for r in report}
    for module in _common.AOT_MODULES:
        assert any(n.startswith(module) for n in names), f"no AOT variants for lyfast.kernels.{module}"
    lines = [f"{'variant':<48} {'cc':>3} {'smem KB':>8} {'limit':>6} {'warps':>5} {'regs':>5} {'stack B':>8} {'compile s':>9}"]
    for r in report:
        if r["error"]:
            lines.append(f"{r['name']:<48} {r['cc']:>3} ERROR")
        else:
            lines.append(
                f"{r['name']:<48} {r['cc']:>3} {r['shared'] / 1024:>8.1f} {r['limit'] // 1024:>6} {r['num_warps']:>5} "
                f"{r['regs'] if r['regs'] is not None else '-':>5} {r['stack'] if r['stack'] is not None else '-':>8} "
                f"{r['compile_s']:>9.2f}"
            )
    print("\n" + "\n".join(lines))
    path = os.environ.get("LYFAST_AOT_REPORT")
    if path:
        with open(path, "w") as f:
            import torch

            meta = dict(device="none: ahead-of-time compilation only (sm_80 and sm_90 targets, ptxas)",
                        triton=triton.__version__, torch=torch.__version__, date=datetime.date.today().isoformat())
            json.dump(dict(meta, variants=report), f, indent=1)
    errors = [f"{r['name']} sm_{r['cc']}: {r['error']}" for r in report if r["error"]]
    assert not errors, "compile errors:\n" + "\n".join(errors)
    over = [f"{r['name']} sm_{r['cc']}: {r['shared']} B > {r['limit']} B" for r in report if r["shared"] > r["limit"]]
    assert not over, "shared memory above the device limit:\n" + "\n".join(over)


def test_signature_builder_rejects_missing_parameters():
    from lyfast.kernels import lokr

    name, kernel, args, constexprs, *_ = lokr.aot_variants()[0]
    args = dict(args)
    args.pop("T")
    with pytest.raises(ValueError, match="no type or value"):
        _common.aot_compile(kernel, args, constexprs, 90)


def test_compiling_still_works_after_an_interpreted_launch():
    """The interpreter patches triton.language while it runs; lyfast undoes every patch on return, so a
    process can run kernels on CPU tensors and still compile them (this file and the interpreter tests
    share one pytest process, in either order)."""
    import torch

    from lyfast.kernels import lokr

    x, c1, c2 = torch.randn(2, 6), torch.randn(2, 2), torch.randn(3, 3)
    torch.testing.assert_close(lokr.kron_forward(x, c1, c2), (c1 @ x.reshape(2, 2, 3) @ c2.t()).reshape(2, 6))
    name, kernel, args, constexprs, num_warps, num_stages = lokr.aot_variants()[0]
    res = _common.aot_compile(kernel, args, constexprs, 90, num_warps, num_stages)
    assert res["shared"] > 0
