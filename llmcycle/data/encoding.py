"""Token ids of training examples: a prompt and its answer, or a whole conversation, with labels on the
answer only and the answer ending with the token the model stops on.

Chat models are encoded through their chat template, so a training sequence is exactly what
`apply_chat_template` renders for (system, earlier turns, prompt, answer), and the answer ends with
the template's end-of-turn token (Llama 3's <|eot_id|>, ChatML's <|im_end|>) — the token the server
stops on — even when the tokenizer's eos_token is another one (base releases: <|end_of_text|>).
Models without a chat template get the answer's ids plus the model's eos id
(models.generation.target_end_id: config, then generation config, then tokenizer).
"""
from __future__ import annotations

from llmcycle.core.errors import UserError
from llmcycle.data.prompting import apply_template, encode_prompt, messages_of, uses_chat_template

IGNORE = -100  # the label value cross-entropy ignores
LOSS_ON = ("last_turn", "all_assistant")
_PROBE = "llmcycle probe answer"


def _special_ids(tokenizer) -> set[int]:
    added = getattr(tokenizer, "added_tokens_decoder", {}) or {}
    return set(tokenizer.all_special_ids) | {i for i, t in added.items() if getattr(t, "special", False)}


def end_of_turn_id(tokenizer) -> int | None:
    """The special token a chat template closes an assistant turn with (Llama 3's <|eot_id|>, ChatML's
    <|im_end|>), read off a rendered probe turn; None when the template writes no special token after
    the answer. It can differ from tokenizer.eos_token (base releases: <|end_of_text|>)."""
    turns = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": _PROBE}]
    text = apply_template(tokenizer, turns, generation_prompt=False)
    rest = tokenizer(text[text.rfind(_PROBE) + len(_PROBE):], add_special_tokens=False)["input_ids"]
    specials = _special_ids(tokenizer)
    return next((int(t) for t in rest if t in specials), None)


def _span_labels(ids: list[int], stops: set[int], end_id: int | None) -> tuple[list[int], list[int]]:
    """An assistant turn's ids and labels: trained up to and including its first stop token; what the
    template writes after it (ChatML's newline) is input only. Without a stop token, `end_id` is added."""
    cut = next((i + 1 for i, t in enumerate(ids) if t in stops), None)
    if cut is None:
        if end_id is None:
            raise UserError("the chat template closes no turn with a special token and the model has no eos id: "
                            "it could not learn to stop; set eos_token_id in the model's config.json")
        return ids + [end_id], ids + [end_id]
    return ids, ids[:cut] + [IGNORE] * (len(ids) - cut)


def encode_conversation(tokenizer, messages, *, loss_on: str = "last_turn",
                        end_id: int | None = None) -> tuple[list[int], list[int]]:
    """(input ids, labels) of a conversation through the model's chat template: the ids are the
    template's rendering (equal to apply_chat_template's), the labels are the assistant turns' tokens
    through their end-of-turn token (the last one, or all with loss_on='all_assistant'), -100 elsewhere.
    Each turn is located by rendering the conversation up to it, which must be a prefix of the whole."""
    messages = list(messages)
    last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    stops = {t for t in (end_of_turn_id(tokenizer), end_id) if t is not None}
    ids, labels, done = [], [], ""
    for k, m in enumerate(messages):
        if m["role"] != "assistant" or (loss_on == "last_turn" and k != last):
            continue
        before = apply_template(tokenizer, messages[:k], generation_prompt=True)
        after = apply_template(tokenizer, messages[:k + 1], generation_prompt=False)
        if not before.startswith(done) or not after.startswith(before):
            raise UserError("the model's chat template renders earlier turns differently once later turns "
                            "follow (e.g. it drops past reasoning), so assistant turns cannot be located; "
                            "train on the last turn only (loss_on: last_turn) or change the template")
        head = tokenizer(before[len(done):], add_special_tokens=False)["input_ids"]
        turn, turn_labels = _span_labels(tokenizer(after[len(before):], add_special_tokens=False)["input_ids"],
                                         stops, end_id)
        ids, labels, done = ids + head + turn, labels + [IGNORE] * len(head) + turn_labels, after
    whole = apply_template(tokenizer, messages, generation_prompt=False)
    tail = tokenizer(whole[len(done):], add_special_tokens=False)["input_ids"] if whole.startswith(done) else []
    return ids + tail, labels + [IGNORE] * len(tail)


def encode_answer(tokenizer, prompt, answer: str, kind: str, end_id: int | None,
                  loss_on: str = "last_turn") -> tuple[list[int], list[int]]:
    """(input ids, labels) of one training example. Seq2seq: the prompt is the encoder's input, the
    labels the answer's ids plus `end_id`. Causal: prompt then answer in one sequence, labels on the
    answer only; a chat model's sequence is its chat template's rendering of (prompt turns, answer), so
    the answer ends with the template's end-of-turn token, the one generation stops on."""
    if uses_chat_template(tokenizer, kind):
        turns = messages_of(prompt) + [{"role": "assistant", "content": answer}]
        return encode_conversation(tokenizer, turns, loss_on=loss_on, end_id=end_id)
    if end_id is None:
        raise UserError("the model has no end-of-sequence token, so it could not learn to stop; set "
                        "eos_token_id in the model's config.json (or give the tokenizer an eos_token)")
    p_ids = encode_prompt(tokenizer, prompt, kind)
    t_ids = tokenizer(answer, add_special_tokens=False)["input_ids"] + [end_id]
    if kind == "causal":
        return p_ids + t_ids, [IGNORE] * len(p_ids) + t_ids
    return p_ids, t_ids


def encode_target(tokenizer, prompt, answer: str, kind: str, end_id: int | None) -> list[int]:
    """The answer's ids exactly as trained (ending with the token the model stops on)."""
    ids, labels = encode_answer(tokenizer, prompt, answer, kind, end_id)
    return labels if kind == "seq2seq" else [t for t, lab in zip(ids, labels) if lab != IGNORE]


