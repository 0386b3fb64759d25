"""Peak memory of one piece of work inside a longer-lived process, and giving freed memory back.

A process's peak RSS (ru_maxrss) only ever grows, so when `llmcycle tune` trains several variants in
one process the second would inherit the first's peak. On Linux, writing 5 to /proc/self/clear_refs
resets the peak (VmHWM) to the current RSS; on a GPU, torch resets its own peak counter.

torch's CPU tensors come from malloc. glibc's malloc keeps what is freed (it raises its mmap
threshold after the first large free, so later activations live on the heap) and returns it to the
system only from the top of the heap: a training step's freed activations stay resident and the next
phase piles new ones beside them. release_free_memory (malloc_trim) hands the free pages back between
phases; the training loop calls it where one phase's temporaries are dead and the next's not yet made.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import resource
import sys
from pathlib import Path

_STATUS = Path("/proc/self/status")
_TRIM: list = []  # [malloc_trim or None], resolved once


def reset_peak(device=None) -> bool:
    """Start measuring a new peak; False where the platform cannot (then the process peak is used)."""
    if getattr(device, "type", device) == "cuda":
        import torch

        torch.cuda.reset_peak_memory_stats()
        return True
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def peak_mb(device=None) -> float:
    """Peak memory since the last reset_peak: GPU memory allocated by torch, or resident set size."""
    if getattr(device, "type", device) == "cuda":
        import torch

        return torch.cuda.max_memory_allocated() / 2**20
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def release_free_memory() -> bool:
    """Return the C heap's free pages to the system (glibc malloc_trim); False where there is no such
    call (macOS, Windows, musl). Costs a walk over the heap's free chunks, and pages handed back fault
    in again when reused: call it between phases whose temporaries differ (after a forward pass), not
    inside them."""
    if not _TRIM:
        trim = None
        if sys.platform.startswith("linux"):
            try:
                trim = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
                trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
            except (OSError, AttributeError):
                trim = None
        _TRIM.append(trim)
    if _TRIM[0] is None:
        return False
    _TRIM[0](0)
    return True
