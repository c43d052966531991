"""python -m multimodal --image PATH "question": stream one answer to the terminal."""
from __future__ import annotations

import argparse
import sys

from .generate import Engine, GenerationStats, PromptTooLongError, SamplingParams
from .image import ImageError, open_image
from .options import add_model_args, options_from_args


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m multimodal", description=__doc__)
    parser.add_argument("question", help="what to ask about the image")
    parser.add_argument("--image", help="image file (omit to ask without one)")
    parser.add_argument("--context", help="extra context for the prompt's Input section (e.g. OCR text)")
    parser.add_argument("--raw", action="store_true", help="send the question as it is, without the base's chat or "
                                                          "instruction template")
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--temperature", type=float, default=0.1, help="0 for greedy")
    parser.add_argument("--top-p", type=float, default=0.75)
    parser.add_argument("--seed", type=int, default=None)
    add_model_args(parser)
    args = parser.parse_args(argv)

    try:
        params = SamplingParams(args.max_new_tokens, args.temperature, args.top_p, args.seed)
        image = open_image(args.image) if args.image else None
        options = options_from_args(args)
        loaded, card = options.load_with_card()
    except (ImageError, ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(card.line(), file=sys.stderr)
    engine = Engine(loaded, compile=options.compile, card=card, decode_threads=options.decode_threads)
    if image is not None and not engine.sees_images:
        print("note: this model has no visual encoder, so it does not see the image; the app's experts "
              "(python -m app) describe an image to it", file=sys.stderr)
    prompt = args.question if args.raw else engine.prompt_format.ids(args.question, context=args.context)
    stats = GenerationStats()
    try:
        for piece in engine.stream(prompt, image, params, stats=stats):
            print(piece, end="", flush=True)
    except PromptTooLongError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print()
    print(f"[{stats.new_tokens} tokens, first after {stats.first_token_s:.2f} s, {stats.tokens_per_s:.1f} tokens/s, "
          f"stopped: {stats.stop_reason}]", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
