"""`python -m benchmarks.recalibrate`: planted GPU timings in the benchmark JSON format give back the
efficiencies they were made with, and --write changes the route model of that device name only."""
from __future__ import annotations

import dataclasses
import json
import random

import pytest
import torch

from benchmarks import recalibrate
from lyfast.kernels import _common, loha

H200, OTHER = "NVIDIA H200", "NVIDIA H100 80GB HBM3"
CUBLAS, TILE = 0.5, 0.6  # the planted efficiencies
BF16 = torch.bfloat16
# (in, out, tokens): SDXL/DiT Linear layers at 1024² (4096 tokens), compute-bound for a GEMM on an H200, and
# 1280² at 1024 tokens (all LoHa ranks on the tile route)
LAYERS = [(1280, 1280, 4096), (640, 5120, 4096), (5120, 1280, 4096), (3072, 3072, 4096), (1280, 10240, 4096),
          (1280, 1280, 1024)]
TEXT = (1280, 1280, 77)  # text tokens: the GEMM and every LoHa route memory- or launch-bound on an H200
RANKS = (4, 8, 16, 32)  # loha-r4 is no lyfast.profile setting: counted as left out, not fitted
CPU = torch.device("cpu")


def _timings(route_peaks=None, noise=0.0, seed=0):
    """Benchmark rows as `python -m benchmarks` writes them: base GEMMs at exactly CUBLAS of the H200's
    datasheet peak; lyfast-triton LoHa at the route model's time with Triton at TILE of cuBLAS, for the route
    the benchmark runs: `auto`, chosen by the efficiencies in force (`route_peaks`, default the assumed
    ones; never the planted ones) and as in training in every mode (the benchmark's input requires grad).
    `noise`: each time times exp(N(0, noise)), seeded."""
    peak = _common.DATASHEET_PEAKS[H200]
    route_peaks = route_peaks or peak
    planted = dataclasses.replace(peak, cublas_efficiency=CUBLAS, tile_vs_cublas=TILE)
    rng = random.Random(seed)
    jitter = (lambda: rng.lognormvariate(0.0, noise)) if noise else (lambda: 1.0)  # noqa: E731
    rows = []
    for cin, cout, tokens in (*LAYERS, TEXT):
        shape = dict(model="sdxl", shape=f"linear-{cin}-{cout}-t{tokens}", tokens=tokens, model_count=1)
        for mode, gemms in (("fwd", 1), ("fwdbwd", 2)):
            base_s = gemms * planted.seconds(2 * tokens * cin * cout, 2 * (tokens * cin + cin * cout + tokens * cout),
                                             BF16, compute_efficiency=CUBLAS)
            rows.append({**shape, "mode": mode, "provider": "base", "setting": None, "algo": None,
                         "median_ms": base_s * jitter() * 1e3})
            for r in RANKS:
                route = loha.choose_route(tokens, cin, cout, r, r, BF16, CPU, True, route_peaks)
                t = loha.route_costs(tokens, cin, cout, r, r, BF16, CPU, mode == "fwdbwd", planted)[route]
                rows.append({**shape, "mode": mode, "provider": "lyfast-triton", "setting": f"loha-r{r}",
                             "algo": "loha", "median_ms": t * jitter() * 1e3})
    rows.append({"shape": "conv3x3-320-320-128x128", "mode": "fwdbwd", "provider": "base", "median_ms": 1.0})
    return rows


def _write(path, timings, routing=None):
    info = {"device": H200, "cuda": True, "dtype": "bfloat16", "git_sha": "0" * 12, "date": "2099-01-01",
            "routing": routing}
    path.write_text(json.dumps({"info": info, "args": {}, "timings": timings, "memory": [], "skipped": []}))
    return path


@pytest.fixture
def results(tmp_path):
    return _write(tmp_path / "nvidia-h200-2099-01-01-sdxl.json", _timings())


@pytest.fixture
def no_calibration(tmp_path):
    """The efficiencies in force for routing: the assumed ones (no calibration file)."""
    return tmp_path / "absent-calibration.json"


def test_fit_recovers_the_planted_efficiencies_from_every_kept_timing(results, no_calibration):
    (f,) = recalibrate.fit([results], no_calibration)
    assert f.device == H200 and f.dtype == BF16
    assert f.cublas_efficiency == pytest.approx(CUBLAS, rel=1e-9)
    assert min(f.cublas_samples) == pytest.approx(CUBLAS, rel=1e-9) == max(f.cublas_samples)
    # the conv row is not a Linear GEMM; the 77-token GEMM is memory/launch-bound: it says nothing
    assert len(f.cublas_samples) == 2 * len(LAYERS) and f.cublas_dropped == {"memory- or launch-bound": 2}
    # every kept sample, not only the median: the inversion costs the route that ran, as it was timed
    assert min(f.tile_samples) == pytest.approx(TILE, rel=1e-6) and max(f.tile_samples) == pytest.approx(TILE, rel=1e-6)
    assert len(f.tile_samples) == 19, f.tile_samples
    assert f.tile_vs_cublas == pytest.approx(TILE, rel=1e-6)
    assert f.tile_dropped == {
        "setting not in lyfast.peers.SETTINGS": 2 * (len(LAYERS) + 1),  # loha-r4
        # r=8 on route (a) at 4096 tokens (its K·x / F·P kernels bandwidth-bound), every rank at 77 tokens
        "at the model's floor, flat in the rate (bandwidth- or launch-bound)": 10 + 6,
        # route (a) at r=16 (and 3072² r=32): the base GEMMs are most of the time
        "Triton compute under 40% of the modelled time (rate barely identified)": 7}, f.tile_dropped
    assert sum(f.tile_dropped.values()) + len(f.tile_samples) == 2 * (len(LAYERS) + 1) * len(RANKS)


def test_fit_costs_the_route_that_ran_not_the_planted_ones_choice(tmp_path, no_calibration):
    """Routed by other efficiencies in force (a previous calibration: slow Triton), the timings are of other
    routes, and the fit still recovers TILE from every one it keeps."""
    slow = dataclasses.replace(_common.DATASHEET_PEAKS[H200], cublas_efficiency=0.6, tile_vs_cublas=0.3)
    calibration = tmp_path / "calibration.json"
    calibration.write_text(json.dumps({H200: {"cublas_efficiency": 0.6, "tile_vs_cublas": 0.3, "source": "x"}}))
    timings = _timings(route_peaks=slow)
    assert sum(a != b for a, b in zip(timings, _timings())) == 2 * 5  # 5 (layer, rank) × 2 modes: other routes
    (f,) = recalibrate.fit([_write(tmp_path / "r.json", timings)], calibration)
    assert min(f.tile_samples) == pytest.approx(TILE, rel=1e-6) and max(f.tile_samples) == pytest.approx(TILE, rel=1e-6)
    assert len(f.tile_samples) == 15, f.tile_dropped


def test_fit_routes_by_the_efficiencies_the_run_recorded(tmp_path, no_calibration):
    """A run routed by other efficiencies that it recorded (`info.routing`, as harness.run_info writes on
    CUDA) is inverted with those, whatever the calibration file says today."""
    slow = dataclasses.replace(_common.DATASHEET_PEAKS[H200], cublas_efficiency=0.6, tile_vs_cublas=0.3)
    timings = _timings(route_peaks=slow)
    path = _write(tmp_path / "r.json", timings, routing={"cublas_efficiency": 0.6, "tile_vs_cublas": 0.3})
    (f,) = recalibrate.fit([path], no_calibration)
    assert min(f.tile_samples) == pytest.approx(TILE, rel=1e-6) and max(f.tile_samples) == pytest.approx(TILE, rel=1e-6)
    assert len(f.tile_samples) == 15, f.tile_dropped


def test_fit_tolerates_10_percent_timing_noise(tmp_path, no_calibration):
    """Every time (base too) off by a log-normal factor of sigma 0.1, in four benchmark runs of the device
    (the fit pools files of one device): both medians within 5%. (Over 60 seeds, 55 are; one run alone
    gives ~20 Triton samples and a median within 5% in ~60% of seeds, within 13% in all.)"""
    runs = [_write(tmp_path / f"noisy-{seed}.json", _timings(noise=0.1, seed=seed)) for seed in range(4)]
    (f,) = recalibrate.fit(runs, no_calibration)
    assert f.cublas_efficiency == pytest.approx(CUBLAS, rel=0.05)
    assert len(f.tile_samples) >= 40 and f.tile_vs_cublas == pytest.approx(TILE, rel=0.05), sorted(f.tile_samples)


def test_write_calibrates_that_device_only(results, tmp_path, capsys):
    calibration, doc = tmp_path / "calibration.json", tmp_path / "loha_routes.md"
    recalibrate.main([str(results), "--write", "--calibration", str(calibration), "--route-doc", str(doc)])
    out = capsys.readouterr().out
    assert "cublas_efficiency  0.500" in out and "in force 0.700 (assumed)" in out, out
    assert "tile_vs_cublas     0.600 from 19 lyfast-triton LoHa timings (range 0.600-0.600)" in out, out
    assert "    left out: 16 at the model's floor, flat in the rate" in out, out
    assert "    left out: 2 memory- or launch-bound" in out, out
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
