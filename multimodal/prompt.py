"""The Alpaca instruction template the released 7B checkpoints were trained with.

The prompt ends exactly at "### Response:" (no trailing space or newline): training appended the answer
directly, so anything else shifts the first token away from what the model saw.
"""
from __future__ import annotations

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
