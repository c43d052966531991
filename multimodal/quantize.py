"""Weight-only int8 for the language model, through torchao, so LLaMA-7B fits a 10 GB GPU.

Only the frozen base weights of the LLaMA's linear layers (and the output head) are quantised; the
tuned parts (biases, scales, LoRA, gates, norms), the CLIP tower and the resampler stay in the model
dtype, so adapters can still be swapped and prompts still go through wk/wv. Layers are moved to the
device and quantised one at a time: the 16-bit model never has to fit on the device at once.
"""
from __future__ import annotations

import torch
from torch import nn

from .model import MultimodalLlama

QUANTIZATIONS = ("int8",)


def _int8_config() -> object:
    try:
        from torchao.quantization import Int8WeightOnlyConfig
    except ImportError as e:  # a clear message instead of a bare ImportError deep in loading
        raise RuntimeError("--quantize int8 needs torchao (pip install torchao)") from e
    return Int8WeightOnlyConfig()


def quantize_int8(model: MultimodalLlama, device: torch.device | str) -> MultimodalLlama:
    """Quantise the LLaMA's linear weights to int8 (per output channel), moving the model to
    ``device`` module by module."""
    from torchao.quantization import quantize_

    config = _int8_config()

    def is_base_linear(module: nn.Module, fqn: str) -> bool:
        return isinstance(module, nn.Linear)

    llama = model.llama
    for block in llama.layers:
        block.to(device)
        quantize_(block, config, filter_fn=is_base_linear)
    llama.output.to(device)
    quantize_(llama.output, config, filter_fn=is_base_linear)
    model.to(device)  # embeddings, norms, CLIP, resampler, prompts (small next to the layers)
    llama.reset_rope()
    return model
