"""The select stage (llmcycle/stages/select.py): candidates measured on the project's data, a probe fine-tune,
the choice and why, run:select/best in later stages, and bad input."""
import json
from pathlib import Path

import pytest
import yaml

from llmcycle.project import lifecycle
from llmcycle.project.config import load_project
from llmcycle.core.errors import UserError
from llmcycle.core.store import RunStore
from test_tune import examples
from tiny import make_bert, make_gpt2, make_t5

TAGGED = [e.__class__(f"#Person1#: {e.input}", e.targets, {}, e.where) for e in examples(30)]


def make_project(root: Path, select: dict, scope: dict | None = None, model: str = "run:select/best",
                 extra: dict | None = None) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    if not (root / "t5" / "config.json").exists():
        make_t5(root / "t5")
        make_bert(root / "bert", texts=[e.input for e in TAGGED])
    rows = [{"text": e.input, "summary": e.targets[0]} for e in TAGGED]
    (root / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = {"project": {"name": "sel", "task": "summarization"},
              "data": {"train": "train.jsonl", "input": "text", "target": "summary", "eval_size": 6},
              "model": {"name": model, "device": "cpu"},
              "evaluate": {"template": "{input} ->", "generation": {"max_new_tokens": 4}, "perplexity": False},
              "select": select, **({"scope": scope} if scope else {}), **(extra or {})}
    (root / "llmcycle.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    return root / "llmcycle.yaml"


CANDIDATES = {"t5": {"model": "t5"},
              "bert": {"warm_start": {"encoder": "bert", "decoder_layers": 1, "add_tokens": "auto"}}}


def run_select(path: Path):
    project = load_project(path)
    return [lifecycle.execute_variant(project, "select", name, progress=False)
            for name in lifecycle.variants(project, "select")]


def test_every_candidate_is_measured_and_the_best_is_chosen(tmp_path):
    path = make_project(tmp_path, {"candidates": CANDIDATES, "latency_samples": 2,
                                   "probe": {"method": "full", "steps": 2, "lr": 1e-3, "batch_size": 4}})
    outcomes = run_select(path)
    assert [(o.variant, o.status) for o in outcomes] == [("t5", "completed"), ("bert", "completed"),
                                                         ("best", "completed")]
    t5, bert, best = (o.summary for o in outcomes)
    for s in (t5, bert):
        assert s["n_examples"] == 6 and s["overflow_share"] == 0.0 and s["fits_budget"]
        assert s["parameters"] > 0 and s["size_mb"] > 0 and s["serve_memory_mb"] > 0
        assert s["latency_p95_ms"] >= s["latency_p50_ms"] > 0 and s["latency_samples"] == 2
        assert s["probe"]["steps"] == 2 and s["probe"]["method"] == "full"
        assert "rougeL" in s["probe"] and "hallucinated_entity_rate" in s
    assert bert["source"] == "warm_start" and bert["warm_start"]["added_tokens"] == ["#Person1#"]
    assert t5["source"] == "model" and bert["kind"] == t5["kind"] == "seq2seq"
    # the choice: the best rougeL after the probe (ties go to the first candidate)
    values = {r["candidate"]: r["probe"] for r in best["candidates"]}
    winner = max(values, key=lambda k: (values[k], k == "t5"))
    assert best["chosen"] == winner and best["after_probe"] and best["metric"] == "rougeL"
    assert [r["chosen"] for r in best["candidates"]] == [n == winner for n in ("t5", "bert")]
    assert all(r["why"] for r in best["candidates"])
    store = RunStore.for_project(tmp_path)
    chosen_dir = {"t5": str((tmp_path / "t5").resolve()), "bert": bert["model_path"]}[winner]
    assert str(store.resolve_model("select/best")) == chosen_dir
    assert store.get("select/best").parent == best["chosen_run"]
    assert not (store.get("select/bert").artifacts / "probe").exists()  # the pilot's checkpoints go
    assert (store.get("select/bert").artifacts / "probe_predictions.jsonl").exists()


def test_later_stages_use_run_select_best_and_nothing_reruns_unchanged(tmp_path):
    path = make_project(tmp_path, {"candidates": {"bert": CANDIDATES["bert"]}, "latency_samples": 0},
                        extra={"tune": {"lora": {"method": "lora", "max_steps": 2, "batch_size": 4}}})
    project = load_project(path)
    outcomes = lifecycle.run_all(project, only=["select", "tune"], progress=False)
    assert [(o.stage, o.variant, o.status) for o in outcomes] == [
        ("select", "bert", "completed"), ("select", "best", "completed"), ("tune", "lora", "completed")]
    tuned = outcomes[-1].summary
    # a warm start's new cross-attention trains fully beside the adapters
    assert tuned["trainable_params"] > 0 and tuned["trainable_pct"] < 100
    store = RunStore.for_project(tmp_path)
    assert store.get("tune/lora").parent == store.get("select/best").id
    again = lifecycle.run_all(load_project(path), only=["select", "tune"], progress=False)
    assert [o.status for o in again] == ["skipped"] * 3


def test_lora_on_a_warm_start_trains_cross_attention_fully(tmp_path):
    from llmcycle.training.finetune import TuneConfig
    from llmcycle.training.loop import fit
    from llmcycle.models.warm_start import WarmStartConfig, build

    build(WarmStartConfig(encoder=str(make_bert(tmp_path / "bert")), decoder_layers=1), tmp_path / "ws",
          texts=[e.input for e in TAGGED])
    cfg = TuneConfig(method="lora", max_steps=3, lr=1e-2, batch_size=4)
    trained = fit(cfg, str(tmp_path / "ws"), TAGGED, TAGGED[:4], "{input} ->", tmp_path / "w", progress=False)
    names = [n for n, p in trained.model.named_parameters() if p.requires_grad]
    assert any("encoder_attn.modules_to_save" in n for n in names)
    assert any("trainable_tokens_delta" in n for n in names)  # the added #Person1# row trains too
    assert not any("encoder_attn" in n and "lora_" in n for n in names)  # no adapters inside them
    assert any("self_attn.q_proj.lora_A" in n for n in names)
    assert not any("fc1" in n for n in names)


def test_pick_and_budgets(tmp_path):
    select = {"candidates": CANDIDATES, "latency_samples": 0, "pick": "bert"}
    outcomes = run_select(make_project(tmp_path / "a", select))
    best = outcomes[-1].summary
    assert best["chosen"] == "bert" and best["picked"] and "select.pick" in best["candidates"][1]["why"]
    # a size budget only the tiny T5 fits
    sizes = {o.variant: o.summary["size_mb"] for o in outcomes[:2]}
    budget = (sizes["t5"] + sizes["bert"]) / 2
    assert sizes["t5"] < budget < sizes["bert"]
    outcomes = run_select(make_project(tmp_path / "b", {"candidates": CANDIDATES, "latency_samples": 0},
                                       scope={"size_budget_mb": budget}))
    best = outcomes[-1].summary
    assert best["chosen"] == "t5"
    assert best["candidates"][1]["why"].startswith("over budget: size")
    # no candidate fits: none chosen, a user error naming every miss; the candidates stay recorded
    path = make_project(tmp_path / "c", {"candidates": CANDIDATES, "latency_samples": 0},
                        scope={"size_budget_mb": 1e-6})
    with pytest.raises(UserError, match=r"no candidate fits the scope's budgets: t5: size .* > budget .*; bert: size"):
        run_select(path)
    store = RunStore.for_project(tmp_path / "c")
    assert [r.status for r in store.list(stage="select")] == ["completed", "completed", "failed"]


def test_a_candidate_that_fails_is_recorded_and_the_others_go_on(tmp_path):
    make_gpt2(tmp_path / "gpt")
    select = {"candidates": {"broken": {"warm_start": {"encoder": "gpt"}}, "t5": {"model": "t5"},
                             "missing": {"model": "./nowhere"}, "unmade": {"run": "pretrain/nope"}},
              "latency_samples": 0}
    outcomes = run_select(make_project(tmp_path, select))
    assert [(o.variant, o.status) for o in outcomes] == [("broken", "failed"), ("t5", "completed"),
                                                         ("missing", "failed"), ("unmade", "failed"),
                                                         ("best", "completed")]
    assert "is a 'gpt2' model" in outcomes[0].summary["error"]
    assert "select.candidates.missing: model folder not found" in outcomes[2].summary["error"]
    assert "select.candidates.unmade: no completed run of stage 'pretrain'" in outcomes[3].summary["error"]
    best = outcomes[-1].summary
    assert best["chosen"] == "t5"
    why = {r["candidate"]: r["why"] for r in best["candidates"]}
    assert why["broken"].startswith("failed: warm_start.encoder")
    store = RunStore.for_project(tmp_path)
    assert all(store.get(o.run_id).status == "failed" for o in outcomes if o.status == "failed")


def test_cli_select_prints_the_table_and_exits_2_when_a_candidate_failed(tmp_path, capsys):
    from llmcycle.cli import main

    select = {"candidates": {"t5": {"model": "t5"}, "missing": {"model": "./nowhere"}}, "latency_samples": 0}
    path = make_project(tmp_path, select)
    assert main(["select", "-p", str(path)]) == 2
    captured = capsys.readouterr()
    assert "* t5" in captured.out and "t5: chosen: best rougeL zero-shot" in captured.out
    assert "missing: failed: select.candidates.missing: model folder not found" in captured.out
    assert "error: select.missing failed: select.candidates.missing: model folder not found" in captured.err
    assert main(["select", "-p", str(path), "--json"]) == 2
    rows = json.loads(capsys.readouterr().out)
    assert [r["status"] for r in rows] == ["skipped", "failed", "skipped"]


def test_bad_select_config_and_missing_best(tmp_path, capsys):
    from llmcycle.cli import main

    path = make_project(tmp_path, {"candidates": CANDIDATES, "pick": "brt"})
    assert main(["select", "-p", str(path)]) == 2
    assert "pick 'brt' is not a candidate (did you mean 'bert'?" in capsys.readouterr().err
    for bad, message in (({"candidates": {"x": {"model": "t5", "run": "pretrain/a"}}}, "exactly one of"),
                         ({"candidates": {"best": {"model": "t5"}}}, "'best' names the chosen candidate"),
                         ({"candidates": {}}, "candidates")):
        make_project(tmp_path, bad)
        with pytest.raises(UserError, match=message):
            load_project(path)
    # a later stage before any select run: one line naming the key
    path = make_project(tmp_path, {"candidates": CANDIDATES},
                        extra={"tune": {"full": {"method": "full", "max_steps": 1}}})
    assert main(["tune", "-p", str(path)]) == 2
    err = capsys.readouterr().err
    assert "model.name: run:select/best: no completed run of stage 'select' variant 'best'" in err
    assert "llmcycle select" in err
    assert RunStore.for_project(tmp_path).list(stage="tune") == []  # nothing recorded


@pytest.mark.slow
def test_a_warm_started_base_goes_through_every_later_stage(tmp_path):
    """select -> tune (full, LoRA, prompt tuning) -> align (reward model, PPO, DPO) -> optimize (int8,
    distill, prune, export) on a warm-started tiny BERT2BERT, each evaluated with the faithfulness
    metric; then the served int8 model answers chat and completion requests."""
    from test_align import make_project as align_project

    align_project(tmp_path, {})  # labelled text and preference pairs beside the data
    common = {"r": 4, "alpha": 8, "eval_limit": 6, "seed": 0}
    extra = {
        "tune": {"full": {"method": "full", "max_steps": 3, "batch_size": 4, "lr": 1e-3},
                 "lora": {"method": "lora", "max_steps": 3, "batch_size": 4, "lr": 1e-3},
                 "soft": {"method": "prompt_tuning", "max_steps": 2, "batch_size": 4, "num_virtual_tokens": 4}},
        "align": {"rm": {"method": "reward_classifier", "encoder": "run:select/best", "data": "labelled.jsonl",
                         "max_steps": 3, "batch_size": 8, "max_length": 16},
                  "detox": {"method": "ppo", "policy": "run:tune/lora", "reward": "run:align/rm",
                            "reward_label": "not_toxic", "max_steps": 2, "batch_size": 4, "mini_batch_size": 2,
                            "ppo_epochs": 1, "max_new_tokens": 4, **common},
                  "prefer": {"method": "dpo", "policy": "run:tune/full", "data": "pairs.jsonl", "max_steps": 2,
                             "batch_size": 4, "policy_method": "lora", **common}},
        "optimize": {"int8": {"method": "quantize", "source": "run:tune/full", "scheme": "int8_dynamic",
                              "latency_samples": 2},
                     "small": {"method": "distill", "source": "run:tune/full", "student": {"ratio": 0.5},
                               "max_steps": 2, "batch_size": 4, "latency_samples": 0},
                     "sparse": {"method": "prune", "source": "run:tune/full", "sparsity": 0.5,
                                "recovery_steps": 1, "latency_samples": 0},
                     "merged": {"method": "export", "source": "run:tune/lora", "latency_samples": 0}}}
    path = make_project(tmp_path, {"candidates": {"bert": CANDIDATES["bert"]}, "latency_samples": 0}, extra=extra)
    outcomes = lifecycle.run_all(load_project(path), only=["select", "tune", "align", "optimize"], progress=False)
    assert all(o.status == "completed" for o in outcomes), [(o.variant, o.status, o.summary) for o in outcomes]
    done = {(o.stage, o.variant): o.summary for o in outcomes}
    for key, s in done.items():
        if key[0] != "select" and s.get("headline") == "rougeL":
            assert "hallucinated_entity_rate" in s, key
    assert done[("optimize", "int8")]["size_mb"] < done[("optimize", "merged")]["size_mb"]
    # the report shows the choice and the faithfulness column; `eval` takes run:select/best
    from llmcycle.cli import main
    from llmcycle.report.build import write_report

    page = Path(write_report(load_project(path))["report"]).read_text()
    assert "Base model selection" in page and "hallucinated entities" in page
    assert main(["eval", "--model", "run:select/best", "-p", str(path), "--json"]) == 0

    from llmcycle.evaluation import harness
    from llmcycle.serve.app import create_app
    from servers import running

    openai = pytest.importorskip("openai")
    loaded = harness.load("run:optimize/int8", load_project(path), device="cpu")
    assert type(loaded.model).__name__ == "BartForConditionalGeneration"
    with running(create_app(loaded, model_name="ws", prompt_template="{input} ->")) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0, timeout=60)
        chat = client.chat.completions.create(model="ws", max_tokens=4, temperature=0,
                                              messages=[{"role": "user", "content": "red is here"}])
        assert chat.choices[0].finish_reason in ("stop", "length") and chat.usage.completion_tokens >= 1
        streamed = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
            model="ws", max_tokens=4, temperature=0, stream=True,
            messages=[{"role": "user", "content": "red is here"}]))
        assert streamed == chat.choices[0].message.content
        completion = client.completions.create(model="ws", prompt="red is here ->", max_tokens=4)
        assert completion.usage.completion_tokens >= 1
