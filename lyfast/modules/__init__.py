"""LyCORIS-compatible adapter modules (same constructor, parameters and file format as lycoris-lora 4.1.3)."""
from .boft import ButterflyOFTModule
from .loha import LohaModule
from .lokr import LokrModule

__all__ = ["LohaModule", "LokrModule", "ButterflyOFTModule"]
