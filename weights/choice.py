"""Which model the app would load from a weights folder, and why: one rule shared by
`python -m weights status` and `multimodal.options.ModelOptions` (so the two never disagree).

Order today: Meta's LLaMA-7B (with the released adapter) when its files are present (Meta's layout in
weights/llama-7b/, or a Hugging Face copy linked as weights/llama-7b-hf), else the project's own demo
model, committed under weights/demo/."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from .hf_link import linked_hf_llama1_7b
from .store import MissingWeightError, require, weights_dir

DEMO_FILES = ("params.json", "consolidated.00.pth", "tokenizer.model", "clip.pt", "adapter.pth")
DEMO_WHAT = "the project's demo model (toy world): coloured shapes only, not photos"


def demo_dir(root: str | os.PathLike | None = None) -> Path:
    return weights_dir(root) / "demo"


def demo_missing(root: str | os.PathLike | None = None) -> list[str]:
    d = demo_dir(root)
    return [f for f in DEMO_FILES if not (d / f).is_file()]


@dataclass(frozen=True)
class Choice:
    model: str  # "official" or "demo" (what --model auto resolves to)
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
    if not demo_missing(root):
        return Choice("demo", f"llama-7b is missing, so the app loads {DEMO_WHAT}")
    return Choice("official", "llama-7b is missing and weights/demo/ is incomplete: the app starts without a model "
                              "and says which file to get")
