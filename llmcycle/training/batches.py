"""Fine-tuning data: examples -> token ids with labels, dynamic padding, length-grouped batches.

The prompt a model is trained on is built by `data.prompting.build_prompt` and encoded by
`data.encoding.encode_answer`, the functions evaluation and the server use, so training and inference
cannot disagree about the prompt (a top complaint about other tools). The target ends with the token
the model stops on (the chat template's end of turn, else the model's eos); labels are -100 on
padding and on the prompt, so the loss is on the answer only.
Nothing is truncated: an example longer than the context window is skipped and counted, or refused.
"""
from __future__ import annotations

import random
from dataclasses import dataclass

from llmcycle.core.errors import UserError
from llmcycle.data.encoding import IGNORE, encode_answer

@dataclass
class Encoded:
    features: list[dict]  # input_ids, labels (and the example index)
    skipped: list[str]  # where each skipped (overlong) example came from


def encode_examples(examples, prompts: list, tokenizer, kind: str, window: int, *, end_id: int | None,
                    on_overflow: str = "skip", loss_on: str = "last_turn") -> Encoded:
    """One training feature per example with its first reference as the target."""
    features, skipped = [], []
    for i, (ex, prompt) in enumerate(zip(examples, prompts)):
        if not ex.targets:
            raise UserError(f"{ex.where}: training example has no target")
        ids, labels = encode_answer(tokenizer, prompt, ex.targets[0], kind, end_id, loss_on)
        too_long = len(ids) > window or len(labels) > window
        if too_long:
            if on_overflow == "refuse":
                n_answer = sum(lab != IGNORE for lab in labels)
                raise UserError(f"{ex.where}: training example has {len(ids)} input and {n_answer} target "
                                f"tokens, over the context window of {window}; nothing is truncated (set "
                                "on_overflow: skip to leave such examples out)")
            skipped.append(ex.where)
            continue
        features.append({"input_ids": ids, "labels": labels, "index": i})
    return Encoded(features, skipped)


def collate(features: list[dict], pad_id: int, multiple: tuple[int, int] = (1, 1)):
    """Pad to the longest row of the batch (dynamic padding); labels are -100 on padding.
    `multiple` rounds the (input, label) widths up: on a GPU a few distinct shapes let cuDNN's attention
    and the allocator reuse what they built, instead of rebuilding for every batch length."""
    import torch

    def up(n: int, m: int) -> int:
        return -(-n // m) * m

    width = up(max(len(f["input_ids"]) for f in features), multiple[0])
    label_width = up(max(len(f["labels"]) for f in features), multiple[1])
    ids = torch.full((len(features), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(features), width), dtype=torch.long)
    labels = torch.full((len(features), label_width), IGNORE, dtype=torch.long)
    for row, f in enumerate(features):
        ids[row, :len(f["input_ids"])] = torch.tensor(f["input_ids"])
        mask[row, :len(f["input_ids"])] = 1
        labels[row, :len(f["labels"])] = torch.tensor(f["labels"])
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def useful_tokens(features: list[dict], kind: str) -> int:
    """Tokens that carry data: the inputs, plus the labels for seq2seq (a separate decoder pass)."""
    n = sum(len(f["input_ids"]) for f in features)
    return n + sum(len(f["labels"]) for f in features) if kind == "seq2seq" else n


def padded_tokens(batch: dict, kind: str) -> int:
    """Tokens the model actually processes in a padded batch."""
    n = batch["input_ids"].numel()
    return n + batch["labels"].numel() if kind == "seq2seq" else n


def length_grouped_batches(lengths: list[int], batch_size: int, seed: int, epoch: int,
                           group: bool = True) -> list[list[int]]:
    """Batches of indices for one epoch, a function of (seed, epoch) only, so resume can replay it.

    With grouping, indices are shuffled, cut into mega-batches of 50 batches, sorted by length
    within each, then cut into batches (similar lengths pad little) whose order is shuffled again —
    the length-grouped sampler of transformers' Trainer, written out so it is replayable exactly.
    """
    rng = random.Random(seed * 100_003 + epoch)
    order = list(range(len(lengths)))
    rng.shuffle(order)
    if group:
        mega = batch_size * 50
        order = [i for start in range(0, len(order), mega)
                 for i in sorted(order[start:start + mega], key=lambda j: -lengths[j])]
    batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    if group:
        rng.shuffle(batches)
    return batches
