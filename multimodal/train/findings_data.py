"""Made-up findings and the answers they support: training data that teaches a small chat base to read
the experts' findings (multimodal/train/findings.py tunes SmolLM2 on it).

A scene is what the three offline experts could report about a photo: detected objects (COCO labels,
counts, grid positions), the ImageNet classifier's top labels, and lines of text. It is written with the
experts' own functions (``describe_detections``, the classifier's line, OCR's quoted lines) and then
``as_prose``, exactly as the app writes real findings, so the model is tuned on the prompt it is given.

Questions come from templates in several phrasings: counts, presence (answered yes and no equally
often), positions, what the image shows, reading text (all of it, the first or last line, a number,
whether there is any), and questions the findings cannot answer (colour, brand, age), answered by saying
so. Nothing here is taken from the development or check question sets (scripts/photos_*.json): no
photo, no wording is shared on purpose, and the check set measures whether the tuning generalises.
"""
from __future__ import annotations

import random
import re
from dataclasses import dataclass, field
import importlib.util
from functools import lru_cache
from pathlib import Path

from experts.classification import SOURCE as CLASSIFIER_SOURCE
from experts.classification import class_labels
from experts.context import as_prose
from experts.describe import COLUMNS, ROWS, count_phrase, plural
from experts.detection import describe_detections

REGIONS = tuple(col if row == "middle" else f"{row} {col}" for row in ROWS for col in COLUMNS)
SIGN_WORDS = ("OPEN", "CLOSED", "EXIT", "ENTRANCE", "SALE", "STOP", "PARKING", "NO SMOKING", "WELCOME", "PUSH",
              "PULL", "HOTEL", "PHARMACY", "BAKERY", "STATION", "MUSEUM", "LIBRARY", "TAXI", "POLICE", "CAFE",
              "RESTAURANT", "MARKET", "BANK", "SCHOOL", "HOSPITAL", "GARDEN", "BRIDGE", "NORTH", "SOUTH",
              "CITY CENTRE", "AIRPORT", "FERRY", "BEACH", "PLATFORM", "TICKETS", "TOILETS", "KEEP LEFT")
NAME_PARTS = ("Rose", "King", "Mill", "Oak", "Lake", "Hill", "Park", "River", "Green", "Stone", "Bay", "Elm", "Sun",
              "Brook", "Ash", "Cedar", "Fox", "Maple", "Hart", "Wood", "Vale", "Fair", "Long", "New")
PLACE_KINDS = ("Street", "Road", "Avenue", "Square", "Lane", "Market", "Theatre", "Museum", "Hotel", "Station",
               "Bakery", "School", "Library", "Gallery")
# COCO's own supercategories for the two kinds people ask about by name ("What animal is this?")
CATEGORIES = {
    "animal": ("bird", "cat", "dog", "horse", "sheep", "cow", "elephant", "bear", "zebra", "giraffe"),
    "vehicle": ("bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat"),
}
# Text that names something, and questions asked about it by what it names: the answer is the name as
# written. {n} is a made-up name, {k} a number; each entry is (line, questions, answer).
NAMED_TEXT = (
    ("{n} STATION", ("Which station is this?", "What is the name of the station?"), "{n} Station"),
    ("HOTEL {n}", ("What is the hotel called?", "Which hotel is named on the sign?"), "Hotel {n}"),
    ("{n} PARK", ("Which park is this?", "What park is named here?"), "{n} Park"),
    ("{n} BANK", ("Which bank is this?", "What is the name of the bank?"), "{n} Bank"),
    ("{n} SCHOOL", ("What is the name of the school?", "Which school is on the sign?"), "{n} School"),
    ("CAFE {n}", ("What is the cafe called?", "Which cafe is this?"), "Cafe {n}"),
    ("{n} Foundation", ("Which organisation made this?", "Who published this?"), "the {n} Foundation"),
    ("WELCOME TO {n}", ("Which town welcomes you?", "Where are you welcomed to?"), "{n}"),
    ("SPEED LIMIT {k}", ("What is the speed limit?", "How fast may you drive here?"), "{k}"),
    ("PLATFORM {k}", ("Which platform is it?", "What platform number is shown?"), "platform {k}"),
    ("ROOM {k}", ("Which room is this?", "What is the room number?"), "room {k}"),
    ("TOTAL {k}.50", ("What is the total?", "How much is the total?"), "{k}.50"),
    ("OPEN {k} TO 6", ("When does it open?", "What time does it open?"), "at {k}"),
    ("{n} AIRPORT", ("Which airport is this?", "What is the airport called?"), "{n} Airport"),
    ("{n} LIBRARY", ("Which library is this?", "What is the library called?"), "{n} Library"),
    ("GATE {k}", ("Which gate is shown?", "What gate number is it?"), "gate {k}"),
)
UNANSWERABLE = (("What colour is the {s}?", "colour"), ("What brand is the {s}?", "brand"),
                ("How old is the {s}?", "age"), ("What is the {s} made of?", "material"),
                ("What time of day is it?", "time of day"), ("What is the weather like?", "weather"))


@dataclass
class Scene:
    """What the experts report about one made-up photo."""

    objects: dict[str, list[str]] = field(default_factory=dict)  # COCO label -> one region per instance
    classes: list[tuple[str, float]] = field(default_factory=list)  # ImageNet label, probability
    lines: list[str] = field(default_factory=list)  # OCR lines, top to bottom

    def findings(self) -> str:
        """The prose the app gives the model for this scene ('' when no expert found anything)."""
        block = []
        found = [{"label": label, "score": 0.9 - 0.01 * i, "position": pos}
                 for i, (label, places) in enumerate(self.objects.items()) for pos in places]
        block.append(f"[detection] {describe_detections(found)}")
        if self.classes:
            block.append(f"[classification] Image class ({CLASSIFIER_SOURCE}): "
                         + ", ".join(f"{label} {p:.2f}" for label, p in self.classes))
        block += [f'[ocr] "{line}"' for line in self.lines] or ["[ocr] No text found."]
        return as_prose("\n".join(block))


@dataclass(frozen=True)
class Exchange:
    """One training conversation: earlier turns (question, answer), then the question to answer."""

    findings: str
    history: tuple[tuple[str, str], ...]
    question: str
    answer: str


@lru_cache(maxsize=1)
def coco_labels() -> tuple[str, ...]:
    """The 80 COCO class names, from Ultralytics' dataset file (the detector's classes)."""
    spec = importlib.util.find_spec("ultralytics")  # found, not imported (importing writes a settings file)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("ultralytics is not installed: pip install -r requirements.txt")
    path = Path(list(spec.submodule_search_locations)[0]) / "cfg" / "datasets" / "coco.yaml"
    text = path.read_text(encoding="utf-8")
    names = re.findall(r"^\s+\d+:\s*(.+?)\s*$", text.split("names:", 1)[1].split("\n\n", 1)[0], re.MULTILINE)
    if len(names) != 80:
        raise RuntimeError(f"Ultralytics' coco.yaml lists {len(names)} classes, expected 80")
    return tuple(names)


def a_or_an(word: str) -> str:
    return ("an " if word[:1].lower() in "aeiou" else "a ") + word


def singular(label: str) -> str:
    return count_phrase(1, label).split(" ", 1)[1]


def made_up_name(rng: random.Random) -> str:
    """A name no model knows ("Talvoreni", "Keb-Ostura"): its answer can only be copied from the findings,
    which is what a real sign's name asks of the model."""
    def word() -> str:
        return "".join(rng.choice("bcdfghklmnprstvz") + rng.choice("aeiou") + rng.choice(["", "", "r", "n", "l", "s"])
                       for _ in range(rng.randint(2, 4))).capitalize()
    return word() + rng.choice(["", "", " " + word(), "-" + word()])


def random_line(rng: random.Random) -> str:
    kind = rng.random()
    if kind < 0.3:
        return rng.choice(SIGN_WORDS)
    if kind < 0.55:
        name = made_up_name(rng) if rng.random() < 0.6 else rng.choice(NAME_PARTS)
        return f"{name} {rng.choice(PLACE_KINDS)}"
    if kind < 0.75:
        return rng.choice([f"{rng.randint(1, 120)}", f"{rng.randint(1, 99)}.{rng.randint(0, 99):02d}",
                           f"OPEN {rng.randint(6, 10)}-{rng.randint(4, 11)}", f"{rng.randint(5, 130)} km",
                           f"TOTAL {rng.randint(1, 80)}.{rng.randint(0, 99):02d}", f"No. {rng.randint(1, 400)}"])
    words = [rng.choice(SIGN_WORDS).lower() for _ in range(rng.randint(2, 4))]
    return " ".join(words).capitalize()


def random_scene(rng: random.Random) -> Scene:
    coco, imagenet = coco_labels(), class_labels()
    scene = Scene()
    for label in rng.sample(coco, rng.choice([0, 1, 1, 2, 2, 3])):
        n = rng.choice([1, 1, 1, 2, 2, 3, 4, 5, 7])
        scene.objects[label] = [rng.choice(REGIONS) for _ in range(n)]
    if rng.random() < 0.85:
        probs = sorted((rng.random() for _ in range(rng.randint(1, 3))), reverse=True)
        total = sum(probs) / rng.uniform(0.3, 0.98)
        scene.classes = [(label, p / total) for label, p in zip(rng.sample(imagenet, len(probs)), probs)]
    if rng.random() < 0.5:
        scene.lines = [random_line(rng) for _ in range(rng.randint(1, 5))]
    return scene


def _objects_sentence(scene: Scene) -> str:
    parts = [count_phrase(len(places), label) for label, places in scene.objects.items()]
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def ask(scene: Scene, rng: random.Random) -> tuple[str, str]:
    """One question about the scene and the answer its findings support. A question about text that
    names something ("Which hotel is named on the sign?") first writes that text into the scene's
    lines, so call ``scene.findings()`` after asking."""
    coco = coco_labels()
    present = list(scene.objects)
    kinds = ["count", "yes", "no", "what"] + ["unanswerable"] * (rng.random() < 0.25) + ["where", "yes"] * bool(present) + ["read"] * 3 * bool(scene.lines)
    kinds += ["class"] * bool(scene.classes) + ["any text"] + ["named"] * 3
    kinds += ["category"] * 2 * any(label in members for members in CATEGORIES.values() for label in present)
    kind = rng.choice(kinds)
    place = rng.choice(["", " in the picture", " in the photo", " in the image", " here"])
    if kind == "count":
        label = rng.choice(present) if present and rng.random() < 0.8 else rng.choice(coco)
        n = len(scene.objects.get(label, []))
        q = rng.choice(["How many {p} are there{w}?", "How many {p} can you see{w}?", "Count the {p}{w}."])
        q = q.format(p=plural(label), w=place)
        if n == 0:
            return q, f"There are no {plural(label)}{place or ' in the image'}."
        return q, f"There {'is' if n == 1 else 'are'} {count_phrase(n, label)}."
    if kind in ("yes", "no"):
        if kind == "yes" and present:
            label = rng.choice(present)
        else:
            label = rng.choice([c for c in coco if c not in scene.objects])
        s, n = singular(label), len(scene.objects.get(label, []))
        q = rng.choice([f"Is there {a_or_an(s)}{place}?", f"Can you see {a_or_an(s)}{place}?",
                        f"Are there any {plural(label)}{place}?", f"Does the image show {a_or_an(s)}?"])
        if n:
            where = scene.objects[label][0]
            return q, rng.choice([f"Yes, there {'is' if n == 1 else 'are'} {count_phrase(n, label)}.",
                                  f"Yes, {a_or_an(s) if n == 1 else count_phrase(n, label)} on the {where}."
                                  if where != "centre" else f"Yes, in the centre."])
        return q, f"No, there is no {s}{place}." if rng.random() < 0.7 else f"No, I see no {plural(label)}."
    if kind == "where":
        label = rng.choice(present)
        places = scene.objects[label]
        q = f"Where is the {singular(label)}{rng.choice(['', ' in the picture'])}?"
        if len(places) > 1:
            return q, f"There are {count_phrase(len(places), label)}: " + ", ".join(places) + "."
        return q, "In the centre." if places[0] == "centre" else f"On the {places[0]}."
    if kind == "what":
        q = rng.choice(["What is in the picture?", "What can you see?", "What does the photo show?",
                        "Describe the image.", "What is this?"])
        if present:
            return q, f"I can see {_objects_sentence(scene)}."
        if scene.classes:
            return q, f"It looks like {a_or_an(scene.classes[0][0])}."
        if scene.lines:
            return q, f'I see text: "{scene.lines[0]}".'
        return q, "The tools found nothing in this image that I can describe."
    if kind == "named":
        line, questions, answer = rng.choice(NAMED_TEXT)
        name = made_up_name(rng) if rng.random() < 0.7 else rng.choice(NAME_PARTS) + rng.choice(NAME_PARTS).lower()
        if line.replace("{n}", "").replace("{k}", "").isupper():
            name = name.upper()  # the name as the sign writes it, and so in the answer
        k = str(rng.randint(2, 90))
        scene.lines.insert(rng.randint(0, len(scene.lines)), line.format(n=name, k=k))
        said = answer.format(n=name, k=k)
        return rng.choice(questions), (f"It says {said}." if rng.random() < 0.3 else said[:1].upper() + said[1:] + ".")
    if kind == "category":
        noun, members = rng.choice([(k, v) for k, v in CATEGORIES.items() if any(x in v for x in present)])
        label = next(x for x in present if x in members)
        q = rng.choice([f"What {noun} is this?", f"What kind of {noun} is this?", f"Which {noun} can you see{place}?",
                        f"What {noun} is in the picture?"])
        return q, f"It is {a_or_an(singular(label))}."
    if kind == "class":
        q = rng.choice(["What kind of picture is this?", "What does the whole image look like?",
                        "What is the main subject?", "What is it?"])
        return q, f"It looks like {a_or_an(scene.classes[0][0])}."
    if kind == "read":
        lines = scene.lines
        sub = rng.choice(["all", "first", "last", "number"] if len(lines) > 1 else ["all", "number"])
        numbers = [m for line in lines for m in re.findall(r"\d+(?:[.-]\d+)?", line)]
        if sub == "number" and numbers:
            q = rng.choice(["What number is written there?", "Which number can you read?", "What number is on the sign?"])
            return q, f"The number is {numbers[0]}." if len(numbers) == 1 else "The numbers are " + ", ".join(numbers) + "."
        if sub == "first":
            return rng.choice(["What is the first line of the text?", "What does the top line say?"]), f'It says "{lines[0]}".'
        if sub == "last":
            return rng.choice(["What is the last line?", "What does the bottom line say?"]), f'It says "{lines[-1]}".'
        q = rng.choice(["What does the sign say?", "What is written in the image?", "What does the text say?",
                        "Read the text.", "What words can you see?"])
        return q, "It says " + ", ".join(f'"{line}"' for line in lines) + "."
    if kind == "any text":
        q = rng.choice(["Is there any text?", "Is anything written in the picture?", "Can you read any words?"])
        if scene.lines:
            return q, f'Yes, it says "{scene.lines[0]}".'
        return q, "No, no text was found."
    template, what = rng.choice(UNANSWERABLE)
    label = rng.choice(present) if present else rng.choice(coco)
    return template.format(s=singular(label)), f"The findings do not say the {what}."


def exchanges(n: int, seed: int = 0, follow_up: float = 0.3) -> list[Exchange]:
    """``n`` made-up conversations; a ``follow_up`` share of them ask a second question about the same
    scene after a first one (the findings stay with the first question, as the app sends them)."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        scene = random_scene(rng)
        history: tuple[tuple[str, str], ...] = ()
        if rng.random() < follow_up:
            history = (ask(scene, rng),)
        q, a = ask(scene, rng)
        out.append(Exchange(scene.findings(), history, q, a))
    return out
