"""scripts/bench_answer.py: it times answers through the app's own path and reports them in the documented
shape (phases per turn, medians and the worst case, per expert, per answer), and its older toy-world mode
still works. How fast the answers are is not checked: that is the script's output, not a property."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from conftest import REPO_ROOT, load_script, fixture_path

SCRIPT = REPO_ROOT / "scripts" / "bench_answer.py"
NUMBER = r"\d+\.\d\d"



ba = load_script("bench_answer")


def _answer(turn: str, total: float, experts: float = 0.5, first: float = 0.2, decode: float = 0.3) -> object:
    return ba.Answer(image="fixtures:images/x.jpg", turn=turn, question="Q?", answer="A.", total_s=total,
                     experts_s=experts, first_token_s=first, decode_s=decode, prompt_tokens=100,
                     reused_tokens=60, new_tokens=5)


def test_flags_of_the_app_pass_through_and_repeats_selects_the_toy_world() -> None:
    ours, rest = ba.split_argv(["--model", "smollm2", "--images", "3", "--dtype", "float32", "--threads", "1"])
    assert (ours.images, ours.threads, ours.toy_world) == (3, 1, False)
    assert rest == ["--model", "smollm2", "--dtype", "float32"]
    ours, rest = ba.split_argv(["--repeats", "4"])
    assert ours.repeats == 4 and rest == []


def test_summary_gives_median_and_worst_per_phase_against_each_target() -> None:
    rows = [_answer("first", 2.0), _answer("first", 4.0), _answer("first", 2.5),
            _answer("follow-up", 1.0, experts=0.01), _answer("follow-up", 1.2, experts=0.01)]
    lines = ba.summary(rows).splitlines()
    assert lines[0].startswith("| turn | | experts s | other s | first token s | decode s | total s | target |")
    by_label = {tuple(c.strip() for c in ln.split("|")[1:3]): [c.strip() for c in ln.split("|")[3:-1]]
                for ln in lines[2:]}
    first_median = by_label[("first (3)", "median")]
    assert first_median[4] == "2.50" and first_median[5] == "3.0" and first_median[6] == "met"
    first_worst = by_label[("first (3)", "worst")]
    assert first_worst[4] == "4.00" and first_worst[6] == "missed"
    assert first_worst[1] == "3.00"  # other = total - experts - first token - decode of the worst answer
    assert by_label[("follow-up (2)", "worst")][5:] == ["1.5", "met"]


def test_the_script_runs_end_to_end_on_one_photo_with_the_demo_model(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """One photo, a first question and a follow-up, through build_parser -> build_app -> api_chat."""
    fixture_path("images/bus.jpg")  # the first photo of the script's list; skips, naming it, when absent
    out_json = tmp_path / "answers.json"
    assert ba.main(["--model", "demo", "--device", "cpu", "--images", "1", "--json", str(out_json)]) == 0
    out = capsys.readouterr().out
    assert out.startswith("### Answer time end to end: demo (toy world), cpu float32, experts: ")
    assert re.search(r"^CPU: .+, \d+ logical CPUs; torch threads \d+; OMP_WAIT_POLICY \S+; THP_MEM_ALLOC_ENABLE \S+; load average \(1 min\) "
                     rf"{NUMBER} at start, {NUMBER} at end\.$", out, re.MULTILINE), out
    assert "answered once about an unrelated drawn image" in out
    for turn, target in (("first (1)", "3.0"), ("follow-up (1)", "1.5")):
        for label in ("median", "worst"):
            row = rf"^\| {re.escape(turn)} \| {label} \|( {NUMBER} \|){{5}} {target} \| (met|missed) \|$"
            assert re.search(row, out, re.MULTILINE), (turn, label, out)
    assert "| expert | median s | worst s | worst on |" in out
    answer_rows = [ln for ln in out.splitlines() if ln.startswith("| images/bus.jpg |")]
    assert [ln.split("|")[2].strip() for ln in answer_rows] == ["first", "follow-up"]

    payload = json.loads(out_json.read_text())
    first, follow = payload["answers"]
    assert (first["turn"], follow["turn"]) == ("first", "follow-up")
    assert first["question"] == "How many people are in the photo?"  # the development set's, for bus.jpg
    for a in (first, follow):
        parts = a["experts_s"] + a["other_s"] + a["first_token_s"] + a["decode_s"]
        assert parts == pytest.approx(a["total_s"], abs=1e-6)
        assert 0 <= a["reused_tokens"] < a["prompt_tokens"] and 0 <= a["new_tokens"] <= 20
        assert a["footer"]  # the page's footer for the answer
    ran = [n for n in first["expert_s"]]
    assert ran and set(ran) <= {"caption", "ocr", "detection", "classification"}
    assert follow["expert_s"] == {}, "the follow-up must find every expert's result cached"
    assert payload["threads"] >= 1 and len(payload["load_1min"]) == 2


def test_the_toy_world_mode_still_times_the_demo_model(capsys: pytest.CaptureFixture[str]) -> None:
    assert ba.main(["--toy-world", "--repeats", "2"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("### One answer end to end, demo model, cpu float32")
    assert re.search(r"^Median \d+\.\d{3} s, max \d+\.\d{3} s per answer", out, re.MULTILINE), out
    assert len([ln for ln in out.splitlines() if re.match(r"^\| \d+ \|", ln)]) == 2


def test_full_length_makes_every_answer_exactly_the_cap(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """--full-length: the model's end-of-turn tokens are ignored, so the 20-token answer of the target is timed
    as 20 tokens even where the model would stop sooner (the demo model answers in a word or two)."""
    fixture_path("images/bus.jpg")
    out_json = tmp_path / "answers.json"
    assert ba.main(["--model", "demo", "--device", "cpu", "--images", "1", "--new-tokens", "7", "--full-length",
                    "--json", str(out_json)]) == 0
    assert "Greedy answers of exactly 7 new tokens" in capsys.readouterr().out
    assert [a["new_tokens"] for a in json.loads(out_json.read_text())["answers"]] == [7, 7]
