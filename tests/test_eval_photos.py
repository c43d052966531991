"""scripts/eval_photos.py and its development set: the set is usable, answers are scored as documented,
and the script runs end to end through the app's own code path with the demo model."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from conftest import REPO_ROOT, load_script, fixture_path

SCRIPT = REPO_ROOT / "scripts" / "eval_photos.py"
SCORE = re.compile(r"^Score: (\d+)/(\d+) right \((\d+(?:\.\d+)?)%\)$", re.MULTILINE)



ev = load_script("eval_photos")
ITEMS = ev.load_set(ev.DEFAULT_SET)
CHECK_SET = ev.DEFAULT_SET.with_name("photos_check.json")  # questions not used to choose the prompt form
CHECK_ITEMS = ev.load_set(CHECK_SET)


@pytest.mark.parametrize("items", [ITEMS, CHECK_ITEMS], ids=["development", "check"])
def test_question_sets_are_well_formed(items: list) -> None:
    assert len(items) >= 16
    assert len({i.id for i in items}) == len(items), "item ids must be unique"
    for item in items:
        assert item.question.strip().endswith("?"), item.id
        assert item.answers and all(a.strip() for a in item.answers), item.id
        assert item.experts and set(item.experts) <= set(ev.EXPERT_NAMES), item.id
        # An accepted answer that is also rejected could never be right.
        assert not any(ev.contains(a, r) for a in item.answers for r in item.reject), item.id
    assert {e for i in items for e in i.experts} >= {"detection", "ocr"}
    assert len({i.image for i in items}) >= 10, "the set should cover many different photos"


def test_the_check_set_asks_other_questions() -> None:
    asked = {(i.image, ev.normalise(i.question)) for i in ITEMS}
    assert not [i.id for i in CHECK_ITEMS if (i.image, ev.normalise(i.question)) in asked]
    assert {i.image for i in CHECK_ITEMS} - {i.image for i in ITEMS}, "the check set should add photos"


@pytest.mark.parametrize("image", sorted({i.image for i in ITEMS + CHECK_ITEMS}))
def test_every_image_of_the_set_exists(image: str) -> None:
    path = ev.resolve_image(image, ev.DEFAULT_SET.parent)
    if not path.is_file():
        pytest.skip(f"image file missing: {path} (fixtures: set MM_FIXTURES; skimage: pip install scikit-image)")
    from PIL import Image

    with Image.open(path) as im:
        im.verify()


@pytest.mark.parametrize("answer, accepted, right", [
    ("There are 4 people.", ["4", "four"], True),
    ("Four people are walking.", ["4", "four"], True),
    ("I can see 14 people.", ["4", "four"], False),
    ("I don't know.", ["no"], False),
    ("No, there is no dog.", ["no"], True),
    ("Musée du LOUVRE", ["musee du louvre"], True),
    ("The first line is: Reduce   your risk of coronavirus infection:", ["reduce your risk"], True),
    ("a motorcyclist", ["motorcycle"], False),
])
def test_answers_match_whole_words_ignoring_case_and_accents(answer: str, accepted: list[str], right: bool) -> None:
    item = ev.Item(id="t", image="x.png", question="?", answers=accepted, experts=["ocr"])
    assert ev.is_right(answer, item) is right


def test_a_rejected_phrase_makes_the_answer_wrong() -> None:
    item = ev.Item(id="t", image="x.png", question="Is there a bus?", answers=["yes"], experts=["detection"],
                   reject=["no"])
    assert ev.is_right("Yes, there is a bus.", item)
    assert not ev.is_right("Yes and no.", item)


@pytest.mark.parametrize("text, problem", [
    ("[]", "non-empty list"),
    ('{"items": [{"image": "a.png", "answers": ["x"]}]}', "has no question"),
    ('{"items": [{"image": "a.png", "question": "Q?", "answers": []}]}', "no accepted answers"),
    ('{"items": [{"image": "a.png", "question": "Q?", "answers": ["x"], "experts": ["radar"]}]}', "unknown expert"),
    ("{not json", "cannot read"),
])
def test_a_bad_set_file_is_refused_naming_the_file(tmp_path: Path, text: str, problem: str) -> None:
    path = tmp_path / "bad.json"
    path.write_text(text)
    with pytest.raises(ValueError, match=problem) as caught:
        ev.load_set(path)
    assert str(caught.value).startswith(str(path))
    assert len(str(caught.value).splitlines()) == 1


def test_app_flags_pass_through_and_the_detector_defaults_to_the_fixture(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MM_DETECTOR", raising=False)
    ours, rest = ev.split_argv(["--model", "demo", "--limit", "3", "--device", "cpu"])
    assert ours.limit == 3 and rest == ["--model", "demo", "--device", "cpu"]
    argv = ev.app_argv(rest)
    if ev.FIXTURE_DETECTOR.exists():
        assert argv[-2:] == ["--detector", str(ev.FIXTURE_DETECTOR)]
    assert ev.app_argv(["--detector", "mine.onnx"]) == ["--detector", "mine.onnx"]


def test_the_script_runs_end_to_end_with_the_demo_model(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Two items through build_parser -> build_app -> api_chat; the toy model scores near 0, which is fine."""
    for item in ITEMS[:2]:
        if item.image.startswith("fixtures:"):
            fixture_path(item.image.removeprefix("fixtures:"))  # skips, naming the file, when it is absent
    out_json = tmp_path / "rows.json"
    assert ev.main(["--model", "demo", "--device", "cpu", "--limit", "2", "--json", str(out_json)]) == 0
    out = capsys.readouterr().out
    assert "| image | question | answer | right? | seconds |" in out
    table_rows = [ln for ln in out.splitlines() if ln.startswith("| ") and not ln.startswith("| image |")]
    assert len(table_rows) == 2
    assert ITEMS[0].question in table_rows[0]
    score = SCORE.search(out)
    assert score is not None, out
    right, total, percent = int(score[1]), int(score[2]), float(score[3])
    assert total == 2 and 0 <= right <= 2 and percent == pytest.approx(100 * right / total, abs=0.05)
    rows = json.loads(out_json.read_text())["rows"]
    assert [r["id"] for r in rows] == [i.id for i in ITEMS[:2]]
    for r in rows:
        assert r["error"] == "" and r["seconds"] >= 0
        assert r["expert_status"].get("detection") in ("ok", "failed", "unavailable")
