"""Use weight files the user already has (e.g. a LLaMA download) through symlinks, never copies."""
from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import IO

from .manifest import Artifact, ArtifactFile
from .store import FileCheck, State, check_file, check_path, display_path


class LinkError(RuntimeError):
    """The given path does not hold the artifact's files, or they are not the expected ones."""


def _find_source(art: Artifact, f: ArtifactFile, source: Path) -> Path:
    """Where `f` is inside the user's `source`: the path itself for a single file, else a search."""
    if source.is_file():
        if len(art.files) != 1:
            raise LinkError(f"{art.name} has {len(art.files)} files: give the folder that holds them, not {source}")
        return source
    tried = []
    for sub in art.link_search:
        candidate = Path(os.path.normpath(source / sub / f.filename))  # "7B/../x" -> "x"
        tried.append(str(candidate))
        if candidate.is_file():
            return candidate
    raise LinkError(f"{f.filename} not found; looked at: " + ", ".join(tried))


def _make_link(target: Path, dest: Path, force: bool) -> None:
    """Point `dest` at `target` atomically; a symlink where possible, else a hard link (no copy)."""
    if dest.exists() and not dest.is_symlink() and not force:
        raise LinkError(f"{dest} is a real file; move it away or pass --force to replace it with a link")
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(dest.name + ".link.tmp")
    tmp.unlink(missing_ok=True)
    try:
        os.symlink(target, tmp)
    except OSError as err:  # e.g. Windows without the symlink privilege
        try:
            os.link(target, tmp)
        except OSError:
            raise LinkError(f"cannot link {dest} -> {target} without copying ({err})") from None
    os.replace(tmp, dest)


def link_artifact(
    art: Artifact,
    source: str | os.PathLike,
    root: Path,
    *,
    force: bool = False,
    verify: bool = True,
    progress: IO[str] | None = sys.stderr,
) -> list[FileCheck]:
    """Link every file of `art` from `source` into `root`, after checking size (and checksums).

    Nothing is linked unless every file is found and passes, so a wrong folder (Llama-2, a
    Hugging Face conversion) leaves the weights folder untouched.
    """
    source = Path(source).expanduser().absolute()
    if not source.exists():
        raise LinkError(f"{source} does not exist")
    found = {f.path: _find_source(art, f, source) for f in art.files}
    for f in art.files:
        check = check_path(f, found[f.path], hash=verify, progress=progress)
        if check.state is State.CORRUPT:
            raise LinkError(f"{found[f.path]} is not the expected {f.filename}: {check.detail}. Nothing was linked.")
    results = []
    for f in art.files:
        dest = root / f.path
        if dest.absolute() != found[f.path]:
            _make_link(found[f.path], dest, force)
        results.append(check_file(f, root, hash=False))
    return results


def describe(results: list[FileCheck]) -> str:
    return "\n".join(f"{display_path(r.path)} -> {os.readlink(r.path) if r.path.is_symlink() else '(hard link)'}"
                     for r in results)
