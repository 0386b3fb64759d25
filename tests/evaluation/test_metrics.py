"""Metrics against values worked out by hand (the arithmetic is in the comments)."""
import math

import numpy as np
import pytest
import torch

from llmcycle.core.errors import UserError
from llmcycle.evaluation.metrics import (HEADLINE, METRIC_NAMES, _reference_streams, bleu_chrf, bootstrap_ci,
                              classification_scores, compute_all, higher_is_better, length_stats,
                              macro_f1_ci, normalize_answer, qa_scores, reference_perplexity, rouge,
                              sentence_bleu)
from tiny import make_gpt2, make_t5


def r(pred, refs):
    """Per-example ROUGE F-measures of one prediction."""
    return {k: v[0] for k, v in rouge([pred], [refs])[1].items()}


# --- ROUGE -------------------------------------------------------------------------------------------

def test_rouge_unigram_and_bigram_by_hand():
    s = r("the cat sat", ["the cat sat down"])
    # unigrams: 3 of 3 predicted are in the reference, 3 of 4 reference found: P=1, R=3/4,
    # F = 2PR/(P+R) = 1.5/1.75 = 6/7
    assert s["rouge1"] == pytest.approx(6 / 7)
    # bigrams: pred {the cat, cat sat}, ref {the cat, cat sat, sat down}: P=2/2, R=2/3, F = (4/3)/(5/3) = 0.8
    assert s["rouge2"] == pytest.approx(0.8)


def test_rouge_l_is_longest_common_subsequence():
    s = r("the gunman police killed", ["police killed the gunman"])
    # every word matches (rouge1 = 1) but the longest in-order run is 2 ("police killed"/"the gunman"):
    # P = R = 2/4, F = 0.5
    assert s["rouge1"] == pytest.approx(1.0)
    assert s["rougeL"] == pytest.approx(0.5)


def test_rouge_uses_the_porter_stemmer():
    from rouge_score import rouge_scorer

    # stems: cats -> cat, running -> run, runs -> run ("cat" has 3 letters and is left alone)
    assert r("cats running", ["cat runs"])["rouge1"] == pytest.approx(1.0)
    plain = rouge_scorer.RougeScorer(["rouge1"], use_stemmer=False)
    assert plain.score("cat runs", "cats running")["rouge1"].fmeasure == 0.0


def test_several_references_take_the_best_per_metric_not_the_average():
    s = r("the cat sat", ["the cat sat down", "a dog ran"])
    assert s["rouge1"] == pytest.approx(6 / 7)  # the average would be 3/7
    # Each metric picks its own best reference: the first gives rouge1 = 1 but rougeL = 0.5 (above);
    # the second shares "police killed the" in order: P = R = 3/4, so rouge1 = rougeL = 0.75.
    s = r("police killed the gunman", ["the gunman police killed", "police killed the man"])
    assert s["rouge1"] == pytest.approx(1.0)
    assert s["rougeL"] == pytest.approx(0.75)


def test_rouge_lsum_splits_sentences():
    s = r("The cat sat. The dog ran!", ["The dog ran. The cat sat."])
    # As one sequence the LCS is 3 of 6 tokens (F = 0.5); sentence by sentence each reference sentence is
    # matched in full by one predicted sentence: union-LCS recall = precision = 1.
    assert s["rougeL"] == pytest.approx(0.5)
    assert s["rougeLsum"] == pytest.approx(1.0)


def test_rouge_corpus_score_is_the_mean_of_examples():
    summary, per = rouge(["the cat sat", "a b"], [["the cat sat down"], ["x"]])
    assert per["rouge1"] == pytest.approx([6 / 7, 0.0])
    assert summary["rouge1"] == pytest.approx(3 / 7)


# --- BLEU and chrF -----------------------------------------------------------------------------------

def test_bleu_and_chrf_identical_are_100():
    summary, per = bleu_chrf(["the cat sat on the mat today"], [["the cat sat on the mat today"]])
    assert summary["bleu"] == pytest.approx(100.0)
    assert summary["chrf"] == pytest.approx(100.0)
    assert per["bleu"][0] == pytest.approx(100.0)


def test_bleu_by_hand():
    # every n-gram of "a b c d" is in "a b c d e": precisions 1; brevity penalty exp(1 - 5/4)
    assert bleu_chrf(["a b c d"], [["a b c d e"]])[0]["bleu"] == pytest.approx(100 * math.exp(-0.25))
    # "the cat sat down" vs "the cat sat up": precisions 3/4, 2/3, 1/2, and 0/1 for 4-grams, which
    # sacrebleu's default "exp" smoothing turns into 1/(2*1); BP = 1. BLEU = (3/4*2/3*1/2*1/2)^(1/4)
    score = bleu_chrf(["the cat sat down"], [["the cat sat up"]])[0]["bleu"]
    assert score == pytest.approx(100 * 0.125 ** 0.25)


def test_hypothesis_equal_to_second_reference_scores_100():
    summary, per = bleu_chrf(["a dog ran in the park"], [["the cat sat on the mat", "a dog ran in the park"]])
    assert summary["bleu"] == pytest.approx(100.0)
    assert summary["chrf"] == pytest.approx(100.0)
    assert sentence_bleu("a dog ran in the park", ["x y z", "a dog ran in the park"]) == pytest.approx(100.0)


def test_unequal_reference_counts_are_padded_with_none():
    refs = [["a b c d e f g h"], ["p q r s", "t"]]
    assert _reference_streams(refs) == [["a b c d e f g h", "p q r s"], [None, "t"]]
    # With None the first example's only reference (8 words) sets its length: ref_len 8 + 4 = 12 for
    # 8 hypothesis words, all n-grams correct, BLEU = 100 * exp(1 - 12/8). An empty-string pad would
    # be a 0-word reference, tie with 8 for closeness to 4, win the tie, and lift BLEU to 100.
    assert bleu_chrf(["a b c d", "p q r s"], refs)[0]["bleu"] == pytest.approx(100 * math.exp(-0.5))


# --- QA ----------------------------------------------------------------------------------------------

def test_squad_normalisation():
    assert normalize_answer("The Eiffel   Tower!") == "eiffel tower"
    assert normalize_answer("An apple, a pear.") == "apple pear"
    assert normalize_answer("theatre") == "theatre"  # articles only as whole words
    summary, per = qa_scores(["The Eiffel Tower!", "New  York", "Paris"],
                             [["eiffel tower"], ["new york city", "new york"], ["London"]])
    assert per["exact_match"] == [1.0, 1.0, 0.0]
    assert summary["exact_match"] == pytest.approx(2 / 3)


def test_token_f1_by_hand():
    # normalised: [red, car] vs [red, bus]: 1 common, P = 1/2, R = 1/2, F1 = 0.5
    assert qa_scores(["the red car"], [["a red bus"]])[1]["f1"] == [0.5]
    # [big, red, car] vs [red, car]: P = 2/3, R = 1, F1 = (4/3)/(5/3) = 0.8; max over references
    assert qa_scores(["big red car"], [["blue bus", "red car"]])[1]["f1"] == [pytest.approx(0.8)]
    # nothing left after normalising: right only when the answer is empty too
    assert qa_scores(["the", "", "x"], [["a"], ["x"], [""]])[1]["f1"] == [1.0, 0.0, 0.0]


# --- classification ----------------------------------------------------------------------------------

def test_accuracy_and_macro_f1_by_hand():
    gold = ["a", "a", "b", "b", "c", "c"]
    pred = ["a", "b", "b", "b", "c", "a"]
    summary, _ = classification_scores(pred, [[g] for g in gold])
    # accuracy: 4 of 6 right.
    # a: TP 1, FP 1 (the last example, gold c), FN 1 -> P 1/2, R 1/2, F1 1/2
    # b: TP 2, FP 1, FN 0 -> P 2/3, R 1, F1 4/5
    # c: TP 1, FP 0, FN 1 -> P 1, R 1/2, F1 2/3
    assert summary["accuracy"] == pytest.approx(4 / 6)
    assert summary["macro_f1"] == pytest.approx((1 / 2 + 4 / 5 + 2 / 3) / 3)


def test_labels_are_normalised_and_stray_outputs_add_no_class():
    summary, per = classification_scores([" Positive ", "I think negative"], [["positive"], ["NEGATIVE"]])
    assert per["accuracy"] == [1.0, 0.0]
    # positive: F1 1; negative: TP 0 -> F1 0; the stray string is not a third class: macro = 1/2
    assert summary["macro_f1"] == pytest.approx(0.5)


# --- lengths -----------------------------------------------------------------------------------------

class CharTokenizer:
    """One token per character, so token counts are checkable by eye."""

    def __call__(self, texts, add_special_tokens=True):
        return {"input_ids": [[ord(c) for c in t] + ([0] if add_special_tokens else []) for t in texts]}


def test_length_stats_by_hand():
    stats = length_stats(["one two three", "", "a b", "x"], tokenizer=CharTokenizer())
    # words 3, 0, 2, 1: mean 1.5, median (1 + 2)/2, max 3; one empty of four
    assert stats["len_words_mean"] == 1.5 and stats["len_words_median"] == 1.5
    assert stats["len_words_max"] == 3 and stats["empty_share"] == 0.25
    # characters 13, 0, 3, 1 (no special tokens): mean 17/4, median (1 + 3)/2, max 13
    assert stats["len_tokens_mean"] == 4.25 and stats["len_tokens_median"] == 2.0
    assert stats["len_tokens_max"] == 13
    assert "len_tokens_mean" not in length_stats(["a"])


# --- bootstrap ---------------------------------------------------------------------------------------

def test_bootstrap_interval():
    rng = np.random.default_rng(1)
    small, large = rng.random(40), rng.random(4000)
    low, high = bootstrap_ci(small)
    assert low < small.mean() < high
    assert bootstrap_ci(small, seed=0) == (low, high)  # same seed, same interval
    assert bootstrap_ci(small, seed=1) != (low, high)
    low_l, high_l = bootstrap_ci(large)
    assert low_l < large.mean() < high_l
    assert high_l - low_l < (high - low) / 3  # width shrinks like 1/sqrt(n): 10x less here
    assert bootstrap_ci([0.5] * 30) == (0.5, 0.5)
    with pytest.raises(UserError):
        bootstrap_ci([])


def test_macro_f1_interval_recomputes_on_each_resample():
    gold = list("aabbccabca")
    pred = list("abbbcaabcc")
    low, high = macro_f1_ci(gold, pred, n_resamples=200, seed=3)
    # the same resamples, scored one by one with the plain-Python macro-F1
    idx = np.random.default_rng(3).integers(0, len(gold), size=(200, len(gold)))
    values = [classification_scores([pred[i] for i in row], [[gold[i]] for i in row])[0]["macro_f1"]
              for row in idx]
    assert (low, high) == pytest.approx(tuple(np.quantile(values, [0.025, 0.975])))
    assert macro_f1_ci(gold, gold) == (1.0, 1.0)


# --- compute_all -------------------------------------------------------------------------------------

def test_compute_all_per_task():
    preds, refs = ["the cat sat", "a dog ran", "hello"], [["the cat sat down"], ["a dog ran"], "hi there"]
    summary, per = compute_all("summarization", preds, refs)
    assert {"rouge1", "rouge2", "rougeL", "rougeLsum", "bleu", "chrf", "len_words_mean"} <= set(summary)
    assert summary["headline"] == "rougeL" and summary["headline_value"] == summary["rougeL"]
    assert summary["headline_ci_low"] <= summary["rougeL"] <= summary["headline_ci_high"]
    assert len(per["rougeL"]) == 3 and summary["n_examples"] == 3

    summary, per = compute_all("qa", ["Paris", "the Louvre"], [["paris"], ["Louvre museum"]], bootstrap=False)
    assert summary["exact_match"] == 0.5 and "rougeL" in summary and "bleu" not in summary
    assert summary["headline"] == "f1" and summary["headline_ci_low"] is None

    summary, _ = compute_all("classification", ["pos", "neg", "neg"], [["pos"], ["pos"], ["neg"]])
    assert summary["headline"] == "macro_f1" and "rouge1" not in summary
    assert summary["headline_ci_low"] <= summary["macro_f1"] <= summary["headline_ci_high"]
    assert set(HEADLINE) == {"summarization", "qa", "classification", "generation"}


def test_compute_all_rejects_bad_input():
    with pytest.raises(UserError, match="no predictions to score"):
        compute_all("summarization", [], [])
    with pytest.raises(UserError, match="did you mean 'qa'"):
        compute_all("qaa", ["x"], [["x"]])
    with pytest.raises(UserError, match="2 predictions but 1"):
        compute_all("qa", ["x", "y"], [["x"]])
    with pytest.raises(UserError, match="example 0 has no reference"):
        compute_all("qa", ["x"], [[]])


def test_metric_names_and_direction():
    assert higher_is_better("rougeL") and higher_is_better("bleu") and higher_is_better("macro_f1")
    assert higher_is_better("perplexity") is False and higher_is_better("empty_share") is False
    assert higher_is_better("len_words_mean") is None
    assert set(HEADLINE.values()) <= set(METRIC_NAMES)
    with pytest.raises(UserError, match="did you mean 'rougeL'"):
        higher_is_better("rougel")


# --- perplexity --------------------------------------------------------------------------------------

PROMPTS = ["summarize: the cat sat on the mat", "question: what is two plus two?", "hi"]
REFS = ["the cat sat", "four, I think", "hello world and more words"]


def _manual_t5(model, tok):
    nll, n = 0.0, 0
    for p, ref in zip(PROMPTS, REFS):
        labels = tok(text_target=ref)["input_ids"]  # ends with eos
        dec_in = [model.config.decoder_start_token_id] + labels[:-1]
        logits = model(input_ids=torch.tensor([tok(p)["input_ids"]]),
                       decoder_input_ids=torch.tensor([dec_in])).logits[0]
        logp = torch.log_softmax(logits, dim=-1)
        nll -= sum(logp[t, labels[t]].item() for t in range(len(labels)))
        n += len(labels)
    return math.exp(nll / n)


def _manual_causal(model, tok):
    nll, n = 0.0, 0
    for p, ref in zip(PROMPTS, REFS):
        prompt = tok(p)["input_ids"]
        ids = prompt + tok(ref, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        logp = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0], dim=-1)
        # the token at position t is predicted by the logits at t - 1; only reference tokens count
        nll -= sum(logp[t - 1, ids[t]].item() for t in range(len(prompt), len(ids)))
        n += len(ids) - len(prompt)
    return math.exp(nll / n)


@pytest.mark.parametrize("kind", ["t5", "gpt2"])
def test_reference_perplexity_matches_manual_log_softmax(tmp_path, kind):
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

    from llmcycle.models.hub import load_tokenizer

    folder = (make_t5 if kind == "t5" else make_gpt2)(tmp_path / kind)
    cls = AutoModelForSeq2SeqLM if kind == "t5" else AutoModelForCausalLM
    model, tok = cls.from_pretrained(str(folder)).eval(), load_tokenizer(str(folder))
    with torch.no_grad():
        expected = (_manual_t5 if kind == "t5" else _manual_causal)(model, tok)
    # batch_size 2 over 3 examples: padding in the first batch, a short last batch
    got = reference_perplexity(model, tok, PROMPTS, REFS, batch_size=2)
    assert got == pytest.approx(expected, rel=1e-4)
    assert reference_perplexity(model, tok, PROMPTS, REFS, batch_size=1) == pytest.approx(got, rel=1e-5)
    with pytest.raises(UserError):
        reference_perplexity(model, tok, PROMPTS, REFS[:1])
