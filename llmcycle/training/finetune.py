"""Fine-tuning settings and the model they train: the base loaded (optionally quantized) and wrapped
for full, LoRA or prompt tuning. Used by the tune stage, select's probe and align's policy."""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, field_validator, model_validator

from llmcycle.core.configbase import Section
from llmcycle.core.errors import UserError
from llmcycle.models import hub as models
from llmcycle.models.adapters import DEFAULT_LORA_TARGETS
from llmcycle.models.hub import ADAPTER_CONFIG, count_parameters
from llmcycle.models.load import load_model
from llmcycle.training.sharding import ParallelismConfig

log = logging.getLogger(__name__)
ALL_LINEAR = "all-linear"  # PEFT's shorthand: every Linear / Conv1D layer but the output head


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
        None, description="module names LoRA adapts (last name components, e.g. [q, v] or "
        "[encoder_attn.q_proj]), or all-linear: every Linear layer but the output head; default by model "
        "type: t5 q,v; gpt2 c_attn; llama/mistral/qwen2 q_proj,v_proj; ...")
    bits: Literal[4, 8] | None = Field(None, description="load the frozen base quantized: 4 = QLoRA (NF4), "
                                       "8 = int8; LoRA only, needs a CUDA GPU and bitsandbytes")
    num_virtual_tokens: int = Field(20, ge=1, description="prompt tuning: length of the learned soft prompt")
    lr: float = Field(1e-4, gt=0, description="peak learning rate (AdamW)")
    lr_schedule: Literal["linear", "cosine"] = Field("linear", description="decay after warmup, to 0 at the end")
    batch_size: Annotated[int, Field(ge=1)] | Literal["auto"] = Field(
        8, description="examples per micro-batch, over all processes together; auto: the largest that fits "
        "in memory (one process; measured on the longest examples before training, kept on resume)")
    max_memory_mb: float | None = Field(
        None, gt=0, description="batch_size auto: the memory a step may take above the model (default: the "
        "GPU's out-of-memory error; on a CPU 80% of the memory available)")
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
    loss_on: Literal["last_turn", "all_assistant"] = Field(
        "last_turn", description="conversations (data.format: messages): learn the last assistant turn only, "
        "or every assistant turn (a chat model: one sequence with each answer labelled; a model without a "
        "chat template: one example per answer)")
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
    attention: Literal["sdpa", "eager", "flash_attention_2"] | None = Field(
        None, description="the attention kernels to train with (default: the model's own, sdpa in transformers 5); "
        "flash_attention_2 (CUDA, pip install flash-attn) computes packed examples apart and turns packing on")
    packing: bool | None = Field(
        None, description="causal models: each micro-batch's examples in one row without padding (position "
        "ids mark where each starts), once a check on the first examples gives the padded loss; default: on "
        "where attention runs per sequence (flash_attention_2), off where it would span the whole row (sdpa, "
        "eager: slower than padding)")
    compile: bool = Field(
        False, description="run the training step's forward and loss through torch.compile (the same losses "
        "within 1e-3; off by default until measured on a GPU; on a CPU the first steps compile)")
    precision: Literal["auto", "float32", "bfloat16"] = Field(
        "auto", description="training arithmetic: auto = bf16 autocast on GPUs with bf16, float32 on CPUs; "
        "bfloat16 = bf16 autocast on a CPU too (about 1.5x faster steps on CPUs with native bf16)")
    parallelism: ParallelismConfig = Field(
        default_factory=ParallelismConfig, description="how torchrun's processes share training: ddp "
        "(whole model on each) or fsdp (sharded); see llmcycle/training/sharding.py")

    @field_validator("target_modules", mode="before")
    @classmethod
    def _all_linear_alone(cls, value):
        if value == ALL_LINEAR:  # PEFT's own spelling, a plain string; stored as a list like any other
            return [ALL_LINEAR]
        if isinstance(value, str):
            raise ValueError(f"expected a list of module names (e.g. [q, v]) or {ALL_LINEAR}, got '{value}'")
        if isinstance(value, list) and ALL_LINEAR in value and len(value) > 1:
            raise ValueError(f"{ALL_LINEAR} already names every Linear layer: give it alone, or list the "
                             "layers without it")
        return value

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


def _linear_layers(model) -> list[str]:
    """Full names of the Linear / Conv1D layers LoRA can adapt."""
    import torch
    from transformers.pytorch_utils import Conv1D

    return [n for n, m in model.named_modules() if isinstance(m, (torch.nn.Linear, Conv1D))]


def adaptable_modules(model) -> list[str]:
    """Short names (last components, unique, in model order) of the Linear / Conv1D layers LoRA can adapt."""
    return list(dict.fromkeys(n.rsplit(".", 1)[-1] for n in _linear_layers(model)))


def _matches(name: str, target: str) -> bool:
    """PEFT's rule for a list of targets: a module's full name, or a dotted suffix of it."""
    return name == target or name.endswith("." + target)


def lora_targets(cfg: TuneConfig, model, new_modules=()) -> list[str] | str:
    """cfg.target_modules, or the default for the model type: names of adaptable layers (last name
    components, as PEFT matches them), or PEFT's "all-linear" (the output head left out by PEFT).
    Targets inside a warm start's `new_modules` are dropped with a warning (see _pretrained_only)."""

    model_type = getattr(model.config, "model_type", None)
    targets = cfg.target_modules or DEFAULT_LORA_TARGETS.get(model_type)
    available = adaptable_modules(model)
    if not targets:
        raise UserError(f"tune: no default LoRA target modules for model type '{model_type}'; set "
                        f"target_modules (Linear/Conv1D layers of this model: {', '.join(available)})")
    if targets == [ALL_LINEAR]:
        return ALL_LINEAR
    targets = _pretrained_only(targets, model, new_modules)
    linear = _linear_layers(model)
    missing = [t for t in targets if not any(_matches(n, t) for n in linear)]
    if missing:
        raise UserError(f"tune: target_modules {missing} not found among the model's Linear/Conv1D layers: "
                        f"{', '.join(available)}")
    return list(targets)


def _pretrained_only(targets: list[str], model, new_modules) -> list[str]:
    """`targets` less those that name only layers a warm start added without pretrained weights (its
    cross-attention, random or copied from self-attention). Those train fully beside the adapters: a
    low-rank update of such a layer is the wrong tool, so a warning names them (rank 0 only)."""
    if not new_modules:
        return list(targets)
    names = [n for n, _ in model.named_modules() if n]
    added = lambda name: any(part in new_modules for part in name.split("."))  # noqa: E731

    dropped = [t for t in targets if any(_matches(n, t) for n in names)
               and all(added(n) for n in names if _matches(n, t))]
    kept = [t for t in targets if t not in dropped]
    if dropped and not kept:
        raise UserError(f"tune: target_modules {dropped} name only layers the warm start added without "
                        f"pretrained weights ({', '.join(new_modules)}), which train fully anyway; name "
                        "pretrained layers for LoRA (e.g. q_proj, v_proj) or use method full")
    if dropped and int(os.environ.get("RANK", "0")) == 0:
        log.warning("tune: target_modules %s name layers the warm start added without pretrained weights (%s); "
                    "they train fully instead of getting LoRA adapters (a low-rank update of a random or "
                    "copied layer is the wrong tool)", dropped, ", ".join(new_modules))
    return kept


def planned_targets(model, targets: list[str]) -> list[str]:
    """Last name components LoRA will adapt, with all-linear spelled out as PEFT does (every adaptable
    layer but the output head), for planning (scope) before anything is wrapped."""
    if ALL_LINEAR not in targets:
        return list(targets)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    heads = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if head is not None and m is head}
    return [n for n in adaptable_modules(model) if n not in heads]


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
    if (Path(path) / ADAPTER_CONFIG).is_file():
        model, tok = load_model(path, dtype="float32" if cfg.method == "full" else dtype, device=device)
        return with_attention(model.merge_and_unload(), cfg.attention), tok
    if cfg.bits is None:
        model, tok = load_model(path, dtype="float32" if cfg.method == "full" else dtype, device=device,
                                trust_remote_code=trust_remote_code)
        return with_attention(model, cfg.attention), tok
    return _load_quantized(path, cfg, trust_remote_code)


def with_attention(model, attention: str | None):
    """The model switched to `attention`'s kernels (transformers' set_attn_implementation), when asked."""
    if attention is None:
        return model
    try:
        model.set_attn_implementation(attention)
    except (ImportError, ValueError) as exc:
        hint = " (pip install flash-attn, on a CUDA GPU)" if attention == "flash_attention_2" else ""
        raise UserError(f"tune attention: {attention} cannot be used with this model{hint}: "
                        f"{str(exc).splitlines()[0]}") from None
    return model


def _load_quantized(path: str, cfg: TuneConfig, trust_remote_code: bool):
    """QLoRA's base: 4-bit NF4 (or 8-bit) weights on this process's GPU, prepared for adapter training."""
    import torch
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
    return with_attention(model, cfg.attention), models.load_tokenizer(path, trust_remote_code)


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
                              lora_dropout=cfg.dropout, target_modules=lora_targets(cfg, model, new_modules),
                              **new)
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

    total, trainable = count_parameters(model)
    return trainable, total
