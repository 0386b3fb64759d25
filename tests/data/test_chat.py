"""Conversations as data: messages records, prompts as turns, training ids equal to the chat template's,
and answers that end with the token the model stops on."""
import json

import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer

from llmcycle.core.errors import UserError
from llmcycle.data.encoding import IGNORE, encode_answer, encode_conversation, end_of_turn_id
from llmcycle.data.prompting import build_prompt, encode_prompt, fit_prompts, renders_template
from llmcycle.data.records import DataConfig, Example, assistant_turns, load_splits
from llmcycle.models.generation import Generator, GenerationConfig, stop_ids, target_end_id
from tiny import make_chat_model, make_t5

CONVERSATION = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hello there"},
                {"role": "assistant", "content": " hi you"}, {"role": "user", "content": "two plus two?"},
                {"role": "assistant", "content": "four"}]
EOT = {"llama3": "<|eot_id|>", "chatml": "<|im_end|>"}


@pytest.fixture(scope="module", params=[("llama3", False), ("llama3", True), ("chatml", False), ("chatml", True)],
                ids=["llama3", "llama3-base", "chatml", "chatml-base"])
def chat_model(request, tmp_path_factory):
    style, base = request.param
    path = make_chat_model(tmp_path_factory.mktemp(style), style, base_release=base)
    return style, base, AutoTokenizer.from_pretrained(path), AutoModelForCausalLM.from_pretrained(path)


def template_ids(tok, messages, generation_prompt=False) -> list[int]:
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
    return tok(text, add_special_tokens=False)["input_ids"]


def labelled(tok, ids, labels) -> str:
    return tok.decode([t for t, lab in zip(ids, labels) if lab != IGNORE])


def test_training_ids_are_the_chat_templates_and_only_assistant_turns_are_learned(chat_model):
    style, base, tok, _ = chat_model
    assert (tok.eos_token == EOT[style]) is not base  # a base release's eos is not the turn's end
    both = f"hi you{EOT[style]}four{EOT[style]}"
    for loss_on, learned in (("last_turn", f"four{EOT[style]}"), ("all_assistant", both)):
        ids, labels = encode_conversation(tok, CONVERSATION, loss_on=loss_on, end_id=tok.eos_token_id)
        assert ids == template_ids(tok, CONVERSATION)
        # Llama 3's template trims the content, ChatML's keeps it: labels follow the template
        assert labelled(tok, ids, labels) == (learned if style == "llama3" else learned.replace("hi", " hi"))
        assert ids[:len(template_ids(tok, CONVERSATION[:4], True))] == template_ids(tok, CONVERSATION[:4], True)


def test_the_answer_ends_with_the_templates_end_of_turn_which_generation_stops_on(chat_model):
    style, base, tok, model = chat_model
    eot = tok.convert_tokens_to_ids(EOT[style])
    assert end_of_turn_id(tok) == eot
    end, why = target_end_id(model, tok, "causal")
    assert end == eot and EOT[style] in why
    assert eot in stop_ids(model, tok, "causal") and eot in Generator(model, tok).eos_ids
    prompt = build_prompt("Q: {input}", Example("two plus two?", ["four"], {}, "x"), system="Be brief.")
    ids, labels = encode_answer(tok, prompt, "four", "causal", tok.eos_token_id)
    assert ids[:len(encode_prompt(tok, prompt, "causal"))] == encode_prompt(tok, prompt, "causal")
    assert [t for t in labels if t != IGNORE][-1] == eot


def test_prompt_turns_system_shots_and_history_for_chat_and_flat_models():
    shots = [Example("a cat", ["cat"], {}, "s1"), Example("a dog", ["dog"], {}, "s2")]
    query = Example("a cow", ["cow"], {}, "q", history=[{"role": "user", "content": "hi"},
                                                         {"role": "assistant", "content": "hello"}])
    prompt = build_prompt("Animal in: {input}", query, shots, shot_format="{prompt} {target}", separator="\n\n",
                          system="Name animals.")
    assert prompt.messages == (
        {"role": "system", "content": "Name animals."},
        {"role": "user", "content": "Animal in: a cat"}, {"role": "assistant", "content": "cat"},
        {"role": "user", "content": "Animal in: a dog"}, {"role": "assistant", "content": "dog"},
        {"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
        {"role": "user", "content": "Animal in: a cow"})
    assert str(prompt) == ("Name animals.\n\nAnimal in: a cat cat\n\nAnimal in: a dog dog\n\n"
                           "User: hi\nAssistant: hello\n\nAnimal in: a cow")
    own = Example("x", ["y"], {}, "w", system="Its own.")
    assert build_prompt("{input}", own, system="Project's").messages[0]["content"] == "Its own."


def test_shots_are_earlier_turns_for_a_chat_model_and_count_against_the_window(tmp_path):
    tok = AutoTokenizer.from_pretrained(make_chat_model(tmp_path, "llama3"))
    pool = [Example(f"the quick brown fox {i}", ["fox"], {}, f"p{i}") for i in range(3)]
    query = Example("the lazy dog", ["dog"], {}, "q")

    def count(p):
        return len(encode_prompt(tok, p, "causal"))

    full = build_prompt("{input}", query, pool)
    assert encode_prompt(tok, full, "causal") == template_ids(tok, list(full.messages), True)
    one_shot = count(build_prompt("{input}", query, pool[2:]))
    fitted = fit_prompts("{input}", [query], pool, [[0, 1, 2]], count, one_shot, variant="v")
    assert fitted.shots_used == [1] and fitted.token_counts == [one_shot]  # furthest shots dropped first


def test_messages_records_become_examples_and_bad_ones_are_named(tmp_path):
    rows = [{"messages": CONVERSATION}, {"messages": [{"role": "user", "content": "hi"}]},
            {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}]
    (tmp_path / "chat.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = DataConfig(format="messages", eval="chat.jsonl")
    with pytest.raises(UserError, match=r"chat.jsonl:2: the conversation does not end with an assistant turn"):
        load_splits(cfg, tmp_path)
    examples = load_splits(cfg, tmp_path, require_target=False).eval
    first = examples[0]
    assert (first.input, first.targets, first.system) == ("two plus two?", ["four"], "Be brief.")
    assert first.history == CONVERSATION[1:3] and examples[1].targets == []
    turns = assistant_turns(first)
    assert [(t.input, t.targets, len(t.history)) for t in turns] == [("hello there", [" hi you"], 0),
                                                                     ("two plus two?", ["four"], 2)]
    for bad, message in (([{"role": "bot", "content": "x"}], "turn 0 of 'messages' must be"),
                         ("not a list", "is not a non-empty list of turns"),
                         ([{"role": "assistant", "content": "x"}], "needs a user turn before")):
        (tmp_path / "bad.jsonl").write_text(json.dumps({"messages": bad}) + "\n")
        with pytest.raises(UserError, match=f"bad.jsonl:1: .*{message}"):
            load_splits(DataConfig(format="messages", eval="bad.jsonl"), tmp_path)


def test_seq2seq_and_a_warm_started_encoder_decoder_end_targets_with_the_configured_eos(tmp_path):
    from llmcycle.models.warm_start import WarmStartConfig, build
    from tiny import make_bert
    from transformers import AutoModelForSeq2SeqLM

    t5 = make_t5(tmp_path / "t5")
    tok, model = AutoTokenizer.from_pretrained(t5), AutoModelForSeq2SeqLM.from_pretrained(t5)
    ids, labels = encode_answer(tok, "summarize: hi", "hello", "seq2seq", target_end_id(model, tok, "seq2seq")[0])
    assert ids == tok("summarize: hi")["input_ids"] and labels == tok("hello")["input_ids"]  # T5 adds </s>

    build(WarmStartConfig(encoder=str(make_bert(tmp_path / "bert")), decoder_layers=1), tmp_path / "ws")
    tok = AutoTokenizer.from_pretrained(tmp_path / "ws")
    model = AutoModelForSeq2SeqLM.from_pretrained(tmp_path / "ws")
    tok.eos_token = None  # a BERT tokenizer has no eos: the model's config names [SEP]
    end, why = target_end_id(model, tok, "seq2seq")
    assert end == tok.sep_token_id and "config.json" in why
    model.config.eos_token_id = None
    model.generation_config.eos_token_id = None
    with pytest.raises(UserError, match="set eos_token_id in the model's config.json"):
        target_end_id(model, tok, "seq2seq")


def test_a_finished_prompt_is_recognised_as_a_rendering_of_the_template():
    template = "Summarize the following conversation.\n\n{dialogue}\n\nSummary:"
    assert renders_template(template, template.format(dialogue="A: hi\nB: bye"))
    assert not renders_template(template, "A: hi\nB: bye")


def test_generation_stops_on_the_end_of_turn_of_a_base_release(tmp_path):
    path = make_chat_model(tmp_path, "llama3", base_release=True)
    tok, model = AutoTokenizer.from_pretrained(path), AutoModelForCausalLM.from_pretrained(path)
    eot = tok.convert_tokens_to_ids("<|eot_id|>")

    def say_end_of_turn(module, inputs, logits):  # the model answers <|eot_id|> right away
        logits[..., eot] = 1e4
        return logits

    model.lm_head.register_forward_hook(say_end_of_turn)
    result = Generator(model, tok).generate(["hi"], GenerationConfig(max_new_tokens=5))[0]
    assert result.finish_reason == "stop" and result.completion_tokens == 1
