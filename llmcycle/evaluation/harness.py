"""The evaluation harness every stage shares: generate for a set of prompts, score against references.

`evaluate(...)` runs batched generation (llmcycle.models.generation), the task's metrics (llmcycle.evaluation.metrics,
with a bootstrap confidence interval for the headline metric), the perplexity of the references, and
timing; it returns a summary (flat, JSON-able) and one row per example, which `write_predictions`
stores as the run's `artifacts/predictions.jsonl` for side-by-side comparison.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

from llmcycle.core import ranks
from llmcycle.core.errors import UserError
from llmcycle.core.progress import bar, notice
from llmcycle.core.store import atomic_write_text
from llmcycle.data.prompting import FittedPrompts, encode_prompt, fit_prompts
from llmcycle.evaluation import metrics
from llmcycle.models import hub as models
from llmcycle.models.generation import Generator
from llmcycle.models.load import load_model

PREDICTIONS = "predictions.jsonl"


@dataclass
class LoadedModel:
    name: str  # what the user referred to (run id, path or Hub id)
    path: str  # what was loaded
    model: object
    tokenizer: object
    generator: object
    run_id: str | None = None  # the run that produced the model, for lineage

    @property
    def kind(self) -> str:
        return self.generator.kind

    @property
    def window(self) -> int:
        return self.generator.window


_CACHE: dict[tuple, LoadedModel] = {}


def resolve(ref: str, project) -> tuple[str, str | None]:
    """(path or Hub id, producing run id) for a model reference: `run:REF`, a bare run id or
    STAGE/VARIANT known to the store, a local folder, or a Hub id."""

    store = project.store() if project is not None else None
    base = project.dir if project is not None else Path.cwd()
    if ref.startswith("run:"):
        rec = store.get(ref[4:]) if store else None
        return models.resolve_model_path(ref, base, store), rec.id if rec else None
    if store is not None and not (base / ref).exists() and not Path(ref).exists():
        try:
            rec = store.get(ref)
            return str(store.resolve_model(rec.id)), rec.id
        except UserError:
            pass  # not a run: a Hub id
    return models.resolve_model_path(ref, base, store), None


def load(ref: str, project=None, *, dtype: str = "auto", device: str = "auto",
         context_window: int | None = None, trust_remote_code: bool = False) -> LoadedModel:
    """Load (once per process) a model, its tokenizer and a generator for it."""

    path, run_id = resolve(ref, project)
    key = (path, dtype, device, context_window)
    if key not in _CACHE:
        model, tok = load_model(path, dtype=dtype, device=device,
                                       trust_remote_code=trust_remote_code)
        _CACHE[key] = LoadedModel(ref, path, model, tok, Generator(model, tok, context_window), run_id)
    return _CACHE[key]


def forget(path: str) -> None:
    """Drop a loaded model from the cache (select measures one candidate after another)."""
    for key in [k for k in _CACHE if k[0] == path]:
        del _CACHE[key]


def load_project_model(project, ref: str | None = None) -> LoadedModel:
    """The project's model (model: section), or `ref` loaded with the project's model options."""
    cfg = project.config.model
    if ref is None and cfg is None:
        raise UserError(f"{project.path}: no model configured (add a `model:` section with a name)")
    opts = cfg.model_dump() if cfg is not None else {}
    return load(ref or cfg.name, project, dtype=opts.get("dtype", "auto"),
                device=opts.get("device", "auto"), context_window=opts.get("context_window"),
                trust_remote_code=opts.get("trust_remote_code", False))


def generation_budget(loaded: LoadedModel, max_new_tokens: int) -> int:
    """Tokens a prompt may take: the whole window for seq2seq (the output has its own), the window
    minus room to generate for causal models."""
    room = max_new_tokens if loaded.kind == "causal" else 0
    budget = loaded.window - room
    if budget < 1:
        raise UserError(f"max_new_tokens {max_new_tokens} leaves no room for a prompt in the "
                        f"context window of {loaded.window} tokens")
    return budget


def count_tokens(loaded: LoadedModel):
    """Token count of a prompt as the model will see it (chat template included)."""

    return lambda text: len(encode_prompt(loaded.tokenizer, text, loaded.kind))


def report_skipped(label: str, fitted: FittedPrompts, total: int, budget: int) -> None:
    """Say what was left out as too long; refuse when nothing is left."""
    skipped = fitted.skipped
    if skipped and not fitted.prompts:
        raise UserError(f"{label}: all {total} eval prompts are over the budget of {budget} tokens (context "
                        f"window minus room to generate), e.g. {skipped[0]}; nothing is left to evaluate")
    if skipped:
        notice(f"{label}: skipped {len(skipped)} of {total} eval examples whose prompt is over the budget of "
               f"{budget} tokens even without shots (first: {skipped[0]}); evaluate.on_overflow: refuse "
               "makes this an error")


def fit_eval_prompts(loaded: LoadedModel, template: str, examples, gen_cfg, *, system: str | None = None,
                     on_overflow: str = "skip", label: str = "eval") -> FittedPrompts:
    """Every example's prompt (the project's template and system prompt, no shots) when it fits the
    model's window with room to generate; the others skipped and counted, or refused (on_overflow)."""
    budget = generation_budget(loaded, gen_cfg.max_new_tokens)
    fitted = fit_prompts(template, examples, [], [[] for _ in examples], count_tokens(loaded), budget,
                         too_long=on_overflow, variant=label, system=system)
    report_skipped(label, fitted, len(examples), budget)
    return fitted


def evaluate(loaded: LoadedModel, prompts: list[str], examples, task: str, gen_cfg, *,
             perplexity: bool = True, progress: bool = True, label: str = "eval",
             lexicon=None, skipped=(), min_examples: int | None = None) -> tuple[dict, list[dict]]:
    """Generate for every prompt, score against the examples' references; (summary, rows). `lexicon`:
    names known from the project's data, for the faithfulness score (evaluate.name_lexicon);
    `skipped`: where each example left out as too long came from (counted in the summary: eval_skipped);
    `min_examples`: fewer examples than this flag the summary (`too_few_examples`) and say so."""

    check_references(prompts, examples)
    start = time.perf_counter()
    results = generate_all(loaded.generator, prompts, gen_cfg, label=label, progress=progress)
    summary, rows = score(task, examples, prompts, results, time.perf_counter() - start, tokenizer=loaded.tokenizer,
                          lexicon=lexicon, skipped=skipped, min_examples=min_examples, label=label)
    if perplexity:
        summary["perplexity"] = metrics.reference_perplexity(
            loaded.model, loaded.tokenizer, prompts, [e.targets[0] for e in examples],
            batch_size=gen_cfg.batch_size)
    return summary, rows


def generate_all(generator, prompts: list[str], gen_cfg, *, label: str, progress: bool) -> list:
    """Every prompt's result, in order. Under torchrun every rank calls this together: each generates
    every world-th batch of the one plan (the batches a single process would run, so the outputs are the
    same), and the results are gathered on every rank."""
    plan = generator.plan(prompts, gen_cfg)
    world = ranks.world_size()
    mine = range(ranks.rank(), len(plan.batches), world) if world > 1 else range(len(plan.batches))
    share = sum(len(plan.batches[b]) for b in mine)
    shown = label if world == 1 else f"{label} (rank {ranks.rank()} of {world}: {share} of {len(prompts)})"
    with bar(share, shown, enabled=progress) as advance:
        results = generator.run_plan(plan, mine, gen_cfg, progress=advance)
    if world == 1:
        return results
    return ranks.gather_in_order({i: r for i, r in enumerate(results) if r is not None}, len(prompts))


def check_references(prompts, examples) -> None:
    """Something to score, and a reference for every example (before any generation is paid for)."""
    if not prompts:
        raise UserError("the evaluation set is empty: nothing to evaluate")
    if any(not e.targets for e in examples):
        where = next(e.where for e in examples if not e.targets)
        raise UserError(f"{where}: evaluation example has no reference (target) to score against")


def score(task: str, examples, prompts, results, gen_s: float, *, tokenizer=None, lexicon=None, skipped=(),
          min_examples: int | None = None, label: str = "eval") -> tuple[dict, list[dict]]:
    """Score outputs already generated (GenerationResult-like: text, finish_reason, prompt_tokens,
    completion_tokens; token counts may be None when an endpoint did not report them) against the
    examples' references: (summary, rows). A local model's outputs and an endpoint's answers are scored
    by this one function, so their summaries and predictions rows have the same shape."""
    summary, per_example = metrics.compute_all(task, [r.text for r in results], [e.targets for e in examples],
                                               tokenizer, sources=[source_text(e) for e in examples], lexicon=lexicon)
    completion = [r.completion_tokens for r in results if r.completion_tokens is not None]
    prompt_tokens = [r.prompt_tokens for r in results if r.prompt_tokens is not None]
    summary.update({
        "n_examples": len(prompts), "eval_skipped": len(skipped), "eval_skipped_examples": list(skipped)[:10],
        "too_few_examples": bool(min_examples and len(prompts) < min_examples), "generation_s": round(gen_s, 3),
        "examples_per_s": len(prompts) / gen_s if gen_s else None,
        "completion_tokens_per_s": sum(completion) / gen_s if gen_s and completion else None,
        "prompt_tokens_mean": sum(prompt_tokens) / len(prompt_tokens) if prompt_tokens else None,
        "stopped_share": sum(r.finish_reason == "stop" for r in results) / len(results),
    })
    if summary["too_few_examples"]:
        notice(f"{label}: {summary['headline']} measured on only {len(prompts)} examples (fewer than "
               f"evaluate.min_examples {min_examples}): its interval is wide and a difference may be noise")
    scores = example_scores(per_example, len(prompts))
    invented = per_example.get("invented_entities")
    rows = []
    for i, (ex, prompt, res) in enumerate(zip(examples, prompts, results)):
        row = {"index": i, "where": ex.where, "input": ex.input, "prompt": prompt,
               "references": ex.targets, "prediction": res.text, "finish_reason": res.finish_reason,
               "prompt_tokens": res.prompt_tokens, "completion_tokens": res.completion_tokens}
        row.update({name: values[i] for name, values in scores.items()})
        if invented is not None:  # the output's entities its input does not contain
            row["invented_entities"] = invented[i]
        rows.append(row)
    return summary, rows


def example_scores(per_example: dict, n: int) -> dict[str, list]:
    """The per-example scores worth a place in every predictions row: each metric compute_all scored
    per example (numbers, or None where it does not apply), so two runs can be compared example by
    example (evaluation/paired.py). The labels behind macro-F1 are left out: they follow from the
    prediction and the references, and the rows stay small."""
    return {name: values for name, values in per_example.items()
            if name in metrics.METRIC_NAMES and len(values) == n
            and all(v is None or (isinstance(v, (int, float)) and not isinstance(v, bool)) for v in values)}


def percentile(values: list[float], q: float) -> float:
    """Linear-interpolated percentile (numpy's default), q in [0, 100]."""
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100
    lo = int(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def request_latency(generator, prompts: list[str], gen_cfg, n: int) -> dict:
    """p50 / p95 milliseconds of the first n prompts generated one at a time (a lone request, batch 1)."""
    sample = prompts[:n]
    if not sample:
        return {}
    generator.generate(sample[:1], gen_cfg)  # warm-up: lazy initialisation is nobody's latency
    times = []
    for prompt in sample:
        t0 = time.perf_counter()
        generator.generate([prompt], gen_cfg)  # returns token lists: the device has finished
        times.append((time.perf_counter() - t0) * 1000)
    return {"latency_p50_ms": round(percentile(times, 50), 3), "latency_p95_ms": round(percentile(times, 95), 3),
            "latency_samples": len(sample)}


def source_text(example) -> str:
    """What an output may take its facts from: the input and the record's other text fields (a QA
    context, say), never its references."""
    targets = set(example.targets)
    extra = [v for v in example.fields.values() if isinstance(v, str) and v not in targets and v != example.input]
    history = [t["content"] for t in getattr(example, "history", ())]  # a conversation's earlier turns
    return "\n".join([*history, example.input, *extra])


def write_predictions(run, rows: list[dict], name: str = PREDICTIONS) -> Path:
    path = run.artifacts / name
    atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    return path


def read_predictions(run_dir: Path, name: str = PREDICTIONS) -> list[dict] | None:
    path = Path(run_dir) / "artifacts" / name
    if not path.exists():
        return None
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
