"""The page as a newcomer meets it: rejected actions keep the chat, the banner and footers name the
model, the examples are ones the loaded model answers, captions say where they come from, uploads and
experts say what is current, and no server path reaches a user. The browser-side checks of the same
behaviour are in test_browser.py."""
from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from gradio_client import Client, handle_file
from PIL import Image

from app.__main__ import _our_flags, build_experts, build_parser
from app.chat import NO_IMAGE_NOTE, TOY_CAPTIONER, AppConfig, ChatApp, ChatError, scrub_paths
from app.page_examples import PHOTO_EXAMPLES, TOY_EXAMPLES, examples_for
from app.state import ChatSession
from app.ui import build_demo
from conftest import REPO_ROOT, serve_app
from experts import Expert, ExpertRunner, Output
from multimodal.card import demo_card, official_card
from multimodal.generate import Engine, GenerationStats
from multimodal.options import ModelOptions
from weights.packaged import packaged
from test_app import StubExpert, engine, make_app  # noqa: F401 (engine: the tiny model fixture)

DEMO = REPO_ROOT / "weights" / "demo"


@pytest.fixture(scope="module")
def demo_engine() -> Engine:
    if not (DEMO / "adapter.pth").is_file():
        pytest.skip(f"the demo model is missing: {DEMO / 'adapter.pth'}")
    return ModelOptions(model="demo", device="cpu").engine()


def answer(app: ChatApp, session: ChatSession, question: str, key: str = "k", **kw: object) -> str:
    app.prepare(session, key, question)
    status = ""
    for status in app.generate(session, key, kw.get("experts", []), None, 0.0, 1.0, int(kw.get("n", 8))):  # type: ignore[arg-type]
        pass
    return status


# -- 1. a rejected action changes nothing --------------------------------------------------------------


def test_rejected_questions_leave_the_session_as_it_was(engine: Engine, tmp_path: Path) -> None:
    app = make_app(engine, max_question_chars=2000)
    session = ChatSession()
    red = tmp_path / "red.png"
    Image.new("RGB", (64, 64), (200, 30, 30)).save(red)
    app.new_image(session, red, [])
    answer(app, session, "What colour is it?")
    before = session.messages()
    for bad, message in (("", "Please type a question."), ("x" * 20_000, "20000 characters long; the limit is 2000")):
        with pytest.raises(ChatError, match=re.escape(message)):
            app.prepare(session, "k", bad)
        assert app.take_request(session) is None  # the answering step that follows does nothing
        assert session.messages() == before

    with pytest.raises(ChatError, match="no answer to regenerate"):
        app.prepare_regenerate(ChatSession(), "k2")
    with pytest.raises(ChatError, match="No model is loaded"):
        ChatApp(None, "weights missing").prepare(ChatSession(), "k3", "hello?")


def test_a_full_queue_is_a_rejected_action_with_its_own_message(engine: Engine) -> None:
    app = make_app(engine, max_waiting=1)
    first, second = ChatSession(), ChatSession()
    app.prepare(first, "a", "one?")  # armed, not yet answered: it waits in the queue
    with pytest.raises(ChatError, match="busy: 1 questions are waiting"):
        app.prepare(second, "b", "two?")
    assert second.messages() == []
    for _ in app.generate(first, "a", [], None, 0.0, 1.0, 4):
        pass
    app.prepare(second, "b", "two?")  # the first left the queue


def test_asking_again_while_an_answer_is_being_written_is_rejected(engine: Engine) -> None:
    app = make_app(engine)
    session = ChatSession()
    app.prepare(session, "k", "first?")
    with pytest.raises(ChatError, match="still being written"):
        app.prepare(session, "k", "second?")
    assert [t.question for t in session.turns] == ["first?"]


# -- 2. the banner, the start-up line and the footer name the model -----------------------------------


def _component(demo: object, elem_id: str) -> dict:
    return next(c["props"] for c in demo.config["components"] if c["props"].get("elem_id") == elem_id)  # type: ignore[attr-defined]


def test_banner_and_footer_name_the_demo_model(demo_engine: Engine) -> None:
    app = ChatApp(demo_engine, None, None, AppConfig())
    banner = _component(build_demo(app), "banner")["value"]
    assert "Model: the project's demo model (toy world)" in banner
    assert "coloured shapes" in banner and "not about photos" in banner and "python -m weights link" in banner
    session = ChatSession()
    app.new_image(session, TOY_EXAMPLES[0].path, [])
    answer(app, session, TOY_EXAMPLES[0].question)
    assert "model: demo (toy world)" in session.turns[0].footer


def test_banner_names_the_official_model_and_its_adapter() -> None:
    card = official_card("llama-adapter-bias-7b")
    assert card.name == "LLaMA-7B + llama-adapter-bias-7b" and card.photos


def test_command_line_says_which_model_answers_on_stderr() -> None:
    if not (DEMO / "adapter.pth").is_file():
        pytest.skip(f"the demo model is missing: {DEMO / 'adapter.pth'}")
    run = subprocess.run([sys.executable, "-m", "multimodal", "--model", "demo", "--temperature", "0",
                          "--image", str(TOY_EXAMPLES[0].path), "What colour is the shape?"],
                         cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert demo_card().line() in run.stderr
    assert "red" in run.stdout


def test_the_server_prints_the_model_line_at_start(tmp_path: Path) -> None:
    if not (DEMO / "adapter.pth").is_file():
        pytest.skip(f"the demo model is missing: {DEMO / 'adapter.pth'}")
    env = {**os.environ, "MM_EXPERTS": "none", "PYTHONUNBUFFERED": "1"}
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "app", "--model", "demo", "--port", str(port), "--host", "127.0.0.1"],
                            cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            line = proc.stdout.readline()  # type: ignore[union-attr]
            if not line:
                break
            lines.append(line)
            if "public link" in line:  # Gradio's hint, after the local URL
                break
    finally:
        proc.kill()
        proc.wait()
    text = "".join(lines)
    assert demo_card().line() in text, text[-3000:]
    assert "share=True" not in text and "--share" in text


def test_help_names_the_share_flag_and_gradio_hint_is_rewritten() -> None:
    assert "--share" in build_parser().format_help()
    gradio_says = "* Running on local URL:  http://127.0.0.1:7860\n* To create a public link, set `share=True` in `launch()`."
    rewritten = _our_flags(gradio_says)
    assert "share=True" not in rewritten and "--share" in rewritten and "127.0.0.1:7860" in rewritten


# -- 3. the examples are ones the loaded model answers ---------------------------------------------------


def test_every_example_shown_for_the_demo_model_is_answered_right(demo_engine: Engine) -> None:
    app = ChatApp(demo_engine, None, None, AppConfig())
    shown = examples_for(demo_engine.card)
    assert shown == TOY_EXAMPLES
    examples = next(c["props"] for c in build_demo(app).config["components"] if c["type"] == "dataset")
    assert [row[1] for row in examples["samples"]] == [e.question for e in shown]  # what the page shows
    with serve_app(app) as url:
        client = Client(url, verbose=False)
        for example in shown:
            reply, _ = client.predict(handle_file(str(example.path)), example.question, [], [], 0.0, 1.0, 16,
                                      api_name="/chat")
            assert example.is_right(reply), (example, reply)


def test_photo_examples_only_for_models_that_read_photos() -> None:
    assert examples_for(official_card("llama-adapter-bias-7b")) == PHOTO_EXAMPLES
    assert examples_for(demo_card()) == TOY_EXAMPLES


# -- 4. the demo captioner is labelled; an unavailable captioner says why -----------------------------


def test_demo_captions_are_labelled_in_the_context_and_on_the_panel(demo_engine: Engine) -> None:
    args = build_parser().parse_args(["--experts", "caption", "--caption-adapter", "none"])
    runner = build_experts(demo_engine, ModelOptions(model="demo"), args)
    app = ChatApp(demo_engine, None, runner, AppConfig())
    session = ChatSession()
    view = app.new_image(session, PHOTO_EXAMPLES[1].path, ["caption"])
    assert view is not None
    assert view.context.startswith(f"[caption] Caption ({TOY_CAPTIONER}): ")
    assert view.caption.startswith(f"[{TOY_CAPTIONER}] ")


def test_unavailable_experts_are_not_offered_and_the_page_says_why(engine: Engine) -> None:
    args = build_parser().parse_args(["--experts", "caption,detection", "--detector", "/nowhere/yolo.pt"])
    runner = build_experts(None, ModelOptions(), args)  # no engine: no captioner
    app = ChatApp(engine, None, runner, AppConfig())
    demo = build_demo(app)
    experts = _component(demo, "experts")
    offered = [value for _, value in experts["choices"]]
    assert "caption" not in offered and "detection" not in offered and experts["value"] == []
    note = _component(demo, "experts-unavailable")["value"]
    assert "Caption: unavailable: no model is loaded" in note and "Object detection: unavailable" in note
    assert "/nowhere" not in note  # the reason names the file, not the server's folder


# -- 5, 6. what is current: uploads and "no image" ------------------------------------------------------


def test_a_rejected_upload_keeps_the_previous_image(engine: Engine, tmp_path: Path) -> None:
    app = make_app(engine)
    session = ChatSession()
    good = tmp_path / "good.png"
    Image.new("RGB", (64, 64), (10, 200, 10)).save(good)
    assert app.new_image(session, good, []) is not None
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(Image.open(good).tobytes()[:100])
    with pytest.raises(ChatError, match="Cannot use this upload"):
        app.new_image(session, broken, [])
    assert session.image_name == "good.png"
    assert app.new_image(session, session.image, []) is None  # the page puts it back: no change, no new notice


def test_a_question_without_an_image_says_so(engine: Engine) -> None:
    app = make_app(engine)
    session = ChatSession()
    status = answer(app, session, "What colour is the shape?")
    assert NO_IMAGE_NOTE in status and "no image" in session.turns[0].footer


# -- 7. expert problems are reported for the answer they affected --------------------------------------


class FlakyExpert(Expert):
    """Fails on its first run, then works (a transient failure)."""

    name = "ocr"

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def unavailable_reason(self) -> str | None:
        return None

    def _run(self, image: Image.Image) -> Output:
        self.calls += 1
        if self.calls == 1:
            raise RuntimeError("OCR backend timed out")
        return Output(context='"OPEN"')


def test_a_transient_expert_failure_is_reported_once(engine: Engine, tmp_path: Path) -> None:
    app = ChatApp(engine, None, ExpertRunner([FlakyExpert(), StubExpert("detection", "1 cat")]), AppConfig())
    session = ChatSession()
    red = tmp_path / "red.png"
    Image.new("RGB", (64, 64), (200, 30, 30)).save(red)
    app.new_image(session, red, [])
    first = answer(app, session, "What does it say?", experts=["ocr", "detection"])
    second = answer(app, session, "And now?", experts=["ocr", "detection"])
    assert "Expert problem: ocr failed: RuntimeError: OCR backend timed out" in first
    assert "Expert problem" not in second and "ocr" in session.turns[1].footer


# -- 8. no server path reaches a user --------------------------------------------------------------


def test_server_paths_are_taken_out_of_messages() -> None:
    assert scrub_paths("cannot identify image file '/tmp/gradio/ab12/notimage.png'") == \
        "cannot identify image file 'notimage.png'"
    assert scrub_paths("see /root/weights/llama-7b/params.json and python -m weights status") == \
        "see params.json and python -m weights status"
    assert scrub_paths("3/4 of 1.5/2 done, http://127.0.0.1:7860/x") == "3/4 of 1.5/2 done, http://127.0.0.1:7860/x"


def test_no_path_in_the_not_an_image_error_over_the_api(engine: Engine, tmp_path: Path, capfd: pytest.CaptureFixture) -> None:
    notimage = tmp_path / "notimage.png"
    notimage.write_text("this is text, not a picture")
    with serve_app(make_app(engine)) as url:
        client = Client(url, verbose=False)
        with pytest.raises(Exception) as caught:
            client.predict(handle_file(str(notimage)), "What is it?", [], [], 0.0, 1.0, 8, api_name="/chat")
        with pytest.raises(Exception) as empty:
            client.predict(None, "   ", [], [], 0.0, 1.0, 8, api_name="/chat")
    message = str(caught.value)
    assert "notimage.png is not an image" in message and "/tmp" not in message and str(tmp_path) not in message
    assert "Please type a question." in str(empty.value)
    logged = capfd.readouterr()
    assert "Traceback" not in logged.out + logged.err  # user errors are one log line, not a traceback


# -- 9. footers, budget ------------------------------------------------------------------------------


def test_tokens_per_second_counts_the_end_token_step() -> None:
    one_word = GenerationStats(new_tokens=1, first_token_s=0.5, total_s=0.52, stop_reason="eos")
    assert one_word.decode_steps == 1 and one_word.tokens_per_s == pytest.approx(50.0)
    assert GenerationStats(new_tokens=1, first_token_s=0.5, total_s=0.5, stop_reason="length").tokens_per_s == 0.0


def test_one_word_answers_show_a_real_rate(demo_engine: Engine) -> None:
    app = ChatApp(demo_engine, None, None, AppConfig())
    session = ChatSession()
    app.new_image(session, TOY_EXAMPLES[0].path, [])
    answer(app, session, TOY_EXAMPLES[0].question)
    footer = session.turns[0].footer
    assert re.search(r"· 1 token · \d+\.\d tokens/s ·", footer) and "0.0 tokens/s" not in footer, footer


def test_budget_counts_nothing_for_an_empty_question(engine: Engine) -> None:
    app = make_app(engine)
    assert "question 0," in app.budget(ChatSession(), "", "", 16)
    assert "question 0," not in app.budget(ChatSession(), "What is it?", "", 16)


# -- 10. weights status says what the app would load ------------------------------------------------


def test_weights_status_names_the_model_the_app_would_load(tmp_path: Path) -> None:
    run = subprocess.run([sys.executable, "-m", "weights", "status"], cwd=REPO_ROOT, capture_output=True, text=True,
                         timeout=120, env={k: v for k, v in os.environ.items() if k != "MM_WEIGHTS_DIR"})
    first, *rest = run.stdout.splitlines()
    installed = packaged("smollm2-135m-instruct").path() is not None
    expected = "smollm2 (llama-7b is missing and no base is linked" if installed else "demo (llama-7b is missing"
    assert first.startswith(f"the app would load: {expected}"), run.stdout
    demo_row = next(line for line in rest if line.startswith("demo "))
    assert "present" in demo_row and "MiB" in demo_row and "toy world" in demo_row
    smollm2_row = next(line for line in rest if line.startswith("smollm2-135m-instruct "))
    assert ("present" in smollm2_row) == installed and "language model" in smollm2_row


def test_the_order_of_the_automatic_choice(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import weights.choice as choice
    from weights.packaged import PackagedWeight

    empty = tmp_path / "empty"
    monkeypatch.setattr(choice, "packaged", lambda name: PackagedWeight(name, "", "", "none-such", "0", "none_such/x", ""))
    assert choice.auto_choice(empty).model == "official"  # nothing at all: the app says which file to get
    shutil.copytree(DEMO, empty / "demo")
    assert choice.auto_choice(empty).model == "demo"
    monkeypatch.undo()
    if packaged("smollm2-135m-instruct").path() is not None:
        assert choice.auto_choice(empty).model == "smollm2"
    base = tmp_path / "my-base"
    base.mkdir()
    (base / "config.json").write_text("{}")
    choice.link_base(base, empty)
    assert choice.auto_choice(empty).model == "base" and choice.linked_base(empty) == empty / "base"
