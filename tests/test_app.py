"""The chat app's logic with a tiny random model: session state, prompt assembly and budget, expert
toggles, streaming, Stop, error paths, flags; and a real server on localhost driven by gradio_client.
Random weights write gibberish, so tests assert on structure, prompts, streaming and state."""
from __future__ import annotations

import json
import re
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import torch
from gradio_client import Client, handle_file
from PIL import Image

from app.__main__ import build_parser, launch, load_engine, parse_auth, parse_experts
from app.__main__ import main as app_main
from multimodal.options import options_from_args
from app.chat import AppConfig, ChatApp, ChatError
from app.prompting import PromptBudgetError, assemble
from multimodal.prompt import AlpacaFormat
from app.state import ChatSession, Notice
from app.page_examples import PHOTO_EXAMPLES, TOY_EXAMPLES
from app.ui import build_demo
from conftest import serve_app, fixture_path
from experts import Expert, ExpertRunner, Output
from multimodal.config import build_preset
from multimodal.generate import Engine, GenerationStats
from multimodal.loading import load_model
from multimodal.options import ModelOptions
from tiny import write_official_adapter


class StubExpert(Expert):
    """Fixed context per expert name, or a failure; counts runs (the runner caches by image hash)."""

    def __init__(self, name: str, text: str = "", fail: bool = False) -> None:
        super().__init__()
        self.name, self.text, self.fail, self.calls = name, text, fail, 0

    def unavailable_reason(self) -> str | None:
        return None

    def _run(self, image: Image.Image) -> Output:
        self.calls += 1
        if self.fail:
            raise RuntimeError("stub backend exploded")
        annotated = image.copy() if self.name == "detection" else None
        return Output(context=self.text or f"{self.name} of a {image.size[0]}x{image.size[1]} image",
                      data={"caption": self.text}, annotated=annotated)


@pytest.fixture(scope="module")
def engine(tiny_files: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Engine:
    path = tmp_path_factory.mktemp("app") / "adapter.pth"
    write_official_adapter(path, build_preset("tiny"), seed=3)
    return Engine(load_model(tiny_files["llama_dir"], tiny_files["tokenizer_path"], tiny_files["clip_path"], path,
                             preset="tiny", device="cpu", dtype="float32", max_seq_len=1024))


def make_app(engine: Engine | None, fail: str | None = None, **config: object) -> ChatApp:
    experts = [StubExpert("caption", "Caption: a red square"), StubExpert("ocr", '"OPEN 24 HOURS"', fail=fail == "ocr"),
               StubExpert("detection", "1 bus (centre)", fail=fail == "detection")]
    return ChatApp(engine, None if engine else "Missing weight file weights/llama-7b/params.json",
                   ExpertRunner(experts), AppConfig(**config))  # type: ignore[arg-type]


@pytest.fixture
def chat(engine: Engine) -> ChatApp:
    return make_app(engine)


@pytest.fixture
def red(tmp_path: Path) -> Path:
    path = tmp_path / "red.png"
    Image.new("RGB", (64, 48), (200, 20, 20)).save(path)
    return path


def ask(app: ChatApp, session: ChatSession, question: str, experts: list[str] | None = None, context: str | None = None,
        max_new: int = 8, key: str = "k") -> list[str]:
    """One turn through the same two steps the page uses; returns the streamed answer snapshots."""
    turn = app.prepare(session, key, question)
    snapshots = []
    for _ in app.generate(session, key, experts or [], context, 0.0, 0.75, max_new):
        snapshots.append(turn.answer)
    return snapshots


# -- prompt assembly and budget ---------------------------------------------------------------


def words(text: str) -> int:
    return len(text.split())


class WordTokens:
    """A stand-in tokenizer for budget arithmetic: one token per word, bos first."""

    add_bos, chat_template = True, None

    def encode(self, text: str, bos: bool = True) -> list[int]:
        return [1] * (bos + words(text))

    def count(self, text: str) -> int:
        return words(text)


WORDS = AlpacaFormat(WordTokens())  # type: ignore[arg-type]


def test_assembly_drops_oldest_turns_first_and_says_so() -> None:
    history = [(f"question {i} " + "x " * 20, f"answer {i} " + "y " * 20) for i in range(6)]
    full = assemble("Current?", history, "[ocr] SALE", WORDS, 10_000, 50)
    assert full.dropped_turns == 0 and full.dropped_note() == "" and "question 0" in full.prompt
    budget = words(assemble("Current?", history[-2:], "[ocr] SALE", WORDS, 10_000, 50).prompt) + 1 + 50
    plan = assemble("Current?", history, "[ocr] SALE", WORDS, budget, 50)
    assert plan.dropped_turns == 4 and plan.history_kept == history[-2:]
    assert "question 3" not in plan.prompt and "question 4" in plan.prompt and "question 5" in plan.prompt
    assert "Current?" in plan.prompt and "[ocr] SALE" in plan.prompt
    assert plan.prompt_tokens + plan.answer_room <= budget and plan.answer_room == 50
    assert "dropped the 4 oldest turns" in plan.dropped_note() and f"{budget}-token context" in plan.dropped_note()


def test_assembly_never_cuts_question_or_context() -> None:
    essentials = words(assemble("Q " * 30, [], "C " * 30, WORDS, 10_000, 10).prompt) + 1
    shortened = assemble("Q " * 30, [("old", "turn")], "C " * 30, WORDS, essentials + 20, 64)
    assert shortened.answer_room == 20 and shortened.dropped_turns == 1
    assert "answer limited to 20 tokens (asked for 64)" in shortened.dropped_note()
    with pytest.raises(PromptBudgetError, match="question has 30 tokens and the expert context 30"):
        assemble("Q " * 30, [], "C " * 30, WORDS, essentials + 10, 64)


# -- session state -------------------------------------------------------------------------------


def test_new_image_mid_conversation_is_marked_and_earlier_turns_leave_the_prompt(chat: ChatApp, red: Path,
                                                                                  tmp_path: Path) -> None:
    session = ChatSession()
    chat.new_image(session, red, [])
    ask(chat, session, "First question about red?")
    assert session.history()[0][0] == "First question about red?"
    blue = tmp_path / "blue.png"
    Image.new("RGB", (64, 48), (20, 20, 200)).save(blue)
    chat.new_image(session, blue, [])
    assert session.image_no == 2 and session.history() == []
    assert isinstance(session.timeline[-1], Notice) and "New image: blue.png (image 2)" in session.timeline[-1].text
    ask(chat, session, "Second question about blue?")
    assert "First question" not in session.last_prompt and "Second question about blue?" in session.last_prompt
    shown = [m["content"] for m in session.messages()]
    assert shown[0] == "First question about red?" and any("New image: blue.png" in c for c in shown)
    chat.new_image(session, blue, [])  # the same picture again is not a change
    assert session.image_no == 2


def test_second_turn_prompt_contains_the_first(chat: ChatApp, red: Path) -> None:
    session = ChatSession()
    chat.new_image(session, red, ["caption"])
    ask(chat, session, "What colour is it?", ["caption"])
    first = session.turns[0]
    assert first.done and first.answer and "experts: caption" in first.footer
    ask(chat, session, "And its shape?", ["caption"])
    assert f"User: What colour is it?\nAssistant: {first.answer.strip()}" in session.last_prompt
    assert "### Instruction:\nAnd its shape?" in session.last_prompt
    assert "[caption] Caption: a red square" in session.last_prompt


def test_answer_streams_token_by_token_with_a_stats_line(chat: ChatApp, red: Path) -> None:
    session = ChatSession()
    chat.new_image(session, red, [])
    snapshots = ask(chat, session, "Describe the image.", max_new=12)
    growing = [s for s in snapshots if s]
    assert len(set(growing)) > 3 and all(b.startswith(a) for a, b in zip(growing, growing[1:]))
    footer = session.turns[0].footer
    assert re.search(r"[\d.]+ s · first token [\d.]+ s · \d+ tokens · [\d.]+ tokens/s · experts: none", footer)
    assert "<sub>" in session.messages()[-1]["content"]


def test_history_dropped_for_a_long_conversation_is_reported(chat: ChatApp, red: Path) -> None:
    session = ChatSession()
    chat.new_image(session, red, [])
    for i in range(8):
        ask(chat, session, f"Question number {i} " + "about the bus and the people " * 8, max_new=4)
    ask(chat, session, "Last one?", max_new=200)
    last = session.turns[-1]
    assert "dropped the" in last.footer and "oldest turn" in last.footer
    assert "Question number 0" not in session.last_prompt and "Question number 7" in session.last_prompt
    assert "Last one?" in session.last_prompt
    assert "Context budget" in chat.budget(session, "next", "", 200)


def test_image_prompts_are_computed_once_per_image(chat: ChatApp, red: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    model = chat.engine.model  # type: ignore[union-attr]
    real = model.prompt_kv
    chat.engine.forget()  # type: ignore[union-attr]
    monkeypatch.setattr(model, "prompt_kv", lambda pixels: calls.append(1) or real(pixels))
    session = ChatSession()
    chat.new_image(session, red, [])
    ask(chat, session, "One?")
    ask(chat, session, "Two?")
    chat.prepare_regenerate(session, "k")
    list(chat.generate(session, "k", [], None, 0.0, 0.75, 4))
    assert len(calls) == 1


# -- experts ---------------------------------------------------------------------------------------


def test_expert_toggles_choose_the_context(chat: ChatApp, red: Path) -> None:
    session = ChatSession()
    view = chat.new_image(session, red, ["ocr", "detection"])
    assert view.context.splitlines() == ['[ocr] "OPEN 24 HOURS"', "[detection] 1 bus (centre)"]
    assert view.ocr_lines == '"OPEN 24 HOURS"' and view.detection is not None and view.caption == ""
    assert chat.run_experts(session, []).context == ""
    ask(chat, session, "What does it say?", ["ocr"])
    assert '[ocr] "OPEN 24 HOURS"' in session.last_prompt and "[detection]" not in session.last_prompt
    assert "experts: ocr" in session.turns[-1].footer


def test_edited_context_is_sent_as_is(chat: ChatApp, red: Path) -> None:
    session = ChatSession()
    view = chat.new_image(session, red, ["ocr"])
    ask(chat, session, "Read it.", ["ocr"], context=view.context)  # unedited box: the experts' text
    assert '[ocr] "OPEN 24 HOURS"' in session.last_prompt
    ask(chat, session, "Read it again.", ["ocr"], context='[ocr] "CLOSED"')
    assert '[ocr] "CLOSED"' in session.last_prompt and "OPEN 24" not in session.last_prompt
    assert "experts: edited context" in session.turns[-1].footer


def test_a_failing_expert_is_reported_and_the_chat_goes_on(engine: Engine, red: Path) -> None:
    app = make_app(engine, fail="detection")
    session = ChatSession()
    view = app.new_image(session, red, ["caption", "detection"])
    assert "detection**: failed: RuntimeError: stub backend exploded" in view.status
    assert "detection failed" in app.expert_problems(session)
    turn = app.prepare(session, "k", "What is it?")
    statuses = list(app.generate(session, "k", ["caption", "detection"], None, 0.0, 0.75, 4))
    assert turn.done and turn.answer and "detection failed" in statuses[-1]
    assert "[caption]" in session.last_prompt and "[detection]" not in session.last_prompt


# -- Stop, regenerate, clear ---------------------------------------------------------------------


def test_stop_really_cancels_generation(chat: ChatApp, red: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[GenerationStats] = []
    real = chat.engine.stream  # type: ignore[union-attr]

    def spy(*args, **kwargs):  # record the engine's own stats for this request
        seen.append(args[4])
        return real(*args, **kwargs)

    monkeypatch.setattr(chat.engine, "stream", spy)
    session = ChatSession()
    chat.new_image(session, red, [])
    turn = chat.prepare(session, "s", "Tell me a long story.")
    steps = chat.generate(session, "s", [], None, 0.0, 0.75, 500)
    while not turn.answer:
        next(steps)
    assert chat.stop("s")
    statuses = list(steps)
    assert seen[0].stop_reason == "cancelled" and seen[0].new_tokens < 20
    assert turn.done and "stopped" in turn.footer and statuses[-1].startswith("Stopped")
    # Stop pressed while the request still waits in the queue: it ends before it starts
    turn = chat.prepare(session, "s", "Another?")
    chat.stop("s")
    assert list(chat.generate(session, "s", [], None, 0.0, 0.75, 50)) == ["Stopped."]
    assert turn.footer == "stopped before it started" and len(seen) == 1


def test_regenerate_and_clear(chat: ChatApp, red: Path) -> None:
    session = ChatSession()
    chat.new_image(session, red, [])
    ask(chat, session, "Q?")
    chat.prepare_regenerate(session, "k")
    assert session.turns[-1].answer == "" and not session.turns[-1].done
    for _ in chat.generate(session, "k", [], None, 0.9, 0.9, 6):
        pass
    assert len(session.turns) == 1 and session.turns[0].done and session.turns[0].answer
    chat.clear(session, "k")
    assert session.messages() == [] and session.image is not None  # the image stays for the next question
    with pytest.raises(ChatError, match="nothing|no answer"):
        chat.prepare_regenerate(session, "k")


def test_separate_sessions_keep_separate_histories(chat: ChatApp, red: Path) -> None:
    sessions = [ChatSession(), ChatSession()]
    for s in sessions:
        chat.new_image(s, red, [])

    def converse(i: int) -> None:
        for j in range(2):
            ask(chat, sessions[i], f"session {i} turn {j}", key=f"key{i}", max_new=6)

    with ThreadPoolExecutor(2) as pool:
        list(pool.map(converse, [0, 1]))
    for i, s in enumerate(sessions):
        assert [t.question for t in s.turns] == [f"session {i} turn 0", f"session {i} turn 1"]
        assert f"session {i} turn 0" in s.last_prompt and f"session {1 - i}" not in s.last_prompt


# -- errors ------------------------------------------------------------------------------------------


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_errors_are_specific(chat: ChatApp, tmp_path: Path) -> None:
    session = ChatSession()
    with pytest.raises(ChatError, match="type a question"):
        chat.prepare(session, "k", "   ")
    with pytest.raises(ChatError, match="limit is 2000"):
        chat.prepare(session, "k", "x" * 2001)
    (tmp_path / "notes.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    with pytest.raises(ChatError, match="not an image that can be read"):
        chat.new_image(session, tmp_path / "notes.png", [])
    Image.new("1", (10_000, 10_000)).save(tmp_path / "big.png")  # 100 megapixels, a few KB on disk
    with pytest.raises(ChatError, match="limit is 40 megapixels"):
        chat.new_image(session, tmp_path / "big.png", [])
    Image.new("1", (15_000, 15_000)).save(tmp_path / "bomb.png")  # past PIL's own bomb threshold
    with pytest.raises(ChatError, match="too large to decode safely"):
        chat.new_image(session, tmp_path / "bomb.png", [])
    assert session.messages() == []
    with pytest.raises(ChatError, match="No model is loaded. Missing weight file weights/llama-7b"):
        make_app(None).prepare(session, "k", "hi")


def test_out_of_memory_is_reported_and_the_app_recovers(chat: ChatApp, monkeypatch: pytest.MonkeyPatch) -> None:
    session = ChatSession()
    real = chat.engine.stream  # type: ignore[union-attr]

    def oom(*args, **kwargs) -> Iterator[str]:
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        yield ""

    monkeypatch.setattr(chat.engine, "stream", oom)
    chat.prepare(session, "k", "Hello?")
    with pytest.raises(ChatError, match="out of memory: try a shorter question, fewer max new tokens"):
        list(chat.generate(session, "k", [], None, 0.0, 0.75, 4))
    assert session.turns == []  # the failed question left the chat
    monkeypatch.setattr(chat.engine, "stream", real)
    ask(chat, session, "Hello again?")
    assert session.turns[0].done


def test_a_question_that_cannot_fit_says_so(engine: Engine) -> None:
    app = make_app(engine, max_question_chars=100_000)
    session = ChatSession()
    app.prepare(session, "k", "bus " * 1200)
    with pytest.raises(ChatError, match="prompt does not fit: the question has \\d+ tokens"):
        list(app.generate(session, "k", [], None, 0.0, 0.75, 8))


def test_missing_weights_message_names_files_and_commands(tmp_path: Path) -> None:
    engine, message = load_engine(ModelOptions(model="official", weights_dir=str(tmp_path), device="cpu"))
    assert engine is None
    assert "llama-7b/params.json" in message and "python -m weights link llama-7b" in message
    assert "--model smollm2" in message and str(tmp_path / "demo") in message and "weights/demo/README.md" in message


# -- privacy -----------------------------------------------------------------------------------------


def test_chats_are_logged_only_when_enabled(engine: Engine, red: Path, tmp_path: Path) -> None:
    quiet = make_app(engine)
    session = ChatSession()
    quiet.new_image(session, red, [])
    ask(quiet, session, "Private?")
    assert quiet.config.log_dir is None and not list(tmp_path.glob("**/*.jsonl"))
    logging_app = make_app(engine, log_dir=tmp_path / "log")
    session = ChatSession()
    logging_app.new_image(session, red, [])
    ask(logging_app, session, "Logged?")
    record = json.loads((tmp_path / "log" / "chats.jsonl").read_text().splitlines()[0])
    assert record["question"] == "Logged?" and len(list((tmp_path / "log" / "images").glob("*.png"))) == 1


# -- flags ---------------------------------------------------------------------------------------------


def test_flags_and_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    args = build_parser().parse_args([])
    assert (args.host, args.port, args.share, args.log_chats) == ("127.0.0.1", 7860, False, None)
    monkeypatch.setenv("MM_PORT", "9000")
    monkeypatch.setenv("MM_SHARE", "1")
    monkeypatch.setenv("MM_EXPERTS", "ocr")
    args = build_parser().parse_args(["--concurrency", "3", "--device", "cpu", "--dtype", "bfloat16"])
    assert (args.port, args.share, args.experts, args.concurrency, args.device, args.dtype) == \
        (9000, True, "ocr", 3, "cpu", "bfloat16")
    assert not options_from_args(args).compile
    monkeypatch.setenv("MM_COMPILE", "1")
    assert options_from_args(build_parser().parse_args([])).compile
    assert options_from_args(build_parser().parse_args(["--compile", "--quantize", "int8"])).quantize == "int8"
    assert build_parser().parse_args([]).batch == 1 and build_parser().parse_args(["--batch", "8"]).batch == 8
    with pytest.raises(SystemExit):  # argparse's error: one line naming both flags, exit status 2
        app_main(["--batch", "4", "--compile"])
    assert parse_experts("caption, ocr") == ["caption", "ocr"] and parse_experts("none") == []
    with pytest.raises(ValueError, match="unknown expert"):
        parse_experts("ocr,magic")
    (tmp_path / "users").write_text("# operators\nann:secret\nbob:pa:ss\n")
    assert parse_auth("me:pw", str(tmp_path / "users")) == [("me", "pw"), ("ann", "secret"), ("bob", "pa:ss")]
    assert parse_auth(None, None) is None
    with pytest.raises(ValueError):
        parse_auth("nopassword", None)


def test_examples_are_small_own_images() -> None:
    for example in PHOTO_EXAMPLES:
        if example.file.startswith("skimage:"):  # scikit-image's sample photos, installed with it
            continue
        assert example.path.stat().st_size < 100_000 and example.question.endswith("?")
        with Image.open(example.path) as im:
            assert im.size[0] >= 224 and im.size[1] >= 224
    for example in TOY_EXAMPLES:  # drawn at the demo model's own 64 px
        with Image.open(example.path) as im:
            assert im.size == (64, 64) and example.question.endswith("?")


# -- a real server on localhost ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def server(engine: Engine) -> Iterator[str]:
    app = make_app(engine)
    with serve_app(app) as url:
        yield url


def test_two_turn_conversation_over_the_api(server: str) -> None:
    client = Client(server, verbose=False)
    bus = handle_file(str(fixture_path("images/bus.jpg")))
    answer1, details1 = client.predict(bus, "What vehicle is this?", [], ["detection"], 0.0, 0.75, 8, api_name="/chat")
    assert answer1 and details1["history"] == [["What vehicle is this?", answer1]]
    assert "[detection] 1 bus (centre)" in details1["prompt"] and "tokens/s" in details1["stats"]
    answer2, details2 = client.predict(bus, "What colour is it?", details1["history"], ["detection"], 0.0, 0.75, 8,
                                       api_name="/chat")
    assert f"User: What vehicle is this?\nAssistant: {answer1.strip()}" in details2["prompt"]
    assert details2["context"] == "[detection] 1 bus (centre)"
    assert details2["prompt"].endswith("### Input:\n[detection] 1 bus (centre)\n\nConversation so far:\nUser: What "
                                       f"vehicle is this?\nAssistant: {answer1.strip()}\n\n### Instruction:\n"
                                       "What colour is it?\n\n### Response:")
    assert [h[0] for h in details2["history"]] == ["What vehicle is this?", "What colour is it?"]


def test_two_clients_at_once_keep_their_own_histories(server: str, red: Path) -> None:
    def converse(i: int) -> str:
        client = Client(server, verbose=False)
        history = [[f"client {i} earlier question", f"client {i} earlier answer"]]
        _, details = client.predict(handle_file(str(red)), f"client {i} asks", history, [], 0.0, 0.75, 6,
                                    api_name="/chat")
        return details["prompt"]

    with ThreadPoolExecutor(2) as pool:
        prompts = list(pool.map(converse, [0, 1]))
    for i, prompt in enumerate(prompts):
        assert f"client {i} earlier answer" in prompt and f"client {1 - i}" not in prompt


def test_api_errors_reach_the_client(server: str, tmp_path: Path) -> None:
    client = Client(server, verbose=False)
    (tmp_path / "notes.txt").write_text("not a picture")
    with pytest.raises(Exception, match="not an image that can be read"):
        client.predict(handle_file(str(tmp_path / "notes.txt")), "hi", [], [], 0.0, 0.75, 4, api_name="/chat")
    with pytest.raises(Exception, match="type a question"):
        client.predict(None, "  ", [], [], 0.0, 0.75, 4, api_name="/chat")
    answer, _ = client.predict(None, "Still there?", [], [], 0.0, 0.75, 4, api_name="/chat")
    assert answer
    api = httpx.get(server.rstrip("/") + "/gradio_api/info", timeout=10).json()
    assert list(api["named_endpoints"]) == ["/chat"]  # the page's own events are private


def test_share_failure_keeps_serving_locally(engine: Engine, monkeypatch: pytest.MonkeyPatch) -> None:
    import gradio.networking

    def no_internet(*args, **kwargs):
        raise OSError("network unreachable")

    monkeypatch.setattr(gradio.networking, "setup_tunnel", no_internet)
    app = make_app(engine)
    demo = build_demo(app)
    demo.queue()
    try:
        assert launch(demo, app, True, server_name="127.0.0.1", server_port=None, quiet=True) is None
        assert len(app.notices) == 1 and "share link could not be created" in app.notices[0]
        assert "keeps serving locally at http://127.0.0.1" in app.notices[0]
        assert httpx.get(demo.local_url, timeout=10).status_code == 200
    finally:
        demo.close()
