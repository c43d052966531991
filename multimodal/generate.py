"""Streaming generation: greedy / temperature / top-p, stop at EOS, seed, cancel between tokens.

Per request the image is encoded and every layer's prompt keys/values computed once; the prompt is
prefilled in one pass; then each step feeds one token through the KV cache. The only host-device sync
per token is reading the sampled id, which streaming and the EOS check need anyway.
"""
from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import nullcontext
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from PIL import Image

from .adapter import PromptKV
from .loading import LoadedModel
from .tokenizer import StreamDecoder

if TYPE_CHECKING:
    from .swap import AdapterSwap


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int = 256
    temperature: float = 0.1  # 0: greedy
    top_p: float = 0.75
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError("max_new_tokens must be at least 1")
        if self.temperature < 0 or not 0 < self.top_p <= 1:
            raise ValueError("temperature must be >= 0 and top_p in (0, 1]")


@dataclass
class GenerationStats:
    prompt_tokens: int = 0
    new_tokens: int = 0
    first_token_s: float = 0.0  # request start -> first token sampled (image encode + prefill)
    total_s: float = 0.0
    stop_reason: str = ""  # "eos", "length" or "cancelled"

    @property
    def tokens_per_s(self) -> float:
        decode_s = self.total_s - self.first_token_s
        return (self.new_tokens - 1) / decode_s if self.new_tokens > 1 and decode_s > 0 else 0.0


class PromptTooLongError(ValueError):
    pass


def sample(logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator | None) -> torch.Tensor:
    """Next token ids [B] from float logits [B, V]; stays on the device."""
    if temperature <= 0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits / temperature, dim=-1)
    if top_p < 1.0:
        # nucleus: keep the smallest set of most likely tokens whose mass reaches top_p
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        outside = sorted_probs.cumsum(dim=-1) - sorted_probs > top_p
        sorted_probs = sorted_probs.masked_fill(outside, 0.0)
        choice = torch.multinomial(sorted_probs, 1, generator=generator)  # renormalises implicitly
        return order.gather(-1, choice).squeeze(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


class Engine:
    """One loaded model serving requests one at a time (a lock guards the shared KV cache)."""

    def __init__(self, loaded: LoadedModel) -> None:
        self.loaded = loaded
        self.model = loaded.model
        self.tokenizer = loaded.tokenizer
        self._lock = threading.Lock()
        self.model.llama.setup_cache(batch=1)

    @property
    def max_seq_len(self) -> int:
        return self.model.config.llama.max_seq_len

    def pixels(self, image: Image.Image | None) -> torch.Tensor | None:
        if image is None:
            return None
        return self.loaded.preprocess(image)[None].to(self.model.device, self.model.dtype)  # [1, 3, H, W]

    @torch.inference_mode()
    def image_prompts(self, image: Image.Image | None) -> list[PromptKV | None]:
        """Visual tokens and every layer's prompt K/V for one image (None: no image)."""
        return self.model.prompt_kv(self.pixels(image))

    def stream(self, prompt: str | list[int], image: Image.Image | None = None,
               params: SamplingParams = SamplingParams(), cancel: threading.Event | None = None,
               stats: GenerationStats | None = None, prompts: list[PromptKV | None] | None = None,
               adapter: "AdapterSwap | None" = None) -> Iterator[str]:
        """Yield text pieces as tokens are decoded. ``prompts`` may carry precomputed image prompts
        (for the adapter in use); ``adapter`` swaps another adapter in for this request only."""
        ids = self.tokenizer.encode(prompt, bos=True) if isinstance(prompt, str) else list(prompt)
        room = self.max_seq_len - len(ids)
        if room < 1:
            raise PromptTooLongError(f"the prompt has {len(ids)} tokens; the model's context holds {self.max_seq_len}")
        stats = stats if stats is not None else GenerationStats()
        stats.prompt_tokens = len(ids)
        decoder = StreamDecoder(self.tokenizer)
        with self._lock, (adapter.applied() if adapter is not None else nullcontext()):
            for token in self._tokens(ids, image, prompts, min(params.max_new_tokens, room), params, cancel, stats):
                piece = decoder.push(token)
                if piece:
                    yield piece
            tail = decoder.flush()
            if tail:
                yield tail

    def complete(self, prompt: str | list[int], image: Image.Image | None = None,
                 params: SamplingParams = SamplingParams(), stats: GenerationStats | None = None) -> str:
        return "".join(self.stream(prompt, image, params, stats=stats))

    @torch.inference_mode()
    def _tokens(self, ids: list[int], image: Image.Image | None, prompts: list[PromptKV | None] | None,
                max_new: int, params: SamplingParams, cancel: threading.Event | None,
                stats: GenerationStats) -> Iterator[int]:
        start = time.perf_counter()
        device = self.model.device
        generator = None
        if params.seed is not None:
            generator = torch.Generator(device=device).manual_seed(params.seed)
        if prompts is None:
            prompts = self.image_prompts(image)
        llama = self.model.llama
        logits = llama(torch.tensor([ids], device=device), start_pos=0, prompts=prompts, last_only=True)
        pos = len(ids)
        stats.stop_reason = "length"
        for step in range(max_new):
            if cancel is not None and cancel.is_set():
                stats.stop_reason = "cancelled"
                break
            token = sample(logits, params.temperature, params.top_p, generator)  # [1], on device
            token_id = int(token.item())
            if step == 0:
                stats.first_token_s = time.perf_counter() - start
            if token_id == self.tokenizer.eos_id:
                stats.stop_reason = "eos"
                break
            stats.new_tokens += 1
            stats.total_s = time.perf_counter() - start
            yield token_id
            if step + 1 < max_new:
                logits = llama(token.view(1, 1), start_pos=pos, prompts=prompts, last_only=True)
                pos += 1
        stats.total_s = time.perf_counter() - start
