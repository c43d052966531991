"""Language-model weights prepacked for oneDNN, for 16-bit decoding on the CPU.

Decoding one token at batch 1 is one matrix-vector product per linear layer, so its speed is the
speed at which the weights stream from memory. PyTorch's default bfloat16 CPU matmul falls well
short of that: on the 2-core development machine it reads bf16 weights at about 17 GB/s, while a
float32 matmul reads at about 30 GB/s, which makes bf16 no faster than float32 although it moves
half the bytes. The same product on weights reordered once into oneDNN's blocked layout (what
``torch.compile``'s CPU backend does to frozen weights) reads them at about 23 GB/s. At the 1B shape
bf16 decoding goes from 6.8 to 9.6 tok/s, 1.31x transformers' in the same run (docs/performance.md).
The results equal the plain matmul's up to summation order.

Packing is for inference only: it replaces the frozen ``weight`` of every :class:`AdaptedLinear` of
the language model (the output head included) with its packed copy, which takes the same memory.
Biases, scales and LoRA stay ordinary tensors, so adapters can still be swapped. Only bfloat16 on a
CPU that oneDNN runs bf16 on is packed: for float32 and float16 the packed product measured slower.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def _ops_present() -> bool:
    ops = torch.ops.mkldnn
    return all(hasattr(ops, name) for name in ("_reorder_linear_weight", "_linear_pointwise", "_is_mkldnn_bf16_supported"))


def can_pack(device: torch.device | str, dtype: torch.dtype) -> bool:
    """True where packed weights work: bfloat16 on the CPU of a PyTorch built with oneDNN."""
    if torch.device(device).type != "cpu" or dtype != torch.bfloat16:
        return False
    return torch.backends.mkldnn.is_available() and _ops_present()


def packing_pays(device: torch.device | str, dtype: torch.dtype) -> bool:
    """True where packing makes decoding faster: also a CPU that oneDNN runs bf16 on natively
    (avx512_bf16 or AMX); elsewhere oneDNN would fall back to slower kernels."""
    return can_pack(device, dtype) and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear`` that also takes a packed weight. x: [..., in] -> [..., out]."""
    if weight.is_mkldnn:
        return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")
    return F.linear(x, weight, bias)


def pack_language_model(llama: nn.Module, batch_hint: int = 1) -> int:
    """Pack every frozen linear weight of ``llama`` in place; returns how many were packed.

    ``batch_hint`` is the number of rows oneDNN tunes the layout for: 1, the decoding step (prefill,
    with many rows, measured the same either way). Weights must be bfloat16 on the CPU and frozen.
    Use :func:`packing_pays` to decide whether to.
    """
    from .adapter import AdaptedLinear  # adapter.py calls linear() from here

    n = 0
    for name, module in llama.named_modules():
        if not isinstance(module, AdaptedLinear) or module.weight.is_mkldnn:
            continue
        w = module.weight
        if not can_pack(w.device, w.dtype):
            raise ValueError(f"{name}.weight is {w.dtype} on {w.device}: packing needs bfloat16 on the CPU "
                             "and a PyTorch built with oneDNN")
        if w.requires_grad:
            raise ValueError(f"{name}.weight requires grad: packed weights are for inference only")
        packed = torch.ops.mkldnn._reorder_linear_weight(w.detach(), batch_hint)  # same [out, in], blocked layout
        module.weight = nn.Parameter(packed, requires_grad=False)
        n += 1
    return n


def unpack_language_model(llama: nn.Module) -> int:
    """Undo :func:`pack_language_model` (e.g. before training or quantising); returns how many."""
    from .adapter import AdaptedLinear

    n = 0
    for module in llama.modules():
        if isinstance(module, AdaptedLinear) and module.weight.is_mkldnn:
            module.weight = nn.Parameter(module.weight.to_dense(), requires_grad=False)
            n += 1
    return n
