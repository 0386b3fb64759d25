"""`llmcycle eval` and `llmcycle prompt` on tiny models: runs, predictions, metrics, errors."""
import json
import subprocess
import sys

import pytest
from tiny import make_gpt2, make_t5

from llmcycle.project.config import load_project
from llmcycle.stages.prompt import variant_grid

DIALOGUES = [("#A#: hi, can I book a table for two at seven?\n#B#: yes, done.", "A books a table for two.",
              "A reserves a table."),
             ("#A#: my phone is broken.\n#B#: I will fix it tomorrow.", "B will fix the phone.",
              "The phone gets fixed."),
             ("#A#: do you like tea?\n#B#: I prefer coffee.", "B prefers coffee to tea.", "B likes coffee."),
             ("#A#: the train leaves at nine.\n#B#: then we must hurry.", "They hurry for the train.",
              "The train leaves at nine.")]


def make_project(tmp_path, model="t5", extra="", window=None):
    model_dir = (make_t5 if model == "t5" else make_gpt2)(tmp_path / "model")
    rows = [{"dialogue": d, "summary": s, "summary2": s2} for d, s, s2 in DIALOGUES * 3]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps({"dialogue": r["dialogue"], "summary": r["summary"]})
                                                  + "\n" for r in rows))
    (tmp_path / "eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:6]))
    win = f", context_window: {window}" if window else ""
    (tmp_path / "llmcycle.yaml").write_text(f"""project: {{name: ev, task: summarization}}
data: {{train: train.jsonl, eval: eval.jsonl, input: dialogue, target: [summary, summary2]}}
model: {{name: {model_dir}{win}}}
evaluate:
  template: "Summarize: {{dialogue}} Summary:"
  generation: {{max_new_tokens: 8, batch_size: 4}}
{extra}""")
    return tmp_path / "llmcycle.yaml"


def cli(*args):
    proc = subprocess.run([sys.executable, "-m", "llmcycle", *args], capture_output=True, text=True,
                          timeout=600)
    return proc.returncode, proc.stdout, proc.stderr


def test_eval_records_a_run_with_predictions_and_metrics_recomputable_by_hand(tmp_path):
    from rouge_score import rouge_scorer

    path = make_project(tmp_path)
    code, out, err = cli("eval", "-p", str(path), "--limit", "5", "--json")
    assert code == 0, err
    summary = json.loads(out)
    assert summary["n_examples"] == 5 and summary["headline"] == "rougeL"
    run_dir = next((tmp_path / "runs").glob(summary["run_id"]))
    rows = [json.loads(line) for line in (run_dir / "artifacts/predictions.jsonl").read_text().splitlines()]
    assert [r["index"] for r in rows] == list(range(5))
    assert rows[0]["prompt"] == "Summarize: " + DIALOGUES[0][0] + " Summary:"
    assert rows[0]["references"] == [DIALOGUES[0][1], DIALOGUES[0][2]]
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    by_hand = sum(max(scorer.score(ref, r["prediction"])["rougeL"].fmeasure for ref in r["references"])
                  for r in rows) / 5
    assert summary["rougeL"] == pytest.approx(by_hand)
    assert summary["headline_ci_low"] <= summary["rougeL"] <= summary["headline_ci_high"]
    assert summary["perplexity"] > 1
    assert all(r["completion_tokens"] <= 8 for r in rows)


def test_eval_a_causal_model_and_another_data_file(tmp_path):
    path = make_project(tmp_path, model="gpt")
    (tmp_path / "other.jsonl").write_text(json.dumps({"dialogue": "x y z", "summary": "x"}) + "\n")
    code, out, err = cli("eval", "-p", str(path), "--data", str(tmp_path / "other.jsonl"), "--json")
    assert code == 0, err
    assert json.loads(out)["n_examples"] == 1


def test_eval_errors(tmp_path):
    path = make_project(tmp_path)
    (tmp_path / "empty.jsonl").write_text("")
    cases = [(["--limit", "0"], "'--limit': Input should be greater than or equal to 1"),
             (["--data", str(tmp_path / "empty.jsonl")], "no records"),
             (["--model", str(tmp_path / "missing-model")], "missing-model"),
             (["--set", "evaluate.template=Summarize {dialog}"], "'dialog'"),
             (["--set", "evaluate.generation.tok_k=5"], "did you mean 'top_k'"),
             (["--set", "model.context_window=8"], "context window")]
    for extra, needle in cases:
        code, _, err = cli("eval", "-p", str(path), *extra)
        assert code == 2, (extra, err)
        assert needle in err and "Traceback" not in err, (extra, err)


PROMPT = """prompt:
  templates:
    plain: "Summarize: {dialogue} Summary:"
    flan: "Dialogue: {dialogue} What was going on?"
  shots: [0, 2]
  selection: [first, random]
  generation:
    greedy: {max_new_tokens: 6, batch_size: 4}
    sampled: {do_sample: true, temperature: 0.8, top_k: 20, max_new_tokens: 6}
"""


def test_variant_grid_covers_every_combination(tmp_path):
    project = load_project(make_project(tmp_path, extra=PROMPT))
    grid = variant_grid(project)
    # 2 templates x (0 shots + 2 shots x 2 selections) x 2 generation configs
    assert len(grid) == 12
    assert "plain.0shot.greedy" in grid and "flan.2shot.random.sampled" in grid
    assert grid["flan.2shot.random.sampled"]["generation"]["top_k"] == 20


def test_prompt_config_errors(tmp_path):
    path = make_project(tmp_path, extra=PROMPT)
    code, _, err = cli("prompt", "-p", str(path), "--set", "prompt.generation.sampled.tok_k=50")
    assert code == 2 and "unknown key 'prompt.generation.sampled.tok_k'" in err and "top_k" in err
    code, _, err = cli("prompt", "-p", str(path), "--set", "prompt.templates.plain=Sum {dialog}")
    assert code == 2 and "template 'plain'" in err and "'dialog'" in err
    code, _, err = cli("prompt", "-p", str(path), "--set", "prompt.shots=[50]")
    assert code == 2 and "50 shots asked for, but only 12" in err
    code, _, err = cli("prompt", "-p", str(path), "--set", "prompt.selection=[nearest]")
    assert code == 2 and "prompt.selection.0" in err


def test_prompt_sweep_drops_shots_to_fit_and_compares_side_by_side(tmp_path):
    from transformers import AutoTokenizer

    window = 150
    extra = PROMPT.replace("  selection: [first, random]", "  selection: [first]") \
        .replace("    sampled: {do_sample: true, temperature: 0.8, top_k: 20, max_new_tokens: 6}\n", "")
    extra = extra.replace('    flan: "Dialogue: {dialogue} What was going on?"\n', "")
    path = make_project(tmp_path, extra=extra, window=window)
    code, out, err = cli("prompt", "-p", str(path), "--json")
    assert code == 0, err
    outcomes = {o["variant"]: o for o in json.loads(out)}
    assert set(outcomes) == {"plain.0shot.greedy", "plain.2shot.first.greedy"}
    two = outcomes["plain.2shot.first.greedy"]["summary"]
    # by hand: how many eval prompts with the first two training examples as shots exceed the window
    tok = AutoTokenizer.from_pretrained(tmp_path / "model")
    count = lambda s: len(tok(s)["input_ids"])
    shots = "".join(f"Summarize: {d} Summary: {s}\n\n\n" for d, s, _ in DIALOGUES[:2])
    over = sum(count(shots + f"Summarize: {d} Summary:") > window for d, _, _ in (DIALOGUES * 2)[:6])
    assert two["prompts_lost_shots"] == over and over > 0
    assert two["prompt_tokens_max"] <= window
    assert outcomes["plain.0shot.greedy"]["summary"]["prompts_lost_shots"] == 0
    # the side-by-side comparison of both variants, with each one's output per example
    code, out, _ = cli("runs", "compare", "-p", str(path), "--stage", "prompt", "--examples", "2", "--json")
    view = json.loads(out)
    assert {r["variant"] for r in view["runs"]} == set(outcomes)
    assert all("rougeL" in r and "headline_ci_low" in r for r in view["runs"])
    assert len(view["examples"]) == 2 and len(view["examples"][0]["outputs"]) == 2
    # the table itself renders, with the best value marked
    code, out, _ = cli("runs", "compare", "-p", str(path), "--stage", "prompt")
    assert code == 0 and "95% CI" in out and "*" in out and "reference" in out
    # `llmcycle run` reuses both (unchanged)
    code, out, _ = cli("run", "-p", str(path), "--only", "prompt", "--json")
    assert [r["status"] for r in json.loads(out)["runs"]] == ["skipped", "skipped"]
