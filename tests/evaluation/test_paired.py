"""Paired comparison of runs (llmcycle/evaluation/paired.py): the statistics against hand-computed values,
matching by example, `runs compare A B`, and each iteration's Δ against its parent and the prompt baseline.
Runs are fabricated in a temporary store with hand-written predictions (no model)."""
from __future__ import annotations

import json

import pytest

from llmcycle.cli import main
from llmcycle.core.errors import UserError
from llmcycle.core.store import RunStore
from llmcycle.evaluation import paired
from llmcycle.evaluation.compare import compare_rows
from llmcycle.evaluation.harness import example_scores, write_predictions
from llmcycle.evaluation.metrics import classification_scores, compute_all


def rows(scores, name="rougeL", first=0, refs=None):
    """predictions.jsonl rows for examples first+1.. with these per-example scores."""
    return [{"index": i, "where": f"eval.jsonl:{first + i + 1}", "input": f"dialogue {first + i}",
             "references": [refs[i] if refs else f"ref {first + i}"], "prediction": f"output {first + i} ({s})",
             name: s} for i, s in enumerate(scores)]


def record(store, stage, variant, scores=None, *, parent=None, name="rougeL", first=0):
    """A completed run; with scores, its predictions and a summary whose headline is their mean."""
    with store.start(stage, variant, {}, parent=parent) as run:
        summary = {}
        if scores is not None:
            write_predictions(run, rows(scores, name, first))
            mean = sum(scores) / len(scores)
            summary = {"headline": name, "headline_value": mean, name: mean, "n_examples": len(scores)}
        run.finish(summary)
    return store.get(run.id)


# -- the statistics, by hand --------------------------------------------------------------------------
def test_equal_differences_give_a_point_interval_and_a_tiny_p():
    result = paired.compare_scores([0.1] * 20, [0.3] * 20, "rougeL")
    assert result["delta"] == pytest.approx(0.2) and result["ci"] == pytest.approx([0.2, 0.2])
    # only the 2 of 2^20 swaps that keep every sign reach |Δ| = 0.2: scipy counts the observed one, so
    # p = 2 (1 + 0) / (10,000 + 1)
    assert result["p"] == pytest.approx(2 / 10_001) and result["significant"]
    assert (result["better"], result["worse"], result["tied"], result["test"]) == (20, 0, 0, "permutation")
    # 5 examples: all 2^5 = 32 swaps are enumerated, 2 of them reach |Δ|: p = 2/32 exactly
    assert paired.permutation_p([0.1] * 5, [0.3] * 5) == pytest.approx(2 / 32)


def test_symmetric_differences_give_zero_and_p_one():
    result = paired.compare_scores([0.1, 0.5, 0.2, 0.6], [0.5, 0.1, 0.6, 0.2], "rougeL")
    assert result["delta"] == pytest.approx(0.0) and result["p"] == pytest.approx(1.0) and not result["significant"]
    # differences ±0.4: a resample's mean is -0.4 with probability 1/16 (> 2.5%), so the interval's ends
    # are the extremes -0.4 and 0.4
    assert result["ci"] == pytest.approx([-0.4, 0.4])
    assert (result["better"], result["worse"], result["tied"]) == (2, 2, 0)


def test_mcnemar_is_the_exact_binomial_test_on_the_discordant_examples():
    from scipy.stats import binomtest

    # 9 examples only A gets right, 1 only B, 5 both, 2 neither
    a = [1] * 9 + [0] * 1 + [1] * 5 + [0] * 2
    b = [0] * 9 + [1] * 1 + [1] * 5 + [0] * 2
    result = paired.compare_scores(a, b, "accuracy")
    hand = 2 * (1 + 10) / 2**10  # P(X <= 1) + P(X >= 9), X ~ Binomial(10, 1/2)
    assert result["p"] == pytest.approx(hand) == binomtest(1, 10, 0.5).pvalue
    assert result["test"] == "McNemar exact" and result["delta"] == pytest.approx((6 - 14) / 17)
    assert (result["better"], result["worse"], result["tied"]) == (1, 9, 7) and result["significant"]
    assert paired.mcnemar_p([1, 0, 1], [1, 0, 1]) == 1.0  # no discordant example: nothing against equality


def test_macro_f1_is_recomputed_on_each_resample_and_swapping_runs_negates_it():
    gold = list("abcabc")
    la = classification_scores(list("aabbcc"), [[g] for g in gold])[1]
    lb = classification_scores(gold, [[g] for g in gold])[1]
    labels = lambda per: (per["label_gold"], per["label_pred"], per["accuracy"])  # noqa: E731
    result = paired.compare_macro_f1(labels(la), labels(lb), n_resamples=2000)
    # A: F1 of a = 2/4, of b = 0, of c = 2/4, so macro-F1 1/3; B is right everywhere
    assert result["a"] == pytest.approx(1 / 3) and result["b"] == 1.0 and result["delta"] == pytest.approx(2 / 3)
    assert (result["better"], result["worse"], result["tied"]) == (4, 0, 2)
    back = paired.compare_macro_f1(labels(lb), labels(la), n_resamples=2000)
    assert back["delta"] == pytest.approx(-2 / 3) and back["p"] == pytest.approx(result["p"])
    assert 0 < result["p"] <= 1 and result["ci"][1] == pytest.approx(1.0)


# -- matching ----------------------------------------------------------------------------------------
def test_partial_overlap_is_compared_on_the_common_examples_and_counted():
    a, b = rows([0.1, 0.2, 0.3, 0.4]), rows([0.5, 0.6, 0.7, 0.8], first=2)  # common: examples 3 and 4
    result = paired.compare_predictions(a, b, "A", "B", "rougeL", n_resamples=500)
    assert (result["n_common"], result["only_a"], result["only_b"]) == (2, 2, 2)
    head = result["metrics"][0]
    assert head["metric"] == "rougeL" and head["a"] == pytest.approx(0.35) and head["b"] == pytest.approx(0.55)
    # the same line with other references is another example (an edited data file)
    other = rows([0.5, 0.6], first=2, refs=["new 2", "new 3"])
    with pytest.raises(UserError, match="no eval example in common"):
        paired.compare_predictions(a, other, "A", "B", "rougeL")


def test_no_common_example_is_one_line_naming_both_runs_and_their_eval_sets():
    a, b = rows([0.1, 0.2]), rows([0.3, 0.4], first=10)
    with pytest.raises(UserError) as err:
        paired.compare_predictions(a, b, "run-a", "run-b", "rougeL")
    message = str(err.value)
    assert "run-a" in message and "run-b" in message and "\n" not in message
    assert paired.fingerprint(a) in message and paired.fingerprint(b) in message
    assert paired.fingerprint(a) == paired.fingerprint(list(reversed(a))) != paired.fingerprint(b)


def test_rows_without_where_or_twice_the_same_example_are_errors_naming_the_run():
    bad = rows([0.1, 0.2])
    del bad[1]["where"]
    with pytest.raises(UserError, match="run R: predictions.jsonl row 2 has no `where`"):
        paired.keyed(bad, "R")
    with pytest.raises(UserError, match="run R: example eval.jsonl:1 is scored twice"):
        paired.keyed(rows([0.1]) * 2, "R")


def test_counts_and_most_changed_examples_follow_the_differences():
    a = rows([0.5, 0.5, 0.5, 0.5, 0.5])
    b = rows([0.9, 0.6, 0.5, 0.1, 0.45])
    result = paired.compare_predictions(a, b, "A", "B", "rougeL", k=1, n_resamples=500)
    head = result["metrics"][0]
    assert (head["better"], head["worse"], head["tied"]) == (2, 2, 1)
    changed = result["changed"]
    assert [e["where"] for e in changed["improved"]] == ["eval.jsonl:1"]
    assert [e["where"] for e in changed["worsened"]] == ["eval.jsonl:4"]
    worst = changed["worsened"][0]
    assert (worst["score_a"], worst["score_b"], worst["a"], worst["b"]) == (0.5, 0.1, "output 3 (0.5)", "output 3 (0.1)")
    assert worst["delta"] == pytest.approx(-0.4) and worst["input"] == "dialogue 3"


def test_every_per_example_metric_is_stored_in_the_rows_and_compared():
    preds, refs = ["Anna books a table.", "Ben buys a case."], [["Anna reserves a table."], ["Ben buys a case."]]
    _, per = compute_all("summarization", preds, refs, bootstrap=False, sources=["Anna books a table for two."] * 2)
    stored = example_scores(per, 2)
    assert {"rouge1", "rouge2", "rougeL", "rougeLsum", "bleu", "chrf"} <= set(stored)
    assert "invented_entities" not in stored and stored["rougeL"][1] == pytest.approx(1.0)
    a = [{"where": f"e:{i}", "references": refs[i], **{k: v[i] for k, v in stored.items()}} for i in range(2)]
    b = [{**row, "rougeL": 1.0, "bleu": 100.0} for row in a]
    names = [m["metric"] for m in paired.compare_predictions(a, b, "A", "B", "rougeL", n_resamples=200)["metrics"]]
    assert names[0] == "rougeL" and {"rouge1", "bleu", "chrf"} <= set(names)
    assert "hallucinated_entity_rate" not in names or all(r["hallucinated_entity_rate"] is not None for r in a)


# -- runs compare A B --------------------------------------------------------------------------------
@pytest.fixture
def project(tmp_path, monkeypatch):
    monkeypatch.setenv("COLUMNS", "100")
    (tmp_path / "llmcycle.yaml").write_text("project: {name: t, task: summarization}\n")
    return tmp_path


def test_runs_compare_two_runs_prints_the_paired_block_within_100_columns(project, capsys):
    store = RunStore.for_project(project)
    a = record(store, "prompt", "zero", [0.1, 0.2, 0.3, 0.4, 0.2, 0.3])
    b = record(store, "tune", "lora-with-a-long-name", [0.4, 0.5, 0.3, 0.2, 0.6, 0.7], parent=a.id)
    path = str(project / "llmcycle.yaml")
    assert main(["runs", "compare", a.id, b.id, "-p", path]) == 0
    shown = capsys.readouterr().out
    assert "paired: B - A on 6 common examples" in shown and "most changed examples by rougeL" in shown
    assert f"A = prompt/zero ({a.id})" in shown and "4/1/1" in shown
    assert "output 4 (0.2)" in shown and "output 4 (0.6)" in shown  # the most improved, side by side
    assert max(len(line) for line in shown.splitlines()) <= 100

    assert main(["runs", "compare", a.id, b.id, "-p", path, "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    head = data["paired"]["metrics"][0]
    assert head["metric"] == "rougeL" and head["delta"] == pytest.approx(0.2) and data["paired"]["n_common"] == 6
    assert data["paired_note"] is None
    assert main(["runs", "compare", "-p", path, "--json"]) == 0  # not two runs named: no paired block
    assert "paired" not in json.loads(capsys.readouterr().out)


def test_runs_compare_partial_overlap_says_so_and_no_overlap_is_a_one_line_error(project, capsys):
    store = RunStore.for_project(project)
    a = record(store, "prompt", "a", [0.1, 0.2, 0.3, 0.4])
    b = record(store, "prompt", "b", [0.3, 0.4, 0.5], first=2)
    c = record(store, "prompt", "c", [0.3, 0.4], first=50)
    path = str(project / "llmcycle.yaml")
    assert main(["runs", "compare", a.id, b.id, "-p", path]) == 0
    assert "compared on the 2 examples both scored (2 only in A, 1 only in B)" in capsys.readouterr().out
    assert main(["runs", "compare", a.id, c.id, "-p", path]) == 2
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert err.startswith(f"error: runs {a.id} and {c.id} have no eval example in common") and "\n" not in err
    assert "eval sets" in err and captured.out == ""


def test_runs_compare_of_runs_that_evaluated_nothing_keeps_its_table_and_says_why(project, capsys):
    store = RunStore.for_project(project)
    a, b = record(store, "pretrain", "tiny"), record(store, "prompt", "x", [0.1, 0.2])
    assert main(["runs", "compare", a.id, b.id, "-p", str(project / "llmcycle.yaml")]) == 0
    shown = capsys.readouterr().out
    assert "runs side by side" in shown and f"no paired comparison: run {a.id} (pretrain/tiny) has no" in shown


# -- iterations ----------------------------------------------------------------------------------------
def lineage(store):
    """eval/base -> tune/lora -> optimize/int8 (and optimize/orphan, whose parent evaluated nothing), with
    two prompt runs: the better one is the baseline."""
    base = record(store, "eval", "base", [0.1] * 10)
    record(store, "prompt", "weak", [0.15] * 10)
    best = record(store, "prompt", "strong", [0.2] * 10)
    lora = record(store, "tune", "lora", [0.4] * 10, parent=base.id)
    int8 = record(store, "optimize", "int8", [0.4, 0.41, 0.39, 0.4, 0.4, 0.41, 0.39, 0.4, 0.4, 0.4], parent=lora.id)
    bare = record(store, "pretrain", "tiny")
    orphan = record(store, "optimize", "orphan", [0.3] * 10, parent=bare.id)
    return base, best, lora, int8, orphan


def test_iteration_deltas_against_the_parent_and_the_best_prompt_run(tmp_path):
    store = RunStore(tmp_path / "runs")
    base, best, lora, int8, orphan = lineage(store)
    deltas = paired.iteration_deltas(store, store.list())
    assert set(deltas) == {lora.id, int8.id, orphan.id}  # eval, prompt and pretrain runs are no iterations
    parent, baseline = deltas[lora.id]["vs_parent"], deltas[lora.id]["vs_baseline"]
    assert parent["against"] == base.id and parent["delta"] == pytest.approx(0.3) and parent["significant"]
    assert baseline["against"] == best.id and baseline["delta"] == pytest.approx(0.2) and baseline["significant"]
    assert paired.delta_text(baseline) == "+0.200* [0.200, 0.200]"
    # int8 against lora: ±0.01 on four examples, no change on six: Δ 0, not significant
    same = deltas[int8.id]["vs_parent"]
    assert same["delta"] == pytest.approx(0.0, abs=1e-12) and not same["significant"] and same["p"] == pytest.approx(1.0)
    assert deltas[orphan.id]["vs_parent"] is None and "evaluated nothing" in deltas[orphan.id]["notes"]["vs_parent"]
    assert deltas[orphan.id]["vs_baseline"]["delta"] == pytest.approx(0.1)

    rows = {r["id"]: r for r in compare_rows(store.list())}
    assert rows[lora.id]["delta_parent"] == pytest.approx(0.3) and rows[lora.id]["delta_parent_sig"] is True
    assert rows[int8.id]["delta_baseline_sig"] is True and rows[int8.id]["delta_parent_sig"] is False
    assert rows[int8.id]["delta_parent_ci"][0] < 0 < rows[int8.id]["delta_parent_ci"][1]
    assert "delta_parent" not in rows[orphan.id] and "delta_parent" not in rows[base.id]


def test_without_a_prompt_run_the_baseline_delta_is_none_and_says_why(tmp_path):
    store = RunStore(tmp_path / "runs")
    base = record(store, "eval", "base", [0.1] * 5)
    lora = record(store, "tune", "lora", [0.4] * 5, parent=base.id)
    entry = paired.iteration_deltas(store, [lora])[lora.id]
    assert entry["vs_baseline"] is None and "no prompt-only baseline run" in entry["notes"]["vs_baseline"]
    gate = paired.gain_gate(store, lora, "rougeL")
    assert gate["state"] == "unknown" and "no prompt-only baseline run" in gate["why"]


def test_a_run_tuned_from_select_best_is_compared_with_the_candidate_it_chose(tmp_path):
    store = RunStore(tmp_path / "runs")
    candidate = record(store, "select", "scratch", [0.1] * 6)
    with store.start("select", "best", {}, parent=candidate.id) as run:  # scores nothing itself
        run.finish({"chosen": "scratch", "chosen_run": candidate.id})
    tuned = record(store, "tune", "full", [0.5] * 6, parent=run.id)
    deltas = paired.iteration_deltas(store, store.list())
    assert run.id not in deltas  # no headline: nothing to compare
    parent = deltas[tuned.id]["vs_parent"]
    assert parent["against"] == candidate.id and parent["delta"] == pytest.approx(0.4) and parent["n_common"] == 6
