"""Adapters over quantized frozen bases (issue 21), each base built by its real library (`lyfast.quantized`):
torchao int8 / float8 weight-only, optimum-quanto qint8 / qfloat8, bitsandbytes nf4 (its CPU backend), an
fp8-storage layer (ComfyUI's / OneTrainer's `Fp8Linear`, duck-typed) and a Linear subclass with a forward of
its own. For each base and algorithm:

* the adapted layer is the quantized layer's own output plus the adapter's contribution, which equals
  ΔW·x with ΔW built in fp64 from the same factors over the layer's dequantized weight: output, dx and every
  factor gradient, within the error eager fp32 makes on that contribution;
* no tensor of half W's size or more is created beyond what the quantized layer itself creates (measured);
* the network adapts every quantized Linear of a small Flux transformer as it adapts the bf16 one, trains,
  saves a file whose keys, shapes and ΔW load into the unquantized model; merging is refused with a clear
  error; DoRA is refused naming the layer type.

Planted defects (kept here as tests): taking the rebuild path on a quantized layer (reading W) fails the
probe; dropping the layer's bias fails the contribution check.
"""
from __future__ import annotations

import importlib
import os
import sys
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import lyfast
from conftest import fast_cls, randomize_
from lyco_models import one_thread  # noqa: F401  (autouse fixture)
from lyfast.profile import large_tensors
from lyfast.quantized import BaseUnavailable, dequantized_weight, quantize_base

NAME = "lycoris_q"
ALGOS = ["loha", "lokr", "boft"]
# W is twice BOFT's own parameter-sized temporaries (m·O·b·2 for the Cayley solve), as in real layers
# (a Flux Linear's W is ~14x them), so the W-size probe tells W from the adapter's own size.
IN, OUT = 256, 128


class Fp8Linear(nn.Module):
    """fp8 storage with a per-tensor scale, upcast in forward (ComfyUI's and OneTrainer's layers)."""

    def __init__(self, src: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = src.in_features, src.out_features
        w = src.weight.detach()
        self.weight_scale = nn.Parameter(w.abs().max() / 448, requires_grad=False)
        self.weight = nn.Parameter((w / self.weight_scale).to(torch.float8_e4m3fn), requires_grad=False)
        self.bias = nn.Parameter(src.bias.detach().clone(), requires_grad=False)

    def forward(self, x):
        return F.linear(x, self.weight.to(x.dtype) * self.weight_scale.to(x.dtype), self.bias)


class ScaledLinear(nn.Linear):
    """A Linear subclass whose forward is not nn.Linear's (here: a fake-quantized weight)."""

    def forward(self, x):
        w = torch.round(self.weight * 64) / 64
        return F.linear(x, w, self.bias)

    def dequantized(self):
        return torch.round(self.weight * 64) / 64


BASES = ["int8-torchao", "fp8-torchao", "int8-quanto", "fp8-quanto", "nf4-bnb", "fp8-storage", "subclass"]


def _quantized_model(base, seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(IN, OUT))
    if base == "fp8-storage":
        model[0] = Fp8Linear(model[0])
    elif base == "subclass":
        sub = ScaledLinear(IN, OUT)
        sub.load_state_dict(model[0].state_dict())
        model[0] = sub
    else:
        _quantize_or_skip(model, base)
    model.requires_grad_(False)
    return model


def _quantize_or_skip(model, base):
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            quantize_base(model, base)
    except BaseUnavailable as e:
        pytest.skip(str(e))


def _dequantized(layer):
    return layer.dequantized().detach() if isinstance(layer, ScaledLinear) else dequantized_weight(layer)


def _module(algo, layer, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fast_cls(algo)(NAME, layer, 1.0, 4, 2, **kw)


def _reference_contribution(algo, layer, state, x, g, dtype):
    """ΔW built in `dtype` from the factors in `state` over the layer's dequantized weight: (ΔW·x, dx of it,
    {factor: grad})."""
    w = _dequantized(layer).to(dtype)
    twin_layer = nn.Linear(IN, OUT, dtype=dtype).requires_grad_(False)
    twin_layer.weight.copy_(w)
    twin = _module(algo, twin_layer).to(dtype)
    twin.load_state_dict({k: v.to(dtype) for k, v in state.items()})
    xr = x.detach().to(dtype).requires_grad_(True)
    out = F.linear(xr, twin.delta_weight(1.0))
    out.backward(g.to(dtype))
    return out.detach(), xr.grad, {n: p.grad for n, p in twin.named_parameters()}


@pytest.mark.parametrize("algo", ALGOS)
@pytest.mark.parametrize("base", BASES)
def test_adapted_quantized_layer_is_layer_plus_delta(base, algo):
    model = _quantized_model(base)
    layer = model[0]
    m = _module(algo, layer)
    randomize_(m, seed=1)
    assert m.is_quant and m.bypass_mode, "a quantized base must run in bypass"
    m.apply_to()

    torch.manual_seed(2)
    x = torch.randn(5, IN)
    g = torch.randn(5, OUT)
    xa = x.clone().requires_grad_(True)
    out = layer(xa)
    out.backward(g)
    xb = x.clone().requires_grad_(True)
    base_out = m.org_forward(xb)  # the quantized layer's own forward and backward
    base_out.backward(g)

    contribution = (out - base_out).detach().double()
    dx = (xa.grad - xb.grad).double()
    state = {k: v.detach() for k, v in m.state_dict().items()}
    ref, ref_dx, ref_grads = _reference_contribution(algo, layer, state, x, g, torch.float64)
    eager, eager_dx, eager_grads = _reference_contribution(algo, layer, state, x, g, torch.float32)

    def check(got, want, eager_got, what):
        err = (eager_got.double() - want).abs().max().item()
        tol = 8 * err + 1e-6 * want.abs().max().item()
        assert (got - want).abs().max().item() <= tol, f"{base} {algo}: {what} off by more than {tol:.3g}"

    check(contribution, ref, eager, "output contribution")
    check(dx, ref_dx, eager_dx, "dx")
    for n, p in m.named_parameters():
        check(p.grad.double(), ref_grads[n], eager_grads[n], f"grad of {n}")


def _big_tensors(layer, threshold):
    probe = large_tensors(layer, torch.randn(4, IN), threshold)
    return probe.count, probe.ops


def _assert_no_w_sized_tensor(base, algo):
    model = _quantized_model(base)
    layer = model[0]
    threshold = IN * OUT // 2
    baseline, base_ops = _big_tensors(layer, threshold)  # what the quantized layer itself creates
    m = _module(algo, layer)
    randomize_(m, seed=1)
    m.apply_to()
    count, ops = _big_tensors(layer, threshold)
    assert count == baseline, f"{base} {algo}: W-sized tensors {ops} beyond the layer's own {base_ops}"


@pytest.mark.parametrize("algo", ALGOS)
@pytest.mark.parametrize("base", BASES)
def test_no_weight_sized_tensor_beyond_the_layers_own(base, algo):
    _assert_no_w_sized_tensor(base, algo)


@pytest.mark.parametrize("algo", ["loha", "lokr"])
def test_planted_rebuild_on_a_quantized_layer_fails_the_probe(algo, monkeypatch):
    """Planted defect: the module takes a quantized layer's weight as plain, so the fused route computes
    F.linear(x, W, b) itself (reading W) instead of calling the layer."""
    import lyfast.modules.base as mbase

    monkeypatch.setattr(mbase, "is_quantized_base", lambda module: False)
    monkeypatch.setattr(mbase, "plain_weight", lambda weight: True)
    with pytest.raises(Exception):  # a crash on the packed weight or a W-sized tensor: either fails
        _assert_no_w_sized_tensor("int8-torchao", algo)


def test_planted_dropped_bias_fails_the_contribution_check(monkeypatch):
    """Planted defect: BOFT's bypass drops the layer's own bias (it rotates layer(x) − b, then adds b)."""
    import lyfast.modules.boft as mboft

    def dropped(self, base, multiplier):
        bias = self._bias_view(self.org_module[0].bias.to(base.dtype))
        return self._rotate(base - bias, multiplier)

    monkeypatch.setattr(mboft.ButterflyOFTModule, "_rotate_weight_part", dropped)
    with pytest.raises(AssertionError):
        test_adapted_quantized_layer_is_layer_plus_delta("int8-quanto", "boft")


MERGEABLE = ["int8-torchao", "fp8-torchao", "int8-quanto", "fp8-quanto", "nf4-bnb"]


@pytest.mark.parametrize("algo", ALGOS)
@pytest.mark.parametrize("base", MERGEABLE)
def test_merge_into_a_quantized_layer_requantizes_it(base, algo):
    """merge_to on a quantized layer: dequantize, add ΔW, quantize again with the layer's own settings. The
    merged layer stays quantized (same weight class), and its weight and output are the adapted layer's up to
    what the library's own quantization of W0 + ΔW loses (measured by quantizing W0 + ΔW afresh)."""
    model = _quantized_model(base)
    layer = model[0]
    cls = type(layer.weight)
    w0 = _dequantized(layer).double()
    m = _module(algo, layer)
    randomize_(m, seed=1)
    m.multiplier = 0.5
    m.apply_to()
    x = torch.randn(7, IN)
    with torch.no_grad():
        adapted = layer(x).double()
        delta = m.delta_weight(0.5).double()
    m.restore()
    assert m.is_mergeable()
    m.merge_to(0.5)
    assert type(layer.weight) is cls and not lyfast.targeting.plain_weight(layer.weight), "the layer stays quantized"
    with torch.no_grad():
        merged = layer(x).double()
    w1 = _dequantized(layer).double()
    # the merged weight is W0 + ΔW up to what one quantization of W0 + ΔW by the library loses
    step = ((w0 + delta) - _requantized_alone(base, w0 + delta)).abs().max().item()
    assert 0 < step and (w1 - (w0 + delta)).abs().max().item() <= 2 * step + 1e-7, f"{base}: merged W off W0 + ΔW"
    scale = adapted.abs().max().item()
    assert (merged - adapted).abs().max().item() <= 2 * step * x.abs().sum(1).max().item() + 1e-5 * scale


def _requantized_alone(base, w):
    """W quantized and dequantized once by `base` (the error one quantization makes)."""
    torch.manual_seed(0)
    holder = nn.Sequential(nn.Linear(IN, OUT))
    with torch.no_grad():
        holder[0].weight.copy_(w.float())
    _quantize_or_skip(holder, base)
    return _dequantized(holder[0]).double()


@pytest.mark.parametrize("algo", ALGOS)
def test_merge_into_an_unknown_quantized_layer_is_refused_naming_it(algo):
    model = _quantized_model("fp8-storage")
    net = lyfast.create_lycoris(model, 1.0, 4, 2, algo=algo, preset={"target_name": ["0"]})
    net.apply_to()
    assert not net.is_mergeable()
    with pytest.raises(RuntimeError, match="Fp8Linear"):
        net.merge_to()


@pytest.mark.parametrize("wd_on_out", [True, False], ids=["rows", "columns"])
@pytest.mark.parametrize("algo", ["loha", "lokr"])
@pytest.mark.parametrize("base", BASES)
def test_dora_on_a_quantized_layer_equals_dora_on_its_dequantized_weight(base, algo, wd_on_out):
    """DoRA needs ‖W0 + ΔW‖: over a quantized Linear, W0 comes from the layer's own forward on basis blocks.
    The adapted layer must equal DoRA on a plain Linear holding the dequantized weight (fp64; the plain DoRA path
    is checked against LyCORIS elsewhere): initial magnitude, output, dx and every parameter's gradient, within
    8x eager fp32's error on the same quantity; and nothing W-sized is saved for backward."""
    model = _quantized_model(base)
    layer = model[0]
    m = _module(algo, layer, weight_decompose=True, wd_on_out=wd_on_out)
    w = _dequantized(layer).double()
    norms = torch.linalg.vector_norm(w, dim=1 if wd_on_out else 0)
    torch.testing.assert_close(m.dora_scale.reshape(-1).double(), norms, rtol=1e-5, atol=1e-6)
    randomize_(m, seed=1)
    with torch.no_grad():
        m.dora_scale.mul_(1.3)
    m.multiplier = 0.8
    m.apply_to()

    torch.manual_seed(2)
    x, g = torch.randn(5, IN), torch.randn(5, OUT)

    def run(module, target, dtype):
        xr = x.to(dtype).requires_grad_(True)
        out = target(xr)
        grads = torch.autograd.grad(out, [xr, *module.parameters()], g.to(dtype))
        return [out.detach(), *grads]

    got = run(m, layer, torch.float32)
    state = {k: v.detach() for k, v in m.state_dict().items()}

    def twin(dtype):
        plain = nn.Linear(IN, OUT, dtype=dtype).requires_grad_(False)
        with torch.no_grad():
            plain.weight.copy_(w.to(dtype))
            plain.bias.copy_(layer.bias.to(dtype))
        t = _module(algo, plain, weight_decompose=True, wd_on_out=wd_on_out).to(dtype)
        t.load_state_dict({k: v.to(dtype) for k, v in state.items()})
        t.multiplier = 0.8
        t.apply_to()
        return run(t, plain, dtype)

    ref, eager = twin(torch.float64), twin(torch.float32)
    names = ["output", "dx", *(n for n, _ in m.named_parameters())]
    for name, a, b, e in zip(names, got, ref, eager):
        tol = 8 * (e.double() - b).abs().max().item() + 1e-6 * b.abs().max().item()
        assert (a.double() - b).abs().max().item() <= tol, f"{base} {algo} DoRA: {name} off by more than {tol:.3g}"

    assert _w_sized_saved(layer, m) <= _w_sized_saved(_quantized_model(base)[0]), \
        f"{base}: a W-sized tensor saved for backward beyond the layer's own"


def _w_sized_saved(layer, adapter=None):
    """How many tensors of >= half W's bytes (fp32) autograd saves in one forward of `layer`."""
    from lyfast.profile import _saved

    exclude = [*layer.parameters(), *layer.buffers(), *(adapter.parameters() if adapter is not None else ())]
    with _saved(exclude) as seen:
        layer(torch.randn(5, IN, requires_grad=True))
    return sum(n >= IN * OUT * 4 // 2 for n in seen.values())


def test_planted_whole_dequantized_w0_for_dora_fails_the_saved_check(monkeypatch):
    """Planted defect: DoRA's norms over the whole dequantized W0 (row blocks over a W-sized copy)."""
    import lyfast.modules.base as mbase
    from lyfast.functional import dora as fdora

    def whole(self, row_scale, zero_delta=False):
        w = dequantized_weight(self.org_module[0]).float()
        if zero_delta:
            return fdora._norm_sq(w, self.wd_on_out)
        return self._dora_norms(w, row_scale)

    monkeypatch.setattr(mbase.DeltaModule, "_quantized_norms_sq", whole)
    with pytest.raises(AssertionError, match="W-sized tensor saved for backward beyond"):
        test_dora_on_a_quantized_layer_equals_dora_on_its_dequantized_weight("int8-quanto", "lokr", True)


def test_dora_on_a_quantized_conv_names_the_layer_type():
    pytest.importorskip("optimum.quanto")
    model = nn.Sequential(nn.Conv2d(4, 8, 3))
    _quantize_or_skip(model, "int8-quanto")
    with pytest.raises(ValueError, match="QConv2d"):
        _module("lokr", model[0], weight_decompose=True)


def test_fp8_storage_linear_targeted_by_name_is_adapted():
    """Issue 20 item 8: a targeted `Fp8Linear` got rejected by the module and create_lycoris failed."""
    model = _quantized_model("fp8-storage")
    for algo in ALGOS:
        net = lyfast.create_lycoris(model, 1.0, 4, 2, algo=algo, preset={"target_name": ["0"]})
        assert len(net.loras) == 1 and net.loras[0].bypass_mode


# ------------------------------------------------------------------------------ a quantized Flux transformer
sys.path.insert(0, os.path.join(os.path.dirname(__file__), os.pardir, "examples"))


@pytest.mark.parametrize("algo", ["loha", "lokr"])
@pytest.mark.parametrize("base", ["int8-torchao", "fp8-torchao", "int8-quanto", "fp8-quanto", "nf4-bnb"])
def test_quantized_flux_network_trains_and_its_file_loads_into_the_bf16_model(base, algo, tmp_path):
    pytest.importorskip("diffusers")
    import train_dit

    plain = train_dit.build_transformer(dtype=torch.float32, seed=0)
    model = train_dit.build_transformer(dtype=torch.float32, seed=0)
    _quantize_or_skip(model, base)
    frozen = [n for n, p in model.named_parameters() if p.requires_grad]
    assert not frozen, f"quantize_base unfroze the frozen base: {frozen[:3]}"  # quanto's freeze() did
    kw = train_dit.ALGO_KW[algo]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        net_q = lyfast.create_lycoris(model, 1.0, kw["linear_dim"], kw["linear_alpha"], algo=algo,
                                      **({"factor": kw["factor"]} if "factor" in kw else {}))
        net_p = lyfast.create_lycoris(plain, 1.0, kw["linear_dim"], kw["linear_alpha"], algo=algo,
                                      **({"factor": kw["factor"]} if "factor" in kw else {}))
    n_linear = sum(isinstance(m, nn.Linear) for m in plain.modules())
    assert len(net_q.loras) == len(net_p.loras) >= n_linear - 2, "every quantized Linear is adapted"
    assert all(lo.is_quant for lo in net_q.loras if lo.org_module[0].__class__ is not nn.Linear
               or not lyfast.targeting.plain_weight(lo.org_module[0].weight))
    assert {k: v.shape for k, v in net_q.state_dict().items()} == {k: v.shape for k, v in net_p.state_dict().items()}
    net_q.apply_to()
    for p in net_q.parameters():
        p.requires_grad_(True)
    res = train_dit.train(model, net_q, steps=3, lr=1e-2, batch=2, side=2)
    assert all(torch.isfinite(torch.tensor(res["losses"])))
    trained = {k: v.detach().clone() for k, v in net_q.state_dict().items()}
    assert any((v != 0).any() for k, v in trained.items() if "w2" in k or "lokr_w2" in k), "the adapters trained"

    path = str(tmp_path / "q.safetensors")
    net_q.save_weights(path, torch.float32, None)
    loaded, _ = lyfast.create_lycoris_from_weights(1.0, path, plain)
    by_name = {lo.lora_name: lo for lo in loaded.loras}
    for lo in net_q.loras:
        torch.testing.assert_close(by_name[lo.lora_name].delta_weight(1.0), lo.delta_weight(1.0),
                                   rtol=0, atol=0)


@pytest.mark.parametrize("algo", ["loha", "lokr"])
def test_accelerate_on_a_torchao_layer_lycoris_missed_runs_in_bypass(algo):
    """LyCORIS does not see torchao's tensor subclasses as quantized (its module stays in rebuild mode and
    crashes on the packed weight); lyfast.accelerate decides by lyfast's definition: bypass, layer + ΔW·x."""
    lycoris_modules = pytest.importorskip("lycoris.modules")
    model = _quantized_model("int8-torchao")
    layer = model[0]
    cls = {"loha": lycoris_modules.LohaModule, "lokr": lycoris_modules.LokrModule}[algo]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        old = cls(NAME, layer, 1.0, 4, 2)
    assert not old.bypass_mode
    randomize_(old, seed=3)
    old.apply_to()
    assert lyfast.accelerate(model) == 1
    find = importlib.import_module("lyfast.accelerate")._find_adapters
    adapters = find(model, lambda m: type(m).__module__.startswith("lyfast."))
    assert len(adapters) == 1 and adapters[0].is_quant and adapters[0].bypass_mode
    x = torch.randn(3, IN)
    with torch.no_grad():
        got = layer(x) - adapters[0].org_forward(x)
    state = {k: v.detach() for k, v in adapters[0].state_dict().items()}
    ref, _, _ = _reference_contribution(algo, layer, state, x, torch.zeros(3, OUT), torch.float64)
    torch.testing.assert_close(got.double(), ref, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("algo", ["loha", "lokr", "boft"])
@pytest.mark.parametrize("base", ["int8-quanto", "fp8-quanto", "nf4-bnb"])
def test_equals_lycoris_bypass_where_lycoris_runs_it(base, algo):
    """On the layers LyCORIS 4.1.3 forces into bypass (optimum-quanto, bitsandbytes), its module and lyfast's with
    the same weights give the same output and factor gradients (fp32; LyCORIS's BOFT bypass rotates the bias
    too, which lyfast deliberately does not: compared on a layer without bias there)."""
    lycoris_modules = pytest.importorskip("lycoris.modules")
    torch.manual_seed(0)
    holder = nn.Sequential(nn.Linear(IN, OUT, bias=algo != "boft"))
    _quantize_or_skip(holder, base)
    layer = holder[0].requires_grad_(False)
    cls = {"loha": lycoris_modules.LohaModule, "lokr": lycoris_modules.LokrModule,
           "boft": lycoris_modules.ButterflyOFTModule}[algo]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = cls(NAME, layer, 1.0, 4, 2)
    assert theirs.bypass_mode, "LyCORIS forces bypass on this layer"
    randomize_(theirs, seed=5)
    mine = _module(algo, layer)
    mine.load_state_dict(theirs.state_dict(), strict=False)
    x = torch.randn(6, IN)
    g = torch.randn(6, OUT)
    results = []
    for module in (theirs, mine):
        module.apply_to()
        xr = x.clone().requires_grad_(True)
        out = layer(xr)
        grads = torch.autograd.grad(out, [xr, *module.parameters()], g)
        results.append([out, *grads])
        module.restore()
    for a, b in zip(*results):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5)
