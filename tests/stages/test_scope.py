"""Scope planner: every figure checked against values computed by hand."""
import json

import pytest
from tiny import make_gpt2, make_t5

from llmcycle.stages import scope
from llmcycle.project.config import load_project


def test_rules_of_thumb_by_hand():
    assert scope.serve_memory(1_000_000) == {"fp32": 4e6, "bf16": 2e6, "int8": 1e6, "int4": 5e5}
    assert scope.train_memory(1_000_000) == 20e6  # 20 bytes per parameter with Adam in fp32
    # LoRA: 1M frozen at 4 bytes + 10k trainable at 20 bytes
    assert scope.train_memory(1_010_000, 10_000) == 1_000_000 * 4 + 10_000 * 20
    assert scope.train_flops(1_000_000, 2_000_000) == 1.2e13  # 6 * N * D
    assert scope.train_seconds(1.2e13, 1.0) == pytest.approx(12.0)
    assert scope.train_seconds(1.2e13, 0.5) == pytest.approx(24.0)
    assert scope.compute_optimal_tokens(60_000_000) == 1.2e9  # 20 tokens per parameter


def test_percentiles_nearest_rank():
    stats = scope.percentiles(list(range(1, 101)))
    assert stats == {"count": 100, "mean": 50.5, "max": 100, "p50": 50, "p90": 90, "p95": 95, "p99": 99}
    assert scope.percentiles([7]) == {"count": 1, "mean": 7.0, "max": 7, "p50": 7, "p90": 7, "p95": 7, "p99": 7}
    assert scope.percentiles([]) == {"count": 0}


def test_lora_parameter_count_matches_hand_count(tmp_path):
    from transformers import AutoModelForSeq2SeqLM

    model = AutoModelForSeq2SeqLM.from_pretrained(make_t5(tmp_path / "t5"))
    c = model.config
    # q and v in 6 attention blocks (2 encoder self, 2 decoder self, 2 decoder cross)
    inner = c.num_heads * c.d_kv
    assert scope.lora_parameters(model, ["q", "v"], r=4) == 6 * 2 * 4 * (c.d_model + inner)


def _project(tmp_path, model_dir, window=None, extra=""):
    rows = [{"dialogue": "the cat sat on the mat " * k, "summary": "a cat sat"} for k in range(1, 11)]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    text = f"""
project: {{name: t, task: summarization}}
scope: {{use_case: test, throughput_tflops: 2.0, tune_epochs: 2, lora_r: 4}}
data: {{train: train.jsonl, input: dialogue, target: summary, eval_size: 2, seed: 1}}
model: {{name: {model_dir}{', context_window: ' + str(window) if window else ''}}}
{extra}"""
    (tmp_path / "llmcycle.yaml").write_text(text)
    return load_project(tmp_path / "llmcycle.yaml")


def test_plan_figures_for_a_selected_model(tmp_path):
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    model_dir = make_t5(tmp_path / "t5")
    project = _project(tmp_path, model_dir, window=20)
    plan = scope.build_plan(project)
    model = AutoModelForSeq2SeqLM.from_pretrained(model_dir)
    tok = AutoTokenizer.from_pretrained(model_dir)
    params = sum(p.numel() for p in model.parameters())
    assert plan["model"]["parameters"] == params
    assert plan["model"]["context_window"] == 20
    assert plan["data"]["train"] == 8 and plan["data"]["eval"] == 2

    from llmcycle.data.records import load_splits

    train = load_splits(project.config.data, tmp_path).train
    lengths = [len(tok(e.input)["input_ids"]) for e in train]
    target_tokens = sum(len(tok(t)["input_ids"]) for e in train for t in e.targets)
    stats = plan["data"]["token_stats"]["train"]
    assert stats["input"]["tokens"] == sum(lengths) and stats["input"]["max"] == max(lengths)
    # Overflow is counted on the prompt as the model will read it (the project's template), as tune and
    # eval count what they skip: by hand, the templated prompt (or target plus eos) over 20 tokens.
    template = "Summarize the following conversation.\n\n{input}\n\nSummary:"
    prompt_len = [len(tok(template.format(input=e.input))["input_ids"]) for e in train]
    target_len = [len(tok(e.targets[0])["input_ids"]) for e in train]  # T5's tokenizer appends eos
    over = plan["data"]["overflow"]
    assert over["train_over"] == sum(p > 20 or t > 20 for p, t in zip(prompt_len, target_len))
    assert over["train_over"] > sum(n > 20 for n in lengths)  # the raw inputs alone undercount it
    evals = load_splits(project.config.data, tmp_path).eval
    assert over["eval_over"] == sum(len(tok(template.format(input=e.input))["input_ids"]) > 20 for e in evals)

    tune = plan["stages"][0]
    tokens = int((sum(lengths) + target_tokens) * 2)  # two epochs
    assert tune["train_tokens"] == tokens
    assert tune["train_flops"] == 6 * params * tokens
    assert tune["train_seconds"] == pytest.approx(6 * params * tokens / 2e12)
    assert tune["serve_memory_bytes"]["bf16"] == 2 * params
    lora = scope.lora_parameters(model, ["q", "v"], 4)
    assert tune["lora_parameters"] == lora
    assert tune["train_memory_bytes"] == {"full_adam_fp32": 20 * params,
                                          "lora_adam_fp32": 4 * params + 20 * lora}


def test_plan_for_pretraining_uses_chinchilla(tmp_path):
    model_dir = make_gpt2(tmp_path / "gpt")
    extra = """pretrain:
  small:
    architecture: gpt
    d_model: 32
    n_layers: 2
    n_heads: 2
    vocab_size: 500
    seq_len: 64
    batch_size: 4
    max_steps: 10
"""
    plan = scope.build_plan(_project(tmp_path, model_dir, extra=extra))
    pre = [s for s in plan["stages"] if s["stage"] == "pretrain.small"][0]
    from transformers import GPT2Config, GPT2LMHeadModel

    ref = GPT2LMHeadModel(GPT2Config(vocab_size=500, n_positions=64, n_embd=32, n_layer=2, n_head=2))
    params = sum(p.numel() for p in ref.parameters())
    assert pre["parameters"] == params
    assert pre["train_tokens"] == 10 * 4 * 64
    assert pre["compute_optimal_tokens"] == 20 * params
    assert pre["tokens_vs_optimal"] == round(10 * 4 * 64 / (20 * params), 4)


def test_plan_rows_for_configured_tune_variants(tmp_path):
    from transformers import AutoModelForSeq2SeqLM

    model_dir = make_t5(tmp_path / "t5")
    extra = """tune:
  lora: {method: lora, r: 4, max_steps: 10, batch_size: 2}
  full: {method: full, epochs: 1}
  soft: {method: prompt_tuning, num_virtual_tokens: 5, epochs: 1}
"""
    plan = scope.build_plan(_project(tmp_path, model_dir, extra=extra))
    rows = {s["stage"]: s for s in plan["stages"]}
    model = AutoModelForSeq2SeqLM.from_pretrained(model_dir)
    params = sum(p.numel() for p in model.parameters())
    lora = scope.lora_parameters(model, ["q", "v"], 4)
    assert rows["tune.lora"]["trainable_parameters"] == lora
    assert rows["tune.lora"]["train_memory_bytes"] == {"lora_adam_fp32": 4 * params + 20 * lora}
    assert rows["tune.full"]["trainable_parameters"] == params
    assert rows["tune.full"]["train_memory_bytes"] == {"full_adam_fp32": 20 * params}
    # two soft prompts (encoder and decoder) of 5 tokens x d_model
    assert rows["tune.soft"]["trainable_parameters"] == 2 * 5 * model.config.d_model
    assert "fine-tune" not in rows


def test_scope_counts_the_prompts_that_lose_shots_as_the_prompt_stage_does(tmp_path):
    from llmcycle.project import lifecycle

    model_dir = make_t5(tmp_path / "t5")
    project = _project(tmp_path, model_dir, window=150, extra=(
        'evaluate: {template: "{input}", generation: {max_new_tokens: 2}}\n'
        "prompt: {shots: [3], selection: [first]}\n"))
    planned = scope.build_plan(project)["data"]["overflow"]["prompts_losing_shots"]
    outcome = lifecycle.execute(project, "prompt", "default.3shot.first.greedy", progress=False)
    measured = project.store().get(outcome.run_id).summary()["prompts_lost_shots"]
    assert planned == {3: measured} and measured > 0
