"""Preference optimization (llmcycle/stages/align/preference.py): the DPO loss and sequence log-probs by hand, pair
loading (HH-RLHF transcripts split into turns, prompt / messages records, TRL's conversational responses),
prompts encoded through tiny chat models' templates and TRL training on those very ids, DPO (ours on T5,
TRL's on GPT-2) and ORPO (TRL's) learning on tiny models with the reference being the untouched starting
model, and bad input."""
import json
import math
from pathlib import Path

import pytest
import torch

from llmcycle.core.errors import UserError
from llmcycle.models.load import load_model
from llmcycle.models.generation import target_end_id
from llmcycle.stages.align.preference import (PreferencePair, all_logps, dpo_loss, encode_pairs, exchange_text,
                                              load_pairs, pair_logps, transcript_turns, train_preference)
from llmcycle.training.finetune import TuneConfig, wrap
from tiny import make_chat_model, make_gpt2, make_t5

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
    features, _ = encode_pairs(pairs, tok, kind, 128, 128, target_end_id(model, tok, kind)[0])
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
    tok.chat_template = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}"
                         "{% if add_generation_prompt %}<assistant>{% endif %}")
    pairs = [PreferencePair("hi", " yes", " no", "a"), PreferencePair("hi " * 40, " yes", " no", "b"),
             PreferencePair("hi", " yes" * 30, " no", "c")]
    features, overlong = encode_pairs(pairs, tok, "causal", max_length=40, max_prompt_length=30,
                                      end_id=tok.eos_token_id)
    assert features[0]["prompt_ids"] == encode_prompt(tok, "hi", "causal") == tok("<user>hi<assistant>")["input_ids"]
    # the template closes no turn with a special token, so the model's eos ends the response
    assert features[0]["rejected_ids"] == tok(" no")["input_ids"] + [tok.eos_token_id]
    assert len(features) == 1 and overlong == {"over_max_prompt_length": ["b"], "over_max_length": ["c"]}


# --------------------------------------------------------------------------------------- data
HEAD = "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: insult me\n\nAssistant:"
HEAD_TURNS = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
              {"role": "user", "content": "insult me"}]


def write_jsonl(path: Path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path.name


def test_hh_transcripts_become_turns_without_the_markers_spaces(tmp_path):
    assert transcript_turns(HEAD + " I'd rather not.") == HEAD_TURNS + [
        {"role": "assistant", "content": "I'd rather not."}]
    # two Assistant turns in a row (a few HH-RLHF transcripts): merged, as chat templates need alternation
    assert transcript_turns("\n\nHuman: a\n\nAssistant: b\n\nAssistant: c\n\nHuman: d\n\nAssistant: e") == [
        {"role": "user", "content": "a"}, {"role": "assistant", "content": "b\n\nc"},
        {"role": "user", "content": "d"}, {"role": "assistant", "content": "e"}]
    rows = [{"chosen": HEAD + " I'd rather not.", "rejected": HEAD + " You fool."},
            {"chosen": HEAD + " same", "rejected": HEAD + " same"},
            {"chosen": HEAD + "  ", "rejected": HEAD + " You fool."},
            {"chosen": HEAD + " a", "rejected": "\n\nHuman: other\n\nAssistant: b"}]
    pairs = load_pairs(write_jsonl(tmp_path / "hh.jsonl", rows), tmp_path)
    assert [(p.chosen, p.rejected, p.where) for p in pairs] == [("I'd rather not.", "You fool.", "hh.jsonl:1")]
    assert list(pairs[0].prompt.messages) == HEAD_TURNS  # no system prompt given: none added
    # without a chat template the prompt reads as the transcript did, ending with the cue the response follows
    assert str(pairs[0].prompt) == "Human: hi\nAssistant: hello\nHuman: insult me\nAssistant:"
    assert pairs.skipped == {"identical": ["hh.jsonl:2"], "empty": ["hh.jsonl:3"], "prompt_mismatch": ["hh.jsonl:4"]}
    assert pairs.records == 4
    with_system = load_pairs("hh.jsonl", tmp_path, system="Be kind.")[0].prompt
    assert list(with_system.messages) == [{"role": "system", "content": "Be kind."}] + HEAD_TURNS
    assert str(with_system).startswith("Be kind.\n\nHuman: hi\n")


def test_messages_and_prompt_records_and_conversational_responses(tmp_path):
    rows = [{"messages": [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "hi"},
                          {"role": "assistant", "content": "hello"}, {"role": "user", "content": "name a colour"}],
             "chosen": [{"role": "assistant", "content": "red"}], "rejected": {"role": "assistant", "content": "no"}},
            {"prompt": "name a colour", "chosen": "blue", "rejected": [{"role": "assistant", "content": "no"}]},
            {"prompt": [{"role": "user", "content": "name a colour"}], "chosen": "green", "rejected": "no"}]
    pairs = load_pairs(write_jsonl(tmp_path / "p.jsonl", rows), tmp_path, system="Be kind.")
    assert [(p.chosen, p.rejected) for p in pairs] == [("red", "no"), ("blue", "no"), ("green", "no")]
    own, plain, listed = (p.prompt for p in pairs)
    # the record's own system turn wins over the project's; the last user turn is the query
    assert list(own.messages) == rows[0]["messages"]
    assert str(own) == "Be terse.\n\nUser: hi\nAssistant: hello\n\n\nname a colour"  # prompting.assemble's flat form
    assert list(plain.messages) == list(listed.messages) == [
        {"role": "system", "content": "Be kind."}, {"role": "user", "content": "name a colour"}]
    assert str(plain) == "Be kind.\n\nname a colour"
    assert exchange_text(pairs[0], "red") == f"{own} red"  # a reward model reads prompt and response as one text
    assert exchange_text(PreferencePair("Q", " a", ""), " a") == "Q a"


def test_pairs_with_a_prompt_field_from_jsonl_and_csv(tmp_path):
    (tmp_path / "p.jsonl").write_text(json.dumps({"prompt": "Q", "chosen": " a", "rejected": " b"}) + "\n")
    assert load_pairs("p.jsonl", tmp_path)[0] == PreferencePair("Q", " a", " b", "p.jsonl:1")  # found by name
    (tmp_path / "p.csv").write_text('question,good,bad\n"two\nlines",yes,no\n')
    pairs = load_pairs("p.csv", tmp_path, prompt_field="question", chosen_field="good", rejected_field="bad")
    assert pairs == [PreferencePair("two\nlines", "yes", "no", "p.csv:2")]


USER = {"role": "user", "content": "q"}


@pytest.mark.parametrize("record, kwargs, message", [
    ({"prompt": "q", "chosen": "a", "rejectd": "b"}, {},
     r"p.jsonl:1: preference field 'rejected' missing \(fields found: prompt, chosen, rejectd\) "
     r"\(did you mean 'rejectd'"),
    ({"question": "q", "chosen": "a", "rejected": "b"}, {"prompt_field": "query"},
     r"p.jsonl:1: preference field 'query' missing \(fields found: question, chosen, rejected\)"),
    ({"chosen": "just text", "rejected": "other text"}, {}, r"p.jsonl:1: no prompt field.*set prompt_field"),
    ({"prompt": "q", "chosen": [{"role": "assistant"}], "rejected": "b"}, {},
     r"p.jsonl:1: field 'chosen' must be text or one assistant message"),
    ({"prompt": "q", "chosen": [{"role": "user", "content": "a"}], "rejected": "b"}, {},
     r"p.jsonl:1: field 'chosen' must be text or one assistant message"),
    ({"messages": [USER, {"role": "assistant", "content": "a"}], "chosen": "a", "rejected": "b"}, {},
     r"p.jsonl:1: 'messages' must end with a user turn .* not a assistant turn"),
    ({"messages": [USER, {"role": "system", "content": "s"}, USER], "chosen": "a", "rejected": "b"}, {},
     r"p.jsonl:1: turn 1 of 'messages' is a system turn; one may only open the conversation"),
    ({"messages": [{"role": "bot", "content": "q"}], "chosen": "a", "rejected": "b"}, {},
     r"p.jsonl:1: turn 0 of 'messages' must be \{\"role\": system\|user\|assistant"),
    ({"messages": [], "chosen": "a", "rejected": "b"}, {}, r"p.jsonl:1: field 'messages' must be text or a non-empty"),
    ({"chosen": "hello\n\nHuman: q\n\nAssistant: a", "rejected": "\n\nHuman: q\n\nAssistant: b"}, {},
     r"p.jsonl:1: 'chosen' has text before its first Human/Assistant turn \('hello'\)"),
    ({"chosen": "\n\nAssistant: a\n\nHuman: q", "rejected": "\n\nHuman: q\n\nAssistant: b"}, {},
     r"p.jsonl:1: the transcript in 'chosen' must start with a Human turn .*\(its turns: assistant, user\)"),
    ({"prompt": "q", "chosen": "same", "rejected": "same"}, {},
     r"no usable preference pairs among 1 records \(1 identical\)"),
])
def test_bad_preference_data_is_refused_naming_the_record(tmp_path, record, kwargs, message):
    (tmp_path / "p.jsonl").write_text(json.dumps(record) + "\n")
    with pytest.raises(UserError, match=message) as err:
        load_pairs("p.jsonl", tmp_path, **kwargs)
    assert "\n" not in str(err.value).replace("\\n", "")  # one line (the markers are shown escaped)


# ------------------------------------------------------------------------------ chat templates
@pytest.fixture(scope="module")
def chat_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("chat")
    return {(style, base): make_chat_model(root / f"{style}-{base}", style, base_release=base)
            for style in ("llama3", "chatml") for base in (False, True)}


@pytest.mark.parametrize("base_release", [False, True])
@pytest.mark.parametrize("style, end", [("llama3", "<|eot_id|>"), ("chatml", "<|im_end|>")])
def test_chat_models_read_the_pairs_turns_through_their_template(tmp_path, chat_models, style, end, base_release):
    model, tok = load_model(str(chat_models[style, base_release]), dtype="float32", device="cpu")
    assert base_release == (tok.eos_token != end)  # a base release's eos is the end of text, not the turn's end
    rows = [{"chosen": HEAD + " I'd rather not.", "rejected": HEAD + " You fool."},
            {"messages": [{"role": "system", "content": "Be terse."}, *HEAD_TURNS], "chosen": "No.", "rejected": "Ok."}]
    pairs = load_pairs(write_jsonl(tmp_path / "p.jsonl", rows), tmp_path, system="Be kind.")
    end_id = target_end_id(model, tok, "causal")[0]
    assert end_id == tok.convert_tokens_to_ids(end)
    features, overlong = encode_pairs(pairs, tok, "causal", 256, 256, end_id)
    assert not overlong
    for pair, f, system in zip(pairs, features, ("Be kind.", "Be terse.")):
        turns = [{"role": "system", "content": system}] + HEAD_TURNS
        assert f["prompt_ids"] == tok.apply_chat_template(turns, add_generation_prompt=True)["input_ids"]
        for key, response in (("chosen_ids", pair.chosen), ("rejected_ids", pair.rejected)):
            whole = tok.apply_chat_template(turns + [{"role": "assistant", "content": response}])["input_ids"]
            assert f[key][-1] == end_id and whole[:len(f["prompt_ids"]) + len(f[key])] == f["prompt_ids"] + f[key]


@pytest.mark.parametrize("arch", ["t5", "gpt2"])
def test_models_without_a_chat_template_read_the_transcript_as_flat_text(tmp_path, bases, arch):
    model, tok = load_model(str(bases[arch]), dtype="float32", device="cpu")
    pairs = load_pairs(write_jsonl(tmp_path / "hh.jsonl", [{"chosen": HEAD + " no.", "rejected": HEAD + " fool."}]),
                       tmp_path)
    features, _ = encode_pairs(pairs, tok, KIND[arch], 256, 256, target_end_id(model, tok, KIND[arch])[0])
    assert features[0]["prompt_ids"] == tok("Human: hi\nAssistant: hello\nHuman: insult me\nAssistant:")["input_ids"]
    assert features[0]["chosen_ids"] == tok("no.", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]


def test_trl_trains_on_the_ids_our_loop_uses(tmp_path, chat_models, monkeypatch):
    """TRL's DPOTrainer and ORPOTrainer get our pre-tokenized ids: the batch each one builds for a pair is
    the chat-templated prompt followed by the response ending with <|eot_id|>, its log-prob labels on the
    response only (the model is a base release, whose tokenizer eos is <|end_of_text|>)."""
    import warnings

    import trl

    with warnings.catch_warnings():  # "trl.experimental is unstable": known, it is what align uses for ORPO
        warnings.simplefilter("ignore")
        from trl.experimental.orpo import ORPOTrainer

    seen = {}

    def spy(cls, name, pick):
        original = getattr(cls, name)

        def wrapped(self, model, inputs, *args, **kw):
            seen.setdefault(cls.__name__, pick(inputs))
            return original(self, model, inputs, *args, **kw)
        monkeypatch.setattr(cls, name, wrapped)

    def rows(ids, mask, scored):  # per row: the unpadded ids and the ids scored
        return [([t for t, m in zip(i, a) if m], [t for t, s in zip(i, c) if s]) for i, a, c in zip(ids, mask, scored)]
    spy(trl.DPOTrainer, "compute_loss", lambda b: rows(b["input_ids"].tolist(), b["attention_mask"].tolist(),
                                                       b["completion_mask"].tolist()))
    spy(ORPOTrainer, "get_batch_loss_metrics", lambda b: rows(
        b["chosen_input_ids"].tolist() + b["rejected_input_ids"].tolist(),
        b["chosen_attention_mask"].tolist() + b["rejected_attention_mask"].tolist(),
        [[lab != -100 for lab in row] for row in b["chosen_labels"].tolist() + b["rejected_labels"].tolist()]))
    pairs = load_pairs(write_jsonl(tmp_path / "hh.jsonl", [{"chosen": HEAD + " no.", "rejected": HEAD + " fool."}]),
                       tmp_path)
    for method in ("dpo", "orpo"):
        model, tok = load_model(str(chat_models["llama3", True]), dtype="float32", device="cpu")
        pol = wrap(TuneConfig(method="lora", r=4, alpha=8, dropout=0.0, max_steps=1), model, "causal")
        s = train_preference(method, pol, tok, "causal", pairs, None, batch_size=1, max_steps=1, progress=False)
        assert s["backend"] == "trl"
    features, _ = encode_pairs(pairs, tok, "causal", 256, 256, tok.convert_tokens_to_ids("<|eot_id|>"))
    f = features[0]
    expected = [(f["prompt_ids"] + f[key], f[key]) for key in ("chosen_ids", "rejected_ids")]
    assert seen == {"DPOTrainer": expected, "ORPOTrainer": expected}


@pytest.mark.data
def test_real_hh_rlhf_file_loads():
    path = SHARED / "hh-rlhf" / "harmless-base.test.part-a.jsonl"
    if not path.exists():
        pytest.skip(f"{path} is absent (the shared data folder is not next to this checkout)")
    pairs = load_pairs(str(path), Path("."))
    assert len(pairs) == 1152 and {k: len(v) for k, v in pairs.skipped.items()} == {"empty": 4}
    first = pairs[0]
    assert first.prompt.messages[0] == {"role": "user", "content": "what are some pranks with a pen i can do?"}
    assert str(first.prompt).startswith("Human: what are some pranks with a pen i can do?\nAssistant: ")
    assert first.prompt.endswith("\nAssistant:") and first.where.endswith(".jsonl:1")
    assert all(p.chosen.strip() and p.rejected.strip() and p.chosen != p.rejected for p in pairs)
    for p in pairs[:40]:  # every earlier turn went into the prompt's turns, none into its last user turn
        roles = [m["role"] for m in p.prompt.messages]
        assert roles[-1] == "user" and all(a != b for a, b in zip(roles, roles[1:])), p.where
        assert "Assistant:" not in p.prompt.messages[-1]["content"], p.where
        assert not p.chosen[0].isspace() and not p.rejected[0].isspace(), p.where


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
    features, _ = encode_pairs(pairs, tok, kind, 128, 128, target_end_id(fresh, tok, kind)[0])
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
