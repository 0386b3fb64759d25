"""Evaluate: score any model with the project's prompt on the eval set, recorded as a run.

    llmcycle eval --model RUN|PATH|HUB_ID [--data FILE] [--limit N] [--json]

The project's prompt is `evaluate.template` (default: the task's standard prompt); generation settings
are `evaluate.generation`. Each evaluation is a run (stage `eval`) with the metrics in its summary and
every example's prompt, references and output in artifacts/predictions.jsonl.
"""
from __future__ import annotations

from llmcycle.data.prompting import check_template, fit_prompts
from llmcycle.evaluation import harness
from llmcycle.evaluation.settings import (
    eval_examples,
    name_lexicon,
    project_template,
    settings,
)


def evaluate_model(project, run, model_ref: str | None = None, *, data_file: str | None = None,
                   limit: int | None = None, progress: bool = True) -> dict:
    """Evaluate a model with the project's prompt and record the result in `run`."""

    cfg = settings(project)
    examples = eval_examples(project, data_file, limit if limit is not None else cfg.limit)
    template = project_template(project)
    check_template(template, "evaluate.template", examples[0])
    loaded = harness.load_project_model(project, model_ref)
    fitted = fit_prompts(template, examples, [], [[] for _ in examples], harness.count_tokens(loaded),
                         harness.generation_budget(loaded, cfg.generation.max_new_tokens),
                         shot_format="", separator="", on_overflow="refuse", variant="eval")
    summary, rows = harness.evaluate(loaded, fitted.prompts, examples, project.config.project.task,
                                     cfg.generation, perplexity=cfg.perplexity, progress=progress,
                                     label=f"eval {loaded.name}", lexicon=name_lexicon(project))
    harness.write_predictions(run, rows)
    summary.update({"model": loaded.name, "model_path": loaded.path, "template": template,
                    "data": data_file or "eval split", "generation": cfg.generation.model_dump()})
    run.finish(summary)
    return summary
