"""Worker processes, one per implementation: the workers and the parent/worker line protocol."""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

from multimodal.config import ModelConfig

from .hf import build_hf
from .shapes import fill_base_weights, open_gates
from .timing import (Clock, cuda_now_mib, cuda_peak_mib, hf_decode, hf_first_token, hf_generate_s, hf_run,
                     median_dict, ours_decode, ours_first_token, ours_run, peak_rss_mib, prompt_ids,
                     random_pixels, reset_cuda_peak, rss_mib)

CHECK_TOKENS = 8  # greedy tokens compared between the two implementations
GATE_VALUE = 0.1  # raw gate of every prompted layer while timing (tanh(0.1) ~ 0.1 of the prompt output)
SCRIPT = Path(__file__).resolve().parents[1] / "benchmark.py"  # what a worker process runs (with --worker)

# --- our model ----------------------------------------------------------------------------------------


class OursWorker:
    """Our model in a worker process: built and checked once, then timed run by run on request."""

    variants = ("adapter", "plain")

    def __init__(self, a: argparse.Namespace, cfg: ModelConfig, device: torch.device, dtype: torch.dtype) -> None:
        from multimodal.generate import StepRunner, compile_step
        from multimodal.loading import build_empty, prepare_language_model

        self.device, self.new_tokens = device, a.new_tokens
        self.info: dict[str, Any] = {"rss_start_mib": rss_mib()}
        torch.manual_seed(a.seed)  # tuned-parameter init (adapter queries, resampler) is global-RNG drawn
        clock = Clock(device)
        model = build_empty(cfg, device, dtype)
        fill_base_weights(model, a.seed)
        self.model = model.eval().requires_grad_(False)
        # what the app's load does (LoRA folded in for the demo shape; packed where that pays), int8 later
        pack = False if a.compile or a.quantize else {"auto": None, "on": True, "off": False}[a.pack]
        self.info["lora_merged"], self.info["packed_linears"] = prepare_language_model(
            model.llama, device, dtype, merge_lora=True, pack=pack, quantize=a.quantize)
        model.llama.setup_cache(batch=1)
        clock.mark("build")
        self.info |= {"build_s": clock.marks["build"], "rss_built_mib": rss_mib(), "cuda_weights_mib": cuda_now_mib(device)}
        self.ids = torch.tensor([prompt_ids(a.prompt_tokens, cfg.llama.vocab_size, a.seed)], device=device)
        self.pixels = random_pixels(cfg, device, dtype, a.seed)
        self._check(a.out / "ours.logits.pt")
        if a.quantize:
            self._quantize(device)
        self.step = None
        if a.compile:  # as Engine(compile=True), on the model as it will be timed (int8 included)
            self.step = StepRunner(compile_step(model.llama), device, cfg.llama.max_seq_len)
            self._check_compiled()
        self.warm: set[str] = set()
        self.warmup_s: dict[str, float] = {}

    def _quantize(self, device: torch.device) -> None:
        """int8 weight-only LM, after the check (which is against transformers in the model dtype):
        record how far the quantised model's first-step logits and greedy tokens, gates open, move
        from this same model's unquantised ones."""
        from multimodal.quantize import quantize_int8

        _, prompts, token, ref = ours_first_token(self.model, self.ids, self.pixels)
        _, ref_greedy = ours_decode(self.model, token, self.ids.shape[1], CHECK_TOKENS - 1, prompts)
        quantize_int8(self.model, device)
        self.model.llama.setup_cache(batch=1)
        _, prompts, qtoken, out = ours_first_token(self.model, self.ids, self.pixels)
        _, q_greedy = ours_decode(self.model, qtoken, self.ids.shape[1], CHECK_TOKENS - 1, prompts)
        ref, out = ref[0].float().cpu(), out[0].float().cpu()
        same = sum(x == y for x, y in zip([int(token)] + ref_greedy, [int(qtoken)] + q_greedy))
        self.info["int8"] = {"max_abs_logit_diff": float((out - ref).abs().max()), "logit_scale": float(ref.abs().max()),
                             "rel_l2": float((out - ref).norm() / ref.norm()), "greedy_same": same,
                             "rss_quantized_mib": rss_mib(), "cuda_weights_mib": cuda_now_mib(device)}

    def _check(self, logits_path: Path) -> None:
        """Gates closed: the image path runs but adds exactly nothing, so this must be the plain LLaMA.
        Then the gates are opened and their effect on the same logits recorded."""
        _, prompts, token, logits = ours_first_token(self.model, self.ids, self.pixels)
        _, greedy = ours_decode(self.model, token, self.ids.shape[1], CHECK_TOKENS - 1, prompts)
        closed = logits[0].float().cpu()
        torch.save(closed, logits_path)
        self.info["check_tokens"] = [int(token)] + greedy
        self.info["gates_opened"] = open_gates(self.model, GATE_VALUE)
        _, _, _, opened = ours_first_token(self.model, self.ids, self.pixels)
        self.info["gate_effect_max_abs"] = float((opened[0].float().cpu() - closed).abs().max())

    def _check_compiled(self) -> None:
        """The compiled step must decode the same greedy tokens as the eager forward (gates open, image
        prompts); its first call compiles, so its time is the compilation's."""
        _, prompts, token, _ = ours_first_token(self.model, self.ids, self.pixels)
        _, eager = ours_decode(self.model, token, self.ids.shape[1], CHECK_TOKENS - 1, prompts)
        compile_s, compiled = ours_decode(self.model, token, self.ids.shape[1], CHECK_TOKENS - 1, prompts, self.step)
        self.info |= {"compiled_tokens_match": compiled == eager, "compile_s": compile_s}

    def run(self, variant: str) -> dict[str, float]:
        pixels = self.pixels if variant == "adapter" else None
        if variant not in self.warm:  # allocator, oneDNN / cuBLAS plans, compilation
            t0 = time.perf_counter()
            ours_run(self.model, self.ids, pixels, min(self.new_tokens, 8), self.step)
            self.warmup_s[variant] = time.perf_counter() - t0
            self.warm.add(variant)
        reset_cuda_peak(self.device)
        return ours_run(self.model, self.ids, pixels, self.new_tokens, self.step) | {"cuda_peak_mib": cuda_peak_mib(self.device)}

    def finish(self) -> dict[str, Any]:
        return {"peak_rss_mib": peak_rss_mib(), "warmup_s": self.warmup_s, "compiled": self.step is not None}


# --- transformers ---------------------------------------------------------------------------------------


class HfWorker:
    """transformers' LlamaForCausalLM in a worker process, same protocol as OursWorker."""

    variants = ("lm",)

    def __init__(self, a: argparse.Namespace, cfg: ModelConfig, device: torch.device, dtype: torch.dtype) -> None:
        import transformers

        self.device, self.new_tokens = device, a.new_tokens
        self.info: dict[str, Any] = {"rss_start_mib": rss_mib()}
        clock = Clock(device)
        self.hf = build_hf(cfg.llama, device, dtype, a.seed)
        clock.mark("build")
        self.info |= {"build_s": clock.marks["build"], "rss_built_mib": rss_mib(), "cuda_weights_mib": cuda_now_mib(device),
                      "attn_implementation": self.hf.config._attn_implementation,
                      "transformers": transformers.__version__}
        self.ids = torch.tensor([prompt_ids(a.prompt_tokens, cfg.llama.vocab_size, a.seed)], device=device)
        _, cache, token, logits = hf_first_token(self.hf, self.ids)
        _, greedy = hf_decode(self.hf, token, cache, CHECK_TOKENS - 1)
        self.info["check_tokens"] = [int(token)] + greedy
        torch.save(logits[0].float().cpu(), a.out / "hf.logits.pt")
        self.warm: set[str] = set()

    def run(self, variant: str) -> dict[str, float]:
        if variant == "generate":
            if variant not in self.warm:
                hf_generate_s(self.hf, self.ids, min(self.new_tokens, 8))
                self.warm.add(variant)
            return {"generate": hf_generate_s(self.hf, self.ids, self.new_tokens)}
        if variant not in self.warm:
            hf_run(self.hf, self.ids, min(self.new_tokens, 8))
            self.warm.add(variant)
        reset_cuda_peak(self.device)
        return hf_run(self.hf, self.ids, self.new_tokens) | {"cuda_peak_mib": cuda_peak_mib(self.device)}

    def finish(self) -> dict[str, Any]:
        return {"peak_rss_mib": peak_rss_mib()}


# --- worker processes ----------------------------------------------------------------------------------

TAG = "@@benchmark "  # marks protocol lines on a worker's stdout; anything else a library prints is passed on


def read_reply(proc: subprocess.Popen, name: str) -> dict[str, Any]:
    """The worker's next protocol line; whatever else it prints goes to stderr."""
    assert proc.stdout is not None
    for line in proc.stdout:
        if line.startswith(TAG):
            return json.loads(line[len(TAG):])
        sys.stderr.write(line)
    raise SystemExit(f"the {name} worker exited with status {proc.wait()}")


def emit(obj: dict[str, Any]) -> None:
    print(TAG + json.dumps(obj), flush=True)


def serve(worker: OursWorker | HfWorker) -> None:
    """Worker side: report the build and check, then answer "run <variant>" until "finish"."""
    emit(worker.info)
    for line in sys.stdin:
        cmd, *rest = line.split()
        if cmd == "run":
            emit(worker.run(rest[0]))
        elif cmd == "finish":
            emit(worker.finish())
            return


class Remote:
    """Parent side of one worker process. A process per implementation keeps peak RSS apart; keeping
    it alive lets the parent interleave the two implementations' runs, so a slow patch of a shared
    machine hits both rather than one."""

    def __init__(self, kind: str, argv: list[str], out: Path) -> None:
        cmd = [sys.executable, str(SCRIPT), *argv, "--worker", kind, "--out", str(out)]
        self.kind = kind
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.info = self._read()
        self.runs: dict[str, list[dict[str, float]]] = {}

    def _read(self) -> dict[str, Any]:
        return read_reply(self.proc, self.kind)

    def ask(self, command: str) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()
        return self._read()

    def run(self, variant: str) -> None:
        self.runs.setdefault(variant, []).append(self.ask(f"run {variant}"))

    def close(self) -> dict[str, Any]:
        """Everything this worker measured: build info, per-variant medians (and all runs), peak RSS."""
        result = self.info | self.ask("finish")
        self.proc.wait()
        for variant, runs in self.runs.items():
            peaks = [r.pop("cuda_peak_mib", None) for r in runs]
            result[variant] = median_dict(runs) | {"all_runs": runs, "cuda_peak_mib": max(peaks, default=None)
                                                   if None not in peaks else None}
        return result
