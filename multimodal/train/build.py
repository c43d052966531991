"""The model to train: loaded from the same files and by the same steps as ``load_model``, with the
option of LoRA that no file on disk has yet, and with every trainable parameter in fp32 while the frozen
base stays in the dtype it was loaded in (bf16/fp16 on a GPU): the optimizer then updates full-precision
values, as the released code does for its trainable parameters."""
from __future__ import annotations

import os

import torch

from ..adapter import is_trainable
from ..loading import LoadedModel, load_model


def load_for_training(llama_dir: str | os.PathLike, tokenizer_path: str | os.PathLike, clip_path: str | os.PathLike,
                      preset: str, init_adapter: str | os.PathLike | None = None, device: torch.device | str = "cpu",
                      dtype: str | torch.dtype | None = None, lora_rank: int | None = None,
                      max_seq_len: int | None = None, bgr: bool | None = None) -> LoadedModel:
    """Base weights + optional starting adapter (e.g. the ``pretrain`` phase's output for ``finetune``).
    ``lora_rank`` adds zero-initialised LoRA (and the ``new_gate`` the LORA-BIAS files carry)."""
    loaded = load_model(llama_dir, tokenizer_path, clip_path, init_adapter, preset=preset, device=device, dtype=dtype,
                        max_seq_len=max_seq_len, bgr=bgr, lora_rank=lora_rank, pack=False)  # packed weights: inference only
    with torch.no_grad():
        for name, p in loaded.model.named_parameters():
            if is_trainable(name):
                p.data = p.data.float()
    return loaded
