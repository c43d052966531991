"""`python -m experts IMAGE`: print what each expert says about an image, and the prompt block.

Runs detection, image classification and OCR (caption needs a loaded language model, which this command does not load;
it is listed as unavailable with the reason). Never downloads anything.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from . import (CaptionExpert, ClassificationConfig, ClassificationExpert, DetectionConfig, DetectionExpert,
               EasyOCRBackend, ExpertRunner, OCRExpert)
from .context import build_context, rough_token_count

CLI_CAPTION_REASON = ("no language model is loaded by this command; captions come from the app's model "
                      "(the caption adapter runs on the loaded base model)")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m experts", description=__doc__.splitlines()[0])
    p.add_argument("image", type=Path, help="image file (jpg, png, ...)")
    p.add_argument("--experts", default="caption,detection,classification,ocr",
                   help="comma-separated experts to run (default: %(default)s)")
    p.add_argument("--detector", type=Path, default=None,
                   help="YOLO weights (.pt or exported .onnx); default: the weights folder's yolov8n")
    p.add_argument("--conf", type=float, default=DetectionConfig.conf, help="detection confidence threshold")
    p.add_argument("--top-k", type=int, default=ClassificationConfig.top_k, help="classification: labels listed")
    p.add_argument("--threshold", type=float, default=ClassificationConfig.threshold,
                   help="classification: lowest probability listed")
    p.add_argument("--ocr-backend", choices=("auto", "easyocr", "rapidocr"), default="auto")
    p.add_argument("--easyocr-dir", type=Path, default=None,
                   help="folder with craft_mlt_25k.pth and english_g2.pth; default: the weights folder")
    p.add_argument("--max-tokens", type=int, default=256, help="budget of the prompt context block")
    p.add_argument("--save-annotated", type=Path, default=None, metavar="DIR",
                   help="write each expert's annotated image to DIR/<expert>.png")
    p.add_argument("--json", action="store_true", help="print results as JSON instead of text")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    selected = [name.strip() for name in args.experts.split(",") if name.strip()]
    experts = [
        CaptionExpert(None, CLI_CAPTION_REASON),
        DetectionExpert(args.detector, DetectionConfig(conf=args.conf)),
        ClassificationExpert(config=ClassificationConfig(top_k=args.top_k, threshold=args.threshold)),
        OCRExpert(args.ocr_backend, easyocr=EasyOCRBackend(args.easyocr_dir)),
    ]
    with ExpertRunner(experts) as runner:
        unknown = [n for n in selected if n not in runner.names]
        if unknown:
            print(f"unknown expert(s): {', '.join(unknown)}; choose from {', '.join(runner.names)}",
                  file=sys.stderr)
            return 2
        results = runner.run(args.image, selected)
    block = build_context(results, args.max_tokens, rough_token_count)

    if args.save_annotated is not None:
        args.save_annotated.mkdir(parents=True, exist_ok=True)
        for r in results:
            if r.annotated is not None:
                r.annotated.save(args.save_annotated / f"{r.name}.png")

    if args.json:
        payload = [{"name": r.name, "status": r.status, "seconds": round(r.seconds, 3), "error": r.error,
                    "context": r.context, "data": r.data} for r in results]
        print(json.dumps({"results": payload, "context_block": block.text}, indent=2, ensure_ascii=False))
    else:
        for r in results:
            if r.ok:
                print(f"== {r.name}: ok ({r.seconds:.2f} s) ==")
                print(r.context)
            else:
                print(f"== {r.name}: {r.status} ==")
                print(r.error)
            print()
        print(f"== prompt context block (~{block.tokens} tokens, budget {args.max_tokens}) ==")
        print(block.text or "(empty)")
    return 0 if any(r.ok for r in results) or not results else 1


if __name__ == "__main__":
    sys.exit(main())
