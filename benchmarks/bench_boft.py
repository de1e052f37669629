"""butterfly OFT (lora_dim 32 = max block size): fwd / bwd / fwd+bwd of lyfast vs lycoris vs
HF PEFT (its BOFT: the same butterfly on the input side) vs the frozen base layer.

Parametrized by benchmarks/conftest.py; see `python -m pytest benchmarks/ --help` (lyfast benchmarks options).
"""
ALGO = "boft"
SETTINGS = ("boft-b32",)


def test_boft(bench):
    bench()
