"""Knowledge distillation for `llmcycle optimize` (method: distill): a smaller student learns the teacher.

The student is the teacher's architecture with fewer layers (by default half, rounded up) or other
dimensions (`student:` in the variant; pretrain's presets work too), and must have fewer parameters
than the teacher. When the widths match it starts from the teacher's embeddings and evenly spaced
layers (first and last included), as DistilBERT did; otherwise from fresh weights.

It trains on the project's training split with the project's prompt (encoded exactly as fine-tuning
and inference encode it, llmcycle/training/batches.py), on the answer tokens only:

    loss = alpha * T^2 * KL(softmax(teacher / T) || softmax(student / T)) + (1 - alpha) * CE(student, target)

KL is the mean per answer token; T^2 keeps its gradient on the scale of the cross-entropy's as T grows
(Hinton et al., 2015). The target is the reference, or with `targets: teacher` the teacher's own greedy
output for the prompt (sequence-level distillation). The loop (`fit_steps`, also used by pruning's
recovery fine-tune) is a compact AdamW loop: no checkpoints, no data parallelism.
"""
from __future__ import annotations

import math
import re
import time
from pathlib import Path
from typing import Callable

from llmcycle.core.errors import UserError
from llmcycle.core.progress import bar, notice
from llmcycle.data.prompting import build_prompt
from llmcycle.models.folders import load_source, save_folder, source_facts
from llmcycle.models.generation import GenerationConfig, Generator, target_end_id
from llmcycle.models.hub import (
    auto_class,
    context_window,
    meta_model,
    model_kind,
    resolve_device,
)
from llmcycle.models.scratch import PRESETS
from llmcycle.training.batches import collate, encode_examples, length_grouped_batches
from llmcycle.training.checkpoints import lr_factor, training_bar
from llmcycle.training.loop import (
    answer_logits,  # the forward every training loss here shares (tune, DPO, this)
)

# model_type -> pretrain's architecture name (bart: warm-started encoder-decoders, llmcycle/models/warm_start.py)
ARCHITECTURES = {"t5": "t5", "mt5": "t5", "gpt2": "gpt", "bart": "bart"}
# a layer's weights: encoder.block.3.… (t5), transformer.h.3.… (gpt2), model.layers.3.…
LAYER_KEY = re.compile(r"^(?P<stack>(?:.*?\.)?(?:block|h|layers))\.(?P<index>\d+)\.(?P<rest>.*)$")


# ----------------------------------------------------------------------------------------- losses
def distill_loss(student_logits, teacher_logits, targets, temperature: float, alpha: float):
    """(loss, {"kl": ..., "ce": ...}) over the scored positions; see the module docstring."""
    import torch.nn.functional as F

    scored = targets != -100
    student, teacher = student_logits[scored].float(), teacher_logits[scored].float()
    kl = F.kl_div(F.log_softmax(student / temperature, dim=-1), F.log_softmax(teacher / temperature, dim=-1),
                  log_target=True, reduction="batchmean") * temperature ** 2
    ce = F.cross_entropy(student, targets[scored])
    return alpha * kl + (1 - alpha) * ce, {"kl": float(kl.detach()), "ce": float(ce.detach())}


def cross_entropy_loss(kind: str) -> Callable:
    """The plain fine-tuning loss (mean token cross-entropy on the answer), for fit_steps."""
    import torch.nn.functional as F

    def loss_fn(model, batch):
        logits, targets = answer_logits(model, batch, kind)
        loss = F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-100)
        return loss, {}

    return loss_fn


# ------------------------------------------------------------------------------------ the student
def _teacher_dims(config) -> dict:
    if ARCHITECTURES.get(config.model_type) == "t5":
        return {"d_model": config.d_model, "n_heads": config.num_heads, "d_ff": config.d_ff,
                "layers": (config.num_layers, config.num_decoder_layers or config.num_layers)}
    if ARCHITECTURES.get(config.model_type) == "bart":
        return {"d_model": config.d_model, "n_heads": config.encoder_attention_heads, "d_ff": config.encoder_ffn_dim,
                "layers": (config.encoder_layers, config.decoder_layers)}
    return {"d_model": config.n_embd, "n_heads": config.n_head, "d_ff": config.n_inner or 4 * config.n_embd,
            "layers": (config.n_layer,)}


def student_config(teacher_config, student):
    """The student's transformers config: the teacher's with the dimensions `student` (StudentConfig) asks."""
    import copy

    arch = ARCHITECTURES.get(teacher_config.model_type)
    if arch is None:
        raise UserError(f"optimize: distillation builds students for t5, bart and gpt2 models, not model type "
                        f"'{teacher_config.model_type}'")
    if arch == "bart" and student.preset:
        raise UserError("optimize: student.preset names t5 / gpt sizes; for a bart teacher set ratio, n_layers "
                        "or the dimensions")
    teacher = _teacher_dims(teacher_config)
    dims = dict(PRESETS[arch][student.preset]) if student.preset else \
        {k: teacher[k] for k in ("d_model", "n_heads", "d_ff")}
    for key in ("d_model", "n_heads", "d_ff"):
        if getattr(student, key) is not None:
            dims[key] = getattr(student, key)
    if student.n_layers is not None or student.preset:
        n = student.n_layers or dims["n_layers"]
        layers = tuple(n for _ in teacher["layers"])
    else:
        layers = tuple(max(1, math.ceil(n * student.ratio)) for n in teacher["layers"])
    width_changed = dims["d_model"] != teacher["d_model"] or dims["n_heads"] != teacher["n_heads"]
    config = copy.deepcopy(teacher_config)
    if arch == "t5":
        config.d_model, config.num_heads, config.d_ff = dims["d_model"], dims["n_heads"], dims["d_ff"]
        if width_changed:  # per-head size as in T5's presets; kept when the width is the teacher's
            config.d_kv = max(1, dims["d_model"] // dims["n_heads"])
        config.num_layers, config.num_decoder_layers = layers
        return config
    if arch == "bart":
        config.d_model, config.encoder_layers, config.decoder_layers = dims["d_model"], *layers
        config.encoder_attention_heads = config.decoder_attention_heads = dims["n_heads"]
        config.encoder_ffn_dim = config.decoder_ffn_dim = dims["d_ff"]
        return config
    if dims["d_model"] % dims["n_heads"]:
        raise UserError(f"optimize: student d_model {dims['d_model']} must be divisible by n_heads "
                        f"{dims['n_heads']} for gpt2")
    config.n_embd, config.n_head, config.n_layer = dims["d_model"], dims["n_heads"], layers[0]
    explicit_ff = student.d_ff is not None or student.preset
    config.n_inner = dims["d_ff"] if explicit_ff or not width_changed else None  # None: GPT-2's 4 x d_model
    return config


def layer_map(n_student: int, n_teacher: int) -> list[int]:
    """Evenly spaced teacher layers for the student's, first and last included."""
    if n_student == 1:
        return [0]
    return [round(i * (n_teacher - 1) / (n_student - 1)) for i in range(n_student)]


def _layer_counts(keys) -> dict[str, int]:
    counts: dict[str, int] = {}
    for key in keys:
        m = LAYER_KEY.match(key)
        if m:
            counts[m["stack"]] = max(counts.get(m["stack"], 0), int(m["index"]) + 1)
    return counts


def copy_teacher_layers(student, teacher) -> dict[str, list[int]] | None:
    """Load the teacher's embeddings, norms, head and evenly spaced layers into the student; the
    layer map per stack, or None (nothing loaded) when a shape differs."""
    t_state, s_state = teacher.state_dict(), student.state_dict()
    t_counts, s_counts = _layer_counts(t_state), _layer_counts(s_state)
    if set(s_counts) - set(t_counts):
        return None
    maps = {stack: layer_map(n, t_counts[stack]) for stack, n in s_counts.items()}
    new = {}
    for key, value in s_state.items():
        m = LAYER_KEY.match(key)
        source = f"{m['stack']}.{maps[m['stack']][int(m['index'])]}.{m['rest']}" if m else key
        if source not in t_state or t_state[source].shape != value.shape:
            return None
        new[key] = t_state[source]
    student.load_state_dict(new)
    return maps


def build_student(teacher, cfg):
    """(student model, how it was initialised); refuses a student that is not smaller."""
    import torch

    config = student_config(teacher.config, cfg.student)
    n_student = sum(p.numel() for p in meta_model(config).parameters())
    n_teacher = sum(p.numel() for p in teacher.parameters())
    if n_student >= n_teacher:
        raise UserError(f"optimize: the student ({n_student:,} parameters) is not smaller than the teacher "
                        f"({n_teacher:,}); lower student.n_layers, d_model, n_heads or d_ff")
    torch.manual_seed(cfg.seed)
    student = auto_class(config).from_config(config).to(device=teacher.device, dtype=torch.float32)
    init = "random"
    if cfg.init != "random":
        maps = copy_teacher_layers(student, teacher)
        if maps is None and cfg.init == "teacher":
            raise UserError("optimize: init: teacher needs the student's width (d_model, n_heads, d_ff) to be "
                            "the teacher's; set init: auto or random, or keep the width")
        if maps is not None:
            init = "teacher layers " + "; ".join(f"{stack}: {m}" for stack, m in maps.items())
    return student, init


# ------------------------------------------------------------------------------------ the training
def training_features(examples, template: str, model, tokenizer, kind: str, window: int, system: str | None = None):
    """tune's encoding of (prompt, first reference) pairs, targets ending as `model` stops; overlong
    examples skipped and counted."""

    encoded = encode_examples(examples, [build_prompt(template, ex, system=system) for ex in examples], tokenizer,
                              kind, window, end_id=target_end_id(model, tokenizer, kind)[0], on_overflow="skip")
    if not encoded.features:
        raise UserError(f"optimize: all {len(examples)} training examples are longer than the context window "
                        f"of {window} tokens; nothing is left to train on")
    if encoded.skipped:
        notice(f"optimize: skipped {len(encoded.skipped)} of {len(examples)} training examples longer than the "
               f"context window of {window} tokens (first: {encoded.skipped[0]})")
    return encoded


def fit_steps(model, features: list[dict], pad_id: int, loss_fn: Callable, *, steps: int, lr: float,
              batch_size: int, seed: int, log: Callable[[dict], None] | None = None, log_every: int = 10,
              progress: bool = True, label: str = "train") -> dict:
    """`steps` AdamW steps (linear decay, gradient clipping at 1) over length-grouped batches of
    `features`; loss_fn(model, batch) -> (loss, extra figures). Returns the loss history."""
    import torch

    device = next(model.parameters()).device
    torch.manual_seed(seed)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, 0, steps, "linear"))
    lengths = [len(f["input_ids"]) for f in features]
    epoch, batches, window, logged, first = 0, [], [], [], None
    t0 = time.perf_counter()
    model.train()
    with training_bar(progress) as bar:
        task = bar.add_task(label, total=steps, loss="-", tps="-")
        for step in range(1, steps + 1):
            if not batches:
                batches, epoch = length_grouped_batches(lengths, batch_size, seed, epoch), epoch + 1
            batch = {k: v.to(device) for k, v in collate([features[i] for i in batches.pop(0)], pad_id).items()}
            loss, parts = loss_fn(model, batch)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            lr_now = schedule.get_last_lr()[0]
            optimizer.step()
            schedule.step()
            optimizer.zero_grad(set_to_none=True)
            window.append({"loss": float(loss.detach()), **parts})
            first = window[0]["loss"] if first is None else first
            if step % log_every == 0 or step == steps:
                row = {k: sum(w[k] for w in window) / len(window) for k in window[0]}
                logged.append(row)
                if log is not None:
                    log({"step": step, "lr": lr_now, **row})
                bar.update(task, loss=f"{row['loss']:.4f}")
                window = []
            bar.update(task, completed=step)
    model.eval()
    final = logged[-1]
    return {"steps": steps, "first_loss": first, "final_loss": final["loss"],
            **{f"final_{k}": v for k, v in final.items() if k != "loss"},
            "loss_history": [round(r["loss"], 5) for r in logged],
            "train_wall_s": round(time.perf_counter() - t0, 3)}


def teacher_outputs(teacher, tokenizer, examples, template: str, gen_cfg, window: int | None, progress: bool,
                    system: str | None = None):
    """The examples with the teacher's greedy output for each prompt as their only target."""
    from dataclasses import replace

    greedy = GenerationConfig(max_new_tokens=gen_cfg.max_new_tokens, batch_size=gen_cfg.batch_size,
                              max_batch_tokens=gen_cfg.max_batch_tokens, stop=gen_cfg.stop)
    prompts = [build_prompt(template, ex, system=system) for ex in examples]
    with bar(len(prompts), "teacher outputs", enabled=progress) as advance:
        results = Generator(teacher, tokenizer, window).generate(prompts, greedy, progress=advance)
    return [replace(ex, targets=[r.text]) for ex, r in zip(examples, results)]


def optimize(cfg, source_path: str, dest: Path, train, template: str, *, info: dict, opts: dict, gen_cfg,
             task: str, log=None, progress: bool = True, system: str | None = None) -> dict:
    """Distill the source (teacher) into a student saved at dest; facts for the run's summary."""
    import torch

    device = resolve_device(opts.get("device", "auto"))
    teacher, tok, merged = load_source(source_path, dtype="float32", device=device,
                                       trust_remote_code=opts.get("trust_remote_code", False))
    for p in teacher.parameters():
        p.requires_grad_(False)
    kind = model_kind(teacher.config)
    window = context_window(teacher.config, tok, opts.get("context_window"))
    student, init = build_student(teacher, cfg)
    if cfg.targets == "teacher":
        train = teacher_outputs(teacher, tok, train, template, gen_cfg, opts.get("context_window"), progress, system)
    encoded = training_features(train, template, student, tok, kind, window, system)

    def loss_fn(model, batch):
        with torch.no_grad():
            teacher_logits, _ = answer_logits(teacher, batch, kind)
        logits, targets = answer_logits(model, batch, kind)
        return distill_loss(logits, teacher_logits, targets, cfg.temperature, cfg.alpha)

    stats = fit_steps(student, encoded.features, tok.pad_token_id, loss_fn, steps=cfg.max_steps, lr=cfg.lr,
                      batch_size=cfg.batch_size, seed=cfg.seed, log=log, log_every=cfg.log_every,
                      progress=progress, label="distill")
    dims = _teacher_dims(student.config)
    facts = {**source_facts(teacher, merged),
             "student": {"d_model": dims["d_model"], "n_heads": dims["n_heads"], "d_ff": dims["d_ff"],
                         "n_layers": list(dims["layers"])},
             "student_init": init, "targets": cfg.targets, "temperature": cfg.temperature, "alpha": cfg.alpha,
             "train_examples": len(encoded.features), "skipped_overlong": len(encoded.skipped), **stats}
    save_folder(student, tok, dest, {**info, "student_init": init})
    return facts
