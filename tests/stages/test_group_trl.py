"""GRPO / RLOO through TRL (llmcycle/stages/align/group_trl.py): our settings reach TRL's config, our rewards
are its reward functions, its logs arrive under our names and step numbers, the reference adapter is not
left behind, a resume with other settings is refused, a seq2seq policy is refused; and the stage's
`backend: trl`."""
from __future__ import annotations

import json

import pytest
import torch

from llmcycle.core.errors import UserError
from llmcycle.stages.align.grpo import GroupSettings
from llmcycle.stages.align.group_trl import reward_functions, train_with_trl, trl_config
from tiny import make_gpt2, make_t5

pytestmark = pytest.mark.filterwarnings("ignore")
PROMPTS = ["say 7", "the number 7", "write 7", "answer: 7"]
# the length penalty varies within almost every group of a random policy's completions, so there is always
# a gradient (exact_answer alone is flat everywhere at first)
ANSWER = {"answer": {"kind": "exact_answer"}, "digits": {"kind": "format", "pattern": "[0-9]", "weight": 0.5},
          "short": {"kind": "length", "target": 1, "weight": 0.5}}


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("trl-models")
    return {"causal": make_gpt2(root / "gpt2"), "seq2seq": make_t5(root / "t5")}


def lora(dirs, kind="causal"):
    from peft import LoraConfig, get_peft_model

    from llmcycle.models.load import load_model
    from llmcycle.training.finetune import task_type

    model, tok = load_model(str(dirs[kind]), dtype="float32", device="cpu")
    torch.manual_seed(0)
    targets = ["c_attn"] if kind == "causal" else ["q", "v"]
    return get_peft_model(model, LoraConfig(task_type=task_type(kind), r=8, lora_alpha=16, lora_dropout=0.0,
                                            target_modules=targets)), tok


def settings(**kw):
    base = dict(steps=3, batch_size=4, group_size=4, mini_batch_size=8, lr=1e-2, max_new_tokens=4, baseline="grpo")
    return GroupSettings(**{**base, **kw})


def test_settings_map_onto_trls_config():
    s = settings(epochs=2, beta=0.1, cliprange=0.3, scale_rewards=False, checkpoint_every=5, top_k=7)
    config, per_step = trl_config(s, "/tmp/x", [1.0, 0.5], torch.device("cpu"))
    assert per_step == 4  # 16 completions / 8 per update, 2 passes
    assert (config.num_generations, config.per_device_train_batch_size, config.steps_per_generation) == (4, 8, 2)
    assert (config.num_iterations, config.max_steps, config.save_steps, config.beta, config.epsilon) == \
        (2, 12, 20, 0.1, 0.3)
    assert config.scale_rewards == "none" and config.loss_type == "dapo" and config.reward_weights == [1.0, 0.5]
    assert (config.top_k, config.learning_rate, config.lr_scheduler_type, config.weight_decay) == \
        (7, 1e-2, "constant", 0.0)


def test_reward_functions_score_trl_completions_and_count_program_failures():
    failures = {}
    specs = {"prog": {"kind": "program", "timeout_s": 2.0}, "answer": {"kind": "exact_answer"}}
    prog, answer = reward_functions(specs, {}, failures)
    assert (prog.__name__, answer.__name__) == ("prog", "answer")
    turns = [[{"role": "assistant", "content": "```python\nprint(7)\n```"}], [{"role": "assistant", "content": "1/0"}]]
    assert prog(["p", "p"], turns, reference=["7", "7"]) == [1.0, 0.0]
    assert failures == {"prog": {"error": 1}}
    assert answer(["p", "p"], ["so 7", "so 8"], reference=["#### 7", "#### 7"]) == [1.0, 0.0]


def test_trl_trains_the_adapter_logs_our_names_and_leaves_no_reference_adapter(dirs):
    policy, tok = lora(dirs)
    before = {n: p.detach().clone() for n, p in policy.named_parameters()}
    rows = []
    result = train_with_trl(policy, tok, settings(), ANSWER, {}, PROMPTS, ["7"] * 4, log=rows.append, progress=False)
    assert result["steps"] == 3 and result["backend"] == "trl"
    assert [r["step"] for r in rows] == [1, 2, 3]
    for key in ("reward_mean", "reward_answer_mean", "reward_digits_std", "kl", "completion_length",
                "flat_group_share", "clipfrac", "loss"):
        assert isinstance(rows[-1][key], float), key
    assert list(policy.peft_config) == ["default"]
    changed = {n for n, p in policy.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all("lora_" in n for n in changed)


def test_a_resume_with_other_settings_is_refused_and_seq2seq_is_refused(dirs, tmp_path):
    policy, tok = lora(dirs)
    train_with_trl(policy, tok, settings(steps=2, checkpoint_every=1), ANSWER, {}, PROMPTS, ["7"] * 4,
                   checkpoint_dir=tmp_path, progress=False)
    assert (tmp_path / "checkpoint-2").is_dir() and json.loads((tmp_path / "llmcycle_run.json").read_text())
    policy, tok = lora(dirs)
    with pytest.raises(UserError, match="lr: 0.01 → 0.005"):
        train_with_trl(policy, tok, settings(steps=3, lr=5e-3), ANSWER, {}, PROMPTS, ["7"] * 4,
                       checkpoint_dir=tmp_path, resume=True, progress=False)
    rewound = []
    result = train_with_trl(policy, tok, settings(steps=3, checkpoint_every=1), ANSWER, {}, PROMPTS, ["7"] * 4,
                            checkpoint_dir=tmp_path, resume=True, progress=False, on_resume=rewound.append)
    assert rewound == [2] and result["resumed_from"]["step"] == 2 and [r["step"] for r in result["history"]] == [3]
    t5, t5_tok = lora(dirs, "seq2seq")
    with pytest.raises(UserError, match="take causal models only"):
        train_with_trl(t5, t5_tok, settings(), ANSWER, {}, PROMPTS, ["7"] * 4, progress=False)
