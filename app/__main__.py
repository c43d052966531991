"""python -m app: serve the chat page on 127.0.0.1:7860 (public binding and share links are opt-in).

Every flag has an environment-variable twin (shown in --help); a flag wins over the environment.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import logging
import os
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import gradio as gr

from experts import ExpertRunner
from multimodal.generate import Engine
from multimodal.threads import timings_text
from multimodal.options import ModelOptions, add_model_args, demo_available, demo_dir, options_from_args

from .chat import TOY_CAPTIONER, AppConfig, ChatApp
from .prompting import AUTO_STYLE, DEFAULT_STYLE, PROMPT_STYLES
from .ui import build_demo, page_assets

log = logging.getLogger("app")
EXPERTS = ("caption", "ocr", "detection", "classification")


def parse_auth(value: str | None, auth_file: str | None) -> list[tuple[str, str]] | None:
    """'user:password' and/or a file with one 'user:password' per line."""
    pairs = []
    lines = [value] if value else []
    if auth_file:
        lines += [ln.strip() for ln in Path(auth_file).read_text().splitlines() if ln.strip() and not ln.startswith("#")]
    for line in lines:
        user, sep, password = line.partition(":")
        if not sep or not user or not password:
            raise ValueError("auth must be given as user:password")
        pairs.append((user, password))
    return pairs or None


def parse_experts(value: str) -> list[str]:
    names = [n.strip() for n in value.split(",") if n.strip() and n.strip() != "none"]
    unknown = [n for n in names if n not in EXPERTS]
    if unknown:
        raise ValueError(f"unknown expert(s) {', '.join(unknown)}; choose from {', '.join(EXPERTS)} (or none)")
    return names


def build_parser() -> argparse.ArgumentParser:
    env = os.environ.get
    p = argparse.ArgumentParser(prog="python -m app", description=__doc__,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    s = p.add_argument_group("serving")
    s.add_argument("--host", default=env("MM_HOST", "127.0.0.1"), help="0.0.0.0 serves your network (env MM_HOST)")
    s.add_argument("--port", type=int, default=int(env("MM_PORT", "7860")), help="env MM_PORT")
    s.add_argument("--share", action="store_true", default=env("MM_SHARE") == "1",
                   help="also ask Gradio for a public link that anyone can open (opt-in; needs internet; "
                        "env MM_SHARE=1)")
    s.add_argument("--auth", default=env("MM_AUTH"), help="require a login, user:password (env MM_AUTH)")
    s.add_argument("--auth-file", default=env("MM_AUTH_FILE"), help="file of user:password lines (env MM_AUTH_FILE)")
    s.add_argument("--concurrency", type=int, default=int(env("MM_CONCURRENCY", "2")),
                   help="requests processed at once; without --batch the model serves one at a time and the rest "
                        "queue (env MM_CONCURRENCY)")
    s.add_argument("--batch", type=int, default=int(env("MM_BATCH", "1")), metavar="N",
                   help="decode up to N requests together, one forward per step for all of them (continuous "
                        "batching; the page and the API share it); page requests processed at once become at "
                        "least N (env MM_BATCH)")
    s.add_argument("--queue-size", type=int, default=int(env("MM_QUEUE_SIZE", "64")),
                   help="requests that may wait; more are refused with 'queue full' (env MM_QUEUE_SIZE)")
    s.add_argument("--max-upload-mb", type=int, default=int(env("MM_MAX_UPLOAD_MB", "25")), help="env MM_MAX_UPLOAD_MB")
    s.add_argument("--max-new-tokens", type=int, default=int(env("MM_MAX_NEW_TOKENS", "256")),
                   help="the answer-length slider's starting value (env MM_MAX_NEW_TOKENS)")
    s.add_argument("--log-chats", default=env("MM_LOG_CHATS"), metavar="DIR",
                   help="opt-in: write questions, answers and images to DIR (default: nothing is logged; env MM_LOG_CHATS)")
    a = p.add_argument_group("OpenAI-compatible API (/v1/chat/completions on the same port)")
    a.add_argument("--api-key", default=env("MM_API_KEY"),
                   help="clients must send 'Authorization: Bearer KEY'; without a key the API answers only on a "
                        "loopback server (env MM_API_KEY)")
    a.add_argument("--api-fetch-images", action="store_true", default=env("MM_API_FETCH_IMAGES") == "1",
                   help="let the server download http(s) image URLs (capped by --max-upload-mb, 10 s timeout); "
                        "default: only inline data: URLs (env MM_API_FETCH_IMAGES=1)")
    a.add_argument("--no-api", action="store_true", default=env("MM_API") == "0",
                   help="serve the page only, without the /v1 routes (env MM_API=0)")
    e = p.add_argument_group("experts")
    e.add_argument("--experts", default=env("MM_EXPERTS", ",".join(EXPERTS)),
                   help="experts offered on the page, comma-separated, or none (env MM_EXPERTS)")
    e.add_argument("--experts-on", default=env("MM_EXPERTS_ON", ",".join(EXPERTS)),
                   help="experts switched on when a session starts (env MM_EXPERTS_ON)")
    e.add_argument("--detector", default=env("MM_DETECTOR"), help="YOLO .pt/.onnx file (default: weights manifest's yolov8n)")
    e.add_argument("--ocr-backend", default=env("MM_OCR_BACKEND", "auto"), choices=["auto", "rapidocr", "easyocr"])
    e.add_argument("--caption-adapter", default=env("MM_CAPTION_ADAPTER", "llama-adapter-caption-7b"),
                   help="adapter for captions, swapped onto the loaded base: a manifest name, a .pth file, or none "
                        "(the main model is asked for a caption). Used when present (env MM_CAPTION_ADAPTER)")
    e.add_argument("--prompt-style", default=env("MM_PROMPT_STYLE", AUTO_STYLE), choices=(AUTO_STYLE, *PROMPT_STYLES),
                   help="how a chat base (SmolLM2, your own) is given the experts' findings; measured in "
                        f"docs/experts.md. auto: the adapter's own (prose-tuned for one tuned on findings), else "
                        f"{DEFAULT_STYLE} (env MM_PROMPT_STYLE)")
    e.add_argument("--context-tokens", type=int, default=None,
                   help="token budget of the expert context (default: a quarter of the model's context length)")
    add_model_args(p)
    return p


def load_engine(options: ModelOptions) -> tuple[Engine | None, str | None]:
    """The engine, or None and a message saying exactly what is missing and how to get it."""
    import torch

    try:
        return options.engine(), None
    except torch.OutOfMemoryError:
        return None, ("Out of memory while loading the model: try --dtype bfloat16 (or float16), or --device cpu.")
    except (FileNotFoundError, ValueError, RuntimeError) as e:
        message = str(e)
        if options.model in ("auto", "official") and not options.llama_dir:
            message += ("\n\nWithout downloads: `--model smollm2` (SmolLM2-135M-Instruct from its package, a small "
                        "chat model that reads the experts) or `--model demo` (the project's toy-world model")
            message += ")." if demo_available(options.weights_dir) else (
                f", whose files belong in {demo_dir(options.weights_dir)}; see weights/demo/README.md).")
            message += " Check what is present with `.venv/bin/python -m weights status`."
        return None, message


def caption_adapter_path(args: argparse.Namespace, options: ModelOptions) -> Path:
    """The caption adapter file: a .pth path as given, or a weights-manifest name (MissingWeightError,
    a FileNotFoundError, when it is not downloaded)."""
    path = Path(args.caption_adapter)
    if path.suffix in (".pth", ".pt"):
        return path
    from weights import require

    return require(args.caption_adapter, options.weights_dir)


def keep_lora_swappable(args: argparse.Namespace, options: ModelOptions) -> ModelOptions:
    """The main model's LoRA is folded into its weights at load (ModelOptions.merge_lora), unless a
    caption adapter that has LoRA of its own is present: swapping that in needs LoRA kept apart."""
    if args.caption_adapter in (None, "", "none") or not options.merge_lora:
        return options
    try:
        from multimodal.checkpoint import read_adapter

        has_lora = read_adapter(caption_adapter_path(args, options)).lora_rank > 0
    except (FileNotFoundError, ValueError, KeyError, RuntimeError):
        return options  # no usable caption adapter: build_experts says why
    return replace(options, merge_lora=False) if has_lora else options


def build_experts(engine: Engine | None, options: ModelOptions, args: argparse.Namespace) -> ExpertRunner | None:
    """One shared runner for the experts the operator offers; the caption expert reuses the loaded model."""
    offered = parse_experts(args.experts)
    if not offered:
        return None
    from experts import default_experts

    captioner, reason, model_id = None, None, "none"
    if engine is not None and not engine.sees_images:
        reason = "the loaded model does not see images, so it cannot write captions"
    elif engine is not None:
        from multimodal.swap import AdapterSwap, Captioner

        swap, model_id = None, f"{options.model}:{options.adapter}:main-model-caption"
        if args.caption_adapter not in (None, "", "none") and engine.model.config is not None:
            try:
                path = caption_adapter_path(args, options)
                swap = AdapterSwap(engine.model, path)
                model_id = f"{options.model}:{path.name}"
            except (FileNotFoundError, ValueError, KeyError, RuntimeError) as e:
                log.info("caption adapter not used (%s); the main model writes captions", str(e).splitlines()[0])
        captioner = Captioner(engine, swap)
    else:
        reason = "no model is loaded, so there is no captioner"
    toy = engine is not None and engine.card is not None and engine.card.toy_captions
    all_experts = default_experts(captioner=captioner, caption_unavailable_reason=reason, detector_path=args.detector,
                                  ocr_backend=args.ocr_backend, caption_source=TOY_CAPTIONER if toy else None)
    for ex in all_experts:
        if ex.name == "caption":
            ex.model_id = model_id  # type: ignore[attr-defined]
    return ExpertRunner([ex for ex in all_experts if ex.name in offered])


def launch(demo: gr.Blocks, app: ChatApp, share: bool, **kwargs: Any) -> str | None:
    """Start serving (without blocking). When a requested share link cannot be made, keep serving
    locally and put Gradio's reason on the page; returns the share URL or None."""
    out = io.StringIO()
    try:
        with contextlib.redirect_stdout(out):
            demo.launch(share=share, prevent_thread_lock=True, show_error=True, **page_assets(), **kwargs)
    finally:
        sys.stdout.write(_our_flags(out.getvalue()))
    if share and not demo.share_url:
        reason = next((ln.strip() for ln in out.getvalue().splitlines() if "share link" in ln), "")
        reason = reason.replace("Could not create share link.", "").strip() or "Gradio's share server could not be reached"
        note = (f"The public share link could not be created ({reason.rstrip('.')}; there may be no internet "
                f"connection). The app keeps serving locally at {demo.local_url}.")
        app.notices.append(note)
        log.warning(note)
    return demo.share_url


def _our_flags(console: str) -> str:
    """Gradio's start-up text speaks of its Python API; users of this app start it with flags."""
    return "\n".join("To create a public link, restart with --share (or MM_SHARE=1)."
                     if "share=True" in line else line for line in console.split("\n"))


def build_app(args: argparse.Namespace, experts_on: list[str] | None = None) -> ChatApp:
    """The app as `python -m app` serves it (model, experts, settings) from parsed arguments; also what
    scripts use to ask questions through the page's own code path (scripts/eval_photos.py)."""
    on = parse_experts(args.experts_on) if experts_on is None else experts_on
    options = replace(keep_lora_swappable(args, options_from_args(args)), batch=max(1, args.batch))
    engine, load_error = load_engine(options)
    if load_error:
        log.warning("serving without a model: %s", load_error)
    else:
        if engine.card is not None:
            log.info("%s", engine.card.line())
        if engine.decode_timings:
            log.info("decoding with %d thread(s): a step took %s", engine.decode_threads,
                     timings_text(engine.decode_timings))
        if options.compile:
            log.info("compiling the decoding step (--compile), so that the first answer does not wait for it...")
            log.info("compiled in %.0f s", engine.warm_up())
    config = AppConfig(default_experts=tuple(on), context_tokens=args.context_tokens,
                       default_max_new_tokens=args.max_new_tokens, max_waiting=args.queue_size,
                       prompt_style=args.prompt_style,
                       log_dir=Path(args.log_chats) if args.log_chats else None)
    return ChatApp(engine, load_error, build_experts(engine, options, args), config)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    if args.batch > 1 and args.compile:
        parser.error("--batch and --compile cannot be combined yet (the batched step runs eagerly): choose one")
    try:
        auth = parse_auth(args.auth, args.auth_file)
        parse_experts(args.experts)
        on = parse_experts(args.experts_on)
    except (OSError, ValueError) as e:
        parser.error(str(e))

    app = build_app(args, on)
    demo = build_demo(app)
    demo.queue(default_concurrency_limit=max(args.concurrency, args.batch), max_size=args.queue_size)
    routes = None
    if not args.no_api:
        from .openai_api import ApiSettings, api_routes

        api = ApiSettings(api_key=args.api_key or None, host=args.host, share=args.share,
                          max_upload_bytes=args.max_upload_mb << 20, fetch_images=args.api_fetch_images)
        if api.warning():
            log.warning("Warning: %s", api.warning())
        routes = {"routes": api_routes(app, api)}
    launch(demo, app, args.share, server_name=args.host, server_port=args.port, auth=auth,
           max_file_size=f"{args.max_upload_mb}mb", footer_links=["api"], run_history=False, app_kwargs=routes)
    try:
        demo.block_thread()
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
