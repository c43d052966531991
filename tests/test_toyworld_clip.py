"""The toy world's labels and the demo CLIP's training: scenes.jsonl describes exactly the images and
captions written beside it, and the attribute loss makes the image embedding carry what the captions
say (here: position, which contrastive learning alone is slow to find)."""
from __future__ import annotations

import json
import random
from pathlib import Path

import torch
from PIL import Image

from multimodal.config import ClipVisionConfig
from multimodal.image import ImagePreprocessor
from multimodal.toyworld import (COUNTS, LABELS, NO_LABEL, POSITIONS, WHERE, Scene, caption, generate_world, labels,
                                 read_scenes, render, sample_scene)
from multimodal.train.clip import build_clip, train_clip


def test_labels_index_the_scene_attributes_and_skip_what_does_not_apply() -> None:
    one = Scene("shapes", "green", "diamond", 1, "big", "top", layout=((0.5, 0.25),))
    assert {k: LABELS[k][v] for k, v in labels(one).items() if v != NO_LABEL} == {
        "colour": "green", "shape": "diamond", "count": "one", "position": "top", "size": "big"}
    assert labels(one)["word"] == NO_LABEL
    three = Scene("shapes", "red", "circle", 3, "small", layout=((0.2, 0.2), (0.5, 0.5), (0.8, 0.8)))
    assert labels(three)["count"] == COUNTS.index("three")
    assert labels(three)["position"] == NO_LABEL and labels(three)["size"] == NO_LABEL  # size is only asked of one shape
    word = Scene("word", word="moon", layout=((0.5, 0.5),))
    assert [k for k, v in labels(word).items() if v != NO_LABEL] == ["word"]


def test_scenes_file_matches_the_images_and_captions_beside_it(tmp_path: Path) -> None:
    files = generate_world(tmp_path, n_images=30, n_instructions=2, seed=11, image_size=32)
    scenes = read_scenes(files["scenes"])
    rows = [json.loads(line) for line in files["captions"].read_text().splitlines()]
    assert [r["image"] for r in rows] == list(scenes)
    for r in rows:
        scene = scenes[r["image"]]
        assert caption(scene) == r["caption"]
        drawn = render(scene, 32).tobytes()
        with Image.open(tmp_path / r["image"]) as written:
            assert written.convert("RGB").tobytes() == drawn


def _linear_readout(train: torch.Tensor, y_train: torch.Tensor, test: torch.Tensor, y_test: torch.Tensor) -> float:
    """Accuracy of a ridge-regression readout (closed form, to one-hot targets) fitted on embeddings
    [N, E] of one set of images and scored on another."""
    mu, sd = train.mean(0), train.std(0) + 1e-6
    x, xt = (train - mu) / sd, (test - mu) / sd
    x, xt = torch.cat([x, torch.ones(len(x), 1)], 1), torch.cat([xt, torch.ones(len(xt), 1)], 1)  # [N, E + 1]
    w = torch.linalg.solve(x.T @ x + 1e-1 * torch.eye(x.shape[1]), x.T @ torch.nn.functional.one_hot(y_train).float())
    return float(((xt @ w).argmax(1) == y_test).float().mean())


STEPS, LR = 150, 1e-3


def test_attribute_loss_puts_position_into_the_image_embedding() -> None:
    cfg = ClipVisionConfig(image_size=32, patch_size=8, width=64, layers=2, heads=1, output_dim=32)
    pre = ImagePreprocessor(cfg)

    def world(seed: int, per_position: int) -> tuple[torch.Tensor, torch.Tensor, list[Scene]]:
        rng = random.Random(seed)
        scenes = [sample_scene(rng, fix={"position": p}) for p in POSITIONS for _ in range(per_position)]
        pixels = torch.stack([pre(render(s, 32)) for s in scenes])  # [N, 3, 32, 32]
        return pixels, torch.tensor([labels(s)["position"] for s in scenes]), scenes

    pixels, position, scenes = world(3, 40)
    held_pixels, held_position, _ = world(4, 20)
    # captions with the position cut out ("A small red circle."): the contrastive loss alone has no reason
    # to encode position, so whatever the readout finds of it came from the attribute loss
    words = [caption(s).replace(" " + WHERE[s.position], "").rstrip(".").split() for s in scenes]
    vocab = {w: i + 3 for i, w in enumerate(sorted({w for ws in words for w in ws}))}
    texts = torch.zeros(len(scenes), 8, dtype=torch.long)
    for row, ws in zip(texts, words):
        ids = [vocab[w] for w in ws] + [2]  # EOS, where the text tower pools
        row[: len(ids)] = torch.tensor(ids)
    names = sorted({" ".join(ws) for ws in words})
    caption_ids = torch.tensor([names.index(" ".join(ws)) for ws in words])

    clip = build_clip(cfg, vocab_size=len(vocab) + 3, eos_id=2, context_length=8, seed=0)
    unused = torch.full((len(pixels),), NO_LABEL)  # an attribute no image in the set has is skipped, not an error
    losses = train_clip(clip, pixels, texts, caption_ids, steps=STEPS, batch_size=50, lr=LR, warmup=10,
                        attributes={"position": position, "word": unused}, progress=False)
    assert len(losses.contrastive) == len(losses.attributes) == STEPS
    first, last = sum(losses.attributes[:5]) / 5, sum(losses.attributes[-5:]) / 5
    with torch.no_grad():
        held_out = _linear_readout(clip.encode_image(pixels), position, clip.encode_image(held_pixels), held_position)
    assert first > 2.6 and last < 0.5 * first, (first, last)  # two views (CLS, token mean) x log(5) = 3.2 at the start
    print(f"position readout on held-out images: {held_out:.2f}; attribute loss {first:.2f} -> {last:.2f}")
    assert held_out >= 0.8, held_out  # and the embedding now carries position, on images it never saw
