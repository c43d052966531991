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
    """A turn of a conversation for single-turn-trained checkpoints: expert context and the earlier
    turns go into the ``### Input:`` section, the current question is the instruction. The app builds
    prompts with this and the project's training data uses the same layout, so the demo model sees at
    inference exactly what it learned from."""
    parts = []
    if context:
        parts.append(context.strip())
    if history:
        parts.append("Conversation so far:\n" + "\n".join(f"User: {q.strip()}\nAssistant: {a.strip()}" for q, a in history))
    return format_prompt(question.strip(), "\n\n".join(parts) or None)
