"""Evaluate: score any model with the project's prompt on the eval set, recorded as a run.

    llmcycle eval --model RUN|PATH|HUB_ID [--data FILE] [--limit N] [--json]

The project's prompt is `evaluate.template` (default: the task's standard prompt); generation settings
are `evaluate.generation`. Each evaluation is a run (stage `eval`) with the metrics in its summary and
every example's prompt, references and output in artifacts/predictions.jsonl.
"""
from __future__ import annotations

from pydantic import Field

from llmcycle.configbase import Section
from llmcycle.errors import UserError
from llmcycle.generation import GenerationConfig


class EvaluateConfig(Section):
    template: str | None = Field(None, description="The project's prompt: a format string over the "
                                 "record's fields and {input}; default: the task's standard prompt.")
    generation: GenerationConfig = Field(default_factory=GenerationConfig,
                                         description="Generation settings for evaluation.")
    limit: int | None = Field(None, ge=1, description="Evaluate only the first N eval examples.")
    perplexity: bool = Field(True, description="Also compute the perplexity of the references.")
    show_examples: int = Field(3, ge=0, description="Examples shown side by side in comparisons.")


def settings(project) -> EvaluateConfig:
    return project.config.evaluate or EvaluateConfig()


def project_template(project) -> str:
    from llmcycle.prompts import DEFAULT_TEMPLATES

    return settings(project).template or DEFAULT_TEMPLATES[project.config.project.task]


_LEXICONS: dict[str, frozenset] = {}


def name_lexicon(project) -> frozenset:
    """Names (lowercased) the project's data writes capitalised mid-sentence, train and eval together, so
    the faithfulness score recognises a name an uncased model invented from its training data
    (faithfulness.name_lexicon); once per process and data config."""
    import json

    from llmcycle.data import load_splits
    from llmcycle.faithfulness import name_lexicon as lexicon_of

    cfg = project.config.data
    if cfg is None or project.config.project.task not in ("summarization", "qa"):
        return frozenset()
    key = f"{project.dir}:{json.dumps(cfg.model_dump(), sort_keys=True)}"
    if key not in _LEXICONS:
        splits = load_splits(cfg, project.dir)
        _LEXICONS[key] = frozenset(lexicon_of(t for ex in splits.train + splits.eval for t in (ex.input, *ex.targets)))
    return _LEXICONS[key]


def eval_examples(project, data_file: str | None = None, limit: int | None = None):
    """The examples to evaluate on: a given file, or the project's eval split; first `limit`."""
    from llmcycle.data import load_records, load_splits, to_examples

    cfg = project.config.data
    if cfg is None:
        raise UserError(f"{project.path}: no data configured (add a `data:` section)")
    if data_file:
        pairs = load_records(data_file, project.dir, key="--data")
        examples = to_examples(pairs, cfg, data_file, require_target=True)
    else:
        examples = load_splits(cfg, project.dir).eval
    if limit is not None:
        if limit < 1:
            raise UserError(f"--limit must be at least 1, got {limit}")
        examples = examples[:limit]
    if not examples:
        raise UserError("the evaluation set is empty: give data.eval (or data.train to split from)")
    return examples


def evaluate_model(project, run, model_ref: str | None = None, *, data_file: str | None = None,
                   limit: int | None = None, progress: bool = True) -> dict:
    """Evaluate a model with the project's prompt and record the result in `run`."""
    from llmcycle import harness
    from llmcycle.prompts import check_template, fit_prompts

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
