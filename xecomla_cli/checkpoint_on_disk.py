"""A stage checkpoint opened without loading its weights: what the streamed stages (inspect, export) read
instead of a whole model (``checkpoint.load_checkpoint``).

The config, the spec and xecomla.json are read at once; tensors are read from the safetensors files
(``weights_on_disk.WeightsOnDisk``) when asked for; ``layer(i)`` builds decoder layer i alone, with its weights,
from an architecture held on the meta device (no memory):

    ckpt = open_checkpoint(directory)
    ckpt.config, ckpt.spec, ckpt.meta, ckpt.family          # read once, no weights
    ckpt.tensor("model.embed_tokens.weight")                 # one tensor, fp32 (as load_checkpoint gives it)
    layer = ckpt.layer(3)                                    # LlamaDecoderLayer (MLA attention), fp32, cpu
"""

from __future__ import annotations

import copy
from functools import cached_property
from pathlib import Path

import torch

from .checkpoint import CheckpointInfo, read_checkpoint_info
from .errors import XecomlaError
from .loaded import ResolvedSource, check_family, first_line, load_hf_config
from .weights_on_disk import WeightsOnDisk


class CheckpointOnDisk:
    """A stage checkpoint whose tensors stay on disk until read, one at a time or one decoder layer at a time."""

    def __init__(self, ckpt_dir: str | Path, info: CheckpointInfo | None = None):
        self.directory = Path(ckpt_dir).resolve()
        self.info = info or read_checkpoint_info(self.directory)
        self.config = load_hf_config(self.directory, f"checkpoint '{self.directory}'")
        self.family = check_family(self.config)
        self.weights = WeightsOnDisk(self.directory, f"checkpoint '{self.directory}'")
        self.resolved = ResolvedSource(str(self.directory), self.directory, is_checkpoint=True)

    @property
    def spec(self):
        return self.info.spec

    @property
    def meta(self) -> dict:
        return self.info.meta

    @property
    def source(self) -> str:
        return self.info.source

    @property
    def num_layers(self) -> int:
        return int(self.config.num_hidden_layers)

    @property
    def tied(self) -> bool:
        return bool(getattr(self.config, "tie_word_embeddings", False))

    @cached_property
    def tokenizer(self):
        from transformers import AutoTokenizer

        try:
            return AutoTokenizer.from_pretrained(self.directory, trust_remote_code=False)
        except (OSError, ValueError) as exc:
            raise XecomlaError(
                f"checkpoint '{self.directory}' has no usable tokenizer ({first_line(exc)}): re-run the stage"
            ) from None

    @cached_property
    def skeleton(self):
        """The checkpoint's architecture (MLA layers rebuilt from the spec) on the meta device: names, shapes,
        module types, no memory."""
        from .checkpoint import build_model

        with torch.device("meta"):
            return build_model(self.config, self.spec, torch.float32)

    @cached_property
    def _shapes(self) -> dict[str, tuple[int, ...]]:
        return {name: tuple(t.shape) for name, t in self.skeleton.state_dict().items()}

    def names(self) -> list[str]:
        """Every tensor the architecture has, in its state_dict order (lm_head included when tied)."""
        return list(self._shapes)

    def shape(self, name: str) -> tuple[int, ...]:
        """A tensor's shape, from the architecture (nothing is read)."""
        return self._shapes[name]

    def parameters(self) -> int:
        """The number of values stored (a tied embedding once), from the safetensors headers."""
        return sum(self.weights.numel(name) for name in self.weights.names)

    def rope(self, i: int) -> tuple[torch.Tensor, float]:
        """Layer i's RoPE frequencies (fp32) and attention scaling, without building the layer."""
        inv_freq = self.tensor(f"model.layers.{i}.self_attn.rope_inv_freq")
        return inv_freq, float(self.spec.rope_attention_scaling)

    def tensor(self, name: str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """One tensor in ``dtype`` (fp32: what load_checkpoint's model holds); a tied lm_head reads the embedding."""
        if name == "lm_head.weight" and self.tied and name not in self.weights:
            name = "model.embed_tokens.weight"
        return self.weights.get(name).to(dtype)

    def layer(self, i: int, dtype: torch.dtype = torch.float32):
        """Decoder layer i alone, built from the meta architecture and filled from disk (eval mode, cpu)."""
        if not 0 <= i < self.num_layers:
            raise XecomlaError(f"checkpoint '{self.directory}' has no layer {i}: it has {self.num_layers}")
        layer = copy.deepcopy(self.skeleton.model.layers[i])
        for module in layer.modules():  # MLAAttention keeps its RoPE frequencies across moves: give it real ones
            inv_freq = module._buffers.get("rope_inv_freq")
            if inv_freq is not None and inv_freq.is_meta:
                module._buffers["rope_inv_freq"] = torch.zeros(inv_freq.shape, dtype=torch.float32)
        layer = layer.to_empty(device="cpu").to(dtype)
        prefix = f"model.layers.{i}."
        state = {name[len(prefix) :]: t for name, t in self.weights.with_prefix(prefix).items()}
        missing, unexpected = layer.load_state_dict(state, strict=False)
        if missing or unexpected:
            shown = ", ".join(prefix + n for n in (list(unexpected) + list(missing))[:3])
            raise XecomlaError(
                f"checkpoint '{self.directory}' weights do not match its xecomla.json spec ({shown}): re-run the stage"
            )
        return layer.eval()


def open_checkpoint(ckpt_dir: str | Path, info: CheckpointInfo | None = None) -> CheckpointOnDisk:
    """A stage checkpoint with its config and spec read, its weights left on disk (``CheckpointOnDisk``)."""
    return CheckpointOnDisk(ckpt_dir, info)
