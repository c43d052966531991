"""The weights manifest: every weight file the product can use, described once in `manifest.toml`.

Loaders, the `python -m weights` command and the tests all read the same entries, so a URL, a
size or a checksum is written in exactly one place.
"""
from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

PACKAGE_DIR = Path(__file__).resolve().parent
DEFAULT_MANIFEST = PACKAGE_DIR / "manifest.toml"
MANIFEST_ENV = "MM_WEIGHTS_MANIFEST"


class ManifestError(ValueError):
    """The manifest file is malformed; the message names the entry and the field."""


@dataclass(frozen=True)
class ArtifactFile:
    """One file of an artifact, with everything needed to fetch and check it.

    `path` is relative to the weights folder. When `archive_member` is set, `url` points at a zip
    archive and the file is that member of it; the checksums always describe the file itself.
    """

    path: str
    url: str | None = None
    size: int | None = None
    sha256: str | None = None
    md5: str | None = None
    archive_member: str | None = None
    lookalikes: dict[int, str] = field(default_factory=dict)  # size in bytes -> what that file is

    @property
    def filename(self) -> str:
        return PurePosixPath(self.path).name

    @property
    def has_checksum(self) -> bool:
        return bool(self.sha256 or self.md5)


@dataclass(frozen=True)
class Artifact:
    """A unit the user fetches, links and verifies as a whole (a model, possibly several files)."""

    name: str
    title: str
    component: str
    licence: str
    files: list[ArtifactFile]
    notes: str = ""
    obtain: str = ""  # how to get it when there is no public URL (LLaMA's licence)
    link_search: tuple[str, ...] = (".",)  # where `link NAME PATH` looks, relative to PATH

    @property
    def fetchable(self) -> bool:
        return all(f.url for f in self.files)

    @property
    def folder(self) -> str:
        """The folder (relative to the weights dir) that holds every file of the artifact."""
        parents = {str(PurePosixPath(f.path).parent) for f in self.files}
        return parents.pop() if len(parents) == 1 else ""


@dataclass(frozen=True)
class Manifest:
    """All artifacts, in manifest order; `source` says which file they came from."""

    artifacts: dict[str, Artifact]
    source: Path | None = None

    def get(self, name: str) -> Artifact:
        try:
            return self.artifacts[name]
        except KeyError:
            known = ", ".join(self.artifacts)
            raise KeyError(f"unknown weight artifact {name!r}; known: {known}") from None

    def __iter__(self):
        return iter(self.artifacts.values())

    def __len__(self) -> int:
        return len(self.artifacts)


def _file_from_toml(entry: str, raw: dict) -> ArtifactFile:
    unknown = set(raw) - {"path", "url", "size", "sha256", "md5", "archive_member", "lookalikes"}
    if unknown:
        raise ManifestError(f"{entry}: unknown file field(s) {sorted(unknown)}")
    if "path" not in raw:
        raise ManifestError(f"{entry}: a file has no 'path'")
    path = PurePosixPath(raw["path"])
    if path.is_absolute() or ".." in path.parts:
        raise ManifestError(f"{entry}: file path {raw['path']!r} must stay inside the weights folder")
    size = raw.get("size")
    if size is not None and (not isinstance(size, int) or size < 0):
        raise ManifestError(f"{entry}: size of {raw['path']} must be a byte count")
    for algo, length in (("sha256", 64), ("md5", 32)):
        digest = raw.get(algo)
        if digest is not None and (len(digest) != length or not all(c in "0123456789abcdef" for c in digest)):
            raise ManifestError(f"{entry}: {algo} of {raw['path']} must be {length} lowercase hex digits")
    lookalikes = {int(k): str(v) for k, v in raw.get("lookalikes", {}).items()}
    return ArtifactFile(
        path=str(path),
        url=raw.get("url") or None,
        size=size,
        sha256=raw.get("sha256") or None,
        md5=raw.get("md5") or None,
        archive_member=raw.get("archive_member") or None,
        lookalikes=lookalikes,
    )


def parse_manifest(data: dict, source: Path | None = None) -> Manifest:
    """Build a Manifest from the TOML structure `{artifact: [{name, ..., file: [...]}, ...]}`."""
    artifacts: dict[str, Artifact] = {}
    for raw in data.get("artifact", []):
        name = raw.get("name")
        if not name:
            raise ManifestError("an [[artifact]] entry has no 'name'")
        if name in artifacts:
            raise ManifestError(f"artifact {name!r} is listed twice")
        files = [_file_from_toml(name, f) for f in raw.get("file", [])]
        if not files:
            raise ManifestError(f"{name}: no [[artifact.file]] entries")
        for key in ("title", "component", "licence"):
            if not raw.get(key):
                raise ManifestError(f"{name}: missing {key!r}")
        artifacts[name] = Artifact(
            name=name,
            title=raw["title"],
            component=raw["component"],
            licence=raw["licence"],
            files=files,
            notes=raw.get("notes", "").strip(),
            obtain=raw.get("obtain", "").strip(),
            link_search=tuple(raw.get("link_search", (".",))),
        )
    return Manifest(artifacts=artifacts, source=source)


def manifest_path(override: str | os.PathLike | None = None) -> Path:
    """override > env MM_WEIGHTS_MANIFEST > the manifest.toml shipped in this package."""
    if override is not None:
        return Path(override)
    env = os.environ.get(MANIFEST_ENV)
    return Path(env) if env else DEFAULT_MANIFEST


def load_manifest(path: str | os.PathLike | None = None) -> Manifest:
    """Read and validate the manifest (see `manifest_path` for which file)."""
    source = manifest_path(path)
    with open(source, "rb") as fh:
        return parse_manifest(tomllib.load(fh), source=source)


def resolve_manifest(manifest: Manifest | str | os.PathLike | None) -> Manifest:
    """Accept a Manifest, a manifest file path, or None (the default manifest)."""
    return manifest if isinstance(manifest, Manifest) else load_manifest(manifest)
