"""Building the model from its weight files.

The model is first built on the meta device (no memory), given its real storage once in the target
dtype/device, and then each checkpoint tensor is copied in one at a time from the reader's lazy mapping
(multimodal/formats: Meta's files memory-mapped, Hugging Face shards read tensor by tensor, GGUF
tensors dequantised one at a time), converting dtype on the way (fp16 -> bf16 directly, never through
fp32). So a model occupies its own storage once, plus at most one tensor in flight.
"""
from __future__ import annotations

import logging
import os
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from .adapter import is_base, is_trainable, merge_lora_into_weights
from .coded import attach_codes
from .checkpoint import (AdapterCheckpoint, CheckpointError, StateDict, clip_config_from_state, ours_to_official,
                         preview_names, read_adapter, read_meta_llama, read_openai_clip_visual)
from .config import AdapterConfig, LlamaConfig, ModelConfig, build_preset
from .int4 import attach_int4, int4_available
from .formats import read_base
from .image import ImagePreprocessor
from .model import MultimodalLlama
from .packing import pack_language_model, packing_pays
from .tokenizer import TokenizerBase

log = logging.getLogger(__name__)

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


_OUR_GATE = re.compile(r"^llama\.layers\.(\d+)\.attention\.prompt_gate\.(gate|new_gate)$")


def adapter_state(model: MultimodalLlama, ckpt: AdapterCheckpoint, source: str = "adapter checkpoint") -> StateDict:
    """The checkpoint's tensors checked against the model: unknown keys, frozen base weights and
    missing tensors of a prompted layer are errors naming them.

    The released files store a gate for every layer, layer 0's too, which the released code loads and
    never uses: a gate of a layer this model does not prompt is ignored in the same way (one log line),
    whatever its value."""
    state = dict(ckpt.state)
    own = dict(model.named_parameters())
    stray = [k for k in state if k not in own and _OUR_GATE.match(k)]
    if stray:
        nonzero = [ours_to_official(k) for k in stray if k.endswith(".gate") and bool(state[k].abs().max() > 0)]
        log.log(logging.WARNING if nonzero else logging.INFO,
                "%s: ignoring gates of layers without a prompt, as the official loader does: %s%s", source,
                preview_names([ours_to_official(k) for k in stray]), f" (non-zero: {', '.join(nonzero)})" if nonzero else "")
        for k in stray:
            del state[k]
    unknown = [ours_to_official(k) for k in state if k not in own]
    if unknown:
        raise CheckpointError(f"{source} has keys this model does not have: {preview_names(unknown)}")
    frozen = [k for k in state if not is_trainable(k)]
    if frozen:
        raise CheckpointError(f"{source} overwrites frozen base weights: {preview_names(frozen)}")
    missing = [ours_to_official(k) for k in _prompt_tensors(model) if k not in state]
    if missing:
        raise CheckpointError(f"{source} lacks tensors of the prompts it gives: {preview_names(missing)}")
    return state


def _prompt_tensors(model: MultimodalLlama) -> list[str]:
    """What a prompted layer cannot do without: its gate, its prompt rows, and the whole resampler of
    a model with a visual part. (Biases, scales, norms, LoRA and new_gate keep their neutral init.)"""
    a = model.config.adapter
    names = [f"llama.layers.{i}.attention.prompt_gate.gate" for i in a.prompted_layers]
    if model.adapter_query is not None:
        names.append("adapter_query.weight")
    if model.resampler is not None:
        names += [f"resampler.{k}" for k, _ in model.resampler.named_parameters()]
    return names


def apply_adapter(model: MultimodalLlama, ckpt: AdapterCheckpoint, source: str = "adapter checkpoint") -> None:
    """Overlay adapter weights; tuned parameters the file lacks keep their init values."""
    copy_into(model, adapter_state(model, ckpt, source), source)


# --- the model's shapes from the files ------------------------------------------------------------------

@dataclass(frozen=True)
class _Layout:
    adapter_layers: tuple[int, ...]
    visual_layers: tuple[int, ...]
    prompt_len: int

    def fits(self, rows: int, n_queries: int) -> bool:
        """Whether the file's prompt rows and visual queries have the shapes this layout gives them."""
        both = set(self.adapter_layers) & set(self.visual_layers)
        return (len(self.adapter_layers) * self.prompt_len == rows and bool(self.visual_layers) == bool(n_queries)
                and (not both or self.prompt_len == n_queries))


def _official_layout(ckpt: AdapterCheckpoint, n_layers: int, n_queries: int, preset: AdapterConfig) -> _Layout | None:
    """Placement by the official code's rule, for files no preset describes. With a resampler: one
    prompt length for both kinds of prompt (``query_len``), the adaption prompts in the top
    ``rows / query_len`` layers (``query_layer``) and the visual tokens added in those same layers.
    Without one: the gated layers take the prompts, less the lowest when the rows divide only so
    (official files gate the unused layer 0 too). None when the shapes allow neither."""
    rows, gated = ckpt.prompt_rows, ckpt.gated_layers
    if rows == 0:
        visual = (gated or preset.visual_layers) if n_queries else ()
        return _Layout((), tuple(visual), preset.prompt_len)
    if n_queries:
        k = rows // n_queries
        if rows % n_queries or not 0 < k <= n_layers:
            return None
        top = tuple(range(n_layers - k, n_layers))
        return _Layout(top, top, n_queries)
    for k in (len(gated), len(gated) - 1):
        if k > 0 and rows % k == 0:
            return _Layout(gated[-k:], (), rows // k)
    return None


def adapter_layout(ckpt: AdapterCheckpoint, preset: AdapterConfig, n_layers: int, n_queries: int,
                   source: str) -> _Layout:
    """Which layers the file's prompts go to. The rows of ``adapter_query`` are (adapter layers x
    prompt length) and the gates name the prompted layers, but a file cannot say which prompted layers
    are visual ones (the demo's visual first half and prompted second half look like the official
    all-in-the-top layers): the preset's placement is taken when the file's shapes and gates fit it,
    else the official rule (``_official_layout``)."""
    preset_layout = _Layout(preset.adapter_layers, preset.visual_layers if n_queries else (), preset.prompt_len)
    candidates = [c for c in (preset_layout, _official_layout(ckpt, n_layers, n_queries, preset))
                  if c is not None and c.fits(ckpt.prompt_rows, n_queries)]
    if not candidates:
        raise CheckpointError(f"{source}: cannot tell where its prompts go: adapter_query has {ckpt.prompt_rows} rows, "
                              f"{n_queries} visual queries, gates in layers {list(ckpt.gated_layers)}, and neither the "
                              f"preset's layers nor the official placement have those shapes")
    gated = set(ckpt.gated_layers)
    complete = [c for c in candidates if set(c.adapter_layers) | set(c.visual_layers) <= gated]
    return (complete or candidates)[0]  # a missing gate is then named by adapter_state


def model_config_from_files(preset: ModelConfig, adapter: AdapterCheckpoint | None, clip: StateDict | None,
                            lora_rank: int | None = None, source: str = "adapter checkpoint",
                            clip_source: str = "CLIP file") -> ModelConfig:
    """The model the files describe: CLIP's shapes from its state dict, the resampler's, the prompts'
    and LoRA's from the adapter. The preset (already on the base's LLaMA shape) supplies what files
    cannot say. No adapter: the preset's placement with CLIP (training from scratch), or, without a
    CLIP file either, the bare base (no prompts). An adapter without a resampler makes a text-only
    model whatever the preset says."""
    a = preset.adapter
    clip_cfg = clip_config_from_state(clip, preset.clip, clip_source) if clip is not None else preset.clip
    if adapter is None:
        changes: dict[str, Any] = {} if clip is not None else {"adapter_layers": (), "visual_layers": ()}
        resampler = preset.resampler
        rank = lora_rank if lora_rank is not None else a.lora_rank
        changes |= {"lora_rank": rank, "new_gate": bool(rank) or a.new_gate}
    else:
        resampler = adapter.resampler_config(preset.resampler, source)
        n_queries = resampler.n_queries if resampler is not None else 0
        if adapter.layout:
            changes = dict(adapter.layout)
        else:
            layout = adapter_layout(adapter, a, preset.llama.n_layers, n_queries, source)
            changes = {"adapter_layers": layout.adapter_layers, "visual_layers": layout.visual_layers,
                       "prompt_len": layout.prompt_len, "bias": a.bias or adapter.has_bias,
                       "scale": a.scale or adapter.has_scale, "lora_rank": adapter.lora_rank,
                       "new_gate": bool(adapter.lora_rank) or adapter.has_new_gate}
        if lora_rank is not None:  # LoRA no file has yet, e.g. to train it (the LORA-BIAS files carry new_gate)
            changes |= {"lora_rank": lora_rank, "new_gate": changes.get("new_gate", False) or bool(lora_rank)}
        resampler = resampler or preset.resampler
    try:
        return replace(preset, clip=clip_cfg, resampler=resampler, adapter=replace(a, **changes))
    except ValueError as e:
        raise CheckpointError(f"{source}: {e}") from e


@dataclass
class LoadedModel:
    model: MultimodalLlama
    tokenizer: TokenizerBase
    preprocess: ImagePreprocessor
    adapter_config: dict = field(default_factory=dict)  # the adapter file's 'config' entry (e.g. its prompt style)

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


def load_model(llama_dir: str | os.PathLike, tokenizer_path: str | os.PathLike | None = None,
               clip_path: str | os.PathLike | None = None, adapter_path: str | os.PathLike | None = None,
               preset: str = "official-7b", device: str | torch.device | None = None,
               dtype: str | torch.dtype | None = None, max_seq_len: int | None = None, bgr: bool | None = None,
               quantize: str | None = None, lora_rank: int | None = None, pack: bool | None = None,
               merge_lora: bool = False, codes: bool = False, int4: bool = False) -> LoadedModel:
    """A base (Meta folder, Hugging Face folder or GGUF file: formats.read_base) + OpenAI CLIP file +
    adapter (official file or PEFT AdaptionPrompt folder) -> a ready model.

    Every shape comes from the files (model_config_from_files); ``preset`` supplies the rest. An
    adapter without a visual resampler, or no adapter and no ``clip_path``, makes a text-only model
    that needs no CLIP file. ``tokenizer_path``: Meta's tokenizer.model when it is neither in nor
    beside the folder (other formats carry theirs).

    ``bgr`` overrides the preset's channel order (the official preset feeds BGR, as the released
    checkpoints were trained). ``quantize="int8"`` loads on the CPU, then moves the LLaMA to the
    device layer by layer with int8 weights (see quantize.py). ``lora_rank`` gives the model LoRA of
    that rank (zero-initialised where the adapter file has none, e.g. to train it); by default the
    model has the LoRA the adapter file has. ``pack`` prepacks the language model's frozen weights
    for oneDNN (see packing.py); by default it does where that is faster: bfloat16 on a CPU with
    oneDNN bf16, not quantised. ``merge_lora`` folds the adapter's LoRA into the frozen weights (two
    fewer matrix products per linear layer and step); the model then has no LoRA to train or to swap
    (see swap.py). Packed and merged models are for inference only. ``codes`` keeps a GGUF file's
    Q4_0/Q4_1/Q8_0 weights as stored, beside the dense ones, for a compiled float32 decoding step that
    reads them (coded.py); it needs plain (unpacked, unquantised) weights and no LoRA. ``int4`` keeps
    a GGUF file's 4-bit weights in PyTorch's int4 kernel layout as well, for eager bfloat16 decoding on
    a CPU (int4.py); elsewhere (another device or dtype, int8, a file without 4-bit weights) it does nothing."""
    target = torch.device(device) if device is not None else default_device()
    dtype = parse_dtype(dtype, target)
    if quantize not in (None, "int8"):
        raise ValueError(f"unknown quantisation {quantize!r}; the choice is int8")
    device = torch.device("cpu") if quantize else target
    base = read_base(llama_dir, tokenizer_path, **({"max_seq_len": max_seq_len} if max_seq_len else {}))
    tokenizer, weights, base_source = base.tokenizer, base.weights, base.source
    if tokenizer.n_words > base.config.vocab_size:  # a padded embedding may be larger, never smaller
        raise CheckpointError(f"{base_source}: the tokenizer has {tokenizer.n_words} tokens, the embedding only "
                              f"{base.config.vocab_size}")
    adapter_source = f"adapter {adapter_path}"
    adapter = read_adapter(adapter_path, base.config) if adapter_path is not None else None
    wants_clip = adapter.has_resampler if adapter is not None else clip_path is not None
    if wants_clip and clip_path is None:
        raise ValueError(f"{adapter_source} has a visual resampler: pass the OpenAI CLIP file (clip_path)")
    if clip_path is not None and not wants_clip:
        log.info("%s has no visual part: the model is text-only and %s is not read", adapter_source, clip_path)
    clip = read_openai_clip_visual(clip_path) if wants_clip else None
    cfg = model_config_from_files(build_preset(preset, base.config), adapter, clip, lora_rank, adapter_source,
                                  f"CLIP file {clip_path}")
    codes_of = getattr(weights, "codes", None)  # GGUF only
    if codes and (pack or quantize):
        raise ValueError("codes need plain weights: pass pack=False and no quantize")
    del base
    model = build_empty(cfg, device, dtype)
    loaded = copy_into(model, _Prefixed(weights, "llama."), base_source)
    if codes and codes_of is not None:
        attach_codes(model.llama, codes_of)
    if int4 and codes_of is not None and quantize is None and int4_available(device, dtype):
        n = attach_int4(model.llama, codes_of)  # before merging LoRA: layers with LoRA are left dense
        log.info("%s: %d layers decode from their 4-bit codes (int4 kernel)", base_source, n)
    del weights
    if clip is not None:
        loaded |= copy_into(model, _Prefixed(clip, "clip."), f"CLIP file {clip_path}")
        del clip
    unset = [k for k, _ in model.named_parameters() if is_base(k) and not is_trainable(k) and k not in loaded]
    if unset:
        raise CheckpointError(f"the base checkpoints lack weights the model needs: {preview_names(unset)}")
    if adapter is not None:
        apply_adapter(model, adapter, adapter_source)
    model.eval().requires_grad_(False)
    prepare_language_model(model.llama, target, dtype, merge_lora=merge_lora, pack=False if codes else pack,
                           quantize=quantize)
    if quantize == "int8":
        from .quantize import quantize_int8

        quantize_int8(model, target)
    use_bgr = cfg.bgr if bgr is None else bgr
    return LoadedModel(model, tokenizer, ImagePreprocessor(cfg.clip, bgr=use_bgr),
                       dict(adapter.config) if adapter is not None else {})


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

