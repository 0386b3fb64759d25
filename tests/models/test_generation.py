"""Batched generation must give exactly what one-by-one generation gives, in the caller's order."""
from __future__ import annotations

import pytest
import torch

from llmcycle.core.errors import UserError
from llmcycle.models.generation import GenerationConfig, Generator, generate_one_by_one
from llmcycle.models.load import load_model
from tiny import CORPUS, make_gpt2, make_t5

# Very different lengths (1 to ~80 tokens), so batches mix short and long prompts and padding matters.
PROMPTS = [
    "the",
    "the quick brown fox jumps over the lazy dog " * 3,
    "hello world",
    "question: what is two plus two? answer:",
    "summarize: the cat sat on the mat and looked at the dog",
    "a",
    "translate English to German: the house is wonderful and big",
    "0123456789",
    "a tiny model for tests learns nothing useful but runs fast, " * 2,
    "Hello, world!",
    "x y z",
]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models gain nothing from intra-op threads, and when another process holds the cores, torch's
    thread pool spins and waits: one thread is many times faster here. Restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _train(model, tok, steps: int = 60) -> None:
    """A few Adam steps on the tiny corpus. Random weights generate one token over and over for every
    prompt, which would make 'batched equals one-by-one' hold trivially; a little training makes the
    outputs depend on the prompt (varied words, and EOS for T5)."""
    torch.manual_seed(0)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    model.train()
    words = " ".join(CORPUS).split()
    for s in range(steps):
        if model.config.is_encoder_decoder:  # learn to continue 4 words with the next 4
            starts = range(s % 5, len(words) - 8, 5)
            enc = tok([" ".join(words[i:i + 4]) for i in starts], return_tensors="pt", padding=True)
            labels = tok([" ".join(words[i + 4:i + 8]) for i in starts], return_tensors="pt",
                         padding=True).input_ids
            labels[labels == tok.pad_token_id] = -100
        else:
            enc = tok(CORPUS, return_tensors="pt", padding=True)
            labels = enc.input_ids.clone()
            labels[enc.attention_mask == 0] = -100
        loss = model(**enc, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()


@pytest.fixture(scope="module", params=["t5", "gpt2"])
def mt(request, tmp_path_factory):
    make = make_t5 if request.param == "t5" else make_gpt2
    model, tok = load_model(str(make(tmp_path_factory.mktemp(request.param))), device="cpu")
    _train(model, tok)
    return model, tok


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory):
    model, tok = load_model(str(make_gpt2(tmp_path_factory.mktemp("gpt2"))), device="cpu")
    _train(model, tok)
    return model, tok


def _record_shapes(monkeypatch, model) -> list[tuple[int, int]]:
    shapes: list[tuple[int, int]] = []
    real = model.generate

    def wrapped(*args, **kwargs):
        shapes.append(tuple(kwargs["input_ids"].shape))
        return real(*args, **kwargs)

    monkeypatch.setattr(model, "generate", wrapped)
    return shapes


def _raw_completion(model, tok, prompt: str, **kw) -> list[int]:
    """model.generate on one unpadded prompt, called directly (independent of llmcycle's code)."""
    enc = tok(prompt, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**enc, pad_token_id=tok.pad_token_id, **kw)
    start = 1 if model.config.is_encoder_decoder else enc.input_ids.shape[1]
    return out[0, start:].tolist()


def test_greedy_batched_equals_one_by_one(mt, monkeypatch):
    model, tok = mt
    cfg = GenerationConfig(max_new_tokens=20, batch_size=4)
    ref = generate_one_by_one(model, tok, PROMPTS, cfg)
    shapes = _record_shapes(monkeypatch, model)
    got = Generator(model, tok).generate(PROMPTS, cfg)
    assert len(shapes) == 3 and [s[0] for s in shapes] == [4, 4, 3]  # it really batched
    assert got == ref  # token ids, text, counts and finish reasons, prompt by prompt
    # The outputs are not trivial: mostly non-empty, and different prompts give different texts.
    assert sum(bool(r.text.strip()) for r in got) >= len(PROMPTS) // 2
    assert len({r.text for r in got}) >= 5
    # And the reference is what a plain model.generate call gives (up to and including EOS).
    for prompt, r in zip(PROMPTS, got):
        raw = _raw_completion(model, tok, prompt, max_new_tokens=20, do_sample=False)
        assert raw[:len(r.token_ids)] == r.token_ids
        assert r.prompt_tokens == len(tok(prompt).input_ids)


def test_order_restored_after_sorting(mt, monkeypatch):
    model, tok = mt
    gen = Generator(model, tok)
    cfg = GenerationConfig(max_new_tokens=8, batch_size=3)
    shapes = _record_shapes(monkeypatch, model)
    forward = gen.generate(PROMPTS, cfg)
    # Longest first: the first batch is padded to the longest prompt, the last to a short one.
    lengths = sorted((len(r) for r in gen.encode(PROMPTS)), reverse=True)
    assert shapes[0][1] == lengths[0] and shapes[-1][1] == lengths[9]
    assert [r.prompt_tokens for r in forward] == [len(r) for r in gen.encode(PROMPTS)]
    backward = gen.generate(PROMPTS[::-1], cfg)
    assert backward == forward[::-1]


def test_token_budget_batches(mt, monkeypatch):
    model, tok = mt
    causal = not model.config.is_encoder_decoder
    cfg = GenerationConfig(max_new_tokens=8, max_batch_tokens=200, batch_size=1)
    shapes = _record_shapes(monkeypatch, model)
    got = Generator(model, tok).generate(PROMPTS, cfg)
    extra = cfg.max_new_tokens if causal else 0
    assert sum(rows for rows, _ in shapes) == len(PROMPTS)
    assert any(rows > 1 for rows, _ in shapes)  # the budget, not batch_size=1, decided the batches
    for rows, width in shapes:
        assert rows == 1 or rows * (width + extra) <= 200
    assert len(shapes) < len(PROMPTS)
    assert got == generate_one_by_one(model, tok, PROMPTS, cfg)


def test_token_budget_counts_beams(gpt2, monkeypatch):
    model, tok = gpt2
    cfg = GenerationConfig(max_new_tokens=4, max_batch_tokens=120, num_beams=2)
    shapes = _record_shapes(monkeypatch, model)
    Generator(model, tok).generate(PROMPTS, cfg)
    for rows, width in shapes:
        assert rows == 1 or rows * 2 * (width + 4) <= 120


def _ascii_piece(text: str) -> str | None:
    """A 2-character printable ASCII piece from the middle of an output, to use as a stop sequence."""
    for k in range(2, len(text) - 2):
        piece = text[k:k + 2]
        if piece.isascii() and piece.isprintable() and piece.strip() == piece:
            return piece
    return None


def test_stop_sequences_cut_text(mt):
    model, tok = mt
    gen = Generator(model, tok)
    full = gen.generate(PROMPTS, GenerationConfig(max_new_tokens=20))
    checked = 0
    for prompt, r in zip(PROMPTS, full):
        stop = _ascii_piece(r.text)
        if stop is None:
            continue
        cfg = GenerationConfig(max_new_tokens=20, stop=[stop, "never-produced"])
        cut = gen.generate([prompt], cfg)[0]
        assert cut.text == r.text[:r.text.find(stop)]
        assert stop not in cut.text
        assert cut.finish_reason == "stop"
        # Generation itself stopped (not only the text cut): fewer tokens were generated.
        assert cut.completion_tokens <= r.completion_tokens
        assert cut.token_ids == r.token_ids[:cut.completion_tokens]
        checked += 1
    assert checked >= 3
    # In a batch, with rows stopping at different steps, the results still match one by one.
    cfg = GenerationConfig(max_new_tokens=20, batch_size=4, stop=["e", "th"])
    assert gen.generate(PROMPTS, cfg) == generate_one_by_one(model, tok, PROMPTS, cfg)


def test_stop_ends_generation_early(gpt2):
    model, tok = gpt2
    gen = Generator(model, tok)
    full = gen.generate(["the"], GenerationConfig(max_new_tokens=20))[0]
    stop = _ascii_piece(full.text)
    cut = gen.generate(["the"], GenerationConfig(max_new_tokens=20, stop=[stop]))[0]
    assert cut.completion_tokens < full.completion_tokens


def test_max_new_tokens_and_finish_reason(mt):
    model, tok = mt
    gen = Generator(model, tok)
    got = gen.generate(PROMPTS, GenerationConfig(max_new_tokens=5))
    assert all(r.completion_tokens <= 5 for r in got)
    assert any(r.finish_reason == "length" for r in got)
    for r in got:
        if r.finish_reason == "length":
            assert r.completion_tokens == 5 and r.token_ids[-1] not in gen.eos_ids
        else:
            assert r.token_ids[-1] in gen.eos_ids
    if model.config.is_encoder_decoder:  # the trained T5 ends some outputs with EOS
        long = gen.generate(PROMPTS, GenerationConfig(max_new_tokens=20))
        assert any(r.finish_reason == "stop" and r.completion_tokens < 20 for r in long)


def test_sampling_reproducible_per_seed(mt):
    model, tok = mt
    gen = Generator(model, tok)
    cfg = GenerationConfig(max_new_tokens=12, do_sample=True, temperature=5.0, seed=1, batch_size=4)
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    a = gen.generate(PROMPTS, cfg)
    assert torch.equal(torch.rand(3), expected_next)  # the caller's random stream is left alone
    b = gen.generate(PROMPTS, cfg)
    c = gen.generate(PROMPTS, cfg.model_copy(update={"seed": 2}))
    greedy = gen.generate(PROMPTS, GenerationConfig(max_new_tokens=12))
    assert a == b
    assert [r.token_ids for r in a] != [r.token_ids for r in c]
    assert [r.token_ids for r in a] != [r.token_ids for r in greedy]
    # top_k=1 keeps only the most likely token: sampling becomes greedy.
    top1 = gen.generate(PROMPTS, cfg.model_copy(update={"top_k": 1}))
    assert [r.token_ids for r in top1] == [r.token_ids for r in greedy]


def test_beam_search_equals_one_by_one(mt):
    model, tok = mt
    cfg = GenerationConfig(max_new_tokens=12, num_beams=3, batch_size=4)
    got = Generator(model, tok).generate(PROMPTS, cfg)
    assert len(got) == len(PROMPTS)
    assert got == generate_one_by_one(model, tok, PROMPTS, cfg)
    greedy = Generator(model, tok).generate(PROMPTS, GenerationConfig(max_new_tokens=12))
    assert [r.token_ids for r in got] != [r.token_ids for r in greedy]  # beams were really searched
    for prompt, r in list(zip(PROMPTS, got))[:4]:
        raw = _raw_completion(model, tok, prompt, max_new_tokens=12, num_beams=3, do_sample=False)
        assert raw[:len(r.token_ids)] == r.token_ids


def test_repetition_penalty_reduces_repeats(gpt2):
    model, tok = gpt2
    gen = Generator(model, tok)
    plain = gen.generate(PROMPTS, GenerationConfig(max_new_tokens=20))
    penal = gen.generate(PROMPTS, GenerationConfig(max_new_tokens=20, repetition_penalty=3.0))

    def repeats(results):
        return sum(len(r.token_ids) - len(set(r.token_ids)) for r in results)

    assert [r.text for r in plain] != [r.text for r in penal]
    assert repeats(penal) < repeats(plain)


def test_no_repeat_ngram_size_forbids_repeated_ngrams(mt):
    model, tok = mt
    gen = Generator(model, tok)
    plain = gen.generate(PROMPTS, GenerationConfig(max_new_tokens=24))
    capped = gen.generate(PROMPTS, GenerationConfig(max_new_tokens=24, no_repeat_ngram_size=2))

    def repeated_bigrams(ids: list[int]) -> int:
        grams = list(zip(ids, ids[1:]))
        return len(grams) - len(set(grams))

    assert sum(repeated_bigrams(r.token_ids) for r in plain) > 0  # the tiny model does loop
    assert all(repeated_bigrams(r.token_ids) == 0 for r in capped)


def test_progress_callback(gpt2):
    model, tok = gpt2
    seen: list[int] = []
    Generator(model, tok).generate(PROMPTS, GenerationConfig(max_new_tokens=2, batch_size=4), seen.append)
    assert seen == [4, 8, 11]


def test_tokenizer_untouched_and_pad_added(tmp_path):
    from transformers import AutoTokenizer

    folder = make_gpt2(tmp_path)
    model, _ = load_model(str(folder), device="cpu")
    tok = AutoTokenizer.from_pretrained(str(folder))  # raw: no pad token, right padding
    assert tok.pad_token is None and tok.padding_side == "right"
    gen = Generator(model, tok)
    assert tok.pad_token == tok.eos_token
    got = gen.generate(["", "hello"], GenerationConfig(max_new_tokens=3))  # "" starts from BOS
    assert tok.padding_side == "right"
    assert [r.prompt_tokens for r in got] == [1, len(tok("hello").input_ids)]
    assert Generator(model, tok).generate([], GenerationConfig()) == []


def test_from_dict_rejects_typos_and_bad_values():
    cfg = GenerationConfig.from_dict({"top_k": 5, "do_sample": True, "stop": ["\n"]}, "eval.generation")
    assert cfg.top_k == 5 and cfg.stop == ["\n"]
    with pytest.raises(UserError) as e:
        GenerationConfig.from_dict({"tok_k": 5}, "eval.generation")
    assert str(e.value) == "eval.generation: unknown generation parameter 'tok_k' (did you mean 'top_k'?)"
    with pytest.raises(UserError, match=r"request: generation parameter 'top_p': expected a value <= 1, got 2"):
        GenerationConfig.from_dict({"top_p": 2}, "request")
    with pytest.raises(UserError, match="'max_new_tokens': expected a value >= 1"):
        GenerationConfig.from_dict({"max_new_tokens": 0}, "request")
    with pytest.raises(UserError, match="must not be empty"):
        GenerationConfig.from_dict({"stop": [""]}, "request")
    with pytest.raises(UserError, match="must be a mapping"):
        GenerationConfig.from_dict(["top_k"], "request")


def test_overlong_prompt_is_an_error(mt):
    model, tok = mt
    gen = Generator(model, tok, context_window=40)
    n = len(gen.encode([PROMPTS[1]])[0])
    assert n > 40
    with pytest.raises(UserError, match=rf"prompt 1 has {n} tokens, more than the model's context window "
                                        r"of 40 tokens"):
        gen.generate(PROMPTS[:2], GenerationConfig(max_new_tokens=1))


def test_causal_prompt_plus_new_tokens_beyond_window(gpt2):
    model, tok = gpt2
    gen = Generator(model, tok)  # tiny GPT-2: 128 positions
    n = len(gen.encode([PROMPTS[8]])[0])
    assert n + 10 <= 128 < n + 64
    gen.generate([PROMPTS[8]], GenerationConfig(max_new_tokens=10))
    with pytest.raises(UserError, match=rf"prompt 0 has {n} tokens; with max_new_tokens 64 that is "
                                        rf"{n + 64} tokens, more than the model's context window of 128"):
        gen.generate([PROMPTS[8]], GenerationConfig(max_new_tokens=64))



def test_finish_tells_padding_from_generated_tokens(tmp_path):
    """Rows are read back from padded batch outputs; check the edge cases directly."""
    t5 = Generator(*load_model(str(make_t5(tmp_path / "t5")), device="cpu"))
    assert (t5.pad_id, t5.eos_ids) == (0, [1])
    cfg = GenerationConfig(max_new_tokens=3)
    # T5's pad is also a token the model can generate: without EOS, three tokens were generated.
    r = t5.finish([5, 0, 0], 2, cfg)
    assert (r.token_ids, r.completion_tokens, r.finish_reason) == ([5, 0, 0], 3, "length")
    r = t5.finish([5, 1, 0], 2, cfg)  # EOS, then padding
    assert (r.token_ids, r.finish_reason) == ([5, 1], "stop")
    # Padding after a stop criterion that fired on a stop sequence begun in the prompt.
    r = t5.finish([5, 7, 0, 0], 2, GenerationConfig(max_new_tokens=4, stop=["zzz"]))
    assert (r.token_ids, r.finish_reason) == ([5, 7], "stop")

    model, tok = load_model(str(make_gpt2(tmp_path / "gpt2")), device="cpu")
    gpt = Generator(model, tok)
    assert gpt.pad_id == tok.eos_token_id  # pad = eos: padding after a stop looks like EOS
    ids = tok("hello world").input_ids
    r = gpt.finish(ids + [gpt.pad_id, gpt.pad_id], 1, GenerationConfig(max_new_tokens=20, stop=["lo w"]))
    assert r.text == "hel" and r.finish_reason == "stop"
    assert r.token_ids == ids[:len(r.token_ids)] and "lo w" in tok.decode(r.token_ids)
    assert "lo w" not in tok.decode(r.token_ids[:-1])
