"""MLA decode kernels: the Triton split-KV kernel, its PyTorch references, and the dispatcher the model calls.

    mla_decode_auto(q_lat, q_rope, kv, k_rope, seq_lens, sm_scale, *,
                    block_table=None, num_splits=None, return_lse=False) -> out | (out, lse)

Same arguments and result as :func:`xecomla_cli.kernels.mla_decode.mla_decode` (see its module
docstring for shapes). It runs the Triton kernel on CUDA tensors when Triton is installed and the
fp32 PyTorch reference otherwise; ``XECOMLA_DECODE_KERNEL=triton|reference`` forces either
(``triton`` on CPU tensors runs the Triton interpreter, which is slow).
"""

from __future__ import annotations

import importlib.util
import os

import torch

from .reference import mla_decode_einsum, mla_decode_reference

ENV_VAR = "XECOMLA_DECODE_KERNEL"

__all__ = ["mla_decode_auto", "mla_decode_reference", "mla_decode_einsum", "decode_backend", "ENV_VAR"]


def decode_backend(device: torch.device) -> str:
    """'triton' or 'reference': the implementation mla_decode_auto uses for tensors on `device`."""
    forced = os.environ.get(ENV_VAR, "").strip().lower()
    if forced in ("triton", "reference"):
        return forced
    if forced:
        raise ValueError(f"{ENV_VAR}={forced!r}: use 'triton' or 'reference' (or leave it unset)")
    has_triton = importlib.util.find_spec("triton") is not None
    return "triton" if device.type == "cuda" and has_triton else "reference"


def mla_decode_auto(
    q_lat: torch.Tensor,
    q_rope: torch.Tensor,
    kv: torch.Tensor,
    k_rope: torch.Tensor,
    seq_lens: torch.Tensor,
    sm_scale: float,
    *,
    block_table: torch.Tensor | None = None,
    num_splits: int | None = None,
    return_lse: bool = False,
):
    """Absorbed MLA decode on the best backend for q_lat's device: out [B, H, r] (and lse [B, H])."""
    if decode_backend(q_lat.device) == "triton":
        from .mla_decode import mla_decode as impl
    else:
        impl = mla_decode_reference
    return impl(q_lat, q_rope, kv, k_rope, seq_lens, sm_scale,
                block_table=block_table, num_splits=num_splits, return_lse=return_lse)
