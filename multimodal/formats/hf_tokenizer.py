"""Tokenizers of Hugging Face folders: ``tokenizer.json`` through the ``tokenizers`` library, or a lone
SentencePiece ``tokenizer.model``, each with the folder's chat template, bos convention and stop ids.

The ids must be the ones ``transformers`` gives for the same text, since that is what fine-tuned
chat models saw: special tokens written in the text (``<|im_start|>``, ``<s>``) are parsed as single
tokens, and whether a plain prompt starts with bos follows what the folder's files say.
"""
from __future__ import annotations

import os
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import tokenizers

from ..tokenizer import Tokenizer, TokenizerBase
from . import BaseFormatError, one_line, read_json_object

# Added tokens that close a turn in the chat formats LLaMA-family bases use (ChatML, Llama 3, Phi,
# Gemma) or end a document; a model that emits one is done answering.
END_OF_TURN = frozenset({"<|im_end|>", "<|eot_id|>", "<|eom_id|>", "<|end|>", "<end_of_turn>", "<|endoftext|>",
                         "<|end_of_text|>"})


class HFTokenizer(TokenizerBase):
    """A ``tokenizers.Tokenizer`` (byte-level BPE, or SentencePiece converted to BPE) behind our
    interface. bos/eos are added by ``encode``'s flags alone (the file's post-processor is not run),
    so the caller decides, with ``add_bos`` saying what the base expects for a plain prompt."""

    def __init__(self, tok: tokenizers.Tokenizer, *, bos_id: int | None, eos_id: int, stop_ids: Iterable[int] = (),
                 add_bos: bool, chat_template: str | None, bos_token: str | None, eos_token: str | None) -> None:
        self.tok = tok
        self.n_words: int = tok.get_vocab_size(with_added_tokens=True)
        self.bos_id = bos_id  # type: ignore[assignment]  # None: the base has no bos (SmolLM2's ChatML)
        self.eos_id = eos_id
        self.add_bos = add_bos and bos_id is not None
        self.chat_template = chat_template
        self.bos_token, self.eos_token = bos_token, eos_token
        self._stop_ids = frozenset({eos_id, *stop_ids})
        # control tokens carry no answer text; everything else, added tokens included, is decoded
        self._silent = frozenset(self._stop_ids | ({bos_id} if bos_id is not None else set()))

    @property
    def stop_ids(self) -> frozenset[int]:
        return self._stop_ids

    def encode(self, text: str, bos: bool = True, eos: bool = False) -> list[int]:
        ids = self.tok.encode(text, add_special_tokens=False).ids  # added tokens in the text still match
        head = [self.bos_id] if bos and self.bos_id is not None else []
        return head + ids + ([self.eos_id] if eos else [])

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode([i for i in ids if i not in self._silent], skip_special_tokens=False)

    def count(self, text: str) -> int:
        return len(self.tok.encode(text, add_special_tokens=False).ids)

    @classmethod
    def from_folder(cls, folder: str | os.PathLike) -> "HFTokenizer":
        """``tokenizer.json`` + ``tokenizer_config.json`` (+ ``generation_config.json``, ``config.json``,
        ``chat_template.jinja``) of a Hugging Face folder."""
        folder = Path(folder)
        path = folder / "tokenizer.json"
        try:
            tok = tokenizers.Tokenizer.from_file(str(path))
        except Exception as e:  # the library raises a bare Exception for malformed files
            raise BaseFormatError(f"{path}: not a tokenizers file ({one_line(e)})") from None
        cfg = FolderTokenizerConfig.read(folder)

        def token_id(text: str | None, what: str) -> int | None:
            if text is None:
                return None
            i = tok.token_to_id(text)
            if i is None:
                raise BaseFormatError(f"{cfg.config_path}: {what} {text!r} is not in {path.name}")
            return i

        # What transformers 5 does for a folder with tokenizer.json: the file's post-processor alone says
        # whether bos is added (tokenizer_config's add_bos_token is ignored), so probe it.
        plain, full = tok.encode("a", add_special_tokens=False).ids, tok.encode("a", add_special_tokens=True).ids
        probed_bos = full[0] if len(full) > len(plain) and full[-len(plain):] == plain else None
        bos_id = token_id(cfg.bos_token, "bos_token")
        if probed_bos is not None and bos_id is None:
            bos_id = probed_bos
        eos_id = token_id(cfg.eos_token, "eos_token")
        if eos_id is None:
            eos_id = next(iter(cfg.eos_ids), None)
        if eos_id is None:
            raise BaseFormatError(f"{folder}: no eos token in tokenizer_config.json, generation_config.json "
                                  "or config.json")
        turn_ends = {i for text, i in tok.get_vocab(with_added_tokens=True).items() if text in END_OF_TURN}
        bos_token = tok.id_to_token(bos_id) if bos_id is not None else None
        return cls(tok, bos_id=bos_id, eos_id=eos_id, stop_ids=set(cfg.eos_ids) | turn_ends,
                   add_bos=probed_bos is not None and probed_bos == bos_id, chat_template=cfg.chat_template,
                   bos_token=bos_token, eos_token=tok.id_to_token(eos_id))


class FolderSentencePiece(Tokenizer):
    """Meta's SentencePiece ``Tokenizer`` for a folder that has only ``tokenizer.model``, with the
    folder's chat template, bos convention and stop ids. As in transformers, the text of a control
    piece (``<s>``, ``</s>``, ``<unk>``) is that token, which chat templates rely on when they write
    ``bos_token`` into the prompt; the text between such pieces is encoded by SentencePiece itself
    (transformers' converted fast tokenizer deviates from it on runs of spaces)."""

    def __init__(self, path: str | os.PathLike, *, add_bos: bool, chat_template: str | None,
                 stop_ids: Iterable[int] = ()) -> None:
        super().__init__(path)
        self.add_bos, self.chat_template = add_bos, chat_template
        self.bos_token: str | None = self.sp.id_to_piece(self.bos_id) if self.bos_id >= 0 else None
        self.eos_token: str | None = self.sp.id_to_piece(self.eos_id)
        self._stop_ids = frozenset({self.eos_id, *stop_ids})
        specials = {self.sp.id_to_piece(i): i for i in range(self.n_words)
                    if self.sp.is_control(i) or self.sp.is_unknown(i)}
        self._specials = specials
        # longest first, so a special that contains another is matched whole
        self._split = re.compile("(" + "|".join(re.escape(s) for s in sorted(specials, key=len, reverse=True)) + ")")

    @property
    def stop_ids(self) -> frozenset[int]:
        return self._stop_ids

    def encode(self, text: str, bos: bool = True, eos: bool = False) -> list[int]:
        ids: list[int] = []
        for part in self._split.split(text):  # odd entries: the specials themselves
            if part in self._specials:
                ids.append(self._specials[part])
            elif part:
                ids += self.sp.encode(part)
        return ([self.bos_id] if bos else []) + ids + ([self.eos_id] if eos else [])

    def count(self, text: str) -> int:
        return len(self.encode(text, bos=False))

    @classmethod
    def from_folder(cls, folder: str | os.PathLike) -> "FolderSentencePiece":
        folder = Path(folder)
        cfg = FolderTokenizerConfig.read(folder)
        add_bos = cfg.raw.get("add_bos_token", True)  # LlamaTokenizer's default
        return cls(folder / "tokenizer.model", add_bos=bool(add_bos), chat_template=cfg.chat_template,
                   stop_ids=cfg.eos_ids)


class FolderTokenizerConfig:
    """What ``tokenizer_config.json``, ``generation_config.json``, ``config.json`` and
    ``chat_template.jinja`` say about special tokens and chat format."""

    def __init__(self, folder: Path, raw: dict[str, Any], chat_template: str | None, eos_ids: list[int]) -> None:
        self.folder, self.raw, self.chat_template, self.eos_ids = folder, raw, chat_template, eos_ids
        self.config_path = folder / "tokenizer_config.json"

    @property
    def bos_token(self) -> str | None:
        return _token_text(self.raw.get("bos_token"))

    @property
    def eos_token(self) -> str | None:
        return _token_text(self.raw.get("eos_token"))

    @classmethod
    def read(cls, folder: Path) -> "FolderTokenizerConfig":
        raw = _read_json(folder / "tokenizer_config.json") or {}
        # a separate chat_template.jinja wins over tokenizer_config.json, as in transformers
        template_file = folder / "chat_template.jinja"
        if template_file.is_file():
            template: Any = template_file.read_text(encoding="utf-8")
        else:
            separate = _read_json(folder / "chat_template.json") or {}
            template = raw.get("chat_template") or separate.get("chat_template")
        if isinstance(template, list):  # named templates: [{"name": "default", "template": "..."}, ...]
            named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
            template = named.get("default")
        if template is not None and not isinstance(template, str):
            raise BaseFormatError(f"{folder / 'tokenizer_config.json'}: chat_template is not a string")
        eos_ids: list[int] = []
        for name in ("generation_config.json", "config.json"):
            value = (_read_json(folder / name) or {}).get("eos_token_id")
            for i in value if isinstance(value, list) else [value]:
                if isinstance(i, int) and i not in eos_ids:
                    eos_ids.append(i)
        return cls(folder, raw, template, eos_ids)


def load_folder_tokenizer(folder: str | os.PathLike) -> TokenizerBase:
    """The tokenizer transformers would use for this folder: ``tokenizer.json`` if present, else the
    SentencePiece ``tokenizer.model``."""
    folder = Path(folder)
    if (folder / "tokenizer.json").is_file():
        return HFTokenizer.from_folder(folder)
    if (folder / "tokenizer.model").is_file():
        return FolderSentencePiece.from_folder(folder)
    raise BaseFormatError(f"{folder}: no tokenizer.json or tokenizer.model")


def _token_text(value: Any) -> str | None:
    """A special token as tokenizer_config.json writes it: a string, or an AddedToken dict."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _read_json(path: Path) -> dict[str, Any] | None:
    return read_json_object(path) if path.is_file() else None

