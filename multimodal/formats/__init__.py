"""Readers for the language model's file formats. Each turns files into the same three things:

- a :class:`~multimodal.config.LlamaConfig` read from the files (every shape they state),
- named tensors in this project's (Meta's) names and RoPE layout, as a lazy mapping: a tensor is read,
  converted and handed out only when asked for, so the loader copying key by key never holds a
  second full copy of the model,
- a tokenizer (``multimodal.tokenizer.TokenizerBase``) with the base's chat template, if it has one.

``read_base`` picks the reader by what it finds; nothing after it branches on the format.

Our names: ``tok_embeddings.weight``, ``layers.{i}.attention_norm.weight``,
``layers.{i}.attention.{wq,wk,wv,wo}.weight``, ``layers.{i}.ffn_norm.weight``,
``layers.{i}.feed_forward.{w1,w2,w3}.weight`` (w1 gate, w3 up, w2 down), ``norm.weight``,
``output.weight`` (the embedding's tensor when the base ties them). wq/wk rows are in Meta's
interleaved-pair RoPE order (pairs (2i, 2i+1) rotate together).
"""
from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..config import LlamaConfig

StateDict = Mapping[str, torch.Tensor]


class BaseFormatError(ValueError):
    """Files that are not a LLaMA-family base this project can read; the message names the file and
    what is wrong with it, in one line."""


def one_line(e: BaseException) -> str:
    """A library's error message on one line, for the one-line errors above."""
    return " ".join(str(e).split())


def read_json_object(path: Path, error: type[ValueError] = BaseFormatError) -> dict[str, Any]:
    """A JSON file holding an object; anything else raises ``error`` naming the file."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise error(f"{path}: not valid JSON ({one_line(e)})") from None
    if not isinstance(data, dict):
        raise error(f"{path}: expected a JSON object")
    return data


@dataclass
class BaseFiles:
    config: LlamaConfig
    weights: StateDict  # lazy; our names and RoPE layout
    tokenizer: "TokenizerBase"  # noqa: F821 (multimodal.tokenizer)
    source: str  # what was read, for messages ("Hugging Face folder /x", "GGUF file /y.gguf")
    format: str  # "meta", "hf", "gguf"


WHAT_IS_READ = ("a folder with params.json and consolidated.*.pth (Meta), a folder with config.json "
                "(Hugging Face), or a .gguf file")


def read_base(path: str | os.PathLike, tokenizer: str | os.PathLike | None = None, **overrides: Any) -> BaseFiles:
    """The base at ``path``, by what is there: a Meta folder, a Hugging Face folder or a GGUF file.
    ``overrides`` replace LlamaConfig fields (e.g. ``max_seq_len``). ``tokenizer`` names Meta's
    SentencePiece file when it is elsewhere; the other formats carry their own tokenizer."""
    path = Path(path)
    reader = None
    if path.is_dir():
        if (path / "params.json").is_file() and any(path.glob("consolidated.*.pth")):
            from .meta import read_meta_folder

            return read_meta_folder(path, tokenizer, **overrides)
        if (path / "config.json").is_file():
            from .hf import read_hf_folder as reader
    elif path.is_file() and path.suffix == ".gguf":
        from .gguf_file import read_gguf as reader
    if reader is None:
        state = "is empty of those" if path.is_dir() else "is not such a file" if path.exists() else "does not exist"
        raise BaseFormatError(f"{path}: no base model there (looked for {WHAT_IS_READ}; the path {state})")
    if tokenizer is not None:
        logging.getLogger(__name__).info("%s carries its own tokenizer; %s is not used", path, tokenizer)
    return reader(path, **overrides)
