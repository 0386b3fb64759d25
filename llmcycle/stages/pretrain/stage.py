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
from llmcycle.training.loop import adamw, as_floats
from llmcycle.training.checkpoints import (
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
    unusable,
)

# Fields that do not change the trained weights: they may differ when resuming.
NOT_TRAINING_RELEVANT = {"checkpoint_every", "log_every"}


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
    model: object
    optimizer: object
    scheduler: object
    batches_per_epoch: int
    total_steps: int


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
    with training_bar(progress) as bar:
        bar_task = bar.add_task(f"pretrain {cfg.architecture}", total=setup.total_steps, completed=state.step,
                                loss="-", tps="-")
        order_epoch, order = None, None
        while state.step < setup.total_steps:
            if order_epoch != state.epoch:  # data order is a function of (seed, epoch): replayable on resume
                order_epoch, order = state.epoch, setup.data.order(state.epoch)
            lr = optimizer_step(setup, state, order)
            if state.step % cfg.log_every == 0 or state.step == setup.total_steps:
                report_losses(setup, state, lr, log, bar, bar_task)
            bar.update(bar_task, completed=state.step)
            if state.step % cfg.checkpoint_every == 0 or state.step == setup.total_steps:
                save_checkpoint(setup.ckpt_root, state.step, setup.model, setup.optimizer, setup.scheduler,
                                checkpoint_state(setup, state))
    return summarize(setup, state, save_model(setup))


def prepare(cfg: PretrainConfig, texts: list[str], work_dir: Path, *, resume: bool,
            project_dir: Path | None, tokenizer, on_resume: Callable[[int], object] | None) -> PretrainSetup:
    """The texts, the tokenizer (trained, given or the checkpoint's), the dataset and the model with its
    optimizer, resumed from the newest checkpoint when `resume`."""

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
    model, optimizer, scheduler = _model_and_optimizer(cfg, tokenizer, ckpt, total_steps)
    return PretrainSetup(cfg=cfg, work_dir=work_dir, ckpt_root=ckpt_root, ckpt=ckpt, saved=saved,
                         data_hash=data_hash, tokenizer=tokenizer, data=data, model=model, optimizer=optimizer,
                         scheduler=scheduler, batches_per_epoch=batches_per_epoch, total_steps=total_steps)


def _open_checkpoints(cfg: PretrainConfig, texts: list[str], ckpt_root: Path, tok_dir: Path, resume: bool,
                      data_hash: str, tokenizer, on_resume: Callable[[int], object] | None):
    """(the checkpoint to resume from or None, its state.json or {}, the tokenizer to train with), once the
    checkpoint is known to match this run; a fresh run clears older checkpoints and saves its tokenizer."""
    from transformers import AutoTokenizer

    ckpt = latest_checkpoint(ckpt_root) if resume else None
    saved: dict = {}
    if ckpt is not None:
        saved = read_state(ckpt)
        check_same_run(ckpt, saved, _relevant(cfg), data_hash)
        try:
            tokenizer = AutoTokenizer.from_pretrained(str(tok_dir))
        except Exception as exc:  # noqa: BLE001
            raise UserError(f"cannot resume: tokenizer in {tok_dir} does not load ({exc})") from None
        if on_resume is not None:
            on_resume(saved["step"])
    else:
        shutil.rmtree(ckpt_root, ignore_errors=True)  # a fresh run must not mix with an older one's checkpoints
        if tokenizer is None:
            tokenizer = train_tokenizer(texts, cfg, tok_dir)
        else:
            tokenizer.save_pretrained(str(tok_dir))
    for stale in ckpt_root.glob(".tmp-*") if ckpt_root.is_dir() else []:  # saves cut short by a crash
        shutil.rmtree(stale, ignore_errors=True)
    return ckpt, saved, tokenizer


def _model_and_optimizer(cfg: PretrainConfig, tokenizer, ckpt: Path | None, total_steps: int):
    """(model in train mode, AdamW, its lr schedule): seeded and new, or as the checkpoint saved them."""
    import numpy as np
    import torch

    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    if ckpt is not None:
        model, trainer_state = _load_checkpoint(ckpt, cfg)
    else:
        model, trainer_state = model_class(cfg.architecture)(build_model_config(cfg, tokenizer)), None
    if cfg.architecture == "gpt":
        model.loss_type = "ForCausalLM"  # GPT2LMHeadModel leaves it unset and warns on first use
    model.train()  # from_pretrained returns eval mode; dropout must match the uninterrupted run

    # no weight decay on biases and norm scales (1-d), the usual AdamW practice
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = adamw([{"params": [p for p in params if p.ndim >= 2], "weight_decay": cfg.weight_decay},
                       {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}], cfg.lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, cfg.warmup_steps, total_steps, "cosine"))
    if trainer_state is not None:
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
    loss = setup.model(**batch).loss
    loss.backward()
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


def save_model(setup: PretrainSetup) -> Path:
    """work_dir/model/ with the tokenizer, replaced atomically; returns its path."""
    model_dir = setup.work_dir / "model"
    tmp = setup.work_dir / f".tmp-model-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    with quiet_saves():
        setup.model.save_pretrained(str(tmp))
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
