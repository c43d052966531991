"""Checksums of weight files, computed in one streaming pass (a 13 GB file is read once)."""
from __future__ import annotations

import hashlib
import os
import sys
from pathlib import Path
from typing import IO

CHUNK = 1 << 20
PROGRESS_THRESHOLD = 64 << 20  # only show a bar when hashing takes noticeable time


def hash_file(
    path: str | os.PathLike,
    algorithms: tuple[str, ...] = ("sha256", "md5"),
    progress: IO[str] | None = sys.stderr,
) -> dict[str, str]:
    """Hex digests of `path` for each algorithm; a progress bar on `progress` for big files."""
    from tqdm import tqdm  # imported here so `require` stays import-light for loaders

    path = Path(path)
    hashers = {name: hashlib.new(name) for name in algorithms}
    total = path.stat().st_size
    show = progress is not None and total >= PROGRESS_THRESHOLD
    with open(path, "rb") as fh, tqdm(
        total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=f"hashing {path.name}",
        file=progress, disable=not show, leave=False,
    ) as bar:
        while chunk := fh.read(CHUNK):
            for h in hashers.values():
                h.update(chunk)
            bar.update(len(chunk))
    return {name: h.hexdigest() for name, h in hashers.items()}
