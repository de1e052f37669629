"""Shared helpers for the lyfast <-> lycoris-lora 4.1.3 parity suite.

Everything a test needs is built here once:

* ``LAYERS`` / ``make_layer`` / ``make_input``: small frozen base layers (every layer kind the peer supports)
  and matching inputs (``x.requires_grad``).
* ``make_pair``: the same base layer deep-copied twice, the LyCORIS module and the lyfast module built on the
  copies with the same positional/keyword arguments, the LyCORIS parameters randomized (LyCORIS zero-inits
  ``hada_w2_a`` / ``lokr_w2(_b)`` / ``oft_blocks``), copied into lyfast with ``load_state_dict`` and checked by
  name, shape and value.
* ``run_adapted``: forward through the *base layer* (after ``apply_to``) + backward with a fixed upstream
  gradient; returns output, ``x.grad`` and every parameter gradient by name.
* ``assert_close_rel`` / ``assert_results_match``: verbose comparisons with the suite's tolerances
  (fp64 relative error <= 1e-10 for LoHa/LoKr; fp32 for BOFT because LyCORIS forces its Cayley inverse to fp32).
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field

import pytest
import torch
import torch.nn as nn

import benchmarks  # noqa: F401  (first: binds `kernels` to the installed package, see its docstring)
import lyfast
from lycoris.modules.boft import ButterflyOFTModule as LycoBOFT
from lycoris.modules.loha import LohaModule as LycoLoha
from lycoris.modules.lokr import LokrModule as LycoLokr

torch.set_num_threads(min(2, torch.get_num_threads()))
# oneDNN's half-precision CPU convolution segfaults on some x86 CPUs (torch 2.13.0+cpu, Intel Xeon: a plain fp16
# nn.Conv2d(6, 32, (2, 1), stride=2, padding=(2, 1), dilation=2, groups=2) takes the interpreter down, batched or
# not). The suite checks lyfast's numerics and LyCORIS's, not oneDNN's: every test runs PyTorch's native CPU
# kernels. (A crash that still happens fails one test: `make test` runs pytest-xdist workers, which report a
# dead worker's test as failed and start a new worker.)
torch.backends.mkldnn.enabled = False

ALGOS = ("loha", "lokr", "boft")

LYCO_CLS = {"loha": LycoLoha, "lokr": LycoLokr, "boft": LycoBOFT}
FAST_NAME = {"loha": "LohaModule", "lokr": "LokrModule", "boft": "ButterflyOFTModule"}


def fast_cls(algo: str):
    return getattr(lyfast, FAST_NAME[algo])


def lyco_cls(algo: str):
    return LYCO_CLS[algo]


# Working precision per algorithm: LyCORIS' BOFT inverts (I - Q) in fp32 whatever the parameter dtype
# (fp64 parameters raise a dtype error), so BOFT parity is checked in fp32.
ALGO_DTYPE = {"loha": torch.float64, "lokr": torch.float64, "boft": torch.float32}

# fp64: max|a-b| <= 1e-10 * max|ref|.  fp32 (BOFT): |a-b| <= 2e-6*max|ref| + 1e-5*|ref| elementwise.
TOL = {
    torch.float64: dict(rtol=0.0, atol_rel=1e-10),
    torch.float32: dict(rtol=1e-5, atol_rel=2e-6),
}

# Default rank per algorithm for the layer grid (LoKr rank 2 keeps w2 decomposed on the 24->32 shapes).
DEFAULT_KW = {
    "loha": dict(lora_dim=4, alpha=2),
    "lokr": dict(lora_dim=2, alpha=1.5),
    "boft": dict(lora_dim=4, alpha=1),
}


# --------------------------------------------------------------------------------------------------------------
# layers and inputs
# --------------------------------------------------------------------------------------------------------------
def _linear(bias, i=24, o=32):
    return nn.Linear(i, o, bias=bias)


LAYERS = {
    # name: (constructor(bias) -> module, input shape)
    "linear": (lambda bias: nn.Linear(24, 32, bias=bias), (2, 3, 24)),
    "conv1d": (lambda bias: nn.Conv1d(24, 32, 3, padding=1, bias=bias), (2, 24, 7)),
    "conv2d": (lambda bias: nn.Conv2d(24, 32, 3, padding=1, bias=bias), (2, 24, 5, 5)),
    "conv3d": (lambda bias: nn.Conv3d(12, 32, 3, padding=1, bias=bias), (2, 12, 3, 4, 4)),
    "conv2d_groups2": (lambda bias: nn.Conv2d(24, 32, 3, padding=1, groups=2, bias=bias), (2, 24, 5, 5)),
    "conv2d_1x1": (lambda bias: nn.Conv2d(24, 32, 1, bias=bias), (2, 24, 5, 5)),
    "conv2d_strided": (
        lambda bias: nn.Conv2d(24, 32, 3, stride=2, padding=2, dilation=2, bias=bias),
        (2, 24, 7, 7),
    ),
    "conv1d_strided": (
        lambda bias: nn.Conv1d(24, 32, 3, stride=2, padding=1, dilation=2, bias=bias),
        (3, 24, 9),
    ),
}
LAYER_KINDS = tuple(LAYERS)


def freeze_(layer: nn.Module) -> nn.Module:
    for p in layer.parameters():
        p.requires_grad_(False)
    return layer


def make_layer(kind, bias=True, dtype=torch.float64, seed=0):
    """A frozen base layer of ``kind`` (a key of LAYERS, or an nn.Module to freeze and cast)."""
    torch.manual_seed(seed)
    if isinstance(kind, nn.Module):
        layer = kind
    else:
        layer = LAYERS[kind][0](bias)
    layer = layer.to(dtype)
    with torch.no_grad():  # non-trivial bias so bias handling is visible
        if getattr(layer, "bias", None) is not None:
            layer.bias.normal_(0, 0.5)
    return freeze_(layer)


def make_input(kind, dtype=torch.float64, seed=1, shape=None):
    torch.manual_seed(seed)
    if shape is None:
        shape = LAYERS[kind][1]
    return torch.randn(*shape, dtype=dtype).requires_grad_(True)


# --------------------------------------------------------------------------------------------------------------
# parameter randomization and copying
# --------------------------------------------------------------------------------------------------------------
@torch.no_grad()
def randomize_(module: nn.Module, seed=0, scale=0.3, block_scale=0.1):
    """Fill every trainable parameter with non-zero random values (LyCORIS zero-inits w2_a/w2_b/oft_blocks)."""
    g = torch.Generator().manual_seed(seed)
    for name, p in module.named_parameters():
        r = torch.randn(p.shape, generator=g, dtype=torch.float64)
        if name == "oft_blocks":
            val = r * block_scale
        elif name == "rescale":
            val = 1.0 + 0.1 * r
        elif name == "scalar":
            val = 0.75 + 0.25 * torch.rand(p.shape, generator=g, dtype=torch.float64)
        else:
            val = r * scale
        p.copy_(val.to(p.dtype))
    return module


@torch.no_grad()
def copy_params_by_name_(dst: nn.Module, src: nn.Module):
    sp = dict(src.named_parameters())
    for name, p in dst.named_parameters():
        p.copy_(sp[name])


def param_shapes(module):
    return {n: tuple(p.shape) for n, p in module.named_parameters()}


def assert_same_param_names(fast, lyco):
    fs, ls = param_shapes(fast), param_shapes(lyco)
    assert set(fs) == set(ls), f"parameter names differ: lyfast {sorted(fs)} vs lycoris {sorted(ls)}"
    for n in ls:
        assert fs[n] == ls[n], f"parameter {n!r}: lyfast shape {fs[n]} vs lycoris {ls[n]}"


# --------------------------------------------------------------------------------------------------------------
# module pairs
# --------------------------------------------------------------------------------------------------------------
@dataclass
class Pair:
    algo: str
    lyco: nn.Module
    fast: nn.Module
    lyco_layer: nn.Module
    fast_layer: nn.Module
    base_layer: nn.Module  # an untouched copy
    x: torch.Tensor  # template input (leaf, requires_grad)
    dtype: torch.dtype
    kwargs: dict = field(default_factory=dict)

    def apply(self):
        self.lyco.apply_to()
        self.fast.apply_to()
        return self


def build_args(algo, multiplier=1.0, **kwargs):
    """(positional args after lora_name/org_module, keyword args) in LyCORIS's positional order."""
    kw = dict(DEFAULT_KW[algo])
    kw.update(kwargs)
    pos_names = ("lora_dim", "alpha", "dropout", "rank_dropout", "module_dropout", "use_tucker")
    defaults = dict(dropout=0.0, rank_dropout=0.0, module_dropout=0.0, use_tucker=False)
    pos = [multiplier]
    for n in pos_names:
        pos.append(kw.pop(n) if n in kw else defaults[n])
    return pos, kw


def bias_outside_adapter_(layer: nn.Module) -> nn.Module:
    """Move the layer's bias into a forward hook that adds it after every adapter. For the LyCORIS side of BOFT
    pairs: LyCORIS 4.1.3's BOFT bypass rotates the bias with W·x, lyfast (both modes) and LyCORIS's rebuild
    rotate W·x only (docs/coming_from_lycoris.md); with the bias outside, LyCORIS computes lyfast's model."""
    bias = getattr(layer, "bias", None)
    if bias is None:
        return layer
    layer.register_parameter("bias", None)
    shape = (-1,) + (1,) * (layer.weight.dim() - 2) if layer.weight.dim() > 2 else (-1,)
    layer.register_forward_hook(lambda mod, args, out: out + bias.view(shape).to(out.dtype))
    return layer


def make_pair(
    algo,
    layer="linear",
    *,
    bias=True,
    multiplier=1.0,
    dtype=None,
    seed=0,
    input_shape=None,
    apply=True,
    check_load=True,
    **kwargs,
) -> Pair:
    """Build the LyCORIS and lyfast modules on two deep copies of one frozen base layer.

    ``kwargs`` are LyCORIS constructor arguments (lora_dim, alpha, dropout, rank_dropout, module_dropout and
    use_tucker are passed positionally, in LyCORIS's order; the rest as keywords). The LyCORIS parameters are
    randomized, loaded into lyfast with ``load_state_dict(lyco.state_dict())``, and then (because ``use_scalar``
    folds the scalar into w1_a in the state dict) copied by name so both hold identical parameters.
    """
    dtype = dtype or ALGO_DTYPE[algo]
    kind = layer
    base = make_layer(layer, bias=bias, dtype=dtype, seed=seed)
    x = make_input(kind, dtype=dtype, seed=seed + 1, shape=input_shape)
    lyco_layer, fast_layer = copy.deepcopy(base), copy.deepcopy(base)
    pos, kw = build_args(algo, multiplier, **kwargs)
    if algo == "boft":
        bias_outside_adapter_(lyco_layer)
    lyco = lyco_cls(algo)("lycoris_test", lyco_layer, *pos, **kw).to(dtype)
    fast = fast_cls(algo)("lycoris_test", fast_layer, *pos, **kw).to(dtype)
    randomize_(lyco, seed=seed + 7)
    assert_same_param_names(fast, lyco)
    fast.load_state_dict(lyco.state_dict())
    if check_load and not kwargs.get("use_scalar", False):
        fp = dict(fast.named_parameters())
        for n, p in lyco.named_parameters():
            assert torch.equal(fp[n].detach(), p.detach()), f"load_state_dict did not copy {n!r}"
    copy_params_by_name_(fast, lyco)
    pair = Pair(algo, lyco, fast, lyco_layer, fast_layer, copy.deepcopy(base), x, dtype, dict(kwargs))
    if apply:
        pair.apply()
    return pair


def upstream_grad(out, seed=123):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(out.shape, generator=g, dtype=torch.float64).to(out.dtype)


def run_adapted(layer, module, x, seed=None, backward=True):
    """Forward through the (adapted) base layer, backward with a fixed upstream gradient.

    Returns dict(out=..., x_grad=..., grads={param name: grad}). ``seed`` re-seeds the global RNG right before
    the forward (for dropout parity)."""
    x = x.detach().clone().requires_grad_(True)
    if module is not None:
        module.zero_grad(set_to_none=True)
    if seed is not None:
        torch.manual_seed(seed)
    out = layer(x)
    res = {"out": out.detach()}
    if backward:
        out.backward(upstream_grad(out))
        res["x_grad"] = x.grad.detach() if x.grad is not None else None
        if module is not None:
            res["grads"] = {
                n: (p.grad.detach() if p.grad is not None else None) for n, p in module.named_parameters()
            }
    return res


# --------------------------------------------------------------------------------------------------------------
# comparisons
# --------------------------------------------------------------------------------------------------------------
def assert_close_rel(actual, expected, *, rtol=None, atol_rel=None, dtype=None, name="tensor"):
    """``|a - e| <= atol_rel * max|e| + rtol * |e|`` elementwise, with a verbose report on failure."""
    if dtype is None:
        dtype = expected.dtype if expected.dtype in TOL else torch.float64
    tol = TOL[dtype]
    rtol = tol["rtol"] if rtol is None else rtol
    atol_rel = tol["atol_rel"] if atol_rel is None else atol_rel
    assert actual is not None, f"{name}: lyfast gave None (expected a tensor of shape {tuple(expected.shape)})"
    assert tuple(actual.shape) == tuple(expected.shape), (
        f"{name}: shape {tuple(actual.shape)} != expected {tuple(expected.shape)}"
    )
    a = actual.detach().to(torch.float64)
    e = expected.detach().to(torch.float64)
    assert torch.isfinite(a).all(), f"{name}: non-finite values in lyfast result"
    scale = e.abs().max().item() if e.numel() else 0.0
    err = (a - e).abs()
    bound = atol_rel * max(scale, 1e-30) + rtol * e.abs()
    bad = err > bound
    if bad.any():
        idx = int(torch.argmax((err - bound).flatten()))
        idx_t = tuple(int(i) for i in torch.unravel_index(torch.tensor(idx), e.shape))
        rel = err.max().item() / max(scale, 1e-30)
        raise AssertionError(
            f"{name}: {int(bad.sum())}/{e.numel()} elements out of tolerance "
            f"(rtol={rtol}, atol={atol_rel}*max|ref|={atol_rel * scale:.3g}); "
            f"max abs err {err.max().item():.3e}, max|ref| {scale:.3e}, rel err {rel:.3e}; "
            f"worst at {idx_t}: lyfast {a.flatten()[idx].item():.10g} vs ref {e.flatten()[idx].item():.10g}"
        )


def assert_results_match(fast_res, lyco_res, dtype, *, what="", grad_scale=None):
    """`grad_scale` {name: s}: lyfast's gradient of that parameter is s × LyCORIS's (see match_lyco_rescale_)."""
    pre = f"{what}: " if what else ""
    assert_close_rel(fast_res["out"], lyco_res["out"], dtype=dtype, name=f"{pre}output")
    if "x_grad" in lyco_res:
        assert_close_rel(fast_res["x_grad"], lyco_res["x_grad"], dtype=dtype, name=f"{pre}x.grad")
    if "grads" in lyco_res:
        fg, lg = fast_res["grads"], lyco_res["grads"]
        assert set(fg) == set(lg), f"{pre}parameter names differ: {sorted(fg)} vs {sorted(lg)}"
        for n, g in lg.items():
            if g is None:
                assert fg[n] is None or torch.count_nonzero(fg[n]) == 0, f"{pre}{n}.grad should be None/zero"
                continue
            assert_close_rel(fg[n], g * (grad_scale or {}).get(n, 1.0), dtype=dtype, name=f"{pre}grad of {n}")


@torch.no_grad()
def match_lyco_rescale_(pair: Pair, multiplier) -> dict:
    """Set both modules' multiplier; for a rescaled BOFT, give the LyCORIS module the rescale lyfast applies at
    that multiplier, 1 + multiplier·(rescale − 1) (lyfast interpolates it so that multiplier 0 is the frozen
    model; LyCORIS applies it whole). Returns the `grad_scale` for assert_results_match: lyfast's rescale
    gradient is then multiplier × LyCORIS's."""
    pair.lyco.multiplier = pair.fast.multiplier = multiplier
    if not getattr(pair.fast, "rescaled", False):
        return {}
    pair.lyco.rescale.copy_(1 + (pair.fast.rescale - 1) * multiplier)
    return {"rescale": multiplier}


def check_parity(pair: Pair, seed=None, ref_pair_side=None, what=""):
    """Run both adapted layers and compare output, x.grad and every parameter grad."""
    grad_scale = match_lyco_rescale_(pair, pair.fast.multiplier)
    lr = run_adapted(pair.lyco_layer, pair.lyco, pair.x, seed=seed)
    fr = run_adapted(pair.fast_layer, pair.fast, pair.x, seed=seed)
    # sanity: the adapter must actually change the output (a test that can fail)
    base = run_adapted(pair.base_layer, None, pair.x, backward=False)
    if pair.kwargs.get("module_dropout", 0) == 0 and pair.lyco.multiplier != 0:
        assert not torch.allclose(lr["out"], base["out"]), "adapter had no effect: test would be vacuous"
    assert_results_match(fr, lr, pair.dtype, what=what, grad_scale=grad_scale)
    return fr, lr


# --------------------------------------------------------------------------------------------------------------
# misc
# --------------------------------------------------------------------------------------------------------------
def layer_op(layer):
    """The functional op of a (conv/linear) layer: op(x, weight, bias)."""
    import torch.nn.functional as F

    if isinstance(layer, nn.Linear):
        return lambda x, w, b: F.linear(x, w, b)
    kw = dict(stride=layer.stride, padding=layer.padding, dilation=layer.dilation, groups=layer.groups)
    fn = {nn.Conv1d: F.conv1d, nn.Conv2d: F.conv2d, nn.Conv3d: F.conv3d}[type(layer)]
    return lambda x, w, b: fn(x, w, b, **kw)


def ids(v):
    if isinstance(v, dict):
        return "-".join(f"{k}={v[k]}" for k in v) or "default"
    return str(v)


@pytest.fixture(autouse=True)
def _fresh_seed():
    torch.manual_seed(0)
    yield


# --------------------------------------------------------------------------------------------------------------
# dropout parity: the same global seed before each forward; lyfast must consume the RNG like LyCORIS
# --------------------------------------------------------------------------------------------------------------
def check_dropout_parity(pair: Pair, seeds=(0, 1, 2, 3)):
    pair.lyco.train()
    pair.fast.train()
    outs = []
    for s in seeds:
        lr = run_adapted(pair.lyco_layer, pair.lyco, pair.x, seed=s)
        fr = run_adapted(pair.fast_layer, pair.fast, pair.x, seed=s)
        assert_results_match(fr, lr, pair.dtype, what=f"seed {s}")
        # the RNG must also be left in the same state (same number of draws)
        torch.manual_seed(s)
        run_adapted(pair.lyco_layer, pair.lyco, pair.x, backward=False)
        after_lyco = torch.rand(4)
        torch.manual_seed(s)
        run_adapted(pair.fast_layer, pair.fast, pair.x, backward=False)
        after_fast = torch.rand(4)
        assert torch.equal(after_fast, after_lyco), f"seed {s}: lyfast drew a different amount of randomness"
        outs.append(lr["out"])
    return outs


def assert_outputs_vary(outs):
    """With dropout active, different seeds must give different outputs (else the test is vacuous)."""
    assert any(not torch.equal(outs[0], o) for o in outs[1:]), "dropout had no visible effect"
