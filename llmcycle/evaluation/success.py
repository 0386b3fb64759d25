"""Which model to deploy: `llmcycle serve --run best`.

The best run is the completed run with a model folder whose success metric (scope.success_metric, else
the task's headline) is best, among the runs within the scope's budgets: size on disk at most
`size_budget_mb` and — for runs that measured it (optimize variants do) — p95 latency per request at
most `latency_budget_ms`. A run that did not measure its latency is kept, and the choice says so.
"""
from __future__ import annotations

from pathlib import Path

from llmcycle.core.errors import UserError
from llmcycle.evaluation.metrics import HEADLINE, higher_is_better
from llmcycle.models.hub import ADAPTER_CONFIG, BASE_FILE, adapter_base

LATENCY_KEY = "latency_p95_ms"


def folder_mb(path: Path) -> float:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file()) / 2**20


def model_size_mb(model_dir: Path) -> float:
    """Size on disk of what serving the model loads: an adapter folder counts its local base too."""

    size = folder_mb(model_dir)
    if (model_dir / ADAPTER_CONFIG).is_file() and (model_dir / BASE_FILE).is_file():
        base = adapter_base(model_dir)
        if base and Path(base).is_dir():
            size += folder_mb(Path(base))
    return size


def success_metric(project) -> str:
    """The metric that decides success: scope.success_metric, else the task's headline."""

    scope = project.config.scope
    metric = (scope.success_metric if scope and scope.success_metric
              else HEADLINE[project.config.project.task])
    higher_is_better(metric)  # an unknown metric name is a user error, named here
    return metric


def budget_reasons(scope, size_mb: float | None, latency_p95_ms: float | None) -> list[str]:
    """Why a model breaks the scope's budgets; empty when it fits. A figure that was not measured
    (None) breaks no budget: the caller says it was not measured."""
    reasons = []
    size_budget = scope.size_budget_mb if scope else None
    latency_budget = scope.latency_budget_ms if scope else None
    if size_budget is not None and size_mb is not None and size_mb > size_budget:
        reasons.append(f"size {size_mb:.1f} MB > budget {size_budget:g} MB")
    if latency_budget is not None and latency_p95_ms is not None and latency_p95_ms > latency_budget:
        reasons.append(f"p95 latency {latency_p95_ms:.0f} ms > budget {latency_budget:g} ms")
    return reasons


def meets_threshold(scope, metric: str, value) -> bool | None:
    """Whether a value of the success metric reaches scope.success_threshold in the metric's
    direction (at least, or at most for perplexity); None without a threshold or a value."""

    threshold = scope.success_threshold if scope else None
    if threshold is None or not isinstance(value, (int, float)):
        return None
    return value >= threshold if higher_is_better(metric) is not False else value <= threshold


def candidates(project) -> list[dict]:
    """Every completed run with a model folder and the metric: its id, value, size and latency."""
    metric = success_metric(project)
    rows = []
    for rec in project.store().list(status="completed"):
        model_dir = rec.artifacts / "model"
        summary = rec.summary()
        value = summary.get(metric)
        if not isinstance(value, (int, float)) or not model_dir.is_dir():
            continue
        rows.append({"run": rec.id, "stage": rec.stage, "variant": rec.variant, "metric": metric,
                     "value": value, "size_mb": round(model_size_mb(model_dir), 3),
                     "latency_p95_ms": summary.get(LATENCY_KEY), "model_dir": str(model_dir)})
    return rows


def best_run(project) -> dict:
    """The chosen candidate (with `excluded`: the better ones the budgets ruled out, and why)."""

    rows = candidates(project)
    if not rows:
        raise UserError(f"no completed run with a model and an evaluation in {project.store().root}: "
                        "nothing to choose 'best' from (run tune, align or optimize first)")
    sign = 1 if higher_is_better(rows[0]["metric"]) else -1
    excluded = []
    for row in sorted(rows, key=lambda r: -sign * r["value"]):
        reasons = budget_reasons(project.config.scope, row["size_mb"], row["latency_p95_ms"])
        if reasons:
            excluded.append({**row, "why": "; ".join(reasons)})
            continue
        row["latency_measured"] = row["latency_p95_ms"] is not None
        return {**row, "excluded": excluded}
    raise UserError("no run fits the scope's budgets: " + "; ".join(
        f"{r['stage']}/{r['variant']} ({r['run']}): {r['why']}" for r in excluded[:5]))
