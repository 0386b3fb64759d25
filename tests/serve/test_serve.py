"""The inference server: the batching engine against one-by-one generation, and the HTTP API driven by
the real `openai` client against a server on 127.0.0.1 (tiny local models, ephemeral ports)."""
from __future__ import annotations

import concurrent.futures
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from llmcycle.evaluation import harness
from llmcycle.serve.engine import BatchEngine, SamplingParams
from llmcycle.core.errors import UserError
from llmcycle.models.generation import GenerationConfig, Generator, generate_one_by_one
from test_generation import PROMPTS, _train
from tiny import make_bert, make_gpt2, make_t5

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
uvicorn = pytest.importorskip("uvicorn")
from llmcycle.serve.app import check_backend, create_app, serve  # noqa: E402  (needs fastapi)
from servers import running  # noqa: E402

CHAT_TEMPLATE = ("{% for m in messages %}<{{ m.role }}>{{ m.content }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<assistant>{% endif %}")
TEMPLATE = "summarize: {dialogue}"


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _trained(path, steps: int = 60, **load_kw):
    """The model at `path` through harness.load (as `serve` loads it), trained a little so that its outputs
    depend on the prompt (random weights repeat one token for every prompt)."""
    loaded = harness.load(str(path), device="cpu", **load_kw)
    _train(loaded.model, loaded.tokenizer, steps)
    return loaded


@pytest.fixture(scope="module")
def t5(tmp_path_factory):
    return _trained(make_t5(tmp_path_factory.mktemp("t5")))


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory):
    return _trained(make_gpt2(tmp_path_factory.mktemp("gpt2"), n_positions=256))


@pytest.fixture(scope="module")
def warm(tmp_path_factory):
    """An encoder-decoder warm-started from a tiny BERT (llmcycle/models/warm_start.py): a BART model."""
    from llmcycle.models.warm_start import WarmStartConfig, build

    root = tmp_path_factory.mktemp("warm")
    build(WarmStartConfig(encoder=str(make_bert(root / "bert")), decoder_layers=1), root / "ws")
    return _trained(root / "ws", steps=200)


@pytest.fixture(scope="module")
def chat(tmp_path_factory):
    """A GPT-2 whose tokenizer has a chat template: a chat model."""
    path = make_gpt2(tmp_path_factory.mktemp("chat"), seed=1)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    tok.chat_template = CHAT_TEMPLATE
    tok.save_pretrained(path)
    return _trained(path)




def client(url: str, key: str = "unused", **kw):
    return openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0, timeout=60, **kw)


@pytest.fixture(scope="module")
def t5_url(t5):
    with running(create_app(t5, model_name="t5", prompt_template=TEMPLATE, max_batch_size=4)) as url:
        yield url


@pytest.fixture(scope="module")
def chat_url(chat):
    with running(create_app(chat, model_name="chat", api_key="sesame")) as url:
        yield url


def drive(engine: BatchEngine, seqs, limit: int = 10_000) -> None:
    for _ in range(limit):
        if all(s.done for s in seqs):
            return
        engine.run_once()
    raise AssertionError("sequences did not finish")


# ------------------------------------------------------------------------------------------- engine
@pytest.mark.parametrize("name", ["t5", "gpt2", "warm"])
def test_engine_greedy_equals_one_by_one(name, request):
    """Rows join a running batch (cache merged mid-flight), wait for a slot, and leave as they finish:
    every row's tokens are still exactly those of model.generate on that prompt alone."""
    loaded = request.getfixturevalue(name)
    cfg = GenerationConfig(max_new_tokens=12)
    expected = generate_one_by_one(loaded.model, loaded.tokenizer, PROMPTS, cfg)
    assert len({tuple(r.token_ids) for r in expected}) > 5  # outputs depend on the prompt
    engine = BatchEngine(loaded.generator, max_batch_size=4)
    encoded = loaded.generator.encode(PROMPTS)
    greedy = SamplingParams(max_tokens=12, temperature=0)
    # Half the rows stream (text decoded at every step), half are decoded once at the end.
    seqs = [engine.submit(ids, greedy, stream=i % 2 == 0) for i, ids in enumerate(encoded[:2])]
    for _ in range(3):
        engine.run_once()
    seqs += [engine.submit(ids, greedy, stream=i % 2 == 0) for i, ids in enumerate(encoded[2:])]
    assert engine.waiting > 0
    drive(engine, seqs)
    for want, seq in zip(expected, seqs):
        assert seq.token_ids == want.token_ids
        assert (seq.text, seq.finish_reason) == (want.text, want.finish_reason)
    assert max(engine.batch_sizes) == 4 and min(engine.batch_sizes) < 4
    assert engine.tokens_generated == sum(len(r.token_ids) for r in expected)
    assert engine.running == engine.waiting == 0


@pytest.mark.parametrize("name", ["t5", "gpt2"])
def test_engine_seeded_sampling_ignores_batch_neighbours(name, request):
    loaded = request.getfixturevalue(name)
    encoded = loaded.generator.encode(PROMPTS)
    params = SamplingParams(max_tokens=10, temperature=1.0, top_p=0.9, seed=7, ignore_eos=True)

    alone_engine = BatchEngine(loaded.generator)
    alone = alone_engine.submit(encoded[3], params)
    drive(alone_engine, [alone])

    engine = BatchEngine(loaded.generator, max_batch_size=8)
    others = [engine.submit(ids, SamplingParams(max_tokens=15, temperature=1.0, seed=i)) for i, ids in
              enumerate(encoded[:3])]
    engine.run_once()
    crowded = engine.submit(encoded[3], params)
    other_seed = engine.submit(encoded[3], SamplingParams(max_tokens=10, temperature=1.0, top_p=0.9, seed=8,
                                                          ignore_eos=True))
    drive(engine, others + [crowded, other_seed])
    assert crowded.token_ids == alone.token_ids and len(alone.token_ids) == 10
    assert other_seed.token_ids != alone.token_ids


def test_engine_stop_string_cuts_text_and_streams_nothing_past_it(gpt2):
    ids = gpt2.generator.encode(["the quick brown fox"])[0]
    engine = BatchEngine(gpt2.generator)
    full = engine.submit(ids, SamplingParams(max_tokens=20, temperature=0, ignore_eos=True))
    drive(engine, [full])
    stop = full.text[6:9]
    assert len(stop) == 3 and full.text.find(stop) >= 3
    deltas: list[str] = []
    cut = engine.submit(ids, SamplingParams(max_tokens=20, temperature=0, stop=(stop, "\x00never"), ignore_eos=True),
                        listener=lambda delta, done: deltas.append(delta))
    drive(engine, [cut])
    assert cut.text == full.text[:full.text.find(stop)] and cut.finish_reason == "stop"
    assert "".join(deltas) == cut.text  # the start of the stop string was held back, never sent
    assert len(cut.token_ids) < len(full.token_ids)


def test_engine_eos_min_tokens_and_ignore_eos(gpt2):
    """The model's first greedy token is declared EOS: it ends the row at once, is masked out until
    min_tokens exist, and does not end the row with ignore_eos."""
    ids = gpt2.generator.encode(["hello world"])[0]
    probe = BatchEngine(gpt2.generator)
    first = probe.submit(ids, SamplingParams(max_tokens=1, temperature=0))
    drive(probe, [first])
    gen = Generator(gpt2.model, gpt2.tokenizer)
    gen.eos_ids = [first.token_ids[0]]
    engine = BatchEngine(gen)
    plain = engine.submit(ids, SamplingParams(max_tokens=8, temperature=0))
    late = engine.submit(ids, SamplingParams(max_tokens=8, temperature=0, min_tokens=5))
    endless = engine.submit(ids, SamplingParams(max_tokens=8, temperature=0, ignore_eos=True))
    drive(engine, [plain, late, endless])
    assert (plain.token_ids, plain.finish_reason) == (first.token_ids, "stop")
    assert len(late.token_ids) >= 6 and first.token_ids[0] not in late.token_ids[:5]
    assert len(endless.token_ids) == 8 and endless.finish_reason == "length"
    assert endless.token_ids[0] == first.token_ids[0]


def test_engine_cancel_frees_the_slot_for_a_waiting_request(t5):
    engine = BatchEngine(t5.generator, max_batch_size=1)
    ids = t5.generator.encode(["the quick brown fox", "hello world"])
    long = engine.submit(ids[0], SamplingParams(max_tokens=200, temperature=0, ignore_eos=True))
    short = engine.submit(ids[1], SamplingParams(max_tokens=3, temperature=0, ignore_eos=True))
    for _ in range(3):
        engine.run_once()
    assert engine.running == 1 and engine.waiting == 1 and len(long.token_ids) == 4
    engine.cancel(long)
    engine.run_once()
    assert len(long.token_ids) == 4 and engine.cancelled == 1  # its row is gone from the batch
    drive(engine, [short])
    assert len(short.token_ids) == 3 and short.finish_reason == "length"
    assert len(long.token_ids) == 4 and long.finish_reason is None


def test_engine_failed_step_fails_its_requests_and_keeps_serving(gpt2, monkeypatch):
    engine = BatchEngine(gpt2.generator)
    ids = gpt2.generator.encode(["hello"])[0]
    doomed = engine.submit(ids, SamplingParams(max_tokens=5, temperature=0))
    engine.run_once()
    monkeypatch.setattr(type(engine._rows), "step", lambda self, tokens: 1 / 0)
    engine.run_once()
    assert isinstance(doomed.error, ZeroDivisionError) and engine.running == 0
    monkeypatch.undo()
    fine = engine.submit(ids, SamplingParams(max_tokens=5, temperature=0, ignore_eos=True))
    drive(engine, [fine])
    assert len(fine.token_ids) == 5 and fine.error is None


def test_prefill_groups_keep_padding_under_a_quarter():
    from llmcycle.serve.engine import Sequence, _prefill_groups

    seqs = [Sequence([1] * n, SamplingParams(max_tokens=1), lambda d, done: None) for n in (5, 100, 28, 90, 30)]
    # 2 x 100 = 200 <= 1.25 x 190; 3 x 100 = 300 > 1.25 x 220; 2 x 30 = 60 <= 1.25 x 58; 3 x 30 = 90 > 1.25 x 63
    assert [[len(s.prompt_ids) for s in g] for g in _prefill_groups(seqs)] == [[100, 90], [30, 28], [5]]


def test_engine_serves_lora_adapters_and_refuses_soft_prompts(tmp_path):
    from peft import LoraConfig, PromptTuningConfig, get_peft_model

    from llmcycle.models.load import load_model

    model, tok = load_model(str(make_gpt2(tmp_path / "base")), device="cpu")
    _train(model, tok)
    base_out = generate_one_by_one(model, tok, PROMPTS[:4], GenerationConfig(max_new_tokens=8))
    lora = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn"], fan_in_fan_out=True))
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in lora.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)  # a trained adapter: B is no longer zero
    lora.eval()
    expected = generate_one_by_one(lora, tok, PROMPTS[:4], GenerationConfig(max_new_tokens=8))
    assert [r.token_ids for r in expected] != [r.token_ids for r in base_out]
    gen = Generator(lora, tok)
    engine = BatchEngine(gen)
    seqs = [engine.submit(ids, SamplingParams(max_tokens=8, temperature=0)) for ids in gen.encode(PROMPTS[:4])]
    drive(engine, seqs)
    assert [s.token_ids for s in seqs] == [r.token_ids for r in expected]
    soft, soft_tok = load_model(str(make_gpt2(tmp_path / "soft")), device="cpu")
    soft = get_peft_model(soft, PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4))
    with pytest.raises(UserError, match="prompt_tuning"):
        BatchEngine(Generator(soft, soft_tok))


# ---------------------------------------------------------------------------------------- HTTP API
def test_models_and_health(t5_url):
    assert [m.id for m in client(t5_url).models.list().data] == ["t5"]
    health = httpx.get(f"{t5_url}/health").json()
    assert health["status"] == "ok" and health["models"] == ["t5"]


def test_completions_match_generation_and_count_tokens(t5, t5_url):
    prompts = PROMPTS[:3]
    expected = generate_one_by_one(t5.model, t5.tokenizer, prompts, GenerationConfig(max_new_tokens=10))
    r = client(t5_url).completions.create(model="t5", prompt=prompts, max_tokens=10, temperature=0, n=2)
    assert [c.index for c in r.choices] == [0, 1, 2, 3, 4, 5]
    assert [c.text for c in r.choices] == [e.text for e in expected for _ in range(2)]
    assert [c.finish_reason for c in r.choices] == [e.finish_reason for e in expected for _ in range(2)]
    assert r.usage.prompt_tokens == sum(len(t5.tokenizer(p).input_ids) for p in prompts)  # once per prompt
    assert r.usage.completion_tokens == 2 * sum(len(e.token_ids) for e in expected)
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_chat_on_seq2seq_uses_the_project_template(t5_url):
    c = client(t5_url)
    chat = c.chat.completions.create(model="t5", messages=[{"role": "user", "content": "the cat sat"}],
                                     max_tokens=8, temperature=0)
    plain = c.completions.create(model="t5", prompt="summarize: the cat sat", max_tokens=8, temperature=0)
    assert chat.choices[0].message.content == plain.choices[0].text
    assert chat.choices[0].message.role == "assistant"
    assert chat.usage.prompt_tokens == plain.usage.prompt_tokens
    # A model without a chat template reads a conversation as flat text, built as training builds it:
    # the system prompt, earlier turns as "Role: text" lines, the templated last message.
    turns = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"},
             {"role": "assistant", "content": "hello"}, {"role": "user", "content": "the dog"}]
    chat = c.chat.completions.create(model="t5", max_tokens=8, temperature=0, messages=turns)
    flat = "be brief\n\nUser: hi\nAssistant: hello\n\n\nsummarize: the dog"
    plain = c.completions.create(model="t5", prompt=flat, max_tokens=8, temperature=0)
    assert chat.choices[0].message.content == plain.choices[0].text
    assert chat.usage.prompt_tokens == plain.usage.prompt_tokens
    # a client that sends the finished prompt does not get the template twice, with or without "raw"
    for extra in ({}, {"extra_body": {"raw": True}}):
        again = c.chat.completions.create(model="t5", max_tokens=8, temperature=0, **extra,
                                          messages=[{"role": "user", "content": "summarize: the cat sat"}])
        assert again.usage.prompt_tokens == plain_tokens(c, "summarize: the cat sat")
    with pytest.raises(openai.BadRequestError, match="last message must be a user message"):
        c.chat.completions.create(model="t5", max_tokens=4, messages=turns[:3])


def plain_tokens(c, prompt: str) -> int:
    return c.completions.create(model="t5", prompt=prompt, max_tokens=1, temperature=0).usage.prompt_tokens


def test_chat_model_uses_its_chat_template(chat, chat_url):
    from llmcycle.data.prompting import encode_prompt

    c = client(chat_url, "sesame")
    r = c.chat.completions.create(model="chat", messages=[{"role": "user", "content": "the cat sat"}],
                                  max_tokens=8, temperature=0)
    ids = encode_prompt(chat.tokenizer, "the cat sat", "causal")
    plain = c.completions.create(model="chat", prompt=ids, max_tokens=8, temperature=0)
    assert r.choices[0].message.content == plain.choices[0].text and r.usage.prompt_tokens == len(ids)
    turns = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"},
             {"role": "assistant", "content": "hello"}, {"role": "user", "content": "the dog?"}]
    r = c.chat.completions.create(model="chat", messages=turns, max_tokens=4, temperature=0)
    text = chat.tokenizer.apply_chat_template(turns, tokenize=False, add_generation_prompt=True)
    assert r.usage.prompt_tokens == len(chat.tokenizer(text, add_special_tokens=False).input_ids)


@pytest.mark.parametrize("chat_api", [False, True])
def test_streaming_gives_the_same_text_as_one_response(t5_url, chat_api):
    c = client(t5_url)
    if chat_api:
        kw = dict(model="t5", messages=[{"role": "user", "content": "the quick brown fox"}], max_tokens=12,
                  temperature=0)
        whole = c.chat.completions.create(**kw)
        want = whole.choices[0].message.content
        chunks = list(c.chat.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
        assert chunks[0].choices[0].delta.role == "assistant"
        got = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    else:
        kw = dict(model="t5", prompt="the quick brown fox", max_tokens=12, temperature=0)
        whole = c.completions.create(**kw)
        want = whole.choices[0].text
        chunks = list(c.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
        got = "".join(ch.choices[0].text for ch in chunks if ch.choices)
    assert got == want and len(chunks) > 3
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == whole.choices[0].finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage.model_dump() == whole.usage.model_dump()


def test_sampling_seed_top_p_and_stop(t5_url):
    c = client(t5_url)
    kw = dict(model="t5", prompt="hello world", max_tokens=12, temperature=1.5, top_p=0.95,
              extra_body={"ignore_eos": True})
    a = c.completions.create(**kw, seed=11).choices[0].text
    assert a == c.completions.create(**kw, seed=11).choices[0].text
    three = [ch.text for ch in c.completions.create(**kw, seed=11, n=3).choices]
    assert len(set(three)) > 1
    greedy = c.completions.create(model="t5", prompt="hello world", max_tokens=16, temperature=0,
                                  extra_body={"ignore_eos": True}).choices[0].text
    stop = greedy[5:8]
    cut = c.completions.create(model="t5", prompt="hello world", max_tokens=16, temperature=0, stop=[stop],
                               extra_body={"ignore_eos": True}).choices[0]
    assert cut.text == greedy[:greedy.find(stop)] and cut.finish_reason == "stop"


def test_errors_use_openai_format_and_the_server_stays_up(chat, chat_url):
    c = client(chat_url, "sesame")
    msg = [{"role": "user", "content": "hi"}]
    cases = [(dict(max_tokens=-1), "max_tokens"), (dict(temperature=2.5), "temperature"), (dict(n=0), "n"),
             (dict(top_p=1.5), "top_p"), (dict(extra_body={"tok_k": 3}), "did you mean 'top_p'"),
             (dict(frequency_penalty=0.5), "not supported"), (dict(stop=[""]), "empty")]
    for kw, needle in cases:
        with pytest.raises(openai.BadRequestError, match=needle) as err:
            c.chat.completions.create(model="chat", messages=msg, **kw)
        assert err.value.status_code == 400 and err.value.body["type"] == "invalid_request_error"
    with pytest.raises(openai.BadRequestError) as err:
        c.completions.create(model="chat", prompt="the cat " * 20, max_tokens=100)
    body, n = err.value.body, len(chat.tokenizer("the cat " * 20).input_ids)
    assert body["code"] == "context_length_exceeded" and "maximum context length is 128 tokens" in body["message"]
    assert f"({n} in the prompt, 100 for the completion)" in body["message"]
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        c.chat.completions.create(model="gpt-4o", messages=msg)
    for key in ("wrong", None):
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        r = httpx.post(f"{chat_url}/v1/chat/completions", json={"model": "chat", "messages": msg}, headers=headers)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        client(chat_url, "wrong").models.list()
    r = httpx.post(f"{chat_url}/v1/completions", content=b'{"model": "chat", "prompt": ',
                   headers={"Authorization": "Bearer sesame"})
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"]
    r = httpx.get(f"{chat_url}/v1/nothing-here")
    assert r.status_code == 404 and set(r.json()["error"]) == {"message", "type", "param", "code"}
    ok = c.chat.completions.create(model="chat", messages=msg, max_tokens=3, temperature=0)
    assert ok.usage.completion_tokens >= 1 and httpx.get(f"{chat_url}/health").status_code == 200


def _metric(text: str, line_start: str) -> float:
    values = [float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(line_start)]
    assert len(values) == 1, f"{line_start!r} found {len(values)} times"
    return values[0]


def test_metrics_in_prometheus_text_format(gpt2):
    with running(create_app(gpt2, model_name="m")) as url:
        c = client(url)
        usages = [c.completions.create(model="m", prompt=p, max_tokens=5, temperature=0).usage for p in PROMPTS[:2]]
        with pytest.raises(openai.BadRequestError):
            c.completions.create(model="m", prompt="x", max_tokens=0)
        text = httpx.get(f"{url}/metrics").text
    assert "# TYPE llmcycle_requests_total counter" in text
    assert _metric(text, 'llmcycle_requests_total{endpoint="/v1/completions",status="200"}') == 2
    assert _metric(text, 'llmcycle_requests_total{endpoint="/v1/completions",status="400"}') == 1
    completion = sum(u.completion_tokens for u in usages)
    assert _metric(text, 'llmcycle_tokens_total{model="m",kind="completion"}') == completion
    assert _metric(text, 'llmcycle_tokens_total{model="m",kind="prompt"}') == sum(u.prompt_tokens for u in usages)
    assert _metric(text, 'llmcycle_generated_tokens_total{model="m"}') == sum(u.completion_tokens for u in usages)
    assert _metric(text, 'llmcycle_request_duration_seconds_count{endpoint="/v1/completions",model="m"}') == 2
    assert _metric(text, 'llmcycle_queue_depth{model="m"}') == 0
    steps = sum(u.completion_tokens - 1 for u in usages)  # the first token of each comes from its prefill
    assert _metric(text, 'llmcycle_batch_size_count{model="m"}') == steps
    assert _metric(text, 'llmcycle_batch_size_bucket{model="m",le="+Inf"}') == steps


def _wait_for(condition, timeout: float = 15.0) -> None:
    deadline = time.time() + timeout
    while not condition():
        assert time.time() < deadline, "condition not reached in time"
        time.sleep(0.02)


def test_client_that_disconnects_frees_its_slot(tmp_path_factory):
    """One slot: a request whose client leaves (mid-stream, or while waiting for a whole response) must
    stop being computed, or the next request would wait for 100,000 tokens."""
    loaded = harness.load(str(make_t5(tmp_path_factory.mktemp("t5long"))), device="cpu", context_window=200_000)
    app = create_app(loaded, model_name="t5", max_batch_size=1)
    engine = app.state.served["t5"].engine
    endless = {"model": "t5", "prompt": "hello", "max_tokens": 100_000, "ignore_eos": True, "temperature": 0}
    with running(app) as url:
        with httpx.Client(timeout=30) as http:
            with http.stream("POST", f"{url}/v1/completions", json={**endless, "stream": True}) as r:
                lines = r.iter_lines()
                assert next(lines).startswith("data: ")
        _wait_for(lambda: engine.cancelled == 1 and engine.running == 0)
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(f"{url}/v1/completions", json=endless, timeout=0.5)
        _wait_for(lambda: engine.cancelled == 2 and engine.running == 0)
        r = client(url).completions.create(model="t5", prompt="hi", max_tokens=3, extra_body={"ignore_eos": True})
        assert r.usage.completion_tokens == 3
        assert engine.tokens_generated < 20_000
        metrics = httpx.get(f"{url}/metrics").text
    assert _metric(metrics, 'llmcycle_cancelled_sequences_total{model="t5"}') == 2


def test_serve_refuses_a_folder_that_is_not_a_model(tmp_path, monkeypatch):
    monkeypatch.setattr(uvicorn.Server, "run", lambda *a, **k: pytest.fail("the server must not start"))
    (tmp_path / "notes.txt").write_text("not a model")
    with pytest.raises(UserError, match="no config.json"):
        serve(str(tmp_path), port=0)


def test_serve_refuses_a_taken_port(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(UserError, match=f"port {port} on 127.0.0.1 is in use; pick another with --port"):
            serve(str(tmp_path), port=port)


def test_backends_and_templates_are_checked(gpt2):
    check_backend("transformers")
    with pytest.raises(UserError, match="did you mean 'vllm'"):
        check_backend("vlm")
    try:
        import vllm  # noqa: F401
    except ImportError:
        with pytest.raises(UserError, match="pip install vllm"):
            check_backend("vllm")
    with pytest.raises(UserError, match="exactly one field"):
        create_app(gpt2, prompt_template="{question} {context}")
    with pytest.raises(UserError, match="max_batch_size"):
        create_app(gpt2, max_batch_size=0)


SERVER_SCRIPT = """
import sys
from llmcycle.serve.app import serve
serve(sys.argv[1], port=int(sys.argv[2]), model_name="t5", context_window=100_000, log_level="warning")
"""


@pytest.mark.slow
def test_sigterm_drains_requests_in_flight(tmp_path):
    """SIGTERM while a stream is in flight: the stream still gets every token and [DONE], new connections
    are refused, and the process exits."""
    model = make_t5(tmp_path / "model")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    proc = subprocess.Popen([sys.executable, "-c", SERVER_SCRIPT, str(model), str(port)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        def up():
            assert proc.poll() is None, proc.stdout.read()
            try:
                return httpx.get(f"{url}/health", timeout=2).status_code == 200
            except httpx.TransportError:
                return False

        _wait_for(up, 60)
        tokens = 500
        body = {"model": "t5", "prompt": "hello", "max_tokens": tokens, "ignore_eos": True, "stream": True,
                "stream_options": {"include_usage": True}}
        events = []
        with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=60) as r:
            for line in r.iter_lines():
                if not line:
                    continue
                events.append(line)
                if len(events) == 2:
                    proc.send_signal(signal.SIGTERM)
                    _wait_for(lambda: not up())  # draining: new connections are refused, the process lives
        assert len(events) > 100  # most of the stream came after the signal
        assert events[-1] == "data: [DONE]"
        usage = json.loads(events[-2][len("data: "):])["usage"]
        assert usage["completion_tokens"] == tokens
        finish = [json.loads(e[6:])["choices"][0]["finish_reason"] for e in events[:-2]]
        assert finish[-1] == "length"
        assert proc.wait(30) in (0, -signal.SIGTERM)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.slow
def test_load_500_requests_32_concurrent_without_server_errors(gpt2):
    app = create_app(gpt2, model_name="m", max_batch_size=16)
    statuses: list[int] = []

    def one(i: int, http) -> int:
        if i % 3 == 0:
            body = {"model": "m", "messages": [{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}],
                    "max_tokens": 4}
            return http.post("/v1/chat/completions", json=body).status_code
        body = {"model": "m", "prompt": PROMPTS[i % len(PROMPTS)], "max_tokens": 1 + i % 4, "stream": i % 3 == 1}
        with http.stream("POST", "/v1/completions", json=body) as r:
            text = "".join(r.iter_lines())
            assert r.status_code != 200 or not body["stream"] or text.endswith("data: [DONE]")
            return r.status_code

    with running(app) as url:
        start = time.perf_counter()
        local = threading.local()

        def task(i):
            if not hasattr(local, "http"):
                local.http = httpx.Client(base_url=url, timeout=60)
            return one(i, local.http)

        with concurrent.futures.ThreadPoolExecutor(32) as pool:
            statuses = list(pool.map(task, range(500)))
        wall = time.perf_counter() - start
        metrics = httpx.get(f"{url}/metrics").text
    assert len(statuses) == 500 and sum(s >= 500 for s in statuses) == 0 and set(statuses) == {200}
    steps = _metric(metrics, 'llmcycle_batch_size_count{model="m"}')
    rows = _metric(metrics, 'llmcycle_batch_size_sum{model="m"}')
    assert rows / steps > 2, "concurrent requests should share forward passes"
    assert wall < 60
