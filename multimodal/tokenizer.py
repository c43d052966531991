"""Tokenizers behind one interface (SentencePiece here; byte-level BPE in ``multimodal.formats``), and
an incremental detokenizer for streaming."""
from __future__ import annotations

import os
from pathlib import Path

from sentencepiece import SentencePieceProcessor


class TokenizerBase:
    """What the model, the generator and the app need of a tokenizer.

    ``stop_ids``: every token that ends an answer (eos and each end-of-turn token the base declares).
    ``chat_template``: the base's Jinja chat template (``tokenizer_config.json`` or GGUF metadata), or
    None for bases without one (Meta's LLaMA-1: the app uses the Alpaca template)."""

    n_words: int
    bos_id: int
    eos_id: int
    pad_id: int = -1
    add_bos: bool = True  # whether a plain prompt starts with bos (SmolLM2's does not)
    chat_template: str | None = None

    @property
    def stop_ids(self) -> frozenset[int]:
        return frozenset({self.eos_id})

    def encode(self, text: str, bos: bool = True, eos: bool = False) -> list[int]:
        raise NotImplementedError

    def decode(self, ids: list[int]) -> str:
        raise NotImplementedError

    def count(self, text: str) -> int:
        """Number of tokens of ``text`` without bos/eos (for context budgets)."""
        return len(self.encode(text, bos=False))

    def render_chat(self, messages: list[dict], add_generation_prompt: bool = True, **extra: object) -> str:
        """The base's chat template applied to ``messages``. The special tokens' text comes from the
        ``bos_token``/``eos_token`` attributes a base's tokenizer sets (absent: left undefined)."""
        from .chat_template import render_chat

        if self.chat_template is None:
            raise ValueError("this tokenizer has no chat template (the base ships none)")
        return render_chat(self.chat_template, messages, add_generation_prompt=add_generation_prompt,
                           bos_token=getattr(self, "bos_token", None), eos_token=getattr(self, "eos_token", None),
                           **extra)

    def encode_chat(self, messages: list[dict], add_generation_prompt: bool = True, **extra: object) -> list[int]:
        """Ids of the rendered chat, as transformers' ``apply_chat_template(tokenize=True)``: the template
        writes every special token itself (a bos included), so none is added here; special tokens in
        the text are parsed as such by ``encode``."""
        return self.encode(self.render_chat(messages, add_generation_prompt, **extra), bos=False)


class Tokenizer(TokenizerBase):
    """SentencePiece with Meta's conventions (bos 1, eos 2, pad -1 for LLaMA's file)."""

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

    def __init__(self, tokenizer: TokenizerBase) -> None:
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
