"""LLaMA-Adapter V2 for images: the composition of CLIP, the visual resampler, adaption prompts and
the LLaMA. Which layer gets what is configuration (``AdapterConfig``), not code. A configuration
without visual layers builds a text-only model: no CLIP, no resampler."""
from __future__ import annotations

import torch
from torch import nn

from .adapter import PromptGate, PromptKV, is_trainable
from .config import ModelConfig
from .llama import Transformer
from .visual import VisualResampler, build_clip_vision, clip_tokens


class MultimodalLlama(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.config = cfg
        a = cfg.adapter
        self.llama = Transformer(cfg.llama, a)
        if (a.gate_fn, a.gate_per_head) != ("tanh", True):  # e.g. PEFT's plain per-layer gate
            for i in a.prompted_layers:
                self.llama.layers[i].attention.prompt_gate = PromptGate.for_adapter(cfg.llama.n_heads, a)
        self.clip = build_clip_vision(cfg.clip) if cfg.has_vision else None
        self.resampler = VisualResampler(cfg.clip.output_dim, cfg.resampler, cfg.llama.dim) if cfg.has_vision else None
        # rows [i*P, (i+1)*P) are the prompt of the i-th adapter layer, as in the released files
        self.adapter_query = nn.Embedding(len(a.adapter_layers) * a.prompt_len, cfg.llama.dim) if a.adapter_layers else None

    # -- parameters -------------------------------------------------------------------------------
    def reset_adapter_parameters(self) -> None:
        """Initial values of every tuned-only parameter: zero gates, biases and LoRA up-projections,
        unit scales, default-initialised resampler and N(0, 1) adaption prompts."""
        for module in self.modules():
            if module is not self and hasattr(module, "reset_adapter_parameters"):
                module.reset_adapter_parameters()
        if self.adapter_query is not None:
            self.adapter_query.reset_parameters()

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """What an adapter checkpoint holds (our names; see checkpoint.py for the official ones)."""
        return {k: v for k, v in self.state_dict().items() if is_trainable(k)}

    def freeze_base(self) -> None:
        for name, p in self.named_parameters():
            p.requires_grad_(is_trainable(name))

    @property
    def dtype(self) -> torch.dtype:
        return self.llama.output.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.llama.output.weight.device

    # -- image -> prompts ---------------------------------------------------------------------------
    @property
    def has_vision(self) -> bool:
        return self.clip is not None

    def _no_vision(self) -> ValueError:
        return ValueError("this model has no visual encoder: it was loaded without a visual adapter (CLIP and "
                          "resampler), so it answers about text only; ask without an image")

    def encode_image(self, pixels: torch.Tensor | None, batch: int = 1) -> torch.Tensor:
        """Normalised pixels [B, 3, H, W] -> visual tokens [B, Q, dim]. ``None`` stands for "no image":
        an all-zero normalised image (the mean colour), as text-only samples were trained with."""
        if not self.has_vision:
            raise self._no_vision()
        if pixels is None:
            size = self.config.clip.image_size
            pixels = torch.zeros(batch, 3, size, size, device=self.device, dtype=self.dtype)
        return self.resampler(clip_tokens(self.clip, pixels.to(self.device)))

    def layer_prompts(self, visual: torch.Tensor | None, batch: int = 1) -> dict[int, torch.Tensor]:
        """Per prompted layer: its adaption prompt (if an adapter layer) + the visual tokens (if a visual
        layer), each [B, P, dim]. ``visual`` None (a text-only model): the adaption prompts alone."""
        a = self.config.adapter
        b = visual.shape[0] if visual is not None else batch
        prompts: dict[int, torch.Tensor] = {}
        if self.adapter_query is not None:
            rows = self.adapter_query.weight.view(len(a.adapter_layers), a.prompt_len, -1)  # [L, P, dim]
            for i, layer in enumerate(a.adapter_layers):
                prompts[layer] = rows[i].expand(b, -1, -1)
        if visual is not None:
            for layer in a.visual_layers:
                prompts[layer] = prompts[layer] + visual if layer in prompts else visual
        return prompts

    def prompt_kv(self, pixels: torch.Tensor | None, batch: int = 1) -> list[PromptKV | None]:
        """Everything image-dependent, computed once per image and reused for every token. A text-only
        model refuses pixels and, given None, returns its adaption prompts alone (None where a layer
        has none)."""
        if not self.has_vision:
            if pixels is not None:
                raise self._no_vision()
            return self.llama.prompt_kv(self.layer_prompts(None, batch))
        return self.llama.prompt_kv(self.layer_prompts(self.encode_image(pixels, batch)))

    def forward(self, tokens: torch.Tensor, pixels: torch.Tensor | None = None,
                prompts: list[PromptKV | None] | None = None, start_pos: int = 0,
                last_only: bool = False) -> torch.Tensor:
        """Logits for ``tokens`` [B, S]. Pass ``prompts`` (from :meth:`prompt_kv`) when decoding with the
        KV cache so the image is not re-encoded; otherwise they are computed from ``pixels``."""
        if prompts is None:
            prompts = self.prompt_kv(pixels, batch=tokens.shape[0])
        return self.llama(tokens, start_pos=start_pos, prompts=prompts, last_only=last_only)
