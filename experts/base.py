"""The one small interface every expert shares, and the result it returns.

An expert turns an image into text context for the language model, plus structured data for the
UI. Experts never raise out of `run`: a missing weight file makes them *unavailable* (with the exact
reason), and an error during a run makes the result *failed* (with the message), so that one bad
expert never silences the others.
"""
from __future__ import annotations

import threading
import time
from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal, Mapping

from PIL import Image

Status = Literal["ok", "failed", "unavailable"]


@dataclass
class ExpertResult:
    """What one expert said about one image.

    `context` is the text meant for the prompt (empty unless ok); `data` is structured output
    (boxes, labels, scores, text lines) as plain JSON-able values; `annotated` is an optional image
    for the UI; `seconds` is the wall time of the run that produced it (kept when served from cache).
    """

    name: str
    status: Status
    context: str = ""
    data: dict[str, Any] = field(default_factory=dict)
    annotated: Image.Image | None = None
    seconds: float = 0.0
    error: str | None = None
    cached: bool = False

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    @classmethod
    def failed(cls, name: str, error: str, seconds: float = 0.0) -> "ExpertResult":
        return cls(name=name, status="failed", error=error, seconds=seconds)

    @classmethod
    def unavailable(cls, name: str, reason: str) -> "ExpertResult":
        return cls(name=name, status="unavailable", error=reason)

    def summary(self) -> str:
        """One line for logs and the CLI."""
        if self.ok:
            origin = "cached" if self.cached else f"{self.seconds:.2f} s"
            return f"{self.name}: ok ({origin})"
        return f"{self.name}: {self.status}: {self.error}"


@dataclass
class Output:
    """What an expert's `_run` returns; `Expert.run` adds name, status and timing."""

    context: str
    data: dict[str, Any] = field(default_factory=dict)
    annotated: Image.Image | None = None


class Expert(ABC):
    """Base for experts: availability, settings for the cache key, and a guarded `run`.

    Subclasses implement `_run` (the work) and `unavailable_reason` (None when ready). `run` holds a
    per-expert lock because the underlying models (YOLO, EasyOCR, ONNX sessions built lazily) are
    not documented as safe to call from several threads at once; different experts still run in
    parallel.
    """

    name: str = "expert"

    def __init__(self) -> None:
        self._lock = threading.Lock()

    @property
    def available(self) -> bool:
        return self.unavailable_reason() is None

    @abstractmethod
    def unavailable_reason(self) -> str | None:
        """None when the expert can run; otherwise why not (missing file and how to fetch it)."""

    def settings(self) -> Mapping[str, Any]:
        """Everything that changes the output for a given image; part of the cache key."""
        return {}

    @abstractmethod
    def _run(self, image: Image.Image) -> Output:
        """Analyse an RGB image. May raise; `run` turns exceptions into a failed result."""

    def run(self, image: Image.Image) -> ExpertResult:
        """Run on an image and always return a result (ok, failed or unavailable), timed."""
        reason = self.unavailable_reason()
        if reason is not None:
            return ExpertResult.unavailable(self.name, reason)
        start = time.perf_counter()
        try:
            rgb = to_rgb(image)
            with self._lock:
                out = self._run(rgb)
        except Exception as exc:  # noqa: BLE001 - isolation is the point
            return ExpertResult.failed(self.name, describe_error(exc), time.perf_counter() - start)
        return ExpertResult(
            name=self.name,
            status="ok",
            context=out.context,
            data=out.data,
            annotated=out.annotated,
            seconds=time.perf_counter() - start,
        )


def describe_error(exc: BaseException) -> str:
    """`TypeName: message`, the form users can paste into an issue."""
    message = str(exc).strip()
    return f"{type(exc).__name__}: {message}" if message else type(exc).__name__


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB copy of any PIL image; transparent areas become white, as they look in a browser."""
    if not isinstance(image, Image.Image):
        raise TypeError(f"expected a PIL image, got {type(image).__name__}")
    image.load()  # surfaces truncated or corrupt files here, not deep inside a backend
    if image.mode == "RGB":
        return image
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        canvas = Image.new("RGB", rgba.size, (255, 255, 255))
        canvas.paste(rgba, mask=rgba.getchannel("A"))
        return canvas
    return image.convert("RGB")


def file_settings(config: Any, path: Path | None) -> dict[str, Any]:
    """An expert's settings for the runner's cache key: its config dataclass, and the model file with its
    size and modification time, so a replaced weight file never serves cached results of the old one."""
    stat = path.stat() if path is not None else None
    return {**asdict(config), "model": str(path),
            "model_stamp": (stat.st_size, stat.st_mtime_ns) if stat else None}
