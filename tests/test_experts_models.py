"""Real detector and OCR on the real fixtures (../shared/fixtures), with the network blocked.

Expected content comes from the fixtures' README: bus.jpg has a bus and 4 people, zidane.jpg 2
people (one wearing a tie), the OCR images the text listed there. Each model loads once per module.
"""
from __future__ import annotations

import sys

import pytest
from conftest import fixture_path
from PIL import Image

from experts import DetectionConfig, DetectionExpert, EasyOCRBackend, ExpertRunner, OCRExpert, RapidOCRBackend
from experts.__main__ import main as cli_main

DETECTOR = "detector/yolov8n_int8.onnx"


@pytest.fixture(scope="module")
def detector(no_network) -> DetectionExpert:
    return DetectionExpert(model_path=fixture_path(DETECTOR))


@pytest.fixture(scope="module")
def rapid_ocr(no_network) -> OCRExpert:
    return OCRExpert("rapidocr", rapidocr=RapidOCRBackend())


def image(name: str) -> Image.Image:
    return Image.open(fixture_path(f"images/{name}"))


# -- detection ------------------------------------------------------------------------------

def test_detection_on_bus_finds_people_and_a_bus(detector):
    result = detector.run(image("bus.jpg"))
    assert result.ok, result.error
    counts = result.data["counts"]
    assert counts.get("person", 0) >= 3 and counts.get("bus") == 1, counts
    assert counts["person"] == 4  # the README's 4 people (one is cut off at the left edge)
    assert "Objects detected: 4 people (" in result.context and "1 bus (centre)" in result.context
    bus = next(d for d in result.data["detections"] if d["label"] == "bus")
    assert bus["score"] > 0.7 and bus["position"] == "centre"  # the bus fills the middle of the photo
    assert result.annotated is not None and result.annotated.size == (810, 1080)


def test_detection_threshold_and_second_image(detector):
    loose = detector.run(image("bus.jpg")).data["detections"]
    strict = DetectionExpert(model_path=fixture_path(DETECTOR), config=DetectionConfig(conf=0.5))
    strict._model, strict._model_file = detector._load(), detector._model_file  # reuse the loaded model
    kept = strict.run(image("bus.jpg")).data["detections"]
    assert kept == [d for d in loose if d["score"] >= 0.5] and len(kept) < len(loose)
    assert all(d["score"] >= 0.25 for d in loose)
    zidane = detector.run(image("zidane.jpg"))
    assert zidane.data["counts"].get("person") == 2 and "tie" in zidane.data["counts"], zidane.data["counts"]
    assert zidane.context.startswith("Objects detected: 2 people (")


def test_each_detected_object_gets_the_colour_it_shows(detector):
    """Colours as the photos show them: the blue bus, the red motorcycle, the orange tabby cat."""
    from test_classification import skimage_photo

    bus = detector.run(image("bus.jpg"))
    assert next(d for d in bus.data["detections"] if d["label"] == "bus")["colour"] == "blue"
    assert bus.context.splitlines()[1].startswith("Colours: people: ") and "; bus: blue." in bus.context
    motorcycle = detector.run(skimage_photo("motorcycle_left.png").convert("RGB"))
    assert motorcycle.context.splitlines()[1] == "Colours: motorcycle: red."
    cat = detector.run(skimage_photo("chelsea.png").convert("RGB"))
    assert cat.data["detections"][0]["label"] == "cat" and cat.data["detections"][0]["colour"] in ("orange", "brown")


def test_ultralytics_was_imported_offline(detector):
    detector._load()
    import ultralytics.utils as uu

    assert uu.ONLINE is False and uu.AUTOINSTALL is False
    assert "ultralytics" in sys.modules


# -- OCR ------------------------------------------------------------------------------------

def test_rapidocr_reads_english_infographic_in_order(rapid_ocr):
    result = rapid_ocr.run(image("ocr_english.png"))  # RGBA file: alpha is flattened on white
    assert result.ok, result.error
    lines = [line["text"] for line in result.data["lines"]]
    assert "coronavirus" in result.data["text"]
    assert lines[0].startswith("Reduce your risk of coronavirus")  # the README's first line comes first
    assert result.context.splitlines()[0].startswith('"Reduce your risk')
    assert all(len(line["box"]) == 4 for line in result.data["lines"])


def test_rapidocr_reads_street_signs(rapid_ocr):
    result = rapid_ocr.run(image("ocr_street_signs.png"))
    text = result.data["text"]
    assert "SPEED" in text and "LIMIT" in text
    assert text.index("SPEED") < text.index("LIMIT")  # SPEED is painted above LIMIT
    assert "BASRURKAR" in text and "MARKET" in text


def test_rapidocr_reads_tilted_french_signs(rapid_ocr):
    text = rapid_ocr.run(image("ocr_french.jpg")).data["text"].lower()
    assert "louvre" in text and "palais" in text


def test_names_set_over_two_lines_are_joined_into_text_blocks(rapid_ocr):
    """The README's texts that a sign or poster sets over two lines come back as one block each: the
    poster's "World Health Organization", the French sign's "Theatre du Palais-Royal"."""
    poster = rapid_ocr.run(image("ocr_english.png")).context.splitlines()
    assert poster[-1].startswith("Text blocks: ") and '"World Health Organization"' in poster[-1]
    signs = rapid_ocr.run(image("ocr_french.jpg")).context.splitlines()
    assert signs[-1].startswith("Text blocks: ") and '"theatre du palais-royal"' in signs[-1].lower()
    assert all(line.startswith('"') for line in signs[:-1])  # the lines themselves, unchanged


def test_auto_ocr_uses_rapidocr_without_easyocr_files(rapid_ocr, tmp_path):
    auto = OCRExpert("auto", easyocr=EasyOCRBackend(model_dir=tmp_path), rapidocr=rapid_ocr.rapidocr)
    result = auto.run(image("ocr_street_signs.png"))
    assert result.ok and result.data["backend"] == "rapidocr" and "SPEED" in result.data["text"]


# -- everything together ----------------------------------------------------------------------

def test_runner_with_real_experts_caches_and_isolates(detector, rapid_ocr):
    with ExpertRunner([detector, rapid_ocr]) as runner:
        first = {r.name: r for r in runner.run(fixture_path("images/bus.jpg"))}
        second = {r.name: r for r in runner.run(image("bus.jpg"))}  # same pixels via another route
    assert first["detection"].ok and first["ocr"].ok
    assert all(r.cached for r in second.values()) and not any(r.cached for r in first.values())
    assert second["detection"].data == first["detection"].data


def test_cli_prints_each_expert(capsys, detector):
    code = cli_main([str(fixture_path("images/bus.jpg")), "--detector", str(fixture_path(DETECTOR)),
                     "--ocr-backend", "rapidocr", "--experts", "caption,detection"])
    out = capsys.readouterr().out
    assert code == 0
    assert "== caption: unavailable ==" in out and "no language model is loaded" in out
    assert "== detection: ok" in out and "people (" in out
    assert "[detection] Objects detected:" in out
