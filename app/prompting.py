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

from multimodal.prompt import PromptFormat

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
    q_tokens, c_tokens = (count(question) if question else 0), (count(context) if context else 0)

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
