"""Paired comparison of two runs scored on the same eval examples, and what each iteration gained.

Two runs' predictions.jsonl rows are matched by example: its `where` and its references (the same line of
an edited data file is another example). On the examples in common, for the headline and every
per-example metric both files hold, the difference B - A of the two means comes with:

- a paired bootstrap 95% interval: percentile, the examples resampled jointly (scipy.stats.bootstrap);
- a two-sided p-value: exact McNemar for 0/1 scores (exact_match, accuracy: a binomial test on the
  examples where exactly one run is right), else a paired permutation test (each example's two scores
  swapped at random, scipy.stats.permutation_test; exact when 2^n is at most the resamples);
- how many examples got better, worse or stayed tied, and the most changed ones.

macro-F1 is no mean over examples, so its interval and test recompute it from the labels on every
resample; its better / worse / tied count correct answers. Everything is seeded (10,000 resamples):
the same two runs give the same numbers. `significant` asks for both: the interval excludes 0 and
p < 0.05 (the bootstrap and the test may disagree at the edge; then it is not significant).

`iteration_deltas` gives each tune / align / optimize / select run its headline's paired difference
against its parent run and against the prompt baseline: the completed `prompt` run with the best
headline. Only prompt runs are the baseline, not `eval` runs of the base model: a prompt run is the
base model with the project's best prompt, the cheap alternative every training iteration must beat,
and an `eval` run may evaluate any model. `gain_gate` is scope.require_significant_gain's check
(evaluation/success.py): with no prompt run its answer is "unknown", never a pass.
"""
from __future__ import annotations

import hashlib
import json

from rich import box
from rich.table import Table

from llmcycle.core.errors import UserError
from llmcycle.core.numbers import number
from llmcycle.core.store import RunStore
from llmcycle.core.textsafe import as_text
from llmcycle.evaluation.harness import PREDICTIONS, read_predictions
from llmcycle.evaluation.metrics import METRIC_NAMES, classification_scores, higher_is_better, macro_f1_rows

N_RESAMPLES, SEED, ALPHA = 10_000, 0, 0.05
BINARY = ("exact_match", "accuracy")  # 0/1 per example: exact McNemar
ITERATION_STAGES = ("tune", "align", "optimize", "select")
BASELINE_STAGE = "prompt"
HEAD = 160  # characters of an input shown with a changed example
_CELLS = 2_000_000  # values per resampling batch (16 MB of floats): bounded memory on a large eval set
_CACHE: dict[tuple, dict] = {}  # headline_delta's results while both predictions files are unchanged


# -- statistics (pure) ------------------------------------------------------------------------------
def _mean_delta(x, y, axis=-1):
    # each difference rounded to 1e-12 first: 0.41 - 0.40 and 0.39 - 0.40 then cancel exactly, so a swap
    # that changes nothing gives the same statistic (float noise would make it count as more extreme)
    import numpy as np

    return np.round(y - x, 12).mean(axis=axis)


def _batch(n: int) -> int:
    return max(1, _CELLS // max(n, 1))


def _rng(seed: int):
    import numpy as np

    return np.random.default_rng(seed)


def bootstrap_interval(a, b, stat=_mean_delta, n_resamples: int = N_RESAMPLES, seed: int = SEED,
                       alpha: float = ALPHA) -> tuple[float, float] | None:
    """Percentile-bootstrap (1 - alpha) interval of stat(a, b) with the examples resampled jointly (the
    pairing kept); None for fewer than two examples (there is nothing to resample)."""
    from scipy.stats import bootstrap

    if len(a) < 2:
        return None
    res = bootstrap((a, b), stat, paired=True, vectorized=True, method="percentile", n_resamples=n_resamples,
                    confidence_level=1 - alpha, batch=_batch(len(a)), rng=_rng(seed))
    return float(res.confidence_interval.low), float(res.confidence_interval.high)


def permutation_p(a, b, stat=_mean_delta, n_resamples: int = N_RESAMPLES, seed: int = SEED) -> float:
    """Two-sided p-value of stat(a, b) under "the two runs are exchangeable on every example": each
    example's pair swapped at random (all 2^n swaps when that is at most n_resamples)."""
    from scipy.stats import permutation_test

    if len(a) < 2:  # one example: its two swaps give |stat| alike, so p is exactly 1 (scipy refuses n = 1)
        return 1.0
    res = permutation_test((a, b), stat, permutation_type="samples", vectorized=True, n_resamples=n_resamples,
                           batch=_batch(len(a)), rng=_rng(seed))
    return float(res.pvalue)


def mcnemar_p(a, b) -> float:
    """Exact McNemar: of the examples exactly one run gets right, B's share against 1/2 (binomial)."""
    from scipy.stats import binomtest

    only_a = sum(x == 1 and y == 0 for x, y in zip(a, b))
    only_b = sum(x == 0 and y == 1 for x, y in zip(a, b))
    return 1.0 if only_a + only_b == 0 else float(binomtest(only_b, only_a + only_b, 0.5).pvalue)


def outcome_counts(a, b, metric: str) -> dict:
    """Examples B does better / worse / the same on than A, in the metric's direction (a score that is no
    registered metric, such as an alignment reward, is better higher)."""
    sign = -1 if metric in METRIC_NAMES and higher_is_better(metric) is False else 1
    gains = [sign * (y - x) for x, y in zip(a, b)]
    return {"better": int(sum(g > 0 for g in gains)), "worse": int(sum(g < 0 for g in gains)),
            "tied": int(sum(g == 0 for g in gains))}


def significant(ci, p, alpha: float = ALPHA) -> bool:
    return ci is not None and (ci[0] > 0 or ci[1] < 0) and p is not None and p < alpha


def _result(metric: str, mean_a: float, mean_b: float, ci, p: float, test: str, counts: dict, alpha: float) -> dict:
    return {"metric": metric, "a": mean_a, "b": mean_b, "delta": mean_b - mean_a,
            "ci": list(ci) if ci is not None else None, "p": p, "test": test,
            "n": counts["better"] + counts["worse"] + counts["tied"], **counts,
            "significant": significant(ci, p, alpha)}


def compare_scores(a, b, metric: str, n_resamples: int = N_RESAMPLES, seed: int = SEED,
                   alpha: float = ALPHA) -> dict:
    """B - A of the mean of per-example scores: interval, p-value (McNemar for 0/1 metrics) and counts."""
    import numpy as np

    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    binary = metric in BINARY
    ci = bootstrap_interval(a, b, n_resamples=n_resamples, seed=seed, alpha=alpha)
    p = mcnemar_p(a, b) if binary else permutation_p(a, b, n_resamples=n_resamples, seed=seed)
    return _result(metric, float(a.mean()), float(b.mean()), ci, p, "McNemar exact" if binary else "permutation",
                   outcome_counts(a, b, metric), alpha)


def compare_macro_f1(labels_a: tuple, labels_b: tuple, n_resamples: int = N_RESAMPLES, seed: int = SEED,
                     alpha: float = ALPHA) -> dict:
    """B - A of macro-F1 from each run's (gold, predicted, correct) labels, recomputed on every resample
    and every swap; better / worse / tied count correct answers."""
    import numpy as np

    (gold_a, pred_a, right_a), (gold_b, pred_b, right_b) = labels_a, labels_b
    classes = {c: i for i, c in enumerate(sorted(set(gold_a) | set(gold_b)))}
    k = len(classes)
    # one code per example and run, (gold, predicted) together, so a swap moves both; k: outside the classes
    code = lambda gold, pred: np.array([classes[g] * (k + 1) + classes.get(q, k) for g, q in zip(gold, pred)])  # noqa: E731

    def stat(x, y, axis=-1):  # scipy passes one sample as (n,), a batch of resamples as (batch, n)
        flat = np.ndim(x) == 1
        x, y = np.atleast_2d(x).astype(int), np.atleast_2d(y).astype(int)
        delta = macro_f1_rows(y // (k + 1), y % (k + 1), k) - macro_f1_rows(x // (k + 1), x % (k + 1), k)
        return delta[0] if flat else delta

    ca, cb = code(gold_a, pred_a), code(gold_b, pred_b)
    ci = bootstrap_interval(ca, cb, stat, n_resamples, seed, alpha)
    p = permutation_p(ca, cb, stat, n_resamples, seed)
    f1 = lambda c: float(macro_f1_rows(c[None] // (k + 1), c[None] % (k + 1), k)[0])  # noqa: E731
    return _result("macro_f1", f1(ca), f1(cb), ci, p, "permutation", outcome_counts(right_a, right_b, "accuracy"),
                   alpha)


# -- matching two predictions files ---------------------------------------------------------------
def _key(row: dict, run_id: str, i: int) -> tuple[str, str]:
    where = row.get("where") if isinstance(row, dict) else None
    if not isinstance(where, str) or not where:
        raise UserError(f"run {run_id}: predictions.jsonl row {i + 1} has no `where` (the example it scores), "
                        "so its examples cannot be matched with another run's; evaluate the run again")
    return where, json.dumps(row.get("references"), ensure_ascii=False)


def keyed(rows: list[dict], run_id: str) -> dict[tuple, dict]:
    """A run's rows by example: (where, its references as JSON)."""
    out = {}
    for i, row in enumerate(rows):
        key = _key(row, run_id, i)
        if key in out:
            raise UserError(f"run {run_id}: example {key[0]} is scored twice in predictions.jsonl; evaluate the "
                            "run again")
        out[key] = row
    return out


def fingerprint(rows: list[dict]) -> str:
    """A short hash of an eval set as a run saw it: its examples' `where`s and references, sorted."""
    keys = sorted((str(r.get("where")), json.dumps(r.get("references"), ensure_ascii=False)) for r in rows)
    return hashlib.sha256(json.dumps(keys).encode()).hexdigest()[:12]


def match(rows_a: list[dict], rows_b: list[dict], id_a: str, id_b: str) -> tuple[list[tuple[dict, dict]], dict]:
    """(pairs of rows on the examples both runs scored, in A's order; their counts and fingerprints). No
    example in common is an error: the two runs were scored on different data."""
    ka, kb = keyed(rows_a, id_a), keyed(rows_b, id_b)
    common = [k for k in ka if k in kb]
    counts = {"n_common": len(common), "only_a": len(ka) - len(common), "only_b": len(kb) - len(common),
              "fingerprint_a": fingerprint(rows_a), "fingerprint_b": fingerprint(rows_b)}
    if not common:
        raise UserError(f"runs {id_a} and {id_b} have no eval example in common (eval sets {counts['fingerprint_a']}"
                        f" vs {counts['fingerprint_b']}, matched by `where` and references): they were scored on "
                        "different data, so there is nothing to pair; compare runs evaluated on the same eval set")
    return [(ka[k], kb[k]) for k in common], counts


# -- per-example scores of matched rows -----------------------------------------------------------
def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _labels(rows: list[dict]) -> tuple[list, list, list]:
    """(gold, predicted, correct) per row, as metrics.classification_scores labels them."""
    refs = [r.get("references") for r in rows]
    if not all(isinstance(x, list) and x and all(isinstance(s, str) for s in x) for x in refs):
        raise UserError("predictions.jsonl rows without a list of references: macro-F1 cannot be recomputed; "
                        "evaluate the runs again")
    _, per = classification_scores([r.get("prediction") or "" for r in rows], refs)
    return per["label_gold"], per["label_pred"], per["accuracy"]


def available(pairs: list[tuple[dict, dict]], name: str) -> bool:
    """Whether both runs have `name` on every common example (macro-F1: the labels to recompute it)."""
    if name == "macro_f1":
        return all(isinstance(r.get("references"), list) and "prediction" in r for pair in pairs for r in pair)
    return all(_number(ra.get(name)) and _number(rb.get(name)) for ra, rb in pairs)


def metric_names(pairs: list[tuple[dict, dict]], headline: str | None) -> list[str]:
    """The metrics to compare: the headline first, then every per-example score both runs stored."""
    first = [headline] if headline in METRIC_NAMES and available(pairs, headline) else []
    # macro-F1 only as the headline: recomputed from labels, it is the classification task's own
    return first + [n for n in METRIC_NAMES if n not in (headline, "macro_f1") and available(pairs, n)]


def scores(pairs: list[tuple[dict, dict]], name: str) -> tuple[list[float], list[float]]:
    """Each run's per-example scores of `name` (macro-F1: whether each answer is right)."""
    if name == "macro_f1":
        return _labels([a for a, _ in pairs])[2], _labels([b for _, b in pairs])[2]
    return [a[name] for a, _ in pairs], [b[name] for _, b in pairs]


def metric_result(pairs: list[tuple[dict, dict]], name: str, n_resamples: int = N_RESAMPLES,
                  seed: int = SEED) -> dict:
    if name == "macro_f1":
        return compare_macro_f1(_labels([a for a, _ in pairs]), _labels([b for _, b in pairs]), n_resamples, seed)
    return compare_scores(*scores(pairs, name), name, n_resamples, seed)


def most_changed(pairs: list[tuple[dict, dict]], name: str, k: int = 3) -> dict:
    """The k examples B improved most on and the k it worsened most on (by `name`), side by side."""
    a, b = scores(pairs, name)
    sign = -1 if higher_is_better(name) is False else 1
    gains = [(sign * (y - x), i) for i, (x, y) in enumerate(zip(a, b))]
    improved = sorted((g for g in gains if g[0] > 0), key=lambda g: -g[0])[:k]
    worsened = sorted((g for g in gains if g[0] < 0), key=lambda g: g[0])[:k]
    shown = lambda chosen: [_example(pairs[i], a[i], b[i]) for _, i in chosen]  # noqa: E731
    return {"metric": name, "improved": shown(improved), "worsened": shown(worsened)}


def _example(pair: tuple[dict, dict], score_a: float, score_b: float) -> dict:
    row_a, row_b = pair
    text = str(row_a.get("input", ""))
    return {"where": row_a["where"], "input": text if len(text) <= HEAD else text[:HEAD] + " …",
            "references": row_a.get("references"), "a": row_a.get("prediction"), "b": row_b.get("prediction"),
            "score_a": score_a, "score_b": score_b, "delta": score_b - score_a}


def compare_predictions(rows_a: list[dict], rows_b: list[dict], id_a: str, id_b: str, headline: str | None,
                        k: int = 3, n_resamples: int = N_RESAMPLES, seed: int = SEED) -> dict:
    """Run B against run A on their common examples: counts, fingerprints, one result per metric (the
    headline first) and the most changed examples by the headline."""
    pairs, counts = match(rows_a, rows_b, id_a, id_b)
    names = metric_names(pairs, headline)
    if not names:
        raise UserError(f"runs {id_a} and {id_b}: their predictions.jsonl rows share no per-example score "
                        f"(e.g. {headline or 'the headline'}); evaluate them again with this version to store them")
    return {"a": id_a, "b": id_b, **counts, "headline": names[0],
            "metrics": [metric_result(pairs, n, n_resamples, seed) for n in names],
            "changed": most_changed(pairs, names[0], k)}


# -- runs -------------------------------------------------------------------------------------------
def has_predictions(rec) -> bool:
    return (rec.artifacts / PREDICTIONS).is_file()


def run_rows(rec) -> list[dict]:
    """A run's predictions.jsonl rows; a one-line error when it has none or they do not parse."""
    try:
        rows = read_predictions(rec.dir)
    except (OSError, ValueError) as exc:
        raise UserError(f"run {rec.id}: {rec.artifacts / PREDICTIONS} is unreadable ({exc}); evaluate the run "
                        "again") from None
    if rows is None:
        raise UserError(f"run {rec.id} ({rec.stage}/{rec.variant}) has no artifacts/{PREDICTIONS}: it evaluated "
                        "nothing to compare example by example; compare runs that evaluated the eval set")
    return rows


def paired_runs(rec_a, rec_b, k: int = 3, n_resamples: int = N_RESAMPLES, seed: int = SEED) -> dict:
    """compare_predictions of two run records, B - A, with their labels."""
    headline = rec_a.summary().get("headline") or rec_b.summary().get("headline")
    result = compare_predictions(run_rows(rec_a), run_rows(rec_b), rec_a.id, rec_b.id, headline, k, n_resamples,
                                 seed)
    return {**result, "label_a": f"{rec_a.stage}/{rec_a.variant}", "label_b": f"{rec_b.stage}/{rec_b.variant}"}


def _stamp(rec) -> tuple | None:
    try:
        stat = (rec.artifacts / PREDICTIONS).stat()
    except OSError:
        return None
    return stat.st_mtime_ns, stat.st_size


def headline_delta(rec, against, metric: str) -> dict:
    """`rec`'s paired difference of `metric` over `against` (B = rec, A = against) on their common
    examples: metric_result plus "against" and the counts. Cached while both files stay unchanged (the
    report, the comparison and the dashboard ask for the same pairs)."""
    key = (rec.id, _stamp(rec), against.id, _stamp(against), metric)
    if key not in _CACHE:
        pairs, counts = match(run_rows(against), run_rows(rec), against.id, rec.id)
        if metric not in METRIC_NAMES or not available(pairs, metric):
            raise UserError(f"runs {against.id} and {rec.id}: no per-example {metric} in both predictions.jsonl "
                            "files; evaluate them again with this version to store it")
        _CACHE[key] = {**metric_result(pairs, metric), "against": against.id, **counts}
    return _CACHE[key]


def _against(rec, other, metric: str) -> tuple[dict | None, str | None]:
    try:
        return headline_delta(rec, other, metric), None
    except UserError as exc:
        return None, str(exc)


# -- iterations against their parent and the prompt baseline ----------------------------------------
def best_prompt_run(store, metric: str):
    """The completed prompt-only run with the best `metric` (the earliest of equals), or None."""
    runs = [r for r in store.list(stage=BASELINE_STAGE, status="completed") if _number(r.summary().get(metric))]
    if not runs:
        return None
    sign = -1 if higher_is_better(metric) is False else 1
    return max(runs, key=lambda r: sign * r.summary()[metric])


def _vs_parent(store, rec, metric: str) -> tuple[dict | None, str | None]:
    if not rec.parent:
        return None, f"run {rec.id} records no parent run"
    try:
        parent = store.get(rec.parent)
        # select/best evaluates nothing itself: the model it hands on was scored by the candidate it chose
        chosen = parent.summary().get("chosen_run") if parent.stage == "select" else None
        if chosen and not has_predictions(parent):
            parent = store.get(chosen)
    except UserError:
        return None, f"its parent run {rec.parent} (or the candidate it chose) is not in {store.root}"
    return _against(rec, parent, metric)


def _vs_baseline(rec, baseline, metric: str) -> tuple[dict | None, str | None]:
    if baseline is None:
        return None, f"no prompt-only baseline run with {metric} (run `llmcycle prompt` to have one)"
    return _against(rec, baseline, metric)


def iteration_deltas(store, records) -> dict[str, dict]:
    """For every tune / align / optimize / select run among `records` with a headline metric:
    {"vs_parent": headline_delta against its parent run (through select/best, the candidate it chose),
    "vs_baseline": against the best prompt-only run (best_prompt_run), each None when it cannot be
    measured, with the reason in "notes"}."""
    baselines, out = {}, {}
    for rec in records:
        if rec.stage not in ITERATION_STAGES:
            continue
        metric = rec.summary().get("headline")
        if not metric:  # it evaluated nothing (select/best, a reward model): no difference to measure
            continue
        if metric not in baselines:
            baselines[metric] = best_prompt_run(store, metric)
        parent, why_parent = _vs_parent(store, rec, metric)
        base, why_base = _vs_baseline(rec, baselines[metric], metric)
        notes = {k: v for k, v in (("vs_parent", why_parent), ("vs_baseline", why_base)) if v}
        out[rec.id] = {"vs_parent": parent, "vs_baseline": base, "notes": notes}
    return out


def gained(delta: dict) -> bool:
    """Significant at 95% and in the metric's better direction."""
    sign = -1 if higher_is_better(delta["metric"]) is False else 1
    return delta["significant"] and sign * delta["delta"] > 0


def gain_gate(store, rec, metric: str) -> dict:
    """scope.require_significant_gain for one run: {"state": "passes" (its `metric` beats the best
    prompt-only run's significantly), "fails", "unknown" (no prompt run, no predictions, no examples in
    common: it cannot be checked, which is no pass) or "n/a" (a prompt run: the baseline's own kind),
    "why", "delta", "baseline"}."""
    if rec.stage == BASELINE_STAGE:
        return {"state": "n/a", "why": "prompt-only runs are the baseline", "delta": None, "baseline": None}
    base = best_prompt_run(store, metric)
    if base is None:
        return {"state": "unknown", "delta": None, "baseline": None,
                "why": "no prompt-only baseline run to beat (scope.require_significant_gain): run `llmcycle "
                       "prompt`, or unset it"}
    label = f"prompt/{base.variant} ({base.id})"
    delta, note = _against(rec, base, metric)
    if delta is None:
        return {"state": "unknown", "delta": None, "baseline": base.id,
                "why": f"its gain over the prompt baseline {label} cannot be measured: {note}"}
    state = "passes" if gained(delta) else "fails"
    verdict = "significantly better" if state == "passes" else "not significantly better"
    return {"state": state, "delta": delta, "baseline": base.id,
            "why": f"{verdict} than the best prompt-only run {label}: {metric} Δ {delta_text(delta)}, "
                   f"{p_text(delta['p'])} (scope.require_significant_gain)"}


def delta_columns(records) -> dict[str, dict]:
    """compare_rows' paired figures by run id: delta_parent / delta_baseline (the headline's Δ against
    the parent and against the prompt baseline), `_sig` (significant at 95%) and `_ci` ([low, high]);
    only the iteration runs whose difference could be measured have them."""
    records = [r for r in records if r.stage in ITERATION_STAGES]
    if not records:
        return {}
    out = {}
    for run_id, entry in iteration_deltas(RunStore(records[0].dir.parent), records).items():
        cols = {}
        for name, key in (("parent", "vs_parent"), ("baseline", "vs_baseline")):
            if entry[key]:
                delta = entry[key]
                cols.update({f"delta_{name}": delta["delta"], f"delta_{name}_sig": delta["significant"],
                             f"delta_{name}_ci": delta["ci"]})
        out[run_id] = cols
    return out


# -- text -------------------------------------------------------------------------------------------
def delta_text(delta: dict) -> str:
    """"+0.034* [0.012, 0.055]": the difference, * when significant at 95%, its interval."""
    ci = delta.get("ci")
    interval = f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else " [CI n/a]"
    return f"{delta['delta']:+.3f}" + ("*" if delta.get("significant") else "") + interval


def p_value(p) -> str:
    """"0.034", "<0.001" (three decimals would say 0.000, which a p-value never is), "n/a"."""
    return "n/a" if p is None else "<0.001" if p < 0.001 else f"{p:.3f}"


def p_text(p) -> str:
    value = p_value(p)
    return f"p {value}" if value.startswith("<") else f"p = {value}"


def paired_table(result: dict) -> Table:
    """metric | A | B | Δ [95% CI] | p | better/worse/tied: one line per metric, about 75 columns."""
    table = Table(title=f"paired: B - A on {result['n_common']} common examples", box=box.SIMPLE_HEAD)
    for title in ("metric", "A", "B", "Δ [95% CI]", "p", "+/-/="):
        table.add_column(title, justify="left" if title == "metric" else "right", no_wrap=True)
    for m in result["metrics"]:
        table.add_row(m["metric"], number(m["a"], 3), number(m["b"], 3), delta_text(m),
                      p_value(m["p"]), f"{m['better']}/{m['worse']}/{m['tied']}")
    return table


def changed_table(result: dict, width: int = 100) -> Table | None:
    """The most improved, then the most worsened examples: where, scores, input head, both outputs;
    the text columns wrap, so the table keeps to `width` columns."""
    changed = result["changed"]
    rows = changed["improved"] + changed["worsened"]
    if not rows:
        return None
    table = Table(title=f"most changed examples by {changed['metric']}", box=box.SIMPLE_HEAD, width=width)
    table.add_column("where", overflow="fold", max_width=20)
    table.add_column("A → B", no_wrap=True)
    for title in ("input", "A output", "B output"):
        table.add_column(title, overflow="fold", ratio=1)
    cut = lambda text: as_text(str(text or "")[:300] + (" …" if len(str(text or "")) > 300 else ""))  # noqa: E731
    for ex in rows:
        scores_cell = f"{number(ex['score_a'], 3)} → {number(ex['score_b'], 3)}\n{ex['delta']:+.3f}"
        table.add_row(as_text(ex["where"]), scores_cell, cut(ex["input"]), cut(ex["a"]), cut(ex["b"]))
    return table


def print_paired(result: dict, console, width: int = 100) -> None:
    """The paired block `runs compare A B` prints after its table."""
    width = min(console.width or width, width)
    console.print(as_text(f"A = {result['label_a']} ({result['a']}), B = {result['label_b']} ({result['b']})"),
                  width=width)
    console.print(paired_table(result), width=width)
    partial = result["only_a"] or result["only_b"]
    note = (f"compared on the {result['n_common']} examples both scored ({result['only_a']} only in A, "
            f"{result['only_b']} only in B). " if partial else "")
    console.print(as_text(note + "* significant at 95% (the interval excludes 0 and p < 0.05); p: exact McNemar "
                          "for 0/1 scores, else a paired permutation test; +/-/=: examples B did better, worse, "
                          "the same on", style="dim"), width=width)
    table = changed_table(result, width)
    if table is not None:
        console.print(table, width=width)
