"""Serve: an OpenAI-compatible HTTP API for any model llmcycle can load.

    llmcycle serve [--run RUN|best|PATH] [--host 127.0.0.1] [--port 8000] [--api-key KEY]

Endpoints: GET /v1/models, POST /v1/completions, POST /v1/chat/completions (both stream server-sent
events with `stream: true`), GET /health, GET /metrics (Prometheus text format). Any OpenAI client works:

    client = openai.OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="KEY")
    client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "..."}])

/v1/completions reads the prompt as raw text (or token ids). /v1/chat/completions builds the prompt as
evaluation and fine-tuning build it, for every model kind: the project's prompt template
(`evaluate.template`, whose single field receives the message) around the last user message, the
earlier messages as turns, the request's system message or else the project's (`evaluate.system`); a
chat model reads that through its chat template, the others as flat text. So the served model sees what
it was evaluated and tuned on. A client that sends finished prompts sets `"raw": true` (or uses
/v1/completions); a last message that already is a rendering of the template is not wrapped twice.
Concurrent requests share forward passes (llmcycle.serve.engine). Errors
use OpenAI's format: {"error": {"message", "type", "param", "code"}}. On SIGTERM the server stops
accepting connections, finishes the requests in flight, then exits.

fastapi and uvicorn are imported inside functions: they are an extra (pip install 'llmcycle[serve]').
"""

import asyncio
import hmac
import logging
import time
import uuid
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

from llmcycle.core.errors import UserError, suggest
from llmcycle.core.net import listen
from llmcycle.data.prompting import assemble, encode_prompt, renders_template, template_fields, uses_chat_template
from llmcycle.evaluation import harness
from llmcycle.evaluation.settings import project_system, project_template
from llmcycle.models.hub import ADAPTER_CONFIG
from llmcycle.serve import augment as serve_augment
from llmcycle.serve.augment import prepare
from llmcycle.serve.engine import BatchEngine
from llmcycle.serve.metrics import Metrics
from llmcycle.serve.protocol import (
    COMPLETION_DEFAULT_MAX_TOKENS,
    ApiError,
    ChatMessage,
    ChatRequest,
    CompletionRequest,
    Job,
    parse_request,
    sse,
    text_of,
    wait_for_job,
)

log = logging.getLogger("llmcycle.serve.app")
BACKENDS = ("transformers", "vllm")


# ------------------------------------------------------------------------------------ served models
@dataclass
class ServedModel:
    name: str
    loaded: Any  # llmcycle.evaluation.harness.LoadedModel
    engine: BatchEngine
    template: str | None  # the project's prompt template, applied to a chat request's last user message
    created: int
    system: str | None = None  # the project's system prompt, for requests that send none

    def encode_text(self, text: str) -> list[int]:
        ids = list(self.loaded.tokenizer(text, add_special_tokens=True)["input_ids"])
        if not ids and self.loaded.kind == "causal":
            bos = self.loaded.tokenizer.bos_token_id  # what a causal model saw first in pretraining
            if bos is None:
                raise ApiError(400, "the prompt is empty and the tokenizer has no BOS token to start from",
                               "prompt")
            ids = [int(bos)]
        return ids

    def completion_prompts(self, prompt: Any) -> list[list[int]]:
        """Token ids of each prompt of a /v1/completions request (raw text: no chat template)."""
        vocab = self.loaded.model.get_input_embeddings().num_embeddings

        def is_ids(x):
            return isinstance(x, list) and x and all(isinstance(t, int) and not isinstance(t, bool) for t in x)

        if isinstance(prompt, str):
            return [self.encode_text(prompt)]
        if is_ids(prompt):
            prompts = [prompt]
        elif isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
            return [self.encode_text(p) for p in prompt]
        elif isinstance(prompt, list) and prompt and all(is_ids(p) for p in prompt):
            prompts = prompt
        else:
            raise ApiError(400, "'prompt' must be a string, a list of strings, a list of token ids or a list "
                           "of token-id lists (none empty)", "prompt")
        if any(t < 0 or t >= vocab for p in prompts for t in p):
            raise ApiError(400, f"'prompt' holds a token id outside the vocabulary (0..{vocab - 1})", "prompt")
        return [list(p) for p in prompts]

    def chat_prompt(self, messages: list[ChatMessage], raw: bool = False) -> list[int]:
        """Token ids of a conversation, built as evaluation and fine-tuning build a prompt
        (data.prompting.assemble): the project's template applied to the last user message (unless `raw`,
        or the message already is a rendering of the template), the earlier turns as history, the
        request's system message or else the project's. Chat models read it through their chat
        template, the others as flat text: the same for every model kind."""
        turns = [{"role": "system" if m.role == "developer" else m.role, "content": text_of(m)} for m in messages]
        system = turns.pop(0)["content"] if turns[0]["role"] == "system" else self.system
        if any(t["role"] == "system" for t in turns):
            raise ApiError(400, "a system (or developer) message may only open the conversation", "messages")
        if not turns or turns[-1]["role"] != "user":
            raise ApiError(400, "the last message must be a user message (the one to answer)", "messages")
        query = turns[-1]["content"]
        if self.template is not None and not raw and not renders_template(self.template, query):
            query = self.template.format(**{template_fields(self.template)[0]: query})
        prompt = assemble(query, system=system, history=turns[:-1])
        if not uses_chat_template(self.loaded.tokenizer, self.loaded.kind):
            return self.encode_text(str(prompt))
        try:
            return list(encode_prompt(self.loaded.tokenizer, prompt, self.loaded.kind))
        except UserError as exc:
            raise ApiError(400, str(exc), "messages") from None

    def check_window(self, prompt_len: int, max_tokens: int, param: str) -> None:
        window = self.loaded.window
        if self.loaded.kind == "causal" and prompt_len + max_tokens > window:
            raise ApiError(400, f"This model's maximum context length is {window} tokens. However, you requested "
                           f"{prompt_len + max_tokens} tokens ({prompt_len} in the prompt, {max_tokens} for the "
                           f"completion). Please reduce the length of the prompt or max_tokens.",
                           param, "context_length_exceeded")
        if self.loaded.kind == "seq2seq" and (prompt_len > window or max_tokens > window):
            raise ApiError(400, f"This model reads at most {window} tokens and writes at most {window}. However, "
                           f"the prompt has {prompt_len} tokens and max_tokens is {max_tokens}. Please reduce "
                           "the length of the prompt or max_tokens.", param, "context_length_exceeded")


def _check_template(template: str | None) -> None:
    if template is None:
        return

    fields = set(template_fields(template))
    if len(fields) != 1 or "" in fields:
        raise UserError(f"prompt template {template[:60]!r} must have exactly one field for the user's message, "
                        f"like {{input}} (it has {len(fields)}: {', '.join(sorted(fields)) or 'none'})")


# --------------------------------------------------------------------------------------------- app
def create_app(models, *, api_key: str | None = None, model_name: str | None = None,
               prompt_template: str | None = None, max_batch_size: int = 16, drain_timeout: float | None = 30.0,
               augment=None, system_prompt: str | None = None):
    """The FastAPI app serving `models`: one LoadedModel (named `model_name`, default its reference) or a
    mapping name -> LoadedModel. Each model gets its own batching engine (at most `max_batch_size` rows
    per forward pass; 1 = one request at a time), started and drained with the app. `api_key` set: /v1/*
    needs `Authorization: Bearer KEY`. `prompt_template` (one field) formats the last user message of a
    chat request for every model, `system_prompt` opens conversations that bring no system message.
    `augment`: a serve_augment.Augmentation (RAG, PAL) for chat completions.

    The handlers reach what they share through `app.state`: served, metrics, api_key, augment and
    drain_timeout."""
    from fastapi import FastAPI
    from starlette.exceptions import HTTPException

    _check_template(prompt_template)
    if not isinstance(models, dict):
        models = {model_name or models.name: models}
    created = int(time.time())
    served = {name: ServedModel(name, lm, BatchEngine(lm.generator, max_batch_size), prompt_template, created,
                                system_prompt) for name, lm in models.items()}
    metrics = Metrics()

    app = FastAPI(title="llmcycle", lifespan=_run_engines, docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(metrics.middleware)
    app.state.served, app.state.metrics = served, metrics
    app.state.api_key, app.state.augment, app.state.drain_timeout = api_key, augment, drain_timeout
    app.add_exception_handler(ApiError, _api_error)
    app.add_exception_handler(HTTPException, _http_error)
    app.add_exception_handler(Exception, _internal_error)
    _add_routes(app)
    return app


@asynccontextmanager
async def _run_engines(app):
    """The app's lifespan: every model's engine runs while the app does, and is drained when it stops."""
    served = app.state.served
    for s in served.values():
        s.engine.start()
    yield
    for s in served.values():  # uvicorn has already waited for the requests in flight
        await asyncio.to_thread(s.engine.stop, app.state.drain_timeout)


def _add_routes(app) -> None:
    """The endpoints. FastAPI reads the handlers' `Request` annotations, and fastapi (an extra) is only
    imported inside functions, so the handlers are declared here and hand the work to module functions."""
    from fastapi import Request
    from fastapi.responses import PlainTextResponse

    @app.get("/health")
    async def health(request: Request):
        served = request.app.state.served
        return {"status": "ok", "models": list(served),
                "running": sum(s.engine.running for s in served.values()),
                "waiting": sum(s.engine.waiting for s in served.values())}

    @app.get("/metrics")
    async def prometheus(request: Request):
        state = request.app.state
        return PlainTextResponse(state.metrics.render(state.served), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def list_models(request: Request):
        _authorize(request)
        return {"object": "list", "data": [_model_card(s) for s in request.app.state.served.values()]}

    @app.get("/v1/models/{name:path}")
    async def get_model(name: str, request: Request):
        _authorize(request)
        return _model_card(_model_of(request.app.state.served, name))

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await _generate(request, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await _generate(request, chat=True)


def _error_response(error: ApiError):
    from fastapi.responses import JSONResponse

    return JSONResponse(error.body(), status_code=error.status)


async def _api_error(request, exc: ApiError):
    return _error_response(exc)


async def _http_error(request, exc):
    """starlette's HTTPException (an unknown path, a wrong method) in OpenAI's error format."""
    return _error_response(ApiError(exc.status_code, str(exc.detail)))


async def _internal_error(request, exc: Exception):
    log.exception("internal error on %s", request.url.path)
    return _error_response(ApiError(500, f"internal server error: {type(exc).__name__}"))


def _authorize(request) -> None:
    api_key = request.app.state.api_key
    if api_key is None:
        return
    given = request.headers.get("authorization", "")
    token = given[7:] if given.lower().startswith("bearer ") else ""
    if not hmac.compare_digest(token.encode(), api_key.encode()):
        what = "no API key was given" if not given else "the API key is not valid"
        raise ApiError(401, f"{what}: send the header 'Authorization: Bearer KEY'", code="invalid_api_key")


def _model_of(served: dict[str, ServedModel], name: str) -> ServedModel:
    if name not in served:
        raise ApiError(404, f"The model '{name}' does not exist{suggest(name, served)} "
                       f"(served: {', '.join(served)})", "model", "model_not_found")
    return served[name]


def _model_card(s: ServedModel) -> dict:
    return {"id": s.name, "object": "model", "created": s.created, "owned_by": "llmcycle"}


async def _generate(request, chat: bool):
    """POST /v1/chat/completions (`chat`) or /v1/completions: one response, or a stream with `stream: true`."""
    from fastapi.responses import Response, StreamingResponse

    _authorize(request)
    state = request.app.state
    req = parse_request(await request.body(), ChatRequest if chat else CompletionRequest)
    s = _model_of(state.served, req.model)
    aug = await prepare(state.augment, s, req) if chat else None  # None: the model alone
    prompts = ([aug.ids if aug else s.chat_prompt(req.messages, raw=req.raw)] if chat
               else s.completion_prompts(req.prompt))
    job = Job(s, prompts, aug.req if aug else req, _max_tokens(s, req, prompts, chat))
    endpoint = "/v1/chat/completions" if chat else "/v1/completions"
    ident = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
    head = {"id": ident, "object": "chat.completion" if chat else "text_completion",
            "created": int(time.time()), "model": s.name}
    if aug is not None and aug.mode == "pal":
        return await state.augment.respond_pal(request, job, head, req, state.metrics, endpoint)
    tail = aug.fields if aug else {}  # RAG's citations
    if req.stream:
        usage = bool(req.stream_options and req.stream_options.include_usage)
        return StreamingResponse(_stream(job, head, chat, usage, state.metrics, endpoint, tail),
                                 media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
    if not await wait_for_job(request, job):
        return Response(status_code=499)  # client closed the request; nobody reads this
    state.metrics.finished(endpoint, s.name, job)
    choices = [_choice(k, seq, chat) for k, seq in enumerate(job.seqs)]
    return {**head, "choices": choices, "usage": job.usage(), **tail}


def _max_tokens(s: ServedModel, req, prompts: list[list[int]], chat: bool) -> list[int]:
    """Each prompt's token budget: the request's limit, else what the window leaves (chat) or OpenAI's
    default (completions); an ApiError when it does not fit the window or is below min_tokens."""
    if chat:
        param, limit = "messages", req.max_completion_tokens or req.max_tokens
    else:
        param, limit = "prompt", req.max_tokens
    max_tokens = []
    for ids in prompts:
        room = s.loaded.window - len(ids) if s.loaded.kind == "causal" else s.loaded.window
        m = limit or (max(room, 1) if chat else COMPLETION_DEFAULT_MAX_TOKENS)
        s.check_window(len(ids), m, param if limit is None else "max_tokens")
        max_tokens.append(m)
    if req.min_tokens > min(max_tokens):
        raise ApiError(400, f"min_tokens {req.min_tokens} is more than max_tokens {min(max_tokens)}", "min_tokens")
    return max_tokens


def _choice(k: int, seq, chat: bool) -> dict:
    """One finished sequence as a choice of a (non-streamed) response."""
    if chat:
        return {"index": k, "message": {"role": "assistant", "content": seq.text},
                "logprobs": None, "finish_reason": seq.finish_reason}
    return {"index": k, "text": seq.text, "logprobs": None, "finish_reason": seq.finish_reason}

async def _stream(job: Job, head: dict, chat: bool, include_usage: bool, metrics: Metrics, endpoint: str,
                  tail: dict):
    """Server-sent events in OpenAI's chunk format, ending with `data: [DONE]`; `tail` (RAG's citations)
    goes into the last chunk. If the client goes away, starlette cancels this generator and `finally`
    frees the request's rows."""
    head = {**head, "object": "chat.completion.chunk" if chat else "text_completion"}
    extra = {"usage": None} if include_usage else {}

    def chunk(k: int, text: str | None, finish: str | None, role: bool = False) -> str:
        if chat:
            delta = {"role": "assistant", "content": ""} if role else ({"content": text} if text else {})
            choice = {"index": k, "delta": delta, "logprobs": None, "finish_reason": finish}
        else:
            choice = {"index": k, "text": text or "", "logprobs": None, "finish_reason": finish}
        return sse({**head, "choices": [choice], **extra})

    try:
        if chat:
            for k in range(len(job.seqs)):
                yield chunk(k, None, None, role=True)
        try:
            async for k, delta, done in job.events():
                if delta:
                    yield chunk(k, delta, None)
                if done:
                    yield chunk(k, None, job.seqs[k].finish_reason)
        except ApiError as exc:  # the status line has gone out: report the error in the stream
            yield sse(exc.body())
            return
        metrics.finished(endpoint, head["model"], job)
        if include_usage or tail:
            yield sse({**head, "choices": [], **({"usage": job.usage()} if include_usage else {}), **tail})
        yield "data: [DONE]\n\n"
    finally:
        job.cancel()


# ------------------------------------------------------------------------------------------- serving
def check_backend(name: str) -> None:
    """Refuse a backend that cannot run here, before any model is loaded."""
    if name not in BACKENDS:
        raise UserError(f"unknown serving backend '{name}'{suggest(name, BACKENDS)} (choices: {', '.join(BACKENDS)})")
    if name == "vllm":
        try:
            import vllm  # noqa: F401
        except ImportError:
            raise UserError("backend 'vllm' needs vLLM and a CUDA GPU: pip install vllm "
                            "(or use --backend transformers)") from None
        import torch

        if not torch.cuda.is_available():
            raise UserError("backend 'vllm' needs a CUDA GPU, and none is available (use --backend transformers)")


def vllm_command(path: str, *, host: str, port: int, api_key: str | None, model_name: str | None) -> list[str]:
    """vLLM's own OpenAI-compatible server on the resolved model folder. vLLM brings paged attention
    and CUDA kernels our engine does not have; the API it speaks is the same, so clients do not change."""
    import sys

    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", path,
           "--host", host, "--port", str(port)]
    if model_name:
        cmd += ["--served-model-name", model_name]
    if api_key:
        cmd += ["--api-key", api_key]
    return cmd


def _exec_vllm(model_ref, project, *, host, port, api_key, model_name) -> None:
    """Replace this process with vLLM's server (so signals and exit codes are vLLM's own)."""
    import os
    from pathlib import Path

    ref = model_ref or (project.config.model.name if project is not None and project.config.model else None)
    if ref is None:
        raise UserError("no model to serve: give a model (run id, folder or Hub id) or a project")
    path, _ = harness.resolve(ref, project)
    if (Path(path) / ADAPTER_CONFIG).is_file():
        raise UserError(f"{path} is a LoRA adapter: serve the merged model with vLLM (tune with merge: true, "
                        "or `llmcycle optimize` with method export) or use --backend transformers")
    cmd = vllm_command(path, host=host, port=port, api_key=api_key, model_name=model_name or ref)
    os.execv(cmd[0], cmd)


def _require_server() -> None:
    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError:
        raise UserError("serving needs FastAPI and uvicorn: pip install 'llmcycle[serve]'") from None


def build_app(model_ref: str | None, project, *, api_key: str | None = None, model_name: str | None = None,
              prompt_template: str | None = None, max_batch_size: int = 16, context_window: int | None = None,
              dtype: str = "auto", device: str = "auto", drain_timeout: float | None = 30.0, augment=None):
    """The app `serve` runs: the model loaded as evaluation loads it (the project's model.context_window
    unless --context-window says otherwise, so the server refuses exactly the prompts evaluation skips
    as too long), the project's template and system prompt."""
    augment = serve_augment.Augmentation(augment) if augment is not None else None
    if model_ref is None:
        if project is None:
            raise UserError("no model to serve: give a model (run id, folder or Hub id) or a project")
        loaded = harness.load_project_model(project)
    else:
        model_cfg = project.config.model if project is not None else None
        window = context_window or (model_cfg.context_window if model_cfg is not None else None)
        loaded = harness.load(model_ref, project, dtype=dtype, device=device, context_window=window)
    if prompt_template is None and project is not None:
        prompt_template = project_template(project)
        _check_template(prompt_template)
    return create_app(loaded, api_key=api_key, model_name=model_name, prompt_template=prompt_template,
                      system_prompt=project_system(project), max_batch_size=max_batch_size,
                      drain_timeout=drain_timeout, augment=augment)


def serve(model_ref: str | None = None, project=None, *, host: str = "127.0.0.1", port: int = 8000,
          api_key: str | None = None, model_name: str | None = None, prompt_template: str | None = None,
          max_batch_size: int = 16, backend: str = "transformers", context_window: int | None = None,
          dtype: str = "auto", device: str = "auto", drain_timeout: float | None = 30.0,
          log_level: str = "info", rag_index: str | None = None, pal: bool | None = None) -> None:
    """Load the model (a run reference, a local folder or a Hub id; the project's model when
    model_ref is None) and serve it until SIGINT/SIGTERM. `rag_index` / `pal` override the project's
    `augment:` section (serve_augment). Everything that can be wrong with the model, the index or the
    address is a UserError before the server starts."""

    check_backend(backend)
    augment = serve_augment.settings(project, rag_index=rag_index, pal=pal)
    if backend == "vllm":
        if augment is not None:
            raise UserError("RAG and PAL are served by the transformers backend only (drop --backend vllm)")
        return _exec_vllm(model_ref, project, host=host, port=port, api_key=api_key, model_name=model_name)
    _require_server()
    _check_template(prompt_template)
    if max_batch_size < 1:
        raise UserError(f"max_batch_size must be at least 1, got {max_batch_size}")
    sock = listen(host, port)
    try:
        app = build_app(model_ref, project, api_key=api_key, model_name=model_name, prompt_template=prompt_template,
                        max_batch_size=max_batch_size, context_window=context_window, dtype=dtype, device=device,
                        drain_timeout=drain_timeout, augment=augment)
    except BaseException:
        sock.close()
        raise
    import uvicorn

    bound = sock.getsockname()
    log.warning("serving %s on http://%s:%d/v1", next(iter(app.state.served)), host, bound[1])
    config = uvicorn.Config(app, log_level=log_level, timeout_graceful_shutdown=drain_timeout)
    uvicorn.Server(config).run(sockets=[sock])
