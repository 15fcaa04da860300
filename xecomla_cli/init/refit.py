"""The output refit (``refit`` in ``init.methods``): after a layer is converted, its MLA's output
projection is refitted so that the layer reproduces the original attention output on the
calibration inputs."""

from __future__ import annotations

import torch

from ..layerwise import Chunk, attention_on
from ..threads import single_thread


def attention_head_outputs(attn, x: torch.Tensor, chunk: Chunk) -> torch.Tensor:
    """The input of ``attn.o_proj`` (N, H·h) for attention inputs x (B, T, d): the heads' outputs."""
    seen = []
    handle = attn.o_proj.register_forward_pre_hook(lambda mod, args: seen.append(args[0]))
    try:
        attention_on(attn, x, chunk)
    finally:
        handle.remove()
    return seen[0].reshape(-1, seen[0].shape[-1]).double()


@torch.no_grad()
def refit_output(old, new, inputs: list[torch.Tensor], chunks: list[Chunk], ridge: float = 1e-3) -> None:
    """Refit the MLA's output projection so that it reproduces the original attention output:

        W_o' = argmin Σ_x ||W_o' y'(x) − W_o y(x)||² + λ||W_o' − W_o||²
             = W_o (Σ y y'ᵀ + λI)(Σ y' y'ᵀ + λI)^{-1},   λ = ridge · tr(Σ y' y'ᵀ)/(H·h)

    with y, y' the original and MLA heads' outputs (before o_proj) on the calibration inputs. It
    absorbs what the latent and the shared RoPE key change systematically (e.g. a shrunken V).
    """
    A = B = None
    for x, chunk in zip(inputs, chunks, strict=True):
        x = x.to(device=new.o_proj.weight.device, dtype=new.o_proj.weight.dtype)
        y = attention_head_outputs(old, x, chunk)
        y2 = attention_head_outputs(new, x, chunk)
        A = y.T @ y2 if A is None else A + y.T @ y2
        B = y2.T @ y2 if B is None else B + y2.T @ y2
    eye = torch.eye(B.shape[0], dtype=B.dtype)
    lam = ridge * torch.trace(B) / B.shape[0]
    wo = new.o_proj.weight.double()
    with single_thread():
        w_new = torch.linalg.solve(B + lam * eye, (wo @ (A + lam * eye)).T).T  # B, λI symmetric
    new.o_proj.weight.copy_(w_new.to(new.o_proj.weight.dtype))
