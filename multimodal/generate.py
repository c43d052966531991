"""Streaming generation: greedy / temperature / top-p, stop at EOS, seed, cancel between tokens.

Per image the visual tokens and every layer's prompt keys/values are computed once (and kept in a
small LRU, so follow-up turns about the same image reuse them); the prompt is prefilled in one pass,
starting after the longest prefix whose keys/values are already in the cache from the previous
request; then each step feeds one token through the KV cache. The only host-device sync per token is
reading the sampled id, which streaming and the EOS check need anyway.
"""
from __future__ import annotations

import hashlib
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextlib import nullcontext
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from PIL import Image

from .adapter import PromptKV
from .card import ModelCard
from .loading import LoadedModel
from .prompt import prompt_format
from .threads import MEASURE_MAX_WEIGHT_BYTES, fastest, seconds_per_step, use_threads
from .tokenizer import StreamDecoder

if TYPE_CHECKING:
    from .llama import Transformer
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
    reused_tokens: int = 0  # prompt tokens whose keys/values were already cached (not prefilled again)

    @property
    def decode_steps(self) -> int:
        """Decoding steps after the first token: one per further token, plus the step that produced
        the end-of-answer token (decoded like any other, though not part of the answer)."""
        return max(0, self.new_tokens - 1) + (1 if self.stop_reason == "eos" and self.new_tokens else 0)

    @property
    def tokens_per_s(self) -> float:
        """Decoding speed: steps after the first token over the time they took (the first token's
        time is prefill, reported as first_token_s). 0.0 only when no step was decoded."""
        decode_s = self.total_s - self.first_token_s
        return self.decode_steps / decode_s if self.decode_steps and decode_s > 0 else 0.0


class PromptTooLongError(ValueError):
    pass


def draw(probs: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """One id per row of probs [B, V], with probability proportional to it. argmax(p / E) with E ~ Exp(1)
    is an exact draw (the exponential race), and unlike ``torch.multinomial`` it never makes the host
    wait for the device: on CUDA the token loop stays free of synchronisation."""
    noise = torch.empty_like(probs).exponential_(1.0, generator=generator)
    return (probs / noise).argmax(dim=-1)


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
        choice = draw(sorted_probs, generator)  # [B]; needs no renormalising
        return order.gather(-1, choice[:, None]).squeeze(-1)
    return draw(probs, generator)


def compile_step(llama: Transformer) -> Callable[..., torch.Tensor]:
    """``llama.step`` through torch.compile: one graph for every position (fixed shapes, but for the
    length of ``visible`` when the caller marks it dynamic: :class:`StepRunner`), replayed as a CUDA
    graph on a GPU ("reduce-overhead"). Needs plain weights: inductor picks its own CPU kernels (and
    reads GGUF codes where the model keeps them: coded.py).

    Guards on the model's modules are skipped: after loading nothing changes a module's structure,
    and checking a few hundred parameters before every call costs about 2 ms a token on a CPU, as
    much as a tenth of a SmolLM2 step. Parameters are still read at each call, so an adapter swapped
    in (swap.py exchanges tensor data) is seen."""
    if any(p.is_mkldnn for p in llama.parameters()):
        raise ValueError("compile needs plain weights: load the model with pack=False "
                         "(inductor chooses its own CPU kernels)")
    mode = "reduce-overhead" if llama.output.weight.device.type == "cuda" else None
    options = {"guard_filter_fn": torch.compiler.skip_guard_on_all_nn_modules_unsafe}
    return torch.compile(llama.step, fullgraph=True, dynamic=False, mode=mode, options=options)


VISIBLE_BLOCK = 128  # a CPU decoding step attends over the cache's first multiple of this many positions


def visible_length(pos: int, max_seq_len: int) -> int:
    """How many cache positions a step at ``pos`` attends over: pos + 1 rounded up to VISIBLE_BLOCK, at
    most the context (few distinct lengths: one dynamic-length graph serves them all)."""
    return min(max_seq_len, (pos // VISIBLE_BLOCK + 1) * VISIBLE_BLOCK)


class StepRunner:
    """Calls a compiled step for a position the host knows. On a CPU it passes the visible prefix
    (``pos + 1`` rounded up to VISIBLE_BLOCK, its length marked dynamic: one graph for all of them), so
    attention reads only the filled part of the cache; on a GPU the whole cache, whose one fixed
    shape CUDA graphs need."""

    def __init__(self, step: Callable[..., torch.Tensor], device: torch.device, max_seq_len: int) -> None:
        self.step, self.max_seq_len = step, max_seq_len
        self.positions = torch.arange(max_seq_len, device=device) if device.type == "cpu" else None

    def __call__(self, token: torch.Tensor, pos_tensor: torch.Tensor, pos: int,
                 prompts: list[PromptKV | None] | None) -> torch.Tensor:
        if self.positions is None:
            return self.step(token, pos_tensor, prompts)
        visible = self.positions[:visible_length(pos, self.max_seq_len)]  # [T]
        torch._dynamo.mark_dynamic(visible, 0, min=2, max=self.max_seq_len)
        return self.step(token, pos_tensor, prompts, visible)


def image_key(image: Image.Image) -> str:
    """Content hash of an image's pixels: the same picture gives the same key however it arrived."""
    h = hashlib.sha256(f"{image.mode}{image.size}".encode())
    h.update(image.tobytes())
    return h.hexdigest()


def common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


class TokenReader:
    """Reads a sampled token id on the host without stalling the device.

    On CUDA the id is copied to pinned memory and an event marks the copy; waiting on that event does
    not wait for work queued after it (the next decoding step), unlike ``.item()``. Elsewhere the
    device is synchronous anyway and ``.item()`` is all there is."""

    def __init__(self, device: torch.device, overlap: bool | None = None) -> None:
        self.cuda = device.type == "cuda"
        self.overlaps = self.cuda if overlap is None else overlap  # forced on elsewhere only by tests
        self.host = torch.empty(1, dtype=torch.long, pin_memory=self.cuda)
        self.event = torch.cuda.Event() if self.cuda else None
        self.token: torch.Tensor | None = None

    def start(self, token: torch.Tensor) -> None:
        if self.cuda:
            self.host.copy_(token, non_blocking=True)
            self.event.record()
        else:
            self.token = token

    def read(self) -> int:
        if self.cuda:
            self.event.synchronize()
            return int(self.host[0])
        return int(self.token.item())


class Engine:
    """One loaded model serving requests one at a time (a lock guards the shared KV cache)."""

    def __init__(self, loaded: LoadedModel, image_cache_size: int = 8, compile: bool = False,
                 card: ModelCard | None = None, decode_threads: int | str | None = None) -> None:
        """``compile`` runs each decoding step through ``torch.compile`` (fullgraph, fixed shapes:
        :meth:`Transformer.step`), as CUDA graphs on a GPU ("reduce-overhead"). The first answer pays
        the compilation (tens of seconds); later steps skip Python and per-kernel launch overhead.
        ``decode_threads``: CPU threads for the decoding steps (prefill keeps torch's count at load):
        a number, "auto" (measured now, on a CPU: multimodal/threads.py), or None (torch's count)."""
        self.loaded = loaded
        self.card = card  # which model this is, in words (the page's banner and answer footers)
        self.model = loaded.model
        self.tokenizer = loaded.tokenizer
        self._lock = threading.Lock()
        self.model.llama.setup_cache(batch=1)
        self._image_cache: OrderedDict[tuple[str, object], list[PromptKV | None]] = OrderedDict()
        self._image_cache_size = image_cache_size
        # what the KV cache holds: these token ids, computed with these prompts and this adapter
        self._kv_ids: list[int] = []
        self._kv_prompts: list[PromptKV | None] | None = None
        self._kv_adapter: object = None
        self.overlap_decode: bool | None = None  # None: queue the next step before reading an id on CUDA only
        self._step = StepRunner(compile_step(self.model.llama), self.model.device, self.max_seq_len) if compile else None
        self.prompt_format = prompt_format(self.tokenizer, visual=self.sees_images)
        self.threads = torch.get_num_threads()  # prefill and every phase but decoding
        self.decode_timings: dict[int, float] = {}  # thread count -> seconds per step, when measured
        self.decode_threads = self._choose_decode_threads(decode_threads)

    def _choose_decode_threads(self, choice: int | str | None) -> int:
        if choice is None:
            return self.threads
        if choice != "auto":
            n = int(choice)
            if n < 1:
                raise ValueError(f"decode threads must be at least 1, not {n}")
            return n
        weight_bytes = sum(p.numel() * p.element_size() for p in self.model.llama.parameters())
        if (self.model.device.type != "cpu" or self._step is not None or self.threads < 2
                or weight_bytes > MEASURE_MAX_WEIGHT_BYTES):
            return self.threads
        llama = self.model.llama
        with self._lock, torch.inference_mode():
            token = torch.tensor([[self.tokenizer.eos_id]], device=self.model.device)
            prompts = self._image_prompts(None, None)
            self.decode_timings = seconds_per_step(
                lambda i: llama(token, start_pos=i, prompts=prompts, last_only=True), (1, self.threads),
                restore=self.threads)
            self._forget()  # the steps wrote cache slots no request has claimed
        return fastest(self.decode_timings)

    @property
    def max_seq_len(self) -> int:
        return self.model.config.llama.max_seq_len

    @property
    def sees_images(self) -> bool:
        """Whether the model itself sees an image (visual tokens). A text-only model is given none: in
        the app the image still reaches the experts, whose findings are its view of the picture."""
        return self.model.has_vision

    def forget(self) -> None:
        """Drop cached image prompts and the KV-reuse state, e.g. after changing the model's weights."""
        with self._lock:
            self._forget()

    def _forget(self) -> None:
        """As forget; the caller holds the lock."""
        self._image_cache.clear()
        self._kv_ids, self._kv_prompts, self._kv_adapter = [], None, None

    def warm_up(self, calls: int = 3) -> float:
        """Compile the decoding step before the first user waits for it, with and without an image (the
        same graph where both give every prompted layer its prompt), each called a few times (CUDA
        graphs are recorded after a first, eager call).
        Returns the seconds it took; nothing to do (0.0) for an engine that does not compile. Writes
        only cache slots that no request's KV bookkeeping refers to afterwards."""
        if self._step is None:
            return 0.0
        start = time.perf_counter()
        device = self.model.device
        with self._lock, torch.inference_mode():  # inputs made here are inference tensors, as a request's are
            token = torch.tensor([[self.tokenizer.eos_id]], device=device)  # any real id (some bases have no bos)
            images = (Image.new("RGB", (64, 64), (127, 127, 127)), None) if self.sees_images else (None,)
            for image in images:
                prompts = self._image_prompts(image, None)
                for i in range(calls):
                    self._step(token, torch.tensor([i], device=device), i, prompts)
            self._forget()
        return time.perf_counter() - start

    def pixels(self, image: Image.Image | None) -> torch.Tensor | None:
        if image is None:
            return None
        return self.loaded.preprocess(image)[None].to(self.model.device, self.model.dtype)  # [1, 3, H, W]

    def image_prompts(self, image: Image.Image | None) -> list[PromptKV | None]:
        """Visual tokens and every layer's prompt K/V for one image (None: no image) with the main
        adapter, cached by pixel hash; safe to call while other requests stream."""
        with self._lock:
            return self._image_prompts(image, None)

    @torch.inference_mode()
    def _image_prompts(self, image: Image.Image | None, adapter: object) -> list[PromptKV | None]:
        """As image_prompts, for the adapter in place; the caller holds the lock."""
        if not self.sees_images:
            image = None
        key = (image_key(image) if image is not None else "", adapter)  # the key keeps the adapter alive
        cached = self._image_cache.get(key)
        if cached is not None:
            self._image_cache.move_to_end(key)
            return cached
        prompts = self.model.prompt_kv(self.pixels(image))
        self._image_cache[key] = prompts
        if len(self._image_cache) > self._image_cache_size:
            self._image_cache.popitem(last=False)
        return prompts

    def stream(self, prompt: str | list[int], image: Image.Image | None = None,
               params: SamplingParams = SamplingParams(), cancel: threading.Event | None = None,
               stats: GenerationStats | None = None, prompts: list[PromptKV | None] | None = None,
               adapter: "AdapterSwap | None" = None) -> Iterator[str]:
        """Yield text pieces as tokens are decoded. ``prompts`` may carry precomputed image prompts
        (for the adapter in use); ``adapter`` swaps another adapter in for this request only."""
        decoder = StreamDecoder(self.tokenizer)
        for token in self.token_ids(prompt, image, params, cancel, stats, prompts, adapter):
            piece = decoder.push(token)
            if piece:
                yield piece
        tail = decoder.flush()
        if tail:
            yield tail

    def prompt_ids(self, prompt: str | list[int], stats: GenerationStats) -> tuple[list[int], int]:
        """The prompt's token ids and the room left for the answer; a prompt that leaves none is refused."""
        ids = self.tokenizer.encode(prompt, bos=self.tokenizer.add_bos) if isinstance(prompt, str) else list(prompt)
        room = self.max_seq_len - len(ids)
        if room < 1:
            raise PromptTooLongError(f"the prompt has {len(ids)} tokens; the model's context holds {self.max_seq_len}")
        stats.prompt_tokens = len(ids)
        return ids, room

    def token_ids(self, prompt: str | list[int], image: Image.Image | None = None,
                  params: SamplingParams = SamplingParams(), cancel: threading.Event | None = None,
                  stats: GenerationStats | None = None, prompts: list[PromptKV | None] | None = None,
                  adapter: "AdapterSwap | None" = None) -> Iterator[int]:
        """As :meth:`stream`, the answer's token ids (stop tokens not included)."""
        stats = stats if stats is not None else GenerationStats()
        ids, room = self.prompt_ids(prompt, stats)
        with self._lock, (adapter.applied() if adapter is not None else nullcontext()):
            try:
                yield from self._tokens(ids, image, prompts, adapter, min(params.max_new_tokens, room), params, cancel, stats)
            finally:
                use_threads(self.threads)  # decoding may have used fewer

    def complete(self, prompt: str | list[int], image: Image.Image | None = None,
                 params: SamplingParams = SamplingParams(), stats: GenerationStats | None = None) -> str:
        return "".join(self.stream(prompt, image, params, stats=stats))

    @torch.inference_mode()
    def _tokens(self, ids: list[int], image: Image.Image | None, prompts: list[PromptKV | None] | None,
                adapter: object, max_new: int, params: SamplingParams, cancel: threading.Event | None,
                stats: GenerationStats) -> Iterator[int]:
        start = time.perf_counter()
        device = self.model.device
        generator = None
        if params.seed is not None:
            generator = torch.Generator(device=device).manual_seed(params.seed)
        use_threads(self.threads)  # the image and the prefill: every thread
        if prompts is None:
            prompts = self._image_prompts(image, adapter)
        # Keys/values of a shared prefix are still in the cache when the same prompts and adapter made
        # them (a follow-up turn). At least the last prompt token is run again: its logits are needed.
        reuse = 0
        if self._kv_prompts is prompts and self._kv_adapter is adapter:
            reuse = min(common_prefix(self._kv_ids, ids), len(ids) - 1)
        self._kv_ids, self._kv_prompts, self._kv_adapter = ids[:reuse], prompts, adapter
        stats.reused_tokens = reuse
        llama = self.model.llama
        logits = llama(torch.tensor([ids[reuse:]], device=device), start_pos=reuse, prompts=prompts, last_only=True)
        self._kv_ids = list(ids)
        pos = len(ids)
        step_pos = torch.tensor([pos], device=device) if self._step is not None else None  # advanced on the device

        def decode(token: torch.Tensor) -> torch.Tensor:  # token [1] -> logits [1, vocab] at position pos
            if step_pos is None:
                use_threads(self.decode_threads)
                return llama(token.view(1, 1), start_pos=pos, prompts=prompts, last_only=True)
            out = self._step(token.view(1, 1), step_pos, pos, prompts)
            step_pos.add_(1)
            return out

        reader = TokenReader(device, self.overlap_decode)
        stop_ids = self.tokenizer.stop_ids  # eos and every end-of-turn token of the base
        stats.stop_reason = "length"
        for step in range(max_new):
            if cancel is not None and cancel.is_set():
                stats.stop_reason = "cancelled"
                break
            token = sample(logits, params.temperature, params.top_p, generator)  # [1], on device
            reader.start(token)
            last = step + 1 == max_new
            if reader.overlaps and not last:
                # Queue the next step before reading this token's id, so the device computes while the
                # host waits for the id. If it turns out to be EOS the extra step is wasted work whose
                # keys/values lie past what _kv_ids records, so nothing reads them.
                logits = decode(token)
            token_id = reader.read()
            if step == 0:
                stats.first_token_s = time.perf_counter() - start
            if token_id in stop_ids:
                stats.stop_reason = "eos"
                break
            stats.new_tokens += 1
            stats.total_s = time.perf_counter() - start
            yield token_id
            if not last:
                if not reader.overlaps:  # synchronous device: show the token first, then compute
                    logits = decode(token)
                self._kv_ids.append(token_id)
                pos += 1
        stats.total_s = time.perf_counter() - start
