"""Scope: define the use case and plan the compute before spending any.

`llmcycle scope` prints the use case, statistics of the data (counts, token-length percentiles with the
model's tokenizer, the share of inputs that overflow the context window) and, per planned stage, the
parameter count, memory to serve and to train, training FLOPs and how long they take at the stated
throughput. The rules of thumb are the course's:

- weights take 4 bytes per parameter in fp32 (2 in bf16, 1 in int8, 0.5 in int4);
- training with Adam in fp32 takes about 20 bytes per parameter (weights 4, gradients 4, Adam's two
  moments 8, activations and temporaries about 4);
- training FLOPs are about 6 x parameters x tokens;
- compute-optimal pretraining uses about 20 tokens per parameter (Chinchilla).
"""
from __future__ import annotations

from pydantic import Field

from llmcycle.core.configbase import Section
from llmcycle.data.prompting import build_prompt, encode_prompt, fit_prompts
from llmcycle.data.records import corpus_texts, load_splits
from llmcycle.evaluation.settings import project_system, project_template, settings
from llmcycle.models import hub as models
from llmcycle.models import scratch
from llmcycle.models.adapters import DEFAULT_LORA_TARGETS
from llmcycle.models.generation import target_end_id
from llmcycle.stages.contract import Stage, own_model
from llmcycle.training.batches import encode_examples
from llmcycle.training.finetune import planned_targets

BYTES_PER_PARAM = {"fp32": 4.0, "bf16": 2.0, "int8": 1.0, "int4": 0.5}
TRAIN_BYTES_PER_PARAM = 20.0
FLOPS_PER_PARAM_TOKEN = 6.0
CHINCHILLA_TOKENS_PER_PARAM = 20.0
PERCENTILES = (50, 90, 95, 99)


class ScopeConfig(Section):
    use_case: str = Field("", description="One or two sentences: what the model must do, for whom.")
    success_metric: str | None = Field(None, description="Headline metric that decides success, e.g. rougeL.")
    success_threshold: float | None = Field(None, description="Value of success_metric that counts as success.")
    latency_budget_ms: float | None = Field(None, gt=0, description="p95 latency a deployment may take.")
    size_budget_mb: float | None = Field(None, gt=0, description="Largest model size on disk allowed.")
    require_significant_gain: bool = Field(
        False, description="Success (and `serve --run best`) also needs a run to beat the best prompt-only run "
        "significantly: a paired 95% difference on the same eval examples.")
    throughput_tflops: float = Field(
        1.0, gt=0, description="Sustained training throughput to plan with, in TFLOP/s "
        "(a CPU core gives ~0.05, an A100 ~100-150 in bf16 at good utilisation).")
    tune_epochs: float = Field(3.0, gt=0, description="Epochs assumed when planning fine-tuning.")
    lora_r: int = Field(8, ge=1, description="LoRA rank assumed when planning LoRA memory.")


# -- pure arithmetic (tested against hand-computed values) ------------------------------------------
def serve_memory(params: int) -> dict[str, float]:
    """Bytes needed to hold the weights at each precision."""
    return {prec: params * b for prec, b in BYTES_PER_PARAM.items()}


def train_memory(params: int, trainable: int | None = None) -> float:
    """Bytes to train: frozen weights cost their fp32 copy only; trainable ones the full 20 bytes."""
    trainable = params if trainable is None else trainable
    return (params - trainable) * BYTES_PER_PARAM["fp32"] + trainable * TRAIN_BYTES_PER_PARAM


def train_flops(params: int, tokens: int) -> float:
    return FLOPS_PER_PARAM_TOKEN * params * tokens


def train_seconds(flops: float, tflops: float) -> float:
    return flops / (tflops * 1e12)


def compute_optimal_tokens(params: int) -> float:
    return CHINCHILLA_TOKENS_PER_PARAM * params


def percentiles(values: list[int]) -> dict:
    """Nearest-rank percentiles, mean and max of token lengths."""
    if not values:
        return {"count": 0}
    ordered = sorted(values)
    out = {"count": len(ordered), "mean": round(sum(ordered) / len(ordered), 1), "max": ordered[-1]}
    for p in PERCENTILES:
        rank = max(1, -(-p * len(ordered) // 100))  # ceil(p/100 * n), 1-based
        out[f"p{p}"] = ordered[rank - 1]
    return out


def lora_parameters(model, targets: list[str], r: int) -> int:
    """Parameters LoRA adds: r x (in + out) for every targeted linear layer."""
    count = 0
    for name, module in model.named_modules():
        if name.split(".")[-1] not in targets:
            continue
        weight = getattr(module, "weight", None)
        if weight is None or weight.dim() != 2:
            continue
        count += r * (weight.shape[0] + weight.shape[1])
    return count


# -- the plan -------------------------------------------------------------------------------------
def token_stats(examples, tokenizer) -> dict:
    """Length percentiles of the raw input and target fields (the data itself, before any template)."""
    inputs = [e.input for e in examples]
    targets = [t for e in examples for t in e.targets]
    stats = {}
    for field, texts in (("input", inputs), ("target", targets)):
        if texts:
            lengths = [len(ids) for ids in tokenizer(texts, add_special_tokens=True)["input_ids"]]
            stats[field] = percentiles(lengths)
            stats[field]["tokens"] = sum(lengths)
    return stats


def overflow(project, splits, model, tokenizer, window: int) -> dict:
    """What the later stages will skip as too long, computed as they compute it: eval prompts built with
    the project's template and system prompt (chat template included) over the window minus room to
    generate (eval, prompt, align, select skip these), and training examples, prompt plus target ending
    with the model's stop token, over the window (tune skips these)."""
    kind = models.model_kind(model.config)
    gen = settings(project).generation
    budget = window - (gen.max_new_tokens if kind == "causal" else 0)
    template, system = project_template(project), project_system(project)
    out = {"window": window, "eval_budget": budget}
    if splits.eval and budget > 0:
        def count(prompt):
            return len(encode_prompt(tokenizer, prompt, kind))

        fitted = fit_prompts(template, splits.eval, [], [[] for _ in splits.eval], count, budget, variant="scope",
                             system=system)
        out.update(eval_over=len(fitted.skipped), eval_total=len(splits.eval),
                   eval_over_share=round(len(fitted.skipped) / len(splits.eval), 4))
        out.update(_shots_lost(project, splits, count, budget, template, system))
    trainable = [e for e in splits.train if e.targets]
    if trainable:
        end_id, _ = target_end_id(model, tokenizer, kind)
        prompts = [build_prompt(template, e, system=system) for e in trainable]
        skipped = encode_examples(trainable, prompts, tokenizer, kind, window, end_id=end_id).skipped
        out.update(train_over=len(skipped), train_total=len(trainable),
                   train_over_share=round(len(skipped) / len(trainable), 4))
    return out


def _shots_lost(project, splits, count, budget: int, template: str, system: str | None) -> dict:
    """For each shot count of the prompt stage, how many eval prompts cannot hold all their shots (the
    prompt stage drops the furthest ones), with the first training examples as shots: other selections
    pick other examples, of other lengths."""
    cfg = project.config.prompt
    ks = sorted({k for k in (cfg.shots if cfg is not None else []) if 0 < k <= len(splits.train)})
    if not ks:
        return {}
    lost = {}
    for k in ks:
        fitted = fit_prompts(template, splits.eval, splits.train, [list(range(k)) for _ in splits.eval], count,
                             budget, shot_format=cfg.shot_format, separator=cfg.shot_separator, variant="scope",
                             system=system)
        lost[k] = fitted.lost_shots
    return {"prompts_losing_shots": lost}


def _model_plan(name: str, params: int, tokens: int, scope: ScopeConfig, *, lora: int | None,
                pretrain: bool) -> dict:
    flops = train_flops(params, tokens)
    plan = {
        "stage": name, "parameters": params, "train_tokens": tokens,
        "serve_memory_bytes": serve_memory(params),
        "train_memory_bytes": {"full_adam_fp32": train_memory(params)},
        "train_flops": flops,
        "train_seconds": train_seconds(flops, scope.throughput_tflops),
        "throughput_tflops": scope.throughput_tflops,
    }
    if lora is not None:
        plan["lora_parameters"] = lora
        plan["train_memory_bytes"]["lora_adam_fp32"] = train_memory(params + lora, lora)
    if pretrain:
        optimal = compute_optimal_tokens(params)
        plan["compute_optimal_tokens"] = optimal
        plan["tokens_vs_optimal"] = round(tokens / optimal, 4) if optimal else None
    return plan


def build_plan(project) -> dict:
    """Everything `llmcycle scope` reports, as a JSON-able dict."""

    cfg = project.config
    scope = cfg.scope or ScopeConfig()
    plan: dict = {"project": cfg.project.name, "task": cfg.project.task, "use_case": scope.use_case,
                  "success": {"metric": scope.success_metric, "threshold": scope.success_threshold},
                  "budget": {"latency_ms": scope.latency_budget_ms, "size_mb": scope.size_budget_mb},
                  "notes": [], "stages": []}
    splits = load_splits(cfg.data, project.dir) if cfg.data else None
    if splits is not None:
        plan["data"] = {"train": len(splits.train), "eval": len(splits.eval)}

    tokenizer = model_config = None
    if cfg.model is not None:
        try:
            path = models.resolve_model_path(cfg.model.name, project.dir, project.store())
            model_config = models.load_config(path, cfg.model.trust_remote_code)
            tokenizer = models.load_tokenizer(path, cfg.model.trust_remote_code)
        except Exception as exc:  # noqa: BLE001 - a planned model may not exist yet
            if not cfg.model.name.startswith("run:"):
                raise
            plan["notes"].append(f"model {cfg.model.name} is not trained yet ({exc}); "
                                 "token statistics need its tokenizer")
    if model_config is not None:
        window = models.context_window(model_config, tokenizer, cfg.model.context_window)
        meta = models.meta_model(model_config)
        params, _ = models.count_parameters(meta)
        plan["model"] = {"name": cfg.model.name, "kind": models.model_kind(model_config),
                         "context_window": window, "parameters": params}
        if splits is not None:
            plan["data"]["token_stats"] = {
                "train": token_stats(splits.train, tokenizer),
                "eval": token_stats(splits.eval, tokenizer)}
            plan["data"]["overflow"] = overflow(project, splits, meta, tokenizer, window)
            train_tokens = plan["data"]["token_stats"]["train"]
            per_epoch = sum(train_tokens.get(f, {}).get("tokens", 0) for f in ("input", "target"))
            targets = DEFAULT_LORA_TARGETS.get(model_config.model_type, ["q", "v"])
            if not cfg.tune:  # nothing configured yet: plan a generic fine-tune
                lora = lora_parameters(meta, targets, scope.lora_r)
                tune = _model_plan("fine-tune", params, int(per_epoch * scope.tune_epochs), scope,
                                   lora=lora, pretrain=False)
                tune.update(lora_targets=targets, epochs=scope.tune_epochs)
                plan["stages"].append(tune)
            for variant, tcfg in cfg.tune.items():
                plan["stages"].append(_tune_plan(variant, tcfg, meta, params, per_epoch,
                                                 train_tokens, targets, scope))

    for variant, pcfg in cfg.pretrain.items():
        plan["stages"].append(_pretrain_plan(variant, pcfg, splits, tokenizer, scope))
    if splits is not None and getattr(cfg, "select", None) is not None:
        plan["candidates"] = _candidate_overflow(project, splits, plan["notes"])
    return plan


def _candidate_overflow(project, splits, notes: list) -> dict:
    """Each select candidate's overflow with its own tokenizer and window (what select will count)."""
    out = {}
    for name, cand in project.config.select.candidates.items():
        ref = cand.model or (f"run:{cand.run}" if cand.run and not cand.run.startswith("run:") else cand.run)
        if ref is None:
            notes.append(f"select candidate {name} is a warm start: its overflow is measured when select builds it")
            continue
        try:
            path = models.resolve_model_path(ref, project.dir, project.store())
            config = models.load_config(path, False)
            tokenizer = models.load_tokenizer(path, False)
        except Exception as exc:  # noqa: BLE001 - a candidate may not exist yet (a later run) or be offline
            notes.append(f"select candidate {name} ({ref}) could not be read for its overflow: {exc}")
            continue
        window = models.context_window(config, tokenizer, cand.context_window or (
            project.config.model.context_window if project.config.model else None))
        out[name] = overflow(project, splits, models.meta_model(config), tokenizer, window)
    return out


def _tune_plan(variant, tcfg, meta, params, per_epoch, train_stats, default_targets, scope) -> dict:
    """A configured fine-tuning variant: its trainable parameters set its training memory."""
    if tcfg.max_steps and not tcfg.epochs:
        # tokens per example (input + target) times the examples the steps will see
        per_example = per_epoch / max(1, train_stats.get("input", {}).get("count", 1))
        # batch_size auto is found when tuning starts; the plan counts the default 8 until then
        batch = 8 if tcfg.batch_size == "auto" else tcfg.batch_size
        tokens = int(tcfg.max_steps * batch * tcfg.grad_accum * per_example)
    else:
        tokens = int(per_epoch * (tcfg.epochs or 1))
    if tcfg.method == "lora":
        trainable = lora_parameters(meta, planned_targets(meta, tcfg.target_modules or default_targets), tcfg.r)
        total = params + trainable
    elif tcfg.method == "prompt_tuning":
        # peft learns one soft prompt per transformer stack: two for encoder-decoder models
        stacks = 2 if getattr(meta.config, "is_encoder_decoder", False) else 1
        trainable = tcfg.num_virtual_tokens * stacks * meta.get_input_embeddings().weight.shape[1]
        total = params + trainable
    else:
        trainable = total = params
    plan = _model_plan(f"tune.{variant}", params, tokens, scope, lora=None, pretrain=False)
    # FLOPs: the forward and backward passes run through the whole model whatever is trained
    plan["train_memory_bytes"] = {f"{tcfg.method}_adam_fp32": train_memory(total, trainable)}
    plan.update(method=tcfg.method, trainable_parameters=trainable,
                trainable_pct=round(100 * trainable / total, 4))
    return plan


def _pretrain_plan(variant: str, pcfg, splits, tokenizer, scope: ScopeConfig) -> dict:
    meta = models.meta_model(scratch.planned_model_config(pcfg))
    params, _ = models.count_parameters(meta)
    if pcfg.max_steps:
        tokens = pcfg.max_steps * pcfg.batch_size * pcfg.seq_len
        how = "max_steps x batch_size x seq_len"
    elif splits is not None:
        texts = corpus_texts(splits.train)
        if tokenizer is not None:
            corpus = sum(len(ids) for ids in tokenizer(texts)["input_ids"])
            how = "epochs x corpus tokens"
        else:
            # No tokenizer exists before pretraining trains one: subword tokenizers give
            # roughly 1.3 tokens per English word.
            corpus = int(1.3 * sum(len(t.split()) for t in texts))
            how = "epochs x corpus words x 1.3 (no tokenizer yet)"
        tokens = int(corpus * (pcfg.epochs or 1))
    else:
        tokens, how = 0, "no corpus configured"
    plan = _model_plan(f"pretrain.{variant}", params, tokens, scope, lora=None, pretrain=True)
    plan["train_tokens_from"] = how
    plan["architecture"] = pcfg.architecture
    return plan


def run(project, variant: str, run, *, resume: bool = False, progress: bool = True) -> dict:
    """Stage entry point: build the plan and record it as the run's summary."""
    plan = build_plan(project)
    run.finish(plan)
    return plan


def render(plan: dict, console) -> None:
    """Print the plan as rich tables."""
    from rich.table import Table

    console.print(f"[bold]{plan['project']}[/] — task: {plan['task']}")
    if plan["use_case"]:
        console.print(f"use case: {plan['use_case']}")
    if plan["success"]["metric"]:
        console.print(f"success: {plan['success']['metric']} >= {plan['success']['threshold']}")
    if "model" in plan:
        m = plan["model"]
        console.print(f"model: {m['name']} ({m['kind']}, {human(m['parameters'])} parameters, "
                      f"context window {m['context_window']} tokens)")
    data = plan.get("data")
    if data:
        console.print(f"data: {data['train']} train / {data['eval']} eval examples")
        for split, stats in data.get("token_stats", {}).items():
            table = Table(title=f"token lengths ({split})")
            for col in ("field", "count", "mean", "p50", "p90", "p95", "p99", "max"):
                table.add_column(col, justify="right" if col != "field" else "left")
            for field in ("input", "target"):
                s = stats.get(field)
                if s:
                    table.add_row(field, *(str(s.get(c, "")) for c in
                                           ("count", "mean", "p50", "p90", "p95", "p99", "max")))
            console.print(table)
    if data and data.get("overflow"):
        _render_overflow(data["overflow"], console)
    for name, o in plan.get("candidates", {}).items():
        console.print(f"select candidate {name}, with its own tokenizer and window:")
        _render_overflow(o, console, indent="  ")
    if plan["stages"]:
        table = Table(title="compute plan")
        for col in ("stage", "params", "serve fp32/bf16/int8/int4", "train memory", "tokens",
                    "FLOPs", "time"):
            table.add_column(col)
        for st in plan["stages"]:
            serve = "/".join(human_bytes(v) for v in st["serve_memory_bytes"].values())
            mem = ", ".join(f"{k.split('_')[0]} {human_bytes(v)}"
                            for k, v in st["train_memory_bytes"].items())
            tokens = human(st["train_tokens"])
            if "compute_optimal_tokens" in st:
                tokens += f" (optimal {human(st['compute_optimal_tokens'])})"
            table.add_row(st["stage"], human(st["parameters"]), serve, mem, tokens,
                          f"{st['train_flops']:.2e}",
                          f"{human_seconds(st['train_seconds'])} @ {st['throughput_tflops']} TFLOP/s")
        console.print(table)
    for note in plan["notes"]:
        console.print(f"[yellow]note:[/] {note}")


def _render_overflow(o: dict, console, indent: str = "") -> None:
    """What tune and eval will skip, as they will count it."""
    if "eval_over" in o:
        console.print(f"{indent}eval prompts over {o['eval_budget']} tokens (the window minus room to generate), "
                      f"with the template: {o['eval_over']} of {o['eval_total']} ({o['eval_over_share']:.1%}); "
                      "evaluation skips them")
    for k, n in (o.get("prompts_losing_shots") or {}).items():
        console.print(f"{indent}  with {k} shot(s) (the first training examples): {n} of {o['eval_total']} prompts must drop "
                      "some to fit")
    if "train_over" in o:
        console.print(f"{indent}training examples (prompt + target) over the window of {o['window']} tokens: "
                      f"{o['train_over']} of {o['train_total']} ({o['train_over_share']:.1%}); tune skips them")


def human(n: float) -> str:
    for unit, size in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.2f}{unit}"
    return f"{n:g}"


def human_bytes(n: float) -> str:
    for unit, size in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n:.0f} B"


def human_seconds(s: float) -> str:
    if s >= 86400:
        return f"{s / 86400:.1f} d"
    if s >= 3600:
        return f"{s / 3600:.1f} h"
    if s >= 60:
        return f"{s / 60:.1f} min"
    return f"{s:.1f} s"


def _variants(project) -> dict[str, dict]:
    """One plan, when there is something to scope: a use case, data or a model."""
    cfg = project.config
    if cfg.scope is None and cfg.data is None and cfg.model is None:
        return {}
    return {"plan": {"scope": cfg.scope.model_dump() if cfg.scope else None}}


STAGE = Stage(name="scope", section=ScopeConfig | None, run=run, variants=_variants, model_of=own_model(),
              check_model_first=False,  # the plan notes a model that is not trained yet
              summary="size the use case: data, context window, memory, compute, a plan per stage")
