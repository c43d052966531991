"""Multi-turn prompts within the model's context length, in the form the loaded base wants.

The form is a `multimodal.prompt.PromptFormat`: a base with a chat template (SmolLM2, Llama 2/3 chat)
gets its own template (system turn, earlier turns as messages, expert context in the user turn); the
released LLaMA-Adapter V2 checkpoints, which saw one instruction (and optionally an ``### Input:``
section) per example, get the conversation folded into that shape by `multimodal.prompt.format_chat`:
expert context and earlier turns go into the Input section, the current question is the instruction.

The image never costs sequence positions: its visual tokens enter every layer's attention as prompt
keys/values, not as text, so it is always sent. What competes for the context length is text:

    prompt (template + expert context + history + question, with bos) + room for the answer <= max_seq_len

Rules, in order: the answer's room is `max_new_tokens`; if even the question and the expert context
do not fit with that room, the room shrinks down to `MIN_ANSWER_TOKENS` (and the plan says so); if
they still do not fit, `PromptBudgetError` explains which part is too long. History is then added
newest-first: the oldest turns are the ones dropped, and the plan counts them so the page can say so.
The current question and the expert context are never cut here (the context was already fitted to its
own budget by `experts.build_context`, which notes any line it cut).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from experts.context import as_prose, without_details
from experts.lookup import check as check_lookups
from experts.presence import check as check_presence, object_words
from multimodal.prompt import ChatTemplateFormat, PromptFormat

TokenCounter = Callable[[str], int]
MIN_ANSWER_TOKENS = 16


class PromptBudgetError(ValueError):
    """Even the current question and the expert context do not fit; the message says what to shorten."""


@dataclass
class PromptPlan:
    """The prompt to send and an account of the budget, for the page's indicator."""

    prompt: str  # as text, for people (the API returns it)
    ids: list[int]  # what the model is given
    prompt_tokens: int  # including bos
    max_seq_len: int
    answer_room: int  # new tokens the answer may use (<= the requested max_new_tokens)
    requested_new_tokens: int
    question_tokens: int
    context_tokens: int
    history_tokens: int
    history_kept: list[tuple[str, str]] = field(default_factory=list)
    dropped_turns: int = 0

    @property
    def answer_shortened(self) -> bool:
        return self.answer_room < self.requested_new_tokens

    def dropped_note(self) -> str:
        """What had to go, in words for the page ('' when nothing did)."""
        notes = []
        if self.dropped_turns:
            s = "s" if self.dropped_turns != 1 else ""
            notes.append(f"dropped the {self.dropped_turns} oldest turn{s} to fit the {self.max_seq_len}-token context")
        if self.answer_shortened:
            notes.append(f"answer limited to {self.answer_room} tokens (asked for {self.requested_new_tokens})")
        return "; ".join(notes)

    def summary(self) -> str:
        """One line: used / total and the parts."""
        used = self.prompt_tokens + self.answer_room
        kept = len(self.history_kept)
        return (f"{used} / {self.max_seq_len} tokens: question {self.question_tokens}, expert context "
                f"{self.context_tokens}, history {self.history_tokens} ({kept} turn{'s' if kept != 1 else ''}), "
                f"template {self.prompt_tokens - self.question_tokens - self.context_tokens - self.history_tokens}, "
                f"answer room {self.answer_room}")


def assemble(question: str, history: list[tuple[str, str]], context: str | None, fmt: PromptFormat,
             max_seq_len: int, max_new_tokens: int) -> PromptPlan:
    """Build the prompt for `question`, keeping as many of the most recent `history` turns as fit."""
    question = question.strip()
    context = (context or "").strip() or None
    count = fmt.count
    shown = fmt.visible(context)
    q_tokens, c_tokens = (count(question) if question else 0), (count(shown) if shown else 0)

    def size(turns: list[tuple[str, str]]) -> int:
        return len(fmt.ids(question, turns, context))

    essential = size([])
    room = min(max_new_tokens, max_seq_len - essential)
    if room < min(MIN_ANSWER_TOKENS, max_new_tokens):
        parts = f"the question has {q_tokens} tokens" + (f" and the expert context {c_tokens}" if context else "")
        raise PromptBudgetError(
            f"The prompt does not fit: {parts}, and with the template that is {essential} of the model's "
            f"{max_seq_len}-token context, leaving no room for an answer. Shorten the question"
            + (", shorten the context or switch an expert off." if context else "."))

    # Newest turns first; stop at the first that does not fit (keeping a contiguous recent tail).
    kept_from = len(history)
    for start in range(len(history) - 1, -1, -1):
        if size(history[start:]) + room > max_seq_len:
            break
        kept_from = start
    kept = history[kept_from:]
    ids = fmt.ids(question, kept, context)
    total = len(ids)
    return PromptPlan(prompt=fmt.text(question, kept, context), ids=ids, prompt_tokens=total, max_seq_len=max_seq_len, answer_room=room,
                      requested_new_tokens=max_new_tokens, question_tokens=q_tokens, context_tokens=c_tokens,
                      history_tokens=total - essential if kept else 0, history_kept=list(kept),
                      dropped_turns=kept_from)


# -- how a chat base is told about the image --------------------------------------------------------

# A worked exchange shown before the conversation ("prose-example"): made up for this purpose (no
# development-set image or question), in the same prose form as real findings.
_EXAMPLE_FINDINGS = ('Objects detected: 3 people (1 left, 2 centre), 1 dog (bottom left).\n'
                     'What the whole image looks like: beagle 0.41.\n'
                     'Text written in the image: "CITY PARK", "OPEN 9-5".')
EXAMPLES = ((_EXAMPLE_FINDINGS, "How many people are there?", "There are 3 people."),
            (_EXAMPLE_FINDINGS, "Is there a cat in the picture?", "No. There is a dog, not a cat."),
            (_EXAMPLE_FINDINGS, "What does the sign say?", 'The sign says "CITY PARK, OPEN 9-5".'))

# "prose-examples": two made-up scenes and five exchanges, so that every kind of finding is shown in
# use once (a count, the classifier's label, a line of text chosen among several) and yes/no questions
# are answered both ways (with "No" alone, the model tended to answer every yes/no question "No").
_KITCHEN_FINDINGS = ('Objects detected: 1 bowl (centre), 1 spoon (right).\n'
                     'What the whole image looks like: consomme 0.62, soup bowl 0.21.\n'
                     'Text written in the image: "FRESH DAILY", "SOUP OF THE DAY: TOMATO", "2 EUR".')
BALANCED_EXAMPLES = EXAMPLES[:2] + (  # the count and the "No", then a second scene
    (_KITCHEN_FINDINGS, "Is there a spoon?", "Yes, there is a spoon on the right."),
    (_KITCHEN_FINDINGS, "What food is in the bowl?", "It is soup (consomme)."),
    (_KITCHEN_FINDINGS, "How much does it cost?", "It costs 2 EUR."),
)

# style -> (context rendering, ChatTemplateFormat keywords). Scores of each on the real-photo
# development set are in docs/experts.md; DEFAULT_STYLE is the best of them there and on the check set
# (prose-example-first asks a first question exactly as prose-example does, and makes follow-ups cheaper
# to prefill; prose-examples does the same with the balanced examples; prose-checked adds the findings
# check under presence and how-many questions; prose-lookup adds the colour and naming lookups).
PROMPT_STYLES: dict[str, tuple[Callable[[str], str], dict]] = {
    "findings": (lambda c: c, {}),  # the tagged lines ("[ocr] ...") in the user turn
    "system": (lambda c: c, {"context_in": "system"}),  # the tagged lines in the system turn
    "prose": (as_prose, {}),  # one labelled sentence per expert, in the user turn
    "prose-example": (as_prose, {"examples": EXAMPLES}),  # the same, after worked examples
    # the same, the findings kept with the first question about the image (follow-ups reuse the prefix)
    "prose-example-first": (as_prose, {"examples": EXAMPLES, "context_in": "first"}),
    "prose-examples": (as_prose, {"examples": BALANCED_EXAMPLES, "context_in": "first"}),
    # the same, and under a question about presence or a count the line experts/presence.py writes: each
    # thing it asks about, listed in the findings or not (the small model answered yes/no questions "No"
    # whatever the findings said)
    "prose-checked": (as_prose, {"examples": BALANCED_EXAMPLES, "context_in": "first", "checks": check_presence}),
    # the same, and the detail lookups of experts/lookup.py: under a question about colour the colour of
    # the thing it names, under one after a name the text that names that kind of thing
    "prose-lookup": (as_prose, {"examples": BALANCED_EXAMPLES, "context_in": "first", "checks": check_lookups}),
    # for a base tuned to read findings (multimodal/train/findings.py): the form it was tuned on, no examples
    "prose-tuned": (as_prose, {"context_in": "first"}),
}
DEFAULT_STYLE = "prose-lookup"
AUTO_STYLE = "auto"  # the adapter file's own style when it names one (a tuned adapter does), else DEFAULT_STYLE


def resolve_style(style: str, adapter_config: dict) -> str:
    """The style to use: ``style`` itself, or for "auto" the one the loaded adapter was tuned with."""
    if style != AUTO_STYLE:
        return style
    named = adapter_config.get("prompt_style")
    return named if named in PROMPT_STYLES else DEFAULT_STYLE


@dataclass
class Prompting:
    """The prompt form for the loaded base and how expert context is written for it."""

    format: PromptFormat
    render: Callable[[str], str]


def prompting_for(fmt: PromptFormat, style: str = DEFAULT_STYLE) -> Prompting:
    """For a base with a chat template, the chosen style; the Alpaca template (released adapters, the
    demo model) keeps the tagged lines its models were trained with, without the detail lines."""
    if not isinstance(fmt, ChatTemplateFormat):
        return Prompting(fmt, without_details)
    try:
        render, options = PROMPT_STYLES[style]
    except KeyError:
        raise ValueError(f"unknown prompt style {style!r}; choose one of {', '.join(PROMPT_STYLES)}") from None
    if options.get("checks") in (check_presence, check_lookups):
        object_words()  # its vocabulary imports timm (seconds): at start, not in the first question's wait
    # detail lines (an object's colour, text blocks) reach the model only through the checks' lines
    return Prompting(ChatTemplateFormat(fmt.tokenizer, fmt.system, shown=without_details, **options), render)
