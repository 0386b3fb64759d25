"""Resumable training checkpoints shared by the training stages (pretrain, tune, ...).

A checkpoint is `checkpoints/step-<N>/` with the model (save_pretrained), `trainer_state.pt`
(optimizer, scheduler and every random stream), `state.json` (step, data position, the config that
shaped the weights) and a COMPLETE marker. It is written into a temporary folder, fsynced and renamed
into place, so a crash at any moment leaves either no step-N folder or a whole one; the last
KEEP_CHECKPOINTS are kept. Restoring the random streams with the weights is what lets a resumed run
end exactly where an uninterrupted one does.

A sharded run's checkpoint (training/sharding.py) has `dcp/` instead of `model/` and the optimizer in
trainer_state.pt: every rank writes its shards of both there (torch.distributed.checkpoint) into the
same temporary folder, and rank 0 renames it into place once all are written.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import random
import shutil
from pathlib import Path

from llmcycle.core.errors import UserError
from llmcycle.core.files import fsync_dir, fsync_tree, quiet_saves

COMPLETE_MARKER = "COMPLETE"
KEEP_CHECKPOINTS = 2
TRAINER_KEYS = {"optimizer", "scheduler", "rng_python", "rng_numpy", "rng_torch"}


def config_hash(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def step_dirs(root: Path) -> list[tuple[int, Path]]:
    out = []
    if root.is_dir():
        for p in root.iterdir():
            if p.is_dir() and p.name.startswith("step-") and p.name[5:].isdigit():
                out.append((int(p.name[5:]), p))
    return sorted(out)


def save_checkpoint(root: Path, step: int, model, optimizer, scheduler, state: dict) -> Path:
    """Write checkpoints/step-<step>/ atomically (see the module docstring)."""
    import torch

    tmp = _fresh_tmp(root, step, os.getpid())
    with quiet_saves():
        model.save_pretrained(str(tmp / "model"))  # safetensors
    torch.save({"optimizer": optimizer.state_dict(), **_trainer_extras(scheduler)}, tmp / "trainer_state.pt")
    return _commit(root, tmp, step, state)


def save_sharded_checkpoint(root: Path, step: int, write_shards, scheduler, state: dict, *, main: bool,
                            barrier) -> Path:
    """checkpoints/step-<step>/ of a sharded run, as atomically as save_checkpoint: every rank calls it;
    write_shards(folder) has each rank write its shards of the weights and optimizer state (a collective)
    into the same temporary folder, then rank 0 adds the scheduler, random streams, state.json and the
    marker and renames it into place. The folder must be one all ranks see (a shared filesystem)."""
    import torch

    tmp = root / f".tmp-step-{step}-sharded"
    if main:
        _fresh_tmp(root, step, "sharded")
    barrier()
    write_shards(tmp / "dcp")
    barrier()  # every rank's shards are on disk before the checkpoint is declared complete
    final = root / f"step-{step}"
    if main:
        torch.save(_trainer_extras(scheduler), tmp / "trainer_state.pt")
        _commit(root, tmp, step, state)
    barrier()
    return final


def _fresh_tmp(root: Path, step: int, tag) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f".tmp-step-{step}-{tag}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    return tmp


def _trainer_extras(scheduler) -> dict:
    """The scheduler and every random stream: what a checkpoint holds beside weights and optimizer."""
    import numpy as np
    import torch

    np_state = np.random.get_state()
    return {
        "scheduler": scheduler.state_dict(),
        "rng_python": random.getstate(),
        # numpy's state holds an ndarray; store it as a list so torch.load(weights_only=True) reads it
        "rng_numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]],
        "rng_torch": torch.get_rng_state(),
    }


def _commit(root: Path, tmp: Path, step: int, state: dict) -> Path:
    """state.json and the marker into `tmp`, fsynced, renamed to step-<step>; older ones pruned."""
    final = root / f"step-{step}"
    (tmp / "state.json").write_text(json.dumps(state, indent=2))
    (tmp / COMPLETE_MARKER).write_text(f"{step}\n")
    fsync_tree(tmp)
    if final.exists():  # only when re-saving a step already on disk
        shutil.rmtree(final)
    os.replace(tmp, final)
    fsync_dir(root)
    for _, old in step_dirs(root)[:-KEEP_CHECKPOINTS]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def is_sharded(path: Path) -> bool:
    """Whether a checkpoint holds DCP shards (a sharded run's) rather than a model folder."""
    return (Path(path) / "dcp").is_dir()


def latest_checkpoint(root: Path) -> Path | None:
    """The newest step-N dir, or None. A newest dir without its marker was not written by
    save_checkpoint's rename (tampering, a copy, a broken disk): reported, not skipped."""
    dirs = step_dirs(root)
    if not dirs:
        return None
    path = dirs[-1][1]
    if not (path / COMPLETE_MARKER).is_file():
        raise UserError(f"corrupt checkpoint {path}: no {COMPLETE_MARKER} marker "
                        "(delete it to resume from an older one)")
    return path


def read_state(path: Path) -> dict:
    try:
        return json.loads((path / "state.json").read_text())
    except (OSError, ValueError) as exc:
        raise UserError(f"corrupt checkpoint {path}: {exc}") from None


def unusable(path: Path, exc: Exception) -> UserError:
    reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    return UserError(f"corrupt checkpoint {path}: {reason}")


def load_trainer_state(path: Path) -> dict:
    import torch

    try:
        trainer_state = torch.load(path / "trainer_state.pt", weights_only=True)
        missing = TRAINER_KEYS - set(trainer_state) - ({"optimizer"} if is_sharded(path) else set())
        if missing:
            raise ValueError(f"trainer_state.pt lacks {sorted(missing)}")
    except Exception as exc:  # noqa: BLE001 - any load failure means the checkpoint is unusable
        raise unusable(path, exc) from None
    return trainer_state


def _tuplify(x):
    """random.setstate needs tuples; torch.load hands the saved tuples back as tuples or lists."""
    return tuple(_tuplify(v) for v in x) if isinstance(x, (list, tuple)) else x


def restore_training_state(trainer_state: dict, optimizer, scheduler) -> None:
    """Optimizer, scheduler and every random stream as they were when the checkpoint was saved."""
    import numpy as np
    import torch

    if "optimizer" in trainer_state:  # a sharded checkpoint's optimizer state is in its shards
        optimizer.load_state_dict(trainer_state["optimizer"])
    scheduler.load_state_dict(trainer_state["scheduler"])
    random.setstate(_tuplify(trainer_state["rng_python"]))
    np_state = trainer_state["rng_numpy"]
    np.random.set_state((np_state[0], np.asarray(np_state[1], dtype=np.uint32), *np_state[2:]))
    torch.set_rng_state(trainer_state["rng_torch"])


def _fmt(v) -> str:
    return json.dumps(v) if isinstance(v, (str, list, dict)) else str(v)


def check_same_run(path: Path, state: dict, config: dict, data_hash: str, extra: dict | None = None) -> None:
    """Refuse to resume when what shapes the weights changed; show every difference `key: old → new`."""
    old = state.get("config", {})
    diffs = [f"{k}: {_fmt(old.get(k))} → {_fmt(config.get(k))}"
             for k in sorted(set(old) | set(config)) if old.get(k) != config.get(k)]
    for key, value in (extra or {}).items():
        if state.get(key) != value:
            diffs.append(f"{key}: {state.get(key)} → {value}")
    if state.get("data_hash") != data_hash:
        diffs.append(f"training data: {state.get('data_hash')} → {data_hash} (content hash)")
    if diffs:
        raise UserError(f"cannot resume from {path}: training settings differ from the checkpoint's: "
                        + "; ".join(diffs) + " (restore them, or start a fresh run without --resume)")


def resumed_from(ckpt: Path | None, state: dict) -> dict | None:
    """What a summary records of a resume: the step and checkpoint it continued from, and when that
    checkpoint was written (None for a run that started fresh)."""
    if ckpt is None:
        return None
    return {"step": state.get("step"), "checkpoint": f"{Path(ckpt).parent.name}/{Path(ckpt).name}",
            "checkpoint_time": state.get("time")}


def lr_factor(step: int, warmup: int, total: int, schedule: str = "cosine") -> float:
    """Linear warmup to the peak lr over `warmup` steps, then linear or cosine decay to 0 at `total`."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    if schedule == "linear":
        return 1.0 - progress
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def training_bar(enabled: bool):
    """A rich progress bar for training steps: steps/s, ETA, and live loss and tokens/s fields."""
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        ProgressColumn,
        TextColumn,
        TimeRemainingColumn,
    )
    from rich.text import Text

    class StepRate(ProgressColumn):
        def render(self, task):
            return Text(f"{task.speed:.2f} step/s" if task.speed else "- step/s")

    return Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), StepRate(),
        TimeRemainingColumn(), TextColumn("loss {task.fields[loss]}  tok/s {task.fields[tps]}"),
        console=Console(stderr=True), disable=not enabled,
    )
