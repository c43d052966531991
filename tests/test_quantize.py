"""Weight-only int8 (torchao): the language model's base weights are int8, everything tuned stays as
it was, and the logits stay close to full precision."""
from __future__ import annotations

from pathlib import Path

import torch

from multimodal.config import build_preset
from multimodal.generate import Engine, SamplingParams
from multimodal.loading import load_model
from tiny import write_official_adapter


def test_int8_weights_keep_logits_close(tiny_files: dict[str, Path], tmp_path: Path) -> None:
    write_official_adapter(tmp_path / "a.pth", build_preset("tiny"), lora_rank=2, seed=5)
    args = (tiny_files["llama_dir"], tiny_files["tokenizer_path"], tiny_files["clip_path"], tmp_path / "a.pth")
    full = load_model(*args, preset="tiny", device="cpu", dtype="float32")
    q = load_model(*args, preset="tiny", device="cpu", dtype="float32", quantize="int8")
    attn = q.model.llama.layers[2].attention
    assert type(attn.wq.weight).__name__ != "Parameter" and "Int8" in type(attn.wq.weight).__name__
    assert type(q.model.llama.output.weight).__name__ != "Parameter"
    assert attn.wq.lora_a.dtype == torch.float32 and attn.wq.bias.dtype == torch.float32  # tuned parts untouched
    assert type(q.model.clip.conv1.weight) is torch.nn.Parameter  # CLIP untouched
    assert torch.equal(attn.prompt_gate.gate, full.model.llama.layers[2].attention.prompt_gate.gate)

    tokens = torch.tensor([[1, 40, 7, 99, 200, 13, 5, 77]])
    pixels = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref, out = full.model(tokens, pixels), q.model(tokens, pixels)
    rel = ((out - ref).norm() / ref.norm()).item()
    assert 0 < rel < 0.05, rel  # quantised (not identical), but close: per-channel int8 on random weights
    agree = (out.argmax(-1) == ref.argmax(-1)).float().mean().item()
    assert agree >= 0.75, agree
    greedy = SamplingParams(max_new_tokens=8, temperature=0.0)
    assert Engine(q).complete([1, 40, 7, 99], None, greedy)  # generation runs on the quantised model
