"""The exported README.md: what the model is, how it was made, what it costs and scores.

Every number comes from the checkpoint's ``xecomla.json`` (the MLA spec and recorded metrics) and
from the export plan; nothing is recomputed here.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..checkpoint import META_FILE
from ..mla.spec import MLASpec, attention_kind
from ..text.bundled import DEMO_MODEL_BASE
from .records import ExportPlan

MAX_LINEAGE = 20


def lineage(ckpt_dir: Path, meta: dict[str, Any]) -> list[dict[str, Any]]:
    """The checkpoint and its parents, oldest first: stage, path, command (parents that no longer
    exist are listed with what the child recorded)."""
    chain = [{"stage": meta.get("stage"), "path": str(ckpt_dir), "command": meta.get("command")}]
    parent, seen = meta.get("parent"), {str(ckpt_dir)}
    while parent and len(chain) < MAX_LINEAGE and parent not in seen:
        seen.add(parent)
        path = Path(parent)
        try:
            pmeta = json.loads((path / META_FILE).read_text())
        except (OSError, json.JSONDecodeError):
            chain.append({"stage": None, "path": parent, "command": None})
            break
        chain.append({"stage": pmeta.get("stage"), "path": parent, "command": pmeta.get("command")})
        parent = pmeta.get("parent")
    return chain[::-1]


def _flatten(d: dict[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    rows = []
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            rows.extend(_flatten(v, key + "."))
        else:
            rows.append((key, v))
    return rows


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, (list, tuple)):
        return ", ".join(_fmt(x) for x in v)
    return str(v)


DISTILL_KEYS = (
    "tokens_seen",
    "steps",
    "train_kl",
    "val_kl",
    "val_ppl",
    "val_ppl_teacher",
    "val_kl_initial",
    "val_ppl_initial",
    "distill_seconds",
    "distill_tokens_per_s",
    "distill_data",
    "distill_teacher",
)


def _eval_rows(ev: dict[str, Any]) -> list[str]:
    """Benchmark rows (metric | this model | teacher) of the ``eval`` metrics that ``xecomla eval`` records."""
    teacher = ev.get("teacher") or {}

    def cell(d: dict[str, Any], *path: str) -> str:
        for key in path:
            d = d.get(key) if isinstance(d, dict) else None
        return "—" if d is None else _fmt(d)

    rows = []
    ppl = ev.get("perplexity")
    if isinstance(ppl, dict):
        theirs = teacher.get("perplexity") or {}
        same = (theirs.get("data"), theirs.get("tokens")) == (ppl.get("data"), ppl.get("tokens"))
        rows.append(
            f"| perplexity ({ppl.get('data')}, {ppl.get('tokens')} tokens) | {cell(ev, 'perplexity', 'ppl')} | "
            f"{cell(theirs, 'ppl') if same else '—'} |"
        )
    same_questions = True  # the teacher's numbers are shown only where it answered the same questions
    for task, res in (ev.get("tasks") or {}).items():
        if isinstance(res, dict) and res.get("primary") in res:
            m = res["primary"]
            theirs = (teacher.get("tasks") or {}).get(task) or {}
            same = theirs.get("n") == res.get("n")
            same_questions &= same
            rows.append(f"| {task} {m} (n={res.get('n')}) | {cell(res, m)} | {cell(theirs, m) if same else '—'} |")
    if isinstance(ev.get("average"), dict):
        avg = ev["average"]
        same_questions &= (teacher.get("average") or {}).get("tasks") == avg.get("tasks")
        their_avg = cell(teacher, "average", "value") if same_questions else "—"
        rows.append(f"| average ({avg.get('tasks')} tasks) | {cell(avg, 'value')} | {their_avg} |")
    kv = ev.get("kv_cache")
    if isinstance(kv, dict):
        rows.append(
            f"| KV cache bytes / token ({kv.get('dtype')}) | {cell(kv, 'bytes_per_token')} | "
            f"{cell(teacher, 'kv_cache', 'bytes_per_token')} |"
        )
        rows.append(f"| KV cache compression | {cell(kv, 'compression')}x | — |")
    return rows


def _metrics_section(metrics: dict[str, Any]) -> list[str]:
    """Benchmarks (eval), distillation and any other metrics recorded in xecomla.json."""
    out = ["## Evaluation (recorded in xecomla.json)", ""]
    if not metrics:
        return out + ["No metrics were recorded for this checkpoint (run `xecomla eval` on it).", ""]
    ev = metrics.get("eval")
    rows = _eval_rows(ev) if isinstance(ev, dict) else []
    if rows:
        teacher = (ev.get("teacher") or {}).get("source", "not evaluated")
        out += [
            f"`xecomla eval` ({ev.get('updated', 'date unknown')}; teacher: {teacher}):",
            "",
            "| metric | this model | teacher |",
            "|---|---|---|",
            *rows,
            "",
        ]
    if "tokens_seen" in metrics:
        m = metrics
        out += [
            f"Distillation: {m['tokens_seen']:,} tokens in {m.get('steps')} steps from `{m.get('distill_teacher')}` on "
            f"`{m.get('distill_data')}` data ({_fmt(m.get('distill_tokens_per_s'))} tokens/s). Validation KL "
            f"{_fmt(m.get('val_kl_initial'))} → {_fmt(m.get('val_kl'))}, validation perplexity "
            f"{_fmt(m.get('val_ppl_initial'))} → {_fmt(m.get('val_ppl'))} (teacher {_fmt(m.get('val_ppl_teacher'))}).",
            "",
        ]
    rest = [
        (k, v)
        for k, v in _flatten({k: v for k, v in metrics.items() if k not in DISTILL_KEYS and not (k == "eval" and rows)})
    ]
    if rest:
        out += ["| metric | value |", "|---|---|", *[f"| {k} | {_fmt(v)} |" for k, v in rest], ""]
    return out


def _option(value: Any) -> str:
    """An init option for the card: a per-layer mapping is shown once when every layer agrees."""
    if isinstance(value, dict) and value and all(str(k).isdigit() for k in value):
        first = next(iter(value.values()))
        if all(v == first for v in value.values()):
            return f"{_fmt(first)} (every layer)"
        return f"per layer, {len(value)} layers (see xecomla.json)"
    if isinstance(value, dict):
        return ", ".join(f"{k} {_fmt(v)}" for k, v in value.items())
    return _fmt(value)


def _rank_rows(spec: MLASpec) -> list[str]:
    """Per-layer table rows, runs of equal layers collapsed."""
    rows, start = [], 0
    for i in range(1, spec.num_layers + 1):
        if i == spec.num_layers or spec.kv_ranks[i] != spec.kv_ranks[start]:
            layers = str(start) if start == i - 1 else f"{start}–{i - 1}"
            r = spec.kv_ranks[start]
            kind = "original attention" if r is None else f"MLA r={r}, p={spec.rope_dim}"
            original = spec.original_values_per_token_per_layer
            rows.append(f"| {layers} | {kind} | {spec.values_per_token(start)} | {original} |")
            start = i
    return rows


def render_card(
    meta: dict[str, Any],
    spec: MLASpec | None,
    plan: ExportPlan | None,
    history: list[dict[str, Any]],
    export_command: str,
    fmt: str,
    verify: dict[str, Any] | None = None,
) -> str:
    """README.md: front matter, method and options, cache size, metrics, layout or format, lineage."""
    source = meta.get("source") or "unknown"
    name = Path(history[-1]["path"]).name if history else "model"
    shown = f"{DEMO_MODEL_BASE} (`demo`, the model embedded in xecomla)" if source == "demo" else source
    out = _front_matter(source, fmt) + ["", f"# {name} (X-EcoMLA)", ""]
    out.append(
        f"Multi-head latent attention (MLA) upcycled from **{shown}** with xecomla, an implementation of "
        "[X-EcoMLA](https://arxiv.org/abs/2503.11132) (SVD initialisation of the pretrained attention, then "
        "knowledge distillation). Keys and values are cached as one small latent vector per token instead "
        "of per-head K and V."
    )
    out.append("")
    if spec is not None:
        out += _method_section(meta, spec)
        out += _cache_section(spec, plan)
    out += _metrics_section(meta.get("metrics") or {})
    if plan is not None:
        out += _layout_section(plan, verify)
    elif fmt == "xecomla":
        out += [
            "## Format",
            "",
            "xecomla stage checkpoint (MLA layers described by `xecomla.json`); load it with "
            "`xecomla_cli.checkpoint.load_checkpoint` or pass the directory to any `xecomla` command.",
            "",
        ]
    out += ["## How it was made", "", "```sh"]
    for step in history:
        out.append(step["command"] or f"# {step['stage'] or 'stage'} at {step['path']} (command not recorded)")
    out.append(export_command or "xecomla export")
    out += ["```", ""]
    return "\n".join(out)


def _front_matter(source: str, fmt: str) -> list[str]:
    """The Hub's YAML header: library, base model (a Hub id, or the demo's), tags."""
    hub_base = "/" in source and not source.startswith((".", "/", "~")) and not Path(source).exists()
    base_model = source if hub_base else DEMO_MODEL_BASE if source == "demo" else None
    library = "transformers" if fmt == "hf" else "xecomla"
    front = ["---", f"library_name: {library}", "pipeline_tag: text-generation"]
    if base_model:
        front.append(f"base_model: {base_model}")
    front += ["tags:", "- xecomla", "- mla", "- multi-head-latent-attention"]
    if fmt == "hf":
        front.append("- deepseek_v3")
    front.append("---")
    return front


def _method_section(meta: dict[str, Any], spec: MLASpec) -> list[str]:
    """The stage, the init method and every option recorded by init-svd and later stages."""
    stage = meta.get("stage")
    out = [
        "## Method and options",
        "",
        f"- Stage: `{stage}`" + (" (SVD init only, not trained)" if stage == "init-svd" else ""),
        f"- Initialisation method: `{spec.method}`",
        f"- Base attention: {attention_kind(spec.num_heads, spec.num_kv_heads)}, {spec.num_heads} query heads, "
        f"{spec.num_kv_heads} KV heads, head dim {spec.head_dim}, {spec.num_layers} layers, "
        f"hidden {spec.hidden_size}",
        f"- Decoupled RoPE dims p = {spec.rope_dim} (shared RoPE key), no-RoPE dims n = {spec.nope_dim}",
        f"- Low-rank queries: {'q_rank = ' + str(spec.q_rank) if spec.q_rank else 'no'}",
        f"- Latent RMSNorm: {'yes' if spec.latent_norm else 'no (--no-latent-norm, as the paper)'}",
    ]
    out += [f"- `{k}`: {_option(v)}" for k, v in sorted(spec.init_record().items())]
    for later in ("distill", "dpo"):  # stage options recorded by later stages
        recorded = meta.get(later)
        if isinstance(recorded, dict):
            shown = [(k, v) for k, v in _flatten(recorded) if v is not None and len(_fmt(v)) <= 80]
            out.append(f"- {later.capitalize()} options: " + ", ".join(f"`{k}` {_fmt(v)}" for k, v in shown))
    return out


def _cache_section(spec: MLASpec, plan: ExportPlan | None) -> list[str]:
    """Cached values per token, from the spec (and the exported spec), with the per-layer table."""
    total, orig = spec.values_per_token_total, spec.original_values_per_token_total
    out = [
        "",
        "## Cache size",
        "",
        f"Cached values per token (all layers): **{total}** against {orig} for the original "
        f"model: **{spec.compression:.2f}x** smaller KV cache.",
    ]
    if plan is not None:
        exported = plan.exported_spec(spec)
        out.append(
            f"In this DeepSeek-V3 export a serving engine caches kv_lora_rank + qk_rope_head_dim = "
            f"{plan.kv_lora_rank} + {plan.rope_dim} values per layer, {exported.values_per_token_total} per "
            f"token ({exported.compression:.2f}x smaller than the original)."
        )
    out += ["", "| layers | attention | cached values / token | original |", "|---|---|---|---|"]
    return out + _rank_rows(spec) + [""]


def _layout_section(plan: ExportPlan, verify: dict[str, Any] | None) -> list[str]:
    """The DeepSeek-V3 sizes, the plan's choices and notes, the verification, how to load it."""
    out = [
        "## DeepSeek-V3 layout",
        "",
        f"- `model_type: deepseek_v3`, dense MLP in every layer, `kv_lora_rank` {plan.kv_lora_rank}, "
        f"`q_lora_rank` {plan.q_lora_rank}, `qk_rope_head_dim` {plan.rope_dim}, `rope_interleave: true`, "
        f"`attention_bias: {str(plan.attention_bias).lower()}`, weights in {plan.dtype}",
        f"- latent norm: `{plan.latent}`; queries: `{plan.queries}`",
        "- "
        + (
            "No attention biases: loads in stock transformers, vLLM and SGLang."
            if plan.portable
            else "Uses attention biases (identity emulation of the mandatory latent norm): exact in stock "
            "transformers; vLLM, SGLang and llama.cpp drop DeepSeek attention biases, so serve a checkpoint "
            "made with init-svd's default latent norm there (not `--no-latent-norm`)."
        ),
    ]
    out += [f"- {n}" for n in plan.notes]
    if verify:
        out.append(
            "- Verified at export: stock transformers logits match xecomla's to "
            f"{verify['max_abs_logit_diff']:.2e} "
            f"(max |logit| {verify['max_abs_logit']:.3g}; xecomla's own SDPA-vs-eager difference "
            f"{verify.get('noise_sdpa_vs_eager', float('nan')):.2e}) on {verify['tokens']} tokens; greedy "
            f"continuation {'identical' if verify['greedy_tokens_equal'] else 'DIFFERENT'}."
        )
    return out + [
        "",
        "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "",
        'model = AutoModelForCausalLM.from_pretrained("PATH_OR_REPO")  # no trust_remote_code needed',
        'tokenizer = AutoTokenizer.from_pretrained("PATH_OR_REPO")',
        "```",
        "",
    ]
