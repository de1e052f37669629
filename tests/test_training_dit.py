"""The examples/train_dit.py loop (a tiny diffusers FluxTransformer2DModel, rectified-flow loss) against
lycoris-lora 4.1.3: same seed, same initial adapter weights (LyCORIS's, randomized non-zero, copied into lyfast),
5 AdamW steps: the same losses and final adapter weights (fp64, rel <= 1e-8). LoKr is SimpleTuner's DiT recipe
(full matrix, linear_dim 10000, alpha 1, factor 16), against LyCORIS in bypass mode (how those runs train) and
in rebuild mode; LoHa likewise. BOFT is left to tests/test_training.py: a DiT's modulation widths (3 and 6 x
the model width) and its own width admit no common BOFT block size, so LyCORIS refuses it on every Linear.
"""
from __future__ import annotations

import os
import sys
import warnings

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("lycoris")

from lyco_models import one_thread  # noqa: E402,F401  (autouse fixture: one intra-op thread)
from lyco_models import assert_same_training, randomize_  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(__file__), os.pardir, "examples"))
import train_dit  # noqa: E402

CASES = [("lokr", True), ("lokr", False), ("loha", True), ("loha", False)]


def _run(impl, algo, bypass, dtype, init=None, steps=5):
    model = train_dit.build_transformer(dtype=dtype, seed=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        net = train_dit.attach_adapters(model, impl, algo, "full", **train_dit.ALGO_KW[algo], bypass_mode=bypass)
    randomize_(net, seed=3) if init is None else train_dit.load_adapter_state(net, init)
    start = train_dit.adapter_state(net)
    res = train_dit.train(model, net, steps=steps, lr=1e-3, batch=2, side=4, seed=11)
    return start, res, net


@pytest.mark.parametrize("algo,bypass", CASES, ids=[f"{a}-{'bypass' if b else 'rebuild'}" for a, b in CASES])
def test_dit_training_matches_lycoris(algo, bypass):
    dtype, tol = torch.float64, 1e-8
    init, ref, lyco_net = _run("lycoris", algo, bypass, dtype)
    start, got, fast_net = _run("lyfast", algo, bypass, dtype, init=init)
    assert all(type(lo).__module__.startswith("lyfast.") for lo in fast_net.loras)
    assert all(type(lo).__module__.startswith("lycoris.") for lo in lyco_net.loras)
    assert all(lo.bypass_mode == bypass for lo in lyco_net.loras)
    # every Linear of both blocks: attention (img + txt streams), MLPs, AdaLN modulations, embedders
    assert len(fast_net.loras) == len(lyco_net.loras) >= 20
    if algo == "lokr":   # the full-matrix recipe: both Kronecker factors full, no low-rank halves
        names = {n for lo in fast_net.loras for n, _ in lo.named_parameters()}
        assert names == {"lokr_w1", "lokr_w2"}, names
    assert_same_training(start, init, got, ref, tol)
