"""The GPU suite can fail (issue 11, part 3): defects planted in the Triton launchers must fail
`kernel_checks.check_case` — the very check tests/test_gpu_kernels.py runs on a GPU — here through
Triton's interpreter on tiny shapes, in fp16 (every plant), bf16 (the gross ones) and, for ΔW dropped, in
every dtype. Each planted defect is a wrong kernel as the suite sees
it: the launcher computes a different function (a factor ×1.01, a transposed factor, ΔW dropped, BOFT's
stages in reverse order, no rescale) in the forward or in the backward. An unplanted control passes."""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton", reason="the Triton backend needs the `triton` package")

from kernel_checks import check_case  # noqa: E402
from lyfast.kernels import boft as kboft  # noqa: E402
from lyfast.kernels import loha as kloha  # noqa: E402
from lyfast.kernels import lokr as klokr  # noqa: E402

SQUARE = (64, 64, 5)  # a transposed factor (or ΔWᵀ) has the right shape only on a square layer
WIDE = (64, 96, 5)

T = lambda m: m.mT.contiguous()  # noqa: E731


# name -> (setting, shape, module, launcher name, rewrite of the launcher's positional arguments)
PLANTS = {
    "lokr ΔW dropped": ("lokr-f-1-r16", WIDE, klokr, "kron_forward", lambda x, c1, c2, *r: (x, 0 * c1, c2, *r)),
    "lokr c1 ×1.01 fwd": ("lokr-f-1-r16", WIDE, klokr, "kron_forward", lambda x, c1, c2, *r: (x, 1.01 * c1, c2, *r)),
    "lokr c2 transposed": ("lokr-full-f4", SQUARE, klokr, "kron_forward", lambda x, c1, c2, *r: (x, c1, T(c2), *r)),
    "lokr c1 ×1.01 bwd": ("lokr-f-1-r16", WIDE, klokr, "kron_backward",
                          lambda g, x, c1, c2, *r: (g, x, 1.01 * c1, c2, *r)),
    "loha-kr ΔW dropped": ("loha-r4-kr", WIDE, kloha, "kr_forward", lambda x, f, k, *r: (x, 0 * f, k, *r)),
    "loha-kr F ×1.01 fwd": ("loha-r4-kr", WIDE, kloha, "kr_forward", lambda x, f, k, *r: (x, 1.01 * f, k, *r)),
    "loha-kr ΔW transposed": ("loha-r4-kr", SQUARE, kloha, "kr_forward", lambda x, f, k, *r: (x, T(k), T(f), *r)),
    "loha-kr F ×1.01 bwd": ("loha-r4-kr", WIDE, kloha, "kr_backward",
                            lambda g, x, p, f, k, *r: (g, x, p, 1.01 * f, k, *r)),
    "loha-tile ΔW dropped": ("loha-r16-tile", WIDE, kloha, "tile_forward",
                             lambda x, w, b, a1, b1, a2, b2: (x, w, b, 0 * a1, b1, a2, b2)),
    "loha-tile a1 ×1.01 fwd": ("loha-r16-tile", WIDE, kloha, "tile_forward",
                               lambda x, w, b, a1, b1, a2, b2: (x, w, b, 1.01 * a1, b1, a2, b2)),
    "loha-tile ΔW transposed": ("loha-r16-tile", SQUARE, kloha, "tile_forward",
                                lambda x, w, b, a1, b1, a2, b2: (x, w, b, T(b1), T(a1), T(b2), T(a2))),
    "loha-tile a1 ×1.01 bwd": ("loha-r16-tile", WIDE, kloha, "tile_backward",
                               lambda g, x, w, a1, b1, a2, b2, *r: (g, x, w, 1.01 * a1, b1, a2, b2, *r)),
    "boft rotation dropped": ("boft-b32", WIDE, kboft, "butterfly_forward",
                              lambda z, r, s, ax: (z, torch.eye(r.shape[-1]).expand_as(r).contiguous(), None, ax)),
    "boft stage 0 ×1.01": ("boft-b32", WIDE, kboft, "butterfly_forward",
                           lambda z, r, s, ax: (z, torch.cat([1.01 * r[:1], r[1:]]), s, ax)),
    "boft blocks transposed": ("boft-b32", WIDE, kboft, "butterfly_forward", lambda z, r, s, ax: (z, T(r), s, ax)),
    "boft stages reversed": ("boft-b32", WIDE, kboft, "butterfly_forward", lambda z, r, s, ax: (z, r.flip(0), s, ax)),
    "boft rescale missing": ("boft-b32", WIDE, kboft, "butterfly_forward", lambda z, r, s, ax: (z, r, None, ax)),
    "boft stages reversed bwd": ("boft-b32", WIDE, kboft, "butterfly_backward",
                                 lambda g, z, r, s, ax, *f: (g, z, r.flip(0), s, ax, *f)),
}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "amp-bf16": "amp-bf16", "fp32": torch.float32}
# fp16 for every plant (eager's error there is ~4e-4, so a 1% defect is ~10× the tolerance; in bf16 eager's
# own error is ~3e-3 and 1% sits at the tolerance, so bf16 gets the gross defects only); ΔW dropped in all.
GROSS = ("dropped", "transposed", "reversed", "missing")
CASES = ([(p, "fp16") for p in PLANTS] + [(p, "bf16") for p in PLANTS if any(w in p for w in GROSS)]
         + [(p, d) for p in PLANTS if "dropped" in p for d in ("amp-bf16", "fp32")])


@pytest.fixture(autouse=True)
def _interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")


@pytest.mark.parametrize("plant,dtype", CASES, ids=[f"{p}-{d}" for p, d in CASES])
def test_planted_defect_fails_the_gpu_check(plant, dtype, monkeypatch):
    setting, shape, module, attr, wrap = PLANTS[plant]
    original = getattr(module, attr)  # the launcher, called with its arguments rewritten by the plant
    monkeypatch.setattr(module, attr, lambda *a, **k: original(*wrap(*a), **k))
    with pytest.raises(AssertionError, match="ref‖|non-finite"):
        check_case(setting, shape, DTYPES[dtype], "triton", "cpu")


@pytest.mark.parametrize("setting,shape", [("lokr-f-1-r16", WIDE), ("lokr-full-f4", SQUARE), ("loha-r4-kr", SQUARE),
                                           ("loha-r16-tile", SQUARE), ("boft-b32", WIDE)])
def test_unplanted_kernels_pass_the_gpu_check(setting, shape):
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        check_case(setting, shape, dtype, "triton", "cpu")
