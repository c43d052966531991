"""The main colour of a region of an image, as a basic colour word ("red", "blue", "white").

The detector says where a motorcycle is, not that it is red; a question about colour needs the pixels.
`main_colour` looks at the middle of a box (its edges are mostly background), and names the hue most of
its coloured pixels share, or, when few pixels are coloured (a white cup, a black suit), black, grey or
white by their brightness. Colour words are the basic ones people use to answer "What colour is it?";
reddish or orange pixels that are dark and muted are brown.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
from PIL import Image

MIDDLE = 0.6  # the central fraction of the box's width and height that is looked at
SAMPLE = 64  # the middle is resized to at most this many pixels a side (speed; colour survives it)
MIN_SATURATION, MIN_VALUE = 0.3, 0.2  # a pixel at least this saturated and bright is coloured
MIN_COLOURED = 0.25  # a region with fewer coloured pixels is named black, grey or white
# hue (degrees) -> name: upper bounds, in order; red wraps round at 360
_HUES = ((15, "red"), (40, "orange"), (70, "yellow"), (165, "green"), (255, "blue"), (290, "purple"),
         (345, "pink"), (360, "red"))
COLOUR_WORDS = frozenset({name for _, name in _HUES} | {"brown", "black", "grey", "gray", "white"})


def _hue_name(hue: np.ndarray) -> np.ndarray:
    """Each hue in degrees -> the index of its name in _HUES."""
    return np.searchsorted(np.array([b for b, _ in _HUES]), hue, side="right").clip(max=len(_HUES) - 1)


def main_colour(image: Image.Image, box: Sequence[float] | None = None) -> str:
    """The colour word for the middle of `box` (x0, y0, x1, y1 in pixels; the whole image when None)."""
    width, height = image.size
    x0, y0, x1, y1 = box[:4] if box is not None else (0, 0, width, height)
    mx, my = (x1 - x0) * (1 - MIDDLE) / 2, (y1 - y0) * (1 - MIDDLE) / 2
    left, top = max(0, int(x0 + mx)), max(0, int(y0 + my))
    right, bottom = min(width, max(left + 1, int(x1 - mx))), min(height, max(top + 1, int(y1 - my)))
    middle = image.crop((left, top, right, bottom)).convert("RGB")  # crop first: only the middle is converted
    middle.thumbnail((SAMPLE, SAMPLE))
    hsv = np.asarray(middle.convert("HSV"), dtype=np.float32).reshape(-1, 3) / 255.0  # [pixels, 3]
    hue, sat, val = hsv[:, 0] * 360.0, hsv[:, 1], hsv[:, 2]
    coloured = (sat >= MIN_SATURATION) & (val >= MIN_VALUE)
    if coloured.mean() < MIN_COLOURED:
        bright = float(np.median(val))
        return "black" if bright < 0.25 else "white" if bright > 0.75 else "grey"
    names = _hue_name(hue[coloured])
    names[names == len(_HUES) - 1] = 0  # the two ends of red are one colour
    best = int(np.bincount(names).argmax())
    if _HUES[best][1] in ("red", "orange"):  # dark, muted red or orange reads as brown
        winners = names == best
        if float(np.median(val[coloured][winners])) < 0.55 and float(np.median(sat[coloured][winners])) < 0.75:
            return "brown"
    return _HUES[best][1]
