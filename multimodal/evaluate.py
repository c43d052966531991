"""python -m multimodal.evaluate --weights weights/demo --n 200 --seed 1234

The demo model's quality bar, measured: held-out toy-world images generated from a seed, one question
each about colour, shape, count or position (balanced, and each answer drawn uniformly so chance is
exactly 1 / number of answers), greedy decoding, exact match. Then the same questions with every
visual-layer gate forced to zero: the image can no longer reach the language model, so accuracy should
fall to chance. That second number is the proof that the answers come from the image.
"""
from __future__ import annotations

import argparse
import json
import random
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from .generate import Engine, SamplingParams
from .loading import LoadedModel, load_model
from .model import MultimodalLlama
from .prompt import format_prompt
from .toyworld import ANSWERS, QUESTIONS, Scene, render, sample_scene

TYPES = tuple(ANSWERS)  # colour, shape, count, position


@dataclass(frozen=True)
class Item:
    scene: Scene
    attribute: str
    question: str
    answer: str


def held_out(n: int, seed: int) -> list[Item]:
    """n questions, types in turn; the asked attribute's value is drawn uniformly (so chance is known),
    the rest of the scene at random. The seed keeps it apart from training (which uses other seeds)."""
    rng = random.Random(f"held-out-{seed}")
    items = []
    for i in range(n):
        attribute = TYPES[i % len(TYPES)]
        scene = sample_scene(rng, fix={attribute: rng.choice(ANSWERS[attribute])})
        items.append(Item(scene, attribute, rng.choice(QUESTIONS[attribute]), scene.answer(attribute)))
    return items


def normalise(text: str) -> str:
    return text.strip().rstrip(".").strip().lower()


@contextmanager
def visual_gates_zeroed(model: MultimodalLlama) -> Iterator[None]:
    """Every visual layer's gate at zero (tanh(0) = 0: the visual tokens add nothing), restored after."""
    gates = [model.llama.layers[i].attention.prompt_gate.gate for i in model.config.adapter.visual_layers]
    saved = [g.detach().clone() for g in gates]
    try:
        with torch.no_grad():
            for g in gates:
                g.zero_()
        yield
    finally:
        with torch.no_grad():
            for g, s in zip(gates, saved):
                g.copy_(s)


def accuracy(engine: Engine, items: list[Item]) -> dict[str, float]:
    """Exact-match accuracy per type and overall (greedy decoding)."""
    size = engine.model.config.clip.image_size
    params = SamplingParams(max_new_tokens=8, temperature=0.0)
    right = {t: 0 for t in TYPES}
    seen = {t: 0 for t in TYPES}
    for item in items:
        # the image's prompt K/V are computed here, with the gates as they are now (not from a cache)
        with torch.inference_mode():
            prompts = engine.model.prompt_kv(engine.pixels(render(item.scene, size)))
        reply = "".join(engine.stream(format_prompt(item.question), params=params, prompts=prompts))
        seen[item.attribute] += 1
        right[item.attribute] += normalise(reply) == item.answer
    out = {t: right[t] / seen[t] for t in TYPES if seen[t]}
    out["overall"] = sum(right.values()) / max(1, sum(seen.values()))
    return out


def chance(items: list[Item]) -> dict[str, float]:
    per = {t: 1 / len(ANSWERS[t]) for t in TYPES}
    counts = {t: sum(i.attribute == t for i in items) for t in TYPES}
    per["overall"] = sum(per[t] * counts[t] for t in TYPES) / max(1, len(items))
    return per


def evaluate(loaded: LoadedModel, n: int = 200, seed: int = 1234) -> dict[str, dict[str, float]]:
    items = held_out(n, seed)
    engine = Engine(loaded)
    with_gates = accuracy(engine, items)
    with visual_gates_zeroed(loaded.model):
        without = accuracy(engine, items)
    return {"with_gates": with_gates, "gates_zeroed": without, "chance": chance(items)}


def report(results: dict[str, dict[str, float]], n: int, seed: int) -> str:
    lines = [f"{n} held-out questions (seed {seed}), greedy decoding, exact match",
             f"{'type':<10}{'with gates':>12}{'gates zeroed':>14}{'chance':>9}"]
    for t in (*TYPES, "overall"):
        if t in results["with_gates"]:
            lines.append(f"{t:<10}{results['with_gates'][t]:>12.1%}{results['gates_zeroed'][t]:>14.1%}"
                         f"{results['chance'][t]:>9.1%}")
    return "\n".join(lines)


def load_weights(weights: Path, preset: str = "demo") -> LoadedModel:
    """A model directory laid out like weights/demo (params.json, consolidated.00.pth, tokenizer.model,
    clip.pt, adapter.pth), on the CPU in fp32."""
    return load_model(weights, weights / "tokenizer.model", weights / "clip.pt", weights / "adapter.pth",
                      preset=preset, device="cpu", dtype="float32", bgr=False)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m multimodal.evaluate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--weights", type=Path, default=Path("weights/demo"), help="model directory (default weights/demo)")
    parser.add_argument("--preset", default="demo")
    parser.add_argument("--n", type=int, default=200, help="number of questions")
    parser.add_argument("--seed", type=int, default=1234, help="seed of the held-out set")
    parser.add_argument("--json", type=Path, help="also write the numbers here")
    args = parser.parse_args(argv)
    torch.set_num_threads(min(2, torch.get_num_threads()))
    results = evaluate(load_weights(args.weights, args.preset), args.n, args.seed)
    print(report(results, args.n, args.seed))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
