"""Base and tuned answers side by side in a terminal (`medtune train`, `medtune compare`).

Fitted to the terminal's width (two columns, or one under the other when it is too narrow), under the
not-fact-checked notice, with the held-out reference answer above them where the prompt has one.
"""

from __future__ import annotations

import shutil
import textwrap
from itertools import zip_longest

from medtune.run.card import NOT_FACT_CHECKED

MIN_COLUMN = 24  # narrower columns are unreadable: stack the answers instead
MAX_WIDTH = 160  # wider lines are hard to follow even on a wide terminal


def terminal_width() -> int:
    return min(shutil.get_terminal_size((100, 24)).columns, MAX_WIDTH)


def wrap(text: str, width: int, indent: str = "") -> list[str]:
    """Each paragraph of `text` wrapped to `width` columns (blank lines kept)."""
    out = []
    for para in text.splitlines() or [""]:
        out += textwrap.wrap(para, width, initial_indent=indent, subsequent_indent=indent) or [""]
    return out


def side_by_side(samples: list[dict], width: int | None = None) -> str:
    """Every sample as text no wider than `width` (default: the terminal's)."""
    if not samples:
        return ""
    width = max(width or terminal_width(), 20)
    lines = wrap(f"Sample answers. {NOT_FACT_CHECKED}", width)
    for s in samples:
        lines += ["", *wrap(f"### {s['prompt']}", width)]
        if s.get("reference"):
            lines += ["REFERENCE (held-out answer):", *wrap(s["reference"], width, "  ")]
        lines += columns(s["base"], s["tuned"], width)
    return "\n".join(lines)


def columns(base: str, tuned: str, width: int) -> list[str]:
    """BASE | TUNED in two columns of (width - 3) // 2, or stacked when the columns would be narrower than MIN_COLUMN."""
    col = (width - 3) // 2
    if col < MIN_COLUMN:
        return ["BASE:", *wrap(base, width, "  "), "TUNED:", *wrap(tuned, width, "  ")]
    out = [f"{'BASE':<{col}} | TUNED", f"{'-' * col}-+-{'-' * col}"]
    for a, b in zip_longest(wrap(base, col), wrap(tuned, col), fillvalue=""):
        out.append(f"{a:<{col}} | {b}".rstrip())
    return out
