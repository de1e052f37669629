"""LoKr (factor -1, lora_dim 16): fwd / bwd / fwd+bwd of lyfast vs lycoris vs the frozen base layer.

Parametrized by benchmarks/conftest.py; see `python -m pytest benchmarks/ --help` (lyfast benchmarks options).
"""
ALGO = "lokr"
SETTINGS = ("lokr-f-1-r16",)


def test_lokr(bench):
    bench()
