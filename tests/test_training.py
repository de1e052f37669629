"""Training-loop integration (issue 7): the examples/train_unet.py loop against lycoris-lora 4.1.3, DDP on gloo,
bf16 autocast, gradient checkpointing and torch.compile, all on CPU.

* parity: same seed, same initial adapter weights (LyCORIS's, randomized non-zero, copied into lyfast), 5
  AdamW steps on a tiny diffusers UNet: the same losses and final adapter weights (fp64 rel <= 1e-8;
  BOFT fp32 <= 1e-4 because LyCORIS's BOFT cannot run in fp64).
* DDP: two gloo processes, each half of a batch; DDP's averaged gradients equal the single-process gradients
  on the whole batch. Hard timeout: children are killed and the test fails rather than hang.
* autocast: bf16 outputs like the plain layer, gradients in each parameter's own (fp32) dtype.
* checkpointing: diffusers' UNet blocks under torch.utils.checkpoint (use_reentrant False and True) give the
  gradients of the plain run (fp64).
* torch.compile(fullgraph=True, backend="aot_eager") on the torch (CPU) backend matches eager, LoHa's
  Khatri-Rao and row-block routes both.
"""
from __future__ import annotations

import copy
import datetime
import os
import socket
import sys
import warnings

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn as nn

import lyfast
from lyco_models import one_thread  # noqa: F401  (autouse fixture: one intra-op thread)
from lyco_models import assert_same_training, randomize_, rel_err

sys.path.insert(0, os.path.join(os.path.dirname(__file__), os.pardir, "examples"))
import train_unet  # noqa: E402

ALGOS = ("loha", "lokr", "boft")


# ------------------------------------------------------------------------------------------------------
# 1. the training loop: lyfast vs lycoris-lora 4.1.3
# ------------------------------------------------------------------------------------------------------
PARITY_KW = {  # preset full with conv adapters: attention, feed-forward, resnet convs, conv_in/out, time MLP
    "loha": dict(linear_dim=4, linear_alpha=2, conv_dim=2, conv_alpha=1),
    "lokr": dict(linear_dim=4, linear_alpha=2, conv_dim=2, conv_alpha=1, factor=4),
    "boft": dict(linear_dim=4, linear_alpha=1, conv_dim=4, conv_alpha=1),
}


def _run(impl, algo, dtype, init=None, steps=5):
    unet = train_unet.build_unet(dtype=dtype, seed=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        net = train_unet.attach_adapters(unet, impl, algo, preset="full", **PARITY_KW[algo])
    if init is None:
        randomize_(net, seed=3)
    else:
        with torch.no_grad():
            for lora in net.loras:
                for n, p in lora.named_parameters():
                    p.copy_(init[f"{lora.lora_name}.{n}"])
    start = train_unet.adapter_state(net)
    res = train_unet.train(unet, net, steps=steps, lr=1e-3, batch=2, size=8, seed=11)
    return start, res, net


@pytest.mark.parametrize("algo", ALGOS)
def test_training_matches_lycoris(algo):
    dtype = torch.float32 if algo == "boft" else torch.float64
    tol = 1e-4 if algo == "boft" else 1e-8
    init, ref, lyco_net = _run("lycoris", algo, dtype)
    start, got, fast_net = _run("lyfast", algo, dtype, init=init)
    assert all(type(lo).__module__.startswith("lyfast.") for lo in fast_net.loras)
    assert all(type(lo).__module__.startswith("lycoris.") for lo in lyco_net.loras)
    assert len(fast_net.loras) == len(lyco_net.loras) > 20
    assert_same_training(start, init, got, ref, tol)


# ------------------------------------------------------------------------------------------------------
# 2. DDP on gloo, two processes
# ------------------------------------------------------------------------------------------------------
class SmallNet(nn.Module):
    """conv -> linear -> linear with one adapter of each algorithm (torch backend, any dtype)."""

    def __init__(self, dtype=torch.float64, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.conv = nn.Conv2d(4, 16, 3, padding=1)
        self.a = nn.Linear(16, 32)
        self.b = nn.Linear(32, 16)
        self.requires_grad_(False)
        self.adapters = nn.ModuleList([
            lyfast.LohaModule("lycoris_conv", self.conv, 1.0, 2, 1),
            lyfast.LokrModule("lycoris_a", self.a, 1.0, 2, 1, factor=4),
            lyfast.ButterflyOFTModule("lycoris_b", self.b, 1.0, 4, 1, rescaled=True),
        ])
        gen = torch.Generator().manual_seed(seed + 1)
        with torch.no_grad():
            for m in self.adapters:
                for n, p in m.named_parameters():
                    r = torch.randn(p.shape, generator=gen, dtype=torch.float64)
                    p.copy_(1 + 0.1 * r if n == "rescale" else r * (0.05 if n == "oft_blocks" else 0.3))
                m.apply_to()
        self.to(dtype)

    def forward(self, x):
        h = torch.relu(self.conv(x)).permute(0, 2, 3, 1)
        return self.b(torch.relu(self.a(h)))


def _batch(n=4, dtype=torch.float64):
    g = torch.Generator().manual_seed(5)
    return torch.randn(n, 4, 5, 5, generator=g, dtype=dtype), torch.randn(n, 5, 5, 16, generator=g, dtype=dtype)


def _grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def _ddp_worker(rank, world, port, out_dir):
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    torch.set_num_threads(1)
    try:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=60))
        model = DDP(SmallNet())
        x, y = _batch()
        n = x.shape[0] // world
        xs, ys = x[rank * n:(rank + 1) * n], y[rank * n:(rank + 1) * n]
        loss = (model(xs) - ys).square().mean()
        loss.backward()
        torch.save(_grads(model.module), os.path.join(out_dir, f"grads{rank}.pt"))
        dist.barrier()  # neither rank tears gloo down while the other still talks to it
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    # The process exits normally (interpreter teardown included): an abort at exit fails the test's exit-code check.


def _free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_gloo_two_processes_match_single_process(tmp_path):
    model = SmallNet()
    x, y = _batch()
    (model(x) - y).square().mean().backward()
    want = _grads(model)
    assert len(want) == 9 and all(g.abs().max() > 0 for g in want.values())

    ctx = mp.get_context("spawn")
    port = _free_port()
    procs = [ctx.Process(target=_ddp_worker, args=(r, 2, port, str(tmp_path)), daemon=True) for r in range(2)]
    for p in procs:
        p.start()
    try:
        for p in procs:
            p.join(timeout=120)
        hung = [p.pid for p in procs if p.is_alive()]
        assert not hung, f"DDP workers {hung} still running after 120 s (killed)"
        assert [p.exitcode for p in procs] == [0, 0], f"DDP worker exit codes {[p.exitcode for p in procs]}"
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join(5)
    for rank in range(2):
        got = torch.load(tmp_path / f"grads{rank}.pt")
        assert set(got) == set(want)
        for k in want:
            err = rel_err(got[k], want[k])
            assert err <= 1e-12, f"rank {rank} grad {k}: rel err {err:.3e} vs the single-process run"


# ------------------------------------------------------------------------------------------------------
# 3. autocast (CPU bf16), fp32 master weights
# ------------------------------------------------------------------------------------------------------
def _adapted_layer(algo, kind):
    torch.manual_seed(0)
    layer = (nn.Linear(24, 32) if kind == "linear" else nn.Conv2d(8, 16, 3, padding=1)).requires_grad_(False)
    plain = copy.deepcopy(layer)
    cls = {"loha": lyfast.LohaModule, "lokr": lyfast.LokrModule, "boft": lyfast.ButterflyOFTModule}[algo]
    kw = dict(factor=4) if algo == "lokr" else {}
    module = cls("lycoris_t", layer, 1.0, 4, 2, **kw)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for n, p in module.named_parameters():
            p.add_(torch.randn(p.shape, generator=gen) * (0.05 if n == "oft_blocks" else 0.2))
    module.apply_to()
    x = torch.randn(2, 3, 24) if kind == "linear" else torch.randn(2, 8, 5, 5)
    return layer, plain, module, x


@pytest.mark.parametrize("kind", ["linear", "conv2d"])
@pytest.mark.parametrize("algo", ["loha", "lokr", "boft"])
def test_autocast_bf16_dtypes_and_fp32_master_grads(algo, kind):
    layer, plain, module, x = _adapted_layer(algo, kind)
    y32 = layer(x)
    x = x.requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
        y_plain = plain(x)
    assert y_plain.dtype == torch.bfloat16
    assert y.dtype == y_plain.dtype, f"{algo}/{kind}: output {y.dtype} under autocast, plain layer {y_plain.dtype}"
    assert rel_err(y.float(), y32) < 3e-2, f"{algo}/{kind}: bf16 output far from fp32 ({rel_err(y.float(), y32):.2e})"
    y.float().square().sum().backward()
    assert x.grad is not None and x.grad.dtype == torch.float32
    for n, p in module.named_parameters():
        assert p.dtype == torch.float32
        assert p.grad is not None, f"{algo}/{kind}: no gradient for {n}"
        assert p.grad.dtype == p.dtype, f"{algo}/{kind}: grad of {n} is {p.grad.dtype}, parameter {p.dtype}"
        assert torch.isfinite(p.grad).all() and p.grad.abs().max() > 0
    before = {n: p.detach().clone() for n, p in module.named_parameters()}
    torch.optim.AdamW(module.parameters(), lr=1e-2).step()  # fp32 master weights step
    assert all(p.dtype == torch.float32 and not torch.equal(p, before[n]) for n, p in module.named_parameters())


# ------------------------------------------------------------------------------------------------------
# 4. gradient checkpointing around UNet blocks (fp64)
# ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("algo", ALGOS)
def test_gradient_checkpointing_same_grads(algo):
    unet = train_unet.build_unet(dtype=torch.float64, seed=0)
    net = train_unet.attach_adapters(unet, "lyfast", algo, preset="full", **PARITY_KW[algo])
    randomize_(net, seed=4)
    x, t, ctx, added, target = train_unet.make_batch(unet, 0, batch=2, size=8, dtype=torch.float64)

    def grads():
        net.zero_grad(set_to_none=True)
        loss = (unet(x, t, ctx).sample - target).square().mean()
        loss.backward()
        return loss.detach(), {k: p.grad.detach().clone() for k, p in net.named_parameters()}

    ref_loss, ref = grads()
    for reentrant in (False, True):
        calls = []

        def ckpt(module, *args, _r=reentrant):
            calls.append(type(module).__name__)
            return torch.utils.checkpoint.checkpoint(module.__call__, *args, use_reentrant=_r)

        unet.enable_gradient_checkpointing(ckpt)
        try:
            loss, got = grads()
        finally:
            unet.disable_gradient_checkpointing()
        assert calls, "checkpointing never ran"
        assert rel_err(loss, ref_loss) <= 1e-12
        for k in ref:
            err = rel_err(got[k], ref[k])
            assert err <= 1e-10, f"use_reentrant={reentrant}: grad {k} rel err {err:.3e}"


# ------------------------------------------------------------------------------------------------------
# 5. torch.compile(fullgraph=True, backend="aot_eager") on the torch backend
# ------------------------------------------------------------------------------------------------------
def _compile_check(model, x):
    y0 = model(x)
    params = [p for p in model.parameters() if p.requires_grad]
    g0 = torch.autograd.grad(y0.square().sum(), params)
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    y1 = compiled(x)
    g1 = torch.autograd.grad(y1.square().sum(), params)
    torch.testing.assert_close(y1, y0, rtol=1e-5, atol=1e-6)
    for a, b in zip(g1, g0):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_torch_compile_fullgraph_aot_eager_matches_eager():
    """LoKr, BOFT and LoHa's Khatri-Rao route (the route LoHa takes on wide layers) trace without a break."""
    model = SmallNet(torch.float32)
    model.adapters[0].route = "khatri_rao"
    _compile_check(model, _batch(2, torch.float32)[0])


def test_torch_compile_fullgraph_loha_rowblock():
    """The row-block route's backward uses closed-form factor gradients (no autograd.grad): no break."""
    model = SmallNet(torch.float32)
    model.adapters[0].route = "rowblock"
    _compile_check(model, _batch(2, torch.float32)[0])
