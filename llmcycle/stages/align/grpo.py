"""GRPO and RLOO: group-relative policy optimization with verifiable or model rewards, no critic.

One step, on `batch_size` prompts (Shao et al. 2024, DeepSeekMath; Ahmadian et al. 2024 for RLOO):

  1. rollout    sample `group_size` (G) completions of every prompt from the current policy, at most
                max_new_tokens each; a completion ends at its first EOS (kept);
  2. rewards    every configured reward scores every completion (stages/align/rewards.py); their
                weighted sum is the completion's reward;
  3. advantage  relative to its group: grpo, reward minus the group's mean, divided by the group's std
                when scale_rewards; rloo, reward minus the mean of the group's other completions. One
                advantage per completion, given to each of its tokens;
  4. update     `epochs` passes over shuffled mini-batches of completions: PPO's clipped surrogate
                (ppo.policy_loss, token-level mean as TRL's default `dapo` loss) plus beta times the
                k3 KL to the reference, Adam, gradient-norm clipping. With one pass the rollout's
                log-probs equal the policy's, so they are not computed twice (the ratio is 1, as in TRL).

The rollout, the log-prob forward passes (seq2seq encoder output reused, causal left padding), the
reference (the adapter-disabled base for LoRA, a frozen copy for a full policy), the seeded random
streams, the training loop and the checkpoints are PPOTrainer's (ppo.py); this class only replaces the
step. So it runs seq2seq and causal policies alike, and a resumed run ends where an uninterrupted one
does.

Why not TRL's GRPOTrainer for causal models: it takes no encoder-decoder, it owns the loop (its own
checkpoints, data loader and generation batching, an HF Trainer's resume), and llmcycle wants one
algorithm with one set of logs, checkpoints and resume semantics for both kinds. benchmarks/grpo_step.py
times a step of this trainer against TRL's GRPOTrainer on the same model and settings.
"""
from __future__ import annotations

import time
from typing import Callable

from pydantic import Field

from llmcycle.core.configbase import Section
from llmcycle.core.errors import UserError
from llmcycle.stages.align.ppo import FixedKLController, PPOTrainer, masked_mean, policy_loss
from llmcycle.stages.align.rewards import check_groups, flat_group_share, group_advantages, kl_k3
from llmcycle.training.checkpoints import config_hash

# reward_fn(prompts, completions, references) -> (the weighted reward of each completion, {name: stats})
RewardFn = Callable[[list[str], list[str], list[str]], tuple[list[float], dict]]


class GroupHyperparameters(Section):
    """Every GRPO / RLOO hyperparameter with its one default; the align stage's `method: grpo | rloo`
    variant takes these fields as they are. Defaults follow TRL 1.16's GRPOConfig where it has the same
    knob (lr 1e-6 is TRL's for billion-parameter models; a small model needs more), except beta: TRL now
    defaults to 0 (no reference), llmcycle keeps DeepSeekMath's 0.04 so the KL is measured and bounded."""

    batch_size: int = Field(8, ge=1, description="prompts per step (each sampled group_size times)")
    group_size: int = Field(4, description="G: completions sampled per prompt (at least 2)")
    mini_batch_size: int = Field(8, ge=1, description="completions per gradient update; divides "
                                 "batch_size * group_size")
    epochs: int = Field(1, ge=1, description="passes over each step's completions (TRL: num_iterations)")
    lr: float = Field(1e-5, gt=0, description="learning rate (Adam, constant)")
    beta: float = Field(0.04, ge=0, description="weight of the k3 KL to the reference; 0 = no reference pass")
    cliprange: float = Field(0.2, gt=0, description="policy ratio clip: [1 - c, 1 + c] (TRL: epsilon)")
    scale_rewards: bool = Field(True, description="grpo: divide advantages by the group's std (Dr. GRPO: off)")
    max_new_tokens: int = Field(64, ge=1, description="longest completion in tokens (TRL: max_completion_length)")
    temperature: float = Field(1.0, gt=0, description="sampling temperature of the rollouts (log-probs use it)")
    top_k: int = Field(0, ge=0, description="sample among the k likeliest tokens; 0 = off")
    top_p: float = Field(1.0, gt=0, le=1, description="nucleus sampling of the rollouts; 1 = off")
    seed: int = Field(42, description="seeds prompt order, sampling, mini-batches (and the fresh adapter)")
    grad_clip: float = Field(1.0, ge=0, description="clip the gradient norm to this; 0 = off")
    checkpoint_every: int = Field(50, ge=1, description="save a resumable checkpoint every N steps (and at the end)")
    log_every: int = Field(1, ge=1, description="log every N steps (and at the end)")


class GroupSettings(GroupHyperparameters):
    """The trainer's settings: the hyperparameters, the baseline and how many steps to run."""

    baseline: str = Field("grpo", description="grpo (group mean, std) or rloo (leave-one-out mean)")
    steps: int = Field(ge=1, description="steps (each: one rollout of batch_size * group_size completions)")


def check_group_settings(s: GroupSettings) -> None:
    """What field constraints cannot express; a one-line error each."""
    if s.baseline not in ("grpo", "rloo"):
        raise UserError(f"align: baseline must be grpo or rloo, not {s.baseline!r}")
    if s.group_size < 2:
        raise UserError(f"align {s.baseline}: group_size must be at least 2 (a group of {s.group_size} has no "
                        "relative advantage: every completion would be its own baseline)")
    completions = s.batch_size * s.group_size
    if completions % s.mini_batch_size:
        raise UserError(f"align {s.baseline}: mini_batch_size {s.mini_batch_size} does not divide the "
                        f"{completions} completions of a step (batch_size {s.batch_size} x group_size "
                        f"{s.group_size})")


class GroupTrainer(PPOTrainer):
    """GRPO / RLOO on one policy; see the module docstring. train(prompts, references=...) runs it."""

    uses_value_head = False

    def __init__(self, policy, tokenizer, kind: str | None, reward_fn: RewardFn, settings: GroupSettings, **kw):
        self.label = settings.baseline
        super().__init__(policy, tokenizer, kind, reward_fn, settings, **kw)
        self.references: list[str] = []

    def check(self, settings) -> None:
        check_group_settings(settings)

    def kl_controller(self, settings):
        return FixedKLController(settings.beta)  # beta stays as set

    def response_length(self, step: int) -> int:
        return self.s.max_new_tokens  # no length sampler: a completion ends at EOS or here

    def train(self, prompts: list[str], *, references: list[str], **kw) -> dict:
        """PPOTrainer.train with each prompt's reference (what exact_answer / program check against)."""
        if len(references) != len(prompts):
            raise UserError(f"{self.label}: {len(prompts)} prompts but {len(references)} references")
        self.references = list(references)
        return super().train(prompts, **kw)

    def step_on(self, prompts: list[str], indices: list[int]) -> dict:
        return self.step([prompts[i] for i in indices], [self.references[i] for i in indices])

    def _run_identity(self, prompts: list[str]) -> tuple[dict, str, dict]:
        config, _, extra = super()._run_identity(prompts)
        return config, config_hash([list(prompts), self.references]), extra

    def rewards(self, prompts: list[str], texts: list[str], references: list[str]):
        """(rewards tensor, per-reward stats) with the reward function's output checked."""
        import math

        import torch

        total, stats = self.reward_fn(list(prompts), list(texts), list(references))
        if len(total) != len(texts) or not all(math.isfinite(float(x)) for x in total):
            raise UserError(f"{self.label}: the rewards gave {len(total)} values for {len(texts)} completions, or a "
                            "value that is not a finite number")
        return torch.tensor([float(x) for x in total], dtype=torch.float32, device=self.device), stats

    def step(self, prompts: list[str], references: list[str]) -> dict:
        """One step on batch_size prompts, each sampled group_size times; returns its statistics."""
        import torch

        s, t0, g = self.s, time.perf_counter(), self.s.group_size
        if len(prompts) != s.batch_size:
            raise UserError(f"{self.label}: a step takes batch_size = {s.batch_size} prompts, got {len(prompts)}")
        step = self.steps_done
        repeated = [p for p in prompts for _ in range(g)]  # a group = one prompt's consecutive completions
        refs = [r for r in references for _ in range(g)]
        roll = self.rollout(repeated, step)
        rewards, stats = self.rewards(repeated, roll.texts, refs)
        check_groups(len(rewards), g)
        advantages = torch.tensor(group_advantages(rewards.tolist(), g, s.baseline, s.scale_rewards),
                                  device=self.device)
        old_logp, ref_logp = self._fixed_logprobs(roll)
        totals = self._update(roll, advantages, old_logp, ref_logp, step)
        self.steps_done += 1
        return {"step": self.steps_done, "reward_mean": float(rewards.mean()), "reward_std": float(rewards.std()),
                **self._reward_columns(stats), "flat_group_share": flat_group_share(rewards.tolist(), g),
                **totals, "completion_length": float(roll.mask.sum(-1).mean()),
                "truncated_share": self._truncated_share(roll), "seconds": time.perf_counter() - t0}

    def _fixed_logprobs(self, roll):
        """(the rollout policy's log-probs, needed when a step makes several passes; the reference's,
        needed when beta > 0); None where not needed."""
        import torch

        with torch.no_grad():
            old = None
            if self.s.epochs > 1:
                old = self.forward_all(self.policy, roll, values=False,
                                       reuse_encoder=roll.encoder_hidden is not None)[0]
            ref = None
            if self.s.beta > 0:
                with self._reference() as model:
                    ref = self.forward_all(model, roll, values=False)[0]
        return old, ref

    def _update(self, roll, advantages, old_logp, ref_logp, step: int) -> dict:
        """`epochs` passes of clipped policy-gradient updates over shuffled mini-batches; mean figures."""
        import torch

        s = self.s
        gen = torch.Generator().manual_seed(self._step_seed(step, 2))
        params = [p for group in self.optimizer.param_groups for p in group["params"]]
        totals = {"loss": 0.0, "clipfrac": 0.0, "kl": 0.0}
        updates, n = 0, len(roll.texts)
        for _ in range(s.epochs):
            for mb in torch.randperm(n, generator=gen).to(self.device).split(s.mini_batch_size):
                logp, _, _ = self.forward(self.policy, roll, mb, values=False)
                mask = roll.mask[mb]
                old = old_logp[mb] if old_logp is not None else logp.detach()
                adv = advantages[mb].unsqueeze(1).expand_as(logp)
                loss, clipfrac, _ = policy_loss(logp, old, adv, mask, s.cliprange)
                kl = masked_mean(kl_k3(logp, ref_logp[mb]), mask) if ref_logp is not None else None
                if kl is not None:
                    loss = loss + s.beta * kl
                self.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if s.grad_clip:
                    torch.nn.utils.clip_grad_norm_(params, s.grad_clip)
                self.optimizer.step()
                for key, value in (("loss", loss), ("clipfrac", clipfrac), ("kl", kl)):
                    totals[key] += float(value.detach()) if value is not None else 0.0
                updates += 1
        self.optimizer.zero_grad(set_to_none=True)
        out = {k: v / updates for k, v in totals.items()}
        if ref_logp is None:
            out["kl"] = None  # not measured: beta 0 runs no reference pass
        return out

    @staticmethod
    def _reward_columns(stats: dict) -> dict:
        """Each reward's mean and std as flat log columns, and program failures by kind."""
        out = {}
        for name, figures in stats.items():
            out[f"reward_{name}_mean"], out[f"reward_{name}_std"] = figures["mean"], figures["std"]
            for kind, count in (figures.get("failures") or {}).items():
                out[f"reward_{name}_{kind}"] = count
        return out

    def _truncated_share(self, roll) -> float:
        """The share of completions cut at max_new_tokens without reaching an end token."""
        import torch

        ended = torch.isin(roll.response, torch.tensor(self.eos_ids, device=roll.response.device)).any(-1)
        full = roll.mask.sum(-1) >= self.s.max_new_tokens
        return float((full & ~ended).float().mean())
