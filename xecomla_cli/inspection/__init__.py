"""The `inspect` stage: what a source is, what its KV cache costs, and how much of each layer's K/V
a latent of each rank keeps (``report.py``; ``tables.py`` renders it)."""

from .report import inspect

__all__ = ["inspect"]
