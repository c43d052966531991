"""Continuous batching (multimodal/batching.py): concurrent requests decoded together give, token for
token, what one-at-a-time decoding gives (mixed prompt lengths, images and none); Stop frees a slot
within a step; a follow-up reuses its slot's keys/values; an adapter swap runs alone."""
from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from conftest import fixture_path
from multimodal.batching import BatchEngine
from multimodal.generate import Engine, GenerationStats, SamplingParams
from multimodal.image import open_image
from multimodal.loading import LoadedModel, load_model


@pytest.fixture
def load(tiny_files: dict[str, Path], tiny_adapter: Callable[[int, int], Path]) -> Callable[[], LoadedModel]:
    """A tiny model with a visual adapter whose gates are open: images change the answers."""
    def make() -> LoadedModel:
        return load_model(tiny_files["llama_dir"], tiny_files["tokenizer_path"], tiny_files["clip_path"],
                          tiny_adapter(0, 5), preset="tiny", device="cpu", dtype="float32")
    return make


def requests() -> list[tuple[list[int], object, SamplingParams]]:
    bus, zidane = open_image(fixture_path("images/bus.jpg")), open_image(fixture_path("images/zidane.jpg"))
    lengths = [3, 17, 40, 9, 64, 25]
    images = [bus, None, zidane, bus, None, zidane]
    new = [24, 10, 30, 16, 8, 20]
    return [([1] + [(7 * i + 3 * n) % 500 + 3 for i in range(n - 1)], img, SamplingParams(max_new_tokens=m, temperature=0.0))
            for n, img, m in zip(lengths, images, new)]


def test_batched_greedy_equals_one_at_a_time(load: Callable[[], LoadedModel]) -> None:
    jobs = requests()
    alone = Engine(load())
    alone_stats = [GenerationStats() for _ in jobs]
    expected = [list(alone.token_ids(ids, image, params, stats=st)) for (ids, image, params), st in zip(jobs, alone_stats)]
    assert expected[0] != list(alone.token_ids(jobs[0][0], None, jobs[0][2]))  # the image matters to the answer

    engine = BatchEngine(load(), slots=4)
    rows_seen: list[int] = []
    step = engine.model.llama.step

    def counting_step(token: torch.Tensor, *args: object) -> torch.Tensor:
        rows_seen.append(token.shape[0])
        return step(token, *args)

    engine.model.llama.step = counting_step  # type: ignore[method-assign]
    got: list[list[int] | None] = [None] * len(jobs)
    stats = [GenerationStats() for _ in jobs]

    def ask(i: int) -> None:
        ids, image, params = jobs[i]
        got[i] = list(engine.token_ids(ids, image, params, stats=stats[i]))

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(jobs))]
    with engine.gathered(len(jobs)):  # all queued before the first step, whatever the threads' timing
        for t in threads:
            t.start()
    for t in threads:
        t.join(timeout=120)
    assert got == expected  # token for token
    assert max(rows_seen) == 4  # they really decoded together, every slot busy, more requests than slots queued
    assert [(s.new_tokens, s.stop_reason) for s in stats] == [(s.new_tokens, s.stop_reason) for s in alone_stats]
    assert sum(s.new_tokens for s in stats) > 60 and all(0 < s.first_token_s <= s.total_s for s in stats)


def test_stop_frees_the_slot_within_a_step(load: Callable[[], LoadedModel]) -> None:
    engine = BatchEngine(load(), slots=1)
    long = SamplingParams(max_new_tokens=200, temperature=0.0)
    cancel, stats = threading.Event(), GenerationStats()
    stream = engine.stream([1, 5, 9, 11], None, long, cancel=cancel, stats=stats)
    next(stream)
    cancel.set()
    rest = list(stream)
    assert stats.stop_reason == "cancelled" and len(rest) <= 2  # at most the step already under way
    started = time.perf_counter()
    assert engine.complete([1, 6, 8], None, SamplingParams(max_new_tokens=5, temperature=0.0))  # the one slot is free
    assert time.perf_counter() - started < 30


def test_a_reader_that_goes_away_frees_its_slot(load: Callable[[], LoadedModel]) -> None:
    engine = BatchEngine(load(), slots=1)
    stream = engine.stream([1, 5, 9, 11], None, SamplingParams(max_new_tokens=200, temperature=0.0))
    next(stream)
    stream.close()  # e.g. a client that disconnected
    out = engine.complete([1, 6, 8], None, SamplingParams(max_new_tokens=5, temperature=0.0))
    assert out


def test_a_follow_up_reuses_its_slot(load: Callable[[], LoadedModel]) -> None:
    engine = BatchEngine(load(), slots=2)
    greedy = SamplingParams(max_new_tokens=6, temperature=0.0)
    first = [1] + list(range(20, 60))
    engine.complete(first, None, greedy)
    stats = GenerationStats()
    follow = first + [77, 78, 79]
    answer = engine.complete(follow, None, greedy, stats=stats)
    assert stats.reused_tokens == len(first)
    assert answer == Engine(load()).complete(follow, None, greedy)


def test_an_adapter_swap_runs_alone(load: Callable[[], LoadedModel],
                                    tiny_adapter: Callable[[int, int], Path]) -> None:
    from multimodal.swap import AdapterSwap

    greedy = SamplingParams(max_new_tokens=8, temperature=0.0)
    plain = Engine(load())
    expected = "".join(plain.stream([1, 40, 7], None, greedy, adapter=AdapterSwap(plain.model, tiny_adapter(0, 9))))
    engine = BatchEngine(load(), slots=2)
    swap = AdapterSwap(engine.model, tiny_adapter(0, 9))
    assert "".join(engine.stream([1, 40, 7], None, greedy, adapter=swap)) == expected
    assert engine.complete([1, 40, 7], None, greedy) == plain.complete([1, 40, 7], None, greedy)  # swapped back


def test_concurrent_api_requests_share_one_batching_engine(load: Callable[[], LoadedModel]) -> None:
    """The OpenAI endpoint on a real loopback server, backed by a BatchEngine: concurrent clients with
    different questions and images get exactly the answers a one-at-a-time engine gives them."""
    import base64
    import contextlib
    import io
    from concurrent.futures import ThreadPoolExecutor

    import httpx
    from PIL import Image

    from app.openai_api import ApiSettings
    from conftest import serve_app
    from test_app import make_app

    def png(colour: tuple[int, int, int]) -> str:
        buf = io.BytesIO()
        Image.new("RGB", (48, 40), colour).save(buf, format="PNG")
        return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()

    def body(i: int) -> dict:
        content: list[dict] = [{"type": "text", "text": f"question number {i}: what is there?"}]
        if i % 2:
            content.append({"type": "image_url", "image_url": {"url": png((40 * i % 256, 90, 200))}})
        return {"model": "m", "messages": [{"role": "user", "content": content}], "temperature": 0,
                "max_tokens": 12, "experts": []}

    answers, rows_seen = {}, []
    batched = BatchEngine(load(), slots=4)
    step = batched.model.llama.step
    batched.model.llama.step = lambda token, *args: rows_seen.append(token.shape[0]) or step(token, *args)
    for engine in (Engine(load()), batched):
        with serve_app(make_app(engine), ApiSettings()) as url, httpx.Client(base_url=url, timeout=120) as client:
            def ask(i: int) -> str:
                r = client.post("/v1/chat/completions", json=body(i))
                assert r.status_code == 200, r.text
                return r.json()["choices"][0]["message"]["content"]
            with ThreadPoolExecutor(6) as pool:
                with engine.gathered(6) if engine is batched else contextlib.nullcontext():
                    futures = [pool.submit(ask, i) for i in range(6)]  # queued together, whatever the timing
                answers[type(engine).__name__] = [f.result() for f in futures]
    assert answers["BatchEngine"] == answers["Engine"]
    assert max(rows_seen) == 4  # the server's threads really decoded together, every slot busy
    assert len(set(answers["Engine"])) > 1  # different questions, different answers
