"""Smoke test of the benchmark tooling: the shape registries (SDXL and the DiT families), the memory probes, the
report. No timing."""
import json

import pytest
import torch
import torch.nn as nn

pytest.importorskip("diffusers")

from benchmarks import shapes  # noqa: E402
from benchmarks.harness import call, make_case  # noqa: E402
from benchmarks.report import write_report  # noqa: E402
from lyfast import models, peers, profile  # noqa: E402


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
        return sum(p.numel() for p in models.build_unet(cfg).parameters())

    assert n_params(None) == n_params(json.loads(shapes.CONFIG.read_text())) == 2_567_463_684


def test_memory_probes_on_a_tiny_layer():
    layer = nn.Linear(16, 32).requires_grad_(False)
    base = profile.step_memory(layer, peers.make_input(layer, (1, 4, 16)))
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


# ------------------------------------------------------------------------------------------ model families
# (Linear/Conv2d layers, parameters) of the published models: Flux.1-dev 11.9B, Flux.2-dev 32.2B, SD3.5-large
# 8.06B, Qwen-Image 20.4B, Cosmos-Predict2-2B 1.96B -- a wrong config key changes both
FAMILIES = {
    "flux": (504, 11_901_408_320), "flux2": (203, 32_223_281_152), "sd35": (537, 8_056_627_520),
    "qwen-image": (846, 20_430_401_088), "cosmos": (454, 1_956_405_248),
}


@pytest.mark.parametrize("model", FAMILIES)
def test_family_config_builds_the_published_model(model):
    layers, params = FAMILIES[model]
    assert sum(p.numel() for p in models.build_model(model).parameters()) == params
    assert sum(s.count for s in shapes.model_shapes(model)) == layers


def test_dit_registries_count_blocks_and_tokens():
    flux = {s.name: s for s in shapes.model_shapes("flux")}
    assert flux["linear-3072-3072-t4608"].count == 38 * 3     # single blocks: q, k, v on 4096 + 512 tokens
    assert flux["linear-3072-3072-t4096"].count == 19 * 4     # double blocks, image stream: q, k, v, out
    assert flux["linear-3072-3072-t512"].count == 19 * 4      # double blocks, text stream
    assert flux["linear-3072-12288-t4608"].count == 38        # single blocks' proj_mlp
    assert flux["linear-3072-18432-t1"].count == 38           # AdaLN modulation sees one token
    cosmos = {s.name: s for s in shapes.model_shapes("cosmos")}
    assert cosmos["linear-2048-2048-t4096"].count == 28 * 6   # self-attn q, k, v, out + cross-attn q, out
    assert cosmos["linear-1024-2048-t512"].count == 28 * 2    # cross-attn k, v on the 512 text tokens
    sd35 = {s.name: s for s in shapes.model_shapes("sd35")}
    assert sd35["linear-2432-2432-t333"].count == 37 * 4 + 3  # last block's context stream: q, k, v only
    assert sd35["conv2x2-16-2432-s2-128x128"].count == 1      # the patch embedding


@pytest.mark.parametrize("model", shapes.MODELS)
def test_cpu_subset_is_in_the_model(model):
    sub = shapes.cpu_subset(model)
    assert sub and all(s.tokens in (shapes.CPU_TOKENS, 64) for s in sub.values())
    for s in sub.values():
        full = shapes.at_model_size(s, model)
        assert full.tokens >= shapes.CPU_TOKENS and (full.cin, full.cout) == (s.cin, s.cout)
    if model != "sdxl":   # the most frequent geometry and, if small enough, the MLP
        assert max(sub.values(), key=lambda s: s.count) == next(iter(sub.values()))
        assert all(s.cin * s.cout <= 4 * 1280 * 10240 for s in sub.values())
    assert shapes.select("cpu", model) == sub


def test_unknown_model_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown model 'sdxxl'.*flux"):
        models.family("sdxxl")
    from benchmarks.__main__ import parse
    with pytest.raises(SystemExit):
        parse(["--model", "sdxxl"])


def test_profile_memory_on_a_dit_layer():
    pytest.importorskip("lycoris")
    rows = profile.profile_memory(["--model", "flux", "--resolution", "64", "--settings", "lokr-full-f8",
                                   "--providers", "lyfast,lycoris,lycoris-bypass",
                                   "--layers", "single_transformer_blocks.0.attn.to_q"])
    assert [r["provider"] for r in rows] == ["lyfast", "lycoris", "lycoris-bypass"]
    assert rows[0]["shape"] == "linear 3072->3072 x528"         # 4x4 packed latents + 512 text tokens
    saved = {r["provider"]: r["saved"] for r in rows}
    assert saved["lycoris"] >= 3072 * 3072 * 4 > saved["lyfast"]   # rebuild mode keeps the 3072^2 dW


def test_report_compares_with_the_faster_lycoris_mode(tmp_path):
    from benchmarks.report import faster_lycoris
    assert faster_lycoris({"lyfast": 1.2, "lycoris": 4.0, "lycoris-bypass": 1.5}) == (pytest.approx(0.8),
                                                                                   "lycoris-bypass")
    assert faster_lycoris({"lyfast": 1.2, "lycoris": 2.0, "lycoris-bypass": 3.0}) == (pytest.approx(0.6),
                                                                                   "lycoris")
    # LyCORIS's bypass mode ignores DoRA: a DoRA setting is compared with its rebuild mode only
    assert faster_lycoris({"lyfast": 1.2, "lycoris": 4.0, "lycoris-bypass": 1.5}, "lokr-f-1-r16-dora") == (
        pytest.approx(0.3), "lycoris")
    rows = [dict(shape="s", tokens=1, mode="fwdbwd", provider=p, setting=None if p == "base" else "lokr-full-f8",
                 median_ms=t, iqr_ms=0.0, min_ms=t, rounds=3, ratio_base=None if p == "base" else t)
            for p, t in [("base", 1.0), ("lyfast", 1.2), ("lycoris", 4.0), ("lycoris-bypass", 1.5)]]
    info = {"device": "CPU test", "cuda": False, "dtype": "float32", "threads": 1, "torch": "x", "lyfast": None,
            "lycoris": None, "git_sha": "x", "date": "2000-01-01T00:00:00", "command": "test", "model": "flux"}
    paths = write_report(info, {}, rows, [], [], str(tmp_path))
    assert paths[0].endswith("-flux.md")
    md = open(paths[0]).read()
    assert "| s | lokr-full-f8 | 1.00 | 1.20 | 4.00 | 1.50 | 1.20 | 4.00 | 1.50 | 0.30 | 0.80 | bypass |" in md


def test_cuda_samples_are_event_timed_steps_not_one_synchronized_call(monkeypatch):
    """On CUDA a sample is the events' time per step over enough back-to-back steps to span
    CUDA_SAMPLE_SECONDS, calibrated once (the H200 run timed host overhead instead: every base layer 0.46 ms).
    The CUDA event path is emulated here; the host-clock path would return the 50 ms sleep."""
    import time

    from benchmarks import harness

    seen = []

    def fake_steps(case, iters):
        seen.append(iters)
        return 1e-5  # 10 µs of GPU time per step

    monkeypatch.setattr(harness, "_cuda_steps", fake_steps)
    case = harness.Case("base", None, "fwdbwd", setup=lambda: None, target=lambda: time.sleep(0.05),
                        step=lambda start=None, end=None: None)
    assert harness.call(case) == 1e-5
    assert harness.call(case) == 1e-5
    assert seen == [3, 200, 200]  # calibration, then 2 ms / 10 µs steps per sample, fixed after the first call
    cpu = harness.Case("base", None, "fwdbwd", setup=lambda: None, target=lambda: time.sleep(0.05))
    assert harness.call(cpu) >= 0.05


def test_report_compares_with_peft(tmp_path):
    rows = [dict(shape="s", tokens=1, mode="fwdbwd", provider=p, setting=None if p == "base" else "loha-r8",
                 median_ms=t, iqr_ms=0.0, min_ms=t, rounds=3, ratio_base=None if p == "base" else t)
            for p, t in [("base", 1.0), ("lyfast", 1.2), ("lycoris", 4.0), ("lycoris-bypass", 1.5), ("peft", 2.4)]]
    info = {"device": "CPU test", "cuda": False, "dtype": "float32", "threads": 1, "torch": "x", "lyfast": None,
            "lycoris": None, "peft": "0.21.2", "git_sha": "x", "date": "2000-01-01T00:00:00", "command": "test"}
    md = open(write_report(info, {}, rows, [], [], str(tmp_path))[0]).read()
    assert "peft 0.21.2" in md and "| lyfast/faster lycoris | faster mode | lyfast/peft |" in md
    assert "| 0.80 | bypass | 0.50 |" in md                      # per layer: 1.2 / 2.4 beside 1.2 / 1.5
    assert "| 0.80 | 0.50 (0.50) |" in md                         # geomean row


def test_issue15_scripts_run_on_a_small_layer(monkeypatch):
    """benchmarks.issue15_table and benchmarks.loha_route_check (the commands issue 15's closing notes cite)
    still run: one round each on a small Linear, every provider timed and the route choice reported."""
    from benchmarks import issue15_table, loha_route_check

    small = (lambda: nn.Linear(64, 96), (1, 16, 64))
    monkeypatch.setitem(issue15_table.SHAPES, "small", small)
    monkeypatch.setitem(loha_route_check.SHAPES, "small", small)
    row = issue15_table.measure("small", "lokr-f-1-r16", reps=1)
    assert row["faster"] in ("rebuild", "bypass") and row["vs_base"] > 0 and row["vs_lyco"] > 0
    check = loha_route_check.check("small", 8, reps=1)
    assert check["auto"] in ("khatri_rao", "rowblock")
    assert all(check[k] > 0 for k in ("khatri_rao", "rowblock", "lycoris-bypass"))
