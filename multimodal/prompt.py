"""The Alpaca instruction template the released 7B checkpoints were trained with.

The prompt ends exactly at "### Response:" (no trailing space or newline): training appended the answer
directly, so anything else shifts the first token away from what the model saw.
"""
from __future__ import annotations

from collections.abc import Callable

_PREAMBLE = "Below is an instruction that describes a task. Write a response that appropriately completes the request."
_PREAMBLE_INPUT = ("Below is an instruction that describes a task, paired with an input that provides further "
                   "context. Write a response that appropriately completes the request.")

CAPTION_INSTRUCTION = "Generate caption of this image"


def format_prompt(instruction: str, context: str | None = None) -> str:
    """``context`` (expert output, earlier turns) goes into the template's ``### Input:`` section."""
    if context:
        return f"{_PREAMBLE_INPUT}\n\n### Instruction:\n{instruction}\n\n### Input:\n{context}\n\n### Response:"
    return f"{_PREAMBLE}\n\n### Instruction:\n{instruction}\n\n### Response:"


def format_chat(question: str, history: list[tuple[str, str]] | tuple = (), context: str | None = None) -> str:
    """A turn of a conversation for single-turn-trained checkpoints.

    The first turn is the plain Alpaca prompt (expert context in ``### Input:``). Follow-up turns put
    what does not change first (expert context, then the earlier turns) and the new question last, so
    turn N+1 shares its token prefix with turn N's prompt and answer, whose keys/values are still in
    the cache: a follow-up costs its new text, not the whole conversation. The app builds prompts with
    this and the project's training data uses the same layout.
    """
    question = question.strip()
    if not history:
        return format_prompt(question, context.strip() if context else None)
    parts = [context.strip()] if context else []
    parts.append("Conversation so far:\n" + "\n".join(f"User: {q.strip()}\nAssistant: {a.strip()}" for q, a in history))
    joined = "\n\n".join(parts)
    return f"{_PREAMBLE_INPUT}\n\n### Input:\n{joined}\n\n### Instruction:\n{question}\n\n### Response:"


# --- one interface over the two ways a base wants its prompt ----------------------------------------

# The system turn for chat bases: it tells the model how it sees the image, so that it answers from the
# experts' findings instead of claiming it cannot see pictures.
SYSTEM_EXPERTS = ("You are a helpful assistant that answers questions about an image. You do not see the image "
                  "itself: tools have looked at it, and their findings are given with the question. Answer from "
                  "those findings, briefly. If they do not answer the question, say so.")
SYSTEM_VISUAL = ("You are a helpful assistant that answers questions about an image. You see the image, and "
                 "tools' findings about it are given with the question. Answer in one short sentence.")


class PromptFormat:
    """How a conversation becomes token ids for one base: ``ids`` for the model, ``text`` to show."""

    def text(self, question: str, history: list[tuple[str, str]] | tuple = (), context: str | None = None) -> str:
        raise NotImplementedError

    def ids(self, question: str, history: list[tuple[str, str]] | tuple = (), context: str | None = None) -> list[int]:
        raise NotImplementedError

    def visible(self, context: str | None) -> str | None:
        """What of the expert context the prompt shows (all of it, unless a format leaves lines out)."""
        return context

    def count(self, text: str) -> int:
        raise NotImplementedError


class AlpacaFormat(PromptFormat):
    """The released LLaMA-1 adapters' (and the demo model's) instruction template, via format_chat."""

    def __init__(self, tokenizer: "TokenizerBase") -> None:  # noqa: F821
        self.tokenizer = tokenizer

    def text(self, question, history=(), context=None) -> str:
        return format_chat(question, list(history), context)

    def ids(self, question, history=(), context=None) -> list[int]:
        return self.tokenizer.encode(self.text(question, history, context), bos=self.tokenizer.add_bos)

    def count(self, text: str) -> int:
        return self.tokenizer.count(text)


class ChatTemplateFormat(PromptFormat):
    """The base's own chat template (ChatML for SmolLM2, Llama 2/3's, ...): a system turn, optional
    worked examples, the earlier turns as user/assistant messages, and the expert context in the user
    turn before the question (or in the system turn: ``context_in="system"``; or with the first question
    about the image: ``context_in="first"``).

    ``"first"`` keeps the findings where they were first given: in a follow-up they stay in the oldest
    turn the prompt carries, so the follow-up's prompt extends the previous one token for token and the
    engine prefills only the new turn (the previous request's keys/values are reused).

    ``examples`` are (context, question, answer) exchanges shown before the conversation, so that a
    small model sees once how findings turn into a short answer. ``checks`` writes a line under each
    question from the whole findings; ``shown`` picks what of the findings the prompt shows (the app
    keeps lines meant only for the checks out)."""

    def __init__(self, tokenizer: "TokenizerBase", system: str | None = SYSTEM_EXPERTS,  # noqa: F821
                 context_in: str = "user", examples: tuple[tuple[str, str, str], ...] = (),
                 checks: Callable[[str, str | None], str | None] | None = None,
                 shown: Callable[[str], str] | None = None) -> None:
        if tokenizer.chat_template is None:
            raise ValueError("this base has no chat template")
        if context_in not in ("user", "system", "first"):
            raise ValueError(f"context_in must be 'user', 'system' or 'first', not {context_in!r}")
        self.tokenizer, self.system, self.context_in, self.examples = tokenizer, system, context_in, examples
        self.checks, self.shown = checks, shown

    def _ask(self, question: str, findings: str | None) -> str:
        """The question, with the line ``checks`` writes under it from the conversation's findings (every
        turn's, the examples' and earlier turns' too, so a follow-up's prompt still extends the last one)."""
        note = self.checks(question, findings) if self.checks is not None else None
        return f"{question}\n{note}" if note else question

    def _user(self, question: str, context: str | None) -> str:
        context = self.visible(context)
        return f"Findings about the image:\n{context.strip()}\n\nQuestion: {question}" if context else question

    def visible(self, context: str | None) -> str | None:
        if context and self.shown is not None:
            context = self.shown(context).strip() or None
        return context

    def messages(self, question: str, history=(), context: str | None = None) -> list[dict[str, str]]:
        system = self.system or ""
        findings = context
        if context and self.context_in == "system":
            shown = self.visible(context)
            system = f"{system}\n\nFindings about the image:\n{shown.strip()}".strip() if shown else system
            context = None
        out = [{"role": "system", "content": system}] if system else []
        for ex_context, ex_question, ex_answer in self.examples:
            out += [{"role": "user", "content": self._user(self._ask(ex_question, ex_context), ex_context)},
                    {"role": "assistant", "content": ex_answer}]
        for i, (q, a) in enumerate(history):
            first = self.context_in == "first" and i == 0
            asked = self._ask(q.strip(), findings)
            out += [{"role": "user", "content": self._user(asked, context) if first else asked},
                    {"role": "assistant", "content": a.strip()}]
        if self.context_in == "first" and history:
            context = None  # already with the first question
        return out + [{"role": "user", "content": self._user(self._ask(question.strip(), findings), context)}]

    def text(self, question, history=(), context=None) -> str:
        return self.tokenizer.render_chat(self.messages(question, history, context))

    def ids(self, question, history=(), context=None) -> list[int]:
        return self.tokenizer.encode_chat(self.messages(question, history, context))

    def count(self, text: str) -> int:
        return self.tokenizer.count(text)


def prompt_format(tokenizer: "TokenizerBase", visual: bool = False) -> PromptFormat:  # noqa: F821
    """The base's chat template when it has one, else the Alpaca template. ``visual``: the model also
    sees the image through visual tokens (its system turn says so)."""
    if tokenizer.chat_template is not None:
        return ChatTemplateFormat(tokenizer, SYSTEM_VISUAL if visual else SYSTEM_EXPERTS)
    return AlpacaFormat(tokenizer)
