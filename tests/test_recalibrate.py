"""`python -m benchmarks.recalibrate`: planted GPU timings in the benchmark JSON format give back the
efficiencies they were made with, and --write changes the route model of that device name only."""
from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from benchmarks import recalibrate
from lyfast.kernels import _common, loha

H200, OTHER = "NVIDIA H200", "NVIDIA H100 80GB HBM3"
CUBLAS, TILE = 0.5, 0.6  # the planted efficiencies
BF16 = torch.bfloat16
# (in, out, tokens): SDXL/DiT Linear layers at 1024² / 4096 tokens, compute-bound for a GEMM on an H200
LAYERS = [(1280, 1280, 4096), (640, 5120, 4096), (5120, 1280, 4096), (3072, 3072, 4096), (1280, 10240, 4096)]


def _timings():
    """Benchmark rows as `python -m benchmarks` writes them: base GEMMs at exactly CUBLAS of the H200's
    datasheet peak; lyfast-triton LoHa at the route model's time with Triton at TILE of cuBLAS."""
    peak = _common.DATASHEET_PEAKS[H200]
    planted = dataclasses.replace(peak, cublas_efficiency=CUBLAS, tile_vs_cublas=TILE)
    rows = []
    for cin, cout, tokens in LAYERS:
        shape = dict(model="sdxl", shape=f"linear-{cin}-{cout}-t{tokens}", tokens=tokens, model_count=1)
        for mode, gemms in (("fwd", 1), ("fwdbwd", 2)):
            base_s = gemms * 2 * tokens * cin * cout / (CUBLAS * peak.half_flops)
            rows.append({**shape, "mode": mode, "provider": "base", "setting": None, "algo": None,
                         "median_ms": base_s * 1e3})
            for r in (4, 8, 16, 32):
                route = loha.choose_route(tokens, cin, cout, r, r, BF16, torch.device("cpu"), mode == "fwdbwd", planted)
                t = loha.route_costs(tokens, cin, cout, r, r, BF16, torch.device("cpu"), mode == "fwdbwd", planted)[route]
                rows.append({**shape, "mode": mode, "provider": "lyfast-triton", "setting": f"loha-r{r}",
                             "algo": "loha", "median_ms": t * 1e3})
    rows.append({"shape": "conv3x3-320-320-128x128", "mode": "fwdbwd", "provider": "base", "median_ms": 1.0})
    return rows


@pytest.fixture
def results(tmp_path):
    path = tmp_path / "nvidia-h200-2099-01-01-sdxl.json"
    info = {"device": H200, "cuda": True, "dtype": "bfloat16", "git_sha": "0" * 12, "date": "2099-01-01"}
    path.write_text(json.dumps({"info": info, "args": {}, "timings": _timings(), "memory": [], "skipped": []}))
    return path


def test_fit_recovers_the_planted_efficiencies(results):
    (f,) = recalibrate.fit([results])
    assert f.device == H200 and f.dtype == BF16
    assert f.cublas_efficiency == pytest.approx(CUBLAS, rel=1e-9)
    assert len(f.cublas_samples) == 2 * len(LAYERS)  # the conv row is not a Linear GEMM
    assert f.tile_vs_cublas == pytest.approx(TILE, rel=1e-6)
    assert len(f.tile_samples) >= len(LAYERS)


def test_write_calibrates_that_device_only(results, tmp_path, capsys):
    calibration, doc = tmp_path / "calibration.json", tmp_path / "loha_routes.md"
    recalibrate.main([str(results), "--write", "--calibration", str(calibration), "--route-doc", str(doc)])
    out = capsys.readouterr().out
    assert "cublas_efficiency  0.500" in out and "in force 0.700 (assumed)" in out, out
    table = json.loads(calibration.read_text())
    assert list(table) == [H200] and table[H200]["cublas_efficiency"] == CUBLAS
    assert table[H200]["tile_vs_cublas"] == pytest.approx(TILE, abs=1e-4)

    peaks = _common.calibrated(_common.DATASHEET_PEAKS, _common.read_calibration(calibration))
    assert peaks[H200].cublas_efficiency == CUBLAS and peaks[H200].calibrated_from
    assert peaks[OTHER] == _common.DATASHEET_PEAKS[OTHER]  # another device keeps the assumed figures
    # choose_route on the device (through PEAKS, as for CUDA tensors) now costs the H200 with the fit: a
    # slower Triton rate moves SDXL's 1280→10240 layer at r=32 (tile on the H200 run of 2026-11-30) to route (a)
    args = (1024, 1280, 10240, 32, 32, BF16, torch.device("cpu"), True)
    before = loha.choose_route(*args, _common.peaks_for(H200, (9, 0)))
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(_common, "PEAKS", peaks)
        after = loha.choose_route(*args, _common.peaks_for(H200, (9, 0)))
        other = loha.choose_route(*args, _common.peaks_for(OTHER, (9, 0)))
    assert loha.route_costs(*args, peaks[H200]) != loha.route_costs(*args, _common.DATASHEET_PEAKS[H200])
    assert (before, after) == ("tile", "khatri_rao")
    assert other == loha.choose_route(*args, _common.DATASHEET_PEAKS[OTHER])

    text = doc.read_text()
    assert f"## {H200}\n\ncuBLAS at 50% of the tensor-core peak, Triton kernels at 60% of cuBLAS (fitted to" in text
    assert f"## {OTHER}\n\ncuBLAS at 70% of the tensor-core peak, Triton kernels at 80% of cuBLAS (assumed)" in text


def test_write_refuses_host_overhead(results, tmp_path):
    """Base timings ~40x slower than a GEMM (the 2026-11-30 H200 log) imply ~1% of peak: not written."""
    data = json.loads(results.read_text())
    for t in data["timings"]:
        t["median_ms"] *= 40
    results.write_text(json.dumps(data))
    calibration = tmp_path / "calibration.json"
    with pytest.raises(SystemExit, match="host overhead"):
        recalibrate.main([str(results), "--write", "--calibration", str(calibration),
                          "--route-doc", str(tmp_path / "doc.md")])
    assert not calibration.exists()
