"""Building the model from its weight files.

The model is first built on the meta device (no memory), given its real storage once in the target
dtype/device, and then each checkpoint tensor is copied in one at a time from the memory-mapped file,
converting dtype on the way (fp16 -> bf16 directly, never through fp32). So a 7B model occupies its
own storage once, and the file's pages stay reclaimable page cache.
"""
from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import torch

from .adapter import is_base, is_trainable, merge_lora_into_weights
from .checkpoint import (AdapterCheckpoint, CheckpointError, StateDict, preview_names, ours_to_official, read_adapter,
                         read_meta_llama, read_openai_clip_visual)
from .config import LlamaConfig, ModelConfig, build_preset
from .image import ImagePreprocessor
from .model import MultimodalLlama
from .packing import pack_language_model, packing_pays
from .tokenizer import Tokenizer

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


def default_device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda")
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def default_dtype(device: torch.device) -> torch.dtype:
    """fp32 on CPU (16-bit matmuls are slow there); bf16 on GPUs that have it, else fp16."""
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type == "mps":
        return torch.float16
    return torch.float32


def parse_dtype(name: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    if name is None or name == "auto":
        return default_dtype(device)
    if isinstance(name, torch.dtype):
        return name
    try:
        return DTYPES[name]
    except KeyError:
        raise ValueError(f"unknown dtype {name!r}; choose one of float32, bfloat16, float16") from None


def build_empty(cfg: ModelConfig, device: torch.device | str, dtype: torch.dtype) -> MultimodalLlama:
    """The model with storage allocated but base weights unset, and tuned parameters at their init."""
    with torch.device("meta"):
        model = MultimodalLlama(cfg).to(dtype)
    model = model.to_empty(device=device)
    model.llama.reset_rope()
    model.reset_adapter_parameters()
    return model


@torch.no_grad()
def copy_into(model: torch.nn.Module, state: StateDict, source: str) -> set[str]:
    """Copy tensors into the model's parameters by name, one at a time; returns the names loaded."""
    own = dict(model.named_parameters())
    unknown = [k for k in state if k not in own]  # iterating keys reads no tensor
    if unknown:
        raise CheckpointError(f"{source} has keys this model does not have: {preview_names(unknown)}")
    for k in state:
        v = state[k]  # one tensor at a time (shards are joined lazily)
        if v.shape != own[k].shape:
            raise CheckpointError(f"{source}: {k} has shape {tuple(v.shape)}, the model expects {tuple(own[k].shape)}")
        own[k].copy_(v)  # converts dtype directly (e.g. fp16 -> bf16), no fp32 step
    return set(state)


class _Prefixed(Mapping[str, torch.Tensor]):
    """A lazy state dict with a prefix added to every key."""

    def __init__(self, state: StateDict, prefix: str) -> None:
        self.state, self.prefix = state, prefix

    def __getitem__(self, key: str) -> torch.Tensor:
        return self.state[key.removeprefix(self.prefix)]

    def __iter__(self) -> Iterator[str]:
        return (self.prefix + k for k in self.state)

    def __len__(self) -> int:
        return len(self.state)


def adapter_state(model: MultimodalLlama, ckpt: AdapterCheckpoint, source: str = "adapter checkpoint") -> StateDict:
    """The checkpoint's tensors checked against the model: unknown keys and frozen base weights are
    errors naming them.

    The released files store a gate for layer 0, which the released code never uses: a gate of a
    layer this preset does not prompt is accepted only while it is zero (then it changes nothing)."""
    state = dict(ckpt.state)
    own = dict(model.named_parameters())
    for key in [k for k in state if k not in own and k.endswith((".prompt_gate.gate", ".prompt_gate.new_gate"))]:
        value = state.pop(key)
        if key.endswith(".gate") and bool(value.abs().max() > 0):
            raise CheckpointError(f"{source}: {ours_to_official(key)} is non-zero but preset {model.config.name!r} "
                                  "gives that layer no prompt")
    unknown = [ours_to_official(k) for k in state if k not in own]
    if unknown:
        raise CheckpointError(f"{source} has keys this model does not have: {preview_names(unknown)}")
    frozen = [k for k in state if not is_trainable(k)]
    if frozen:
        raise CheckpointError(f"{source} overwrites frozen base weights: {preview_names(frozen)}")
    return state


def apply_adapter(model: MultimodalLlama, ckpt: AdapterCheckpoint, source: str = "adapter checkpoint") -> None:
    """Overlay adapter weights; tuned parameters the file lacks keep their init values."""
    copy_into(model, adapter_state(model, ckpt, source), source)


@dataclass
class LoadedModel:
    model: MultimodalLlama
    tokenizer: Tokenizer
    preprocess: ImagePreprocessor

    @property
    def config(self) -> ModelConfig:
        return self.model.config


def prepare_language_model(llama: torch.nn.Module, device: torch.device, dtype: torch.dtype, merge_lora: bool = False,
                           pack: bool | None = None, quantize: str | None = None) -> tuple[int, int]:
    """The inference-only weight changes load_model makes to a loaded language model, in their order:
    fold LoRA into the weights, then pack them for oneDNN (``pack`` None: where packing pays, never
    with int8, which the caller applies afterwards). Returns (layers merged, layers packed)."""
    merged = merge_lora_into_weights(llama) if merge_lora else 0  # first: packing replaces the weights
    if pack is None:
        pack = quantize is None and packing_pays(device, dtype)
    if pack and quantize is not None:
        raise ValueError("pack and quantize exclude each other: int8 weights have their own kernels")
    return merged, pack_language_model(llama) if pack else 0


def load_model(llama_dir: str | os.PathLike, tokenizer_path: str | os.PathLike, clip_path: str | os.PathLike,
               adapter_path: str | os.PathLike | None = None, preset: str = "official-7b",
               device: str | torch.device | None = None, dtype: str | torch.dtype | None = None,
               max_seq_len: int | None = None, bgr: bool | None = None, quantize: str | None = None,
               lora_rank: int | None = None, pack: bool | None = None, merge_lora: bool = False) -> LoadedModel:
    """Meta LLaMA directory + tokenizer + OpenAI CLIP file (+ adapter checkpoint) -> a ready model.

    ``bgr`` overrides the preset's channel order (the official preset feeds BGR, as the released
    checkpoints were trained). ``quantize="int8"`` loads on the CPU, then moves the LLaMA to the
    device layer by layer with int8 weights (see quantize.py). ``lora_rank`` gives the model LoRA of
    that rank (zero-initialised where the adapter file has none, e.g. to train it); by default the
    model has the LoRA the adapter file has. ``pack`` prepacks the language model's frozen weights
    for oneDNN (see packing.py); by default it does where that is faster: bfloat16 on a CPU with
    oneDNN bf16, not quantised. ``merge_lora`` folds the adapter's LoRA into the frozen weights (two
    fewer matrix products per linear layer and step); the model then has no LoRA to train or to swap
    (see swap.py). Packed and merged models are for inference only."""
    target = torch.device(device) if device is not None else default_device()
    dtype = parse_dtype(dtype, target)
    if quantize not in (None, "int8"):
        raise ValueError(f"unknown quantisation {quantize!r}; the choice is int8")
    device = torch.device("cpu") if quantize else target
    tokenizer = Tokenizer(tokenizer_path)
    params, base = read_meta_llama(llama_dir)
    overrides = {"max_seq_len": max_seq_len} if max_seq_len else {}
    llama_cfg = LlamaConfig.from_params(params, vocab_size=tokenizer.n_words, **overrides)
    if llama_cfg.vocab_size != tokenizer.n_words:
        raise CheckpointError(f"params.json says vocab_size {llama_cfg.vocab_size}, the tokenizer has {tokenizer.n_words}")
    cfg = build_preset(preset, llama_cfg)
    adapter = read_adapter(adapter_path) if adapter_path is not None else None
    rank = lora_rank if lora_rank is not None else (adapter.lora_rank if adapter else cfg.adapter.lora_rank)
    new_gate = bool(rank) or (adapter.has_new_gate if adapter else cfg.adapter.new_gate)  # LORA-BIAS files carry one
    cfg = cfg.with_adapter(lora_rank=rank, new_gate=new_gate, scale=cfg.adapter.scale or bool(adapter and adapter.has_scale))
    model = build_empty(cfg, device, dtype)
    loaded = copy_into(model, _Prefixed(base, "llama."), f"LLaMA checkpoint in {llama_dir}")
    del base
    loaded |= copy_into(model, {f"clip.{k}": v for k, v in read_openai_clip_visual(clip_path).items()}, f"CLIP file {clip_path}")
    unset = [k for k, _ in model.named_parameters() if is_base(k) and not is_trainable(k) and k not in loaded]
    if unset:
        raise CheckpointError(f"the base checkpoints lack weights the model needs: {preview_names(unset)}")
    if adapter is not None:
        apply_adapter(model, adapter, f"adapter checkpoint {adapter_path}")
    model.eval().requires_grad_(False)
    prepare_language_model(model.llama, target, dtype, merge_lora=merge_lora, pack=pack, quantize=quantize)
    if quantize == "int8":
        from .quantize import quantize_int8

        quantize_int8(model, target)
    use_bgr = cfg.bgr if bgr is None else bgr
    return LoadedModel(model, tokenizer, ImagePreprocessor(cfg.clip, bgr=use_bgr))


def load_llama_only(llama_dir: str | os.PathLike, device: str | torch.device = "cpu",
                    dtype: torch.dtype = torch.float32, max_seq_len: int | None = None,
                    vocab_size: int | None = None) -> "torch.nn.Module":
    """Just the language model of a Meta directory (no adapter): for tests and benchmarks."""
    from .llama import Transformer

    params, base = read_meta_llama(llama_dir)
    overrides = {"max_seq_len": max_seq_len} if max_seq_len else {}
    cfg = LlamaConfig.from_params(params, vocab_size=vocab_size, **overrides)
    with torch.device("meta"):
        llama = Transformer(cfg).to(dtype)
    llama = llama.to_empty(device=device)
    llama.reset_rope()
    loaded = copy_into(llama, base, f"LLaMA checkpoint in {llama_dir}")
    unset = [k for k, _ in llama.named_parameters() if k not in loaded]
    if unset:
        raise CheckpointError(f"LLaMA checkpoint in {llama_dir} lacks: {preview_names(unset)}")
    return llama.eval().requires_grad_(False)

