"""Evaluate: score any model with the project's prompt on the eval set, recorded as a run.

    llmcycle eval --model RUN|PATH|HUB_ID [--data FILE] [--limit N] [--json]

The project's prompt is `evaluate.template` (default: the task's standard prompt); generation settings
are `evaluate.generation`. Each evaluation is a run (stage `eval`) with the metrics in its summary and
every example's prompt, references and output in artifacts/predictions.jsonl.
"""
from __future__ import annotations

from llmcycle.data.prompting import check_template
from llmcycle.evaluation import harness
from llmcycle.evaluation.settings import (
    eval_examples,
    name_lexicon,
    project_system,
    project_template,
    settings,
)


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
    """Evaluate a model with the project's prompt and record the result in `run`."""

    cfg = settings(project)
    examples = eval_examples(project, data_file, limit if limit is not None else cfg.limit)
    template = project_template(project)
    check_template(template, "evaluate.template", examples[0])
    loaded = harness.load_project_model(project, model_ref)
    summary, rows, _ = score_on_project(project, loaded, examples, label=f"eval {loaded.name}", progress=progress)
    harness.write_predictions(run, rows)
    summary.update({"model": loaded.name, "model_path": loaded.path, "template": template,
                    "system": project_system(project),
                    "data": data_file or "eval split", "generation": cfg.generation.model_dump()})
    run.finish(summary)
    return summary
