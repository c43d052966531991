"""Answer quality on real photos: ask the app every question of a set, through the page's own code path.

    python scripts/eval_photos.py --model demo                  # the whole development set
    python scripts/eval_photos.py --model demo --limit 2        # a quick look
    python scripts/eval_photos.py --set held_out.json --json rows.json --llama-dir ... --adapter ...

The app is built exactly as `python -m app` builds it (`build_parser().parse_args(argv)`, then
`build_app(args)`), so every app and model flag passes through unchanged; `--detector` defaults to the
shared fixtures' detector when present. Each question goes to `ChatApp.api_chat` with every offered
expert switched on and greedy decoding (temperature 0, top_p 1, 48 new tokens), so that a score moves
only when the system does. Nothing is downloaded.

An answer is right when it contains one of the item's accepted answers as a whole word or phrase
(case- and accent-insensitive: "4" does not match "14", "no" does not match "know") and none of its
`reject` strings (so "yes and no" is not a right answer to a yes/no question).

Not a test: it prints a markdown table and "N/M right (P%)".
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import os
import re
import sys
import time
import unicodedata
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

DEFAULT_SET = Path(__file__).with_name("photos_dev.json")
FIXTURES = Path(os.environ.get("MM_FIXTURES", REPO_ROOT.parent / "shared" / "fixtures"))
FIXTURE_DETECTOR = FIXTURES / "detector" / "yolov8n_int8.onnx"
EXPERT_NAMES = ("caption", "ocr", "detection", "classification")
TEMPERATURE, TOP_P, MAX_NEW_TOKENS = 0.0, 1.0, 48
ANSWER_WIDTH = 90  # characters of an answer shown in the table


class SetFileError(ValueError):
    """A question set that cannot be used; the one-line message names the file and what is wrong.
    (Not a BaseFormatError: a question set is not model weights.)"""


@dataclass
class Item:
    """One question about one image, and what counts as a right answer."""

    id: str
    image: str  # "fixtures:images/bus.jpg", "skimage:chelsea.png", or a path relative to the set file
    question: str
    answers: list[str]
    experts: list[str]  # the experts whose output the answer should come from
    reject: list[str] = field(default_factory=list)


@dataclass
class Row:
    """What happened to one item: the JSON written by --json holds one per item."""

    id: str
    image: str
    question: str
    answer: str
    right: bool
    seconds: float
    expected_experts: list[str]
    expert_status: dict[str, str] = field(default_factory=dict)
    context: str = ""
    error: str = ""


# -- the set --------------------------------------------------------------------------------------


def skimage_data_dir() -> Path | None:
    """scikit-image's bundled photos, found without importing it (the import is slow)."""
    spec = importlib.util.find_spec("skimage")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0]) / "data"


def resolve_image(ref: str, base: Path) -> Path:
    """The file an item's image reference names (it may not exist; callers check)."""
    scheme, sep, rest = ref.partition(":")
    if sep and scheme == "fixtures":
        return FIXTURES / rest
    if sep and scheme == "skimage":
        data = skimage_data_dir()
        return (data if data is not None else Path("<scikit-image not installed>")) / rest
    return base / ref


def load_set(path: Path) -> list[Item]:
    """Read and check a question set: a JSON object with a list "items" (or a bare list)."""
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise SetFileError(f"{path}: cannot read the question set: {e}") from None
    entries = raw.get("items") if isinstance(raw, dict) else raw
    if not isinstance(entries, list) or not entries:
        raise SetFileError(f"{path}: expected a non-empty list of items (under \"items\")")
    items: list[Item] = []
    for n, entry in enumerate(entries):
        where = f"{path}: item {n}"
        if not isinstance(entry, dict):
            raise SetFileError(f"{where} is not an object")
        for key in ("image", "question"):
            if not isinstance(entry.get(key), str) or not entry[key].strip():
                raise SetFileError(f"{where} has no {key}")
        lists = {k: entry.get(k, []) for k in ("answers", "experts", "reject")}
        for key, value in lists.items():
            if not isinstance(value, list) or not all(isinstance(v, str) and v.strip() for v in value):
                raise SetFileError(f"{where}: {key} must be a list of non-empty strings")
        if not lists["answers"]:
            raise SetFileError(f"{where} has no accepted answers")
        unknown = [e for e in lists["experts"] if e not in EXPERT_NAMES]
        if unknown:
            raise SetFileError(f"{where}: unknown expert(s) {', '.join(unknown)}; "
                               f"choose from {', '.join(EXPERT_NAMES)}")
        items.append(Item(id=str(entry.get("id", n)), image=entry["image"], question=entry["question"],
                          answers=lists["answers"], experts=lists["experts"], reject=lists["reject"]))
    return items


# -- scoring --------------------------------------------------------------------------------------


def normalise(text: str) -> str:
    """Lower case, accents dropped ("Musée" == "musee"), runs of white space made one space."""
    decomposed = unicodedata.normalize("NFKD", text)
    plain = "".join(c for c in decomposed if not unicodedata.combining(c))
    return " ".join(plain.lower().split())


def contains(answer: str, phrase: str) -> bool:
    """Whether the phrase occurs in the answer as a whole word or phrase (not inside a longer word)."""
    pattern = r"(?<!\w)" + re.escape(normalise(phrase)) + r"(?!\w)"
    return re.search(pattern, normalise(answer)) is not None


def is_right(answer: str, item: Item) -> bool:
    return any(contains(answer, a) for a in item.answers) and not any(contains(answer, r) for r in item.reject)


# -- running --------------------------------------------------------------------------------------


def split_argv(argv: list[str] | None) -> tuple[argparse.Namespace, list[str]]:
    """Our own flags, and the rest, which go to the app's parser untouched."""
    p = argparse.ArgumentParser(
        prog="scripts/eval_photos.py", description=__doc__.splitlines()[0], allow_abbrev=False,
        epilog="Every other flag is the app's (see python -m app --help), e.g. --model, --llama-dir, --adapter, "
               "--detector, --device, --dtype.")
    p.add_argument("--set", type=Path, default=DEFAULT_SET, help="question set (JSON); default: %(default)s")
    p.add_argument("--json", type=Path, default=None, metavar="FILE", help="also write the rows to FILE")
    p.add_argument("--limit", type=int, default=None, metavar="N", help="only the first N items")
    return p.parse_known_args(argv)


def app_argv(rest: list[str]) -> list[str]:
    """The app's flags, with --detector pointed at the fixture detector unless one was chosen."""
    chosen = any(a == "--detector" or a.startswith("--detector=") for a in rest) or os.environ.get("MM_DETECTOR")
    if not chosen and FIXTURE_DETECTOR.exists():
        return [*rest, "--detector", str(FIXTURE_DETECTOR)]
    return list(rest)


def one_line(text: str, width: int = ANSWER_WIDTH) -> str:
    """An answer as one table cell: one line, no pipes, at most `width` characters."""
    flat = " ".join(text.split()).replace("|", "\\|")
    return flat if len(flat) <= width else flat[: width - 1] + "…"


def ask(app: Any, item: Item, image: Path, experts: list[str]) -> Row:
    """One item through `api_chat`; an error the app reports becomes a wrong row that says why."""
    from app.chat import ChatError

    start = time.perf_counter()
    answer, details, error = "", {}, ""
    try:
        answer, details = app.api_chat(str(image), item.question, [], experts, temperature=TEMPERATURE,
                                       top_p=TOP_P, max_new_tokens=MAX_NEW_TOKENS)
    except ChatError as e:
        error = str(e)
    seconds = time.perf_counter() - start
    return Row(id=item.id, image=item.image, question=item.question, answer=answer,
               right=not error and is_right(answer, item), seconds=round(seconds, 2),
               expected_experts=item.experts, expert_status=dict(details.get("experts", {})),
               context=details.get("context", ""), error=error)


def table(rows: list[Row]) -> str:
    lines = ["| image | question | answer | right? | seconds |", "|---|---|---|:---:|---:|"]
    for r in rows:
        shown = one_line(r.answer) if not r.error else one_line(f"ERROR: {r.error}")
        lines.append(f"| {r.image.split(':')[-1]} | {one_line(r.question)} | {shown} | "
                     f"{'yes' if r.right else 'no'} | {r.seconds:.1f} |")
    return "\n".join(lines)


def score_line(rows: list[Row]) -> str:
    right = sum(r.right for r in rows)
    percent = 100.0 * right / len(rows) if rows else 0.0
    return f"{right}/{len(rows)} right ({percent:.1f}%)"


def by_expert(rows: list[Row]) -> str:
    """Right answers grouped by the expert each item relies on (an item may count for several)."""
    parts = []
    for name in EXPERT_NAMES:
        mine = [r for r in rows if name in r.expected_experts]
        if mine:
            parts.append(f"{name} {sum(r.right for r in mine)}/{len(mine)}")
    return "By expected expert: " + ", ".join(parts) if parts else ""


def main(argv: list[str] | None = None) -> int:
    ours, rest = split_argv(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s", stream=sys.stderr)
    try:
        items = load_set(ours.set)
    except SetFileError as e:
        print(e, file=sys.stderr)
        return 2
    if ours.limit is not None:
        items = items[: max(ours.limit, 0)]
    present, missing = [], []
    for item in items:
        path = resolve_image(item.image, ours.set.parent)
        (present if path.is_file() else missing).append((item, path))
    for item, path in missing:
        print(f"skipped {item.id}: image file missing: {path}", file=sys.stderr)

    from weights.offline import forbid_implicit_downloads

    forbid_implicit_downloads()  # before the experts' libraries are imported: nothing may download
    from app.__main__ import build_app, build_parser

    args = build_parser().parse_args(app_argv(rest))
    app = build_app(args)
    if app.engine is None:
        print(f"no model could be loaded: {app.load_error}", file=sys.stderr)
        return 1
    experts = list(app.expert_names)  # every offered expert, switched on
    card = app.card.short if app.card is not None else "model"
    print(f"### {ours.set.name}: {card}; experts: {', '.join(experts) or 'none'}\n")

    rows = [ask(app, item, path, experts) for item, path in present]
    print(table(rows))
    print()
    print(by_expert(rows))
    if missing:
        print(f"{len(missing)} item(s) skipped: image file missing")
    print(f"Score: {score_line(rows)}")
    if ours.json is not None:
        ours.json.parent.mkdir(parents=True, exist_ok=True)
        payload = {"set": str(ours.set), "model": card, "experts": experts, "score": score_line(rows),
                   "rows": [asdict(r) for r in rows]}
        ours.json.write_text(json.dumps(payload, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
