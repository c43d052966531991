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
