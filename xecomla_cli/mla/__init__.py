"""Multi-head latent attention: the module, its latent cache and the model conversion."""

from .attention import MLAAttention
from .spec import MLASpec

__all__ = ["MLAAttention", "MLASpec"]
