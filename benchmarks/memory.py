"""Per-layer memory of an adapter for the benchmark shapes; the measuring itself is `lyfast.profile`'s.

`layer_memory` returns, for one adapted layer and one forward+backward: `saved` (bytes autograd keeps for
backward beyond the frozen base layer alone; each storage once, parameters excluded), `transient` (the
largest tensor created), `peak` (CUDA only: peak allocated bytes beyond the base layer's step) and `act`
(max(input, output) bytes), all in bytes, plus the same figures as multiples of `act`.
"""
from __future__ import annotations

import torch

from lyfast.profile import adapter_memory, make_input, step_memory

from .shapes import Shape


def layer_memory(shape: Shape, provider: str, setting: str | None, device="cpu",
                 dtype=torch.float32) -> dict:
    layer = shape.layer(device, dtype)
    if provider == "base":
        m = step_memory(layer, make_input(layer, shape.input))
    else:
        m = adapter_memory(layer, shape.input, provider.split("-")[0], setting)  # lyfast-triton -> lyfast
    return {"saved": m.saved, "transient": m.transient, "transient_op": m.transient_op, "peak": m.peak,
            "act": m.act, "saved_act": m.saved / m.act, "transient_act": m.transient / m.act}
