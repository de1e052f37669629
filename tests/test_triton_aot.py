"""CI compiles what a launch compiles: the Triton launches the modules make on SDXL and DiT layers are
recorded without a GPU and compiled ahead of time, each specialized by Triton's own launch path (integers
equal to 1 become constants, pointers and integers divisible by 16 carry the divisibility attribute): for
sm_80 and sm_90 under the installed Triton, and for sm_90 under Triton 3.6, the GPU image's
(tests/launch_signatures.py has the recorder and the method).

Fails on any compile error, on shared memory above the block's opt-in limit (163 KB on sm_80, 227 KB on
sm_90) and on register spills (per-thread stack bytes, from cuobjdump): a config that spills for a
launched signature is not chosen. The CI compiles every recorded variant for sm_80 and sm_90 under the
installed Triton (~430 variants each, about 3 minutes per target on 2 cores: a cover of them once missed 7
spilling variants) and, for sm_90, a cover of them (every kernel config and every class each argument takes) under the
GPU image's Triton; `python tests/launch_signatures.py --all --out PATH` is the same full compile.
benchmarks/results/triton_aot_resources_triton3.9.json is the full report of 2026-12-03 for both targets
(3.6's: the cover, timed from an empty cache with `--time-compiles`). `pytest -s` prints the table;
LYFAST_AOT_REPORT=path.json also writes it."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

triton = pytest.importorskip("triton", reason="AOT compilation needs the `triton` package")

import torch  # noqa: E402

import launch_signatures as ls  # noqa: E402
from lyfast.kernels import _common  # noqa: E402

ALT_TRITON = "3.6.0"  # the GPU image's Triton


@pytest.fixture(scope="module")
def launches():
    return ls.record()


@pytest.fixture(scope="module")
def report(launches):
    return ls.report(launches, ls.CCS, workers=min(2, os.cpu_count() or 1), everything=True)


def _table(rep) -> str:
    lines = [f"Triton {rep['triton']}: {rep['recorded_launches']} launches, {rep['variants']} variants, "
             f"{len(rep['compiles'])} compiled",
             f"{'kernel':<28} {'cc':>3} {'smem KB':>8} {'warps':>5} {'regs':>5} {'stack B':>8} {'s':>6}  example launch"]
    for r in rep["compiles"]:
        head = f"{r['kernel']:<28} {r['cc']:>3}"
        if r["error"]:
            lines.append(f"{head} ERROR {r['error']}  [{r['example']}]")
        else:
            lines.append(f"{head} {r['shared'] / 1024:>8.1f} {r['num_warps']:>5} {r['regs'] or '-':>5} "
                         f"{r['stack'] if r['stack'] is not None else '-':>8} {r['compile_s']:>6.2f}  [{r['example']}]")
    return "\n".join(lines)


def test_launched_variants_compile_without_spills_within_shared_memory(report):
    print("\n" + _table(report))
    path = os.environ.get("LYFAST_AOT_REPORT")
    if path:
        with open(path, "w") as f:
            json.dump(report, f, indent=1)
    assert {r["cc"] for r in report["compiles"]} == set(ls.CCS)
    bad = ls.failures(report)
    assert not bad, "launched variants that fail:\n" + "\n".join(bad)


def test_every_kernel_is_launched_by_the_modules(launches):
    """A kernel the recorded modules never launch would never be compiled here."""
    kernels = set(ls._kernel_names(helpers=False).values())
    launched = {la.kernel for la in launches}
    assert kernels - launched == set(), f"kernels no recorded module launches: {sorted(kernels - launched)}"


def test_launch_specialization_follows_the_launch_rules():
    """Integer arguments equal to 1 become constants and 16-divisible ones (and aligned pointers) carry the
    divisibility attribute; a 2-byte storage offset removes it from a pointer."""
    from lyfast.kernels import lokr

    ptr = _common.DevicePointer(torch.bfloat16, 0)
    odd = _common.DevicePointer(torch.bfloat16, 2)
    ints = dict(T=1, M=32, N=7, L=16, K=48, sx_t=1, sx_m=32, sx_n=1, sa_l=16, sa_m=1, sb_k=7, sb_n=1, sy_t=768,
                sy_l=48, sy_k=1, sz_t=768, sz_l=48, sz_k=1, has_base=1)
    names = list(lokr._kron_fwd_kernel.arg_names)
    args = (ptr, odd, ptr, ptr, ptr, *ints.values())
    kw = dict(BT=2, MP=32, BN=32, BL=32, BK=64, PRECISION="tf32", num_warps=4, num_stages=2)
    _, data = _common.launch_specialization(lokr._kron_fwd_kernel, args, kw, 90)
    spec = json.loads(data)
    consts = {names[k[0]]: v for k, v in zip(spec["constant_keys"], spec["constant_vals"])}
    divisible = {names[k[0]] for k, v in zip(spec["attrs_keys"], spec["attrs_vals"]) if v}
    assert {n for n, v in ints.items() if v == 1} <= set(consts)
    assert all(spec["signature"][n] == "constexpr" for n, v in ints.items() if v == 1)
    assert {n for n, v in ints.items() if v % 16 == 0} | {"x_ptr", "b_ptr", "y_ptr", "base_ptr"} == divisible
    with pytest.raises(ValueError, match="cc"):
        _common.launch_specialization(lokr._kron_fwd_kernel, args, kw, 75)


def test_recorded_sdxl_shapes_are_the_unet_linears():
    """launch_signatures.SDXL_LINEARS is the benchmarks' registry of SDXL Linear layers, copied (building
    the UNet costs ~10 s; this test shares the cached build with the benchmark tests)."""
    shapes = pytest.importorskip("benchmarks.shapes")
    unet = {(s.cin, s.cout, s.tokens, s.bias) for s in shapes.unet_shapes() if s.kind == "linear"}
    assert set(ls.SDXL_LINEARS) == unet


def _alt_triton_site(version: str) -> str:
    """A directory holding Triton `version` (LYFAST_TRITON_SITE, else a cache under ~/.cache/lyfast
    filled once by pip). Skips the test when neither can be had."""
    site = os.environ.get("LYFAST_TRITON_SITE")
    if not site:
        cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        site = os.path.join(cache, "lyfast", f"triton-{version}")
    if not os.path.exists(os.path.join(site, "triton", "__init__.py")):
        tmp = f"{site}.partial-{os.getpid()}"
        proc = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", tmp,
                               f"triton=={version}"], capture_output=True, text=True, timeout=900)
        if proc.returncode:
            pytest.skip(f"Triton {version} not installable here (set LYFAST_TRITON_SITE): {proc.stderr[-300:]}")
        os.makedirs(os.path.dirname(site), exist_ok=True)
        os.replace(tmp, site)
    return site


def test_launched_variants_compile_under_the_gpu_images_triton(launches, tmp_path):
    """The same recorded launches, specialized and compiled by Triton 3.6's own code in a subprocess, for
    sm_90 (the GPU image runs on H100/H200). sm_80 under 3.6 is left to the committed report (`--cc 80 90`):
    its ~60 more compiles would take the CI over its time budget."""
    if triton.__version__ == ALT_TRITON:
        pytest.skip(f"the installed Triton is {ALT_TRITON}: the main test compiled with it")
    site = _alt_triton_site(ALT_TRITON)
    saved, out = tmp_path / "launches.json", tmp_path / "report.json"
    ls.dump_launches(launches, str(saved))
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([site, root, os.environ.get("PYTHONPATH", "")]))
    env.pop("TRITON_INTERPRET", None)
    proc = subprocess.run([sys.executable, os.path.join(root, "tests", "launch_signatures.py"), "--launches",
                           str(saved), "--out", str(out), "--cc", "90", "--workers", str(min(2, os.cpu_count() or 1))],
                          env=env, capture_output=True, text=True, timeout=1200)
    assert out.exists(), proc.stdout[-3000:] + proc.stderr[-3000:]
    rep = json.loads(out.read_text())
    print("\n" + _table(rep))
    assert rep["triton"] == ALT_TRITON
    bad = ls.failures(rep)
    assert not bad, f"launched variants that fail under Triton {ALT_TRITON}:\n" + "\n".join(bad)


def test_compiling_still_works_after_an_interpreted_launch(launches):
    """The interpreter patches triton.language while it runs; lyfast undoes every patch on return, so a
    process can run kernels on CPU tensors and still compile them (this file and the interpreter tests
    share one pytest process, in either order)."""
    from lyfast.kernels import lokr

    x, c1, c2 = torch.randn(2, 6), torch.randn(2, 2), torch.randn(3, 3)
    torch.testing.assert_close(lokr.kron_forward(x, c1, c2), (c1 @ x.reshape(2, 2, 3) @ c2.t()).reshape(2, 6))
    launch = next(la for la in launches if la.kernel == "lokr._kron_fwd_kernel")
    _, data = _common.launch_specialization(lokr._kron_fwd_kernel, launch.args, launch.kwargs, 90)
    assert _common.compile_specialization(lokr._kron_fwd_kernel, data, 90)["shared"] > 0


def test_route_table_doc_is_current():
    """docs/loha_routes.md is what the cost model chooses now (regenerate with the command it names)."""
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs", "loha_routes.md")
    with open(path) as f:
        assert f.read() == ls.route_doc(), "docs/loha_routes.md is stale: python tests/launch_signatures.py --route-table docs/loha_routes.md"


def test_peaks_by_exact_device_name_with_a_conservative_fallback():
    """SKUs of one chip get their own rates; an unnamed card gets the slowest common part of its class."""
    sxm, nvl, pcie = (_common.peaks_for(n, (9, 0)) for n in ("NVIDIA H100 80GB HBM3", "NVIDIA H100 NVL", "NVIDIA H100 PCIe"))
    assert sxm.half_flops > nvl.half_flops > pcie.half_flops and len({sxm.bandwidth, nvl.bandwidth, pcie.bandwidth}) == 3
    assert _common.peaks_for("NVIDIA L40", (8, 9)).half_flops < _common.peaks_for("NVIDIA L40S", (8, 9)).half_flops
    assert _common.peaks_for("NVIDIA H100 SXM5 96GB (unlisted)", (9, 0)) == _common.peaks_for("NVIDIA H100 PCIe", (9, 0))
    assert _common.peaks_for("some sm_89 card", (8, 9)) == _common.PEAKS["NVIDIA L4"]
    assert _common.peaks_for("some sm_120 card", (12, 0)) == _common.FALLBACK_PEAKS


def test_launch_cost_is_hidden_behind_work_longer_than_it():
    pk = _common.DEFAULT_PEAKS
    big = pk.seconds(1e12, 0, torch.bfloat16, launches=3)
    assert big == pytest.approx(1e12 / pk.half_flops)  # launches overlap the work
    assert pk.seconds(1e3, 0, torch.bfloat16, launches=3) == pytest.approx(3 * pk.launch_s)  # launch-bound
