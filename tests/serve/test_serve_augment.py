"""RAG and PAL through the server: chat completions grounded in a tiny index (real all-MiniLM-L6-v2) with
citations, streamed citations, PAL programs run in the sandbox, per-request modes, and the errors (a
missing index at startup, a mode the server was not started with), all through the real `openai` client.

PAL's known-answer tests put a canned engine in place of the batching engine: it "generates" a fixed
program, so the test knows what the sandbox must print; everything around it (prompt, stop strings,
sandbox, response format) is the server's real code. A real tiny model runs PAL end to end too."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from llmcycle.evaluation import harness
from llmcycle.augment import rag
from llmcycle.serve.engine import Sequence
from llmcycle.core.errors import UserError
from llmcycle.augment.pal import PAL_STOP, extract_program, pal_prompt
from servers import running
from test_serve import client, one_thread  # noqa: F401  (one_thread: autouse fixture)
from tiny import DOCS, make_doc_index, make_gpt2

openai = pytest.importorskip("openai")
from llmcycle.serve.app import create_app, serve  # noqa: E402  (needs fastapi)
from llmcycle.augment.config import AugmentConfig
from llmcycle.serve.augment import Augmentation, settings

posix_only = pytest.mark.skipif(sys.platform == "win32", reason="the sandbox needs POSIX")
QUESTION = "Where is the Eiffel Tower?"
PAL = {"llmcycle": {"mode": "pal"}}


@pytest.fixture(scope="module")
def index_dir(tmp_path_factory):
    return make_doc_index(tmp_path_factory.mktemp("serve-rag"))


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_gpt2(tmp_path_factory.mktemp("gpt2"), n_positions=1024)


@pytest.fixture(scope="module")
def gpt2(model_dir):
    return harness.load(str(model_dir), device="cpu")


@pytest.fixture(scope="module")
def augment(index_dir):
    return Augmentation(AugmentConfig(rag={"index": str(index_dir), "k": 2}, pal={"shots": 0, "timeout_s": 10}))


@pytest.fixture(scope="module")
def url(gpt2, augment):
    with running(create_app(gpt2, model_name="m", augment=augment)) as base:
        yield base


class CannedEngine:
    """Stands in for the batching engine: every request "generates" `text`; the submissions are kept."""

    running = waiting = tokens_generated = cancelled = 0
    batch_sizes: dict = {}

    def __init__(self, text: str):
        self.text, self.submitted = text, []

    def start(self):
        return self

    def stop(self, timeout=None):
        pass

    def cancel(self, seq):
        pass

    def submit(self, ids, params, listener, stream=True):
        self.submitted.append((list(ids), params))
        seq = Sequence(ids, params, listener, stream)
        seq.text, seq.token_ids, seq.finish_reason = self.text, [0, 0, 0], "stop"
        listener(self.text, True)
        return seq


@pytest.fixture(scope="module")
def canned(gpt2, augment):
    app = create_app(gpt2, model_name="m", augment=augment)
    engine = app.state.served["m"].engine = CannedEngine("print(6 * 7)\n")
    with running(app) as base:
        yield base, engine


def ask(base, content=QUESTION, **kw):
    kw.setdefault("max_tokens", 4)
    return client(base).chat.completions.create(model="m", messages=[{"role": "user", "content": content}],
                                               temperature=0, **kw)


# -------------------------------------------------------------------------------------------------- RAG
def test_rag_answers_from_the_index_with_citations_of_real_sources(gpt2, url, augment):
    r = ask(url)
    cites = r.model_extra["citations"]
    assert [c["n"] for c in cites] == [1, 2] and Path(cites[0]["source"]).name == "tower.txt"
    for c in cites:
        assert Path(c["source"]).read_text(encoding="utf-8")[c["start"]:c["end"]] == c["text"]
    assert r.model_extra["retrieval"] == {"retrieved": 2, "dropped": 0}
    # the model saw the grounded prompt, exactly: the same as a raw completion of it
    count = lambda text: len(gpt2.tokenizer(text)["input_ids"])  # noqa: E731
    grounded = rag.assemble_prompt(QUESTION, augment.index.search(QUESTION, 2), count, gpt2.window - 4).prompt
    assert f"[1] {DOCS['tower.txt']}" in grounded and r.usage.prompt_tokens == count(grounded)
    plain = client(url).completions.create(model="m", prompt=grounded, max_tokens=4, temperature=0)
    assert r.choices[0].message.content == plain.choices[0].text


@pytest.mark.parametrize("include_usage", [False, True])
def test_rag_stream_ends_with_the_citations(url, include_usage):
    whole = ask(url, max_tokens=6)
    options = {"stream_options": {"include_usage": True}} if include_usage else {}
    chunks = list(ask(url, max_tokens=6, stream=True, **options))
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == whole.choices[0].message.content
    last = chunks[-1]
    assert last.choices == [] and last.model_extra["citations"] == whole.model_extra["citations"]
    assert (last.usage is not None) == include_usage
    assert all("citations" not in ch.model_extra for ch in chunks[:-1])


def test_a_request_may_opt_out_of_retrieval(url):
    r = ask(url, extra_body={"llmcycle": {"mode": "plain"}})
    assert "citations" not in r.model_extra and r.usage.prompt_tokens < 20


def test_rag_prompt_that_cannot_fit_is_a_400(url):
    with pytest.raises(openai.BadRequestError, match="over the prompt budget of 24 tokens") as err:
        ask(url, max_tokens=1000)
    assert err.value.body["code"] == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError, match="last message, which must be a non-empty user message"):
        client(url).chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"},
                                                                 {"role": "assistant", "content": "yes"}])


# -------------------------------------------------------------------------------------------------- PAL
@posix_only
def test_pal_runs_the_program_and_answers_with_what_it_printed(gpt2, canned):
    base, engine = canned
    r = ask(base, "What is 6 times 7?", extra_body=PAL, max_tokens=32)
    assert r.choices[0].message.content == "42" and r.model_extra["program"] == "print(6 * 7)"
    assert r.model_extra["sandbox"]["ok"] is True and r.model_extra["sandbox"]["stdout"] == "42\n"
    assert "citations" not in r.model_extra
    ids, params = engine.submitted[-1]
    assert ids == gpt2.generator.encode([pal_prompt("What is 6 times 7?", shots=())])[0]
    assert set(PAL_STOP) <= set(params.stop) and params.max_tokens == 32
    chunks = list(ask(base, "What is 6 times 7?", extra_body=PAL, stream=True))
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == "42"
    assert chunks[-1].choices == [] and chunks[-1].model_extra["program"] == "print(6 * 7)"


@posix_only
def test_pal_reports_a_program_the_sandbox_refuses(canned):
    base, engine = canned
    engine.text = "import os\nprint(os.getcwd())"
    try:
        r = ask(base, "Where am I?", extra_body=PAL)
    finally:
        engine.text = "print(6 * 7)\n"
    sandbox = r.model_extra["sandbox"]
    assert (sandbox["ok"], sandbox["failure"]) == (False, "forbidden")
    assert r.choices[0].message.content == "the program failed: forbidden import 'os' (line 1)"


@posix_only
def test_pal_with_a_real_tiny_model(gpt2, url):
    from llmcycle.models.generation import GenerationConfig

    question = "What is 2 plus 3?"
    r = ask(url, question, extra_body=PAL, max_tokens=10)
    prompt = pal_prompt(question, shots=())
    expected = gpt2.generator.generate([prompt], GenerationConfig(max_new_tokens=10, stop=PAL_STOP))[0].text
    assert r.model_extra["program"] == extract_program(expected)
    assert isinstance(r.choices[0].message.content, str) and r.choices[0].message.content
    assert set(r.model_extra["sandbox"]) == {"ok", "error", "failure", "stdout", "wall_s"}


# ----------------------------------------------------------------------------------------------- errors
def test_modes_the_server_was_not_started_with_are_400s(gpt2):
    with running(create_app(gpt2, model_name="m")) as base:
        for body, needle in ((PAL, "PAL is not enabled on this server"),
                             ({"llmcycle": {"mode": "rag"}}, "no retrieval index"),
                             ({"llmcycle": {"mode": "pla"}}, "'llmcycle.mode': expected one of"),
                             ({"llmcycle": {"mod": "pal"}}, "unknown key 'llmcycle.mod' \\(did you mean 'mode'")):
            with pytest.raises(openai.BadRequestError, match=needle) as err:
                ask(base, extra_body=body)
            assert err.value.status_code == 400 and err.value.body["type"] == "invalid_request_error"
            assert err.value.body["param"] == "llmcycle"
        assert "citations" not in ask(base).model_extra  # plain chat is untouched


def test_pal_answers_one_choice(url):
    with pytest.raises(openai.BadRequestError, match="one program per request") as err:
        ask(url, "2+2?", extra_body=PAL, n=2)
    assert err.value.body["param"] == "n"


def test_a_missing_index_stops_the_server_before_it_starts(tmp_path, model_dir, capsys):
    from llmcycle.cli import main

    with pytest.raises(UserError, match="no retrieval index here"):
        serve(str(model_dir), port=0, rag_index=str(tmp_path / "none"))
    (tmp_path / "llmcycle.yaml").write_text("project: {name: p}\nmodel: {name: m}\naugment: {rag: {index: idx}}\n")
    assert main(["serve", "--run", str(model_dir), "-p", str(tmp_path / "llmcycle.yaml"), "--port", "0"]) == 2
    assert f"{tmp_path / 'idx'}: no retrieval index here" in capsys.readouterr().err
    assert main(["serve", "--run", str(model_dir), "--rag-index", str(tmp_path / "none"), "--port", "0"]) == 2
    assert "no retrieval index here" in capsys.readouterr().err


def test_settings_merge_the_project_file_and_the_flags(tmp_path):
    from llmcycle.project.config import load_project

    (tmp_path / "llmcycle.yaml").write_text("augment:\n  rag: {index: idx, k: 3}\n  pal: {timeout_s: 2}\n")
    project = load_project(tmp_path)
    cfg = settings(project)
    assert cfg.rag.index == str((tmp_path / "idx").resolve()) and cfg.rag.k == 3 and cfg.pal.timeout_s == 2
    cfg = settings(project, rag_index="other", pal=False)
    assert cfg.rag.index == str(Path("other").resolve()) and cfg.rag.k == 3 and cfg.pal is None
    assert settings(None) is None and settings(None, pal=True).pal.timeout_s == 5
    assert json.dumps(settings(None, pal=True).model_dump())
