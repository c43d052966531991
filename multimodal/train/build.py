"""The model to train: loaded from the same files and by the same steps as ``load_model``, with the
option of LoRA that no file on disk has yet, and with every trainable parameter in fp32 while the frozen
base stays in the dtype it was loaded in (bf16/fp16 on a GPU): the optimizer then updates full-precision
values, as the released code does for its trainable parameters."""
from __future__ import annotations

import os

import torch

from ..adapter import is_base, is_trainable
from ..checkpoint import CheckpointError, preview_names, read_adapter, read_meta_llama, read_openai_clip_visual
from ..config import LlamaConfig, build_preset
from ..image import ImagePreprocessor
from ..loading import LoadedModel, _Prefixed, apply_adapter, build_empty, copy_into, parse_dtype
from ..tokenizer import Tokenizer


def load_for_training(llama_dir: str | os.PathLike, tokenizer_path: str | os.PathLike, clip_path: str | os.PathLike,
                      preset: str, init_adapter: str | os.PathLike | None = None, device: torch.device | str = "cpu",
                      dtype: str | torch.dtype | None = None, lora_rank: int | None = None,
                      max_seq_len: int | None = None, bgr: bool | None = None) -> LoadedModel:
    """Base weights + optional starting adapter (e.g. the ``pretrain`` phase's output for ``finetune``).
    ``lora_rank`` adds zero-initialised LoRA (and the ``new_gate`` the LORA-BIAS files carry)."""
    device = torch.device(device)
    dtype = parse_dtype(dtype, device)
    tokenizer = Tokenizer(tokenizer_path)
    params, base = read_meta_llama(llama_dir)
    overrides = {"max_seq_len": max_seq_len} if max_seq_len else {}
    cfg = build_preset(preset, LlamaConfig.from_params(params, vocab_size=tokenizer.n_words, **overrides))
    adapter = read_adapter(init_adapter) if init_adapter is not None else None
    rank = lora_rank if lora_rank is not None else (adapter.lora_rank if adapter else 0)
    new_gate = bool(rank) or (adapter.has_new_gate if adapter else False)
    cfg = cfg.with_adapter(lora_rank=rank, new_gate=new_gate, scale=cfg.adapter.scale or bool(adapter and adapter.has_scale))
    model = build_empty(cfg, device, dtype)
    loaded = copy_into(model, _Prefixed(base, "llama."), f"LLaMA checkpoint in {llama_dir}")
    del base
    loaded |= copy_into(model, {f"clip.{k}": v for k, v in read_openai_clip_visual(clip_path).items()}, f"CLIP file {clip_path}")
    unset = [k for k, _ in model.named_parameters() if is_base(k) and not is_trainable(k) and k not in loaded]
    if unset:
        raise CheckpointError(f"the base checkpoints lack weights the model needs: {preview_names(unset)}")
    if adapter is not None:
        apply_adapter(model, adapter, f"adapter checkpoint {init_adapter}")
    model.requires_grad_(False)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if is_trainable(name):
                p.data = p.data.float()
    return LoadedModel(model, tokenizer, ImagePreprocessor(cfg.clip, bgr=cfg.bgr if bgr is None else bgr))
