"""`python -m benchmarks.recalibrate RESULTS.json [...] [--write]`: fit the LoHa route model's efficiencies to
a GPU benchmark and (with --write) store them for that exact device name.

Reads benchmark JSON as `python -m benchmarks` writes it (`info.device` = torch.cuda.get_device_name,
`info.dtype`, and `timings` rows with `shape` "linear-IN-OUT-tTOKENS", `mode`, `provider`, `setting`,
`median_ms`) — what `bash benchmarks/gpu_session.sh bench` leaves in $OUT. Two figures, per device, against
its datasheet entry in kernels/_common.DATASHEET_PEAKS:

* cublas_efficiency: the frozen base layer's timings (`provider` base: one GEMM forward, two with the dx of
  `fwdbwd`) as a share of the tensor-core peak, median over the shapes the roofline calls compute-bound at
  that share (memory- or launch-bound shapes say nothing about it);
* tile_vs_cublas: the `lyfast-triton` LoHa timings, each solved (bisection) for the Triton rate (as a share
  of cuBLAS's) at which `kernels.loha.route_costs`, with the fitted cuBLAS share, predicts the measured time
  of the route the benchmark ran: its `auto` routing's `choose_route`, costed in training (the benchmark's
  input requires grad, also in `fwd`) with the efficiencies in force (--calibration as read now: rerun the
  benchmark after changing it). Median over the timings that identify the rate: Triton compute at least
  MIN_TRITON_SHARE (40%) of the modelled time, on both sides of the solution (see `fit_tile`).

Prints each fitted value against the one in force, and how many timings each left out, by reason. --write merges them into kernels/calibration.json (keyed
by device name; `kernels/_common.PEAKS` applies it at import, other devices keep the assumed constants) and
regenerates docs/loha_routes.md. A cuBLAS share below --min-cublas (default 0.2) means host overhead, not
GEMMs, was timed (the H200 log of 2026-11-30 gives ~0.02): --write then refuses unless --force.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import re
import statistics
import subprocess
import sys
from collections import Counter
from pathlib import Path

import torch

from lyfast.kernels import _common, loha
from lyfast.peers import SETTINGS

ROOT = Path(__file__).resolve().parent.parent
ROUTE_DOC = ROOT / "docs" / "loha_routes.md"
LINEAR = re.compile(r"linear-(\d+)-(\d+)-t(\d+)$")
GEMMS = {"fwd": 1, "fwdbwd": 2}  # base GEMMs per timed call (bwd-only rows are not used)


MIN_TRITON_SHARE = 0.4  # below it a timing does not identify the Triton rate (see fit_tile)
CPU = torch.device("cpu")


@dataclasses.dataclass
class Fit:
    """One device's fitted efficiencies; None where no timing constrained the figure. `*_dropped` counts
    the timings left out of each figure, by reason."""

    device: str
    dtype: torch.dtype
    cublas_efficiency: float | None
    tile_vs_cublas: float | None
    cublas_samples: list[float]
    tile_samples: list[float]
    sources: list[str]
    cublas_dropped: Counter = dataclasses.field(default_factory=Counter)
    tile_dropped: Counter = dataclasses.field(default_factory=Counter)


def _rows(timings, provider):
    """(mode, tokens, in, out, seconds, setting) of the Linear rows of `provider` in a timed mode."""
    for t in timings:
        m = LINEAR.match(t.get("shape") or "")
        if t.get("provider") == provider and m and t.get("mode") in GEMMS and t.get("median_ms"):
            cin, cout, tokens = map(int, m.groups())
            yield t["mode"], tokens, cin, cout, t["median_ms"] / 1e3, t.get("setting")


def fit_cublas(pk: _common.Peaks, dtype: torch.dtype, timings, dropped: Counter | None = None) -> list[float]:
    """Per compute-bound base timing: the share of the tensor-core peak its GEMM FLOPs imply. Timings no
    longer than the GEMM's memory or launch time at full efficiency are counted in `dropped`."""
    e = torch.empty((), dtype=dtype).element_size()
    dropped = Counter() if dropped is None else dropped
    out = []
    for mode, T, C, O, sec, _ in _rows(timings, "base"):
        per_gemm = sec / GEMMS[mode]
        memory = e * (T * C + O * C + T * O) / (pk.bandwidth * _common.BANDWIDTH_EFFICIENCY)
        if per_gemm > max(memory, pk.launch_s):  # compute-bound at the share it implies
            out.append(2 * T * C * O / (per_gemm * pk.flops(dtype)))
        else:
            dropped["memory- or launch-bound"] += 1
    return out


def timed_route(T, C, O, r, dtype, routing: _common.Peaks) -> str:
    """The route the benchmark's lyfast-triton LoHa layer ran: `choose_route` of its `auto` routing, costed
    with the efficiencies in force on the device when it ran (`routing`), never with trial or fitted ones,
    and in training in every mode (the benchmark's input requires grad, so a forward-only call routes as
    training too)."""
    return loha.choose_route(T, C, O, r, r, dtype, CPU, True, routing)


def triton_share(at, x: float, step: float = 1.25) -> float:
    """-d ln at / d ln x at rate x, the smaller of the secants over a factor `step` below and above x: for
    a time a/x + b (Triton compute + the rest), a/x's share of it. Zero on a side where the time is flat."""
    t = at(x)  # the secants, not a derivative: at a kink of the max() terms one side is flat
    return min(math.log(at(x / step) / t), math.log(t / at(x * step))) / math.log(step)


def fit_tile(pk: _common.Peaks, dtype: torch.dtype, timings, routing: _common.Peaks, lo=1e-3, hi=4.0,
             min_share=MIN_TRITON_SHARE, dropped: Counter | None = None) -> list[float]:
    """Per lyfast-triton LoHa timing: the tile_vs_cublas at which `route_costs` (cuBLAS at `pk`'s share)
    predicts it for the route the benchmark ran (`timed_route`; fixed, not re-chosen at each trial rate).

    That time is a sum of roofline max() terms, each non-increasing in the rate, so it is solved by
    bisection, not in closed form. It identifies the rate only where it depends on it enough: the
    elasticity -d ln t / d ln rate (the Triton compute's share of the modelled time) must be at least
    `min_share` on both sides of the solution, over secants of a factor 1.25 (`triton_share`), so that a
    timing error of e moves the rate by at most e / min_share and a solution within 25% of where the time
    goes flat is not kept. Left out, each counted by reason in `dropped`: timings at the model's floor (flat
    in the rate: bandwidth- or launch-bound; bisection would stop at the flat interval's edge), timings
    whose time is mostly base GEMMs, memory or launches (share below `min_share`), timings the model cannot
    reach at rates in [lo, hi], settings lyfast.peers.SETTINGS does not know, DoRA, and routes the model
    does not cost (rowblock)."""
    dropped = Counter() if dropped is None else dropped
    out = []
    for mode, T, C, O, sec, setting in _rows(timings, "lyfast-triton"):
        if setting not in SETTINGS:
            dropped["setting not in lyfast.peers.SETTINGS"] += 1
            continue
        algo, kwargs = SETTINGS[setting]
        if algo != "loha":
            continue
        if kwargs.get("weight_decompose"):
            dropped["DoRA (not in the route model)"] += 1
            continue
        r, training = kwargs["lora_dim"], mode == "fwdbwd"
        route = timed_route(T, C, O, r, dtype, routing)
        if route not in ("tile", "khatri_rao"):
            dropped[f"route {route} (not in the route model)"] += 1
            continue
        at = lambda x: loha.route_costs(T, C, O, r, r, dtype, CPU, training,  # noqa: E731
                                        dataclasses.replace(pk, tile_vs_cublas=x))[route]
        flat = "at the model's floor, flat in the rate (bandwidth- or launch-bound)"
        if sec >= at(lo):
            dropped[f"slower than the model at rate {lo:g}"] += 1
            continue
        if sec <= at(hi):  # at the time's floor: flat there, or a rate above hi
            dropped[flat if triton_share(at, hi) < min_share else f"faster than the model at rate {hi:g}"] += 1
            continue
        a, b = lo, hi
        for _ in range(80):
            mid = 0.5 * (a + b)
            a, b = (mid, b) if at(mid) > sec else (a, mid)
        x = 0.5 * (a + b)
        if triton_share(at, x) < min_share:
            dropped[f"Triton compute under {min_share:.0%} of the modelled time (rate barely identified)"] += 1
            continue
        out.append(x)
    return out


def fit(paths: list[Path], calibration: Path = _common.CALIBRATION_PATH) -> list[Fit]:
    """The fitted efficiencies of every device the benchmark files `paths` timed. The routes each benchmark
    ran are those its own recorded efficiencies (`info.routing`, written since 2026-11-30) chose; files
    without them are taken as routed by what `calibration` (as read now) puts in force for the device."""
    by_device: dict[tuple[str, str], list] = {}
    for path in paths:
        data = json.loads(Path(path).read_text())
        if not isinstance(data, dict) or "timings" not in data or "info" not in data:
            print(f"{path}: not benchmark results (no info/timings); skipped")
            continue
        key = (data["info"]["device"], data["info"]["dtype"])
        by_device.setdefault(key, []).append((str(path), data["timings"], data["info"].get("routing")))
    in_force = _common.calibrated(_common.DATASHEET_PEAKS, _common.read_calibration(calibration))
    fits = []
    for (device, dtype_name), runs in by_device.items():
        if device not in _common.DATASHEET_PEAKS:
            raise SystemExit(f"{device!r} has no datasheet entry in kernels/_common.py PEAKS: add its peaks first")
        dtype = getattr(torch, dtype_name)
        pk = _common.DATASHEET_PEAKS[device]
        f = Fit(device, dtype, None, None, [], [], [p for p, _, _ in runs])
        f.cublas_samples = fit_cublas(pk, dtype, [t for _, ts, _ in runs for t in ts], f.cublas_dropped)
        f.cublas_efficiency = statistics.median(f.cublas_samples) if f.cublas_samples else None
        if f.cublas_efficiency:
            fitted = dataclasses.replace(pk, cublas_efficiency=f.cublas_efficiency)
            for _, ts, routing in runs:  # each run's routes as its own recorded efficiencies chose them
                routed = dataclasses.replace(pk, **routing) if routing else in_force[device]
                f.tile_samples += fit_tile(fitted, dtype, ts, routed, dropped=f.tile_dropped)
        f.tile_vs_cublas = statistics.median(f.tile_samples) if f.tile_samples else None
        fits.append(f)
    return fits


def report(f: Fit, calibration: Path) -> str:
    """Fitted values against those `calibration` puts in force for one device."""
    now = _common.calibrated(_common.DATASHEET_PEAKS, _common.read_calibration(calibration))[f.device]
    where = f"calibrated from {now.calibrated_from}" if now.calibrated_from else "assumed"
    lines = [f"{f.device} ({f.dtype}; {', '.join(f.sources)})"]
    for name, value, samples, dropped, what in (
            ("cublas_efficiency", f.cublas_efficiency, f.cublas_samples, f.cublas_dropped, "compute-bound base timings"),
            ("tile_vs_cublas", f.tile_vs_cublas, f.tile_samples, f.tile_dropped, "lyfast-triton LoHa timings")):
        current = getattr(now, name)
        if value is None:
            lines.append(f"  {name:<18} not fitted (no {what})     in force {current:.3f} ({where})")
        else:
            lines.append(f"  {name:<18} {value:.3f} from {len(samples)} {what} (range {min(samples):.3f}-"
                         f"{max(samples):.3f})     in force {current:.3f} ({where})")
        for why, n in sorted(dropped.items(), key=lambda kv: (-kv[1], kv[0])):
            lines.append(f"    left out: {n} {why}")
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
    fits = fit(args.results, args.calibration)
    for f in fits:
        print(report(f, args.calibration))
    if args.write:
        written = write(fits, args.calibration, args.route_doc, args.min_cublas, args.force)
        if written:
            print(f"wrote {args.calibration} ({', '.join(written)}) and {args.route_doc}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
