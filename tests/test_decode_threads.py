"""Decoding threads: chosen by measurement at load, used for decoding steps only, and set back after.

The reference answer is the fixture's (stories260K's recorded greedy story), so a thread count that
changed what is computed would fail here, not only be slower."""
from __future__ import annotations

import argparse
import json
import threading

import pytest
import torch

from conftest import fixture_path
from multimodal.generate import Engine, SamplingParams
from multimodal.loading import load_model
from multimodal.options import add_model_args
from multimodal.threads import fastest, seconds_per_step

GREEDY = SamplingParams(max_new_tokens=40, temperature=0.0)


@pytest.fixture(scope="module")
def loaded():
    ckpt = fixture_path("stories260K/consolidated.00.pth").parent
    return load_model(ckpt, ckpt / "tokenizer.model", preset="tiny", device="cpu", dtype="float32")


@pytest.fixture(autouse=True)
def two_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def reference() -> str:
    return json.loads(fixture_path("stories260K/reference.json").read_text())["Once upon a time"]["greedy_text"]


def test_fewer_threads_win_unless_more_are_clearly_faster() -> None:
    assert fastest({1: 0.0200, 2: 0.0195}) == 1  # within 5%: keep a core free
    assert fastest({1: 0.0200, 2: 0.0100}) == 2
    assert fastest({1: 0.0100, 2: 0.0200}) == 1
    assert fastest({1: 0.030, 2: 0.025, 4: 0.012}) == 4


def test_each_count_is_timed_in_turn_and_the_count_is_set_back() -> None:
    seen: list[int] = []
    timings = seconds_per_step(lambda i: seen.append(torch.get_num_threads()), (1, 2), steps=3, rounds=2, restore=2)
    assert set(timings) == {1, 2} and all(t >= 0 for t in timings.values())
    assert seen == [1] * 4 + [2] * 4 + [1] * 4 + [2] * 4  # an untimed call, then 3 timed, per count and round
    assert torch.get_num_threads() == 2


def test_decoding_uses_its_threads_and_the_prefill_all(loaded, monkeypatch: pytest.MonkeyPatch) -> None:
    engine = Engine(loaded, decode_threads=1)
    assert (engine.threads, engine.decode_threads) == (2, 1)
    llama = engine.model.llama
    calls: list[tuple[int, int]] = []  # (tokens in the call, torch threads)
    real_forward = llama.forward

    def spy(tokens, *args, **kwargs):
        calls.append((tokens.shape[1], torch.get_num_threads()))
        return real_forward(tokens, *args, **kwargs)

    monkeypatch.setattr(llama, "forward", spy)
    text = "".join(engine.stream("Once upon a time", None, GREEDY))
    assert text == reference()
    assert calls[0] == (5, 2)  # the prompt: every thread
    assert {c for c in calls[1:]} == {(1, 1)} and len(calls) == 40  # each further token: one thread
    assert torch.get_num_threads() == 2  # set back when the answer ends


def test_an_answer_resumed_in_another_thread_still_decodes_with_its_count(loaded) -> None:
    """A web server may run each step of a streamed answer in whichever pooled thread is free."""
    engine = Engine(loaded, decode_threads=1)
    stream = engine.stream("Once upon a time", None, GREEDY)
    pieces = [next(stream)]
    counts: list[int] = []

    def rest() -> None:
        for piece in stream:
            pieces.append(piece)
        counts.append(torch.get_num_threads())

    worker = threading.Thread(target=rest)
    worker.start()
    worker.join()
    assert "".join(pieces) == reference()
    assert counts == [2]  # the thread that finished the answer is left with the load-time count


def test_auto_measures_one_and_all_threads_and_gives_the_same_answer(loaded) -> None:
    engine = Engine(loaded, decode_threads="auto")
    assert set(engine.decode_timings) == {1, 2} and engine.decode_threads in (1, 2)
    assert "".join(engine.stream("Once upon a time", None, GREEDY)) == reference()
    plain = Engine(loaded)  # None: torch's count, nothing measured
    assert (plain.decode_threads, plain.decode_timings) == (2, {})


def test_bad_counts_are_refused(loaded) -> None:
    with pytest.raises(ValueError, match="at least 1"):
        Engine(loaded, decode_threads=0)
    parser = argparse.ArgumentParser()
    add_model_args(parser)
    with pytest.raises(SystemExit):
        parser.parse_args(["--decode-threads", "none"])
    assert parser.parse_args(["--decode-threads", "3"]).decode_threads == "3"
    assert parser.parse_args([]).decode_threads == "auto"
