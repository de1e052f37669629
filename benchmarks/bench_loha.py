"""LoHa (rank 8, 16 and 32): fwd / bwd / fwd+bwd of lyfast vs lycoris vs HF PEFT vs the
frozen base layer.

Parametrized by benchmarks/conftest.py; see `python -m pytest benchmarks/ --help` (lyfast benchmarks options).
"""
ALGO = "loha"
SETTINGS = ("loha-r8", "loha-r16", "loha-r32")


def test_loha(bench):
    bench()
