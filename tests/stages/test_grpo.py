"""GRPO / RLOO (llmcycle/stages/align/grpo.py): a constant reward gives no gradient, a verifiable reward is
learnt by tiny causal and seq2seq policies, resume ends where an uninterrupted run ends, bad settings are
refused; and the align stage's grpo variant end to end: rewards before and after, the paired comparison,
per-step logs, config errors naming the key."""
from __future__ import annotations

import json

import pytest
import torch

from llmcycle.core.errors import UserError
from llmcycle.stages.align import rewards as rw
from llmcycle.stages.align.grpo import GroupSettings, GroupTrainer
from tiny import make_gpt2, make_t5

pytestmark = pytest.mark.filterwarnings("ignore:Model has `tie_word_embeddings=True`")
TARGETS = {"seq2seq": ["q", "v", "lm_head"], "causal": ["c_attn", "lm_head"]}
PROMPTS = ["say 7", "the number 7", "write 7", "answer: 7"]
ANSWER = {"answer": {"kind": "exact_answer"}}


def answer_reward(prompts, completions, references):
    return rw.combine(ANSWER, prompts, completions, references)


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("grpo-models")
    return {"seq2seq": make_t5(root / "t5"), "causal": make_gpt2(root / "gpt2")}


def policy_of(dirs, kind, lora=True):
    from peft import LoraConfig, get_peft_model

    from llmcycle.models.load import load_model
    from llmcycle.training.finetune import task_type

    model, tok = load_model(str(dirs[kind]), dtype="float32", device="cpu")
    if not lora:
        return model, tok
    torch.manual_seed(0)
    cfg = LoraConfig(task_type=task_type(kind), r=8, lora_alpha=16, lora_dropout=0.0, target_modules=TARGETS[kind])
    return get_peft_model(model, cfg), tok


def settings(**kw):
    base = dict(steps=4, batch_size=4, group_size=4, mini_batch_size=8, lr=1e-2, max_new_tokens=4, baseline="grpo")
    return GroupSettings(**{**base, **kw})


def trainable(trainer):
    return {n: p.detach().clone() for n, p in trainer.policy.named_parameters() if p.requires_grad}


def sampled_accuracy(trainer) -> float:
    """exact_answer of 8 sampled completions per prompt, drawn with one fixed seed (the same draw before and
    after training)."""
    roll = trainer.rollout([p for p in PROMPTS for _ in range(8)], step=10_000)
    return sum(rw.exact_answer(roll.texts, ["7"] * len(roll.texts)).values) / len(roll.texts)


def test_a_constant_reward_gives_no_gradient_and_is_counted_as_flat(dirs):
    """Every group flat: every advantage 0, so with no KL term (beta 0: no reference pass, the KL is not
    measured) the gradient is exactly 0 and nothing may move."""
    policy, tok = policy_of(dirs, "causal")
    trainer = GroupTrainer(policy, tok, "causal", lambda p, c, r: ([1.0] * len(c), {}), settings(steps=1, beta=0.0))
    before = trainable(trainer)
    stats = trainer.step(PROMPTS, ["7"] * 4)
    assert stats["flat_group_share"] == 1.0 and stats["reward_std"] == 0.0
    assert stats["kl"] is None and stats["clipfrac"] == 0.0 and stats["loss"] == 0.0
    for name, value in trainable(trainer).items():
        assert torch.equal(value, before[name]), name


def test_step_logs_each_reward_kl_lengths_and_flat_groups(dirs):
    policy, tok = policy_of(dirs, "seq2seq")
    specs = {"answer": {"kind": "exact_answer"}, "short": {"kind": "length", "target": 1, "weight": 0.5}}
    trainer = GroupTrainer(policy, tok, "seq2seq", lambda p, c, r: rw.combine(specs, p, c, r), settings(epochs=2))
    stats = trainer.step(PROMPTS, ["7"] * 4)
    for key in ("reward_answer_mean", "reward_answer_std", "reward_short_mean", "reward_short_std", "kl",
                "clipfrac", "completion_length", "flat_group_share", "truncated_share", "loss"):
        assert isinstance(stats[key], float), key
    assert stats["reward_mean"] == pytest.approx(stats["reward_answer_mean"] + 0.5 * stats["reward_short_mean"],
                                                 abs=1e-6)
    assert 1 <= stats["completion_length"] <= 4 and stats["kl"] >= 0
    assert 0 <= stats["flat_group_share"] <= 1 and stats["step"] == 1


@pytest.mark.slow
@pytest.mark.parametrize("kind, lr, new_tokens", [("causal", 1e-2, 8), ("seq2seq", 1e-2, 4)])
def test_the_policy_learns_to_give_the_checked_answer(dirs, kind, lr, new_tokens):
    """exact_answer against '7': the untrained policy ends on 7 in about 3% of its completions. Measured
    (seed 42): the mean reward of the last 10 of 40 steps is 0.5-0.97."""
    s = settings(steps=40, group_size=8, mini_batch_size=16, lr=lr, max_new_tokens=new_tokens)
    trainer = GroupTrainer(*policy_of(dirs, kind), kind, answer_reward, s)
    before = sampled_accuracy(trainer)
    history = trainer.train(PROMPTS, references=["7"] * 4, progress=False)["history"]
    mean = lambda rows: sum(h["reward_mean"] for h in rows) / len(rows)  # noqa: E731
    assert mean(history[:5]) < 0.2 and mean(history[-10:]) > 0.4
    after = sampled_accuracy(trainer)
    assert before < 0.2 and after > before + 0.3
    assert max(h["kl"] for h in history) < 10.0


@pytest.mark.parametrize("kind, lora, baseline", [("seq2seq", True, "rloo"), ("causal", False, "grpo")])
def test_resume_ends_where_an_uninterrupted_run_ends(dirs, tmp_path, kind, lora, baseline):
    s = dict(baseline=baseline, epochs=2, checkpoint_every=2)
    straight = GroupTrainer(*policy_of(dirs, kind, lora), kind, answer_reward, settings(**s))
    full = straight.train(PROMPTS, references=["7"] * 4, progress=False)["history"]

    GroupTrainer(*policy_of(dirs, kind, lora), kind, answer_reward, settings(**{**s, "steps": 2})).train(
        PROMPTS, references=["7"] * 4, checkpoint_dir=tmp_path, progress=False)
    assert not (tmp_path / "step-2" / "model" / "value_head.safetensors").exists()  # no critic
    resumed = GroupTrainer(*policy_of(dirs, kind, lora), kind, answer_reward, settings(**s))
    history = resumed.train(PROMPTS, references=["7"] * 4, checkpoint_dir=tmp_path, resume=True,
                            progress=False)["history"]
    assert [h["step"] for h in history] == [1, 2, 3, 4]
    for a, b in zip(full, history):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-6) and a["reward_mean"] == b["reward_mean"]
    want, got = trainable(straight), trainable(resumed)
    for name in want:
        assert torch.allclose(want[name], got[name], atol=1e-6), name


def test_bad_settings_and_reward_output_are_refused(dirs, tmp_path):
    policy, tok = policy_of(dirs, "causal")
    with pytest.raises(UserError, match="group_size must be at least 2"):
        GroupTrainer(policy, tok, "causal", answer_reward, settings(group_size=1))
    with pytest.raises(UserError, match="mini_batch_size 5 does not divide the 16 completions"):
        GroupTrainer(policy, tok, "causal", answer_reward, settings(mini_batch_size=5))
    trainer = GroupTrainer(policy, tok, "causal", answer_reward, settings())
    with pytest.raises(UserError, match="4 prompts but 3 references"):
        trainer.train(PROMPTS, references=["7"] * 3, progress=False)
    with pytest.raises(UserError, match="reference 1 .* holds no number"):
        trainer.step(PROMPTS, ["seven"] * 4)
    short = GroupTrainer(policy, tok, "causal", lambda p, c, r: ([1.0], {}), settings())
    with pytest.raises(UserError, match="gave 1 values for 16 completions"):
        short.step(PROMPTS, ["7"] * 4)
    with pytest.raises(UserError, match="takes batch_size = 4 prompts, got 3"):
        trainer.step(PROMPTS[:3], ["7"] * 3)


# ------------------------------------------------------------------------------------ the stage
def make_project(root, align: dict, with_answers: bool = True):
    root.mkdir(parents=True, exist_ok=True)
    if not (root / "base" / "config.json").exists():
        make_gpt2(root / "base")
    rows = [{"text": f"say {i % 10}", "answer": str(i % 10)} for i in range(24)]
    (root / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    text = ("project: {name: tiny, task: qa}\n"
            f"data: {{train: train.jsonl, input: text, target: {'answer' if with_answers else 'null'}, eval_size: 6}}\n"
            "model: {name: base}\n"
            'evaluate: {template: "{input} ->", generation: {max_new_tokens: 4}}\n')
    (root / "llmcycle.yaml").write_text(text + "align: " + json.dumps(align) + "\n")
    return root / "llmcycle.yaml"


GRPO = {"method": "grpo", "max_steps": 3, "batch_size": 2, "group_size": 4, "mini_batch_size": 4,
        "max_new_tokens": 4, "lr": 1e-3, "r": 4, "alpha": 8, "eval_limit": 6,
        "rewards": {"answer": {"kind": "exact_answer"}, "fmt": {"kind": "format", "pattern": "[0-9]", "weight": 0.5}}}


def test_the_grpo_variant_end_to_end(tmp_path):
    from llmcycle.core.store import RunStore
    from llmcycle.project import lifecycle
    from llmcycle.project.config import load_project

    project = load_project(make_project(tmp_path, {"g": GRPO}))
    outcome = lifecycle.execute(project, "align", "g", progress=False)
    s = outcome.summary
    for key in ("reward", "reward_answer", "reward_fmt"):
        assert 0 <= s[key + "_before"] <= 1.5 and 0 <= s[key] <= 1.5, key
    assert s["training"]["steps"] == 3 and "reward_answer_mean_first" in s["training"]
    names = [m["metric"] for m in s["paired"]["metrics"]]
    assert names[0] == s["headline"] and {"reward", "reward_answer", "reward_fmt"} <= set(names)
    assert s["paired"]["n_common"] == 6
    rec = RunStore.for_project(tmp_path).get(outcome.run_id)
    logged = [json.loads(line) for line in (rec.dir / "metrics.jsonl").read_text().splitlines()]
    steps = [row for row in logged if "flat_group_share" in row]
    assert [row["step"] for row in steps] == [1, 2, 3]
    assert all("reward_fmt_mean" in row and "kl" in row for row in steps)
    rows = [json.loads(line) for line in (rec.artifacts / "predictions.jsonl").read_text().splitlines()]
    fmt = [1.0 if any(ch.isdigit() for ch in r["prediction"]) else 0.0 for r in rows]
    assert [r["reward_fmt"] for r in rows] == fmt  # by hand: a digit anywhere


@pytest.mark.parametrize("change, message", [
    ({"group_size": 1}, "group_size must be at least 2"),
    ({"mini_batch_size": 3}, "mini_batch_size 3 does not divide the 8 completions"),
    ({"rewards": {}}, "set rewards"),
    ({"rewards": {"f": {"kind": "format"}}}, "a format reward needs pattern"),
    ({"rewards": {"f": {"kind": "format", "pattern": "("}}}, "pattern '\\(' is not a regular expression"),
    ({"rewards": {"f": {"kind": "lenght"}}}, "rewards.f.kind"),
    ({"max_steps": None}, "set max_steps"),
])
def test_bad_grpo_configs_are_refused_naming_the_key(tmp_path, change, message):
    from llmcycle.project.config import load_project

    variant = {k: v for k, v in {**GRPO, **change}.items() if v is not None}
    with pytest.raises(UserError, match=message):
        load_project(make_project(tmp_path, {"g": variant}))


@pytest.mark.parametrize("rewards, with_answers, message", [
    ({"mine": {"kind": "python", "function": "no_such_module:f"}}, True, "cannot import 'no_such_module'"),
    ({"answer": {"kind": "exact_answer"}}, False, "reward answer \\(exact_answer\\) needs a reference answer"),
])
def test_rewards_that_cannot_work_stop_the_run_before_training(tmp_path, rewards, with_answers, message):
    from llmcycle.project import lifecycle
    from llmcycle.project.config import load_project

    project = load_project(make_project(tmp_path, {"g": {**GRPO, "rewards": rewards}}, with_answers))
    with pytest.raises(UserError, match=message):
        lifecycle.execute(project, "align", "g", progress=False)


def test_a_program_reward_where_the_sandbox_cannot_run_is_refused_saying_why(tmp_path, monkeypatch):
    from llmcycle.augment import sandbox
    from llmcycle.project import lifecycle
    from llmcycle.project.config import load_project

    broken = sandbox.SandboxResult(False, "", None, "the sandbox needs a POSIX system (resource)", 0.0, "crash")
    monkeypatch.setattr(sandbox, "run_program", lambda *a, **k: broken)
    project = load_project(make_project(tmp_path, {"g": {**GRPO, "rewards": {"prog": {"kind": "program"}}}}))
    with pytest.raises(UserError, match=r"align\.g\.rewards\.prog: the PAL sandbox cannot run programs here "
                                        r"\(crash: the sandbox needs a POSIX system \(resource\)\)"):
        lifecycle.execute(project, "align", "g", progress=False)


def test_the_grpo_variant_through_trl(tmp_path):
    from llmcycle.project import lifecycle
    from llmcycle.project.config import load_project

    project = load_project(make_project(tmp_path, {"g": {**GRPO, "backend": "trl"}}))
    s = lifecycle.execute(project, "align", "g", progress=False).summary
    assert s["training"]["backend"] == "trl" and s["training"]["steps"] == 3
    assert "reward_fmt_mean_first" in s["training"] and 0 <= s["reward_fmt"] <= 1
    assert s["paired"]["n_common"] == 6
