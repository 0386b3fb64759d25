"""`llmcycle report`: the whole project in one file, to read or to share.

    llmcycle report [-p PROJECT] [-o report.html] [--format html|md] [--json]

It reads the run store only (nothing is trained or evaluated) and shows:

- scope: the use case, the success criterion and budgets, and the run `serve --run best` deploys;
- the lineage of runs: the run whose model each run started from (run.json's `parent`, else the
  summary's, else a `run:STAGE/VARIANT` reference in its config), base → prompt variants → tuned →
  aligned → optimized → deployed;
- each tune / align / optimize / select run's paired difference (evaluation/paired.py) of the headline
  against its parent run and against the best prompt-only run, with its interval and p-value; with
  scope.require_significant_gain, a run that does not beat that baseline significantly fails success;
- every variant (its latest completed run): the headline metric with its 95% bootstrap interval,
  latency p50/p95, peak memory, size on disk, trainable share, and whether it reaches the scope's
  success threshold and fits its budgets (the checks of `serve --run best`, llmcycle/evaluation/success.py:
  fits, breaks, or unknown when a budgeted figure was never measured);
- optimization before -> after: each optimize run's source and result, latency and size measured alike;
- plots (llmcycle/report/plots.py): loss curves, PPO reward and KL, the metric per variant, quality vs
  latency and vs size; a plot without data is left out with a one-line note;
- sample outputs side by side (llmcycle/runs_view.side_by_side).

HTML (the default) is one self-contained file: CSS inline, plots embedded as base64 PNG data URIs, no
script and no network at view time. Markdown (`--format md`, or an output ending in .md) writes the
plots as PNG files in a `<name>_files/` folder next to the .md and links them relatively.
A run whose files are gone (its folder, summary.json, predictions.jsonl, model) is shown as missing;
the rest of the report is still written. Every file is written atomically.
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from llmcycle.core.errors import UserError
from llmcycle.core.store import atomic_write_bytes, atomic_write_text
from llmcycle.evaluation import metrics
from llmcycle.evaluation.compare import side_by_side
from llmcycle.evaluation.harness import PREDICTIONS
from llmcycle.evaluation.paired import best_prompt_run, iteration_deltas
from llmcycle.evaluation.success import (
    best_run,
    budget_check,
    meets_success,
    served_size_mb,
    significant_gain,
    success_metric,
)
from llmcycle.report import plots as rp
from llmcycle.report.render import render_html, render_md
from llmcycle.stages.registry import NAMES

FORMATS = ("html", "md")
# The lifecycle's order, then the runs of commands (eval, augment), for sorting; `scope` runs are plans,
# shown in the scope section only.
ORDER = tuple(n for n in NAMES if n != "scope") + ("eval", "augment")
# Config keys that name the model a stage variant started from (see lifecycle._stage_model_name).
MODEL_REFS = ("source", "base", "policy", "encoder")
N_RESAMPLES, SEED = 1000, 0  # the bootstrap of metrics.compute_all, so a recomputed interval matches


@dataclass
class Item:
    """A run as the report sees it; `rec` is None when its folder is gone but the index names it."""

    id: str
    stage: str
    variant: str
    status: str
    parent: str | None
    rec: object | None
    summary: dict = field(default_factory=dict)
    missing: list[str] = field(default_factory=list)
    predictions: list[dict] | None = None

    @property
    def label(self) -> str:
        return f"{self.stage}/{self.variant}"

    @property
    def short(self) -> str:
        return f"{self.label} ({self.id[-4:]})"


# -- reading the store ------------------------------------------------------------------------------
def _read_item(rec, store) -> Item:
    item = Item(rec.id, rec.stage, rec.variant, rec.status, rec.parent, rec)
    path = rec.dir / "summary.json"
    if path.is_file():
        try:
            item.summary = json.loads(path.read_text())
        except (OSError, ValueError):
            item.summary = None
        if not isinstance(item.summary, dict):
            item.summary = {}
            item.missing.append("summary.json (unreadable)")
    elif rec.status == "completed":
        item.missing.append("summary.json")
    preds = rec.artifacts / PREDICTIONS
    if preds.is_file():
        try:
            item.predictions = [json.loads(line) for line in preds.read_text().splitlines() if line.strip()]
        except (OSError, ValueError):
            item.predictions = None
        if item.predictions is None or not all(isinstance(p, dict) for p in item.predictions):
            item.predictions = None
            item.missing.append("predictions.jsonl (unreadable)")
    elif item.summary.get("headline"):  # every evaluation writes its per-example outputs
        item.missing.append("predictions.jsonl")
    if item.summary.get("model_dir") and not (rec.artifacts / "model").is_dir():
        item.missing.append("model")
    item.parent = rec.parent or _parent_from_refs(item, store)
    return item


def _parent_from_refs(item: Item, store) -> str | None:
    """Older or hand-made runs may lack run.json's parent: take the summary's, else resolve the
    config's `run:` reference (to the run it points at now, which is the best left to know)."""
    if isinstance(item.summary.get("parent"), str):
        return item.summary["parent"]
    for key in MODEL_REFS:
        ref = item.rec.config.get(key) if isinstance(item.rec.config, dict) else None
        if isinstance(ref, str) and ref.startswith("run:"):
            try:
                return store.get(ref[4:]).id
            except UserError:
                return None
    return None


def read_items(store) -> list[Item]:
    """Every run in the folders, then those only the index still names (their folders are gone)."""
    items = [_read_item(rec, store) for rec in store.list()]
    seen = {i.id for i in items}
    for row in store.indexed():
        if row["id"] not in seen:
            items.append(Item(row["id"], row["stage"], row["variant"], row["status"], row["parent"], None,
                              missing=["run folder"]))
    return items


# -- the figures of one variant -------------------------------------------------------------------
def _quality(item: Item):
    """(metric name, value, (low, high) or None, where the interval came from)."""
    s = item.summary
    if isinstance(s.get("headline_value"), (int, float)):
        name, value = s.get("headline"), s["headline_value"]
        if s.get("headline_ci_low") is not None and s.get("headline_ci_high") is not None:
            return name, value, (s["headline_ci_low"], s["headline_ci_high"]), "summary"
        ci = ci_from_predictions(name, item.predictions)
        return name, value, ci, "predictions" if ci else None
    if isinstance(s.get("accuracy"), (int, float)):  # a reward classifier: its held-out accuracy
        return "accuracy", s["accuracy"], None, None
    return None, None, None, None


def ci_from_predictions(name: str, predictions: list[dict] | None) -> tuple[float, float] | None:
    """The seeded 95% bootstrap interval of the headline from the per-example scores the harness
    wrote into predictions.jsonl (macro-F1 from the labels); None when they are not there."""

    if not predictions:
        return None
    scores = [p.get(name) for p in predictions]
    if all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in scores):
        return metrics.bootstrap_ci(scores, n_resamples=N_RESAMPLES, seed=SEED)
    refs = [p.get("references") for p in predictions]
    if name == "macro_f1" and all(isinstance(r, list) and r for r in refs):
        _, per = metrics.classification_scores([p.get("prediction") or "" for p in predictions], refs)
        return metrics.macro_f1_ci(per["label_gold"], per["label_pred"], n_resamples=N_RESAMPLES, seed=SEED)
    return None


def _size(item: Item, by_id: dict) -> tuple[float | None, bool]:
    """(MB on disk, whether it is the parent's model): a prompt or eval run makes no model; what it
    would deploy is the model it evaluated, its parent's."""

    if item.rec is not None and (item.rec.artifacts / "model").is_dir():
        return served_size_mb(item.rec.artifacts / "model"), False
    parent = by_id.get(item.parent)
    if item.stage in ("prompt", "eval") and parent is not None and parent.rec is not None \
            and (parent.rec.artifacts / "model").is_dir():
        return served_size_mb(parent.rec.artifacts / "model"), True
    return None, False


def variant_row(item: Item, by_id: dict, project, metric: str) -> dict:
    s = item.summary
    headline, quality, ci, ci_from = _quality(item)
    size, size_from_parent = _size(item, by_id)
    scope = project.config.scope
    number = lambda key: s.get(key) if isinstance(s.get(key), (int, float)) else None  # noqa: E731
    # scope.require_significant_gain's verdict (None when not asked for, or the run has no success metric)
    gate = significant_gain(project, item.id, metric) if number(metric) is not None and item.rec is not None \
        else None
    row = {"id": item.id, "stage": item.stage, "variant": item.variant, "label": item.label,
           "status": item.status, "headline": headline, "quality": quality, "ci": ci, "ci_from": ci_from,
           "latency_p50_ms": number("latency_p50_ms"), "latency_p95_ms": number("latency_p95_ms"),
           "peak_memory_mb": number("peak_memory_mb"), "size_mb": size, "size_from_parent": size_from_parent,
           "trainable_pct": number("trainable_pct"), "missing": item.missing,
           "hallucinated": number("hallucinated_entity_rate"),
           "hallucinated_ci": [s.get("hallucinated_entity_rate_ci_low"), s.get("hallucinated_entity_rate_ci_high")],
           "success": meets_success(scope, metric, s.get(metric), gate), "gate": gate, "metric_value": number(metric),
           "parent": item.parent, "source": s.get("source"), "source_size_mb": number("source_size_mb"),
           "source_latency_p95_ms": number("source_latency_p95_ms"),
           "weights_mb": number("size_mb"),  # an optimize run's weight files, as source_size_mb counts them
           "n_examples": number("n_examples"), "eval_skipped": number("eval_skipped"),
           "too_few_examples": bool(s.get("too_few_examples"))}
    row["budget"] = budget_check(scope, size, row["latency_p95_ms"]) if headline else None
    return row


def choose_rows(items: list[Item], keep: str | None = None) -> tuple[list[Item], list[Item]]:
    """(one item per stage/variant: its latest completed run, else its latest run; earlier runs).
    A run whose folder is gone gets a row of its own, so it is seen, and so does run `keep` (the
    deployed one, which `serve --run best` may pick from an earlier run of a variant)."""
    chosen: dict[tuple, Item] = {}
    gone = []
    for item in items:
        if item.stage == "scope":
            continue
        if item.rec is None:
            gone.append(item)
            continue
        key = (item.stage, item.variant)
        old = chosen.get(key)
        if old is None or item.status == "completed" or old.status != "completed":
            chosen[key] = item
    chosen_ids = {i.id for i in chosen.values()}
    kept = [i for i in items if i.id == keep and i.id not in chosen_ids]
    rows = sorted([*chosen.values(), *kept], key=_order) + gone
    shown = {i.id for i in rows}
    earlier = [i for i in items if i.stage != "scope" and i.id not in shown]
    return rows, earlier


def _order(item: Item):
    return (ORDER.index(item.stage) if item.stage in ORDER else len(ORDER), item.variant)


# -- lineage --------------------------------------------------------------------------------------
def lineage(items: list[Item], deployed: str | None) -> list[dict]:
    """Trees of {"item" | "base", "children"}: runs under the run whose model they started from.
    Runs without a parent run hang under the model they name (a Hub id, a folder), or stand alone."""
    runs = [i for i in items if i.stage != "scope"]
    ids = {i.id for i in runs}
    children: dict[str | None, list[Item]] = {}
    for i in runs:
        children.setdefault(i.parent if i.parent in ids else None, []).append(i)

    def node(item: Item, seen: frozenset) -> dict:
        kids = [node(k, seen | {item.id}) for k in sorted(children.get(item.id, []), key=_order)
                if k.id not in seen]
        if item.id == deployed:
            kids.append({"deployed": item.id, "children": []})
        return {"item": item, "children": kids}

    roots, bases = [], {}
    for item in sorted(children.get(None, []), key=_order):
        base = next((item.summary.get(k) for k in ("model", *MODEL_REFS) if isinstance(item.summary.get(k), str)),
                    None)
        if item.parent:  # its parent run is not in this store any more
            base = f"run {item.parent} (not in this store)"
        if base and item.stage != "pretrain":
            if base not in bases:
                bases[base] = {"base": base, "children": []}
                roots.append(bases[base])
            bases[base]["children"].append(node(item, frozenset()))
        else:
            roots.append(node(item, frozenset()))
    return roots


# -- putting it together ----------------------------------------------------------------------------
def build(project, *, allow_unmeasured: bool = False) -> dict:
    """Everything the report shows, as data; render_html / render_md turn it into a page. The deployed
    run is `serve --run best`'s choice (with --allow-unmeasured when `allow_unmeasured`)."""

    store = project.store()
    items = read_items(store)
    by_id = {i.id: i for i in items}
    metric = success_metric(project)
    scope = project.config.scope
    view = {"project": project, "store": store.root, "items": items, "metric": metric, "scope": scope,
            "generated": time.strftime("%Y-%m-%d %H:%M"), "rows": [], "earlier": [], "plots": [],
            "examples": [], "deployed": None, "deploy_note": "", "baseline": None}
    if not [i for i in items if i.stage != "scope"]:
        return view
    try:
        view["deployed"] = best_run(project, allow_unmeasured=allow_unmeasured)
    except UserError as exc:
        view["deploy_note"] = str(exc)
    deployed_id = view["deployed"]["run"] if view["deployed"] else None
    chosen, earlier = choose_rows(items, deployed_id)
    latest = {(i.stage, i.variant): i.id for i in chosen if i.rec is not None and i.id != deployed_id}
    view["rows"] = [variant_row(i, by_id, project, metric) for i in chosen]
    view["earlier"] = [variant_row(i, by_id, project, metric) for i in earlier]
    for row in view["rows"] + view["earlier"]:  # a later run of the same variant supersedes it
        row["earlier"] = latest.get((row["stage"], row["variant"]), row["id"]) != row["id"]
    # plots name a variant by stage/variant, and add the run when one variant has two rows
    twice = {label for label in (i.label for i in chosen) if sum(j.label == label for j in chosen) > 1}
    for item, row in zip(chosen, view["rows"]):
        row["label"] = item.short if item.label in twice else item.label
    view["lineage"] = lineage(items, deployed_id)
    view["served"] = served_check(items, deployed_id)
    _add_deltas(view, store, chosen)

    # Quality plots show the project's success metric only: a variant scored on another one (a reward
    # model's accuracy) would share an axis with it and read as comparable.
    scored = [r for r in view["rows"] if r.get("headline") == metric]
    threshold = scope.success_threshold if scope and scored else None
    curves = [(row["label"], i.stage, [m for m in i.rec.metrics() if isinstance(m, dict)])
              for i, row in zip(chosen, view["rows"]) if i.rec is not None]
    view["plots"] = [
        rp.loss_curves(curves), rp.ppo_curves(curves), rp.quality_bars(scored, threshold),
        rp.quality_scatter("quality_vs_latency", scored, "latency_p95_ms", "p95 latency per request (ms)",
                           scope.latency_budget_ms if scope else None, threshold,
                           "no evaluated run measured its latency (optimize variants do)"),
        rp.quality_scatter("quality_vs_size", scored, "size_mb", "size on disk (MB)",
                           scope.size_budget_mb if scope else None, threshold,
                           "no evaluated run has a model folder to measure")]
    view["examples"] = _examples(project, chosen)
    view["selection"] = _selection(chosen)
    return view


def _add_deltas(view: dict, store, chosen: list[Item]) -> None:
    """Each iteration row's paired Δ vs its parent and vs the prompt baseline (evaluation/paired.py), and
    the baseline itself: the best prompt-only run by the success metric, or None (the report says so)."""
    deltas = iteration_deltas(store, [i.rec for i in chosen if i.rec is not None])
    for row in view["rows"]:
        row["deltas"] = deltas.get(row["id"])
    base = best_prompt_run(store, view["metric"])
    view["baseline"] = {"run": base.id, "variant": base.variant, "value": base.summary()[view["metric"]]} \
        if base is not None else None


def served_check(items: list[Item], deployed_id: str | None) -> dict | None:
    """Served ≡ evaluated: the latest completed `eval --endpoint` run of the deployed run (its summary's
    served_run) against the deployed run's own outputs on the examples both scored (by `where`); None
    when there is no such run. Equal greedy outputs show the server generates what was evaluated."""
    by_id = {i.id: i for i in items}
    deployed = by_id.get(deployed_id)
    served = [i for i in items if i.stage == "eval" and i.status == "completed" and i.predictions
              and i.summary.get("endpoint") and i.summary.get("served_run") == deployed_id]
    if deployed is None or not deployed.predictions or not served:
        return None
    outputs = {r.get("where"): r.get("prediction") for r in served[-1].predictions}
    evaluated = {r.get("where"): r.get("prediction") for r in deployed.predictions}
    common = [w for w in evaluated if w in outputs]
    differ = sum(outputs[w] != evaluated[w] for w in common)
    unmatched = len(set(outputs) ^ set(evaluated))
    # compared on the examples both scored: the served evaluation may use another --limit
    return {"run": served[-1].id, "compared": len(common), "differ": differ, "unmatched": unmatched,
            "match": bool(common) and differ == 0}


def _selection(chosen: list[Item]) -> dict | None:
    """The latest select/best choice (its candidates' figures and the reasons), if there is one."""
    best = next((i for i in chosen if i.stage == "select" and "candidates" in i.summary), None)
    return {"run": best.id, **best.summary} if best else None


def _examples(project, chosen: list[Item]) -> list[dict]:
    records = [i.rec for i in chosen if i.rec is not None and i.predictions]
    if not records:
        return []
    n = project.config.evaluate.show_examples if project.config.evaluate else 3
    names = {f"{r.variant} ({r.id[-4:]})": f"{r.stage}/{r.variant} ({r.id[-4:]})" for r in records}
    try:
        examples = side_by_side(records, n)
    except (KeyError, TypeError, ValueError):  # rows without the fields it aligns examples by
        return []
    for ex in examples:
        ex["outputs"] = {names.get(k, k): v for k, v in ex["outputs"].items()}
        ex["invented"] = {names.get(k, k): v for k, v in ex.get("invented", {}).items()}
    return examples


def output_path(project, output: Path | None, fmt: str | None) -> tuple[Path, str]:
    """The file to write and its format (from --format, else the suffix), checked before any work."""
    if fmt is not None and fmt not in FORMATS:
        raise UserError(f"--format must be one of {', '.join(FORMATS)}, got '{fmt}'")
    fmt = fmt or ("md" if output is not None and output.suffix.lower() in (".md", ".markdown") else "html")
    path = Path(output) if output is not None else project.dir / f"report.{fmt}"
    folder = path.parent
    if path.is_dir():
        raise UserError(f"cannot write the report to {path}: it is a folder")
    try:  # `-o out/report.md` makes out/, as any writer of an output file would
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:  # a file where a folder should be, or no permission
        raise UserError(f"cannot write the report to {path}: cannot create folder {folder}: "
                        f"{exc.strerror or exc}") from None
    if not os.access(folder, os.W_OK):
        raise UserError(f"cannot write the report to {path}: folder {folder} is not writable")
    return path, fmt


def write_report(project, output: Path | None = None, fmt: str | None = None, *,
                 allow_unmeasured: bool = False) -> dict:
    """Build and write the report; returns {"report", "runs", "plots", "missing", "deployed"} (the --json
    line; "deployed": the run `serve --run best` picks with its budget check, or why there is none)."""

    path, fmt = output_path(project, output, fmt)
    view = build(project, allow_unmeasured=allow_unmeasured)
    drawn = [p for p in view["plots"] if p.png is not None]
    try:
        if fmt == "html":
            atomic_write_text(path, render_html(view))
        else:
            files = path.with_name(path.stem + "_files")
            if drawn:
                files.mkdir(exist_ok=True)
            for plot in view["plots"]:
                png = files / f"{plot.name}.png"
                if plot.png is not None:
                    atomic_write_bytes(png, plot.png)
                else:
                    png.unlink(missing_ok=True)  # an earlier report's plot that has no data now
            atomic_write_text(path, render_md(view, files.name))
    except OSError as exc:
        raise UserError(f"cannot write the report to {path}: {exc.strerror or exc}") from None
    missing = [{"run": i.id, "stage": i.stage, "variant": i.variant, "missing": i.missing}
               for i in view["items"] if i.missing]
    best = view["deployed"]
    deployed = ({k: best[k] for k in ("run", "stage", "variant", "metric", "value", "size_mb", "latency_p95_ms",
                                      "budget")} if best else {"run": None, "why": view["deploy_note"] or None})
    return {"report": str(path.resolve()), "runs": len(view["items"]), "plots": [p.name for p in drawn],
            "missing": missing, "deployed": deployed}
