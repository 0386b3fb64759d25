"""Retrieval (RAG) and program-aided math (PAL) behind the server's chat completions.

    # llmcycle.yaml
    augment:
      rag: {index: rag-index, k: 5}          # every chat completion answers from the index, with citations
      pal: {enabled: true, timeout_s: 5}     # a request may ask for a program instead of prose

    llmcycle serve --rag-index rag-index --pal     # the same from the command line (overrides the file)

A request picks its mode with the body's `llmcycle` object; with the OpenAI client,
`extra_body={"llmcycle": {"mode": "pal"}}`. Modes: `rag` (the default when the server has an index),
`pal` (only when asked: a program's printed number is a different kind of answer from prose, so the
server never guesses it), and `plain` (the model alone).

rag: retrieve k chunks for the last user message, build the grounded prompt with rag.assemble_prompt
(the lowest-ranked chunks dropped whole until it fits the window minus max_tokens), generate. The
response carries `citations`, [{n, source, start, end, score, chunk_id, chunk_number, text}] as
rag.Citation holds them, and `retrieval` {retrieved, dropped}; a stream sends them in its last chunk
before [DONE]. The model sees the grounded prompt as it is (no project template), as `llmcycle ask` does.
pal: prompt with pal.pal_prompt, generate the program (ending at its closing fence), run it in the
sandbox, answer with the last line it printed. The response carries `program` and `sandbox` {ok, error,
failure, stdout, wall_s}; a stream sends the answer in one piece once the program has run.
"""
from __future__ import annotations

import asyncio
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, ValidationError

from llmcycle.augment import rag
from llmcycle.augment.config import AugmentConfig, PalServeConfig, RagServeConfig
from llmcycle.augment.index import Index
from llmcycle.augment.pal import DEFAULT_SHOTS, PAL_STOP, extract_program, pal_prompt
from llmcycle.augment.sandbox import run_program
from llmcycle.core.configbase import describe_error
from llmcycle.core.errors import UserError, suggest
from llmcycle.serve.protocol import ApiError, ChatMessage, sse, text_of, wait_for_job


class RequestOptions(BaseModel):
    """The request body's `llmcycle` object."""

    model_config = ConfigDict(extra="forbid")
    mode: Literal["rag", "pal", "plain"] | None = None


def settings(project=None, *, rag_index: str | None = None, pal: bool | None = None) -> AugmentConfig | None:
    """The project's `augment:` section with the command line's --rag-index / --pal over it, index paths
    made absolute (the file's relative to the project, the flag's to the working folder); None if
    neither RAG nor PAL is on."""
    base = project.config.augment if project is not None and project.config.augment else AugmentConfig()
    rag, pal_cfg = base.rag, base.pal
    if rag is not None:
        rag = rag.model_copy(update={"index": str((project.dir / rag.index).resolve())})
    if rag_index is not None:
        update = {"index": str(Path(rag_index).resolve())}
        rag = rag.model_copy(update=update) if rag is not None else RagServeConfig(**update)
    if pal is not None:
        pal_cfg = (pal_cfg or PalServeConfig()).model_copy(update={"enabled": pal})
    if pal_cfg is not None and not pal_cfg.enabled:
        pal_cfg = None
    return AugmentConfig(rag=rag, pal=pal_cfg) if rag is not None or pal_cfg is not None else None


def _error(status: int, message: str, param: str | None = None, code: str | None = None):
    return ApiError(status, message, param, code)


@dataclass
class Prepared:
    """A chat request made ready for the engine by an augmentation."""

    mode: str  # rag | pal
    ids: list[int]  # the prompt's token ids
    req: Any  # the ChatRequest the engine runs (pal: stops at the program's closing fence, not streamed)
    fields: dict = field(default_factory=dict)  # added to the response (rag: citations, retrieval)


class Augmentation:
    """What a server answers with besides the model: an index (RAG) and the sandbox (PAL)."""

    def __init__(self, config: AugmentConfig):
        self.rag, self.pal, self.index = config.rag, config.pal, None
        if self.rag is not None:
            self.index = Index.load(self.rag.index)
            if not len(self.index):
                raise UserError(f"{self.rag.index}: the retrieval index holds no chunks; index some documents "
                                "first (llmcycle index PATH...)")
            self.index.embedder  # noqa: B018 - load the embedding model now, not on the first request

    def describe(self) -> dict:
        return {"rag": {"index": self.rag.index, "k": self.rag.k} if self.rag else None,
                "pal": {"timeout_s": self.pal.timeout_s} if self.pal else None}

    # -- rag ----------------------------------------------------------------------------------------
    def prepare_rag(self, s, req, question: str) -> Prepared:
        limit = req.max_completion_tokens or req.max_tokens
        reserve = (limit or self.rag.max_new_tokens) if s.loaded.kind == "causal" else 0
        budget = s.loaded.window - reserve
        if budget < 1:
            raise _error(400, f"max_tokens {reserve} leaves no room for retrieved passages in the context "
                         f"window of {s.loaded.window} tokens", "max_tokens", "context_length_exceeded")
        hits = self.index.search(question, self.rag.k)

        def ids_of(text: str) -> list[int]:  # the whole conversation, the question replaced by the prompt
            return s.chat_prompt(req.messages[:-1] + [ChatMessage(role="user", content=text)], raw=True)

        try:
            assembled = rag.assemble_prompt(question, hits, lambda text: len(ids_of(text)), budget)
        except UserError as exc:
            raise _error(400, str(exc), "messages", "context_length_exceeded") from None
        citations = [rag.Citation.of(n, h).to_api() for n, h in enumerate(assembled.hits, 1)]
        return Prepared("rag", ids_of(assembled.prompt), req, {
            "citations": citations, "retrieval": {"retrieved": len(hits), "dropped": assembled.dropped}})

    # -- pal ----------------------------------------------------------------------------------------
    def prepare_pal(self, s, req, question: str) -> Prepared:
        if req.n != 1:
            raise _error(400, "PAL answers with one program per request: leave n at 1", "n")
        ids = s.loaded.generator.encode([pal_prompt(question, DEFAULT_SHOTS[:self.pal.shots])])[0]
        stops = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
        # streamed or not, the answer exists only once the whole program has run
        run = req.model_copy(update={"stop": stops + [x for x in PAL_STOP if x not in stops], "stream": False})
        return Prepared("pal", ids, run)

    async def respond_pal(self, request, job, head: dict, req, metrics, endpoint: str):
        """Wait for the program, run it in the sandbox, answer with what it printed."""
        from fastapi.responses import Response, StreamingResponse

        if not await wait_for_job(request, job):
            return Response(status_code=499)
        metrics.finished(endpoint, head["model"], job)
        seq = job.seqs[0]
        program = extract_program(seq.text)
        res = await asyncio.to_thread(run_program, program, timeout_s=self.pal.timeout_s,
                                      cpu_s=max(1, math.ceil(self.pal.timeout_s)))
        if not res.ok:
            content = f"the program failed: {res.error}"
        else:
            content = res.answer if res.answer is not None else "the program printed nothing"
        extra = {"program": program, "sandbox": {"ok": res.ok, "error": res.error, "failure": res.failure,
                                                 "stdout": res.stdout, "wall_s": round(res.wall_s, 3)}}
        if not req.stream:
            return {**head, "choices": [{"index": 0, "message": {"role": "assistant", "content": content},
                                         "logprobs": None, "finish_reason": seq.finish_reason}],
                    "usage": job.usage(), **extra}
        usage = bool(req.stream_options and req.stream_options.include_usage)
        head = {**head, "object": "chat.completion.chunk", **({"usage": None} if usage else {})}

        def chunk(delta: dict, finish: str | None) -> str:
            return sse({**head, "choices": [{"index": 0, "delta": delta, "logprobs": None,
                                              "finish_reason": finish}]})

        events = [chunk({"role": "assistant", "content": ""}, None), chunk({"content": content}, None),
                  chunk({}, seq.finish_reason),
                  sse({**head, "choices": [], **({"usage": job.usage()} if usage else {}), **extra}),
                  "data: [DONE]\n\n"]

        async def stream():
            for event in events:
                yield event

        return StreamingResponse(stream(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


def _options(req) -> RequestOptions:
    try:
        return RequestOptions.model_validate(req.llmcycle or {})
    except ValidationError as exc:
        err = exc.errors()[0]
        key = ".".join(str(p) for p in err["loc"])
        if err["type"] == "extra_forbidden":
            raise _error(400, f"unknown key 'llmcycle.{key}'{suggest(key, RequestOptions.model_fields)}",
                         "llmcycle") from None
        raise _error(400, f"'llmcycle.{key}': {describe_error(err)}", "llmcycle") from None


async def prepare(aug: Augmentation | None, s, req) -> Prepared | None:
    """The augmented prompt for a chat request, or None for a plain one. A mode the server was not
    started with is a 400: answering without it would silently be a different answer."""

    mode = _options(req).mode or ("rag" if aug is not None and aug.rag is not None else "plain")
    if mode == "plain":
        return None
    if mode == "rag" and (aug is None or aug.rag is None):
        raise _error(400, "this server has no retrieval index: start it with --rag-index DIR (or "
                     "`augment.rag` in llmcycle.yaml)", "llmcycle")
    if mode == "pal" and (aug is None or aug.pal is None):
        raise _error(400, "PAL is not enabled on this server: start it with --pal (or `augment.pal` in "
                     "llmcycle.yaml)", "llmcycle")
    last = req.messages[-1]
    question = text_of(last).strip() if last.role == "user" else ""
    if not question:
        raise _error(400, f"{mode} answers the last message, which must be a non-empty user message", "messages")
    if mode == "pal":
        return aug.prepare_pal(s, req, question)
    return await asyncio.to_thread(aug.prepare_rag, s, req, question)  # embedding the query takes a moment
