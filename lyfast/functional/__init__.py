"""Stateless math, one file per algorithm: the pure-PyTorch reference, the autograd Functions and the
public op (`delta_forward` for LoHa/LoKr, `rotate` for BOFT)."""
from . import boft, general, loha, lokr
from .general import factorization, power2factorization

__all__ = ["boft", "general", "loha", "lokr", "factorization", "power2factorization"]
