"""Meta's consolidated LLaMA folder: ``params.json``, ``consolidated.NN.pth`` (model-parallel shards,
joined lazily, see checkpoint.MergedShards) and a SentencePiece ``tokenizer.model``, inside the folder
or beside it in the parent (Meta's own layout: ``LLaMA/tokenizer.model`` next to ``LLaMA/7B/``).
The weights are already in this project's names and RoPE layout; nothing is converted."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from ..checkpoint import read_meta_llama
from ..config import LlamaConfig
from ..tokenizer import Tokenizer
from . import BaseFiles, BaseFormatError


def find_tokenizer(folder: Path, name: str = "tokenizer.model") -> Path:
    """The tokenizer inside the folder, else the one in its parent (Meta's layout); the inside path
    when neither exists, so the error names where it was expected first."""
    inside = folder / name
    return inside if inside.exists() or not (folder.parent / name).exists() else folder.parent / name


def read_meta_folder(folder: str | os.PathLike, tokenizer: str | os.PathLike | None = None,
                     **overrides: Any) -> BaseFiles:
    """Config, lazy weights and tokenizer of a Meta folder. ``overrides`` replace LlamaConfig fields
    (e.g. ``max_seq_len``). LLaMA-1's ``params.json`` says ``vocab_size: -1``: the tokenizer's size is
    the vocabulary then; otherwise the file's number stands, and the tokenizer may be smaller (a
    padded embedding) but never larger."""
    folder = Path(folder)
    tok_path = Path(tokenizer) if tokenizer is not None else find_tokenizer(folder)
    if not tok_path.is_file():
        raise BaseFormatError(f"{folder}: no tokenizer.model inside it or beside it (looked for {tok_path})")
    tok = Tokenizer(tok_path)
    try:
        params, weights = read_meta_llama(folder)
        config = LlamaConfig.from_params(params, vocab_size=tok.n_words, **overrides)
    except (FileNotFoundError, ValueError, TypeError) as e:
        raise BaseFormatError(f"{folder}: {e}") from e
    if tok.n_words > config.vocab_size:
        raise BaseFormatError(f"{folder}: params.json says vocab_size {config.vocab_size}, but the tokenizer "
                              f"{tok_path} has {tok.n_words} tokens")
    return BaseFiles(config, weights, tok, source=f"Meta LLaMA folder {folder}", format="meta")
