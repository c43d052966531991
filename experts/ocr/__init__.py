"""OCR expert: text lines in reading order, from EasyOCR or RapidOCR.

`backend="auto"` uses EasyOCR when its model files are present and RapidOCR (models inside its
wheel, always offline) otherwise; the choice is re-made on every call, so fetching EasyOCR's files
switches over without a restart. `backend="easyocr"` / `"rapidocr"` forces one.
"""
from __future__ import annotations

from typing import Any, Literal, Mapping, Protocol, Sequence

from PIL import Image, ImageDraw

from ..base import Expert, Output
from .easy_backend import EasyOCRBackend, EasyOCRConfig
from .layout import TextBox, TextLine, reading_order, text_blocks
from .rapid_backend import RapidOCRBackend, RapidOCRConfig

BackendChoice = Literal["auto", "easyocr", "rapidocr"]


class OCRBackend(Protocol):
    name: str

    def unavailable_reason(self) -> str | None: ...

    def settings(self) -> Mapping[str, Any]: ...

    def read(self, image: Image.Image) -> list[TextBox]: ...


class OCRExpert(Expert):
    """Context: one quoted line per text line, top to bottom ('"SPEED LIMIT"')."""

    name = "ocr"

    def __init__(
        self,
        backend: BackendChoice = "auto",
        easyocr: OCRBackend | None = None,
        rapidocr: OCRBackend | None = None,
        max_lines: int = 60,
    ) -> None:
        super().__init__()
        if backend not in ("auto", "easyocr", "rapidocr"):
            raise ValueError(f"backend must be 'auto', 'easyocr' or 'rapidocr', not {backend!r}")
        self.choice: BackendChoice = backend
        self.easyocr = easyocr if easyocr is not None else EasyOCRBackend()
        self.rapidocr = rapidocr if rapidocr is not None else RapidOCRBackend()
        self.max_lines = max_lines

    def backend(self) -> tuple[OCRBackend | None, str | None]:
        """The backend this call would use, or None and the reason none can be used."""
        if self.choice == "easyocr":
            reason = self.easyocr.unavailable_reason()
            return (None, reason) if reason else (self.easyocr, None)
        if self.choice == "rapidocr":
            reason = self.rapidocr.unavailable_reason()
            return (None, reason) if reason else (self.rapidocr, None)
        easy_reason = self.easyocr.unavailable_reason()
        if easy_reason is None:
            return self.easyocr, None
        rapid_reason = self.rapidocr.unavailable_reason()
        if rapid_reason is None:
            return self.rapidocr, None
        return None, f"no OCR backend available. EasyOCR: {easy_reason} RapidOCR: {rapid_reason}"

    def unavailable_reason(self) -> str | None:
        return self.backend()[1]

    def settings(self) -> Mapping[str, Any]:
        chosen, _ = self.backend()
        if chosen is None:
            return {"backend": None}
        return {"backend": chosen.name, "max_lines": self.max_lines, **chosen.settings()}

    def _run(self, image: Image.Image) -> Output:
        chosen, reason = self.backend()
        if chosen is None:
            raise RuntimeError(reason)
        boxes = chosen.read(image)
        lines = reading_order(boxes)
        blocks = describe_blocks(text_blocks(lines[: self.max_lines]))
        return Output(
            context="\n".join(filter(None, (describe_lines(lines, self.max_lines), blocks))),
            data={
                "backend": chosen.name,
                "text": "\n".join(line.text for line in lines),
                "lines": [line.as_dict() for line in lines],
                "boxes": [box.as_dict() for box in boxes],
            },
            annotated=draw_text_boxes(image, boxes),
        )


def draw_text_boxes(image: Image.Image, boxes: Sequence[TextBox]) -> Image.Image:
    """Copy of the image with each recognised box outlined (the UI shows what was read where)."""
    out = image.convert("RGB").copy()
    draw = ImageDraw.Draw(out)
    width = max(2, round(min(out.size) / 300))
    for box in boxes:
        draw.polygon(list(box.quad), outline=(255, 40, 40), width=width)
    return out


def describe_lines(lines: Sequence[TextLine], max_lines: int) -> str:
    """Quoted lines so the model sees exact text and where each line starts and ends."""
    if not lines:
        return "No text found."
    shown = [f'"{line.text}"' for line in lines[:max_lines]]
    if len(lines) > max_lines:
        shown.append(f"(and {len(lines) - max_lines} more lines)")
    return "\n".join(shown)


def describe_blocks(blocks: Sequence[Sequence[TextLine]]) -> str:
    """'Text blocks: "World Health Organization"; "Theatre du PALAIS-ROYAL".': the blocks of more than one
    line, each joined into one string (a detail line, experts/context.py); '' when there are none."""
    joined = [" ".join(line.text for line in block) for block in blocks if len(block) > 1]
    return "Text blocks: " + "; ".join(f'"{text}"' for text in joined) + "." if joined else ""


__all__ = [
    "OCRExpert", "OCRBackend", "EasyOCRBackend", "EasyOCRConfig", "RapidOCRBackend", "RapidOCRConfig",
    "TextBox", "TextLine", "reading_order", "describe_lines", "describe_blocks", "text_blocks",
]
