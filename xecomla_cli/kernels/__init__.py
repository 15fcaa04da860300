"""Absorbed MLA decode: the one dispatcher the model calls, and the backends it chooses from.

    mla_decode_auto(q_lat, q_rope, kv, k_rope, seq_lens, sm_scale, *,
                    mask=None, block_table=None, num_splits=None, return_lse=False) -> out | (out, lse)

Shapes and meaning in ``reference.py``. Backends (``decode_backend``):

- ``triton``: the split-KV Triton kernel (``mla_decode.py``), for CUDA tensors when Triton is installed;
- ``torch``: two batched GEMMs over the shared latent (``torch_decode.py``), everywhere else;
- ``reference``: the exact fp32 PyTorch reference (``reference.py``), only when asked for.

``XECOMLA_DECODE_KERNEL=triton|torch|reference`` forces one (``triton`` on CPU tensors runs the
Triton interpreter, which is slow: for tests).
"""

from __future__ import annotations

import importlib.util
import os

import torch

from .reference import mla_decode_reference
from .torch_decode import mla_decode_torch

ENV_VAR = "XECOMLA_DECODE_KERNEL"
BACKENDS = ("triton", "torch", "reference")
HAS_TRITON = importlib.util.find_spec("triton") is not None

__all__ = ["mla_decode_auto", "mla_decode_reference", "mla_decode_torch", "decode_backend", "ENV_VAR", "BACKENDS"]


def decode_backend(device: torch.device) -> str:
    """'triton', 'torch' or 'reference': the implementation mla_decode_auto uses for tensors on `device`."""
    forced = os.environ.get(ENV_VAR, "").strip().lower()
    if forced in BACKENDS:
        return forced
    if forced:
        raise ValueError(f"{ENV_VAR}={forced!r}: use one of {', '.join(BACKENDS)} (or leave it unset)")
    return "triton" if device.type == "cuda" and HAS_TRITON else "torch"


def mla_decode_auto(q_lat: torch.Tensor, *args, **kwargs):
    """Absorbed MLA decode on the backend for q_lat's device: out [B, H, r] (and lse [B, H] fp32).

    The arguments are every backend's, passed on unchanged (their one description: ``reference.py``)."""
    backend = decode_backend(q_lat.device)
    if backend == "triton":
        from .mla_decode import mla_decode as impl
    elif backend == "torch":
        impl = mla_decode_torch
    else:
        impl = mla_decode_reference
    return impl(q_lat, *args, **kwargs)
