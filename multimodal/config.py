"""Model configuration: dataclasses and the named presets.

Every shape the weight files state comes from them: the LLaMA's from the base's files, CLIP's from its
state dict, the resampler's, the prompt length and the prompted layers from the adapter file
(``checkpoint.model_config_from_files``). A preset keeps only what files cannot say: where the layers
go when training from scratch, the channel order, and which layers are visual when an adapter file
could be read either way.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class RopeScaling:
    """Llama 3.1's frequency-dependent RoPE scaling (``rope_type: llama3``): wavelengths longer than
    ``original_max_position_embeddings / low_freq_factor`` are stretched by ``factor``, shorter than
    ``... / high_freq_factor`` kept, and the band between interpolated smoothly."""

    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclass(frozen=True)
class LlamaConfig:
    """Meta's ``ModelArgs``: field names follow ``params.json``. Readers of other formats (Hugging Face
    ``config.json``, GGUF metadata) fill the same fields; ``hidden_dim`` states the FFN width outright
    where a file gives it, instead of Meta's rule of ``multiple_of`` and ``ffn_dim_multiplier``."""

    dim: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: int | None = None  # None: same as n_heads (no grouped-query attention)
    vocab_size: int = 32000
    multiple_of: int = 256
    ffn_dim_multiplier: float | None = None
    norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    max_seq_len: int = 512  # prompt + generation; sizes the KV cache and the RoPE table
    hidden_dim: int | None = None  # FFN width as a file states it; None: Meta's rule below
    rope_scaling: RopeScaling | None = None  # Llama 3.1-style frequency scaling; None: plain RoPE
    tie_embeddings: bool = False  # the output layer shares the token embedding (SmolLM2, Llama 3.2 1B)

    def __post_init__(self) -> None:
        if self.dim % self.n_heads:
            raise ValueError(f"dim {self.dim} is not divisible by n_heads {self.n_heads}")
        if self.n_heads % self.kv_heads:
            raise ValueError(f"n_heads {self.n_heads} is not a multiple of n_kv_heads {self.kv_heads}")
        if self.head_dim % 2:
            raise ValueError("RoPE needs an even head dimension")

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def ffn_hidden_dim(self) -> int:
        """SwiGLU width: as the file states it, else as Meta computes it: 2/3 of 4*dim, times the
        multiplier, rounded up to ``multiple_of``."""
        if self.hidden_dim is not None:
            return self.hidden_dim
        hidden = int(2 * (4 * self.dim) / 3)
        if self.ffn_dim_multiplier is not None:
            hidden = int(self.ffn_dim_multiplier * hidden)
        return self.multiple_of * ((hidden + self.multiple_of - 1) // self.multiple_of)

    @classmethod
    def from_params(cls, params: dict[str, Any], vocab_size: int | None = None, **overrides: Any) -> "LlamaConfig":
        """Build from a ``params.json`` dict. Meta's LLaMA-1 files say ``vocab_size: -1``; the
        tokenizer then supplies it. Unknown keys are rejected so a wrong file is noticed."""
        known = set(cls.__dataclass_fields__)
        unknown = set(params) - known
        if unknown:
            raise ValueError(f"params.json has keys this model does not know: {sorted(unknown)}")
        args = dict(params)
        if args.get("vocab_size", -1) in (-1, None):
            if vocab_size is None:
                raise ValueError("params.json gives vocab_size -1; pass the tokenizer's vocabulary size")
            args["vocab_size"] = vocab_size
        args.update(overrides)
        if isinstance(args.get("rope_scaling"), dict):
            args["rope_scaling"] = RopeScaling(**args["rope_scaling"])
        return cls(**args)

    @classmethod
    def from_json(cls, path: str | Path, vocab_size: int | None = None, **overrides: Any) -> "LlamaConfig":
        return cls.from_params(json.loads(Path(path).read_text()), vocab_size=vocab_size, **overrides)


@dataclass(frozen=True)
class ClipVisionConfig:
    """An OpenAI-style CLIP ViT (what open_clip builds from OpenAI's files). Defaults: ViT-L/14 at 224."""

    image_size: int = 224
    patch_size: int = 14
    width: int = 1024
    layers: int = 24
    heads: int = 16
    mlp_ratio: float = 4.0
    output_dim: int = 768
    mean: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
    std: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)

    @property
    def n_tokens(self) -> int:
        """CLS + one token per patch."""
        return (self.image_size // self.patch_size) ** 2 + 1


@dataclass(frozen=True)
class ResamplerConfig:
    """Learnable queries run with the CLIP tokens through a small ViT; the first outputs are kept."""

    dim: int = 768
    depth: int = 8
    heads: int = 16
    mlp_ratio: float = 4.0
    n_queries: int = 10


GATE_FUNCTIONS = ("tanh", "identity")


@dataclass(frozen=True)
class AdapterConfig:
    """Where the gated prompts go and what else is tuned.

    For layer l the prompt is adapter_query[l] (if l in adapter_layers) + visual tokens (if l in
    visual_layers); each prompted layer has one zero-initialised per-head gate.
    """

    adapter_layers: tuple[int, ...] = ()
    visual_layers: tuple[int, ...] = ()
    prompt_len: int = 10
    bias: bool = True  # zero-init bias on wq, wo, w1, w2, w3
    scale: bool = False  # per-output scale (init 1) on the same linears; the paper has it, the 7B release does not
    lora_rank: int = 0  # 0: no LoRA. The LORA-BIAS checkpoints use 16 on wq, wk, wv, wo, w1, w2, w3
    new_gate: bool = False  # extra scalar gate (init 1) that the LORA-BIAS checkpoints carry
    # How the gate scales the prompt's attention: LLaMA-Adapter's tanh of a per-head parameter, or PEFT
    # AdaptionPrompt's plain value of one parameter per layer (formats/peft.py).
    gate_fn: str = "tanh"  # "tanh" | "identity"
    gate_per_head: bool = True

    def __post_init__(self) -> None:
        if self.gate_fn not in GATE_FUNCTIONS:
            raise ValueError(f"unknown gate function {self.gate_fn!r}; choose one of {', '.join(GATE_FUNCTIONS)}")

    @property
    def prompted_layers(self) -> tuple[int, ...]:
        return tuple(sorted(set(self.adapter_layers) | set(self.visual_layers)))


@dataclass(frozen=True)
class ModelConfig:
    name: str
    llama: LlamaConfig
    clip: ClipVisionConfig = field(default_factory=ClipVisionConfig)
    resampler: ResamplerConfig = field(default_factory=ResamplerConfig)
    adapter: AdapterConfig = field(default_factory=AdapterConfig)
    # The released checkpoints were trained on cv2.imread's BGR pixels normalised with RGB statistics;
    # the official preset reproduces that. Models trained by this project use RGB.
    bgr: bool = False

    def __post_init__(self) -> None:
        n = self.llama.n_layers
        a = self.adapter
        for layer in a.prompted_layers:
            if not 0 <= layer < n:
                raise ValueError(f"prompted layer {layer} is outside 0..{n - 1}")
        if set(a.adapter_layers) & set(a.visual_layers) and a.prompt_len != self.resampler.n_queries:
            raise ValueError(
                "a layer that gets both an adaption prompt and the visual tokens adds them, so prompt_len "
                f"({a.prompt_len}) must equal the number of visual queries ({self.resampler.n_queries})"
            )

    @property
    def has_vision(self) -> bool:
        """Whether the model has CLIP and the resampler: exactly when some layer gets visual tokens.
        Without them (``clip`` and ``resampler`` then describe nothing that is built) it is text-only."""
        return bool(self.adapter.visual_layers)

    def with_llama(self, llama: LlamaConfig) -> "ModelConfig":
        """Same preset on another LLaMA shape (e.g. from params.json); layer sets are re-derived."""
        return build_preset(self.name, llama)

    def with_adapter(self, **changes: Any) -> "ModelConfig":
        return replace(self, adapter=replace(self.adapter, **changes))


def first(k: int) -> tuple[int, ...]:
    return tuple(range(k))


def last(k: int, n_layers: int) -> tuple[int, ...]:
    return tuple(range(n_layers - k, n_layers))


LLAMA_7B = LlamaConfig(dim=4096, n_layers=32, n_heads=32, vocab_size=32000, multiple_of=256, norm_eps=1e-6)
TINY_LLAMA = LlamaConfig(dim=64, n_layers=4, n_heads=4, n_kv_heads=2, vocab_size=512, multiple_of=16, max_seq_len=128)
TINY_CLIP = ClipVisionConfig(image_size=32, patch_size=8, width=64, layers=2, heads=1, output_dim=24)  # OpenAI format: heads = width / 64
TINY_RESAMPLER = ResamplerConfig(dim=24, depth=2, heads=2, n_queries=4)
# The project's own demo model (weights/demo, trained by `python -m multimodal.train demo`): 64 px toy-world
# images, 8 px patches; OpenAI-format CLIP fixes heads = width / 64.
DEMO_LLAMA = LlamaConfig(dim=128, n_layers=4, n_heads=4, vocab_size=800, multiple_of=32)
DEMO_CLIP = ClipVisionConfig(image_size=64, patch_size=8, width=128, layers=4, heads=2, output_dim=64)
DEMO_RESAMPLER = ResamplerConfig(dim=128, depth=2, heads=4, n_queries=8)


def _official(llama: LlamaConfig) -> ModelConfig:
    n = llama.n_layers
    layers = last(n - 1, n)  # layer 0 gets nothing, as in the released code
    return ModelConfig("official-7b", llama, ClipVisionConfig(), ResamplerConfig(),
                       AdapterConfig(adapter_layers=layers, visual_layers=layers, prompt_len=10), bgr=True)


def _v2_early(llama: LlamaConfig) -> ModelConfig:
    n = llama.n_layers
    # The paper's early fusion: visual tokens in the first layer only, adaption prompts in the last
    # n - 1 layers; the two sets are disjoint so their gates train from different data.
    return ModelConfig("v2-early", llama, ClipVisionConfig(), ResamplerConfig(n_queries=10),
                       AdapterConfig(adapter_layers=last(n - 1, n), visual_layers=first(1), prompt_len=10,
                                     scale=True))


def _tiny(llama: LlamaConfig) -> ModelConfig:
    n = llama.n_layers
    layers = last(n - 1, n)
    return ModelConfig("tiny", llama, TINY_CLIP, TINY_RESAMPLER,
                       AdapterConfig(adapter_layers=layers, visual_layers=layers, prompt_len=4))


def _tiny_early(llama: LlamaConfig) -> ModelConfig:
    n = llama.n_layers
    return ModelConfig("tiny-early", llama, TINY_CLIP, TINY_RESAMPLER,
                       AdapterConfig(adapter_layers=last(n - 2, n), visual_layers=first(2), prompt_len=3, scale=True))


def _demo(llama: LlamaConfig) -> ModelConfig:
    n = llama.n_layers
    k = max(1, n // 2)
    # v2-early on the demo's tiny LLaMA: visual tokens in the first half of the layers, adaption prompts in
    # the second half; disjoint, so the gates train from captions and instructions respectively.
    return ModelConfig("demo", llama, DEMO_CLIP, DEMO_RESAMPLER,
                       AdapterConfig(adapter_layers=last(n - k, n), visual_layers=first(k), prompt_len=8, scale=True))


_PRESETS = {
    "official-7b": (_official, LLAMA_7B),
    "v2-early": (_v2_early, LLAMA_7B),
    "tiny": (_tiny, TINY_LLAMA),
    "tiny-early": (_tiny_early, TINY_LLAMA),
    "demo": (_demo, DEMO_LLAMA),
}
PRESETS: tuple[str, ...] = tuple(_PRESETS)


def build_preset(name: str, llama: LlamaConfig | None = None) -> ModelConfig:
    """A named preset, on its default LLaMA shape or on the one given (e.g. read from params.json)."""
    try:
        make, default_llama = _PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}") from None
    return make(llama or default_llama)
