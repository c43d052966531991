"""The assistant a fresh machine gets: SmolLM2-135M-Instruct from its registry package, reading the
experts' findings (the fixture detector, RapidOCR, the ImageNet classifier), with nothing in the
weights folder. Real files only; each test skips naming the file it lacks."""
from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from gradio_client import Client, handle_file

from app.__main__ import build_app, build_parser
from app.chat import ChatApp
from app.page_examples import PHOTO_EXAMPLES, examples_for
from app.ui import build_demo
from conftest import fixture_path, serve_app
from weights.packaged import packaged


@pytest.fixture(scope="module")
def default_app(tmp_path_factory: pytest.TempPathFactory) -> ChatApp:
    weight = packaged("smollm2-135m-instruct")
    if weight.path() is None:
        pytest.skip(f"SmolLM2's GGUF file is not installed: {weight.member} ({weight.install})")
    detector = fixture_path("detector/yolov8n_int8.onnx")
    empty = tmp_path_factory.mktemp("no-weights")  # nothing downloaded, nothing linked
    return build_app(build_parser().parse_args(["--weights-dir", str(empty), "--detector", str(detector),
                                                "--device", "cpu"]))


@pytest.fixture(scope="module")
def url(default_app: ChatApp) -> Iterator[str]:
    with serve_app(default_app) as address:
        yield address


def test_the_default_is_smollm2_and_the_page_and_answers_say_so(default_app: ChatApp, url: str) -> None:
    assert default_app.card is not None and default_app.card.name == "SmolLM2-135M-Instruct"
    banner = next(c["props"]["value"] for c in build_demo(default_app).config["components"]
                  if c["props"].get("elem_id") == "banner")
    assert "Model: SmolLM2-135M-Instruct" in banner and "experts' findings" in banner
    answer, details = Client(url, verbose=False).predict(None, "What is the capital of France?", [], [], 0.0, 1.0,
                                                         16, api_name="/chat")
    assert "Paris" in answer and "model: SmolLM2-135M" in details["stats"]


def test_it_answers_a_count_and_a_reading_question_from_the_experts(default_app: ChatApp) -> None:
    everything = default_app.expert_names
    assert {"detection", "ocr", "classification"} <= set(everything)
    count, details = default_app.api_chat(fixture_path("images/bus.jpg"), "How many people are in the photo?", [],
                                          everything, 0.0, 1.0, 32)
    assert "4 people" in details["context"]  # the detector's finding reached the prompt
    assert "4" in count or "four" in count.lower(), count
    reading, details = default_app.api_chat(fixture_path("images/ocr_street_signs.png"),
                                            "What numbers are on the speed limit sign?", [], everything, 0.0, 1.0, 32)
    assert "50 40" in details["context"]
    assert "50" in reading and "40" in reading, reading


def test_every_example_shown_for_the_default_model_is_answered_right(default_app: ChatApp) -> None:
    shown = [e for e in examples_for(default_app.card) if e.path.exists()]
    assert shown and set(shown) <= set(PHOTO_EXAMPLES)
    for example in shown:
        answer, _ = default_app.api_chat(example.path, example.question, [], default_app.expert_names, 0.0, 1.0, 32)
        assert example.is_right(answer), (example.file, answer)


def test_yes_no_questions_follow_what_the_experts_found(default_app: ChatApp) -> None:
    """The findings check under a yes/no question (experts/presence.py): a bus the detector found is
    answered "yes", a dog that nothing reported "no" (before the check the model said "No" to both)."""
    everything = default_app.expert_names
    bus, details = default_app.api_chat(fixture_path("images/bus.jpg"), "Is there a bus in the picture?", [],
                                        everything, 0.0, 1.0, 24)
    assert "Findings check: yes (bus: 1 bus)" in details["prompt"]
    assert bus.lower().startswith("yes"), bus
    dog, details = default_app.api_chat(fixture_path("images/zidane.jpg"), "Is there a dog in the picture?", [],
                                        everything, 0.0, 1.0, 24)
    assert "Findings check: no (dog not listed)" in details["prompt"]
    assert dog.lower().startswith("no"), dog


def test_colour_and_name_questions_are_answered_from_the_detail_lookups(default_app: ChatApp) -> None:
    """experts/lookup.py: the detector's colour of the bus (blue in bus.jpg) and OCR's text block that
    names the theatre on the French sign ("Theatre du Palais-Royal", set over two lines) reach the model
    only under the questions that ask for them, and it answers from them."""
    everything = default_app.expert_names
    colour, details = default_app.api_chat(fixture_path("images/bus.jpg"), "What colour is the bus?", [],
                                           everything, 0.0, 1.0, 24)
    assert "Colours: " in details["context"] and "Colours" not in details["prompt"]  # on the panel, not shown
    assert "Findings check: the bus is blue." in details["prompt"]
    assert "blue" in colour.lower(), colour
    theatre, details = default_app.api_chat(fixture_path("images/ocr_french.jpg"),
                                            "Which theatre is named on the bottom sign?", [], everything, 0.0, 1.0, 24)
    assert "Findings check: the text naming the theatre: " in details["prompt"]
    assert "palais-royal" in theatre.lower(), theatre
