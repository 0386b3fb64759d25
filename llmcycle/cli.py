"""The `llmcycle` command line. Subcommands import their stage lazily, so `--help` stays fast.

Exit status: 0 success, 2 a user error (one line naming the file, key or run at fault), 1 an internal
error (a traceback only with --debug).
"""
from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console

from llmcycle.core.configbase import PROJECT_FILE
from llmcycle.core.errors import UserError
from llmcycle.stages import registry

app = typer.Typer(help="llmcycle: the generative-AI project lifecycle in one tool.",
                  no_args_is_help=True, pretty_exceptions_enable=False, add_completion=False)
runs_app = typer.Typer(help="List, show and compare recorded runs.", no_args_is_help=True)
app.add_typer(runs_app, name="runs")

def _out_width() -> int | None:
    """COLUMNS when set (tables are laid out for it); a terminal's own width; piped output (CI logs,
    `| less`) 100 columns, the width every table is made to fit."""
    columns = os.environ.get("COLUMNS", "")
    if columns.isdigit() and int(columns) > 0:
        return int(columns)
    return None if sys.stdout.isatty() else 100


out = Console(width=_out_width())
err = Console(stderr=True)
_state = {"debug": False}

ProjectOpt = typer.Option(Path(PROJECT_FILE), "-p", "--project", help="Project file (or its folder).")


VariantOpt = typer.Option(None, "--variant", help="Only these variants.")
ResumeOpt = typer.Option(False, "--resume", help="Continue the last unfinished run.")
ForceOpt = typer.Option(False, "--force", help="Redo a variant even if an identical run exists.")


def _has_project(project: Path) -> bool:
    """A project file at --project, or in the folder it names."""
    return project.exists() or (project.parent / PROJECT_FILE).exists()
SetOpt = typer.Option(None, "--set", help="Override a key: --set pretrain.tiny.lr=2e-4 (repeatable).")
JsonOpt = typer.Option(False, "--json", help="Print machine-readable JSON instead of tables.")
WideOpt = typer.Option(False, "--wide", help="Show every figure in the side-by-side table (as wide as it "
                       "takes); by default it keeps to the columns that fit the terminal.")
AllowUnmeasuredOpt = typer.Option(False, "--allow-unmeasured", help="Let 'best' choose a run whose latency or "
                                  "size was never measured although the scope budgets it (by default: passed over).")


def emit_json(data) -> None:
    print(json.dumps(data, indent=2, default=str))


def _project(path: Path, overrides: Optional[List[str]]):
    from llmcycle.project.config import load_project

    return load_project(path, overrides or [])


@app.callback()
def _main(debug: bool = typer.Option(False, "--debug", help="Show tracebacks for errors.")):
    _state["debug"] = debug


@app.command()
def init(directory: Path = typer.Argument(..., help="Folder for the new project."),
         task: str = typer.Option("summarization", "--task",
                                  help="summarization | qa | classification | generation"),
         force: bool = typer.Option(False, "--force", help="Overwrite an existing llmcycle.yaml."),
         as_json: bool = JsonOpt):
    """Write a fully commented llmcycle.yaml for a task."""
    from llmcycle.core.errors import suggest
    from llmcycle.core.store import atomic_write_text
    from llmcycle.project import init_template as templates
    from llmcycle.project.config import TASKS, load_project

    if task not in TASKS:
        raise UserError(f"--task: unknown task '{task}'{suggest(task, TASKS)} (tasks: {', '.join(TASKS)})")
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / PROJECT_FILE
    if path.exists() and not force:
        raise UserError(f"{path} already exists (use --force to overwrite it)")
    atomic_write_text(path, templates.render(task, directory.resolve().name or "project"))
    load_project(path)  # the template must validate; a failure here is our bug
    if as_json:
        emit_json({"project_file": str(path), "task": task})
    else:
        out.print(f"wrote {path} (task: {task}); edit it, then run `llmcycle scope -p {path}`")


@app.command()
def scope(project: Path = ProjectOpt, overrides: Optional[List[str]] = SetOpt, as_json: bool = JsonOpt):
    """Print the use case, data statistics and a compute plan for every planned stage."""
    from llmcycle.project import lifecycle
    from llmcycle.stages.scope import render

    proj = _project(project, overrides)
    outcome = lifecycle.execute(proj, "scope", "plan", force=True)
    if as_json:
        emit_json({"run_id": outcome.run_id, **outcome.summary})
    else:
        render(outcome.summary, out)
        out.print(f"[dim]recorded as run {outcome.run_id}[/]")


@app.command("select")
def select_cmd(project: Path = ProjectOpt, overrides: Optional[List[str]] = SetOpt,
               force: bool = typer.Option(False, "--force", help="Measure candidates again even when unchanged."),
               as_json: bool = JsonOpt):
    """Measure the candidate base models on the project's data (optionally after a short probe
    fine-tune) and choose one: `model.name: run:select/best` then uses it."""
    from llmcycle.project import lifecycle

    proj = _project(project, overrides)
    names = _variants_of(proj, "select", "no select section configured (add `select: {candidates: ...}`)")
    outcomes = [lifecycle.execute_variant(proj, "select", name, force=force, progress=not as_json)
                for name in names]
    if as_json:
        emit_json([o.to_dict() for o in outcomes])
    else:
        _show_selection(outcomes)
    _exit_if_failed(outcomes)


def _variants_of(proj, stage: str, missing: str) -> list[str]:
    """The stage's configured variants, or a one-line error saying what to add."""
    from llmcycle.project import lifecycle

    names = list(lifecycle.variants(proj, stage))
    if not names:
        raise UserError(f"{proj.path}: {missing}")
    return names


def _show_selection(outcomes) -> None:
    from llmcycle.core.textsafe import as_text
    from llmcycle.evaluation.compare import select_reasons, select_table

    for o in outcomes:
        if o.stage == "select" and "candidates" in o.summary:
            out.print(select_table(o.summary, out.width))
            for line in select_reasons(o.summary):
                out.print(as_text(line))
            for note in o.summary.get("notes", []):
                out.print("[yellow]note:[/]", as_text(note))
            out.print(f"[dim]later stages use it as run:select/best (run {o.run_id})[/]")


def _exit_if_failed(outcomes) -> None:
    """Alternatives that failed (recorded, the others went on) still make the command exit 2."""
    failed = [o for o in outcomes if o.status == "failed"]
    if failed:
        for o in failed:
            print(f"error: {o.stage}.{o.variant} failed: {o.summary.get('error')} (recorded as run "
                  f"{o.run_id}; the other variants went on)", file=sys.stderr)
        raise typer.Exit(2)


@app.command()
def tune(project: Path = ProjectOpt, overrides: Optional[List[str]] = SetOpt,
         variant: Optional[List[str]] = VariantOpt, resume: bool = ResumeOpt,
         merge: bool = typer.Option(False, "--merge", help="Also save adapters merged into the base."),
         force: bool = ForceOpt,
         as_json: bool = JsonOpt, wide: bool = WideOpt):
    """Fine-tune the project's model: full, LoRA, prompt tuning or QLoRA; every variant evaluated.

    Several processes: torchrun --nproc_per_node N -m llmcycle tune ...
    """
    from llmcycle.project import lifecycle

    _state["wide"] = wide
    proj = _project(project, overrides)
    if merge:
        names = _variant_names(proj, "tune", variant)
        proj = _project(project, (overrides or []) + [f"tune.{n}.merge=true" for n in names])
    outcomes = _run_stage(proj, "tune", variant, resume=resume, force=force, as_json=as_json)
    if lifecycle.is_main_process():
        _report_outcomes(outcomes, as_json, proj)


def _variant_names(proj, stage: str, requested: Optional[List[str]]) -> list[str]:
    """The variants to run: the requested ones in the stage's order (an unknown name is kept, so that
    running it says which variants exist), else all; a stage with none configured is an error."""
    from llmcycle.project import lifecycle

    known = list(lifecycle.variants(proj, stage))
    names = [n for n in known if n in requested] + [n for n in requested if n not in known] if requested else known
    if not names:
        raise UserError(f"{proj.path}: no {stage} variants configured (add a `{stage}:` section)")
    return names


def _run_stage(proj, stage: str, requested: Optional[List[str]], *, resume: bool, force: bool, as_json: bool):
    from llmcycle.project import lifecycle

    return [lifecycle.execute(proj, stage, name, force=force, resume=resume, progress=not as_json)
            for name in _variant_names(proj, stage, requested)]


def _stage_command(stage: str, summary: str):
    """`llmcycle STAGE`: run the stage's variants (or --variant ones), skipping unchanged ones."""
    def command(project: Path = ProjectOpt, overrides: Optional[List[str]] = SetOpt,
                variant: Optional[List[str]] = VariantOpt, resume: bool = ResumeOpt, force: bool = ForceOpt,
                as_json: bool = JsonOpt, wide: bool = WideOpt):
        from llmcycle.project import lifecycle

        _state["wide"] = wide
        proj = _project(project, overrides)
        outcomes = _run_stage(proj, stage, variant, resume=resume, force=force, as_json=as_json)
        if lifecycle.is_main_process():  # under torchrun, rank 0 speaks for all (as tune does)
            _report_outcomes(outcomes, as_json, proj)

    command.__doc__ = summary[0].upper() + summary[1:] + "."
    return command


# Stages without options of their own get their command from the registry: a new stage has one too.
for _stage in registry.STAGES:
    if _stage.name not in ("scope", "select", "prompt", "tune"):
        app.command(_stage.name)(_stage_command(_stage.name, _stage.summary))


@app.command()
def serve(run: Optional[str] = typer.Option(None, "--run", help="RUN id or STAGE/VARIANT, 'best' (the best "
                                            "run within the scope's budgets), a model folder or a Hub id; "
                                            "default: the project's model."),
          host: str = typer.Option("127.0.0.1", "--host"),
          port: int = typer.Option(8000, "--port", min=0, max=65535, help="0: any free port"),
          api_key: Optional[str] = typer.Option(None, "--api-key", envvar="LLMCYCLE_API_KEY",
                                                help="Require `Authorization: Bearer KEY`."),
          max_batch_size: int = typer.Option(16, "--max-batch-size", help="Requests decoded together."),
          backend: str = typer.Option("transformers", "--backend", help="transformers | vllm (GPU)"),
          rag_index: Optional[Path] = typer.Option(None, "--rag-index", help="Answer chat completions from "
                                                   "this index, with citations (overrides augment.rag.index)."),
          pal: Optional[bool] = typer.Option(None, "--pal/--no-pal", help="Accept PAL requests, "
                                             '{"llmcycle": {"mode": "pal"}} (overrides augment.pal).'),
          allow_unmeasured: bool = AllowUnmeasuredOpt,
          project: Path = ProjectOpt, overrides: Optional[List[str]] = SetOpt, as_json: bool = JsonOpt):
    """Serve a model behind an OpenAI-compatible API (completions, chat, streaming) until Ctrl-C."""
    from llmcycle.serve.app import check_backend
    from llmcycle.serve.app import serve as start

    check_backend(backend)
    has_project = _has_project(project)
    proj = _project(project, overrides) if has_project else None
    ref = run
    if run == "best":
        if proj is None:
            raise UserError(f"--run best needs a project (not found: {project})")
        from llmcycle.evaluation.success import best_run

        choice = best_run(proj, allow_unmeasured=allow_unmeasured)
        ref = choice["run"]
        if as_json:
            emit_json({"best": choice})
        else:
            _show_best(choice)
    mcfg = proj.config.model if proj is not None else None
    opts = mcfg.model_dump() if mcfg is not None else {}
    start(ref, proj, host=host, port=port, api_key=api_key, max_batch_size=max_batch_size, backend=backend,
          context_window=opts.get("context_window"), dtype=opts.get("dtype", "auto"),
          device=opts.get("device", "auto"), rag_index=str(rag_index) if rag_index else None, pal=pal)


def _show_best(choice: dict) -> None:
    """The run `--run best` serves, its budget check, and the better runs it passed over."""
    from llmcycle.core.numbers import number
    from llmcycle.core.textsafe import as_text
    from llmcycle.evaluation.success import budget_text

    latency = (f"p95 {number(choice['latency_p95_ms'], 0)} ms" if choice["latency_measured"]
               else "latency not measured")
    size = f"{number(choice['size_mb'], 1)} MB" if choice["size_mb"] is not None else "size not measured"
    check = choice["budget"]
    budgets = ("within the budgets" if check["state"] == "fits"
               else f"budgets {budget_text(check)}, chosen because of --allow-unmeasured")
    out.print(as_text(f"best: {choice['stage']}/{choice['variant']} ({choice['run']}) {choice['metric']} "
                      f"{number(choice['value'], 3)}, {size}, {latency}; {budgets}"), soft_wrap=True)
    if choice.get("gate"):  # scope.require_significant_gain: how it beat the prompt baseline
        out.print(as_text(f"  {choice['gate']['why']}"), soft_wrap=True)
    for skipped in choice["excluded"]:
        out.print(as_text(f"  passed over {skipped['stage']}/{skipped['variant']}: {skipped['why']}", style="dim"),
                  soft_wrap=True)


@app.command()
def ui(project: Path = ProjectOpt,
       host: str = typer.Option("127.0.0.1", "--host"),
       port: int = typer.Option(8765, "--port", min=0, max=65535, help="0: any free port"),
       model_url: str = typer.Option("http://127.0.0.1:8000", "--model-url", help="The OpenAI-compatible "
                                     "server the playground talks to (e.g. `llmcycle serve`)."),
       api_key: Optional[str] = typer.Option(None, "--api-key", envvar="LLMCYCLE_API_KEY",
                                             help="The model server's key, when it has one."),
       allow_host: Optional[List[str]] = typer.Option(None, "--allow-host", help="Another name the dashboard "
                                                      "answers to besides localhost and --host (repeatable).")):
    """A local dashboard: runs with filters, comparisons with plots and outputs, a streaming playground.
    It answers only requests addressed to its own names and POSTs from its own page."""
    from llmcycle.ui.app import serve_ui

    serve_ui(_store(project), host=host, port=port, model_url=model_url, api_key=api_key,
             allowed_hosts=allow_host or [])


@app.command()
def pal(data: Path = typer.Option(..., "--data", help="GSM8K-style JSONL: question, answer ending in '#### N'."),
        model: Optional[str] = typer.Option(None, "--model", help="RUN, local PATH or Hub id (default: the "
                                            "project's model)."),
        limit: int = typer.Option(20, "--limit", help="The first N problems."),
        shots: int = typer.Option(4, "--shots", help="Worked examples in each prompt (0-4)."),
        max_new_tokens: int = typer.Option(256, "--max-new-tokens", help="Tokens for each program."),
        project: Path = ProjectOpt, overrides: Optional[List[str]] = SetOpt, as_json: bool = JsonOpt):
    """Program-aided LM: the model writes a program, a sandbox runs it; accuracy vs answering directly."""
    from llmcycle.augment.pal import DEFAULT_SHOTS, evaluate_model_on_gsm8k
    from llmcycle.evaluation import harness

    if not 0 <= shots <= len(DEFAULT_SHOTS):
        raise UserError(f"--shots must be between 0 and {len(DEFAULT_SHOTS)}, got {shots}")
    if limit < 1:
        raise UserError(f"--limit must be at least 1, got {limit}")
    if not data.is_file():
        raise UserError(f"--data: file not found: {data}")
    has_project = _has_project(project)
    proj = _project(project, overrides) if has_project else None
    if model is None and (proj is None or proj.config.model is None):
        raise UserError("no model: pass --model or run inside a project with a `model:` section")
    loaded = harness.load_project_model(proj, model) if proj is not None else harness.load(model)
    result = evaluate_model_on_gsm8k(loaded, data, limit, shots=DEFAULT_SHOTS[:shots],
                                     max_new_tokens=max_new_tokens, progress=not as_json)
    summary = {k: v for k, v in result.items() if k not in ("pal", "direct")}
    for name in ("pal", "direct"):
        summary.update({f"{name}_{k}": v for k, v in result[name].items() if k not in ("rows", "accuracy")})
    if proj is not None:
        from llmcycle.core.store import atomic_write_text

        with proj.store().start("augment", "pal", {"model": loaded.name, "data": str(data), "limit": limit},
                                parent=loaded.run_id, project_dir=proj.dir) as run:
            rows = result["pal"]["rows"] + result["direct"]["rows"]
            atomic_write_text(run.artifacts / "gsm8k_rows.jsonl",
                              "".join(json.dumps(r, default=str) + "\n" for r in rows))
            run.finish(summary)
        summary["run_id"] = run.id
    if as_json:
        emit_json(summary)
    else:
        out.print(f"{loaded.name} on {summary['n']} problems of {data}: PAL accuracy "
                  f"{summary['pal_accuracy']:.3f}, direct {summary['direct_accuracy']:.3f}")
        if "run_id" in summary:
            out.print(f"[dim]recorded as run {summary['run_id']}[/]")


@app.command()
def agent(question: str = typer.Argument(..., help="The question."),
          model: Optional[str] = typer.Option(None, "--model", help="RUN, PATH or Hub id (default: the "
                                              "project's model)."),
          index: Optional[Path] = typer.Option(None, "--index", help="Index for the retrieval tool (default: "
                                               "augment.rag.index, else ./index when there is one)."),
          max_steps: int = typer.Option(5, "--max-steps", help="Most model calls before it stops."),
          max_new_tokens: int = typer.Option(128, "--max-new-tokens", help="Tokens per step."),
          project: Path = ProjectOpt, overrides: Optional[List[str]] = SetOpt, as_json: bool = JsonOpt):
    """A ReAct agent: the model thinks and calls tools (calculator, retrieval, python sandbox) until it answers."""
    import contextlib

    from llmcycle.augment import agent as react
    from llmcycle.augment.index import MANIFEST, Index
    from llmcycle.evaluation import harness

    if max_steps < 1:
        raise UserError(f"--max-steps must be at least 1, got {max_steps}")
    has_project = _has_project(project)
    proj = _project(project, overrides) if has_project else None
    if model is None and (proj is None or proj.config.model is None):
        raise UserError("no model: pass --model or run inside a project with a `model:` section")
    rag_cfg = proj.config.augment.rag if proj is not None and proj.config.augment else None
    if index is None and rag_cfg is not None:
        index = proj.dir / rag_cfg.index
    elif index is None and (_index_dir(None, project) / MANIFEST).is_file():
        index = _index_dir(None, project)
    tools = react.default_tools(Index.load(index) if index is not None else None)
    loaded = harness.load_project_model(proj, model) if proj is not None else harness.load(model)
    config = {"question": question, "model": loaded.name, "index": str(index) if index else None,
              "max_steps": max_steps, "max_new_tokens": max_new_tokens, "tools": [t.name for t in tools]}
    recording = proj.store().start("augment", "agent", config, parent=loaded.run_id, project_dir=proj.dir) \
        if proj is not None else contextlib.nullcontext()
    with recording as run:
        result = react.run_agent(question, react.model_fn(loaded, max_new_tokens=max_new_tokens), tools,
                                 max_steps=max_steps)
        if run is not None:
            react.record(run, result)
    summary = {**result.summary(), **({"run_id": run.id} if run is not None else {})}
    if as_json:
        emit_json({**summary, "transcript": result.transcript, "citations": result.citations})
    else:
        out.print(react.format_transcript(result), markup=False, highlight=False, soft_wrap=True)
        if run is not None:
            out.print(f"[dim]recorded as run {run.id}[/]")


def _index_dir(index: Optional[Path], project: Path) -> Path:
    """--index, else `index/` beside the project file (or in the current folder)."""
    if index is not None:
        return index
    folder = project if project.is_dir() else project.parent
    return folder / "index"


@app.command("index")
def index_cmd(paths: Optional[List[Path]] = typer.Argument(None, help="Files or folders to index (text, "
                                                           "Markdown, HTML; PDF with pypdf)."),
              index: Optional[Path] = typer.Option(None, "--index", help="Index folder (default: ./index "
                                                   "beside the project file)."),
              model: Optional[str] = typer.Option(None, "--model", help="sentence-transformers model name or "
                                                  "path (default: all-MiniLM-L6-v2, offline)."),
              chunk_tokens: Optional[int] = typer.Option(None, "--chunk-tokens", help="Tokens per chunk (200)."),
              overlap: Optional[int] = typer.Option(None, "--overlap", help="Tokens shared by neighbours (40)."),
              kind: Optional[str] = typer.Option(None, "--kind", help="auto | flat | ivf | hnsw"),
              rebuild: bool = typer.Option(False, "--rebuild", help="Build from scratch instead of updating."),
              remove: Optional[List[Path]] = typer.Option(None, "--remove", help="Drop these files' chunks."),
              project: Path = ProjectOpt, as_json: bool = JsonOpt):
    """Chunk, embed and index documents for retrieval; re-running adds new or changed files only."""
    from llmcycle.augment import index as rag_index

    where = _index_dir(index, project)
    if remove:
        stats = rag_index.remove_from_index(where, [str(p) for p in remove], progress=not as_json)
    else:
        if not paths:
            raise UserError("index: give files or folders to index (or --remove PATH)")
        opts = {k: v for k, v in {"model": model, "chunk_tokens": chunk_tokens, "overlap": overlap,
                                   "kind": kind}.items() if v is not None}
        build = rag_index.build_index if rebuild else rag_index.update_index
        stats = build([str(p) for p in paths], where, progress=not as_json, **opts)
    stats = {"index": str(where), **stats}
    if as_json:
        emit_json(stats)
    else:
        out.print(", ".join(f"{k}: {v}" for k, v in stats.items() if not isinstance(v, (list, dict))))
        for skipped in stats.get("skipped") or []:
            out.print(f"  [yellow]skipped[/] {skipped}")


@app.command()
def ask(question: str = typer.Argument(..., help="The question."),
        index: Optional[Path] = typer.Option(None, "--index", help="Index folder (default: ./index)."),
        model: Optional[str] = typer.Option(None, "--model", help="RUN, PATH or Hub id (default: the project's model)."),
        k: int = typer.Option(5, "-k", help="Chunks to retrieve."),
        max_new_tokens: int = typer.Option(128, "--max-new-tokens"),
        project: Path = ProjectOpt, overrides: Optional[List[str]] = SetOpt, as_json: bool = JsonOpt):
    """Answer from the indexed documents, with citations [1], [2] mapping to file and position."""
    from llmcycle.augment import rag
    from llmcycle.augment.index import Index
    from llmcycle.evaluation import harness

    if k < 1:
        raise UserError(f"-k must be at least 1, got {k}")
    idx = Index.load(_index_dir(index, project))
    has_project = _has_project(project)
    proj = _project(project, overrides) if has_project else None
    if model is None and (proj is None or proj.config.model is None):
        raise UserError("no model: pass --model or run inside a project with a `model:` section")
    loaded = harness.load_project_model(proj, model) if proj is not None else harness.load(model)
    result = rag.answer(question, idx, loaded, k=k, max_new_tokens=max_new_tokens)
    if as_json:
        emit_json(result.to_dict())
    else:
        out.print(result.text)
        out.print(rag.format_sources(result))


@app.command("eval")
def eval_cmd(model: Optional[str] = typer.Option(None, "--model", help="RUN id, STAGE/VARIANT, local PATH or "
                                                  "Hub id (default: the project's model); with --endpoint, the "
                                                  "name of the model the endpoint serves."),
             data: Optional[str] = typer.Option(None, "--data",
                                                help="Evaluate on this file instead of the eval split."),
             limit: Optional[int] = typer.Option(None, "--limit", min=1, help="Only the first N examples."),
             endpoint: Optional[str] = typer.Option(None, "--endpoint", help="Evaluate the model behind this "
                                                    "OpenAI-compatible API: its base URL, e.g. "
                                                    "http://127.0.0.1:8000/v1."),
             api_key_env: Optional[str] = typer.Option(None, "--api-key-env", help="With --endpoint: the "
                                                       "environment variable that holds its API key."),
             chat: Optional[bool] = typer.Option(None, "--chat/--completions", help="With --endpoint: send the "
                                                 "prompt's chat turns to /chat/completions (default), or its flat "
                                                 "text to /completions."),
             concurrency: Optional[int] = typer.Option(None, "--concurrency", min=1, help="With --endpoint: "
                                                       "requests in flight at once (default 4)."),
             timeout: Optional[float] = typer.Option(None, "--timeout", min=0, help="With --endpoint: seconds a "
                                                     "request may take (default 60)."),
             retries: Optional[int] = typer.Option(None, "--retries", min=0, help="With --endpoint: retries after a "
                                                   "429, a 5xx, a timeout or a connection error, with exponential "
                                                   "backoff or the server's Retry-After (default 3)."),
             price_in: Optional[float] = typer.Option(None, "--price-per-1k-input", min=0, help="With --endpoint: "
                                                      "USD per 1000 prompt tokens (the summary then has the cost)."),
             price_out: Optional[float] = typer.Option(None, "--price-per-1k-output", min=0, help="With "
                                                       "--endpoint: USD per 1000 completion tokens."),
             served_run: Optional[str] = typer.Option(None, "--served-run", help="With --endpoint: the run whose "
                                                      "model it serves (default: the run --model names, as "
                                                      "`llmcycle serve --run RUN` names it)."),
             resume: bool = typer.Option(False, "--resume", help="With --endpoint: continue the last unfinished "
                                         "evaluation of this endpoint, asking only for what it has not answered."),
             project: Path = ProjectOpt, overrides: Optional[List[str]] = SetOpt, as_json: bool = JsonOpt):
    """Evaluate any model (or any OpenAI-compatible endpoint) with the project's prompt and record a run with
    per-example outputs."""
    from llmcycle.evaluation.compare import compare

    proj = _project(project, overrides)
    if endpoint is None:
        given = {"--api-key-env": api_key_env, "--chat/--completions": chat, "--concurrency": concurrency,
                 "--timeout": timeout, "--retries": retries, "--price-per-1k-input": price_in,
                 "--price-per-1k-output": price_out, "--served-run": served_run, "--resume": resume or None}
        extra = next((name for name, value in given.items() if value is not None), None)
        if extra:
            raise UserError(f"{extra} applies to an endpoint: add --endpoint URL (or leave {extra} out)")
        run_id, summary = _eval_model(proj, model, data, limit, as_json)
    else:
        from llmcycle.core import ranks
        from llmcycle.evaluation.endpoint import endpoint as settings

        if ranks.world_size() > 1:
            raise UserError("eval --endpoint: one process sends the requests (--concurrency sets how many at once); "
                            "run it without torchrun")

        ep = settings(endpoint, model, api=None if chat is None else ("chat" if chat else "completions"),
                      api_key_env=api_key_env, concurrency=concurrency, timeout=timeout, retries=retries,
                      price_in=price_in, price_out=price_out)
        run_id, summary = _eval_endpoint(proj, ep, data, limit, served_run, resume, as_json)
    if run_id is None:  # another torchrun rank: rank 0 prints
        return
    if as_json:
        emit_json({"run_id": run_id, **summary})
    else:
        compare([proj.store().get(run_id)], out, n_examples=min(3, summary["n_examples"]))
        if endpoint is not None:
            _show_endpoint(summary)
        out.print(f"[dim]recorded as run {run_id}[/]")


def _eval_model(proj, model: Optional[str], data, limit, as_json: bool) -> tuple[str, dict]:
    from llmcycle.evaluation import harness
    from llmcycle.evaluation.evaluate import evaluate_model
    from llmcycle.project import lifecycle

    ref = model or (proj.config.model.name if proj.config.model else None)
    if ref is None:
        raise UserError(f"{proj.path}: no model to evaluate: pass --model or add a `model:` section")
    _, parent = harness.resolve(ref, proj)
    if not lifecycle.is_main_process():  # torchrun: this rank generates its share; rank 0 records the run
        return None, evaluate_model(proj, None, model, data_file=data, limit=limit, progress=False)
    variant = Path(ref.removeprefix("run:")).name or "model"
    config = {"model": ref, "data": data, "limit": limit,
              "evaluate": proj.config.evaluate.model_dump() if proj.config.evaluate else None}
    with proj.store().start("eval", variant, config, parent=parent, project_dir=proj.dir) as run:
        summary = evaluate_model(proj, run, model, data_file=data, limit=limit, progress=not as_json)
    return run.id, summary


def _eval_endpoint(proj, ep, data, limit, served_run: Optional[str], resume: bool, as_json: bool) -> tuple[str, dict]:
    """An endpoint's evaluation as a run `eval/endpoint-NAME` (NAME: the served run's STAGE-VARIANT when
    it is known, else the model's name), under the run it serves."""
    from llmcycle.evaluation.evaluate import endpoint_variant, evaluate_endpoint, resumable, served_run_of

    store = proj.store()
    served = served_run_of(store, served_run, ep.model)
    rec = store.get(served) if served else None
    variant = endpoint_variant(f"{rec.stage}-{rec.variant}" if rec else ep.model)
    config = {"endpoint": ep.url, "model": ep.model, "api": ep.api, "data": data, "limit": limit,
              "served_run": served, "evaluate": proj.config.evaluate.model_dump() if proj.config.evaluate else None}
    resume_ref = resumable(store, variant, config) if resume else None
    with store.start("eval", variant, config, parent=served, resume_ref=resume_ref, project_dir=proj.dir) as run:
        summary = evaluate_endpoint(proj, run, ep, data_file=data, limit=limit, progress=not as_json,
                                    served_run=served)
    return run.id, summary


def _show_endpoint(summary: dict) -> None:
    """How the asking went: reused answers, retries, tokens, cost."""
    from llmcycle.core.numbers import number

    cost = summary.get("cost_usd")
    priced = (f", cost ${number(cost)}" if cost is not None else ", cost unknown (answers without usage)"
              if "cost_usd" in summary else "")
    out.print(f"endpoint {summary['endpoint']} ({summary['endpoint_model']}): {summary['asked']} asked, "
              f"{summary['reused_answers']} answers reused, {summary['retries']} retries; tokens "
              f"{summary['usage_prompt_tokens']} in / {summary['usage_completion_tokens']} out{priced}",
              soft_wrap=True, markup=False)


@app.command()
def prompt(project: Path = ProjectOpt, overrides: Optional[List[str]] = SetOpt,
           force: bool = typer.Option(False, "--force", help="Re-run variants even when unchanged."),
           as_json: bool = JsonOpt, wide: bool = WideOpt):
    """Sweep prompt templates x shots x shot selection x generation configs; compare side by side."""
    from llmcycle.project import lifecycle

    _state["wide"] = wide
    proj = _project(project, overrides)
    names = _variants_of(proj, "prompt", "no prompt sweep configured (add a `prompt:` section)")
    outcomes = [lifecycle.execute(proj, "prompt", name, force=force, progress=not as_json)
                for name in names]
    _report_outcomes(outcomes, as_json, proj)


@app.command("run")
def run_cmd(project: Path = ProjectOpt, overrides: Optional[List[str]] = SetOpt,
            only: Optional[List[str]] = typer.Option(None, "--only", help="Run only this stage (repeatable)."),
            start: Optional[str] = typer.Option(None, "--from", help="Start at this stage."),
            force: bool = typer.Option(False, "--force", help="Re-run stages even when unchanged."),
            as_json: bool = JsonOpt, wide: bool = WideOpt):
    """Carry the project through every configured stage in lifecycle order."""
    from llmcycle.project import lifecycle

    _state["wide"] = wide
    proj = _project(project, overrides)

    def show(o):
        if not as_json:
            colour = {"completed": "green", "skipped": "dim"}.get(o.status, "red")
            out.print(f"[{colour}]{o.status:9}[/] {o.stage}.{o.variant} -> {o.run_id}")

    outcomes = lifecycle.run_all(proj, only=only, start=start, force=force, progress=not as_json,
                                 on_outcome=show)
    if as_json:
        emit_json({"project": str(proj.path), "runs": [o.to_dict() for o in outcomes]})
    elif not outcomes:
        out.print("nothing to run: no stage is configured in " + str(proj.path))
    else:
        _show_selection(outcomes)
        _compare_evaluated(outcomes, proj)
        out.print(f"runs recorded in {proj.store().root}; compare them with `llmcycle runs compare`")
    _exit_if_failed(outcomes)


def _report_outcomes(outcomes, as_json: bool, proj=None) -> None:
    if as_json:
        emit_json([o.to_dict() for o in outcomes])
        return
    from llmcycle.core.numbers import number
    from llmcycle.evaluation.compare import optimize_lines

    for o in outcomes:
        out.print(f"{o.status}: {o.stage}.{o.variant} -> run {o.run_id}")
        for key in ("model_dir", "final_loss", "useful_tokens_per_s", "accuracy", "macro_f1",
                    "preference_accuracy", "wall_s", "parameters"):
            if key in o.summary:
                value = o.summary[key]
                out.print(f"  {key}: {number(value) if isinstance(value, float) else value}")
        for line in optimize_lines(o.summary):  # optimize: the source measured alike, before -> after
            out.print(f"  {line}")
        pref = o.summary.get("training") if o.stage == "align" else None
        if isinstance(pref, dict) and "reward_accuracy" in pref:  # dpo / orpo: on how many pairs, what was left out
            skipped = ", ".join(f"{n} {k}" for k, n in pref.get("pairs_skipped", {}).items()) or "none"
            pool = "held-out" if pref["measured_on"] == "eval" else "training"
            out.print(f"  {pref['method']} reward accuracy: {pref['reward_accuracy']:.3f} on "
                      f"{pref['measured_pairs']} "
                      f"{pool} pairs; trained on {pref['pairs']} pairs; skipped: {skipped}")
        for line in _group_lines(o.summary.get("training") if o.stage == "align" else None):
            out.print(f"  {line}")
        if o.stage == "align" and isinstance(o.summary.get("paired"), dict):
            from llmcycle.evaluation.paired import paired_table

            table = paired_table(o.summary["paired"])
            n = o.summary["paired"]["n_common"]
            table.title = f"{o.variant}: after (B) - before (A) alignment on {n} held-out examples"
            out.print(table)
    _compare_evaluated(outcomes, proj)


def _group_lines(training) -> list[str]:
    """grpo / rloo: where the training reward, the KL and the share of flat groups started and ended."""
    if not isinstance(training, dict) or "flat_group_share_first" not in training:
        return []
    from llmcycle.core.numbers import number

    parts = [f"{name} {number(training[f'{key}_first'], 3)}→{number(training[f'{key}_last'], 3)}"
             for key, name in (("reward_mean", "reward"), ("kl", "KL"), ("flat_group_share", "flat groups"))
             if f"{key}_first" in training]
    return [f"{training['steps']} steps, first→last fifth: " + ", ".join(parts)]


def _compare_evaluated(outcomes, proj) -> None:
    """Side-by-side table of the runs just made (or reused) that evaluated something."""
    from llmcycle.evaluation.compare import compare

    evaluated = [o for o in outcomes if "headline" in o.summary]
    if proj is not None and evaluated:
        store = proj.store()
        shown = proj.config.evaluate.show_examples if proj.config.evaluate else 3
        compare([store.get(o.run_id) for o in evaluated], out, shown, wide=_state.get("wide", False))


# -- runs -----------------------------------------------------------------------------------------
@runs_app.command("list")
def runs_list(project: Path = ProjectOpt, stage: Optional[str] = typer.Option(None, "--stage"),
              status: Optional[str] = typer.Option(None, "--status"), as_json: bool = JsonOpt):
    """List runs, oldest first."""
    from llmcycle.evaluation.compare import list_table

    store = _store(project)
    runs = store.list(stage=stage, status=status)
    if as_json:
        emit_json([r.to_dict() for r in runs])
    elif not runs:
        out.print(f"no runs in {store.root}")
    else:
        out.print(list_table(runs, out.width))


@runs_app.command("show")
def runs_show(run: str = typer.Argument(..., help="Run id, id prefix, latest, or STAGE/VARIANT."),
              project: Path = ProjectOpt, as_json: bool = JsonOpt):
    """Show one run: its record, config, summary and last metrics."""
    from llmcycle.evaluation.compare import show

    rec = _store(project).get(run)
    data = {**rec.to_dict(), **rec.meta, "config": rec.config, "summary": rec.summary(),
            "metrics_logged": len(rec.metrics())}
    if as_json:
        emit_json(data)
    else:
        show(rec, out)


@runs_app.command("compare")
def runs_compare(runs: Optional[List[str]] = typer.Argument(None, help="Runs to compare (default: all completed)."),
                 project: Path = ProjectOpt, stage: Optional[str] = typer.Option(None, "--stage"),
                 examples: int = typer.Option(3, "--examples", min=0, help="Examples shown side by side."),
                 as_json: bool = JsonOpt, wide: bool = WideOpt):
    """Compare runs side by side: metrics (with confidence intervals, best marked) and outputs; two runs
    named (A B) also example by example: B - A with paired intervals and p-values, the most changed."""
    from llmcycle.evaluation.compare import compare, compare_rows, side_by_side
    from llmcycle.evaluation.paired import print_paired

    store = _store(project)
    records = [store.get(r) for r in runs] if runs else store.list(stage=stage, status="completed")
    # computed first: runs with no example in common are a one-line error before any table
    paired, note = _paired(records, examples) if runs and len(runs) == 2 else (None, None)
    if as_json:
        data = {"runs": compare_rows(records), "examples": side_by_side(records, examples)}
        emit_json({**data, "paired": paired, "paired_note": note} if runs and len(runs) == 2 else data)
    elif not records:
        out.print(f"no completed runs in {store.root}")
    else:
        compare(records, out, examples, wide=wide)
        if paired is not None:
            print_paired(paired, out)
        elif note:
            out.print(note, style="dim", markup=False)


def _paired(records, k: int) -> tuple[dict | None, str | None]:
    """`runs compare A B`'s paired comparison, or (None, why) when a run has no per-example outputs (a
    pretrain run evaluated nothing: its table still compares)."""
    from llmcycle.evaluation.paired import has_predictions, paired_runs

    lacking = next((r for r in records if not has_predictions(r)), None)
    if lacking is not None:
        return None, (f"no paired comparison: run {lacking.id} ({lacking.stage}/{lacking.variant}) has no "
                      "predictions.jsonl (it evaluated nothing example by example)")
    return paired_runs(*records, k=k), None


@app.command()
def report(project: Path = ProjectOpt,
           output: Optional[Path] = typer.Option(None, "-o", "--output", help="File to write (default: "
                                                 "report.html, or report.md, in the project folder)."),
           fmt: Optional[str] = typer.Option(None, "--format", help="html (one self-contained file) | md "
                                             "(plots as PNG files beside it); default from the output's suffix."),
           allow_unmeasured: bool = AllowUnmeasuredOpt,
           as_json: bool = JsonOpt):
    """Write one report of the project: lineage, every variant against the scope, plots, sample outputs."""
    from llmcycle.report.build import write_report

    result = write_report(_project(project, None), output, fmt, allow_unmeasured=allow_unmeasured)
    if as_json:
        emit_json(result)
    else:
        missing = f", {len(result['missing'])} with missing files" if result["missing"] else ""
        out.print(f"report: {result['report']} ({result['runs']} runs{missing}, {len(result['plots'])} plots)",
                  soft_wrap=True, markup=False)


def _store(project: Path):
    from llmcycle.core.store import RunStore

    folder = project if project.is_dir() else project.parent
    if not project.exists():
        raise UserError(f"project file not found: {project} (pass -p PATH)")
    return RunStore.for_project(folder)


# -- entry point ----------------------------------------------------------------------------------
def _sigterm(signum, frame):
    # Turn SIGTERM into the same path as Ctrl-C so the run store marks the run incomplete.
    raise KeyboardInterrupt


def main(argv: Optional[List[str]] = None) -> int:
    signal.signal(signal.SIGTERM, _sigterm)
    # Our own rich progress bars report long work; the libraries' tqdm bars and info logs
    # (e.g. "Loading weights") would only clutter the output and the one-line errors.
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import warnings

    # Deprecation notices from the libraries are for their developers, not for our users.
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", message=".*fan_in_fan_out.*")
    args = sys.argv[1:] if argv is None else argv
    out.width = _out_width()  # the width of this call's terminal (tests call main() under several)
    _state["wide"] = False
    debug = "--debug" in args
    try:
        status = app(args=args, standalone_mode=False, prog_name="llmcycle")
        return status if isinstance(status, int) else 0  # click returns a command's typer.Exit code
    except typer.Exit as exc:  # --help, or a command's explicit exit
        return exc.exit_code
    except (typer.Abort, KeyboardInterrupt):
        err.print("interrupted")
        return 130
    except typer.TyperException as exc:  # usage errors: bad option values, missing arguments
        message = exc.format_message() if hasattr(exc, "format_message") else str(exc)
        print(f"error: {message} (see --help)", file=sys.stderr)
        return getattr(exc, "exit_code", 2)
    except KeyboardInterrupt:
        err.print("interrupted")
        return 130
    except UserError as exc:
        if debug:
            err.print_exception()
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except Exception as exc:  # noqa: BLE001 - the one place internal errors become a line
        if debug:
            err.print_exception()
        first = str(exc).splitlines()[0] if str(exc) else ""
        print(f"internal error: {type(exc).__name__}: {first} (run with --debug for the traceback)",
              file=sys.stderr)
        return 1


def entry() -> None:
    sys.exit(main())
