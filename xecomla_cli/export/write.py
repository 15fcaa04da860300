"""``export_checkpoint``: write the export directory atomically, verified before it is renamed into place.

--format hf       model.safetensors (sharded when large), config.json (DeepSeek-V3), generation_config.json,
                  tokenizer files, xecomla_export.json (lineage, spec, metrics, plan), README.md (card)
--format xecomla  the stage checkpoint's own files and a README.md card
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

from ..checkpoint import MAX_SHARD_SIZE, atomic_directory, command_line, load_checkpoint, read_meta
from ..checkpoint_on_disk import open_checkpoint
from ..engines import engine_support
from ..errors import XecomlaError
from ..loaded import parse_dtype
from ..mla.spec import MLASpec
from ..outputs import claim, default_output
from .card import lineage, render_card
from .config import deepseek_config
from .model_view import InMemory, model_view
from .plan import WEIGHT_DTYPES, plan_export
from .records import ExportPlan, ExportResult
from .shards import write_shards
from .verify import VERIFY_MAX_PARAMETERS, not_verified_note, verify_export
from .weights import deepseek_groups, deepseek_layout

FORMATS = ("hf", "xecomla")
EXPORT_DTYPES = ("auto", *WEIGHT_DTYPES)
EXPORT_META_FILE = "xecomla_export.json"


def read_rope_type(ckpt_dir: Path) -> str | None:
    """The RoPE type in a checkpoint's config.json (the source's)."""
    config = json.loads((Path(ckpt_dir) / "config.json").read_text())
    return (config.get("rope_parameters") or config.get("rope_scaling") or {}).get("rope_type")


def export_checkpoint(
    ckpt_dir: str | Path,
    out_dir: str | Path | None = None,
    *,
    fmt: str = "hf",
    dtype: str = "auto",
    pad_ranks: bool = False,
    portable: bool = False,
    latent_width: int | None = None,
    verify: bool = True,
    force: bool = False,
    loaded=None,
) -> ExportResult:
    """Write the export directory atomically (verified before it is renamed into place).

    ``out_dir`` defaults to ``<checkpoint>-hf`` (``-xecomla``) beside the checkpoint. The checkpoint is read one
    decoder layer at a time and the weights written as they come (memory of one layer, not of the model); ``loaded``
    reads a model already loaded from ``ckpt_dir`` (fp32, cpu) instead."""
    if fmt not in FORMATS:
        raise XecomlaError(f"unknown --format '{fmt}': choose hf (DeepSeek-V3 layout) or xecomla")
    if dtype not in EXPORT_DTYPES:
        raise XecomlaError(f"unknown --dtype '{dtype}' for export: use auto, float32 or bfloat16")
    out_dir = Path(out_dir) if out_dir is not None else default_output(ckpt_dir, "hf" if fmt == "hf" else "xecomla")
    ckpt_dir = Path(ckpt_dir).resolve()
    meta = read_meta(ckpt_dir)
    with claim(out_dir, inputs=[ckpt_dir], force=force):  # one writer; never into the checkpoint
        return _export(ckpt_dir, out_dir, meta, fmt, dtype, pad_ranks, portable, latent_width, verify, force, loaded)


def _export(ckpt_dir, out_dir, meta, fmt, dtype, pad_ranks, portable, latent_width, verify, force, loaded):
    command = _export_command(ckpt_dir)
    if fmt == "xecomla":
        result = _export_own(ckpt_dir, out_dir, meta, command, force)
        if meta.get("mla"):  # what each engine would keep once exported in its layout (hf, gguf)
            spec = MLASpec.from_dict(meta["mla"])
            kind = None if spec.rope_frequencies == "default" else read_rope_type(ckpt_dir)
            result.engines = [r.to_dict() for r in engine_support(spec, rope_type=kind)]
        return result
    if dtype == "auto":
        dtype = meta.get("dtype", "float32")
        dtype = dtype if dtype in WEIGHT_DTYPES else "float32"
    source = model_view(loaded) if loaded is not None else open_checkpoint(ckpt_dir)
    plan = plan_export(source, dtype=dtype, pad_ranks=pad_ranks, portable=portable, latent_width=latent_width)
    result = _export_deepseek(ckpt_dir, out_dir, meta, command, source, plan, verify=verify, force=force)
    rope_type = plan.rope_type or (getattr(source.config, "rope_parameters", None) or {}).get("rope_type")
    rows = engine_support(
        source.spec, kv_lora_rank=plan.kv_lora_rank, attention_bias=plan.attention_bias, rope_type=rope_type
    )
    result.engines = [r.to_dict() for r in rows]
    return result


def _export_own(ckpt_dir: Path, out_dir: Path, meta: dict, command: str, force: bool) -> ExportResult:
    """--format xecomla: the checkpoint's files as they are, plus a model card."""
    spec = MLASpec.from_dict(meta["mla"]) if meta.get("mla") else None
    history = lineage(ckpt_dir, meta)

    def write(tmp: Path) -> None:
        for f in sorted(ckpt_dir.iterdir()):
            if f.is_file():
                shutil.copy2(f, tmp / f.name)
        (tmp / "README.md").write_text(render_card(meta, spec, None, history, command, "xecomla"))

    return ExportResult(atomic_directory(out_dir, write, force=force), "xecomla", None)


def _export_deepseek(
    ckpt_dir: Path, out_dir: Path, meta: dict, command: str, source, plan: ExportPlan, *, verify: bool, force: bool
) -> ExportResult:
    """--format hf: weights (one layer at a time), config and tokenizer in the DeepSeek-V3 layout, verified, with
    a model card."""
    from huggingface_hub.serialization._base import parse_size_to_int

    history = lineage(ckpt_dir, meta)
    config = deepseek_config(source, plan)
    report: dict[str, Any] = {}
    layout = [entry for group in deepseek_layout(source, plan) for entry in group]
    parameters = source.parameters()
    check = verify and parameters <= VERIFY_MAX_PARAMETERS
    if verify and not check:
        plan = replace(plan, notes=[*plan.notes, not_verified_note(parameters)])

    def write(tmp: Path) -> None:
        shard_bytes = parse_size_to_int(MAX_SHARD_SIZE)
        write_shards(tmp, layout, deepseek_groups(source, plan), parse_dtype(plan.dtype), shard_bytes)
        config.save_pretrained(tmp)
        _generation_config(ckpt_dir, source.config).save_pretrained(tmp)
        source.tokenizer.save_pretrained(tmp)
        (tmp / EXPORT_META_FILE).write_text(json.dumps(_export_meta(meta, plan, command), indent=2) + "\n")
        if check:
            loaded = source.loaded if isinstance(source, InMemory) else load_checkpoint(ckpt_dir, dtype="float32")
            report.update(verify_export(tmp, loaded, plan))
        card = render_card(meta, source.spec, plan, history, command, "hf", report or None)
        (tmp / "README.md").write_text(card)

    path = atomic_directory(out_dir, write, force=force)
    return ExportResult(path, "hf", plan, report or None)


def _export_command(ckpt_dir: Path) -> str:
    """This command line, with a '-' (path read from stdin) replaced by the checkpoint it read."""
    words = command_line().split(" ")
    if "export" in words:
        at = words.index("export")
        if "-" in words[at + 1 :]:
            words[words.index("-", at + 1)] = str(ckpt_dir)
    return " ".join(words)


def _generation_config(ckpt_dir: Path, config):
    from transformers import GenerationConfig

    if (ckpt_dir / "generation_config.json").is_file():
        return GenerationConfig.from_pretrained(ckpt_dir)
    return GenerationConfig.from_model_config(config)


def _export_meta(meta: dict, plan: ExportPlan, command: str) -> dict:
    """xecomla_export.json: where the export came from, its MLA spec, its metrics and the plan."""
    return {
        "exported_from": {
            k: meta.get(k) for k in ("stage", "source", "parent", "command", "created", "xecomla_version")
        },
        "mla": meta.get("mla"),
        "metrics": meta.get("metrics", {}),
        "export": {"command": command, "plan": asdict(plan), "portable": plan.portable},
    }
