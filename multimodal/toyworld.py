"""A synthetic "toy world" the project generates itself: small images of coloured shapes (with sizes,
positions and counts) or of a rendered word, and all the text that goes with them: captions, single- and
multi-turn questions with exact answers, and plain-language instructions.

Why: it lets the project train its own demo model end to end on a CPU, and it makes a visual
assistant measurable, since every answer is known exactly. Everything is drawn from one seeded
``random.Random``, so a seed fixes the whole world.
"""
from __future__ import annotations

import json
import random
from dataclasses import asdict, dataclass
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220),
    "yellow": (235, 200, 30), "purple": (140, 60, 180), "orange": (245, 130, 30),
}
SHAPES = ("circle", "square", "triangle", "diamond")
COUNTS = ("one", "two", "three", "four")
POSITIONS: dict[str, tuple[float, float]] = {  # centre of the region, as fractions of the image side
    "left": (0.25, 0.5), "right": (0.75, 0.5), "top": (0.5, 0.25), "bottom": (0.5, 0.75), "centre": (0.5, 0.5),
}
SIZES: dict[str, float] = {"small": 0.10, "big": 0.17}  # radius as a fraction of the image side
WORDS = ("cat", "dog", "sun", "car", "tree", "fish", "book", "moon")
WHERE = {"left": "on the left", "right": "on the right", "top": "at the top", "bottom": "at the bottom",
         "centre": "in the centre"}

# Question wordings per attribute; evaluation asks held-out images with the same wordings.
QUESTIONS: dict[str, tuple[str, ...]] = {
    "colour": ("What colour is the shape?", "What colour are the shapes?", "Which colour do you see?",
               "What is the colour of the object?"),
    "shape": ("What shape is it?", "What shape do you see?", "Which shape is in the image?"),
    "count": ("How many shapes are there?", "How many objects are in the image?", "Count the shapes."),
    "position": ("Where is the shape?", "Where is the object in the image?"),
    "size": ("Is the shape big or small?",),
    "word": ("What word is written in the image?", "What does the text say?"),
    "describe": ("Describe the image.", "What is in this picture?"),
}
# The attributes the quality bar measures, with every possible answer (chance = 1 / len).
ANSWERS: dict[str, tuple[str, ...]] = {"colour": tuple(COLOURS), "shape": SHAPES, "count": COUNTS,
                                       "position": tuple(POSITIONS)}


@dataclass(frozen=True)
class Scene:
    """What an image shows. A "shapes" scene holds ``count`` identical shapes; a "word" scene a word."""

    kind: str  # "shapes" | "word"
    colour: str = ""
    shape: str = ""
    count: int = 0
    size: str = ""
    position: str = ""  # only for a single shape
    word: str = ""
    layout: tuple[tuple[float, float], ...] = ()  # shape centres or the word's, as fractions
    background: int = 255  # grey level

    def answer(self, attribute: str) -> str:
        """The exact answer to a question about ``attribute``."""
        if attribute == "count":
            return COUNTS[self.count - 1]
        if attribute == "describe":
            return caption(self)
        return str(getattr(self, attribute))

    def askable(self) -> tuple[str, ...]:
        if self.kind == "word":
            return ("word", "describe")
        single = ("position", "size") if self.count == 1 else ()
        return ("colour", "shape", "count") + single + ("describe",)


# Every attribute an image can be labelled with, and its classes (a label is an index into these).
LABELS: dict[str, tuple[str, ...]] = {**ANSWERS, "size": tuple(SIZES), "word": WORDS}
NO_LABEL = -100  # the attribute does not apply (position of several shapes, colour of a word); PyTorch's ignore_index


def labels(scene: Scene) -> dict[str, int]:
    """The scene's class index per attribute of ``LABELS``, ``NO_LABEL`` where it does not apply."""
    value = {"colour": scene.colour, "shape": scene.shape, "count": COUNTS[scene.count - 1] if scene.count else "",
             "position": scene.position, "size": scene.size if scene.count == 1 else "", "word": scene.word}
    return {k: LABELS[k].index(value[k]) if value[k] in LABELS[k] else NO_LABEL for k in LABELS}


def read_scenes(path: str | Path) -> dict[str, Scene]:
    """scenes.jsonl as written by :func:`generate_world`: image path -> its scene."""
    out = {}
    for line in Path(path).read_text().splitlines():
        row = json.loads(line)
        image = row.pop("image")
        out[image] = Scene(**{**row, "layout": tuple(tuple(p) for p in row["layout"])})
    return out


def caption(scene: Scene) -> str:
    if scene.kind == "word":
        return f'The word "{scene.word}" written in black.'
    if scene.count == 1:
        return f"A {scene.size} {scene.colour} {scene.shape} {WHERE[scene.position]}."
    return f"{COUNTS[scene.count - 1].capitalize()} {scene.size} {scene.colour} {scene.shape}s."


def sample_scene(rng: random.Random, fix: dict[str, str] | None = None, word_rate: float = 0.12,
                 single_rate: float | None = None) -> Scene:
    """A random scene; ``fix`` pins attributes (e.g. {"count": "one"}) so an evaluation set can be
    balanced on the attribute it asks about. ``single_rate``: the share of one-shape scenes (default:
    counts uniform, so a quarter)."""
    fix = fix or {}
    background = rng.randint(225, 255)
    if not fix and rng.random() < word_rate:
        return Scene("word", word=rng.choice(WORDS), layout=((rng.uniform(0.4, 0.6), rng.uniform(0.35, 0.65)),),
                     background=background)
    colour = fix.get("colour") or rng.choice(tuple(COLOURS))
    shape = fix.get("shape") or rng.choice(SHAPES)
    if "position" in fix:
        count = 1
    elif "count" in fix:
        count = COUNTS.index(fix["count"]) + 1
    elif single_rate is not None:
        count = 1 if rng.random() < single_rate else rng.randint(2, 4)
    else:
        count = rng.randint(1, 4)
    if count == 1:
        size = rng.choice(tuple(SIZES))
        position = fix.get("position") or rng.choice(tuple(POSITIONS))
        cx, cy = POSITIONS[position]
        layout = ((cx + rng.uniform(-0.05, 0.05), cy + rng.uniform(-0.05, 0.05)),)
        return Scene("shapes", colour, shape, 1, size, position, layout=layout, background=background)
    return Scene("shapes", colour, shape, count, "small", layout=_scatter(rng, count, SIZES["small"]),
                 background=background)


def _scatter(rng: random.Random, count: int, radius: float) -> tuple[tuple[float, float], ...]:
    """Non-overlapping centres (rejection sampling; a 4x4 grid fallback keeps it total)."""
    for _ in range(200):
        pts: list[tuple[float, float]] = []
        while len(pts) < count:
            p = (rng.uniform(radius + 0.03, 1 - radius - 0.03), rng.uniform(radius + 0.03, 1 - radius - 0.03))
            if all((p[0] - q[0]) ** 2 + (p[1] - q[1]) ** 2 > (2.3 * radius) ** 2 for q in pts):
                pts.append(p)
            elif rng.random() < 0.05:
                break
        if len(pts) == count:
            return tuple(pts)
    cells = rng.sample(range(16), count)
    return tuple(((c % 4 + 0.5) / 4, (c // 4 + 0.5) / 4) for c in cells)


def render(scene: Scene, size: int = 64) -> Image.Image:
    img = Image.new("RGB", (size, size), (scene.background,) * 3)
    draw = ImageDraw.Draw(img)
    if scene.kind == "word":
        font = ImageFont.load_default(size=max(8, int(size * 0.3)))
        (x, y), = scene.layout
        draw.text((x * size, y * size), scene.word, fill=(0, 0, 0), font=font, anchor="mm")
        return img
    r = SIZES[scene.size] * size
    fill = COLOURS[scene.colour]
    for fx, fy in scene.layout:
        x, y = fx * size, fy * size
        if scene.shape == "circle":
            draw.ellipse((x - r, y - r, x + r, y + r), fill=fill)
        elif scene.shape == "square":
            s = r * 0.9
            draw.rectangle((x - s, y - s, x + s, y + s), fill=fill)
        elif scene.shape == "triangle":
            draw.polygon([(x, y - r), (x - r, y + r * 0.8), (x + r, y + r * 0.8)], fill=fill)
        else:  # diamond
            draw.polygon([(x, y - r * 1.1), (x + r * 0.8, y), (x, y + r * 1.1), (x - r * 0.8, y)], fill=fill)
    return img


def conversation(scene: Scene, rng: random.Random, turns: int) -> list[tuple[str, str]]:
    """``turns`` question-answer pairs about one scene, each on a different attribute."""
    attributes = rng.sample(scene.askable(), min(turns, len(scene.askable())))
    return [(rng.choice(QUESTIONS[a]), scene.answer(a)) for a in attributes]


def instructions(rng: random.Random, n: int) -> list[dict[str, str]]:
    """Alpaca-style text-only instructions about the world's vocabulary and about the assistant."""
    about = ("I am a tiny demo assistant trained on a toy world. Show me a picture of coloured shapes and I can "
             "tell you their colour, shape, count and position, or read a short word.")
    fixed = [("Who are you?", "", about), ("What can you do?", "", about),
             ("Hello!", "", "Hello! Show me a picture of shapes and ask me about it."),
             # no "opposite of left/top" pairs: they teach the language model to answer a position word with
             # another one, and it then answers position questions with the opposite (docs/training.md)
             ("What is the opposite of big?", "", "small"), ("What is the opposite of small?", "", "big"),
             ("How many sides does a triangle have?", "", "three"), ("How many sides does a square have?", "", "four"),
             ("How many corners does a circle have?", "", "none"), ("Name the colours you know.", "", ", ".join(COLOURS)),
             ("Name the shapes you know.", "", ", ".join(SHAPES)), ("Count from one to four.", "", ", ".join(COUNTS))]
    vocab = {**{c: "a colour" for c in COLOURS}, **{s: "a shape" for s in SHAPES}, **{w: "a word" for w in WORDS}}
    out = []
    for _ in range(n):
        kind = rng.random()
        if kind < 0.3:
            q, i, a = rng.choice(fixed)
        elif kind < 0.55:
            w = rng.choice(tuple(vocab))
            q, i, a = "Is this a colour, a shape or a word?", w, vocab[w]
        elif kind < 0.8:
            words = rng.sample(tuple(vocab), rng.randint(1, 4))
            q, i, a = "How many words are there?", " ".join(words), COUNTS[len(words) - 1]
        else:
            w = rng.choice(tuple(vocab))
            q, i, a = "Repeat the word.", w, w
        out.append({"instruction": q, "input": i, "output": a})
    return out


def generate_world(root: str | Path, n_images: int, n_instructions: int, seed: int, image_size: int = 64,
                   single_rate: float | None = None) -> dict[str, Path]:
    """Write a world to ``root``: images/*.png, captions.jsonl (image + caption), conversations.json
    (LLaVA format, 1-3 turns), instructions.json (Alpaca format), and scenes.jsonl (what each image
    shows, for labels). Returns the four data files."""
    root = Path(root)
    (root / "images").mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    captions, convs, scenes = [], [], []
    for i in range(n_images):
        scene = sample_scene(rng, single_rate=single_rate)
        name = f"images/{i:06d}.png"
        render(scene, image_size).save(root / name)
        captions.append({"image": name, "caption": caption(scene)})
        scenes.append({"image": name, **asdict(scene)})
        turns = conversation(scene, rng, rng.choice((1, 1, 2, 3)))
        messages = []
        for t, (q, a) in enumerate(turns):
            messages += [{"from": "human", "value": f"<image>\n{q}" if t == 0 else q}, {"from": "gpt", "value": a}]
        convs.append({"id": f"{i:06d}", "image": name, "conversations": messages})
    files = {"captions": root / "captions.jsonl", "conversations": root / "conversations.json",
             "instructions": root / "instructions.json", "scenes": root / "scenes.jsonl"}
    files["captions"].write_text("".join(json.dumps(c) + "\n" for c in captions))
    files["conversations"].write_text(json.dumps(convs))
    files["instructions"].write_text(json.dumps(instructions(rng, n_instructions)))
    files["scenes"].write_text("".join(json.dumps(s) + "\n" for s in scenes))
    return files
