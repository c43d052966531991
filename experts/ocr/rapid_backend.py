"""RapidOCR backend (PP-OCR models run by onnxruntime, shipped inside the `rapidocr-onnxruntime`
wheel): OCR that works offline out of the box.

Its recogniser is trained mostly on Chinese and often drops the spaces between English words in
small text ("Cleanhandswithsoapandwater"). It reports where each character sits, so spaces are put
back where the gap between two characters is wide compared with the characters themselves. Those
positions are coarse (one recogniser column is about a sixth of the text height), so this is done
only for lines in which the recogniser emitted no space at all, with a threshold high enough that on
the fixtures it never splits a word: some missing spaces remain, no words are broken.
"""
from __future__ import annotations

import importlib.util
from dataclasses import asdict, dataclass
from statistics import median
from typing import Any, Mapping, Sequence

from PIL import Image

from .layout import TextBox, quad_from


@dataclass
class RapidOCRConfig:
    min_score: float = 0.5  # recognition confidence below which a box is dropped
    box_thresh: float = 0.5  # detector box threshold
    restore_spaces: bool = True  # re-insert spaces from character gaps (see module doc)
    space_gap: float = 0.85  # gap, in median character widths, that counts as a space


class RapidOCRBackend:
    """`read(image) -> [TextBox]` with the packaged PP-OCR models."""

    name = "rapidocr"

    def __init__(self, config: RapidOCRConfig | None = None) -> None:
        self.config = config or RapidOCRConfig()
        self._engine: Any = None

    def unavailable_reason(self) -> str | None:
        if importlib.util.find_spec("rapidocr_onnxruntime") is None:
            return "the rapidocr-onnxruntime package is not installed (pip install -r requirements.txt)"
        return None

    def settings(self) -> Mapping[str, Any]:
        return asdict(self.config)

    def _load(self) -> Any:
        if self._engine is None:
            from rapidocr_onnxruntime import RapidOCR

            self._engine = RapidOCR()  # models are read from the package folder; no network
        return self._engine

    def read(self, image: Image.Image) -> list[TextBox]:
        cfg = self.config
        raw, _ = self._load()(
            image.convert("RGB"),
            return_word_box=cfg.restore_spaces,
            text_score=cfg.min_score,
            box_thresh=cfg.box_thresh,
            unclip_ratio=1.6,
        )
        boxes = []
        for item in raw or []:
            quad, text, score = quad_from(item[0]), str(item[1]), float(item[2])
            if cfg.restore_spaces and " " not in text and len(item) >= 5:
                text = restore_spaces(item[4], item[3], quad, cfg.space_gap) or text
            if score >= cfg.min_score and text.strip():
                boxes.append(TextBox(text.strip(), quad, score))
        return boxes


def restore_spaces(
    chars: Sequence[str],
    char_quads: Sequence[Sequence[Sequence[float]]],
    line_quad: Sequence[Sequence[float]],
    gap_ratio: float,
) -> str:
    """Rebuild a line's text, adding a space wherever two word characters are separated by more
    than `gap_ratio` median character widths along the line's direction.

    Returns '' when the character data does not line up, so the caller keeps the original text.
    """
    if len(chars) != len(char_quads) or len(chars) < 2:
        return ""
    (x0, y0), (x1, y1) = line_quad[0], line_quad[1]
    length = ((x1 - x0) ** 2 + (y1 - y0) ** 2) ** 0.5 or 1.0
    ux, uy = (x1 - x0) / length, (y1 - y0) / length  # unit vector along the text line
    spans = []
    for quad in char_quads:
        along = [p[0] * ux + p[1] * uy for p in quad]
        spans.append((min(along), max(along)))
    widths = [hi - lo for lo, hi in spans if hi > lo]
    if not widths:
        return ""
    threshold = gap_ratio * median(widths)
    out = [chars[0]]
    for i in range(1, len(chars)):
        prev, cur = chars[i - 1], chars[i]
        gap = spans[i][0] - spans[i - 1][1]
        if prev != " " and cur != " " and _wordish(prev) and _opens_word(cur) and gap > threshold:
            out.append(" ")
        out.append(cur)
    return "".join(out)


def _wordish(ch: str) -> bool:
    """A character a word can end with (letters, digits, closing punctuation); not CJK."""
    return (ch.isalnum() or ch in ".,;:!?)]'\"%") and not "\u4e00" <= ch <= "\u9fff"


def _opens_word(ch: str) -> bool:
    """A character a new word can start with; never closing punctuation (no 'word :')."""
    return (ch.isalnum() or ch in "([\"'&+-") and not "\u4e00" <= ch <= "\u9fff"
