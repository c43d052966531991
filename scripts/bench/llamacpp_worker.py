"""llama.cpp as a third peer of scripts/bench_base.py (``--llama-cpp``): the same GGUF file through
llama-cpp-python, fed the prompt ids our tokenizer made, the same greedy loop and the same threads,
in a process of its own that speaks the same line protocol as the other workers.

llama-cpp-python is a benchmark-only extra (bench-requirements.txt): it builds llama.cpp from source,
so neither the app nor the tests need it. This module imports it only inside the worker.
"""
from __future__ import annotations

import importlib.util
import time
from typing import Any

from .base_workers import GreedyRuns, Spec
from .timing import peak_rss_mib, rss_mib

INSTALL = ".venv/bin/pip install -r bench-requirements.txt"  # builds llama.cpp: a few minutes on 2 cores
NAME = "llama.cpp"  # the worker's name in the report


def available() -> bool:
    return importlib.util.find_spec("llama_cpp") is not None


class LlamaCppWorker(GreedyRuns):
    """``llama_cpp.Llama`` on the base file. Prefill is one ``eval`` of all the prompt ids (one batch:
    ``n_batch`` covers the prompt), each decode step one ``eval`` of the last token; the next token is
    the argmax of the last position's logits read on the host, as in our loop and transformers'. We
    pick the tokens ourselves rather than through ``generate``, so EOS cannot end a run early and no
    sampler chain sits in the timed loop."""

    def __init__(self, spec: Spec) -> None:
        import llama_cpp
        import numpy as np

        self.np, self.llama_cpp = np, llama_cpp
        self.spec = spec
        self.info: dict[str, Any] = {"rss_start_mib": rss_mib(), "threads": spec.threads,
                                     "llama_cpp": llama_cpp.__version__}
        n_ctx = spec.max_seq_len
        t0 = time.perf_counter()
        self.llm = llama_cpp.Llama(model_path=spec.base, n_threads=spec.threads, n_threads_batch=spec.threads,
                                   n_ctx=n_ctx, n_batch=max(len(spec.ids), 8), n_ubatch=max(len(spec.ids), 8),
                                   verbose=False)
        self.info["load_s"] = time.perf_counter() - t0
        self.n_vocab = self.llm.n_vocab()
        self.info |= {"rss_loaded_mib": rss_mib(), "peak_rss_load_mib": peak_rss_mib(), "n_ctx": n_ctx,
                      "mmap": True}  # llama.cpp maps the file: RSS counts its pages
        t0 = time.perf_counter()
        self._generate(min(spec.new_tokens, 8))  # thread pool, compute buffers
        self.info["warmup_s"] = time.perf_counter() - t0
        self.tokens: list[list[int]] = []

    def _argmax(self) -> int:
        ptr = self.llama_cpp.llama_get_logits_ith(self.llm.ctx, -1)  # the last evaluated position's logits
        return int(self.np.ctypeslib.as_array(ptr, shape=(self.n_vocab,)).argmax())

    def _generate(self, n: int) -> tuple[dict[str, float], list[int]]:
        self.llm.reset()  # position 0: eval drops the KV cache from here on
        t0 = time.perf_counter()
        self.llm.eval(self.spec.ids)
        t1 = time.perf_counter()
        token = self._argmax()
        t2 = time.perf_counter()
        out = [token]
        for _ in range(n - 1):
            self.llm.eval([token])
            token = self._argmax()
            out.append(token)
        t3 = time.perf_counter()
        return {"prefill": t1 - t0, "sample": t2 - t1, "decode": t3 - t2}, out

    def finish(self) -> dict[str, Any]:
        return self.greedy_summary()  # --profile-steps is torch.profiler's: nothing to profile here


def three_way_lines(d: dict[str, Any]) -> list[str]:
    """The three-way table: prefill and decode of ours, transformers' and llama.cpp's, and ours
    against llama.cpp as speed ratios (above 1: ours is faster)."""
    models = d["models"]
    ref = models[NAME]
    names = list(models)
    n = d["prompt_tokens"]

    def row(label: str, cell: Any) -> str:
        return f"| {label} | " + " | ".join(cell(name, m) for name, m in models.items()) + " |"

    def vs(name: str, value: str) -> str:
        return value if name.startswith("ours-") else "—"

    lines = [f"#### Three-way: ours, transformers, llama.cpp ({n} prompt tokens, {d['new_tokens']} greedy tokens, "
             f"median of {d['repeats']})", "",
             "| | " + " | ".join(names) + " |", "| --- |" + " ---: |" * len(names),
             row("prefill (ms)", lambda _, m: f"{m['median']['prefill'] * 1e3:,.1f}"),
             row("prefill tok/s", lambda _, m: f"{n / m['median']['prefill']:,.0f}"),
             row("**decode tok/s**", lambda _, m: f"**{m['tok_s']:.2f}**"),
             row("decode tok/s, best repeat", lambda _, m: f"{m['tok_s_best']:.2f}"),
             row("prefill speed, ours / llama.cpp",
                 lambda k, m: vs(k, f"{ref['median']['prefill'] / m['median']['prefill']:.2f}")),
             row("decode speed, ours / llama.cpp", lambda k, m: vs(k, f"{m['tok_s'] / ref['tok_s']:.2f}")),
             row("decode speed, ours / llama.cpp, best repeats",
                 lambda k, m: vs(k, f"{m['tok_s_best'] / ref['tok_s_best']:.2f}")),
             "", f"llama.cpp (llama-cpp-python {ref.get('llama_cpp', '?')}) computes with the file's quantized "
                 f"weights as they are; its greedy tokens equal transformers' float32 for the first "
                 f"{d['check'].get('common_prefix_' + NAME, 0)} of {d['new_tokens']} (not a gate). Its RSS counts the "
                 "memory-mapped file's pages."]
    return lines
