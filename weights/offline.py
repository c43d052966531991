"""Keep third-party libraries from downloading weights behind the user's back.

open_clip, easyocr and ultralytics each fetch missing weights on their own; the product instead
resolves every file with `weights.require` and tells these libraries to stay offline.
"""
from __future__ import annotations

import os
from pathlib import Path

from .manifest import Manifest
from .store import require

# Environment switches the libraries honour: Hugging Face hub (open_clip, transformers, timm)
# and Ultralytics (its is_online() check gates asset downloads and telemetry).
OFFLINE_ENV = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "YOLO_OFFLINE": "1",
}


def forbid_implicit_downloads() -> None:
    """Set the libraries' offline switches; call before importing open_clip/ultralytics/easyocr."""
    os.environ.update(OFFLINE_ENV)


def easyocr_reader_kwargs(
    root: str | os.PathLike | None = None,
    manifest: Manifest | str | os.PathLike | None = None,
) -> dict[str, object]:
    """Keyword arguments for `easyocr.Reader(["en"], **kwargs)` that use our files and never download.

    Raises MissingWeightError (with the fetch command) when the detector or recogniser is absent.
    """
    folder = Path(require("easyocr-craft", root, manifest)).parent
    require("easyocr-english-g2", root, manifest)
    return {
        "model_storage_directory": str(folder),
        "user_network_directory": str(folder / "user_network"),
        "download_enabled": False,
        "detect_network": "craft",
        "recog_network": "english_g2",
    }
