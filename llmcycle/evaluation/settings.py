"""The project's evaluation settings, read by every stage that evaluates and by the server: the prompt
template, generation settings, the eval examples and the name lexicon of the faithfulness metric."""
from __future__ import annotations

from typing import Literal

from pydantic import Field

from llmcycle.core.configbase import Section
from llmcycle.core.errors import UserError
from llmcycle.data.prompting import DEFAULT_TEMPLATES
from llmcycle.data.records import load_records, load_splits, to_examples
from llmcycle.evaluation.faithfulness import name_lexicon as lexicon_of
from llmcycle.models.generation import GenerationConfig


class EvaluateConfig(Section):
    template: str | None = Field(None, description="The project's prompt: a format string over the "
                                 "record's fields and {input}; default: the task's standard prompt.")
    system: str | None = Field(None, description="System prompt, the same for prompt, tune, align, eval and "
                               "serve: a chat model's first turn, the first paragraph of a flat prompt (a "
                               "conversation's own system turn wins over it).")
    on_overflow: Literal["skip", "refuse"] = Field(
        "skip", description="An eval example whose prompt does not fit the context window even without "
        "shots: skip it (counted, in the console, the run summary, the comparison and the report) or refuse "
        "the evaluation.")
    min_examples: int = Field(20, ge=1, description="A held-out metric on fewer examples than this is flagged "
                              "loudly (console, summary `too_few_examples`, comparison and report).")
    generation: GenerationConfig = Field(default_factory=GenerationConfig,
                                         description="Generation settings for evaluation.")
    limit: int | None = Field(None, ge=1, description="Evaluate only the first N eval examples.")
    perplexity: bool = Field(True, description="Also compute the perplexity of the references.")
    show_examples: int = Field(3, ge=0, description="Examples shown side by side in comparisons.")


def settings(project) -> EvaluateConfig:
    return project.config.evaluate or EvaluateConfig()


def project_template(project) -> str:
    return settings(project).template or DEFAULT_TEMPLATES[project.config.project.task]


def project_system(project) -> str | None:
    return settings(project).system if project is not None else None


_LEXICONS: dict[str, frozenset] = {}


def name_lexicon(project) -> frozenset:
    """Names (lowercased) the project's data writes capitalised mid-sentence, train and eval together, so
    the faithfulness score recognises a name an uncased model invented from its training data
    (faithfulness.name_lexicon); once per process and data config."""
    import json

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
