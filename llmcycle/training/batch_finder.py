"""`batch_size: auto` for tune: the largest micro-batch whose training step fits in memory.

find_batch_size doubles the batch from `start` until a step does not fit, then bisects between the
last size that fitted and the first that did not. The caller's try_batch runs one real step (forward,
backward, and the optimizer step if it wants that counted) on the n LONGEST training examples: a step
on shorter ones needs less, so a size that fits them fits every batch of the run. "Does not fit" is
an out-of-memory error, or a measured peak above a configured limit (which also makes the search
testable on a CPU without exhausting its memory).

The peak figures come from llmcycle.core.memory (reset_peak, peak_mb); the loop measures with them.
"""
from __future__ import annotations

import gc
import logging
import sys
from typing import Callable

from llmcycle.core import memory  # called through the module, as the loop does: tests may replace it
from llmcycle.core.errors import UserError

log = logging.getLogger(__name__)
# Messages of allocation failures that are not torch.OutOfMemoryError: CUDA/HIP/XPU errors raised as a
# plain RuntimeError ("CUDA error: out of memory"), MPS, and the CPU allocator (both of its wordings).
OOM_MESSAGES = ("out of memory", "can't allocate memory", "not enough memory")
SHRINK_HINT = ("set gradient_checkpointing: true, use method: lora, or shorten the context window "
               "(model.context_window)")


def is_out_of_memory(exc: BaseException) -> bool:
    """Whether `exc` is an allocation failure (so a smaller batch may fit) rather than a bug."""
    if isinstance(exc, MemoryError):
        return True
    torch = sys.modules.get("torch")  # no torch loaded: no torch error to recognise
    if torch is not None and isinstance(exc, torch.cuda.OutOfMemoryError):
        return True
    return isinstance(exc, RuntimeError) and any(m in str(exc).lower() for m in OOM_MESSAGES)


def free_memory() -> None:
    """Give back what a finished try left behind, so the next try starts from the same baseline:
    reference cycles (gc), the CUDA caching allocator's unused blocks, the C heap's free pages."""
    gc.collect()
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.empty_cache()
    memory.release_free_memory()


def _trial(try_batch, n: int, limit_mb, measure) -> tuple[dict, str]:
    """Run one try; returns its trial record and, when it did not fit, why."""
    try:
        try_batch(n)
        oom = None
    except Exception as exc:  # noqa: BLE001 - anything but an allocation failure is re-raised
        if not is_out_of_memory(exc):
            raise
        oom = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
    # Freed outside the except block: until it ends, the traceback keeps the failed step's tensors alive.
    peak = measure() if measure is not None and oom is None else None
    free_memory()
    why = oom or (f"peak {peak:.0f} MiB over the {limit_mb:.0f} MiB limit"
                  if limit_mb is not None and peak > limit_mb else "")
    log.info("batch_size auto: %d %s", n, f"does not fit ({why})" if why else "fits")
    return {"batch_size": n, "fits": not why, "peak_mb": peak}, why


def find_batch_size(try_batch: Callable[[int], None], *, start: int, ceiling: int,
                    limit_mb: float | None = None,
                    measure: Callable[[], float] | None = None) -> tuple[int, list[dict]]:
    """The largest batch size in [1, ceiling] whose step fits, and the trials that found it.

    try_batch(n): one training step on a batch of the n longest examples; it fails by raising an
    out-of-memory error (see is_out_of_memory; other errors propagate). If it steps an optimizer, the
    caller restores the weights afterwards. measure(): the peak MiB of the try just run (typically
    try_batch starts with memory.reset_peak(device) and measure reads memory.peak_mb(device)); with
    limit_mb, a peak above it also means "does not fit". ceiling: the number of training examples,
    since a bigger batch than that never occurs. Trials: {"batch_size", "fits", "peak_mb"} in the
    order run (peak_mb None without measure or after an out-of-memory error).
    Raises UserError when not even a batch of 1 fits."""
    if start < 1 or ceiling < 1:
        raise ValueError(f"start and ceiling must be at least 1, got {start} and {ceiling}")
    if limit_mb is not None and measure is None:
        raise ValueError("limit_mb needs measure, the peak of each try")
    trials: list[dict] = []
    fits, fails, why = 0, None, ""  # largest size that fitted; smallest that did not

    def attempt(n: int) -> bool:
        nonlocal why
        trial, reason = _trial(try_batch, n, limit_mb, measure)
        trials.append(trial)
        why = reason or why
        return trial["fits"]

    n = min(start, ceiling)
    while fails is None and fits < ceiling:  # doubling
        if attempt(n):
            fits, n = n, min(2 * n, ceiling)
        else:
            fails = n
    while fails is not None and fails - fits > 1:  # bisection; from 0 when even `start` failed
        mid = (fits + fails) // 2
        if attempt(mid):
            fits = mid
        else:
            fails = mid
    if fits == 0:
        raise UserError(f"batch_size auto: not even a batch of 1 of the longest examples fits in memory "
                        f"({why}); {SHRINK_HINT}")
    return fits, trials
