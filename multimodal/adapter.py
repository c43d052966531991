"""LLaMA-Adapter V2 pieces that sit on the frozen base: tuned linears, gated prompts, and the one
predicate that decides what is trainable and what an adapter checkpoint holds."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .coded import GroupCodes, coded_linear
from .config import AdapterConfig
from .int4 import Int4Product
from .packing import linear


class AdaptedLinear(nn.Linear):
    """A frozen ``nn.Linear`` weight plus what V2 tunes on it.

    y = scale * (W x + b + B A x). ``b`` starts at zero, ``scale`` at one and the LoRA up-projection
    ``B`` at zero, so a fresh layer computes exactly W x. Subclassing nn.Linear keeps the base weight
    visible to weight-only quantisation libraries that look for nn.Linear.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = False, scale: bool = False,
                 lora_rank: int = 0, device: torch.device | None = None, dtype: torch.dtype | None = None) -> None:
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self._extras = (scale, lora_rank)
        kw = {"device": self.weight.device, "dtype": self.weight.dtype}
        self.scale = nn.Parameter(torch.empty(out_features, **kw)) if scale else None
        self.lora_a = nn.Parameter(torch.empty(lora_rank, in_features, **kw)) if lora_rank else None
        self.lora_b = nn.Parameter(torch.empty(out_features, lora_rank, **kw)) if lora_rank else None
        # the frozen weight as a GGUF file stores it (coded.py), for the compiled decoding step only
        self.register_buffer("codes", None, persistent=False)
        self.register_buffer("code_scale", None, persistent=False)
        self.register_buffer("code_offset", None, persistent=False)
        # the frozen weight's 4-bit codes in PyTorch's int4 kernel layout, for eager decoding (int4.py)
        self.int4: Int4Product | None = None
        self.reset_adapter_parameters()

    def reset_parameters(self) -> None:
        super().reset_parameters()
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def reset_adapter_parameters(self) -> None:
        """Initialise only the tuned parts (the base weight is loaded from a checkpoint)."""
        with torch.no_grad():
            if self.bias is not None:
                self.bias.zero_()
            if self.scale is not None:
                self.scale.fill_(1.0)
            if self.lora_a is not None:
                nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))
                self.lora_b.zero_()

    def set_codes(self, c: GroupCodes) -> None:
        """Keep the frozen weight's codes beside it (same values: coded.py) for compiled steps."""
        if c.codes.shape != self.weight.shape:
            raise ValueError(f"codes of shape {tuple(c.codes.shape)} for a weight of {tuple(self.weight.shape)}")
        device = self.weight.device
        self.codes, self.code_scale = c.codes.to(device), c.scale.to(device)
        self.code_offset = c.offset.to(device) if c.offset is not None else None

    def _from_codes(self, x: torch.Tensor) -> torch.Tensor | None:
        """W x from the file's codes where they serve ``x``: inside a compiled graph (where the expansion
        fuses into the product), or the int4 kernel for a decoding step's row; None: use the weight."""
        if self.codes is not None and torch.compiler.is_compiling():
            return coded_linear(x, self.codes, self.code_scale, self.code_offset)
        if self.int4 is not None and self.int4.serves(x):
            return self.int4(x)[0]
        return None

    def base(self, x: torch.Tensor) -> torch.Tensor:
        """The frozen product W x: from the codes where they serve (_from_codes), else from the weight,
        which may be packed (packing.py)."""
        y = self._from_codes(x)
        return y if y is not None else linear(x, self.weight)

    def finish(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The layer's output from the frozen product ``y`` = W x computed elsewhere (a fused product
        of several layers: coded.CodedProduct): bias, LoRA and scale added as forward does."""
        return self._tuned(x, y if self.bias is None else y + self.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self._from_codes(x)
        if y is not None:
            return self.finish(x, y)
        return self._tuned(x, linear(x, self.weight, self.bias))  # bias inside the product (addmm)

    def _tuned(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if self.lora_a is not None:
            y = y + F.linear(F.linear(x, self.lora_a), self.lora_b)
        if self.scale is not None:
            y = y * self.scale
        return y

    def merge_lora(self) -> bool:
        """Fold LoRA into the frozen weight, for inference: scale * ((W + B A) x + b) is the same map as
        forward's, with two fewer matrix products per call. The sum is taken in fp32 and rounded once
        to the weight's dtype. LoRA's parameters are removed; returns whether there were any."""
        if self.lora_a is None:
            return False
        with torch.no_grad():
            merged = self.weight.float() + self.lora_b.float() @ self.lora_a.float()  # [out, in]
            self.weight.copy_(merged.to(self.weight.dtype))
        self.lora_a = self.lora_b = None
        self._extras = (self._extras[0], 0)
        return True

    def extra_repr(self) -> str:
        scale, rank = self._extras
        return f"{super().extra_repr()}, scale={scale}, lora_rank={rank}"


@dataclass
class PromptKV:
    """Keys, values and gate of one layer's prompt. They do not depend on the text, so they are
    computed once per image and reused for every token."""

    k: torch.Tensor  # [B, n_kv_heads, P, head_dim]
    v: torch.Tensor  # [B, n_kv_heads, P, head_dim]
    gate: torch.Tensor  # [1, n_heads or 1, 1, 1]: what PromptGate gives (tanh(gate) * new_gate)


class PromptGate(nn.Module):
    """Zero-initialised gate of a prompted layer (official names: ``gate``, ``new_gate``).

    LLaMA-Adapter scales each head's prompt attention by tanh(gate[h]) (times ``new_gate`` in the
    LORA-BIAS files); PEFT's AdaptionPrompt by the plain value of one gate per layer
    (``fn="identity"``, ``per_head=False``). Both start at zero, so a fresh adapter changes nothing."""

    def __init__(self, n_heads: int, new_gate: bool, fn: str = "tanh", per_head: bool = True) -> None:
        super().__init__()
        self.fn = fn
        self.gate = nn.Parameter(torch.zeros(1, n_heads if per_head else 1, 1, 1))
        self.new_gate = nn.Parameter(torch.ones(1, 1, 1, 1)) if new_gate else None

    @classmethod
    def for_adapter(cls, n_heads: int, acfg: AdapterConfig) -> "PromptGate":
        return cls(n_heads, acfg.new_gate, acfg.gate_fn, acfg.gate_per_head)

    def reset_adapter_parameters(self) -> None:
        with torch.no_grad():
            self.gate.zero_()
            if self.new_gate is not None:
                self.new_gate.fill_(1.0)

    def forward(self) -> torch.Tensor:
        """The factor on the prompt's attention output: [1, n_heads or 1, 1, 1]."""
        g = torch.tanh(self.gate) if self.fn == "tanh" else self.gate
        return g * self.new_gate if self.new_gate is not None else g

    def extra_repr(self) -> str:
        return f"fn={self.fn}, heads={self.gate.shape[1]}, new_gate={self.new_gate is not None}"


def merge_lora_into_weights(llama: nn.Module) -> int:
    """Fold the LoRA of the language model's linear layers into their weights (AdaptedLinear.merge_lora);
    returns how many were merged. wk and wv keep theirs apart: the prompts' keys and values go through
    the bare wk/wv weights, without LoRA (Attention.prompt_kv). Inference only: merged LoRA can be
    neither trained nor swapped."""
    n = 0
    for name, module in llama.named_modules():
        if isinstance(module, AdaptedLinear) and not name.endswith((".wk", ".wv")):
            n += module.merge_lora()
    return n


# --- what is trained and saved ------------------------------------------------------------------------

_TUNED_SUFFIXES = (".bias", ".scale", ".lora_a", ".lora_b", ".gate", ".new_gate")


def is_trainable(name: str) -> bool:
    """True for every parameter that V2 tunes, and so that an adapter checkpoint stores.

    Frozen: the LLaMA's linear and embedding weights and the whole CLIP tower. Tuned: biases, scales,
    LoRA, gates, RMSNorm weights, adaption prompts and the visual resampler.
    """
    if name.startswith("clip."):
        return False
    if name.startswith(("resampler.", "adapter_query.")):
        return True
    if name.startswith("llama."):
        return name.endswith(_TUNED_SUFFIXES) or name.endswith("norm.weight")
    raise ValueError(f"parameter {name!r} belongs to no known part of the model")


def is_base(name: str) -> bool:
    """True for parameters a base checkpoint (Meta's LLaMA, OpenAI's CLIP) provides. RMSNorm weights
    are both: loaded from Meta's file, then possibly overridden by the adapter."""
    return not is_trainable(name) or (name.startswith("llama.") and name.endswith("norm.weight"))

