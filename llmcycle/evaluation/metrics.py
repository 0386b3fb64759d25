"""Evaluation metrics, computed with the reference implementations people compare against.

ROUGE comes from Google's `rouge_score` (the package behind the published summarization numbers and
behind HF `evaluate`), BLEU and chrF from `sacrebleu` (the standard, tokenization-stable BLEU). QA
exact match / token F1 follow the SQuAD evaluation script; classification metrics are written here.

Scales: ROUGE, exact match, F1, accuracy and macro-F1 are fractions in 0..1. BLEU and chrF stay on
sacrebleu's 0..100 scale, the scale every paper and leaderboard reports them on; rescaling them would
make our numbers look wrong next to published ones.

`compute_all` returns `(summary, per_example)`: a flat dict of corpus-level values (JSON-ready) and a
dict of per-example score lists (for bootstrap intervals, error analysis and side-by-side comparison).
"""
from __future__ import annotations

import re
import statistics
import string
from collections import Counter

from llmcycle.core.errors import UserError, suggest
from llmcycle.data.encoding import encode_target
from llmcycle.data.prompting import encode_prompt, uses_chat_template
from llmcycle.evaluation import faithfulness
from llmcycle.models.generation import configured_eos
from llmcycle.models.hub import context_window, decoder_prefix

HEADLINE = {"summarization": "rougeL", "qa": "f1", "classification": "macro_f1", "generation": "rougeL"}
ROUGE_TYPES = ("rouge1", "rouge2", "rougeL", "rougeLsum")
LENGTH_NAMES = ("len_words_mean", "len_words_median", "len_words_max",
                "len_tokens_mean", "len_tokens_median", "len_tokens_max", "empty_share")
METRIC_NAMES = (*ROUGE_TYPES, "bleu", "chrf", "exact_match", "f1", "accuracy", "macro_f1",
                "perplexity", "hallucinated_entity_rate", *LENGTH_NAMES)
# Lower is better for these; length statistics describe outputs and have no better direction.
_LOWER_IS_BETTER = {"perplexity", "empty_share", "hallucinated_entity_rate"}
# Tasks whose outputs state facts of their input: scored for faithfulness (llmcycle/evaluation/faithfulness.py).
GROUNDED_TASKS = ("summarization", "qa")


def higher_is_better(name: str) -> bool | None:
    """True for quality scores, False for perplexity and the share of empty outputs, None for the
    length statistics (a longer or shorter output is not better in itself)."""
    if name not in METRIC_NAMES:
        raise UserError(f"unknown metric '{name}'{suggest(name, METRIC_NAMES)}")
    if name in _LOWER_IS_BETTER:
        return False
    if name.startswith("len_"):
        return None
    return True


# --- ROUGE -------------------------------------------------------------------------------------------

# rougeLsum scores summary-level LCS over sentences, and rouge_score finds sentences only by "\n". The
# HF summarization examples insert those newlines with nltk.sent_tokenize, but that needs the punkt model,
# a separate download nltk does not ship (offline it raises LookupError). A split after . ! ? followed by
# whitespace gets the sentences of ordinary summaries right; it errs only on abbreviations ("Dr. Smith"),
# which shifts rougeLsum slightly and leaves rouge1/2/L untouched (they ignore newlines).
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


def _sentences_on_lines(text: str) -> str:
    lines = [s for line in text.split("\n") for s in _SENTENCE_END.split(line.strip())]
    return "\n".join(s for s in lines if s)


_SCORER = None


def _scorer():
    global _SCORER
    if _SCORER is None:  # building the scorer loads the Porter stemmer; do it once
        from rouge_score import rouge_scorer

        _SCORER = rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=True)
    return _SCORER


def rouge(predictions: list[str], references: list[list[str]]) -> tuple[dict, dict]:
    """ROUGE-1/2/L/Lsum F-measures: (corpus means, per-example lists).

    With several references per example (DialogSum's test split has three) each metric takes the best
    reference for that example, separately per metric: the prediction is judged against the summary it
    is closest to, as rouge_score's `score_multi` and the DialogSum evaluation do, rather than being
    pulled down by the references it did not paraphrase. rouge_score keeps only [a-z0-9] tokens, so
    text in non-Latin scripts scores 0.
    """
    scorer = _scorer()
    per = {k: [] for k in ROUGE_TYPES}
    for pred, refs in zip(predictions, references):
        pred_lines = _sentences_on_lines(pred)
        best = dict.fromkeys(ROUGE_TYPES, 0.0)
        for ref in refs:
            scores = scorer.score(_sentences_on_lines(ref), pred_lines)  # (target, prediction)
            for k in ROUGE_TYPES:
                best[k] = max(best[k], scores[k].fmeasure)
        for k in ROUGE_TYPES:
            per[k].append(best[k])
    return {k: _mean(v) for k, v in per.items()}, per


# --- BLEU and chrF -----------------------------------------------------------------------------------

def _reference_streams(references: list[list[str]]) -> list[list[str | None]]:
    """Transpose per-example reference lists into sacrebleu's reference streams.

    sacrebleu wants every stream as long as the hypotheses. Examples with fewer references are padded
    with None, which sacrebleu drops per segment (it documents None for "a variable number of
    references"). An empty string would instead count as a zero-length reference: BLEU picks the
    reference length closest to the hypothesis, so a short hypothesis would escape its brevity penalty.
    Repeating the first reference would be harmless for BLEU but is a fake reference; None is exact.
    """
    width = max(len(r) for r in references)
    return [[refs[i] if i < len(refs) else None for refs in references] for i in range(width)]


def bleu_chrf(predictions: list[str], references: list[list[str]]) -> tuple[dict, dict]:
    """Corpus BLEU and chrF (0..100) plus per-example sentence BLEU and chrF.

    Corpus BLEU is not the mean of sentence BLEUs (it pools n-gram counts), so the per-example lists
    are for bootstrap and error analysis only. Sentence BLEU uses effective order, as sacrebleu
    recommends, so a short sentence without 4-gram matches does not score 0 outright.
    """
    import sacrebleu
    from sacrebleu.metrics import BLEU, CHRF

    streams = _reference_streams(references)
    summary = {"bleu": sacrebleu.corpus_bleu(predictions, streams).score,
               "chrf": sacrebleu.corpus_chrf(predictions, streams).score}
    sent_bleu, sent_chrf = BLEU(effective_order=True), CHRF()
    per = {"bleu": [sent_bleu.sentence_score(p, r).score for p, r in zip(predictions, references)],
           "chrf": [sent_chrf.sentence_score(p, r).score for p, r in zip(predictions, references)]}
    return summary, per


def sentence_bleu(prediction: str, references: list[str]) -> float:
    """BLEU (0..100, effective order) of one prediction against its references."""
    from sacrebleu.metrics import BLEU

    return BLEU(effective_order=True).sentence_score(prediction, list(references)).score


# --- QA ----------------------------------------------------------------------------------------------

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = set(string.punctuation)


def normalize_answer(text: str) -> str:
    """SQuAD normalisation: lowercase, drop punctuation, drop articles, collapse whitespace."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCT)
    return " ".join(_ARTICLES.sub(" ", text).split())


def _token_f1(pred: str, ref: str) -> float:
    p, r = normalize_answer(pred).split(), normalize_answer(ref).split()
    # SQuAD v2 rule: when either side normalises to nothing, F1 is 1 only if both do (else 0/0).
    if not p or not r:
        return float(p == r)
    same = sum((Counter(p) & Counter(r)).values())
    if same == 0:
        return 0.0
    precision, recall = same / len(p), same / len(r)
    return 2 * precision * recall / (precision + recall)


def qa_scores(predictions: list[str], references: list[list[str]]) -> tuple[dict, dict]:
    """SQuAD exact match and token F1, each the max over an example's references."""
    em = [max(float(normalize_answer(p) == normalize_answer(r)) for r in refs)
          for p, refs in zip(predictions, references)]
    f1 = [max(_token_f1(p, r) for r in refs) for p, refs in zip(predictions, references)]
    return {"exact_match": _mean(em), "f1": _mean(f1)}, {"exact_match": em, "f1": f1}


# --- classification ----------------------------------------------------------------------------------

def normalize_label(label: str) -> str:
    return label.strip().lower()


def classification_scores(predictions: list[str], references: list[list[str]]) -> tuple[dict, dict]:
    """Accuracy and macro-F1 over normalised labels (strip + lowercase).

    Written out rather than taken from sklearn: it is a few lines, and sklearn is a large dependency we
    would add for this alone. The classes are the gold labels. sklearn's default also makes a class of
    every predicted label, which for a generative model means every distinct stray output ("I think
    positive") becomes a class with F1 0 and drags the average down by the number of distinct mistakes;
    here a stray output is simply a miss for its gold class. With several acceptable labels per example,
    a prediction matching any of them is correct; otherwise the first one is the gold label.
    """
    gold, pred, correct = [], [], []
    for p, refs in zip(predictions, references):
        p, refs = normalize_label(p), [normalize_label(r) for r in refs]
        hit = p in refs
        gold.append(p if hit else refs[0])
        pred.append(p)
        correct.append(float(hit))
    f1s = []
    for c in sorted(set(gold)):
        tp = sum(g == c and q == c for g, q in zip(gold, pred))
        fp = sum(g != c and q == c for g, q in zip(gold, pred))
        fn = sum(g == c and q != c for g, q in zip(gold, pred))
        f1s.append(2 * tp / (2 * tp + fp + fn) if tp else 0.0)  # = 2PR/(P+R), safe when P or R is 0
    return ({"accuracy": _mean(correct), "macro_f1": _mean(f1s)},
            {"accuracy": correct, "label_gold": gold, "label_pred": pred})


# --- lengths -----------------------------------------------------------------------------------------

def length_stats(predictions: list[str], tokenizer=None) -> dict:
    """Mean/median/max prediction length in whitespace words and, with a tokenizer, in tokens (no
    special tokens), plus the share of empty (whitespace-only) predictions."""
    if not predictions:
        raise UserError("no predictions to score")
    out = {}
    counts = {"words": [len(p.split()) for p in predictions]}
    if tokenizer is not None:
        counts["tokens"] = [len(ids) for ids in
                            tokenizer(list(predictions), add_special_tokens=False)["input_ids"]]
    for unit, values in counts.items():
        out[f"len_{unit}_mean"] = _mean(values)
        out[f"len_{unit}_median"] = float(statistics.median(values))
        out[f"len_{unit}_max"] = float(max(values))
    out["empty_share"] = sum(not p.strip() for p in predictions) / len(predictions)
    return out


# --- bootstrap ---------------------------------------------------------------------------------------

def bootstrap_ci(per_example_scores, n_resamples: int = 1000, seed: int = 0,
                 alpha: float = 0.05) -> tuple[float, float]:
    """Percentile-bootstrap (1 - alpha) interval for the mean of per-example scores.

    Resamples examples with replacement; the same seed gives the same interval. The interval is for the
    mean of the per-example scores, which is the corpus score for every metric here except corpus BLEU
    and chrF (those pool counts over the corpus) and macro-F1 (see `macro_f1_ci`).
    """
    import numpy as np

    scores = np.asarray(list(per_example_scores), dtype=float)
    return _percentile_interval(lambda idx: scores[idx].mean(axis=1), scores.size, n_resamples, seed, alpha)


def macro_f1_ci(gold: list[str], pred: list[str], n_resamples: int = 1000, seed: int = 0,
                alpha: float = 0.05) -> tuple[float, float]:
    """Percentile-bootstrap interval for macro-F1, recomputed on every resample: macro-F1 is not a mean
    over examples (one example's effect depends on the others), so `bootstrap_ci` cannot give it."""
    import numpy as np

    classes = sorted(set(gold))
    code = {c: i for i, c in enumerate(classes)}
    g = np.array([code[x] for x in gold])
    p = np.array([code.get(x, -1) for x in pred])  # -1: a label outside the gold classes
    k = len(classes)
    return _percentile_interval(lambda idx: macro_f1_rows(g[idx], p[idx], k), len(gold), n_resamples, seed, alpha)


def macro_f1_rows(gold, pred, k: int):
    """Macro-F1 of each row of two (rows, n) arrays of class codes 0..k-1 (a prediction outside the gold
    classes: -1 or k), computed for every resample at once; the classes are each row's gold labels."""
    import numpy as np

    rows = np.arange(gold.shape[0])[:, None]
    gold_n, pred_n, tp = (np.zeros((gold.shape[0], k + 1)) for _ in range(3))
    np.add.at(gold_n, (rows, gold), 1)
    np.add.at(pred_n, (rows, pred), 1)  # column -1 (= k) collects out-of-set predictions
    np.add.at(tp, (rows, np.where(gold == pred, gold, k)), 1)
    gold_n, pred_n, tp = gold_n[:, :k], pred_n[:, :k], tp[:, :k]
    present = gold_n > 0  # classes are the gold labels of this resample
    f1 = np.divide(2 * tp, gold_n + pred_n, out=np.zeros_like(tp), where=tp > 0)
    return (f1 * present).sum(axis=1) / present.sum(axis=1)


def _percentile_interval(stat, n: int, n_resamples: int, seed: int, alpha: float) -> tuple[float, float]:
    """The alpha/2 and 1 - alpha/2 quantiles of stat over n_resamples resamples of n examples."""
    import numpy as np

    if n == 0:
        raise UserError("no scores to bootstrap")
    if not 0 < alpha < 1 or n_resamples < 1:
        raise UserError("bootstrap needs 0 < alpha < 1 and at least one resample")
    rng = np.random.default_rng(seed)
    values = np.empty(n_resamples)
    chunk = max(1, 1_000_000 // n)  # bound each index matrix to ~8 MB on large test sets
    for start in range(0, n_resamples, chunk):
        stop = min(start + chunk, n_resamples)
        values[start:stop] = stat(rng.integers(0, n, size=(stop - start, n)))
    low, high = np.quantile(values, [alpha / 2, 1 - alpha / 2])
    return float(low), float(high)


# --- perplexity --------------------------------------------------------------------------------------

def reference_perplexity(model, tokenizer, prompts: list[str], references: list[str],
                         batch_size: int = 8) -> float:
    """exp of the token-weighted mean NLL of the references given the prompts.

    seq2seq: the prompt is the encoder input, the reference the labels (with the eos the tokenizer
    appends). causal: the model reads prompt + reference and only the reference tokens are scored; an
    eos is appended to the reference so that, as in seq2seq and as in fine-tuning, stopping is part of
    what is scored. Every reference token counts equally (a long reference weighs more than a short one),
    which is the perplexity of the reference corpus rather than a mean of per-example perplexities.
    """
    import math

    import torch
    import torch.nn.functional as F

    if not prompts or len(prompts) != len(references):
        raise UserError("perplexity needs one prompt per reference, and at least one of each")
    if batch_size < 1:
        raise UserError("batch_size must be at least 1")
    device = next(model.parameters()).device
    seq2seq = bool(getattr(model.config, "is_encoder_decoder", False))
    window = context_window(model.config, tokenizer)
    end_id = next(iter(configured_eos(model, tokenizer)[0]), None)  # what training appends to a target
    pad = next((t for t in (tokenizer.pad_token_id, end_id) if t is not None), 0)
    total_nll, total_tokens = 0.0, 0
    model.eval()
    for start in range(0, len(prompts), batch_size):
        batch_p, batch_r = prompts[start:start + batch_size], references[start:start + batch_size]
        if seq2seq:
            enc = tokenizer([str(p) for p in batch_p], padding=True, truncation=True, max_length=window,
                            return_tensors="pt")
            targets, decoder_in = _seq2seq_targets(model, tokenizer, batch_r, window, pad, end_id)
            inputs = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"],
                      "decoder_input_ids": decoder_in}
        else:
            rows = [_causal_row(tokenizer, p, r, window, end_id) for p, r in zip(batch_p, batch_r)]
            width = max(len(ids) for ids, _ in rows)
            ids = torch.tensor([i + [pad] * (width - len(i)) for i, _ in rows])
            mask = torch.tensor([[1] * len(i) + [0] * (width - len(i)) for i, _ in rows])
            lab = torch.tensor([[-100] * n + i[n:] + [-100] * (width - len(i)) for i, n in rows])
            targets = lab[:, 1:]  # position t predicts token t + 1
            inputs = {"input_ids": ids, "attention_mask": mask}
        with torch.inference_mode():
            logits = model(**{k: v.to(device) for k, v in inputs.items()}).logits
        # position t predicts token t + 1; seq2seq: the first reference token comes after the decoder prefix
        logits = logits[:, decoder_in.shape[1] - targets.shape[1]:] if seq2seq else logits[:, :-1]
        targets = targets.to(device)
        total_nll += F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), targets.reshape(-1),
                                     ignore_index=-100, reduction="sum").item()
        total_tokens += int((targets != -100).sum())
    if total_tokens == 0:
        raise UserError("the references have no tokens to score")
    return math.exp(total_nll / total_tokens)


def _seq2seq_targets(model, tokenizer, references: list[str], window: int, pad: int, end_id: int | None):
    """(targets, decoder inputs) for references, encoded as fine-tuning encodes them (the text, then the
    model's eos: data.encoding.encode_answer) and read behind the decoder prefix, as generation reads them."""
    import torch

    eos = [end_id] if end_id is not None else []
    rows = [(tokenizer(r, add_special_tokens=False)["input_ids"] + eos)[:window] for r in references]
    width = max(len(r) for r in rows)
    targets = torch.tensor([r + [-100] * (width - len(r)) for r in rows])
    shifted = torch.cat([torch.tensor(decoder_prefix(model)).expand(len(rows), -1), targets[:, :-1]], dim=1)
    return targets, shifted.masked_fill(shifted == -100, pad)


def _causal_row(tokenizer, prompt: str, reference: str, window: int, end_id: int | None) -> tuple[list[int], int]:
    """(prompt + reference ids, number of prompt ids), each encoded as fine-tuning encodes it (a chat
    model's through its template, the reference ending with its end-of-turn token), so the boundary is
    exact. A prompt too long for the window loses its start (the end is what the reference follows)."""
    p = encode_prompt(tokenizer, prompt, "causal")
    if not p and tokenizer.bos_token_id is not None:
        p = [tokenizer.bos_token_id]  # something for the first reference token to be predicted from
    if uses_chat_template(tokenizer, "causal") or end_id is not None:
        r = encode_target(tokenizer, prompt, reference, "causal", end_id)
    else:
        r = tokenizer(reference, add_special_tokens=False)["input_ids"]
    r = r[:window - 1]
    p = p[len(p) - (window - len(r)):] if len(p) + len(r) > window else p
    return p + r, len(p)


# --- all together ------------------------------------------------------------------------------------

def compute_all(task: str, predictions: list[str], references: list[list[str]], tokenizer=None,
                bootstrap: bool = True, n_resamples: int = 1000, seed: int = 0,
                sources: list[str] | None = None, lexicon=None) -> tuple[dict, dict]:
    """Score predictions for a task: (summary, per_example).

    summarization / generation: ROUGE + BLEU + chrF; qa: exact match + F1 + ROUGE; classification:
    accuracy + macro-F1. The summary also holds n_examples, the length statistics, `headline` (the
    metric's name), `headline_value` and the bootstrap 95% interval of the headline
    (`headline_ci_low` / `headline_ci_high`, None with bootstrap=False). A reference given as a plain
    string is taken as a one-element list. With `sources` (each example's input), summarization and QA
    outputs are also scored for faithfulness: the hallucinated-entity rate with its interval; `lexicon`
    adds names (lowercased) known from elsewhere, e.g. the training data (faithfulness.name_lexicon).
    """
    if task not in HEADLINE:
        raise UserError(f"unknown task '{task}'{suggest(task, HEADLINE)}; tasks: {', '.join(HEADLINE)}")
    if not predictions:
        raise UserError("no predictions to score")
    if len(predictions) != len(references):
        raise UserError(f"{len(predictions)} predictions but {len(references)} reference lists")
    refs = [[r] if isinstance(r, str) else list(r) for r in references]
    for i, r in enumerate(refs):
        if not r:
            raise UserError(f"example {i} has no reference")
    preds = [p if isinstance(p, str) else "" for p in predictions]  # a missing output scores as empty

    summary, per = {"n_examples": len(preds)}, {}
    parts = {"summarization": (rouge, bleu_chrf), "generation": (rouge, bleu_chrf),
             "qa": (qa_scores, rouge), "classification": (classification_scores,)}[task]
    for fn in parts:
        s, p = fn(preds, refs)
        summary.update(s)
        per.update(p)
    summary.update(length_stats(preds, tokenizer))
    if sources is not None and task in GROUNDED_TASKS:
        _faithfulness(summary, per, preds, refs, sources, set(lexicon or ()), bootstrap, n_resamples, seed)

    name = HEADLINE[task]
    summary["headline"], summary["headline_value"] = name, summary[name]
    low = high = None
    if bootstrap and name == "macro_f1":
        low, high = macro_f1_ci(per["label_gold"], per["label_pred"], n_resamples=n_resamples, seed=seed)
    elif bootstrap:
        low, high = bootstrap_ci(per[name], n_resamples=n_resamples, seed=seed)
    summary["headline_ci_low"], summary["headline_ci_high"] = low, high
    return summary, per


def _faithfulness(summary: dict, per: dict, preds, refs, sources, lexicon: set, bootstrap: bool,
                  n_resamples: int, seed: int) -> None:
    """Adds the hallucinated-entity rate (and its interval over the outputs that have entities)."""

    if len(sources) != len(preds):
        raise UserError(f"{len(preds)} predictions but {len(sources)} sources")
    lexicon = lexicon | faithfulness.name_lexicon([*sources, *(r for rs in refs for r in rs)])
    s, p = faithfulness.scores(preds, sources, lexicon)
    rated = [r for r in p["hallucinated_entity_rate"] if r is not None]
    low = high = None
    if bootstrap and rated:
        low, high = bootstrap_ci(rated, n_resamples=n_resamples, seed=seed)
    s["hallucinated_entity_rate_ci_low"], s["hallucinated_entity_rate_ci_high"] = low, high
    summary.update(s)
    per.update(p)


def _mean(values) -> float:
    values = list(values)
    return sum(values) / len(values) if values else 0.0
