"""Expert interface, runner (cache, concurrency, failure isolation), caption, context block, and the
pure helpers (plurals, positions, reading order). No model is loaded here; see
test_experts_models.py for the real detector and OCR on the fixtures."""
from __future__ import annotations

import io
import socket
import sys
import threading
import time
import types
from pathlib import Path

import pytest
from PIL import Image

from experts import (
    CaptionExpert, EasyOCRBackend, Expert, ExpertResult, ExpertRunner, OCRExpert, Output, build_context,
)
from experts.base import to_rgb
from experts.context import as_prose, rough_token_count
from experts.describe import count_phrase, plural, region, regions_phrase
from experts.detection import DetectionExpert, describe_detections
from experts.ocr.layout import TextBox, reading_order
from experts.ocr.rapid_backend import restore_spaces
from experts.runner import image_digest


@pytest.fixture
def empty_weights(tmp_path, monkeypatch) -> Path:
    """A weights folder with nothing in it, so every manifest file is missing."""
    monkeypatch.setenv("MM_WEIGHTS_DIR", str(tmp_path))
    return tmp_path


def solid(colour=(200, 10, 10), size=(32, 24)) -> Image.Image:
    return Image.new("RGB", size, colour)


class CountingExpert(Expert):
    """Stub expert: counts calls, optionally sleeps, fails, or waits on a barrier."""

    def __init__(self, name: str, delay: float = 0.0, fail: bool = False, barrier=None, setting=0) -> None:
        super().__init__()
        self.name, self.delay, self.fail, self.barrier, self.setting = name, delay, fail, barrier, setting
        self.calls = 0

    def unavailable_reason(self):
        return None

    def settings(self):
        return {"setting": self.setting}

    def _run(self, image):
        self.calls += 1
        if self.barrier is not None:
            self.barrier.wait(timeout=5)  # both experts must be inside _run at once
        time.sleep(self.delay)
        if self.fail:
            raise RuntimeError("backend exploded")
        return Output(context=f"{self.name} saw {image.size[0]}x{image.size[1]}", data={"n": self.calls})


# -- base ---------------------------------------------------------------------------------

def test_run_turns_exceptions_into_failed_results_with_time():
    result = CountingExpert("x", delay=0.01, fail=True).run(solid())
    assert result.status == "failed" and not result.ok
    assert result.error == "RuntimeError: backend exploded"
    assert result.seconds >= 0.01 and result.context == ""


def test_to_rgb_puts_transparency_on_white():
    rgba = Image.new("RGBA", (4, 4), (0, 0, 0, 0))
    assert to_rgb(rgba).getpixel((0, 0)) == (255, 255, 255)
    with pytest.raises(TypeError):
        to_rgb("not an image")  # type: ignore[arg-type]


# -- runner ---------------------------------------------------------------------------------

def test_cache_serves_second_run_and_reruns_for_a_changed_image():
    expert = CountingExpert("stub")
    with ExpertRunner([expert]) as runner:
        first, = runner.run(solid())
        again, = runner.run(solid())  # a new but identical image: same pixels, same key
        assert expert.calls == 1
        assert again.cached and not first.cached and again.context == first.context
        assert again.seconds == first.seconds  # the run time of the run that produced it
        changed = solid()
        changed.putpixel((0, 0), (0, 0, 0))
        runner.run(changed)
        assert expert.calls == 2
        expert.setting = 1  # a settings change is a different key too
        runner.run(solid())
        assert expert.calls == 3


def test_digest_depends_on_pixels_not_file_format():
    img = solid()
    png, bmp = io.BytesIO(), io.BytesIO()
    img.save(png, "PNG")
    img.save(bmp, "BMP")
    from experts.runner import load_image
    assert image_digest(load_image(png.getvalue())) == image_digest(load_image(bmp.getvalue()))
    assert image_digest(img) != image_digest(solid((0, 0, 0)))


def test_failing_expert_does_not_stop_the_others_and_is_not_cached():
    good, bad = CountingExpert("good"), CountingExpert("bad", fail=True)
    with ExpertRunner([good, bad]) as runner:
        results = {r.name: r for r in runner.run(solid())}
        assert results["good"].ok and results["good"].context == "good saw 32x24"
        assert results["bad"].status == "failed" and "backend exploded" in results["bad"].error
        runner.run(solid())
        assert bad.calls == 2 and good.calls == 1  # failures are retried, successes cached


def test_selected_experts_run_concurrently():
    barrier = threading.Barrier(2)
    a, b = CountingExpert("a", barrier=barrier), CountingExpert("b", barrier=barrier)
    with ExpertRunner([a, b]) as runner:
        results = runner.run(solid(), selected=["b", "a"])
    assert [r.name for r in results] == ["b", "a"]  # order asked for
    assert all(r.ok for r in results), [r.error for r in results]  # a barrier timeout would fail them


def test_concurrent_requests_for_one_image_compute_once():
    slow = CountingExpert("slow", delay=0.3)
    with ExpertRunner([slow]) as runner:
        out: list[ExpertResult] = []
        threads = [threading.Thread(target=lambda: out.extend(runner.run(solid()))) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert slow.calls == 1 and len(out) == 4 and all(r.ok for r in out)


def test_broken_image_gives_failed_results_not_an_exception():
    with ExpertRunner([CountingExpert("x"), CaptionExpert(None, "no model")]) as runner:
        broken = runner.run(b"\x89PNG\r\n\x1a\nnot really a png")
        missing = runner.run(Path("/nonexistent/image.png"))
        with pytest.raises(ValueError, match="unknown expert"):
            runner.run(solid(), selected=["nope"])
    assert broken[0].status == "failed" and broken[0].error.startswith("could not read image")
    assert "No such file" in missing[0].error
    assert broken[1].status == "unavailable" and broken[1].error == "no model"


def test_timeout_reports_failure():
    with ExpertRunner([CountingExpert("slow", delay=0.5)]) as runner:
        result, = runner.run(solid(), timeout=0.05)
    assert result.status == "failed" and "timed out" in result.error


# -- caption --------------------------------------------------------------------------------

def test_caption_calls_captioner_once_per_image_and_caches():
    seen: list[tuple[int, int]] = []

    def captioner(image: Image.Image) -> str:
        seen.append(image.size)
        return "  A red\nsquare. "

    caption = CaptionExpert(captioner, model_id="stub")
    assert caption.available
    with ExpertRunner([caption]) as runner:
        first, = runner.run(solid())
        second, = runner.run(solid())
        runner.run(solid(size=(10, 10)))
    assert first.context == "Caption: A red square." and first.data == {"caption": "A red square."}
    assert second.cached and seen == [(32, 24), (10, 10)]


def test_caption_unavailable_and_failures():
    missing = CaptionExpert(None, unavailable_reason="caption adapter file missing: weights/x.pth")
    assert not missing.available
    assert missing.run(solid()).error == "caption adapter file missing: weights/x.pth"
    assert "no captioning model" in CaptionExpert(None).unavailable_reason()

    def broken(image):
        raise RuntimeError("CUDA out of memory")

    failed = CaptionExpert(broken).run(solid())
    assert failed.status == "failed" and failed.error == "RuntimeError: CUDA out of memory"
    assert CaptionExpert(lambda im: "   ").run(solid()).error == "ValueError: captioner returned an empty caption"


# -- context block --------------------------------------------------------------------------

def results_for_context() -> list[ExpertResult]:
    return [
        ExpertResult("caption", "ok", context="Caption: a bus on a street."),
        ExpertResult("detection", "ok", context="Objects detected: 4 people (2 left, 1 centre, 1 right), 1 bus (centre)."),
        ExpertResult("ocr", "ok", context="\n".join(f'"line number {i}"' for i in range(1, 21))),
        ExpertResult.failed("broken", "RuntimeError: boom"),
    ]


def test_context_names_the_source_of_every_fact():
    block = build_context(results_for_context(), max_tokens=10_000)
    lines = block.text.splitlines()
    assert lines[0] == "[caption] Caption: a bus on a street."
    assert lines[1].startswith("[detection] Objects detected: 4 people")
    assert lines[2] == '[ocr] "line number 1"' and len(lines) == 22
    assert not block.truncated and block.skipped == {"broken": "RuntimeError: boom"}
    assert "boom" not in block.text


def test_context_respects_budget_and_says_what_was_cut():
    full = build_context(results_for_context(), max_tokens=10_000)
    budget = full.tokens // 2
    block = build_context(results_for_context(), max_tokens=budget, count_tokens=rough_token_count)
    assert block.tokens <= budget
    assert rough_token_count(block.text) <= budget
    assert block.included["caption"] == 1 and block.included["detection"] == 1
    assert 1 <= block.included["ocr"] < 20 and block.dropped == {"ocr": 20 - block.included["ocr"]}
    last = block.text.splitlines()[-1]
    assert last == f"[context] cut for length: ocr ({block.dropped['ocr']} of 20 lines)"
    kept_ocr = [l for l in block.text.splitlines() if l.startswith("[ocr]")]
    assert kept_ocr == [f'[ocr] "line number {i}"' for i in range(1, len(kept_ocr) + 1)]  # reading order


def test_context_with_tiny_budget_and_custom_counter():
    by_chars = len  # any callable: the app passes its tokenizer
    block = build_context(results_for_context(), max_tokens=5, count_tokens=by_chars)
    assert block.text == "" and block.tokens == 0 and set(block.dropped) == {"caption", "detection", "ocr"}
    block = build_context(results_for_context(), max_tokens=120, count_tokens=by_chars)
    assert len(block.text) <= 120 and block.text.startswith("[caption]")
    assert "[context] cut for length: detection (1 of 1 line), ocr (20 of 20 lines)" in block.text


def test_detail_lines_get_room_only_after_every_experts_other_lines():
    results = [ExpertResult("detection", "ok", context="Objects detected: 1 bus (centre).\nColours: bus: blue."),
               ExpertResult("ocr", "ok", context='"CERO"\n"EMISIONES ELECTRIC BUS OF MADRID"\n'
                                                 'Text blocks: "CERO EMISIONES ELECTRIC BUS OF MADRID".')]
    everything = build_context(results, max_tokens=10_000, count_tokens=len).text
    without = "\n".join(line for line in everything.splitlines() if "Colours" not in line and "blocks" not in line)
    cut_note = "\n[context] cut for length: detection (1 of 2 lines), ocr (1 of 3 lines)"
    block = build_context(results, max_tokens=len(without + cut_note), count_tokens=len)
    # both OCR lines are kept before the detection's colours, though detection comes first
    assert block.text == without + cut_note and block.dropped == {"detection": 1, "ocr": 1}


# -- detection helpers (the model itself is in test_experts_models.py) ------------------------

def test_plurals_and_counts():
    assert [plural(x) for x in ("bus", "person", "wine glass", "couch", "car", "knife", "sheep")] == [
        "buses", "people", "wine glasses", "couches", "cars", "knives", "sheep"]
    assert count_phrase(1, "person") == "1 person" and count_phrase(3, "person") == "3 people"
    assert count_phrase(1, "skis") == "1 pair of skis" and count_phrase(2, "skis") == "2 pairs of skis"


def test_positions_on_a_3x3_grid():
    w, h = 300, 300
    assert region((0, 0, 20, 20), w, h) == "top left"
    assert region((140, 140, 160, 160), w, h) == "centre"
    assert region((280, 140, 300, 160), w, h) == "right"
    assert region((140, 280, 160, 300), w, h) == "bottom centre"
    assert regions_phrase(["left", "right", "left"]) == "2 left, 1 right"
    assert regions_phrase(["centre", "centre"]) == "centre"


def test_describe_detections_orders_by_count():
    dets = [{"label": "bus", "score": 0.8, "position": "centre"}] + [
        {"label": "person", "score": 0.9, "position": p} for p in ("left", "left", "right")]
    assert describe_detections(dets) == "Objects detected: 3 people (2 left, 1 right), 1 bus (centre)."
    assert describe_detections([]) == "No objects detected."


def test_detector_with_missing_file_is_unavailable(tmp_path, empty_weights):
    explicit = DetectionExpert(model_path=tmp_path / "nope.onnx")
    assert explicit.unavailable_reason() == f"detector weights not found: {tmp_path / 'nope.onnx'}"
    reason = DetectionExpert().unavailable_reason()
    assert "yolov8n.pt" in reason and "python -m weights fetch yolov8n" in reason
    assert DetectionExpert().run(solid()).status == "unavailable"


# -- OCR layout, spaces, EasyOCR wiring ------------------------------------------------------

def tb(text: str, x0: float, y0: float, x1: float, y1: float) -> TextBox:
    return TextBox(text, ((x0, y0), (x1, y0), (x1, y1), (x0, y1)), 0.9)


def test_reading_order_rows_then_columns():
    boxes = [tb("LIMIT", 100, 52, 150, 70), tb("world", 60, 10, 110, 30), tb("SPEED", 100, 40, 150, 55),
             tb("hello", 0, 12, 50, 31), tb("far", 400, 11, 440, 29)]
    lines = [line.text for line in reading_order(boxes)]
    assert lines == ["hello world | far", "SPEED", "LIMIT"]


def test_restore_spaces_uses_character_gaps():
    chars = list("ab") + list("cd")
    quads = [[[x, 0], [x + 8, 0], [x + 8, 20], [x, 20]] for x in (0, 9, 25, 34)]  # gap of 8 before 'c'
    line = [[0, 0], [42, 0], [42, 20], [0, 20]]
    assert restore_spaces(chars, quads, line, 0.85) == "ab cd"
    assert restore_spaces(chars, quads, line, 1.5) == "abcd"
    assert restore_spaces(chars[:3], quads, line, 0.85) == ""  # mismatched data: keep original


def test_easyocr_missing_files_is_unavailable_and_auto_falls_back(tmp_path, empty_weights):
    explicit = EasyOCRBackend(model_dir=tmp_path)
    reason = explicit.unavailable_reason()
    assert "craft_mlt_25k.pth" in reason and "english_g2.pth" in reason and str(tmp_path) in reason
    default_reason = EasyOCRBackend().unavailable_reason()
    assert "craft_mlt_25k.pth" in default_reason and "python -m weights fetch easyocr-craft" in default_reason

    auto = OCRExpert("auto", easyocr=explicit)
    chosen, why = auto.backend()
    assert why is None and chosen.name == "rapidocr" and auto.settings()["backend"] == "rapidocr"
    forced = OCRExpert("easyocr", easyocr=explicit)
    assert forced.unavailable_reason() == reason and forced.run(solid()).status == "unavailable"


def test_easyocr_backend_reads_local_files_with_downloads_off(tmp_path, monkeypatch):
    """EasyOCR's model files are not obtainable here, so easyocr.Reader is replaced by a recorder:
    this pins how the backend calls it (local folder, downloads off) and how it maps results."""
    for name in ("craft_mlt_25k.pth", "english_g2.pth"):
        (tmp_path / name).write_bytes(b"stub")
    created: list[dict] = []

    class FakeReader:
        def __init__(self, langs, **kwargs):
            created.append({"langs": langs, **kwargs})

        def readtext(self, array, detail, paragraph):
            assert array.shape == (24, 32, 3) and detail == 1 and paragraph is False
            return [([[0, 30], [40, 30], [40, 40], [0, 40]], "LIMIT", 0.9),
                    ([[0, 10], [40, 10], [40, 20], [0, 20]], "SPEED", 0.8),
                    ([[0, 50], [9, 50], [9, 60], [0, 60]], "x", 0.1)]

    monkeypatch.setitem(sys.modules, "easyocr", types.SimpleNamespace(Reader=FakeReader))
    backend = EasyOCRBackend(model_dir=tmp_path)
    expert = OCRExpert("auto", easyocr=backend)
    assert expert.backend()[0] is backend
    result = expert.run(solid())
    assert result.ok, result.error
    assert result.context == '"SPEED"\n"LIMIT"' and result.data["backend"] == "easyocr"
    assert created[0]["download_enabled"] is False and created[0]["langs"] == ["en"]
    assert created[0]["model_storage_directory"] == str(tmp_path)
    assert created[0]["user_network_directory"].startswith(str(tmp_path))


def test_network_guard_is_active(no_network):
    with pytest.raises(OSError):
        socket.create_connection(("192.0.2.1", 80), timeout=1)
    assert no_network and "192.0.2.1" in str(no_network.pop())  # recorded, then cleared


def test_prose_gives_one_sentence_per_expert_and_leaves_out_what_found_nothing():
    block = "\n".join(["[detection] Objects detected: 2 people (1 centre, 1 right), 1 tie (bottom centre).",
                       "[classification] Image class (ImageNet classifier): suit 0.40, bow tie 0.10",
                       "[ocr] No text found.",
                       '[ocr] "SALE"', '[ocr] "50%"',
                       "a line the user typed"])
    assert as_prose(block).splitlines() == [
        "Objects detected: 2 people (1 centre, 1 right), 1 tie (bottom centre).",
        "What the whole image looks like: suit 0.40, bow tie 0.10.",
        'Text written in the image: "SALE", "50%".',
        "a line the user typed",
    ]
    assert as_prose("[ocr] No text found.\n[detection] No objects detected.") == ""
