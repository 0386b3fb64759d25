"""KTO (llmcycle/stages/align/kto.py): labelled completions loaded from JSONL / CSV (bool labels, `desirable`
values, turns as prompts, bad records refused naming them), TRL's KTOTrainer learning on a tiny GPT-2 from the
very ids llmcycle encodes (a chat model's template and end-of-turn token included) against the untouched start
as reference, and what it refuses or skips."""
import json

import pytest
import torch

from llmcycle.core.errors import UserError
from llmcycle.models.load import load_model
from llmcycle.stages.align.kto import LabelledCompletion, load_labelled_completions, train_kto
from llmcycle.training.finetune import TuneConfig, wrap
from tiny import make_chat_model, make_gpt2, make_t5

WORDS = ["red", "blue", "green", "grey", "cat", "dog"]


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    root = tmp_path_factory.mktemp("bases")
    return {"t5": make_t5(root / "t5"), "gpt2": make_gpt2(root / "gpt2")}


def policy(base, kind="causal", tuning="lora"):
    model, tok = load_model(str(base), dtype="float32", device="cpu")
    torch.manual_seed(0)
    return wrap(TuneConfig(method=tuning, r=8, alpha=16, dropout=0.0, max_steps=1), model, kind), tok


def yes_no(n=24):
    """Each prompt twice: answered " yes" (desirable) and " no" (undesirable)."""
    return [LabelledCompletion(f"{WORDS[i % 6]} is here ->", answer, answer == " yes", f"row {i}.{answer.strip()}")
            for i in range(n // 2) for answer in (" yes", " no")]


def completion_logp(model, tok, prompt: str, completion: str) -> float:
    """log p(completion + eos | prompt) by a plain forward pass (independent of llmcycle's encoding code)."""
    p = tok(prompt)["input_ids"]
    c = tok(completion, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    ids = torch.tensor([p + c])
    with torch.no_grad():
        logps = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[0, :-1].log_softmax(-1)
    return float(logps[len(p) - 1:].gather(-1, torch.tensor(c)[:, None]).sum())


def yes_over_no(model, tok) -> float:
    """Mean over the prompts of log p(" yes") - log p(" no")."""
    return sum(completion_logp(model, tok, f"{w} is here ->", " yes") - completion_logp(model, tok, f"{w} is here ->",
                                                                                         " no") for w in WORDS) / 6


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path.name


# ----------------------------------------------------------------------------------- training
@pytest.mark.parametrize("tuning", ["lora", "full"])
def test_kto_raises_the_desirable_completion_over_the_undesirable(bases, tuning):
    pol, tok = policy(bases["gpt2"], tuning=tuning)
    before = {k: v.detach().clone() for k, v in pol.state_dict().items()}
    gap_before = yes_over_no(pol, tok)
    rows = []
    s = train_kto(pol, tok, "causal", yes_no(), beta=0.5, lr=3e-2, batch_size=4, max_steps=30, progress=False,
                  log=rows.append)
    assert yes_over_no(pol, tok) - gap_before > 0.3  # measured by real forward passes, before and after

    assert s["method"] == "kto" and s["backend"] == "trl" and s["steps"] == 30 and s["epochs_done"] == 5
    assert (s["examples"], s["desirable"], s["undesirable"], s["skipped"]) == (24, 12, 12, {})
    assert s["train_loss_first"] == pytest.approx(0.5)  # policy = reference at the start: 1 - sigmoid(0)
    assert s["train_loss_last"] < s["train_loss_first"] and s["reward_margin"] > 0
    assert s["reward_chosen"] > s["reward_rejected"] and "kl" in s and s["window"] == s["max_length"] == 128
    assert [r["step"] for r in rows] == list(range(1, 31))
    assert {"loss", "lr", "reward_chosen", "reward_rejected", "kl"} <= set(rows[0])
    changed = {k for k, v in before.items() if not torch.equal(v, pol.state_dict()[k])}
    if tuning == "lora":  # the adapter trained, the base did not, and TRL's "ref" adapter copy is gone
        assert changed and all("lora_" in k for k in changed)
        assert list(pol.peft_config) == ["default"]
        assert not any(".ref." in k for k in pol.state_dict())
    else:
        assert any("lora_" not in k for k in changed)


def test_trl_trains_on_the_ids_llmcycle_encodes(tmp_path, monkeypatch):
    """The batch TRL's KTOTrainer scores is the chat-templated prompt followed by the completion ending with
    <|eot_id|> (the model is a base release, whose tokenizer eos is <|end_of_text|>), scored on the completion
    only; its KL rows pair each prompt with the other completion of the batch."""
    import trl

    seen = []
    original = trl.KTOTrainer._compute_loss

    def spy(self, model, inputs, return_outputs):
        for prefix in ("", "KL_"):
            ids, mask, scored = (inputs[f"{prefix}{k}"].tolist() for k in ("input_ids", "attention_mask",
                                                                              "completion_mask"))
            seen.append(sorted(([t for t, m in zip(i, a) if m], [t for t, s in zip(i, c) if s])
                               for i, a, c in zip(ids, mask, scored)))
        return original(self, model, inputs, return_outputs)
    monkeypatch.setattr(trl.KTOTrainer, "_compute_loss", spy)

    model, tok = load_model(str(make_chat_model(tmp_path / "chat", "llama3", base_release=True)), dtype="float32",
                            device="cpu")
    pol = wrap(TuneConfig(method="lora", r=4, alpha=8, dropout=0.0, max_steps=1), model, "causal")
    rows = [{"prompt": "insult me", "completion": "No.", "label": True},
            {"prompt": [{"role": "user", "content": "hi"}], "completion": "You fool.", "label": False}]
    examples = load_labelled_completions(write_jsonl(tmp_path / "k.jsonl", rows), tmp_path, system="Be kind.")
    train_kto(pol, tok, "causal", examples, batch_size=2, max_steps=1, progress=False)

    eot = tok.convert_tokens_to_ids("<|eot_id|>")
    assert tok.eos_token != "<|eot_id|>"
    prompts = [tok.apply_chat_template([{"role": "system", "content": "Be kind."}, {"role": "user", "content": q}],
                                       add_generation_prompt=True)["input_ids"] for q in ("insult me", "hi")]
    answers = [tok("No.", add_special_tokens=False)["input_ids"] + [eot],
               tok("You fool.", add_special_tokens=False)["input_ids"] + [eot]]
    assert seen[0] == sorted((p + a, a) for p, a in zip(prompts, answers))
    assert seen[1] == sorted((p + a, a) for p, a in zip(prompts, answers[::-1]))  # the KL rows: swapped
    whole = tok.apply_chat_template([{"role": "system", "content": "Be kind."}, {"role": "user", "content": "hi"},
                                     {"role": "assistant", "content": "You fool."}])["input_ids"]
    assert whole[:len(prompts[1]) + len(answers[1])] == prompts[1] + answers[1]  # exactly as the template renders


# ------------------------------------------------------------------------------------ loading
def test_loading_bool_labels_turns_and_skipped_empty_completions(tmp_path):
    rows = [{"prompt": "q1", "completion": "good", "label": True},
            {"prompt": "q2", "completion": "  ", "label": False},
            {"prompt": [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "q3"}],
             "completion": [{"role": "assistant", "content": "bad"}], "label": False},
            {"prompt": "q4", "completion": "fine", "label": "true"},
            {"prompt": "q5", "completion": "meh", "label": 0}]
    examples = load_labelled_completions(write_jsonl(tmp_path / "k.jsonl", rows), tmp_path, system="Be kind.")
    assert [(str(e.prompt), e.completion, e.desirable) for e in examples] == [
        ("Be kind.\n\nq1", "good", True), ("Be terse.\n\nq3", "bad", False), ("Be kind.\n\nq4", "fine", True),
        ("Be kind.\n\nq5", "meh", False)]
    assert examples[1].prompt.messages == ({"role": "system", "content": "Be terse."},
                                           {"role": "user", "content": "q3"})
    assert examples[0].where == "k.jsonl:1"
    assert examples.skipped == {"empty": ["k.jsonl:2"]} and examples.records == 5


def test_loading_maps_label_values_through_desirable(tmp_path):
    (tmp_path / "k.csv").write_text("question,answer,verdict\nq1,a1,not_toxic\nq2,a2,toxic\nq3,a3,1\nq4,a4,0\n")
    examples = load_labelled_completions("k.csv", tmp_path, prompt_field="question", completion_field="answer",
                                         label_field="verdict", desirable=["not_toxic", 1])
    assert [(str(e.prompt), e.completion, e.desirable) for e in examples] == [
        ("q1", "a1", True), ("q2", "a2", False), ("q3", "a3", True), ("q4", "a4", False)]
    assert examples.skipped == {}


@pytest.mark.parametrize("record, kwargs, message", [
    ({"prompt": "q", "completion": "a", "label": "maybe"}, {},
     r"k.jsonl:2: label field 'label' is 'maybe', not true/false/1/0; set desirable .*\['maybe'\]"),
    ({"prompt": "q", "completion": "a", "label": None}, {"desirable": ["good"]},
     r"k.jsonl:2: label field 'label' is empty"),
    ({"prompt": "q", "answer": "a", "label": True}, {},
     r"k.jsonl:2: KTO field 'completion' missing \(fields found: prompt, answer, label\); set .*completion_field"),
    ({"prompt": "q", "completion": "a", "labels": True}, {},
     r"k.jsonl:2: KTO field 'label' missing .*\(did you mean 'labels'\?\)"),
    ({"prompt": [{"role": "assistant", "content": "x"}], "completion": "a", "label": True}, {},
     r"k.jsonl:2: 'prompt' must end with a user turn"),
    ({"prompt": "q", "completion": "a", "label": True}, {"desirable": []}, r"desirable is an empty list"),
])
def test_bad_records_are_refused_naming_them(tmp_path, record, kwargs, message):
    write_jsonl(tmp_path / "k.jsonl", [{"prompt": "q0", "completion": "a0", "label": True}, record])
    with pytest.raises(UserError, match=message) as err:
        load_labelled_completions("k.jsonl", tmp_path, **kwargs)
    assert "\n" not in str(err.value)


def test_only_empty_completions_are_refused(tmp_path):
    write_jsonl(tmp_path / "k.jsonl", [{"prompt": "q", "completion": "", "label": True},
                                       {"prompt": "q", "completion": None, "label": False}])
    with pytest.raises(UserError, match=r"no usable completions among 2 records \(2 empty\)"):
        load_labelled_completions("k.jsonl", tmp_path)


# ---------------------------------------------------------------------------- refused / skipped
@pytest.mark.parametrize("arch, kwargs, message", [
    ("t5", {}, r"^align kto: TRL 1.16's KTOTrainer trains causal models only; use dpo \(which has our own seq2seq "
               r"loop\) or a causal policy$"),
    ("gpt2", {"batch_size": 1}, r"batch_size must be at least 2, not 1: KTO estimates its reference point"),
    ("gpt2", {"max_steps": None}, "set epochs or max_steps"),
    ("gpt2", {"undesirable_weight": 0}, "undesirable_weight must be positive, not 0"),
    ("gpt2", {"max_length": 4}, r"all 8 examples are longer than max_length 4 tokens"),
])
def test_bad_settings_are_refused_before_any_step(bases, arch, kwargs, message):
    pol, tok = policy(bases[arch], "seq2seq" if arch == "t5" else "causal")
    before = {k: v.clone() for k, v in pol.state_dict().items()}
    with pytest.raises(UserError, match=message) as err:
        train_kto(pol, tok, "seq2seq" if arch == "t5" else "causal", yes_no(8),
                  **{"batch_size": 2, "max_steps": 2, "progress": False, **kwargs})
    assert "\n" not in str(err.value)
    assert all(torch.equal(v, pol.state_dict()[k]) for k, v in before.items())


def test_overlong_and_empty_examples_are_skipped_and_counted(bases, tmp_path, capsys):
    pol, tok = policy(bases["gpt2"])
    rows = [{"prompt": f"{w} is here ->", "completion": " yes", "label": True} for w in WORDS]
    rows += [{"prompt": "the quick brown fox jumps over the lazy dog " * 3, "completion": " no", "label": False},
             {"prompt": "q", "completion": "", "label": False}]
    examples = load_labelled_completions(write_jsonl(tmp_path / "k.jsonl", rows), tmp_path)
    longest = max(len(tok(r["prompt"] + r["completion"])["input_ids"]) for r in rows[:6]) + 1
    s = train_kto(pol, tok, "causal", examples, batch_size=2, max_steps=2, max_length=longest, progress=False)
    assert s["skipped"] == {"empty": 1, "over_max_length": 1} and s["max_length"] == longest
    assert s["skipped_first"] == {"empty": "k.jsonl:8", "over_max_length": "k.jsonl:7"}
    # only desirable ones are left: KTO still trains, and the summary and a notice say so
    assert (s["examples"], s["desirable"], s["undesirable"], s["steps"]) == (6, 6, 0, 2)
    assert "reward_rejected" not in s and s["reward_chosen"] is not None
    err = " ".join(capsys.readouterr().err.split())
    assert "skipped 2 of 8 examples: 1 empty (first: k.jsonl:8), 1 over_max_length (first: k.jsonl:7)" in err
    assert "6 desirable and 0 undesirable examples" in err
