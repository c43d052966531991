"""Generation: sampling rules, streaming text, cancel, EOS, and the whole load -> stream path on a real
checkpoint."""
from __future__ import annotations

import json
import threading

import pytest
import torch

import multimodal.generate as gen
from conftest import fixture_path
from multimodal.config import TINY_CLIP
from multimodal.generate import Engine, GenerationStats, PromptTooLongError, SamplingParams, sample
from multimodal.image import open_image
from multimodal.loading import load_model
from multimodal.tokenizer import StreamDecoder, Tokenizer
from tiny import write_openai_clip


@pytest.fixture(scope="module")
def stories_engine(tmp_path_factory: pytest.TempPathFactory) -> Engine:
    """The real stories260K LLaMA under the tiny multimodal preset (a random tiny CLIP, closed gates)."""
    ckpt = fixture_path("stories260K/consolidated.00.pth").parent
    clip = tmp_path_factory.mktemp("clip") / "clip.pt"
    write_openai_clip(clip, TINY_CLIP)
    loaded = load_model(ckpt, ckpt / "tokenizer.model", clip, preset="tiny", device="cpu", dtype="float32")
    return Engine(loaded)


def test_streams_the_reference_story_whatever_the_image(stories_engine: Engine) -> None:
    ref = json.loads(fixture_path("stories260K/reference.json").read_text())["Once upon a time"]
    greedy = SamplingParams(max_new_tokens=40, temperature=0.0)
    for image in (open_image(fixture_path("images/bus.jpg")), None):
        stats = GenerationStats()
        pieces = list(stories_engine.stream("Once upon a time", image, greedy, stats=stats))
        assert len(pieces) > 10  # streamed, not one blob
        assert "".join(pieces) == ref["greedy_text"]
        assert (stats.prompt_tokens, stats.new_tokens, stats.stop_reason) == (5, 40, "length")
        assert 0 < stats.first_token_s <= stats.total_s


def test_cancel_stops_between_tokens(stories_engine: Engine) -> None:
    cancel = threading.Event()
    stats = GenerationStats()
    pieces = []
    for piece in stories_engine.stream("Once upon a time", None, SamplingParams(100, 0.0), cancel, stats):
        pieces.append(piece)
        cancel.set()
    assert len(pieces) == 1 and stats.stop_reason == "cancelled" and stats.new_tokens == 1


@pytest.mark.parametrize("overlap", [False, True])
def test_stops_at_eos(stories_engine: Engine, monkeypatch: pytest.MonkeyPatch, overlap: bool) -> None:
    monkeypatch.setattr(stories_engine, "overlap_decode", overlap)
    calls = []

    def fake_sample(logits: torch.Tensor, *args: object) -> torch.Tensor:
        calls.append(1)
        return torch.tensor([stories_engine.tokenizer.eos_id if len(calls) == 3 else 400])

    monkeypatch.setattr(gen, "sample", fake_sample)
    stats = GenerationStats()
    pieces = list(stories_engine.stream("Once", None, SamplingParams(50, 0.0), stats=stats))
    assert (stats.new_tokens, stats.stop_reason) == (2, "eos")
    assert stories_engine._kv_ids[-2:] == [400, 400]  # the EOS step's keys/values are not counted as cached
    assert "".join(pieces) == stories_engine.tokenizer.decode([400, 400])


def test_prompt_longer_than_the_context_is_refused(stories_engine: Engine) -> None:
    ids = [1] + [400] * stories_engine.max_seq_len
    with pytest.raises(PromptTooLongError, match=f"{len(ids)} tokens"):
        next(stories_engine.stream(ids))


def test_concurrent_requests_do_not_corrupt_each_other(stories_engine: Engine) -> None:
    params = SamplingParams(max_new_tokens=20, temperature=0.0)
    prompts = ["Once upon a time", "The cat sat", "Lily was"]
    expected = [stories_engine.complete(p, None, params) for p in prompts]
    results: dict[int, str] = {}
    threads = [threading.Thread(target=lambda i=i: results.__setitem__(i, stories_engine.complete(prompts[i], None, params)))
               for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [results[i] for i in range(3)] == expected


def test_seeded_sampling_is_reproducible(stories_engine: Engine) -> None:
    params = SamplingParams(max_new_tokens=15, temperature=1.0, top_p=0.95, seed=123)
    a = stories_engine.complete("Once upon a time", None, params)
    b = stories_engine.complete("Once upon a time", None, params)
    c = stories_engine.complete("Once upon a time", None, SamplingParams(15, 1.0, 0.95, seed=7))
    assert a == b and a != c


def test_sampling_rules() -> None:
    logits = torch.log(torch.tensor([[0.05, 0.5, 0.15, 0.3]]))
    assert sample(logits, 0.0, 0.75, None).tolist() == [1]
    assert sample(logits, 1.0, 1e-6, None).tolist() == [1]  # a tiny nucleus holds only the top token
    g = torch.Generator().manual_seed(0)
    draws = [int(sample(logits, 1.0, 0.75, g)) for _ in range(1000)]
    assert set(draws) == {1, 3}  # 0.5 + 0.3 reaches 0.75; 0.15 and 0.05 are outside the nucleus
    assert draws.count(1) / 1000 == pytest.approx(0.5 / 0.8, abs=0.05)  # renormalised within the nucleus
    draws = [int(sample(logits, 1.0, 1.0, g)) for _ in range(2000)]
    assert [draws.count(i) / 2000 for i in range(4)] == pytest.approx([0.05, 0.5, 0.15, 0.3], abs=0.04)


@pytest.mark.parametrize("tokenizer_file", ["llama/tokenizer.model", "stories260K/tokenizer.model"])
def test_stream_decoder_pieces_join_to_the_full_text(tokenizer_file: str) -> None:
    tok = Tokenizer(fixture_path(tokenizer_file))
    text = "Hello world, a bus with 4 people. Café 東京 🙂 naïve!\nNew line  two spaces."
    ids = tok.encode(text, bos=False)
    decoder = StreamDecoder(tok)
    pieces = [decoder.push(i) for i in ids] + [decoder.flush()]
    assert "".join(pieces) == tok.decode(ids)
    assert not any("\ufffd" in p for p in pieces)  # multi-byte characters are never split
    assert sum(1 for p in pieces if p) > 10


def test_sampling_params_are_validated() -> None:
    with pytest.raises(ValueError):
        SamplingParams(max_new_tokens=0)
    with pytest.raises(ValueError):
        SamplingParams(top_p=0.0)


def test_follow_up_turn_reuses_the_cached_prefix_and_gives_the_same_answer(stories_engine: Engine) -> None:
    image = open_image(fixture_path("images/bus.jpg"))
    greedy = SamplingParams(max_new_tokens=12, temperature=0.0)
    first = GenerationStats()
    answer = stories_engine.complete("Once upon a time", image, greedy, stats=first)
    follow_up = "Once upon a time" + answer + " Then the girl"
    reused = GenerationStats()
    with_reuse = stories_engine.complete(follow_up, image, greedy, stats=reused)
    n_first = len(stories_engine.tokenizer.encode("Once upon a time"))
    assert reused.reused_tokens >= n_first + 5  # the first prompt and (most of) its answer were not prefilled again

    stories_engine.forget()
    fresh = GenerationStats()
    assert stories_engine.complete(follow_up, image, greedy, stats=fresh) == with_reuse
    assert fresh.reused_tokens == 0

    other = GenerationStats()  # another image: the cached keys/values belong to the first one
    stories_engine.complete(follow_up, open_image(fixture_path("images/zidane.jpg")), greedy, stats=other)
    assert other.reused_tokens == 0


def test_overlapped_decoding_order_gives_the_same_tokens(stories_engine: Engine, monkeypatch: pytest.MonkeyPatch) -> None:
    """CUDA queues step t+1 before reading token t; forced on here, the answers, EOS handling and
    prefix reuse must be exactly those of the plain order."""
    ref = json.loads(fixture_path("stories260K/reference.json").read_text())["Once upon a time"]
    greedy = SamplingParams(max_new_tokens=40, temperature=0.0)
    monkeypatch.setattr(stories_engine, "overlap_decode", True)
    stories_engine.forget()
    assert stories_engine.complete("Once upon a time", None, greedy) == ref["greedy_text"]
    follow = GenerationStats()
    text = stories_engine.complete("Once upon a time" + ref["greedy_text"] + " Lily", None, greedy, stats=follow)
    assert follow.reused_tokens > 40
    monkeypatch.setattr(stories_engine, "overlap_decode", False)
    stories_engine.forget()
    assert stories_engine.complete("Once upon a time" + ref["greedy_text"] + " Lily", None, greedy) == text
