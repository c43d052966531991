"""The caption expert runs a second adapter on the already loaded base model: no second copy."""
from __future__ import annotations

from pathlib import Path

import torch

from conftest import fixture_path
from experts.caption import CaptionExpert
from multimodal.config import build_preset
from multimodal.generate import Engine, SamplingParams
from multimodal.image import open_image
from multimodal.loading import load_model
from multimodal.swap import AdapterSwap, Captioner
from tiny import write_official_adapter


def test_caption_expert_reuses_the_loaded_base(tiny_files: dict[str, Path], tmp_path: Path) -> None:
    cfg = build_preset("tiny")
    write_official_adapter(tmp_path / "main.pth", cfg, seed=10)
    write_official_adapter(tmp_path / "caption.pth", cfg, seed=11)
    loaded = load_model(tiny_files["llama_dir"], tiny_files["tokenizer_path"], tiny_files["clip_path"],
                        tmp_path / "main.pth", preset="tiny", device="cpu", dtype="float32")
    engine = Engine(loaded)
    model = loaded.model
    base = {n: (p.data_ptr(), p.clone()) for n, p in model.named_parameters() if n.endswith("wk.weight") or "clip." in n}
    tuned_before = {k: v.clone() for k, v in model.trainable_state_dict().items()}
    image = open_image(fixture_path("images/bus.jpg"))
    greedy = SamplingParams(max_new_tokens=12, temperature=0.0)
    main_answer = engine.complete("a photo of", image, greedy)

    swap = AdapterSwap(model, tmp_path / "caption.pth")
    trainable_bytes = sum(v.numel() * v.element_size() for v in tuned_before.values())
    assert swap.nbytes <= trainable_bytes  # only adapter-sized tensors are held, never base weights
    expert = CaptionExpert(Captioner(engine, swap, greedy))
    result = expert.run(image)
    assert result.ok and result.context.startswith("Caption:")

    # the caption adapter really ran: its answer to the same prompt differs from the main adapter's
    with_caption_adapter = "".join(engine.stream("a photo of", image, greedy, adapter=swap))
    assert with_caption_adapter != main_answer
    # and afterwards the model is the main one again, on the very same base storage
    assert engine.complete("a photo of", image, greedy) == main_answer
    for n, (ptr, value) in base.items():
        p = dict(model.named_parameters())[n]
        assert p.data_ptr() == ptr and torch.equal(p, value), n
    for k, v in model.trainable_state_dict().items():
        assert torch.equal(v, tuned_before[k]), k


def test_without_caption_adapter_the_main_model_captions(tiny_files: dict[str, Path]) -> None:
    loaded = load_model(tiny_files["llama_dir"], tiny_files["tokenizer_path"], tiny_files["clip_path"], None,
                        preset="tiny", device="cpu", dtype="float32")
    captioner = Captioner(Engine(loaded), None, SamplingParams(max_new_tokens=8, temperature=0.0))
    result = CaptionExpert(captioner).run(open_image(fixture_path("images/bus.jpg")))
    assert result.ok, result.error
