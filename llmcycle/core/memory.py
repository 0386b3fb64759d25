"""Peak memory of one piece of work inside a longer-lived process, and giving freed memory back.

A process's peak RSS (ru_maxrss) only ever grows, so when `llmcycle tune` trains several variants in
one process the second would inherit the first's peak. On Linux, writing 5 to /proc/self/clear_refs
resets the peak (VmHWM) to the current RSS; on a GPU, torch resets its own peak counter.

torch's CPU tensors come from malloc. glibc's malloc keeps what is freed (it raises its mmap
threshold after the first large free, so later activations live on the heap) and returns it to the
system only from the top of the heap: a training step's freed activations stay resident and the next
phase piles new ones beside them. Two remedies, used by the training loop on CPU:
release_free_memory (malloc_trim) hands the heap's free pages back between phases, where one phase's
temporaries are dead and the next's not yet made (always: it costs nothing measurable); with
gradient checkpointing (a run that chose memory over speed) also large_blocks_off_the_heap (mallopt
M_MMAP_THRESHOLD), which keeps every block of 1 MiB or more in its own mapping, returned to the
system the moment it is freed, at the price of fresh pages for each large tensor.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os
import resource
import sys
from pathlib import Path

_STATUS = Path("/proc/self/status")
_LIBC: list = []  # [the C library or None], resolved once
M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number


def _on_cuda(device) -> bool:
    """torch.device('cuda', 1), 'cuda:1' and 'cuda' alike."""
    return str(getattr(device, "type", device) or "").split(":")[0] == "cuda"


def reset_peak(device=None) -> bool:
    """Start measuring a new peak; False where the platform cannot (then the process peak is used)."""
    if _on_cuda(device):
        import torch

        torch.cuda.reset_peak_memory_stats()
        return True
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def peak_mb(device=None) -> float:
    """Peak memory since the last reset_peak: GPU memory allocated by torch (its tensors, not the
    allocator's reserve nor the CUDA context), or the process's peak resident set size (VmHWM, which
    reset_peak sets back; elsewhere ru_maxrss, which never goes down)."""
    if _on_cuda(device):
        import torch

        return torch.cuda.max_memory_allocated() / 2**20
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def _libc():
    if not _LIBC:
        lib = None
        if sys.platform.startswith("linux"):
            try:
                lib = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            except OSError:
                lib = None
        for name, args in (("malloc_trim", [ctypes.c_size_t]), ("mallopt", [ctypes.c_int, ctypes.c_int])):
            fn = getattr(lib, name, None)  # absent outside glibc (musl has no malloc_trim)
            if fn is not None:
                fn.argtypes, fn.restype = args, ctypes.c_int
        _LIBC.append(lib)
    return _LIBC[0]


def release_free_memory() -> bool:
    """Return the C heap's free pages to the system (glibc malloc_trim); False where there is no such
    call (macOS, Windows, musl). Costs a walk over the heap's free chunks, and pages handed back fault
    in again when reused: call it between phases whose temporaries differ (after a forward pass), not
    inside them."""
    trim = getattr(_libc(), "malloc_trim", None)
    if trim is None:
        return False
    trim(0)
    return True


def large_blocks_off_the_heap(threshold_bytes: int = 1 << 20) -> bool:
    """Serve every allocation of threshold_bytes or more from its own mapping (glibc mallopt
    M_MMAP_THRESHOLD), for the rest of the process; False where the C library has no mallopt.

    glibc starts with a 128 KiB threshold but raises it (up to 32 MiB) each time a mapped block is
    freed, so after the first training step the activations move onto the heap, where freed holes
    are too fragmented to reuse and stay resident: a LoRA step on a t5-small-sized model peaked about
    300 MiB higher that way. A fixed threshold also turns the raising off. The cost is a mmap/munmap
    and fresh (zeroed, faulted-in) pages per large tensor: LoRA steps on that model ran at 0.76x the
    speed with gradient checkpointing and 0.82x without, on 2 CPU cores."""
    mallopt = getattr(_libc(), "mallopt", None)
    if mallopt is None:
        return False
    return mallopt(M_MMAP_THRESHOLD, int(threshold_bytes)) == 1


def available_mb() -> float:
    """Memory the system can still give without swapping (Linux's MemAvailable), in MiB; elsewhere the
    free physical pages."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") / 2**20
