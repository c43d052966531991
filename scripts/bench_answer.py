"""End-to-end time of one answer from the demo model on the CPU: a new image and a ~20-token question in,
the whole answer out.

    python scripts/bench_answer.py --repeats 10

Each repeat uses a fresh toy-world image and forgets the engine's caches first, so every figure
includes image preprocessing, the CLIP encode, the visual tokens and gated-prompt K/V, the prefill of
the Alpaca prompt and the greedy decode to EOS. Model loading is reported apart (the app does it once).
Not a test: it prints what it measured.
"""
from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from multimodal.generate import Engine, GenerationStats, SamplingParams  # noqa: E402
from multimodal.options import ModelOptions  # noqa: E402
from multimodal.prompt import format_prompt  # noqa: E402
from multimodal.toyworld import render, sample_scene  # noqa: E402

QUESTION = "Look at the small picture I have sent you. What colour is the shape in it?"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--question", default=QUESTION)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    engine = Engine(ModelOptions(model="demo", device="cpu").load())
    load_s = time.perf_counter() - start
    tok = engine.tokenizer
    question_tokens = len(tok.encode(args.question, bos=False))
    params = SamplingParams(max_new_tokens=32, temperature=0.0)
    rng = random.Random(0)
    size = engine.model.config.clip.image_size
    rows = []
    for i in range(args.repeats + 1):  # the first is a warm-up (allocator, kernels), not reported
        image = render(sample_scene(rng, fix={"count": "one"}), size)
        engine.forget()
        stats = GenerationStats()
        t = time.perf_counter()
        answer = engine.complete(format_prompt(args.question), image, params, stats=stats)
        total = time.perf_counter() - t
        if i:
            rows.append((total, stats.first_token_s, stats.prompt_tokens, stats.new_tokens, answer.strip()))
    totals = [r[0] for r in rows]
    print(f"### One answer end to end, demo model, cpu float32, {args.threads} threads\n")
    print(f"Question: {args.question!r} ({question_tokens} tokens; {rows[0][2]} prompt tokens with the template)\n")
    print("| repeat | answer | new tokens | first token s | total s |")
    print("|---:|---|---:|---:|---:|")
    for i, (total, first, _, new, answer) in enumerate(rows, 1):
        print(f"| {i} | {answer} | {new} | {first:.3f} | {total:.3f} |")
    print(f"\nMedian {statistics.median(totals):.3f} s, max {max(totals):.3f} s per answer "
          f"(model load {load_s:.2f} s, once).")


if __name__ == "__main__":
    main()
