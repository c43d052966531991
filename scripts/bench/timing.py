"""Timed runs of ours and of transformers: device sync, phase clock, memory probes, the request inputs."""
from __future__ import annotations

import resource
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from multimodal.config import ModelConfig

BOS = 1

# --- timing and memory helpers ----------------------------------------------------------------------


def sync(device: torch.device) -> None:
    """Wait for queued kernels so perf_counter measures work done, not work launched."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Clock:
    """Wall-clock phases with a device sync at each mark."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        sync(device)
        self.last = time.perf_counter()
        self.marks: dict[str, float] = {}

    def mark(self, phase: str) -> None:
        sync(self.device)
        now = time.perf_counter()
        self.marks[phase] = now - self.last
        self.last = now


def rss_mib() -> float:
    """Current resident set size of this process."""
    import psutil

    return psutil.Process().memory_info().rss / 2**20


def peak_rss_mib() -> float:
    """Peak RSS of this process. Linux's VmHWM belongs to the process's own address space; ru_maxrss
    would not do: exec keeps the forking parent's high-water mark in it."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux, bytes on macOS


def reset_cuda_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def cuda_now_mib(device: torch.device) -> float | None:
    return torch.cuda.memory_allocated(device) / 2**20 if device.type == "cuda" else None


def cuda_peak_mib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None


class NoStops:
    """A tokenizer whose answers never end early: no stop tokens, so every answer runs to its length cap
    (benchmarks that time a fixed number of new tokens)."""

    stop_ids: frozenset[int] = frozenset()

    def __init__(self, inner: Any) -> None:
        self._inner = inner

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


def median_dict(runs: list[dict[str, float]]) -> dict[str, float]:
    return {k: statistics.median(r[k] for r in runs) for k in runs[0]}


def prompt_ids(n: int, vocab: int, seed: int) -> list[int]:
    """BOS then random ids (the question); both implementations get the same list."""
    g = torch.Generator().manual_seed(seed + 7)
    return [BOS] + torch.randint(3, vocab, (n - 1,), generator=g).tolist()


def random_pixels(cfg: ModelConfig, device: torch.device, dtype: torch.dtype, seed: int) -> torch.Tensor:
    """A normalised image [1, 3, H, W]; its content does not change the work done."""
    g = torch.Generator().manual_seed(seed + 11)
    size = cfg.clip.image_size
    return torch.randn(1, 3, size, size, generator=g).to(device, dtype)


# --- our model ----------------------------------------------------------------------------------------


@torch.inference_mode()
def ours_first_token(model: Any, ids: torch.Tensor, pixels: torch.Tensor | None) -> tuple[dict[str, float], Any, torch.Tensor, torch.Tensor]:
    """Image -> first token, phase by phase, through the calls ``Engine`` makes: CLIP encode, resampler,
    every layer's prompt K/V (``model.prompt_kv`` split into its parts), prefill, greedy sample.
    ``pixels`` None: the plain LLaMA (no prompts at all), for an LM-only comparison."""
    from multimodal.generate import sample
    from multimodal.visual import clip_tokens

    clock = Clock(ids.device)
    prompts = None
    if pixels is not None:
        feats = clip_tokens(model.clip, pixels)
        clock.mark("clip")
        visual = model.resampler(feats)
        clock.mark("resampler")
        prompts = model.llama.prompt_kv(model.layer_prompts(visual))
        clock.mark("prompt_kv")
    logits = model.llama(ids, start_pos=0, prompts=prompts, last_only=True)
    clock.mark("prefill")
    token = sample(logits, 0.0, 1.0, None)
    int(token.item())
    clock.mark("sample")
    return clock.marks, prompts, token, logits


@torch.inference_mode()
def ours_decode(model: Any, token: torch.Tensor, start: int, steps: int, prompts: Any,
                step: Any = None) -> tuple[float, list[int]]:
    """``steps`` greedy decode steps through the KV cache, reading each id on the host. ``step``: the
    compiled ``llama.step`` in its StepRunner (fixed shapes, position kept on the device), as
    Engine(compile=True) runs it."""
    from multimodal.generate import sample

    device = token.device
    out, pos = [], start
    step_pos = torch.tensor([start], device=device)
    sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        if step is not None:
            logits = step(token.view(1, 1), step_pos, pos, prompts)
            step_pos.add_(1)
        else:
            logits = model.llama(token.view(1, 1), start_pos=pos, prompts=prompts, last_only=True)
        token = sample(logits, 0.0, 1.0, None)
        out.append(int(token.item()))
        pos += 1
    sync(device)
    return time.perf_counter() - t0, out


def ours_run(model: Any, ids: torch.Tensor, pixels: torch.Tensor | None, new_tokens: int,
             step: Any = None) -> dict[str, float]:
    """One request: phases to the first token, then new_tokens - 1 decode steps."""
    phases, prompts, token, _ = ours_first_token(model, ids, pixels)
    decode_s, _ = ours_decode(model, token, ids.shape[1], new_tokens - 1, prompts, step)
    phases["ttft"] = sum(phases.values())
    phases["decode"] = decode_s
    return phases


# --- transformers ---------------------------------------------------------------------------------------


@torch.inference_mode()
def hf_first_token(hf: Any, ids: torch.Tensor) -> tuple[dict[str, float], Any, torch.Tensor, torch.Tensor]:
    """Prefill with a fresh DynamicCache (transformers' default cache), logits of the last position only
    (as our last_only), greedy sample."""
    from transformers import DynamicCache

    clock = Clock(ids.device)
    cache = DynamicCache(config=hf.config)
    logits = hf(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1).logits[:, -1]
    clock.mark("prefill")
    token = logits.argmax(-1)
    int(token.item())
    clock.mark("sample")
    return clock.marks, cache, token, logits


@torch.inference_mode()
def hf_decode(hf: Any, token: torch.Tensor, cache: Any, steps: int) -> tuple[float, list[int]]:
    """The same greedy loop as ours_decode, through model(...) with past_key_values."""
    device = token.device
    out = []
    sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        logits = hf(input_ids=token.view(1, 1), past_key_values=cache, use_cache=True).logits[:, -1]
        token = logits.argmax(-1)
        out.append(int(token.item()))
    sync(device)
    return time.perf_counter() - t0, out


def hf_run(hf: Any, ids: torch.Tensor, new_tokens: int) -> dict[str, float]:
    phases, cache, token, _ = hf_first_token(hf, ids)
    decode_s, _ = hf_decode(hf, token, cache, new_tokens - 1)
    phases["decode"] = decode_s
    return phases


@torch.inference_mode()
def hf_generate_s(hf: Any, ids: torch.Tensor, new_tokens: int) -> float:
    """Wall time of transformers' own generate() for the same greedy request."""
    sync(ids.device)
    t0 = time.perf_counter()
    hf.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
    sync(ids.device)
    return time.perf_counter() - t0
