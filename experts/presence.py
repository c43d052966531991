"""Questions about what is in the image (yes/no, how many), checked against the experts' findings.

A 135M chat model reads a count or a line of text from the findings well, but answers nearly every
yes/no question "No", whatever the findings say: on the real-photo sets its first-token probabilities
for "Yes" and "No" hardly differ between a bus that was detected and a dog that was not
(docs/experts.md). So the app does the lookup a reader would do and writes it under the question:

    Is one of the men wearing a tie?
    Findings check: yes (tie: 1 tie).

and the model answers from that line. `check` finds the things a question asks about (words the experts
can name: the detector's COCO classes, the classifier's ImageNet names, words for people and for text),
and looks each up in the findings: a detected object or an image class whose head word is the thing
("tie" in "bow tie", "cat" in "tiger cat", "bus" in "minibus"), a person word for a detected person, a
text word when OCR read something, any word of a caption or of a line the user wrote. It reads the
findings as the prompt gives them (tagged lines or prose, also when the user edited them), so what it
reports is what the model is shown.

Only questions about presence get a yes or no ("Is there a ...", "Is this a ...", "Is anyone wearing
...": not "Is the bus blue?", whose bus is listed but whose colour is not); a how-many question gets the
count of the first thing it names. "Not listed" is what the line says, not "absent": a detector misses
things.
"""
from __future__ import annotations

import importlib.util
import re
from functools import lru_cache
from pathlib import Path

from .context import PROSE_LABELS, is_detail

# Words for things every question could mention that no expert lists (the picture itself).
SCENE_WORDS = frozenset({"photo", "photograph", "picture", "image", "scene", "background", "foreground",
                         "view", "frame", "shot", "page", "thing", "object"})
# Words the detector's "person" stands for, and words for what OCR reads.
PERSON_WORDS = frozenset({"person", "people", "man", "men", "woman", "women", "boy", "girl", "child",
                          "children", "kid", "human", "player", "guy", "lady", "someone", "anyone", "somebody",
                          "anybody"})
TEXT_WORDS = frozenset({"text", "writing", "word", "letter", "inscription", "lettering"})
# The question's own verbs, never things asked about (ImageNet has a "can" and a "hold").
QUESTION_VERBS = frozenset({"is", "are", "was", "were", "do", "does", "did", "can", "could", "has", "have", "see",
                            "show", "contain", "wear", "hold", "carry", "look"})
_YES_NO = re.compile(r"^\s*(is|are|was|were|do|does|did|can|could|has|have)\b", re.IGNORECASE)
_HOW_MANY = re.compile(r"^\s*how many\b", re.IGNORECASE)
_CHOICE = re.compile(r"\bor\b", re.IGNORECASE)  # "Is it a cat or a dog?": a choice, not a yes/no
# A yes/no question asks whether something is there (not "Is the bus blue?", about a listed thing's looks).
# The things asked about are the words after the first of these ("Does the bus have a stripe?" asks about
# a stripe, not about the bus).
_PRESENCE = re.compile(r"\b(there|see|seen|show|shows|shown|contain|contains|have|has|wearing|wear|wears|holding|"
                       r"hold|holds|carrying|carry|visible)\b|^\s*(is|are)\s+(this|that|it|these|those)\b",
                       re.IGNORECASE)
_IRREGULAR = {"people": "person", "men": "man", "women": "woman", "children": "child", "mice": "mouse",
              "geese": "goose", "teeth": "tooth", "feet": "foot", "knives": "knife", "leaves": "leaf",
              "wolves": "wolf", "sheep": "sheep", "fish": "fish", "glasses": "glasses", "bus": "bus",
              "buses": "bus", "dishes": "dish", "boxes": "box", "benches": "bench", "watches": "watch"}
_WORD = re.compile(r"[a-z]+")
_PARENS = re.compile(r"\([^)]*\)")
_SCORE = re.compile(r"\s+[01]\.\d+$")
_COUNT = re.compile(r"^\d+\s+")
_TAG = re.compile(r"^\[(\w+)\]\s*")
_LEADS = (re.compile(r"^(Objects detected|Image class \([^)]*\)|Caption(?: \([^)]*\))?):\s*"),
          re.compile("^(" + "|".join(re.escape(label) for label in PROSE_LABELS.values()) + "):\\s*"))
_OCR_LEAD = PROSE_LABELS["ocr"] + ":"
_NAMED_LEADS = ("Objects detected:", "Image class (", PROSE_LABELS["detection"] + ":",
                PROSE_LABELS["classification"] + ":")


def singular(word: str) -> str:
    """A rough English singular, enough for object names ("buses" -> "bus", "people" -> "person")."""
    word = word.lower()
    if word in _IRREGULAR:
        return _IRREGULAR[word]
    if len(word) > 4 and word.endswith("ies"):
        return word[:-3] + "y"
    if len(word) > 4 and word.endswith(("ches", "shes", "sses", "xes")):
        return word[:-2]
    if len(word) > 3 and word.endswith("s") and not word.endswith(("ss", "us", "is")):
        return word[:-1]
    return word


def _head(name: str) -> str:
    words = _WORD.findall(name.lower())
    return singular(words[-1]) if words else ""


@lru_cache(maxsize=1)
def object_words() -> frozenset[str]:
    """Single words that name something an expert can report: the head words of the COCO classes (from
    Ultralytics' dataset file) and of every ImageNet-1k name (from timm's tables), and the person and
    text words. A library that is not installed contributes nothing."""
    words = set(PERSON_WORDS | TEXT_WORDS)
    spec = importlib.util.find_spec("ultralytics")  # its dataset file only: importing it checks the network
    if spec is not None and spec.origin is not None:
        try:
            import yaml

            coco = Path(spec.origin).parent / "cfg" / "datasets" / "coco.yaml"
            words |= {_head(n) for n in yaml.safe_load(coco.read_text())["names"].values()}
        except (ImportError, OSError, KeyError):
            pass
    try:
        from timm.data import ImageNetInfo

        info = ImageNetInfo("imagenet-1k")
        for i in range(info.num_classes()):
            words |= {_head(n) for n in info.index_to_description(i).split(",")}
    except ImportError:
        pass
    return frozenset(w for w in words if len(w) > 2) - SCENE_WORDS


def asked_things(question: str) -> list[str]:
    """The things a question about presence ("Is there a ...", "Is this a ...", "Is anyone wearing a
    ...") or a how-many question asks about, singular, in order ([] for any other question)."""
    lead = _HOW_MANY.match(question) or (_PRESENCE.search(question) if _YES_NO.match(question) else None)
    if lead is None:
        return []
    vocabulary = object_words()
    out: list[str] = []
    for word in _WORD.findall(question[lead.end():].lower()):
        thing = singular(word)
        if thing in QUESTION_VERBS or word in QUESTION_VERBS:
            continue
        if (thing in vocabulary or word in vocabulary) and thing not in SCENE_WORDS and thing not in out:
            out.append(thing)
    return out


def listed_items(findings: str) -> list[tuple[str, str]]:
    """(item as written, kind) for every item of the findings: "name" for a detected object or an image
    class ("4 people", "bow tie 0.10"), "text" for what OCR read, "free" for any other line (a caption,
    or a line the user wrote into the context)."""
    items: list[tuple[str, str]] = []
    for raw in findings.splitlines():
        line = raw.strip()
        if is_detail(line):  # colours and text blocks are looked up by experts/lookup.py
            continue
        tag = _TAG.match(line)
        name = tag[1] if tag else ""
        line = line[tag.end():] if tag else line
        if not line:
            continue
        if name == "ocr" or line.startswith(_OCR_LEAD):
            if not line.startswith("No "):
                items.append((line.removeprefix(_OCR_LEAD).strip(), "text"))
            continue
        if not (name in ("detection", "classification") or line.startswith(_NAMED_LEADS)):
            items.append((line, "free"))
            continue
        for lead in _LEADS:
            line = lead.sub("", line)
        if line.startswith("No ") or line.lower().startswith("no imagenet"):
            continue  # "No objects detected."
        for part in re.split(r"[;,]", _PARENS.sub("", line)):
            part = part.strip().rstrip(".").strip()
            if part:
                items.append((part, "name"))
    return items


def names_thing(item: str, kind: str, thing: str) -> bool:
    """Whether a listed item names the thing: a name by its head word, free text by any of its words."""
    if kind == "free":
        words = {singular(w) for w in _WORD.findall(item.lower())}
        return bool(words & PERSON_WORDS) if thing in PERSON_WORDS else thing in words
    head = _head(_SCORE.sub("", _COUNT.sub("", item)))
    if not head:
        return False
    if thing in PERSON_WORDS:
        return head in PERSON_WORDS
    return head == thing or (len(thing) > 2 and head.endswith(thing))  # "minibus" names a bus


def check(question: str, findings: str | None) -> str | None:
    """The line written under a question about presence or a count (module docstring); None for any
    other question, or when there are no findings.

    Presence: "yes" when every thing asked about is listed, else "no" naming what is not; a question
    that offers a choice ("a cat or a dog?") gets each thing's finding and no verdict. How many: the
    first thing's count as listed."""
    if not findings or not findings.strip():
        return None
    things = asked_things(question)
    if not things:
        return None
    items = listed_items(findings)
    hits: dict[str, str | None] = {}
    for thing in things:
        if thing in TEXT_WORDS:
            hits[thing] = "text was read" if any(kind == "text" for _, kind in items) else None
        else:
            hits[thing] = next((item if kind == "name" else "mentioned" for item, kind in items
                                if kind != "text" and names_thing(item, kind, thing)), None)
    if _HOW_MANY.match(question):  # the count of the first thing asked about ("how many men with hats")
        first = hits[things[0]]
        return f"Findings check: {first}." if first else f"Findings check: no {things[0]} listed."
    if len(things) > 1 and _CHOICE.search(question):
        return "Findings check: " + "; ".join(f"{t}: {h}" if h else f"{t}: not listed" for t, h in hits.items()) + "."
    missing = [t for t, h in hits.items() if h is None]
    if missing:
        return f"Findings check: no ({', '.join(missing)} not listed)."
    return "Findings check: yes (" + "; ".join(f"{t}: {h}" for t, h in hits.items()) + ")."
