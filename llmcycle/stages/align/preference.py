"""Preference optimization: DPO and ORPO on (prompt, chosen, rejected) pairs.

    pairs = load_pairs("pairs.jsonl", project_dir)            # or an HH-RLHF file of transcripts
    summary = train_preference("dpo", policy, tokenizer, kind, pairs, out_dir, beta=0.1, max_steps=100)

Who does the training (backend "auto"):
  dpo, seq2seq   llmcycle's own loop below (TRL 1.16's DPOTrainer takes causal models only)
  dpo, causal    TRL's DPOTrainer
  orpo, both     TRL's experimental ORPOTrainer (trl.experimental.orpo; it still handles encoder-decoders)
backend "llmcycle" runs our loop for causal models too (no TRL needed); backend "trl" never falls back.
ORPO has no reference model; note that TRL's ORPO scores its NLL term on a causal model over the prompt
tokens too (its choice), on the response only for seq2seq.

Pairs come as {prompt | messages, chosen, rejected} records (text, or OpenAI-style turns) or as HH-RLHF
transcripts, which are split into turns; each pair's prompt is a prompting.Prompt (`pair_prompt`), so a
chat model reads real turns through its chat template and other models read flat text.

Every backend sees the same token ids: `encode_pairs` encodes the prompt with `prompting.encode_prompt`
(the chat template with its generation prompt, exactly as at inference) and each response with
`encoding.encode_target` (ending with the template's end-of-turn token, else the model's eos), and TRL
gets those ids, pre-tokenized (its own tokenization is bypassed). Seq2seq models read the prompt in the
encoder and score the response as decoder targets, causal models score the response tokens after the
prompt. Nothing is truncated: a pair longer than max_length / max_prompt_length is skipped and counted.

The reference policy is the policy as passed in, before any step. For a LoRA policy with a fresh
adapter (what align.load_policy builds) that is exactly the adapter-disabled base, so no second copy
of the weights is needed: our loop computes every pair's reference log-probs once before training,
TRL's DPOTrainer copies the starting adapter as its "ref" adapter (removed again afterwards), and for
full fine-tuning of a causal model TRL gets a frozen copy. Dropout is switched off, as TRL does.

The summary measures all methods alike, with llmcycle's own log-prob code: on `eval_pairs` (or up to
`measure_pairs` training pairs) the implicit reward r = beta * (log p_policy - log p_reference) of
chosen and rejected responses before and after training (reward accuracy, margin, DPO loss), plus the
policy's own log-probs and how often it already ranks the chosen response higher (logp_accuracy).
"""
from __future__ import annotations

import contextlib
import importlib.util
import math
import random
import re
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from llmcycle.core.errors import UserError, suggest
from llmcycle.core.progress import bar
from llmcycle.data.encoding import encode_target
from llmcycle.data.prompting import Prompt, assemble, encode_prompt
from llmcycle.data.records import load_records
from llmcycle.models.adapters import save_model
from llmcycle.models.generation import target_end_id
from llmcycle.models.hub import context_window
from llmcycle.training.batches import collate
from llmcycle.training.checkpoints import lr_factor
from llmcycle.training.loop import answer_logits

METHODS = ("dpo", "orpo")
BACKENDS = ("auto", "llmcycle", "trl")
TURN = re.compile(r"\n\n(Human|Assistant):")  # HH-RLHF's turn markers
ROLES = {"Human": "user", "Assistant": "assistant"}
PROMPT_FIELDS = ("prompt", "messages")  # used when present and no prompt_field is named (TRL's names)
SKIP_REASONS = ("identical", "empty", "prompt_mismatch", "over_max_prompt_length", "over_max_length")


# ------------------------------------------------------------------------------------ the data
@dataclass
class PreferencePair:
    prompt: str  # a prompting.Prompt from load_pairs (flat text carrying its chat turns); a plain str is one user turn
    chosen: str
    rejected: str
    where: str = ""


class PairList(list):
    """A list of PreferencePair that also says which records were left out and why, out of how many."""

    def __init__(self, pairs=(), skipped: dict[str, list[str]] | None = None, records: int = 0):
        super().__init__(pairs)
        self.skipped = skipped or {}
        self.records = records


def transcript_turns(text: str, where: str = "", field: str = "chosen") -> list[dict]:
    """An HH-RLHF transcript "\\n\\nHuman: ...\\n\\nAssistant: ..." as chat turns, their contents stripped
    (the space after each marker belongs to the format, not to the speaker). Consecutive turns of one
    role are merged: a few HH-RLHF transcripts have two Assistant turns in a row, and chat templates
    need the roles to alternate."""
    parts = TURN.split(text)
    if len(parts) < 3:
        raise UserError(f"{where}: no prompt field, and '{field}' is not a transcript with "
                        "\"\\n\\nHuman:\" / \"\\n\\nAssistant:\" turns to split the prompt off; set prompt_field "
                        "(or give a 'prompt' or 'messages' field)")
    if parts[0].strip():
        raise UserError(f"{where}: '{field}' has text before its first Human/Assistant turn "
                        f"({parts[0].strip()[:40]!r}); a transcript starts with \"\\n\\nHuman:\"")
    turns: list[dict] = []
    for name, content in zip(parts[1::2], parts[2::2]):
        if turns and turns[-1]["role"] == ROLES[name]:
            turns[-1]["content"] += "\n\n" + content.strip()
        else:
            turns.append({"role": ROLES[name], "content": content.strip()})
    if turns[0]["role"] != "user" or turns[-1]["role"] != "assistant" or len(turns) < 2:
        raise UserError(f"{where}: the transcript in '{field}' must start with a Human turn and end with the "
                        f"Assistant turn being rated (its turns: {', '.join(t['role'] for t in turns)})")
    return turns


def prompt_turns(value, where: str, field: str) -> list[dict]:
    """A record's prompt as turns: a string is one user turn; a list holds {role, content} turns (an
    optional leading system turn, then user / assistant turns ending with a user turn)."""
    if isinstance(value, str):
        return [{"role": "user", "content": value}]
    if not isinstance(value, list) or not value:
        raise UserError(f"{where}: field '{field}' must be text or a non-empty list of "
                        f"{{\"role\", \"content\"}} turns, got {str(value)[:80]}")
    for i, t in enumerate(value):
        if not isinstance(t, dict) or t.get("role") not in ("system", "user", "assistant") \
                or not isinstance(t.get("content"), str):
            raise UserError(f"{where}: turn {i} of '{field}' must be {{\"role\": system|user|assistant, "
                            f"\"content\": text}}, got {str(t)[:80]}")
        if t["role"] == "system" and i > 0:
            raise UserError(f"{where}: turn {i} of '{field}' is a system turn; one may only open the conversation")
    if value[-1]["role"] != "user":
        raise UserError(f"{where}: '{field}' must end with a user turn (the responses are the chosen / rejected "
                        f"fields), not a {value[-1]['role']} turn")
    return [{"role": t["role"], "content": t["content"]} for t in value]


def response_text(value, where: str, field: str) -> str:
    """A response: text, or one assistant message (alone or in a one-element list, TRL's conversational form)."""
    message = value[0] if isinstance(value, list) and len(value) == 1 else value
    if isinstance(message, dict) and message.get("role") == "assistant" and isinstance(message.get("content"), str):
        return message["content"]
    if isinstance(value, str):
        return value
    raise UserError(f"{where}: field '{field}' must be text or one assistant message ({{\"role\": \"assistant\", "
                    f"\"content\": text}}, alone or in a one-element list), got {str(value)[:80]}")


def pair_prompt(turns: list[dict], system: str | None = None, transcript: bool = False) -> Prompt:
    """The Prompt of a pair's turns, built as every prompt is (prompting.assemble): the last user turn is
    the query, earlier turns the history; the record's own system turn wins over `system`. A converted
    transcript's flat text (models without a chat template) reads as the transcript did."""
    own = turns[0]["content"] if turns[0]["role"] == "system" else None
    body, system = (turns[1:] if own is not None else turns), own or system
    prompt = assemble(body[-1]["content"], system=system, history=body[:-1])
    if not transcript:
        return prompt
    # flat_history would write "User:" lines and leave the last turn and the cue unlabelled: keep HH's roles
    # and end with the "Assistant:" its responses followed
    lines = "".join(f"{'Human' if t['role'] == 'user' else 'Assistant'}: {t['content']}\n" for t in body)
    text = f"{lines}Assistant:"
    return Prompt(f"{system}\n\n{text}" if system else text, prompt.messages)


def exchange_text(pair: PreferencePair, response: str) -> str:
    """A pair's flat prompt followed by one of its responses, as one text (what a reward model scores)."""
    seam = "" if not response or pair.prompt[-1:].isspace() or response[:1].isspace() else " "
    return f"{pair.prompt}{seam}{response}"


def _split_transcripts(chosen: str, rejected: str, where: str, fields: tuple[str, str]):
    """(shared prompt turns, chosen response, rejected response), or None when the prompts differ."""
    c, r = transcript_turns(chosen, where, fields[0]), transcript_turns(rejected, where, fields[1])
    if c[:-1] != r[:-1]:
        return None
    return c[:-1], c[-1]["content"], r[-1]["content"]


def load_pairs(path: str, base_dir: Path, *, prompt_field: str | None = None, chosen_field: str = "chosen",
               rejected_field: str = "rejected", system: str | None = None) -> PairList:
    """Preference pairs from a JSONL / CSV / ... file (anything llmcycle.data.records.load_records reads).

    With prompt_field (or a `prompt` / `messages` field when none is named) each record gives the prompt,
    as text (one user turn) or as {role, content} turns, and chosen / rejected, each text or an assistant
    message. Otherwise chosen and rejected are HH-RLHF transcripts sharing every turn before their final
    Assistant turn: those turns are the prompt, the final contents the responses (transcript_turns).
    Every prompt is a prompting.Prompt with `system` as its system prompt unless the record has its own.
    Pairs whose responses are identical or empty, or whose transcripts do not share the prompt, are
    skipped and listed in `.skipped`."""

    records = load_records(path, Path(base_dir), key="preference data")
    pairs, skipped = PairList(records=len(records)), {"identical": [], "empty": [], "prompt_mismatch": []}
    for where, rec in records:
        missing = [f for f in (chosen_field, rejected_field, prompt_field) if f is not None and f not in rec]
        if missing:
            found = ", ".join(map(str, rec)) or "none"
            raise UserError(f"{where}: preference field '{missing[0]}' missing (fields found: {found})"
                            f"{suggest(missing[0], rec)}; set chosen_field / rejected_field / prompt_field")
        chosen = response_text(rec[chosen_field], where, chosen_field)
        rejected = response_text(rec[rejected_field], where, rejected_field)
        field = prompt_field or next((f for f in PROMPT_FIELDS if f in rec), None)
        if field is not None:
            prompt = pair_prompt(prompt_turns(rec[field], where, field), system)
        else:
            split = _split_transcripts(chosen, rejected, where, (chosen_field, rejected_field))
            if split is None:
                skipped["prompt_mismatch"].append(where)
                continue
            turns, chosen, rejected = split
            prompt = pair_prompt(turns, system, transcript=True)
        if not chosen.strip() or not rejected.strip():
            skipped["empty"].append(where)
        elif chosen == rejected:
            skipped["identical"].append(where)
        else:
            pairs.append(PreferencePair(prompt, chosen, rejected, where))
    pairs.skipped = {k: v for k, v in skipped.items() if v}
    if not pairs:
        reasons = ", ".join(f"{len(v)} {k}" for k, v in pairs.skipped.items())
        raise UserError(f"{path}: no usable preference pairs among {len(records)} records ({reasons})")
    return pairs


def encode_pairs(pairs, tokenizer, kind: str, max_length: int, max_prompt_length: int, end_id: int | None):
    """(features with prompt_ids / chosen_ids / rejected_ids, {reason: wheres} of the pairs left out as
    over_max_prompt_length or over_max_length). Each response is encoded as fine-tuning encodes an
    answer: a chat model's through its template after the prompt's turns, ending with the token the
    model stops on."""

    features, overlong = [], {"over_max_prompt_length": [], "over_max_length": []}
    for pair in pairs:
        p = encode_prompt(tokenizer, pair.prompt, kind)
        c = encode_target(tokenizer, pair.prompt, pair.chosen, kind, end_id)
        r = encode_target(tokenizer, pair.prompt, pair.rejected, kind, end_id)
        longest = len(p) + max(len(c), len(r)) if kind == "causal" else max(len(c), len(r))
        if len(p) > max_prompt_length:
            overlong["over_max_prompt_length"].append(pair.where)
        elif longest > max_length:
            overlong["over_max_length"].append(pair.where)
        else:
            features.append({"prompt_ids": p, "chosen_ids": c, "rejected_ids": r})
    return features, {k: v for k, v in overlong.items() if v}


def _rows(features: list[dict], kind: str) -> list[dict]:
    """tune_data rows (input_ids, labels): every chosen response, then every rejected one."""
    out = []
    for key in ("chosen_ids", "rejected_ids"):
        for f in features:
            p, y = f["prompt_ids"], f[key]
            out.append({"input_ids": p + y, "labels": [-100] * len(p) + y} if kind == "causal"
                       else {"input_ids": p, "labels": y})
    return out


# ---------------------------------------------------------------------------------- the maths
def sequence_logps(model, batch: dict, kind: str):
    """Per row, the summed log-probability of the label tokens (-100: prompt and padding, not scored)."""
    import torch.nn.functional as F

    logits, targets = answer_logits(model, batch, kind)
    token_nll = F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), targets.reshape(-1),
                                ignore_index=-100, reduction="none")
    return -token_nll.view(targets.shape).sum(-1)


def dpo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta: float,
             label_smoothing: float = 0.0):
    """Per pair: -log sigmoid(beta * ((pc - rc) - (pr - rr))), the DPO loss (Rafailov et al. 2023).
    With label_smoothing e (conservative DPO: the label is wrong with probability e):
    (1 - e) * -log sigmoid(z) + e * -log sigmoid(-z)."""
    import torch.nn.functional as F

    z = beta * ((policy_chosen - ref_chosen) - (policy_rejected - ref_rejected))
    return -(1 - label_smoothing) * F.logsigmoid(z) - label_smoothing * F.logsigmoid(-z)


def pair_logps(model, features: list[dict], kind: str, pad_id: int, device):
    """(chosen, rejected) summed log-probs of a batch of pairs: one forward over 2 x len(features) rows."""

    batch = {k: v.to(device) for k, v in collate(_rows(features, kind), pad_id).items()}
    logps = sequence_logps(model, batch, kind)
    return logps[:len(features)], logps[len(features):]


def all_logps(model, features: list[dict], kind: str, pad_id: int, batch_size: int, device):
    """(chosen, rejected) float32 CPU tensors for every feature, in eval mode without gradients."""
    import torch

    model.eval()
    chosen, rejected = [], []
    with torch.no_grad(), _autocast(device):
        for i in range(0, len(features), batch_size):
            c, r = pair_logps(model, features[i:i + batch_size], kind, pad_id, device)
            chosen.append(c.float().cpu())
            rejected.append(r.float().cpu())
    return torch.cat(chosen), torch.cat(rejected)


def preference_metrics(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta: float) -> dict:
    """Implicit rewards r = beta * (policy - reference) log-probs, averaged over the pairs."""
    rc, rr = beta * (policy_chosen - ref_chosen), beta * (policy_rejected - ref_rejected)
    return {"reward_accuracy": float((rc > rr).float().mean()), "reward_margin": float((rc - rr).mean()),
            "chosen_reward": float(rc.mean()), "rejected_reward": float(rr.mean()),
            "dpo_loss": float(dpo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta).mean()),
            "chosen_logp": float(policy_chosen.mean()), "rejected_logp": float(policy_rejected.mean()),
            "logp_accuracy": float((policy_chosen > policy_rejected).float().mean())}


# ------------------------------------------------------------------------------------ helpers
def _autocast(device):
    import torch

    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def is_peft(model) -> bool:
    return hasattr(model, "peft_config") and hasattr(model, "disable_adapter")


def disable_dropout(model) -> None:
    import torch

    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0


def total_steps(n_pairs: int, batch_size: int, grad_accum: int, epochs: float | None, max_steps: int | None):
    """(optimizer steps, steps per epoch): epochs and max_steps together, the lower bound wins."""
    per_epoch = math.ceil(math.ceil(n_pairs / batch_size) / grad_accum)
    steps = math.ceil(epochs * per_epoch) if epochs else max_steps
    return max(1, min(steps, max_steps or steps)), per_epoch


def _choose_backend(method: str, kind: str, backend: str) -> str:
    if method == "orpo" and backend == "llmcycle":
        raise UserError("preference: orpo is trained by TRL's ORPOTrainer only; use backend auto or trl")
    if method == "dpo" and backend == "trl" and kind == "seq2seq":
        raise UserError("preference: TRL 1.16's DPOTrainer supports causal models only; a seq2seq policy "
                        "is trained by llmcycle's own DPO (backend auto or llmcycle)")
    chosen = "trl" if method == "orpo" or (backend == "auto" and kind == "causal") else backend
    chosen = "llmcycle" if chosen == "auto" else chosen
    if chosen == "trl" and importlib.util.find_spec("trl") is None:
        raise UserError("DPO on causal models and ORPO use TRL: pip install 'llmcycle[align]' "
                        "(or backend llmcycle for our own DPO loop)")
    return chosen


@contextlib.contextmanager
def quiet_trl():
    """TRL 1.16 on transformers 5 warns about renamed arguments on every step, and datasets draws
    progress bars for its maps: keep stderr to our own bar."""
    import datasets.utils.logging as ds_logging

    bars = ds_logging.is_progress_bar_enabled()
    ds_logging.disable_progress_bar()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        warnings.filterwarnings("ignore", message=".*trl.experimental.*")
        try:
            yield
        finally:
            if bars:
                ds_logging.enable_progress_bar()


# ------------------------------------------------------------------------------- our DPO loop
def _train_own(policy, features, ref, kind, pad_id, device, *, beta, label_smoothing, lr, batch_size,
               grad_accum, steps, warmup_steps, seed, log_every, on_log, on_step) -> list[float]:
    """Sigmoid DPO against precomputed reference log-probs; returns the logged (windowed) losses."""
    import torch

    params = [p for p in policy.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, warmup_steps, steps, "linear"))
    ref_chosen, ref_rejected = ref
    torch.manual_seed(seed)
    policy.train()
    losses, window, step, epoch, batches = [], [], 0, 0, []
    while step < steps:
        if not batches:  # a new epoch: a seeded shuffle, cut into optimizer steps of micro-batches
            order = list(range(len(features)))
            random.Random(seed * 100_003 + epoch).shuffle(order)
            micro = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
            batches = [micro[i:i + grad_accum] for i in range(0, len(micro), grad_accum)]
            epoch += 1
        group = batches.pop(0)
        n_pairs = sum(len(rows) for rows in group)
        optimizer.zero_grad(set_to_none=True)
        step_loss = 0.0
        for rows in group:
            with _autocast(device):
                pc, pr = pair_logps(policy, [features[i] for i in rows], kind, pad_id, device)
            idx = torch.tensor(rows)
            loss = dpo_loss(pc.float(), pr.float(), ref_chosen[idx].to(device), ref_rejected[idx].to(device),
                            beta, label_smoothing).sum() / n_pairs  # the step's mean over all its pairs
            loss.backward()
            step_loss += float(loss.detach())
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        scheduler.step()
        step += 1
        window.append(step_loss)
        if step % log_every == 0 or step == steps:
            losses.append(sum(window) / len(window))
            on_log({"step": step, "loss": losses[-1], "lr": scheduler.get_last_lr()[0]})
            window = []
        on_step(step)
    policy.eval()
    return losses


# ------------------------------------------------------------------------------------- TRL
def trl_args(config_cls, out: str, *, lr, batch_size, grad_accum, steps, warmup_steps, seed, log_every,
              device, **extra):
    import torch

    on_gpu = device.type == "cuda"
    return config_cls(
        output_dir=out, learning_rate=lr, per_device_train_batch_size=batch_size,
        gradient_accumulation_steps=grad_accum, max_steps=steps, warmup_steps=warmup_steps,
        lr_scheduler_type="linear", weight_decay=0.0, max_grad_norm=1.0, seed=seed, logging_steps=log_every,
        # TRL 1.16 defaults to checkpointing under its transformers-4 name (a FutureWarning on 5.x) and to bf16
        activation_checkpointing=False, bf16=on_gpu and torch.cuda.is_bf16_supported(), use_cpu=not on_gpu,
        report_to="none", save_strategy="no", disable_tqdm=True, dataloader_num_workers=0, **extra)


def _preference_figures(logs: dict) -> dict:
    """DPO's and ORPO's logged figures under llmcycle's names (rewards/chosen -> reward_chosen)."""
    return {k.replace("rewards/", "reward_").replace("/", "_"): v for k, v in logs.items()
            if k.startswith("rewards/") or k in ("nll_loss", "log_odds_ratio")}


def trl_callback(on_log, on_step, figures: Callable[[dict], dict] = _preference_figures):
    """A TrainerCallback passing TRL's log rows (step, loss, lr and `figures(logs)`) and steps on."""
    from transformers import TrainerCallback

    class Forward(TrainerCallback):
        """TRL's logs and steps into llmcycle's log and progress bar (instead of its printer)."""

        def on_log(self, args, state, control, logs=None, **kw):
            logs = logs or {}
            if "loss" in logs:
                row = {"step": state.global_step, "loss": logs["loss"], "lr": logs.get("learning_rate")}
                row.update(figures(logs))
                on_log(row)

        def on_step_end(self, args, state, control, **kw):
            on_step(state.global_step)

    return Forward()


def _train_trl(method, policy, tokenizer, kind, features, device, *, beta, lr, batch_size, grad_accum, steps,
               warmup_steps, seed, log_every, on_log, on_step) -> list[float]:
    import copy

    from datasets import Dataset
    from transformers import PrinterCallback, ProgressCallback

    losses: list[float] = []

    def record(row):
        losses.append(row["loss"])
        on_log(row)

    common = dict(lr=lr, batch_size=batch_size, grad_accum=grad_accum, steps=steps, warmup_steps=warmup_steps,
                  seed=seed, log_every=log_every, device=device)
    # the model must agree with the tokenizer on padding, else transformers re-aligns it with a message
    policy.config.pad_token_id = tokenizer.pad_token_id
    if getattr(policy, "generation_config", None) is not None:
        policy.generation_config.pad_token_id = tokenizer.pad_token_id
    with quiet_trl(), tempfile.TemporaryDirectory(prefix="llmcycle-trl-") as out:
        if method == "dpo":
            from trl import DPOConfig, DPOTrainer

            class Trainer(DPOTrainer):
                def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
                    # TRL would tokenize text itself; ours is already encoded exactly as at inference
                    return dataset

            args = trl_args(DPOConfig, out, beta=beta, max_length=None, **common)
            # peft policy: TRL copies its starting adapter as "ref"; full: a frozen copy is the reference
            ref_model = None if is_peft(policy) else copy.deepcopy(policy).eval().requires_grad_(False)
            trainer = Trainer(model=policy, ref_model=ref_model, args=args, processing_class=tokenizer,
                              train_dataset=Dataset.from_list(features))
        else:
            from trl.experimental.orpo import ORPOConfig, ORPOTrainer

            class Trainer(ORPOTrainer):
                def tokenize_row(self, feature, model=None):
                    # our encoding instead of TRL's (which would add a BOS to GPT-2 prompts, for one)
                    p, c, r = feature["prompt_ids"], feature["chosen_ids"], feature["rejected_ids"]
                    row = {"prompt_input_ids": p, "prompt_attention_mask": [1] * len(p)}
                    for name, ids in (("chosen", c), ("rejected", r)):
                        if kind == "seq2seq":
                            row[f"{name}_labels"] = ids
                        else:
                            row[f"{name}_input_ids"] = p + ids
                            row[f"{name}_attention_mask"] = [1] * (len(p) + len(ids))
                            row[f"{name}_labels"] = [-100] * len(p) + ids
                    return row

            longest = max(len(f["prompt_ids"]) + max(len(f["chosen_ids"]), len(f["rejected_ids"])) for f in features)
            args = trl_args(ORPOConfig, out, beta=beta, max_length=longest, max_completion_length=longest,
                             remove_unused_columns=False, **common)
            trainer = Trainer(model=policy, args=args, processing_class=tokenizer,
                              train_dataset=Dataset.from_list(features))
        for cb in (PrinterCallback, ProgressCallback):
            trainer.remove_callback(cb)
        trainer.add_callback(trl_callback(record, on_step))
        try:
            trainer.train()
        finally:
            if is_peft(policy) and "ref" in policy.peft_config:
                policy.delete_adapter("ref")  # TRL's reference copy must not be saved with the policy
    policy.eval()
    return losses


# -------------------------------------------------------------------------------- entry point
def train_preference(method: str, policy, tokenizer, kind: str, pairs, out_dir: Path | str | None, *,
                     beta: float = 0.1, label_smoothing: float = 0.0, lr: float = 5e-5, batch_size: int = 8,
                     grad_accum: int = 1, epochs: float | None = None, max_steps: int | None = None,
                     warmup_steps: int = 0, max_length: int | None = None, max_prompt_length: int | None = None,
                     seed: int = 42, backend: str = "auto", eval_pairs=None, measure_pairs: int = 256,
                     log_every: int = 1, log: Callable[[dict], None] | None = None, progress: bool = True,
                     meta: dict | None = None, window: int | None = None) -> dict:
    """Train `policy` in place on preference pairs and return a summary; saves it to out_dir if given.

    policy: a PEFT model (a LoRA adapter is trained; build it with tune.wrap) or a plain model (every
    parameter that requires grad is trained). max_length: most tokens of prompt + response (causal) or of
    a response (seq2seq); max_prompt_length: most prompt tokens; both default to `window`, the model's
    context window (read off its config when not given). Pairs over either are skipped, never cut: the
    summary counts them by reason (`skipped`, `eval_skipped`) with the first of each (`*_first`).
    """
    t0 = time.perf_counter()
    _check_settings(method, backend, kind, tokenizer, pairs, beta=beta, label_smoothing=label_smoothing, lr=lr,
                    batch_size=batch_size, grad_accum=grad_accum, epochs=epochs, max_steps=max_steps,
                    log_every=log_every)
    chosen_backend = _backend_for(method, kind, backend, policy, label_smoothing)
    enc = _encode_all(pairs, eval_pairs, policy, tokenizer, kind, max_length, max_prompt_length, measure_pairs,
                      window)
    features, measured = enc.features, enc.measured
    steps, per_epoch = total_steps(len(features), batch_size, grad_accum, epochs, max_steps)
    device = next(policy.parameters()).device
    pad_id = tokenizer.pad_token_id
    ref_all, ref_measured = _reference_logps(policy, features, measured, chosen_backend == "llmcycle",
                                             bool(eval_pairs), kind, pad_id, batch_size, device)
    before = preference_metrics(*ref_measured, *ref_measured, beta)

    on_log = log or (lambda row: None)
    with bar(steps, f"{method} ({chosen_backend})", enabled=progress, unit="step") as advance:
        settings = dict(lr=lr, batch_size=batch_size, grad_accum=grad_accum, steps=steps, warmup_steps=warmup_steps,
                        seed=seed, log_every=log_every, on_log=on_log, on_step=advance)
        if chosen_backend == "llmcycle":
            losses = _train_own(policy, features, ref_all, kind, pad_id, device, beta=beta,
                                label_smoothing=label_smoothing, **settings)
        else:
            losses = _train_trl(method, policy, tokenizer, kind, features, device, beta=beta, **settings)
    after = preference_metrics(*all_logps(policy, measured, kind, pad_id, batch_size, device), *ref_measured, beta)

    summary = {
        "method": method, "backend": chosen_backend, "kind": kind, "beta": beta, "lr": lr,
        "batch_size": batch_size, "grad_accum": grad_accum, "pairs": len(features), **enc.summary(),
        "steps": steps, "epochs_done": round(steps / per_epoch, 4),
        "train_loss_first": losses[0] if losses else None, "train_loss_last": losses[-1] if losses else None,
        "measured_on": "eval" if eval_pairs else "train", "measured_pairs": len(measured),
        **_measurements(before, after),
    }
    if out_dir is not None:
        summary["model_dir"] = str(save_model(policy, tokenizer, Path(out_dir), meta))
    summary["wall_s"] = round(time.perf_counter() - t0, 3)
    return summary


def _check_settings(method, backend, kind, tokenizer, pairs, *, beta, label_smoothing, lr, batch_size, grad_accum,
                    epochs, max_steps, log_every) -> None:
    """A UserError for any argument of train_preference that cannot work, before any pair is encoded."""
    if method not in METHODS:
        raise UserError(f"preference: unknown method '{method}'{suggest(method, METHODS)} (choices: dpo, orpo)")
    if backend not in BACKENDS:
        raise UserError(f"preference: unknown backend '{backend}'{suggest(backend, BACKENDS)} "
                        f"(choices: {', '.join(BACKENDS)})")
    if kind not in ("seq2seq", "causal"):
        raise UserError(f"preference: model kind must be seq2seq or causal, not '{kind}'")
    if tokenizer is None:
        raise UserError("preference: the policy has no tokenizer (save one with the model)")
    for name, value in (("batch_size", batch_size), ("grad_accum", grad_accum), ("log_every", log_every)):
        if value < 1:
            raise UserError(f"preference: {name} must be at least 1, not {value}")
    if epochs is None and max_steps is None:
        raise UserError("preference: set epochs or max_steps")
    if (epochs is not None and epochs <= 0) or (max_steps is not None and max_steps < 1) or lr <= 0 or beta <= 0:
        raise UserError("preference: epochs, max_steps, lr and beta must be positive")
    if not 0 <= label_smoothing < 0.5:
        raise UserError(f"preference: label_smoothing must be in [0, 0.5), not {label_smoothing}")
    if not pairs:
        raise UserError("preference: no preference pairs to train on")


def _backend_for(method: str, kind: str, backend: str, policy, label_smoothing: float) -> str:
    """The backend that trains (see _choose_backend), refused when it cannot honour the settings."""
    chosen_backend = _choose_backend(method, kind, backend)
    if label_smoothing and chosen_backend == "trl":
        raise UserError("preference: label_smoothing is part of llmcycle's own DPO (backend llmcycle); TRL 1.16's "
                        "sigmoid DPO loss has none and ORPO has no such term")
    if not any(p.requires_grad for p in policy.parameters()):
        raise UserError("preference: the policy has no trainable parameters (wrap it with tune.wrap)")
    return chosen_backend


@dataclass
class _Encoded:
    """The encoded pairs: what trains, what measures, what was left out (by reason, wheres) and the limits."""

    features: list[dict]
    measured: list[dict]
    skipped: dict[str, list[str]]
    eval_skipped: dict[str, list[str]]
    max_length: int
    max_prompt_length: int
    window: int

    def summary(self) -> dict:
        overlong = [w for k in ("over_max_prompt_length", "over_max_length") for w in self.skipped.get(k, [])]
        return {"max_length": self.max_length, "max_prompt_length": self.max_prompt_length, "window": self.window,
                "skipped": {k: len(v) for k, v in self.skipped.items()},
                "skipped_first": {k: v[0] for k, v in self.skipped.items()},
                "skipped_overlong": len(overlong), "skipped_overlong_examples": overlong[:10],
                "eval_skipped": {k: len(v) for k, v in self.eval_skipped.items()},
                "eval_skipped_first": {k: v[0] for k, v in self.eval_skipped.items()}}


def _encode_all(pairs, eval_pairs, policy, tokenizer, kind: str, max_length: int | None,
                max_prompt_length: int | None, measure_pairs: int, window: int | None) -> _Encoded:
    """The training features and the measured ones (the eval pairs if given, else the first
    `measure_pairs` training pairs); refused when every training or eval pair is over the limits."""

    end_id = target_end_id(policy, tokenizer, kind)[0]
    if tokenizer.pad_token_id is None:  # causal tokenizers often lack one; the end token pads, as at inference
        tokenizer.pad_token = tokenizer.convert_ids_to_tokens(end_id)
    window = window or context_window(policy.config, tokenizer)
    max_length, max_prompt_length = max_length or window, max_prompt_length or window
    limits = (f"max_length {max_length} / max_prompt_length {max_prompt_length} tokens (nothing is truncated; "
              f"unset, both are the model's context window, {window})")
    features, overlong = encode_pairs(pairs, tokenizer, kind, max_length, max_prompt_length, end_id)
    if not features:
        raise UserError(f"preference: all {len(pairs)} pairs are longer than {limits}; raise them or shorten the "
                        "pairs")
    measured, eval_overlong = features[:measure_pairs], {}
    if eval_pairs:
        measured, eval_overlong = encode_pairs(eval_pairs, tokenizer, kind, max_length, max_prompt_length, end_id)
        if not measured:
            raise UserError(f"preference: all {len(eval_pairs)} eval pairs are longer than {limits}; raise them")
    skipped = {**{k: list(v) for k, v in getattr(pairs, "skipped", {}).items()}, **overlong}
    return _Encoded(features, measured, skipped, eval_overlong, max_length, max_prompt_length, window)


def _reference_logps(policy, features, measured, own_loop: bool, on_eval_pairs: bool, kind: str, pad_id: int,
                     batch_size: int, device):
    """(reference log-probs of every training pair, None unless `own_loop`; those of the measured pairs)."""
    # Reference log-probs from the policy as it starts (for a fresh adapter: the adapter-disabled base).
    # Our loop needs them for every training pair; the summary for the measured ones.
    disable_dropout(policy)
    ref_all = None
    if own_loop:
        ref_all = all_logps(policy, features, kind, pad_id, batch_size, device)
    if ref_all is not None and not on_eval_pairs:
        ref_measured = tuple(t[:len(measured)] for t in ref_all)
    else:
        ref_measured = all_logps(policy, measured, kind, pad_id, batch_size, device)
    return ref_all, ref_measured


def _measurements(before: dict, after: dict) -> dict:
    """The summary's before/after figures, with the headline ones (after training) at its top level."""
    return {"before": before, "after": after,
            **{k: after[k] for k in ("reward_accuracy", "reward_margin", "chosen_reward", "rejected_reward")},
            "loss_before": before["dpo_loss"], "loss_after": after["dpo_loss"]}
