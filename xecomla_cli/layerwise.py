"""A batch of token ids pushed through a decoder one layer at a time, for the layer-wise steps
(calibration statistics in ``init``, local distillation in ``distill``).

``LayerRunner`` embeds the batch once and keeps, per chunk of sequences, the hidden states h
entering the next layer with what every layer needs besides them (positions, causal mask, RoPE
cos/sin). ``walk`` visits the listed layers in order, running every layer before each one on the
hidden states, so a layer can be changed (converted, trained) before the next layer's inputs are
computed. ``attention_on`` runs one attention module on one chunk.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch

from .mla.rebuild import decoder_layers

MICRO_BATCH = 4  # sequences per chunk


@dataclass
class Chunk:
    """A few sequences of the batch, as they enter the next layer."""

    h: torch.Tensor  # (B, T, d) hidden states
    pos: torch.Tensor  # (B, T) position ids
    mask: torch.Tensor | None  # the model's causal mask for these inputs (None: the attention's own)
    emb: tuple[torch.Tensor, torch.Tensor]  # RoPE (cos, sin), each (B, T, head_dim)


class LayerRunner:
    """The batch's hidden states, pushed through the decoder one layer at a time."""

    def __init__(self, model, input_ids: torch.Tensor, micro_batch: int = MICRO_BATCH):
        inner = model.model
        device = next(model.parameters()).device
        self._embed(
            model.config, inner.embed_tokens, inner.rotary_emb, decoder_layers(model), input_ids, device, micro_batch
        )
        self.model = model

    @classmethod
    def from_parts(
        cls, config, embed, rotary_emb, layers, input_ids: torch.Tensor, device, micro_batch: int = MICRO_BATCH
    ) -> LayerRunner:
        """A runner over a decoder held in parts (``init.layer_source``: one layer materialised at a time):
        ``embed(ids)`` -> (B, T, d), the model's rotary embedding, and the layers (indexed when run)."""
        runner = cls.__new__(cls)
        runner._embed(config, embed, rotary_emb, layers, input_ids, device, micro_batch)
        runner.model = None
        return runner

    def _embed(self, config, embed, rotary_emb, layers, input_ids: torch.Tensor, device, micro_batch: int) -> None:
        from transformers.masking_utils import create_causal_mask

        ids = input_ids.to(device)
        self.layers = layers
        self.chunks: list[Chunk] = []
        with torch.no_grad():
            for b in range(0, ids.shape[0], micro_batch):
                part = ids[b : b + micro_batch]
                h = embed(part)
                pos = torch.arange(part.shape[1], device=device).unsqueeze(0).expand(part.shape[0], -1)
                mask = create_causal_mask(
                    config=config, inputs_embeds=h, attention_mask=None, past_key_values=None, position_ids=pos
                )
                self.chunks.append(Chunk(h, pos, mask, rotary_emb(h, position_ids=pos)))
        self.tokens = int(ids.numel())

    @torch.no_grad()
    def attention_inputs(self, i: int) -> list[torch.Tensor]:
        """Layer i's attention inputs per chunk (B, T, d), kept in fp16 (half the memory)."""
        layer = self.layers[i]
        return [layer.input_layernorm(c.h).half() for c in self.chunks]

    @torch.no_grad()
    def advance(self, i: int) -> None:
        """Run layer i (whatever its attention is now) on the hidden states."""
        layer = self.layers[i]
        for c in self.chunks:
            c.h = layer(c.h, attention_mask=c.mask, position_ids=c.pos, position_embeddings=c.emb)


def walk(runners: list[LayerRunner], layers: list[int]) -> Iterator[int]:
    """Each of ``layers`` in order, with every runner's hidden states entering that layer.

    The runners advance past a layer after the caller's body for it (so the body may replace the
    layer's attention first) and every layer in between; never past the last listed layer."""
    last = max(layers)
    for i in range(last + 1):
        if i in layers:
            yield i
        if i < last:
            for runner in runners:
                runner.advance(i)


def attention_on(attn, x: torch.Tensor, chunk: Chunk) -> torch.Tensor:
    """attn(x) for attention inputs x (B, T, d) of one chunk: (B, T, d)."""
    out, _ = attn(hidden_states=x, position_embeddings=chunk.emb, attention_mask=chunk.mask, position_ids=chunk.pos)
    return out
