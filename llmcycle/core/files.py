"""Files written so that a crash never leaves half of one: fsync of a folder tree, and library
saves and loads without their progress bars and notices."""
from __future__ import annotations

import contextlib
import os
from pathlib import Path


@contextlib.contextmanager
def quiet_saves():
    """save_pretrained draws its own 'Writing model shards' bar; keep stderr to our one bar."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


@contextlib.contextmanager
def quiet_loads():
    """from_pretrained prints a weight-loading bar and a report of unused or new weights; the caller
    reports what matters itself (a missing head is expected when training, an error when scoring)."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        with quiet_saves():
            yield
    finally:
        hf_logging.set_verbosity(level)


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(path: Path) -> None:
    for root, _dirs, files in os.walk(path):
        for name in files:
            with open(os.path.join(root, name), "rb") as fh:
                os.fsync(fh.fileno())
    fsync_dir(path)
