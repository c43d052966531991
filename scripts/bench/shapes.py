"""Benchmark shapes and dtypes, their model configs and parameter counts, and seeded random weights."""
from __future__ import annotations

import zlib
from dataclasses import replace

import torch

from multimodal.config import DEMO_LLAMA, LLAMA_7B, TINY_LLAMA, LlamaConfig, ModelConfig, build_preset

SHAPES = ("tiny", "demo", "1b", "7b")
DEMO_LORA_RANK = 8  # weights/demo's adapter.pth has rank-8 LoRA (multimodal.train.demo.DemoPlan.lora_rank)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
CHUNK = 1 << 24  # elements filled per normal_ call: bounds any temporary the RNG may need

# A LLaMA-style 1B (TinyLlama's shape): 2048 wide, 22 layers, grouped-query attention with 4 KV heads;
# multiple_of 256 rounds 2/3 * 4 * 2048 = 5461 up to the usual 5632 FFN width.
LLAMA_1B = LlamaConfig(dim=2048, n_layers=22, n_heads=32, n_kv_heads=4, vocab_size=32000, multiple_of=256,
                       norm_eps=1e-5)


# --- configuration ------------------------------------------------------------------------------------


def model_config(shape: str, max_seq_len: int) -> ModelConfig:
    """tiny: the "tiny" preset. demo: the demo model's layout (weights/demo) with its rank-8 LoRA. 1b and
    7b: the official-7b layout (adapter + visual prompts in every layer but the first, ViT-L/14,
    10-query resampler), re-derived by the preset for the LLaMA shape."""
    if shape == "tiny":
        return build_preset("tiny", replace(TINY_LLAMA, max_seq_len=max_seq_len))
    if shape == "demo":
        cfg = build_preset("demo", replace(DEMO_LLAMA, max_seq_len=max_seq_len))
        return cfg.with_adapter(lora_rank=DEMO_LORA_RANK, new_gate=True)  # as load_model reads the file
    llama = LLAMA_1B if shape == "1b" else LLAMA_7B
    return build_preset("official-7b", replace(llama, max_seq_len=max_seq_len))


def count_params(cfg: ModelConfig) -> dict[str, int]:
    """Parameter counts per part, from a model built on the meta device (allocates nothing)."""
    from multimodal.model import MultimodalLlama

    with torch.device("meta"):
        model = MultimodalLlama(cfg)
    counts = {"llama": 0, "clip": 0, "adapter": 0, "llama_embedding": model.llama.tok_embeddings.weight.numel()}
    for name, p in model.named_parameters():
        part = name.split(".", 1)[0]
        counts[part if part in ("llama", "clip") else "adapter"] += p.numel()
    return counts


# --- random weights -----------------------------------------------------------------------------------


def _std(name: str) -> float:
    """Token embeddings N(0, 1) so that the token identity is not drowned by the layers' outputs (as in
    the tests' tiny models); every matrix N(0, 0.02), the usual LLaMA/CLIP init scale."""
    return 1.0 if name.endswith("tok_embeddings.weight") else 0.02


def fill_base_tensor(t: torch.Tensor, name: str, seed: int) -> None:
    """Fill one base tensor in place, in its own dtype and device, from a generator seeded by (seed, name).

    The generator depends only on the name, so the two worker processes (and the HF copy, which is
    the same tensor with permuted rows) get identical values. Chunks keep any temporary small: a 7B
    model is never materialised in fp32.
    """
    g = torch.Generator(device=t.device).manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
    flat = t.view(-1)
    if name.endswith("bias"):
        flat.zero_()
        return
    mean = 1.0 if t.dim() == 1 and name.endswith("weight") else 0.0  # RMSNorm / LayerNorm gains near 1
    std = 0.02 if mean else _std(name)
    for chunk in flat.split(CHUNK):
        chunk.normal_(mean, std, generator=g)


def fill_base_weights(model: torch.nn.Module, seed: int) -> None:
    """Random LLaMA and CLIP weights; the tuned parameters keep the init that ``build_empty`` gave them
    (zero gates and biases), so the model starts as the plain LLaMA."""
    from multimodal.adapter import is_base

    with torch.no_grad():
        for name, p in model.named_parameters():
            if is_base(name):  # includes the RMSNorm gains, which a base checkpoint provides
                fill_base_tensor(p, name.removeprefix("llama."), seed)  # Meta's names, as build_hf uses


def open_gates(model: torch.nn.Module, value: float) -> int:
    """Set every prompted layer's gate so the adaption prompts and visual tokens change the output."""
    n = 0
    with torch.no_grad():
        for layer in model.llama.layers:
            gate = layer.attention.prompt_gate
            if gate is not None:
                gate.gate.fill_(value)
                n += 1
    return n
