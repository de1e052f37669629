"""`python -m benchmarks.recalibrate RESULTS.json [...] [--write]`: fit the LoHa route model's efficiencies to
a GPU benchmark and (with --write) store them for that exact device name.

Reads benchmark JSON as `python -m benchmarks` writes it (`info.device` = torch.cuda.get_device_name,
`info.dtype`, and `timings` rows with `shape` "linear-IN-OUT-tTOKENS", `mode`, `provider`, `setting`,
`median_ms`) — what `bash benchmarks/gpu_session.sh bench` leaves in $OUT. Two figures, per device, against
its datasheet entry in kernels/_common.DATASHEET_PEAKS:

* cublas_efficiency: the frozen base layer's timings (`provider` base: one GEMM forward, two with the dx of
  `fwdbwd`) as a share of the tensor-core peak, median over the shapes the roofline calls compute-bound at
  that share (memory- or launch-bound shapes say nothing about it);
* tile_vs_cublas: the `lyfast-triton` LoHa timings, each solved for the Triton rate (as a share of cuBLAS's)
  at which `kernels.loha.route_costs`, with the fitted cuBLAS share, predicts the measured time for the route
  the model then picks (the benchmark's `auto` routing picks by the same model); median over the timings
  that depend on it.

Prints each fitted value against the one in force. --write merges them into kernels/calibration.json (keyed
by device name; `kernels/_common.PEAKS` applies it at import, other devices keep the assumed constants) and
regenerates docs/loha_routes.md. A cuBLAS share below --min-cublas (default 0.2) means host overhead, not
GEMMs, was timed (the H200 log of 2026-11-30 gives ~0.02): --write then refuses unless --force.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import statistics
import subprocess
import sys
from pathlib import Path

import torch

from lyfast.kernels import _common, loha
from lyfast.profile import SETTINGS

ROOT = Path(__file__).resolve().parent.parent
ROUTE_DOC = ROOT / "docs" / "loha_routes.md"
LINEAR = re.compile(r"linear-(\d+)-(\d+)-t(\d+)$")
GEMMS = {"fwd": 1, "fwdbwd": 2}  # base GEMMs per timed call (bwd-only rows are not used)


@dataclasses.dataclass
class Fit:
    """One device's fitted efficiencies; None where no timing constrained the figure."""

    device: str
    dtype: torch.dtype
    cublas_efficiency: float | None
    tile_vs_cublas: float | None
    cublas_samples: list[float]
    tile_samples: list[float]
    sources: list[str]


def _rows(timings, provider):
    """(mode, tokens, in, out, seconds, setting) of the Linear rows of `provider` in a timed mode."""
    for t in timings:
        m = LINEAR.match(t.get("shape") or "")
        if t.get("provider") == provider and m and t.get("mode") in GEMMS and t.get("median_ms"):
            cin, cout, tokens = map(int, m.groups())
            yield t["mode"], tokens, cin, cout, t["median_ms"] / 1e3, t.get("setting")


def fit_cublas(pk: _common.Peaks, dtype: torch.dtype, timings) -> list[float]:
    """Per compute-bound base timing: the share of the tensor-core peak its GEMM FLOPs imply."""
    e = torch.empty((), dtype=dtype).element_size()
    out = []
    for mode, T, C, O, sec, _ in _rows(timings, "base"):
        per_gemm = sec / GEMMS[mode]
        memory = e * (T * C + O * C + T * O) / (pk.bandwidth * _common.BANDWIDTH_EFFICIENCY)
        if per_gemm > max(memory, pk.launch_s):  # compute-bound at the share it implies
            out.append(2 * T * C * O / (per_gemm * pk.flops(dtype)))
    return out


def _modelled(pk, T, C, O, r, dtype, training):
    route = loha.choose_route(T, C, O, r, r, dtype, torch.device("cpu"), training, pk)
    if route not in ("tile", "khatri_rao"):
        return None
    return loha.route_costs(T, C, O, r, r, dtype, torch.device("cpu"), training, pk)[route]


def fit_tile(pk: _common.Peaks, dtype: torch.dtype, timings, lo=1e-3, hi=4.0) -> list[float]:
    """Per lyfast-triton LoHa timing: the tile_vs_cublas at which the route model predicts it (bisection;
    the modelled time falls as the rate rises). Timings the model cannot reach in [lo, hi], or reaches where
    its time does not depend on the rate (bound by memory or launches), or a route it does not model, are
    left out."""
    out = []
    for mode, T, C, O, sec, setting in _rows(timings, "lyfast-triton"):
        algo, kwargs = SETTINGS.get(setting, (None, {}))
        if algo != "loha":
            continue
        r, training = kwargs["lora_dim"], mode == "fwdbwd"
        at = lambda x: _modelled(dataclasses.replace(pk, tile_vs_cublas=x), T, C, O, r, dtype, training)  # noqa: E731
        slow, fast = at(lo), at(hi)
        if slow is None or fast is None or not fast < sec < slow:
            continue
        a, b = lo, hi
        for _ in range(60):
            mid = 0.5 * (a + b)
            a, b = (mid, b) if at(mid) > sec else (a, mid)
        x = 0.5 * (a + b)
        if at(0.95 * x) > at(1.05 * x):  # else the time is flat in the rate there (memory-bound): no evidence
            out.append(x)
    return out


def fit(paths: list[Path]) -> list[Fit]:
    """The fitted efficiencies of every device the benchmark files `paths` timed."""
    by_device: dict[tuple[str, str], list] = {}
    for path in paths:
        data = json.loads(Path(path).read_text())
        if not isinstance(data, dict) or "timings" not in data or "info" not in data:
            print(f"{path}: not benchmark results (no info/timings); skipped")
            continue
        key = (data["info"]["device"], data["info"]["dtype"])
        by_device.setdefault(key, []).append((str(path), data["timings"]))
    fits = []
    for (device, dtype_name), runs in by_device.items():
        if device not in _common.DATASHEET_PEAKS:
            raise SystemExit(f"{device!r} has no datasheet entry in kernels/_common.py PEAKS: add its peaks first")
        dtype = getattr(torch, dtype_name)
        timings = [t for _, ts in runs for t in ts]
        pk = _common.DATASHEET_PEAKS[device]
        cublas = fit_cublas(pk, dtype, timings)
        c = statistics.median(cublas) if cublas else None
        tile = fit_tile(dataclasses.replace(pk, cublas_efficiency=c), dtype, timings) if c else []
        fits.append(Fit(device, dtype, c, statistics.median(tile) if tile else None, cublas, tile,
                        [p for p, _ in runs]))
    return fits


def report(f: Fit, calibration: Path) -> str:
    """Fitted values against those `calibration` puts in force for one device."""
    now = _common.calibrated(_common.DATASHEET_PEAKS, _common.read_calibration(calibration))[f.device]
    where = f"calibrated from {now.calibrated_from}" if now.calibrated_from else "assumed"
    lines = [f"{f.device} ({f.dtype}; {', '.join(f.sources)})"]
    for name, value, samples, what in (
            ("cublas_efficiency", f.cublas_efficiency, f.cublas_samples, "compute-bound base timings"),
            ("tile_vs_cublas", f.tile_vs_cublas, f.tile_samples, "lyfast-triton LoHa timings")):
        current = getattr(now, name)
        if value is None:
            lines.append(f"  {name:<18} not fitted (no {what})     in force {current:.3f} ({where})")
        else:
            lines.append(f"  {name:<18} {value:.3f} from {len(samples)} {what} (range {min(samples):.3f}-"
                         f"{max(samples):.3f})     in force {current:.3f} ({where})")
    return "\n".join(lines)


def write(fits: list[Fit], calibration: Path, route_doc: Path, min_cublas: float, force: bool) -> list[str]:
    """Merge the complete fits into `calibration` and regenerate `route_doc` from it; returns the devices
    written. Refuses (SystemExit) a cuBLAS share below `min_cublas` unless `force`."""
    table = _common.read_calibration(calibration)
    written = []
    for f in fits:
        if f.cublas_efficiency is None or f.tile_vs_cublas is None:
            print(f"{f.device}: not written (a figure was not fitted)")
            continue
        if f.cublas_efficiency < min_cublas and not force:
            raise SystemExit(f"{f.device}: cuBLAS at {f.cublas_efficiency:.3f} of peak is host overhead, not GEMM "
                             f"time; not written (--force writes it anyway)")
        table[f.device] = {"cublas_efficiency": round(f.cublas_efficiency, 4),
                           "tile_vs_cublas": round(f.tile_vs_cublas, 4),
                           "source": ", ".join(os.path.relpath(s, ROOT) for s in f.sources)}
        written.append(f.device)
    if not written:
        return written
    calibration.write_text(json.dumps(table, indent=2, sort_keys=True) + "\n")
    env = {**os.environ, "LYFAST_CALIBRATION": str(calibration)}
    subprocess.run([sys.executable, str(ROOT / "tests" / "launch_signatures.py"), "--route-table", str(route_doc)],
                   check=True, env=env, cwd=ROOT)
    return written


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("results", nargs="+", type=Path, help="benchmark JSON from a GPU run")
    ap.add_argument("--write", action="store_true", help="store the fit and regenerate the route table")
    ap.add_argument("--calibration", type=Path, default=_common.CALIBRATION_PATH)
    ap.add_argument("--route-doc", type=Path, default=ROUTE_DOC)
    ap.add_argument("--min-cublas", type=float, default=0.2)
    ap.add_argument("--force", action="store_true", help="write a cuBLAS share below --min-cublas")
    args = ap.parse_args(argv)
    fits = fit(args.results)
    for f in fits:
        print(report(f, args.calibration))
    if args.write:
        written = write(fits, args.calibration, args.route_doc, args.min_cublas, args.force)
        if written:
            print(f"wrote {args.calibration} ({', '.join(written)}) and {args.route_doc}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
