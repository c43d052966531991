"""Resolve an expert's weight file through the project's `weights` package, without raising.

Experts turn a missing file into an *unavailable* state whose reason is the weights package's own
message (which file, which command fetches it), so the UI can show it verbatim.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .base import describe_error


@dataclass(frozen=True)
class Lookup:
    """Outcome of resolving one manifest entry: a path, or the reason there is none."""

    path: Path | None
    reason: str | None = None
    expected: Path | None = None  # where the manifest would put the file, when known


def lookup(artifact: str) -> Lookup:
    """`weights.require(artifact)` as a value instead of an exception."""
    try:
        from weights import MissingWeightError, require
    except ImportError as exc:
        return Lookup(None, f"the project's weights package could not be imported ({exc}); "
                            f"pass an explicit path for {artifact!r}")
    try:
        return Lookup(Path(require(artifact)))
    except MissingWeightError as exc:
        return Lookup(None, str(exc), getattr(exc, "path", None))
    except Exception as exc:  # noqa: BLE001 - e.g. an entry not in the manifest
        return Lookup(None, f"could not resolve weight {artifact!r}: {describe_error(exc)}")
