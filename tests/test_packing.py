"""Language-model weights prepacked for oneDNN (bfloat16 on the CPU): the same numbers, the same
greedy tokens and the same adapter swaps as the plain weights, and never used for training."""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from multimodal.adapter import AdaptedLinear
from multimodal.generate import Engine, SamplingParams
from multimodal.loading import LoadedModel, load_model
from multimodal.packing import can_pack, pack_language_model, packing_pays, unpack_language_model
from multimodal.swap import AdapterSwap
from multimodal.train.build import load_for_training

PAYS = packing_pays("cpu", torch.bfloat16)  # this CPU runs oneDNN bf16 natively (avx512_bf16 or AMX)


@pytest.fixture(scope="module")
def files(tiny_files: dict[str, Path], tiny_adapter: Callable[[int, int], Path]) -> dict[str, Path]:
    return tiny_files | {"main": tiny_adapter(2, 5), "other": tiny_adapter(2, 9)}


def _load(files: dict[str, Path], **kw: object) -> LoadedModel:
    return load_model(files["llama_dir"], files["tokenizer_path"], files["clip_path"], files["main"],
                      preset="tiny", device="cpu", dtype="bfloat16", **kw)


def _linears(loaded: LoadedModel) -> list[AdaptedLinear]:
    return [m for m in loaded.model.llama.modules() if isinstance(m, AdaptedLinear)]


def _inputs() -> tuple[torch.Tensor, torch.Tensor]:
    tokens = torch.tensor([[1, 40, 7, 99, 200, 13, 5, 77, 310, 4]])
    pixels = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    return tokens, pixels


def test_bf16_cpu_load_packs_where_it_pays_and_not_for_other_dtypes(files: dict[str, Path]) -> None:
    default = _load(files)
    assert all(m.weight.is_mkldnn for m in _linears(default)) == PAYS
    assert not any(m.weight.is_mkldnn for m in _linears(_load(files, pack=False)))
    fp32 = load_model(files["llama_dir"], files["tokenizer_path"], files["clip_path"], files["main"],
                      preset="tiny", device="cpu", dtype="float32")
    assert not any(m.weight.is_mkldnn for m in _linears(fp32))  # float32 packed measured slower
    assert not can_pack("cpu", torch.float32) and not can_pack("cuda", torch.bfloat16)
    with pytest.raises(ValueError, match=r"layers\.0\.attention\.wq\.weight is torch\.float32 on cpu"):
        pack_language_model(fp32.model.llama)


def test_packed_weights_compute_the_same_logits(files: dict[str, Path]) -> None:
    plain, default = _load(files, pack=False), _load(files, pack=True)
    n_layers = plain.config.llama.n_layers
    packed = _linears(default)
    assert len(packed) == 7 * n_layers + 1 and all(m.weight.is_mkldnn for m in packed)  # wq..w3 per layer + output
    assert not any(m.weight.is_mkldnn for m in _linears(plain))
    attn = default.model.llama.layers[2].attention
    assert not attn.wq.bias.is_mkldnn and not attn.wq.lora_a.is_mkldnn  # tuned parts stay ordinary tensors
    assert not default.model.clip.conv1.weight.is_mkldnn  # CLIP is not packed

    tokens, pixels = _inputs()
    with torch.no_grad():
        ref, out = plain.model(tokens, pixels), default.model(tokens, pixels)
    assert ref.abs().max() > 1  # logits of a real size, so the comparison means something
    # bf16 outputs, fp32 accumulation in both: the same numbers up to summation order
    torch.testing.assert_close(out, ref, rtol=2e-2, atol=2e-2)
    assert (out.argmax(-1) == ref.argmax(-1)).all()


def test_packed_engine_gives_the_same_greedy_answers_over_two_turns(files: dict[str, Path]) -> None:
    from PIL import Image

    image = Image.new("RGB", (40, 40), (200, 30, 30))
    greedy = SamplingParams(max_new_tokens=12, temperature=0.0)
    answers = []
    for pack in (False, True):
        engine = Engine(_load(files, pack=pack))
        first = [1, 40, 7, 99, 200, 13]
        a1 = engine.complete(first, image, greedy)
        a2 = engine.complete(first + engine.loaded.tokenizer.encode(a1, bos=False, eos=False) + [5, 77, 310], image, greedy)
        answers.append((a1, a2))
    assert answers[0][0]  # a real answer, not an empty string
    assert answers[1] == answers[0]


def test_adapter_swap_on_a_packed_model_matches_the_plain_model(files: dict[str, Path]) -> None:
    greedy = SamplingParams(max_new_tokens=12, temperature=0.0)
    outs = []
    for pack in (False, True):
        loaded = _load(files, pack=pack)
        engine, swap = Engine(loaded), AdapterSwap(loaded.model, files["other"])
        swapped = "".join(engine.stream([1, 40, 7, 99], None, greedy, adapter=swap))
        outs.append((swapped, engine.complete([1, 40, 7, 99], None, greedy)))
    assert outs[1] == outs[0]
    assert outs[0][0] != outs[0][1]  # the other adapter does change the answer, so the swap was exercised


def test_unpack_restores_the_exact_weights_and_training_never_packs(files: dict[str, Path]) -> None:
    plain, packed = _load(files, pack=False), _load(files, pack=True)
    assert unpack_language_model(packed.model.llama) == 7 * plain.config.llama.n_layers + 1
    for a, b in zip(_linears(plain), _linears(packed)):
        assert not b.weight.is_mkldnn and torch.equal(a.weight, b.weight)
    trained = load_for_training(files["llama_dir"], files["tokenizer_path"], files["clip_path"], "tiny",
                                files["main"], dtype="bfloat16")
    assert not any(m.weight.is_mkldnn for m in _linears(trained))
    frozen_grad = _load(files, pack=False)
    frozen_grad.model.llama.output.weight.requires_grad_(True)
    with pytest.raises(ValueError, match="inference only"):
        pack_language_model(frozen_grad.model.llama)
