"""The page's handler and a real server on localhost driven by gradio_client."""
from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import gradio as gr
import pytest
from gradio_client import Client, handle_file

from app.__main__ import parse_auth
from app.ui import answer_stream, build_demo
from conftest import fixture_path
from multimodal.config import build_preset
from multimodal.generate import Engine
from multimodal.loading import load_model
from tiny import write_official_adapter


@pytest.fixture(scope="module")
def engine(tiny_files: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Engine:
    path = tmp_path_factory.mktemp("app") / "adapter.pth"
    write_official_adapter(path, build_preset("tiny"), seed=3)
    return Engine(load_model(tiny_files["llama_dir"], tiny_files["tokenizer_path"], tiny_files["clip_path"], path,
                             preset="tiny", device="cpu", dtype="float32"))


@pytest.fixture(scope="module")
def server(engine: Engine) -> Iterator[str]:
    demo = build_demo(engine)
    demo.queue(default_concurrency_limit=1)
    _, url, _ = demo.launch(server_name="127.0.0.1", server_port=None, prevent_thread_lock=True, quiet=True)
    yield url
    demo.close()


def test_api_answers_about_an_image(server: str) -> None:
    client = Client(server, verbose=False)
    out = client.predict(handle_file(str(fixture_path("images/bus.jpg"))), "What is in the image?", 0.0, 0.75, 6,
                         api_name="/answer")
    assert "tokens/s" in out and "6 tokens" in out


def test_handler_rejects_bad_input_with_clear_messages(engine: Engine, tmp_path: Path) -> None:
    with pytest.raises(gr.Error, match="type a question"):
        next(answer_stream(engine, None, None, "   ", 0.1, 0.75, 8))
    with pytest.raises(gr.Error, match="limit is 2000"):
        next(answer_stream(engine, None, None, "x" * 2001, 0.1, 0.75, 8))
    with pytest.raises(gr.Error, match="No model is loaded. Missing weight file"):
        next(answer_stream(None, "Missing weight file x", None, "hi", 0.1, 0.75, 8))
    (tmp_path / "b.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    with pytest.raises(gr.Error, match="not an image"):
        next(answer_stream(engine, None, str(tmp_path / "b.png"), "hi", 0.1, 0.75, 8))


def test_answer_streams_in_pieces(engine: Engine) -> None:
    updates = list(answer_stream(engine, None, None, "Describe the image.", 0.0, 0.75, 10))
    assert len(updates) > 2 and all(updates[i + 1].startswith(updates[i]) for i in range(len(updates) - 2))


def test_auth_parsing(tmp_path: Path) -> None:
    (tmp_path / "users").write_text("# operators\nann:secret\nbob:pa:ss\n")
    assert parse_auth("me:pw", str(tmp_path / "users")) == [("me", "pw"), ("ann", "secret"), ("bob", "pa:ss")]
    assert parse_auth(None, None) is None
    with pytest.raises(ValueError):
        parse_auth("nopassword", None)
