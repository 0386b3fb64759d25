"""The dashboard: a local web page over the run store, with a playground for a served model.

    llmcycle ui [-p PROJECT] [--host 127.0.0.1] [--port 8765] [--model-url http://127.0.0.1:8000]

One page (llmcycle/ui/static: plain HTML, CSS and JavaScript; nothing fetched from the internet) with
three views:
  runs        every run, filtered by stage, variant text and status, sorted by any metric
  compare     chosen runs' figures side by side, bar and curve plots (inline SVG), outputs side by side
  playground  a prompt streamed, token by token, from an OpenAI-compatible server (`llmcycle serve`)

JSON API: GET /api/runs, GET /api/runs/{id}/metrics, GET /api/compare?ids=a,b, GET /api/models and
POST /api/playground (server-sent events relayed from the model server's /v1/chat/completions).
Rows, best values and examples come from runs_view (compare_rows, best_by_metric, side_by_side), as in
`llmcycle runs compare`. fastapi, uvicorn and httpx are imported inside functions (pip install 'llmcycle[serve]').
"""
# No `from __future__ import annotations`: FastAPI reads the handlers' annotations (Request) at run time.
import json
import math
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from llmcycle.core.errors import UserError
from llmcycle.core.net import listen
from llmcycle.evaluation.compare import (
    COMPARE_KEYS,
    SHORT,
    TABLE_KEYS,
    best_by_metric,
    compare_rows,
    side_by_side,
)
from llmcycle.stages.registry import NAMES as STAGES

STATIC = Path(__file__).parent / "static"
# Numbers in a row that say which run and when, not how it did: never offered as figures.
NOT_FIGURES = ("id", "stage", "variant", "status", "created", "finished")
# Columns of metrics.jsonl that are the x axis or bookkeeping, not curves.
NOT_CURVES = {"time", "step", "epoch"}
MAX_POINTS = 2000  # per curve: a long run's metrics.jsonl is thinned so the page stays quick


# --------------------------------------------------------------------------------------------- data
def finite(obj: Any) -> Any:
    """The object with NaN and infinities as None: JSON has no such numbers, and a diverged loss or an
    infinite perplexity must not make the whole page fail."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite(v) for v in obj]
    return obj


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def metric_keys(rows: list[dict]) -> list[str]:
    """The numeric figures present in the rows: the comparison's own order first, then the rest by name."""
    present = {k for r in rows for k, v in r.items() if _number(v) and k not in NOT_FIGURES}
    known = [k for k in ("headline_value",) + COMPARE_KEYS if k in present]
    return known + sorted(present - set(known))


def run_rows(store, stage: str | None = None, status: str | None = None, variant: str | None = None,
             sort: str | None = None, descending: bool = True) -> dict:
    """GET /api/runs: the runs (as compare_rows makes them, plus when they ran) filtered and sorted, with
    the choices the filters offer. A run the index lists but whose folder is gone has status 'missing'."""
    records = store.list()
    listed = {r.id for r in records}
    rows = []
    for rec, row in zip(records, compare_rows(records)):
        row.update(parent=rec.parent, created=rec.created, finished=rec.finished, error=rec.error)
        if rec.status == "completed" and not (rec.dir / "summary.json").exists():
            row["note"] = "summary.json is missing"
        rows.append(row)
    for gone in store.indexed():
        if gone["id"] not in listed:
            rows.append({**gone, "status": "missing", "last_status": gone["status"],
                         "note": f"its folder {store.root / gone['id']} was deleted (or its run.json is unreadable)"})
    # Stages in lifecycle order (eval, augment and others after them), as a user walks through them.
    order = {name: i for i, name in enumerate(STAGES)}
    facets = {"stages": sorted({r["stage"] for r in rows}, key=lambda s: (order.get(s, len(order)), s)),
              "statuses": sorted({r["status"] for r in rows})}
    text = (variant or "").strip().lower()
    shown = [r for r in rows if (not stage or r["stage"] == stage) and (not status or r["status"] == status)
             and text in r["variant"].lower()]
    if sort:
        # Runs without the figure go last whatever the direction: they have nothing to rank by.
        has = [r for r in shown if r.get(sort) is not None]
        numeric = all(_number(r[sort]) for r in has)
        has.sort(key=lambda r: r[sort] if numeric else str(r[sort]), reverse=descending)
        shown = has + [r for r in shown if r.get(sort) is None]
    return finite({"store": str(store.root.resolve()), "total": len(rows), "runs": shown, **facets,
                   "metrics": metric_keys(rows), "table_keys": [k for k in TABLE_KEYS if k in metric_keys(shown)],
                   "short": SHORT})


def label(row: dict) -> str:
    """How a run is named in the comparison: the label side_by_side keys its outputs by."""
    return f"{row['variant']} ({row['id'][-4:]})"


def compare(store, ids: list[str], n_examples: int = 3) -> dict:
    """GET /api/compare: chosen runs' figures (best per metric), their outputs side by side, and the ids
    that no longer name a run."""
    records, missing = [], []
    for ref in ids:
        try:
            records.append(store.get(ref))
        except UserError as exc:
            missing.append({"id": ref, "error": str(exc)})
    rows = compare_rows(records)
    for row in rows:
        row["label"] = label(row)
    keys = metric_keys(rows)
    # The comparison's own figures first; the rest (counts, lengths, timings) behind "more" on the page.
    main = [k for k in keys if k in ("headline_value",) + COMPARE_KEYS]
    return finite({"runs": rows, "metrics": keys, "main_metrics": main, "best": best_by_metric(rows),
                   "examples": side_by_side(records, n_examples) if records else [], "missing": missing,
                   "short": SHORT})


def curves(rows: list[dict]) -> dict[str, dict]:
    """metrics.jsonl as one series per numeric column: {name: {"x": steps, "y": values}}. Rows without a
    step count as steps 1, 2, ...; a NaN stays a gap (None) rather than dropping the point."""
    out: dict[str, dict] = {}
    for i, row in enumerate(rows):
        x = row.get("step", i + 1)
        if not _number(x):
            continue
        for key, value in row.items():
            if key not in NOT_CURVES and _number(value):
                series = out.setdefault(key, {"x": [], "y": []})
                series["x"].append(x)
                series["y"].append(value)
    for series in out.values():
        n = len(series["x"])
        if n > MAX_POINTS:
            keep = sorted(set(range(0, n, math.ceil(n / MAX_POINTS))) | {n - 1})  # the last point always shows
            series["x"] = [series["x"][i] for i in keep]
            series["y"] = [series["y"][i] for i in keep]
    return finite(out)


# ------------------------------------------------------------------------------------- playground
class PlaygroundRequest(BaseModel):
    """What the playground form sends; ranges as the model server checks them, refused here first."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())
    prompt: str = Field(min_length=1)
    model: str | None = None
    max_tokens: int = Field(64, ge=1, le=8192)
    temperature: float = Field(0.7, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)


def _upstream_error(response_body: bytes, status: int) -> str:
    """The model server's own message (OpenAI's error format), else its status and first bytes."""
    try:
        err = json.loads(response_body)["error"]
        return err["message"] if isinstance(err, dict) else str(err)
    except (ValueError, KeyError, TypeError):
        return f"HTTP {status}: {response_body[:200].decode('utf-8', 'replace')}"


LOOPBACK_NAMES = ("127.0.0.1", "localhost", "::1")


def request_refusal(scope, allowed_hosts) -> tuple[int, str] | None:
    """Why the dashboard refuses a request, or None. A foreign Host is a DNS-rebinding page reading the
    runs; a POST from another origin is a web page using the playground (and the model server's API key
    the dashboard holds). Browsers send Origin with every POST, and a JSON body cannot be sent across
    origins without a CORS preflight, which the dashboard never answers."""
    from urllib.parse import urlsplit

    headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
    host = headers.get("host", "")
    name = (urlsplit("//" + host).hostname or "") if host else ""
    if name.lower() not in allowed_hosts:
        return 403, (f"Host {host!r} is not an address of this dashboard (it answers to "
                     f"{', '.join(sorted(allowed_hosts))}); start it with `--allow-host NAME` to add one")
    if scope.get("method", "GET") in ("GET", "HEAD", "OPTIONS"):
        return None
    origin = headers.get("origin")
    if origin is None or urlsplit(origin).netloc != host:
        return 403, f"cross-origin request refused: Origin {origin!r} is not this dashboard ({host})"
    if not headers.get("content-type", "").startswith("application/json"):
        return 415, "send the request body as application/json"
    return None


class SameOriginOnly:
    """ASGI middleware applying `request_refusal` (plain ASGI, so streamed answers pass untouched)."""

    def __init__(self, app, allowed_hosts):
        self.app, self.allowed_hosts = app, {h.lower().strip("[]") for h in allowed_hosts}

    async def __call__(self, scope, receive, send):
        refusal = request_refusal(scope, self.allowed_hosts) if scope["type"] == "http" else None
        if refusal is None:
            return await self.app(scope, receive, send)
        from fastapi.responses import JSONResponse

        await JSONResponse({"error": refusal[1]}, status_code=refusal[0])(scope, receive, send)


def create_ui_app(store, *, model_url: str = "http://127.0.0.1:8000", api_key: str | None = None,
                  allowed_hosts=()):
    """The dashboard's FastAPI app over `store` (a RunStore). The playground talks to `model_url`.

    Why a proxy rather than a model loaded in-process: the dashboard stays light (no torch, no weights)
    and starts instantly, works the same against `llmcycle serve`, vLLM or any OpenAI-compatible server,
    and the browser talks to one origin only, so there is no CORS to configure.

    The handlers reach what they share through `app.state`: store, model_url and client."""
    import httpx
    from fastapi import FastAPI

    model_url = check_model_url(model_url)
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    app = FastAPI(title="llmcycle ui", lifespan=_model_client, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.store, app.state.model_url = store, model_url
    # No read limit between tokens would hang forever on a stuck server; 5 minutes covers a slow CPU model.
    app.state.client_options = dict(base_url=model_url, headers=headers, timeout=httpx.Timeout(10.0, read=300.0))
    # the loopback names, and the names it was started under (--host, --allow-host)
    app.add_middleware(SameOriginOnly, allowed_hosts=[*LOOPBACK_NAMES, *allowed_hosts])
    _add_routes(app)
    return app


@asynccontextmanager
async def _model_client(app):
    """The app's lifespan: one HTTP client to the model server (app.state.client) while the app runs."""
    import httpx

    async with httpx.AsyncClient(**app.state.client_options) as client:
        app.state.client = client
        yield


def _add_routes(app) -> None:
    """The page and the JSON API. FastAPI reads the handlers' `Request` annotations, and fastapi (an
    extra) is only imported inside functions, so the handlers are declared here and hand the work on."""
    from fastapi import Request
    from fastapi.responses import FileResponse

    @app.get("/")
    async def index():
        return FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-cache"})

    @app.get("/static/{name}")
    async def static(name: str):
        return _static_file(name)

    # The store's handlers are plain functions: FastAPI runs them in threads, so reading run folders never
    # holds up a playground answer streaming at the same time.
    @app.get("/api/runs")
    def runs(request: Request, stage: str | None = None, status: str | None = None, variant: str | None = None,
             sort: str | None = None, order: str = "desc"):
        if order not in ("asc", "desc"):
            return _error(400, f"order must be 'asc' or 'desc', not {order!r}")
        return run_rows(request.app.state.store, stage, status, variant, sort, order == "desc")

    @app.get("/api/runs/{run_id}/metrics")
    def metrics(request: Request, run_id: str):
        return _run_curves(request.app.state.store, run_id)

    @app.get("/api/compare")
    def compare_runs(request: Request, ids: str = "", examples: int = 3):
        chosen = [i for i in (s.strip() for s in ids.split(",")) if i]
        if not chosen:
            return _error(400, "choose at least one run: /api/compare?ids=RUN,RUN")
        return compare(request.app.state.store, chosen, max(0, min(examples, 20)))

    @app.get("/api/models")
    async def models(request: Request):
        return await _served_models(request.app.state)

    @app.post("/api/playground")
    async def playground(request: Request):
        return await _playground(request)


def _error(status: int, message: str):
    from fastapi.responses import JSONResponse

    return JSONResponse({"error": message}, status_code=status)


def _unreachable(model_url: str, exc: Exception):
    return _error(502, f"the model server at {model_url} is not reachable ({type(exc).__name__}: {exc}); "
                       "start one with `llmcycle serve` or pass --model-url")


def _static_file(name: str):
    """GET /static/{name}."""
    from fastapi.responses import FileResponse

    # Only the files that ship with the page: a name never becomes a path the client chooses.
    files = {p.name: p for p in STATIC.iterdir() if p.is_file()}
    if name not in files:
        return _error(404, f"no static file {name!r}")
    return FileResponse(files[name], headers={"Cache-Control": "no-cache"})


def _run_curves(store, run_id: str):
    """GET /api/runs/{id}/metrics: the run's metrics.jsonl as curves."""
    try:
        rec = store.get(run_id)
    except UserError as exc:
        return _error(404, str(exc))
    rows = rec.metrics()
    return {"id": rec.id, "label": label({"id": rec.id, "variant": rec.variant}), "rows": len(rows),
            "curves": curves(rows)}


async def _served_models(state):
    """GET /api/models: the model server's address and the models it serves."""
    import httpx

    try:
        return {"url": state.model_url, "models": await _model_names(state.client)}
    except LookupError as exc:
        return _error(502, str(exc))
    except httpx.HTTPError as exc:
        return _unreachable(state.model_url, exc)


async def _playground(request):
    """POST /api/playground: the prompt sent to the model server, its server-sent events relayed."""
    import httpx
    from fastapi.responses import StreamingResponse

    try:
        req = PlaygroundRequest.model_validate_json(await request.body())
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "body"
        return _error(400, f"{where}: {first['msg']}")
    model_url = request.app.state.model_url
    try:
        upstream = await _open_chat_stream(request.app.state.client, req)
    except LookupError as exc:
        return _error(502, str(exc))
    except httpx.HTTPError as exc:
        return _unreachable(model_url, exc)
    if upstream.status_code != 200:
        body = await upstream.aread()
        await upstream.aclose()
        return _error(502, f"the model server at {model_url} answered: "
                           f"{_upstream_error(body, upstream.status_code)}")
    return StreamingResponse(_relay(upstream), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


async def _open_chat_stream(client, req: PlaygroundRequest):
    """The model server's streamed answer to the prompt (the first model it lists when none is chosen)."""
    model = req.model or (await _model_names(client))[0]
    return await client.send(client.build_request("POST", "/v1/chat/completions", json={
        "model": model, "messages": [{"role": "user", "content": req.prompt}], "stream": True,
        "max_tokens": req.max_tokens, "temperature": req.temperature, "top_p": req.top_p}), stream=True)


async def _relay(upstream):
    """The upstream response's bytes, passed through as they arrive. If the browser leaves, starlette
    cancels this generator and closing the upstream response tells the model server to free the
    request's rows."""
    import httpx

    try:
        async for chunk in upstream.aiter_raw():
            yield chunk
    except httpx.HTTPError as exc:
        yield f"data: {json.dumps({'error': {'message': f'the model server stopped: {exc}'}})}\n\n"
    finally:
        await upstream.aclose()

async def _model_names(client) -> list[str]:
    """The models the server lists at /v1/models (`llmcycle serve` serves one); LookupError when it
    answers with an error, with something that is not a model list, or with none."""
    where = str(client.base_url).rstrip("/")
    r = await client.get("/v1/models")
    if r.status_code != 200:
        raise LookupError(f"the model server at {where} answered: {_upstream_error(r.content, r.status_code)}")
    try:
        names = [m["id"] for m in r.json()["data"]]
    except (ValueError, KeyError, TypeError):
        raise LookupError(f"{where}/v1/models is not an OpenAI-style model list: is --model-url right?") from None
    if not names:
        raise LookupError(f"the model server at {where} serves no model")
    return names


# ------------------------------------------------------------------------------------------ serving
def check_model_url(url: str) -> str:
    if not url.startswith(("http://", "https://")) or len(url.rstrip("/")) <= len("https://"):
        raise UserError(f"--model-url must be an http:// or https:// address like http://127.0.0.1:8000, "
                        f"not {url!r}")
    return url.rstrip("/").removesuffix("/v1")  # the address of `llmcycle serve` is accepted with or without /v1


def _require_ui() -> None:
    try:
        import fastapi  # noqa: F401
        import httpx  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as exc:
        raise UserError(f"the dashboard needs {exc.name}: pip install 'llmcycle[serve]'") from None


def serve_ui(store, *, host: str = "127.0.0.1", port: int = 8765, model_url: str = "http://127.0.0.1:8000",
             api_key: str | None = None, allowed_hosts=(), log_level: str = "warning") -> None:
    """Serve the dashboard until Ctrl-C. A taken port is a UserError before anything starts."""

    _require_ui()
    named = [] if host in ("0.0.0.0", "::", "") else [host]  # a wildcard address is no name to answer to
    app = create_ui_app(store, model_url=model_url, api_key=api_key, allowed_hosts=[*named, *allowed_hosts])
    sock = listen(host, port)
    import uvicorn

    bound = sock.getsockname()[1]
    shown = f"[{host}]" if ":" in host else host
    print(f"dashboard for {store.root.resolve()} on http://{shown}:{bound} "
          f"(playground model server: {app.state.model_url}); Ctrl-C stops it", flush=True)
    uvicorn.Server(uvicorn.Config(app, log_level=log_level)).run(sockets=[sock])
