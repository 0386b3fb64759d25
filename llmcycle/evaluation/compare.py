"""Tables for `llmcycle runs list|show|compare`."""
from __future__ import annotations


from rich.table import Table

from llmcycle.core.numbers import number
from llmcycle.core.textsafe import as_text
from llmcycle.evaluation.faithfulness import spans
from llmcycle.evaluation.harness import read_predictions
from llmcycle.evaluation.metrics import higher_is_better
from llmcycle.evaluation.paired import delta_columns
from llmcycle.evaluation.runs_table import candidates_table, list_table, runs_table  # noqa: F401 - list_table for cli


def show(rec, console) -> None:
    console.print(f"[bold]{rec.id}[/]  {rec.stage}.{rec.variant}  status: {rec.status}")
    console.print(f"folder: {rec.dir}")
    if rec.parent:
        console.print(f"parent: {rec.parent}")
    if rec.error:
        console.print("[red]error:[/]", as_text(rec.error))
    for key in ("git_revision", "command"):
        if rec.meta.get(key):
            console.print(f"{key}:", as_text(str(rec.meta[key])))
    versions = rec.meta.get("versions") or {}
    if versions:
        console.print("versions: " + ", ".join(f"{k} {v}" for k, v in versions.items()))
    for title, data in (("config", rec.config), ("summary", rec.summary())):
        if data:
            console.print(_key_values(title, flatten(data)))
    metrics = rec.metrics()
    if metrics:
        last = ", ".join(f"{k} {_fmt(v)}" for k, v in metrics[-1].items() if k != "time")
        console.print(f"{len(metrics)} metric rows; last:", as_text(last))


def _key_values(title: str, data: dict) -> Table:
    """A two-column table of figures, each formatted by its magnitude (an lr of 1.41e-05 is not 0.000)."""
    table = Table(title=title)
    table.add_column("key")
    table.add_column("value")
    for key, value in data.items():
        table.add_row(as_text(key), as_text(_fmt(value)))
    return table


def flatten(data: dict, prefix: str = "", depth: int = 2) -> dict:
    """Nested dicts to dotted keys (two levels), leaving lists and deeper values as they are."""
    out = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and depth > 0:
            out.update(flatten(value, name + ".", depth - 1))
        else:
            out[name] = value
    return out


# Columns of the comparison, in this order when present; other scalar figures follow in --json only.
COMPARE_KEYS = ("rouge1", "rouge2", "rougeL", "rougeLsum", "bleu", "chrf", "exact_match", "f1",
                "accuracy", "macro_f1", "hallucinated_entity_rate", "headline_before", "toxicity_mean", "toxicity_std",
                "toxicity_before_mean", "toxicity_change_pct", "perplexity", "len_words_mean", "stopped_share",
                "prompts_lost_shots", "examples_per_s", "completion_tokens_per_s", "latency_p50_ms",
                "latency_p95_ms", "size_mb", "trainable_pct", "peak_memory_mb",
                "train_wall_s", "final_loss", "parameters", "useful_tokens_per_s")
# The table's columns (a terminal has room for about a dozen); --json and `runs show` have every figure.
TABLE_KEYS = ("rouge1", "rouge2", "bleu", "chrf", "exact_match", "f1", "accuracy", "macro_f1",
              "hallucinated_entity_rate", "headline_before",
              "toxicity_mean", "toxicity_change_pct", "perplexity", "len_words_mean", "prompts_lost_shots",
              "examples_per_s", "latency_p95_ms", "size_mb", "trainable_pct", "peak_memory_mb")
# Short column titles keep the table readable in a terminal; --json keeps the full names.
SHORT = {"len_words_mean": "words", "stopped_share": "stopped", "prompts_lost_shots": "lost shots",
         "examples_per_s": "ex/s", "perplexity": "ppl", "useful_tokens_per_s": "useful tok/s",
         "final_loss": "loss", "parameters": "params", "rougeLsum": "rougeLs",
         "trainable_pct": "trainable %", "peak_memory_mb": "peak MB", "train_wall_s": "train s",
         "headline_before": "before", "toxicity_mean": "toxic", "toxicity_std": "toxic sd",
         "toxicity_before_mean": "toxic before", "toxicity_change_pct": "toxic Δ%",
         "completion_tokens_per_s": "tok/s", "latency_p50_ms": "p50 ms", "latency_p95_ms": "p95 ms",
         "size_mb": "MB", "hallucinated_entity_rate": "halluc."}
# Figures that are not metrics.py names but have a direction.
_DIRECTION = {"examples_per_s": True, "useful_tokens_per_s": True, "toxicity_mean": False,
              "toxicity_change_pct": False, "completion_tokens_per_s": True, "latency_p50_ms": False,
              "latency_p95_ms": False, "size_mb": False}


def compare_rows(records) -> list[dict]:
    """One row per run: identity plus every scalar figure in its summary, and for an iteration run its
    headline's paired difference against its parent and the prompt baseline (paired.delta_columns:
    delta_parent, delta_parent_sig, delta_parent_ci, delta_baseline, ...)."""
    rows = []
    deltas = delta_columns(records)
    for r in records:
        row = {"id": r.id, "stage": r.stage, "variant": r.variant, "status": r.status}
        for key, value in r.summary().items():
            if key in ("headline", "too_few_examples") or (isinstance(value, (int, float))
                                                          and not isinstance(value, bool)):
                row[key] = value
        row.update(deltas.get(r.id, {}))
        rows.append(row)
    return rows


def best_by_metric(rows: list[dict]) -> dict[str, float]:
    """For each metric with a known direction, the best value among the rows."""

    best = {}
    for key in COMPARE_KEYS + ("headline_value",):
        values = [r[key] for r in rows if isinstance(r.get(key), (int, float))]
        if len(values) < 2:
            continue
        try:
            headline = next((r["headline"] for r in rows if r.get("headline")), "")
            direction = higher_is_better(key if key != "headline_value" else headline)
        except Exception:  # noqa: BLE001 - not a metric (timing, counts): nothing to mark
            direction = None
        direction = _DIRECTION.get(key, direction)
        if direction is not None:
            best[key] = max(values) if direction else min(values)
    return best


def compare_table(rows: list[dict], width: int = 100, wide: bool = False) -> tuple[Table, int]:
    """(runs x figures laid out for `width` columns, the width it needs): see evaluation/runs_table.py."""
    headlines = {r.get("headline") for r in rows}
    extra = [k for k in TABLE_KEYS if k not in headlines and any(isinstance(r.get(k), (int, float)) for r in rows)]
    return runs_table(rows, best_by_metric(rows), width, wide=wide, extra_keys=extra, short=SHORT)


def side_by_side(records, n: int = 3) -> list[dict]:
    """The first n evaluated examples with each run's output, aligned by example index."""

    outputs = {}  # run label -> {example's where: prediction row}
    for r in records:
        preds = read_predictions(r.dir)
        if preds:
            outputs[f"{r.variant} ({r.id[-4:]})"] = {p.get("where", p["index"]): p for p in preds}
    if not outputs:
        return []
    # by where, not position: runs that skipped different examples (other windows) still line up
    first_run = next(iter(outputs.values()))
    common = [w for w in first_run if all(w in rows for rows in outputs.values())][:n]
    examples = []
    for idx in common:
        first = first_run[idx]
        examples.append({"index": first["index"], "where": first["where"], "input": first["input"],
                         "references": first["references"],
                         "outputs": {label: rows[idx]["prediction"] for label, rows in outputs.items()},
                         # the output's entities its input lacks (faithfulness.py), to mark them
                         "invented": {label: rows[idx].get("invented_entities") or []
                                      for label, rows in outputs.items()}})
    return examples


def marked(text: str, invented):
    """The output as rich Text with its invented entities in red (never parsed as markup)."""

    out = as_text(text)  # one symbol for each control character: the spans' offsets hold
    for start, end in spans(text, invented):
        out.stylize("bold red underline", start, end)
    return out


def print_side_by_side(examples: list[dict], console, width: int = 400) -> None:
    """Each example's input, references and outputs, printed as text (data may look like markup)."""

    for ex in examples:
        table = Table(title=as_text(f"example {ex['index']} ({ex['where']})"), show_header=False, expand=True)
        table.add_column("", style="bold", no_wrap=True)
        table.add_column("")
        text = ex["input"]
        table.add_row("input", as_text(text if len(text) <= width else text[:width] + " …"))
        for i, ref in enumerate(ex["references"]):
            table.add_row("reference" + (f" {i + 1}" if len(ex["references"]) > 1 else ""), as_text(ref))
        for label, output in ex["outputs"].items():
            cell = marked(output, ex.get("invented", {}).get(label, [])) if output else "[dim](empty)[/]"
            table.add_row(as_text(label), cell)
        console.print(table)
    if any(any(ex.get("invented", {}).values()) for ex in examples):
        console.print("[dim]red: entities (names, numbers) the output states but its input does not contain[/]")


def compare(records, console, n_examples: int = 3, wide: bool = False) -> None:
    """The whole comparison: the metrics table, then examples side by side."""
    width = console.width
    table, needed = compare_table(compare_rows(records), width, wide)
    if wide and needed > width:  # --wide asked for every figure: the table takes the width it needs
        console.width = needed
    try:
        console.print(table)
    finally:
        console.width = width
    print_side_by_side(side_by_side(records, n_examples), console)


def _fmt(value) -> str:
    if isinstance(value, float):
        return number(value)
    if isinstance(value, (list, tuple)) and len(str(value)) > 60:
        return f"[{len(value)} items]"
    return str(value)


def before_after(before, after, unit: str = "", digits: int | None = 1, ratio: bool = True) -> str:
    """"120.0 → 45.6 ms (0.38×)": a figure of a source and of the model made from it, measured alike;
    an unmeasured one shows as n/a, never as a number."""
    text = f"{number(before, digits)} → {number(after, digits)}" + (f" {unit}" if unit else "")
    if ratio and isinstance(before, (int, float)) and isinstance(after, (int, float)) and before:
        text += f" ({after / before:.2f}×)"
    return text


def optimize_lines(summary: dict) -> list[str]:
    """An optimize run's before -> after (latency and size measured alike), for the CLI; [] for others."""
    if "source_size_mb" not in summary and "source_latency_p95_ms" not in summary:
        return []
    latency = before_after(summary.get("source_latency_p95_ms"), summary.get("latency_p95_ms"), "ms")
    return [f"p95 latency: {latency}",
            f"size on disk: {before_after(summary.get('source_size_mb'), summary.get('size_mb'), 'MB', None)}"]


def select_table(summary: dict, width: int = 100) -> Table:
    """`select/best`'s candidates with their figures (the reasons are `select_reasons`), fitted to `width`."""
    return candidates_table(summary, width)


def select_reasons(summary: dict) -> list[str]:
    """One line per candidate: why it was or was not chosen."""
    return [f"{row['candidate']}: {row.get('why', row['status'])}" for row in summary["candidates"]]
