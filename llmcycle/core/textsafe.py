"""Text that came from data, models or users, made safe to show.

Such text may look like rich markup (Llama-2 chat data holds `[/INST]`; a model may write `[bold]`) or
hold terminal control sequences (`\\x1b[31m`, OSC titles and hyperlinks). Printed as it is, the first
crashes rich or restyles the table and the second drives the user's terminal. Here both are shown as
what they are: rich `Text` (never parsed as markup) whose control characters are replaced one for one
by visible symbols, so character offsets (the marked spans of invented entities) stay valid.
"""
from __future__ import annotations

import re

# C0 controls but newline and tab, DEL, and the C1 controls (0x9b is a one-byte CSI on some terminals)
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def _picture(match: re.Match) -> str:
    code = ord(match.group())
    if code < 0x20:
        return chr(0x2400 + code)  # Unicode's control pictures: ESC is shown as ␛
    return "\u2421" if code == 0x7F else "\ufffd"  # ␡ for DEL; C1 controls have no pictures


def visible(text: str) -> str:
    """`text` with every control character but newline and tab replaced by a visible symbol."""
    return _CONTROL.sub(_picture, text)


def as_text(text: str, style: str = ""):
    """`text` as a rich Text: printed literally, control characters visible."""
    from rich.text import Text

    return Text(visible(text), style=style)
