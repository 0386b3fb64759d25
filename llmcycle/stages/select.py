"""Select: measure candidate base models on the project's own data and choose one to adapt.

    llmcycle select [--json]          (or as the stage after pretrain in `llmcycle run`)

    select:
      candidates:
        scratch: {run: pretrain/tiny}                               # a model an earlier run made
        minilm: {warm_start: {encoder: all-MiniLM-L6-v2, decoder_layers: 2}}   # built here
        flan: {model: google/flan-t5-base}                          # a Hub id or a local folder
        hosted: {endpoint: http://host:8000/v1, model: NAME}        # any OpenAI-compatible API
      probe: {method: full, steps: 60, lr: 3e-4, batch_size: 16}    # the same pilot fine-tune for each
      pick: minilm                                                  # optional: overrides the choice

Each candidate is a run `select/NAME`: its model is built (a warm start, llmcycle/models/warm_start.py) or
referred to, scored on the project's eval set with the project's template and generation settings
through the shared harness, and measured: parameters, size on disk, memory to hold its weights,
latency p50 / p95 of a lone request, its context window and the share of eval prompts over it (with
its own tokenizer; those prompts are not scored, and are counted), its tokenizer's casing, and whether
it fits the scope's budgets. With `probe`, each candidate is also fine-tuned for the same few steps
and scored again: a warm-started model scores ~0 before any fine-tuning, so "which base fine-tunes
best on my data" is the fair question. The run `select/best` then chooses: the best candidate by the
scope's success metric (after the probe when there is one) among those within budget, or the one
`pick` names. Later stages use it as `model.name: run:select/best` (or `run:select/NAME`).

An endpoint candidate (`endpoint: URL, model: NAME`, evaluation/endpoint.py) is scored on the same prompts
and metrics through the API, its latency timed per request from here; it has no local weights, so its
parameters and size are unknown (a size budget is then unknown, never met), select.probe cannot tune it,
and later stages cannot load it (run:select/best says so when it is chosen).
"""
from __future__ import annotations

import json
import shutil
import time
from typing import Literal

from pydantic import Field, model_validator

from llmcycle.core.configbase import Section
from llmcycle.core.errors import UserError, suggest
from llmcycle.core.store import MODEL_REF, atomic_write_json
from llmcycle.data.prompting import check_template
from llmcycle.data.records import load_splits
from llmcycle.evaluation import endpoint as api
from llmcycle.evaluation import harness
from llmcycle.evaluation.endpoint import JOURNAL
from llmcycle.evaluation.evaluate import score_endpoint, score_on_project
from llmcycle.evaluation.metrics import higher_is_better
from llmcycle.evaluation.settings import (
    eval_examples,
    name_lexicon,
    project_system,
    project_template,
    settings,
)
from llmcycle.evaluation.success import budget_check, local_folder, model_size_mb, success_metric
from llmcycle.models import warm_start
from llmcycle.models.generation import Generator
from llmcycle.models.hub import count_parameters
from llmcycle.models.warm_start import WarmStartConfig
from llmcycle.stages.contract import Stage
from llmcycle.training.finetune import TuneConfig
from llmcycle.training.loop import fit

BEST = "best"  # the variant that chooses among the candidates
PROBE_PREDICTIONS = "probe_predictions.jsonl"  # each candidate's outputs after the probe
CANDIDATE_KEYS = ("model", "run", "warm_start")
ENDPOINT_KEYS = ("endpoint", "api_key_env", "api", "concurrency", "timeout", "retries")  # only with `endpoint`


class CandidateConfig(Section):
    model: str | None = Field(None, description="a Hub id or a local model folder")
    run: str | None = Field(None, description="a model made by an earlier run: pretrain/VARIANT, a run id, ...")
    warm_start: WarmStartConfig | None = Field(
        None, description="an encoder-decoder warm-started from pretrained encoder checkpoints")
    context_window: int | None = Field(None, ge=1, description="tokens the candidate reads; default: "
                                       "model.context_window, else what its own config says")
    endpoint: str | None = Field(None, description="an OpenAI-compatible API's base URL (e.g. "
                                 "http://host:8000/v1); `model` then names the model it serves")
    api_key_env: str | None = Field(None, description="with endpoint: the environment variable holding its key")
    api: Literal["chat", "completions"] | None = Field(None, description="with endpoint: chat (default: the "
                                                         "prompt's turns) or completions (its flat text)")
    concurrency: int | None = Field(None, ge=1, description="with endpoint: requests in flight at once (4)")
    timeout: float | None = Field(None, gt=0, description="with endpoint: seconds a request may take (60)")
    retries: int | None = Field(None, ge=0, description="with endpoint: retries after a 429, 5xx, timeout or "
                                "connection error (3)")

    @model_validator(mode="after")
    def _one_source(self):
        given = [k for k in CANDIDATE_KEYS if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(f"a candidate needs exactly one of {', '.join(CANDIDATE_KEYS)}"
                             + (f" (got {', '.join(given)})" if given else ""))
        options = [k for k in ENDPOINT_KEYS[1:] if getattr(self, k) is not None]
        if self.endpoint is None and options:
            raise ValueError(f"{options[0]} applies to an endpoint candidate: add endpoint: URL (or drop {options[0]})")
        if self.endpoint is not None and given != ["model"]:
            raise ValueError("an endpoint candidate names the model it serves with `model: NAME` "
                             f"(not {', '.join(k for k in given if k != 'model')})")
        if self.endpoint is not None and self.context_window is not None:
            raise ValueError("context_window does not apply to an endpoint candidate: its server's window counts")
        return self

    def client(self, name: str) -> "api.Endpoint":
        """The endpoint settings, each bad one a one-line error naming its key."""
        keys = {"url": "endpoint", "model": "model", "api": "api", "api_key_env": "api_key_env",
                "concurrency": "concurrency", "timeout": "timeout", "retries": "retries"}
        names = {k: f"select.candidates.{name}.{v}" for k, v in keys.items()}
        return api.endpoint(self.endpoint, self.model, api=self.api, api_key_env=self.api_key_env,
                            concurrency=self.concurrency, timeout=self.timeout, retries=self.retries,
                            names={**api.CLI_NAMES, **names})

    def reference(self) -> str | None:
        """The model reference it names (run:... or a folder / Hub id); None for a warm start."""
        if self.run is not None:
            return self.run if self.run.startswith("run:") else f"run:{self.run}"
        return self.model


class ProbeConfig(Section):
    method: Literal["full", "lora"] = Field("full", description="the pilot fine-tune: full or lora")
    steps: int = Field(..., ge=1, description="optimizer steps")
    lr: float = Field(1e-4, gt=0, description="peak learning rate")
    batch_size: int = Field(8, ge=1, description="examples per step")
    warmup_steps: int = Field(0, ge=0, description="linear warmup steps")
    r: int = Field(8, ge=1, description="LoRA rank")
    alpha: int = Field(16, ge=1, description="LoRA alpha")
    dropout: float = Field(0.05, ge=0, lt=1, description="LoRA dropout")
    target_modules: list[str] | None = Field(None, description="LoRA targets (default by model type)")
    seed: int = Field(42, description="seed for data order, adapters and dropout")
    precision: Literal["auto", "float32", "bfloat16"] = Field("auto", description="as tune's precision")


class SelectConfig(Section):
    candidates: dict[str, CandidateConfig] = Field(..., min_length=1, description="name -> base model")
    probe: ProbeConfig | None = Field(None, description="the same short fine-tune for every candidate, "
                                      "scored after it (the choice then uses those scores)")
    pick: str | None = Field(None, description="choose this candidate whatever the scores say")
    limit: int | None = Field(None, ge=1, description="eval examples scored per candidate; default: "
                              "evaluate.limit")
    latency_samples: int = Field(8, ge=0, description="eval prompts generated one at a time for the "
                                 "p50/p95 latency; 0 = skip")

    @model_validator(mode="after")
    def _names(self):
        if BEST in self.candidates:
            raise ValueError(f"'{BEST}' names the chosen candidate (run:select/{BEST}); rename that candidate")
        if self.pick is not None and self.pick not in self.candidates:
            raise ValueError(f"pick '{self.pick}' is not a candidate{suggest(self.pick, self.candidates)} "
                             f"(candidates: {', '.join(self.candidates)})")
        return self


def variant_configs(project) -> dict[str, dict]:
    """One run per candidate, then `best`; each variant's config is what its run depends on."""
    cfg = project.config.select
    if cfg is None:
        return {}
    shared = {"probe": cfg.probe.model_dump() if cfg.probe else None, "limit": cfg.limit,
              "latency_samples": cfg.latency_samples}
    # endpoint keys enter a candidate's config only when set: the other candidates' content hashes stay
    out = {name: {**{k: v for k, v in cand.model_dump().items() if k not in ENDPOINT_KEYS or v is not None},
                  **shared} for name, cand in cfg.candidates.items()}
    out[BEST] = {"candidates": list(cfg.candidates), "pick": cfg.pick, **shared}
    return out


def run(project, variant: str, run, *, resume: bool = False, progress: bool = True) -> dict:
    """Stage entry point: measure one candidate, or (variant `best`) choose among them."""
    if variant == BEST:
        return choose(project, run)
    return measure(project, variant, run, progress=progress)


# ------------------------------------------------------------------------------ one candidate
def _candidate_model(project, name: str, cand: CandidateConfig, run) -> tuple[str, str | None, dict]:
    """(path or Hub id, producing run, facts): the warm start built into the run's artifacts, or the
    reference resolved and written as artifacts/model_ref.json (nothing is copied)."""

    if cand.warm_start is not None:
        texts = _training_texts(project)
        facts = warm_start.build(cand.warm_start, run.artifacts / "model", base_dir=project.dir, texts=texts)
        return str(run.artifacts / "model"), None, {"source": "warm_start", "warm_start": facts}
    ref = cand.reference()
    try:
        path, producer = harness.resolve(ref, project)
    except UserError as exc:
        raise UserError(f"select.candidates.{name}: {exc}") from None
    atomic_write_json(run.artifacts / MODEL_REF, project.store().model_pointer(path, producer))
    return path, producer, {"source": "run" if cand.run else "model", "reference": ref}


def _training_texts(project) -> list[str]:
    """Inputs and targets of the training data: where a warm start looks for tags to add."""

    if project.config.data is None:
        return []
    splits = load_splits(project.config.data, project.dir)
    return [t for ex in splits.train for t in (ex.input, *ex.targets)]


def _load(project, name: str, path: str, cand: CandidateConfig):
    opts = project.config.model.model_dump() if project.config.model else {}
    try:
        return harness.load(path, project, dtype=opts.get("dtype", "auto"), device=opts.get("device", "auto"),
                            context_window=_window(project, cand),
                            trust_remote_code=opts.get("trust_remote_code", False))
    except UserError as exc:
        raise UserError(f"select.candidates.{name}: {exc}") from None


def _window(project, cand: CandidateConfig) -> int | None:
    """The candidate's own context_window, else the project's model.context_window (later stages read
    the chosen model with that one), else None: what the model's config says."""
    model = project.config.model
    return cand.context_window or (model.context_window if model is not None else None)


def measure(project, name: str, run, *, progress: bool = True) -> dict:
    """Build or load one candidate, score it zero-shot (and after the probe), measure its costs."""

    t_start = time.perf_counter()
    cfg = project.config.select
    cand = cfg.candidates[name]
    if cand.endpoint is not None:
        return _measure_endpoint(project, name, cand, run, t_start, progress)
    ev = settings(project)
    examples = eval_examples(project, limit=cfg.limit or ev.limit)
    template = project_template(project)
    check_template(template, "evaluate.template", examples[0])
    path, producer, facts = _candidate_model(project, name, cand, run)
    loaded = _load(project, name, path, cand)
    # Every candidate is scored on the examples that fit its own window; what it skipped is its overflow.
    metrics, rows, fitted = score_on_project(project, loaded, examples, progress=progress, label=f"select {name}")
    scored, scored_prompts = fitted.examples(examples), fitted.prompts
    harness.write_predictions(run, rows)
    latency = harness.request_latency(loaded.generator, scored_prompts, ev.generation, cfg.latency_samples)
    total, _ = count_parameters(loaded.model)
    weights = sum(p.numel() * p.element_size() for p in loaded.model.parameters())
    local = local_folder(path)  # a Hub id's copy in the cache counts: it was just loaded from there
    size = round(model_size_mb(local), 3) if local else None
    summary = {**metrics, **latency, **facts, "candidate": name, "model_path": path, "parent": producer,
               "kind": loaded.kind, "parameters": total, "size_mb": size,
               "serve_memory_mb": round(weights / 2**20, 3), "context_window": loaded.window,
               "overflow_count": len(fitted.skipped),
               "overflow_share": round(len(fitted.skipped) / len(examples), 4),
               "lowercases": warm_start.lowercases(loaded.tokenizer)}
    summary.update(_budget(project, size, latency.get("latency_p95_ms")))
    if cfg.probe is not None:
        summary["probe"] = _probe(project, name, path, cfg.probe, scored, scored_prompts, run, progress)
    summary["wall_s"] = round(time.perf_counter() - t_start, 3)
    harness.forget(path)  # the next candidate gets the memory
    run.finish(summary)
    return summary


def _budget(project, size_mb, latency_p95_ms) -> dict:
    check = budget_check(project.config.scope, size_mb, latency_p95_ms)
    return {"fits_budget": check["state"] == "fits", "budget_state": check["state"],
            "budget_misses": check["reasons"] + [f"{m} not measured" for m in check["missing"]]}


def _measure_endpoint(project, name: str, cand: CandidateConfig, run, t_start: float, progress: bool) -> dict:
    """An endpoint candidate: scored through its API on the same prompts and metrics, its lone-request
    latency timed from here; parameters and size unknown. A run of the same candidate that failed part
    way (same content hash) lends its answers, so measuring again asks only for the rest."""
    cfg = project.config.select
    if cfg.probe is not None:
        raise UserError(f"select.candidates.{name}: an endpoint has no local weights for select.probe to fine-tune; "
                        "drop the probe or this candidate")
    ep = cand.client(name)
    examples = eval_examples(project, limit=cfg.limit or settings(project).limit)
    check_template(project_template(project), "evaluate.template", examples[0])
    atomic_write_json(run.artifacts / MODEL_REF, {"endpoint": ep.url, "model": ep.model, "run": None})
    store = project.store()
    earlier = [r.artifacts / JOURNAL for r in store.list("select", name)
               if r.status in ("failed", "incomplete") and r.content_hash == run.record.content_hash]
    metrics, rows, bodies = score_endpoint(project, ep, examples, run.artifacts, label=f"select {name}",
                                           progress=progress, earlier=earlier,
                                           resume_hint="measuring the candidate again asks only for the rest")
    harness.write_predictions(run, rows)
    latency = api.lone_latency(ep, bodies, cfg.latency_samples)
    summary = {**metrics, **latency, "source": "endpoint", "candidate": name, "model_path": None, "parent": None,
               "kind": "endpoint", "parameters": None, "size_mb": None, "serve_memory_mb": None,
               "context_window": None, "overflow_count": metrics["eval_skipped"],
               "overflow_share": round(metrics["eval_skipped"] / len(examples), 4), "lowercases": None,
               **_budget(project, None, latency.get("latency_p95_ms"))}
    summary["wall_s"] = round(time.perf_counter() - t_start, 3)
    run.finish(summary)
    return summary


# ------------------------------------------------------------------------------------- probe
def _probe(project, name: str, path: str, probe: ProbeConfig, examples, prompts, run, progress) -> dict:
    """The pilot fine-tune (tune's own loop, on the project's training data) and its score."""

    t_start = time.perf_counter()
    ev = settings(project)
    train = load_splits(project.config.data, project.dir).train
    if not train:
        raise UserError("select.probe: no training examples (set data.train)")
    tune_cfg = TuneConfig(method=probe.method, lr=probe.lr, batch_size=probe.batch_size, max_steps=probe.steps,
                          warmup_steps=probe.warmup_steps, r=probe.r, alpha=probe.alpha, dropout=probe.dropout,
                          target_modules=probe.target_modules, seed=probe.seed, checkpoint_every=probe.steps,
                          log_every=max(1, probe.steps // 10), precision=probe.precision)
    opts = project.config.model.model_dump() if project.config.model else {}
    work = run.artifacts / "probe"

    def log(row: dict) -> None:
        run.log({"phase": "probe", **row})

    cand = project.config.select.candidates[name]
    trained = fit(tune_cfg, path, train, examples, project_template(project), work, log=log, progress=progress,
                  system=project_system(project),
                  task=project.config.project.task, gen_cfg=ev.generation, dtype=opts.get("dtype", "auto"),
                  device=opts.get("device", "auto"), context_window=_window(project, cand),
                  trust_remote_code=opts.get("trust_remote_code", False))
    shutil.rmtree(work, ignore_errors=True)  # checkpoints of a pilot are not kept: only its score
    model = trained.model.eval()
    loaded = harness.LoadedModel(f"select/{name} probe", path, model, trained.tokenizer,
                                 Generator(model, trained.tokenizer, trained.window), run.id)
    metrics, rows = harness.evaluate(loaded, prompts, examples, project.config.project.task, ev.generation,
                                     perplexity=False, progress=progress, label=f"select {name} probe",
                                     lexicon=name_lexicon(project))
    harness.write_predictions(run, rows, PROBE_PREDICTIONS)
    keep = ("headline", "headline_value", "headline_ci_low", "headline_ci_high", "rouge1", "rouge2", "rougeL",
            "rougeLsum", "exact_match", "f1", "accuracy", "macro_f1", "hallucinated_entity_rate",
            "hallucinated_entity_rate_ci_low", "hallucinated_entity_rate_ci_high", "len_words_mean",
            "empty_share")
    out = {k: metrics[k] for k in keep if k in metrics}
    out.update(method=probe.method, steps=trained.summary.get("steps"), trainable_pct=trained.summary.get(
        "trainable_pct"), final_train_loss=trained.summary.get("final_train_loss"),
        distinct_outputs=len({r["prediction"] for r in rows}), wall_s=round(time.perf_counter() - t_start, 3))
    return out


# ------------------------------------------------------------------------------------ choosing
FIGURES = ("parameters", "size_mb", "serve_memory_mb", "latency_p50_ms", "latency_p95_ms", "context_window",
           "overflow_share", "lowercases", "fits_budget", "budget_misses", "hallucinated_entity_rate")


def _candidate_row(store, name: str, run_id: str | None, metric: str, probed: bool) -> dict:
    """One candidate's figures for the choice: its measured run, or why there is none."""
    if run_id is None:
        failed = store.latest_unfinished("select", name)
        error = (failed.error or "").removeprefix("UserError: ") if failed else ""
        why = f"failed: {error}" if error else "not measured"
        return {"candidate": name, "status": "failed" if failed else "missing", "run": failed.id if failed else None,
                "why": why}
    summary = store.get(run_id).summary()
    probe = summary.get("probe") or {}
    row = {"candidate": name, "status": "completed", "run": run_id, "model_path": summary.get("model_path"),
           "source": summary.get("source"), "zero_shot": summary.get(metric),
           "probe": probe.get(metric) if probed else None,
           "probe_ci": [probe.get("headline_ci_low"), probe.get("headline_ci_high")]
           if probed and probe.get("headline") == metric else None,
           "probe_hallucinated_entity_rate": probe.get("hallucinated_entity_rate"),
           "probe_distinct_outputs": probe.get("distinct_outputs"), "n_examples": summary.get("n_examples")}
    row.update({k: summary.get(k) for k in FIGURES})
    row["value"] = row["probe"] if probed else row["zero_shot"]
    return row


def choose(project, run) -> dict:
    """The run `select/best`: every candidate's figures, the choice and why, and a pointer to the
    chosen model (artifacts/model_ref.json) that `run:select/best` resolves."""

    cfg = project.config.select
    store = project.store()
    metric = success_metric(project)
    probed = cfg.probe is not None
    runs = run.record.config.get("candidate_runs") or {}
    rows = [_candidate_row(store, name, runs.get(name), metric, probed) for name in cfg.candidates]
    measured = [r for r in rows if r["status"] == "completed"]
    if not measured:
        raise UserError("select: no candidate could be measured: " + "; ".join(
            f"{r['candidate']}: {r['why']}" for r in rows))
    sign = 1 if higher_is_better(metric) is not False else -1
    ranked = sorted((r for r in measured if isinstance(r["value"], (int, float))), key=lambda r: -sign * r["value"])
    within = [r for r in ranked if r["fits_budget"]]
    if cfg.pick is not None:
        chosen = next((r for r in rows if r["candidate"] == cfg.pick), None)
        if chosen["status"] != "completed":
            raise UserError(f"select.pick: candidate '{cfg.pick}' could not be measured ({chosen['why']})")
    elif within:
        chosen = within[0]
    else:
        raise UserError("select: no candidate fits the scope's budgets: " + "; ".join(
            f"{r['candidate']}: {', '.join(r['budget_misses'] or ['no ' + metric])}" for r in measured)
            + " (raise scope.size_budget_mb / latency_budget_ms, or add a smaller candidate)")
    stage_word = "after the probe" if probed else "zero-shot"
    for r in rows:
        r["chosen"] = r is chosen
        r.setdefault("why", _why(r, chosen, metric, stage_word, cfg.pick))
    counts = {r["n_examples"] for r in measured}
    notes = [] if len(counts) == 1 else [
        "candidates were scored on different numbers of eval examples (prompts over a candidate's window "
        "are not scored): " + ", ".join(f"{r['candidate']} {r['n_examples']}" for r in measured)]
    # the chosen candidate's model as its own run resolves it (summaries hold project-relative paths); an
    # endpoint's pointer is copied, so that run:select/best says it has no weights to load
    pointer = store.get(chosen["run"]).artifacts / MODEL_REF
    atomic_write_json(run.artifacts / MODEL_REF, {**json.loads(pointer.read_text()), "run": chosen["run"]}
                      if chosen["source"] == "endpoint" else
                      store.model_pointer(store.resolve_model(chosen["run"]), chosen["run"]))
    run.record.parent = chosen["run"]  # lineage: the chosen candidate's run made this model
    summary = {"chosen": chosen["candidate"], "chosen_run": chosen["run"], "model_path": chosen["model_path"],
               "metric": metric, "after_probe": probed, "picked": cfg.pick is not None, "candidates": rows,
               "notes": notes}
    run.finish(summary)
    return summary


def _why(row: dict, chosen: dict, metric: str, stage_word: str, pick: str | None) -> str:
    value = row.get("value")
    shown = f"{value:.3f}" if isinstance(value, (int, float)) else "n/a"
    if row is chosen:
        if pick is not None:
            over = f"; over budget: {', '.join(row['budget_misses'])}" if row.get("budget_misses") else ""
            return f"chosen: select.pick names it ({metric} {shown} {stage_word}){over}"
        return f"chosen: best {metric} {stage_word} within the budgets ({shown})"
    if row.get("budget_misses"):
        return "over budget: " + ", ".join(row["budget_misses"])
    best = chosen.get("value")
    best_shown = f"{best:.3f}" if isinstance(best, (int, float)) else "n/a"
    return f"{metric} {shown} {stage_word}, vs {best_shown} for {chosen['candidate']}" if pick is None \
        else f"not picked ({metric} {shown} {stage_word})"


def _model_of(project, config: dict) -> str | None:
    """A candidate names its model (a warm start's checkpoints count separately, in _inputs); an endpoint's
    model is no model of this project (its URL and name are in the config)."""
    if config.get("endpoint"):
        return None
    if config.get("run"):
        return config["run"] if config["run"].startswith("run:") else f"run:{config['run']}"
    return config.get("model")


def _inputs(project, config: dict, identify) -> dict:
    """The checkpoints a warm start is built from."""
    ws = config.get("warm_start")
    if not isinstance(ws, dict):
        return {}
    return {"warm_start": {k: identify(ws[k]) for k in ("encoder", "decoder") if ws.get(k)}}


STAGE = Stage(name="select", section=SelectConfig | None, run=run, variants=variant_configs, model_of=_model_of,
              inputs=_inputs, evaluates=True, check_model_first=False,  # a candidate's bad reference is its run's
              alternatives=True, chooser=BEST,
              summary="measure candidate base models on the eval set and choose one within budget")
