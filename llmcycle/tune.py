"""Instruction fine-tuning: full, LoRA, prompt tuning and QLoRA, on the project's prompt.

    llmcycle tune [--variant V] [--resume] [--merge]      (or as a stage of `llmcycle run`)
    torchrun --nproc_per_node 2 -m llmcycle tune ...      (data parallel, also on CPU with gloo)
    accelerate launch --config_file cfg.yaml -m llmcycle tune ...   (FSDP / DeepSpeed on GPUs)

Settings come from `tune: {VARIANT: ...}` in llmcycle.yaml (TuneConfig below). Each training example
is the project's prompt (`evaluate.template`, built by `prompts.build_prompt` and encoded like at
inference) followed by its first reference and EOS; the loss is on the answer only. Nothing is
truncated: overlong examples are skipped and counted (or refused with `on_overflow: refuse`).

Outputs in the run's artifacts:
  model/        LoRA / prompt tuning: the adapter (PEFT save_pretrained) + the tokenizer +
                llmcycle_base.json naming the base; full: a normal Hugging Face model folder.
                `load_trained(path)` loads either (base + adapter for adapter folders).
  merged/       with `merge: true` (LoRA): the adapter merged into the base, a plain HF folder that
                needs neither peft nor the base to load. model/ keeps the adapter either way.
  checkpoints/  step-N/ (the last two, atomic, used by --resume) and best/ (best validation score).
  predictions.jsonl   the final evaluation on the eval split, through the shared harness.

The training loop itself (batches, accumulation, DDP, checkpoints, validation, early stopping)
lives in llmcycle/tune_loop.py.
"""
from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from .configbase import Section
from .errors import UserError

ADAPTER_CONFIG = "adapter_config.json"  # what PEFT writes; marks an adapter folder
BASE_FILE = "llmcycle_base.json"  # which base an adapter folder belongs to


class TuneConfig(Section):
    """One variant of the `tune:` section of llmcycle.yaml."""

    method: Literal["full", "lora", "prompt_tuning"] = Field(
        "lora", description="full: train every weight; lora: low-rank adapters on target_modules "
        "(QLoRA with bits: 4); prompt_tuning: learn num_virtual_tokens soft-prompt embeddings only")
    base: str | None = Field(None, description="model to start from: run:REF, a local folder or a Hub id; "
                             "default: the project's model (loaded with the project's model options)")
    r: int = Field(8, ge=1, description="LoRA rank")
    alpha: int = Field(16, ge=1, description="LoRA scaling numerator (the update is scaled by alpha / r)")
    dropout: float = Field(0.05, ge=0, lt=1, description="dropout on the LoRA input")
    target_modules: list[str] | None = Field(
        None, description="module names LoRA adapts (last name components, e.g. [q, v]); default by "
        "model type: t5 q,v; gpt2 c_attn; llama/mistral/qwen2 q_proj,v_proj; ...")
    bits: Literal[4, 8] | None = Field(None, description="load the frozen base quantized: 4 = QLoRA (NF4), "
                                       "8 = int8; LoRA only, needs a CUDA GPU and bitsandbytes")
    num_virtual_tokens: int = Field(20, ge=1, description="prompt tuning: length of the learned soft prompt")
    lr: float = Field(1e-4, gt=0, description="peak learning rate (AdamW)")
    lr_schedule: Literal["linear", "cosine"] = Field("linear", description="decay after warmup, to 0 at the end")
    batch_size: int = Field(8, ge=1, description="examples per micro-batch, over all processes together")
    grad_accum: int = Field(1, ge=1, description="micro-batches per optimizer step")
    epochs: float | None = Field(None, gt=0, description="passes over the training set (may be fractional)")
    max_steps: int | None = Field(None, ge=1, description="optimizer steps; with epochs, the lower bound wins")
    warmup_steps: int = Field(0, ge=0, description="linear warmup steps")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay on matrices")
    grad_clip: float = Field(1.0, ge=0, description="clip the gradient norm to this; 0 turns clipping off")
    seed: int = Field(42, description="seed for adapter init, data order and dropout")
    group_by_length: bool = Field(True, description="batch examples of similar length (less padding)")
    on_overflow: Literal["skip", "refuse"] = Field(
        "skip", description="an example longer than the context window: skip it (counted) or refuse the run")
    eval_every: int | None = Field(None, ge=1, description="validate every N steps: loss and the headline "
                                   "metric on eval_samples eval examples; the best is kept in checkpoints/best")
    eval_samples: int = Field(32, ge=1, description="eval examples used for validation during training")
    early_stopping_patience: int | None = Field(
        None, ge=1, description="stop after this many validations without a better headline metric")
    checkpoint_every: int = Field(100, ge=1, description="save a resumable checkpoint every N steps (and at the end)")
    log_every: int = Field(10, ge=1, description="log training loss every N steps")
    gradient_checkpointing: bool = Field(
        False, description="recompute activations in the backward pass instead of keeping them: less "
        "memory (activations dominate at long sequences), about a third more compute")
    merge: bool = Field(False, description="LoRA: also save the adapter merged into the base in artifacts/merged")
    precision: Literal["auto", "float32", "bfloat16"] = Field(
        "auto", description="training arithmetic: auto = bf16 autocast on GPUs with bf16, float32 on CPUs; "
        "bfloat16 = bf16 autocast on a CPU too (about 1.5x faster steps on CPUs with native bf16)")

    @model_validator(mode="after")
    def _length_and_combinations(self):
        if self.max_steps is None and self.epochs is None:
            raise ValueError("set tune.epochs or tune.max_steps (or both: max_steps caps epochs)")
        if self.early_stopping_patience is not None and self.eval_every is None:
            raise ValueError("early_stopping_patience needs eval_every (how often to validate)")
        return self


# ------------------------------------------------------------------------------------ the model
def task_type(kind: str):
    from peft import TaskType

    return TaskType.SEQ_2_SEQ_LM if kind == "seq2seq" else TaskType.CAUSAL_LM


def adaptable_modules(model) -> list[str]:
    """Short names (last components, unique, in model order) of the Linear / Conv1D layers LoRA can adapt."""
    import torch
    from transformers.pytorch_utils import Conv1D

    names = [n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, (torch.nn.Linear, Conv1D))]
    return list(dict.fromkeys(names))


def lora_targets(cfg: TuneConfig, model) -> list[str]:
    """cfg.target_modules, or the default for the model type; each must name an adaptable layer."""
    from .scope import DEFAULT_LORA_TARGETS

    model_type = getattr(model.config, "model_type", None)
    targets = cfg.target_modules or DEFAULT_LORA_TARGETS.get(model_type)
    available = adaptable_modules(model)
    if not targets:
        raise UserError(f"tune: no default LoRA target modules for model type '{model_type}'; set "
                        f"target_modules (Linear/Conv1D layers of this model: {', '.join(available)})")
    missing = [t for t in targets if t not in available]
    if missing:
        raise UserError(f"tune: target_modules {missing} not found among the model's Linear/Conv1D layers: "
                        f"{', '.join(available)}")
    return list(targets)


def check_quantization(cfg: TuneConfig) -> None:
    """QLoRA's requirements, checked before anything is loaded."""
    if cfg.bits is None:
        return
    import importlib.util

    import torch

    if cfg.method != "lora":
        raise UserError(f"tune: bits: {cfg.bits} (quantized base) works with method lora only, not {cfg.method}")
    lacking = [what for what, ok in (("a CUDA GPU", torch.cuda.is_available()),
                                     ("bitsandbytes", importlib.util.find_spec("bitsandbytes") is not None)) if not ok]
    if lacking:
        raise UserError(f"tune: bits: {cfg.bits} ({'QLoRA' if cfg.bits == 4 else 'int8 LoRA'}) needs a CUDA GPU "
                        f"and the bitsandbytes package; missing here: {' and '.join(lacking)} (drop bits to "
                        "train LoRA on the unquantized model)")


def load_base(path: str, cfg: TuneConfig, *, dtype: str = "auto", device: str = "cpu",
              trust_remote_code: bool = False):
    """(model, tokenizer) of the base, a fresh copy for training (the harness's cached eval model is
    never touched). An adapter folder as base is merged first, so tuning a tuned model works.
    Full fine-tuning keeps float32 master weights (half-precision AdamW updates underflow); mixed
    precision comes from autocast. Adapters leave the frozen base in the project's dtype."""
    import torch

    from . import models

    if (Path(path) / ADAPTER_CONFIG).is_file():
        model, tok = load_trained(path, dtype="float32" if cfg.method == "full" else dtype, device=device)
        return model.merge_and_unload(), tok
    if cfg.bits is None:
        return models.load_model(path, dtype="float32" if cfg.method == "full" else dtype, device=device,
                                 trust_remote_code=trust_remote_code)
    from peft import prepare_model_for_kbit_training
    from transformers import BitsAndBytesConfig

    config = models.load_config(path, trust_remote_code)
    compute = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    quant = (BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                bnb_4bit_compute_dtype=compute) if cfg.bits == 4
             else BitsAndBytesConfig(load_in_8bit=True))
    local = int(os.environ.get("LOCAL_RANK", 0))
    model = models.auto_class(config).from_pretrained(
        path, config=config, quantization_config=quant, dtype=compute, device_map={"": local},
        trust_remote_code=trust_remote_code)
    # casts norms to fp32 and enables input grads, as QLoRA needs
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    return model, models.load_tokenizer(path, trust_remote_code)


def wrap(cfg: TuneConfig, model, kind: str, new_modules: list[str] = (), new_tokens: list[int] = ()):
    """The model ready to train: PEFT-wrapped for lora / prompt_tuning, all weights trainable for full.
    What a warm start added without pretrained weights trains beside LoRA's adapters and is saved with
    them: `new_modules` (its cross-attention: nothing for a low-rank update to adapt) fully, and the
    embedding rows of `new_tokens` (tags such as #Person1#; with tied embeddings also their output rows)."""
    if cfg.method == "full":
        for p in model.parameters():
            p.requires_grad_(True)
        return model
    from peft import LoraConfig, PromptTuningConfig, PromptTuningInit, get_peft_model

    if cfg.method == "lora":
        new = {}
        if new_modules:
            new = {"modules_to_save": list(new_modules),
                   "exclude_modules": r".*\.(" + "|".join(new_modules) + r")\..*"}  # no adapters inside them
        if new_tokens:
            new["trainable_token_indices"] = list(new_tokens)
        peft_cfg = LoraConfig(task_type=task_type(kind), r=cfg.r, lora_alpha=cfg.alpha,
                              lora_dropout=cfg.dropout, target_modules=lora_targets(cfg, model), **new)
        return get_peft_model(model, peft_cfg)
    peft_cfg = PromptTuningConfig(task_type=task_type(kind), num_virtual_tokens=cfg.num_virtual_tokens,
                                  prompt_tuning_init=PromptTuningInit.RANDOM)
    try:
        return get_peft_model(model, peft_cfg)
    except Exception as exc:  # noqa: BLE001 - peft's refusal of an architecture, as one line
        raise UserError(f"tune: prompt tuning is not supported by peft for model type "
                        f"'{getattr(model.config, 'model_type', '?')}': {str(exc).splitlines()[0]}") from None


def parameter_counts(model) -> tuple[int, int]:
    """(trainable, total); peft's count for adapters (it counts 4-bit packed weights correctly)."""
    if hasattr(model, "get_nb_trainable_parameters"):
        return model.get_nb_trainable_parameters()
    from .models import count_parameters

    total, trainable = count_parameters(model)
    return trainable, total


def load_trained(path, dtype: str = "auto", device: str = "auto", trust_remote_code: bool = False):
    """(model, tokenizer) of what `tune` saved: an adapter folder (base + adapter, as a PeftModel) or a
    plain model folder. The base is the one named in llmcycle_base.json, else adapter_config.json's."""
    from . import models

    path = Path(path)
    if not (path / ADAPTER_CONFIG).is_file():
        return models.load_model(str(path), dtype=dtype, device=device, trust_remote_code=trust_remote_code)
    from peft import PeftModel

    base = adapter_base(path)
    if not base:
        raise UserError(f"adapter folder {path} does not say which base model it belongs to")
    model, _ = models.load_model(base, dtype=dtype, device=device, trust_remote_code=trust_remote_code)
    tokenizer = models.load_tokenizer(str(path), trust_remote_code)
    try:
        model = PeftModel.from_pretrained(model, str(path), is_trainable=False)
    except Exception as exc:  # noqa: BLE001 - a damaged adapter folder, as one line
        raise UserError(f"adapter folder {path} could not be loaded onto {base}: "
                        f"{(str(exc).strip().splitlines() or [type(exc).__name__])[0]}") from None
    model.eval()
    return model, tokenizer


def adapter_base(path: Path) -> str | None:
    """The base model an adapter folder belongs to: llmcycle_base.json's base_relative (a base inside
    the same project, relative to the adapter folder, so a moved project still finds it), else its
    base_path, else what peft wrote in adapter_config.json."""
    path = Path(path)
    meta = json.loads((path / BASE_FILE).read_text()) if (path / BASE_FILE).is_file() else {}
    if meta.get("base_relative") and (path / meta["base_relative"]).is_dir():
        return str((path / meta["base_relative"]).resolve())
    if meta.get("base_path"):
        return meta["base_path"]
    if (path / ADAPTER_CONFIG).is_file():
        return json.loads((path / ADAPTER_CONFIG).read_text()).get("base_model_name_or_path")
    return None


def save_model(model, tokenizer, dest: Path, meta: dict | None = None, project_dir: Path | None = None) -> Path:
    """Write the trained model (the adapter, or the whole model for full) to `dest` atomically. An
    adapter whose base folder lies inside project_dir records it relative to itself too."""
    from .checkpoints import fsync_tree, quiet_saves

    base = Path(str((meta or {}).get("base_path", "")))
    if project_dir is not None and base.is_absolute() and base.is_dir() \
            and base.resolve().is_relative_to(Path(project_dir).resolve()):
        meta = {**meta, "base_relative": os.path.relpath(base.resolve(), Path(dest).resolve())}

    tmp = dest.with_name(f".tmp-{dest.name}-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    with quiet_saves():
        model.save_pretrained(str(tmp))
    tokenizer.save_pretrained(str(tmp))
    if meta is not None and (tmp / ADAPTER_CONFIG).is_file():
        (tmp / BASE_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    fsync_tree(tmp)
    shutil.rmtree(dest, ignore_errors=True)
    os.replace(tmp, dest)
    return dest


# --------------------------------------------------------------------------------- the stage
def run(project, variant: str, run, *, resume: bool = False, progress: bool = True) -> dict:
    """Stage entry point: fine-tune `tune.<variant>`, save the model, evaluate it on the eval split."""
    from . import harness
    from .data import load_splits
    from .evaluate import eval_examples, name_lexicon, project_template, settings
    from .generation import Generator
    from .prompts import check_template, fit_prompts
    from .tune_loop import fit

    from .memory import peak_mb, reset_peak

    t_start = time.perf_counter()
    cfg = project.config.tune[variant]
    check_quantization(cfg)
    from .models import resolve_device

    reset_peak(resolve_device(project.config.model.device if project.config.model else "auto"))
    if cfg.merge and cfg.method != "lora":
        raise UserError(f"tune.{variant}: merge applies to LoRA adapters, not to method {cfg.method}")
    mcfg = project.config.model
    ref = cfg.base or (mcfg.name if mcfg is not None else None)
    if ref is None:
        raise UserError(f"tune.{variant}: no base model: set tune.{variant}.base or the project's model.name")
    opts = mcfg.model_dump() if mcfg is not None else {}
    base_path, base_run = harness.resolve(ref, project)
    if project.config.data is None:
        raise UserError(f"{project.path}: no data configured (add a `data:` section)")
    train_examples = load_splits(project.config.data, project.dir).train
    if not train_examples:
        raise UserError("tune: no training examples (set data.train)")
    ev = settings(project)
    final_examples = eval_examples(project, limit=ev.limit)  # refuses an eval set without targets
    template = project_template(project)
    check_template(template, "evaluate.template", train_examples[0])

    trained = fit(cfg, base_path, train_examples, final_examples, template, run.artifacts,
                  resume=resume, log=run.log, progress=progress, task=project.config.project.task,
                  gen_cfg=ev.generation, dtype=opts.get("dtype", "auto"), device=opts.get("device", "auto"),
                  context_window=opts.get("context_window"),
                  trust_remote_code=opts.get("trust_remote_code", False),
                  base_key=project.store().portable(base_path), on_resume=run.rewind)
    summary = dict(trained.summary)
    summary.update({"method": cfg.method, "base": ref, "base_path": base_path, "parent": base_run})
    if not trained.is_main:  # another data-parallel rank: rank 0 saves and evaluates
        return summary

    model_dir = save_model(trained.model, trained.tokenizer, run.artifacts / "model",
                           {"base": ref, "base_path": base_path, "base_run": base_run, "method": cfg.method},
                           project_dir=project.dir)
    summary["model_dir"] = str(model_dir)

    # The final evaluation: the unmerged trained model, the project's prompt, the whole eval split,
    # exactly as `llmcycle eval` would score it (prompts that do not fit are refused, not cut).
    model = trained.model
    model.eval()
    loaded = harness.LoadedModel(f"tune/{variant}", str(model_dir), model, trained.tokenizer,
                                 Generator(model, trained.tokenizer, trained.window), run.id)
    fitted = fit_prompts(template, final_examples, [], [[] for _ in final_examples],
                         harness.count_tokens(loaded), harness.generation_budget(loaded, ev.generation.max_new_tokens),
                         shot_format="", separator="", on_overflow="refuse", variant=f"tune.{variant}")
    # reference_perplexity scores logits position by position; a causal prompt-tuned model's logits
    # start with the virtual tokens, so its perplexity is not computed there.
    perplexity = ev.perplexity and not (cfg.method == "prompt_tuning" and trained.kind == "causal")
    metrics, rows = harness.evaluate(loaded, fitted.prompts, final_examples, project.config.project.task,
                                     ev.generation, perplexity=perplexity, progress=progress,
                                     label=f"eval tune.{variant}", lexicon=name_lexicon(project))
    harness.write_predictions(run, rows)
    summary = {**metrics, **summary}
    # training and evaluation of this variant (merging below loads another copy: not counted)
    summary["peak_memory_mb"] = round(peak_mb(trained.device), 1)
    if cfg.merge:
        # merged from the saved adapter onto a freshly loaded, unquantized base: the trained model is
        # left as it is, and a QLoRA adapter merges into full-precision weights rather than 4-bit ones
        merged, tok = load_trained(model_dir, dtype=opts.get("dtype", "auto"), device="cpu")
        summary["merged_dir"] = str(save_model(merged.merge_and_unload(), tok, run.artifacts / "merged"))
    summary["wall_s"] = round(time.perf_counter() - t_start, 3)
    run.finish(summary)
    return summary
