"""Where weight files live and what state they are in; the one path every loader goes through.

`require` is deliberately cheap (existence and size, no hashing) so loaders can call it on every
start; `check_artifact(..., hash=True)` is what `verify` runs.
"""
from __future__ import annotations

import os
import shlex
import sys
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import IO

from .hashing import hash_file
from .manifest import PACKAGE_DIR, Artifact, ArtifactFile, Manifest, resolve_manifest

WEIGHTS_ENV = "MM_WEIGHTS_DIR"
DEFAULT_WEIGHTS_DIR = PACKAGE_DIR  # <repo>/weights: the manifest and the files sit side by side


def weights_dir(override: str | os.PathLike | None = None) -> Path:
    """The weights folder: override (e.g. a --weights-dir flag) > env MM_WEIGHTS_DIR > <repo>/weights."""
    if override is not None:
        return Path(override).expanduser()
    env = os.environ.get(WEIGHTS_ENV)
    return Path(env).expanduser() if env else DEFAULT_WEIGHTS_DIR


def display_path(path: Path) -> str:
    """A path as the user would type it: relative to the working directory when inside it."""
    try:
        return str(path.absolute().relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def fix_command(art: Artifact, root: Path) -> str:
    """The exact shell command that makes `art` available under `root`."""
    dir_flag = "" if root.absolute() == weights_dir().absolute() else f" --dir {shlex.quote(str(root))}"
    if art.fetchable:
        return f"python -m weights{dir_flag} fetch {art.name}"
    placeholder = "/path/to/LLaMA" if art.name.startswith("llama") else "/path/to/your/copy"
    return f"python -m weights{dir_flag} link {art.name} {placeholder}"


class MissingWeightError(FileNotFoundError):
    """A weight file a loader needs is absent; the message names it and the command that gets it."""

    def __init__(self, artifact: str, path: Path, command: str, message: str) -> None:
        super().__init__(message)
        self.artifact = artifact
        self.path = path
        self.command = command

    def __str__(self) -> str:  # FileNotFoundError would otherwise format errno/filename
        return self.args[0]


class CorruptWeightError(MissingWeightError):
    """A weight file is present but cannot be the right one (wrong size): treated as missing."""


class State(str, Enum):
    PRESENT = "present"
    LINKED = "linked"
    MISSING = "missing"
    CORRUPT = "corrupt"


@dataclass(frozen=True)
class FileCheck:
    """The outcome of checking one file: its state, what was checked and why it failed."""

    file: ArtifactFile
    path: Path
    state: State
    size: int | None = None
    checked: str = ""  # "sha256", "md5", "size" or "" (nothing known to compare with)
    detail: str = ""
    digests: dict[str, str] = field(default_factory=dict)  # filled when the file was hashed

    @property
    def ok(self) -> bool:
        return self.state in (State.PRESENT, State.LINKED)


def _size_problem(f: ArtifactFile, size: int) -> str:
    if f.size is None or size == f.size:
        return ""
    what = f.lookalikes.get(size)
    guess = f"; this looks like {what}" if what else ""
    return f"size {size} bytes, expected {f.size}{guess}"


def check_file(
    f: ArtifactFile, root: Path, hash: bool = False, progress: IO[str] | None = sys.stderr
) -> FileCheck:
    """State of one file: missing, corrupt (wrong size, or wrong checksum when `hash`), present/linked."""
    return check_path(f, root / f.path, hash=hash, progress=progress)


def check_path(
    f: ArtifactFile, path: Path, hash: bool = False, progress: IO[str] | None = sys.stderr
) -> FileCheck:
    """Check the file at `path` against manifest entry `f` (wherever it lies, e.g. before linking)."""
    if not path.exists():
        detail = f"broken link to {os.readlink(path)}" if path.is_symlink() else ""
        return FileCheck(f, path, State.MISSING, detail=detail)
    good = State.LINKED if path.is_symlink() else State.PRESENT
    size = path.stat().st_size
    problem = _size_problem(f, size)
    if problem:
        return FileCheck(f, path, State.CORRUPT, size, "size", problem)
    checked = "size" if f.size is not None else ""
    if hash and f.has_checksum:
        digests = hash_file(path, progress=progress)
        for algo in ("sha256", "md5"):
            expected = getattr(f, algo)
            if expected and digests[algo] != expected:
                detail = f"{algo} {digests[algo]}, expected {expected}"
                return FileCheck(f, path, State.CORRUPT, size, algo, detail, digests)
        return FileCheck(f, path, good, size, "sha256" if f.sha256 else "md5", digests=digests)
    if hash:  # nothing to compare with: still hash, so the user can pin the value
        return FileCheck(f, path, good, size, checked, digests=hash_file(path, progress=progress))
    return FileCheck(f, path, good, size, checked)


def check_artifact(
    art: Artifact, root: Path, hash: bool = False, progress: IO[str] | None = sys.stderr
) -> list[FileCheck]:
    return [check_file(f, root, hash=hash, progress=progress) for f in art.files]


def overall_state(checks: list[FileCheck]) -> State:
    """One state for an artifact: corrupt beats missing beats linked beats present."""
    states = {c.state for c in checks}
    for state in (State.CORRUPT, State.MISSING, State.LINKED):
        if state in states:
            return state
    return State.PRESENT


def artifact(name: str, manifest: Manifest | str | os.PathLike | None = None) -> Artifact:
    """The manifest entry called `name` (KeyError listing the known names otherwise)."""
    return resolve_manifest(manifest).get(name)


def artifact_location(art: Artifact, root: Path) -> Path:
    """The file for a single-file artifact, the folder holding the files for a multi-file one."""
    if len(art.files) == 1:
        return root / art.files[0].path
    return root / art.folder


def require(
    name: str,
    root: str | os.PathLike | None = None,
    manifest: Manifest | str | os.PathLike | None = None,
) -> Path:
    """Location of artifact `name`, after checking each file exists (and has the right size).

    Raises MissingWeightError naming the first missing file and the command that fetches or links
    it; nothing is ever downloaded from here.
    """
    art = artifact(name, manifest)
    base = weights_dir(root)
    command = fix_command(art, base)
    for f in art.files:
        check = check_file(f, base, hash=False)
        if check.ok:
            continue
        shown = display_path(check.path)
        used_by = f"{art.title}, used by the {art.component}"
        if check.state is State.CORRUPT:
            message = (
                f"Weight file {shown} ({used_by}) is corrupt: {check.detail}. "
                f"Replace it with: {command} --force"
            )
            raise CorruptWeightError(art.name, check.path, command + " --force", message)
        why = f" It is a {check.detail}." if check.detail else ""
        message = f"Missing weight file {shown} ({used_by}).{why} Get it with: {command}"
        if art.obtain:
            message += f"\n{art.obtain}"
        raise MissingWeightError(art.name, check.path, command, message)
    return artifact_location(art, base)
