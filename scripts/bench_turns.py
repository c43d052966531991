"""Cost of each turn of a conversation about one image, with and without reusing the cached prefix.

    python scripts/bench_turns.py --shape 1b --turns 10 --new-tokens 32
    python scripts/bench_turns.py --model demo --turns 10

A chat turn's prompt (multimodal.prompt.format_chat) holds the expert context, every earlier turn and
the new question. Without reuse each turn prefills all of it, so turn 10 costs far more than turn 2;
with the Engine's prefix reuse (and its per-image prompt cache) a turn prefills only its new text.
Not a test: it prints what it measured.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from PIL import Image

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO_ROOT), str(REPO_ROOT / "scripts")]

from bench.shapes import fill_base_weights, model_config, open_gates  # noqa: E402
from multimodal.generate import Engine, GenerationStats, SamplingParams  # noqa: E402
from multimodal.image import ImagePreprocessor  # noqa: E402
from multimodal.loading import LoadedModel, build_empty  # noqa: E402
from multimodal.options import ModelOptions  # noqa: E402
from multimodal.prompt import format_chat  # noqa: E402
from multimodal.tokenizer import Tokenizer  # noqa: E402

QUESTIONS = ["What is in the image?", "What colour is the biggest object?", "Where is it?", "How many objects are there?",
             "Is there any text?", "What shape is on the left?", "Describe the background.", "Which object is smallest?",
             "Are any two objects the same colour?", "Summarise the image in one sentence.", "What is at the top?",
             "What is at the bottom?"]
CONTEXT = "[detection] Objects detected: 2 circles (left, centre), 1 square (right).\n[ocr] \"STOP\""


def random_engine(shape: str, tokenizer: Path, max_seq_len: int) -> Engine:
    tok = Tokenizer(tokenizer)
    cfg = model_config(shape, max_seq_len)
    if cfg.llama.vocab_size != tok.n_words:
        raise SystemExit(f"--tokenizer has {tok.n_words} pieces; shape {shape} needs {cfg.llama.vocab_size}")
    model = build_empty(cfg, "cpu", torch.float32)
    fill_base_weights(model, seed=0)
    open_gates(model, 0.1)
    model.eval().requires_grad_(False)
    return Engine(LoadedModel(model, tok, ImagePreprocessor(cfg.clip)))


def run_conversation(engine: Engine, image: Image.Image, turns: int, new_tokens: int, reuse: bool) -> list[dict[str, float]]:
    # EOS can end a random model's answer early; a fixed seed keeps both runs identical turn by turn
    params = SamplingParams(max_new_tokens=new_tokens, temperature=0.0)
    history: list[tuple[str, str]] = []
    rows = []
    engine.forget()
    for turn in range(turns):
        if not reuse:
            engine.forget()
        question = QUESTIONS[turn % len(QUESTIONS)]
        stats = GenerationStats()
        start = time.perf_counter()
        answer = "".join(engine.stream(format_chat(question, history, CONTEXT), image, params, stats=stats))
        rows.append({"turn": turn + 1, "prompt": stats.prompt_tokens, "reused": stats.reused_tokens,
                     "first_s": stats.first_token_s, "total_s": time.perf_counter() - start, "new": stats.new_tokens})
        history.append((question, answer))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=["tiny", "1b"], help="random weights of this shape")
    parser.add_argument("--model", choices=["demo"], help="the project's demo model instead of random weights")
    parser.add_argument("--tokenizer", type=Path, default=REPO_ROOT.parent / "shared/fixtures/llama/tokenizer.model",
                        help="SentencePiece file for random shapes (1b needs a 32000-piece one)")
    parser.add_argument("--turns", type=int, default=10)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--max-seq-len", type=int, default=2048)
    args = parser.parse_args()
    torch.manual_seed(0)
    if args.model == "demo":
        engine = Engine(ModelOptions(model="demo", device="cpu").load())
        label = "demo model"
    else:
        engine = random_engine(args.shape or "tiny", args.tokenizer, args.max_seq_len)
        label = f"{args.shape or 'tiny'} shape, random weights"
    size = engine.model.config.clip.image_size
    image = Image.radial_gradient("L").resize((size * 2, size * 2)).convert("RGB")

    results = {mode: run_conversation(engine, image, args.turns, args.new_tokens, mode == "reuse")
               for mode in ("no reuse", "reuse")}
    print(f"### Turn cost, {label}, cpu float32, {torch.get_num_threads()} threads, greedy, up to {args.new_tokens} new tokens\n")
    print("| turn | prompt tokens | new tokens | no reuse: first token s | no reuse: turn s | reuse: prefilled tokens | reuse: first token s | reuse: turn s |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    for a, b in zip(results["no reuse"], results["reuse"]):
        print(f"| {a['turn']} | {a['prompt']} | {b['new']} | {a['first_s']:.3f} | {a['total_s']:.3f} | "
              f"{b['prompt'] - b['reused']} | {b['first_s']:.3f} | {b['total_s']:.3f} |")
    later = results["reuse"][2:]
    if later:
        print(f"\nWith reuse, turns 3..{args.turns}: first token {statistics.median(r['first_s'] for r in later):.3f} s median "
              f"(turn 2: {results['reuse'][1]['first_s']:.3f} s); without reuse turn {args.turns} needs "
              f"{results['no reuse'][-1]['first_s']:.3f} s.")


if __name__ == "__main__":
    main()
