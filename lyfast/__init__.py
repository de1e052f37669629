"""lyfast: LyCORIS LoHa, LoKr and butterfly-OFT adapters whose training never materializes ΔW."""
from .modules import ButterflyOFTModule, LohaModule, LokrModule

__version__ = "0.1.0"
__all__ = ["LohaModule", "LokrModule", "ButterflyOFTModule", "__version__"]
