"""Per-layer memory of an adapter for the benchmark shapes; the measuring itself is `lyfast.profile`'s.

`layer_memory` returns, for one adapted layer and one forward+backward: `saved` (bytes autograd keeps for
backward beyond the frozen base layer alone; each storage once, parameters excluded), `transient` (the
largest tensor created), `peak` (CUDA only: peak allocated bytes beyond the base layer's step) and `act`
(max(input, output) bytes), all in bytes, plus the same figures as multiples of `act`.
"""
from __future__ import annotations

import torch

from lyfast.peers import make_input
from lyfast.profile import StepMemory, adapter_memory, step_memory

from .shapes import Shape


def base_memory(shape: Shape, device="cpu", dtype=torch.float32, quant_base="bf16") -> StepMemory:
    """The frozen layer alone."""
    layer = shape.layer(device, dtype, quant_base=quant_base)
    return step_memory(layer, make_input(layer, shape.input))


def layer_memory(shape: Shape, provider: str, setting: str | None, device="cpu", dtype=torch.float32,
                 base: StepMemory | None = None, quant_base="bf16") -> dict:
    """Memory figures of `provider`/`setting` on `shape`; `base` = `base_memory(shape)` if already known."""
    if provider == "base":
        m = base or base_memory(shape, device, dtype, quant_base)
    else:   # the backend (lyfast-triton, lycoris-fused) is pinned by the caller; a fresh layer, adapted in place
        base = base or base_memory(shape, device, dtype, quant_base)
        m = adapter_memory(shape.layer(device, dtype, quant_base=quant_base), shape.input, provider, setting, base,
                           copy_layer=False)
    return {"saved": m.saved, "transient": m.transient, "transient_op": m.transient_op, "peak": m.peak,
            "act": m.act, "saved_act": m.saved / m.act, "transient_act": m.transient / m.act}
