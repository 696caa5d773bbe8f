"""How many rows a fraction of a file is: the one rounding rule of every fraction split (a
table's test split, a file's validation split). No numpy: the size rules import it at
start-up (``config.sizes``)."""

from __future__ import annotations

import math


def fraction_count(fraction: float, n: int) -> int:
    """Rows in a ``fraction`` of ``n`` rows: round half up, at least 1."""
    return max(1, math.floor(fraction * n + 0.5))
