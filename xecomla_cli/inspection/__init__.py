"""The `inspect` stage: what a source is, what its KV cache costs, and how much of each layer's K/V
a latent of each rank keeps (``report.py``; ``tables.py`` renders it), read one layer at a time from the
weights on disk (``on_disk.py``)."""

from .on_disk import inspect_source
from .report import inspect

__all__ = ["inspect", "inspect_source"]
