"""The page's examples, chosen for the loaded model: each image comes with a question the model can
answer and the answers that count as right (tests ask every shown example and check them).

The demo model knows only its toy world, so it gets toy-world images (drawn by the project's own
`multimodal.toyworld`); models that can read photos get a drawn street sign and receipt and two real
photos. The drawn images are made by `scripts/make_app_examples.py`: the project's own work, under the
project's licence. The photos are scikit-image's sample data, installed with it (nothing is copied into
this repository): `chelsea.png`, CC0 by its photographer (Stefan van der Walt), and `astronaut.png`
(NASA, public domain), as scikit-image's `skimage.data` documents."""
from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

from multimodal.card import ModelCard

EXAMPLES_DIR = Path(__file__).parent / "examples"


@dataclass(frozen=True)
class Example:
    file: str  # relative to EXAMPLES_DIR, or "skimage:NAME" for scikit-image's sample photos
    question: str
    answers: tuple[str, ...]  # a right answer contains one of these (case-insensitive)

    @property
    def path(self) -> Path:
        if self.file.startswith("skimage:"):
            spec = importlib.util.find_spec("skimage")
            root = Path(list(spec.submodule_search_locations)[0]) if spec and spec.submodule_search_locations else None
            return (root / "data" / self.file.removeprefix("skimage:")) if root else Path(self.file)
        return EXAMPLES_DIR / self.file

    def is_right(self, answer: str) -> bool:
        return any(a.lower() in answer.lower() for a in self.answers)


PHOTO_EXAMPLES = (
    Example("street_sign.png", "What does the sign say?", ("STOP",)),
    Example("receipt.png", "What is the total on this receipt?", ("9.75",)),
    Example("skimage:chelsea.png", "What animal is this?", ("cat",)),
    Example("skimage:astronaut.png", "How many people are in the photo?", ("1", "one")),
)
PHOTO_LICENCE = "drawn for this project, and photos from scikit-image's sample data (CC0, public domain)"
# Toy-world scenes (see scripts/make_app_examples.py for each scene's attributes).
TOY_EXAMPLES = (
    Example("toy/red_circle_left.png", "What colour is the shape?", ("red",)),
    Example("toy/three_blue_squares.png", "How many shapes are there?", ("three",)),
    Example("toy/green_triangle_top.png", "Where is the shape?", ("top",)),
    Example("toy/purple_diamond.png", "What shape is it?", ("diamond",)),
)


def examples_for(card: ModelCard | None) -> tuple[Example, ...]:
    """Toy-world examples for a toy-world model; photo-like ones for a model that reads photos (and
    when no model is loaded, so the page still shows what the product is for)."""
    if card is not None and not card.photos:
        return TOY_EXAMPLES
    return PHOTO_EXAMPLES
