"""A model behind any OpenAI-compatible endpoint (llmcycle serve, vLLM, a hosted API) as an evaluation sees it.

    llmcycle eval --endpoint URL --model NAME [--api-key-env VAR] [--chat|--completions] [--concurrency N]
                  [--timeout S] [--retries N] [--price-per-1k-input X --price-per-1k-output Y] [--resume]

The prompt is the one a local model gets (data.prompting.build_prompt): /v1/chat/completions receives its
chat turns (system, shots, history, and the project's template rendered on the example as the last user
message), /v1/completions its flat text. The template is applied here, because a foreign endpoint does not
know it; `llmcycle serve` recognises a last message that already is a rendering of its template and does
not wrap it twice, so the same request is right for both. The project's generation settings become
OpenAI parameters (greedy = temperature 0); a setting the API has no parameter for is refused rather
than silently dropped.

Requests run `concurrency` at a time, each with a timeout, retried with exponential backoff (or the
server's Retry-After) on 429, 5xx, timeouts and connection errors. Every answer is appended to a journal
(artifacts/endpoint_results.jsonl, flushed and fsynced per line) as it arrives, so an evaluation that was
killed or failed continues where it stopped without asking again for what was answered.

httpx is imported inside functions: importing llmcycle stays fast.
"""
from __future__ import annotations

import asyncio
import email.utils
import hashlib
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from llmcycle.core.errors import UserError, suggest
from llmcycle.core.progress import bar
from llmcycle.data.prompting import messages_of
from llmcycle.evaluation.harness import percentile

API_KINDS = ("chat", "completions")
JOURNAL = "endpoint_results.jsonl"
# Generation settings the OpenAI API has no parameter for, with the value that means "off".
UNMAPPED = {"num_beams": 1, "repetition_penalty": 1.0, "no_repeat_ngram_size": 0}
MAX_RETRY_AFTER_S = 300.0  # a server asking for longer is obeyed only this far
# How the command line names each setting; a select candidate names them by its own keys.
CLI_NAMES = {"url": "--endpoint", "model": "--model", "api": "--chat/--completions", "api_key_env": "--api-key-env",
             "concurrency": "--concurrency", "timeout": "--timeout", "retries": "--retries",
             "price_in": "--price-per-1k-input", "price_out": "--price-per-1k-output"}


@dataclass
class Endpoint:
    url: str  # the API's base URL, ending in /v1 (or wherever its /models and /chat/completions live)
    model: str
    api: str = "chat"
    api_key: str | None = field(default=None, repr=False)  # read from api_key_env; never recorded
    api_key_env: str | None = None
    concurrency: int = 4
    timeout_s: float = 60.0
    retries: int = 3
    price_in: float | None = None  # USD per 1000 prompt tokens
    price_out: float | None = None  # USD per 1000 completion tokens
    backoff_s: float = 0.5  # the first retry's wait, doubled for each further one
    names: dict = field(default_factory=lambda: dict(CLI_NAMES), repr=False)  # for error messages

    def record(self) -> dict:
        """What a run records about the endpoint (no secrets)."""
        return {"endpoint": self.url, "endpoint_model": self.model, "api": self.api,
                "api_key_env": self.api_key_env, "concurrency": self.concurrency, "timeout_s": self.timeout_s,
                "max_retries": self.retries}

    @property
    def path(self) -> str:
        return "/chat/completions" if self.api == "chat" else "/completions"


def endpoint(url: str, model: str | None, *, api: str | None = None, api_key_env: str | None = None,
             concurrency: int | None = None, timeout: float | None = None, retries: int | None = None,
             price_in: float | None = None, price_out: float | None = None, names: dict | None = None) -> Endpoint:
    """The endpoint settings, checked: each bad value is a one-line error naming its option (`names`)."""
    names = names or CLI_NAMES
    ep = Endpoint(_base_url(url, names["url"]), model or "", api or "chat", None, api_key_env,
                  4 if concurrency is None else concurrency, 60.0 if timeout is None else timeout,
                  3 if retries is None else retries, price_in, price_out, names=names)
    if not ep.model.strip():
        raise UserError(f"{names['url']} needs {names['model']} NAME: the model the endpoint serves "
                        "(its GET /models lists the names)")
    if ep.api not in API_KINDS:
        raise UserError(f"{names['api']}: unknown API '{ep.api}'{suggest(ep.api, API_KINDS)} "
                        f"(choices: {', '.join(API_KINDS)})")
    for key, value, low in (("concurrency", ep.concurrency, 1), ("retries", ep.retries, 0)):
        if value < low:
            raise UserError(f"{names[key]} must be at least {low}, got {value}")
    if not ep.timeout_s > 0:
        raise UserError(f"{names['timeout']} must be more than 0 seconds, got {ep.timeout_s:g}")
    _check_prices(ep, names)
    if api_key_env is not None:
        ep.api_key = os.environ.get(api_key_env) or None
        if ep.api_key is None:
            raise UserError(f"{names['api_key_env']} {api_key_env}: the environment variable {api_key_env} is not "
                            f"set (export {api_key_env}=KEY, or leave {names['api_key_env']} out for an endpoint "
                            "without a key)")
    return ep


def _base_url(url: str, name: str) -> str:
    """The base URL without a trailing slash; a bare host gets /v1, where OpenAI-compatible servers answer."""
    from urllib.parse import urlsplit

    parts = urlsplit(url or "")
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise UserError(f"{name} {url!r}: give the API's base URL, e.g. http://127.0.0.1:8000/v1")
    url = url.rstrip("/")
    return url if parts.path.strip("/") else url + "/v1"


def _check_prices(ep: Endpoint, names: dict) -> None:
    for key in ("price_in", "price_out"):
        value = getattr(ep, key)
        if value is not None and not value >= 0:
            raise UserError(f"{names[key]} must be 0 or more (USD per 1000 tokens), got {value:g}")
    if (ep.price_in is None) != (ep.price_out is None):
        raise UserError(f"{names['price_in']} and {names['price_out']} go together: give both (0 for a side "
                        "that is free) so that the cost counts every token")


def openai_params(gen) -> dict:
    """The project's generation settings (a GenerationConfig) as OpenAI request parameters."""
    for key, neutral in UNMAPPED.items():
        if getattr(gen, key) != neutral:
            raise UserError(f"evaluate.generation.{key} {getattr(gen, key)} has no OpenAI API parameter: an endpoint "
                            f"would generate without it, so its outputs would not be comparable; set it to {neutral} "
                            f"(--set evaluate.generation.{key}={neutral}) to evaluate an endpoint")
    params = {"max_tokens": gen.max_new_tokens}
    if not gen.do_sample:
        params["temperature"] = 0  # greedy: the most likely token, as a local evaluation takes it
    else:
        if gen.top_k:
            raise UserError(f"evaluate.generation.top_k {gen.top_k} has no OpenAI API parameter; set it to 0 "
                            "(--set evaluate.generation.top_k=0) to evaluate an endpoint")
        params.update(temperature=gen.temperature, seed=gen.seed)
        if gen.top_p is not None:
            params["top_p"] = gen.top_p
    if gen.stop:
        params["stop"] = list(gen.stop)
    return params


def request_body(ep: Endpoint, prompt, params: dict) -> dict:
    """One request: the prompt's chat turns (chat) or its flat text (completions), and the parameters."""
    if ep.api == "chat":
        return {"model": ep.model, "messages": messages_of(prompt), **params}
    return {"model": ep.model, "prompt": str(prompt), **params}


def request_key(body: dict) -> str:
    """What identifies a request in the journal: an answer is reused only for the very same request."""
    return hashlib.sha256(json.dumps(body, sort_keys=True, ensure_ascii=False).encode()).hexdigest()[:20]


# ------------------------------------------------------------------------------------------ journal
class Journal:
    """The answers received so far, one JSON line each, appended as they arrive and fsynced, so a killed
    process loses at most the line it was writing (a torn last line is ignored when read back)."""

    def __init__(self, path: Path, earlier=()):
        self.path = Path(path)
        self.done: dict[tuple[str, str], dict] = {}
        for source in [*earlier, self.path]:
            self._read(Path(source))
        self._fh = None

    def _read(self, path: Path) -> None:
        if not path.is_file():
            return
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                rec = json.loads(line)
                self.done[(rec["where"], rec["key"])] = rec
            except (ValueError, KeyError, TypeError):
                continue  # the line a kill cut short

    def get(self, where: str, key: str) -> dict | None:
        return self.done.get((where, key))

    def add(self, rec: dict) -> None:
        if self._fh is None:
            self._fh = open(self.path, "a", encoding="utf-8")
        self._fh.write(json.dumps(rec, ensure_ascii=False) + "\n")
        self._fh.flush()
        os.fsync(self._fh.fileno())
        self.done[(rec["where"], rec["key"])] = rec

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None


# --------------------------------------------------------------------------------------------- HTTP
class Refused(UserError):
    """The endpoint answered 4xx (other than 429): asking again would not help."""

    def __init__(self, message: str, status: int, code: str | None, detail: str):
        super().__init__(message)
        self.status, self.code, self.detail = status, code, detail

    @property
    def too_long(self) -> bool:
        """The prompt does not fit the model's window (OpenAI's code; vLLM says it in words)."""
        return self.status == 400 and (self.code == "context_length_exceeded"
                                       or "maximum context length" in self.detail.lower())


@dataclass
class Stats:
    retries: int = 0  # attempts beyond the first, over all requests


def _client(ep: Endpoint):
    try:
        import httpx
    except ImportError:
        raise UserError("evaluating an endpoint needs httpx: pip install httpx") from None
    headers = {"Authorization": f"Bearer {ep.api_key}"} if ep.api_key else {}
    return httpx.AsyncClient(base_url=ep.url, headers=headers, timeout=ep.timeout_s,
                             limits=httpx.Limits(max_connections=ep.concurrency))


def _error_detail(resp) -> tuple[str, str | None]:
    """(message, code) of an error response: OpenAI's {"error": {...}}, else the start of the body."""
    try:
        err = resp.json().get("error")
        if isinstance(err, dict):
            return str(err.get("message") or ""), err.get("code")
        if isinstance(err, str):
            return err, None
    except (ValueError, AttributeError):
        pass
    return resp.text[:120].replace("\n", " "), None


def _retry_after(resp) -> float | None:
    """The server's Retry-After in seconds (a number or an HTTP date), when it sent one."""
    value = resp.headers.get("retry-after")
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        try:
            seconds = email.utils.parsedate_to_datetime(value).timestamp() - time.time()
        except (TypeError, ValueError):
            return None
    return min(max(seconds, 0.0), MAX_RETRY_AFTER_S)


def _json(ep: Endpoint, path: str, resp) -> dict:
    try:
        data = resp.json()
    except ValueError:
        data = None
    if not isinstance(data, dict):
        snippet = resp.text[:80].replace("\n", " ")
        raise UserError(f"{ep.url}{path} answered HTTP {resp.status_code} with a body that is not a JSON object "
                        f"({snippet!r}): is {ep.names['url']} the base URL of an OpenAI-compatible API?")
    return data


async def call(http, ep: Endpoint, method: str, path: str, body: dict | None, stats: Stats) -> tuple[dict, float]:
    """One API call, retried on 429, 5xx, timeouts and connection errors: (its JSON, seconds the answered
    attempt took). A one-line UserError once the retries are spent; Refused for any other 4xx."""
    import httpx

    problem, wait = "", 0.0
    for attempt in range(ep.retries + 1):
        if attempt:
            stats.retries += 1
            await asyncio.sleep(wait)
        backoff = ep.backoff_s * 2 ** attempt
        start = time.perf_counter()
        try:
            resp = await http.request(method, path, json=body)
        except httpx.TimeoutException:
            problem, wait = f"no answer within {ep.names['timeout']} {ep.timeout_s:g} s", backoff
            continue
        except httpx.TransportError as exc:
            problem, wait = f"cannot connect ({type(exc).__name__}: {exc or 'no detail'})", backoff
            continue
        if resp.status_code == 429 or resp.status_code >= 500:
            message, _ = _error_detail(resp)
            problem = f"HTTP {resp.status_code} ({message})" if message else f"HTTP {resp.status_code}"
            wait = _retry_after(resp) if _retry_after(resp) is not None else backoff
            continue
        if resp.status_code >= 400:
            message, code = _error_detail(resp)
            raise Refused(f"{ep.url}{path} refused the request: HTTP {resp.status_code} ({message})"
                          + (f"; check {ep.names['api_key_env']}" if resp.status_code in (401, 403) else ""),
                          resp.status_code, code, message)
        return _json(ep, path, resp), time.perf_counter() - start
    raise UserError(f"{ep.url}{path}: {problem}, {ep.retries + 1} attempts ({ep.names['retries']} {ep.retries})")


async def check_model(http, ep: Endpoint, stats: Stats) -> None:
    """The endpoint lists the model (GET /models) before any example is sent."""
    data, _ = await call(http, ep, "GET", "/models", None, stats)
    try:
        ids = [str(m["id"]) for m in data["data"]]
    except (KeyError, TypeError):
        raise UserError(f"{ep.url}/models answered without a model list (data[].id): is {ep.names['url']} the "
                        "base URL of an OpenAI-compatible API?") from None
    if ep.model not in ids:
        raise UserError(f"{ep.names['model']} {ep.model!r}: {ep.url} does not serve it{suggest(ep.model, ids)} "
                        f"(its /models lists: {', '.join(ids[:10]) or 'nothing'})")


def parse_answer(ep: Endpoint, data: dict) -> dict:
    """The answer's text, finish reason and token usage (None where the endpoint reports none)."""
    try:
        choice = data["choices"][0]
        text = choice["message"]["content"] if ep.api == "chat" else choice["text"]
    except (KeyError, IndexError, TypeError):
        where = "choices[0].message.content" if ep.api == "chat" else "choices[0].text"
        raise UserError(f"{ep.url}{ep.path} answered without {where} ({json.dumps(data)[:80]}): is it an "
                        "OpenAI-compatible API?") from None
    usage = data.get("usage") if isinstance(data.get("usage"), dict) else {}

    def tokens(key):
        value = usage.get(key)
        return value if isinstance(value, int) and not isinstance(value, bool) else None

    return {"text": text if isinstance(text, str) else "", "finish_reason": choice.get("finish_reason") or "unknown",
            "prompt_tokens": tokens("prompt_tokens"), "completion_tokens": tokens("completion_tokens")}


# ------------------------------------------------------------------------------------ many requests
@dataclass
class Answers:
    """What the endpoint answered for each request (by position), and how the asking went."""

    results: dict[int, dict]  # position -> the journal's record: text, finish_reason, tokens, latency_ms
    skipped: dict[int, str]  # position -> why the endpoint refused it as too long
    asked: list[int]  # positions asked in this call (the others' answers came from the journal)
    retries: int
    wall_s: float  # time spent asking in this call


def answer_all(ep: Endpoint, wheres: list[str], bodies: list[dict], journal: Journal, *, on_overflow: str = "skip",
               progress: bool = True, label: str = "endpoint", resume_hint: str = "") -> Answers:
    """Every request answered, from the journal when it already holds the answer, else asked at most
    `ep.concurrency` at a time. A request that keeps failing stops the asking (the requests in flight
    finish and are kept) with a one-line error that ends with `resume_hint`."""
    keys = [request_key(b) for b in bodies]
    todo = [i for i, (w, k) in enumerate(zip(wheres, keys)) if journal.get(w, k) is None]
    stats, start, done = Stats(), time.perf_counter(), [len(bodies) - len(todo)]
    try:
        with bar(len(bodies), label, enabled=progress) as update:
            update(done[0])

            def advance():
                done[0] += 1
                update(done[0])

            asyncio.run(_ask_all(ep, [(i, wheres[i], keys[i], bodies[i]) for i in todo], journal, stats,
                                 on_overflow, advance))
    except UserError as exc:
        kept = sum(journal.get(w, k) is not None for w, k in zip(wheres, keys))
        if not kept:
            raise
        raise UserError(f"{exc}; {kept} of {len(bodies)} answers are kept in {journal.path}"
                        + (f" ({resume_hint})" if resume_hint else "")) from None
    finally:
        journal.close()
    records = [journal.get(w, k) for w, k in zip(wheres, keys)]
    return Answers({i: r for i, r in enumerate(records) if "skipped" not in r},
                   {i: r["skipped"] for i, r in enumerate(records) if "skipped" in r},
                   todo, stats.retries, time.perf_counter() - start)


async def _ask_all(ep: Endpoint, jobs: list[tuple], journal: Journal, stats: Stats, on_overflow: str,
                   advance) -> None:
    """`ep.concurrency` workers take the jobs in order; the first error stops them taking more."""
    async with _client(ep) as http:
        await check_model(http, ep, stats)
        queue, errors = list(reversed(jobs)), []

        async def worker():
            while queue and not errors:
                job = queue.pop()
                try:
                    journal.add(await _ask(http, ep, job, stats, on_overflow))
                except UserError as exc:
                    errors.append(exc)
                    return
                advance()

        await asyncio.gather(*(worker() for _ in range(min(ep.concurrency, len(jobs)))))
        if errors:
            raise errors[0]


async def _ask(http, ep: Endpoint, job: tuple, stats: Stats, on_overflow: str) -> dict:
    """One example's journal record: the answer, or that the endpoint refused its prompt as too long."""
    _, where, key, body = job
    try:
        data, seconds = await call(http, ep, "POST", ep.path, body, stats)
    except Refused as exc:
        if not exc.too_long:
            raise
        if on_overflow == "refuse":
            raise UserError(f"{where}: the prompt does not fit the endpoint's context window ({exc.detail}); "
                            "evaluate.on_overflow: skip leaves such examples out (counted)") from None
        return {"where": where, "key": key, "skipped": exc.detail}
    return {"where": where, "key": key, **parse_answer(ep, data), "latency_ms": round(seconds * 1000, 3)}


def lone_latency(ep: Endpoint, bodies: list[dict], n: int) -> dict:
    """p50 / p95 milliseconds of the first n requests sent one at a time (after one warm-up request), as
    select times a local candidate's lone request."""
    sample = bodies[:n]
    if not sample:
        return {}

    async def timed() -> list[float]:
        stats, times = Stats(), []
        async with _client(ep) as http:
            await call(http, ep, "POST", ep.path, sample[0], stats)  # warm-up: a cold cache is nobody's latency
            for body in sample:
                start = time.perf_counter()
                await call(http, ep, "POST", ep.path, body, stats)
                times.append((time.perf_counter() - start) * 1000)
        return times

    times = asyncio.run(timed())
    return {"latency_p50_ms": round(percentile(times, 50), 3), "latency_p95_ms": round(percentile(times, 95), 3),
            "latency_samples": len(sample)}


def figures(ep: Endpoint, answers: Answers, kept: list[int]) -> dict:
    """Throughput, per-request latency, token usage and cost of the scored answers. Latency under
    concurrency includes the server's queue, so it is a lone request's latency only at concurrency 1."""
    recs = [answers.results[i] for i in kept]
    latencies = [r["latency_ms"] for r in recs if isinstance(r.get("latency_ms"), (int, float))]
    prompt = [r["prompt_tokens"] for r in recs if r.get("prompt_tokens") is not None]
    completion = [r["completion_tokens"] for r in recs if r.get("completion_tokens") is not None]
    missing = len(recs) - min(len(prompt), len(completion))
    # throughput counts only what this call asked for: answers from the journal took no time now
    asked = [answers.results[i] for i in answers.asked if i in answers.results]
    new_tokens = sum(r["completion_tokens"] or 0 for r in asked)

    def rate(n):
        return n / answers.wall_s if answers.wall_s and answers.asked else None

    out = {"asked": len(answers.asked), "reused_answers": len(recs) + len(answers.skipped) - len(answers.asked),
           "retries": answers.retries, "examples_per_s": rate(len(answers.asked)),
           "completion_tokens_per_s": rate(new_tokens) if new_tokens else None,
           "usage_prompt_tokens": sum(prompt), "usage_completion_tokens": sum(completion), "usage_missing": missing}
    if latencies:
        out.update(request_ms_p50=round(percentile(latencies, 50), 3),
                   request_ms_p95=round(percentile(latencies, 95), 3))
        if ep.concurrency == 1:
            out.update(latency_p50_ms=out["request_ms_p50"], latency_p95_ms=out["request_ms_p95"])
    if ep.price_in is not None:
        out["prices_per_1k_tokens"] = {"input": ep.price_in, "output": ep.price_out}
        # an answer without usage has an unknown price: no total rather than too low a one
        out["cost_usd"] = None if missing else round(sum(prompt) / 1000 * ep.price_in
                                                     + sum(completion) / 1000 * ep.price_out, 6)
    return out
