"""The OpenAI-compatible API (app.openai_api) on a real server on 127.0.0.1, with the tiny random model:
OpenAI's request and response shapes, streaming as server-sent events, stop strings, usage, errors in
OpenAI's error shape with their status codes, and the API key. Random weights write gibberish, so the
tests compare the API with itself (streamed vs whole) and with ChatApp's prompts, not with answers."""
from __future__ import annotations

import base64
import io
import json
import os
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from PIL import Image

from app.chat import ChatApp
from app.openai_api import ApiSettings, StopScanner
from conftest import serve_app
from multimodal.card import ModelCard
from multimodal.generate import Engine
from test_app import engine, make_app  # noqa: F401 - the module-scoped tiny engine fixture

CARD = ModelCard(name="Tiny test model", short="tiny-test", summary="random weights", photos=False)
KEY = "s3cret-key"


def png_url(colour: tuple[int, int, int] = (200, 20, 20), size: tuple[int, int] = (64, 48)) -> str:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def noise_png_url(side: int) -> str:
    buf = io.BytesIO()
    Image.frombytes("RGB", (side, side), os.urandom(side * side * 3)).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def user(text: str, image: str | None = None) -> dict[str, Any]:
    if image is None:
        return {"role": "user", "content": text}
    return {"role": "user", "content": [{"type": "text", "text": text}, {"type": "image_url", "image_url": {"url": image}}]}


@pytest.fixture(scope="module")
def server(engine: Engine) -> Iterator[httpx.Client]:  # noqa: F811
    """An open (loopback, no key) server; the engine carries a card so the model id is known."""
    engine.card = CARD
    try:
        with serve_app(make_app(engine), ApiSettings()) as url, httpx.Client(base_url=url, timeout=60) as client:
            yield client
    finally:
        engine.card = None


@pytest.fixture(scope="module")
def keyed(engine: Engine) -> Iterator[httpx.Client]:  # noqa: F811
    """A server with a key, a 2 KiB image cap and no room in its queue (every question is 'busy')."""
    settings = ApiSettings(api_key=KEY, max_upload_bytes=2048)
    with serve_app(make_app(engine, max_waiting=0), settings) as url, httpx.Client(base_url=url, timeout=60) as client:
        yield client


def ask(client: httpx.Client, messages: list[dict[str, Any]], **body: Any) -> httpx.Response:
    body.setdefault("temperature", 0)
    body.setdefault("max_tokens", 10)
    return client.post("/v1/chat/completions", json={"model": "tiny-test", "messages": messages, **body})


def events(response: httpx.Response) -> list[str]:
    return [line[len("data: "):] for line in response.text.splitlines() if line.startswith("data: ")]


def streamed(client: httpx.Client, messages: list[dict[str, Any]], **body: Any) -> tuple[str, list[dict[str, Any]]]:
    response = ask(client, messages, stream=True, **body)
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
    data = events(response)
    assert data[-1] == "[DONE]"
    chunks = [json.loads(d) for d in data[:-1]]
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    return text, chunks


def error_of(response: httpx.Response, status: int) -> str:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) >= {"message", "type", "code"}
    assert "/tmp" not in error["message"] and "/work" not in error["message"]
    return error["message"]


# -- answers ---------------------------------------------------------------------------------------


def test_models_lists_the_loaded_model(server: httpx.Client) -> None:
    data = server.get("/v1/models").json()
    assert data["object"] == "list" and [m["id"] for m in data["data"]] == ["tiny-test"]


def test_answer_about_an_image_with_usage_and_context(server: httpx.Client) -> None:
    r = ask(server, [user("What colour is it?", png_url())], experts=["caption"])
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "chat.completion" and body["model"] == "tiny-test" and body["id"].startswith("chatcmpl-")
    choice = body["choices"][0]
    assert choice["message"]["role"] == "assistant" and isinstance(choice["message"]["content"], str)
    assert choice["finish_reason"] in ("stop", "length")
    usage = body["usage"]
    assert usage["prompt_tokens"] > 5 and 1 <= usage["completion_tokens"] <= 10
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    assert "Caption: a red square" in body["context"] and body["experts"] == {"caption": "ok"}


def test_streamed_chunks_join_to_the_whole_answer(server: httpx.Client) -> None:
    messages = [user("Describe the picture.", png_url((20, 20, 200)))]
    whole = ask(server, messages, max_tokens=12, experts=[]).json()
    text, chunks = streamed(server, messages, max_tokens=12, experts=[], stream_options={"include_usage": True})
    assert text == whole["choices"][0]["message"]["content"] and text
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert all(c["object"] == "chat.completion.chunk" and c["id"] == chunks[0]["id"] for c in chunks)
    finals = [c for c in chunks if c["choices"] and c["choices"][0]["finish_reason"]]
    assert len(finals) == 1 and finals[0]["choices"][0]["finish_reason"] == whole["choices"][0]["finish_reason"]
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == whole["usage"]


def test_second_turn_prompt_carries_the_first(server: httpx.Client, monkeypatch: pytest.MonkeyPatch) -> None:
    prompts: list[str] = []
    real = ChatApp.plan
    monkeypatch.setattr(ChatApp, "plan", lambda self, *a, **k: prompts.append((p := real(self, *a, **k)).prompt) or p)
    image = png_url((20, 200, 20))
    first = ask(server, [user("What is in the picture?", image)], experts=[]).json()["choices"][0]["message"]["content"]
    second = ask(server, [user("What is in the picture?", image), {"role": "assistant", "content": first},
                          user("And what colour is it?")], experts=[])
    assert second.status_code == 200, second.text
    assert first.strip() and first.strip() not in prompts[0]
    last = prompts[-1]
    assert 0 <= last.find("What is in the picture?") < last.find(first.strip()) < last.find("And what colour is it?")


def test_stop_string_cuts_the_answer_and_ends_generation(server: httpx.Client) -> None:
    messages = [user("Describe the picture.", png_url((90, 90, 90)))]
    full = ask(server, messages, max_tokens=16, experts=[]).json()
    text = full["choices"][0]["message"]["content"]
    assert len(text) > 8, "the tiny model wrote too little to test stop strings"
    cut = len(text) // 2
    stop = text[cut:cut + 3]
    expected = text[:text.find(stop)]
    r = ask(server, messages, max_tokens=16, experts=[], stop=[stop, "never-appears"]).json()
    assert r["choices"][0]["message"]["content"] == expected and r["choices"][0]["finish_reason"] == "stop"
    assert r["usage"]["completion_tokens"] < full["usage"]["completion_tokens"]
    assert streamed(server, messages, max_tokens=16, experts=[], stop=stop)[0] == expected


def test_seed_makes_sampling_repeatable(server: httpx.Client) -> None:
    messages = [user("Write a poem.", png_url((90, 90, 90)))]
    answers = [ask(server, messages, temperature=1.0, top_p=1.0, seed=seed, max_tokens=12, experts=[]).json()
               for seed in (7, 7, 8)]
    texts = [a["choices"][0]["message"]["content"] for a in answers]
    assert texts[0] == texts[1] and texts[0] != texts[2]


def test_stop_scanner_holds_back_a_possible_start() -> None:
    scanner = StopScanner(["END"])
    assert scanner.push("abc E") == "abc " and scanner.push("N") == "" and scanner.push("x") == "ENx"
    assert scanner.push("yyEN") == "yy" and scanner.push("D and more") == "" and scanner.stopped


# -- errors ----------------------------------------------------------------------------------------


def test_bad_requests_are_400_with_clear_messages(server: httpx.Client) -> None:
    assert "'n' must be 1" in error_of(ask(server, [user("hi")], n=2), 400)
    assert "role 'tool'" in error_of(ask(server, [{"role": "tool", "content": "x"}, user("hi")]), 400)
    assert "--api-fetch-images" in error_of(ask(server, [user("hi", "http://example.com/cat.png")]), 400)
    assert "not valid base64" in error_of(ask(server, [user("hi", "data:image/png;base64,@@not-base64@@")]), 400)
    not_image = "data:image/png;base64," + base64.b64encode(b"just some text, not a picture").decode()
    assert "not an image" in error_of(ask(server, [user("hi", not_image)]), 400)
    long = error_of(ask(server, [user("why? " * 500)]), 400)
    assert "limit is 2000" in long
    assert "last message" in error_of(ask(server, [user("hi"), {"role": "assistant", "content": "x"}]), 400)
    assert "top_p" in error_of(ask(server, [user("hi")], top_p=0), 400)
    assert "max_tokens" in error_of(ask(server, [user("hi")], max_tokens=0), 400)
    assert "unknown or not offered expert" in error_of(ask(server, [user("hi")], experts=["astrology"]), 400)
    assert "not valid JSON" in error_of(server.post("/v1/chat/completions", content=b"{nope"), 400)


def test_key_is_required_when_set(keyed: httpx.Client) -> None:
    assert "API key" in error_of(keyed.get("/v1/models"), 401)
    assert "API key" in error_of(keyed.get("/v1/models", headers={"Authorization": "Bearer wrong"}), 401)
    assert "API key" in error_of(ask(keyed, [user("hi")]), 401)
    assert keyed.get("/v1/models", headers={"Authorization": f"Bearer {KEY}"}).status_code == 200


def test_image_over_the_cap_is_413_and_a_full_queue_429(keyed: httpx.Client) -> None:
    auth = {"Authorization": f"Bearer {KEY}"}
    big = {"messages": [user("hi", noise_png_url(48))]}  # ~7 KiB of incompressible pixels, cap 2 KiB
    assert "up to 2 KiB" in error_of(keyed.post("/v1/chat/completions", json=big, headers=auth), 413)
    small = {"messages": [user("hi", png_url(size=(8, 8)))]}
    assert "busy" in error_of(keyed.post("/v1/chat/completions", json=small, headers=auth), 429)


def test_no_model_is_503_and_a_public_server_without_key_refuses(engine: Engine) -> None:  # noqa: F811
    assert ApiSettings(host="127.0.0.1").warning() is None and ApiSettings(host="0.0.0.0", api_key=KEY).warning() is None
    assert "--api-key" in (ApiSettings(host="0.0.0.0").warning() or "")
    assert "share link" in (ApiSettings(share=True).warning() or "")
    with serve_app(make_app(None), ApiSettings()) as url, httpx.Client(base_url=url, timeout=30) as client:
        assert "No model is loaded" in error_of(ask(client, [user("hi")]), 503)
        assert client.get("/v1/models").json()["data"] == []
    public = ApiSettings(host="0.0.0.0")  # as a public server would be configured; served here on loopback
    with serve_app(make_app(engine), public) as url, httpx.Client(base_url=url, timeout=30) as client:
        assert "--api-key" in error_of(client.get("/v1/models"), 401)


# -- the official openai client ------------------------------------------------------------------------------


def openai_client(http: httpx.Client, key: str = "unused") -> "Any":
    openai = pytest.importorskip("openai", reason="the openai package (requirements-test.txt) is not installed")
    return openai.OpenAI(base_url=f"{http.base_url}v1", api_key=key, max_retries=0, timeout=60)


def test_the_openai_client_asks_plain_streamed_and_with_an_image(server: httpx.Client) -> None:
    client = openai_client(server)
    assert [m.id for m in client.models.list().data] == ["tiny-test"]
    plain = client.chat.completions.create(model="tiny-test", messages=[user("What is here?")], temperature=0,
                                           max_tokens=8)
    text = plain.choices[0].message.content
    assert text and plain.choices[0].finish_reason in ("stop", "length") and plain.usage.completion_tokens > 0
    chunks = client.chat.completions.create(model="tiny-test", messages=[user("What is here?")], temperature=0,
                                            max_tokens=8, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == text  # same greedy answer
    image = client.chat.completions.create(model="tiny-test", messages=[user("What colour?", png_url())],
                                           temperature=0, max_tokens=8)
    assert image.choices[0].message.content


def test_the_openai_client_gets_clear_errors(server: httpx.Client, keyed: httpx.Client) -> None:
    openai = pytest.importorskip("openai", reason="the openai package (requirements-test.txt) is not installed")
    client = openai_client(server)
    with pytest.raises(openai.BadRequestError, match="'n' must be 1"):
        client.chat.completions.create(model="tiny-test", messages=[user("hi")], n=2)
    not_image = "data:image/png;base64," + base64.b64encode(b"just some text, not a picture").decode()
    with pytest.raises(openai.BadRequestError, match="not an image"):
        client.chat.completions.create(model="tiny-test", messages=[user("hi", not_image)])
    with pytest.raises(openai.AuthenticationError, match="API key"):
        openai_client(keyed, key="wrong").chat.completions.create(model="tiny-test", messages=[user("hi")])
