"""Turn expert results into the context block of the prompt, within a token budget.

Every line names the expert it came from ("[detection] 4 people (...)") so the model (and a
reader of the prompt) can weigh the source. When the budget is short, each expert first keeps its
first line (the caption, the detection summary, the first OCR line), then further lines are added
in order while they fit, and a final line says what was cut.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Callable, Sequence

from .base import ExpertResult

TokenCounter = Callable[[str], int]
_PIECE = re.compile(r"\w+|[^\w\s]")


def rough_token_count(text: str) -> int:
    """Words plus punctuation marks, scaled: a tokenizer-free estimate for the CLI and tests.

    LLaMA's tokenizer splits most English words into 1-2 pieces; 1.3 pieces per word-or-mark
    errs on the side of overestimating, which is the safe side for a budget.
    """
    return int(len(_PIECE.findall(text)) * 1.3 + 0.999)


@dataclass
class ContextBlock:
    """The text to put in the prompt and an account of what went into it."""

    text: str
    tokens: int
    included: dict[str, int] = field(default_factory=dict)  # expert -> lines kept
    dropped: dict[str, int] = field(default_factory=dict)  # expert -> lines cut for the budget
    skipped: dict[str, str] = field(default_factory=dict)  # expert -> why it gave no context

    @property
    def truncated(self) -> bool:
        return bool(self.dropped)


def _lines(result: ExpertResult) -> list[str]:
    return [f"[{result.name}] {line.strip()}" for line in result.context.splitlines() if line.strip()]


def _cut_note(dropped: dict[str, int], totals: dict[str, int]) -> str:
    parts = [f"{name} ({n} of {totals[name]} line{'s' if totals[name] != 1 else ''})" for name, n in dropped.items()]
    return "[context] cut for length: " + ", ".join(parts)


def build_context(
    results: Sequence[ExpertResult],
    max_tokens: int,
    count_tokens: TokenCounter = rough_token_count,
) -> ContextBlock:
    """Context block from results (in priority order) that counts at most `max_tokens`.

    Failed and unavailable results contribute no text (the model should not read error
    messages) and are listed in `skipped`. If lines had to be cut, the last line says which. Detail
    lines (below) come after every expert's other lines.
    """
    skipped = {r.name: (r.error or r.status) for r in results if not r.ok}
    per_expert = {r.name: _lines(r) for r in results if r.ok}
    per_expert = {name: lines for name, lines in per_expert.items() if lines}
    totals = {name: len(lines) for name, lines in per_expert.items()}

    everything = [line for lines in per_expert.values() for line in lines]
    full = "\n".join(everything)
    if not everything or count_tokens(full) <= max_tokens:
        return ContextBlock(full, count_tokens(full) if full else 0, dict(totals), {}, skipped)

    kept: dict[str, int] = {name: 0 for name in per_expert}

    def render(counts: dict[str, int]) -> str:
        body = [line for name, lines in per_expert.items() for line in lines[: counts[name]]]
        dropped = {n: totals[n] - c for n, c in counts.items() if c < totals[n]}
        return "\n".join(body + ([_cut_note(dropped, totals)] if dropped else []))

    def try_add(name: str) -> bool:
        kept[name] += 1
        if count_tokens(render(kept)) <= max_tokens:
            return True
        kept[name] -= 1
        return False

    for name in per_expert:  # pass 1: every expert's first line
        try_add(name)
    for name in per_expert:  # pass 2: further lines in reading order, while they fit
        while kept[name] < totals[name] and not is_detail(per_expert[name][kept[name]]) and try_add(name):
            pass
    for name in per_expert:  # pass 3: detail lines (each expert's last), only with room left
        while kept[name] < totals[name] and try_add(name):
            pass

    text = render(kept)
    if count_tokens(text) > max_tokens:  # not even the cut note fits
        text = ""
        kept = {name: 0 for name in per_expert}
    dropped = {n: totals[n] - c for n, c in kept.items() if c < totals[n]}
    included = {n: c for n, c in kept.items() if c}
    return ContextBlock(text, count_tokens(text) if text else 0, included, dropped, skipped)


# What each expert's findings are, in words a language model reads easily (see as_prose).
PROSE_LABELS = {
    "caption": "Caption",
    "detection": "Objects detected",
    "classification": "What the whole image looks like",
    "ocr": "Text written in the image",
}
_TAG = re.compile(r"^\[(\w+)\]\s*(.*)$")
_LEAD = re.compile(r"^(Objects detected|Image class \([^)]*\)|Caption(?: \([^)]*\))?):\s*")

# Lines an expert writes for lookups, not for reading: the colour of each detected object, OCR lines that
# belong together. The panel shows them; a prompt gives them only through the check line written under a
# question that asks for them (experts/lookup.py), so that they do not change every other prompt.
DETAIL_LEADS = ("Colours:", "Text blocks:")


def is_detail(line: str) -> bool:
    """Whether a context line (tagged "[detection] Colours: ..." or not) is a detail line."""
    m = _TAG.match(line.strip())
    return (m[2] if m else line.strip()).startswith(DETAIL_LEADS)


def detail_texts(block: str, lead: str) -> list[str]:
    """What follows `lead` ("Colours:") in each detail line of the block that starts with it, tagged or
    not, without its final full stop."""
    out = []
    for line in block.splitlines():
        m = _TAG.match(line.strip())
        text = m[2] if m else line.strip()
        if text.startswith(lead):
            out.append(text[len(lead):].strip().rstrip("."))
    return out


def without_details(block: str) -> str:
    """The context without its detail lines: what a prompt shows of the findings."""
    return "\n".join(line for line in block.splitlines() if not is_detail(line))


def as_prose(block: str) -> str:
    """The context block ("[name] line" lines) rewritten as one labelled sentence per expert: OCR lines
    joined into one quoted list, each expert's own lead-in ("Objects detected:") replaced by its label.
    Lines without a tag (an edited context) pass through unchanged. An expert's "found nothing" line
    ("No text found.") is left out: the small model took it as an answer to unrelated questions ("How
    many people?" -> "There is no text found."), and leaving it out scored better on both question sets
    (docs/experts.md); the panel still shows it. Detail lines stay lines of their own, untagged."""
    grouped: dict[str, list[str]] = {}
    order: list[str] = []
    for line in block.splitlines():
        m = _TAG.match(line.strip())
        name, text = (m[1], m[2]) if m else ("", line.strip())
        if not text:
            continue
        if text.startswith(DETAIL_LEADS):  # kept as its own line, for the lookups
            name = f"{name}:detail"
        if name not in grouped:
            grouped[name], _ = [], order.append(name)
        # the classifier's probabilities stay numbers: putting them in words ("most likely a street sign")
        # measured worse on the development set (docs/experts.md), the small model repeated the phrase
        grouped[name].append(_LEAD.sub("", text).rstrip("."))
    out = []
    for name in order:
        found = [p for p in grouped[name] if not p.startswith("No ")]  # not "No text found."
        if not found:
            continue
        if name.endswith(":detail"):
            out += [f"{p}." for p in found]
        elif not name or name not in PROSE_LABELS:
            out += found
        else:
            out.append(f"{PROSE_LABELS[name]}: " + (", " if name == "ocr" else "; ").join(found) + ".")
    return "\n".join(out)
