"""Speed of LLaMA-Adapter V2 (image + question -> tokens) next to transformers' LlamaForCausalLM.

A benchmark, not a test: for one shape (tiny, 1b, 7b) with random weights it reports time to first
token, decode tokens per second and peak memory of our model, and the same LM work done by
``transformers.LlamaForCausalLM`` of the same shape, dtype and base weights, with the ratios.

    python scripts/benchmark.py --shape 1b --prompt-tokens 256 --new-tokens 32 --repeats 3

Each implementation runs in its own subprocess, one after the other: peak RSS is process-wide, so
sharing a process would mix the two figures, and a 7B model in 16-bit fits in 24 GiB only alone.
Both subprocesses draw every base tensor from a generator seeded by (seed, tensor name), so they
hold the same weights without passing them between processes. Before timing, the greedy tokens of
our model with its gates closed (the prompt path is then a no-op) are checked against transformers'.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

from bench.machine import Plan, check_fits, decode_bound, machine_info, memory_bandwidth_gbs
from bench.report import report
from bench.shapes import DTYPES, SHAPES, count_params, model_config
from bench.workers import CHECK_TOKENS, HfWorker, OursWorker, Remote, serve


def compare(ours: dict[str, Any], hf: dict[str, Any], tmp: Path, dtype: torch.dtype) -> dict[str, Any]:
    """First-step logits and greedy tokens: ours with gates closed must be the plain LLaMA."""
    a = torch.load(tmp / "ours.logits.pt")
    b = torch.load(tmp / "hf.logits.pt")
    diff = float((a - b).abs().max())
    same = ours["check_tokens"] == hf["check_tokens"]
    result = {"max_abs_logit_diff": diff, "logit_scale": float(b.abs().max()), "tokens_match": same,
              "ours_tokens": ours["check_tokens"], "hf_tokens": hf["check_tokens"]}
    if not same:
        msg = (f"greedy tokens differ: ours {ours['check_tokens']} vs transformers {hf['check_tokens']} "
               f"(max |logit diff| {diff:.3g})")
        if dtype == torch.float32:
            raise SystemExit("correctness check failed, figures would be meaningless: " + msg)
        # 16-bit: the two round in different places (our RoPE runs in fp32), so a near-tie may flip
        print(f"WARNING: {msg}; in {dtype} near-ties can flip, check the logit difference", file=sys.stderr)
    return result


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", choices=SHAPES, default="tiny")
    p.add_argument("--device", choices=("cpu", "cuda"), default=None, help="default: cuda if available")
    p.add_argument("--dtype", choices=tuple(DTYPES), default=None, help="default: float32 on CPU, bfloat16 on CUDA")
    p.add_argument("--prompt-tokens", type=int, default=256, help="question length incl. BOS (image prompts come on top)")
    p.add_argument("--new-tokens", type=int, default=64, help="tokens generated, the first included")
    p.add_argument("--repeats", type=int, default=3, help="timed runs after one warm-up; the median is reported")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--hf-generate", action="store_true", help="also time transformers' generate()")
    p.add_argument("--force", action="store_true", help="run 7b on CPU anyway")
    p.add_argument("--sequential", action="store_true",
                   help="one implementation after the other even when both fit (default: interleave the repeats)")
    p.add_argument("--pack", choices=("auto", "on", "off"), default="auto",
                   help="prepack our LM's weights for oneDNN: auto does what load_model does (bf16 on a CPU with "
                        "native oneDNN bf16); off to measure without")
    p.add_argument("--quantize", choices=("int8",), default=None,
                   help="our LM in weight-only int8 (torchao), as --quantize in the app; transformers stays in --dtype")
    p.add_argument("--compile", action="store_true",
                   help="decode through torch.compile'd fixed-shape steps (CUDA graphs on a GPU), as the app's --compile")
    p.add_argument("--json", type=Path, help="write every figure here")
    p.add_argument("--markdown", type=Path, help="write the printed report here")
    p.add_argument("--worker", choices=("ours", "hf"), help=argparse.SUPPRESS)
    p.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.new_tokens < 2 or a.prompt_tokens < 1 or a.repeats < 1:
        p.error("need --new-tokens >= 2, --prompt-tokens >= 1, --repeats >= 1")
    return a


def make_plan(a: argparse.Namespace) -> Plan:
    device = torch.device(a.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda but torch sees no GPU")
    a.dtype = a.dtype or ("bfloat16" if device.type == "cuda" else "float32")
    # room for the timed tokens and for the correctness check's greedy tokens, whichever is more
    cfg = model_config(a.shape, max_seq_len=a.prompt_tokens + max(a.new_tokens, CHECK_TOKENS))
    return Plan(a.shape, device, DTYPES[a.dtype], cfg)


def forwarded_args(a: argparse.Namespace) -> list[str]:
    """The options a worker needs to rebuild the same plan."""
    args = ["--shape", a.shape, "--device", a.device or ("cuda" if torch.cuda.is_available() else "cpu"),
            "--dtype", a.dtype, "--prompt-tokens", str(a.prompt_tokens), "--new-tokens", str(a.new_tokens),
            "--repeats", str(a.repeats), "--seed", str(a.seed), "--pack", a.pack]
    return args + (["--hf-generate"] if a.hf_generate else []) + (["--quantize", a.quantize] if a.quantize else []) + \
        (["--compile"] if a.compile else [])


def measure(plan: Plan, a: argparse.Namespace, tmp: Path, together: bool) -> tuple[dict[str, Any], dict[str, Any]]:
    """Run both implementations, repeat by repeat in turn when both fit in memory at once, otherwise one
    after the other (the first process exits, freeing its memory, before the second starts)."""
    argv = forwarded_args(a)
    jobs: list[tuple[str, str]] = [("ours", "adapter"), ("ours", "plain"), ("hf", "lm")]
    if a.hf_generate:
        jobs.append(("hf", "generate"))
    if together:
        log(f"{plan.shape} on {plan.device} in {a.dtype}: building both models, runs interleaved")
        remotes = {"ours": Remote("ours", argv, tmp), "hf": Remote("hf", argv, tmp)}
        for r in range(a.repeats):
            log(f"repeat {r + 1}/{a.repeats}")
            for kind, variant in jobs:
                remotes[kind].run(variant)
        return remotes["ours"].close(), remotes["hf"].close()
    results = {}
    for kind in ("ours", "hf"):
        log(f"{plan.shape} on {plan.device} in {a.dtype}: {kind} alone (both models do not fit at once)")
        remote = Remote(kind, argv, tmp)
        for _ in range(a.repeats):
            for job_kind, variant in jobs:
                if job_kind == kind:
                    remote.run(variant)
        results[kind] = remote.close()
    return results["ours"], results["hf"]


def log(message: str) -> None:
    print(f"[benchmark] {message}", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> None:
    a = parse_args(argv)
    plan = make_plan(a)
    if a.worker:
        worker = (OursWorker if a.worker == "ours" else HfWorker)(a, plan.cfg, plan.device, plan.dtype)
        serve(worker)
        return

    together = check_fits(plan, a.force) and not a.sequential
    info = machine_info(plan.device) | {"schedule": "interleaved" if together else "sequential",
                                        "load_avg_start": os.getloadavg()[0]}
    bw_before = memory_bandwidth_gbs(plan.device)
    counts = count_params(plan.cfg)
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        ours, hf = measure(plan, a, tmp, together)
        check = compare(ours, hf, tmp, plan.dtype)
        if ours.get("compiled_tokens_match") is False:
            raise SystemExit("correctness check failed: the compiled decode step's greedy tokens differ from the eager ones")
    # measured on both sides of the run: on a shared VM the figure moves; the best is the sustained one
    bw_after = memory_bandwidth_gbs(plan.device)
    info["load_avg_end"] = os.getloadavg()[0]
    bw = {k: max(bw_before[k], bw_after[k]) for k in bw_before} | {
        f"{k}_{when}": v for when, d in (("before", bw_before), ("after", bw_after)) for k, v in d.items()}
    bound = decode_bound(plan.cfg, plan.dtype, counts, bw["read_gbs"])
    bound |= {"llama_params": counts["llama"], "clip_params": counts["clip"], "adapter_params": counts["adapter"]}
    text = report(plan, a, info, bw, ours, hf, check, bound)
    print(text)
    if a.markdown:
        a.markdown.write_text(text + "\n")
    if a.json:
        a.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(a).items()}, "machine": info,
                                      "bandwidth": bw, "ours": ours, "transformers": hf, "check": check,
                                      "bound": bound}, indent=2))


if __name__ == "__main__":
    main()
