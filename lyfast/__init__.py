"""lyfast: LyCORIS LoHa, LoKr and butterfly-OFT adapters whose training never materializes ΔW."""
from .accelerate import accelerate
from .backend import get_backend, set_backend
from .modules import ButterflyOFTModule, LohaModule, LokrModule
from .network import LycorisNetwork, create_lycoris, create_lycoris_from_weights

__version__ = "0.1.0"
__all__ = [
    "LohaModule",
    "LokrModule",
    "ButterflyOFTModule",
    "LycorisNetwork",
    "create_lycoris",
    "create_lycoris_from_weights",
    "accelerate",
    "get_backend",
    "set_backend",
    "__version__",
]
