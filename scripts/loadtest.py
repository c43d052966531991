"""Load test of the OpenAI-compatible endpoint: K concurrent streaming clients, N requests, every answer checked.

    python scripts/loadtest.py --start --clients 50 --requests 500 -- --model smollm2 --batch 8
    python scripts/loadtest.py --url http://127.0.0.1:7860 --clients 8 --requests 80 [--api-key KEY]

``--start`` launches ``python -m app`` itself on a free loopback port (arguments after ``--`` go to the
app) and stops it afterwards; ``--url`` tests a server that is already running.

How answers are checked: ``--questions`` distinct questions (no image, experts off, greedy, at most
``--max-tokens`` tokens) are first asked one at a time; those answers are the references. Then the
load: ``--clients`` threads, each with its own HTTP connection, stream ``--requests`` requests between
them (request i asks question i mod Q), bounded by ``--deadline`` seconds. Each answer is classified:

- **ok**: equal to its own question's reference;
- **cross-talk**: equal to another question's reference and not to its own (an answer delivered to the
  wrong request);
- **differs**: equal to no reference (with batching, a near-tie decided differently by another batch
  size's arithmetic would land here; it is reported, not hidden);
- **error**: an HTTP error status or an error event (counted by status);
- **lost**: sent but never completed (connection dropped, timeout, or cut off by the deadline).

Reported: throughput (answers and tokens per second of wall time), time to first token (first content
chunk) and to the last ([DONE]), p50 and p95, and the counts above. The exit status is 1 when anything
was lost, errored or crossed.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[1]

QUESTIONS = [
    "What is the capital of France?", "Name three colours of the rainbow.", "What do bees make?",
    "How many legs does a spider have?", "What is the opposite of hot?", "Which planet is called the red planet?",
    "What is frozen water called?", "Name a fruit that is yellow.", "What do you use to write on a blackboard?",
    "How many days are in a week?", "What animal says moo?", "What is the largest ocean on Earth?",
    "What do plants need to grow?", "Which season comes after winter?", "What is two plus three?",
    "Name a musical instrument with strings.", "What is the main language spoken in Spain?",
    "What do you call a baby cat?", "Which direction does the sun rise in?", "What is the boiling point of water?",
    "Name something you wear on your feet.", "What gas do we breathe in to live?", "How many hours are in a day?",
    "What is the colour of grass?",
]


@dataclass
class Outcome:
    index: int
    status: str = "lost"  # ok, cross-talk, differs, error, lost
    detail: str = ""
    ttft_s: float | None = None
    total_s: float | None = None
    tokens: int = 0
    text: str = ""


@dataclass
class Totals:
    outcomes: list[Outcome] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)


def body(question: str, max_tokens: int, stream: bool) -> dict[str, Any]:
    return {"model": "any", "messages": [{"role": "user", "content": question}], "temperature": 0,
            "max_tokens": max_tokens, "experts": [], "stream": stream,
            "stream_options": {"include_usage": True} if stream else None}


def ask_streaming(client: httpx.Client, question: str, max_tokens: int, timeout: float) -> Outcome:
    out = Outcome(-1)
    start = time.perf_counter()
    pieces: list[str] = []
    try:
        with client.stream("POST", "/v1/chat/completions", json=body(question, max_tokens, True), timeout=timeout) as r:
            if r.status_code != 200:
                r.read()
                out.status, out.detail = "error", f"HTTP {r.status_code}"
                return out
            for line in r.iter_lines():
                if not line.startswith("data: "):
                    continue
                data = line[len("data: "):]
                if data == "[DONE]":
                    out.total_s = time.perf_counter() - start
                    out.text = "".join(pieces)
                    out.status = "complete"
                    return out
                event = json.loads(data)
                if "error" in event:
                    out.status, out.detail = "error", f"error event: {event['error'].get('message', '')[:80]}"
                    return out
                if event.get("usage"):
                    out.tokens = int(event["usage"].get("completion_tokens", 0))
                for choice in event.get("choices", []):
                    piece = (choice.get("delta") or {}).get("content") or ""
                    if piece and out.ttft_s is None:
                        out.ttft_s = time.perf_counter() - start
                    pieces.append(piece)
    except (httpx.HTTPError, json.JSONDecodeError) as e:
        out.detail = f"{type(e).__name__}: {str(e)[:80]}"
    return out  # no [DONE]: lost


def references(url: str, headers: dict[str, str], questions: list[str], max_tokens: int, timeout: float) -> list[str]:
    with httpx.Client(base_url=url, headers=headers, timeout=timeout) as client:
        answers = []
        for q in questions:
            r = client.post("/v1/chat/completions", json=body(q, max_tokens, False))
            r.raise_for_status()
            answers.append(r.json()["choices"][0]["message"]["content"])
    return answers


def run_load(url: str, headers: dict[str, str], questions: list[str], refs: list[str], a: argparse.Namespace) -> tuple[list[Outcome], float]:
    counter = iter(range(a.requests))
    counter_lock = threading.Lock()
    totals = Totals()
    deadline = time.perf_counter() + a.deadline

    def client_loop() -> None:
        with httpx.Client(base_url=url, headers=headers) as client:
            while time.perf_counter() < deadline:
                with counter_lock:
                    i = next(counter, None)
                if i is None:
                    return
                q = i % len(questions)
                outcome = ask_streaming(client, questions[q], a.max_tokens, max(1.0, deadline - time.perf_counter()))
                outcome.index = i
                if outcome.status == "complete":
                    if outcome.text == refs[q]:
                        outcome.status = "ok"
                    elif outcome.text in refs:
                        outcome.status, outcome.detail = "cross-talk", f"got question {refs.index(outcome.text)}'s answer"
                    else:
                        outcome.status = "differs"
                with totals.lock:
                    totals.outcomes.append(outcome)

    start = time.perf_counter()
    with ThreadPoolExecutor(a.clients) as pool:
        for _ in range(a.clients):
            pool.submit(client_loop)
    wall = time.perf_counter() - start
    done = {o.index for o in totals.outcomes}
    sent_not_done = [Outcome(i, "lost", "never sent or cut off by the deadline") for i in range(a.requests) if i not in done]
    return totals.outcomes + sent_not_done, wall


def percentile(values: list[float], p: float) -> float:
    values = sorted(values)
    if not values:
        return float("nan")
    k = min(len(values) - 1, max(0, round(p / 100 * (len(values) - 1))))
    return values[k]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_app(app_args: list[str], wait_s: float) -> tuple[subprocess.Popen, str]:
    port = free_port()
    env = dict(os.environ, OMP_WAIT_POLICY=os.environ.get("OMP_WAIT_POLICY", "PASSIVE"))
    proc = subprocess.Popen([sys.executable, "-m", "app", "--host", "127.0.0.1", "--port", str(port), *app_args],
                            cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.perf_counter() + wait_s
    while time.perf_counter() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the app exited with {proc.returncode}: {proc.stderr.read()[-2000:]}")
        try:
            if httpx.get(f"{url}/v1/models", timeout=2).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(1)
    proc.terminate()
    raise SystemExit(f"the app did not answer on {url} within {wait_s:.0f} s")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--url", help="a running server, e.g. http://127.0.0.1:7860")
    where.add_argument("--start", action="store_true", help="start `python -m app` (arguments after --) for the test")
    p.add_argument("--api-key", default=os.environ.get("MM_API_KEY"))
    p.add_argument("--clients", type=int, default=8, help="concurrent clients (threads, one connection each)")
    p.add_argument("--requests", type=int, default=80, help="requests in all")
    p.add_argument("--questions", type=int, default=len(QUESTIONS), help=f"distinct questions (at most {len(QUESTIONS)})")
    p.add_argument("--max-tokens", type=int, default=24)
    p.add_argument("--deadline", type=float, default=900, help="seconds for the whole load; what is left is lost")
    p.add_argument("--json", type=Path)
    p.add_argument("app_args", nargs="*", help="after --: arguments for `python -m app` (with --start)")
    a = p.parse_args(argv)
    if not 1 <= a.questions <= len(QUESTIONS):
        p.error(f"--questions must be 1..{len(QUESTIONS)}")
    headers = {"Authorization": f"Bearer {a.api_key}"} if a.api_key else {}
    proc = None
    if a.start:
        proc, url = start_app(a.app_args, wait_s=600)
    else:
        url = a.url.rstrip("/")
    try:
        questions = QUESTIONS[:a.questions]
        t0 = time.perf_counter()
        refs = references(url, headers, questions, a.max_tokens, timeout=120)
        ref_s = time.perf_counter() - t0
        outcomes, wall = run_load(url, headers, questions, refs, a)
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(timeout=30)
    counts = {k: sum(o.status == k for o in outcomes) for k in ("ok", "differs", "cross-talk", "error", "lost")}
    answered = [o for o in outcomes if o.status in ("ok", "differs", "cross-talk")]
    ttft = [o.ttft_s for o in answered if o.ttft_s is not None]
    last = [o.total_s for o in answered if o.total_s is not None]
    tokens = sum(o.tokens for o in answered)
    print(f"### Load test: {a.clients} clients, {a.requests} requests, {a.questions} distinct questions, "
          f"at most {a.max_tokens} tokens each\n")
    print(f"Server: {url}{' (started: python -m app ' + ' '.join(a.app_args) + ')' if a.start else ''}. "
          f"References: {len(refs)} answers one at a time in {ref_s:.1f} s.\n")
    print("| answers | ok | differs | cross-talk | errors | lost | wall s | answers/s | tokens/s | "
          "first token p50 / p95 (s) | last token p50 / p95 (s) |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    print(f"| {len(answered)} | {counts['ok']} | {counts['differs']} | {counts['cross-talk']} | {counts['error']} | "
          f"{counts['lost']} | {wall:.1f} | {len(answered) / wall:.2f} | {tokens / wall:.1f} | "
          f"{percentile(ttft, 50):.2f} / {percentile(ttft, 95):.2f} | {percentile(last, 50):.2f} / {percentile(last, 95):.2f} |")
    problems = [o for o in outcomes if o.status in ("error", "lost", "cross-talk", "differs")]
    for o in problems[:10]:
        print(f"- request {o.index}: {o.status} {o.detail} {o.text[:60]!r}")
    if a.json:
        a.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(a).items()}, "counts": counts,
                                      "wall_s": wall, "tokens": tokens, "references": refs,
                                      "ttft_s": ttft, "last_s": last,
                                      "problems": [o.__dict__ for o in problems]}, indent=2))
    if counts["lost"] or counts["error"] or counts["cross-talk"]:
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
