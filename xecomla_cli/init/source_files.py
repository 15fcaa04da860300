"""What the streamed init-svd reads of a source besides its layers: the config (first, and alone: every
refusal the config decides comes before any weight is read), the safetensors directory its layers are
read from, the tokenizer, the generation config, and the whole model for the one step that needs it
(sampling ``--calib-data teacher``).

A Hugging Face directory (local or a Hub snapshot) is read where it is. A GGUF file is de-quantized
once into its cache entry (``dequantized``), an HF directory too; a source that cannot be read that
way (pickle weights with ``--allow-pickle``, a GGUF cache that cannot be written) is loaded whole once
and saved as safetensors into a temporary directory that lives as long as this object.
"""

from __future__ import annotations

import contextlib
import tempfile
from pathlib import Path

from .. import dequantized
from ..checkpoint import read_checkpoint_info
from ..errors import XecomlaError
from ..loaded import LoadedModel, ResolvedSource, check_family, gguf_read_once
from ..sources import check_weights, load_config, load_model, load_tokenizer, portable_source, resolve


class SourceFiles:
    """A source as files: ``config`` at once, the rest when asked."""

    def __init__(self, source: str, allow_pickle: bool = False):
        self.source = source
        self.allow_pickle = allow_pickle
        self.resolved = resolve(source, allow_pickle=allow_pickle)
        self.portable = portable_source(source)
        if self.resolved.is_checkpoint:
            info = read_checkpoint_info(self.resolved.directory)
            if info.spec is not None:
                raise XecomlaError(f"'{source}' is already an MLA checkpoint: init-svd takes an original model")
            self.portable = info.source
        self._tmp: tempfile.TemporaryDirectory | None = None
        with gguf_read_once() if self.resolved.gguf_file else contextlib.nullcontext():
            self.config = load_config(self._files())
        self.family = check_family(self.config)

    def _files(self) -> ResolvedSource:
        """Where the config and tokenizer are: a GGUF file's cache entry once it exists."""
        if self.resolved.gguf_file:
            entry = dequantized.cached(self.resolved.directory / self.resolved.gguf_file)
            if entry is not None:
                return ResolvedSource(self.source, entry)
        if self._tmp is not None:
            return ResolvedSource(self.source, Path(self._tmp.name))
        return self.resolved

    def weights_directory(self) -> Path:
        """A directory of safetensors files holding the source's weights under the model's own names."""
        files = self._files()
        if files.gguf_file is None:
            if self._tmp is not None or self.resolved.gguf_file or self.resolved.is_checkpoint:
                return files.directory  # a GGUF file's cache entry, our own copy, a checkpoint
            check_weights(self.resolved, self.allow_pickle)
            if any(files.directory.glob("*.safetensors")):
                return files.directory
        loaded = self.load(dtype="float32")  # a GGUF file is de-quantized into its cache entry now
        if self._files().gguf_file is None and self.resolved.gguf_file:
            return self._files().directory
        self._tmp = tempfile.TemporaryDirectory(prefix="xecomla-source-")
        loaded.model.save_pretrained(self._tmp.name, safe_serialization=True)
        loaded.tokenizer.save_pretrained(self._tmp.name)
        return Path(self._tmp.name)

    def tokenizer(self):
        return load_tokenizer(self._files())

    def generation_config(self):
        from transformers import GenerationConfig

        directory = self._files().directory
        if (directory / "generation_config.json").is_file():
            return GenerationConfig.from_pretrained(directory)
        return GenerationConfig.from_model_config(self.config)

    def load(self, dtype: str = "float32") -> LoadedModel:
        """The whole model, loaded as every other stage loads it."""
        return load_model(self.source, dtype=dtype, allow_pickle=self.allow_pickle)
