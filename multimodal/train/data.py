"""Training data: readers for the common formats, turned into (prompt, answer, image) samples, then into
token ids with the loss on the answer only.

Every prompt is built with :mod:`multimodal.prompt`, the same functions the app uses, so a trained model
sees at inference exactly the layout it learned. The prompt and the answer are tokenised separately
(prompt with BOS, answer with EOS): the prompt's ids are then identical to what generation feeds, and the
first answer token is the one generation must produce.
"""
from __future__ import annotations

import csv
import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, RandomSampler

from ..image import ImagePreprocessor, open_image
from ..prompt import CAPTION_INSTRUCTION, format_chat, format_prompt
from ..tokenizer import Tokenizer

IGNORE = -100  # label of prompt and padding positions (cross_entropy's ignore_index)
_IMAGE_KEYS = ("image", "path", "file", "filename", "url")
_CAPTION_KEYS = ("caption", "text")


@dataclass(frozen=True)
class Sample:
    prompt: str
    answer: str
    image: Path | None  # None: a text-only sample (the model sees its "no image" input)


def _resolve(path: str, root: Path) -> Path:
    p = Path(path)
    return p if p.is_absolute() else root / p


def _pick(row: dict[str, Any], keys: Sequence[str], what: str, source: Path) -> Any:
    for k in keys:
        if row.get(k) not in (None, ""):
            return row[k]
    raise ValueError(f"{source}: a row has no {what} column (looked for {', '.join(keys)}): {row}")


def read_captions(path: str | Path, image_root: str | Path | None = None) -> list[Sample]:
    """Image-caption pairs from JSONL (one object per line) or CSV/TSV with a header (delimiter sniffed).

    Columns: image path (``image``/``path``/``file``/``url``) and ``caption`` (or ``text``); a JSON list of
    captions gives one sample each. Relative paths are taken from ``image_root`` (default: the file's
    folder). The prompt is the caption instruction the app's caption expert uses.
    """
    path = Path(path)
    root = Path(image_root) if image_root else path.parent
    if path.suffix == ".jsonl":
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    else:
        text = path.read_text()
        dialect = csv.Sniffer().sniff(text.split("\n", 1)[0], delimiters=",\t;")
        rows = list(csv.DictReader(text.splitlines(), dialect=dialect))
    prompt = format_prompt(CAPTION_INSTRUCTION)
    out = []
    for row in rows:
        image = _resolve(str(_pick(row, _IMAGE_KEYS, "image", path)), root)
        captions = _pick(row, _CAPTION_KEYS, "caption", path)
        for c in captions if isinstance(captions, list) else [captions]:
            out.append(Sample(prompt, str(c).strip(), image))
    return out


def _alpaca(item: dict[str, Any], root: Path) -> list[Sample]:
    image = _resolve(item["image"], root) if item.get("image") else None
    return [Sample(format_prompt(item["instruction"].strip(), (item.get("input") or "").strip() or None),
                   item["output"].strip(), image)]


def _llava(item: dict[str, Any], root: Path) -> list[Sample]:
    """Every assistant turn of a conversation becomes a sample; earlier turns are its history, laid out
    by ``format_chat`` as the app lays out a chat. The ``<image>`` placeholder is dropped: the image
    reaches the model through the gated prompts, not through the text."""
    image = _resolve(item["image"], root) if item.get("image") else None
    out, history, question = [], [], None
    for msg in item["conversations"]:
        text = msg["value"].replace("<image>", "").strip()
        if msg["from"] in ("human", "user"):
            question = text
        elif question is not None:
            out.append(Sample(format_chat(question, list(history)), text, image))
            history.append((question, text))
            question = None
    return out


def read_instructions(path: str | Path, image_root: str | Path | None = None) -> list[Sample]:
    """A JSON list of Alpaca items (``instruction``/``input``/``output``, optional ``image``) and/or LLaVA
    items (``image`` + ``conversations`` of human/gpt turns); both kinds may be mixed in one file."""
    path = Path(path)
    root = Path(image_root) if image_root else path.parent
    items = json.loads(path.read_text())
    out: list[Sample] = []
    for item in items:
        if "conversations" in item:
            out += _llava(item, root)
        elif "instruction" in item:
            out += _alpaca(item, root)
        else:
            raise ValueError(f"{path}: item is neither Alpaca (instruction/output) nor LLaVA (conversations): {item}")
    return out


def encode(tokenizer: Tokenizer, sample: Sample, max_len: int) -> tuple[list[int], list[int]]:
    """Token ids and labels (prompt positions ignored), truncated to ``max_len``."""
    prompt = tokenizer.encode(sample.prompt, bos=True)
    answer = tokenizer.encode(sample.answer, bos=False, eos=True)
    ids = (prompt + answer)[:max_len]
    labels = ([IGNORE] * len(prompt) + answer)[:max_len]
    return ids, labels


class SampleDataset(Dataset):
    """Samples -> (ids, labels, pixels). Pixels go through the model's own preprocessing; a text-only
    sample gets an all-zero (mean-colour) image, which is what the model's "no image" means."""

    def __init__(self, samples: list[Sample], tokenizer: Tokenizer, preprocess: ImagePreprocessor,
                 image_size: int, max_len: int, cache_images: bool = False) -> None:
        self.samples, self.tokenizer, self.preprocess = samples, tokenizer, preprocess
        self.image_size, self.max_len = image_size, max_len
        # decoded, preprocessed images kept in memory (per DataLoader worker): for small data sets seen for
        # many epochs, such as the demo's toy world, where decoding would otherwise cost every step
        self._pixels: dict[Path, torch.Tensor] | None = {} if cache_images else None

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> tuple[list[int], list[int], torch.Tensor]:
        s = self.samples[i]
        ids, labels = encode(self.tokenizer, s, self.max_len)
        if s.image is None:
            pixels = torch.zeros(3, self.image_size, self.image_size)
        elif self._pixels is not None and s.image in self._pixels:
            pixels = self._pixels[s.image]
        else:
            pixels = self.preprocess(open_image(s.image))
            if self._pixels is not None:
                self._pixels[s.image] = pixels
        return ids, labels, pixels


def collate(batch: list[tuple[list[int], list[int], torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Right-pad to the longest sample: tokens [B, S] (pad id 0, never a label), labels [B, S], pixels [B, 3, H, W]."""
    width = max(len(ids) for ids, _, _ in batch)
    tokens = torch.zeros(len(batch), width, dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE, dtype=torch.long)
    for row, (ids, lab, _) in enumerate(batch):
        tokens[row, :len(ids)] = torch.tensor(ids)
        labels[row, :len(lab)] = torch.tensor(lab)
    return {"tokens": tokens, "labels": labels, "pixels": torch.stack([p for _, _, p in batch])}


def endless(dataset: Dataset, batch_size: int, seed: int, distributed: bool, workers: int = 0,
            skip: int = 0) -> Iterator[dict[str, torch.Tensor]]:
    """Batches forever, reshuffled every pass (per rank under DDP), so two data kinds can be drawn side
    by side for a fixed number of steps whatever their sizes. ``skip`` batches are passed over by index
    (no sample is loaded), so a resumed run sees exactly the batches an uninterrupted one would."""
    drop_last = len(dataset) >= batch_size
    epoch = 0
    while True:
        if distributed:
            sampler: Any = DistributedSampler(dataset, shuffle=True, seed=seed, drop_last=True)
            sampler.set_epoch(epoch)
        else:
            sampler = RandomSampler(dataset, generator=torch.Generator().manual_seed(seed + epoch))
        indices = list(sampler)
        per_epoch = len(indices) // batch_size if drop_last else -(-len(indices) // batch_size)
        epoch += 1
        if skip >= per_epoch:
            skip -= per_epoch
            continue
        indices, skip = indices[skip * batch_size:], 0
        yield from DataLoader(dataset, batch_size=batch_size, sampler=indices, collate_fn=collate,
                              drop_last=drop_last, num_workers=workers)
