"""Run the selected experts on an image concurrently, with a content-addressed cache.

A chat about one image asks for the same expert output on every turn and every regeneration, so
results are cached under sha256(pixels) + expert name + expert settings. Concurrent requests for the
same key share one computation. Failed and unavailable results are not cached: a transient error
or a weight file fetched meanwhile should be retried on the next turn.
"""
from __future__ import annotations

import hashlib
import io
import json
import threading
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import replace
from pathlib import Path
from typing import Any, Iterable, Sequence, Union

from PIL import Image, ImageOps

from .base import Expert, ExpertResult, describe_error, to_rgb

ImageInput = Union[Image.Image, str, Path, bytes]
CacheKey = tuple[str, str, str]


def load_image(source: ImageInput) -> Image.Image:
    """Decode an image from a PIL image, a path or raw bytes into RGB.

    Raises ValueError with a readable message for unreadable input, so callers can report it
    instead of crashing on whatever PIL raised deep inside.
    """
    try:
        if isinstance(source, Image.Image):
            return to_rgb(source)
        if isinstance(source, (bytes, bytearray)):
            opened = Image.open(io.BytesIO(source))
        elif isinstance(source, (str, Path)):
            opened = Image.open(Path(source))
        else:
            raise TypeError(f"unsupported image input of type {type(source).__name__}")
        with opened:
            opened.load()
            # Phone photos store their rotation in EXIF; the browser shows them upright.
            return to_rgb(ImageOps.exif_transpose(opened))
    except Exception as exc:  # noqa: BLE001 - turned into one clear message
        raise ValueError(f"could not read image: {describe_error(exc)}") from exc


def image_digest(image: Image.Image) -> str:
    """sha256 of the pixel content (mode, size and pixels), independent of file format/metadata."""
    h = hashlib.sha256()
    h.update(f"{image.mode}:{image.size[0]}x{image.size[1]}:".encode())
    h.update(image.tobytes())
    return h.hexdigest()


def settings_key(expert: Expert) -> str:
    """Stable text form of an expert's settings (paths and tuples rendered with str)."""
    return json.dumps(dict(expert.settings()), sort_keys=True, default=str)


class ExpertRunner:
    """Thread-safe orchestration of a fixed set of experts; one instance serves all sessions."""

    def __init__(
        self,
        experts: Iterable[Expert],
        max_workers: int | None = None,
        cache_size: int = 256,
    ) -> None:
        self._experts: dict[str, Expert] = {}
        for expert in experts:
            if expert.name in self._experts:
                raise ValueError(f"two experts are named {expert.name!r}")
            self._experts[expert.name] = expert
        workers = max_workers or max(1, len(self._experts))
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="expert")
        self._cache: OrderedDict[CacheKey, ExpertResult] = OrderedDict()
        self._inflight: dict[CacheKey, Future[ExpertResult]] = {}
        self._cache_size = cache_size
        self._lock = threading.Lock()

    @property
    def names(self) -> list[str]:
        return list(self._experts)

    def expert(self, name: str) -> Expert:
        return self._experts[name]

    def availability(self) -> dict[str, str | None]:
        """Expert name -> None when available, else the reason (for the UI's toggles)."""
        return {name: _safe_reason(e) for name, e in self._experts.items()}

    def run(
        self,
        image: ImageInput,
        selected: Sequence[str] | None = None,
        timeout: float | None = None,
    ) -> list[ExpertResult]:
        """Results for the selected experts (all by default), in the order asked.

        Never raises for bad images or failing experts; raises ValueError only for an expert
        name that this runner does not have (a programming error, not a user one).
        """
        names = list(self._experts) if selected is None else list(dict.fromkeys(selected))
        unknown = [n for n in names if n not in self._experts]
        if unknown:
            raise ValueError(f"unknown expert(s) {unknown}; known: {self.names}")
        try:
            rgb = load_image(image)
        except ValueError as exc:  # unavailable experts still say why, not "bad image"
            reasons = {n: _safe_reason(self._experts[n]) for n in names}
            return [ExpertResult.unavailable(n, reasons[n]) if reasons[n] else ExpertResult.failed(n, str(exc))
                    for n in names]
        digest = image_digest(rgb)

        pending: list[tuple[str, Future[ExpertResult] | ExpertResult]] = []
        for name in names:
            pending.append((name, self._start(self._experts[name], rgb, digest)))

        results: list[ExpertResult] = []
        for name, item in pending:
            if isinstance(item, ExpertResult):
                results.append(item)
                continue
            try:
                results.append(replace(item.result(timeout=timeout)))  # each caller its own copy
            except FutureTimeout:
                results.append(ExpertResult.failed(name, f"timed out after {timeout:g} s"))
            except Exception as exc:  # noqa: BLE001 - last line of defence
                results.append(ExpertResult.failed(name, describe_error(exc)))
        return results

    def clear_cache(self) -> None:
        with self._lock:
            self._cache.clear()

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    def __enter__(self) -> "ExpertRunner":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # -- internals -------------------------------------------------------------------------

    def _start(
        self, expert: Expert, rgb: Image.Image, digest: str
    ) -> Future[ExpertResult] | ExpertResult:
        reason = _safe_reason(expert)
        if reason is not None:
            return ExpertResult.unavailable(expert.name, reason)
        try:
            key = (digest, expert.name, settings_key(expert))
        except Exception as exc:  # noqa: BLE001
            return ExpertResult.failed(expert.name, f"bad settings: {describe_error(exc)}")
        with self._lock:
            hit = self._cache.get(key)
            if hit is not None:
                self._cache.move_to_end(key)
                return replace(hit, cached=True)
            future = self._inflight.get(key)
            if future is None:
                future = self._pool.submit(self._compute, key, expert, rgb)
                self._inflight[key] = future
            return future

    def _compute(self, key: CacheKey, expert: Expert, rgb: Image.Image) -> ExpertResult:
        try:
            result = expert.run(rgb)
        except Exception as exc:  # noqa: BLE001 - Expert.run should not raise, but a subclass may
            result = ExpertResult.failed(expert.name, describe_error(exc))
        with self._lock:
            self._inflight.pop(key, None)
            if result.ok:
                self._cache[key] = result
                while len(self._cache) > self._cache_size:
                    self._cache.popitem(last=False)
        return result


def _safe_reason(expert: Expert) -> str | None:
    try:
        return expert.unavailable_reason()
    except Exception as exc:  # noqa: BLE001
        return f"availability check failed: {describe_error(exc)}"
