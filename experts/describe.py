"""Words for detections: plurals and rough positions, in the form a language model reads well.

"4 people (2 bottom left, 2 bottom right), 1 bus (centre)" tells a model more per token than a list
of boxes, and it cannot misread pixel coordinates.
"""
from __future__ import annotations

from collections import Counter
from typing import Iterable, Sequence

# COCO labels whose plural is not label + "s"; labels already plural get a counting noun.
_IRREGULAR: dict[str, tuple[str, str]] = {
    "person": ("person", "people"),
    "sheep": ("sheep", "sheep"),
    "knife": ("knife", "knives"),
    "mouse": ("mouse", "mice"),
    "skis": ("pair of skis", "pairs of skis"),
    "scissors": ("pair of scissors", "pairs of scissors"),
}

COLUMNS = ("left", "centre", "right")
ROWS = ("top", "middle", "bottom")


def plural(label: str) -> str:
    """English plural of a (possibly multi-word) label: the last word changes."""
    if label in _IRREGULAR:
        return _IRREGULAR[label][1]
    head, _, last = label.rpartition(" ")
    if last.endswith(("s", "x", "z", "ch", "sh")):
        last += "es"
    elif last.endswith("y") and len(last) > 1 and last[-2] not in "aeiou":
        last = last[:-1] + "ies"
    else:
        last += "s"
    return f"{head} {last}" if head else last


def count_phrase(n: int, label: str) -> str:
    """'1 bus', '2 buses', '3 people'."""
    singular = _IRREGULAR.get(label, (label, ""))[0]
    return f"{n} {singular if n == 1 else plural(label)}"


def region(box: Sequence[float], width: float, height: float) -> str:
    """Cell of a 3x3 grid holding the box centre: 'top left', 'left', 'centre', 'bottom centre'..."""
    x0, y0, x1, y1 = box[:4]
    cx, cy = (x0 + x1) / 2 / max(width, 1e-9), (y0 + y1) / 2 / max(height, 1e-9)
    col = COLUMNS[min(2, max(0, int(cx * 3)))]
    row = ROWS[min(2, max(0, int(cy * 3)))]
    if row == "middle":
        return col
    return f"{row} {col}"


def regions_phrase(regions: Iterable[str]) -> str:
    """'centre' when all share one region, else '2 bottom left, 1 right' (most populated first)."""
    counts = Counter(regions)
    if len(counts) == 1:
        return next(iter(counts))
    ordered = sorted(counts.items(), key=lambda kv: (-kv[1], _grid_order(kv[0])))
    return ", ".join(f"{n} {name}" for name, n in ordered)


def _grid_order(name: str) -> int:
    """Reading order of grid cells, so ties list top-left before bottom-right."""
    parts = name.split()
    row = parts[0] if parts[0] in ROWS else "middle"
    col = parts[-1]
    return ROWS.index(row) * 3 + COLUMNS.index(col)
