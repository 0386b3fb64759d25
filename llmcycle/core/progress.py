"""Rich progress bars (count, rate, ETA) for long work, drawn on stderr so --json output stays clean."""
from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator


def _rate_column(unit: str):
    from rich.progress import ProgressColumn
    from rich.text import Text

    class RateColumn(ProgressColumn):
        def render(self, task):
            return Text(f"{task.speed:,.1f} {unit}/s" if task.speed else f"- {unit}/s", style="cyan")

    return RateColumn()


@contextmanager
def bar(total: int, label: str, *, enabled: bool = True, unit: str = "ex") -> Iterator[Callable[[int], None]]:
    """Yields `update(completed)`; a no-op when disabled (tests, --json)."""
    if not enabled:
        yield lambda n: None
        return
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
    )

    progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                        _rate_column(unit), TimeRemainingColumn(), console=Console(stderr=True))
    with progress:
        task = progress.add_task(label, total=total)
        yield lambda n: progress.update(task, completed=n)


def notice(message: str) -> None:
    """A line the user must see (what a stage skipped, a figure measured on too few examples): yellow
    on stderr, so --json output stays clean; once, from rank 0 only, under torchrun."""
    import os

    from rich.console import Console

    from llmcycle.core.textsafe import as_text

    if int(os.environ.get("RANK", "0")) == 0:
        Console(stderr=True, soft_wrap=True).print(as_text(message, style="yellow"))
