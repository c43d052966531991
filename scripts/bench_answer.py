"""How long a user of the app waits for an answer: a real photo and a question in, a short greedy answer out.

    python scripts/bench_answer.py --model smollm2                  # the default assistant, 10 photos
    python scripts/bench_answer.py --model demo --images 1          # a quick look
    python scripts/bench_answer.py --toy-world --repeats 10         # the demo model alone (no app, no experts)

The app is built as `python -m app` builds it (`build_parser().parse_args(argv)`, then `build_app`), so every
app and model flag passes through; `--detector` defaults to the shared fixtures' detector, as in
scripts/eval_photos.py. For each photo (the fixture images, then scikit-image's) two questions go through
`ChatApp.api_chat`, the page's own path, with every offered expert on and greedy decoding of at most
`--new-tokens` tokens:

  first:     a new image: the experts run, the prompt is built, the answer is generated;
  follow-up: the same image with the first turn as history: the experts' results come from their cache.

Each answer is split into phases: experts (wall time of the runner's calls), other (opening the upload,
the expert context, the prompt and its tokens: the rest of the wall time), first token (the prefill, from
`GenerationStats`) and decode. Before anything is timed, the model and every expert answer once about an
unrelated drawn image, so that no measured photo pays for loading or first-use builds (the model's load
time is reported apart). The header names the CPU, torch's threads, OMP_WAIT_POLICY (on a busy 2-core
machine PASSIVE makes decoding about 10x faster: docs/performance.md) and the load average at start and
end. Not a test: it prints what it measured.

`--toy-world` (implied by `--repeats`) is the older measurement of the demo model alone: fresh toy-world
images through `Engine.complete`, caches forgotten each time.
"""
from __future__ import annotations

import argparse
import inspect
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

REPO_ROOT = Path(__file__).resolve().parents[1]
for _path in (REPO_ROOT, REPO_ROOT / "scripts"):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

import eval_photos as ev  # noqa: E402  (the photo set, image references and the detector default)

PHOTOS = ("fixtures:images/bus.jpg", "fixtures:images/zidane.jpg", "fixtures:images/ocr_english.png",
          "fixtures:images/ocr_street_signs.png", "fixtures:images/ocr_french.jpg", "skimage:chelsea.png",
          "skimage:coffee.png", "skimage:rocket.jpg", "skimage:motorcycle_left.png", "skimage:astronaut.png")
FALLBACK_FOLLOW_UP = "Is there any text in the picture?"
TARGETS_S = {"first": 3.0, "follow-up": 1.5}  # the targets, end to end on the 2-core CPU
PHASES = ("experts", "other", "first token", "decode", "total")
TOY_QUESTION = "Look at the small picture I have sent you. What colour is the shape in it?"


@dataclass
class Answer:
    """One timed api_chat call."""

    image: str
    turn: str  # "first" or "follow-up"
    question: str
    answer: str
    total_s: float
    experts_s: float  # wall time inside ExpertRunner.run (the experts run in parallel threads)
    first_token_s: float  # GenerationStats: request start -> first token (prefill)
    decode_s: float
    prompt_tokens: int
    reused_tokens: int  # prompt tokens whose keys/values were still cached (not prefilled)
    new_tokens: int
    expert_s: dict[str, float] = field(default_factory=dict)  # per expert, when it ran (not cached)
    footer: str = ""

    @property
    def other_s(self) -> float:
        return max(0.0, self.total_s - self.experts_s - self.first_token_s - self.decode_s)

    def phase(self, name: str) -> float:
        return {"experts": self.experts_s, "other": self.other_s, "first token": self.first_token_s,
                "decode": self.decode_s, "total": self.total_s}[name]


class Probe:
    """Records, for each api_chat call, the runner's wall time and results and the engine's
    GenerationStats, by wrapping the two instances' methods (the app's code is not changed)."""

    def __init__(self, app: Any) -> None:
        self.experts_s, self.results, self.stats = 0.0, [], []
        if app.runner is not None:
            app.runner.run = self._timed_run(app.runner.run)
        app.engine.stream = self._recording_stream(app.engine.stream)

    def reset(self) -> None:
        self.experts_s, self.results, self.stats = 0.0, [], []

    def _timed_run(self, run: Callable[..., list]) -> Callable[..., list]:
        def timed(*args: Any, **kwargs: Any) -> list:
            start = time.perf_counter()
            results = run(*args, **kwargs)
            self.experts_s += time.perf_counter() - start
            self.results += results
            return results
        return timed

    def _recording_stream(self, stream: Callable[..., Any]) -> Callable[..., Any]:
        from multimodal.generate import GenerationStats

        signature = inspect.signature(stream)

        def recording(*args: Any, **kwargs: Any) -> Any:
            bound = signature.bind(*args, **kwargs)
            if bound.arguments.get("stats") is None:
                bound.arguments["stats"] = GenerationStats()
            self.stats.append(bound.arguments["stats"])
            return stream(*bound.args, **bound.kwargs)
        return recording


def ask(app: Any, probe: Probe, image: Any, name: str, turn: str, question: str, history: list,
        experts: list[str], new_tokens: int) -> Answer:
    probe.reset()
    start = time.perf_counter()
    answer, details = app.api_chat(image, question, history, experts, temperature=0.0, top_p=1.0,
                                   max_new_tokens=new_tokens)
    total = time.perf_counter() - start
    stats = probe.stats[-1]
    ran = {r.name: r.seconds for r in probe.results if r.ok and not r.cached}
    return Answer(image=name, turn=turn, question=question, answer=answer, total_s=total, experts_s=probe.experts_s,
                  first_token_s=stats.first_token_s, decode_s=max(0.0, stats.total_s - stats.first_token_s),
                  prompt_tokens=stats.prompt_tokens, reused_tokens=stats.reused_tokens, new_tokens=stats.new_tokens,
                  expert_s=ran, footer=details.get("stats", ""))


def warm_up_image() -> Any:
    """A drawn picture with shapes and large words: no measured photo, yet it takes every expert
    through its first-use work (sessions, model builds) and the model through a whole answer."""
    from PIL import Image, ImageDraw, ImageFont

    image = Image.new("RGB", (640, 480), (200, 220, 240))
    draw = ImageDraw.Draw(image)
    draw.rectangle((40, 260, 300, 440), fill=(180, 40, 40))
    draw.ellipse((380, 220, 600, 440), fill=(40, 120, 40))
    draw.text((40, 60), "WARM UP 42", fill=(0, 0, 0), font=ImageFont.load_default(size=72))
    return image


def photo_questions(limit: int) -> list[tuple[str, Path, str, str]]:
    """(reference, file, first question, follow-up question) for the photos present; the questions are
    the development set's for that photo (scripts/photos_dev.json)."""
    by_image: dict[str, list[str]] = {}
    for item in ev.load_set(ev.DEFAULT_SET):
        by_image.setdefault(item.image, []).append(item.question)
    out = []
    for ref in PHOTOS:
        path = ev.resolve_image(ref, ev.DEFAULT_SET.parent)
        if not path.is_file():
            print(f"skipped {ref}: image file missing: {path}", file=sys.stderr)
            continue
        questions = by_image.get(ref, []) + ["What is in the picture?", FALLBACK_FOLLOW_UP]
        out.append((ref, path, questions[0], questions[1]))
    return out[: max(limit, 0)]


def cpu_name() -> str:
    try:
        text = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        text = ""
    for line in text.splitlines():
        if line.lower().startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "unknown CPU"


def load_1min() -> float:
    return os.getloadavg()[0]


def summary(rows: list[Answer]) -> str:
    """Median and worst per phase, per turn, against the targets."""
    head = "| turn | | " + " | ".join(f"{p} s" for p in PHASES) + " | target | |"
    lines = [head, "|---|---|" + "---:|" * len(PHASES) + "---:|---|"]
    for turn, target in TARGETS_S.items():
        mine = [r for r in rows if r.turn == turn]
        if not mine:
            continue
        for label, agg in (("median", statistics.median), ("worst", max)):
            cells = " | ".join(f"{agg([r.phase(p) for r in mine]):.2f}" for p in PHASES)
            total = agg([r.total_s for r in mine])
            verdict = "met" if total <= target else "missed"
            lines.append(f"| {turn} ({len(mine)}) | {label} | {cells} | {target:.1f} | {verdict} |")
    return "\n".join(lines)


def per_answer(rows: list[Answer]) -> str:
    lines = ["| image | turn | question | answer | " + " | ".join(f"{p} s" for p in PHASES)
             + " | prompt tokens | prefilled | new tokens |",
             "|---|---|---|---|" + "---:|" * (len(PHASES) + 3)]
    for r in rows:
        cells = " | ".join(f"{r.phase(p):.2f}" for p in PHASES)
        lines.append(f"| {r.image.split(':')[-1]} | {r.turn} | {ev.one_line(r.question, 50)} | "
                     f"{ev.one_line(r.answer, 50)} | {cells} | {r.prompt_tokens} | "
                     f"{r.prompt_tokens - r.reused_tokens} | {r.new_tokens} |")
    return "\n".join(lines)


def per_expert(rows: list[Answer]) -> str:
    """Each expert's own run time on a new image (they run in parallel, so these overlap)."""
    names = sorted({n for r in rows for n in r.expert_s})
    lines = ["| expert | median s | worst s | worst on |", "|---|---:|---:|---|"]
    for name in names:
        times = [(r.expert_s[name], r.image.split(":")[-1]) for r in rows if name in r.expert_s]
        worst = max(times)
        lines.append(f"| {name} | {statistics.median(t for t, _ in times):.2f} | {worst[0]:.2f} | {worst[1]} |")
    return "\n".join(lines)


def split_argv(argv: list[str] | None) -> tuple[argparse.Namespace, list[str]]:
    """Our own flags, and the rest, which go to the app's parser untouched."""
    p = argparse.ArgumentParser(prog="scripts/bench_answer.py", description=__doc__.splitlines()[0],
                                allow_abbrev=False, epilog="Every other flag is the app's (python -m app --help), "
                                "e.g. --model, --device, --dtype, --detector, --experts, --prompt-style.")
    p.add_argument("--images", type=int, default=len(PHOTOS), help="photos to time (default: all %(default)s)")
    p.add_argument("--new-tokens", type=int, default=20, help="answer length cap (default: %(default)s)")
    p.add_argument("--full-length", action="store_true",
                   help="ignore the model's end-of-turn tokens, so that every answer is --new-tokens long "
                        "(the issue's 20-token answer, whatever the model would have said)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own choice)")
    p.add_argument("--json", type=Path, default=None, metavar="FILE", help="also write every answer's figures")
    p.add_argument("--toy-world", action="store_true", help="the demo model alone on toy-world images")
    p.add_argument("--repeats", type=int, default=None, help="toy-world answers to time (implies --toy-world)")
    p.add_argument("--question", default=TOY_QUESTION, help="the toy-world question")
    return p.parse_known_args(argv)


def photos(ours: argparse.Namespace, rest: list[str]) -> int:
    import logging

    import torch

    logging.basicConfig(level=logging.WARNING, format="%(message)s", stream=sys.stderr)
    if ours.threads:
        torch.set_num_threads(ours.threads)
    load_start = load_1min()
    from weights.offline import forbid_implicit_downloads

    forbid_implicit_downloads()  # before the experts' libraries are imported: nothing may download
    from app.__main__ import build_app, build_parser
    from multimodal.threads import timings_text

    args = build_parser().parse_args(ev.app_argv(rest))
    start = time.perf_counter()
    app = build_app(args)
    build_s = time.perf_counter() - start
    if app.engine is None:
        print(f"no model could be loaded: {app.load_error}", file=sys.stderr)
        return 1
    if ours.full_length:
        from bench.timing import NoStops

        app.engine.tokenizer = NoStops(app.engine.tokenizer)
    probe = Probe(app)
    experts = list(app.expert_names)
    available = [n for n, why in app.expert_availability().items() if why is None]
    start = time.perf_counter()
    warm = ask(app, probe, warm_up_image(), "warm-up", "first", "What is in the picture?", [], experts, ours.new_tokens)
    ask(app, probe, warm_up_image(), "warm-up", "follow-up", "What does the text say?",
        [[warm.question, warm.answer]], experts, ours.new_tokens)
    warm_s = time.perf_counter() - start

    rows: list[Answer] = []
    for ref, path, first_q, follow_q in photo_questions(ours.images):
        first = ask(app, probe, str(path), ref, "first", first_q, [], experts, ours.new_tokens)
        follow = ask(app, probe, str(path), ref, "follow-up", follow_q, [[first.question, first.answer]], experts,
                     ours.new_tokens)
        rows += [first, follow]
    load_end = load_1min()

    engine = app.engine
    card = app.card.short if app.card is not None else "model"
    dtype = str(engine.model.dtype).removeprefix("torch.")
    print(f"### Answer time end to end: {card}, {engine.model.device.type} {dtype}, "
          f"experts: {', '.join(available) or 'none'}\n")
    print(f"CPU: {cpu_name()}, {os.cpu_count()} logical CPUs; torch threads {torch.get_num_threads()}; "
          f"OMP_WAIT_POLICY {os.environ.get('OMP_WAIT_POLICY', 'unset')}; "
          f"THP_MEM_ALLOC_ENABLE {os.environ.get('THP_MEM_ALLOC_ENABLE', 'unset')}; "
          f"load average (1 min) {load_start:.2f} at start, {load_end:.2f} at end.")
    measured = timings_text(engine.decode_timings)
    print(f"Decoding steps on {engine.decode_threads} thread(s)"
          + (f" (a step timed at load: {measured})." if measured else "."))
    length = f"of exactly {ours.new_tokens}" if ours.full_length else f"of at most {ours.new_tokens}"
    print(f"Greedy answers {length} new tokens through ChatApp.api_chat; prompt style "
          f"{app.prompt_style}. App built in {build_s:.1f} s (model load and experts' set-up); then the model "
          f"and every expert answered once about an unrelated drawn image ({warm_s:.1f} s, not counted).\n")
    if not rows:
        print("No photo was found: nothing timed.")
        return 1
    print(summary(rows))
    print("\nEach expert on a new image (they run at the same time, in threads):\n")
    print(per_expert(rows))
    print("\nEvery answer (prefilled: prompt tokens whose keys/values were not cached from the previous request):\n")
    print(per_answer(rows))
    if ours.json is not None:
        ours.json.parent.mkdir(parents=True, exist_ok=True)
        payload = {"model": card, "experts": available, "cpu": cpu_name(), "threads": torch.get_num_threads(),
                   "decode_threads": engine.decode_threads, "decode_timings": engine.decode_timings,
                   "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
                   "thp_mem_alloc_enable": os.environ.get("THP_MEM_ALLOC_ENABLE"), "load_1min": [load_start, load_end],
                   "build_s": build_s, "warm_up_s": warm_s,
                   "answers": [asdict(r) | {"other_s": r.other_s} for r in rows]}
        ours.json.write_text(json.dumps(payload, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    return 0


def toy_world(ours: argparse.Namespace) -> int:
    """The demo model alone: fresh toy-world images through Engine.complete, caches forgotten each time."""
    import random

    import torch

    from multimodal.generate import Engine, GenerationStats, SamplingParams
    from multimodal.options import ModelOptions
    from multimodal.prompt import format_prompt
    from multimodal.toyworld import render, sample_scene

    repeats = ours.repeats if ours.repeats is not None else 10
    threads = ours.threads or 2
    torch.set_num_threads(threads)
    start = time.perf_counter()
    engine = Engine(ModelOptions(model="demo", device="cpu").load())
    load_s = time.perf_counter() - start
    question_tokens = len(engine.tokenizer.encode(ours.question, bos=False))
    params = SamplingParams(max_new_tokens=32, temperature=0.0)
    rng = random.Random(0)
    size = engine.model.config.clip.image_size
    rows = []
    for i in range(repeats + 1):  # the first is a warm-up (allocator, kernels), not reported
        image = render(sample_scene(rng, fix={"count": "one"}), size)
        engine.forget()
        stats = GenerationStats()
        t = time.perf_counter()
        answer = engine.complete(format_prompt(ours.question), image, params, stats=stats)
        total = time.perf_counter() - t
        if i:
            rows.append((total, stats.first_token_s, stats.prompt_tokens, stats.new_tokens, answer.strip()))
    totals = [r[0] for r in rows]
    print(f"### One answer end to end, demo model, cpu float32, {threads} threads\n")
    print(f"Question: {ours.question!r} ({question_tokens} tokens; {rows[0][2]} prompt tokens with the template)\n")
    print("| repeat | answer | new tokens | first token s | total s |")
    print("|---:|---|---:|---:|---:|")
    for i, (total, first, _, new, answer) in enumerate(rows, 1):
        print(f"| {i} | {answer} | {new} | {first:.3f} | {total:.3f} |")
    print(f"\nMedian {statistics.median(totals):.3f} s, max {max(totals):.3f} s per answer "
          f"(model load {load_s:.2f} s, once).")
    return 0


def main(argv: list[str] | None = None) -> int:
    ours, rest = split_argv(argv)
    if ours.toy_world or ours.repeats is not None:
        return toy_world(ours)
    return photos(ours, rest)


if __name__ == "__main__":
    sys.exit(main())
