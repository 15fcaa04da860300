"""An original model read from its safetensors directory one decoder layer at a time (the streamed
init-svd, ``init.streamed``).

A skeleton of the whole model is built on the ``meta`` device (no memory); ``materialise(i)`` puts
decoder layer i's weights, read from disk (``weights_on_disk``), into it in fp32 on the device (the
math of the conversion is fp32 whatever the file holds), ``release(i)`` puts the empty layer back.
Reading bf16 weights into fp32 is exact, so a layer holds the same values as the layer of a model
loaded whole in fp32. The embedding is read once to embed the calibration tokens; the final norm and
the output head only for TransMLA's fold search (``lm_logits``). Nothing else is ever read as a whole.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator

import torch

from ..weights_on_disk import WeightsOnDisk

LM_HEAD_ROWS = 32768  # output-head rows in fp32 at once (the fold search's loss over a large vocabulary)


def meta_model(config):
    """The model of this config on the meta device: names, shapes and modules, no memory."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(copy.deepcopy(config), dtype=torch.float32)


class SourceModel:
    """A model on disk, one decoder layer in memory at a time (see the module docstring)."""

    def __init__(self, weights: WeightsOnDisk, config, device: torch.device | str = "cpu"):
        self.weights = weights
        self.skeleton = meta_model(config)
        self.config = self.skeleton.config  # with the attention implementation transformers chose
        self.device = torch.device(device)
        self.layers = self.skeleton.model.layers  # entry i: materialised or on meta
        self._empty = {}

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def tied(self) -> bool:
        return bool(getattr(self.config, "tie_word_embeddings", False))

    def read(self, name: str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """One source tensor in ``dtype`` on the device."""
        return self.weights.get(name).to(device=self.device, dtype=dtype)

    def _module_state(self, module, prefix: str) -> dict[str, torch.Tensor]:
        return {n: self.read(prefix + n) for n in module.state_dict()}

    def materialise(self, i: int, attention_only: bool = False):
        """Decoder layer i (or its attention only), fp32 on the device, in place in ``layers``."""
        empty = self.layers[i]
        self._empty.setdefault(i, empty)
        layer = copy.deepcopy(self._empty[i])
        if attention_only:
            attn = layer.self_attn
            attn.load_state_dict(self._module_state(attn, f"model.layers.{i}.self_attn."), assign=True)
        else:
            layer.load_state_dict(self._module_state(layer, f"model.layers.{i}."), assign=True)
        self.layers[i] = layer
        return layer

    def release(self, i: int) -> None:
        """Drop decoder layer i's weights (the meta layer goes back)."""
        if i in self._empty:
            self.layers[i] = self._empty[i]

    def rotary_emb(self):
        """The model's rotary embedding module (its frequencies computed as transformers does)."""
        return type(self.skeleton.model.rotary_emb)(config=self.config).to(self.device)

    def embedder(self):
        """``embed(ids)`` -> (B, T, d) fp32, as the model's embedding would give (the table read once)."""
        table = self.weights.get("model.embed_tokens.weight")

        def embed(ids: torch.Tensor) -> torch.Tensor:
            return table[ids.cpu()].to(device=self.device, dtype=torch.float32)

        return embed

    def final_norm(self):
        norm = copy.deepcopy(self.skeleton.model.norm)
        norm.load_state_dict(self._module_state(norm, "model.norm."), assign=True)
        return norm

    def lm_head_name(self) -> str:
        return "model.embed_tokens.weight" if self.tied or "lm_head.weight" not in self.weights else "lm_head.weight"

    def lm_head_rows(self) -> Iterator[torch.Tensor]:
        """The output head's rows in fp32, ``LM_HEAD_ROWS`` at a time (all at once for a small vocabulary)."""
        name = self.lm_head_name()
        V = self.weights.shape(name)[0]
        if V <= LM_HEAD_ROWS:
            yield self.read(name)
            return
        for a in range(0, V, LM_HEAD_ROWS):
            yield self.weights.rows(name, a, min(a + LM_HEAD_ROWS, V)).to(device=self.device, dtype=torch.float32)
