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
from dataclasses import dataclass, field
from pathlib import Path
from datetime import timedelta
from typing import Callable

from llmcycle.core import ranks
from llmcycle.core.errors import UserError
from llmcycle.core.files import fsync_dir, fsync_tree, quiet_saves
from llmcycle.core import memory  # called through the module: tests replace its functions
from llmcycle.core.progress import notice
from llmcycle.data.prompting import build_prompt, encode_prompt, uses_chat_template
from llmcycle.data.records import assistant_turns
from llmcycle.evaluation import harness
from llmcycle.models.generation import GenerationConfig, Generator, target_end_id
from llmcycle.models.hub import auto_class, decoder_prefix, model_kind
from llmcycle.models.hub import context_window as window_of
from llmcycle.models.warm_start import facts_of as warm_start_facts
from llmcycle.training.batches import (
    collate,
    encode_examples,
    length_grouped_batches,
    pack,
    padded_size,
    useful_tokens,
)
from llmcycle.training.checkpoints import (
    COMPLETE_MARKER,
    check_same_run,
    config_hash,
    is_sharded,
    latest_checkpoint,
    load_trainer_state,
    lr_factor,
    read_state,
    restore_training_state,
    resumed_from,
    save_checkpoint,
    save_sharded_checkpoint,
    training_bar,
)
from llmcycle.training.finetune import load_base, parameter_counts, wrap
from llmcycle.training import batch_finder, sharding
from llmcycle.training.packing import packing_supported
from llmcycle.training.prefetch import Prefetcher

AUTO_CEILING = 512  # batch_size auto never tries more examples per micro-batch than this
# Fields that do not change the trained weights: they may differ when resuming.
# How processes share the work (parallelism) does not either: a sharded checkpoint resumes unsharded and
# the other way round, on any number of processes.
NOT_TRAINING_RELEVANT = {"checkpoint_every", "log_every", "merge", "parallelism"}
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
        # a packed batch (batches.pack) has position_ids and no attention_mask; transformers keeps its
        # examples apart only with the cache off (a cache, made by default, skips that detection)
        extra = {"position_ids": batch["position_ids"]} if "position_ids" in batch else {}
        logits = model(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"), use_cache=False,
                       **extra).logits
        # prompt tuning puts the virtual tokens first: the text's logits are the last ones
        return logits[:, -labels.shape[1]:-1], labels[:, 1:]  # position t predicts t + 1
    # Decoder inputs are the labels shifted right behind the decoder prefix (the start token, and a forced
    # first token where the model has one: models.decoder_prefix); passing labels would make the model
    # compute a second, unused loss over the whole vocabulary (and skip a forced token).
    import torch

    prefix = decoder_prefix(model if hasattr(model, "config") else model.module)
    pad = (getattr(model, "config", None) or model.module.config).pad_token_id
    decoder_inputs = torch.cat([labels.new_tensor(prefix).expand(len(labels), -1), labels[:, :-1]], dim=1)
    decoder_inputs = decoder_inputs.masked_fill(decoder_inputs == -100, pad)
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                   decoder_input_ids=decoder_inputs).logits
    return logits[:, len(prefix) - 1:], labels


def sum_loss(model, batch: dict, kind: str, count: bool = True):
    """(summed token cross-entropy over the labels, number of scored tokens), in float32. The training
    step passes count=False (the count is None): reading it would make the host wait for the device."""
    import torch.nn.functional as F

    logits, targets = answer_logits(model, batch, kind)
    loss = F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), targets.reshape(-1),
                           ignore_index=-100, reduction="sum")
    return loss, int((targets != -100).sum()) if count else None


# Logits per chunk of the chunked loss: 2**23 floats (32 MiB) whatever the vocabulary.
HEAD_CHUNK_ELEMENTS = 2**23


def _head_cross_entropy(weight, bias, hidden, targets):
    import torch.nn.functional as F

    # F.linear, not head(...): the head's hooks (the release hook among them) fire once, on the
    # bypassed call, not once per chunk and again on recomputation
    return F.cross_entropy(F.linear(hidden, weight, bias).float(), targets, reduction="sum")


def sum_loss_chunked(model, batch: dict, kind: str, head, count: bool = True):
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
    return total, int(scored.sum()) if count else None


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


# Handing freed heap memory back to the system (malloc_trim) costs about 0.25 ms a call, twice or three
# times a step: worth it when a step's activations pile up hundreds of MB, not for a small model whose
# whole step lives in a few MB (there it was a twentieth of a step's time)
RELEASE_MIN_ACTIVATION_MB = 32.0


def worth_releasing(config, kind: str, features: list[dict], batch_size: int) -> bool:
    """Whether the largest micro-batch's activations (a rough count: 16 floats per token, hidden unit
    and layer, plus the logits and their gradient) reach RELEASE_MIN_ACTIVATION_MB."""
    parts = [getattr(config, "encoder", None), getattr(config, "decoder", None)]
    parts = [p for p in parts if p is not None] or [config]
    def first(p, *names) -> int:  # the size under whichever name this model family uses
        return next((getattr(p, n) for n in names if getattr(p, n, None)), 0)

    width = sum(first(p, "hidden_size", "d_model", "n_embd") for p in parts) // len(parts)
    layers = sum(first(p, "num_hidden_layers", "n_layer", "num_layers") + first(p, "num_decoder_layers")
                 for p in parts)
    vocab = max(getattr(p, "vocab_size", 0) or 0 for p in parts)
    longest = max(len(f["input_ids"]) + (len(f["labels"]) if kind == "seq2seq" else 0) for f in features)
    floats = longest * batch_size * (16 * width * max(layers, 1) + 3 * vocab)
    return floats * 4 / 2**20 >= RELEASE_MIN_ACTIVATION_MB


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


@dataclass
class TuneData:
    """The encoded training examples and the validation sample fit trains and validates on."""
    features: list[dict]
    skipped: list  # training examples longer than the context window (encode_examples)
    sample: list  # the first eval_samples eval examples
    sample_prompts: list[str]  # their prompts, position by position
    val: list[dict]  # the sample's features that fit the window with room to generate
    data_hash: str
    end_why: str = ""  # which token targets end with, and why (models.generation.target_end_id)
    records: int = 0  # training examples before overlong ones were skipped
    # per feature, counted once rather than at every step: tokens the loss scores, tokens carrying data
    scored: list[int] = field(default_factory=list)
    useful: list[int] = field(default_factory=list)


@dataclass
class TuneRun:
    """What fit sets up before its first step and keeps unchanged to the end."""
    cfg: object
    accel: object
    model: object  # as accel.prepare returned it: DDP-wrapped under torchrun / accelerate launch
    inner: object  # the unwrapped model, for validation and checkpoints
    tok: object
    kind: str
    window: int
    pad_multiple: tuple[int, int]
    data: TuneData
    params: list
    optimizer: object
    scheduler: object
    n_batches: int  # micro-batches per epoch
    steps_per_epoch: int
    total_steps: int
    head: object | None  # the output head when the loss is computed chunk by chunk (sum_loss_chunked)
    trim: Callable[[], object]
    release_hooks: list
    trainable_params: int
    total_params: int
    base_path: str
    base_key: str
    relevant: dict  # the config fields that shape the weights
    ckpt_root: Path
    ckpt: Path | None  # the checkpoint resumed from
    saved: dict  # its state.json ({} for a fresh run)
    task: str
    gen_cfg: object
    loss: Callable  # batch -> summed loss (sum_loss, chunked or compiled: step_loss)
    compiled: bool = False
    packed: bool = False  # micro-batches packed into one row (batches.pack) instead of padded
    auto_batch: dict | None = None  # batch_size auto: the size found and how (auto_batch_size)
    rebuild: Callable | None = None  # a fresh unsharded copy of the model to train (weights not loaded)
    held: dict | None = None  # bytes of parameters, gradients and optimizer state this rank holds (1st step)

    @property
    def sharded(self) -> bool:
        """Parameters, gradients and optimizer state split across the processes (FSDP2)."""
        return sharding.sharded(self.cfg)

    @property
    def torch_optimizer(self):
        return getattr(self.optimizer, "optimizer", self.optimizer)  # inside accelerate's wrapper

    @property
    def rank(self) -> int:
        return self.accel.process_index

    @property
    def world(self) -> int:
        return self.accel.num_processes

    @property
    def main(self) -> bool:
        return self.accel.is_main_process

    @property
    def direct(self) -> bool:
        """Whether backward, clipping and the optimizer step may skip accelerate's wrappers: no loss
        scaler (fp16) and no DeepSpeed, FSDP or XLA to route through; the wrappers then only add host
        work (accelerate checks which packages are installed on every backward)."""
        kind = str(self.accel.distributed_type).rsplit(".", 1)[-1]
        return self.accel.scaler is None and kind in ("NO", "MULTI_CPU", "MULTI_GPU")


@dataclass
class TrainState:
    """Where a tuning run stands. The fields from step to last_loss, and `done` brought up to date
    (so_far), are saved in each checkpoint (checkpoint_state) and read back on resume; the counters
    after `done` cover this process's session only."""
    started: float  # time.perf_counter() when fit was called
    step: int = 0
    epoch: int = 0
    position: int = 0  # the micro-batch of the epoch's order where the next step starts
    best: float | None = None
    best_step: int | None = None
    bad_evals: int = 0
    stopped_early: bool = False
    loss_window: list[float] = field(default_factory=list)  # step losses since the last log line
    last_loss: float | None = None
    # tokens, step time and wall time of the steps before the checkpoint resumed from: the summary's
    # rates and times cover the whole run, not only this process's share of it
    done: dict = field(default_factory=dict)
    session_tokens: int = 0
    session_useful: int = 0
    step_time: float = 0.0
    window_tokens: int = 0  # since the last log line
    window_time: float = 0.0
    # Training time is measured per window (close_window) rather than per step: timing a step would need
    # the device to finish it, a host-device synchronisation every step; validation and checkpoint
    # writing inside a window are `paused` out of it.
    window_started: float = 0.0
    paused: float = 0.0
    peak_mb: float = 0.0  # the highest per-window peak memory of this session (report_losses)

    @classmethod
    def resumed(cls, saved: dict, started: float) -> TrainState:
        """The state a checkpoint's state.json records; a fresh run's for {}."""
        return cls(started, step=saved.get("step", 0), epoch=saved.get("epoch", 0),
                   position=saved.get("position", 0), best=saved.get("best"), best_step=saved.get("best_step"),
                   bad_evals=saved.get("bad_evals", 0), stopped_early=saved.get("stopped_early", False),
                   loss_window=list(saved.get("loss_window", [])), last_loss=saved.get("last_loss"),
                   done={"tokens": 0, "useful_tokens": 0, "step_time": 0.0, "wall_s": 0.0, **saved.get("done", {})})

    def so_far(self) -> dict:
        """Tokens, step time and wall time of the whole run up to now, resumed parts included."""
        return {"tokens": self.done["tokens"] + self.session_tokens,
                "useful_tokens": self.done["useful_tokens"] + self.session_useful,
                "step_time": self.done["step_time"] + self.step_time,
                "wall_s": self.done["wall_s"] + time.perf_counter() - self.started}

    def settle_last_loss(self) -> None:
        """last_loss becomes the mean loss of the steps since the last log line, if there were any (the
        window's device tensors read as floats here, in one copy)."""
        if self.loss_window:
            self.loss_window = as_floats(self.loss_window)
            self.last_loss = sum(self.loss_window) / len(self.loss_window)

    def record_step(self, micro_batches: int, n_batches: int, tokens: int, useful: int, loss) -> None:
        """`loss`: the step's mean token loss, a 0-dim tensor still on the device (or a float)."""
        self.step, self.position = self.step + 1, self.position + micro_batches
        if self.position >= n_batches:  # the saved position is where the *next* step starts
            self.epoch, self.position = self.epoch + 1, 0
        self.session_tokens, self.session_useful = self.session_tokens + tokens, self.session_useful + useful
        self.window_tokens += tokens
        self.loss_window.append(loss)

    def close_window(self, device) -> None:
        """Add the training time since the window opened to step_time and window_time, once the device
        has finished the work queued so far (a GPU runs behind the host that issues its kernels)."""
        synchronize(device)
        now = time.perf_counter()
        seconds = max(now - self.window_started - self.paused, 0.0)
        self.step_time, self.window_time = self.step_time + seconds, self.window_time + seconds
        self.window_started, self.paused = now, 0.0


def as_floats(values: list) -> list[float]:
    """Losses as floats: the device tensors among them copied to the host together (one synchronisation)."""
    import torch

    tensors = [v for v in values if torch.is_tensor(v)]
    if not tensors:
        return [float(v) for v in values]
    copied = iter(torch.stack([t.detach().double() for t in tensors]).cpu().tolist())
    return [next(copied) if torch.is_tensor(v) else float(v) for v in values]


def synchronize(device) -> None:
    """Wait for the device's queued work (a no-op on a CPU, whose work is done when its call returns)."""
    import torch

    if getattr(device, "type", str(device)) == "cuda":
        torch.cuda.synchronize(device)


def checkpoint_state(run: TuneRun, state: TrainState) -> dict:
    """A checkpoint's state.json: what resuming reads back and checks against."""
    return {"step": state.step, "epoch": state.epoch, "position": state.position, "config": run.relevant,
            "base": run.base_key, "config_hash": config_hash(run.relevant), "data_hash": run.data.data_hash,
            "best": state.best, "best_step": state.best_step, "bad_evals": state.bad_evals,
            "stopped_early": state.stopped_early, "loss_window": as_floats(state.loss_window),
            "last_loss": state.last_loss,
            "total_steps": run.total_steps, "done": state.so_far(), "time": time.time(),
            "batch_size": run.cfg.batch_size}


def fit(cfg, base_path: str, train_examples, eval_examples, template: str, work_dir: Path, *,
        resume: bool = False, log: Callable[[dict], None] | None = None, progress: bool = True,
        task: str = "summarization", gen_cfg=None, dtype: str = "auto", device: str = "auto",
        context_window: int | None = None, trust_remote_code: bool = False, base_key: str | None = None,
        on_resume: Callable[[int], object] | None = None, system: str | None = None) -> Trained:
    """Fine-tune the model at `base_path` as `cfg` says; checkpoints go under work_dir/checkpoints.

    base_key names the base in checkpoints (default base_path; the stage passes a project-relative
    path, so a moved project resumes). on_resume(step) is called once a resume from the checkpoint of
    `step` is accepted (the run store drops metrics rows of the steps to be redone)."""

    started = time.perf_counter()
    run = prepare_run(cfg, base_path, train_examples, eval_examples, template, Path(work_dir) / "checkpoints",
                      system=system, resume=resume, task=task, gen_cfg=gen_cfg or GenerationConfig(), dtype=dtype,
                      device=device, context_window=context_window, trust_remote_code=trust_remote_code,
                      base_key=base_key or base_path, on_resume=on_resume)
    state = TrainState.resumed(run.saved, started)
    cfg = run.cfg  # batch_size auto resolved to a number
    feeder = None
    with training_bar(progress and run.main) as bar, contextlib.ExitStack() as open_feeders:
        bar_task = bar.add_task(f"tune {cfg.method}", total=run.total_steps, completed=state.step, loss="-", tps="-")
        order_epoch, batches = None, []
        state.window_started = time.perf_counter()
        while state.step < run.total_steps and not state.stopped_early:
            if order_epoch != state.epoch:
                lengths = [len(f["input_ids"]) for f in run.data.features]
                order_epoch = state.epoch
                batches = length_grouped_batches(lengths, cfg.batch_size, cfg.seed, state.epoch, cfg.group_by_length)
                if feeder is not None:
                    feeder.close()
                feeder = open_feeders.enter_context(micro_batches(run, batches[state.position:]))
            with ranks.peers_watched(f"tune step {state.step + 1}"):
                lr = optimizer_step(run, state, batches[state.position:state.position + cfg.grad_accum], feeder)
                after_step(run, state, lr, log, bar, bar_task)
        state.close_window(run.accel.device)
    run.accel.wait_for_everyone()
    for handle in run.release_hooks:
        handle.remove()
    state.settle_last_loss()
    summary = run_summary(run, state)
    # a sharded model is gathered whole on every rank: the final evaluation splits its work between them
    model = unsharded_copy(run) if run.sharded else run.inner
    model.train()
    return Trained(model, run.tok, run.kind, run.window, run.accel.device, run.main, summary)


def after_step(run: TuneRun, state: TrainState, lr: float, log, bar, bar_task) -> None:
    """Log, validate and checkpoint when their step comes; validating and saving are not training time."""
    cfg = run.cfg
    if state.step % cfg.log_every == 0 or state.step == run.total_steps:
        report_losses(run, state, lr, log, bar, bar_task)
    if cfg.eval_every and state.step % cfg.eval_every == 0:
        started = time.perf_counter()
        validate_and_track_best(run, state, log)
        state.paused += time.perf_counter() - started
    bar.update(bar_task, completed=state.step)
    # every rank writes its shards of a sharded checkpoint; otherwise rank 0 writes the whole one
    if (run.main or run.sharded) and (state.step % cfg.checkpoint_every == 0 or state.step == run.total_steps
                                      or state.stopped_early):
        state.close_window(run.accel.device)  # the checkpoint records the time trained so far
        started = time.perf_counter()
        state.settle_last_loss()  # the loss of steps since the last log line
        save_step(run, state)
        state.paused += time.perf_counter() - started


def save_step(run: TuneRun, state: TrainState) -> None:
    if not run.sharded:
        save_checkpoint(run.ckpt_root, state.step, run.inner, run.optimizer, run.scheduler,
                        checkpoint_state(run, state))
        return
    save_sharded_checkpoint(
        run.ckpt_root, state.step,
        lambda folder: sharding.save_shards(folder, run.inner, run.torch_optimizer, run.cfg.method != "full"),
        run.scheduler, checkpoint_state(run, state), main=run.main, barrier=run.accel.wait_for_everyone)


def unsharded_copy(run: TuneRun):
    """The sharded model whole, as an ordinary model on this rank's device (every rank must call it: the
    weights are all-gathered). For validation, the final evaluation and saving as a Hugging Face folder."""
    full = sharding.full_state_dict(run.inner)
    with rng_preserved():  # building it (LoRA's initial weights) must not move training's random streams
        model = run.rebuild()
    model.load_state_dict(full)
    return model.to(run.accel.device)


def prepare_run(cfg, base_path: str, train_examples, eval_examples, template: str, ckpt_root: Path, *,
                system: str | None = None, resume: bool, task: str, gen_cfg, dtype: str, device: str,
                context_window: int | None, trust_remote_code: bool, base_key: str, on_resume: Callable[[int], object] | None) -> TuneRun:
    """The accelerator, the model ready to train (resumed weights, optimizer and random streams
    included), the encoded data and the validation sample, in the order that fixes the random streams."""

    accel, on_cpu = _accelerator(cfg, device)
    model, tok, kind, window = _load_model(cfg, base_path, on_cpu, dtype, trust_remote_code, context_window)
    # GPU batches padded to few distinct widths (see collate); a CPU gains nothing from extra padding.
    # Causal labels mirror the inputs position by position, so both take the same width.
    pad_multiple = (1, 1) if on_cpu else (64, 16) if kind == "seq2seq" else (64, 64)
    data = _encode_data(cfg, model, tok, kind, window, template, system, train_examples, eval_examples, gen_cfg)
    data.scored = [scored_tokens(f, kind) for f in data.features]
    data.useful = [useful_tokens([f], kind) for f in data.features]
    relevant = {k: v for k, v in cfg.model_dump().items() if k not in NOT_TRAINING_RELEVANT}
    ckpt, saved = _open_checkpoints(accel, ckpt_root, resume, relevant, data.data_hash, base_path, base_key,
                                    on_resume)
    # batch_size auto is not known yet: judged at the largest batch the search may choose
    largest = min(len(data.features), AUTO_CEILING) if cfg.batch_size == "auto" else cfg.batch_size
    release = on_cpu and worth_releasing(model.config, kind, data.features, largest)
    model, release_hooks = _ready_model(cfg, model, tok, kind, base_path, ckpt, data.features, release)
    trainable, total = parameter_counts(model)
    auto = None
    if cfg.batch_size == "auto":  # one process (checked): the model goes to its device first, to be measured
        model = accel.prepare(model)
        cfg, auto = auto_batch_size(cfg, model, kind, data.features, tok.pad_token_id, accel.device, saved)
    if sharding.sharded(cfg):  # before the optimizer: it must hold the shards, not the whole tensors
        model = sharding.shard(model, cfg.parallelism, accel.device)
    params, optimizer, scheduler, n_batches, steps_per_epoch, total_steps = _optimizer(cfg, model, data.features)
    if auto is None and not sharding.sharded(cfg):
        model, optimizer = accel.prepare(model, optimizer)
    else:
        optimizer = accel.prepare(optimizer)
    inner = accel.unwrap_model(model)
    if ckpt is not None:
        _restore(cfg, ckpt, inner, optimizer, scheduler)
    # On CPU, activations come from malloc, whose heap keeps freed memory resident (llmcycle/core/memory.py):
    # hand it back where one phase's temporaries are dead (loading, a forward pass, the loss and the
    # decoder inside backward via release_hooks, a validation) so the next phase does not pile its
    # own beside them. Not after the optimizer step: the next forward reuses that memory as it is, and
    # handing it back would only make it fault in again. Peak RSS of a LoRA step drops by hundreds of
    # MB; the computation is untouched. Not on GPUs, whose activations are not on this heap.
    trim = memory.release_free_memory if release else (lambda: None)
    # With gradient checkpointing the vocabulary logits are recomputed too, a chunk at a time
    # (sum_loss_chunked), once a check on the first examples shows it gives the same loss.
    head = None
    if cfg.gradient_checkpointing and not sharding.sharded(cfg):  # (the chunks would bypass FSDP's gathers)
        probe = {k: v.to(accel.device) for k, v in collate(data.features[:2], tok.pad_token_id, pad_multiple).items()}
        with rng_preserved(), accel.autocast():
            head = chunkable_head(inner, model, probe, kind)
        del probe
    trim()
    compiled = compile_step(cfg, head)
    packed = use_packing(cfg, inner, kind, data.features, tok.pad_token_id)
    return TuneRun(cfg=cfg, accel=accel, model=model, inner=inner, tok=tok, kind=kind, window=window,
                   pad_multiple=pad_multiple, data=data, params=params, optimizer=optimizer, scheduler=scheduler,
                   n_batches=n_batches, steps_per_epoch=steps_per_epoch, total_steps=total_steps, head=head,
                   trim=trim, release_hooks=release_hooks, trainable_params=trainable, total_params=total,
                   base_path=base_path, base_key=base_key, relevant=relevant, ckpt_root=ckpt_root, ckpt=ckpt,
                   saved=saved, task=task, gen_cfg=gen_cfg, loss=step_loss(model, kind, head, accel, compiled),
                   compiled=compiled, packed=packed, auto_batch=auto,
                   rebuild=lambda: _fresh_model(cfg, base_path, tok, kind, dtype, trust_remote_code))


def _fresh_model(cfg, base_path: str, tok, kind: str, dtype: str, trust_remote_code: bool):
    """The base loaded and wrapped for the method again, as fit first set it up (no checkpoint weights)."""
    model, _ = load_base(base_path, cfg, dtype=dtype, device="cpu", trust_remote_code=trust_remote_code)
    return _wrap_for_method(cfg, model, tok, kind, base_path)


def _wrap_for_method(cfg, model, tok, kind: str, base_path: str):
    """wrap, told what a warm-started base added without pretrained weights."""
    warm = warm_start_facts(base_path) or {}
    return wrap(cfg, model, kind, new_modules=warm.get("new_modules", []),
                new_tokens=[tok.convert_tokens_to_ids(t) for t in warm.get("added_tokens", [])])


def _restore(cfg, ckpt: Path, inner, optimizer, scheduler) -> None:
    """The checkpoint's optimizer state, scheduler and random streams (and a sharded checkpoint's weights:
    an unsharded one's were loaded before wrapping) into this run, sharded or not, on any world size."""
    trainer_state = load_trainer_state(ckpt)
    torch_optimizer = getattr(optimizer, "optimizer", optimizer)
    if is_sharded(ckpt):
        sharding.load_shards(ckpt / sharding.SHARDS, inner, torch_optimizer, cfg.method != "full", ckpt)
    elif sharding.sharded(cfg):
        sharding.load_plain_optimizer(inner, torch_optimizer, trainer_state.pop("optimizer"))
    restore_training_state(trainer_state, optimizer, scheduler)


def auto_batch_size(cfg, model, kind: str, features: list[dict], pad_id: int, device, saved: dict):
    """(cfg with batch_size auto replaced by the largest micro-batch of the longest examples whose
    forward and backward fit in memory, the search's facts). A resumed run keeps the size its
    checkpoint records: a new search could find another, and the data order depends on it."""
    if saved.get("batch_size"):
        return cfg.model_copy(update={"batch_size": saved["batch_size"]}), {"chosen": saved["batch_size"],
                                                                             "from": "checkpoint"}
    longest = sorted(features, key=lambda f: -(len(f["input_ids"]) + len(f["labels"])))
    base = {"mb": 0.0}

    def try_batch(n: int) -> None:
        batch = {k: v.to(device) for k, v in collate(longest[:n], pad_id).items()}
        memory.reset_peak(device)  # the peak restarts at what the model alone takes now
        base["mb"] = memory.peak_mb(device)
        try:
            with rng_preserved():
                sum_loss(model, batch, kind, count=False)[0].backward()
        finally:
            model.zero_grad(set_to_none=True)

    limit = cfg.max_memory_mb or (None if getattr(device, "type", "") == "cuda" else 0.8 * memory.available_mb())
    measure = (lambda: memory.peak_mb(device) - base["mb"]) if limit else None
    chosen, trials = batch_finder.find_batch_size(try_batch, start=1, ceiling=min(len(features), AUTO_CEILING),
                                                  limit_mb=limit, measure=measure)
    notice(f"tune: batch_size auto: {chosen} (tried {', '.join(str(t['batch_size']) for t in trials)} of the "
           f"longest examples" + (f" against {limit:,.0f} MB above the model)" if limit else " until out of memory)"))
    return cfg.model_copy(update={"batch_size": chosen}), {"chosen": chosen, "limit_mb": limit, "trials": trials}


def use_packing(cfg, inner, kind: str, features: list[dict], pad_id: int) -> bool:
    """Whether to pack: `packing` when set, else where attention is computed per packed sequence
    (flash_attention_2's varlen kernels); and only once the first examples give the padded loss."""
    if kind != "causal" or cfg.packing is False:
        return False
    attention = getattr(getattr(inner, "config", None), "_attn_implementation", None)
    if cfg.packing is None and attention != "flash_attention_2":
        return False
    if packing_supported(inner, features, pad_id, sum_loss):
        return True
    notice(f"tune: packing is off: on the first examples this model ({attention} attention) gives another loss "
           "packed than padded (it does not keep packed examples apart); training pads instead")
    return False


def compile_step(cfg, head) -> bool:
    """Whether the step's forward and loss run through torch.compile (fewer, fused kernels; the host
    issues one graph instead of every op): `compile` when set. Off by default everywhere for now: on a
    CPU short runs would spend their first steps compiling, and on a GPU it is to become the default
    once it has been measured there (no GPU has run it yet). Not with the chunked loss, whose per-chunk
    checkpoints and data-dependent chunk count compile badly."""
    if cfg.compile and head is not None:
        notice("tune: compile is off with gradient_checkpointing's chunked loss (its chunks compile badly)")
        return False
    return cfg.compile


def step_loss(model, kind: str, head, accel, compiled: bool = False) -> Callable:
    """batch -> the summed token loss of the training step: sum_loss, or sum_loss_chunked under
    autocast when the head is chunked; compiled once when asked (recompiled only for new shapes, which
    collate's GPU padding multiples keep to a few)."""
    if head is not None:
        def chunked(batch):
            with accel.autocast():
                return sum_loss_chunked(model, batch, kind, head, count=False)[0]
        return chunked

    def plain(batch):
        return sum_loss(model, batch, kind, count=False)[0]

    if not compiled:
        return plain
    import torch

    return torch.compile(plain)


def _accelerator(cfg, device: str):
    """(the Accelerator, whether training runs on the CPU)."""
    import torch
    from accelerate import Accelerator, InitProcessGroupKwargs

    on_cpu = device == "cpu" or not torch.cuda.is_available()
    # bf16 autocast (float32 master weights for full fine-tuning) on GPUs that have bf16, and on a CPU when
    # asked (precision: bfloat16): a CPU with native bf16 (avx512_bf16, AMX) ran a step of the quickstart's
    # warm-started model in 0.81 s instead of 1.27 s; by default a CPU trains in exact float32
    precision = getattr(cfg, "precision", "auto")
    bf16 = precision == "bfloat16" or (precision == "auto" and not on_cpu and torch.cuda.is_bf16_supported())
    sharding.check_launch(cfg, "tune", cfg.method)
    # FSDP brings its own mixed precision (parallelism.mixed_precision); a rank that dies makes the others
    # fail after GATHER_TIMEOUT_S instead of waiting forever
    accel = Accelerator(cpu=on_cpu, mixed_precision="bf16" if bf16 and not sharding.sharded(cfg) else "no",
                        kwargs_handlers=[InitProcessGroupKwargs(timeout=timedelta(seconds=ranks.GATHER_TIMEOUT_S))])
    if cfg.batch_size == "auto" and sharding.sharded(cfg):
        raise UserError("tune: batch_size auto measures an unsharded model's memory; with parallelism.strategy "
                        "fsdp give a number (the micro-batch over all processes together)")
    if cfg.batch_size == "auto" and accel.num_processes > 1:
        raise UserError(f"tune: batch_size auto measures one process's memory; under {accel.num_processes} "
                        "processes give a number (the micro-batch over all processes together)")
    if cfg.batch_size != "auto" and cfg.batch_size < accel.num_processes:
        raise UserError(f"tune: batch_size {cfg.batch_size} is smaller than the {accel.num_processes} processes "
                        "sharing each batch; raise batch_size")
    return accel, on_cpu


def _load_model(cfg, base_path: str, on_cpu: bool, dtype: str, trust_remote_code: bool,
                context_window: int | None):
    """(model, tokenizer, kind, window): the base as loaded, and the prompt + answer tokens it can take."""

    if on_cpu and (cfg.gradient_checkpointing or sharding.sharded(cfg)):
        # memory over speed, as checkpointing itself: activations in their own mappings, so freed
        # means returned (memory.py); each large tensor then costs fresh pages (steps at ~0.8x the
        # speed), so runs that did not ask to save memory keep glibc's default. Sharding asked: the
        # blocks and gradients FSDP gathers whole are large and short-lived (a t5-small-shaped rank of
        # two peaked at 1.49 GB on the heap, 1.00 GB off it)
        memory.large_blocks_off_the_heap()
    model, tok = load_base(base_path, cfg, dtype=dtype, device="cpu", trust_remote_code=trust_remote_code)
    kind = model_kind(model.config)
    window = window_of(model.config, tok, context_window)
    if cfg.method == "prompt_tuning":
        window -= cfg.num_virtual_tokens  # the soft prompt occupies positions too
    return model, tok, kind, window


def _encode_data(cfg, model, tok, kind: str, window: int, template: str, system: str | None, train_examples,
                 eval_examples, gen_cfg) -> TuneData:
    end_id, end_why = target_end_id(model, tok, kind)
    chat = uses_chat_template(tok, kind)
    if cfg.loss_on == "all_assistant" and not chat:
        # No template to lay several answers into one sequence: each assistant turn is its own example.
        train_examples = [turn for ex in train_examples for turn in assistant_turns(ex)]
    enc = encode_examples(train_examples, [build_prompt(template, ex, system=system) for ex in train_examples],
                          tok, kind, window, end_id=end_id, on_overflow=cfg.on_overflow, loss_on=cfg.loss_on)
    features = enc.features
    if not features:
        raise UserError(f"tune: all {len(train_examples)} training examples are longer than the context "
                        f"window of {window} tokens and were skipped; nothing is left to train on")
    # The validation sample: the first eval_samples eval examples that fit for scoring and generating.
    room = gen_cfg.max_new_tokens if kind == "causal" else 0
    sample = eval_examples[:cfg.eval_samples]
    sample_prompts = [build_prompt(template, ex, system=system) for ex in sample]
    val = encode_examples(sample, sample_prompts, tok, kind, window, end_id=end_id, on_overflow="skip").features
    val = [f for f in val if len(encode_prompt(tok, sample_prompts[f["index"]], kind)) + room <= window]
    if cfg.eval_every and not val:
        raise UserError(f"tune: none of the first {len(sample)} eval examples fits the context window of "
                        f"{window} tokens with room to generate {room}; validation has nothing to score")
    data_hash = config_hash([[f["input_ids"], f["labels"]] for f in features + val])
    return TuneData(features, enc.skipped, sample, sample_prompts, val, data_hash, end_why, len(train_examples))


def _open_checkpoints(accel, ckpt_root: Path, resume: bool, relevant: dict, data_hash: str, base_path: str,
                      base_key: str, on_resume: Callable[[int], object] | None) -> tuple[Path | None, dict]:
    """(the checkpoint to resume from or None, its state.json or {}), once it is known to match this run;
    a fresh run clears older checkpoints, and any run clears what a crash left half-written."""
    main = accel.is_main_process
    ckpt = latest_checkpoint(ckpt_root) if resume else None
    saved: dict = {}
    if ckpt is not None:
        saved = read_state(ckpt)
        # checkpoints written before bases were named relative to the project hold the absolute path
        check_same_run(ckpt, saved, relevant, data_hash,
                       extra={"base": base_path if saved.get("base") == base_path else base_key})
        if main and on_resume is not None:
            on_resume(saved["step"])
    elif main:
        shutil.rmtree(ckpt_root, ignore_errors=True)  # a fresh run must not mix with older checkpoints
    if main and ckpt_root.is_dir():
        for stale in ckpt_root.glob(".tmp-*"):  # saves cut short by a crash
            shutil.rmtree(stale, ignore_errors=True)
        if not (ckpt_root / BEST).exists() and (ckpt_root / ".old-best").exists():
            os.replace(ckpt_root / ".old-best", ckpt_root / BEST)  # a crash between save_best's renames
    accel.wait_for_everyone()
    return ckpt, saved


def _ready_model(cfg, model, tok, kind: str, base_path: str, ckpt: Path | None, features: list[dict],
                 release: bool):
    """(the model seeded, wrapped for the method and in train mode with the checkpoint's weights if any,
    the release hooks on CPU)."""
    import numpy as np
    import torch

    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)  # before wrapping: LoRA A and the soft prompt are drawn from it
    if cfg.gradient_checkpointing:
        _enable_gradient_checkpointing(model, cfg.method)
    model = _wrap_for_method(cfg, model, tok, kind, base_path)
    if ckpt is not None and not is_sharded(ckpt):  # a sharded one's weights load with its optimizer state
        model = _load_weights(model, ckpt, cfg.method, torch.float32)
    # see `trim` in prepare_run; removed before fit returns, so the trained model carries no hooks
    release_hooks = release_between_backward_phases(model, memory.release_free_memory) if release else []
    if cfg.method == "prompt_tuning":  # peft accepts some models it cannot run; find out now
        try:
            model.eval()
            with torch.no_grad():
                sum_loss(model, collate(features[:1], tok.pad_token_id), kind)
        except Exception as exc:  # noqa: BLE001
            raise UserError(f"tune: prompt tuning does not work with model type "
                            f"'{getattr(model.config, 'model_type', '?')}': {str(exc).splitlines()[0]}") from None
    model.train()
    return model, release_hooks


def _enable_gradient_checkpointing(model, method: str) -> None:
    model.config.use_cache = False  # the cache is for generation; checkpointing recomputes instead
    # transformers renamed gradient_ to activation_checkpointing_enable (5.2x); accept either
    enable = getattr(model, "activation_checkpointing_enable", None)
    if enable is not None:
        enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if method != "full":
        model.enable_input_require_grads()  # frozen embeddings: give checkpointed blocks a grad path


def _optimizer(cfg, model, features: list[dict]):
    """(trainable parameters, AdamW, its lr schedule, micro-batches per epoch, steps per epoch, total steps)."""
    import torch

    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.ndim >= 2], "weight_decay": cfg.weight_decay},
              {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]
    optimizer = adamw(groups, cfg.lr)
    n_batches = len(length_grouped_batches([len(f["input_ids"]) for f in features], cfg.batch_size, cfg.seed, 0))
    steps_per_epoch = math.ceil(n_batches / cfg.grad_accum)
    total_steps = math.ceil(cfg.epochs * steps_per_epoch) if cfg.epochs else cfg.max_steps
    total_steps = max(1, min(total_steps, cfg.max_steps or total_steps))
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, cfg.warmup_steps, total_steps, cfg.lr_schedule))
    return params, optimizer, scheduler, n_batches, steps_per_epoch, total_steps


def optimizer_step(run: TuneRun, state: TrainState, micro: list[list[int]], feeder) -> float:
    """One optimizer step over the micro-batches `micro` (rows of run.data.features, collated ahead by
    `feeder`: micro_batches), recorded in `state`; returns the learning rate it used. Nothing in it
    waits for the device: the loss stays a device tensor until a log line reads it."""
    import torch.distributed as dist

    import torch

    rows = [i for b in micro for i in b]
    n_scored = sum(run.data.scored[i] for i in rows)  # the whole step's, over all processes
    loss, tokens = _accumulate_gradients(run, micro, n_scored, feeder)
    if run.world > 1:
        dist.all_reduce(loss)
    optimizer = run.optimizer.optimizer if run.direct else run.optimizer  # the torch optimizer inside
    if run.cfg.grad_clip > 0:
        clip = torch.nn.utils.clip_grad_norm_ if run.direct else run.accel.clip_grad_norm_
        clip(run.params, run.cfg.grad_clip)
    lr = run.scheduler.get_last_lr()[0]
    optimizer.step()
    run.scheduler.step()
    if run.held is None:  # once, while gradients and AdamW's moments all exist
        run.held = sharding.local_bytes(run.inner, run.torch_optimizer)
    optimizer.zero_grad(set_to_none=True)
    useful = sum(run.data.useful[i] for i in rows)
    state.record_step(len(micro), run.n_batches, tokens, useful, loss / max(n_scored, 1))
    return lr


def _accumulate_gradients(run: TuneRun, micro: list[list[int]], n_scored: int, feeder):
    """Forward and backward over this process's rows of each micro-batch, the gradient scaled so that the
    all-reduced one is the token-weighted mean's over the whole step; returns (this process's summed
    loss as a float64 device tensor, the padded tokens all processes computed on)."""
    import torch

    accel, world = run.accel, run.world
    loss = torch.zeros((), dtype=torch.float64, device=accel.device)
    tokens = 0
    for j in range(len(micro)):
        host_batch, weight, padded = feeder.next()
        batch = {k: v.to(accel.device, non_blocking=True) for k, v in host_batch.items()}
        last = j == len(micro) - 1
        if run.sharded:  # FSDP reduce-scatters the gradients only after the step's last micro-batch
            run.model.set_requires_gradient_sync(last)
        sync = accel.no_sync(run.model) if not last and not run.sharded else contextlib.nullcontext()
        with sync:
            s = run.loss(batch)
            run.trim()  # the forward's temporaries are freed; what backward needs is saved
            # DDP averages gradients over processes; times world, the sum over them remains
            scaled = s * (weight * world / max(n_scored, 1))
            scaled.backward() if run.direct else accel.backward(scaled)
        loss += s.detach().double() * weight
        tokens += padded
    return loss, tokens


def adamw(groups: list[dict], lr: float):
    """AdamW with one fused kernel per step for all parameters (CPU and GPU, torch >= 2.4) instead of a
    few per tensor; the unfused implementation for parameters the fused kernel does not take."""
    import torch

    try:
        return torch.optim.AdamW(groups, lr=lr, fused=True)
    except (RuntimeError, ValueError):
        return torch.optim.AdamW(groups, lr=lr)


def micro_batches(run: TuneRun, batches: list[list[int]]) -> Prefetcher:
    """This process's share of each micro-batch of `batches`, collated (and pinned, for a GPU) ahead:
    (the batch on the host, its weight: 0 for a zero-weight row that joins the all-reduce of a short last
    batch, the padded tokens of every process's share)."""
    pin = run.accel.device.type == "cuda"

    def make(i: int):
        rows = batches[i]
        mine, weight = rows[run.rank::run.world], 1.0
        if not mine:  # a short last batch: join the gradient all-reduce with a zero-weight row
            mine, weight = rows[:1], 0.0
        share = [run.data.features[k] for k in mine]
        batch = (pack(share, run.tok.pad_token_id, run.pad_multiple[0]) if run.packed
                 else collate(share, run.tok.pad_token_id, run.pad_multiple))
        if pin:
            batch = {k: v.pin_memory() for k, v in batch.items()}
        return batch, weight, padded_global(run, rows)

    return Prefetcher(make, len(batches))


def padded_global(run: TuneRun, rows: list[int]) -> int:
    """Tokens all processes compute on for a micro-batch, each padding (or packing) its own share of the
    rows: known to every process from the lengths, so none needs to be told the others' counts."""
    return sum(padded_size([run.data.features[i] for i in rows[rank::run.world]], run.kind, run.pad_multiple,
                           run.packed) for rank in range(run.world))


def report_losses(run: TuneRun, state: TrainState, lr: float, log: Callable[[dict], None] | None,
                  bar, bar_task) -> None:
    """The mean loss and token rate since the last log line, to the progress bar and `log`."""
    state.close_window(run.accel.device)
    state.settle_last_loss()
    tokens_per_s = state.window_tokens / state.window_time if state.window_time else 0.0
    # the peak of this window's steps (GPU: torch's allocations; CPU: resident memory), then a new window
    peak = memory.peak_mb(run.accel.device)
    state.peak_mb = max(state.peak_mb, peak)
    memory.reset_peak(run.accel.device)
    bar.update(bar_task, loss=f"{state.last_loss:.4f}", tps=f"{tokens_per_s:,.0f}")
    if run.main and log is not None:
        log({"step": state.step, "epoch": round(state.epoch + state.position / run.n_batches, 4),
             "loss": state.last_loss, "lr": lr, "tokens_per_s": tokens_per_s, "peak_memory_mb": round(peak, 1)})
    state.loss_window, state.window_tokens, state.window_time = [], 0, 0.0


def validate_and_track_best(run: TuneRun, state: TrainState, log: Callable[[dict], None] | None) -> None:
    """Validate (every rank together: the generation is split between them and gathered, so all hold
    the same result and agree on early stopping), keep checkpoints/best/ at the best headline score."""
    model = unsharded_copy(run) if run.sharded else run.inner
    result = validate(run, model)
    if state.best is None or result["headline_value"] > state.best:
        state.best, state.best_step, state.bad_evals = result["headline_value"], state.step, 0
        if run.main:
            save_best(run.ckpt_root, model, checkpoint_state(run, state))
    else:
        state.bad_evals += 1
    patience = run.cfg.early_stopping_patience
    state.stopped_early = bool(patience and state.bad_evals >= patience)
    if run.main and log is not None:
        log({"step": state.step, "val_loss": result["val_loss"], "headline": result["headline"],
             result["headline"]: result["headline_value"]})


def validate(run: TuneRun, inner) -> dict:
    """Token-weighted loss and the task's headline metric (through the harness) on the sample, of `inner`
    (the model being trained, or a sharded one's unsharded copy)."""
    import torch

    val, size, tok = run.data.val, run.cfg.batch_size, run.tok
    inner.eval()
    with rng_preserved(), torch.no_grad():
        nll, n = 0.0, 0
        for i in range(0, len(val), size):
            batch = {k: v.to(run.accel.device)
                     for k, v in collate(val[i:i + size], tok.pad_token_id, run.pad_multiple).items()}
            s, c = sum_loss(inner, batch, run.kind)
            nll, n = nll + float(s), n + c
        loaded = harness.LoadedModel("validation", run.base_path, inner, tok, Generator(inner, tok, run.window))
        summary, _ = harness.evaluate(loaded, [run.data.sample_prompts[f["index"]] for f in val],
                                      [run.data.sample[f["index"]] for f in val], run.task, run.gen_cfg,
                                      perplexity=False, progress=False)
    inner.train()
    run.trim()  # scoring's and generation's temporaries
    return {"val_loss": nll / max(n, 1), "headline": summary["headline"],
            "headline_value": summary["headline_value"]}


def run_summary(run: TuneRun, state: TrainState) -> dict:
    whole_run = state.so_far()
    step, trainable, total = state.step, run.trainable_params, run.total_params
    return {
        "trainable_params": trainable, "total_params": total, "trainable_pct": 100.0 * trainable / total,
        "train_examples": len(run.data.features), "skipped_overlong": len(run.data.skipped),
        "skipped": run.data.skipped[:10], "train_records": run.data.records, "target_ends_with": run.data.end_why,
        "steps": step, "total_steps": run.total_steps, "epochs_done": round(step / run.steps_per_epoch, 4),
        "final_train_loss": state.last_loss, "best_step": state.best_step, "best_headline": state.best,
        "stopped_early": state.stopped_early, "stopped_at": step if state.stopped_early else None,
        "train_wall_s": round(whole_run["wall_s"], 3),
        "tokens_per_s": whole_run["tokens"] / whole_run["step_time"] if whole_run["step_time"] else None,
        "useful_tokens_per_s": (whole_run["useful_tokens"] / whole_run["step_time"]
                                if whole_run["step_time"] else None),
        "world_size": run.world, "resumed_from": resumed_from(run.ckpt, run.saved),
        "chunked_loss": run.head is not None,  # the vocabulary logits recomputed chunk by chunk
        "train_peak_memory_mb": round(state.peak_mb, 1),  # the highest logged window's peak
        "compiled": run.compiled, "packed": run.packed, "batch_size": run.cfg.batch_size,
        "batch_size_auto": run.auto_batch,
        # what this rank holds for training (rank 0's figures), in MB: FSDP divides all three by the world size
        "held_mb": {k: round(v / 2**20, 3) for k, v in (run.held or {}).items()},
        "parallelism": (sharding.sharding_facts(run.inner, run.torch_optimizer, run.cfg.parallelism)
                        if run.sharded else {"strategy": "ddp", "world_size": run.world}),
    }
