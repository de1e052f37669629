"""FSDP2 over lyfast networks (issue 22): adapters sharded with their blocks, on the CPU with gloo, 2 processes.

One `torch.distributed.run` launch runs every case of tests/distributed_worker.py (each builds the model twice:
a single-process reference and the sharded run); the tests read its records. The launch is a subprocess with a
timeout, so a hang or an abort fails a test instead of CI, and `test_every_rank_exits_zero` fails if any rank exits
non-zero (torchrun reports each rank's exit code), interpreter teardown included.

Tolerance: the sharded run computes the batch as the ranks' halves; the reference does the same on one process
(gradients accumulated over the halves). The difference between that reference and the whole-batch one is the
fp32 (or bf16) reordering error of this very run; the sharded adapters must be at least that close to the reference.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("diffusers")

HERE = os.path.dirname(os.path.abspath(__file__))
WORKER = os.path.join(HERE, "distributed_worker.py")
MODELS_RECIPES = [f"{m}-{r}" for m in ("flux", "unet") for r in ("loha", "lokr-f-1", "lokr-full", "boft")]
FEATURES = ["flux-lokr-full:clip", "flux-loha:bf16", "unet-lokr-full:bf16", "flux-lokr-full:save", "unet-boft:save",
            "flux-lokr-full:dcp", "unet-boft:dcp", "unet-lokr-f-1:noreshard", "flux-loha:plant-no-place",
            "flux-lokr-full:base=int8-torchao+keep", "flux-loha:base=nf4-bnb+keep", "flux-lokr-full:base=int8-quanto",
            "flux-lokr-full:compile"]
TIMEOUT = 900


def _launch(tmp, args, name):
    out = os.path.join(tmp, f"{name}.json")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.path.dirname(HERE)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", WORKER,
           "--out", out, *args]
    try:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=TIMEOUT)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"{name}: the 2-process run did not finish in {TIMEOUT} s (hang?): {exc.stdout[-2000:] if exc.stdout else ''}")
    records = json.load(open(out)) if os.path.exists(out) else None
    return proc.returncode, proc.stdout + proc.stderr, records


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = str(tmp_path_factory.mktemp("fsdp"))
    rc, log, records = _launch(tmp, ["--cases", ",".join(MODELS_RECIPES + FEATURES)], "cases")
    return rc, log, {r["case"]: r for r in records or []}


@pytest.fixture(scope="module")
def accelerate_run(tmp_path_factory):
    pytest.importorskip("accelerate")
    tmp = str(tmp_path_factory.mktemp("accelerate"))
    return _launch(tmp, ["--accelerate"], "accelerate")


def test_every_rank_exits_zero(runs):
    rc, log, records = runs
    assert rc == 0, f"a rank exited non-zero (torchrun rc {rc}):\n{log[-4000:]}"
    assert "terminate called" not in log and "Signal" not in log, log[-4000:]
    assert set(records) == set(MODELS_RECIPES + FEATURES)


def _record(runs, case):
    rc, log, records = runs
    if case not in records:
        pytest.fail(f"{case}: no record (rc {rc}):\n{log[-3000:]}")
    return records[case]


def _sharded_like_blocks(r, same_base_keys=True):
    """The contract: every adapter parameter a DTensor shard of the expected size; the base model's state_dict has
    no adapter key; the network's keys are LyCORIS's; while a layer runs, no adapter of another block is whole."""
    assert r["all_dtensor"]
    assert r["local"] == r["expected_local"] and r["shards_cover"]
    assert 0.45 <= r["shard_fraction"] <= 0.6
    assert r["adapter_keys_in_base"] == 0
    assert r["base_keys_after"] == r["base_keys"] or not same_base_keys
    assert r["net_keys_equal"]
    assert r["calls"] == r["adapters"] * 3  # every adapter ran in every step


@pytest.mark.parametrize("case", MODELS_RECIPES)
def test_sharded_training_equals_single_process(runs, case):
    r = _record(runs, case)
    _sharded_like_blocks(r)
    assert not r["violations"], f"adapters of other blocks were unsharded while a layer ran: {r['violations']}"
    assert r["max_diff"] <= max(r["ref_diff"], 1e-6), (r["max_diff"], r["ref_diff"])
    loss_tol = 4 * max(abs(a - b) for a, b in zip(r["ref_losses_whole"], r["ref_losses_halves"])) + 1e-6
    assert max(abs(a - b) for a, b in zip(r["losses"], r["ref_losses_halves"])) <= loss_tol


@pytest.mark.parametrize("case", ["flux-lokr-full", "unet-boft", "flux-lokr-full:base=int8-torchao+keep"])
def test_per_gpu_memory_equals_the_shards_rank0_holds(runs, case):
    """`per_gpu_memory` (what benchmarks/fsdp_memory.py tabulates at full size) equals the bytes rank 0 really holds:
    base weights, adapter shards, their gradients, AdamW's moments."""
    r = _record(runs, case)
    for field, (predicted, measured) in r["memory"].items():
        assert predicted == measured, (field, predicted, measured)


def test_gradient_clipping_over_adapter_dtensors(runs):
    r = _record(runs, "flux-lokr-full:clip")
    assert len(r["norms"]) == 3 and all(n > 0 for n in r["norms"])
    assert r["norms"] == pytest.approx(r["ref_norms_halves"], rel=1e-5)
    assert r["max_diff"] <= max(r["ref_diff"], 1e-6)


@pytest.mark.parametrize("case", ["flux-loha:bf16", "unet-lokr-full:bf16"])
def test_mixed_precision_policy_applies_to_adapters(runs, case):
    """bf16 params, fp32 reduce: adapters compute in bf16 (as the block's base weights), rest as fp32 shards, and
    train as the single-process bf16-compute / fp32-master reference does, within that reference's own bf16 noise."""
    r = _record(runs, case)
    _sharded_like_blocks(r)
    assert r["dtypes"] == ["torch.bfloat16"] and r["rest_dtypes"] == ["torch.float32"]
    assert r["max_diff"] <= 2 * r["ref_diff"], (r["max_diff"], r["ref_diff"])


def test_reshard_after_forward_false_keeps_blocks_whole(runs):
    """reshard_after_forward applies to adapters as to the block: with False, earlier blocks' adapters stay whole
    (the watch that guards the default case sees them, so it can fail)."""
    r = _record(runs, "unet-lokr-f-1:noreshard")
    assert r["violations"]
    assert r["max_diff"] <= max(r["ref_diff"], 1e-6)


@pytest.mark.parametrize("case", ["flux-lokr-full:save", "unet-boft:save"])
def test_save_weights_gathers_and_load_weights_places_shards(runs, case):
    r = _record(runs, case)
    assert r["file_equal"], "the file written by rank 0 is not the gathered adapters"
    assert r["reload_diff"] == 0 and r["load_info"] == {}


@pytest.mark.parametrize("case", ["flux-lokr-full:dcp", "unet-boft:dcp"])
def test_dcp_resume_is_bit_identical(runs, case):
    r = _record(runs, case)
    assert r["resume_losses"] == r["cont_losses"]
    assert r["resume_diff"] == 0


@pytest.mark.parametrize("case", ["flux-lokr-full:base=int8-torchao+keep", "flux-loha:base=nf4-bnb+keep"])
def test_quantized_base_replicated_adapters_sharded(runs, case):
    """torchao's Int8Tensor and bnb's Params4bit cannot be sharded by FSDP2 (no aten.split / quant_state lost):
    with `ignored_params=quantized_base_params(model)` the quantized weights stay whole and the adapters shard."""
    r = _record(runs, case)
    _sharded_like_blocks(r)
    assert not r["violations"]
    assert r["max_diff"] <= max(r["ref_diff"], 1e-6)
    assert 0 < r["base_sharded"] < 1  # the quantized weights whole, the rest (norms, biases, embedders) sharded


def test_quanto_base_is_sharded_with_its_block(runs):
    """optimum-quanto's frozen QBytesTensor weights shard and all-gather with the block (FSDP2 gathers the local
    tensors; no DTensor op on a quantized tensor runs), adapters too."""
    r = _record(runs, "flux-lokr-full:base=int8-quanto")
    _sharded_like_blocks(r, same_base_keys=False)  # quanto's state_dict of a sharded QLinear has fewer keys
    assert r["base_sharded"] == 1
    assert r["max_diff"] <= max(r["ref_diff"], 1e-6)


def test_compiled_sharded_blocks(runs):
    """Each sharded block under torch.compile (aot_eager on the CPU): the same training as eager, adapters sharded."""
    r = _record(runs, "flux-lokr-full:compile")
    _sharded_like_blocks(r)
    assert r["max_diff"] <= max(r["ref_diff"], 1e-6)


def test_planted_defect_adapters_outside_blocks_fails(runs):
    """Mutation kept in CI: without place_in_layers the adapters are not sharded (not DTensors) and each rank trains
    its own copy on its half: the checks above fail on it."""
    r = _record(runs, "flux-loha:plant-no-place")
    assert not r["all_dtensor"]
    assert r["max_diff"] > 100 * max(r["ref_diff"], 1e-6)


def test_accelerate_fsdp2_plugin(accelerate_run):
    rc, log, r = accelerate_run
    assert rc == 0, f"a rank exited non-zero (rc {rc}):\n{log[-4000:]}"
    assert r["world"] == 2 and r["fsdp_version"] == 2
    assert {"FSDPFluxTransformerBlock", "FSDPFluxSingleTransformerBlock"} <= set(r["blocks_sharded"])
    assert r["all_dtensor"] and r["optimizer_is_net"]
    assert r["max_diff"] <= max(r["ref_diff"], 1e-6) and r["file_diff"] == 0


# ------------------------------------------------------------------ place_in_layers, single process
def _tiny_flux_network(algo="lokr"):
    sys.path.insert(0, os.path.join(os.path.dirname(HERE), "examples"))
    import train_dit

    import lyfast

    model = train_dit.build_transformer(seed=0)
    net = lyfast.create_lycoris(model, 1.0, **{k: v for k, v in train_dit.ALGO_KW[algo].items()}, algo=algo)
    return train_dit, model, net


def _base_keys_after_placing():
    from lyfast.distributed import place_in_layers

    train_dit, model, net = _tiny_flux_network()
    net.apply_to()
    before, net_before = model.state_dict(), sorted(net.state_dict())
    place_in_layers(net)
    return model, net, before, net_before


def test_place_in_layers_changes_neither_state_dict_nor_output():
    from lyfast.distributed import ATTR, place_in_layers

    model, net, before, net_before = _base_keys_after_placing()
    import train_dit

    assert sorted(model.state_dict()) == sorted(before)
    assert sorted(net.state_dict()) == net_before
    model.load_state_dict(before, strict=True)  # a base checkpoint still loads strictly
    layer = net.loras[0].org_module[0]
    assert getattr(layer, ATTR)[net.loras[0].lora_name] is net.loras[0]
    assert {id(p) for p in net.parameters()} <= {id(p) for p in model.parameters()}
    with torch.no_grad():
        for p in net.parameters():
            p.normal_(0, 0.02)
    kw, _ = train_dit.make_batch(model, 0)
    out = model(**kw).sample
    place_in_layers(net)  # idempotent
    assert torch.equal(model(**kw).sample, out)
    net.restore()
    ref = model(**kw).sample
    assert not torch.equal(ref, out)  # the adapters did contribute


def test_planted_missing_state_dict_hook_leaks_adapter_keys(monkeypatch):
    """Mutation kept in CI: without the state-dict hook the base model's state_dict carries every adapter."""
    import lyfast.distributed

    monkeypatch.setattr(lyfast.distributed, "_drop_adapter_keys", lambda *a: None)
    model, net, before, _ = _base_keys_after_placing()
    assert len(model.state_dict()) > len(before)


def test_place_in_layers_refuses_an_unapplied_network():
    from lyfast.distributed import place_in_layers

    _, model, net = _tiny_flux_network()
    with pytest.raises(ValueError, match="apply_to"):
        place_in_layers(net)


def test_fsdp_memory_table_command(capsys):
    """`python -m benchmarks.fsdp_memory` at full size on the meta device: sharded adapters cost 1/world of the
    replicated ones on every GPU (the per-GPU counting itself is checked against real shards above)."""
    from lyfast._checkout import prefer_installed_kernels

    prefer_installed_kernels()
    from benchmarks import fsdp_memory

    rows = {(r["world_size"], r["adapters"]): r for r in
            fsdp_memory.main(["--model", "sdxl", "--settings", "lokr-full-f4", "--world-sizes", "1,8"])}
    assert "| sdxl | lokr-full-f4 | 8 | sharded |" in capsys.readouterr().out
    one, sharded, replicated = rows[(1, "sharded")], rows[(8, "sharded")], rows[(8, "replicated")]
    assert replicated["adapter_params"] == one["adapter_params"]
    assert one["adapter_params"] / 8 <= sharded["adapter_params"] < one["adapter_params"] / 8 * 1.01
    assert sharded["optimizer"] == 2 * sharded["adapter_params"] and sharded["total"] < replicated["total"]
    with pytest.raises(SystemExit) as exc:
        fsdp_memory.main(["--world-sizes", "0"])
    assert exc.value.code == 2


def test_place_in_layers_refuses_a_0d_scalar_naming_it():
    """use_scalar=True gives each adapter a 0-d trainable scalar; fully_shard refuses those (after sharding some
    blocks): place_in_layers says so first, naming the parameter."""
    import lyfast
    from lyfast.distributed import place_in_layers

    train_dit, model, _ = _tiny_flux_network()
    net = lyfast.create_lycoris(model, 1.0, 4, 2, algo="loha", use_scalar=True)
    net.apply_to()
    with pytest.raises(ValueError, match=r"\.scalar is a 0-d trainable parameter"):
        place_in_layers(net)
