"""Caption expert: a short description of the image from the language model side.

The captioner is injected (a callable image -> text) so this package stays free of model code:
`multimodal/` builds it from the already loaded base model plus a small caption adapter (or the
main model with a caption instruction), which is how the base weights are shared, never loaded
twice.
"""
from __future__ import annotations

from typing import Any, Callable, Mapping

from PIL import Image

from .base import Expert, Output

Captioner = Callable[[Image.Image], str]

NO_CAPTIONER = "no captioning model is loaded (start the app with a model to enable captions)"


class CaptionExpert(Expert):
    """Available iff a captioner is given; context is `Caption: <text>`."""

    name = "caption"

    def __init__(
        self,
        captioner: Captioner | None,
        unavailable_reason: str | None = None,
        *,
        model_id: str = "default",
        max_chars: int = 300,
        source: str | None = None,
    ) -> None:
        """`model_id` names the model+adapter so the cache never serves another model's caption.
        `source`, when given, is written before every caption, in the context and on the panel
        ("Caption (demo captioner (toy world)): ..."), so neither the model nor the user takes a
        limited captioner's words as fact about a photo."""
        super().__init__()
        self._captioner = captioner
        self.source = source
        self._reason = unavailable_reason or NO_CAPTIONER
        self.model_id = model_id
        self.max_chars = max_chars

    def unavailable_reason(self) -> str | None:
        return None if self._captioner is not None else self._reason

    def settings(self) -> Mapping[str, Any]:
        return {"model_id": self.model_id, "max_chars": self.max_chars, "source": self.source}

    def _run(self, image: Image.Image) -> Output:
        assert self._captioner is not None  # checked by Expert.run
        raw = self._captioner(image)
        if not isinstance(raw, str):
            raise TypeError(f"captioner returned {type(raw).__name__}, expected str")
        text = " ".join(raw.split())  # models emit stray newlines; the prompt wants one line
        if not text:
            raise ValueError("captioner returned an empty caption")
        if len(text) > self.max_chars:
            text = text[: self.max_chars].rsplit(" ", 1)[0] + "..."
        if self.source:
            return Output(context=f"Caption ({self.source}): {text}", data={"caption": f"[{self.source}] {text}"})
        return Output(context=f"Caption: {text}", data={"caption": text})
