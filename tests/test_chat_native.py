"""One prompt format from training to serving, on conversations: a chat model (Llama-3 template, base
release) and a seq2seq model are tuned on `data.format: messages` with a project system prompt, then
served; the served prompt ids and greedy answers equal what evaluation scored, and the skipped counts
of scope, tune and eval agree."""
import json

import openai
import pytest

from llmcycle.data.prompting import build_prompt, encode_prompt
from llmcycle.evaluation import harness
from llmcycle.evaluation.settings import project_system, project_template
from llmcycle.project import lifecycle
from llmcycle.project.config import load_project
from llmcycle.serve.app import build_app, create_app
from llmcycle.serve.protocol import ChatMessage
from llmcycle.stages import scope
from servers import running
from tiny import make_chat_model, make_t5

WORDS = ["red", "blue", "green", "grey", "cat", "dog"]


def conversation(i: int, long: bool = False) -> dict:
    word = WORDS[i % 6]
    filler = " and then some more words" * 12 if long else ""
    return {"messages": [{"role": "user", "content": f"hello {i}"}, {"role": "assistant", "content": "hi"},
                         {"role": "user", "content": f"{word} is here number {i}{filler}"},
                         {"role": "assistant", "content": word}]}


def make_project(root, arch: str):
    if arch == "chat":
        make_chat_model(root / "base", base_release=True)
    else:
        make_t5(root / "base")
    rows = [conversation(i, long=i % 4 == 3) for i in range(40)]
    (root / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    text = ("project: {name: chat, task: generation}\n"
            "data: {train: train.jsonl, format: messages, eval_size: 8, seed: 1}\n"
            "model: {name: base, context_window: 160}\n"
            'evaluate: {template: "Colour? {input}", system: "Answer with one word.", min_examples: 20,\n'
            "           generation: {max_new_tokens: 4}}\n"
            "tune: {v: {method: full, max_steps: 40, lr: 0.01, batch_size: 8, loss_on: all_assistant}}\n")
    (root / "llmcycle.yaml").write_text(text)
    return load_project(root / "llmcycle.yaml")


@pytest.fixture(scope="module", params=["chat", "t5"])
def tuned(request, tmp_path_factory):
    project = make_project(tmp_path_factory.mktemp(request.param), request.param)
    outcome = lifecycle.execute(project, "tune", "v", progress=False)
    assert outcome.status == "completed", outcome
    return request.param, project, project.store().get(outcome.run_id)


def test_scope_counts_what_tune_and_eval_then_skip(tuned):
    arch, project, run = tuned
    summary = run.summary()
    plan = scope.build_plan(project)["data"]["overflow"]
    assert plan["eval_over"] == summary["eval_skipped"] > 0
    assert plan["train_over"] == summary["skipped_overlong"] > 0
    assert summary["n_examples"] + summary["eval_skipped"] == 8
    if arch == "t5":  # one example per assistant turn: the tokenizer gets what the chat model gets in one row
        assert summary["train_records"] == 2 * 32
    assert summary["too_few_examples"] is True  # 8 < evaluate.min_examples
    assert "<|eot_id|>" in summary["target_ends_with"] if arch == "chat" else "config.json" in summary[
        "target_ends_with"]


def test_served_prompt_ids_and_answers_equal_the_evaluated_ones(tuned):
    arch, project, run = tuned
    loaded = harness.load(f"run:{run.id}", project)
    rows = harness.read_predictions(run.dir)
    examples = {e.where: e for e in project_eval_examples(project)}
    app = create_app(loaded, model_name="m", prompt_template=project_template(project),
                     system_prompt=project_system(project))
    served = app.state.served["m"]
    with running(app) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0, timeout=60)
        for row in rows:
            ex = examples[row["where"]]
            messages = ex.history + [{"role": "user", "content": ex.input}]
            evaluated = build_prompt(project_template(project), ex, system=project_system(project))
            ids = served.chat_prompt([ChatMessage(**m) for m in messages])
            assert ids == loaded.generator.encode([evaluated])[0]
            if arch == "chat":
                assert ids == encode_prompt(loaded.tokenizer, evaluated, "causal")
                assert "<|start_header_id|>system" in loaded.tokenizer.decode(ids)
            reply = client.chat.completions.create(model="m", messages=messages, max_tokens=4, temperature=0)
            assert reply.usage.prompt_tokens == row["prompt_tokens"]
            assert reply.choices[0].message.content == row["prediction"]


def project_eval_examples(project):
    from llmcycle.evaluation.settings import eval_examples

    return eval_examples(project)


def test_the_tuned_model_learned_to_stop(tuned):
    arch, project, run = tuned
    summary = run.summary()
    assert summary["stopped_share"] == 1.0  # every answer ended with the trained end token
    # A 2-layer model of width 16 learns the answers' form, not the task: each output is one of the
    # trained answers, then the end token.
    assert {r["prediction"].strip() for r in harness.read_predictions(run.dir)} <= {*WORDS, "hi"}


def test_eval_of_the_served_run_gives_the_evaluated_outputs_and_metrics(tuned, capsys):
    """Served ≡ evaluated: `llmcycle eval --endpoint` of the run behind `llmcycle serve` (its app on
    127.0.0.1) gives the greedy outputs and metrics the run's own evaluation gave, and the report says so."""
    from llmcycle.cli import main
    from llmcycle.report.build import build

    arch, project, run = tuned
    app = build_app(f"run:{run.id}", project, model_name=run.id)  # what `llmcycle serve --run RUN` serves
    with running(app) as url:
        code = main(["eval", "-p", str(project.path), "--endpoint", f"{url}/v1", "--model", run.id, "--json"])
    assert code == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["served_run"] == run.id  # the model's name is the run's id, as `serve --run` names it
    evaluated = {r["where"]: r for r in harness.read_predictions(run.dir)}
    served = {r["where"]: r for r in harness.read_predictions(project.store().get(summary["run_id"]).dir)}
    assert set(served) == set(evaluated) and len(served) == run.summary()["n_examples"]
    for where, row in served.items():
        assert (row["prediction"], row["prompt_tokens"]) == (evaluated[where]["prediction"],
                                                              evaluated[where]["prompt_tokens"])
    assert summary["eval_skipped"] == run.summary()["eval_skipped"]  # refused by the server as too long
    for metric in ("rougeL", "rouge1", "bleu", "exact_match"):
        if metric in run.summary():
            assert summary[metric] == pytest.approx(run.summary()[metric]), metric
    check = build(project)["served"]
    assert check == {"run": summary["run_id"], "compared": len(served), "differ": 0, "unmatched": 0, "match": True}
