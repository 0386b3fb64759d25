"""Pages for `llmcycle report` (llmcycle/report/build.py builds the data): one self-contained HTML file, or
Markdown with the plots as PNG files beside it.

The content is laid out once as blocks (heading, paragraph, table, tree, plot, example), then each
renderer writes the blocks in its own syntax, so the HTML and Markdown reports cannot drift apart.
"""
from __future__ import annotations

import base64
import html
import re

from llmcycle.core.numbers import number
from llmcycle.core.textsafe import visible
from llmcycle.evaluation.compare import before_after
from llmcycle.evaluation.faithfulness import spans
from llmcycle.evaluation.metrics import higher_is_better
from llmcycle.evaluation.paired import delta_text, p_text
from llmcycle.evaluation.success import budget_text

CSS = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:2em auto;max-width:1280px;
 padding:0 1.5em;color:#222}
h1{font-size:1.6em;margin-bottom:.2em}h2{margin-top:1.8em;border-bottom:1px solid #ddd;padding-bottom:.2em}
.meta{color:#666}code{background:#f3f3f3;padding:0 .25em;border-radius:3px}
table{border-collapse:collapse;margin:.6em 0;font-size:13px}
th,td{border:1px solid #ddd;padding:.3em .55em;text-align:left;vertical-align:top}
th{background:#f6f6f6}td.num{text-align:right;white-space:nowrap}td.nw{white-space:nowrap}
tr:nth-child(even) td{background:#fbfbfb}
.ok{color:#1a7f37}.bad{color:#c62828}.missing{color:#b26a00;font-weight:600}.dim{color:#888}
.unknown{color:#b26a00}
.deployed{color:#6a1b9a;font-weight:600}ul.tree{list-style:none;padding-left:1.2em;border-left:1px dashed #ccc}
ul.tree.top{border-left:none;padding-left:0}ul.tree li{margin:.15em 0}
figure{margin:1em 0}figure img{max-width:100%;border:1px solid #eee}figcaption{color:#555;font-size:12px}
pre{white-space:pre-wrap;margin:0;font:12px/1.4 ui-monospace,Menlo,Consolas,monospace}
details summary{cursor:pointer;color:#444}mark{background:#ffd6d6;color:#a00000}
"""


# -- the content, as blocks -----------------------------------------------------------------------
def _num(value, digits: int = 1, missing: str = "n/a") -> str:
    """A figure with `digits` decimals, by magnitude (llmcycle/core/numbers.py): 1.9e17 stays narrow."""
    return number(float(value), digits) if isinstance(value, (int, float)) else missing


def _quality_cell(row) -> tuple[str, str]:
    if row["quality"] is None:
        return ("missing", "missing") if row["missing"] else ("not evaluated", "dim")
    text = f"{row['headline']} {_num(row['quality'], 3)}"
    if row["ci"]:
        text += f" [{_num(row['ci'][0], 3)}, {_num(row['ci'][1], 3)}]"
        text += "†" if row["ci_from"] == "predictions" else ""
    else:  # neither recorded nor recomputable from per-example scores: say so, never guess
        text += " [CI n/a]"
    if row.get("n_examples") is not None:  # what the figure stands on, and what was left out
        text += f" · n={row['n_examples']}" + (f", {row['eval_skipped']} skipped as too long"
                                               if row.get("eval_skipped") else "")
        if row.get("too_few_examples"):
            return text + " ⚠ fewer than evaluate.min_examples", "unknown"
    return text, "nw"


def _hallucinated_cell(row) -> tuple[str, str]:
    rate, (low, high) = row.get("hallucinated"), row.get("hallucinated_ci") or (None, None)
    if rate is None:
        return "n/a", "dim"
    return _num(rate, 3) + (f" [{_num(low, 3)}, {_num(high, 3)}]" if low is not None else ""), "nw"


def _success_cell(row, metric: str) -> tuple[str, str]:
    gate = row.get("gate")  # scope.require_significant_gain: why it failed, or why it cannot be checked
    why = f" — {gate['why']}" if gate and gate["state"] in ("fails", "unknown") else ""
    if row["success"] is None:
        return ("? unknown" + why, "unknown") if why else ("n/a", "dim")
    # the value is in the quality column already when the success metric is the headline
    value = f" ({metric} {_num(row['metric_value'], 3)})" if metric != row["headline"] else ""
    return ("✓ met" + value, "ok") if row["success"] else ("✗ not met" + value + why, "bad")


def _budget_cell(row, scope) -> tuple[str, str]:
    if not scope or (scope.size_budget_mb is None and scope.latency_budget_ms is None):
        return "no budgets set", "dim"
    check = row["budget"]
    if check is None:
        return "n/a", "dim"
    # an unmeasured figure is unknown, never "fits": `serve --run best` passes such runs over
    mark, cls = {"fits": ("✓ ", "ok"), "breaks": ("✗ ", "bad"), "unknown": ("? ", "unknown")}[check["state"]]
    return mark + budget_text(check), cls


def _row_cells(row, view) -> list:
    deployed = view["deployed"] and view["deployed"]["run"] == row["id"]
    if row["latency_p50_ms"] is None and row["latency_p95_ms"] is None:
        latency = "not measured" if row["quality"] is not None else "n/a"
    else:
        latency = f"{_num(row['latency_p50_ms'])} / {_num(row['latency_p95_ms'])}"
    size = _num(row["size_mb"]) + ("‡" if row["size_from_parent"] else "")
    label = f"{row['stage']}/{row['variant']}" + (" (earlier run)" if row["earlier"] else "")
    label += " ★ deployed" if deployed else ""
    return [(label, "deployed" if deployed else ""),
            (row["id"][-4:], "dim"), row["status"], _quality_cell(row), _hallucinated_cell(row),
            _success_cell(row, view["metric"]),
            _budget_cell(row, view["scope"]), (latency, "num"),
            (_num(row["peak_memory_mb"], 0), "num"), (size, "num"), (_num(row["trainable_pct"], 2), "num"),
            (("missing: " + ", ".join(row["missing"])) if row["missing"] else "", "missing")]


def _criterion(view) -> str:
    scope, metric = view["scope"], view["metric"]
    gain = ", beating the best prompt-only run significantly" if scope and scope.require_significant_gain else ""
    if not scope or scope.success_threshold is None:
        return f"success metric: {metric}{gain} (no threshold set)"
    sign = "≤" if higher_is_better(metric) is False else "≥"
    return f"success: {metric} {sign} {scope.success_threshold:g}{gain}"


def blocks(view) -> list[tuple]:
    """The report's content, in order, as (kind, ...) tuples."""
    out = _scope_blocks(view)
    if not view["rows"]:
        beyond = " beyond the scope plan" if view["items"] else ""
        out.append(("p", f"No runs yet{beyond} — run `llmcycle run` (or a single stage, e.g. `llmcycle prompt`) "
                         f"in `{view['project'].dir}`, then `llmcycle report` again."))
        return out
    out += _deployment_blocks(view)
    if view.get("selection"):
        out += _selection_blocks(view["selection"])
    out += [("h2", "Lineage"), ("p", "Each run under the run whose model it started from (run.json's parent)."),
            ("tree", view["lineage"])]
    out += _variant_blocks(view)
    out += _delta_blocks(view)
    out += _optimize_blocks(view)
    out.append(("h2", "Plots"))
    for plot in view["plots"]:
        out.append(("plot", plot) if plot.png is not None else ("p", f"{plot.title}: omitted — {plot.note}."))
    out += _example_blocks(view["examples"])
    gone = [i for i in view["items"] if i.missing]
    if gone:
        out.append(("h2", "Missing files"))
        out.append(("list", [f"{i.label} `{i.id}`: {', '.join(i.missing)}" for i in gone]))
    return out


def _scope_blocks(view) -> list[tuple]:
    """The title, and the use case with its success criterion and budgets."""
    project, scope = view["project"], view["scope"]
    out = [("h1", f"{project.config.project.name} — lifecycle report"),
           ("meta", f"task {project.config.project.task} · {len(view['items'])} runs in `{view['store']}` · "
                    f"generated {view['generated']} by `llmcycle report`")]
    out.append(("h2", "Scope"))
    if scope and scope.use_case:
        out.append(("p", f"Use case: {scope.use_case}"))
    budgets = [f"{name} ≤ {value:g} {unit}" for name, value, unit in
               (("size on disk", scope.size_budget_mb if scope else None, "MB"),
                ("p95 latency", scope.latency_budget_ms if scope else None, "ms")) if value is not None]
    out.append(("p", _criterion(view) + " · budgets: " + (", ".join(budgets) if budgets else "none set")))
    return out


def _deployment_blocks(view) -> list[tuple]:
    """What `serve --run best` deploys, and the runs it passed over (or why nothing qualifies)."""
    best = view["deployed"]
    if not best:
        return [("p", f"Nothing to deploy: {view['deploy_note']}")]
    latency = f"p95 {_num(best['latency_p95_ms'], 0)} ms" if best["latency_measured"] else "latency not measured"
    size = f"{_num(best['size_mb'])} MB" if best["size_mb"] is not None else "size not measured"
    check = best["budget"]
    budgets = ("within the scope's budgets" if check["state"] == "fits" else
               f"budgets {budget_text(check)} (chosen with --allow-unmeasured)")
    out = [("p", f"Deployed by `llmcycle serve --run best`: {best['stage']}/{best['variant']} "
                 f"(`{best['run']}`), {best['metric']} {_num(best['value'], 3)}, {size}, {latency}, {budgets}.")]
    if best.get("gate"):  # scope.require_significant_gain: how it beat the prompt baseline
        out.append(("p", f"It is {best['gate']['why']}."))
    out += _served_blocks(view.get("served"))
    for skipped in best["excluded"]:
        out.append(("p", f"Passed over {skipped['stage']}/{skipped['variant']} (`{skipped['run']}`): "
                         f"{skipped['why']}."))
    return out


def _served_blocks(served: dict | None) -> list[tuple]:
    """Whether the deployed run, served (`llmcycle eval --endpoint`), generates what it was evaluated on."""
    if not served:
        return []
    unmatched = (f"; {served['unmatched']} examples are in only one of the two runs" if served["unmatched"] else "")
    return [("p", f"Served outputs match the evaluated run: {'yes' if served['match'] else 'no'}, {served['differ']} "
                  f"of {served['compared']} differ (`llmcycle eval --endpoint` run `{served['run']}`{unmatched}).")]


def _variant_blocks(view) -> list[tuple]:
    """The table of each variant's latest completed run (earlier runs folded below it)."""
    out = [("h2", "Variants"),
           ("p", "The latest completed run of each stage variant. Quality is the headline metric with its "
                 "95% bootstrap interval as recorded; † recomputed here from the per-example scores in "
                 "predictions.jsonl (seeded, 1000 resamples); ‡ size of the model it evaluated (its parent "
                 "run's). n/a: the run did not record it. Budgets: ✓ fits, ✗ breaks, ? unknown (a budgeted "
                 "figure the run never measured; `serve --run best` passes it over unless --allow-unmeasured). "
                 "Hallucinated entities: of the names and numbers "
                 "in an output, the share its input does not contain (lower is better; mean over outputs "
                 "with such entities).")]
    headers = ["variant", "run", "status", "quality [95% CI]", "hallucinated entities [95% CI]",
               _criterion(view).split(" (")[0], "budgets",
               "latency p50 / p95 ms", "peak MB", "size MB", "trainable %", "files"]
    out.append(("table", headers, [_row_cells(r, view) for r in view["rows"]]))
    if view["earlier"]:
        out.append(("details", f"Earlier runs of the same variants ({len(view['earlier'])})",
                    ("table", headers, [_row_cells(r, view) for r in view["earlier"]])))
    return out


def _delta_cell(delta: dict | None, note: str | None, by_id: dict) -> tuple[str, str]:
    if delta is None:
        return note or "n/a", "dim"
    against = by_id.get(delta["against"])
    name = against["label"] if against else f"`{delta['against']}`"
    return f"{delta_text(delta)}, {p_text(delta['p'])}, n={delta['n_common']} (vs {name})", "nw"


def _delta_blocks(view) -> list[tuple]:
    """Each iteration's paired Δ of its headline: vs the run it started from and vs the prompt baseline."""
    rows = [r for r in view["rows"] if r.get("deltas")]
    if not rows:
        return []
    base = view["baseline"]
    baseline = (f"The prompt baseline is the best prompt-only run by {view['metric']}: prompt/{base['variant']} "
                f"(`{base['run']}`), {_num(base['value'], 3)}." if base else
                "There is no prompt-only baseline run: no Δ vs prompt baseline can be measured (run `llmcycle "
                "prompt` to have one).")
    by_id = {r["id"]: r for r in view["rows"] + view["earlier"]}
    table = [[(r["label"], ""), (r["id"][-4:], "dim"), (r["headline"] or "n/a", ""),
              _delta_cell(r["deltas"]["vs_parent"], r["deltas"]["notes"].get("vs_parent"), by_id),
              _delta_cell(r["deltas"]["vs_baseline"], r["deltas"]["notes"].get("vs_baseline"), by_id)]
             for r in rows]
    return [("h2", "Δ vs parent / Δ vs prompt baseline"),
            ("p", "Each tune / align / optimize / select run against the run it started from and against the "
                  "prompt baseline, on the eval examples both scored (matched by example): the difference of "
                  "the headline, * when significant at 95% (the paired bootstrap interval excludes 0 and "
                  "p < 0.05; p: exact McNemar for 0/1 scores, else a paired permutation test; 10,000 seeded "
                  "resamples). " + baseline),
            ("table", ["variant", "run", "metric", "Δ vs parent [95% CI]", "Δ vs prompt baseline [95% CI]"], table)]


def _optimize_blocks(view) -> list[tuple]:
    """Each optimize run against its source: latency and size measured alike (before -> after), and
    quality when the source is a run in this report."""
    rows = [r for r in view["rows"] if r["stage"] == "optimize" and r["status"] == "completed"]
    if not rows:
        return []
    by_id = {r["id"]: r for r in view["rows"] + view["earlier"]}
    table = []
    for r in rows:
        source = by_id.get(r["parent"])
        quality = (before_after(source["quality"], r["quality"], "", 3, ratio=False)
                   if source is not None and source["headline"] == r["headline"] else _num(r["quality"], 3))
        table.append([(r["label"], ""), (r.get("source") or "n/a", ""),
                      (before_after(r["source_latency_p95_ms"], r["latency_p95_ms"], "ms"), "nw"),
                      (before_after(r["source_size_mb"], r["weights_mb"], "MB", None), "nw"), (quality, "nw")])
    return [("h2", "Optimization: before → after"),
            ("p", "Each optimize run's source measured as the optimized model is: p95 latency with the same "
                  "prompts, generation settings, samples and device; size as its weight files on disk (an "
                  "adapter's base included). Older runs that did not measure their source show n/a."),
            ("table", ["variant", "source", "p95 latency", "size on disk", "quality"], table)]


def _example_blocks(examples: list[dict]) -> list[tuple]:
    """Sample outputs side by side, invented entities marked."""
    out = [("h2", "Sample outputs side by side")]
    if not examples:
        out.append(("p", "No evaluated run has its predictions.jsonl: no outputs to show."))
    elif any(any(ex.get("invented", {}).values()) for ex in examples):
        out.append(("p", "Marked: names and numbers an output states that its input does not contain."))
    for ex in examples:
        rows = [[("input", "dim"), (ex["input"], "pre")]]
        rows += [[(f"reference {i + 1}" if len(ex["references"]) > 1 else "reference", "dim"), (ref, "pre")]
                 for i, ref in enumerate(ex["references"])]
        rows += [[(label, ""), (text, "marked", ex.get("invented", {}).get(label, [])) if text and text.strip()
                  else ("(empty)", "pre")] for label, text in ex["outputs"].items()]
        out += [("h3", f"Example {ex['index']} ({ex['where']})"), ("table", ["", "text"], rows)]
    return out


def _selection_blocks(sel: dict) -> list[tuple]:
    """The select stage's choice: every candidate with its figures and why it was or was not chosen."""
    metric, probed = sel["metric"], sel.get("after_probe")
    headers = ["candidate", "parameters", "size MB", "serve MB", "latency p50 / p95 ms", "prompts over window",
               "tokenizer", f"{metric} zero-shot"] + ([f"{metric} after probe [95% CI]"] if probed else []) + \
              ["hallucinated entities", "decision"]
    rows = []
    for r in sel["candidates"]:
        if r["status"] != "completed":
            rows.append([(r["candidate"], ""), *[("", "")] * (len(headers) - 2), (r.get("why", ""), "bad")])
            continue
        ci = r.get("probe_ci") or [None, None]
        probe = [(_num(r.get("probe"), 3) + (f" [{_num(ci[0], 3)}, {_num(ci[1], 3)}]" if ci[0] is not None else ""),
                  "nw")]
        rate = r.get("probe_hallucinated_entity_rate") if probed else r.get("hallucinated_entity_rate")
        rows.append([(r["candidate"] + (" ★" if r.get("chosen") else ""), "deployed" if r.get("chosen") else ""),
                     (f"{r['parameters']:,}" if r.get("parameters") else "n/a", "num"), (_num(r.get("size_mb")), "num"),
                     (_num(r.get("serve_memory_mb")), "num"),
                     (f"{_num(r.get('latency_p50_ms'), 0)} / {_num(r.get('latency_p95_ms'), 0)}", "num"),
                     (f"{100 * r.get('overflow_share', 0):.0f}%", "num"),
                     "uncased (outputs lowercase)" if r.get("lowercases") else "cased",
                     (_num(r.get("zero_shot"), 3), "num"), *(probe if probed else []),
                     (_num(rate, 3), "num"), (r.get("why", ""), "")])
    note = (f"Each candidate scored on the eval set with the project's prompt, then after the same short "
            f"fine-tune (the probe); the choice uses {metric} after the probe." if probed else
            f"Each candidate scored zero-shot on the eval set with the project's prompt; the choice uses {metric}.")
    return [("h2", "Base model selection"), ("p", f"{note} Chosen: {sel['chosen']} (`{sel['run']}`); later "
            "stages use it as `run:select/best`."), ("table", headers, rows),
            *[("p", f"Note: {n}") for n in sel.get("notes", [])]]


def _node_text(node, view) -> tuple[str, str]:
    if "base" in node:
        return f"model {node['base']}", "dim"
    if "deployed" in node:
        return "→ deployed: `llmcycle serve --run best` serves this run", "deployed"
    item = node["item"]
    row = next((r for r in view["rows"] + view["earlier"] if r["id"] == item.id), None)
    text = f"{item.label} `{item.id}` — {item.status}"
    if row and row["quality"] is not None:
        text += f", {row['headline']} {_num(row['quality'], 3)}"
    if item.missing:
        return text + " — missing: " + ", ".join(item.missing), "missing"
    if row is not None and row["earlier"]:
        return text + " (earlier run)", "dim"
    return text, ""


# -- HTML -----------------------------------------------------------------------------------------
def _inline(text: str) -> str:
    """Escape, then `code` spans: the only markup the blocks use, and valid Markdown as it is."""
    return re.sub(r"`([^`]+)`", r"<code>\1</code>", html.escape(text))


def _marked(text: str, invented, mark) -> str:
    """`text` with each invented entity passed through `mark`, the rest through `plain`."""

    out, last = [], 0
    for start, end in spans(text, invented):
        out += [mark(text[last:start], False), mark(text[start:end], True)]
        last = end
    return "".join(out + [mark(text[last:], False)])


def _cell_html(cell, tag: str = "td") -> str:
    text, cls = (cell, "") if isinstance(cell, str) else cell[:2]
    if cls in ("pre", "marked"):  # free text: its control characters shown, one symbol for each
        text = visible(text)
    if cls == "pre":  # cls "pre" marks free text (inputs, outputs) shown as written
        return f"<{tag}><pre>{html.escape(text)}</pre></{tag}>"
    if cls == "marked":  # an output, with the entities its input does not contain marked
        body = _marked(text, cell[2], lambda part, hit: f"<mark>{html.escape(part)}</mark>" if hit
                       else html.escape(part))
        return f"<{tag}><pre>{body}</pre></{tag}>"
    attr = f' class="{cls}"' if cls else ""
    return f"<{tag}{attr}>{html.escape(text)}</{tag}>"


def _tree_html(nodes, view, top: bool = False) -> str:
    items = []
    for node in nodes:
        text, cls = _node_text(node, view)
        kids = _tree_html(node["children"], view) if node["children"] else ""
        items.append(f'<li><span class="{cls}">{_inline(text)}</span>{kids}</li>')
    return f'<ul class="tree{" top" if top else ""}">' + "".join(items) + "</ul>"


def _block_html(block, view) -> str:
    kind = block[0]
    if kind in ("h1", "h2", "h3"):
        return f"<{kind}>{_inline(block[1])}</{kind}>"
    if kind in ("p", "meta"):
        return f'<p class="{kind}">{_inline(block[1])}</p>'
    if kind == "list":
        return "<ul>" + "".join(f"<li>{_inline(x)}</li>" for x in block[1]) + "</ul>"
    if kind == "table":
        head = "".join(_cell_html(h, "th") for h in block[1]) if any(block[1]) else ""
        body = "".join("<tr>" + "".join(_cell_html(c) for c in row) + "</tr>" for row in block[2])
        return f"<table>{'<tr>' + head + '</tr>' if head else ''}{body}</table>"
    if kind == "tree":
        return _tree_html(block[1], view, top=True)
    if kind == "plot":
        plot = block[1]
        data = base64.b64encode(plot.png).decode("ascii")
        return (f'<figure><img alt="{html.escape(plot.title)}" src="data:image/png;base64,{data}">'
                f"<figcaption>{html.escape(plot.title)}</figcaption></figure>")
    if kind == "details":
        return f"<details><summary>{_inline(block[1])}</summary>{_block_html(block[2], view)}</details>"
    raise ValueError(f"unknown block {kind}")


def render_html(view) -> str:
    title = html.escape(f"{view['project'].config.project.name} — llmcycle report")
    body = "\n".join(_block_html(b, view) for b in blocks(view))
    return (f'<!doctype html>\n<html lang="en"><head><meta charset="utf-8">'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<title>{title}</title><style>{CSS}</style></head>\n<body>\n{body}\n</body></html>\n")


# -- Markdown -------------------------------------------------------------------------------------
_MD_SPECIAL = re.compile(r"([\\`*_\[\]{}()#+!|~>-])")


def _md_literal(text: str) -> str:
    """Free text (inputs, outputs, references) for a Markdown table cell, shown as written: HTML and
    Markdown syntax escaped (a model's `<script>` or `[x](javascript:...)` stays text), control
    characters visible."""

    return _MD_SPECIAL.sub(r"\\\1", html.escape(visible(text), quote=False))


def _cell_md(cell) -> str:
    text = cell if isinstance(cell, str) else cell[0]
    kind = None if isinstance(cell, str) else cell[1]
    if kind == "marked":
        text = _marked(text, cell[2], lambda part, hit: f"**{_md_literal(part)}**" if hit and part
                       else _md_literal(part))
    elif kind == "pre":
        text = _md_literal(text)
    else:  # the report's own text and figures; names from the project file may hold HTML too
        text = html.escape(text, quote=False).replace("|", "\\|")
    return text.replace("\n", "<br>") or " "


def _tree_md(nodes, view, depth: int = 0) -> list[str]:
    lines = []
    for node in nodes:
        lines.append("  " * depth + "- " + _node_text(node, view)[0])
        lines += _tree_md(node["children"], view, depth + 1)
    return lines


def _block_md(block, view, files: str) -> str:
    kind = block[0]
    if kind in ("h1", "h2", "h3"):
        return "#" * int(kind[1]) + " " + block[1]
    if kind in ("p", "meta"):
        return block[1]
    if kind == "list":
        return "\n".join(f"- {x}" for x in block[1])
    if kind == "table":
        lines = ["| " + " | ".join(_cell_md(h) for h in block[1]) + " |",
                 "|" + "---|" * len(block[1])]
        lines += ["| " + " | ".join(_cell_md(c) for c in row) + " |" for row in block[2]]
        return "\n".join(lines)
    if kind == "tree":
        return "\n".join(_tree_md(block[1], view))
    if kind == "plot":
        return f"![{block[1].title}]({files}/{block[1].name}.png)"
    if kind == "details":
        return f"**{block[1]}**\n\n" + _block_md(block[2], view, files)
    raise ValueError(f"unknown block {kind}")


def render_md(view, files: str) -> str:
    """Markdown; `files` is the folder (relative to the .md) holding the plots' PNG files."""
    return "\n\n".join(_block_md(b, view, files) for b in blocks(view)) + "\n"
