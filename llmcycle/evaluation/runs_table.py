"""The side-by-side table of runs, laid out for the terminal it is printed on.

A run's figures are many (ROUGE-1/2/L/Lsum, BLEU, chrF, perplexity, speed, memory, ...), a terminal is
80-120 columns: given every figure a column, rich squeezes each to `ro…`. So the table keeps to what
decides between iterations: the run, its headline with the 95% interval, the examples it stands on,
its paired difference against its parent and against the best prompt-only run (`evaluation.paired`,
* = significant at 95%), the hallucinated-entity rate, size and p95 latency. Columns that still do not
fit are left out, lowest priority first, and named under the table; a long run name is wrapped after
its separators onto a second line (and cut from the middle only if that is not enough). `--wide` shows
every figure (as wide as it takes); `--json` has them all. `runs list` and select's candidates are laid
out the same way (`layout`).
"""
from __future__ import annotations

import re
import time
from dataclasses import dataclass
from typing import Callable

from rich import box
from rich.table import Table

from llmcycle.core.numbers import number

GAP = 3  # a SIMPLE_HEAD table pads each cell with a space on either side, plus a separator (a space)
LABEL_ROOMY = 24  # a variant name is shortened to this before any figure is left out
LABEL_MIN = 12  # and to this, never shorter, before the essential figures are
ESSENTIAL = 80  # the columns above: kept before long names; --wide's other figures are not


@dataclass
class Column:
    title: str
    cell: Callable[[dict], str]  # the plain text of a row's cell
    priority: int  # when the table is too wide, the lowest priority goes first
    justify: str = "right"
    style: Callable[[dict, str], str] | None = None  # markup around a cell (best values, warnings)

    def width(self, rows: list[dict]) -> int:
        return max([len(self.title), *(len(self.cell(r)) for r in rows)])  # cells and headers never wrap


def shorten(text: str, width: int) -> str:
    """`text` cut from the middle to `width` characters: both ends of a name say the most."""
    if len(text) <= width:
        return text
    head = (width - 1) // 2
    return text[:head] + "…" + text[len(text) - (width - 1 - head):]


def wrap_name(text: str, width: int, lines: int = 2) -> str:
    """A run name over `width` characters, on up to `lines` lines broken after its separators
    ("prompt/course.1shot." / "first.greedy"): every part of the name that tells variants apart stays;
    what does not fit even so is cut from the middle of the last line."""
    out = [""]
    for part in re.findall(r"[^./_ -]+[./_ -]*|[./_ -]+", text):
        if out[-1] and len(out[-1]) + len(part) > width and len(out) < lines:
            out.append("")
        out[-1] += part
    return "\n".join(shorten(line, width) for line in out)


def _label(rows: list[dict]) -> Callable[[dict], str]:
    """stage/variant when several stages are shown, the run id's end when a name repeats."""
    stages = len({r["stage"] for r in rows}) > 1

    def name(r: dict) -> str:
        return f"{r['stage']}/{r['variant']}" if stages else r["variant"]

    names = [name(r) for r in rows]
    return lambda r: name(r) + (f" ({r['id'][-4:]})" if names.count(name(r)) > 1 else "")


def _delta(key: str) -> Callable[[dict], str]:
    def cell(r: dict) -> str:
        value = r.get(key)
        if not isinstance(value, (int, float)):
            return ""
        return f"{value:+.3f}" + ("*" if r.get(f"{key}_sig") else "")
    return cell


def _figure(key: str, digits: int | None = None) -> Callable[[dict], str]:
    return lambda r: number(r[key], digits) if isinstance(r.get(key), (int, float)) else ""


def _examples(r: dict) -> str:
    n = r.get("n_examples")
    if not isinstance(n, int):
        return ""
    return f"{n}" + (f" -{r['eval_skipped']}" if r.get("eval_skipped") else "") + (" !" if r.get("too_few_examples")
                                                                                   else "")


def _interval(r: dict) -> str:
    low, high = r.get("headline_ci_low"), r.get("headline_ci_high")
    return f"{number(low, 3)}–{number(high, 3)}" if isinstance(low, (int, float)) else ""


def columns(rows: list[dict], best: dict, extra_keys: list[str], short: dict) -> list[Column]:
    """Every column the rows have a value for, in display order, each with its priority."""
    def marked(key):
        return lambda r, text: f"[bold green]{text}[/]" if text and r.get(key) == best.get(key) else text

    headline = "/".join(sorted({r["headline"] for r in rows if r.get("headline")})) or "headline"
    cols = [Column("run", _label(rows), 100, "left"),
            Column(headline, lambda r: _figure("headline_value", 3)(r) + (
                " *" if r.get("headline_value") is not None and r.get("headline_value") == best.get("headline_value")
                else ""), 99, style=marked("headline_value")),
            Column("95% CI", _interval, 90),
            Column("n", _examples, 84, style=lambda r, t: f"[yellow]{t}[/]" if r.get("too_few_examples") else t),
            Column("Δ parent", _delta("delta_parent"), 86),
            Column("Δ prompt", _delta("delta_baseline"), 85),
            Column("halluc.", _figure("hallucinated_entity_rate", 3), 83),
            Column("MB", _figure("size_mb", 1), 82, style=marked("size_mb")),
            Column("p95 ms", _figure("latency_p95_ms", 0), 81, style=marked("latency_p95_ms"))]
    shown = {"hallucinated_entity_rate", "size_mb", "latency_p95_ms"}
    cols += [Column(short.get(k, k), _figure(k), 10, style=marked(k)) for k in extra_keys if k not in shown]
    return [c for c in cols if c.priority >= 99 or any(c.cell(r) for r in rows)]


def fit(cols: list[Column], rows: list[dict], width: int, keep_name: bool = False
        ) -> tuple[list[Column], list[Column], int]:
    """(columns kept, columns left out, name width) for a table of at most `width` characters: the name
    column narrows to LABEL_ROOMY (names wrap onto a second line), then the least important figures leave
    (below ESSENTIAL), then the name narrows to LABEL_MIN, then the rest leave but the second column.
    keep_name: the names keep their width (run ids must stay whole, to be copied)."""
    kept, label = list(cols), cols[0].width(rows)

    def total() -> int:
        return 1 + sum((label if c is kept[0] else c.width(rows)) + GAP for c in kept)

    def shrink(floor: int) -> None:  # by what is too much, down to floor at most
        nonlocal label
        if label > floor:
            label = max(floor, label - max(0, total() - width))

    def drop(below: int) -> None:
        while total() > width and min(c.priority for c in kept[1:]) < below:
            kept.remove(min(kept[1:], key=lambda c: c.priority))

    natural = label
    shrink(natural if keep_name else LABEL_ROOMY)
    drop(ESSENTIAL)
    shrink(natural if keep_name else LABEL_MIN)
    drop(99)
    label = min(natural, label + max(0, width - total()))  # room a dropped column left goes to the names
    return kept, [c for c in cols if c not in kept], label


def layout(cols: list[Column], rows: list[dict], width: int, title: str, *, wide: bool = False,
           note: str = "--wide shows all", keep_name: bool = False) -> tuple[Table, int]:
    """(a table of `cols` x `rows` fitted to `width` as `fit` says, the width it needs). The first column
    is the name column: wrapped, never cut while it fits. `wide`: every column, as wide as it takes."""
    kept, dropped, label = (cols, [], cols[0].width(rows)) if wide else fit(cols, rows, width, keep_name)
    table = Table(title=title, box=box.SIMPLE_HEAD, title_justify="left", min_width=min(len(title), width))
    for c in kept:
        table.add_column(c.title, justify=c.justify, no_wrap=c is not kept[0] or keep_name,
                         max_width=label if c is kept[0] else None)
    for r in rows:
        cells = []
        for c in kept:
            text = wrap_name(c.cell(r), label) if c is kept[0] and not keep_name else c.cell(r)
            cells.append(c.style(r, text) if c.style and text else _plain(text))
        table.add_row(*cells)
    if dropped:
        table.caption = f"hidden at this width: {', '.join(c.title for c in dropped)} ({note})"
    return table, 1 + sum((label if c is kept[0] else c.width(rows)) + GAP for c in kept)


def runs_table(rows: list[dict], best: dict, width: int, *, wide: bool = False, extra_keys=(),
               short: dict | None = None) -> tuple[Table, int]:
    """(the table, the width it needs). Narrow terminals lose the least important columns, named in the
    caption; `wide` keeps every figure in `extra_keys` too and takes the width it needs."""
    # without a headline (pretraining runs) the chosen columns say nothing: the figures they have do
    evaluated = any(r.get("headline") for r in rows)
    cols = columns(rows, best, list(extra_keys) if wide or not evaluated else [], short or {})
    return layout(cols, rows, width, "runs side by side (* best; Δ: paired difference, * significant at 95%)",
                  wide=wide)


def candidates_table(summary: dict, width: int) -> Table:
    """select/best's candidates with their figures, fitted to `width` (the reasons are printed apart)."""
    def ci(r):
        low, high = r.get("probe_ci") or [None, None]
        return f"{low:.2f}–{high:.2f}" if isinstance(low, (int, float)) else ""

    probed = summary.get("after_probe")
    rate = "probe_hallucinated_entity_rate" if probed else "hallucinated_entity_rate"
    rows = [{**r, "name": ("* " if r.get("chosen") else "") + r["candidate"],
             "case": "" if r["status"] != "completed" else "uncased" if r.get("lowercases") else "cased",
             "over": f"{100 * r.get('overflow_share', 0):.0f}%" if r["status"] == "completed" else r["status"]}
            for r in summary["candidates"]]
    cols = [Column("candidate", lambda r: r["name"], 100, "left"),
            Column("0-shot", _figure("zero_shot", 3), 97),
            *([Column("probe", _figure("probe", 3), 98), Column("95% CI", ci, 90)] if probed else []),
            Column("halluc.", _figure(rate, 2), 88), Column("params", lambda r: _count(r.get("parameters")), 87),
            Column("MB", _figure("size_mb", 1), 86), Column("p95 ms", _figure("latency_p95_ms", 0), 85),
            Column("over", lambda r: r["over"], 84), Column("case", lambda r: r["case"], 60, "left")]
    title = f"select: {summary['metric']} of each candidate on the eval set (* chosen)"
    return layout(cols, rows, width, title, note="--json has them")[0]


def list_table(runs, width: int) -> Table:
    """`runs list`: every run id whole (to be copied), its status and when; the parent, stage and
    variant as the width allows (the id holds the stage and variant already)."""
    colours = {"completed": "green", "failed": "red", "incomplete": "yellow", "running": "cyan"}
    rows = [{"id": r.id, "stage": r.stage, "variant": r.variant, "status": r.status, "parent": r.parent or "",
             "created": time.strftime("%m-%d %H:%M:%S", time.localtime(r.created)) if r.created else "",
             "duration": f"{r.finished - r.created:.1f} s" if r.finished else ""} for r in runs]
    cols = [Column("id", lambda r: r["id"], 100, "left"),
            Column("status", lambda r: r["status"], 98, "left",
                   style=lambda r, t: f"[{colours.get(r['status'], 'white')}]{t}[/]"),
            Column("created", lambda r: r["created"], 97, "left"), Column("duration", lambda r: r["duration"], 96),
            Column("parent", lambda r: r["parent"], 70, "left"), Column("stage", lambda r: r["stage"], 20, "left"),
            Column("variant", lambda r: r["variant"], 10, "left")]
    cols = [c for c in cols if c.priority >= 98 or any(c.cell(r) for r in rows)]  # no parent at all: no column
    return layout(cols, rows, width, "runs", keep_name=True, note="the id holds the stage and variant")[0]


def _count(n) -> str:
    """12,345,678 -> 12.3M: parameter counts at a glance."""
    if not isinstance(n, (int, float)):
        return ""
    for unit, size in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= size:
            return f"{n / size:.1f}{unit}"
    return str(int(n))


def _plain(text: str) -> str:
    """Cell text is ours (names, numbers), but a variant name could hold '[': escape markup."""
    from rich.markup import escape

    return escape(text)
