"""``export_gguf``: a checkpoint (or an original model) -> one llama.cpp GGUF file, verified before the rename.

An MLA checkpoint becomes llama.cpp's ``deepseek2`` (latent-only KV cache of R + p values per token
per layer); an original Llama / Mistral / Qwen2 model becomes ``llama`` (the baseline a benchmark
compares with, at the same weight type). Everything llama.cpp cannot express is refused with one
line before anything is written:

* no latent norm: deepseek2 always applies ``attn_kv_a_norm`` and loads no attention biases, so the
  bias emulation of ``--format hf`` has nothing to live in (make the checkpoint with ``--latent-norm``);
* attention biases (Qwen2's q/k/v), hybrid layers (unconverted attention), per-layer ranks without
  ``--pad-ranks``, RoPE slices per KV group;
* scaled RoPE (llama3 factors, YaRN...): deepseek2's graph applies no per-frequency factors.

The file is written into a temporary sibling directory, loaded and checked by llama.cpp
(``gguf_verify``), then renamed into place.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..checkpoint_on_disk import CheckpointOnDisk
from ..errors import XecomlaError
from ..mla.spec import source_biases
from .config import rope_parameters
from .gguf_tensors import GGUF_ALTERNATIVE, deepseek2_groups, deepseek2_layout, deepseek2_params, llama_tensors
from .gguf_tokenizer import tokenizer_metadata
from .gguf_verify import verify_gguf
from .gguf_writer import OutType, write_gguf
from .model_view import InMemory, model_view
from .verify import VERIFY_MAX_PARAMETERS, not_verified_note


@dataclass
class GGUFResult:
    path: Path
    arch: str
    outtype: str
    values_per_token_per_layer: int  # what llama.cpp caches (K and V, or the latent and RoPE key)
    tokenizer_pre: str
    notes: list[str] = field(default_factory=list)
    tensor_types: dict[str, int] = field(default_factory=dict)  # ggml type -> number of tensors
    verify: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "path": str(self.path)}

    def summary_lines(self) -> list[str]:
        types = ", ".join(f"{n} {t}" for t, n in sorted(self.tensor_types.items()))
        lines = [
            f"llama.cpp GGUF, arch {self.arch}, --outtype {self.outtype} ({types}); "
            f"tokenizer pre '{self.tokenizer_pre}'"
            f"; KV cache {self.values_per_token_per_layer} values per token per layer"
        ]
        lines += [f"  {note}" for note in self.notes]
        if self.verify:
            v = self.verify
            tie = f" (near tie at token {v['greedy_tie_at']})" if "greedy_tie_at" in v else ""
            lines.append(
                f"verified in llama.cpp: {v['texts']} texts tokenised identically; logits on {v['prompts']} prompts "
                f"within {v['max_abs_logit_diff']:.2e} of xecomla's (max |logit| {v['max_abs_logit']:.3g}, allowed "
                f"{v['allowed']:.2e}); greedy {v['greedy_tokens']} tokens "
                f"{'identical' if v['greedy_tokens_equal'] else 'identical up to a tie' + tie}; "
                f"KV cache {v['kv_mib']:.2f} MiB at {v['kv_cells']} cells"
            )
        return lines


def default_gguf_output(source: str, outtype: OutType) -> Path:
    """<checkpoint>-<outtype>.gguf next to a local source; <name>-<outtype>.gguf in the working directory else."""
    path = Path(source)
    stem = path.name.rstrip("/") or "model"
    parent = path.parent if path.exists() else Path(".")
    return parent / f"{stem}-{OutType(outtype).value}.gguf"


def check_gguf_mla(spec, config, pad_ranks: bool) -> None:
    """The deepseek2-specific refusals, one line each, decided from the spec and config alone (before
    any weight is read), ahead of the DeepSeek-V3 plan's own checks."""
    unconverted = [i for i, r in enumerate(spec.kv_ranks) if r is None]
    if unconverted:
        raise XecomlaError(
            f"{len(unconverted)} of {spec.num_layers} layers keep their original attention (hybrid checkpoint): "
            f"llama.cpp's deepseek2 has MLA in every layer; convert every layer, or export --format xecomla"
        )
    ranks = sorted({int(r) for r in spec.kv_ranks})
    if len(ranks) > 1 and not pad_ranks:
        raise XecomlaError(
            f"layers have different latent ranks ({', '.join(map(str, ranks))}) but llama.cpp's deepseek2 has one "
            f"kv_lora_rank: pass --pad-ranks (zero channels up to r={ranks[-1]}; the cache grows to that), "
            "or init with one --kv-rank"
        )
    if not spec.latent_norm:
        raise XecomlaError(
            "this checkpoint has no latent norm, and llama.cpp's deepseek2 always applies attn_kv_a_norm and loads "
            "no attention biases to emulate its absence: make it with `init-svd --latent-norm` (then distill), "
            "or export --format hf for transformers"
        )
    if source_biases(config)[0] and not spec.biases_folded:
        raise XecomlaError(
            f"the attention has biases ({config.model_type}; kept by init-svd --attention-bias keep), which llama.cpp's"
            f" deepseek2 does not load: re-init with the default --attention-bias fold, or {GGUF_ALTERNATIVE}"
        )
    kind = rope_parameters(config).get("rope_type", "default")
    if kind != "default" and spec.rope_frequencies != "default":
        raise XecomlaError(
            f"the RoPE is scaled (rope_type '{kind}'{', llama3 frequency factors' if kind == 'llama3' else ''}) and "
            "this checkpoint keeps it (init-svd --rope-frequencies source), which llama.cpp's deepseek2 graph cannot "
            f"apply (it takes no per-frequency factors): re-init with --rope-frequencies default, or {GGUF_ALTERNATIVE}"
        )
    if spec.nope_dim < 1 or spec.rope_dim % 2:
        raise XecomlaError(
            f"rope dim {spec.rope_dim} of head dim {spec.head_dim}: llama.cpp needs an even rope dim below the head dim"
        )


def check_before_loading(source: str, pad_ranks: bool) -> None:
    """The refusals a checkpoint's xecomla.json and config.json decide, before its weights are loaded."""
    from ..checkpoint import read_meta, read_spec
    from ..loaded import load_hf_config
    from ..sources import resolve

    resolved = resolve(source)
    if not resolved.is_checkpoint:
        return
    meta = read_meta(resolved.directory)
    if meta.get("mla"):
        config = load_hf_config(resolved.directory, f"checkpoint '{resolved.directory}'")
        check_gguf_mla(read_spec(meta, resolved.directory), config, pad_ranks)


def _deepseek2(view, pad_ranks: bool):
    """deepseek2's (layout, tensor groups, keys, cached values per layer, notes), the weights read one layer at a
    time as the file is written."""
    from . import plan_export

    check_gguf_mla(view.spec, view.config, pad_ranks)
    plan = plan_export(view, dtype="float32", pad_ranks=pad_ranks, portable=True)
    theta = plan.rope_theta or float(rope_parameters(view.config).get("rope_theta", 10000.0))
    inv_freq = 1.0 / theta ** (torch.arange(0, plan.rope_dim, 2, dtype=torch.float64) / plan.rope_dim)
    for i in range(view.num_layers):
        ours = view.rope(i)[0].double()
        if not torch.allclose(ours, inv_freq, rtol=1e-6, atol=0):
            raise XecomlaError(
                f"layer {i}'s RoPE frequencies are not theta^(-2i/p) for one theta, which is all "
                f"llama.cpp's deepseek2 computes; {GGUF_ALTERNATIVE}"
            )
    layout = deepseek2_layout(view, plan)
    notes = [n for n in plan.notes if "vLLM" not in n]
    keys = deepseek2_params(view, plan, theta)
    return layout, deepseek2_groups(view, plan), keys, plan.kv_lora_rank + plan.rope_dim, notes


def _llama(loaded):
    """llama's (layout, tensor groups, keys, cached values per layer, notes) of an original model in memory."""
    config = loaded.config
    if getattr(config, "mlp_bias", False):
        raise XecomlaError(f"the MLP has biases, which llama.cpp's llama arch does not load; {GGUF_ALTERNATIVE}")
    window = getattr(config, "sliding_window", None)
    if window is not None and getattr(config, "use_sliding_window", True) and window < config.max_position_embeddings:
        raise XecomlaError(
            f"the model attends through a {window}-token sliding window, which llama.cpp's llama "
            f"arch does not apply; {GGUF_ALTERNATIVE}"
        )
    tensors, keys = llama_tensors(loaded)
    layout = [(name, tuple(t.shape)) for name, t in tensors.items()]
    return layout, [tensors], keys, 2 * config.num_key_value_heads * keys["key_length"], []


def _eos_id(src) -> int | None:
    """The generation config's end-of-sequence token when it names one (what transformers stops on)."""
    model = getattr(src, "model", None)
    if model is not None:
        gen = getattr(model, "generation_config", None)
        eos = getattr(gen, "eos_token_id", None)
    else:
        path = Path(src.directory) / "generation_config.json"
        eos = json.loads(path.read_text()).get("eos_token_id") if path.is_file() else None
    return eos if isinstance(eos, int) else None


def _open(source: str, pad_ranks: bool):
    """An MLA checkpoint opened on disk (its refusals decided from xecomla.json and config.json first), else the
    source loaded in memory (an original model: llama arch)."""
    from ..checkpoint_on_disk import open_checkpoint
    from ..sources import load_model, resolve

    check_before_loading(source, pad_ranks)
    resolved = resolve(source)
    if resolved.is_checkpoint:
        ckpt = open_checkpoint(resolved.directory)
        if ckpt.spec is not None:
            return ckpt
    return load_model(source, dtype="float32", device="cpu")


def _in_memory(src):
    """The model in memory, for the verification: loaded now when ``src`` is a checkpoint on disk."""
    from ..checkpoint import load_checkpoint

    if isinstance(src, InMemory):
        return src.loaded
    if isinstance(src, CheckpointOnDisk):
        return load_checkpoint(src.directory, dtype="float32", device="cpu")
    return src


def export_gguf(
    source: str,
    output: Path | None = None,
    *,
    outtype: OutType = OutType.f16,
    pad_ranks: bool = False,
    verify: bool = True,
    force: bool = False,
    threads: int = 2,
    loaded=None,
) -> GGUFResult:
    """Write ``output`` (default ``default_gguf_output``): deepseek2 for an MLA checkpoint (read one layer at a time
    and written as it is read), llama for an original (in memory)."""
    outtype = OutType(outtype)
    out = Path(output) if output is not None else default_gguf_output(source, outtype)
    if out.suffix != ".gguf":
        raise XecomlaError(f"the GGUF output '{out}' should end in .gguf (llama.cpp loads one file)")
    if out.exists() and not force:
        raise XecomlaError(f"output '{out}' already exists: pass --force to replace it, or choose another -o")
    src = model_view(loaded) if loaded is not None and loaded.spec is not None else loaded or _open(source, pad_ranks)
    arch = "deepseek2" if src.spec is not None else "llama"
    layout, groups, keys, values, notes = _deepseek2(src, pad_ranks) if arch == "deepseek2" else _llama(src)
    tokenizer = tokenizer_metadata(src.tokenizer, src.config.vocab_size, _eos_id(getattr(src, "loaded", src)))
    name = f"{Path(src.source).name} ({'xecomla MLA' if arch == 'deepseek2' else 'original'})"
    check = verify and (arch == "llama" or src.parameters() <= VERIFY_MAX_PARAMETERS)
    if verify and not check:
        notes.append(not_verified_note(src.parameters()))

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        tmp.mkdir()
        types = write_gguf(tmp / out.name, arch, keys, layout, groups, tokenizer, outtype, name)
        del groups
        report = verify_gguf(tmp / out.name, _in_memory(src), outtype, threads=threads) if check else None
        os.replace(tmp / out.name, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    counts: dict[str, int] = {}
    for t in types.values():
        counts[t] = counts.get(t, 0) + 1
    return GGUFResult(out, arch, outtype.value, values, tokenizer.pre, notes, counts, report)
