"""Numbers for tables (`runs show`, `runs compare`, the report), formatted by their magnitude.

A fixed number of decimals suits the usual figures (a ROUGE of 0.995, a latency of 1,234.5 ms) but
shows a learning rate of 1.41e-5 as 0.000 and widens every column to 25 characters for a perplexity
of 1.9e17. So: fixed decimals with thousands separators in the ordinary range, scientific notation
with three significant digits outside it (1.41e-05, 1.90e+17: eight characters), integers as they are.
"""
from __future__ import annotations

import math

SMALLEST_FIXED = 1e-3  # below: scientific (3 decimals would show 0.000)
LARGEST_FIXED = 1e6  # from here: scientific (1,234,567.8 is as wide as a column should get)


def number(value, digits: int | None = None, missing: str = "n/a") -> str:
    """`value` for a table cell. `digits`: decimals in the ordinary range (default 3 below 10, else 1,
    the tables' long-standing look); `missing` stands for None. Booleans and integers are shown as
    they are; anything that is not a number as str()."""
    if value is None:
        return missing
    if isinstance(value, (bool, int)):
        return str(value)
    try:
        x = float(value)
    except (TypeError, ValueError):
        return str(value)
    if not math.isfinite(x):
        return str(x)  # nan, inf, -inf
    if x != 0 and not SMALLEST_FIXED <= abs(x) < LARGEST_FIXED:
        return f"{x:.2e}"
    places = digits if digits is not None else (3 if abs(x) < 10 else 1)
    return f"{x:,.{places}f}"
