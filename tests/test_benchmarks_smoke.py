"""Smoke test of the benchmark tooling: the SDXL shape registry, the memory probes, the report. No timing."""
import json

import pytest
import torch
import torch.nn as nn

pytest.importorskip("diffusers")

from benchmarks import shapes  # noqa: E402
from benchmarks.harness import call, make_case  # noqa: E402
from benchmarks.report import write_report  # noqa: E402
from lyfast import profile  # noqa: E402


def test_registry_counts_the_sdxl_unet():
    reg = {s.name: s for s in shapes.unet_shapes()}
    assert reg["linear-1280-1280-t1024"].count == 372    # 60 blocks x (q,k,v,out + q,out) + 12 proj_in/out
    assert reg["linear-2048-1280-t77"].count == 120      # cross-attention K/V see the 77 text tokens
    assert reg["linear-640-5120-t4096"].count == 10
    assert reg["conv3x3-1280-1280-32x32"].count == 10
    assert reg["linear-1280-1280-t1"].count == 9         # time embedding + resnet time projections
    assert sum(s.count for s in reg.values()) == 794     # every Linear/Conv2d of the UNet, once


def test_cpu_subset_exists_in_the_unet():
    sub = shapes.cpu_subset()
    assert set(sub) == set(shapes.CPU_SUBSET_SPEC)
    for s in sub.values():
        assert s.tokens == (shapes.CPU_TOKENS if s.kind == "linear" else 64)
        full = shapes.at_unet_size(s)
        assert full.count >= 1 and (full.cin, full.cout, full.kernel) == (s.cin, s.cout, s.kernel)
    assert shapes.at_unet_size(sub["conv3x3-640-640"]).input[2:] == (64, 64)
    assert shapes.at_unet_size(sub["linear-1280-10240"]).tokens == 1024


def test_embedded_config_is_the_json_config():
    def n_params(cfg):
        return sum(p.numel() for p in profile.build_unet(cfg).parameters())

    assert n_params(None) == n_params(json.loads(shapes.CONFIG.read_text())) == 2_567_463_684


def test_memory_probes_on_a_tiny_layer():
    layer = nn.Linear(16, 32).requires_grad_(False)
    base = profile.step_memory(layer, profile.make_input(layer, (1, 4, 16)))
    assert base.saved == 0                       # frozen weight is a parameter, the input is not needed
    assert base.transient == base.act == 4 * 32 * 4
    pytest.importorskip("lycoris")
    m = profile.adapter_memory(layer, (1, 4, 16), "lycoris", "loha-r8")   # rebuild mode builds dW (32x16)
    assert m.saved >= 32 * 16 * 4 and m.transient >= 32 * 16 * 4
    assert m.extra["base_saved"] == 0


def test_saved_counts_each_storage_once():
    x = torch.randn(8, 8, requires_grad=True)
    with profile._saved([]) as seen:
        (x * x).sum()                            # mul saves x twice: one storage
    assert sum(seen.values()) == 8 * 8 * 4


def test_case_and_report(tmp_path):
    pytest.importorskip("lycoris")
    shape = shapes.Shape("linear", 16, 32, (1, 4, 16))
    timings = []
    for provider, setting in [("base", None), ("lycoris", "loha-r8")]:
        case = make_case(shape, provider, setting, "fwdbwd", "cpu", torch.float32)
        ms = 1e3 * min(call(case) for _ in range(2))
        timings.append({"shape": shape.name, "tokens": 4, "unet_count": 1, "mode": "fwdbwd",
                        "provider": provider, "setting": setting, "algo": setting and "loha",
                        "median_ms": ms, "iqr_ms": 0.0, "min_ms": ms, "rounds": 2,
                        "ratio_base": ms / timings[0]["median_ms"] if timings else None})
    info = {"device": "CPU test", "cuda": False, "dtype": "float32", "threads": 1, "torch": torch.__version__,
            "lyfast": None, "lycoris": None, "git_sha": "x", "date": "2000-01-01T00:00:00", "command": "test"}
    paths = write_report(info, {}, timings, [], [], str(tmp_path))
    md = open(paths[0]).read()
    assert "lycoris/base" in md and shape.name in md
