"""What an export reads of a model, one tensor or one decoder layer at a time: a checkpoint on disk
(``checkpoint_on_disk.CheckpointOnDisk``, the streamed export: memory of one layer) or a model already in memory
(``InMemory``, a ``LoadedModel``: the tests' reference and callers holding one). Both answer:

    view.config, view.spec, view.tokenizer, view.num_layers, view.tied
    view.names()            every tensor name of the architecture (state_dict order)
    view.shape(name)        without reading it
    view.tensor(name)       fp32, cpu
    view.layer(i)           decoder layer i with its weights (fp32)
    view.rope(i)            layer i's RoPE (inv_freq, attention scaling), without building the layer
    view.parameters()       the number of weights (a tied embedding once)
"""

from __future__ import annotations

import torch

from ..checkpoint_on_disk import CheckpointOnDisk
from ..mla.rebuild import decoder_layers


class InMemory:
    """A ``LoadedModel`` read as the export reads a checkpoint on disk."""

    def __init__(self, loaded):
        self.loaded = loaded
        self.config, self.spec, self.tokenizer = loaded.config, loaded.spec, loaded.tokenizer
        self.source, self.family, self.meta = loaded.source, loaded.family, loaded.meta
        self.num_layers = int(self.config.num_hidden_layers)
        self.tied = bool(getattr(self.config, "tie_word_embeddings", False))
        self._state = loaded.model.state_dict()

    def names(self) -> list[str]:
        return list(self._state)

    def parameters(self) -> int:
        return sum(p.numel() for p in self.loaded.model.parameters())

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._state[name].shape)

    def tensor(self, name: str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return self._state[name].detach().float().cpu().to(dtype)

    def layer(self, i: int):
        return decoder_layers(self.loaded.model)[i]

    def rope(self, i: int) -> tuple[torch.Tensor, float]:
        attn = decoder_layers(self.loaded.model)[i].self_attn
        return attn.rope_inv_freq.float().cpu(), float(attn.rope_attention_scaling)


def model_view(src):
    """``src`` as a view: a CheckpointOnDisk as it is, a LoadedModel wrapped in ``InMemory``."""
    if isinstance(src, CheckpointOnDisk | InMemory):
        return src
    return InMemory(src)
