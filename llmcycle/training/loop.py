"""The fine-tuning loop behind `llmcycle tune` (llmcycle/tune.py): written out, not hidden in a Trainer.

One optimizer step takes `grad_accum` consecutive micro-batches of `batch_size` examples from the
epoch's length-grouped order (a function of seed and epoch only, so --resume replays it exactly).
Under torchrun / accelerate launch every process takes its rows of each micro-batch (rows[rank::world]);
each process's summed token loss is divided by the token count of the whole step (known to every
process, which holds all features), so the all-reduced gradient is exactly that of the token-weighted
mean over the global batch: the result does not depend on the number of processes. The logged loss is
that same global mean (one all_reduce of the summed loss). Only rank 0 writes checkpoints and logs.

Checkpoints (pretrain's atomic step-N folders with a COMPLETE marker, the last two kept, plus best/)
hold the trainable weights (the adapter, or the whole model for full), optimizer, scheduler, RNG
states, the position in the data, the best validation score so far and the config and data hashes;
resuming with different training settings is refused with the differences listed.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from llmcycle.core.errors import UserError
from llmcycle.core.files import fsync_dir, fsync_tree, quiet_saves
from llmcycle.training.checkpoints import (
    COMPLETE_MARKER,
    check_same_run,
    config_hash,
    latest_checkpoint,
    load_trainer_state,
    lr_factor,
    read_state,
    restore_training_state,
    resumed_from,
    save_checkpoint,
    training_bar,
)

# Fields that do not change the trained weights: they may differ when resuming.
NOT_TRAINING_RELEVANT = {"checkpoint_every", "log_every", "merge"}
BEST = "best"


@dataclass
class Trained:
    model: object  # unwrapped (no DDP), in train mode
    tokenizer: object
    kind: str
    window: int  # prompt + answer tokens the model can take (minus virtual tokens for prompt tuning)
    device: object
    is_main: bool
    summary: dict


def answer_logits(model, batch: dict, kind: str):
    """(logits, targets) aligned position by position; targets are -100 where nothing is scored
    (padding, and the prompt for causal models). Shared by tuning, distillation and DPO."""
    labels = batch["labels"]
    if kind == "causal":
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        # prompt tuning puts the virtual tokens first: the text's logits are the last ones
        return logits[:, -labels.shape[1]:-1], labels[:, 1:]  # position t predicts t + 1
    # Decoder inputs are the labels shifted right behind the decoder prefix (the start token, and a forced
    # first token where the model has one: models.decoder_prefix); passing labels would make the model
    # compute a second, unused loss over the whole vocabulary (and skip a forced token).
    import torch

    from llmcycle.models.hub import decoder_prefix

    prefix = decoder_prefix(model if hasattr(model, "config") else model.module)
    pad = (getattr(model, "config", None) or model.module.config).pad_token_id
    decoder_inputs = torch.cat([labels.new_tensor(prefix).expand(len(labels), -1), labels[:, :-1]], dim=1)
    decoder_inputs = decoder_inputs.masked_fill(decoder_inputs == -100, pad)
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                   decoder_input_ids=decoder_inputs).logits
    return logits[:, len(prefix) - 1:], labels


def sum_loss(model, batch: dict, kind: str):
    """(summed token cross-entropy over the labels, number of scored tokens), in float32."""
    import torch.nn.functional as F

    logits, targets = answer_logits(model, batch, kind)
    loss = F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), targets.reshape(-1),
                           ignore_index=-100, reduction="sum")
    return loss, int((targets != -100).sum())


# Logits per chunk of the chunked loss: 2**23 floats (32 MiB) whatever the vocabulary.
HEAD_CHUNK_ELEMENTS = 2**23


def _head_cross_entropy(weight, bias, hidden, targets):
    import torch.nn.functional as F

    # F.linear, not head(...): the head's hooks (the release hook among them) fire once, on the
    # bypassed call, not once per chunk and again on recomputation
    return F.cross_entropy(F.linear(hidden, weight, bias).float(), targets, reduction="sum")


def sum_loss_chunked(model, batch: dict, kind: str, head):
    """sum_loss without ever holding the whole batch's logits: the model runs with its output head
    `head` bypassed (so it returns the hidden states the head would read, after any model-specific
    scaling), then the head and the cross-entropy run on the scored positions only, a chunk at a time,
    each chunk under activation checkpointing: backward recomputes a chunk's logits and frees them.

    Over a 32k vocabulary the logits, their log-softmax and their gradient are the largest tensors of a
    causal model's checkpointed step: for 8 x 512 tokens a GPT-2-shaped model's step took 1,540 MiB
    above its weights with the plain loss and 312 MiB chunked. Padding and, for causal models, prompt
    positions are never projected onto the vocabulary at all. The cost is one more head projection
    per scored token in backward. Written here because no library in our stack offers it on CPU
    (Liger's fused linear cross-entropy is a Triton GPU kernel)."""
    from torch.utils.checkpoint import checkpoint

    head.forward = _identity  # an instance attribute shadows the class's forward; hooks still run
    try:
        hidden, targets = answer_logits(model, batch, kind)
    finally:
        del head.forward
    scored = targets != -100
    hidden, targets = hidden[scored], targets[scored]
    step = max(1, HEAD_CHUNK_ELEMENTS // max(1, head.weight.shape[0]))
    total = hidden.sum().float() * 0.0  # keeps the graph connected when nothing is scored
    for i in range(0, targets.numel(), step):
        total = total + checkpoint(_head_cross_entropy, head.weight, getattr(head, "bias", None),
                                   hidden[i:i + step], targets[i:i + step], use_reentrant=False)
    return total, int(scored.sum())


def _identity(x, *args, **kwargs):
    return x


def chunkable_head(inner, model, batch: dict, kind: str):
    """The model's output head when sum_loss_chunked gives sum_loss's value on `batch` (checked once,
    without gradients, before training), else None. Models that transform the logits after the head
    (soft-capping, logit scaling) fail the check; heads that are not a plain nn.Linear, the lookup."""
    import torch

    head = inner.get_output_embeddings() if hasattr(inner, "get_output_embeddings") else None
    weight, bias = getattr(head, "weight", None), getattr(head, "bias", None)
    if (not isinstance(head, torch.nn.Linear) or not torch.is_tensor(weight) or weight.ndim != 2
            or (bias is not None and not torch.is_tensor(bias)) or "forward" in vars(head)):
        return None  # e.g. a LoRA-adapted head: its output is not F.linear(weight, bias)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            plain, _ = sum_loss(model, batch, kind)
            chunked, _ = sum_loss_chunked(model, batch, kind, head)
    except Exception:  # noqa: BLE001 - an unusual head: the plain loss is always right
        return None
    finally:
        model.train(was_training)
    return head if torch.allclose(plain, chunked, rtol=1e-4, atol=1e-3) else None


def scored_tokens(feature: dict, kind: str) -> int:
    labels = feature["labels"][1:] if kind == "causal" else feature["labels"]
    return sum(1 for t in labels if t != -100)


@contextlib.contextmanager
def rng_preserved():
    """Validation must not move the random streams training draws from (dropout, data), so a run that
    validates and resumes ends exactly where an uninterrupted one does."""
    import numpy as np
    import torch

    states = random.getstate(), np.random.get_state(), torch.get_rng_state()
    try:
        yield
    finally:
        random.setstate(states[0])
        np.random.set_state(states[1])
        torch.set_rng_state(states[2])


def save_best(root: Path, model, state: dict) -> Path:
    """checkpoints/best/, replaced atomically: the new folder is complete before it takes the name."""
    root.mkdir(parents=True, exist_ok=True)
    tmp, final, old = root / f".tmp-best-{os.getpid()}", root / BEST, root / ".old-best"
    shutil.rmtree(tmp, ignore_errors=True)
    with quiet_saves():
        model.save_pretrained(str(tmp / "model"))
    (tmp / "state.json").write_text(json.dumps(state, indent=2))
    (tmp / COMPLETE_MARKER).write_text(f"{state['step']}\n")
    fsync_tree(tmp)
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    fsync_dir(root)
    shutil.rmtree(old, ignore_errors=True)
    return final


def release_between_backward_phases(model, release: Callable[[], object]) -> list:
    """Hooks that call `release` (llmcycle.core.memory.release_free_memory) where a backward pass finishes
    one large phase and begins the next: when the gradient reaches the output head's input (the loss
    over the vocabulary and its gradient are done) and, for encoder-decoder models, the encoder's
    output (the whole decoder is done). Gradients are left untouched. Returns the hook handles."""
    import torch

    def call_release(_grad) -> None:
        release()  # returns None, so autograd keeps the gradient as it is

    def on_backward(t) -> None:
        if torch.is_tensor(t) and t.requires_grad:  # not under no_grad (validation, generation)
            t.register_hook(call_release)

    handles = []
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is not None:
        handles.append(head.register_forward_pre_hook(lambda _m, args: on_backward(args[0] if args else None)))
    if getattr(model.config, "is_encoder_decoder", False) and hasattr(model, "get_encoder"):
        handles.append(model.get_encoder().register_forward_hook(
            lambda _m, _args, out: on_backward(out[0] if isinstance(out, tuple) else getattr(out, "last_hidden_state", None))))
    return handles


def _load_weights(model, path: Path, method: str, cfg_dtype):
    """The checkpoint's trainable weights (the adapter's, or every weight for full) into `model`."""
    try:
        if method == "full":
            from llmcycle.models.hub import auto_class

            saved = auto_class(model.config).from_pretrained(str(path / "model"), dtype=cfg_dtype)
            # into the model as fit set it up (gradient checkpointing on, hooks), not a fresh one
            model.load_state_dict(saved.state_dict())
            return model
        from peft.utils import load_peft_weights, set_peft_model_state_dict

        result = set_peft_model_state_dict(model, load_peft_weights(str(path / "model")))
        if result.unexpected_keys:
            raise ValueError(f"unexpected adapter weights {result.unexpected_keys[:3]}")
        return model
    except Exception as exc:  # noqa: BLE001 - any load failure means the checkpoint is unusable
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise UserError(f"corrupt checkpoint {path}: {reason}") from None


def fit(cfg, base_path: str, train_examples, eval_examples, template: str, work_dir: Path, *,
        resume: bool = False, log: Callable[[dict], None] | None = None, progress: bool = True,
        task: str = "summarization", gen_cfg=None, dtype: str = "auto", device: str = "auto",
        context_window: int | None = None, trust_remote_code: bool = False, base_key: str | None = None,
        on_resume: Callable[[int], object] | None = None) -> Trained:
    """Fine-tune the model at `base_path` as `cfg` says; checkpoints go under work_dir/checkpoints.

    base_key names the base in checkpoints (default base_path; the stage passes a project-relative
    path, so a moved project resumes). on_resume(step) is called once a resume from the checkpoint of
    `step` is accepted (the run store drops metrics rows of the steps to be redone)."""
    import numpy as np
    import torch
    import torch.distributed as dist
    from accelerate import Accelerator

    from llmcycle.core.memory import large_blocks_off_the_heap, release_free_memory
    from llmcycle.data.prompting import build_prompt, encode_prompt
    from llmcycle.evaluation import harness
    from llmcycle.models.generation import GenerationConfig, Generator
    from llmcycle.models.hub import context_window as window_of
    from llmcycle.models.hub import model_kind
    from llmcycle.models.warm_start import facts_of as warm_start_facts
    from llmcycle.training.batches import (
        collate,
        encode_examples,
        length_grouped_batches,
        padded_tokens,
        useful_tokens,
    )
    from llmcycle.training.finetune import load_base, parameter_counts, wrap

    t_start = time.perf_counter()
    gen_cfg = gen_cfg or GenerationConfig()
    on_cpu = device == "cpu" or not torch.cuda.is_available()
    # bf16 autocast (float32 master weights for full fine-tuning) on GPUs that have bf16, and on a CPU when
    # asked (precision: bfloat16): a CPU with native bf16 (avx512_bf16, AMX) ran a step of the quickstart's
    # warm-started model in 0.81 s instead of 1.27 s; by default a CPU trains in exact float32
    precision = getattr(cfg, "precision", "auto")
    bf16 = precision == "bfloat16" or (precision == "auto" and not on_cpu and torch.cuda.is_bf16_supported())
    accel = Accelerator(cpu=on_cpu, mixed_precision="bf16" if bf16 else "no")
    rank, world, main = accel.process_index, accel.num_processes, accel.is_main_process
    if cfg.batch_size < world:
        raise UserError(f"tune: batch_size {cfg.batch_size} is smaller than the {world} processes sharing "
                        "each batch; raise batch_size")

    if on_cpu and cfg.gradient_checkpointing:
        # memory over speed, as checkpointing itself: activations in their own mappings, so freed
        # means returned (memory.py); each large tensor then costs fresh pages (steps at ~0.8x the
        # speed), so runs that did not ask to save memory keep glibc's default
        large_blocks_off_the_heap()
    model, tok = load_base(base_path, cfg, dtype=dtype, device="cpu", trust_remote_code=trust_remote_code)
    kind = model_kind(model.config)
    window = window_of(model.config, tok, context_window)
    # GPU batches padded to few distinct widths (see collate); a CPU gains nothing from extra padding.
    # Causal labels mirror the inputs position by position, so both take the same width.
    pad_multiple = (1, 1) if on_cpu else (64, 16) if kind == "seq2seq" else (64, 64)
    if cfg.method == "prompt_tuning":
        window -= cfg.num_virtual_tokens  # the soft prompt occupies positions too
    enc = encode_examples(train_examples, [build_prompt(template, ex) for ex in train_examples], tok, kind,
                          window, on_overflow=cfg.on_overflow)
    features = enc.features
    if not features:
        raise UserError(f"tune: all {len(train_examples)} training examples are longer than the context "
                        f"window of {window} tokens and were skipped; nothing is left to train on")
    # The validation sample: the first eval_samples eval examples that fit for scoring and generating.
    room = gen_cfg.max_new_tokens if kind == "causal" else 0
    sample = eval_examples[:cfg.eval_samples]
    val_prompts_all = [build_prompt(template, ex) for ex in sample]
    val = encode_examples(sample, val_prompts_all, tok, kind, window, on_overflow="skip").features
    val = [f for f in val if len(encode_prompt(tok, val_prompts_all[f["index"]], kind)) + room <= window]
    if cfg.eval_every and not val:
        raise UserError(f"tune: none of the first {len(sample)} eval examples fits the context window of "
                        f"{window} tokens with room to generate {room}; validation has nothing to score")
    data_hash = config_hash([[f["input_ids"], f["labels"]] for f in features + val])
    relevant = {k: v for k, v in cfg.model_dump().items() if k not in NOT_TRAINING_RELEVANT}

    ckpt_root = Path(work_dir) / "checkpoints"
    ckpt = latest_checkpoint(ckpt_root) if resume else None
    state: dict = {}
    base_key = base_key or base_path
    if ckpt is not None:
        state = read_state(ckpt)
        # checkpoints written before bases were named relative to the project hold the absolute path
        check_same_run(ckpt, state, relevant, data_hash,
                       extra={"base": base_path if state.get("base") == base_path else base_key})
        if main and on_resume is not None:
            on_resume(state["step"])
    elif main:
        shutil.rmtree(ckpt_root, ignore_errors=True)  # a fresh run must not mix with older checkpoints
    if main and ckpt_root.is_dir():
        for stale in ckpt_root.glob(".tmp-*"):  # saves cut short by a crash
            shutil.rmtree(stale, ignore_errors=True)
        if not (ckpt_root / BEST).exists() and (ckpt_root / ".old-best").exists():
            os.replace(ckpt_root / ".old-best", ckpt_root / BEST)  # a crash between save_best's renames
    accel.wait_for_everyone()

    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)  # before wrapping: LoRA A and the soft prompt are drawn from it
    if cfg.gradient_checkpointing:
        model.config.use_cache = False  # the cache is for generation; checkpointing recomputes instead
        # transformers renamed gradient_ to activation_checkpointing_enable (5.2x); accept either
        enable = getattr(model, "activation_checkpointing_enable", None)
        if enable is not None:
            enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if cfg.method != "full":
            model.enable_input_require_grads()  # frozen embeddings: give checkpointed blocks a grad path
    warm = warm_start_facts(base_path) or {}
    model = wrap(cfg, model, kind, new_modules=warm.get("new_modules", []),
                 new_tokens=[tok.convert_tokens_to_ids(t) for t in warm.get("added_tokens", [])])
    if ckpt is not None:
        model = _load_weights(model, ckpt, cfg.method, torch.float32)
    # see `trim` below; removed before returning, so the trained model carries no hooks
    release_hooks = release_between_backward_phases(model, release_free_memory) if on_cpu else []
    if cfg.method == "prompt_tuning":  # peft accepts some models it cannot run; find out now
        try:
            model.eval()
            with torch.no_grad():
                sum_loss(model, collate(features[:1], tok.pad_token_id), kind)
        except Exception as exc:  # noqa: BLE001
            raise UserError(f"tune: prompt tuning does not work with model type "
                            f"'{getattr(model.config, 'model_type', '?')}': {str(exc).splitlines()[0]}") from None
    model.train()
    trainable, total = parameter_counts(model)

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(
        [{"params": [p for p in params if p.ndim >= 2], "weight_decay": cfg.weight_decay},
         {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}], lr=cfg.lr)
    n_batches = len(length_grouped_batches([len(f["input_ids"]) for f in features], cfg.batch_size, cfg.seed, 0))
    steps_per_epoch = math.ceil(n_batches / cfg.grad_accum)
    total_steps = math.ceil(cfg.epochs * steps_per_epoch) if cfg.epochs else cfg.max_steps
    total_steps = max(1, min(total_steps, cfg.max_steps or total_steps))
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, cfg.warmup_steps, total_steps, cfg.lr_schedule))
    model, optimizer = accel.prepare(model, optimizer)
    if ckpt is not None:
        restore_training_state(load_trainer_state(ckpt), optimizer, scheduler)
    inner = accel.unwrap_model(model)
    # On CPU, activations come from malloc, whose heap keeps freed memory resident (llmcycle/memory.py):
    # hand it back where one phase's temporaries are dead (loading, a forward pass, the loss and the
    # decoder inside backward via the hooks above, a validation) so the next phase does not pile its
    # own beside them. Not after the optimizer step: the next forward reuses that memory as it is, and
    # handing it back would only make it fault in again. Peak RSS of a LoRA step drops by hundreds of
    # MB; the computation is untouched. Not on GPUs, whose activations are not on this heap.
    trim = release_free_memory if on_cpu else (lambda: None)
    # With gradient checkpointing the vocabulary logits are recomputed too, a chunk at a time
    # (sum_loss_chunked), once a check on the first examples shows it gives the same loss.
    head = None
    if cfg.gradient_checkpointing:
        probe = {k: v.to(accel.device) for k, v in collate(features[:2], tok.pad_token_id, pad_multiple).items()}
        with rng_preserved(), accel.autocast():
            head = chunkable_head(inner, model, probe, kind)
        del probe
    trim()

    def validate() -> dict:
        """Token-weighted loss and the task's headline metric (through the harness) on the sample."""
        inner.eval()
        with rng_preserved(), torch.no_grad():
            nll, n = 0.0, 0
            for i in range(0, len(val), cfg.batch_size):
                batch = {k: v.to(accel.device)
                         for k, v in collate(val[i:i + cfg.batch_size], tok.pad_token_id, pad_multiple).items()}
                s, c = sum_loss(inner, batch, kind)
                nll, n = nll + float(s), n + c
            loaded = harness.LoadedModel("validation", base_path, inner, tok, Generator(inner, tok, window))
            summary, _ = harness.evaluate(loaded, [val_prompts_all[f["index"]] for f in val],
                                          [sample[f["index"]] for f in val], task, gen_cfg,
                                          perplexity=False, progress=False)
        inner.train()
        trim()  # scoring's and generation's temporaries
        return {"val_loss": nll / max(n, 1), "headline": summary["headline"],
                "headline_value": summary["headline_value"]}

    step, epoch, position = state.get("step", 0), state.get("epoch", 0), state.get("position", 0)
    best, best_step, bad = state.get("best"), state.get("best_step"), state.get("bad_evals", 0)
    stopped_early = state.get("stopped_early", False)
    window_losses: list[float] = list(state.get("loss_window", []))
    last_loss = state.get("last_loss")
    # tokens, step time and wall time of the steps before the checkpoint resumed from: the summary's
    # rates and times cover the whole run, not only this process's share of it
    done = {"tokens": 0, "useful_tokens": 0, "step_time": 0.0, "wall_s": 0.0, **state.get("done", {})}
    sess_tokens = sess_useful = 0
    step_time = 0.0
    win_tokens, win_time = 0, 0.0

    def so_far() -> dict:
        return {"tokens": done["tokens"] + sess_tokens, "useful_tokens": done["useful_tokens"] + sess_useful,
                "step_time": done["step_time"] + step_time,
                "wall_s": done["wall_s"] + time.perf_counter() - t_start}

    def checkpoint_state() -> dict:
        return {"step": step, "epoch": epoch, "position": position, "config": relevant, "base": base_key,
                "config_hash": config_hash(relevant), "data_hash": data_hash, "best": best, "best_step": best_step,
                "bad_evals": bad, "stopped_early": stopped_early, "loss_window": window_losses,
                "last_loss": last_loss, "total_steps": total_steps, "done": so_far(), "time": time.time()}

    with training_bar(progress and main) as bar:
        task_id = bar.add_task(f"tune {cfg.method}", total=total_steps, completed=step, loss="-", tps="-")
        order_epoch, batches = None, []
        while step < total_steps and not stopped_early:
            if order_epoch != epoch:
                lengths = [len(f["input_ids"]) for f in features]
                order_epoch = epoch
                batches = length_grouped_batches(lengths, cfg.batch_size, cfg.seed, epoch, cfg.group_by_length)
            t0 = time.perf_counter()
            micro = batches[position:position + cfg.grad_accum]
            n_scored = sum(scored_tokens(features[i], kind) for b in micro for i in b)  # the whole step's
            local = torch.zeros(2, dtype=torch.float64)  # summed loss, padded tokens: this process's share
            for j, rows in enumerate(micro):
                mine, weight = rows[rank::world], 1.0
                if not mine:  # a short last batch: join the gradient all-reduce with a zero-weight row
                    mine, weight = rows[:1], 0.0
                batch = {k: v.to(accel.device) for k, v in collate([features[i] for i in mine], tok.pad_token_id,
                                                                 pad_multiple).items()}
                sync = accel.no_sync(model) if j < len(micro) - 1 else contextlib.nullcontext()
                with sync:
                    if head is not None:
                        with accel.autocast():
                            s, _ = sum_loss_chunked(model, batch, kind, head)
                    else:
                        s, _ = sum_loss(model, batch, kind)
                    trim()  # the forward's temporaries are freed; what backward needs is saved
                    # DDP averages gradients over processes; times world, the sum over them remains
                    accel.backward(s * (weight * world / max(n_scored, 1)))
                local += torch.tensor([float(s.detach()) * weight, padded_tokens(batch, kind) * weight], dtype=torch.float64)
            if world > 1:
                dist.all_reduce(local)
            if cfg.grad_clip > 0:
                accel.clip_grad_norm_(params, cfg.grad_clip)
            lr = scheduler.get_last_lr()[0]
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            dt = time.perf_counter() - t0
            useful = useful_tokens([features[i] for b in micro for i in b], kind)
            step, position = step + 1, position + len(micro)
            if position >= n_batches:  # the saved position is where the *next* step starts
                epoch, position = epoch + 1, 0
            sess_tokens, sess_useful, step_time = sess_tokens + int(local[1]), sess_useful + useful, step_time + dt
            win_tokens, win_time = win_tokens + int(local[1]), win_time + dt
            window_losses.append(float(local[0]) / max(n_scored, 1))
            if step % cfg.log_every == 0 or step == total_steps:
                last_loss = sum(window_losses) / len(window_losses)
                bar.update(task_id, loss=f"{last_loss:.4f}", tps=f"{win_tokens / win_time:,.0f}")
                if main and log is not None:
                    log({"step": step, "epoch": round(epoch + position / n_batches, 4), "loss": last_loss,
                         "lr": lr, "tokens_per_s": win_tokens / win_time})
                window_losses, win_tokens, win_time = [], 0, 0.0
            if cfg.eval_every and step % cfg.eval_every == 0:
                result = [validate() if main else None]
                if world > 1:  # every process must agree on early stopping
                    dist.broadcast_object_list(result, src=0)
                result = result[0]
                if best is None or result["headline_value"] > best:
                    best, best_step, bad = result["headline_value"], step, 0
                    if main:
                        save_best(ckpt_root, inner, checkpoint_state())
                else:
                    bad += 1
                stopped_early = bool(cfg.early_stopping_patience and bad >= cfg.early_stopping_patience)
                if main and log is not None:
                    log({"step": step, "val_loss": result["val_loss"], "headline": result["headline"],
                         result["headline"]: result["headline_value"]})
            bar.update(task_id, completed=step)
            if main and (step % cfg.checkpoint_every == 0 or step == total_steps or stopped_early):
                if window_losses:  # the loss of steps since the last log line
                    last_loss = sum(window_losses) / len(window_losses)
                save_checkpoint(ckpt_root, step, inner, optimizer, scheduler, checkpoint_state())
    accel.wait_for_everyone()
    for handle in release_hooks:
        handle.remove()
    if window_losses:
        last_loss = sum(window_losses) / len(window_losses)
    whole_run = so_far()
    summary = {
        "trainable_params": trainable, "total_params": total, "trainable_pct": 100.0 * trainable / total,
        "train_examples": len(features), "skipped_overlong": len(enc.skipped), "skipped": enc.skipped[:10],
        "steps": step, "total_steps": total_steps, "epochs_done": round(step / steps_per_epoch, 4),
        "final_train_loss": last_loss, "best_step": best_step, "best_headline": best,
        "stopped_early": stopped_early, "stopped_at": step if stopped_early else None,
        "train_wall_s": round(whole_run["wall_s"], 3),
        "tokens_per_s": whole_run["tokens"] / whole_run["step_time"] if whole_run["step_time"] else None,
        "useful_tokens_per_s": (whole_run["useful_tokens"] / whole_run["step_time"]
                                if whole_run["step_time"] else None),
        "world_size": world, "resumed_from": resumed_from(ckpt, state),
        "chunked_loss": head is not None,  # the vocabulary logits recomputed chunk by chunk
    }
    return Trained(inner, tok, kind, window, accel.device, main, summary)
