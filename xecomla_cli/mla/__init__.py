"""Multi-head latent attention: the module, its latent cache and rebuilding a model's attention from a spec."""

from .attention import MLAAttention
from .spec import MLASpec

__all__ = ["MLAAttention", "MLASpec"]
