"""The stage checkpoint: a directory every stage writes and every later stage reads.

    model.safetensors (or model-0000x-of-0000y.safetensors + model.safetensors.index.json)
    config.json         the base architecture (Llama / Qwen2 / Mistral)
    generation_config.json, tokenizer files
    xecomla.json        format version, stage, MLA spec, source, parent, command, metrics

Writes are atomic: everything goes to a temporary sibling directory that is renamed into place.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import shutil
import sys
import uuid
from collections.abc import Callable
from dataclasses import MISSING, dataclass
from pathlib import Path
from typing import Any

import torch

from . import __version__
from .errors import XecomlaError
from .loaded import (
    LoadedModel,
    ResolvedSource,
    check_family,
    first_line,
    load_hf_config,
    model_dtype_name,
    parse_device,
    parse_dtype,
)
from .mla.spec import MLASpec
from .outputs import claim, fault_point, os_error_line

FORMAT_VERSION = 1
META_FILE = "xecomla.json"
WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
MAX_SHARD_SIZE = "4GB"


def command_line() -> str:
    """The command that is running, for lineage (no secrets are ever passed as arguments)."""
    argv = [Path(sys.argv[0]).name, *sys.argv[1:]] if sys.argv and sys.argv[0] else []
    return " ".join(argv)


def atomic_directory(out_dir: Path, write: Callable[[Path], None], force: bool = False) -> Path:
    """Run `write(tmp)` into a temporary sibling directory, then rename it to `out_dir`.

    Refuses to replace an existing `out_dir` unless `force`. On any failure nothing is left.
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and not force:
        raise XecomlaError(f"output '{out_dir}' already exists: pass --force to replace it, or choose another -o")
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        tmp.mkdir()
        write(tmp)
        fault_point("written")
        if out_dir.exists():
            old = out_dir.parent / f".{out_dir.name}.old-{uuid.uuid4().hex[:8]}"
            os.replace(out_dir, old)
            fault_point("swapped")
            os.replace(tmp, out_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out_dir)
        fault_point("renamed")
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(exc, OSError):  # disk full, permissions: one line naming the output
            raise XecomlaError(os_error_line(exc, f"cannot write '{out_dir}'")) from None
        raise
    return out_dir


def write_weights(model, directory: Path) -> None:
    """Safetensors weights (sharded with an index when large); tied tensors are stored once."""
    from huggingface_hub import save_torch_state_dict

    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    if getattr(model.config, "tie_word_embeddings", False):
        state.pop("lm_head.weight", None)  # tied to model.embed_tokens.weight
    save_torch_state_dict(state, directory, max_shard_size=MAX_SHARD_SIZE)
    for f in directory.glob("*.safetensors"):
        f.chmod(0o644)


def read_weights(directory: Path) -> dict[str, torch.Tensor]:
    """All tensors of a checkpoint directory, with a clear error for a missing or corrupt file."""
    from safetensors.torch import load_file

    directory = Path(directory)
    index = directory / INDEX_FILE
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    elif (directory / WEIGHTS_FILE).is_file():
        files = [WEIGHTS_FILE]
    else:
        raise XecomlaError(f"checkpoint '{directory}' has no {WEIGHTS_FILE}: it is incomplete, re-run the stage")
    state: dict[str, torch.Tensor] = {}
    for name in files:
        path = directory / name
        if not path.is_file():
            raise XecomlaError(f"checkpoint '{directory}' is missing weight shard {name}: re-run the stage")
        try:
            state.update(load_file(path))
        except Exception as exc:  # safetensors raises its own error types for bad headers
            raise XecomlaError(
                f"checkpoint weights '{path}' are corrupt ({first_line(exc)}): re-run the stage"
            ) from None
    return state


def checkpoint_meta(
    *, stage: str, dtype: str, spec: MLASpec | None, source: str, parent: str | None, metrics, extra
) -> dict[str, Any]:
    """The ``xecomla.json`` of a checkpoint being written."""
    return {
        "format_version": FORMAT_VERSION,
        "stage": stage,
        "xecomla_version": __version__,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "source": source,
        "parent": parent,
        "command": command_line(),
        "dtype": dtype,
        "mla": spec.to_dict() if spec is not None else None,
        "metrics": metrics or {},
        **(extra or {}),
    }


def write_side_files(tmp: Path, config, generation_config, tokenizer, meta: dict[str, Any]) -> None:
    """Everything of a checkpoint but its weights: config, generation config, tokenizer, xecomla.json."""
    config.save_pretrained(tmp)
    if generation_config is not None:
        generation_config.save_pretrained(tmp)
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp)
    (tmp / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")


def save_checkpoint(
    out_dir: str | Path,
    *,
    model,
    tokenizer,
    stage: str,
    spec: MLASpec | None,
    source: str,
    parent: str | None = None,
    metrics: dict[str, Any] | None = None,
    extra: dict[str, Any] | None = None,
    force: bool = False,
    write_extra: Callable[[Path], None] | None = None,
) -> Path:
    """Write a stage checkpoint atomically and return its path."""
    meta = checkpoint_meta(
        stage=stage,
        dtype=model_dtype_name(model),
        spec=spec,
        source=source,
        parent=parent,
        metrics=metrics,
        extra=extra,
    )

    def write(tmp: Path) -> None:
        write_weights(model, tmp)
        write_side_files(tmp, model.config, getattr(model, "generation_config", None), tokenizer, meta)
        if write_extra is not None:
            write_extra(tmp)

    return atomic_directory(Path(out_dir), write, force=force)


def save_streamed_checkpoint(
    out_dir: str | Path,
    *,
    write_weights: Callable[[Path], tuple[MLASpec | None, dict[str, Any]]],
    config,
    generation_config,
    tokenizer,
    stage: str,
    dtype: str,
    source: str,
    parent: str | None = None,
    force: bool = False,
) -> Path:
    """``save_checkpoint`` for a model that is never whole in memory: ``write_weights(tmp)`` writes the
    weights into the temporary directory itself (``weights_writer``) and returns the spec and metrics
    to record. The same files, written atomically the same way."""

    def write(tmp: Path) -> None:
        spec, metrics = write_weights(tmp)
        meta = checkpoint_meta(
            stage=stage, dtype=dtype, spec=spec, source=source, parent=parent, metrics=metrics, extra=None
        )
        write_side_files(tmp, config, generation_config, tokenizer, meta)

    return atomic_directory(Path(out_dir), write, force=force)


def read_meta(ckpt_dir: str | Path) -> dict[str, Any]:
    """`xecomla.json` of a checkpoint, validated."""
    ckpt_dir = Path(ckpt_dir)
    if ckpt_dir.exists() and not ckpt_dir.is_dir():
        raise XecomlaError(f"'{ckpt_dir}' is a file, not a checkpoint directory: pass the directory a stage printed")
    if not ckpt_dir.is_dir():
        raise XecomlaError(f"checkpoint '{ckpt_dir}' does not exist: pass the directory a stage printed")
    path = ckpt_dir / META_FILE
    if not path.is_file():
        raise XecomlaError(f"'{ckpt_dir}' is not an xecomla checkpoint (no {META_FILE}): pass a stage's output")
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise XecomlaError(f"'{path}' is not valid JSON ({json_error(exc)}): re-run the stage") from None
    if not isinstance(meta, dict):
        raise XecomlaError(f"'{path}' is not a JSON object: re-run the stage")
    version = meta.get("format_version")
    if version != FORMAT_VERSION:
        raise XecomlaError(
            f"checkpoint '{ckpt_dir}' has format version {version}, this xecomla reads version "
            f"{FORMAT_VERSION}: re-run the stage with this version"
        )
    if not (ckpt_dir / "config.json").is_file():
        raise XecomlaError(f"checkpoint '{ckpt_dir}' has no config.json: it is incomplete, re-run the stage")
    if meta.get("mla"):
        read_spec(meta, path)
    return meta


def json_error(exc: ValueError) -> str:
    """'Expecting ',' delimiter: line 3 column 5' (json's own message says 'starting at' on its own)."""
    if isinstance(exc, json.JSONDecodeError):
        return f"{exc.msg}: line {exc.lineno} column {exc.colno}"
    return first_line(exc)


def read_spec(meta: dict[str, Any], where: Path) -> MLASpec:
    """The MLA spec of a checkpoint's xecomla.json, with one line naming a missing or bad key."""
    d = meta.get("mla")
    if not isinstance(d, dict):
        raise XecomlaError(f"'{where}' has no valid 'mla' section: re-run the stage")
    required = [n for n, f in MLASpec.__dataclass_fields__.items() if f.default is f.default_factory is MISSING]
    missing = [n for n in required if n not in d]
    if missing:
        raise XecomlaError(f"'{where}' is missing mla.{missing[0]}: re-run the stage that wrote it")
    try:
        spec = MLASpec.from_dict(d)
        spec.converted_layers  # noqa: B018 (reads kv_ranks: a wrong type fails here)
    except (TypeError, ValueError) as exc:
        raise XecomlaError(f"'{where}' has an invalid 'mla' section ({first_line(exc)}): re-run the stage") from None
    return spec


def recorded_source(ckpt_dir: Path, meta: dict[str, Any]) -> str:
    """The source model a checkpoint records, usable from any working directory: checkpoints record
    an absolute path (or 'demo', or a Hub id); an older checkpoint's relative path is looked up beside
    the checkpoint (then inside it), and kept as it is when neither exists."""
    source = meta.get("source") or str(ckpt_dir)
    if source == "demo" or os.path.isabs(source):
        return source
    for base in (Path(ckpt_dir).resolve().parent, Path(ckpt_dir).resolve()):
        candidate = base / source
        if candidate.exists():
            return os.path.abspath(candidate)
    return source


@dataclass(frozen=True)
class CheckpointInfo:
    """A stage checkpoint as read once: its path (as given), xecomla.json, MLA spec and source model."""

    path: Path
    meta: dict[str, Any]
    spec: MLASpec | None
    source: str  # the recorded source, usable from any working directory (`recorded_source`)

    @property
    def directory(self) -> Path:
        return self.path.resolve()


def read_checkpoint_info(ckpt_dir: str | Path) -> CheckpointInfo:
    """Read and validate a checkpoint's xecomla.json once: what a stage passes down instead of re-reading it."""
    path = Path(ckpt_dir)
    meta = read_meta(path)
    spec = read_spec(meta, path / META_FILE) if meta.get("mla") else None
    return CheckpointInfo(path, meta, spec, recorded_source(path, meta))


def update_meta(ckpt_dir: str | Path, update: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
    """Atomically rewrite `xecomla.json` after `update(meta)` changed it in place."""
    ckpt_dir = Path(ckpt_dir)
    read_meta(ckpt_dir)
    with claim(ckpt_dir, force=True):  # no run is replacing the checkpoint, no other update is lost
        meta = read_meta(ckpt_dir)
        update(meta)
        for stale in ckpt_dir.glob(f".{META_FILE}.tmp-*"):  # left by a killed update
            stale.unlink(missing_ok=True)
        tmp = ckpt_dir / f".{META_FILE}.tmp-{uuid.uuid4().hex[:8]}"
        tmp.write_text(json.dumps(meta, indent=2) + "\n")
        os.replace(tmp, ckpt_dir / META_FILE)
    return meta


def record_metrics(ckpt_dir: str | Path, metrics: dict[str, Any]) -> dict[str, Any]:
    """Merge `metrics` into the checkpoint's recorded metrics."""
    return update_meta(ckpt_dir, lambda meta: meta.setdefault("metrics", {}).update(metrics))


def build_model(config, spec: MLASpec | None, dtype: torch.dtype):
    """The checkpoint's architecture with uninitialised weights (they are loaded next)."""
    from transformers import AutoModelForCausalLM
    from transformers.initialization import no_init_weights

    from .mla.rebuild import apply_spec

    with no_init_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    if spec is not None:
        apply_spec(model, spec)
    return model


def load_checkpoint(
    ckpt_dir: str | Path, *, dtype: str = "float32", device: str = "cpu", info: CheckpointInfo | None = None
):
    """Load a stage checkpoint as a `LoadedModel` (MLA layers rebuilt from the spec); `info`, when the
    caller has read the checkpoint already (`read_checkpoint_info`), is not read again."""
    ckpt_dir = Path(ckpt_dir).resolve()
    info = info or read_checkpoint_info(ckpt_dir)
    meta, spec = info.meta, info.spec
    config = load_hf_config(ckpt_dir, f"checkpoint '{ckpt_dir}'")
    family = check_family(config)
    torch_dtype = parse_dtype(dtype)
    if torch_dtype == "auto":
        torch_dtype = getattr(torch, meta.get("dtype", "float32"))
    state = read_weights(ckpt_dir)
    model = build_model(config, spec, torch_dtype)
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = {"lm_head.weight"} if getattr(config, "tie_word_embeddings", False) else set()
    if unexpected or set(missing) - tied:
        shown = ", ".join((list(unexpected) + [m for m in missing if m not in tied])[:3])
        raise XecomlaError(
            f"checkpoint '{ckpt_dir}' weights do not match its xecomla.json spec ({shown}): re-run the stage"
        )
    if tied:
        model.tie_weights()
    model.to(parse_device(device)).eval()
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(ckpt_dir, trust_remote_code=False)
    except (OSError, ValueError) as exc:
        raise XecomlaError(
            f"checkpoint '{ckpt_dir}' has no usable tokenizer ({first_line(exc)}): re-run the stage"
        ) from None
    resolved = ResolvedSource(str(ckpt_dir), ckpt_dir, is_checkpoint=True)
    return LoadedModel(model, tokenizer, info.source, family, resolved, spec, meta)
