"""Evaluate: score any model with the project's prompt on the eval set, recorded as a run.

    llmcycle eval --model RUN|PATH|HUB_ID [--data FILE] [--limit N] [--json]
    llmcycle eval --endpoint URL --model NAME [...]      (any OpenAI-compatible API: evaluation/endpoint.py)

The project's prompt is `evaluate.template` (default: the task's standard prompt); generation settings
are `evaluate.generation`. Each evaluation is a run (stage `eval`) with the metrics in its summary and
every example's prompt, references and output in artifacts/predictions.jsonl. An endpoint's answers are
scored by the same harness.score as a local model's outputs, so both runs have the same shape.
"""
from __future__ import annotations

import json
import re

from llmcycle.core.errors import UserError
from llmcycle.core.progress import notice
from llmcycle.data.prompting import build_prompt, check_template
from llmcycle.evaluation import endpoint as api
from llmcycle.evaluation import harness
from llmcycle.evaluation.endpoint import JOURNAL
from llmcycle.evaluation.settings import (
    eval_examples,
    name_lexicon,
    project_system,
    project_template,
    settings,
)
from llmcycle.models.generation import GenerationResult


def score_on_project(project, loaded, examples, *, label: str, progress: bool = True, template: str | None = None,
                     perplexity: bool | None = None):
    """A model scored as every stage scores it: the project's template and system prompt, examples
    whose prompt does not fit the window skipped and counted (or refused: evaluate.on_overflow), the
    project's generation settings and metrics. (summary, rows, the fitted prompts)."""
    ev = settings(project)
    fitted = harness.fit_eval_prompts(loaded, template or project_template(project), examples, ev.generation,
                                      system=project_system(project), on_overflow=ev.on_overflow, label=label)
    summary, rows = harness.evaluate(loaded, fitted.prompts, fitted.examples(examples), project.config.project.task,
                                     ev.generation, perplexity=ev.perplexity if perplexity is None else perplexity,
                                     progress=progress, label=label, lexicon=name_lexicon(project),
                                     skipped=fitted.skipped, min_examples=ev.min_examples)
    return summary, rows, fitted


def evaluate_model(project, run, model_ref: str | None = None, *, data_file: str | None = None,
                   limit: int | None = None, progress: bool = True) -> dict:
    """Evaluate a model with the project's prompt and record the result in `run` (None: a torchrun rank
    other than 0, which generates its share and records nothing)."""

    cfg = settings(project)
    examples = eval_examples(project, data_file, limit if limit is not None else cfg.limit)
    template = project_template(project)
    check_template(template, "evaluate.template", examples[0])
    loaded = harness.load_project_model(project, model_ref)
    summary, rows, _ = score_on_project(project, loaded, examples, label=f"eval {loaded.name}", progress=progress)
    summary.update({"model": loaded.name, "model_path": loaded.path, "template": template,
                    "system": project_system(project),
                    "data": data_file or "eval split", "generation": cfg.generation.model_dump()})
    if run is not None:
        harness.write_predictions(run, rows)
        run.finish(summary)
    return summary


def score_endpoint(project, ep, examples, artifacts, *, label: str, progress: bool = True, earlier=(),
                   resume_hint: str = "") -> tuple[dict, list[dict], list]:
    """An endpoint scored as score_on_project scores a local model: the same prompts (template, system
    prompt, history), generation settings and metrics; an example whose prompt the endpoint refuses as
    too long is skipped and counted (or refused: evaluate.on_overflow). Answers are journaled in
    `artifacts` (and reused from there, or from the `earlier` journals). (summary, rows, request bodies)."""
    ev = settings(project)
    params = api.openai_params(ev.generation)
    prompts = [build_prompt(project_template(project), ex, system=project_system(project)) for ex in examples]
    bodies = [api.request_body(ep, p, params) for p in prompts]
    journal = api.Journal(artifacts / JOURNAL, earlier)
    answers = api.answer_all(ep, [e.where for e in examples], bodies, journal, on_overflow=ev.on_overflow,
                             progress=progress, label=label, resume_hint=resume_hint)
    kept = sorted(answers.results)
    skipped = [examples[i].where for i in sorted(answers.skipped)]
    if not kept:
        raise UserError(f"{label}: the endpoint refused all {len(examples)} prompts as longer than its context "
                        f"window (e.g. {skipped[0]}: {answers.skipped[min(answers.skipped)]})")
    if skipped:
        notice(f"{label}: skipped {len(skipped)} of {len(examples)} eval examples whose prompt the endpoint "
               f"refused as longer than its context window (first: {skipped[0]}); evaluate.on_overflow: refuse "
               "makes this an error")
    results = [GenerationResult(r["text"], r["prompt_tokens"], r["completion_tokens"], r["finish_reason"])
               for r in (answers.results[i] for i in kept)]
    summary, rows = harness.score(project.config.project.task, [examples[i] for i in kept], [prompts[i] for i in kept],
                                  results, answers.wall_s, lexicon=name_lexicon(project), skipped=skipped,
                                  min_examples=ev.min_examples, label=label)
    summary.update(api.figures(ep, answers, kept))
    return summary, rows, [bodies[i] for i in kept]


def evaluate_endpoint(project, run, ep, *, data_file: str | None = None, limit: int | None = None,
                      progress: bool = True, served_run: str | None = None) -> dict:
    """Evaluate the model behind an OpenAI-compatible endpoint with the project's prompt and record the
    result in `run`; a resumed run asks only for what its journal does not hold."""
    cfg = settings(project)
    examples = eval_examples(project, data_file, limit if limit is not None else cfg.limit)
    template = project_template(project)
    check_template(template, "evaluate.template", examples[0])
    summary, rows, _ = score_endpoint(project, ep, examples, run.artifacts, label=f"eval {ep.model}",
                                      progress=progress, resume_hint="`llmcycle eval --endpoint ... --resume` "
                                      "asks only for the rest")
    harness.write_predictions(run, rows)
    summary.update({"model": ep.model, **ep.record(), "served_run": served_run, "template": template,
                    "system": project_system(project), "data": data_file or "eval split",
                    "generation": cfg.generation.model_dump()})
    run.finish(summary)
    return summary


def endpoint_variant(model: str) -> str:
    """The eval variant of an endpoint's model: `endpoint-NAME` (its last path part, safe as a folder name)."""
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", model.removeprefix("run:").rstrip("/").rsplit("/", 1)[-1])
    return f"endpoint-{name or 'model'}"


def served_run_of(store, given: str | None, model: str) -> str | None:
    """The run whose model the endpoint serves: --served-run's, else the run the model's name is (a run id,
    or STAGE/VARIANT: `llmcycle serve --run RUN` serves under that name), else unknown (None)."""
    if given:
        try:
            return store.get(given.removeprefix("run:")).id
        except UserError as exc:
            raise UserError(f"--served-run: {exc}") from None
    name = model.removeprefix("run:")
    if any(rec.id == name for rec in store.list()):
        return name
    if name.count("/") == 1:
        try:
            return store.get(name).id
        except UserError:
            return None  # a Hub-style name, not a run
    return None


def resumable(store, variant: str, config: dict) -> str:
    """The run `eval --endpoint ... --resume` continues: the last unfinished one of this endpoint and model,
    made with the same settings (its journal's answers are answers to the same requests)."""
    rec = store.latest_unfinished("eval", variant)
    if rec is None:
        raise UserError(f"--resume: no failed or incomplete evaluation of {config['model']} at {config['endpoint']} "
                        f"in {store.root}; run without --resume")
    differ = [k for k in sorted(set(config) | set(rec.config))
              if json.dumps(config.get(k), sort_keys=True) != json.dumps(rec.config.get(k), sort_keys=True)]
    if differ:
        raise UserError(f"--resume: the last unfinished evaluation of this endpoint ({rec.id}) had other settings "
                        f"({', '.join(differ)} differ); run without --resume to start afresh")
    return rec.id
