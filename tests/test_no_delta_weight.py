"""lyfast never materializes ΔW (or anything weight-sized) in training, and keeps little for backward.

1. A TorchDispatchMode records every tensor an aten op allocates during forward + backward of an adapted
   layer; none may have as many elements as the layer weight (out·in·∏k). Shapes are chosen so the layer's
   own activations are much smaller than its weight. Views / in-place results (sharing an input's storage)
   are not allocations and are skipped. A control test shows the probe catches LyCORIS, which builds ΔW.
2. saved_tensors_hooks: bytes saved for backward by the adapted layer minus what the frozen base layer saves
   alone (same input) is <= 1.5x the activation bytes (input for LoHa/LoKr, output for BOFT). Each distinct
   storage counts once; nn.Parameters and buffers of the modules are not counted.
"""

import copy

import pytest
import torch
import torch.nn as nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from conftest import fast_cls, freeze_, lyco_cls, randomize_

DTYPE = torch.float32


class AllocationRecorder(TorchDispatchMode):
    """Records (op, numel, shape) of every fresh tensor produced by an aten op."""

    def __init__(self):
        super().__init__()
        self.records = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        in_ptrs = set()
        for t in tree_flatten((args, kwargs))[0]:
            if isinstance(t, torch.Tensor):
                in_ptrs.add(t.untyped_storage().data_ptr())
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in in_ptrs:
                self.records.append((str(func), t.numel(), tuple(t.shape)))
        return out

    def largest(self):
        return max(self.records, key=lambda r: r[1]) if self.records else ("none", 0, ())


# ------------------------------------------------------------------------------------------ layers
def big_linear():
    return nn.Linear(256, 384), (4, 256)  # weight 98,304 elements; x 1,024, y 1,536


def big_conv():
    return nn.Conv2d(64, 64, 3, padding=1), (1, 64, 4, 4)  # weight 36,864; x/y 1,024


def big_conv_groups():
    return nn.Conv2d(64, 128, 3, padding=1, groups=2), (1, 64, 4, 4)  # weight 36,864; y 2,048


LAYERS = {"linear": big_linear, "conv": big_conv, "conv_groups2": big_conv_groups}

# (algo, extra kwargs, lyfast attributes to set) per case
CASES = [
    ("loha", dict(lora_dim=4, alpha=2), dict(route="khatri_rao")),
    ("loha", dict(lora_dim=4, alpha=2), dict(route="rowblock")),
    ("loha", dict(lora_dim=16, alpha=2), dict(route="auto")),
    ("loha", dict(lora_dim=4, alpha=2, use_scalar=True), dict(route="auto")),
    ("lokr", dict(lora_dim=4, alpha=2), {}),
    ("lokr", dict(lora_dim=2, alpha=2, decompose_both=True, factor=8), {}),
    ("lokr", dict(lora_dim=64, alpha=2), {}),  # both full
    ("boft", dict(lora_dim=8), {}),  # 384 -> blocks of 6, 64 / 128 -> blocks of 8
    ("boft", dict(lora_dim=6, constraint=0.01, rescaled=True), {}),  # 384 -> 6, 64 / 128 -> 4
]
CONV_ONLY = [
    ("loha", dict(lora_dim=3, alpha=2, use_tucker=True), dict(route="khatri_rao")),
    ("loha", dict(lora_dim=3, alpha=2, use_tucker=True), dict(route="rowblock")),
    ("lokr", dict(lora_dim=2, alpha=2, use_tucker=True), {}),
]


def case_id(c):
    algo, kw, attrs = c
    return "-".join([algo] + [f"{k}={v}" for k, v in {**kw, **attrs}.items()])


def build(algo, layer_kind, kw, attrs, bypass, multiplier=0.8, use_lyco=False):
    torch.manual_seed(0)
    make, xshape = LAYERS[layer_kind]()
    layer = freeze_(make.to(DTYPE))
    cls = lyco_cls(algo) if use_lyco else fast_cls(algo)
    mod = cls("lycoris_probe", layer, multiplier, bypass_mode=bypass, **kw).to(DTYPE)
    randomize_(mod, seed=3)
    for k, v in attrs.items():
        setattr(mod, k, v)
    mod.apply_to()
    x = torch.randn(*xshape, dtype=DTYPE, requires_grad=True)
    return layer, mod, x


def record_fwd_bwd(layer, x):
    rec = AllocationRecorder()
    with rec:
        out = layer(x)
        out.backward(torch.ones_like(out))
    return rec


def _check_no_weight_sized(layer, mod, x):
    w_numel = layer.weight.numel()
    rec = record_fwd_bwd(layer, x)
    big = [r for r in rec.records if r[1] >= w_numel]
    assert not big, (
        f"{len(big)} tensor(s) with >= weight numel ({w_numel}) produced in forward+backward, e.g. "
        f"{big[:4]}; largest {rec.largest()}"
    )
    # the backward really ran through the adapter
    assert all(p.grad is not None for p in mod.parameters())


@pytest.mark.parametrize("bypass", [False, True], ids=["rebuild", "bypass"])
@pytest.mark.parametrize("layer_kind", ["linear", "conv"])
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_no_weight_sized_tensor(case, layer_kind, bypass):
    algo, kw, attrs = case
    if algo == "lokr" and kw.get("lora_dim") == 64 and layer_kind == "conv":
        kw = dict(kw, lora_dim=16)
    layer, mod, x = build(algo, layer_kind, kw, attrs, bypass)
    # make sure the probe's premise holds: activations are much smaller than the weight
    assert x.numel() * 8 <= layer.weight.numel()
    _check_no_weight_sized(layer, mod, x)


@pytest.mark.parametrize("bypass", [False, True], ids=["rebuild", "bypass"])
@pytest.mark.parametrize("case", CONV_ONLY + [CASES[0], CASES[1], CASES[4], CASES[7], CASES[8]], ids=case_id)
def test_no_weight_sized_tensor_conv_extra(case, bypass):
    """Tucker convs and grouped convs."""
    algo, kw, attrs = case
    for kind in ("conv", "conv_groups2"):
        layer, mod, x = build(algo, kind, kw, attrs, bypass)
        _check_no_weight_sized(layer, mod, x)


@pytest.mark.parametrize("algo", ["loha", "lokr"])
def test_probe_catches_lycoris_rebuild(algo):
    """Control: LyCORIS's eager rebuild forward does build ΔW, and the recorder sees it."""
    layer, mod, x = build(algo, "linear", dict(lora_dim=4, alpha=2), {}, bypass=False, use_lyco=True)
    rec = record_fwd_bwd(layer, x)
    assert rec.largest()[1] >= layer.weight.numel()


# ------------------------------------------------------------------------------------------ saved tensors
def saved_bytes(layer, modules, x):
    """Bytes of distinct storages saved for backward during layer(x), parameters/buffers excluded."""
    exclude = set()
    for m in modules:
        for t in list(m.parameters()) + list(m.buffers()):
            exclude.add(t.untyped_storage().data_ptr())
    seen, keep = {}, []

    def pack(t):
        st = t.untyped_storage()
        if st.data_ptr() not in exclude and st.nbytes() > 0:
            seen[st.data_ptr()] = st.nbytes()
        keep.append(t)  # keep storages alive so pointers are not reused during the measurement
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = layer(x)
    return sum(seen.values()), out, keep


SAVED_LAYERS = {
    "linear": (lambda: nn.Linear(256, 384), (2, 256, 256)),  # 512 tokens
    "conv": (lambda: nn.Conv2d(64, 64, 3, padding=1), (2, 64, 16, 16)),
    "conv_groups2": (lambda: nn.Conv2d(64, 128, 3, padding=1, groups=2), (2, 64, 16, 16)),
}


@pytest.mark.parametrize("bypass", [False, True], ids=["rebuild", "bypass"])
@pytest.mark.parametrize("layer_kind", list(SAVED_LAYERS))
@pytest.mark.parametrize("case", CASES + CONV_ONLY, ids=case_id)
def test_saved_for_backward(case, layer_kind, bypass):
    algo, kw, attrs = case
    if kw.get("use_tucker") and layer_kind == "linear":
        pytest.skip("Tucker needs a k>1 conv")
    if algo == "lokr" and kw.get("lora_dim") == 64 and layer_kind != "linear":
        kw = dict(kw, lora_dim=16)
    torch.manual_seed(0)
    make, xshape = SAVED_LAYERS[layer_kind]
    base = freeze_(make().to(DTYPE))
    layer = copy.deepcopy(base)
    mod = fast_cls(algo)("lycoris_probe", layer, 0.8, bypass_mode=bypass, **kw).to(DTYPE)
    randomize_(mod, seed=3)
    for k, v in attrs.items():
        setattr(mod, k, v)
    mod.apply_to()
    x = torch.randn(*xshape, dtype=DTYPE, requires_grad=True)

    base_bytes, base_out, _k1 = saved_bytes(base, [base], x)
    adapted_bytes, out, _k2 = saved_bytes(layer, [layer, mod], x)
    act = (out if algo == "boft" else x).numel() * x.element_size()
    extra = adapted_bytes - base_bytes
    assert extra <= 1.5 * act, (
        f"adapted layer saves {adapted_bytes} B, base alone {base_bytes} B: extra {extra} B = "
        f"{extra / act:.2f}x the {'output' if algo == 'boft' else 'input'} activation ({act} B); limit 1.5x"
    )
    # sanity: backward still works after the measurement
    out.sum().backward()
    assert all(p.grad is not None for p in mod.parameters())


def test_saved_probe_catches_lycoris_boft():
    """Control: LyCORIS's BOFT bypass keeps one activation per butterfly stage (> 1.5x the output)."""
    torch.manual_seed(0)
    make, xshape = SAVED_LAYERS["linear"]
    base = freeze_(make().to(DTYPE))
    layer = copy.deepcopy(base)
    mod = lyco_cls("boft")("p", layer, 1.0, bypass_mode=True, lora_dim=8).to(DTYPE)
    randomize_(mod)
    mod.apply_to()
    x = torch.randn(*xshape, dtype=DTYPE, requires_grad=True)
    base_bytes, _, _k1 = saved_bytes(base, [base], x)
    adapted_bytes, out, _k2 = saved_bytes(layer, [layer, mod], x)
    assert adapted_bytes - base_bytes > 1.5 * out.numel() * out.element_size()
