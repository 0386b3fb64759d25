"""GRPO / RLOO on causal policies through TRL's GRPOTrainer / RLOOTrainer (`backend: trl`).

    summary = train_with_trl(policy, tokenizer, settings, specs, models, prompts, references,
                             checkpoint_dir=Path("out/checkpoints"), resume=False)

The default backend is llmcycle's own (grpo.py): one implementation for seq2seq and causal policies,
with PPO's exact resume and the same per-step logs; benchmarks/grpo_step.py measured it at 0.94x TRL's
time per step on CPU. `backend: trl` is there for what TRL brings on a GPU (vLLM generation, DeepSpeed,
its loss variants). Where TRL fits llmcycle's loop:

- settings: a step of ours (batch_size prompts x group_size completions, `epochs` passes of mini-batch
  updates) is TRL's generation batch of batch_size * group_size completions, steps_per_generation =
  batch_size * group_size / mini_batch_size optimizer steps per pass, num_iterations = epochs; the
  clip range, beta, scale_rewards (grpo), temperature / top-k / top-p, a constant learning rate without
  weight decay (Adam) and gradient clipping map one to one; loss_type dapo (token-level mean) as ours;
- rewards: every reward of the variant is one of TRL's reward functions (named as in the project
  file, weighted by reward_weights), scoring the same text with the same code (rewards.py); program
  failures are counted per step as ours are;
- logs: TRL's figures under llmcycle's names (reward_mean, reward_<name>_mean / _std, kl,
  completion_length, flat_group_share = frac_reward_zero_std, clipfrac, truncated_share) and our step
  numbers, into metrics.jsonl;
- reference: TRL copies the fresh adapter as a "ref" adapter (the adapter-disabled base, as ours),
  deleted afterwards so it is never saved; a full policy's reference is reloaded from its folder;
- checkpoints: TRL's own (checkpoint-N folders under the run's checkpoints/), resumed with
  resume_from_checkpoint; llmcycle writes the settings and the data's hash beside them and refuses a
  resume with other settings, as for every other trainer.

Where it does not: TRL takes no encoder-decoder (seq2seq policies use backend llmcycle); TRL tokenizes
the prompts itself (the chat template with its generation prompt for chat models, as ours; a model
without one reads the text as its tokenizer encodes it, special tokens included); RLOO's KL is TRL's
(in the reward, not the loss); an adapter on lm_head is refused by TRL.
"""
from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path
from typing import Callable

from llmcycle.core.errors import UserError
from llmcycle.core.progress import bar
from llmcycle.data.prompting import Prompt
from llmcycle.stages.align import rewards
from llmcycle.stages.align.grpo import GroupSettings, check_group_settings
from llmcycle.stages.align.ppo import NOT_TRAINING_RELEVANT
from llmcycle.training.checkpoints import check_same_run, config_hash

IDENTITY_FILE = "llmcycle_run.json"  # the settings and data hash a resume must match
# TRL's figures under llmcycle's names
LOGGED = {"loss": "loss", "reward": "reward_mean", "reward_std": "reward_std", "kl": "kl",
          "completions/mean_length": "completion_length", "frac_reward_zero_std": "flat_group_share",
          "clip_ratio/region_mean": "clipfrac", "completions/clipped_ratio": "truncated_share"}
SEQ2SEQ = ("align backend trl: TRL's GRPOTrainer / RLOOTrainer take causal models only; use backend llmcycle "
           "(the default) for a seq2seq policy")


def _prompt_value(prompt, chat: bool):
    """What TRL reads as a prompt: the turns for a chat model (TRL applies its template), else the text."""
    return [dict(m) for m in prompt.messages] if chat and isinstance(prompt, Prompt) else str(prompt)


def _text(value) -> str:
    """A prompt or completion as TRL hands it back: text, or a list of turns (the last one's content)."""
    if isinstance(value, list):
        return str(value[-1].get("content", "")) if value else ""
    return str(value)


def reward_functions(specs: dict, models: dict, failures: dict) -> list[Callable]:
    """One TRL reward function per reward of the variant, named like it; programs that failed are added
    to `failures[name][kind]` until the next log line takes them."""
    out = []
    for name, spec in specs.items():
        def fn(prompts, completions, reference=None, _name=name, _spec=spec, **kw):
            scored = rewards.score(_spec, [_text(p) for p in prompts], [_text(c) for c in completions],
                                   list(reference or [""] * len(completions)), models.get(_name))
            for kind, n in scored.failures.items():
                failures.setdefault(_name, {})[kind] = failures.get(_name, {}).get(kind, 0) + n
            return scored.values
        fn.__name__ = name
        out.append(fn)
    return out


def trl_config(s: GroupSettings, output_dir: str, weights: list[float], device):
    """TRL's GRPOConfig / RLOOConfig for our settings (see the module docstring for the mapping)."""
    import torch
    from trl import GRPOConfig, RLOOConfig

    on_gpu = device.type == "cuda"
    updates = s.batch_size * s.group_size // s.mini_batch_size  # optimizer steps per pass over a rollout
    per_step = updates * s.epochs  # TRL's global steps per llmcycle step
    common = dict(
        output_dir=output_dir, per_device_train_batch_size=s.mini_batch_size, gradient_accumulation_steps=1,
        steps_per_generation=updates, num_generations=s.group_size, num_iterations=s.epochs,
        max_completion_length=s.max_new_tokens, temperature=s.temperature, top_k=s.top_k, top_p=s.top_p,
        beta=s.beta, epsilon=s.cliprange, learning_rate=s.lr, lr_scheduler_type="constant", warmup_steps=0,
        weight_decay=0.0, max_grad_norm=s.grad_clip, max_steps=s.steps * per_step, seed=s.seed,
        logging_steps=per_step * s.log_every, save_strategy="steps", save_steps=per_step * s.checkpoint_every,
        reward_weights=weights, log_completions=False, disable_dropout=True, report_to="none", disable_tqdm=True,
        use_cpu=not on_gpu, bf16=on_gpu and torch.cuda.is_bf16_supported(), activation_checkpointing=False,
        dataloader_num_workers=0, mask_truncated_completions=False)
    if s.baseline == "rloo":
        return RLOOConfig(**common, normalize_advantages=False), per_step
    return GRPOConfig(**common, loss_type="dapo", scale_rewards="group" if s.scale_rewards else "none"), per_step


def trl_callback(per_step: int, history: list, failures: dict, log, advance):
    from transformers import TrainerCallback

    class Forward(TrainerCallback):
        """TRL's log rows under llmcycle's names and step numbers; the progress bar by llmcycle step."""

        def on_log(self, args, state, control, logs=None, **kw):
            logs = logs or {}
            if "loss" not in logs:
                return
            row = {"step": state.global_step // per_step}
            row.update({ours: logs[key] for key, ours in LOGGED.items() if key in logs})
            for key, value in logs.items():  # rewards/<name>/mean -> reward_<name>_mean
                if key.startswith("rewards/") and key.count("/") == 2:
                    _, name, stat = key.split("/")
                    row[f"reward_{name}_{stat}"] = value
            for name, kinds in failures.items():
                row.update({f"reward_{name}_{kind}": n for kind, n in kinds.items()})
            failures.clear()
            history.append(row)
            if log is not None:
                log(row)

        def on_step_end(self, args, state, control, **kw):
            advance(state.global_step // per_step)

    return Forward()


def _identity(s: GroupSettings, prompts, references) -> dict:
    config = {k: v for k, v in s.model_dump().items() if k not in NOT_TRAINING_RELEVANT}
    return {"config": config, "data_hash": config_hash([[str(p) for p in prompts], list(references)]),
            "backend": "trl"}


def _resume_point(root: Path, identity: dict, resume: bool):
    """The newest TRL checkpoint to resume from (None: a fresh start), after checking the settings match."""
    from transformers.trainer_utils import get_last_checkpoint

    saved = root / IDENTITY_FILE
    found = get_last_checkpoint(str(root)) if resume and root.is_dir() else None
    if found is not None and saved.is_file():
        check_same_run(Path(found), json.loads(saved.read_text()), identity["config"], identity["data_hash"],
                       {"backend": "trl"})
    root.mkdir(parents=True, exist_ok=True)
    saved.write_text(json.dumps(identity, indent=1))
    return found


def train_with_trl(policy, tokenizer, settings: GroupSettings, specs: dict, models: dict, prompts: list,
                   references: list[str], *, checkpoint_dir: Path | None = None, resume: bool = False,
                   log: Callable[[dict], None] | None = None, progress: bool = True,
                   on_resume: Callable[[int], object] | None = None) -> dict:
    """GRPO / RLOO (settings.baseline) with TRL on a causal policy, in place; {"steps", "seconds",
    "history", "resumed_from", "backend"} like GroupTrainer.train."""
    from datasets import Dataset

    from llmcycle.models.hub import model_kind

    check_group_settings(settings)
    if model_kind(policy.config) != "causal":
        raise UserError(SEQ2SEQ)
    if not prompts:
        raise UserError(f"{settings.baseline}: no prompts to train on")
    chat = getattr(tokenizer, "chat_template", None) is not None
    data = Dataset.from_list([{"prompt": _prompt_value(p, chat), "reference": r} for p, r in zip(prompts, references)])
    identity = _identity(settings, prompts, references)
    with tempfile.TemporaryDirectory(prefix="llmcycle-trl-") as scratch:
        root = Path(checkpoint_dir) if checkpoint_dir is not None else Path(scratch)
        found = _resume_point(root, identity, resume)
        return _run(policy, tokenizer, settings, specs, models, data, root, found, log, progress, on_resume)


def _run(policy, tokenizer, s, specs, models, data, root: Path, found, log, progress, on_resume) -> dict:
    from transformers import PrinterCallback, ProgressCallback
    from trl import GRPOTrainer, RLOOTrainer

    from llmcycle.stages.align.preference import is_peft, quiet_trl

    failures: dict = {}
    config, per_step = trl_config(s, str(root), [spec.get("weight", 1.0) for spec in specs.values()],
                                  next(policy.parameters()).device)
    policy.config.pad_token_id = tokenizer.pad_token_id  # TRL aligns them with a message otherwise
    history: list = []
    t0 = time.perf_counter()
    with quiet_trl(), bar(s.steps, f"{s.baseline} (trl)", enabled=progress, unit="step") as advance:
        trainer_cls = RLOOTrainer if s.baseline == "rloo" else GRPOTrainer
        try:
            trainer = trainer_cls(model=policy, reward_funcs=reward_functions(specs, models, failures), args=config,
                                  train_dataset=data, processing_class=tokenizer)
        except ValueError as exc:  # e.g. an adapter on lm_head
            raise UserError(f"align backend trl: TRL refused the policy: {exc}") from None
        for cb in (PrinterCallback, ProgressCallback):
            trainer.remove_callback(cb)
        trainer.add_callback(trl_callback(per_step, history, failures, log, advance))
        resumed_step = int(Path(found).name.rsplit("-", 1)[-1]) // per_step if found is not None else None
        if resumed_step is not None and on_resume is not None:
            on_resume(resumed_step)
        try:
            trainer.train(resume_from_checkpoint=found)
        finally:
            if is_peft(policy) and "ref" in policy.peft_config:
                policy.delete_adapter("ref")  # TRL's reference copy must not be saved with the policy
    policy.eval()
    resumed = None if found is None else {"step": resumed_step, "checkpoint": f"{root.name}/{Path(found).name}"}
    return {"steps": s.steps, "seconds": time.perf_counter() - t0, "history": history, "resumed_from": resumed,
            "backend": "trl"}
