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

    width = round_up(max(len(f["input_ids"]) for f in features), multiple[0])
    label_width = round_up(max(len(f["labels"]) for f in features), multiple[1])
    ids = torch.full((len(features), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(features), width), dtype=torch.long)
    labels = torch.full((len(features), label_width), IGNORE, dtype=torch.long)
    for row, f in enumerate(features):
        ids[row, :len(f["input_ids"])] = torch.tensor(f["input_ids"])
        mask[row, :len(f["input_ids"])] = 1
        labels[row, :len(f["labels"])] = torch.tensor(f["labels"])
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def pack(features: list[dict], pad_id: int, multiple: int = 1) -> dict:
    """Causal features concatenated into one row with no padding between them (padding-free packing):
    input_ids, labels and position_ids of shape (1, total), position ids restarting at 0 per example.

    There is no attention_mask: given position_ids, no mask and no cache, transformers (5.x,
    masking_utils.create_causal_mask -> find_packed_sequence_indices) starts a new sequence wherever a
    position does not follow the previous one plus 1, and builds a block-diagonal causal mask for sdpa,
    eager and flex attention; flash attention takes the boundaries from position_ids (cu_seqlens). The
    forward must pass position_ids AND use_cache=False: with a cache (created by default when
    config.use_cache is on) transformers skips the detection and examples attend to each other.
    Models that ignore position_ids (prompt tuning prepends its tokens) do not see the boundaries:
    packing.packing_supported checks a model before it is trusted with packed batches.

    Each example's first label is -100: the causal loss scores position t's logits against label t + 1,
    so the last token of one example would otherwise predict the first of the next, a target that a
    padded row never scores (its label 0 has no position before it). `multiple` rounds the width up
    with a trailing segment of pad_id tokens (its own sequence, positions from 0, labels -100), which no
    example attends to, as collate's `multiple` does for padded batches."""
    import torch

    ids, labels, positions = [], [], []
    for f in features:
        n = len(f["input_ids"])
        if len(f["labels"]) != n:
            raise ValueError("pack takes causal features, whose labels align with the input ids")
        ids += f["input_ids"]
        labels += [IGNORE] + list(f["labels"][1:])
        positions += range(n)
    tail = round_up(len(ids), multiple) - len(ids)
    ids, labels, positions = ids + [pad_id] * tail, labels + [IGNORE] * tail, positions + list(range(tail))

    def row(values):
        return torch.tensor([values], dtype=torch.long)

    return {"input_ids": row(ids), "labels": row(labels), "position_ids": row(positions)}


def useful_tokens(features: list[dict], kind: str) -> int:
    """Tokens that carry data: the inputs, plus the labels for seq2seq (a separate decoder pass)."""
    n = sum(len(f["input_ids"]) for f in features)
    return n + sum(len(f["labels"]) for f in features) if kind == "seq2seq" else n


def round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def padded_size(features: list[dict], kind: str, multiple: tuple[int, int] = (1, 1), packed: bool = False) -> int:
    """Tokens the model processes for these features as one batch: collate's padded shape (inputs, and
    labels for seq2seq), or pack's single row; from the lengths alone, without building the tensors."""
    if not features:
        return 0
    if packed:
        return round_up(sum(len(f["input_ids"]) for f in features), multiple[0])
    n = len(features) * round_up(max(len(f["input_ids"]) for f in features), multiple[0])
    if kind == "seq2seq":
        n += len(features) * round_up(max(len(f["labels"]) for f in features), multiple[1])
    return n


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
