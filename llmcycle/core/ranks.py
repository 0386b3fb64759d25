"""The processes of a torchrun launch: which one this is, the process group, results gathered in order.

torchrun sets RANK and WORLD_SIZE. Rank 0 is the one that writes the run store and prints; every rank
runs the same stage code, so work that all of them reach together (an evaluation) can be split between
them and gathered. The process group is started on first use: NCCL on a GPU, gloo on a CPU. A gather
waits at most GATHER_TIMEOUT_S for the other ranks; a rank that died makes the others fail with a
clear error instead of hanging (torch raises when the timeout passes).
"""
from __future__ import annotations

import contextlib
import os
from datetime import timedelta

GATHER_TIMEOUT_S = int(os.environ.get("LLMCYCLE_GATHER_TIMEOUT_S", "600"))


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_main() -> bool:
    """Rank 0 of a torchrun launch, or a plain single process: the one that writes and prints."""
    return rank() == 0


def ensure_group():
    """The default process group, started if torchrun launched several processes and nobody has yet."""
    import torch
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo",
                                timeout=timedelta(seconds=GATHER_TIMEOUT_S))
    return dist


def gather_in_order(local: dict[int, object], n: int) -> list:
    """Every rank's {index: item} merged into one list of n items on every rank; an index no rank
    filled is an error (a split that lost work), never a silent None."""
    from llmcycle.core.errors import UserError

    dist = ensure_group()
    parts: list = [None] * dist.get_world_size()
    try:
        dist.all_gather_object(parts, local)
    except RuntimeError as exc:  # a rank that died or timed out
        raise UserError(f"rank {rank()}: gathering results from the other processes failed ({exc}); another "
                        "rank stopped, see its error above") from None
    merged: list = [None] * n
    for part in parts:
        for i, item in part.items():
            merged[i] = item
    missing = [i for i, item in enumerate(merged) if item is None]
    if missing:
        raise UserError(f"rank {rank()}: {len(missing)} of {n} results came back from no process (first: {missing[0]})")
    return merged


def _collective_failure(exc: BaseException) -> bool:
    import torch.distributed as dist

    text = str(exc).lower()
    return isinstance(exc, dist.DistError) or any(w in text for w in ("gloo", "nccl", "timed out", "closed by peer",
                                                                        "connection reset", "broken pipe"))


@contextlib.contextmanager
def peers_watched(what: str):
    """Work that talks to the other processes (training steps, checkpoints): a collective that fails
    because another rank died, or did not answer within GATHER_TIMEOUT_S, becomes one clear line
    instead of a traceback (or a hang: torch raises once the process group's timeout passes)."""
    from llmcycle.core.errors import UserError

    try:
        yield
    except RuntimeError as exc:
        if world_size() == 1 or not _collective_failure(exc):
            raise
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise UserError(f"rank {rank()}: {what} stopped: another of the {world_size()} processes died or did not "
                        f"answer within {GATHER_TIMEOUT_S} s (LLMCYCLE_GATHER_TIMEOUT_S) ({first}); see that "
                        "rank's error, then rerun with --resume") from None
