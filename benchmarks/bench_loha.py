"""LoHa (rank 8 and 16): fwd / bwd / fwd+bwd of lyfast vs lycoris vs the frozen base layer.

Parametrized by benchmarks/conftest.py; see `python -m pytest benchmarks/ --help` (lyfast benchmarks options).
"""
ALGO = "loha"
SETTINGS = ("loha-r8", "loha-r16")


def test_loha(bench):
    bench()
