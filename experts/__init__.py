"""Expert systems (caption, OCR, object detection, classification) that add text context to the prompt.

Importing this package is cheap: model libraries (ultralytics, easyocr, rapidocr, torch, timm) are
imported on first use, and nothing ever downloads. Typical use::

    runner = ExpertRunner(default_experts(captioner=model_captioner))
    results = runner.run(image, selected=["caption", "ocr"])
    block = build_context(results, max_tokens=256, count_tokens=tokenizer_count)
"""
from __future__ import annotations

import os

from .base import Expert, ExpertResult, Output
from .caption import CaptionExpert, Captioner
from .classification import ClassificationConfig, ClassificationExpert
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
    caption_source: str | None = None,
    classification: ClassificationConfig | None = None,
    classifier_path: str | os.PathLike | None = None,
) -> list[Expert]:
    """The product's four experts in prompt order (caption first: the most general fact).
    ``caption_source`` labels captions whose captioner has limits a reader must know (e.g. the demo
    model's, which knows only its toy world)."""
    return [
        CaptionExpert(captioner, caption_unavailable_reason, source=caption_source),
        DetectionExpert(detector_path, detection),
        ClassificationExpert(classifier_path, classification),
        OCRExpert(ocr_backend, easyocr=EasyOCRBackend(easyocr_dir)),  # type: ignore[arg-type]
    ]


__all__ = [
    "Expert", "ExpertResult", "Output", "CaptionExpert", "Captioner", "DetectionConfig",
    "DetectionExpert", "ClassificationConfig", "ClassificationExpert", "OCRExpert", "EasyOCRBackend",
    "EasyOCRConfig", "RapidOCRBackend",
    "RapidOCRConfig", "ExpertRunner", "ContextBlock", "build_context", "rough_token_count",
    "default_experts", "image_digest", "load_image",
]
