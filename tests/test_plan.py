"""The training-step planner (issue 23): its FakeTensor plan against a real CPU run of the same step.

The real run is measured by `benchmarks.plan_check.LiveBytes`, independent of the planner's tracker (PyTorch's
MemTracker): a dispatch mode that adds every new storage an op returns and subtracts it when the storage is freed
(a weakref callback), on top of the storages alive before the step (weights, adapters, optimizer states). Its peak,
the saved activations at the end of the forward and the static parts must equal the plan within 2%.
"""
from __future__ import annotations

import os
import sys

import pytest
import torch

pytest.importorskip("diffusers")
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples"))

from benchmarks import plan_check  # noqa: E402  (LiveBytes: the independent counter)
from lyfast import plan  # noqa: E402

TOL = 0.02


def tiny_config(model: str) -> dict:
    if model == "flux":
        from diffusers import FluxTransformer2DModel
        from train_dit import TINY_FLUX

        return {**dict(FluxTransformer2DModel(**TINY_FLUX).config), "_class_name": "FluxTransformer2DModel"}
    from diffusers import UNet2DConditionModel
    from lyco_models import UNET_KW

    return {**dict(UNet2DConditionModel(**UNET_KW).config), "_class_name": "UNet2DConditionModel"}


def real_step(config, provider, setting, dtype, checkpointing):
    return plan_check.real_step(config, provider, setting, dtype, checkpointing, resolution=128, text_tokens=8)


F32, BF16 = torch.float32, torch.bfloat16
CASES = [("flux", "lyfast", "loha-r8", "none", F32), ("flux", "lyfast", "lokr-f-1-r16", "blocks", BF16),
         ("flux", "lyfast", "lokr-full-f4", "none", BF16), ("flux", "lycoris", "loha-r8", "none", F32),
         ("flux", "lycoris-bypass", "lokr-f-1-r16", "blocks", F32), ("flux", "lycoris", "lokr-full-f4", "blocks", BF16),
         ("unet", "lyfast", "boft-b32", "none", F32), ("unet", "lycoris", "boft-b32", "blocks", BF16),
         ("unet", "lyfast", "lokr-f-1-r16", "blocks", F32), ("unet", "lycoris-bypass", "loha-r8", "none", BF16),
         ("unet", "lyfast", "loha-r8", "blocks", BF16), ("unet", "lycoris", "lokr-f-1-r16", "none", F32),
         ("flux", "peft", "loha-r8", "none", F32), ("unet", "peft", "lokr-f-1-r16", "blocks", BF16)]


@pytest.mark.parametrize("model,provider,setting,checkpointing,dtype", CASES,
                         ids=["-".join(map(str, c[:4])) + ("-bf16" if c[4] is BF16 else "-fp32") for c in CASES])
def test_plan_equals_a_real_run(model, provider, setting, checkpointing, dtype):
    config = tiny_config(model)
    got = plan.plan_one(None, provider, setting, config=config, resolution=128, text_tokens=8, dtype=dtype,
                        checkpointing=checkpointing)
    real = real_step(config, provider, setting, dtype, checkpointing)
    assert got["base_params_bytes"] == real["base"] and got["adapter_params_bytes"] == real["adapters"]
    assert got["optimizer_bytes"] == real["states"]
    assert got["peak_bytes"] == pytest.approx(real["peak"], rel=TOL), (got["peak_bytes"], real["peak"])
    assert got["saved_activation_bytes"] == pytest.approx(real["saved"], rel=TOL)
    parts = ("base_params_bytes", "adapter_params_bytes", "optimizer_bytes", "grad_bytes", "activation_bytes",
             "transient_bytes")
    assert sum(got[k] for k in parts) == got["peak_bytes"] and all(got[k] >= 0 for k in parts)


def _fails_against_real(monkeypatch, patch, case=("flux", "lyfast", "lokr-f-1-r16", "blocks")):
    model, provider, setting, checkpointing = case
    config = tiny_config(model)
    real = real_step(config, provider, setting, torch.float32, checkpointing)
    patch()
    got = plan.plan_one(None, provider, setting, config=config, resolution=128, text_tokens=8,
                        dtype=torch.float32, checkpointing=checkpointing)
    return got, real


def test_planted_checkpointing_ignored_fails(monkeypatch):
    """Mutation kept in CI: a planner that ignores --checkpointing predicts the saved activations of the
    unchecked model, which the real checkpointed run does not keep."""
    got, real = _fails_against_real(monkeypatch, lambda: monkeypatch.setattr(plan, "_enable_checkpointing",
                                                                              lambda model: None))
    assert got["saved_activation_bytes"] != pytest.approx(real["saved"], rel=TOL)


def test_planted_gradients_not_counted_fails(monkeypatch):
    """Mutation kept in CI: a planner that traces the forward only (no backward: no gradients, no backward
    temporaries) misses the step's peak."""
    def forward_only(model, params, opt, inputs, dtype, optimizer, on_forward_end=None):
        out = model(**inputs)
        loss = (out.sample if hasattr(out, "sample") else out[0]).float().square().mean()
        if on_forward_end is not None:
            on_forward_end()
        del loss

    got, real = _fails_against_real(monkeypatch, lambda: monkeypatch.setattr(plan, "training_step", forward_only),
                                    case=("flux", "lyfast", "loha-r8", "none"))
    assert got["peak_bytes"] != pytest.approx(real["peak"], rel=TOL)
    assert got["grad_bytes"] == 0


def test_plan_command_line(tmp_path, capsys):
    import json

    config = tmp_path / "tiny.json"
    config.write_text(json.dumps(tiny_config("flux")))
    out = tmp_path / "plan.json"
    records = plan.main(["--config", str(config), "--settings", "lokr-f-1-r16", "--providers", "lyfast,lycoris",
                         "--resolution", "128", "--dtype", "fp32", "--json", str(out), "--gpu-memory", "1MiB",
                         "--world-size", "2"])
    assert len(records) == 2 and json.loads(out.read_text()) == json.loads(json.dumps(records))
    for r in records:
        for key in ("provider", "setting", "peak_bytes", "base_params_bytes", "adapter_params_bytes", "grad_bytes",
                    "optimizer_bytes", "activation_bytes", "transient_bytes", "adapter_params"):
            assert isinstance(r[key], (int, str)), key
        assert r["world_size"] == 2 and r["peak_bytes"] > 2**20 and r["suggestion"]
    assert "| FluxTransformer2DModel | lyfast | lokr-f-1-r16 |" in capsys.readouterr().out
    for bad in (["--settings", "lokr-f-9"], ["--gpu-memory", "lots"], ["--config", str(tmp_path / "none.json")],
                ["--base", "nf4-bnb", "--providers", "lycoris"]):
        with pytest.raises(SystemExit) as exc:
            plan.main(bad)
        assert exc.value.code == 2
