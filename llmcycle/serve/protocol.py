"""The OpenAI protocol as the server speaks it: request types, errors in OpenAI's shape, a queued
generation job, and server-sent events."""
from __future__ import annotations

import asyncio
import json
import time
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from llmcycle.core.configbase import describe_error
from llmcycle.core.errors import suggest
from llmcycle.serve.engine import SamplingParams

COMPLETION_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions


# ------------------------------------------------------------------------------------------- requests
class StreamOptions(BaseModel):
    include_usage: bool = False


class Sampling(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())
    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, ge=0, le=1)
    n: int = Field(1, ge=1, le=64)
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    min_tokens: int = Field(0, ge=0, description="vLLM extension: no EOS before this many tokens")
    ignore_eos: bool = Field(False, description="vLLM extension: keep generating past EOS")
    # OpenAI parameters this server accepts only at their neutral value (see NEUTRAL)
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    logit_bias: dict[str, float] | None = None


class CompletionRequest(Sampling):
    prompt: Any = Field(description="a string, a list of strings, token ids or a list of token-id lists")
    echo: bool = False
    logprobs: int | None = None
    best_of: int | None = None
    suffix: str | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")  # e.g. name, tool_call_id: harmless to ignore
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[dict] | None = None


class ChatRequest(Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool | None = None
    top_logprobs: int | None = None
    tools: list | None = None
    response_format: dict | None = None
    llmcycle: dict | None = Field(None, description="llmcycle extension: {mode: rag | pal | plain}, see serve_augment")
    raw: bool = Field(False, description="llmcycle extension: the last user message is a finished prompt, "
                      "so the project's template is not applied to it")


# A parameter set to anything else is refused: silently ignoring it would answer a different question.
NEUTRAL = {"frequency_penalty": (0,), "presence_penalty": (0,), "logit_bias": (None, {}), "echo": (False,),
           "logprobs": (None, False, 0), "best_of": (None, 1), "suffix": (None, ""), "top_logprobs": (None, 0),
           "tools": (None, []), "response_format": (None, {"type": "text"})}


class ApiError(Exception):
    """An error answered in OpenAI's format."""

    TYPES = {400: "invalid_request_error", 401: "invalid_request_error", 404: "invalid_request_error"}

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.TYPES.get(self.status, "server_error"),
                          "param": self.param, "code": self.code}}


def parse_request(raw: bytes, cls: type[BaseModel]) -> Any:
    try:
        data = json.loads(raw)
    except ValueError as exc:
        raise ApiError(400, f"the request body is not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise ApiError(400, "the request body must be a JSON object")
    try:
        req = cls.model_validate(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        param = str(err["loc"][0]) if err["loc"] else None
        if err["type"] == "extra_forbidden":
            raise ApiError(400, f"unknown parameter '{param}'{suggest(param, cls.model_fields)}", param) from None
        where = ".".join(str(p) for p in err["loc"] if not (isinstance(p, str) and "[" in p))
        raise ApiError(400, f"parameter '{where}': {describe_error(err)}", param) from None
    for name, neutral in NEUTRAL.items():
        if name in req.model_fields_set and getattr(req, name) not in neutral:
            raise ApiError(400, f"parameter '{name}' is not supported by this server (leave it out)", name)
    stops = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    if any(s == "" for s in stops):
        raise ApiError(400, "stop sequences must not be empty strings", "stop")
    return req


def text_of(message: ChatMessage) -> str:
    if message.content is None or isinstance(message.content, str):
        return message.content or ""
    parts = []
    for part in message.content:
        if part.get("type") != "text" or not isinstance(part.get("text"), str):
            raise ApiError(400, f"only text message parts are supported, got type {part.get('type')!r}", "messages")
        parts.append(part["text"])
    return "".join(parts)


# -------------------------------------------------------------------------------------------- jobs
class Job:
    """The sequences of one request (prompts x n choices), their events funnelled into one asyncio queue."""

    def __init__(self, served, prompts: list[list[int]], req: Sampling, max_tokens: list[int]):
        loop = asyncio.get_running_loop()
        self.engine, self.queue = served.engine, asyncio.Queue()
        self.prompt_tokens = sum(len(p) for p in prompts)
        stops = tuple([req.stop] if isinstance(req.stop, str) else req.stop or ())
        self.seqs, self.open, self.start, self.first_token = [], 0, time.perf_counter(), None
        self.stream = req.stream  # time to first token is measured on streams only
        for i, ids in enumerate(prompts):
            for j in range(req.n):
                k = len(self.seqs)
                seed = req.seed
                if seed is not None and len(prompts) * req.n > 1:  # each choice its own stream
                    seed = (seed * 1_000_003 + k) % 2**63
                params = SamplingParams(max_tokens=max_tokens[i], temperature=req.temperature, top_p=req.top_p,
                                        seed=seed, stop=stops, min_tokens=min(req.min_tokens, max_tokens[i]),
                                        ignore_eos=req.ignore_eos)

                def listener(delta, done, k=k):
                    loop.call_soon_threadsafe(self.queue.put_nowait, (k, delta, done))

                try:  # without streaming, one callback per sequence rather than per token: each one
                    # wakes the event loop, which competes with the worker thread for the interpreter
                    self.seqs.append(self.engine.submit(ids, params, listener, stream=req.stream))
                except RuntimeError:  # shutting down
                    self.cancel()
                    raise ApiError(503, "the server is shutting down") from None
                self.open += 1

    async def events(self):
        while self.open:
            k, delta, done = await self.queue.get()
            if self.first_token is None and delta and self.stream:
                self.first_token = time.perf_counter() - self.start
            self.open -= done
            if done and self.seqs[k].error is not None:
                raise ApiError(500, f"generation failed: {self.seqs[k].error}")
            yield k, delta, done

    def cancel(self) -> None:
        for seq in self.seqs:
            self.engine.cancel(seq)

    def usage(self) -> dict:
        completion = sum(len(s.token_ids) for s in self.seqs)
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": completion,
                "total_tokens": self.prompt_tokens + completion}


async def wait_for_job(request, job: Job) -> bool:
    """Wait for every sequence of a non-streaming request; False (and the rows freed) if the client left."""
    async def drain():
        async for _ in job.events():
            pass

    task = asyncio.ensure_future(drain())
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=0.25)
            if done:
                task.result()  # raises ApiError for a failed generation
                return True
            if await request.is_disconnected():
                return False
    finally:
        if not task.done():
            task.cancel()
        job.cancel()  # no-op for finished sequences


def sse(obj) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"
