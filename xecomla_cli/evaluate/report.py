"""The table `xecomla eval` prints: each metric of the model beside its teacher's or original's,
and the delta (model - reference)."""

from __future__ import annotations

from typing import Any

from rich.table import Table

Row = tuple[str, float | None, float | None]  # (metric, reference value, model value)


def _get(d, *path):
    for p in path:
        if not isinstance(d, dict) or p not in d:
            return None
        d = d[p]
    return d


def comparison_rows(result: dict[str, Any]) -> list[Row]:
    """(metric, teacher value, model value) rows, in display order (delta = model - teacher)."""
    m = result["results"]["model"]
    t = result["results"].get("teacher") or {}
    rows: list[Row] = []
    if "perplexity" in m:
        ppl = m["perplexity"]
        rows.append((f"perplexity ({ppl['data']}, {ppl['tokens']:,} tok)", _get(t, "perplexity", "ppl"), ppl["ppl"]))
    for name, r in m.get("tasks", {}).items():
        for metric in (r["primary"], *(x for x in ("acc", "acc_norm") if x in r and x != r["primary"])):
            rows.append((f"{name} {metric} (n={r['n']})", _get(t, "tasks", name, metric), r[metric]))
    if "average" in m:
        rows.append((f"average ({m['average']['tasks']} tasks)", _get(t, "average", "value"), m["average"]["value"]))
    if "kv_cache" in m:
        rows += _kv_rows(m["kv_cache"], t)
    if "speed" in m:
        s = m["speed"]
        where = f"b={s['batch']}, ctx={s['context']:,}"
        rows.append((f"decode tokens/s ({where})", _get(t, "speed", "decode_tokens_per_s"), s["decode_tokens_per_s"]))
        rows.append(
            (f"attention ms/step ({where})", _get(t, "speed", "attention_ms_per_step"), s["attention_ms_per_step"])
        )
        rows.append((f"prefill s ({where})", _get(t, "speed", "prefill_s"), s["prefill_s"]))
    return rows


def _kv_rows(kv: dict[str, Any], t: dict[str, Any]) -> list[Row]:
    """Bytes per token, GB at the context and batch, compression; the reference is the teacher's
    measurement, else the spec's original size (when that is what the compression used)."""
    from_spec = kv["original_from"] == "spec"
    original_bytes = kv["original_bytes_per_token"] if from_spec else None
    original_gb = round(kv["original_bytes_per_token"] * kv["context"] * kv["batch"] / 1e9, 4) if from_spec else None
    return [
        ("KV cache bytes/token", _get(t, "kv_cache", "bytes_per_token") or original_bytes, kv["bytes_per_token"]),
        (f"KV cache GB @ {kv['context']:,} ctx x {kv['batch']}", _get(t, "kv_cache", "gb") or original_gb, kv["gb"]),
        ("KV compression vs original", _get(t, "kv_cache", "compression") or 1.0, kv["compression"]),
    ]


def format_number(x, signed: bool = False) -> str:
    """'-' for None; 4 decimals below 1, 2 below 1000, none above; thousands separated."""
    if x is None:
        return "-"
    if isinstance(x, float) and abs(x) < 1 and not float(x).is_integer():
        return f"{x:+.4f}" if signed else f"{x:.4f}"
    if isinstance(x, float) and abs(x) < 1000:
        return f"{x:+,.2f}" if signed else f"{x:,.2f}"
    return f"{x:+,.0f}" if signed else f"{x:,.0f}"


def comparison_table(result: dict[str, Any], name: str | None = None) -> Table:
    """The rich table of `comparison_rows`: metric, reference, model and delta columns when there is a
    reference (a teacher or original evaluated in this run, or the spec's original KV size)."""
    has_teacher = result["results"].get("teacher") is not None
    spec_original = not has_teacher and result["mla"] and "kv_cache" in result["results"]["model"]
    compare = has_teacher or spec_original
    title = f"eval: {name or result['model']}"
    if has_teacher:
        title += f"  vs  {result['teacher']} ({result['teacher_role']})"
    table = Table(title=title, title_justify="left")
    table.add_column("metric")
    if compare:
        table.add_column("teacher" if result["teacher_role"] == "teacher" else "original", justify="right")
    table.add_column("model", justify="right")
    if compare:
        table.add_column("delta", justify="right")
    for metric, ref, value in comparison_rows(result):
        cells = [metric]
        if compare:
            cells.append(format_number(ref))
        cells.append(format_number(value))
        if compare:
            cells.append(format_number(value - ref, signed=True) if ref is not None and value is not None else "")
        table.add_row(*cells)
    return table
