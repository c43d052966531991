"""Lookups written under a question, so that a small chat model answers from the right finding.

`check` is what the default prompt style writes under each question (multimodal/prompt.py's ``checks``):

- a presence or how-many question gets experts/presence.py's line (``Findings check: yes (bus: 1 bus).``);
- a question about colour gets the colour of the thing it names, from the detector's detail line
  ``Colours: motorcycle: red.``: ``Findings check: the motorcycle is red.``;
- a question after the name of something ("Which theatre is named on the sign?", "What is the name of the
  market?") gets the text that names it, when the kind of thing is itself written there:
  ``Findings check: the text naming the theatre: "Theatre du PALAIS-ROYAL".``; OCR's detail line of
  text blocks joins a name set over two lines ("World Health" over "Organization").

Detail lines (experts/context.py) are kept out of the findings a prompt shows and reach the model only
through these lines, so a colour or a text block changes no prompt but those of the questions that ask
for it. Any other question gets no line (None).
"""
from __future__ import annotations

import re

from .colour import COLOUR_WORDS
from .context import DETAIL_LEADS, detail_texts
from .presence import (QUESTION_VERBS, SCENE_WORDS, TEXT_WORDS, check as check_presence, listed_items,
                       names_thing, object_words, singular)

_COLOURS_LEAD, _BLOCKS_LEAD = DETAIL_LEADS
_WORD = re.compile(r"[a-z]+")
_QUOTED = re.compile(r'"([^"]+)"')
_YES_NO = re.compile(r"^\s*(is|are|was|were|does|do)\b", re.IGNORECASE)
_ASKS_COLOUR = re.compile(r"\bcolou?rs?\b", re.IGNORECASE)
_NAME_OF = re.compile(r"\bname of (?:the |this |that |a |an )?([a-z]+)", re.IGNORECASE)
_WHICH = re.compile(r"^\s*(?:which|what)\s+([a-z]+)\b", re.IGNORECASE)
# Words after "which"/"what" that ask for something other than a name ("What kind of ...").
NOT_KINDS = QUESTION_VERBS | TEXT_WORDS | SCENE_WORDS | {"kind", "type", "sort", "name", "colour", "color",
                                                         "number", "time"}
_EDGE = " '\"‘’“”,.;:!?"
# The words of a colour question that names nothing ("What colour is it?", "Which colours are in this photo?").
_PLAIN_COLOUR_QUESTION = {"what", "which", "colour", "color", "colours", "colors", "is", "are", "it", "this",
                          "that", "they", "these", "those", "the", "a", "an", "in", "of", "main", "mostly",
                          "mainly"} | SCENE_WORDS


def _words(text: str) -> list[str]:
    return [singular(w) for w in _WORD.findall(text.lower())]


def colour_check(question: str, findings: str) -> str | None:
    """'Findings check: the motorcycle is red.' under a question about colour ("What colour is the
    motorcycle?", "Is the bus blue?"), for the first thing it names that the colours line lists; with no
    such thing, one kind of object listed and a question that names nothing ("What colour is it?"), that
    kind's colour ("What colour is the sky?" gets no line)."""
    words = _WORD.findall(question.lower())
    if not (_ASKS_COLOUR.search(question) or (_YES_NO.match(question) and COLOUR_WORDS.intersection(words))):
        return None
    entries = []
    for line in detail_texts(findings, _COLOURS_LEAD):
        for part in line.split(";"):
            name, _, value = part.partition(":")
            if name.strip() and value.strip():
                entries.append((name.strip(), value.strip()))
    if not entries:
        return None
    vocabulary = object_words()
    things = [singular(w) for w in words if (singular(w) in vocabulary or w in vocabulary)
              and singular(w) not in SCENE_WORDS and w not in QUESTION_VERBS and w not in COLOUR_WORDS]
    found = next(((name, value) for thing in things for name, value in entries
                  if names_thing(name, "name", thing)), None)
    if found is None and len(entries) == 1 and not set(words) - _PLAIN_COLOUR_QUESTION:  # "What colour is it?"
        found = entries[0]
    if found is None:
        return None
    name, value = found
    if any(c.isdigit() for c in value):  # several objects of the kind: "people: 2 black, 1 white"
        return f"Findings check: the {name}: {value}."
    return f"Findings check: the {name} is {value}."


def naming_check(question: str, findings: str) -> str | None:
    """'Findings check: the text naming the market: "BASRURKAR MARKET".' under a question after the name
    of a kind of thing (the word after "which"/"what", or after "name of") when that word is written in
    the image with other words: the text blocks and lines that hold it, shortest first, leaving out any
    that holds or is held by one already quoted ("BASRURKAR MARKET", not also "BASRURKAR MARKET SPEED
    LIMIT")."""
    m = _NAME_OF.search(question) or _WHICH.match(question)
    if m is None:
        return None
    word = m[1].lower()
    kind = singular(word)
    if word in NOT_KINDS or kind in NOT_KINDS:
        return None
    blocks = [t for line in detail_texts(findings, _BLOCKS_LEAD) for t in _QUOTED.findall(line)]
    lines = []
    for item, kind_of in listed_items(findings):
        if kind_of == "text":
            lines += _QUOTED.findall(item) or [item]
    chosen: list[str] = []
    seen: list[str] = []
    for text in sorted(blocks + lines, key=len):  # the shortest text that names it, once
        words = _words(text)
        if kind not in words or all(w == kind for w in words if len(w) > 1):
            continue  # not about the kind, or the kind's word alone ("Theatre"), naming nothing
        key = f" {' '.join(words)} "
        if any(key in other or other in key for other in seen):
            continue
        seen.append(key)
        chosen.append(text.strip(_EDGE))
    if not chosen:
        return None
    return f"Findings check: the text naming the {kind}: " + ", ".join(f'"{t}"' for t in chosen) + "."


def check(question: str, findings: str | None) -> str | None:
    """The line written under `question` (module docstring), or None."""
    if not findings or not findings.strip():
        return None
    return check_presence(question, findings) or colour_check(question, findings) or naming_check(question, findings)
