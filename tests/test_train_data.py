"""Training data readers: captions (CSV, TSV, JSONL), Alpaca and LLaVA instruction JSON, tokenisation."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from multimodal.prompt import CAPTION_INSTRUCTION, format_chat, format_prompt
from multimodal.tokenizer import Tokenizer
from multimodal.train.data import IGNORE, Sample, collate, encode, read_captions, read_instructions


def test_csv_captions_with_header_and_relative_paths(tmp_path: Path) -> None:
    (tmp_path / "cc.csv").write_text('image,caption\nimgs/a.png,"A cat, sitting."\n/abs/b.jpg,Two dogs\n')
    samples = read_captions(tmp_path / "cc.csv")
    assert samples == [Sample(format_prompt(CAPTION_INSTRUCTION), "A cat, sitting.", tmp_path / "imgs/a.png"),
                       Sample(format_prompt(CAPTION_INSTRUCTION), "Two dogs", Path("/abs/b.jpg"))]


def test_tsv_captions_in_the_released_codes_url_caption_layout(tmp_path: Path) -> None:
    (tmp_path / "coco.tsv").write_text("url\tcaption\nx/1.jpg\ta man riding a horse\n")
    [s] = read_captions(tmp_path / "coco.tsv", image_root=tmp_path / "root")
    assert s.image == tmp_path / "root" / "x/1.jpg" and s.answer == "a man riding a horse"


def test_jsonl_captions_list_gives_one_sample_each(tmp_path: Path) -> None:
    lines = [{"image": "a.png", "caption": "one"}, {"path": "b.png", "text": ["two", "three"]}]
    (tmp_path / "c.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    samples = read_captions(tmp_path / "c.jsonl")
    assert [(s.image.name, s.answer) for s in samples] == [("a.png", "one"), ("b.png", "two"), ("b.png", "three")]
    assert all(s.prompt == format_prompt("Generate caption of this image") for s in samples)


def test_caption_row_without_image_column_names_the_problem(tmp_path: Path) -> None:
    (tmp_path / "bad.csv").write_text("picture,caption\na.png,x\n")
    with pytest.raises(ValueError, match="no image column"):
        read_captions(tmp_path / "bad.csv")


def test_alpaca_items_with_and_without_input(tmp_path: Path) -> None:
    items = [{"instruction": "Give three tips.", "input": "", "output": "Eat, sleep, walk."},
             {"instruction": "Translate.", "input": "bonjour", "output": "hello"}]
    (tmp_path / "alpaca.json").write_text(json.dumps(items))
    a, b = read_instructions(tmp_path / "alpaca.json")
    assert a == Sample(format_prompt("Give three tips."), "Eat, sleep, walk.", None)
    assert b == Sample(format_prompt("Translate.", "bonjour"), "hello", None)
    assert "### Input:\nbonjour" in b.prompt


def test_llava_multi_turn_conversation_becomes_one_sample_per_answer(tmp_path: Path) -> None:
    item = {"id": "1", "image": "coco/1.jpg", "conversations": [
        {"from": "human", "value": "<image>\nWhat is in the picture?"}, {"from": "gpt", "value": "A red bus."},
        {"from": "human", "value": "How many wheels?"}, {"from": "gpt", "value": "Four."},
        {"from": "human", "value": "Where is it?<image>"}, {"from": "gpt", "value": "On a street."}]}
    (tmp_path / "llava.json").write_text(json.dumps([item, {"instruction": "Hi", "output": "Hello"}]))
    samples = read_instructions(tmp_path / "llava.json", image_root=tmp_path / "images")
    assert len(samples) == 4
    first, second, third, alpaca = samples
    assert first == Sample(format_prompt("What is in the picture?"), "A red bus.", tmp_path / "images/coco/1.jpg")
    assert second.prompt == format_chat("How many wheels?", [("What is in the picture?", "A red bus.")])
    assert third.prompt == format_chat("Where is it?", [("What is in the picture?", "A red bus."), ("How many wheels?", "Four.")])
    assert "<image>" not in "".join(s.prompt for s in samples)
    assert alpaca == Sample(format_prompt("Hi"), "Hello", None)


def test_unknown_instruction_item_is_refused(tmp_path: Path) -> None:
    (tmp_path / "x.json").write_text(json.dumps([{"question": "?", "answer": "!"}]))
    with pytest.raises(ValueError, match="neither Alpaca"):
        read_instructions(tmp_path / "x.json")


def test_labels_cover_the_answer_and_eos_only(tiny_files: dict[str, Path]) -> None:
    tok = Tokenizer(tiny_files["tokenizer_path"])
    s = Sample(format_prompt("What colour is the bus?"), "red", None)
    ids, labels = encode(tok, s, max_len=512)
    prompt = tok.encode(s.prompt, bos=True)
    assert ids[:len(prompt)] == prompt  # exactly what generation feeds for this prompt
    assert labels[:len(prompt)] == [IGNORE] * len(prompt)
    assert labels[len(prompt):] == ids[len(prompt):] == tok.encode("red", bos=False, eos=True)
    assert tok.decode(ids[len(prompt):-1]) == "red"
    short_ids, short_labels = encode(tok, s, max_len=5)
    assert len(short_ids) == len(short_labels) == 5


def test_collate_pads_right_and_never_labels_padding() -> None:
    batch = collate([([1, 5, 6], [IGNORE, 5, 6], torch.zeros(3, 4, 4)), ([1, 7], [IGNORE, 7], torch.ones(3, 4, 4))])
    assert batch["tokens"].tolist() == [[1, 5, 6], [1, 7, 0]]
    assert batch["labels"].tolist() == [[IGNORE, 5, 6], [IGNORE, 7, IGNORE]]
    assert batch["pixels"].shape == (2, 3, 4, 4)


def test_image_cache_decodes_each_image_once_and_gives_the_same_pixels(tiny_files: dict[str, Path], tmp_path: Path) -> None:
    from PIL import Image

    from multimodal.config import TINY_CLIP
    from multimodal.image import ImageError, ImagePreprocessor
    from multimodal.train.data import SampleDataset

    path = tmp_path / "red.png"
    Image.new("RGB", (40, 30), (200, 30, 30)).save(path)
    samples = [Sample(format_prompt(CAPTION_INSTRUCTION), "red", path)]
    tok, pre = Tokenizer(tiny_files["tokenizer_path"]), ImagePreprocessor(TINY_CLIP)
    plain = SampleDataset(samples, tok, pre, TINY_CLIP.image_size, 64)
    cached = SampleDataset(samples, tok, pre, TINY_CLIP.image_size, 64, cache_images=True)
    expected = pre(Image.open(path).convert("RGB"))
    assert torch.equal(plain[0][2], expected) and torch.equal(cached[0][2], expected)
    path.unlink()  # a cached image is not read again; an uncached one is
    assert torch.equal(cached[0][2], expected)
    with pytest.raises(ImageError, match="not found"):
        plain[0]
