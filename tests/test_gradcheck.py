"""torch.autograd.gradcheck (fp64) through the lyfast modules and through every custom autograd Function in
lyfast.functional.

The Functions are found by inspection; their real call arguments are captured by running the modules (every
route, layer kind and mode) with `Function.apply` wrapped, and each captured call is then gradchecked with
exactly the inputs that required grad in the real call.
"""

import copy
import importlib
import inspect
import pkgutil

import pytest
import torch
import torch.nn as nn

import lyfast.functional
from conftest import fast_cls, freeze_, randomize_

DT = torch.float64

SMALL = {
    "linear": (lambda: nn.Linear(6, 8), (2, 6)),
    "conv1d": (lambda: nn.Conv1d(4, 8, 3, padding=1, stride=2), (1, 4, 5)),
    "conv2d": (lambda: nn.Conv2d(4, 8, 3, padding=1), (1, 4, 3, 3)),
    "conv2d_groups2": (lambda: nn.Conv2d(4, 8, 3, padding=1, groups=2), (1, 4, 3, 3)),
}

MODULE_CASES = [
    ("loha", dict(lora_dim=2, alpha=1), dict(route="khatri_rao")),
    ("loha", dict(lora_dim=2, alpha=1, use_scalar=True), dict(route="rowblock")),
    ("loha", dict(lora_dim=2, alpha=1, use_tucker=True), dict(route="khatri_rao")),
    ("loha", dict(lora_dim=2, alpha=1, use_tucker=True), dict(route="rowblock")),
    ("lokr", dict(lora_dim=1, alpha=1), {}),
    ("lokr", dict(lora_dim=1, alpha=1, decompose_both=True, factor=2, use_scalar=True), {}),
    ("lokr", dict(lora_dim=1, alpha=1, use_tucker=True), {}),
    ("lokr", dict(lora_dim=4), {}),  # both full
    ("boft", dict(lora_dim=2), {}),
    ("boft", dict(lora_dim=4, rescaled=True, constraint=0.05), {}),
    ("loha", dict(lora_dim=2, alpha=1, use_scalar=True, weight_decompose=True), dict(route="khatri_rao")),
    ("lokr", dict(lora_dim=1, alpha=1, weight_decompose=True, wd_on_out=False), {}),
]


def case_id(c):
    algo, kw, attrs = c
    return "-".join([algo] + [f"{k}={v}" for k, v in {**kw, **attrs}.items()])


def build_small(algo, layer_kind, kw, attrs, bypass, multiplier=0.7, seed=0):
    torch.manual_seed(seed)
    make, xshape = SMALL[layer_kind]
    layer = freeze_(make().to(DT))
    mod = fast_cls(algo)("g", layer, multiplier, bypass_mode=bypass, **kw).to(DT)
    randomize_(mod, seed=seed + 1, scale=0.5, block_scale=0.2)
    for k, v in attrs.items():
        setattr(mod, k, v)
    mod.apply_to()
    x = torch.randn(*xshape, dtype=DT, requires_grad=True)
    return layer, mod, x


@pytest.mark.parametrize("bypass", [False, True], ids=["rebuild", "bypass"])
@pytest.mark.parametrize("layer_kind", ["linear", "conv2d", "conv2d_groups2"])
@pytest.mark.parametrize("case", MODULE_CASES, ids=case_id)
def test_module_gradcheck(case, layer_kind, bypass):
    algo, kw, attrs = case
    if kw.get("use_tucker") and layer_kind == "linear":
        pytest.skip("Tucker needs a k>1 conv")
    layer, mod, x = build_small(algo, layer_kind, kw, attrs, bypass)
    names = [n for n, _ in mod.named_parameters()]
    params = [p.detach().clone().requires_grad_(True) for _, p in mod.named_parameters()]

    def f(x, *ps):
        return torch.func.functional_call(mod, dict(zip(names, ps)), (x,))

    assert torch.autograd.gradcheck(f, (x, *params), eps=1e-6, atol=1e-7, rtol=1e-5, fast_mode=True)


# ---------------------------------------------------------------------------------- custom Functions
def discover_functions():
    found = {}
    for info in pkgutil.iter_modules(lyfast.functional.__path__):
        mod = importlib.import_module(f"lyfast.functional.{info.name}")
        for name, obj in inspect.getmembers(mod, inspect.isclass):
            if issubclass(obj, torch.autograd.Function) and obj.__module__ == mod.__name__:
                found[f"{info.name}.{name}"] = obj
    return found


FUNCTIONS = discover_functions()

CAPTURE_RUNS = [
    (algo, layer_kind, kw, attrs, bypass)
    for (algo, kw, attrs) in MODULE_CASES
    for layer_kind in SMALL
    for bypass in (False, True)
    if not (kw.get("use_tucker") and layer_kind == "linear")
]


def _snapshot(args):
    return [
        (a.detach().clone(), a.requires_grad) if isinstance(a, torch.Tensor) else (a, None) for a in args
    ]


@pytest.fixture(scope="module")
def captured():
    """{function key: [snapshotted arg lists]} from running every module case (forward + backward)."""
    calls = {k: [] for k in FUNCTIONS}
    originals = {}
    for key, cls in FUNCTIONS.items():
        originals[key] = cls.__dict__.get("apply")

        def wrapped(*args, _key=key, _cls=cls, **kwargs):
            if len(calls[_key]) < 6:
                calls[_key].append((_snapshot(args), kwargs))
            return _APPLY(_cls, *args, **kwargs)

        cls.apply = staticmethod(wrapped)
    try:
        for algo, layer_kind, kw, attrs, bypass in CAPTURE_RUNS:
            layer, mod, x = build_small(algo, layer_kind, kw, attrs, bypass)
            layer(x).sum().backward()
    finally:
        for key, cls in FUNCTIONS.items():
            if originals[key] is None:
                del cls.apply
            else:
                cls.apply = originals[key]
    return calls


def _APPLY(cls, *args, **kwargs):
    # torch.autograd.Function.apply is a classmethod on the base class
    return torch.autograd.Function.apply.__func__(cls, *args, **kwargs)


def test_functions_found():
    assert FUNCTIONS, "no torch.autograd.Function subclasses found in lyfast.functional"


@pytest.mark.parametrize("key", sorted(FUNCTIONS))
def test_function_gradcheck(key, captured):
    cls = FUNCTIONS[key]
    assert captured[key], f"{key} was never called by any module case: add a case that exercises it"
    for snap, kwargs in captured[key][:4]:
        tensor_slots = [i for i, (a, rg) in enumerate(snap) if rg is not None]
        inputs = []
        for i in tensor_slots:
            a, rg = snap[i]
            a = a.clone()
            if a.is_floating_point():
                a = a.to(DT).requires_grad_(rg)
            inputs.append(a)
        if not any(t.requires_grad for t in inputs):
            continue

        def fn(*ts, _snap=snap, _slots=tensor_slots, _kw=kwargs):
            args = [a for a, _ in _snap]
            for i, t in zip(_slots, ts):
                args[i] = t
            return _APPLY(cls, *args, **_kw)

        assert torch.autograd.gradcheck(fn, tuple(inputs), eps=1e-6, atol=1e-7, rtol=1e-5, fast_mode=True), key


@pytest.mark.parametrize("block", [2, 6, 8])
@pytest.mark.parametrize("channel_axis", [-1, 1])
def test_butterfly_function_gradcheck_uneven_half_blocks(block, channel_axis):
    """Block sizes whose half (b/2) differs from the pair size 2 catch any transposed block layout."""
    from lyfast.functional import boft

    torch.manual_seed(0)
    n = 4
    blocks = (torch.randn(3, n, block, block, dtype=torch.float64) * 0.2).requires_grad_(True)
    rescale = torch.randn(n * block, 1, dtype=torch.float64, requires_grad=True)
    shape = (2, 3, n * block) if channel_axis == -1 else (2, n * block, 3)
    z = torch.randn(*shape, dtype=torch.float64, requires_grad=True)
    fn = lambda z, b, s: boft.rotate(z, b, s, 0.0, 0.7, channel_axis=channel_axis)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (z, blocks, rescale))
    r = boft.stage_matrices(blocks, 0.0, 0.7)
    ref = boft.butterfly_reference(z, r, rescale, channel_axis=channel_axis)
    torch.testing.assert_close(fn(z, blocks, rescale), ref, rtol=1e-12, atol=1e-12)
