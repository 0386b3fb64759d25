"""Preference optimization (llmcycle/stages/align/preference.py): the DPO loss and sequence log-probs by hand, pair
loading (HH-RLHF transcripts split into prompt and responses), DPO (ours on T5, TRL's on GPT-2) and ORPO
(TRL's) learning on tiny models with the reference being the untouched starting model, and bad input."""
import json
import math
from pathlib import Path

import pytest
import torch

from llmcycle.core.errors import UserError
from llmcycle.models.load import load_model
from llmcycle.stages.align.preference import (PreferencePair, all_logps, dpo_loss, encode_pairs, load_pairs, pair_logps,
                                 split_transcript, train_preference)
from llmcycle.training.finetune import TuneConfig, wrap
from tiny import make_gpt2, make_t5

SHARED = Path(__file__).resolve().parents[3] / "shared" / "data"
WORDS = ["red", "blue", "green", "grey", "cat", "dog"]
RUDE = ["idiot", "fool", "clown"]
KIND = {"t5": "seq2seq", "gpt2": "causal"}


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    root = tmp_path_factory.mktemp("bases")
    return {"t5": make_t5(root / "t5"), "gpt2": make_gpt2(root / "gpt2")}


def synthetic_pairs(n=24):
    """The polite answer names the colour in the prompt; the rejected one is an insult."""
    return [PreferencePair(f"{WORDS[i % 6]} is here ->", f" {WORDS[i % 6]}", f" {RUDE[i % 3]}", f"row {i}")
            for i in range(n)]


def policy(bases, arch, tuning="lora"):
    model, tok = load_model(str(bases[arch]), dtype="float32", device="cpu")
    torch.manual_seed(0)
    return wrap(TuneConfig(method=tuning, r=4, alpha=8, dropout=0.0, max_steps=1), model, KIND[arch]), tok


def base_state(model) -> dict:
    return {k: v.detach().clone() for k, v in model.state_dict().items() if "lora_" not in k}


# ------------------------------------------------------------------------------------ the maths
def test_dpo_loss_by_hand():
    """beta 0.1. Pair 1: policy (-1, -3), reference (-2, -2): z = 0.1 * ((-1+2) - (-3+2)) = 0.2,
    loss = log(1 + e^-0.2) = 0.598139. Pair 2: policy (-5, -4), reference (-5, -5): z = 0.1 * (0 - 1) = -0.1,
    loss = log(1 + e^0.1) = 0.744397. Pair 3: policy = reference: z = 0, loss = log 2 = 0.693147.
    Label smoothing 0.2 on pair 1: 0.8 * log(1 + e^-0.2) + 0.2 * log(1 + e^0.2) = 0.478511 + 0.159628."""
    pc, pr = torch.tensor([-1.0, -5.0, -7.0]), torch.tensor([-3.0, -4.0, -2.0])
    rc, rr = torch.tensor([-2.0, -5.0, -7.0]), torch.tensor([-2.0, -5.0, -2.0])
    assert dpo_loss(pc, pr, rc, rr, 0.1).tolist() == pytest.approx([0.598139, 0.744397, 0.693147], abs=1e-6)
    assert float(dpo_loss(pc[:1], pr[:1], rc[:1], rr[:1], 0.1, label_smoothing=0.2)) == pytest.approx(
        0.478511 + 0.159628, abs=1e-6)
    # beta scales the margin: beta 1 on pair 1 gives z = 2, log(1 + e^-2) = 0.126928
    assert float(dpo_loss(pc[:1], pr[:1], rc[:1], rr[:1], 1.0)) == pytest.approx(0.126928, abs=1e-6)


@pytest.mark.parametrize("arch", ["t5", "gpt2"])
def test_sequence_logps_are_the_sum_over_response_tokens_only(bases, arch):
    model, tok = load_model(str(bases[arch]), dtype="float32", device="cpu")
    kind = KIND[arch]
    pairs = [PreferencePair("the quick brown fox jumps over", " the lazy dog", " a cat", "a"),
             PreferencePair("red ->", " red", " you fool and clown", "b")]
    features, _ = encode_pairs(pairs, tok, kind, 128, 128)
    with torch.no_grad():
        chosen, rejected = pair_logps(model, features, kind, tok.pad_token_id, torch.device("cpu"))
        for f, c, r in zip(features, chosen, rejected):
            for key, got in (("chosen_ids", c), ("rejected_ids", r)):
                prompt, response = f["prompt_ids"], f[key]
                if kind == "causal":  # one unpadded row; the response tokens are predicted from t - 1
                    ids = torch.tensor([prompt + response])
                    logp = torch.log_softmax(model(input_ids=ids).logits[0].float(), -1)
                    manual = sum(float(logp[len(prompt) + j - 1, t]) for j, t in enumerate(response))
                else:  # transformers' own mean cross-entropy over the decoder targets, times their count
                    out = model(input_ids=torch.tensor([prompt]), labels=torch.tensor([response]))
                    manual = -float(out.loss) * len(response)
                assert float(got) == pytest.approx(manual, abs=1e-4)
    assert features[0]["chosen_ids"][-1] == tok.eos_token_id  # the model learns to stop


def test_pairs_are_encoded_as_at_inference_and_overlong_ones_skipped(bases):
    from llmcycle.data.prompting import encode_prompt

    _, tok = load_model(str(bases["gpt2"]), dtype="float32", device="cpu")
    tok.chat_template = "{% for m in messages %}<u>{{ m['content'] }}{% endfor %}<a>"
    pairs = [PreferencePair("hi", " yes", " no", "a"), PreferencePair("hi " * 40, " yes", " no", "b")]
    features, overlong = encode_pairs(pairs, tok, "causal", max_length=30, max_prompt_length=30)
    assert features[0]["prompt_ids"] == encode_prompt(tok, "hi", "causal") == tok("<u>hi<a>")["input_ids"]
    assert features[0]["rejected_ids"] == tok(" no")["input_ids"] + [tok.eos_token_id]
    assert overlong == ["b"]


# --------------------------------------------------------------------------------------- data
def test_hh_transcripts_split_into_shared_prompt_and_final_turns(tmp_path):
    head = "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: insult me\n\nAssistant:"
    assert split_transcript(head + " no.") == (head, " no.")
    assert split_transcript("no turns here") is None
    rows = [{"chosen": head + " I'd rather not.", "rejected": head + " You fool."},
            {"chosen": head + " same", "rejected": head + " same"},
            {"chosen": head + "  ", "rejected": head + " You fool."},
            {"chosen": head + " a", "rejected": "\n\nHuman: other\n\nAssistant: b"}]
    path = tmp_path / "hh.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    pairs = load_pairs("hh.jsonl", tmp_path)
    assert [(p.prompt, p.chosen, p.rejected, p.where) for p in pairs] == [
        (head, " I'd rather not.", " You fool.", "hh.jsonl:1")]
    assert pairs.skipped == {"identical": ["hh.jsonl:2"], "empty": ["hh.jsonl:3"], "prompt_mismatch": ["hh.jsonl:4"]}


def test_pairs_with_a_prompt_field_from_jsonl_and_csv(tmp_path):
    (tmp_path / "p.jsonl").write_text(json.dumps({"prompt": "Q", "chosen": " a", "rejected": " b"}) + "\n")
    assert load_pairs("p.jsonl", tmp_path)[0] == PreferencePair("Q", " a", " b", "p.jsonl:1")  # found by name
    (tmp_path / "p.csv").write_text('question,good,bad\n"two\nlines",yes,no\n')
    pairs = load_pairs("p.csv", tmp_path, prompt_field="question", chosen_field="good", rejected_field="bad")
    assert pairs == [PreferencePair("two\nlines", "yes", "no", "p.csv:2")]


@pytest.mark.parametrize("record, kwargs, message", [
    ({"prompt": "q", "chosen": "a", "rejectd": "b"}, {},
     r"p.jsonl:1: preference field 'rejected' missing \(fields found: prompt, chosen, rejectd\) "
     r"\(did you mean 'rejectd'"),
    ({"question": "q", "chosen": "a", "rejected": "b"}, {"prompt_field": "query"},
     r"p.jsonl:1: preference field 'query' missing \(fields found: question, chosen, rejected\)"),
    ({"chosen": "just text", "rejected": "other text"}, {}, "no prompt field.*set prompt_field"),
    ({"prompt": "q", "chosen": [{"role": "assistant"}], "rejected": "b"}, {}, "field 'chosen' must be text"),
    ({"prompt": "q", "chosen": "same", "rejected": "same"}, {},
     r"no usable preference pairs among 1 records \(1 identical\)"),
])
def test_bad_preference_data_is_refused_naming_the_record(tmp_path, record, kwargs, message):
    (tmp_path / "p.jsonl").write_text(json.dumps(record) + "\n")
    with pytest.raises(UserError, match=message):
        load_pairs("p.jsonl", tmp_path, **kwargs)


@pytest.mark.data
def test_real_hh_rlhf_file_loads():
    path = SHARED / "hh-rlhf" / "harmless-base.test.part-a.jsonl"
    if not path.exists():
        pytest.skip(f"{path} is absent (the shared data folder is not next to this checkout)")
    pairs = load_pairs(str(path), Path("."))
    assert len(pairs) == 1152 and {k: len(v) for k, v in pairs.skipped.items()} == {"empty": 4}
    first = pairs[0]
    assert first.prompt.startswith("\n\nHuman: what are some pranks with a pen")
    assert first.prompt.endswith("\n\nAssistant:") and first.where.endswith(".jsonl:1")
    assert all(p.chosen.strip() and p.rejected.strip() and p.chosen != p.rejected for p in pairs)
    assert all("\n\nAssistant:" not in p.chosen for p in pairs)  # the prompt took every earlier turn


# ----------------------------------------------------------------------------------- training
@pytest.mark.parametrize("arch, tuning, backend", [
    ("t5", "lora", "auto"), ("t5", "full", "auto"), ("gpt2", "lora", "auto"), ("gpt2", "full", "auto"),
    ("gpt2", "lora", "llmcycle")])
def test_dpo_widens_the_margin_against_the_untouched_start(bases, tmp_path, arch, tuning, backend):
    kind = KIND[arch]
    pol, tok = policy(bases, arch, tuning)
    frozen = base_state(pol)
    pairs = synthetic_pairs()
    s = train_preference("dpo", pol, tok, kind, pairs, tmp_path / "model", beta=0.1, lr=1e-2, batch_size=4,
                         max_steps=12, log_every=4, progress=False, backend=backend)
    assert s["backend"] == ("llmcycle" if arch == "t5" or backend == "llmcycle" else "trl")
    assert s["before"]["reward_margin"] == 0 and s["loss_before"] == pytest.approx(math.log(2))
    assert s["reward_margin"] > 0.005 and s["reward_accuracy"] >= 0.9 and s["loss_after"] < s["loss_before"]
    assert s["train_loss_last"] < s["train_loss_first"] and s["steps"] == 12 and s["pairs"] == 24

    # The reference is the starting model: a freshly loaded base gives the rewards the summary reports
    fresh, _ = load_model(str(bases[arch]), dtype="float32", device="cpu")
    features, _ = encode_pairs(pairs, tok, kind, 128, 128)
    cpu = torch.device("cpu")
    ref_c, _ = all_logps(fresh, features, kind, tok.pad_token_id, 8, cpu)
    now_c, _ = all_logps(pol, features, kind, tok.pad_token_id, 8, cpu)
    assert s["chosen_reward"] == pytest.approx(float(0.1 * (now_c - ref_c).mean()), abs=1e-4)
    if tuning == "lora":  # ... which is the adapter-disabled model, its base weights untouched
        assert all(torch.equal(v, pol.state_dict()[k]) for k, v in frozen.items())
        with pol.disable_adapter():
            off_c, _ = all_logps(pol, features, kind, tok.pad_token_id, 8, cpu)
        assert torch.allclose(off_c, ref_c, atol=1e-4)
        assert list(pol.peft_config) == ["default"] and not (tmp_path / "model" / "ref").exists()
    else:
        assert any(not torch.equal(v, pol.state_dict()[k]) for k, v in frozen.items())
    loaded, _ = load_model(tmp_path / "model", dtype="float32", device="cpu")
    again_c, _ = all_logps(loaded, features, kind, tok.pad_token_id, 8, cpu)
    assert torch.allclose(again_c, now_c, atol=1e-4)  # what was saved is what was trained


@pytest.mark.parametrize("arch", ["t5", "gpt2"])
def test_orpo_through_trl_prefers_the_chosen_responses(bases, arch):
    pol, tok = policy(bases, arch)
    s = train_preference("orpo", pol, tok, KIND[arch], synthetic_pairs(), None, beta=0.1, lr=1e-2,
                         batch_size=4, max_steps=12, log_every=4, progress=False)
    assert s["backend"] == "trl" and s["train_loss_last"] < s["train_loss_first"]
    gap = {t: s[t]["chosen_logp"] - s[t]["rejected_logp"] for t in ("before", "after")}
    assert gap["after"] > gap["before"] and s["reward_margin"] > 0 and "model_dir" not in s


def test_logs_reach_the_callback_and_eval_pairs_are_measured(bases):
    pol, tok = policy(bases, "t5")
    rows = []
    s = train_preference("dpo", pol, tok, "seq2seq", synthetic_pairs(12), None, lr=1e-2, batch_size=4, epochs=2,
                         log_every=2, progress=False, log=rows.append, eval_pairs=synthetic_pairs(30)[24:])
    assert s["steps"] == 6 and s["epochs_done"] == 2 and [r["step"] for r in rows] == [2, 4, 6]
    assert s["measured_on"] == "eval" and s["measured_pairs"] == 6


# ---------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("method, arch, kwargs, message", [
    ("dpo", "t5", {"pairs": []}, "no preference pairs"),
    ("dpo", "t5", {"batch_size": 0}, "batch_size must be at least 1, not 0"),
    ("dpo", "t5", {"tokenizer": None}, "the policy has no tokenizer"),
    ("dop", "t5", {}, "unknown method 'dop' \\(did you mean 'dpo'"),
    ("dpo", "t5", {"backend": "trl"}, "DPOTrainer supports causal models only"),
    ("orpo", "t5", {"backend": "llmcycle"}, "orpo is trained by TRL's ORPOTrainer only"),
    ("dpo", "gpt2", {"label_smoothing": 0.1}, "label_smoothing is part of llmcycle's own DPO"),
    ("dpo", "t5", {"max_steps": None}, "set epochs or max_steps"),
    ("dpo", "t5", {"max_length": 2}, "all 4 pairs are longer than max_length 2"),
])
def test_bad_training_input_is_refused_before_any_step(bases, method, arch, kwargs, message):
    pol, tok = policy(bases, arch)
    before = {k: v.clone() for k, v in pol.state_dict().items()}
    args = {"tokenizer": tok, "pairs": synthetic_pairs(4), "max_steps": 2, **kwargs}
    tokenizer, pairs = args.pop("tokenizer"), args.pop("pairs")
    with pytest.raises(UserError, match=message):
        train_preference(method, pol, tokenizer, KIND[arch], pairs, None, progress=False, **args)
    assert all(torch.equal(v, pol.state_dict()[k]) for k, v in before.items())


def test_missing_trl_is_refused_with_the_install_command(bases, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "trl" else real(name, *a))
    pol, tok = policy(bases, "gpt2")
    with pytest.raises(UserError, match=r"pip install 'llmcycle\[align\]'"):
        train_preference("dpo", pol, tok, "causal", synthetic_pairs(4), None, max_steps=1, progress=False)
    s = train_preference("dpo", pol, tok, "causal", synthetic_pairs(4), None, max_steps=1, progress=False,
                         backend="llmcycle")  # our own loop needs no TRL
    assert s["backend"] == "llmcycle" and s["steps"] == 1
