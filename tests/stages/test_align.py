"""The align stage (llmcycle/stages/align/stage.py): its config, the toxicity label and figures, and the stage end to
end on tiny models — a reward classifier trained here, PPO against it, DPO on pairs — each recorded
with the task metric and toxicity before and after."""
import json
from pathlib import Path

import pytest

from llmcycle.stages.align.stage import percent_change, toxicity_label, toxicity_stats
from llmcycle.project.config import load_project
from llmcycle.core.errors import UserError
from tiny import make_gpt2, make_t5

WORDS = ["red", "blue", "green", "grey", "cat", "dog"]
RUDE = ["idiot", "fool", "clown"]


def make_project(root: Path, align: dict, arch: str = "t5") -> Path:
    """A tiny summarization project plus labelled text (rude words are toxic) and preference pairs."""
    root.mkdir(parents=True, exist_ok=True)
    if not (root / "base" / "config.json").exists():
        (make_t5 if arch == "t5" else make_gpt2)(root / "base")
    rows = [{"text": f"{WORDS[i % 6]} is here number {i}", "summary": WORDS[i % 6]} for i in range(30)]
    (root / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    labelled = [{"text": f"you {RUDE[i % 3]} number {i}" if i % 2 else f"the {WORDS[i % 6]} one {i}",
                 "label": "toxic" if i % 2 else "not_toxic"} for i in range(60)]
    (root / "labelled.jsonl").write_text("".join(json.dumps(r) + "\n" for r in labelled))
    pairs = [{"prompt": f"{WORDS[i % 6]} is here ->", "chosen": WORDS[i % 6], "rejected": RUDE[i % 3]}
             for i in range(24)]
    (root / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in pairs))
    text = ("project: {name: tiny, task: summarization}\n"
            "data: {train: train.jsonl, input: text, target: summary, eval_size: 6}\n"
            "model: {name: base}\n"
            'evaluate: {template: "{input} ->", generation: {max_new_tokens: 4}}\n')
    (root / "llmcycle.yaml").write_text(text + "align: " + json.dumps(align) + "\n")
    return root / "llmcycle.yaml"


def test_ppo_batch_must_divide_into_mini_batches(tmp_path):
    path = make_project(tmp_path, {"p": {"method": "ppo", "reward": "rm", "max_steps": 2, "batch_size": 6,
                                         "mini_batch_size": 4}})
    with pytest.raises(UserError, match="batch_size 6 is not divisible by mini_batch_size 4"):
        load_project(path)


@pytest.mark.parametrize("variant, message", [
    ({"method": "ppo", "max_steps": 2}, "method ppo: set reward"),
    ({"method": "ppo", "reward": "rm"}, "method ppo: set max_steps"),
    ({"method": "dpo", "max_steps": 2}, "method dpo: set data"),
    ({"method": "reward_classifier", "data": "x.jsonl"}, "set epochs or max_steps"),
    ({"method": "reinforce"}, "align.v.method"),
])
def test_bad_align_configs_are_refused_naming_the_key(tmp_path, variant, message):
    path = make_project(tmp_path, {"v": variant})
    with pytest.raises(UserError, match=message):
        load_project(path)


def test_toxicity_label_is_the_other_label_of_a_binary_classifier():
    from llmcycle.stages.align.stage import PPOConfig

    cfg = PPOConfig(method="ppo", reward="rm", reward_label="not_toxic", max_steps=1)
    assert toxicity_label(cfg, ["not_toxic", "toxic"], "v") == "toxic"
    with pytest.raises(UserError, match="set toxicity_label"):
        toxicity_label(cfg, ["hate", "offensive", "not_toxic"], "v")
    with pytest.raises(UserError, match="'rude' is not a label.*labels: hate, not_toxic"):
        toxicity_label(cfg.model_copy(update={"toxicity_label": "rude"}), ["hate", "not_toxic"], "v")
    with pytest.raises(UserError, match="single output"):
        toxicity_label(cfg, None, "v")


@pytest.mark.parametrize("variant, message", [
    # an unknown key: the nearest key of the variant's own method
    ({"method": "ppo", "reward": "rm", "max_steps": 2, "kl_horizn": 5},
     r"unknown key 'align\.v\.kl_horizn' \(did you mean 'kl_horizon'\?\)"),
    ({"method": "ppo", "reward": "rm", "max_steps": 2, "mini_batch_sise": 2},
     r"unknown key 'align\.v\.mini_batch_sise' \(did you mean 'mini_batch_size'\?\)"),
    ({"method": "reward_classifier", "data": "x.jsonl", "max_steps": 2, "mini_batch_sise": 2},
     r"unknown key 'align\.v\.mini_batch_sise' \(did you mean 'batch_size'\?\)"),
    ({"method": "dpo", "data": "x.jsonl", "max_steps": 2, "betta": 0.2},
     r"unknown key 'align\.v\.betta' \(did you mean 'beta'\?\)"),
    # a key of another method is refused, naming whose it is
    ({"method": "ppo", "reward": "rm", "max_steps": 2, "beta": 0.2},
     r"key 'align\.v\.beta': 'beta' applies to method dpo / orpo / grpo / rloo / kto, not ppo"),
    ({"method": "dpo", "data": "x.jsonl", "max_steps": 2, "init_kl_coef": 0.2},
     r"key 'align\.v\.init_kl_coef': 'init_kl_coef' applies to method ppo, not dpo"),
    ({"method": "reward_classifier", "data": "x.jsonl", "max_steps": 2, "policy": "base"},
     r"'policy' applies to method ppo / dpo / orpo / grpo / rloo / kto, not reward_classifier"),
    # a wrong or missing method lists the methods; a value error names the key without the method tag
    ({"method": "reinforce"}, r"llmcycle\.yaml:\d+: key 'align\.v\.method': expected one of "
     r"'reward_classifier', 'reward_pairwise', 'ppo', 'dpo', 'orpo', 'grpo', 'rloo' or 'kto', got 'reinforce'"),
    ({"max_steps": 2}, r"key 'align\.v\.method': is required but missing"),
    ({"method": "ppo", "reward": "rm", "max_steps": 2, "kl_horizon": 0},
     r"key 'align\.v\.kl_horizon': expected a value >= 1, got 0"),
])
def test_each_method_has_its_own_keys(tmp_path, variant, message):
    path = make_project(tmp_path, {"v": variant})
    with pytest.raises(UserError, match=message):
        load_project(path)


# every PPO hyperparameter with a value other than its default
NOT_DEFAULT = {"batch_size": 6, "mini_batch_size": 3, "ppo_epochs": 2, "lr": 2e-4, "init_kl_coef": 0.05,
               "adaptive_kl": True, "target_kl": 3.0, "kl_horizon": 500, "gamma": 0.99, "lam": 0.9,
               "cliprange": 0.1, "cliprange_value": 0.3, "vf_coef": 0.5, "whiten_advantages": False,
               "min_new_tokens": 2, "max_new_tokens": 5, "temperature": 0.7, "top_k": 5, "top_p": 0.9,
               "seed": 7, "grad_clip": 0.5, "checkpoint_every": 3, "log_every": 2}


def test_every_ppo_setting_is_a_key_of_the_ppo_variant_with_the_trainers_default():
    from llmcycle.stages.align.ppo import PPOHyperparameters, PPOSettings
    from llmcycle.stages.align.stage import PPOConfig

    assert set(NOT_DEFAULT) == set(PPOHyperparameters.model_fields) == set(PPOSettings.model_fields) - {"steps"}
    cfg = PPOConfig(method="ppo", reward="rm", max_steps=5)
    assert cfg.settings() == PPOSettings(steps=5)  # one default each, the trainer's
    for key, value in NOT_DEFAULT.items():
        assert PPOHyperparameters.model_fields[key].default != value, key


def test_every_ppo_setting_in_the_project_file_reaches_the_trainer(tmp_path, monkeypatch):
    """A ppo variant setting every hyperparameter: the PPOTrainer the stage builds gets each of them."""
    from types import SimpleNamespace

    from llmcycle.stages.align import stage

    path = make_project(tmp_path, {"v": {"method": "ppo", "reward": "rm", "max_steps": 4, "eval_limit": 2,
                                         "r": 4, "alpha": 8, **NOT_DEFAULT}})
    project = load_project(path)
    got = {}

    class Reached(Exception):
        pass

    class Trainer:
        def __init__(self, policy, tokenizer, kind, reward_fn, settings, **kw):
            got["settings"] = settings
            raise Reached

    monkeypatch.setattr(stage, "resolve_ref", lambda project, ref: (ref, None))
    monkeypatch.setattr(stage, "load_reward_model", lambda *a, **kw: SimpleNamespace(labels=None))
    monkeypatch.setattr(stage, "PPOTrainer", Trainer)  # where the stage looks them up
    run = SimpleNamespace(id="r", artifacts=tmp_path / "run", log=lambda stats: None, rewind=lambda step: None)
    with pytest.raises(Reached):
        stage._align_policy(project, "v", project.config.align["v"], run, False, False)
    assert got["settings"].model_dump() == {**NOT_DEFAULT, "steps": 4}


def test_toxicity_figures_by_hand():
    stats = toxicity_stats([0.1, 0.3, 0.5])
    assert stats["mean"] == pytest.approx(0.3)
    assert stats["std"] == pytest.approx(((0.04 + 0 + 0.04) / 3) ** 0.5)
    assert percent_change(0.5, 0.4) == pytest.approx(-20.0)
    assert percent_change(0.0, 0.4) is None


def test_reward_variants_run_before_the_policy_variants_that_use_them(tmp_path):
    from llmcycle.project import lifecycle

    path = make_project(tmp_path, {
        "detox": {"method": "ppo", "reward": "run:align/rm", "max_steps": 1, "batch_size": 4},
        "rm": {"method": "reward_classifier", "data": "labelled.jsonl", "max_steps": 1}})
    assert list(lifecycle.variants(load_project(path), "align")) == ["rm", "detox"]


@pytest.mark.parametrize("task", ["summarization", "qa"])
def test_init_templates_commented_tune_align_and_augment_blocks_validate_when_uncommented(tmp_path, task):
    from llmcycle.project import init_template as templates

    lines = templates.render(task, "x").splitlines()
    start = lines.index("# tune:")
    uncommented = [line[2:] if line.startswith(("# tune:", "# align:", "# optimize:", "# augment:"))
                   or (line.startswith("#   ") and not line.startswith("#     # ")) else line
                   for line in lines[start:]]
    (tmp_path / "llmcycle.yaml").write_text("\n".join(lines[:start] + uncommented) + "\n")
    cfg = load_project(tmp_path / "llmcycle.yaml").config
    assert cfg.align["toxicity"].label_map == {"0": "toxic", "1": "toxic", "2": "not_toxic"}
    assert cfg.align["detox"].reward == "run:align/toxicity" and cfg.tune["lora"].method == "lora"
    assert cfg.augment.rag.index == "index" and cfg.augment.rag.k == 5 and cfg.augment.pal.enabled
    assert cfg.optimize["int8"].method == "quantize" and cfg.optimize["student"].student.preset == "tiny"


@pytest.mark.slow
def test_reward_model_then_ppo_then_dpo_end_to_end(tmp_path):
    """The stage on a tiny T5: a toxicity classifier trained here, PPO against its not_toxic logit, DPO
    on pairs; each recorded with the task metric and toxicity before and after."""
    from llmcycle.project import lifecycle
    from llmcycle.core.store import RunStore

    common = {"policy_method": "lora", "r": 4, "alpha": 8, "eval_limit": 6, "seed": 0}
    path = make_project(tmp_path, {
        "rm": {"method": "reward_classifier", "encoder": "base", "data": "labelled.jsonl", "lr": 1e-2,
               "batch_size": 16, "max_steps": 30, "max_length": 32},
        "detox": {"method": "ppo", "reward": "run:align/rm", "reward_label": "not_toxic", "max_steps": 3,
                  "batch_size": 4, "mini_batch_size": 2, "ppo_epochs": 1, "lr": 1e-3, "max_new_tokens": 4,
                  **common},
        "prefer": {"method": "dpo", "data": "pairs.jsonl", "max_steps": 3, "batch_size": 4, "lr": 1e-3,
                   "toxicity_model": "run:align/rm", "toxicity_label": "toxic", **common}})
    project = load_project(path)
    outcomes = {name: lifecycle.execute(project, "align", name, progress=False)
                for name in lifecycle.variants(project, "align")}
    rm = outcomes["rm"].summary
    assert rm["accuracy"] >= 0.8 and 0 <= rm["macro_f1"] <= 1  # rude words are easy to spot
    for name in ("detox", "prefer"):
        s = outcomes[name].summary
        assert s["headline"] == "rougeL" and 0 <= s["headline_before"] <= 1 and 0 <= s["rougeL"] <= 1
        assert 0 <= s["toxicity_before_mean"] <= 1 and 0 <= s["toxicity_mean"] <= 1
        assert s["toxicity_label"] == "toxic" and s["trainable_pct"] < 100
        rec = RunStore.for_project(tmp_path).get(outcomes[name].run_id)
        rows = [json.loads(line) for line in (rec.artifacts / "predictions.jsonl").read_text().splitlines()]
        assert len(rows) == 6 and all(0 <= r["toxicity"] <= 1 for r in rows)
        expected = (s["toxicity_mean"] - s["toxicity_before_mean"]) / s["toxicity_before_mean"] * 100
        assert s["toxicity_change_pct"] == pytest.approx(expected)
    ppo = outcomes["detox"].summary["training"]
    assert ppo["steps"] == 3 and "reward_mean_first" in ppo and "kl_last" in ppo
    # the aligned policy is a model folder later stages and `eval` load
    assert (RunStore.for_project(tmp_path).resolve_model("align/detox") / "adapter_config.json").exists()
    # unchanged config and inputs: the variant is skipped, not redone
    assert lifecycle.execute(project, "align", "detox", progress=False).status == "skipped"


def test_unknown_reward_label_lists_the_classifiers_labels(tmp_path):
    from llmcycle.project import lifecycle

    path = make_project(tmp_path, {
        "rm": {"method": "reward_classifier", "encoder": "base", "data": "labelled.jsonl", "max_steps": 1,
               "batch_size": 8, "max_length": 16},
        "detox": {"method": "ppo", "reward": "run:align/rm", "reward_label": "nice", "max_steps": 1,
                  "batch_size": 4}})
    project = load_project(path)
    lifecycle.execute(project, "align", "rm", progress=False)
    with pytest.raises(UserError, match="nice.*not_toxic, toxic|not_toxic, toxic.*nice"):
        lifecycle.execute(project, "align", "detox", progress=False)


def test_dpo_says_which_pairs_it_skipped_and_on_how_few_it_measured(tmp_path, capfd):
    """Pairs left out (identical, empty, prompt over max_prompt_length) are counted in the summary and
    said on stderr with the first of each; the held-out accuracy on fewer than evaluate.min_examples pairs
    is flagged; `llmcycle align` prints the accuracy with its number of pairs."""
    from types import SimpleNamespace

    from llmcycle.cli import _report_outcomes
    from llmcycle.stages.align import stage

    path = make_project(tmp_path, {"v": {"method": "dpo", "data": "pairs.jsonl", "max_steps": 1, "batch_size": 4,
                                         "max_prompt_length": 24, "r": 4, "alpha": 8}})
    good = [{"prompt": f"{WORDS[i % 6]} is here ->", "chosen": WORDS[i % 6], "rejected": RUDE[i % 3]}
            for i in range(20)]
    bad = [{"prompt": "red is here ->", "chosen": "same", "rejected": "same"},
           {"prompt": "red is here ->", "chosen": "  ", "rejected": "fool"},
           {"prompt": " ".join(WORDS * 10), "chosen": "red", "rejected": "fool"}]
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in good + bad))
    project = load_project(path)
    cfg = project.config.align["v"]
    policy, tok, kind, *_ = stage.load_policy(project, "v", cfg)
    run = SimpleNamespace(id="r", log=lambda row: None)
    trained = stage._train_on_pairs(project, "v", cfg, policy, tok, kind, run, False)

    assert trained["pairs_total"] == 23 and trained["max_length"] == trained["window"] == 512
    assert trained["pairs_skipped"] == {"identical": 1, "empty": 1, "over_max_prompt_length": 1}
    assert trained["pairs"] + trained["measured_pairs"] == 20 and trained["measured_on"] == "eval"  # 21 loaded
    assert trained["too_few_pairs"]  # 2 held out (eval_fraction 0.1 of 21), under min_examples 20
    err = " ".join(capfd.readouterr().err.split())  # rich may wrap the line
    assert ("align.v: skipped 3 of 23 preference pairs: 1 with identical responses (first: pairs.jsonl:21), 1 with "
            "an empty response (first: pairs.jsonl:22), 1 with prompts over max_prompt_length 24 tokens (first: "
            "pairs.jsonl:23); pairs are never cut: raise align.v.max_length / max_prompt_length to keep them "
            "(max_length unset: the model's context window, 512 tokens)") in err
    assert (f"align.v: preference accuracy measured on only {trained['measured_pairs']} held-out pairs (fewer than "
            "evaluate.min_examples 20)") in err

    outcome = SimpleNamespace(status="completed", stage="align", variant="v", run_id="r", summary={"training": trained})
    _report_outcomes([outcome], False)
    printed = " ".join(capfd.readouterr().out.split())
    assert (f"dpo reward accuracy: {trained['reward_accuracy']:.3f} on {trained['measured_pairs']} held-out pairs; "
            "trained on 18 pairs; skipped: 1 identical, 1 empty, 1 over_max_prompt_length") in printed


def test_kto_variant_on_labelled_completions_end_to_end(tmp_path):
    """KTO from the labelled text as unpaired feedback (not_toxic desirable) on a tiny GPT-2, evaluated
    before and after like every policy variant; a seq2seq policy is refused before any training."""
    from llmcycle.project import lifecycle

    kto = {"method": "kto", "data": "labelled.jsonl", "prompt_field": "text", "completion_field": "label",
           "label_field": "label", "desirable": ["not_toxic"], "max_steps": 2, "batch_size": 4, "lr": 1e-3,
           "r": 4, "alpha": 8, "eval_limit": 6}
    project = load_project(make_project(tmp_path / "gpt2", {"k": kto}, arch="gpt2"))
    s = lifecycle.execute(project, "align", "k", progress=False).summary
    assert s["training"]["desirable"] == 30 and s["training"]["undesirable"] == 30
    assert s["training"]["steps"] == 2 and s["paired"]["n_common"] == 6
    assert 0 <= s["headline_before"] <= 1 and 0 <= s[s["headline"]] <= 1
    project = load_project(make_project(tmp_path / "t5", {"k": kto}))
    with pytest.raises(UserError, match="KTOTrainer trains causal models only"):
        lifecycle.execute(project, "align", "k", progress=False)


@pytest.mark.slow
def test_grpo_with_a_reward_model_trained_here_on_a_seq2seq_policy(tmp_path):
    """rloo on a tiny T5 with two rewards: a not_toxic classifier trained in the same project (run:align/rm)
    and a length penalty; toxicity before / after from the same classifier; the rewards on the held-out
    outputs agree with the classifier's own scores of them."""
    from llmcycle.core.store import RunStore
    from llmcycle.project import lifecycle
    from llmcycle.stages.align.reward import load_reward_model

    path = make_project(tmp_path, {
        "rm": {"method": "reward_classifier", "encoder": "base", "data": "labelled.jsonl", "lr": 1e-2,
               "batch_size": 16, "max_steps": 30, "max_length": 32},
        "polite": {"method": "rloo", "max_steps": 2, "batch_size": 2, "group_size": 2, "mini_batch_size": 4,
                   "max_new_tokens": 4, "lr": 1e-3, "r": 4, "alpha": 8, "eval_limit": 6,
                   "toxicity_model": "run:align/rm", "toxicity_label": "toxic",
                   "rewards": {"nice": {"kind": "reward_model", "model": "run:align/rm", "label": "not_toxic"},
                               "short": {"kind": "length", "target": 2, "weight": 0.5}}}})
    project = load_project(path)
    outcomes = {name: lifecycle.execute(project, "align", name, progress=False)
                for name in lifecycle.variants(project, "align")}
    s = outcomes["polite"].summary
    assert s["training"]["steps"] == 2 and 0 <= s["reward_nice"] <= 1 and -1 <= s["reward_short"] <= 0
    store = RunStore.for_project(tmp_path)
    rec = store.get(outcomes["polite"].run_id)
    rows = [json.loads(line) for line in (rec.artifacts / "predictions.jsonl").read_text().splitlines()]
    rm = load_reward_model(str(store.resolve_model("align/rm")), label="not_toxic", output="probability")
    assert [r["reward_nice"] for r in rows] == pytest.approx(rm.score([r["prediction"] for r in rows]), abs=1e-5)
    assert [r["reward_nice"] for r in rows] == pytest.approx([1 - r["toxicity"] for r in rows], abs=1e-5)
    # the reward model is an input of the variant: retraining it makes the rloo run stale
    from llmcycle.stages.align.stage import _inputs

    config = project.config.align["polite"].model_dump()
    assert _inputs(project, config, lambda ref: f"id:{ref}")["models"] == {
        "toxicity_model": "id:run:align/rm", "rewards.nice": "id:run:align/rm"}
