"""Worker processes of scripts/bench_base.py: our model and transformers' loaded from the same base
files (a GGUF file or a Hugging Face folder), each timed on the same chat prompt; and a load-only
worker that records how much memory loading takes.

One process per model keeps each one's peak RSS its own. The workers speak bench.workers' line
protocol (``serve``): they report their load, then answer "run" until "finish".
"""
from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from .timing import hf_decode, hf_first_token, ours_decode, ours_first_token, peak_rss_mib, rss_mib
from .workers import emit, read_reply, serve

SCRIPT = Path(__file__).resolve().parents[1] / "bench_base.py"  # what a worker process runs


@dataclass
class Spec:
    """Everything a worker needs, written to a JSON file by the parent."""

    kind: str  # "ours", "hf", "load"
    base: str  # .gguf file or Hugging Face folder
    dtype: str = "float32"
    threads: int = 1
    ids: list[int] = field(default_factory=list)  # the prompt, the same for every worker
    new_tokens: int = 64
    max_seq_len: int = 256
    profile_steps: int = 0  # decode steps to run under torch.profiler after the timed runs
    messages: list[dict[str, str]] = field(default_factory=list)  # the chat the ids were made from
    compile: bool = False  # ours: the compiled step, reading a GGUF's codes (as Engine(compile=True) with --compile)
    int4: bool = False  # ours: bfloat16 decoding from a GGUF's 4-bit codes (load_model(int4=True), the app's default)

    def write(self, path: Path) -> Path:
        path.write_text(json.dumps(asdict(self)))
        return path

    @classmethod
    def read(cls, path: Path) -> "Spec":
        return cls(**json.loads(path.read_text()))


def status_kib(*keys: str) -> dict[str, int]:
    """Fields of /proc/self/status in KiB (VmRSS, VmHWM, RssAnon, RssFile)."""
    out: dict[str, int] = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        name, _, rest = line.partition(":")
        if name in keys:
            out[name] = int(rest.split()[0])
    return out


class RssSampler:
    """Polls this process's anonymous and file-backed RSS in a thread. VmHWM gives the peak of their
    sum only; the split tells a second copy of the weights (anonymous) from the memory-mapped file's
    pages (file-backed, reclaimable page cache that the mapping keeps counted)."""

    def __init__(self, interval_s: float = 0.002) -> None:
        self.interval_s, self.peak = interval_s, {"RssAnon": 0, "RssFile": 0, "sum": 0}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def _poll(self) -> None:
        while not self._stop.is_set():
            s = status_kib("RssAnon", "RssFile")
            s["sum"] = s.get("RssAnon", 0) + s.get("RssFile", 0)
            for k, v in s.items():
                self.peak[k] = max(self.peak[k], v)
            time.sleep(self.interval_s)

    def __enter__(self) -> "RssSampler":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def peaks_mib(self) -> dict[str, float]:
        return {"peak_anon_mib": self.peak["RssAnon"] / 1024, "peak_file_mib": self.peak["RssFile"] / 1024,
                "peak_anon_plus_file_mib": self.peak["sum"] / 1024}


def ru_maxrss_mib() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def profile_table(step: Any, steps: int) -> dict[str, Any]:
    """``steps`` calls of ``step()`` under torch.profiler: the ops that take the time, and how much of
    the wall time the ops account for at all (the rest is Python and dispatch between them)."""
    from torch.profiler import ProfilerActivity, profile

    step()  # the profiler's own warm-up
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        t0 = time.perf_counter()
        for _ in range(steps):
            step()
        wall = time.perf_counter() - t0
    events = prof.key_averages()
    self_total = sum(e.self_cpu_time_total for e in events) / 1e6  # us -> s
    top = sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[:12]
    rows = [{"op": e.key, "calls_per_step": e.count / steps, "self_ms_per_step": e.self_cpu_time_total / 1e3 / steps}
            for e in top]
    return {"steps": steps, "wall_ms_per_step": wall * 1e3 / steps, "ops_self_ms_per_step": self_total * 1e3 / steps,
            "op_calls_per_step": sum(e.count for e in events) / steps, "top": rows}


# --- our model ----------------------------------------------------------------------------------------


class GreedyRuns:
    """What both workers share: one timed greedy generation per run, its tokens kept for the check."""

    spec: Spec
    tokens: list[list[int]]

    def _generate(self, n: int) -> tuple[dict[str, float], list[int]]:
        raise NotImplementedError

    def run(self, variant: str) -> dict[str, float]:
        times, tokens = self._generate(self.spec.new_tokens)
        self.tokens.append(tokens)
        return times

    def greedy_summary(self) -> dict[str, Any]:
        return {"peak_rss_mib": peak_rss_mib(), "tokens": self.tokens[0] if self.tokens else [],
                "tokens_stable": all(t == self.tokens[0] for t in self.tokens)}


class OursBaseWorker(GreedyRuns):
    """Our model as the app loads a text-only base: ``load_model`` with no adapter and no CLIP file."""

    def __init__(self, spec: Spec) -> None:
        from multimodal.formats import read_base
        from multimodal.int4 import Int4Product
        from multimodal.loading import load_model

        torch.set_num_threads(spec.threads)
        self.spec = spec
        self.info: dict[str, Any] = {"rss_start_mib": rss_mib(), "threads": torch.get_num_threads()}
        t0 = time.perf_counter()
        files = read_base(spec.base, max_seq_len=spec.max_seq_len)  # config, lazy weights, tokenizer: no tensor read
        self.info["read_s"] = time.perf_counter() - t0
        del files
        t0 = time.perf_counter()
        compiled = {"pack": False, "codes": Path(spec.base).suffix == ".gguf"} if spec.compile else {}
        loaded = load_model(spec.base, device="cpu", dtype=spec.dtype, max_seq_len=spec.max_seq_len, int4=spec.int4,
                            **compiled)
        self.info["load_s"] = time.perf_counter() - t0
        self.model = loaded.model
        params = list(self.model.parameters())
        self.info |= {"rss_loaded_mib": rss_mib(), "peak_rss_load_mib": peak_rss_mib(),
                      "params": sum(p.numel() for p in params), "packed_linears": sum(p.is_mkldnn for p in params),
                      "has_vision": self.model.has_vision,
                      "int4_linears": sum(len(m.sizes) for m in self.model.modules() if isinstance(m, Int4Product))}
        self.model.llama.setup_cache(batch=1)
        self.ids = torch.tensor([spec.ids])
        self.step = None
        if spec.compile:
            from multimodal.generate import StepRunner, compile_step

            self.step = StepRunner(compile_step(self.model.llama), torch.device("cpu"), spec.max_seq_len)
            self.info["coded_linears"] = sum(getattr(m, "codes", None) is not None for m in self.model.modules())
        t0 = time.perf_counter()
        self._generate(min(spec.new_tokens, 8))  # allocator, oneDNN plans; compiles the step
        self.info["warmup_s"] = time.perf_counter() - t0
        self.tokens: list[list[int]] = []

    def _generate(self, n: int) -> tuple[dict[str, float], list[int]]:
        phases, _, token, _ = ours_first_token(self.model, self.ids, None)
        decode_s, out = ours_decode(self.model, token, self.ids.shape[1], n - 1, None, self.step)
        return phases | {"decode": decode_s}, [int(token)] + out

    def finish(self) -> dict[str, Any]:
        out = self.greedy_summary()
        if self.spec.profile_steps:
            llama, token = self.model.llama, torch.tensor([[self.spec.ids[-1]]])
            pos = self.ids.shape[1]
            with torch.inference_mode():
                if self.step is not None:
                    step_pos = torch.tensor([pos])
                    out["profile"] = profile_table(lambda: self.step(token, step_pos, pos, None).argmax(-1),
                                                   self.spec.profile_steps)
                else:
                    out["profile"] = profile_table(lambda: llama(token, start_pos=pos, last_only=True).argmax(-1),
                                                   self.spec.profile_steps)
        return out


# --- transformers ---------------------------------------------------------------------------------------


def hf_from_base(base: Path, dtype: torch.dtype) -> Any:
    """transformers' own loader for the same files: a GGUF through ``gguf_file=`` (dequantized by
    transformers), a folder as it is."""
    from transformers import AutoModelForCausalLM

    if base.suffix == ".gguf":
        return AutoModelForCausalLM.from_pretrained(base.parent, gguf_file=base.name, dtype=dtype)
    return AutoModelForCausalLM.from_pretrained(base, dtype=dtype)


def hf_chat_ids(base: Path, messages: list[dict[str, str]]) -> list[int] | None:
    """transformers' tokenizer's ids for the chat, to check ours against (None: it has no template)."""
    from collections.abc import Mapping

    from transformers import AutoTokenizer

    tok = (AutoTokenizer.from_pretrained(base.parent, gguf_file=base.name) if base.suffix == ".gguf"
           else AutoTokenizer.from_pretrained(base))
    if not getattr(tok, "chat_template", None):
        return None
    out = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    return list(out["input_ids"] if isinstance(out, Mapping) else out)


class HfBaseWorker(GreedyRuns):
    """transformers' LlamaForCausalLM from the same base file, the same greedy loop (KV cache,
    logits of the last position, argmax read on the host every step)."""

    def __init__(self, spec: Spec) -> None:
        import transformers

        torch.set_num_threads(spec.threads)
        self.spec = spec
        self.info: dict[str, Any] = {"rss_start_mib": rss_mib(), "threads": torch.get_num_threads(),
                                     "transformers": transformers.__version__}
        t0 = time.perf_counter()
        self.hf = hf_from_base(Path(spec.base), getattr(torch, spec.dtype)).eval().requires_grad_(False)
        self.info["load_s"] = time.perf_counter() - t0
        self.info |= {"rss_loaded_mib": rss_mib(), "peak_rss_load_mib": peak_rss_mib(),
                      "params": sum(p.numel() for p in self.hf.parameters()),
                      "attn_implementation": self.hf.config._attn_implementation}
        if spec.messages:
            ids = hf_chat_ids(Path(spec.base), spec.messages)
            self.info["prompt_ids_match"] = None if ids is None else ids == spec.ids
        self.ids = torch.tensor([spec.ids])
        t0 = time.perf_counter()
        self._generate(min(spec.new_tokens, 8))
        self.info["warmup_s"] = time.perf_counter() - t0
        self.tokens: list[list[int]] = []

    def _generate(self, n: int) -> tuple[dict[str, float], list[int]]:
        phases, cache, token, _ = hf_first_token(self.hf, self.ids)
        decode_s, out = hf_decode(self.hf, token, cache, n - 1)
        return phases | {"decode": decode_s}, [int(token)] + out

    def finish(self) -> dict[str, Any]:
        out = self.greedy_summary()
        if self.spec.profile_steps:
            from transformers import DynamicCache

            with torch.inference_mode():
                cache = DynamicCache(config=self.hf.config)
                self.hf(input_ids=self.ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
                token = torch.tensor([[self.spec.ids[-1]]])

                def step() -> torch.Tensor:  # the cache grows by one per call, as in a real decode
                    return self.hf(input_ids=token, past_key_values=cache, use_cache=True).logits[:, -1].argmax(-1)

                out["profile"] = profile_table(step, self.spec.profile_steps)
        return out


# --- loading memory ---------------------------------------------------------------------------------------


def load_memory(spec: Spec) -> dict[str, Any]:
    """Load the base with load_model once, in this fresh process, recording RSS: the baseline after
    every import load_model needs, the peak (VmHWM; ru_maxrss as well), and the peaks of the
    anonymous and file-backed parts."""
    import multimodal.formats.gguf_file  # noqa: F401  (imported now so the baseline holds the libraries)
    import multimodal.formats.hf  # noqa: F401
    from multimodal.formats import read_base
    from multimodal.loading import load_model

    torch.set_num_threads(spec.threads)
    base = status_kib("VmRSS", "RssAnon", "RssFile")
    t0 = time.perf_counter()
    with RssSampler() as sampler:
        files = read_base(spec.base, max_seq_len=spec.max_seq_len)
        read_s = time.perf_counter() - t0
        del files
        t1 = time.perf_counter()
        loaded = load_model(spec.base, device="cpu", dtype=spec.dtype, max_seq_len=spec.max_seq_len)
        load_s = time.perf_counter() - t1
    params = list(loaded.model.parameters())
    weights = sum(p.numel() * p.element_size() for p in params if not p.is_mkldnn)
    weights += sum(p.numel() * torch.finfo(p.dtype).bits // 8 for p in params if p.is_mkldnn)  # same bytes packed
    after = status_kib("VmRSS", "RssAnon", "RssFile")
    peak = peak_rss_mib()
    return {"dtype": spec.dtype, "threads": torch.get_num_threads(), "read_s": read_s, "load_s": load_s,
            "weights_mib": weights / 2**20, "params": sum(p.numel() for p in params),
            "packed_linears": sum(p.is_mkldnn for p in params),
            "baseline_rss_mib": base["VmRSS"] / 1024, "baseline_file_mib": base.get("RssFile", 0) / 1024,
            "peak_rss_mib": peak, "ru_maxrss_mib": ru_maxrss_mib(), **sampler.peaks_mib(),
            "rss_after_mib": after["VmRSS"] / 1024, "anon_after_mib": after.get("RssAnon", 0) / 1024,
            "file_after_mib": after.get("RssFile", 0) / 1024,
            "load_over_weights": (peak - base["VmRSS"] / 1024) / (weights / 2**20)}


# --- the two sides of the protocol -------------------------------------------------------------------


def serve_spec(spec_path: Path) -> None:
    spec = Spec.read(spec_path)
    if spec.kind == "load":
        emit(load_memory(spec))
        return
    serve((OursBaseWorker if spec.kind == "ours" else HfBaseWorker)(spec))  # type: ignore[arg-type]


class Worker:
    """Parent side of one worker process. Started without waiting, so the models load side by side;
    ``ready`` then waits for the load report."""

    def __init__(self, name: str, spec: Spec, tmp: Path) -> None:
        self.name = name
        path = spec.write(tmp / f"{name}.spec.json")
        cmd = [sys.executable, str(SCRIPT), "--worker", str(path)]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.info: dict[str, Any] | None = None
        self.runs: list[dict[str, float]] = []

    def _read(self) -> dict[str, Any]:
        return read_reply(self.proc, self.name)

    def ready(self) -> dict[str, Any]:
        if self.info is None:
            self.info = self._read()
        return self.info

    def ask(self, command: str) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()
        return self._read()

    def run(self) -> None:
        self.runs.append(self.ask("run timed"))

    def close(self) -> dict[str, Any]:
        """Load report, every run, their medians, and what ``finish`` reports (peak RSS, tokens)."""
        import statistics

        result = self.ready() | self.ask("finish")
        self.proc.wait()
        result["all_runs"] = self.runs
        result["median"] = {k: statistics.median(r[k] for r in self.runs) for k in self.runs[0]} if self.runs else {}
        return result


def run_once(name: str, spec: Spec, tmp: Path) -> dict[str, Any]:
    """A one-shot worker (the load-memory one): its single report."""
    w = Worker(name, spec, tmp)
    out = w.ready()
    w.proc.wait()
    return out
