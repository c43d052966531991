"""python -m app: serve the page on 127.0.0.1:7860 (public binding and share links are opt-in)."""
from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from multimodal.generate import Engine
from multimodal.options import add_model_args, options_from_args

from .ui import build_demo

log = logging.getLogger("app")


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


def main(argv: list[str] | None = None) -> int:
    env = os.environ.get
    parser = argparse.ArgumentParser(prog="python -m app", description=__doc__)
    parser.add_argument("--host", default=env("MM_HOST", "127.0.0.1"), help="0.0.0.0 to serve the network (env MM_HOST)")
    parser.add_argument("--port", type=int, default=int(env("MM_PORT", "7860")), help="env MM_PORT")
    parser.add_argument("--share", action="store_true", default=env("MM_SHARE") == "1",
                        help="also create a public gradio.live link (needs internet; env MM_SHARE=1)")
    parser.add_argument("--auth", default=env("MM_AUTH"), help="require a login, user:password (env MM_AUTH)")
    parser.add_argument("--auth-file", default=env("MM_AUTH_FILE"), help="file of user:password lines")
    parser.add_argument("--concurrency", type=int, default=int(env("MM_CONCURRENCY", "1")),
                        help="requests generating at once (the model serves one at a time; others queue)")
    add_model_args(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)

    try:
        auth = parse_auth(args.auth, args.auth_file)
    except (OSError, ValueError) as e:
        parser.error(str(e))
    engine, load_error = None, None
    try:
        engine = Engine(options_from_args(args).load())
    except (FileNotFoundError, ValueError) as e:  # the page shows what is missing and how to get it
        load_error = str(e)
        log.warning("serving without a model: %s", e)

    demo = build_demo(engine, load_error)
    demo.queue(default_concurrency_limit=args.concurrency)
    try:
        demo.launch(server_name=args.host, server_port=args.port, share=args.share, auth=auth, show_error=True)
    except Exception as e:  # noqa: BLE001 - a failed share link must not take the local server down
        if not args.share:
            raise
        log.warning("could not create the public share link (%s); serving locally only", e)
        demo.launch(server_name=args.host, server_port=args.port, share=False, auth=auth, show_error=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
