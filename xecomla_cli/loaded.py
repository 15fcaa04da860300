"""Small shared types below `sources` and `checkpoint`: a resolved source, a loaded model, and
the parsing of dtype and device names (one place for each); ``gguf_read_once`` for GGUF loads."""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .errors import XecomlaError
from .mla.spec import SUPPORTED_FAMILIES, MLASpec

DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


@dataclass
class ResolvedSource:
    """Where a source's files are: a directory, plus a GGUF file name inside it if any."""

    source: str  # as the user gave it
    directory: Path
    gguf_file: str | None = None
    is_checkpoint: bool = False

    @property
    def kind(self) -> str:
        if self.is_checkpoint:
            return "checkpoint"
        return "gguf" if self.gguf_file else "hf"


@dataclass
class LoadedModel:
    """A loaded causal LM (original or MLA) with everything later stages need."""

    model: Any  # transformers PreTrainedModel (Llama/Qwen2/Mistral, maybe with MLA layers)
    tokenizer: Any
    source: str  # original user-facing source of the base model ("demo", a path, a hub id)
    family: str
    resolved: ResolvedSource
    spec: MLASpec | None = None  # None for an original (unconverted) model
    meta: dict = field(default_factory=dict)  # xecomla.json of a stage checkpoint

    @property
    def config(self):
        return self.model.config

    @property
    def is_mla(self) -> bool:
        return self.spec is not None


def parse_dtype(name: str) -> torch.dtype | str:
    """'float32' | 'bfloat16' | 'float16' | 'auto' -> torch dtype (or 'auto')."""
    if name == "auto":
        return "auto"
    try:
        return DTYPES[name.lower()]
    except KeyError:
        raise XecomlaError(f"unknown dtype '{name}': use one of float32, bfloat16, float16, auto") from None


def dtype_name(dtype: torch.dtype) -> str:
    """torch.bfloat16 -> 'bfloat16' (the name xecomla.json and the reports use)."""
    return str(dtype).removeprefix("torch.")


def model_dtype_name(model) -> str:
    """The dtype name of a model's parameters."""
    return dtype_name(next(model.parameters()).dtype)


def parse_device(name: str) -> torch.device:
    """'cpu' | 'cuda' | 'cuda:N' | 'auto' -> torch.device, with one clear error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise XecomlaError(f"device '{name}' requested but no CUDA GPU is available: use --device cpu")
    try:
        return torch.device(name)
    except RuntimeError:
        raise XecomlaError(f"unknown device '{name}': use cpu, cuda, cuda:N or auto") from None


def check_family(config) -> str:
    """The model family, or a clear error naming what is supported."""
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_FAMILIES:
        archs = ", ".join(getattr(config, "architectures", None) or [str(model_type)])
        raise XecomlaError(
            f"unsupported architecture {archs} (model_type '{model_type}'): xecomla converts "
            f"{', '.join(SUPPORTED_FAMILIES)} models (Llama, SmolLM, Qwen2, Mistral; MHA or GQA)"
        )
    return model_type


def first_line(exc: BaseException, limit: int = 200) -> str:
    """The first line of an exception's message (for one-line errors)."""
    text = str(exc).strip().splitlines()
    return text[0][:limit] if text else type(exc).__name__


def load_hf_config(directory: Path, label: str, **kwargs):
    """transformers' AutoConfig of a model directory (or GGUF file), with one line naming the file
    and the problem (transformers reports any unreadable config as "not a valid JSON file")."""
    import json

    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(directory, trust_remote_code=False, **kwargs)
    except (OSError, ValueError) as exc:
        reason = first_line(exc)
        path = Path(directory) / "config.json"
        if kwargs.get("gguf_file"):
            return bad_gguf(Path(directory) / kwargs["gguf_file"], label, exc)
        if path.is_file():
            try:
                json.loads(path.read_text(encoding="utf-8"))
            except (json.JSONDecodeError, UnicodeDecodeError) as jexc:
                where = f"line {jexc.lineno} column {jexc.colno}" if isinstance(jexc, json.JSONDecodeError) else ""
                msg = jexc.msg if isinstance(jexc, json.JSONDecodeError) else "not UTF-8"
                raise XecomlaError(
                    f"'{path}' of {label} is not valid JSON ({msg}{': ' + where if where else ''})"
                ) from None
        raise XecomlaError(f"cannot read the model config of {label}: {reason}") from None


def bad_gguf(path: Path, label: str, exc: BaseException):
    """Why a .gguf file cannot be read, from the GGUF reader itself."""
    reason = first_line(exc)
    try:
        from gguf import GGUFReader

        GGUFReader(path)
    except Exception as gexc:  # the reader fails with IndexError/ValueError/struct errors on bad bytes
        reason = f"{type(gexc).__name__}: {first_line(gexc)}"
    raise XecomlaError(
        f"'{path}' is not a readable GGUF file ({reason}): it is truncated or corrupt, download it again"
    ) from None


@contextlib.contextmanager
def gguf_read_once():
    """Within: each GGUF file's header is parsed once, and gguf's tensor name map built once.

    transformers parses a GGUF file's whole header (every vocabulary string and merge: 0.7M fields
    for the demo's 49k tokens) anew for the config (twice), the tokenizer (twice) and the weights,
    and builds gguf's tensor name map again for every module of the model (~400 times). Both are
    pure functions of their arguments (a read-only memory map; the map is only read), so reusing
    the first result changes nothing but the time: the demo's load went from 5 header parses to 1.
    transformers looks both names up in ``gguf`` when it calls them, so swapping them there is enough."""
    import gguf

    reader_class, name_map = gguf.GGUFReader, gguf.get_tensor_name_map
    readers: dict[tuple, Any] = {}
    maps: dict[tuple, Any] = {}

    def reader(path, mode="r"):
        if mode != "r":
            return reader_class(path, mode)
        st = os.stat(path)
        key = (os.path.realpath(path), st.st_size, st.st_mtime_ns)
        if key not in readers:
            readers[key] = reader_class(path, mode)
        return readers[key]

    def tensor_name_map(arch, n_blocks):
        if (arch, n_blocks) not in maps:
            maps[arch, n_blocks] = name_map(arch, n_blocks)
        return maps[arch, n_blocks]

    gguf.GGUFReader, gguf.get_tensor_name_map = reader, tensor_name_map
    try:
        yield
    finally:
        gguf.GGUFReader, gguf.get_tensor_name_map = reader_class, name_map
