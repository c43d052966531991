"""Expert systems (caption, OCR, object detection) that add text context to the prompt.

Importing this package is cheap: model libraries (ultralytics, easyocr, rapidocr) are imported on
first use, and nothing ever downloads. Typical use::

    runner = ExpertRunner(default_experts(captioner=model_captioner))
    results = runner.run(image, selected=["caption", "ocr"])
    block = build_context(results, max_tokens=256, count_tokens=tokenizer_count)
"""
from __future__ import annotations

import os

from .base import Expert, ExpertResult, Output
from .caption import CaptionExpert, Captioner
from .context import ContextBlock, build_context, rough_token_count
from .detection import DetectionConfig, DetectionExpert
from .ocr import EasyOCRBackend, EasyOCRConfig, OCRExpert, RapidOCRBackend, RapidOCRConfig
from .runner import ExpertRunner, image_digest, load_image


def default_experts(
    captioner: Captioner | None = None,
    caption_unavailable_reason: str | None = None,
    detector_path: str | os.PathLike | None = None,
    detection: DetectionConfig | None = None,
    ocr_backend: str = "auto",
    easyocr_dir: str | os.PathLike | None = None,
) -> list[Expert]:
    """The product's three experts in prompt order (caption first: the most general fact)."""
    return [
        CaptionExpert(captioner, caption_unavailable_reason),
        DetectionExpert(detector_path, detection),
        OCRExpert(ocr_backend, easyocr=EasyOCRBackend(easyocr_dir)),  # type: ignore[arg-type]
    ]


__all__ = [
    "Expert", "ExpertResult", "Output", "CaptionExpert", "Captioner", "DetectionConfig",
    "DetectionExpert", "OCRExpert", "EasyOCRBackend", "EasyOCRConfig", "RapidOCRBackend",
    "RapidOCRConfig", "ExpertRunner", "ContextBlock", "build_context", "rough_token_count",
    "default_experts", "image_digest", "load_image",
]
