"""Which model to deploy: `llmcycle serve --run best`.

The best run is the completed run with a model folder whose success metric (scope.success_metric, else
the task's headline) is best, among the runs within the scope's budgets: size on disk at most
`size_budget_mb` and p95 latency per request at most `latency_budget_ms`. The budget check has three
outcomes: fits, breaks (with the reasons) and unknown (a budget is set but the run never measured that
figure: tune and align runs are not timed, optimize runs are). An unknown run is never taken for one
that fits: `best` passes over it unless asked to (`allow_unmeasured`, the CLI's --allow-unmeasured).
A budget that is not set makes its figure irrelevant.

With scope.require_significant_gain, a run must also beat the best prompt-only run significantly (a
paired 95% difference on the same eval examples, evaluation/paired.py `gain_gate`) to succeed and to be
chosen. A run whose gain cannot be measured (no prompt run, no predictions, no example in common) is
passed over like an unmeasured budget, with the reason, but --allow-unmeasured does not let it through:
that flag is about latency and size, and a gain nobody measured is no gain.
"""
from __future__ import annotations

from pathlib import Path

from llmcycle.core.errors import UserError
from llmcycle.evaluation.metrics import HEADLINE, higher_is_better
from llmcycle.evaluation.paired import gain_gate
from llmcycle.models.hub import ADAPTER_CONFIG, adapter_base

LATENCY_KEY = "latency_p95_ms"
# The scope key that asks for each figure, to name it when the figure is missing.
BUDGET_KEYS = {"size": "scope.size_budget_mb", "p95 latency": "scope.latency_budget_ms"}


def folder_mb(path: Path) -> float:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file()) / 2**20


def local_folder(name: str | None) -> Path | None:
    """A model's folder on this disk: a local folder, or a Hub id's snapshot in the Hugging Face cache;
    None when it is neither (never downloaded here)."""
    if not name:
        return None
    if Path(name).is_dir():
        return Path(name)
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(name, local_files_only=True))
    except Exception:  # noqa: BLE001 - not cached, or not a repo id: either way not on this disk
        return None


def served_size_mb(model_dir: Path) -> float | None:
    """Size on disk of what serving the model loads: an adapter folder counts its base too (a local
    folder, or a Hub id's files in the cache). None when that base is on no local disk: an adapter's
    few MB alone would pass any size budget."""
    size = folder_mb(model_dir)
    if (model_dir / ADAPTER_CONFIG).is_file():  # its base: llmcycle_base.json's, else adapter_config.json's
        base = local_folder(adapter_base(model_dir))
        if base is None:
            return None
        size += folder_mb(base)
    return size


def model_size_mb(model_dir: Path) -> float:
    """served_size_mb, or the folder alone when an adapter's base is not on this disk (select's
    candidates were all just loaded, so theirs are)."""
    size = served_size_mb(model_dir)
    return size if size is not None else folder_mb(model_dir)


def success_metric(project) -> str:
    """The metric that decides success: scope.success_metric, else the task's headline."""

    scope = project.config.scope
    metric = (scope.success_metric if scope and scope.success_metric
              else HEADLINE[project.config.project.task])
    higher_is_better(metric)  # an unknown metric name is a user error, named here
    return metric


def budget_check(scope, size_mb: float | None, latency_p95_ms: float | None) -> dict:
    """The model against the scope's budgets: {"state": "fits" | "breaks" | "unknown", "reasons": why it
    breaks, "missing": figures a set budget needs that were not measured (None)}. One broken budget is
    enough to break; otherwise a missing figure leaves the answer unknown, never "fits". A budget that
    is not set asks for nothing."""
    size_budget = scope.size_budget_mb if scope else None
    latency_budget = scope.latency_budget_ms if scope else None
    reasons, missing = [], []
    if size_budget is not None:
        if size_mb is None:
            missing.append("size")
        elif size_mb > size_budget:
            reasons.append(f"size {size_mb:.1f} MB > budget {size_budget:g} MB")
    if latency_budget is not None:
        if latency_p95_ms is None:
            missing.append("p95 latency")
        elif latency_p95_ms > latency_budget:
            reasons.append(f"p95 latency {latency_p95_ms:.0f} ms > budget {latency_budget:g} ms")
    state = "breaks" if reasons else "unknown" if missing else "fits"
    return {"state": state, "reasons": reasons, "missing": missing}


def budget_text(check: dict) -> str:
    """A check as one phrase: "fits", the reasons it breaks, or which figures are unknown."""
    unmeasured = " and ".join(check["missing"]) + " not measured" if check["missing"] else ""
    if check["state"] == "breaks":
        return "; ".join(check["reasons"]) + (f" ({unmeasured})" if unmeasured else "")
    return f"unknown: {unmeasured}" if check["state"] == "unknown" else "fits"


def meets_threshold(scope, metric: str, value) -> bool | None:
    """Whether a value of the success metric reaches scope.success_threshold in the metric's
    direction (at least, or at most for perplexity); None without a threshold or a value."""

    threshold = scope.success_threshold if scope else None
    if threshold is None or not isinstance(value, (int, float)):
        return None
    return value >= threshold if higher_is_better(metric) is not False else value <= threshold


def meets_success(scope, metric: str, value, gate: dict | None) -> bool | None:
    """The success check: meets_threshold and, with scope.require_significant_gain, `gate` (gain_gate's
    verdict): a failed gate fails; an unknown one leaves success unknown (None) unless the threshold
    already fails; with no threshold set, a passed gate is success. A prompt run's gate is "n/a"."""
    met = meets_threshold(scope, metric, value)
    if not (scope and scope.require_significant_gain) or gate is None or gate["state"] == "n/a":
        return met
    if met is False or gate["state"] == "fails":
        return False
    return None if gate["state"] == "unknown" else True


def significant_gain(project, run_id: str, metric: str) -> dict | None:
    """gain_gate for a run when scope.require_significant_gain asks for it, else None."""
    scope = project.config.scope
    if not (scope and scope.require_significant_gain):
        return None
    store = project.store()
    return gain_gate(store, store.get(run_id), metric)


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
        size = served_size_mb(model_dir)
        rows.append({"run": rec.id, "stage": rec.stage, "variant": rec.variant, "metric": metric,
                     "value": value, "size_mb": round(size, 3) if size is not None else None,
                     "latency_p95_ms": summary.get(LATENCY_KEY), "model_dir": str(model_dir)})
    return rows


def best_run(project, *, allow_unmeasured: bool = False) -> dict:
    """The chosen candidate, with `budget` (its budget_check), `gate` (significant_gain: None unless
    scope.require_significant_gain) and `excluded`: the better runs passed over and why. A run whose
    budget check is unknown is passed over unless `allow_unmeasured`; one without a significant gain
    over the prompt baseline always is."""
    rows = candidates(project)
    if not rows:
        raise UserError(f"no completed run with a model and an evaluation in {project.store().root}: "
                        "nothing to choose 'best' from (run tune, align or optimize first)")
    sign = 1 if higher_is_better(rows[0]["metric"]) else -1
    excluded = []
    for row in sorted(rows, key=lambda r: -sign * r["value"]):
        check = budget_check(project.config.scope, row["size_mb"], row["latency_p95_ms"])
        row.update(budget=check, latency_measured=row["latency_p95_ms"] is not None)
        if not (check["state"] == "fits" or (check["state"] == "unknown" and allow_unmeasured)):
            excluded.append({**row, "why": budget_text(check) + _unmeasured_hint(check)})
            continue
        gate = significant_gain(project, row["run"], row["metric"])  # only now: it reads both predictions
        if gate is None or gate["state"] == "passes":
            return {**row, "gate": gate, "excluded": excluded}
        excluded.append({**row, "gate": gate, "why": gate["why"]})
    raise UserError(_nothing_fits(excluded))


def _unmeasured_hint(check: dict) -> str:
    """For an unknown check: which scope keys ask for the missing figures, and the way out."""
    if check["state"] != "unknown":
        return ""
    keys = " and ".join(BUDGET_KEYS[m] for m in check["missing"])
    return f" ({keys} set; --allow-unmeasured considers it)"


def _nothing_fits(excluded: list[dict]) -> str:
    """The one-line error when no run qualifies; it says when unmeasured runs are all that is left."""
    def listed(rows):
        return "; ".join(f"{r['stage']}/{r['variant']} ({r['run']}): "
                         f"{r['why'] if r.get('gate') else budget_text(r['budget'])}" for r in rows[:5])

    if any(r.get("gate") for r in excluded):
        return ("no run fits the scope's budgets and beats the best prompt-only run significantly "
                "(scope.require_significant_gain): " + listed(excluded))
    unknown = [r for r in excluded if r["budget"]["state"] == "unknown"]
    if not unknown:
        return "no run fits the scope's budgets: " + listed(excluded)
    keys = " / ".join(dict.fromkeys(BUDGET_KEYS[m] for r in unknown for m in r["budget"]["missing"]))
    return ("no measured run fits the scope's budgets; only runs that were not measured might: " + listed(unknown)
            + f". Pass --allow-unmeasured to choose among them, measure them (an optimize variant times and "
            f"sizes its model), or unset {keys}")
