"""Rich tables for the reports printed on stderr (numbers come from the report dicts)."""

from __future__ import annotations

from typing import Any

from rich.table import Table


def _gb(x: float) -> str:
    return f"{x:,.3f}" if x < 10 else f"{x:,.1f}"


def architecture_table(report: dict[str, Any]) -> Table:
    a, kv = report["architecture"], report["kv_cache"]
    t = Table(title=f"{report['source']}: architecture", show_header=False, title_justify="left")
    t.add_column(style="bold")
    t.add_column()
    rope = f"theta {a['rope_theta']:g}" if a["rope_theta"] else "-"
    if a["rope_scaling"] and a["rope_scaling"].get("rope_type", "default") != "default":
        rope += f", {a['rope_scaling']['rope_type']} scaling"
    rows = [
        ("family", f"{a['family']} ({', '.join(a['architectures']) or '-'})"),
        ("layers", a["num_layers"]),
        ("hidden size", a["hidden_size"]),
        ("heads / KV heads", f"{a['num_heads']} / {a['num_kv_heads']} ({a['attention']})"),
        ("head dim", a["head_dim"]),
        ("RoPE", rope),
        ("QKV bias", "yes" if a["qkv_bias"] else "no"),
        ("parameters", f"{a['parameters'] / 1e6:,.1f}M ({a['dtype']})"),
        ("KV cache / token / layer", f"{kv['values_per_token_per_layer']} values"),
        ("KV cache / token", f"{kv['values_per_token']:,} values = {kv['bytes_per_token']:,} bytes"),
        (f"KV cache @ {kv['context']:,} ctx x {kv['batch']}", f"{_gb(kv['gb'])} GB"),
    ]
    for k, v in rows:
        t.add_row(k, str(v))
    return t


def budget_table(report: dict[str, Any], per_layer: bool = False) -> Table:
    kv = report["kv_cache"]
    t = Table(
        title=f"Latent rank budget (rope dim p = {report['rope_dim']}; SVD energy of stacked [K; V] per layer)",
        title_justify="left",
    )
    for col in (
        "rank r",
        "cache r+p",
        "compression",
        f"GB @ {kv['context']:,}x{kv['batch']}",
        "energy min",
        "mean",
        "max",
    ):
        t.add_column(col, justify="right")
    if per_layer:
        for i in range(len(report["budget"][0]["energy_per_layer"])):
            t.add_column(f"L{i}", justify="right")
    for row in report["budget"]:
        cells = [
            str(row["rank"]),
            str(row["cache_values_per_token_per_layer"]),
            f"{row['compression']:.2f}x",
            _gb(row["gb"]),
            f"{row['energy_min']:.3f}",
            f"{row['energy_mean']:.3f}",
            f"{row['energy_max']:.3f}",
        ]
        if per_layer:
            cells += [f"{e:.3f}" for e in row["energy_per_layer"]]
        t.add_row(*cells)
    return t


def energy_rank_table(report: dict[str, Any]) -> Table:
    t = Table(title="Smallest rank reaching energy δ (per layer, multiple of 8)", title_justify="left")
    t.add_column("δ", justify="right")
    t.add_column("min", justify="right")
    t.add_column("mean", justify="right")
    t.add_column("max", justify="right")
    t.add_column("per layer")
    for delta, ranks in report["rank_for_energy"].items():
        t.add_row(delta, str(min(ranks)), f"{sum(ranks) / len(ranks):.0f}", str(max(ranks)), " ".join(map(str, ranks)))
    return t


def spec_table(spec, title: str) -> Table:
    t = Table(title=title, show_header=False, title_justify="left")
    t.add_column(style="bold")
    t.add_column()
    ranks = [r for r in spec.kv_ranks if r is not None]
    layers = spec.converted_layers
    t.add_row("converted layers", f"{len(layers)} of {spec.num_layers}")
    t.add_row("latent rank r", str(ranks[0]) if len(set(ranks)) == 1 else f"{min(ranks)}..{max(ranks)} (per layer)")
    t.add_row("rope dim p", str(spec.rope_dim))
    t.add_row("q rank", str(spec.q_rank) if spec.q_rank else "full")
    t.add_row("latent norm", "yes" if spec.latent_norm else "no")
    t.add_row("method", spec.method)
    if spec.rope_frequencies == "default":
        span = f"the {spec.rope_span} fastest pairs" if spec.rope_span else "every pair"
        t.add_row("RoPE", f"default RoPE (the source's scaling not carried: every engine reads it) over {span}")
    if spec.attention_bias:
        errors = (spec.bias_fold or {}).get("attention_error", {})
        worst = f"; attention error per layer up to {max(errors.values()):.2%}" if errors else ""
        t.add_row("q/k/v biases", f"{spec.attention_bias}{worst}")
    t.add_row(
        "cache / token", f"{spec.values_per_token_total:,} values (original {spec.original_values_per_token_total:,})"
    )
    t.add_row("compression", f"{spec.compression:.2f}x")
    return t


def _engine_cell(row: dict[str, Any]) -> str:
    """'4.00x' where the engine keeps the latent, '0.33x expanded' where it caches per-head K/V, 'no' where it
    cannot run the export."""
    if row["values_per_token"] is None:
        return "no"
    return (
        f"{row['compression']:.2f}x"
        + ("" if row["latent"] else " expanded")
        + (f" {row['only']}" if row["only"] else "")
    )


def engines_by_rank_table(report: dict[str, Any]) -> Table:
    """inspect: per candidate rank, the cache compression each engine keeps (engines.engine_support)."""
    e = report["engines"]
    t = Table(title=f"Where the saving holds ({e['assumes']})", title_justify="left", caption=e["caption"])
    t.add_column("rank r", justify="right")
    t.add_column("r+p", justify="right")
    for row in e["by_rank"][0]["rows"]:
        t.add_column(row["engine"], justify="right")
    for item in e["by_rank"]:
        t.add_row(str(item["rank"]), str(item["width"]), *(_engine_cell(r) for r in item["rows"]))
    return t


def engines_table(rows: list[dict[str, Any]], title: str) -> Table:
    """export: each engine's cache for this export, with its condition."""
    t = Table(title=title, title_justify="left")
    for col, justify in (("engine", "left"), ("cache / token", "right"), ("vs original", "right"), ("", "left")):
        t.add_column(col, justify=justify)
    for r in rows:
        values = "-" if r["values_per_token"] is None else f"{r['values_per_token']:,}"
        t.add_row(r["engine"], values, _engine_cell(r), r["note"])
    return t


def memory_plan_table(plan: dict[str, Any]) -> Table:
    """distill --plan: the memory of one process, row by row, the two moments of a step and the verdict."""
    mem = plan["memory"]
    gib = 2**30
    shards = f"{plan['processes']} process(es), " + ("FSDP" if plan["fsdp"] else "DDP" if plan["processes"] > 1 else "")
    title = (
        f"distill --plan: {plan['student']} from {plan['teacher']} on {plan['device']}; {shards.rstrip(', ')}; "
        f"{plan['precision']}, {plan['micro_batch']} x {plan['seq_len']} tokens per forward, "
        f"{plan['accumulation']} micro batch(es) per step"
    )
    t = Table(title=title, title_justify="left")
    t.add_column("per process")
    t.add_column("GiB", justify="right")
    t.add_column("how")
    for name, value in mem["rows"].items():
        if value:
            t.add_row(name, f"{value / gib:,.2f}", mem["formulas"][name])
    t.add_section()
    t.add_row("end of forward", f"{mem['end_of_forward'] / gib:,.2f}", "weights, optimizer, activations, KD loss")
    t.add_row("optimizer step", f"{mem['optimizer_step'] / gib:,.2f}", "weights, optimizer, gradients")
    if mem["backward"]:
        t.add_row("backward", f"{mem['backward'] / gib:,.2f}", "weights, optimizer, gradients, a recomputed layer")
    where = "" if mem["device"] == "cpu" else " (host RAM of each process, not the GPU)"
    t.add_row(
        "loading the models", f"{mem['loading'] / gib:,.2f}", f"a model's file + its weights, and the student's{where}"
    )
    t.add_row("[bold]peak[/]", f"[bold]{mem['peak'] / gib:,.2f}[/]", mem["peak_moment"])
    if plan["device_memory"] is None:
        t.caption = f"{plan['device']}"
    else:
        verdict = "[green]fits[/]" if plan["fits"] else "[red]does not fit[/]"
        t.caption = f"{verdict}: {mem['peak'] / gib:,.2f} of {plan['device_memory'] / gib:,.2f} GiB ({plan['device']})"
    return t
