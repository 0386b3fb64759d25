"""Prompt engineering and in-context learning: how far do prompts alone get us?

    llmcycle prompt [--json]          (or as a stage of `llmcycle run`)

Runs every combination the project lists of prompt template x number of shots x shot selection
(first, seeded random, most similar by sentence embedding) x generation config, evaluates each on the
eval set with the project's model, and records one run per combination. Every prompt is checked
against the model's context window: shots are dropped until it fits (and the run says how many
prompts lost shots), or the variant is refused when `on_overflow: refuse`.

    prompt:
      templates:
        course: "Summarize the following conversation.\\n\\n{dialogue}\\n\\nSummary:"
        flan: "Dialogue:\\n\\n{dialogue}\\n\\nWhat was going on?"
      shots: [0, 1, 3]
      selection: [first, similar]
      generation:
        greedy: {max_new_tokens: 50}
        sampled: {do_sample: true, temperature: 0.7, top_k: 50, max_new_tokens: 50}
"""
from __future__ import annotations

from typing import Literal

from pydantic import Field

from llmcycle.core.configbase import Section
from llmcycle.core.errors import UserError
from llmcycle.data.prompting import check_template, fit_prompts, select_shots
from llmcycle.data.records import load_splits
from llmcycle.evaluation import harness
from llmcycle.evaluation.settings import (
    eval_examples,
    name_lexicon,
    project_system,
    project_template,
    settings,
)
from llmcycle.models.embeddings import load_embedder
from llmcycle.models.generation import GenerationConfig
from llmcycle.stages.contract import Stage, own_model


class PromptConfig(Section):
    templates: dict[str, str] = Field(default_factory=dict, description="Named prompt templates; "
                                      "default: the project's prompt (evaluate.template).")
    shots: list[int] = Field([0], description="Numbers of in-context examples to try, e.g. [0, 1, 3].")
    selection: list[Literal["first", "random", "similar"]] = Field(
        ["first"], description="How shots are chosen from the training set: first, random (seeded), "
        "similar (most similar inputs by sentence embedding).")
    generation: dict[str, GenerationConfig] = Field(default_factory=dict, description="Named generation "
                                                    "configs; default: evaluate.generation as 'greedy'.")
    shot_format: str = Field("{prompt} {target}", description="How a shot is written: its rendered "
                             "prompt and its reference.")
    shot_separator: str = Field("\n\n\n", description="Between shots and before the query.")
    on_overflow: Literal["drop_shots", "refuse"] = Field(
        "drop_shots", description="A prompt over the context window: drop shots until it fits, or "
        "refuse the variant.")
    limit: int | None = Field(None, ge=1, description="Evaluate on the first N eval examples only.")
    embedding_model: str = Field("all-MiniLM-L6-v2", description="Sentence-transformers model for "
                                 "'similar' selection (the default works offline).")
    seed: int = Field(0, description="Seed for 'random' selection.")


def variant_grid(project) -> dict[str, dict]:
    """Variant name -> resolved settings, for every combination (0 shots needs no selection)."""

    cfg = project.config.prompt
    if cfg is None:
        return {}
    templates = cfg.templates or {"default": project_template(project)}
    generations = cfg.generation or {"greedy": settings(project).generation}
    grid = {}
    for tname, template in templates.items():
        for k in sorted(set(cfg.shots)):
            for sel in (["-"] if k == 0 else list(dict.fromkeys(cfg.selection))):
                for gname, gen in generations.items():
                    name = f"{tname}.{k}shot" + ("" if k == 0 else f".{sel}") + f".{gname}"
                    grid[name] = {"template_name": tname, "template": template, "shots": k,
                                  "selection": None if k == 0 else sel, "generation_name": gname,
                                  "generation": gen.model_dump(), "shot_format": cfg.shot_format,
                                  "shot_separator": cfg.shot_separator, "on_overflow": cfg.on_overflow,
                                  "limit": cfg.limit, "seed": cfg.seed,
                                  "embedding_model": cfg.embedding_model if sel == "similar" else None}
    return grid


_EMBEDDERS: dict[str, object] = {}


def run(project, variant: str, run, *, resume: bool = False, progress: bool = True) -> dict:
    """Stage entry point: evaluate one prompt variant and record it."""

    v = variant_grid(project)[variant]
    gen = GenerationConfig.model_validate(v["generation"])
    queries = eval_examples(project, limit=v["limit"] or settings(project).limit)
    pool = load_splits(project.config.data, project.dir).train if v["shots"] else []
    if v["shots"] and not pool:
        raise UserError(f"variant '{variant}' needs {v['shots']} shots but there are no training "
                        "examples to draw them from (set data.train)")
    check_template(v["template"], v["template_name"], queries[0])
    for field in ("prompt", "target"):
        if "{" + field + "}" not in v["shot_format"]:
            raise UserError(f"prompt.shot_format must contain {{{field}}}: {v['shot_format']!r}")
    embedder = None
    if v["selection"] == "similar":
        name = v["embedding_model"]
        embedder = _EMBEDDERS.get(name) or _EMBEDDERS.setdefault(name, load_embedder(name))
    shot_lists = select_shots(v["selection"] or "first", v["shots"], pool, queries, seed=v["seed"],
                              embedder=embedder)
    loaded = harness.load_project_model(project)
    ev = settings(project)
    budget = harness.generation_budget(loaded, gen.max_new_tokens)
    fitted = fit_prompts(v["template"], queries, pool, shot_lists, harness.count_tokens(loaded), budget,
                         shot_format=v["shot_format"], separator=v["shot_separator"],
                         on_overflow=v["on_overflow"], too_long=ev.on_overflow, variant=variant,
                         system=project_system(project))
    harness.report_skipped(f"prompt {variant}", fitted, len(queries), budget)
    summary, rows = harness.evaluate(loaded, fitted.prompts, fitted.examples(queries), project.config.project.task,
                                     gen, perplexity=ev.perplexity, progress=progress, label=f"prompt {variant}",
                                     lexicon=name_lexicon(project), skipped=fitted.skipped,
                                     min_examples=ev.min_examples)
    for row, used in zip(rows, fitted.shots_used):
        row["shots_used"] = used
    harness.write_predictions(run, rows)
    summary.update({"model": loaded.name, "template_name": v["template_name"], "shots": v["shots"],
                    "selection": v["selection"], "generation_name": v["generation_name"],
                    "prompts_lost_shots": fitted.lost_shots,
                    "shots_used_mean": sum(fitted.shots_used) / len(fitted.shots_used),
                    "context_window": loaded.window, "prompt_tokens_max": max(fitted.token_counts)})
    run.finish(summary)
    return summary


STAGE = Stage(name="prompt", section=PromptConfig | None, run=run, variants=variant_grid, model_of=own_model(),
              evaluates=True, summary="prompt engineering: templates x shots x selection x generation settings")
