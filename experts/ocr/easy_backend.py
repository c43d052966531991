"""EasyOCR backend (CRAFT detector + English recogniser), the plan's OCR engine.

Its two model files live in the weights folder (manifest entries `easyocr-craft` and
`easyocr-english-g2`, one folder = EasyOCR's `model_storage_directory`); EasyOCR is created with
`download_enabled=False` and its user-network folder placed beside them, so it neither downloads
nor writes under ~/.EasyOCR.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import numpy as np
from PIL import Image

from ..weightfiles import lookup
from .layout import TextBox, quad_from

# File names EasyOCR looks for (its config: detection 'craft', recognition gen2 'english_g2').
DETECTOR_FILE = "craft_mlt_25k.pth"
RECOGNISER_FILE = "english_g2.pth"
ARTIFACTS = {"easyocr-craft": DETECTOR_FILE, "easyocr-english-g2": RECOGNISER_FILE}
FETCH_COMMAND = "python -m weights fetch easyocr-craft easyocr-english-g2"


@dataclass
class EasyOCRConfig:
    min_score: float = 0.3  # EasyOCR's confidences run lower than RapidOCR's
    gpu: bool | None = None  # None: use CUDA when torch sees it


class EasyOCRBackend:
    """`read(image) -> [TextBox]` with EasyOCR, from local model files only."""

    name = "easyocr"

    def __init__(self, model_dir: str | os.PathLike | None = None, config: EasyOCRConfig | None = None) -> None:
        self.config = config or EasyOCRConfig()
        self._explicit = Path(model_dir) if model_dir is not None else None
        self._reader: Any = None
        self._reader_dir: Path | None = None

    def _resolve(self) -> tuple[Path | None, str | None]:
        if self._explicit is not None:
            missing = [f for f in ARTIFACTS.values() if not (self._explicit / f).is_file()]
            if missing:
                return None, (f"EasyOCR model file(s) missing in {self._explicit}: {', '.join(missing)}. "
                              f"Get them with: {FETCH_COMMAND} (or copy them there)")
            return self._explicit, None
        folders = set()
        for artifact, filename in ARTIFACTS.items():
            found = lookup(artifact)
            if found.path is None:
                return None, f"EasyOCR unavailable: {found.reason}"
            folders.add(found.path.parent if found.path.name == filename else found.path)
        if len(folders) != 1:
            return None, f"EasyOCR needs both model files in one folder, found {sorted(map(str, folders))}"
        return folders.pop(), None

    def unavailable_reason(self) -> str | None:
        if not _installed():
            return "the easyocr package is not installed (pip install -r requirements.txt)"
        return self._resolve()[1]

    def settings(self) -> Mapping[str, Any]:
        folder, _ = self._resolve()
        return {"model_dir": str(folder), "min_score": self.config.min_score}

    def _load(self) -> Any:
        folder, reason = self._resolve()
        if folder is None:
            raise FileNotFoundError(reason)
        if self._reader is None or self._reader_dir != folder:
            import easyocr

            gpu = self.config.gpu
            if gpu is None:
                import torch

                gpu = torch.cuda.is_available()
            self._reader = easyocr.Reader(
                ["en"],
                gpu=gpu,
                model_storage_directory=str(folder),
                user_network_directory=str(folder / "user_network"),
                download_enabled=False,
                detect_network="craft",
                recog_network="english_g2",
                verbose=False,
            )
            self._reader_dir = folder
        return self._reader

    def read(self, image: Image.Image) -> list[TextBox]:
        reader = self._load()
        raw = reader.readtext(np.asarray(image.convert("RGB")), detail=1, paragraph=False)
        boxes = []
        for quad, text, score in raw:
            if float(score) >= self.config.min_score and str(text).strip():
                boxes.append(TextBox(str(text).strip(), quad_from(quad), float(score)))
        return boxes


def _installed() -> bool:
    import importlib.util
    import sys

    return "easyocr" in sys.modules or importlib.util.find_spec("easyocr") is not None
