"""OCR boxes, reading order and joining: shared by every OCR backend.

Detectors return text boxes in no particular order. A model reads text best as lines in reading
order: boxes whose vertical centres are close form one row, rows go top to bottom, boxes within a
row left to right; boxes far apart on one row (two signs side by side) are kept apart with ' | '.
"""
from __future__ import annotations

from dataclasses import dataclass
from statistics import median
from typing import Any, Sequence

Point = tuple[float, float]


@dataclass(frozen=True)
class TextBox:
    """One recognised piece of text with its quadrilateral (clockwise from top-left) and score."""

    text: str
    quad: tuple[Point, Point, Point, Point]
    score: float

    @property
    def box(self) -> tuple[float, float, float, float]:
        xs = [p[0] for p in self.quad]
        ys = [p[1] for p in self.quad]
        return min(xs), min(ys), max(xs), max(ys)

    @property
    def centre_y(self) -> float:
        return sum(p[1] for p in self.quad) / 4

    @property
    def height(self) -> float:
        x0, y0, x1, y1 = self.box
        return max(y1 - y0, 1.0)

    def as_dict(self) -> dict[str, Any]:
        return {
            "text": self.text,
            "box": [round(v, 1) for v in self.box],
            "quad": [[round(x, 1), round(y, 1)] for x, y in self.quad],
            "score": round(self.score, 4),
        }


@dataclass(frozen=True)
class TextLine:
    """A row of boxes in reading order, joined into one string."""

    text: str
    boxes: tuple[TextBox, ...]

    @property
    def box(self) -> tuple[float, float, float, float]:
        corners = [b.box for b in self.boxes]
        return (min(c[0] for c in corners), min(c[1] for c in corners),
                max(c[2] for c in corners), max(c[3] for c in corners))

    @property
    def score(self) -> float:
        return min(b.score for b in self.boxes)

    def as_dict(self) -> dict[str, Any]:
        return {"text": self.text, "box": [round(v, 1) for v in self.box], "score": round(self.score, 4)}


def quad_from(points: Sequence[Sequence[float]]) -> tuple[Point, Point, Point, Point]:
    """Normalise a backend's 4-point polygon (lists, arrays, ints) to float tuples."""
    pts = [(float(p[0]), float(p[1])) for p in points]
    if len(pts) != 4:
        raise ValueError(f"expected 4 corner points, got {len(pts)}")
    return pts[0], pts[1], pts[2], pts[3]


def group_rows(boxes: Sequence[TextBox], tolerance: float = 0.5) -> list[list[TextBox]]:
    """Rows of boxes: a box joins a row when its vertical centre is within `tolerance` x the
    smaller of (its height, the row's median height) of the row's mean centre."""
    rows: list[list[TextBox]] = []
    for box in sorted(boxes, key=lambda b: b.centre_y):
        if rows:
            row = rows[-1]
            row_centre = sum(b.centre_y for b in row) / len(row)
            row_height = median(b.height for b in row)
            if abs(box.centre_y - row_centre) <= tolerance * min(box.height, row_height):
                row.append(box)
                continue
        rows.append([box])
    for row in rows:
        row.sort(key=lambda b: b.box[0])
    return rows


def join_row(row: Sequence[TextBox], column_gap: float = 1.5) -> str:
    """Join a row's texts: a space between neighbours, ' | ' across a gap wider than
    `column_gap` x the line height (separate columns or signs, not one sentence)."""
    parts: list[str] = []
    prev: TextBox | None = None
    for box in row:
        text = box.text.strip()
        if not text:
            continue
        if prev is not None:
            gap = box.box[0] - prev.box[2]
            parts.append(" | " if gap > column_gap * max(prev.height, box.height) else " ")
        parts.append(text)
        prev = box
    return "".join(parts)


def reading_order(boxes: Sequence[TextBox]) -> list[TextLine]:
    """Lines top to bottom, each left to right; empty texts dropped."""
    kept = [b for b in boxes if b.text.strip()]
    return [TextLine(join_row(row), tuple(row)) for row in group_rows(kept)]


def text_blocks(lines: Sequence[TextLine], gap: float = 0.5, height_ratio: float = 1.6,
                overlap: float = 0.5) -> list[list[TextLine]]:
    """Lines that read as one piece of text set over several lines (a name on a sign: "World Health" over
    "Organization"), in reading order. A line continues the block of the nearest line above it when the
    space between them is at most `gap` x the taller line's height, their heights differ by at most
    `height_ratio`, and they share at least `overlap` of the narrower one's width. Lines of two signs
    side by side (" | ") stay alone."""
    blocks: list[list[TextLine]] = []
    block_of: dict[int, int] = {}  # index of a line -> index of its block
    for j, line in enumerate(lines):
        x0, y0, x1, y1 = line.box
        height = y1 - y0
        above = None
        if " | " not in line.text:
            for i in range(j - 1, -1, -1):
                prev = lines[i]
                px0, py0, px1, py1 = prev.box
                prev_height = py1 - py0
                shared = min(x1, px1) - max(x0, px0)
                if (" | " not in prev.text and 0 <= y0 - py1 + 0.25 * min(height, prev_height)
                        and y0 - py1 <= gap * max(height, prev_height)
                        and max(height, prev_height) <= height_ratio * max(min(height, prev_height), 1.0)
                        and shared >= overlap * min(x1 - x0, px1 - px0)
                        and blocks[block_of[i]][-1] is prev):
                    above = i
                    break
        if above is None:
            block_of[j] = len(blocks)
            blocks.append([line])
        else:
            block_of[j] = block_of[above]
            blocks[block_of[above]].append(line)
    return blocks
