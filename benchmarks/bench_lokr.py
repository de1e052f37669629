"""LoKr (factor -1 lora_dim 16; full matrix, factor 4, 8, 16, alpha 1): fwd / bwd / fwd+bwd of lyfast vs
lycoris (rebuild and bypass mode) vs HF PEFT vs the frozen base layer.

Parametrized by benchmarks/conftest.py; see `python -m pytest benchmarks/ --help` (lyfast benchmarks options).
"""
ALGO = "lokr"
SETTINGS = ("lokr-f-1-r16", "lokr-full-f4", "lokr-full-f8", "lokr-full-f16")


def test_lokr(bench):
    bench()
