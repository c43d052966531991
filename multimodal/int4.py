"""A GGUF file's 4-bit weights multiplied as they are stored, for bfloat16 decoding on a CPU.

A decoding step at batch 1 multiplies one row by every weight matrix, so it reads every weight once.
SmolLM2-135M's linear layers hold 106M weights: 212 MB a step in bfloat16, where the file stores them
as Q4_1 codes in about a quarter of that. PyTorch has a CPU kernel for exactly this product,
``aten._weight_int4pack_mm_for_cpu`` (weight-only int4 decoding): codes packed two to a byte, a scale
and a zero per group of 32 weights along a row, bfloat16 activations and results. On the project's
2-core AMD EPYC, SmolLM2 decoded 1.46x as fast as from the dense packed bfloat16 weights (55.5 against
38.0 tok/s, same run; docs/performance.md, "Decoding from the file's 4-bit codes").

The file's formats map onto the kernel's without touching a code. The kernel's weight is
``(q - 8) * scale + zero`` with q in 0..15, so

- Q4_1 (weight ``d * q + m``): scale ``d``, zero ``m + 8 * d``;
- Q4_0 (weight ``d * (q - 8)``; coded.py keeps the signed ``q - 8``): scale ``d``, zero 0.

Only the group's scale and zero are rounded, to bfloat16 (the kernel takes them in the activations'
dtype), where the dense bfloat16 path rounds every weight instead; docs/performance.md gives the
change in logits against float32 and the development-set score.

The kernel pays for products of one or two rows (decoding); with more rows it falls behind the dense
packed product (packing.py), so prefill keeps the dense weights, which stay loaded beside the codes.
The layers that read the same input (q, k and v; gate and up) are stacked into one product each.
Q8_0 tensors (SmolLM2's tied embedding and output head) have no 4-bit form and stay dense.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from .coded import GROUP, GroupCodes

MAX_ROWS = 2  # products of at most this many rows use the codes; more rows (prefill) the dense weight
_PACK, _MM = "_convert_weight_to_int4pack_for_cpu", "_weight_int4pack_mm_for_cpu"


def int4_available(device: torch.device | str, dtype: torch.dtype) -> bool:
    """Whether the int4 kernel serves a model of this device and dtype: bfloat16 on the CPU."""
    ops = torch.ops.aten
    return (torch.device(device).type == "cpu" and dtype == torch.bfloat16
            and hasattr(ops, _PACK) and hasattr(ops, _MM))


def kernel_form(c: GroupCodes) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A 4-bit matrix's codes in the kernel's terms: q [out, in] int32 in 0..15 and scale, zero
    [out, in // GROUP] float32, with weight = (q - 8) * scale + zero."""
    if c.bits != 4:
        raise ValueError(f"{c.bits}-bit codes have no int4 form")
    if c.offset is None:  # Q4_0: signed codes q - 8, no offset
        return c.codes.int() + 8, c.scale.float(), torch.zeros_like(c.scale, dtype=torch.float32)
    return c.codes.int(), c.scale.float(), c.offset.float() + 8 * c.scale.float()


class Int4Product(nn.Module):
    """The bare products W x of one or more layers that read the same input, from their 4-bit codes:
    the layers' rows stacked into one matrix, one kernel call for all of them."""

    def __init__(self, parts: list[GroupCodes], dtype: torch.dtype = torch.bfloat16) -> None:
        super().__init__()
        if not self.fits(parts):
            raise ValueError("Int4Product needs 4-bit codes of one input width")
        self.sizes = [int(c.codes.shape[0]) for c in parts]
        q, scale, zero = (torch.cat(t) for t in zip(*(kernel_form(c) for c in parts)))  # [sum out, in], [sum out, groups] x 2
        packed = getattr(torch.ops.aten, _PACK)(q.contiguous(), 1)  # [sum out, in // 2] uint8, the kernel's layout
        scales_zeros = torch.stack([scale, zero], dim=-1).transpose(0, 1)  # [groups, sum out, 2]
        self.register_buffer("packed", packed, persistent=False)
        self.register_buffer("scales_zeros", scales_zeros.contiguous().to(dtype), persistent=False)
        self._mm = getattr(torch.ops.aten, _MM)  # looked up once: forward runs 120 times a SmolLM2 step

    @staticmethod
    def fits(parts: list[GroupCodes | None]) -> bool:
        """Whether these codes can be one product: all present, 4-bit, the same input width."""
        return (bool(parts) and all(c is not None and c.bits == 4 for c in parts)
                and len({int(c.codes.shape[1]) for c in parts}) == 1)

    def serves(self, x: torch.Tensor) -> bool:
        """Whether this product is the faster one for ``x`` [..., in]: eager (a compiled graph reads
        coded.py's float32 codes), on the CPU, in the kernel's dtype, at most MAX_ROWS rows."""
        return (x.dtype == self.scales_zeros.dtype and x.device.type == "cpu"
                and x.numel() <= MAX_ROWS * x.shape[-1] and not torch.compiler.is_compiling())

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """x [..., in] -> each layer's W x, [..., out_i] (no bias: AdaptedLinear.finish adds it)."""
        rows = x.reshape(-1, x.shape[-1])  # [..., in] -> [rows, in]
        y = self._mm(rows, self.packed, GROUP, self.scales_zeros)  # [rows, sum out]
        return list(y.view(*x.shape[:-1], y.shape[-1]).split(self.sizes, dim=-1))

    def extra_repr(self) -> str:
        return f"sizes={self.sizes}, in={self.packed.shape[1] * 2}"


def attach_int4(llama: nn.Module, codes_of: Callable[[str], GroupCodes | None]) -> int:
    """Give the linear layers of ``llama`` whose file weight is 4-bit an int4 product for decoding:
    q/k/v stacked in ``attention.int4_qkv`` and gate/up in ``feed_forward.int4_w13`` when all of them
    qualify, each other layer its own ``int4``. A layer with LoRA is left dense (merged LoRA changes
    the weight; unmerged LoRA is rare on a CPU and keeps the plain path). Returns how many layers got
    codes. ``codes_of`` maps our weight names ("layers.0.attention.wq.weight") to codes."""
    from .adapter import AdaptedLinear

    def read(name: str, module: AdaptedLinear) -> GroupCodes | None:
        c = None if module.lora_a is not None else codes_of(f"{name}.weight")
        if c is None or c.bits != 4:
            return None
        if tuple(c.codes.shape) != tuple(module.weight.shape):
            raise ValueError(f"{name}: codes of shape {tuple(c.codes.shape)} for a weight of {tuple(module.weight.shape)}")
        return c

    dtype = llama.tok_embeddings.weight.dtype
    blocks = [(f"layers.{i}.", block) for i, block in enumerate(getattr(llama, "layers", ()))]
    for prefix, scope in [*blocks, ("", llama)]:  # block by block (each file tensor read once, a block's at a time)
        codes = {name: read(prefix + name, m) for name, m in scope.named_modules()
                 if isinstance(m, AdaptedLinear) and (scope is not llama or not name.startswith("layers."))}
        if scope is not llama:
            for part, attr, names in (("attention", "int4_qkv", ("wq", "wk", "wv")),
                                      ("feed_forward", "int4_w13", ("w1", "w3"))):
                stack = [f"{part}.{m}" for m in names]
                if Int4Product.fits([codes[k] for k in stack]):
                    setattr(getattr(scope, part), attr, Int4Product([codes.pop(k) for k in stack], dtype))
        for name, c in codes.items():  # the layers not stacked
            if c is not None:
                scope.get_submodule(name).int4 = Int4Product([c], dtype)
    return sum(len(p.sizes) for p in llama.modules() if isinstance(p, Int4Product))


def first_serving(x: torch.Tensor, *products: nn.Module | None) -> nn.Module | None:
    """The first of the stacked products given (coded.CodedProduct, Int4Product, or None) that serves
    ``x``, or None: the layers then multiply one by one."""
    for p in products:
        if p is not None and p.serves(x):
            return p
    return None
