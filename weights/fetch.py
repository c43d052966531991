"""Download weight files on request: resumable, verified, and moved into place atomically.

A file is streamed to `<name>.part` (resumed with an HTTP Range request when a previous transfer
was cut), checked against the manifest, and only then renamed onto its final path, so a loader
never sees a half-written or wrong file. A checksum mismatch deletes everything it downloaded.
"""
from __future__ import annotations

import os
import shutil
import socket
import sys
import time
import urllib.error
import urllib.request
import zipfile
from dataclasses import dataclass
from http.client import HTTPException
from pathlib import Path
from typing import IO

from .hashing import hash_file
from .manifest import Artifact, ArtifactFile
from .store import State, check_file, display_path, fix_command

CHUNK = 1 << 16
USER_AGENT = "mm-weights/1 (+python urllib)"


class FetchError(RuntimeError):
    """A download could not be completed; the message says what to do next."""


class OfflineError(FetchError):
    """The server could not be reached at all (no network, DNS failure, refused connection)."""


class InterruptedDownload(FetchError):
    """The transfer stopped part-way; the `.part` file is kept so the next attempt resumes."""


class ChecksumError(FetchError):
    """The downloaded bytes are not the expected file; nothing was installed or kept."""


class NotFetchableError(FetchError):
    """The artifact has no public URL (LLaMA): it has to be linked from the user's own copy."""


@dataclass(frozen=True)
class FetchResult:
    file: ArtifactFile
    path: Path
    action: str  # "downloaded" | "already present"
    checked: str  # "sha256", "md5", "size" or "" when the manifest has nothing to compare with
    sha256: str


def _echo(message: str, stream: IO[str] | None) -> None:
    if stream is not None:
        print(message, file=stream, flush=True)


def _offline(url: str, reason: object) -> OfflineError:
    return OfflineError(
        f"offline: cannot reach {url} ({reason}). Check the network connection or proxy "
        "(http_proxy/https_proxy), or download the file on another machine and place it in the "
        "weights folder (see `python -m weights status`)."
    )


def download(
    url: str,
    part: Path,
    *,
    expected_size: int | None = None,
    timeout: float = 30.0,
    progress: IO[str] | None = sys.stderr,
    desc: str = "",
) -> None:
    """Append the rest of `url` to `part`, resuming from its current length when the server allows.

    Raises OfflineError when nothing answers, InterruptedDownload when the body stops short.
    """
    from tqdm import tqdm

    offset = part.stat().st_size if part.exists() else 0
    if expected_size is not None and offset > expected_size:
        part.unlink()  # longer than the real file: cannot be a prefix of it
        offset = 0
    if expected_size is not None and offset == expected_size:
        return  # a previous run finished the transfer but not the checks
    headers = {"User-Agent": USER_AGENT}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    request = urllib.request.Request(url, headers=headers)
    try:
        response = urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as err:
        if err.code == 416 and offset:  # nothing past our offset: the part is already complete
            return
        raise FetchError(f"HTTP {err.code} {err.reason} for {url}") from None
    except urllib.error.URLError as err:
        raise _offline(url, err.reason) from None
    except (TimeoutError, socket.timeout, ConnectionError) as err:
        raise _offline(url, err) from None

    with response:
        content_range = response.headers.get("Content-Range", "")
        resumed = offset > 0 and response.status == 206 and content_range.startswith(f"bytes {offset}-")
        if offset and not resumed:
            if response.status == 206:  # a range we did not ask for: its bytes are useless here
                part.unlink()
                raise InterruptedDownload(f"{url} answered an unexpected range ({content_range})")
            offset = 0  # server ignored the Range header and sends the whole file: start over
        length = response.headers.get("Content-Length")
        remaining = int(length) if length is not None else None
        total = offset + remaining if remaining is not None else expected_size
        received = 0
        with open(part, "ab" if resumed else "wb") as out, tqdm(
            total=total, initial=offset, unit="B", unit_scale=True, unit_divisor=1024,
            desc=desc or part.name, file=progress, disable=progress is None, dynamic_ncols=True,
        ) as bar:
            try:
                while chunk := response.read(CHUNK):
                    out.write(chunk)
                    received += len(chunk)
                    bar.update(len(chunk))
            except (HTTPException, OSError) as err:  # reset connection, timeout, IncompleteRead
                raise InterruptedDownload(
                    f"transfer of {url} interrupted after {offset + received} bytes ({err})"
                ) from None
            finally:
                out.flush()
                os.fsync(out.fileno())
    if remaining is not None and received < remaining:
        raise InterruptedDownload(
            f"transfer of {url} interrupted after {offset + received} of {total} bytes"
        )


def _extract_member(archive: Path, member: str, target: Path) -> None:
    """Unpack one member of a zip to `target` (which is then checked and renamed by the caller)."""
    try:
        with zipfile.ZipFile(archive) as zf:
            names = zf.namelist()
            match = member if member in names else next((n for n in names if n.rsplit("/", 1)[-1] == member), None)
            if match is None:
                raise FetchError(f"{archive.name} has no member {member!r} (it has: {', '.join(names)})")
            with zf.open(match) as src, open(target, "wb") as dst:
                shutil.copyfileobj(src, dst, CHUNK)
    except zipfile.BadZipFile as err:
        raise ChecksumError(f"the download is not a valid zip archive ({err})") from None


def _verify(f: ArtifactFile, candidate: Path, progress: IO[str] | None) -> tuple[str, dict[str, str]]:
    """Check `candidate` against the manifest; returns (what was checked, digests) or raises."""
    size = candidate.stat().st_size
    if f.size is not None and size != f.size:
        raise ChecksumError(f"size {size} bytes, expected {f.size}")
    digests = hash_file(candidate, progress=progress)
    for algo in ("sha256", "md5"):
        expected = getattr(f, algo)
        if expected and digests[algo] != expected:
            raise ChecksumError(f"{algo} {digests[algo]}, expected {expected}")
    checked = "sha256" if f.sha256 else "md5" if f.md5 else "size" if f.size is not None else ""
    return checked, digests


def fetch_file(
    f: ArtifactFile,
    root: Path,
    *,
    retries: int = 3,
    retry_wait: float = 2.0,
    timeout: float = 30.0,
    progress: IO[str] | None = sys.stderr,
) -> FetchResult:
    """Download one file into `root`, resuming, verifying and renaming it into place."""
    if not f.url:
        raise NotFetchableError(f"{f.path} has no download URL")
    dest = root / f.path
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + (".zip.part" if f.archive_member else ".part"))
    for attempt in range(retries + 1):
        try:
            download(f.url, part, expected_size=None if f.archive_member else f.size,
                     timeout=timeout, progress=progress, desc=dest.name)
            break
        except InterruptedDownload as err:
            if attempt == retries:
                raise InterruptedDownload(
                    f"{err}. The partial file {display_path(part)} was kept: run the same command "
                    "again to resume."
                ) from None
            _echo(f"{err}; resuming (attempt {attempt + 2} of {retries + 1})", progress)
            time.sleep(retry_wait * (attempt + 1))

    candidate = dest.with_name(dest.name + ".unzip.part") if f.archive_member else part
    try:
        if f.archive_member:
            _extract_member(part, f.archive_member, candidate)
        checked, digests = _verify(f, candidate, progress)
    except ChecksumError as err:
        for leftover in {part, candidate}:
            leftover.unlink(missing_ok=True)
        raise ChecksumError(
            f"{f.url} did not match the manifest for {f.path}: {err}. "
            "The download was deleted and nothing was installed."
        ) from None
    os.replace(candidate, dest)  # atomic on one filesystem: loaders see the old file or the new one
    if f.archive_member:
        part.unlink(missing_ok=True)
    return FetchResult(f, dest, "downloaded", checked, digests["sha256"])


def fetch_artifact(
    art: Artifact,
    root: Path,
    *,
    force: bool = False,
    retries: int = 3,
    retry_wait: float = 2.0,
    timeout: float = 30.0,
    progress: IO[str] | None = sys.stderr,
) -> list[FetchResult]:
    """Make every file of `art` present and verified under `root`; skips files that already are."""
    if not art.fetchable:
        message = f"no public download URL; use your own copy: {fix_command(art, root)}"
        raise NotFetchableError(message + (f"\n{art.obtain}" if art.obtain else ""))
    results = []
    for f in art.files:
        existing = check_file(f, root, hash=True, progress=progress)
        if existing.ok and not force:
            results.append(FetchResult(f, existing.path, "already present", existing.checked,
                                       existing.digests["sha256"]))
            continue
        if existing.state is State.CORRUPT:
            _echo(f"{display_path(existing.path)} is corrupt ({existing.detail}); downloading it again", progress)
        results.append(fetch_file(f, root, retries=retries, retry_wait=retry_wait,
                                  timeout=timeout, progress=progress))
    return results
