"""The demo's own SentencePiece tokenizer, trained on the toy world's text with Meta's conventions
(unk 0, bos 1, eos 2, no pad id, byte fallback so any text can be encoded).

Pieces are words or parts of words (they do not span spaces): a caption such as "A big red circle on
the left." is then a sequence of one token per attribute, so the caption loss asks the visual tokens one
small question at a time (colour, then shape, ...) instead of one joint class per phrase, which is what
lets the gated visual path learn in minutes.
"""
from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import sentencepiece as spm


def train_tokenizer(lines: Iterable[str], path: str | Path, vocab_size: int = 800, seed: int = 0) -> Path:
    """Write ``path`` (a ``.model`` file) and return it. BPE training is deterministic for the same
    input; the seed is set anyway for SentencePiece's sampling paths."""
    spm.set_random_generator_seed(seed)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    prefix = path.with_suffix("")
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(list(lines)), model_prefix=str(prefix), vocab_size=vocab_size, model_type="bpe",
        byte_fallback=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1, character_coverage=1.0,
        split_by_whitespace=True, max_sentencepiece_length=16, normalization_rule_name="identity",
        remove_extra_whitespaces=False, num_threads=2, minloglevel=2)
    prefix.with_suffix(".vocab").unlink(missing_ok=True)  # the .model file holds the vocabulary too
    produced = prefix.with_suffix(".model")
    if produced != path:
        produced.replace(path)
    return path
