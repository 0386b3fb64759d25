"""`llmcycle eval --endpoint` (llmcycle/evaluation/endpoint.py) against stub OpenAI-compatible servers: the
prompts and parameters sent, retries with backoff and Retry-After, timeouts, malformed answers, an unknown
model, bounded concurrency, resuming a failed evaluation without asking again, prompts refused as too long,
usage and cost, bad options; and an endpoint as a select candidate."""
import asyncio
import json
import socket
import threading
import time
from collections import Counter

import pytest

from llmcycle.cli import main
from llmcycle.core.store import RunStore
from llmcycle.evaluation import metrics
from llmcycle.evaluation.endpoint import JOURNAL, endpoint
from llmcycle.evaluation.evaluate import evaluate_endpoint
from llmcycle.project import lifecycle
from llmcycle.project.config import load_project
from servers import running
from tiny import make_t5

TEMPLATE = "Summarize: {dialogue} Summary:"
ROWS = [{"dialogue": f"#A#: I lost key number {i}. #B#: Look under the mat {i}.",
         "summary": f"A lost key {i}.", "summary2": f"Key {i} is lost."} for i in range(12)]


def make_project(root, extra: str = "") -> str:
    (root / "eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    (root / "llmcycle.yaml").write_text(f"""project: {{name: ep, task: summarization}}
data: {{train: eval.jsonl, eval: eval.jsonl, input: dialogue, target: [summary, summary2]}}
evaluate:
  template: "{TEMPLATE}"
  system: "Be brief."
  min_examples: 1
  generation: {{max_new_tokens: 8}}
{extra}""")
    return str(root / "llmcycle.yaml")


def reply(prompt: str) -> str:
    """What the stub answers: the dialogue the template was rendered on, first four words."""
    return " ".join(prompt.removeprefix("Summarize: ").removesuffix(" Summary:").split()[:4])


class Stub:
    """An OpenAI-compatible stand-in that records every request. `script(n, body)` decides the fate of the
    n-th completion request: None answers it, a Response is sent as it is, "hang" waits until `release`."""

    def __init__(self, models=("stub",), script=None, delay: float = 0.0):
        self.models, self.script, self.delay = models, script, delay
        self.requests, self.answered = [], Counter()  # bodies received; prompt -> 200 answers
        self.in_flight = self.max_in_flight = 0
        self.release = threading.Event()

    def app(self):
        from fastapi import FastAPI, Request

        app = FastAPI()

        @app.get("/v1/models")
        async def models():
            return {"object": "list", "data": [{"id": m, "object": "model"} for m in self.models]}

        @app.post("/v1/chat/completions")
        async def chat(request: Request):
            return await self.answer(await request.json(), chat=True)

        @app.post("/v1/completions")
        async def completions(request: Request):
            return await self.answer(await request.json(), chat=False)

        return app

    async def answer(self, body: dict, chat: bool):
        self.requests.append(body)
        fate = self.script(len(self.requests), body) if self.script else None
        if fate == "hang":
            while not self.release.is_set():
                await asyncio.sleep(0.02)
        elif fate is not None:
            return fate
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            await asyncio.sleep(self.delay)
        finally:
            self.in_flight -= 1
        prompt = body["messages"][-1]["content"] if chat else body["prompt"]
        self.answered[prompt] += 1
        text = reply(prompt)
        choice = {"message": {"role": "assistant", "content": text}} if chat else {"text": text}
        return {"choices": [{"index": 0, **choice, "finish_reason": "stop"}],
                "usage": {"prompt_tokens": 10, "completion_tokens": 4, "total_tokens": 14}}


def error(status: int, message: str = "busy", headers=None, code=None):
    from fastapi.responses import JSONResponse

    return JSONResponse({"error": {"message": message, "type": "x", "param": None, "code": code}},
                        status_code=status, headers=headers)


def cli(capsys, *args) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def eval_json(capsys, path, url, *args) -> dict:
    code, out, err = cli(capsys, "eval", "-p", path, "--endpoint", f"{url}/v1", "--model", "stub", "--json", *args)
    assert code == 0, err
    return json.loads(out)


def test_the_prompt_turns_and_generation_settings_are_sent_and_scored_like_a_local_eval(tmp_path, capsys):
    path = make_project(tmp_path, "  limit: 5\n")
    stub = Stub()
    with running(stub.app()) as url:
        summary = eval_json(capsys, path, url, "--price-per-1k-input", "0.5", "--price-per-1k-output", "2")
    first = stub.requests[0]
    assert first["messages"] == [{"role": "system", "content": "Be brief."},
                                 {"role": "user", "content": TEMPLATE.format(dialogue=ROWS[0]["dialogue"])}]
    assert first["temperature"] == 0 and first["max_tokens"] == 8 and "raw" not in first
    run_dir = tmp_path / "runs" / summary["run_id"]
    rows = [json.loads(line) for line in (run_dir / "artifacts/predictions.jsonl").read_text().splitlines()]
    predictions = [reply(TEMPLATE.format(dialogue=r["dialogue"])) for r in ROWS[:5]]
    assert [r["prediction"] for r in rows] == predictions
    assert rows[0]["prompt"] == "Be brief.\n\n" + TEMPLATE.format(dialogue=ROWS[0]["dialogue"])
    expected, _ = metrics.compute_all("summarization", predictions, [[r["summary"], r["summary2"]] for r in ROWS[:5]])
    assert summary["rougeL"] == pytest.approx(expected["rougeL"]) and summary["headline"] == "rougeL"
    assert summary["n_examples"] == 5 and summary["eval_skipped"] == 0 and summary["endpoint"] == f"{url}/v1"
    assert summary["usage_prompt_tokens"] == 50 and summary["usage_completion_tokens"] == 20
    assert summary["cost_usd"] == pytest.approx(50 / 1000 * 0.5 + 20 / 1000 * 2)
    assert summary["retries"] == 0 and summary["asked"] == 5 and summary["served_run"] is None
    assert len((run_dir / "artifacts" / JOURNAL).read_text().splitlines()) == 5


def test_completions_send_the_flat_prompt(tmp_path, capsys):
    path = make_project(tmp_path, "  limit: 2\n")
    stub = Stub()
    with running(stub.app()) as url:
        summary = eval_json(capsys, path, url, "--completions")
    assert stub.requests[0]["prompt"] == "Be brief.\n\n" + TEMPLATE.format(dialogue=ROWS[0]["dialogue"])
    assert summary["api"] == "completions" and summary["n_examples"] == 2


def test_429_and_5xx_are_retried_with_backoff_and_retry_after(tmp_path):
    fates = {1: error(429, "slow down", {"Retry-After": "1"}), 2: error(429, "again", {"Retry-After": "0"}),
             3: error(500, "oops"), 4: error(503, "overloaded")}
    stub = Stub(script=lambda n, body: fates.get(n))
    project = load_project(make_project(tmp_path, "  limit: 3\n"))
    with running(stub.app()) as url:
        ep = endpoint(f"{url}/v1", "stub", concurrency=1, retries=4)
        ep.backoff_s = 0.05  # 0.05 s, 0.1 s, ...: the test need not wait for the default 0.5 s
        with project.store().start("eval", "flaky", {}) as run:
            start = time.perf_counter()
            summary = evaluate_endpoint(project, run, ep, progress=False)
    assert time.perf_counter() - start >= 1.0  # the first Retry-After was obeyed
    assert summary["retries"] == 4 and len(stub.requests) == 7 and summary["n_examples"] == 3
    assert all(n == 1 for n in stub.answered.values()) and len(stub.answered) == 3


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("case", ["hangs", "malformed", "unknown model", "down", "unauthorized"])
def test_a_broken_endpoint_is_a_one_line_error(tmp_path, capsys, case):
    from fastapi.responses import Response

    path = make_project(tmp_path, "  limit: 2\n")
    script = {"hangs": lambda n, b: "hang", "malformed": lambda n, b: Response("<html>oops", media_type="text/html"),
              "unauthorized": lambda n, b: error(401, "bad key")}.get(case)
    stub = Stub(models=("other-model",) if case == "unknown model" else ("stub",), script=script)
    expected = {"hangs": "no answer within --timeout 0.3 s, 2 attempts (--retries 1)",
                "malformed": "with a body that is not a JSON object ('<html>oops')",
                "unknown model": "--model 'stub': ", "down": "cannot connect",
                "unauthorized": "HTTP 401 (bad key); check --api-key-env"}[case]
    with running(stub.app()) as url:
        url = f"http://127.0.0.1:{free_port()}" if case == "down" else url
        try:
            code, out, err = cli(capsys, "eval", "-p", path, "--endpoint", url, "--model", "stub", "--timeout",
                                 "0.3", "--retries", "1", "--json")
        finally:
            stub.release.set()
    assert code == 2 and out == "" and len(err.strip().splitlines()) == 1, err
    assert expected in err
    if case == "unknown model":
        assert "does not serve it (its /models lists: other-model)" in err
    status = [r.status for r in RunStore.for_project(tmp_path).list()]
    assert status == ([] if case in ("unknown model", "down") else ["failed"]) or status == ["failed"]


@pytest.mark.parametrize("args, expected", [
    (["--api-key-env", "LLMCYCLE_TEST_NO_SUCH_KEY"], "the environment variable LLMCYCLE_TEST_NO_SUCH_KEY is not set"),
    (["--price-per-1k-input", "-1", "--price-per-1k-output", "1"], "'--price-per-1k-input': Input should be greater than or equal to 0"),
    (["--price-per-1k-input", "1"], "--price-per-1k-input and --price-per-1k-output go together"),
    (["--endpoint", "localhost:8000"], "--endpoint 'localhost:8000': give the API's base URL"),
    (["--concurrency", "0"], "'--concurrency': Input should be greater than or equal to 1"),
])
def test_bad_endpoint_options_are_one_line_errors(tmp_path, capsys, monkeypatch, args, expected):
    monkeypatch.delenv("LLMCYCLE_TEST_NO_SUCH_KEY", raising=False)
    path = make_project(tmp_path)
    base = [] if "--endpoint" in args else ["--endpoint", "http://127.0.0.1:9/v1"]
    code, out, err = cli(capsys, "eval", "-p", path, "--model", "stub", *base, *args)
    assert code == 2 and len(err.strip().splitlines()) == 1 and expected in err, err


def test_endpoint_options_need_an_endpoint_and_bad_generation_settings_are_refused(tmp_path, capsys):
    path = make_project(tmp_path)
    code, _, err = cli(capsys, "eval", "-p", path, "--model", "x", "--concurrency", "2")
    assert code == 2 and "--concurrency applies to an endpoint: add --endpoint URL" in err
    code, _, err = cli(capsys, "eval", "-p", path, "--endpoint", "http://127.0.0.1:9/v1", "--model", "stub",
                       "--set", "evaluate.generation.no_repeat_ngram_size=3")
    assert code == 2 and "evaluate.generation.no_repeat_ngram_size 3 has no OpenAI API parameter" in err


def test_a_failed_evaluation_resumes_without_asking_again(tmp_path, capsys):
    path = make_project(tmp_path)
    stub = Stub()
    admitted = []  # counted when the script lets a request through: `answered` lags while requests are in flight

    def script(n, body):
        if stub.limit and len(admitted) >= stub.limit:
            return error(500, "gone")
        admitted.append(n)
        return None

    stub.script, stub.limit = script, 5
    with running(stub.app()) as url:
        args = ["eval", "-p", path, "--endpoint", f"{url}/v1", "--model", "stub", "--retries", "1", "--json"]
        code, _, err = cli(capsys, *args, "--concurrency", "3")
        assert code == 2 and "answers are kept in" in err and "--resume" in err, err
        store = RunStore.for_project(tmp_path)
        failed = store.list("eval")[0]
        assert failed.status == "failed" and sum(stub.answered.values()) == 5
        with open(failed.artifacts / JOURNAL, "a") as fh:
            fh.write('{"where": "torn by a kil')  # a kill in the middle of a line: ignored when read back
        stub.limit = None
        code, out, err = cli(capsys, *args, "--resume")
        assert code == 0, err
        summary = json.loads(out)
        code, _, again = cli(capsys, *args, "--resume")  # nothing left to resume
    assert summary["run_id"] == failed.id and store.get(failed.id).status == "completed"
    assert summary["n_examples"] == 12 and summary["asked"] == 7 and summary["reused_answers"] == 5
    assert len(stub.answered) == 12 and set(stub.answered.values()) == {1}  # each example answered once
    assert code == 2 and "--resume: no failed or incomplete evaluation of stub" in again


def test_concurrency_is_bounded(tmp_path, capsys):
    path = make_project(tmp_path)
    stub = Stub(delay=0.1)
    with running(stub.app()) as url:
        summary = eval_json(capsys, path, url, "--concurrency", "3")
    assert 2 <= stub.max_in_flight <= 3 and summary["n_examples"] == 12 and summary["concurrency"] == 3
    assert "latency_p95_ms" not in summary and summary["request_ms_p95"] >= 100  # a lone request's only at 1


def test_prompts_refused_as_too_long_are_skipped_and_counted(tmp_path, capsys):
    long = {2, 7}
    path = make_project(tmp_path)
    stub = Stub(script=lambda n, body: error(400, "This model's maximum context length is 16 tokens", code=None)
                if any(f"key number {i}." in body["messages"][-1]["content"] for i in long) else None)
    with running(stub.app()) as url:
        summary = eval_json(capsys, path, url, "--concurrency", "1")
        assert summary["n_examples"] == 10 and summary["eval_skipped"] == 2
        assert summary["eval_skipped_examples"] == [f"eval.jsonl:{i + 1}" for i in sorted(long)]
        code, _, err = cli(capsys, "eval", "-p", path, "--endpoint", f"{url}/v1", "--model", "stub",
                           "--set", "evaluate.on_overflow=refuse")
    assert code == 2 and "does not fit the endpoint's context window" in err


# ---------------------------------------------------------------------------- select candidates
def select_project(root, url: str, probe: bool = False) -> str:
    make_t5(root / "t5")
    probe_cfg = "  probe: {method: full, steps: 1, batch_size: 4}\n" if probe else ""
    return make_project(root, f"""select:
  candidates:
    local: {{model: t5}}
    hosted: {{endpoint: "{url}/v1", model: stub, concurrency: 2}}
  latency_samples: 2
{probe_cfg}""")


def test_an_endpoint_is_a_select_candidate(tmp_path):
    stub = Stub()
    stub.script = lambda n, body: error(500, "gone") if stub.limit and sum(stub.answered.values()) >= stub.limit else None
    stub.limit = 4
    with running(stub.app()) as url:
        project = load_project(select_project(tmp_path, url))
        failed = lifecycle.execute_variant(project, "select", "hosted", progress=False)
        assert failed.status == "failed" and "4 of 12 answers are kept" in failed.summary["error"]
        stub.limit = None
        outcomes = [lifecycle.execute_variant(project, "select", name, progress=False)
                    for name in lifecycle.variants(project, "select")]
    assert [o.status for o in outcomes] == ["completed"] * 3
    hosted, best = outcomes[1].summary, outcomes[2].summary
    assert hosted["source"] == "endpoint" and hosted["size_mb"] is None and hosted["parameters"] is None
    assert hosted["latency_samples"] == 2 and hosted["latency_p95_ms"] >= hosted["latency_p50_ms"] > 0
    assert hosted["n_examples"] == 12 and hosted["reused_answers"] == 4 and hosted["fits_budget"]
    # each example asked once (the 4 kept answers were not asked again), then the latency sample: a warm-up
    # and the first two prompts, one at a time
    assert len(stub.answered) == 12 and sum(stub.answered.values()) == 12 + 1 + 2
    # the echoing stub beats a random tiny T5, so it is chosen; later stages cannot load it and say why
    assert best["chosen"] == "hosted"
    with pytest.raises(Exception, match="behind the endpoint .* no local weights"):
        project.store().resolve_model("select/best")


def test_an_endpoint_candidate_cannot_be_probed_or_misconfigured(tmp_path):
    project = load_project(select_project(tmp_path, "http://127.0.0.1:9", probe=True))
    outcome = lifecycle.execute_variant(project, "select", "hosted", progress=False)
    assert outcome.status == "failed" and "no local weights for select.probe" in outcome.summary["error"]
    (tmp_path / "bad.yaml").write_text((tmp_path / "llmcycle.yaml").read_text().replace(
        "local: {model: t5}", "local: {model: t5, retries: 2}"))
    with pytest.raises(Exception, match="retries applies to an endpoint candidate"):
        load_project(tmp_path / "bad.yaml")
