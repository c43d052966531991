"""SentencePiece tokenizer with Meta's conventions (bos 1, eos 2, pad -1 for LLaMA's file), and an
incremental detokenizer for streaming."""
from __future__ import annotations

import os
from pathlib import Path

from sentencepiece import SentencePieceProcessor


class Tokenizer:
    def __init__(self, path: str | os.PathLike) -> None:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"tokenizer file not found: {path}")
        self.sp = SentencePieceProcessor(model_file=str(path))
        self.n_words: int = self.sp.vocab_size()
        self.bos_id: int = self.sp.bos_id()
        self.eos_id: int = self.sp.eos_id()
        self.pad_id: int = self.sp.pad_id()  # -1 in Meta's file: padding is never a real token

    def encode(self, text: str, bos: bool = True, eos: bool = False) -> list[int]:
        ids = self.sp.encode(text)
        return ([self.bos_id] if bos else []) + ids + ([self.eos_id] if eos else [])

    def decode(self, ids: list[int]) -> str:
        return self.sp.decode(ids)

    def count(self, text: str) -> int:
        """Number of tokens of ``text`` without bos/eos (for context budgets)."""
        return len(self.sp.encode(text))


class StreamDecoder:
    """Turns token ids into text pieces as they arrive.

    SentencePiece text depends on neighbours (a leading "▁" becomes a space except at the start; a
    character may span several byte tokens), so each step decodes a short window that starts a few
    tokens back and emits only what the new token added; an unfinished multi-byte character (shown as
    U+FFFD) is held back until it completes. Cost per token is constant, not growing with the answer.
    """

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tok = tokenizer
        self.ids: list[int] = []
        self.prefix = 0  # window start
        self.read = 0  # tokens whose text has been emitted

    def push(self, token: int) -> str:
        self.ids.append(token)
        before = self.tok.decode(self.ids[self.prefix:self.read])
        after = self.tok.decode(self.ids[self.prefix:])
        if after.endswith("\ufffd") or len(after) <= len(before):
            return ""
        self.prefix, self.read = self.read, len(self.ids)
        return after[len(before):]

    def flush(self) -> str:
        """Whatever is held back at the end (an incomplete character stays as U+FFFD)."""
        before = self.tok.decode(self.ids[self.prefix:self.read])
        after = self.tok.decode(self.ids[self.prefix:])
        self.prefix = self.read = len(self.ids)
        return after[len(before):] if len(after) > len(before) else ""
