"""The fixed-shape decoding step (Transformer.step) and the compiled engine that uses it: the same
logits as the ordinary forward at every position, the reference story through torch.compile with one
graph for every position and turn, and no compiling of packed weights."""
from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from conftest import fixture_path
from multimodal.config import TINY_CLIP, build_preset
from multimodal.generate import Engine, GenerationStats, SamplingParams
from multimodal.image import open_image
from multimodal.loading import load_model
from multimodal.model import MultimodalLlama
from multimodal.options import ModelOptions
from tiny import write_openai_clip


@pytest.mark.parametrize("with_image", [True, False])
def test_step_gives_the_forward_logits_at_every_position(with_image: bool) -> None:
    torch.manual_seed(0)
    model = MultimodalLlama(build_preset("tiny")).eval()  # GQA: 4 heads over 2 KV heads
    with torch.no_grad():
        for layer in model.llama.layers:
            if layer.attention.prompt_gate is not None:
                layer.attention.prompt_gate.gate.fill_(0.5)  # prompts must change the logits
    llama, tokens = model.llama, [1, 40, 7, 99, 200]
    with torch.inference_mode():
        prompts = model.prompt_kv(torch.randn(1, 3, 32, 32)) if with_image else None
        runs = []
        for use_step in (False, True):
            llama.setup_cache(max_seq_len=32)
            logits = llama(torch.tensor([tokens]), 0, prompts, last_only=True)
            pos, out = torch.tensor([len(tokens)]), []
            for i in range(12):
                token = logits.argmax(-1).view(1, 1)
                if use_step:
                    logits = llama.step(token, pos, prompts)
                    pos += 1
                else:
                    logits = llama(token, len(tokens) + i, prompts, last_only=True)
                out.append(logits)
            runs.append(torch.cat(out))
    torch.testing.assert_close(runs[1], runs[0], rtol=1e-5, atol=1e-5)
    assert runs[0].std(0).max() > 0.1  # the steps saw different positions and tokens, not one repeated input


def test_compiled_engine_streams_the_reference_story_with_one_graph(tmp_path: Path) -> None:
    """Real inductor compilation on the CPU (about half a minute here); greedy text must equal the
    fixture's reference, which transformers produced, with and without an image and over two turns."""
    ckpt = fixture_path("stories260K/consolidated.00.pth").parent
    ref = json.loads(fixture_path("stories260K/reference.json").read_text())["Once upon a time"]["greedy_text"]
    write_openai_clip(tmp_path / "clip.pt", TINY_CLIP)
    loaded = load_model(ckpt, ckpt / "tokenizer.model", tmp_path / "clip.pt", preset="tiny", device="cpu", dtype="float32")
    engine = Engine(loaded, compile=True)
    greedy = SamplingParams(max_new_tokens=40, temperature=0.0)
    image = open_image(fixture_path("images/bus.jpg"))
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    assert engine.warm_up() > 0
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] - graphs == 1  # image or not: the same prompt layout
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    stats = GenerationStats()
    assert engine.complete("Once upon a time", image, greedy, stats=stats) == ref
    assert stats.new_tokens == 40
    ids = engine.tokenizer.encode("Once upon a time", bos=True) + engine.tokenizer.encode(ref, bos=False)[:6]
    follow = engine.complete(ids, image, SamplingParams(max_new_tokens=10, temperature=0.0), stats=stats)
    assert stats.reused_tokens > 0  # a follow-up on the cached prefix, decoded by the same compiled step
    assert follow == Engine(loaded).complete(ids, image, SamplingParams(max_new_tokens=10, temperature=0.0))
    assert engine.complete("Once upon a time", None, greedy) == ref  # without an image too
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs  # warm-up compiled all: none per position


def test_compile_and_packed_weights_exclude_each_other() -> None:
    options = ModelOptions(model="demo", device="cpu", dtype="bfloat16", compile=True)
    loaded = options.load()  # the demo model in weights/demo, loaded for compiling: not packed
    assert not any(p.is_mkldnn for p in loaded.model.llama.parameters())
    packed = ModelOptions(model="demo", device="cpu", dtype="bfloat16", compile=False).load()
    if any(p.is_mkldnn for p in packed.model.llama.parameters()):  # packed where it pays (this CPU: yes)
        with pytest.raises(ValueError, match="compile needs plain weights"):
            Engine(packed, compile=True)


def test_compiled_engine_follows_an_adapter_swap(tiny_files: dict[str, Path],
                                                 tiny_adapter: Callable[[int, int], Path]) -> None:
    """The caption expert swaps another adapter's tensors in for one request: the compiled step must
    read the swapped-in tensors (and the main ones again afterwards), as the eager engine does."""
    from multimodal.swap import AdapterSwap

    greedy = SamplingParams(max_new_tokens=12, temperature=0.0)
    answers = []
    for compile in (False, True):
        loaded = load_model(tiny_files["llama_dir"], tiny_files["tokenizer_path"], tiny_files["clip_path"],
                            tiny_adapter(2, 5), preset="tiny", device="cpu", dtype="float32")
        engine, swap = Engine(loaded, compile=compile), AdapterSwap(loaded.model, tiny_adapter(2, 9))
        main = engine.complete([1, 40, 7, 99], None, greedy)
        other = "".join(engine.stream([1, 40, 7, 99], None, greedy, adapter=swap))
        answers.append((main, other, engine.complete([1, 40, 7, 99], None, greedy)))
    assert answers[1] == answers[0]
    assert answers[0][0] != answers[0][1] and answers[0][2] == answers[0][0]  # the swap changes the answer, then not
