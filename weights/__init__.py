"""Weights: one manifest of every weight file, and the one place loaders find them.

Loaders call `require(name)` to get a verified-present path, or a MissingWeightError that names
the file and the command that fetches it. Nothing here downloads unless asked to by `fetch`.
"""
from .fetch import (
    ChecksumError,
    FetchError,
    FetchResult,
    InterruptedDownload,
    NotFetchableError,
    OfflineError,
    fetch_artifact,
    fetch_file,
)
from .link import LinkError, link_artifact
from .manifest import Artifact, ArtifactFile, Manifest, ManifestError, load_manifest
from .offline import easyocr_reader_kwargs, forbid_implicit_downloads
from .store import (
    CorruptWeightError,
    FileCheck,
    MissingWeightError,
    State,
    artifact,
    check_artifact,
    require,
    weights_dir,
)

__all__ = [
    "Artifact", "ArtifactFile", "ChecksumError", "CorruptWeightError", "FetchError", "FetchResult",
    "FileCheck", "InterruptedDownload", "LinkError", "Manifest", "ManifestError",
    "MissingWeightError", "NotFetchableError", "OfflineError", "State", "artifact",
    "check_artifact", "easyocr_reader_kwargs", "fetch_artifact", "fetch_file",
    "forbid_implicit_downloads", "link_artifact", "load_manifest", "require", "weights_dir",
]
