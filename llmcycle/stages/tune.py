"""Instruction fine-tuning: full, LoRA, prompt tuning and QLoRA, on the project's prompt.

    llmcycle tune [--variant V] [--resume] [--merge]      (or as a stage of `llmcycle run`)
    torchrun --nproc_per_node 2 -m llmcycle tune ...      (data parallel, also on CPU with gloo)
    accelerate launch --config_file cfg.yaml -m llmcycle tune ...   (FSDP / DeepSpeed on GPUs)

Settings come from `tune: {VARIANT: ...}` in llmcycle.yaml (training/finetune.TuneConfig). Each training example
is the project's prompt (`evaluate.template`, built by `data.prompting.build_prompt` and encoded like at
inference) followed by its first reference and EOS; the loss is on the answer only. Nothing is
truncated: overlong examples are skipped and counted (or refused with `on_overflow: refuse`).

Outputs in the run's artifacts:
  model/        LoRA / prompt tuning: the adapter (PEFT save_pretrained) + the tokenizer +
                llmcycle_base.json naming the base; full: a normal Hugging Face model folder.
                `load_model(path)` loads either (base + adapter for adapter folders).
  merged/       with `merge: true` (LoRA): the adapter merged into the base, a plain HF folder that
                needs neither peft nor the base to load. model/ keeps the adapter either way.
  checkpoints/  step-N/ (the last two, atomic, used by --resume) and best/ (best validation score).
  predictions.jsonl   the final evaluation on the eval split, through the shared harness.

The training loop itself (batches, accumulation, DDP, checkpoints, validation, early stopping)
lives in llmcycle/training/loop.py.
"""
from __future__ import annotations

import time

from llmcycle.core.errors import UserError
from llmcycle.core.memory import peak_mb, reset_peak
from llmcycle.core.progress import notice
from llmcycle.data.prompting import check_template
from llmcycle.data.records import load_splits
from llmcycle.evaluation import harness
from llmcycle.evaluation.evaluate import score_on_project
from llmcycle.evaluation.settings import (
    eval_examples,
    project_system,
    project_template,
    settings,
)
from llmcycle.models.adapters import save_model
from llmcycle.models.generation import Generator
from llmcycle.models.hub import resolve_device
from llmcycle.models.load import load_model
from llmcycle.stages.contract import Stage, own_model, section_variants
from llmcycle.training.finetune import TuneConfig, check_quantization
from llmcycle.training.loop import fit


# --------------------------------------------------------------------------------- the stage
def run(project, variant: str, run, *, resume: bool = False, progress: bool = True) -> dict:
    """Stage entry point: fine-tune `tune.<variant>`, save the model, evaluate it on the eval split."""

    t_start = time.perf_counter()
    cfg = project.config.tune[variant]
    check_quantization(cfg)
    reset_peak(resolve_device(project.config.model.device if project.config.model else "auto"))
    ref, base_path, base_run, train_examples, final_examples, template = _inputs(project, variant, cfg)
    opts = project.config.model.model_dump() if project.config.model is not None else {}
    ev = settings(project)
    trained = fit(cfg, base_path, train_examples, final_examples, template, run.artifacts,
                  resume=resume, log=run.log, progress=progress, task=project.config.project.task,
                  gen_cfg=ev.generation, dtype=opts.get("dtype", "auto"), device=opts.get("device", "auto"),
                  context_window=opts.get("context_window"),
                  trust_remote_code=opts.get("trust_remote_code", False),
                  base_key=project.store().portable(base_path), on_resume=run.rewind, system=project_system(project))
    summary = dict(trained.summary)
    if summary["skipped_overlong"]:
        notice(f"tune.{variant}: skipped {summary['skipped_overlong']} of {summary['train_records']} training "
               f"examples longer than the context window (first: {summary['skipped'][0]})")
    facts = summary.get("parallelism") or {}
    if facts.get("strategy") == "fsdp" and trained.is_main:
        notice(f"tune.{variant}: FSDP2 on {facts['world_size']} processes; rank 0 held {facts['rank0_params']:,} "
               f"of {facts['params']:,} weights, {sum(summary['held_mb'].values()):,.1f} MB with grads and Adam state")
    summary.update({"method": cfg.method, "base": ref, "base_path": base_path, "parent": base_run})
    model_dir = run.artifacts / "model"
    if trained.is_main:  # under torchrun every rank evaluates its share, rank 0 saves and records
        model_dir = save_model(trained.model, trained.tokenizer, model_dir,
                               {"base": ref, "base_path": base_path, "base_run": base_run, "method": cfg.method},
                               project_dir=project.dir)
    summary["model_dir"] = str(model_dir)
    metrics = _final_evaluation(project, variant, cfg, run, trained, model_dir, final_examples, template,
                                progress)
    if not trained.is_main:
        return summary
    summary = {**metrics, **summary}
    # training and evaluation of this variant (merging below loads another copy: not counted)
    # the training loop starts a new peak at every log line and keeps the highest
    summary["peak_memory_mb"] = round(max(peak_mb(trained.device), summary.get("train_peak_memory_mb") or 0.0), 1)
    if cfg.merge:
        summary["merged_dir"] = str(_merge(model_dir, run.artifacts / "merged", opts.get("dtype", "auto")))
    summary["wall_s"] = round(time.perf_counter() - t_start, 3)
    run.finish(summary)
    return summary


def _inputs(project, variant: str, cfg: TuneConfig):
    """(base reference, its path, the run that made it, training examples, eval examples, template),
    each checked before any training starts."""

    if cfg.merge and cfg.method != "lora":
        raise UserError(f"tune.{variant}: merge applies to LoRA adapters, not to method {cfg.method}")
    mcfg = project.config.model
    ref = cfg.base or (mcfg.name if mcfg is not None else None)
    if ref is None:
        raise UserError(f"tune.{variant}: no base model: set tune.{variant}.base or the project's model.name")
    base_path, base_run = harness.resolve(ref, project)
    if project.config.data is None:
        raise UserError(f"{project.path}: no data configured (add a `data:` section)")
    train_examples = load_splits(project.config.data, project.dir).train
    if not train_examples:
        raise UserError("tune: no training examples (set data.train)")
    final_examples = eval_examples(project, limit=settings(project).limit)  # refuses one without targets
    template = project_template(project)
    check_template(template, "evaluate.template", train_examples[0])
    return ref, base_path, base_run, train_examples, final_examples, template


def _final_evaluation(project, variant: str, cfg: TuneConfig, run, trained, model_dir, examples, template,
                      progress: bool) -> dict:
    """The unmerged trained model on the project's prompt and the whole eval split, exactly as
    `llmcycle eval` would score it (prompts that do not fit are skipped and counted, or refused, never cut);
    predictions written."""

    ev = settings(project)
    model = trained.model
    model.eval()
    loaded = harness.LoadedModel(f"tune/{variant}", str(model_dir), model, trained.tokenizer,
                                 Generator(model, trained.tokenizer, trained.window), run.id)
    # reference_perplexity scores logits position by position; a causal prompt-tuned model's logits
    # start with the virtual tokens, so its perplexity is not computed there.
    perplexity = ev.perplexity and not (cfg.method == "prompt_tuning" and trained.kind == "causal")
    metrics, rows, _ = score_on_project(project, loaded, examples, template=template, perplexity=perplexity,
                                        progress=progress and trained.is_main, label=f"eval tune.{variant}")
    if trained.is_main:
        harness.write_predictions(run, rows)
    return metrics


def _merge(adapter_dir, dest, dtype: str):
    """The adapter merged onto a freshly loaded, unquantized base: the trained model is left as it is,
    and a QLoRA adapter merges into full-precision weights rather than 4-bit ones."""
    merged, tok = load_model(adapter_dir, dtype=dtype, device="cpu")
    return save_model(merged.merge_and_unload(), tok, dest)


STAGE = Stage(name="tune", section=dict[str, TuneConfig], run=run, variants=section_variants("tune"),
              model_of=own_model("base"), evaluates=True,
              summary="instruction fine-tuning: full, LoRA, QLoRA or prompt tuning, then evaluation")
