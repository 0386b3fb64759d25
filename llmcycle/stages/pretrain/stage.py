"""Pretraining from scratch: train a tokenizer, then a small T5-style (encoder-decoder, span
corruption) or GPT-style (decoder-only, next-token) model on the project's texts.

Run it with `llmcycle pretrain` or as a stage of the pipeline, `llmcycle run --only pretrain`;
settings come from the `pretrain:` section of llmcycle.yaml (PretrainConfig below). From Python:

    summary = train(PretrainConfig(max_steps=200), texts, Path("runs/x/pretrain"))

Outputs under the work dir: tokenizer/ (trained once, reused on resume), checkpoints/step-N/
(the last two, written atomically, used by resume=True) and model/, a normal Hugging Face folder
that AutoModelForSeq2SeqLM / AutoModelForCausalLM and AutoTokenizer load directly.

Data preparation (tokenizer training, packing, span corruption) lives in llmcycle/pretrain_data.py.
"""
from __future__ import annotations

import hashlib
import math
import os
import random
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Literal

from pydantic import Field, model_validator

from llmcycle.core import ranks
from llmcycle.core.configbase import Section
from llmcycle.core.errors import UserError
from llmcycle.core.files import fsync_tree, quiet_saves
from llmcycle.data.records import corpus_texts, fingerprint, load_splits
from llmcycle.models.scratch import build_model_config, model_class, preset_dims
from llmcycle.stages.contract import Stage, section_variants
from llmcycle.stages.pretrain.data import (
    PretrainDataset,
    batch_token_counts,
    load_corpus,
    train_tokenizer,
)
from llmcycle.training import sharding
from llmcycle.training.loop import adamw, as_floats
from llmcycle.training.checkpoints import (
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
    unusable,
)
from llmcycle.training.sharding import ParallelismConfig

# Fields that do not change the trained weights: they may differ when resuming.
# How processes share the work does not either (a checkpoint resumes on any number of processes).
NOT_TRAINING_RELEVANT = {"checkpoint_every", "log_every", "parallelism"}


class PretrainConfig(Section):
    """The `pretrain:` section of llmcycle.yaml."""

    architecture: Literal["t5", "gpt"] = Field(
        "t5", description="t5: encoder-decoder trained with span corruption; gpt: decoder-only next-token prediction")
    size: Literal["tiny", "small", "base"] = Field(
        "tiny", description="preset dims: tiny (d_model 64, 2 layers), small (t5-small / gpt2), base (t5-base / gpt2-medium)")
    d_model: int | None = Field(None, ge=1, description="hidden size; overrides the preset")
    n_layers: int | None = Field(None, ge=1, description="layers (t5: in encoder and in decoder each); overrides the preset")
    n_heads: int | None = Field(None, ge=1, description="attention heads; overrides the preset")
    d_ff: int | None = Field(None, ge=1, description="feed-forward inner size; overrides the preset")
    vocab_size: int = Field(4000, ge=100, description="tokenizer vocabulary size to train (may end up smaller on tiny corpora)")
    dropout: float = Field(0.1, ge=0, lt=1, description="dropout probability in every layer (0.1: t5's and "
                           "gpt2's default)")
    seq_len: int = Field(256, ge=16, description="tokens per example (t5: encoder input length)")
    batch_size: int = Field(16, ge=1, description="examples per optimizer step")
    lr: float = Field(1e-3, gt=0, description="peak learning rate (AdamW)")
    weight_decay: float = Field(0.01, ge=0, description="AdamW weight decay on matrices (not on biases and norms)")
    warmup_steps: int = Field(50, ge=0, description="linear warmup steps before cosine decay")
    max_steps: int | None = Field(None, ge=1, description="optimizer steps to train (set this or epochs)")
    epochs: float | None = Field(None, gt=0, description="passes over the data, may be fractional (set this or max_steps)")
    grad_clip: float = Field(1.0, ge=0, description="clip the gradient norm to this; 0 turns clipping off")
    checkpoint_every: int = Field(200, ge=1, description="save a resumable checkpoint every N steps (and at the end)")
    log_every: int = Field(10, ge=1, description="report metrics every N steps")
    packing: bool = Field(True, description="pack documents into full blocks (no padding) instead of one padded example per document")
    objective: Literal["span_corruption", "denoising"] = Field(
        "span_corruption", description="t5 only. span_corruption (T5): each masked span becomes a sentinel and "
        "the decoder writes only the masked tokens; denoising (BART's text infilling): each masked span "
        "becomes one mask token and the decoder writes the whole original text back, which teaches it to "
        "copy from the encoder (what summarization needs) at about twice the decoder compute")
    noise_density: float = Field(0.15, gt=0, lt=1, description="t5: fraction of tokens masked (BART uses 0.3 "
                                 "with denoising)")
    mean_span_length: float = Field(3.0, ge=1, description="t5: mean length of a masked span")
    seed: int = Field(0, description="seed for initialisation, data order, span corruption and dropout")
    corpus: list[str] | None = Field(
        None, description="extra text files (.txt: one document per line; .jsonl: a 'text' field), relative to the "
        "project dir, used in addition to the project's training texts")
    parallelism: ParallelismConfig = Field(
        default_factory=ParallelismConfig, description="how torchrun's processes share training: ddp "
        "(whole model on each) or fsdp (sharded); each process takes its rows of every batch")

    @model_validator(mode="after")
    def _one_length(self):
        if (self.max_steps is None) == (self.epochs is None):
            raise ValueError("set exactly one of pretrain.max_steps or pretrain.epochs (how long to train)")
        if self.objective != "span_corruption" and self.architecture != "t5":
            raise ValueError(f"objective {self.objective} needs architecture t5 (gpt learns next-token prediction)")
        return self


def _relevant(cfg: PretrainConfig) -> dict:
    return {k: v for k, v in cfg.model_dump().items() if k not in NOT_TRAINING_RELEVANT}


def _load_checkpoint(path: Path, cfg: PretrainConfig):
    """(model, trainer state) from a checkpoint; any failure -> UserError naming the directory."""
    import torch

    try:
        model = model_class(cfg.architecture).from_pretrained(str(path / "model"), dtype=torch.float32)
    except Exception as exc:  # noqa: BLE001 - any load failure means the checkpoint is unusable
        raise unusable(path, exc) from None
    return model, load_trainer_state(path)


# --------------------------------------------------------------------------------------- training
@dataclass
class PretrainSetup:
    """What train sets up before its first step and keeps unchanged to the end."""
    cfg: PretrainConfig
    work_dir: Path
    ckpt_root: Path
    ckpt: Path | None  # the checkpoint resumed from
    saved: dict  # its state.json ({} for a fresh run)
    data_hash: str
    tokenizer: object
    data: object  # PretrainDataset
    model: object  # unwrapped (FSDP shards it in place)
    optimizer: object
    scheduler: object
    batches_per_epoch: int
    total_steps: int
    engine: object = None  # what the step calls: the model, or its DDP wrapper under torchrun

    @property
    def sharded(self) -> bool:
        return sharding.sharded(self.cfg)


@dataclass
class PretrainState:
    """Where a pretraining run stands. The fields from step to last_loss, and `done` brought up to date
    (so_far), are saved in each checkpoint (checkpoint_state) and read back on resume; the counters
    after `done` cover this session only."""
    started: float  # time.perf_counter() when train was called
    step: int = 0
    epoch: int = 0
    position: int = 0  # the batch of the epoch's order where the next step starts
    tokens_seen: int = 0
    useful_tokens: int = 0
    loss_window: list[float] = field(default_factory=list)  # losses since the last log line
    last_loss: float | None = None
    # step and wall time of the steps before the checkpoint resumed from (rates cover the whole run)
    done: dict = field(default_factory=dict)
    step_time: float = 0.0  # time in training steps only (not tokenizer training or checkpoint I/O)
    window_tokens: int = 0  # since the last log line
    window_useful: int = 0
    window_time: float = 0.0

    @classmethod
    def resumed(cls, saved: dict, started: float) -> PretrainState:
        """The state a checkpoint's state.json records; a fresh run's for {}."""
        return cls(started, step=saved.get("step", 0), epoch=saved.get("epoch", 0),
                   position=saved.get("position", 0), tokens_seen=saved.get("tokens_seen", 0),
                   useful_tokens=saved.get("useful_tokens", 0), loss_window=list(saved.get("loss_window", [])),
                   last_loss=saved.get("last_loss"), done={"step_time": 0.0, "wall_s": 0.0, **saved.get("done", {})})

    def so_far(self) -> dict:
        """Step time and wall time of the whole run up to now, resumed parts included."""
        return {"step_time": self.done["step_time"] + self.step_time,
                "wall_s": self.done["wall_s"] + time.perf_counter() - self.started}

    def record_step(self, batches_per_epoch: int, tokens: int, useful: int, seconds: float, loss: float) -> None:
        self.step, self.position = self.step + 1, self.position + 1
        self.tokens_seen, self.useful_tokens = self.tokens_seen + tokens, self.useful_tokens + useful
        self.step_time += seconds
        self.window_tokens, self.window_useful = self.window_tokens + tokens, self.window_useful + useful
        self.window_time += seconds
        self.loss_window.append(loss)
        if self.position == batches_per_epoch:  # the saved position is where the *next* step starts
            self.epoch, self.position = self.epoch + 1, 0


def checkpoint_state(setup: PretrainSetup, state: PretrainState) -> dict:
    """A checkpoint's state.json: what resuming reads back and checks against."""
    relevant = _relevant(setup.cfg)
    return {"step": state.step, "epoch": state.epoch, "position": state.position, "config_hash": config_hash(relevant),
            "config": relevant, "data_hash": setup.data_hash, "tokens_seen": state.tokens_seen,
            "useful_tokens": state.useful_tokens, "loss_window": as_floats(state.loss_window),
            "last_loss": state.last_loss,
            "total_steps": setup.total_steps, "time": time.time(), "done": state.so_far()}


def train(cfg: PretrainConfig, texts: list[str], work_dir: Path, *, resume: bool = False,
          log: Callable[[dict], None] | None = None, progress: bool = True,
          project_dir: Path | None = None, tokenizer=None,
          on_resume: Callable[[int], object] | None = None) -> dict:
    """Train tokenizer + model in `work_dir` and return a summary (see module docstring).

    texts: the documents to train on (the project's training texts); files in cfg.corpus, resolved
    against project_dir (default: the current directory), are added to them. resume=True continues
    from the newest checkpoint so the result equals an uninterrupted run with the same settings.
    tokenizer: use this already-trained tokenizer instead of training one (e.g. to share one across
    runs); it is saved to work_dir/tokenizer like a trained one. Ignored when resuming.
    on_resume(step): called once a resume from the checkpoint of `step` is accepted."""
    started = time.perf_counter()
    setup = prepare(cfg, texts, Path(work_dir), resume=resume, project_dir=project_dir, tokenizer=tokenizer,
                    on_resume=on_resume)
    state = PretrainState.resumed(setup.saved, started)
    main = ranks.is_main()
    with training_bar(progress and main) as bar:
        bar_task = bar.add_task(f"pretrain {cfg.architecture}", total=setup.total_steps, completed=state.step,
                                loss="-", tps="-")
        order_epoch, order = None, None
        while state.step < setup.total_steps:
            if order_epoch != state.epoch:  # data order is a function of (seed, epoch): replayable on resume
                order_epoch, order = state.epoch, setup.data.order(state.epoch)
            with ranks.peers_watched(f"pretrain step {state.step + 1}"):
                lr = optimizer_step(setup, state, order)
                if state.step % cfg.log_every == 0 or state.step == setup.total_steps:
                    report_losses(setup, state, lr, log if main else None, bar, bar_task)
                bar.update(bar_task, completed=state.step)
                if state.step % cfg.checkpoint_every == 0 or state.step == setup.total_steps:
                    save_step(setup, state, main)
    summary = summarize(setup, state, save_model(setup, main))
    summary["parallelism"] = (sharding.sharding_facts(setup.model, setup.optimizer, cfg.parallelism)
                              if setup.sharded else {"strategy": "ddp", "world_size": ranks.world_size()})
    return summary


def save_step(setup: PretrainSetup, state: PretrainState, main: bool) -> None:
    """A checkpoint: rank 0 writes a whole one; every rank writes its shards of a sharded one."""
    if setup.sharded:
        save_sharded_checkpoint(setup.ckpt_root, state.step,
                                lambda folder: sharding.save_shards(folder, setup.model, setup.optimizer, False),
                                setup.scheduler, checkpoint_state(setup, state), main=main,
                                barrier=ranks.ensure_group().barrier)
    elif main:
        save_checkpoint(setup.ckpt_root, state.step, setup.model, setup.optimizer, setup.scheduler,
                        checkpoint_state(setup, state))


def prepare(cfg: PretrainConfig, texts: list[str], work_dir: Path, *, resume: bool,
            project_dir: Path | None, tokenizer, on_resume: Callable[[int], object] | None) -> PretrainSetup:
    """The texts, the tokenizer (trained, given or the checkpoint's), the dataset and the model with its
    optimizer, resumed from the newest checkpoint when `resume`."""

    sharding.check_launch(cfg, "pretrain")
    work_dir.mkdir(parents=True, exist_ok=True)
    if cfg.corpus:
        texts = load_corpus(cfg.corpus, Path(project_dir or Path.cwd())) + list(texts)
    texts = [t for t in texts if isinstance(t, str) and t.strip()]
    if not texts:
        raise UserError("pretrain: no training texts (the project's training data and pretrain.corpus are empty)")
    data_hash = hashlib.sha256("\0".join(texts).encode()).hexdigest()[:16]
    ckpt_root = work_dir / "checkpoints"
    ckpt, saved, tokenizer = _open_checkpoints(cfg, texts, ckpt_root, work_dir / "tokenizer", resume, data_hash,
                                               tokenizer, on_resume)
    data = PretrainDataset(cfg, tokenizer, texts)
    batches_per_epoch = math.ceil(len(data) / cfg.batch_size)
    total_steps = cfg.max_steps or max(1, math.ceil(cfg.epochs * batches_per_epoch))
    if cfg.batch_size < ranks.world_size():
        raise UserError(f"pretrain: batch_size {cfg.batch_size} is smaller than the {ranks.world_size()} processes "
                        "sharing each batch; raise batch_size")
    model, optimizer, scheduler = _model_and_optimizer(cfg, tokenizer, ckpt, total_steps)
    engine = model
    if ranks.world_size() > 1 and not sharding.sharded(cfg):
        from torch.nn.parallel import DistributedDataParallel

        ranks.ensure_group()
        engine = DistributedDataParallel(model)
    return PretrainSetup(cfg=cfg, work_dir=work_dir, ckpt_root=ckpt_root, ckpt=ckpt, saved=saved,
                         data_hash=data_hash, tokenizer=tokenizer, data=data, model=model, optimizer=optimizer,
                         scheduler=scheduler, batches_per_epoch=batches_per_epoch, total_steps=total_steps,
                         engine=engine)


def _open_checkpoints(cfg: PretrainConfig, texts: list[str], ckpt_root: Path, tok_dir: Path, resume: bool,
                      data_hash: str, tokenizer, on_resume: Callable[[int], object] | None):
    """(the checkpoint to resume from or None, its state.json or {}, the tokenizer to train with), once the
    checkpoint is known to match this run; a fresh run clears older checkpoints and saves its tokenizer."""
    from transformers import AutoTokenizer

    main = ranks.is_main()
    ckpt = latest_checkpoint(ckpt_root) if resume else None
    saved: dict = {}
    if ckpt is not None:
        saved = read_state(ckpt)
        check_same_run(ckpt, saved, _relevant(cfg), data_hash)
        try:
            tokenizer = AutoTokenizer.from_pretrained(str(tok_dir))
        except Exception as exc:  # noqa: BLE001
            raise UserError(f"cannot resume: tokenizer in {tok_dir} does not load ({exc})") from None
        if on_resume is not None and main:
            on_resume(saved["step"])
    elif main:
        shutil.rmtree(ckpt_root, ignore_errors=True)  # a fresh run must not mix with an older one's checkpoints
        if tokenizer is None:
            tokenizer = train_tokenizer(texts, cfg, tok_dir)
        else:
            tokenizer.save_pretrained(str(tok_dir))
    for stale in ckpt_root.glob(".tmp-*") if main and ckpt_root.is_dir() else []:  # saves cut short by a crash
        shutil.rmtree(stale, ignore_errors=True)
    if ranks.world_size() > 1:  # the other ranks take the tokenizer rank 0 trained
        ranks.ensure_group().barrier()
        if not main and ckpt is None:
            tokenizer = AutoTokenizer.from_pretrained(str(tok_dir))
    return ckpt, saved, tokenizer


def _model_and_optimizer(cfg: PretrainConfig, tokenizer, ckpt: Path | None, total_steps: int):
    """(model in train mode, AdamW, its lr schedule): seeded and new, or as the checkpoint saved them."""
    import numpy as np
    import torch

    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    if ckpt is not None and not is_sharded(ckpt):
        model, trainer_state = _load_checkpoint(ckpt, cfg)
    else:  # a sharded checkpoint's weights load into the sharded model, with the optimizer state
        model = model_class(cfg.architecture)(build_model_config(cfg, tokenizer))
        trainer_state = load_trainer_state(ckpt) if ckpt is not None else None
    if cfg.architecture == "gpt":
        model.loss_type = "ForCausalLM"  # GPT2LMHeadModel leaves it unset and warns on first use
    model.train()  # from_pretrained returns eval mode; dropout must match the uninterrupted run
    if sharding.sharded(cfg):
        model = sharding.shard(model, cfg.parallelism, "cpu")

    # no weight decay on biases and norm scales (1-d), the usual AdamW practice
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = adamw([{"params": [p for p in params if p.ndim >= 2], "weight_decay": cfg.weight_decay},
                       {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}], cfg.lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, cfg.warmup_steps, total_steps, "cosine"))
    if trainer_state is not None:
        if is_sharded(ckpt):
            sharding.load_shards(ckpt / sharding.SHARDS, model, optimizer, False, ckpt)
        elif sharding.sharded(cfg):
            sharding.load_plain_optimizer(model, optimizer, trainer_state.pop("optimizer"))
        restore_training_state(trainer_state, optimizer, scheduler)
    return model, optimizer, scheduler


def optimizer_step(setup: PretrainSetup, state: PretrainState, order) -> float:
    """One optimizer step on the batch at state.position of the epoch's `order`, recorded in `state`;
    returns the learning rate it used."""
    import torch

    cfg = setup.cfg
    t0 = time.perf_counter()
    rows = order[state.position * cfg.batch_size:(state.position + 1) * cfg.batch_size]
    batch = setup.data.batch(rows, state.epoch)
    if ranks.world_size() == 1:
        loss = setup.engine(**batch).loss
        loss.backward()
    else:
        loss = _shared_backward(setup, batch)
    if cfg.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(setup.model.parameters(), cfg.grad_clip)
    lr = setup.scheduler.get_last_lr()[0]
    setup.optimizer.step()
    setup.scheduler.step()
    setup.optimizer.zero_grad(set_to_none=True)
    dt = time.perf_counter() - t0
    useful, total = batch_token_counts(batch, cfg.architecture)
    # the loss stays a tensor until the log line reads the window's losses together (no wait per step)
    state.record_step(setup.batches_per_epoch, total, useful, dt, loss.detach())
    return lr


def _shared_backward(setup: PretrainSetup, batch: dict):
    """Forward and backward over this process's rows of `batch`, weighted so that the gradient DDP or FSDP
    averages over the processes is the token mean's over the whole batch, as one process computes it;
    returns that mean loss (all-reduced). Every rank collates the whole batch: its token count is the
    denominator. A rank whose share is empty (a short last batch) joins with a zero-weight row."""
    dist = ranks.ensure_group()
    rank, world = ranks.rank(), ranks.world_size()
    n_total = _scored(batch["labels"], setup.cfg.architecture)
    mine, weight = {k: v[rank::world].contiguous() for k, v in batch.items()}, 1.0
    if len(mine["input_ids"]) == 0:
        mine, weight = {k: v[:1].contiguous() for k, v in batch.items()}, 0.0
    local = setup.engine(**mine).loss * _scored(mine["labels"], setup.cfg.architecture)
    (local * (weight * world / max(n_total, 1))).backward()
    total = local.detach().double() * weight
    dist.all_reduce(total)
    return total / max(n_total, 1)


def _scored(labels, architecture: str) -> int:
    """The label tokens the model's mean loss divides by (GPT shifts its labels by one inside)."""
    return int(((labels[:, 1:] if architecture == "gpt" else labels) != -100).sum())


def report_losses(setup: PretrainSetup, state: PretrainState, lr: float, log: Callable[[dict], None] | None,
                  bar, bar_task) -> None:
    """The mean loss and token rates since the last log line, to the progress bar and `log`."""
    state.loss_window = as_floats(state.loss_window)
    state.last_loss = sum(state.loss_window) / len(state.loss_window)
    metrics = {"step": state.step, "epoch": state.epoch, "loss": state.last_loss, "lr": lr,
               "tokens_per_s": state.window_tokens / state.window_time,
               "useful_tokens_per_s": state.window_useful / state.window_time,
               "tokens": state.tokens_seen, "useful_tokens": state.useful_tokens}
    bar.update(bar_task, loss=f"{state.last_loss:.3f}", tps=f"{state.window_tokens / state.window_time:,.0f}")
    state.loss_window, state.window_tokens, state.window_useful, state.window_time = [], 0, 0, 0.0
    if log is not None:
        log(metrics)


def save_model(setup: PretrainSetup, main: bool = True) -> Path:
    """work_dir/model/ with the tokenizer, replaced atomically, by rank 0 (a sharded model is gathered whole
    first, by every rank); returns its path."""
    model_dir = setup.work_dir / "model"
    model = setup.model
    if setup.sharded:
        full = sharding.full_state_dict(setup.model)
        if main:
            model = model_class(setup.cfg.architecture)(build_model_config(setup.cfg, setup.tokenizer))
            model.load_state_dict(full)
    if not main:
        return model_dir
    tmp = setup.work_dir / f".tmp-model-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    with quiet_saves():
        model.save_pretrained(str(tmp))
    setup.tokenizer.save_pretrained(str(tmp))
    fsync_tree(tmp)
    shutil.rmtree(model_dir, ignore_errors=True)
    os.replace(tmp, model_dir)
    return model_dir


def summarize(setup: PretrainSetup, state: PretrainState, model_dir: Path) -> dict:
    cfg, tokens_seen, useful_seen = setup.cfg, state.tokens_seen, state.useful_tokens
    whole_run = state.so_far()
    all_step_time = whole_run["step_time"]
    return {
        "architecture": cfg.architecture, "dims": preset_dims(cfg), "vocab_size": len(setup.tokenizer),
        "parameters": sum(p.numel() for p in setup.model.parameters()), "steps": state.step,
        "total_steps": setup.total_steps, "examples": len(setup.data),
        "tokens_seen": tokens_seen, "useful_tokens": useful_seen,
        "padding_fraction": 1 - useful_seen / tokens_seen if tokens_seen else 0.0,
        "final_loss": state.last_loss,
        "tokens_per_s": tokens_seen / all_step_time if all_step_time else None,
        "useful_tokens_per_s": useful_seen / all_step_time if all_step_time else None,
        "wall_s": whole_run["wall_s"], "model_dir": str(model_dir),
        "resumed_from": resumed_from(setup.ckpt, setup.saved),
    }


def run(project, variant: str, run, *, resume: bool = False, progress: bool = True) -> dict:
    """Stage entry point: pretrain `pretrain.<variant>` on the project's training texts.

    Only the train split is used, so the eval split stays unseen by the model that is evaluated on it.
    The model lands in the run's artifacts/model, where `model: run:pretrain/<variant>` finds it.
    """

    cfg = project.config.pretrain[variant]
    texts: list[str] = []
    if project.config.data is not None and project.config.data.train:
        texts = corpus_texts(load_splits(project.config.data, project.dir, require_target=False).train)
    summary = train(cfg, texts, run.artifacts, resume=resume, log=run.log, progress=progress,
                    project_dir=project.dir, on_resume=run.rewind)
    run.finish(summary)
    return summary


def _inputs(project, config: dict, identify) -> dict:
    """Extra pretraining text files count as inputs too."""

    return {"corpus": [fingerprint(path, project.dir) for path in config["corpus"]]} if config.get("corpus") else {}


STAGE = Stage(name="pretrain", section=dict[str, PretrainConfig], run=run, variants=section_variants("pretrain"),
              inputs=_inputs, summary="train a tokenizer and a T5- or GPT-style model from scratch")
