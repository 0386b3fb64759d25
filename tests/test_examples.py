"""The example projects under examples/: each validates as it is, and examples/gsm8k-grpo runs end to end
offline with a tiny chat model in place of its Hub model (the same rewards, sandbox and evaluation)."""
import json
import shutil
from pathlib import Path

import pytest

from llmcycle.project.config import load_project
from tiny import make_chat_model

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
GSM8K = Path(__file__).resolve().parents[2] / "shared" / "data" / "gsm8k" / "train.jsonl"


@pytest.mark.parametrize("name", ["dialogsum-flan-t5", "gsm8k-grpo"])
def test_example_projects_validate(name):
    project = load_project(EXAMPLES / name / "llmcycle.yaml")
    assert project.config.project.name


def test_gsm8k_grpo_reads_gsm8k_and_checks_answers_with_program_and_exact_answer():
    cfg = load_project(EXAMPLES / "gsm8k-grpo" / "llmcycle.yaml").config
    grpo = cfg.align["grpo"]
    assert grpo.method == "grpo" and grpo.group_size >= 2
    assert {spec.kind for spec in grpo.rewards.values()} >= {"program", "exact_answer"}
    assert cfg.data.train.endswith("shared/data/gsm8k/train.jsonl") and cfg.data.target == "answer"


@pytest.mark.data
@pytest.mark.skipif(not GSM8K.is_file(), reason=f"needs the GSM8K data at {GSM8K}")
def test_gsm8k_grpo_runs_offline_with_a_tiny_chat_model(tmp_path):
    from llmcycle.project import lifecycle

    text = (EXAMPLES / "gsm8k-grpo" / "llmcycle.yaml").read_text()
    (tmp_path / "llmcycle.yaml").write_text(text.replace("../../../shared/data/gsm8k/train.jsonl", str(GSM8K)))
    model = make_chat_model(tmp_path / "chat", "llama3")
    overrides = [f"model.name={model}", "model.context_window=2048", "align.grpo.max_steps=2",
                 "align.grpo.max_new_tokens=8", "align.grpo.eval_limit=4", "evaluate.generation.max_new_tokens=8",
                 "align.grpo.batch_size=2", "align.grpo.group_size=4", "align.grpo.mini_batch_size=8"]
    project = load_project(tmp_path / "llmcycle.yaml", overrides)
    summary = lifecycle.execute(project, "align", "grpo", progress=False).summary
    assert summary["training"]["steps"] == 2
    for name in ("reward_program", "reward_answer", "reward_shape"):
        assert 0 <= summary[name + "_before"] <= 1 and 0 <= summary[name] <= 1
    logged = [json.loads(line) for line in next(tmp_path.glob("runs/align-grpo-*/metrics.jsonl")).read_text()
              .splitlines()]
    assert [row["step"] for row in logged if "flat_group_share" in row] == [1, 2]
    shutil.rmtree(tmp_path / "runs")
