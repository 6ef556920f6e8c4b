"""Plain-text tables and value formatting for the `fleet` CLI (no third-party dependency)."""

from __future__ import annotations

import math
import time
from typing import Any, List, Optional, Sequence


def cell(value: Any) -> str:
    """One table cell: None is ``-``, floats are shortened, bools are yes/no."""
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        if math.isnan(value) or math.isinf(value):
            return "-"
        if abs(value) >= 100:
            return "%.0f" % value
        if abs(value) >= 10:
            return "%.1f" % value
        return "%.2f" % value
    return str(value)


def render_table(headers: Sequence[str], rows: Sequence[Sequence[Any]], *, numeric: Sequence[int] = ()) -> str:
    """Columns padded to the widest cell, numeric columns (by index) right-aligned, two spaces apart."""
    text_rows: List[List[str]] = [[cell(v) for v in r] for r in rows]
    widths = [len(h) for h in headers]
    for r in text_rows:
        for i, v in enumerate(r):
            widths[i] = max(widths[i], len(v))

    def line(values: Sequence[str]) -> str:
        parts = []
        for i, v in enumerate(values):
            parts.append(v.rjust(widths[i]) if i in numeric else v.ljust(widths[i]))
        return "  ".join(parts).rstrip()

    out = [line(list(headers))]
    out += [line(r) for r in text_rows]
    return "\n".join(out)


def age(ts: Optional[float], now: Optional[float] = None) -> str:
    """How long ago `ts` was, in the largest sensible unit (``4s``, ``12m``, ``3h``, ``2d``)."""
    if ts is None:
        return "-"
    secs = max(0.0, (time.time() if now is None else now) - ts)
    if secs < 90:
        return "%ds" % secs
    if secs < 90 * 60:
        return "%dm" % (secs / 60)
    if secs < 36 * 3600:
        return "%dh" % (secs / 3600)
    return "%dd" % (secs / 86400)


def bundle_text(ref: Optional[dict]) -> str:
    """``name v3`` or ``-``."""
    if not ref or ref.get("name") is None:
        return "-"
    return "%s v%s" % (ref["name"], ref.get("version"))


def percent(value: Optional[float]) -> str:
    """A fraction as a percentage (``0.031`` → ``3.1%``)."""
    if value is None:
        return "-"
    return "%.1f%%" % (value * 100)


def bar(done: int, total: int, width: int = 20) -> str:
    """A progress bar ``[#####.....]``."""
    if total <= 0:
        return "[" + "." * width + "]"
    filled = (width * min(done, total) + total // 2) // total
    return "[" + "#" * filled + "." * (width - filled) + "]"
