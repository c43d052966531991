"""A GGUF file's 4- and 8-bit weights kept as they are stored, for a compiled float32 decoding step.

SmolLM2's GGUF holds its linear weights as Q4_1 blocks: 32 weights share a float16 scale ``d`` and
offset ``m``, each weight a 4-bit code ``q``, and the weight is ``d * q + m``. Dequantized to float32
they take 4 bytes each and one decoding step reads all 540 MB of them; kept as one byte per code
plus the block's two numbers (float16 in the file, float32 here) it reads 1.25 bytes per weight. :func:`coded_linear` computes
the product from the codes in float32 (the weights it uses are exactly the file's, the sums are
float32 sums in another order than BLAS's), written so that ``torch.compile``'s CPU backend turns
each product into one loop that expands the codes in registers and never writes a float32 weight to
memory. Only the compiled step uses the codes: eager code (prefill, tests) keeps the dense float32
weights loaded beside them, which BLAS multiplies faster when many tokens come at once.

Formats (ggml's block layouts, 32 weights per block, the block's float16 numbers first):

- Q4_0: ``d``, 16 bytes of codes; weight ``d * (q - 8)``. Kept as signed codes ``q - 8``, no offset.
- Q4_1: ``d``, ``m``, 16 bytes of codes; weight ``d * q + m``.
- Q8_0: ``d``, 32 signed bytes; weight ``d * q``.

In a 4-bit block, byte ``j`` holds weight ``j`` in its low nibble and weight ``j + 16`` in its high one.
Other types (K-quants, F16, ...) have no codes here: those layers use their dense weights.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from gguf import GGMLQuantizationType as QT

GROUP = 32  # weights per block in every format read here
_BLOCK_BYTES = {QT.Q4_0: 18, QT.Q4_1: 20, QT.Q8_0: 34}
CODED_TYPES = frozenset(_BLOCK_BYTES)


@dataclass
class GroupCodes:
    """One weight matrix as codes with a scale (and maybe an offset) per group of 32 along a row."""
    codes: torch.Tensor  # [out, in] int8 or uint8
    scale: torch.Tensor  # [out, in // GROUP] float32 (the file's float16 values)
    offset: torch.Tensor | None  # [out, in // GROUP] float32, or None (symmetric formats)
    bits: int = 8  # 4 (Q4_0, Q4_1: codes -8..7 or 0..15) or 8 (Q8_0)

    def dequantize(self) -> torch.Tensor:
        """The float32 weight [out, in] the codes stand for."""
        return expand(self.codes, self.scale, self.offset)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.codes, self.scale, self.offset) if t is not None)


def read_codes(data: np.ndarray, kind: QT, shape: tuple[int, int]) -> GroupCodes | None:
    """Codes of one GGUF tensor: ``data`` is gguf's reader view ([rows, bytes per row] uint8), ``shape``
    ours ([out, in]). None for a type without codes here."""
    if kind not in _BLOCK_BYTES:
        return None
    out, inp = shape
    if inp % GROUP:
        raise ValueError(f"a row of {inp} weights is not a whole number of {GROUP}-weight blocks")
    blocks = np.ascontiguousarray(data).reshape(out, inp // GROUP, _BLOCK_BYTES[kind])  # [out, groups, bytes]
    # float16 in the file, float32 here (exact): the compiled loop vectorises float32 loads, not float16
    scale = torch.from_numpy(blocks[..., 0:2].copy().view(np.float16)[..., 0].astype(np.float32))  # [out, groups]
    offset = None
    if kind == QT.Q8_0:
        codes = torch.from_numpy(blocks[..., 2:].copy().view(np.int8))  # [out, groups, 32]
    else:
        first = 4 if kind == QT.Q4_1 else 2
        packed = blocks[..., first:]  # [out, groups, 16]
        nibbles = np.concatenate([packed & 0x0F, packed >> 4], axis=-1)  # weights j, then j + 16
        if kind == QT.Q4_1:
            offset = torch.from_numpy(blocks[..., 2:4].copy().view(np.float16)[..., 0].astype(np.float32))
            codes = torch.from_numpy(nibbles)  # uint8, 0..15
        else:
            codes = torch.from_numpy(nibbles.astype(np.int8) - 8)  # int8, -8..7
    return GroupCodes(codes.reshape(out, inp).contiguous(), scale.contiguous(),
                      None if offset is None else offset.contiguous(), bits=8 if kind == QT.Q8_0 else 4)


def expand(codes: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor | None) -> torch.Tensor:
    """Float32 weights [out, in] from codes [out, in] and per-group scale/offset [out, in // GROUP]."""
    out, inp = codes.shape
    w = codes.view(out, inp // GROUP, GROUP).float() * scale.float()[..., None]  # [out, groups, 32]
    if offset is not None:
        w = w + offset.float()[..., None]
    return w.view(out, inp)


def coded_linear(x: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor,
                 offset: torch.Tensor | None) -> torch.Tensor:
    """x [..., in] @ W^T in float32 -> [..., out] in x's dtype, W given by its codes.

    Written as a broadcast multiply and a sum rather than a matmul: under ``torch.compile`` the
    expansion fuses into the reduction (one loop over the codes per output row, vectorised along the
    row), where a matmul would make inductor write the whole float32 weight first. For a few rows (a
    decoding step, a small batch) that loop is what bounds the step: reading the codes. Eagerly it
    would materialise [..., out, in]: use the dense weight there."""
    w = expand(codes, scale, offset)  # [out, in], fused away when compiled
    return (x.float()[..., None, :] * w).sum(-1).to(x.dtype)  # [..., out, in] -> [..., out]


class CodedProduct(nn.Module):
    """The codes of layers that read the same input (q, k and v; gate and up) stacked row-wise: one
    compiled product for all of them instead of one each, which saves a pass over the input and a
    parallel region per layer (about a tenth of a SmolLM2 step). Each layer's own codes become views
    of its rows here, so nothing is stored twice."""

    def __init__(self, parts: list[nn.Module]) -> None:
        super().__init__()
        self.sizes = [int(p.codes.shape[0]) for p in parts]
        self.register_buffer("codes", torch.cat([p.codes for p in parts]), persistent=False)  # [sum out, in]
        self.register_buffer("scale", torch.cat([p.code_scale for p in parts]), persistent=False)
        offsets = [p.code_offset for p in parts]
        self.register_buffer("offset", None if offsets[0] is None else torch.cat(offsets), persistent=False)
        row = 0
        for p, n in zip(parts, self.sizes):
            p.codes, p.code_scale = self.codes[row:row + n], self.scale[row:row + n]
            p.code_offset = None if self.offset is None else self.offset[row:row + n]
            row += n

    @staticmethod
    def fits(parts: list[nn.Module]) -> bool:
        """Whether the layers' codes can be stacked: all present, one code type, offsets in all or none."""
        if any(p.codes is None for p in parts):
            return False
        return len({p.codes.dtype for p in parts}) == 1 and len({p.code_offset is None for p in parts}) == 1

    def serves(self, x: torch.Tensor) -> bool:
        """Only inside a compiled graph: eagerly the expansion would materialise every weight."""
        return torch.compiler.is_compiling()

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """x [..., in] -> each layer's bare product W x, [..., out_i] (no bias: AdaptedLinear.finish)."""
        return list(coded_linear(x, self.codes, self.scale, self.offset).split(self.sizes, dim=-1))


def attach_codes(llama: torch.nn.Module, codes_of: Callable[[str], GroupCodes | None]) -> int:
    """Give every linear layer of ``llama`` whose file weight has codes those codes (beside its dense
    weight), and each block one stacked product for q/k/v and one for gate/up where their codes
    stack; ``codes_of`` maps our weight names ("layers.0.attention.wq.weight") to codes. Returns
    how many layers got codes. A layer whose weight no longer is the file's (LoRA folded in) is refused."""
    from .adapter import AdaptedLinear

    n = 0
    for name, module in llama.named_modules():
        if not isinstance(module, AdaptedLinear):
            continue
        if module.lora_a is not None or module.weight.is_mkldnn:
            raise ValueError(f"{name} has LoRA or packed weights: codes stand for the file's plain weight only")
        c = codes_of(f"{name}.weight")
        if c is not None:
            module.set_codes(c)
            n += 1
    for block in getattr(llama, "layers", ()):
        attn, ffn = block.attention, block.feed_forward
        if CodedProduct.fits([attn.wq, attn.wk, attn.wv]):
            attn.fused_qkv = CodedProduct([attn.wq, attn.wk, attn.wv])
        if CodedProduct.fits([ffn.w1, ffn.w3]):
            ffn.fused_w13 = CodedProduct([ffn.w1, ffn.w3])
    return n
