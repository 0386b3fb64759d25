"""PPO for RLHF, written out: rollout, reward, per-token KL penalty, GAE, clipped policy and value updates.

TRL no longer ships a PPO trainer, so llmcycle owns one; it is the course's lab 3 algorithm (Ziegler et
al. 2019, as TRL's old PPOTrainer implemented it) for seq2seq (T5) and causal (GPT-2) policies, LoRA or
full. One step, on `batch_size` prompts:

  1. rollout    sample a response from the current policy for each prompt (temperature / top-k / top-p),
                at most L new tokens, L drawn uniformly from [min_new_tokens, max_new_tokens] per step;
                the response ends at its first EOS (kept), anything after it is masked out;
  2. score      reward_fn(prompts, responses) -> one float per response;
  3. reward     per token -kl_coef * (logp - ref_logp), plus the score on the last response token; the
                reference is the policy with its adapters disabled (LoRA: no second copy of the
                weights) or a frozen copy of the initial policy (full);
  4. advantage  GAE(gamma, lambda) over a value head (one nn.Linear on the last hidden state, the
                decoder's for seq2seq), whitened over the batch;
  5. update     ppo_epochs passes over shuffled mini-batches: clipped policy loss + vf_coef * clipped
                value loss, Adam, gradient-norm clipping;
  6. KL control the coefficient moves toward target_kl (adaptive, Ziegler et al.) or stays fixed.

Every random draw of a step (response length, sampling, mini-batch order) is seeded by (seed, step), and
checkpoints hold the trainable weights, value head, optimizer, KL controller and step, so a resumed run
ends where an uninterrupted one does. The policy runs in eval mode throughout: dropout would make the
probability ratio differ from 1 before any update.

    trainer = PPOTrainer(policy, tokenizer, "seq2seq", reward_fn, PPOSettings(steps=100))
    summary = trainer.train(prompts, checkpoint_dir=Path("out/checkpoints"), resume=True)
"""
from __future__ import annotations

import contextlib
import copy
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from pydantic import Field

from llmcycle.core.configbase import Section
from llmcycle.core.errors import UserError
from llmcycle.core.progress import bar
from llmcycle.data.prompting import encode_prompt
from llmcycle.models.generation import stop_ids
from llmcycle.models.hub import context_window, decoder_prefix, model_kind
from llmcycle.training.checkpoints import (
    check_same_run,
    config_hash,
    latest_checkpoint,
    load_trainer_state,
    read_state,
    restore_training_state,
    resumed_from,
    save_checkpoint,
    unusable,
)

VALUE_HEAD_FILE = "value_head.safetensors"
FULL_POLICY_FILE = "policy.safetensors"
NOT_TRAINING_RELEVANT = {"steps", "checkpoint_every", "log_every"}  # may change on resume


class PPOHyperparameters(Section):
    """Every PPO hyperparameter, with its one default. The align stage's `method: ppo` variant takes
    these fields as they are (llmcycle.stages.align.stage.PPOConfig derives from this class), so every
    one of them is settable from llmcycle.yaml and means the same there as here.

    Defaults: the algorithm's follow TRL's old PPOConfig, which the course's lab 3 used (lr 1.41e-5,
    batch 16 / mini-batch 4, 4 PPO epochs, init_kl_coef 0.2, target 6 over a horizon of 10000, gamma 1,
    lambda 0.95, clips 0.2, vf_coef 0.1, whitened advantages), except four that keep the values
    llmcycle.yaml has always given, so that an existing project's PPO runs reproduce their figures:
    adaptive_kl false (TRL: adap_kl_ctrl true; set `adaptive_kl: true` to replay the lab), response
    lengths in [1, 40] (TRL has no sampler; the lab passed its own) and a checkpoint every 50 steps."""

    batch_size: int = Field(16, ge=1, description="prompts per PPO step")
    mini_batch_size: int = Field(4, ge=1, description="responses per gradient update; divides batch_size")
    ppo_epochs: int = Field(4, ge=1, description="passes over each step's batch")
    lr: float = Field(1.41e-5, gt=0, description="learning rate (Adam, constant)")
    init_kl_coef: float = Field(0.2, ge=0, description="starting weight of the per-token KL penalty")
    adaptive_kl: bool = Field(False, description="move the KL coefficient toward target_kl (Ziegler et "
                              "al.; TRL's old default); off: the coefficient stays init_kl_coef")
    target_kl: float = Field(6.0, gt=0, description="adaptive KL: the KL per response to aim for")
    kl_horizon: int = Field(10000, ge=1, description="adaptive KL: responses over which the error is "
                            "corrected")
    gamma: float = Field(1.0, ge=0, le=1, description="discount")
    lam: float = Field(0.95, ge=0, le=1, description="GAE lambda")
    cliprange: float = Field(0.2, gt=0, description="policy ratio clip: [1 - c, 1 + c]")
    cliprange_value: float = Field(0.2, gt=0, description="value clip around the rollout's values")
    vf_coef: float = Field(0.1, ge=0, description="weight of the value loss")
    whiten_advantages: bool = Field(True, description="normalise advantages over the batch")
    min_new_tokens: int = Field(1, ge=1, description="response length sampler: lower bound of L")
    max_new_tokens: int = Field(40, ge=1, description="response length sampler: upper bound of L")
    temperature: float = Field(1.0, gt=0, description="sampling temperature of the rollouts (log-probs "
                               "use it too)")
    top_k: int = Field(0, ge=0, description="sample among the k likeliest tokens; 0 = off")
    top_p: float = Field(1.0, gt=0, le=1, description="nucleus sampling of the rollouts; 1 = off")
    seed: int = Field(42, description="seeds value head init, prompt order, lengths, sampling, mini-batches "
                      "(and the fresh adapter)")
    grad_clip: float = Field(1.0, ge=0, description="clip the gradient norm to this; 0 = off")
    checkpoint_every: int = Field(50, ge=1, description="save a resumable checkpoint every N steps (and at "
                                  "the end)")
    log_every: int = Field(1, ge=1, description="log every N steps (and at the end)")


class PPOSettings(PPOHyperparameters):
    """The trainer's settings: the hyperparameters plus how many steps to run."""

    steps: int = Field(ge=1, description="PPO steps (each: one rollout of batch_size prompts, then updates)")


def check_settings(s: PPOSettings) -> None:
    """What field constraints cannot express; called by PPOTrainer, callable earlier (config load)."""
    if s.batch_size % s.mini_batch_size:
        raise UserError(f"ppo: batch_size {s.batch_size} is not a multiple of mini_batch_size "
                        f"{s.mini_batch_size}")
    if s.min_new_tokens > s.max_new_tokens:
        raise UserError(f"ppo: min_new_tokens {s.min_new_tokens} is more than max_new_tokens {s.max_new_tokens}")


# ------------------------------------------------------------------------------ the math (pure, tested)
def masked_mean(x, mask):
    return (x * mask).sum() / mask.sum()


def whiten(x, mask, shift_mean: bool = True):
    """(x - mean) / std over the masked entries (unbiased variance, as TRL); shift_mean=False keeps the mean."""
    mean, n = masked_mean(x, mask), mask.sum()
    var = masked_mean((x - mean) ** 2, mask) * (n / (n - 1).clamp(min=1))
    out = (x - mean) * (var + 1e-8).rsqrt()
    return (out if shift_mean else out + mean) * mask


def kl_penalized_rewards(scores, logprobs, ref_logprobs, mask, kl_coef: float):
    """Per-token rewards -kl_coef * (logp - ref_logp), plus each score on its last response token;
    and the per-token KL estimate. All [batch, tokens] except scores [batch]; zero where mask is 0."""
    import torch

    kl = (logprobs - ref_logprobs) * mask
    rewards = -kl_coef * kl
    positions = torch.arange(1, mask.shape[1] + 1, device=mask.device)
    last = (mask * positions).argmax(-1)  # index of the last 1 in each row
    rewards[torch.arange(len(scores), device=mask.device), last] += scores
    return rewards, kl


def gae(rewards, values, mask, gamma: float, lam: float):
    """Generalised advantage estimation; (advantages, returns = advantages + values), masked. Masked
    positions are zeroed first, so a response's last token bootstraps from 0 (the episode ends)."""
    import torch

    rewards, values = rewards * mask, values * mask
    last_gae, reversed_adv = 0.0, []
    for t in reversed(range(rewards.shape[1])):
        next_value = values[:, t + 1] if t + 1 < rewards.shape[1] else 0.0
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        last_gae = delta + gamma * lam * last_gae
        reversed_adv.append(last_gae)
    advantages = torch.stack(reversed_adv[::-1], dim=1) * mask
    return advantages, (advantages + values) * mask


def policy_loss(new_logprobs, old_logprobs, advantages, mask, cliprange: float):
    """PPO's clipped surrogate: (loss, fraction of tokens where clipping was active, approx KL)."""
    ratio = (new_logprobs - old_logprobs).exp()
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1.0 - cliprange, 1.0 + cliprange)
    loss = masked_mean(unclipped.maximum(clipped), mask)
    clipfrac = masked_mean((clipped > unclipped).float(), mask)
    approx_kl = 0.5 * masked_mean((new_logprobs - old_logprobs) ** 2, mask)
    return loss, clipfrac.detach(), approx_kl.detach()


def value_loss(new_values, old_values, returns, mask, cliprange_value: float):
    """Clipped value loss 0.5 * max((v - R)^2, (clip(v, v_old +- c) - R)^2): (loss, clip fraction)."""
    clipped_values = old_values + (new_values - old_values).clamp(-cliprange_value, cliprange_value)
    unclipped_err, clipped_err = (new_values - returns) ** 2, (clipped_values - returns) ** 2
    loss = 0.5 * masked_mean(unclipped_err.maximum(clipped_err), mask)
    return loss, masked_mean((clipped_err > unclipped_err).float(), mask).detach()


class FixedKLController:
    def __init__(self, value: float):
        self.value = value

    def update(self, current_kl: float, n_steps: int) -> None:
        pass

    # the controller is PPO's schedule, so checkpoints keep it in the scheduler's slot
    def state_dict(self) -> dict:
        return {"value": self.value}

    def load_state_dict(self, state: dict) -> None:
        self.value = float(state["value"])


class AdaptiveKLController(FixedKLController):
    """Ziegler et al.: value *= 1 + clip(kl / target - 1, -0.2, 0.2) * n_steps / horizon."""

    def __init__(self, value: float, target: float, horizon: int):
        super().__init__(value)
        self.target, self.horizon = target, horizon

    def update(self, current_kl: float, n_steps: int) -> None:
        error = min(max(current_kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * n_steps / self.horizon


def value_head(hidden_size: int, seed: int):
    """The critic: one Linear on the policy's last hidden state. Drawn from its own seeded generator, not
    the global stream, so a repeated or resumed run builds the same head whatever ran before."""
    import torch

    head = torch.nn.Linear(hidden_size, 1)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # std 1/sqrt(width): early values of order 1, the scale of the scores
        head.weight.normal_(0.0, 1.0 / math.sqrt(hidden_size + 1), generator=gen)
        head.bias.zero_()
    return head


def end_at_eos(response, eos_ids: list[int], pad_id: int):
    """(response with every token after its first EOS set to pad_id, float mask: 1 up to and including
    that EOS). What generate put after an EOS is padding, not part of the response."""
    import torch

    is_eos = torch.isin(response, torch.tensor(eos_ids, device=response.device)).long()
    after_eos = (is_eos.cumsum(-1) - is_eos) > 0
    return response.masked_fill(after_eos, pad_id), (~after_eos).float()


def token_logprobs(logits, tokens, temperature: float = 1.0, entropy: bool = False):
    """log p(token) under logits / temperature, and optionally the entropy of that distribution."""
    logits = logits.float() / temperature if temperature != 1.0 else logits.float()
    lse = logits.logsumexp(-1)
    logp = logits.gather(-1, tokens.unsqueeze(-1)).squeeze(-1) - lse
    if not entropy:
        return logp, None
    return logp, lse - (logits.softmax(-1) * logits).sum(-1)


# ---------------------------------------------------------------------------------------- the trainer
@dataclass
class Rollout:
    """One step's sampled responses. Queries are padded (left for causal models, right for seq2seq);
    responses start at column 0 and are padded after their end; mask is 1 on response tokens (EOS too)."""

    query: object  # LongTensor [B, P]
    query_mask: object  # LongTensor [B, P]
    response: object  # LongTensor [B, R]
    mask: object  # FloatTensor [B, R]
    texts: list[str]
    encoder_hidden: object = None  # seq2seq: the policy's encoder output for the queries, reused once


class _CheckpointWeights:
    """What checkpoints.save_checkpoint saves as 'the model': the trainable policy weights (the adapter,
    or the whole policy as safetensors) and the value head, in one folder."""

    def __init__(self, trainer: "PPOTrainer"):
        self.trainer = trainer

    def save_pretrained(self, path: str) -> None:
        from safetensors.torch import save_file, save_model

        t = self.trainer
        Path(path).mkdir(parents=True, exist_ok=True)
        if t.is_peft:  # the adapter only: the base is frozen (and is the reference)
            t.policy.save_pretrained(path, save_embedding_layers=False)
        else:  # save_model handles tied weights (T5's shared embeddings) and load_model restores them
            save_model(t.policy, str(Path(path) / FULL_POLICY_FILE))
        if t.value_head is not None:
            save_file({k: v.contiguous() for k, v in t.value_head.state_dict().items()},
                      str(Path(path) / VALUE_HEAD_FILE))


class PPOTrainer:
    """PPO on one policy. `reward_fn(prompts, responses)` returns one float per response (higher = better).

    For a full policy the reference is a frozen copy taken here, so construct the trainer with the
    initial policy, also when resuming (load_checkpoint then puts the trained weights in).

    Group-relative methods (grpo.GroupTrainer) derive from this class: they share the rollout, the
    log-prob forward passes, the reference, the training loop and the checkpoints, and replace `step`."""

    label = "ppo"  # names the method in messages and the progress bar
    uses_value_head = True  # the critic; GRPO / RLOO have none

    def check(self, settings) -> None:
        check_settings(settings)

    def kl_controller(self, settings):
        """The KL coefficient's schedule (checkpoints keep it)."""
        if settings.adaptive_kl:
            return AdaptiveKLController(settings.init_kl_coef, settings.target_kl, settings.kl_horizon)
        return FixedKLController(settings.init_kl_coef)

    def __init__(self, policy, tokenizer, kind: str | None, reward_fn: Callable[[list[str], list[str]], list[float]],
                 settings: PPOSettings, *, prompt_encoder: Callable[[str], list[int]] | None = None,
                 window: int | None = None):
        import torch

        self.check(settings)
        if tokenizer is None:
            raise UserError(f"{self.label}: the policy has no tokenizer (save one with the model, or pass it)")
        actual = model_kind(policy.config)
        if kind is not None and kind != actual:
            raise UserError(f"{self.label}: kind '{kind}' given, but the policy is a {actual} model")
        self.eos_ids = stop_ids(policy, tokenizer, actual)  # what generation stops on, as when served
        if not self.eos_ids:
            raise UserError(f"{self.label}: the model has no eos token (config.json, generation_config.json or the "
                            "tokenizer's eos_token); responses could never end")
        self.policy, self.tokenizer, self.kind, self.reward_fn, self.s = policy, tokenizer, actual, reward_fn, settings
        self.encode = prompt_encoder or (lambda text: encode_prompt(tokenizer, text, actual))
        self.window = context_window(policy.config, tokenizer, window)  # window: the project's override
        self.device = next(policy.parameters()).device
        self.pad_id = int(tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eos_ids[0])
        # tokens generate() forces after a seq2seq start token (models.decoder_prefix): not the response's
        self.forced_tokens = len(decoder_prefix(policy)) - 1 if actual == "seq2seq" else 0
        self.is_peft = hasattr(policy, "disable_adapter") and hasattr(policy, "peft_config")
        # Prompt tuning adds virtual tokens inside the PEFT forward, which the bare encoder does not see.
        self.reuse_encoder = actual == "seq2seq" and not (self.is_peft and policy.active_peft_config.is_prompt_learning)
        if self.is_peft:
            self.ref_policy = None  # the same module with its adapters disabled
        else:
            self.ref_policy = copy.deepcopy(policy).eval().requires_grad_(False)
            policy.requires_grad_(True)
        policy.eval()  # no dropout: see the module docstring
        trainable = [p for p in policy.parameters() if p.requires_grad]
        if not trainable:
            raise UserError(f"{self.label}: the policy has no trainable parameters")
        self.value_head = (value_head(policy.config.get_text_config().hidden_size, settings.seed).to(self.device)
                           if self.uses_value_head else None)
        heads = list(self.value_head.parameters()) if self.value_head is not None else []
        # fused: one kernel for all tensors; on CPU the per-tensor loop takes several times longer
        fused = self.device.type in ("cpu", "cuda") and all(p.dtype == torch.float32 for p in trainable)
        self.optimizer = torch.optim.Adam(trainable + heads, lr=settings.lr,
                                          fused=fused or None)
        self.kl_ctl = self.kl_controller(settings)
        self.steps_done = 0
        self._encoded: dict[str, list[int]] = {}

    # -- rollout ------------------------------------------------------------------------------------
    def encode_prompts(self, prompts: list[str]) -> list[list[int]]:
        """Token ids of each prompt (cached); a prompt that cannot fit with max_new_tokens is an error."""
        out = []
        for i, text in enumerate(prompts):
            if text not in self._encoded:
                ids = list(self.encode(text))
                if not ids:
                    raise UserError(f"{self.label}: prompt {i} encodes to no tokens")
                room = self.s.max_new_tokens if self.kind == "causal" else 0
                if len(ids) + room > self.window:
                    raise UserError(f"{self.label}: prompt {i} has {len(ids)} tokens; with {room} new tokens that is "
                                    f"over the context window of {self.window} (prompts are not truncated)")
                self._encoded[text] = ids
            out.append(self._encoded[text])
        return out

    def _step_seed(self, step: int, stream: int) -> int:
        return (self.s.seed * 1_000_003 + step * 7_919 + stream) % 2**63

    def response_length(self, step: int) -> int:
        """L for this step, uniform in [min_new_tokens, max_new_tokens]."""
        return random.Random(self._step_seed(step, 0)).randint(self.s.min_new_tokens, self.s.max_new_tokens)

    @contextlib.contextmanager
    def _reference(self):
        """The reference policy: the adapter-disabled base for LoRA, the frozen initial copy otherwise."""
        if self.is_peft:
            with self.policy.disable_adapter():
                yield self.policy
        else:
            yield self.ref_policy

    def rollout(self, prompts: list[str], step: int) -> Rollout:
        import torch

        rows = self.encode_prompts(prompts)
        width = max(len(r) for r in rows)
        query = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        query_mask = torch.zeros_like(query)
        for j, r in enumerate(rows):  # causal: left padding, so responses follow every prompt directly
            cols = slice(width - len(r), width) if self.kind == "causal" else slice(0, len(r))
            query[j, cols], query_mask[j, cols] = torch.tensor(r), 1
        query, query_mask = query.to(self.device), query_mask.to(self.device)
        inputs, hidden = {"input_ids": query}, None
        if self.reuse_encoder:  # encoded once, without padding waste; generate and forward_all reuse it
            from transformers.modeling_outputs import BaseModelOutput

            hidden = self.encode_queries(query, query_mask)
            inputs = {"encoder_outputs": BaseModelOutput(last_hidden_state=hidden)}
        devices = [self.device] if self.device.type == "cuda" else []
        with torch.no_grad(), torch.random.fork_rng(devices=devices):
            torch.manual_seed(self._step_seed(step, 1))
            out = self.policy.generate(
                **inputs, attention_mask=query_mask, do_sample=True,
                max_new_tokens=self.response_length(step) + self.forced_tokens,
                temperature=self.s.temperature, top_k=self.s.top_k, top_p=self.s.top_p, num_beams=1,
                repetition_penalty=1.0, pad_token_id=self.pad_id, eos_token_id=self.eos_ids, use_cache=True)
        # seq2seq: drop the decoder prefix (the start token, and a forced first token where there is one)
        response = out[:, width:] if self.kind == "causal" else out[:, 1 + self.forced_tokens:]
        response, mask = end_at_eos(response, self.eos_ids, self.pad_id)
        texts = [self.tokenizer.decode(r[m.bool()].tolist(), skip_special_tokens=True) for r, m in zip(response, mask)]
        return Rollout(query, query_mask, response, mask, texts, hidden)

    def encode_queries(self, query, query_mask):
        """The policy encoder's output for right-padded queries, run in chunks of similar length."""
        import torch

        encoder = self.policy.get_encoder()
        hidden = None
        order = torch.argsort(query_mask.sum(-1), descending=True, stable=True)
        with torch.no_grad():
            for rows in order.split(self.s.mini_batch_size):
                n = int(query_mask[rows].sum(-1).max())
                h = encoder(input_ids=query[rows, :n], attention_mask=query_mask[rows, :n]).last_hidden_state
                if hidden is None:
                    hidden = h.new_zeros((*query.shape, h.shape[-1]))
                hidden[rows, :n] = h
        return hidden

    # -- forward passes -----------------------------------------------------------------------------
    def forward(self, model, roll: Rollout, rows, *, values: bool, entropy: bool = False, reuse_encoder=False):
        """(log-probs of the response tokens, values or None, entropy or None), each [len(rows), R].
        reuse_encoder: take the encoder output from the rollout (the policy's, before any update)."""
        import torch

        q, qm, r = roll.query[rows], roll.query_mask[rows], roll.response[rows]
        keep = qm.any(0)  # drop columns that are padding in every row: the same result, less compute
        q, qm = q[:, keep], qm[:, keep]
        if self.kind == "seq2seq":
            prefix = decoder_prefix(self.policy)
            decoder_in = torch.cat([r.new_tensor(prefix).expand(len(r), -1), r[:, :-1]], dim=1)
            inputs = ({"encoder_outputs": (roll.encoder_hidden[rows][:, keep],)} if reuse_encoder
                      else {"input_ids": q})
            out = model(**inputs, attention_mask=qm, decoder_input_ids=decoder_in, output_hidden_states=values,
                        use_cache=False)
            cut = len(prefix) - 1  # the first response token is predicted after the whole prefix
            logits, hidden = out.logits[:, cut:], out.decoder_hidden_states[-1][:, cut:] if values else None
        else:
            ids, attn = torch.cat([q, r], 1), torch.cat([qm, roll.mask[rows].long()], 1)
            # positions from the mask: a left-padded row is computed as the prompt alone (as in generate)
            pos = (attn.cumsum(-1) - 1).clamp(min=0)
            n = r.shape[1]
            out = model(input_ids=ids, attention_mask=attn, position_ids=pos, output_hidden_states=values,
                        use_cache=False, logits_to_keep=n + 1)
            logits = out.logits[:, -n - 1:-1]  # position t predicts token t + 1
            hidden = out.hidden_states[-1][:, -n - 1:-1] if values else None
        logp, ent = token_logprobs(logits, r, self.s.temperature, entropy)
        v = self.value_head(hidden.float()).squeeze(-1) if values else None
        return logp, v, ent

    def forward_all(self, model, roll: Rollout, *, values: bool, entropy: bool = False, reuse_encoder=False):
        """forward() over the whole batch in mini-batch-sized chunks of similar prompt length, so the
        chunks carry little padding; results in the batch's row order."""
        import torch

        outs = [None, None, None]
        for rows in torch.argsort(roll.query_mask.sum(-1), descending=True, stable=True).split(self.s.mini_batch_size):
            for k, x in enumerate(self.forward(model, roll, rows, values=values, entropy=entropy,
                                               reuse_encoder=reuse_encoder)):
                if x is not None:
                    outs[k] = x.new_empty(roll.response.shape) if outs[k] is None else outs[k]
                    outs[k][rows] = x
        return tuple(outs)

    # -- one step -----------------------------------------------------------------------------------
    def score(self, prompts: list[str], texts: list[str]):
        import torch

        scores = [float(x) for x in self.reward_fn(list(prompts), list(texts))]
        if len(scores) != len(texts):
            raise UserError(f"ppo: the reward function returned {len(scores)} scores for {len(texts)} responses")
        if not all(math.isfinite(x) for x in scores):
            raise UserError("ppo: the reward function returned a score that is not a finite number")
        return torch.tensor(scores, dtype=torch.float32, device=self.device)

    def step(self, prompts: list[str]) -> dict:
        """One PPO step on batch_size prompts; returns its statistics."""
        import torch

        s, t0 = self.s, time.perf_counter()
        if len(prompts) != s.batch_size:
            raise UserError(f"ppo: a step takes batch_size = {s.batch_size} prompts, got {len(prompts)}")
        step = self.steps_done
        roll = self.rollout(prompts, step)
        scores = self.score(prompts, roll.texts)
        mask = roll.mask
        with torch.no_grad():
            old_logp, old_values, ent = self.forward_all(self.policy, roll, values=True, entropy=True,
                                                         reuse_encoder=roll.encoder_hidden is not None)
            with self._reference() as ref:
                ref_logp, _, _ = self.forward_all(ref, roll, values=False)
            kl_coef = self.kl_ctl.value
            rewards, kl = kl_penalized_rewards(scores, old_logp, ref_logp, mask, kl_coef)
            advantages, returns = gae(rewards, old_values, mask, s.gamma, s.lam)
            if s.whiten_advantages:
                advantages = whiten(advantages, mask)
        gen = torch.Generator().manual_seed(self._step_seed(step, 2))
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        totals = {"policy_loss": 0.0, "value_loss": 0.0, "clipfrac": 0.0, "value_clipfrac": 0.0, "approx_kl": 0.0}
        updates = 0
        for _ in range(s.ppo_epochs):
            order = torch.randperm(s.batch_size, generator=gen).to(self.device)
            for mb in order.split(s.mini_batch_size):
                logp, v, _ = self.forward(self.policy, roll, mb, values=True)
                m = mask[mb]
                pl, clipfrac, approx_kl = policy_loss(logp, old_logp[mb], advantages[mb], m, s.cliprange)
                vl, v_clipfrac = value_loss(v, old_values[mb], returns[mb], m, s.cliprange_value)
                self.optimizer.zero_grad(set_to_none=True)
                (pl + s.vf_coef * vl).backward()
                if s.grad_clip:
                    torch.nn.utils.clip_grad_norm_(params, s.grad_clip)
                self.optimizer.step()
                for k, x in zip(totals, (pl.detach(), vl.detach(), clipfrac, v_clipfrac, approx_kl)):
                    totals[k] += float(x)
                updates += 1
        self.optimizer.zero_grad(set_to_none=True)
        kl_per_response = kl.sum(-1)
        self.kl_ctl.update(float(kl_per_response.mean()), s.batch_size)
        self.steps_done += 1
        total_reward = rewards.sum(-1)  # score minus the KL penalty, per response
        return {"step": self.steps_done, "reward_mean": float(total_reward.mean()),
                "reward_std": float(total_reward.std()) if len(total_reward) > 1 else 0.0,
                "score_mean": float(scores.mean()), "kl": float(kl_per_response.mean()), "kl_coef": kl_coef,
                "entropy": float(masked_mean(ent, mask)), **{k: v / updates for k, v in totals.items()},
                "response_length": float(mask.sum(-1).mean()), "seconds": time.perf_counter() - t0}

    # -- training over a prompt set -----------------------------------------------------------------
    def batch_for(self, n_prompts: int, step: int) -> list[int]:
        """Prompt indices of a step: a seeded shuffle of all prompts per pass, read batch_size at a time."""
        out, orders = [], {}
        for pos in range(step * self.s.batch_size, (step + 1) * self.s.batch_size):
            epoch, i = divmod(pos, n_prompts)
            if epoch not in orders:
                orders[epoch] = list(range(n_prompts))
                random.Random(self._step_seed(epoch, 3)).shuffle(orders[epoch])
            out.append(orders[epoch][i])
        return out

    def step_on(self, prompts: list[str], indices: list[int]) -> dict:
        """One step on the prompts at `indices` (a subclass may hand the step more than the prompts)."""
        return self.step([prompts[i] for i in indices])

    def _run_identity(self, prompts: list[str]) -> tuple[dict, str, dict]:
        config = {k: v for k, v in self.s.model_dump().items() if k not in NOT_TRAINING_RELEVANT}
        return config, config_hash(prompts), {"kind": self.kind, "policy": "adapter" if self.is_peft else "full"}

    def train(self, prompts: list[str], *, checkpoint_dir: Path | None = None, resume: bool = False,
              log: Callable[[dict], None] | None = None, progress: bool = True,
              on_resume: Callable[[int], object] | None = None) -> dict:
        """Run PPO until settings.steps steps are done; returns {"steps", "seconds", "history",
        "resumed_from"}. A resumed run's history and seconds include the steps before its checkpoint
        (kept in the checkpoint), so its summary equals an uninterrupted run's; on_resume(step) is
        called once a resume is accepted."""

        if not prompts:
            raise UserError(f"{self.label}: no prompts to train on")
        self.encode_prompts(prompts)  # every prompt checked before the first step
        config, data_hash, extra = self._run_identity(prompts)
        root = Path(checkpoint_dir) if checkpoint_dir is not None else None
        found, state = None, {}
        if resume and root is not None and (found := latest_checkpoint(root)) is not None:
            state = read_state(found)
            check_same_run(found, state, config, data_hash, extra)
            self.load_checkpoint(found)
            if on_resume is not None:
                on_resume(self.steps_done)
        t0, history, seconds_before = time.perf_counter(), list(state.get("history", [])), state.get("seconds", 0.0)

        def identity() -> dict:
            return {"config": config, "data_hash": data_hash, **extra, "history": history,
                    "seconds": seconds_before + time.perf_counter() - t0, "time": time.time()}

        with bar(self.s.steps, self.label, enabled=progress, unit="step") as advance:
            advance(self.steps_done)
            while self.steps_done < self.s.steps:
                stats = self.step_on(prompts, self.batch_for(len(prompts), self.steps_done))
                history.append(stats)
                last = self.steps_done == self.s.steps
                if log is not None and (self.steps_done % self.s.log_every == 0 or last):
                    log(stats)
                if root is not None and (self.steps_done % self.s.checkpoint_every == 0 or last):
                    self.save_checkpoint(root, identity())
                advance(self.steps_done)
        return {"steps": self.steps_done, "seconds": seconds_before + time.perf_counter() - t0,
                "history": history, "resumed_from": resumed_from(found, state)}

    # -- checkpoints --------------------------------------------------------------------------------
    def save_checkpoint(self, root: Path, state: dict | None = None) -> Path:
        """root/step-<N>/ written atomically (checkpoints.save_checkpoint): policy weights and value head
        in model/, optimizer, KL controller and random streams in trainer_state.pt, the step in state.json."""
        return save_checkpoint(Path(root), self.steps_done, _CheckpointWeights(self), self.optimizer, self.kl_ctl,
                               {**(state or {}), "step": self.steps_done})

    def load_checkpoint(self, path: Path) -> None:
        """Restore a step-N folder (or the newest one under a checkpoints folder)."""
        from safetensors.torch import load_file, load_model

        path = Path(path)
        if not (path / "state.json").is_file():
            found = latest_checkpoint(path)
            if found is None:
                raise UserError(f"{self.label}: no checkpoint in {path}")
            path = found
        state, trainer_state = read_state(path), load_trainer_state(path)
        weights = path / "model"
        try:
            if self.is_peft:
                from peft.utils import load_peft_weights, set_peft_model_state_dict

                result = set_peft_model_state_dict(self.policy, load_peft_weights(str(weights)))
                if result.unexpected_keys:
                    raise ValueError(f"unexpected adapter weights {result.unexpected_keys[:3]}")
            else:
                load_model(self.policy, str(weights / FULL_POLICY_FILE))
            if self.value_head is not None:
                self.value_head.load_state_dict(load_file(str(weights / VALUE_HEAD_FILE)))
            restore_training_state(trainer_state, self.optimizer, self.kl_ctl)
        except Exception as exc:  # noqa: BLE001 - any load failure means the checkpoint is unusable
            raise unusable(path, exc) from None
        self.steps_done = int(state["step"])
