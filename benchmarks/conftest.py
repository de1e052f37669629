"""pytest-benchmark suite: fixtures and parametrization shared by bench_{loha,lokr,boft}.py.

Each bench file declares `ALGO`, its `SETTINGS` (keys of `lyfast.peers.SETTINGS`) and one test calling the
`bench` fixture; this file parametrizes it over variant (the frozen base layer once, then provider x setting),
shape and mode (fwd, bwd, fwdbwd), filtered by the --bench-* options. Run it with
`python -m pytest benchmarks/ --benchmark-only [--benchmark-json=out.json]`.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lyfast.peers import SETTINGS

from .harness import CUDA, DEVICE, MODES, PROVIDERS, DoesNotFit, call, make_case, run_info, unavailable, unpin
from .memory import layer_memory
from .shapes import MODELS, select


def pytest_collect_file(file_path: Path, parent):
    if file_path.name.startswith("bench_") and file_path.suffix == ".py":
        return pytest.Module.from_parent(parent, path=file_path)


def pytest_addoption(parser):
    g = parser.getgroup("lyfast benchmarks")
    g.addoption("--bench-model", default="sdxl", help="model family of the shapes: " + ", ".join(MODELS))
    g.addoption("--bench-shapes", default="model" if CUDA else "cpu",
                help="comma list: cpu, model, CPU-subset or registry names (benchmarks/shapes.py)")
    g.addoption("--bench-algos", default="all",
                help="comma list of algorithms (loha, lokr, boft) or settings (" + ", ".join(SETTINGS) + ")")
    g.addoption("--bench-providers", default=",".join(PROVIDERS))
    g.addoption("--bench-modes", default=",".join(MODES))
    g.addoption("--bench-dtype", default="bfloat16" if CUDA else "float32")
    g.addoption("--bench-threads", type=int, default=2, help="torch CPU threads")
    g.addoption("--bench-budget", type=float, default=0.6,
                help="seconds of timed rounds per benchmark (rounds = budget / one call, 5..200)")
    g.addoption("--bench-memory", default="yes", choices=("yes", "no"),
                help="add saved bytes / largest transient to extra_info in fwdbwd mode")


def pytest_configure(config):
    threads = config.getoption("--bench-threads", None)
    if threads:
        torch.set_num_threads(threads)


def pytest_generate_tests(metafunc):
    if "variant" not in metafunc.fixturenames:
        return
    opt = metafunc.config.getoption
    algos = opt("--bench-algos").split(",")
    settings = [s for s in metafunc.module.SETTINGS if "all" in algos or s in algos or SETTINGS[s][0] in algos]
    providers = opt("--bench-providers").split(",")
    variants = [("base", None)] if "base" in providers and settings else []
    variants += [(p, s) for s in settings for p in providers if p != "base"]
    metafunc.parametrize("variant", variants, ids=[p if s is None else f"{p}-{s}" for p, s in variants])
    shapes = select(opt("--bench-shapes"), opt("--bench-model"))
    metafunc.parametrize("shape", list(shapes.values()), ids=list(shapes))
    metafunc.parametrize("mode", opt("--bench-modes").split(","))


@pytest.fixture(scope="session")
def info(request) -> dict:
    return run_info(request.config.getoption("--bench-dtype"))


@pytest.fixture(autouse=True)
def _unpin():
    yield
    unpin()


@pytest.fixture
def bench(benchmark, request, info, variant, shape, mode):
    """A callable timing `mode` of `variant` on `shape` with benchmark.pedantic (pytest-benchmark reports the
    median of the rounds); in fwdbwd mode it adds the memory figures of `benchmarks.memory` to extra_info."""
    provider, setting = variant
    opt = request.config.getoption

    def run():
        if (why := unavailable(provider)) is not None:
            pytest.skip(why)
        device, dtype = DEVICE, getattr(torch, opt("--bench-dtype"))
        algo = request.module.ALGO
        benchmark.group = f"{algo} {shape.name} {mode}"
        benchmark.extra_info.update(info, algo=algo, setting=setting, provider=provider, shape=shape.name,
                                    mode=mode, tokens=shape.tokens, model=opt("--bench-model"),
                                    model_count=shape.count)
        try:
            case = make_case(shape, provider, setting, mode, device, dtype)
        except DoesNotFit as exc:
            pytest.skip(str(exc))
        one = [call(case) for _ in range(3)][-1]   # warm-up; the last call decides the rounds
        rounds = max(5, min(200, int(opt("--bench-budget") / max(one, 1e-6))))
        benchmark.pedantic(case.target, setup=case.setup, rounds=rounds, warmup_rounds=1, iterations=1)
        if mode == "fwdbwd" and opt("--bench-memory") == "yes":
            benchmark.extra_info.update(layer_memory(shape, provider, setting, device, dtype))

    return run
