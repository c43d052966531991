"""LoRA folded into the frozen weights at load: the same logits and answers as LoRA applied apart, no
LoRA left to swap (with a clear message), and the app keeps LoRA apart when its caption adapter has
LoRA of its own."""
from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from app.__main__ import keep_lora_swappable
from multimodal.adapter import AdaptedLinear
from multimodal.generate import Engine, SamplingParams
from multimodal.loading import LoadedModel, load_model
from multimodal.options import ModelOptions
from multimodal.swap import AdapterSwap


@pytest.fixture(scope="module")
def files(tiny_files: dict[str, Path], tiny_adapter: Callable[[int, int], Path]) -> dict[str, Path]:
    return tiny_files | {"lora": tiny_adapter(4, 5), "bias": tiny_adapter(0, 9)}


def _load(files: dict[str, Path], adapter: str = "lora", **kw: object) -> LoadedModel:
    return load_model(files["llama_dir"], files["tokenizer_path"], files["clip_path"], files[adapter],
                      preset="tiny", device="cpu", **kw)


def _logits(loaded: LoadedModel) -> torch.Tensor:
    tokens = torch.tensor([[1, 40, 7, 99, 200, 13, 5, 77, 310, 4]])
    pixels = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return loaded.model(tokens, pixels)


def test_merged_lora_gives_the_same_logits_and_answers(files: dict[str, Path]) -> None:
    apart, merged = _load(files, dtype="float32"), _load(files, dtype="float32", merge_lora=True)
    lora = {name.rsplit(".", 1)[0] for name, _ in merged.model.named_parameters() if ".lora_" in name}
    # wk/wv keep LoRA apart (prompts go through their bare weights); wq, wo, w1, w2, w3 are merged
    assert lora and all(name.endswith((".wk", ".wv")) for name in lora)
    assert merged.model.llama.layers[1].feed_forward.w2.lora_a is None
    ref, out = _logits(apart), _logits(merged)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    # LoRA matters in these logits, so matching them is not automatic
    for m in apart.model.llama.modules():
        if isinstance(m, AdaptedLinear) and m.lora_b is not None:
            m.lora_b.data.zero_()
    assert (_logits(apart) - ref).abs().max() > 100 * (out - ref).abs().max()
    greedy = SamplingParams(max_new_tokens=12, temperature=0.0)
    assert Engine(merged).complete([1, 40, 7, 99], None, greedy) == \
        Engine(_load(files, dtype="float32")).complete([1, 40, 7, 99], None, greedy)


def test_merging_composes_with_bf16_packing_and_int8(files: dict[str, Path]) -> None:
    ref = _logits(_load(files, dtype="float32"))
    packed = _load(files, dtype="bfloat16", merge_lora=True, pack=True)
    assert packed.model.llama.layers[1].attention.wq.weight.is_mkldnn
    rel = lambda out: ((out - ref).norm() / ref.norm()).item()  # noqa: E731
    bf16_error = rel(_logits(_load(files, dtype="bfloat16", pack=False)))  # bf16 rounding, LoRA apart
    assert 0 < rel(_logits(packed)) < 1.5 * bf16_error, (rel(_logits(packed)), bf16_error)  # no worse than that
    q = _load(files, dtype="float32", merge_lora=True, quantize="int8")
    assert rel(_logits(q)) < 0.05  # int8 of the merged weights, as test_quantize allows for the base


def test_a_lora_adapter_cannot_be_swapped_into_a_merged_model(files: dict[str, Path]) -> None:
    merged = _load(files, dtype="float32", merge_lora=True)
    with pytest.raises(ValueError, match="merged into the weights"):
        AdapterSwap(merged.model, files["lora"])
    AdapterSwap(merged.model, files["bias"])  # an adapter without LoRA still swaps in


def test_app_keeps_lora_apart_only_for_a_caption_adapter_with_lora(files: dict[str, Path], tmp_path: Path) -> None:
    options = ModelOptions(model="demo", device="cpu")
    assert options.merge_lora  # the default for inference

    def caption(value: str) -> argparse.Namespace:
        return argparse.Namespace(caption_adapter=value)

    assert not keep_lora_swappable(caption(str(files["lora"])), options).merge_lora
    assert keep_lora_swappable(caption(str(files["bias"])), options).merge_lora
    assert keep_lora_swappable(caption("none"), options).merge_lora
    assert keep_lora_swappable(caption(str(tmp_path / "absent.pth")), options).merge_lora
