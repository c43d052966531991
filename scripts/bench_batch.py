"""Continuous batching: how decode throughput grows with concurrent requests (multimodal/batching.py).

    python scripts/bench_batch.py --shape 1b --dtype bfloat16 --concurrency 1,2,4,8,16

A benchmark, not a test. A random model of ``--shape`` (seeded weights, as scripts/benchmark.py builds
them, with the load-time weight changes the app makes: LoRA folded, bf16 packed where that pays) is put
in a :class:`BatchEngine` with as many slots as the largest concurrency. For each concurrency N, N
threads submit N different text prompts of ``--prompt-tokens`` tokens (no image: the adapter's prompts
only), admitted together (``BatchEngine.gathered``), and read ``--new-tokens`` greedy tokens each
(stop tokens ignored, so every answer has that length). Reported per N, median over ``--repeats``:

- **aggregate decode tok/s**: tokens produced by batched decoding steps over the time those steps took
  (the engine's step log), i.e. what decoding delivers while N requests share it;
- end-to-end tok/s: all tokens over the wall time from submission to the last answer (prefills included:
  they run one request at a time, between steps);
- per-request decode tok/s (median) and time to first token (median and worst).

The speed-up column divides aggregate decode tok/s by N=1's.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from bench.machine import machine_info  # noqa: E402
from bench.shapes import DTYPES, SHAPES, fill_base_weights, model_config  # noqa: E402
from bench.timing import NoStops, prompt_ids  # noqa: E402

TOKENIZER = ROOT.parent / "shared" / "fixtures" / "llama" / "tokenizer.model"


def build_engine(shape: str, dtype: torch.dtype, slots: int, max_seq_len: int, seed: int) -> Any:
    from multimodal.batching import BatchEngine
    from multimodal.image import ImagePreprocessor
    from multimodal.loading import LoadedModel, build_empty, prepare_language_model
    from multimodal.tokenizer import Tokenizer

    cfg = model_config(shape, max_seq_len)
    torch.manual_seed(seed)
    model = build_empty(cfg, torch.device("cpu"), dtype)
    fill_base_weights(model, seed)
    model.eval().requires_grad_(False)
    merged, packed = prepare_language_model(model.llama, torch.device("cpu"), dtype, merge_lora=True)
    if not TOKENIZER.is_file():
        raise SystemExit(f"{TOKENIZER} not found: the shared fixtures' LLaMA tokenizer is needed for decoding text")
    tokenizer = NoStops(Tokenizer(TOKENIZER))
    loaded = LoadedModel(model, tokenizer, ImagePreprocessor(cfg.clip))  # type: ignore[arg-type]
    return BatchEngine(loaded, slots=slots), {"lora_merged": merged, "packed_linears": packed}


def one_round(engine: Any, n: int, prompts: list[list[int]], new_tokens: int) -> dict[str, Any]:
    from multimodal.generate import GenerationStats, SamplingParams

    params = SamplingParams(max_new_tokens=new_tokens, temperature=0.0)
    stats = [GenerationStats() for _ in range(n)]
    engine.step_log.clear()
    start = time.perf_counter()
    threads = [threading.Thread(target=lambda i=i: engine.complete(prompts[i], None, params, stats=stats[i]))
               for i in range(n)]
    with engine.gathered(n):  # all n admitted together, however the threads are scheduled
        for t in threads:
            t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    steps = list(engine.step_log)
    assert all(s.new_tokens == new_tokens for s in stats), [s.new_tokens for s in stats]
    return {"wall_s": wall, "decode_tokens": sum(r for r, _ in steps), "decode_s": sum(t for _, t in steps),
            "max_rows": max((r for r, _ in steps), default=0),
            "per_request_tok_s": [s.tokens_per_s for s in stats], "ttft_s": [s.first_token_s for s in stats],
            "tokens": n * new_tokens}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", choices=SHAPES, default="1b")
    p.add_argument("--dtype", choices=list(DTYPES), default="bfloat16")
    p.add_argument("--concurrency", default="1,2,4,8,16", help="comma-separated request counts")
    p.add_argument("--prompt-tokens", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path)
    a = p.parse_args(argv)
    levels = [int(x) for x in a.concurrency.split(",")]
    engine, info = build_engine(a.shape, DTYPES[a.dtype], max(levels), a.prompt_tokens + a.new_tokens + 8, a.seed)
    vocab = engine.model.config.llama.vocab_size
    prompts = [prompt_ids(a.prompt_tokens, vocab, a.seed + i) for i in range(max(levels))]
    one_round(engine, 1, prompts, 4)  # warm-up: allocator, oneDNN plans
    results: dict[int, list[dict[str, Any]]] = {n: [] for n in levels}
    for r in range(a.repeats):  # interleaved: a slow patch of a shared machine hits every level
        for n in levels:
            print(f"[bench_batch] repeat {r + 1}/{a.repeats}, {n} concurrent", file=sys.stderr, flush=True)
            results[n].append(one_round(engine, n, prompts, a.new_tokens))
    machine = machine_info(torch.device("cpu"))
    rows = []
    for n in levels:
        runs = results[n]
        rows.append({"n": n,
                     "aggregate_decode_tok_s": statistics.median(x["decode_tokens"] / x["decode_s"] for x in runs),
                     "end_to_end_tok_s": statistics.median(x["tokens"] / x["wall_s"] for x in runs),
                     "per_request_tok_s": statistics.median(v for x in runs for v in x["per_request_tok_s"]),
                     "ttft_median_s": statistics.median(v for x in runs for v in x["ttft_s"]),
                     "ttft_worst_s": max(v for x in runs for v in x["ttft_s"]),
                     "max_rows": max(x["max_rows"] for x in runs)})
    base = rows[0]["aggregate_decode_tok_s"]
    print(f"### Continuous batching · {a.shape} · cpu · {a.dtype} · {a.prompt_tokens} prompt tokens · "
          f"{a.new_tokens} new tokens per request · median of {a.repeats}\n")
    print(f"Machine: {machine.get('cpu', '?')}, torch threads {torch.get_num_threads()}; weights: {info}.\n")
    print("| concurrent requests | aggregate decode tok/s | speed-up over 1 | end-to-end tok/s | per-request decode "
          "tok/s | time to first token, median / worst (s) | most rows in a step |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for row in rows:
        print(f"| {row['n']} | {row['aggregate_decode_tok_s']:.2f} | {row['aggregate_decode_tok_s'] / base:.2f}x | "
              f"{row['end_to_end_tok_s']:.2f} | {row['per_request_tok_s']:.2f} | {row['ttft_median_s']:.2f} / "
              f"{row['ttft_worst_s']:.2f} | {row['max_rows']} |")
    if a.json:
        a.json.write_text(json.dumps({"args": vars(a) | {"json": str(a.json)}, "machine": machine, "rows": rows,
                                      "runs": results}, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
