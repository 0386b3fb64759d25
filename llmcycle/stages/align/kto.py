"""KTO (Kahneman-Tversky Optimization): alignment from unpaired completions, each labelled desirable or not.

    examples = load_labelled_completions("feedback.jsonl", project_dir, desirable=["good"])
    summary = train_kto(policy, tokenizer, "causal", examples, beta=0.1, max_steps=100)

DPO needs a chosen and a rejected response to one prompt; KTO learns from single completions with a thumbs
up or down (the usual shape of logged user feedback). With the implicit reward r = beta * (log p_policy -
log p_reference) of a completion and z, the policy's KL divergence from the reference estimated in each batch
(from its prompts paired with other completions of the batch), it minimises 1 - sigmoid(r - z) for desirable
completions and 1 - sigmoid(z - r) for undesirable ones, weighted by desirable_weight / undesirable_weight
(the paper advises desirable_weight * n_desirable / (undesirable_weight * n_undesirable) in [1, 4/3]).

TRL 1.16's KTOTrainer trains, and it takes causal models only: its collator concatenates prompt and
completion into one sequence and its fused LM head scores a decoder-only model's hidden states, so a
seq2seq policy is refused (dpo has llmcycle's own seq2seq loop, preference.py).

Records are {prompt, completion, label} (field names configurable): the prompt is text (one user turn) or
{role, content} turns, turned into a prompting.Prompt as preference pairs' are (`pair_prompt`); the
completion is text or one assistant message; the label a bool, true/false/1/0, or any value when
`desirable` lists the values that mean desirable. Records with an empty completion are skipped, counted.

Every example is encoded as llmcycle encodes prompts and answers everywhere (as preference.encode_pairs
does): the prompt with `prompting.encode_prompt` (the chat template with its generation prompt), the
completion with `encoding.encode_target` (ending with the template's end-of-turn token, else the model's
eos), and TRL gets those ids pre-tokenized; its own tokenization is bypassed. Nothing is truncated: an
example longer than max_length is skipped and counted.

The reference is the policy as passed in: for a LoRA policy TRL copies the starting adapter as a "ref"
adapter (for a fresh adapter, what align.load_policy builds, that is the adapter-disabled base), deleted
again afterwards so that it is never saved with the policy; a full policy gets a frozen copy.
"""
from __future__ import annotations

import importlib.util
import random
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from llmcycle.core.errors import UserError, suggest
from llmcycle.core.progress import bar, notice
from llmcycle.data.encoding import encode_target
from llmcycle.data.prompting import Prompt, encode_prompt
from llmcycle.data.records import load_records
from llmcycle.models.generation import target_end_id
from llmcycle.models.hub import context_window
from llmcycle.stages.align.preference import (PairList, trl_callback, disable_dropout, is_peft, prompt_turns, quiet_trl,
                                              response_text, trl_args, pair_prompt, total_steps)

TRUE_LABELS, FALSE_LABELS = ("true", "1"), ("false", "0")
# TRL's logged metrics, under llmcycle's names
LOGGED = {"rewards/chosen": "reward_chosen", "rewards/rejected": "reward_rejected",
          "rewards/margins": "reward_margin", "kl": "kl", "logps/chosen": "logp_chosen",
          "logps/rejected": "logp_rejected"}
SEQ2SEQ = ("align kto: TRL 1.16's KTOTrainer trains causal models only; use dpo (which has our own seq2seq "
           "loop) or a causal policy")


# ------------------------------------------------------------------------------------ the data
@dataclass
class LabelledCompletion:
    prompt: Prompt | str  # a prompting.Prompt from the loader; a plain str is one user turn
    completion: str
    desirable: bool
    where: str = ""


class LabelledList(PairList):
    """A list of LabelledCompletion that also says which records were left out and why (`.skipped`,
    {reason: wheres}), out of how many (`.records`)."""


def _label_text(value) -> str:
    # 1.0 from a JSON file reads as the 1 a user writes in `desirable`
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return str(value).strip()


def _label(value, where: str, field: str, desirable: set[str] | None) -> bool:
    """Whether a record's label means desirable: a bool as it is; else, with `desirable`, whether its text is
    one of those values; without, true/false/1/0."""
    if isinstance(value, bool):
        return value
    text = _label_text(value) if value is not None else ""
    if not text:
        raise UserError(f"{where}: label field '{field}' is empty; every completion needs a label")
    if desirable is not None:
        return text in desirable
    if text.lower() in TRUE_LABELS + FALSE_LABELS:
        return text.lower() in TRUE_LABELS
    raise UserError(f"{where}: label field '{field}' is {value!r}, not true/false/1/0; set desirable to the "
                    f"label values that mark a desirable completion (e.g. desirable: [{text!r}])")


def _desirable_values(desirable) -> set[str] | None:
    if desirable is None:
        return None
    values = [desirable] if isinstance(desirable, (str, int, float)) else list(desirable)
    if not values:
        raise UserError("align kto: desirable is an empty list; name the label values that mark a desirable "
                        "completion, or leave it unset for true/false labels")
    return {_label_text(v) for v in values}


def load_labelled_completions(path: str, base_dir: Path, *, prompt_field: str = "prompt",
                              completion_field: str = "completion", label_field: str = "label", desirable=None,
                              system: str | None = None) -> LabelledList:
    """Labelled completions from a JSONL / CSV / ... file (anything llmcycle.data.records.load_records reads).

    Each record gives the prompt (text, or {role, content} turns ending with a user turn), the completion
    (text or an assistant message) and the label (see _label; `desirable`: the label values, compared as
    text, that mean desirable, every other value undesirable). Every prompt is a prompting.Prompt with
    `system` as its system prompt unless the record has its own. Records with an empty completion are
    skipped and listed in `.skipped["empty"]`."""
    wanted = _desirable_values(desirable)
    records = load_records(path, Path(base_dir), key="KTO data")
    out, empty = LabelledList(records=len(records)), []
    for where, rec in records:
        fields = (prompt_field, completion_field, label_field)
        missing = [f for f in fields if f not in rec]
        if missing:
            found = ", ".join(map(str, rec)) or "none"
            unused = [f for f in rec if f not in fields]  # a field already read as another one is no suggestion
            raise UserError(f"{where}: KTO field '{missing[0]}' missing (fields found: {found})"
                            f"{suggest(missing[0], unused)}; set prompt_field / completion_field / label_field")
        label = _label(rec[label_field], where, label_field, wanted)
        raw = rec[completion_field]
        completion = "" if raw is None else response_text(raw, where, completion_field)
        if not completion.strip():
            empty.append(where)
            continue
        prompt = pair_prompt(prompt_turns(rec[prompt_field], where, prompt_field), system)
        out.append(LabelledCompletion(prompt, completion, label, where))
    out.skipped = {"empty": empty} if empty else {}
    if not out:
        raise UserError(f"{path}: no usable completions among {len(records)} records ({len(empty)} empty)")
    return out


def encode_completions(examples, tokenizer, max_length: int, end_id: int | None) -> tuple[list[dict], list[str]]:
    """(features with prompt_ids / completion_ids / label, wheres of the examples over max_length tokens
    of prompt + completion). A completion is encoded as fine-tuning encodes an answer: a chat model's
    through its template after the prompt's turns, ending with the token the model stops on."""
    features, overlong = [], []
    for ex in examples:
        p = encode_prompt(tokenizer, ex.prompt, "causal")
        c = encode_target(tokenizer, ex.prompt, ex.completion, "causal", end_id)
        if len(p) + len(c) > max_length:
            overlong.append(ex.where)
        else:
            features.append({"prompt_ids": p, "completion_ids": c, "label": bool(ex.desirable)})
    return features, overlong


def with_kl_completions(features: list[dict], batch_size: int) -> list[dict]:
    """Each feature with the completion TRL's KL estimate pairs its prompt with: within every run of
    batch_size consecutive features (the batches TRL's sequential sampler forms) the completions rotate
    by one, (x1, y_n), (x2, y1), ... TRL builds these in the dataset preparation that is bypassed here,
    so they are built here, the same way."""
    out = []
    for i in range(0, len(features), batch_size):
        batch = features[i:i + batch_size]
        rotated = batch[-1:] + batch[:-1]
        out += [{**f, "KL_completion_ids": r["completion_ids"]} for f, r in zip(batch, rotated)]
    return out


# ------------------------------------------------------------------------------------- checks
def _check_settings(policy, tokenizer, kind, examples, *, beta, desirable_weight, undesirable_weight, lr,
                    batch_size, epochs, max_steps) -> None:
    """A UserError for any argument of train_kto that cannot work, before any example is encoded."""
    if kind == "seq2seq":
        raise UserError(SEQ2SEQ)
    if kind != "causal":
        raise UserError(f"align kto: the model kind must be causal, not '{kind}'")
    if tokenizer is None:
        raise UserError("align kto: the policy has no tokenizer (save one with the model)")
    if batch_size < 2:
        raise UserError(f"align kto: batch_size must be at least 2, not {batch_size}: KTO estimates its reference "
                        "point (the KL term) from each batch's prompts paired with the batch's other completions")
    if epochs is None and max_steps is None:
        raise UserError("align kto: set epochs or max_steps")
    values = {"epochs": epochs, "max_steps": max_steps, "lr": lr, "beta": beta,
              "desirable_weight": desirable_weight, "undesirable_weight": undesirable_weight}
    for name, value in values.items():
        if value is not None and value <= 0:
            raise UserError(f"align kto: {name} must be positive, not {value}")
    if not examples:
        raise UserError("align kto: no labelled completions to train on")
    if not any(p.requires_grad for p in policy.parameters()):
        raise UserError("align kto: the policy has no trainable parameters (wrap it with tune.wrap)")
    if _lora_on_lm_head(policy):
        raise UserError("align kto: TRL's KTOTrainer scores tokens with lm_head's weight directly, so a LoRA "
                        "adapter on lm_head would never train; leave lm_head out of target_modules")
    if importlib.util.find_spec("trl") is None:
        raise UserError("align kto uses TRL's KTOTrainer: pip install 'llmcycle[align]'")


def _lora_on_lm_head(policy) -> bool:
    if not is_peft(policy):
        return False
    from peft.tuners.tuners_utils import BaseTunerLayer

    return isinstance(policy.get_output_embeddings(), BaseTunerLayer)


# -------------------------------------------------------------------------------- preparation
def _encode_all(policy, tokenizer, examples, max_length, window, batch_size, seed):
    """(features in training order with their KL completions, {reason: wheres} left out, max_length, window)."""
    end_id = target_end_id(policy, tokenizer, "causal")[0]
    if tokenizer.pad_token_id is None:  # causal tokenizers often lack one; the end token pads, as at inference
        tokenizer.pad_token = tokenizer.convert_ids_to_tokens(end_id)
    window = window or context_window(policy.config, tokenizer)
    max_length = max_length or window
    features, overlong = encode_completions(examples, tokenizer, max_length, end_id)
    if not features:
        raise UserError(f"align kto: all {len(examples)} examples are longer than max_length {max_length} tokens "
                        f"of prompt + completion (nothing is truncated; unset, it is the model's context window, "
                        f"{window}); raise it or shorten the examples")
    # TRL samples in order (its KL completions are fixed per batch): a file sorted by label would give
    # one-class batches, so the order is shuffled once, seeded
    random.Random(seed).shuffle(features)
    skipped = {k: list(v) for k, v in getattr(examples, "skipped", {}).items()}
    if overlong:
        skipped["over_max_length"] = overlong
    return with_kl_completions(features, batch_size), skipped, max_length, window


def _report(skipped: dict, total: int, n_desirable: int, n_undesirable: int, desirable_weight: float,
            undesirable_weight: float, max_length: int) -> None:
    """Notices of what was left out, of a single-class data set and of unbalanced class weights."""
    if skipped:
        parts = ", ".join(f"{len(v)} {k} (first: {v[0]})" for k, v in skipped.items())
        limit = f"; max_length {max_length} tokens, nothing is truncated" if "over_max_length" in skipped else ""
        notice(f"align kto: skipped {sum(map(len, skipped.values()))} of {total} examples: {parts}{limit}")
    if not n_desirable or not n_undesirable:
        notice(f"align kto: {n_desirable} desirable and {n_undesirable} undesirable examples: KTO trains on one "
               "class alone, but check the labels (and `desirable`, which names the desirable label values)")
        return
    ratio = desirable_weight * n_desirable / (undesirable_weight * n_undesirable)
    if not 1 <= ratio <= 4 / 3:  # Eq. (8) of the KTO paper
        low = n_undesirable * undesirable_weight / n_desirable
        notice(f"align kto: {n_desirable} desirable vs {n_undesirable} undesirable examples; the KTO paper "
               f"advises desirable_weight * n_desirable / (undesirable_weight * n_undesirable) in [1, 4/3], here "
               f"{ratio:.2f} (e.g. desirable_weight {low:.2f} to {low * 4 / 3:.2f})")


# ------------------------------------------------------------------------------------- TRL
def _kto_figures(logs: dict) -> dict:
    return {name: logs[key] for key, name in LOGGED.items() if key in logs}


def _trainer_class():
    from trl import KTOTrainer

    class Trainer(KTOTrainer):
        def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
            # TRL would tokenize text itself (appending the tokenizer's eos as text, re-tokenizing prompt +
            # completion together); ours is encoded exactly as at inference, KL completions included
            return dataset

    return Trainer


def _train_trl(policy, tokenizer, features, device, *, beta, desirable_weight, undesirable_weight, lr,
               batch_size, steps, seed, on_log, on_step) -> None:
    import copy

    from datasets import Dataset
    from transformers import PrinterCallback, ProgressCallback
    from trl import KTOConfig

    with quiet_trl(), tempfile.TemporaryDirectory(prefix="llmcycle-trl-") as out:
        args = trl_args(KTOConfig, out, lr=lr, batch_size=batch_size, grad_accum=1, steps=steps, warmup_steps=0,
                         seed=seed, log_every=1, device=device, beta=beta, desirable_weight=desirable_weight,
                         undesirable_weight=undesirable_weight, max_length=None)
        # peft policy: TRL copies its starting adapter as "ref"; full: a frozen copy is the reference
        ref_model = None if is_peft(policy) else copy.deepcopy(policy).eval().requires_grad_(False)
        try:
            trainer = _trainer_class()(model=policy, ref_model=ref_model, args=args, processing_class=tokenizer,
                                       train_dataset=Dataset.from_list(features))
            for cb in (PrinterCallback, ProgressCallback):
                trainer.remove_callback(cb)
            trainer.add_callback(trl_callback(on_log, on_step, _kto_figures))
            trainer.train()
        finally:
            if is_peft(policy) and "ref" in policy.peft_config:
                policy.delete_adapter("ref")  # TRL's reference copy must not be saved with the policy
    policy.eval()


# -------------------------------------------------------------------------------- entry point
def train_kto(policy, tokenizer, kind: str, examples, *, beta: float = 0.1, desirable_weight: float = 1.0,
              undesirable_weight: float = 1.0, lr: float = 5e-5, batch_size: int = 8, epochs: float | None = None,
              max_steps: int | None = None, max_length: int | None = None, window: int | None = None,
              seed: int = 42, log: Callable[[dict], None] | None = None, progress: bool = True) -> dict:
    """Train `policy` in place with KTO on labelled completions (LabelledCompletion) and return a summary.

    policy: a causal PEFT model (a LoRA adapter is trained; build it with tune.wrap) or a plain one (every
    parameter that requires grad is trained). max_length: most tokens of prompt + completion, default
    `window`, the model's context window (read off its config when not given); longer examples are skipped,
    never cut, and counted in the summary's `skipped` by reason with the first of each (`skipped_first`).
    batch_size must be at least 2 (KTO's KL estimate needs other completions in the batch). Every TRL log
    row goes to `log` as {step, loss, lr, reward_chosen, reward_rejected, reward_margin, kl, logp_*}."""
    t0 = time.perf_counter()
    _check_settings(policy, tokenizer, kind, examples, beta=beta, desirable_weight=desirable_weight,
                    undesirable_weight=undesirable_weight, lr=lr, batch_size=batch_size, epochs=epochs,
                    max_steps=max_steps)
    disable_dropout(policy)  # before the reference is copied, so neither has any (as TRL does too)
    features, skipped, max_length, window = _encode_all(policy, tokenizer, examples, max_length, window,
                                                        batch_size, seed)
    n_desirable = sum(f["label"] for f in features)
    total = getattr(examples, "records", 0) or len(examples)
    _report(skipped, total, n_desirable, len(features) - n_desirable, desirable_weight, undesirable_weight,
            max_length)
    steps, per_epoch = total_steps(len(features), batch_size, 1, epochs, max_steps)

    rows: list[dict] = []

    def record(row):
        rows.append(row)
        (log or (lambda r: None))(row)

    with bar(steps, "kto (trl)", enabled=progress, unit="step") as advance:
        _train_trl(policy, tokenizer, features, next(policy.parameters()).device, beta=beta,
                   desirable_weight=desirable_weight, undesirable_weight=undesirable_weight, lr=lr,
                   batch_size=batch_size, steps=steps, seed=seed, on_log=record, on_step=advance)
    last = {k: v for row in rows for k, v in row.items() if k in LOGGED.values()}  # each metric's last value
    return {
        "method": "kto", "backend": "trl", "kind": kind, "beta": beta, "desirable_weight": desirable_weight,
        "undesirable_weight": undesirable_weight, "lr": lr, "batch_size": batch_size,
        "examples": len(features), "desirable": n_desirable, "undesirable": len(features) - n_desirable,
        "skipped": {k: len(v) for k, v in skipped.items()}, "skipped_first": {k: v[0] for k, v in skipped.items()},
        "max_length": max_length, "window": window, "steps": steps, "epochs_done": round(steps / per_epoch, 4),
        "train_loss_first": rows[0]["loss"] if rows else None, "train_loss_last": rows[-1]["loss"] if rows else None,
        **last, "wall_s": round(time.perf_counter() - t0, 3),
    }
