"""Peak memory of one piece of work inside a longer-lived process.

A process's peak RSS (ru_maxrss) only ever grows, so when `llmcycle tune` trains several variants in
one process the second would inherit the first's peak. On Linux, writing 5 to /proc/self/clear_refs
resets the peak (VmHWM) to the current RSS; on a GPU, torch resets its own peak counter.
"""
from __future__ import annotations

import resource
from pathlib import Path

_STATUS = Path("/proc/self/status")


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
