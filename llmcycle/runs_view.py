"""Tables for `llmcycle runs list|show|compare`."""
from __future__ import annotations

import time

from rich.table import Table


def _when(ts: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts)) if ts else ""


def list_table(runs) -> Table:
    table = Table(title="runs")
    for col in ("id", "stage", "variant", "status", "parent", "created", "duration"):
        table.add_column(col, no_wrap=col == "id")  # ids must stay copy-pasteable
    colours = {"completed": "green", "failed": "red", "incomplete": "yellow", "running": "cyan"}
    for r in runs:
        duration = f"{r.finished - r.created:.1f} s" if r.finished else ""
        table.add_row(r.id, r.stage, r.variant, f"[{colours.get(r.status, 'white')}]{r.status}[/]",
                      r.parent or "", _when(r.created), duration)
    return table


def show(rec, console) -> None:
    console.print(f"[bold]{rec.id}[/]  {rec.stage}.{rec.variant}  status: {rec.status}")
    console.print(f"folder: {rec.dir}")
    if rec.parent:
        console.print(f"parent: {rec.parent}")
    if rec.error:
        console.print(f"[red]error:[/] {rec.error}")
    for key in ("git_revision", "command"):
        if rec.meta.get(key):
            console.print(f"{key}: {rec.meta[key]}")
    versions = rec.meta.get("versions") or {}
    if versions:
        console.print("versions: " + ", ".join(f"{k} {v}" for k, v in versions.items()))
    summary = rec.summary()
    if summary:
        table = Table(title="summary")
        table.add_column("key")
        table.add_column("value")
        for key, value in flatten(summary).items():
            table.add_row(key, _fmt(value))
        console.print(table)
    metrics = rec.metrics()
    if metrics:
        console.print(f"{len(metrics)} metric rows; last: {metrics[-1]}")


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


def compare_rows(records) -> list[dict]:
    """One row per run: identity plus every scalar figure in its summary."""
    rows = []
    for r in records:
        row = {"id": r.id, "stage": r.stage, "variant": r.variant, "status": r.status}
        for key, value in r.summary().items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                row[key] = value
        rows.append(row)
    return rows


def compare_table(rows: list[dict]) -> Table:
    keys = []
    for row in rows:
        keys += [k for k in row if k not in keys]
    table = Table(title="runs side by side")
    for key in keys:
        table.add_column(key, justify="left" if key in ("id", "stage", "variant", "status") else "right",
                         no_wrap=key == "id")
    for row in rows:
        table.add_row(*(_fmt(row.get(k, "")) for k in keys))
    return table


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (list, tuple)) and len(str(value)) > 60:
        return f"[{len(value)} items]"
    return str(value)
