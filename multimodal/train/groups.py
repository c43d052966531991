"""Which parameters each kind of data trains.

Everything here is a subset of what :func:`multimodal.adapter.is_trainable` marks (the one predicate for
what adapter checkpoints save); these functions only split it by data kind and phase:

- ``joint`` (the paper's V2 recipe, for ``v2-early``-style layouts): image-caption data trains the
  *visual group* = the resampler (clip_proj, visual queries and blocks, visual_proj) and the gates of the
  visual layers; instruction data trains the *instruction group* = adaption prompts, gates of the
  adapter-only layers, RMSNorm weights, biases, scales (and LoRA). The groups are disjoint, so each loss
  moves only its own parameters. A layer that is both visual and adapter keeps its gate in the visual
  group.
- ``pretrain`` (the released code's first phase, ``official-7b``): captions train the resampler, every
  prompt gate and the adaption prompts.
- ``finetune`` (the released code's second phase): instructions train norms, biases, scales and LoRA.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from torch import nn

from ..adapter import is_trainable
from ..config import ModelConfig

PHASES = ("joint", "pretrain", "finetune")
_GATE = re.compile(r"^llama\.layers\.(\d+)\.attention\.prompt_gate\.(gate|new_gate)$")


@dataclass(frozen=True)
class Groups:
    caption: tuple[str, ...]  # parameter names trained by the caption loss
    instruction: tuple[str, ...]  # parameter names trained by the instruction loss

    @property
    def all(self) -> tuple[str, ...]:
        return self.caption + self.instruction


def _is_visual(name: str, cfg: ModelConfig) -> bool:
    if name.startswith("resampler."):
        return True
    m = _GATE.match(name)
    return bool(m) and int(m[1]) in cfg.adapter.visual_layers


def param_groups(model: nn.Module, cfg: ModelConfig, phase: str) -> Groups:
    if phase not in PHASES:
        raise ValueError(f"unknown phase {phase!r}; choose one of {', '.join(PHASES)}")
    names = [n for n, _ in model.named_parameters() if is_trainable(n)]
    if phase == "joint":
        caption = [n for n in names if _is_visual(n, cfg)]
        instruction = [n for n in names if not _is_visual(n, cfg)]
    elif phase == "pretrain":
        caption = [n for n in names if n.startswith(("resampler.", "adapter_query.")) or _GATE.match(n)]
        instruction = []
    else:
        caption = []
        instruction = [n for n in names if n.startswith("llama.") and not _GATE.match(n)]
    if set(caption) & set(instruction):  # guarded by construction; a cheap check that it stays so
        raise AssertionError("parameter groups overlap")
    return Groups(tuple(caption), tuple(instruction))


def set_trainable(model: nn.Module, groups: Groups) -> None:
    """requires_grad exactly on the groups' parameters; everything else (the base) frozen."""
    chosen = set(groups.all)
    for name, p in model.named_parameters():
        p.requires_grad_(name in chosen)
