"""lyfast: LyCORIS LoHa, LoKr and butterfly-OFT adapters whose training never materializes ΔW."""
from .modules import ButterflyOFTModule, LohaModule, LokrModule

__version__ = "0.1.0"
__all__ = ["LohaModule", "LokrModule", "ButterflyOFTModule", "__version__"]
from .network import LycorisNetwork, create_lycoris, create_lycoris_from_weights  # noqa: E402
from .accelerate import accelerate  # noqa: E402
from .backend import get_backend, set_backend  # noqa: E402
