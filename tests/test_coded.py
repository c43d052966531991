"""GGUF codes (multimodal/coded.py) and the compiled float32 step that reads them: codes equal to
transformers' independent dequantizers, the compiled product equal to the dense one, and compiled
decoding giving the eager path's greedy tokens on a tiny GGUF and transformers' on the real SmolLM2."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

gguf = pytest.importorskip("gguf")
from gguf import GGMLQuantizationType as QT  # noqa: E402

from multimodal.adapter import AdaptedLinear  # noqa: E402
from multimodal.coded import CodedProduct, coded_linear, read_codes  # noqa: E402
from multimodal.generate import VISIBLE_BLOCK, Engine, GenerationStats, SamplingParams, StepRunner, compile_step  # noqa: E402
from multimodal.loading import load_model  # noqa: E402
from test_format_gguf import smol_path, write_gguf  # noqa: E402


def quantized(dense: np.ndarray, qt: QT) -> np.ndarray:
    """gguf's own quantizer: [rows, bytes per row] uint8, as a reader hands a tensor out."""
    return gguf.quants.quantize(dense, qt).view(np.uint8).reshape(dense.shape[0], -1)


@pytest.mark.parametrize("qt", [QT.Q4_0, QT.Q4_1, QT.Q8_0], ids=lambda q: q.name)
def test_codes_stand_for_exactly_the_dequantized_weights(qt: QT) -> None:
    from transformers.integrations.gguf.dequant import dequantize as hf_dequantize

    rows, cols = 5, 256  # not square: a transposed layout would show
    dense = np.random.default_rng(0).standard_normal((rows, cols)).astype(np.float32)
    data = quantized(dense, qt)
    codes = read_codes(data, qt, (rows, cols))
    expected = hf_dequantize(torch.from_numpy(data.reshape(-1).copy()), int(qt)).reshape(rows, cols)
    assert torch.equal(codes.dequantize(), expected.float())  # bit for bit: the same weights
    assert codes.codes.element_size() == 1 and codes.scale.shape == (rows, cols // 32)
    assert (codes.offset is not None) == (qt == QT.Q4_1)
    assert codes.nbytes < dense.nbytes / 2.5  # what a decoding step reads instead of float32


def test_types_without_codes_are_left_dense() -> None:
    dense = np.ones((2, 256), dtype=np.float32)
    for qt in (QT.F32, QT.F16, QT.Q5_0):
        assert read_codes(dense.view(np.uint8), qt, (2, 256)) is None


@pytest.mark.parametrize("rows", [1, 3])
def test_compiled_coded_product_equals_the_dense_product(rows: int) -> None:
    dense = np.random.default_rng(1).standard_normal((96, 128)).astype(np.float32)
    c = read_codes(quantized(dense, QT.Q4_1), QT.Q4_1, (96, 128))
    x = torch.randn(rows, 1, 128, generator=torch.Generator().manual_seed(2))
    got = torch.compile(coded_linear, fullgraph=True, dynamic=False)(x, c.codes, c.scale, c.offset)
    torch.testing.assert_close(got, F.linear(x, c.dequantize()), rtol=1e-5, atol=1e-5)


def tiny_llama(max_positions: int = 256):
    """A random GQA LLaMA (transformers) of dims that are whole 32-weight blocks."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from test_format_gguf import train_bpe

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(train_bpe()[0]), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=max_positions,
                      rms_norm_eps=1e-5, rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
                      tie_word_embeddings=True)
    model = LlamaForCausalLM(cfg).eval()
    return model


def test_compiled_step_reads_the_codes_and_decodes_the_eager_tokens(tmp_path: Path) -> None:
    """A tiny Q4_1 GGUF with a tied embedding: the compiled engine (codes, stacked q/k/v and
    gate/up, visible prefix) gives the eager float32 engine's greedy tokens, across a VISIBLE_BLOCK
    boundary and with one graph for every position."""
    path = write_gguf(tmp_path / "tiny-q4_1.gguf", tiny_llama(), qtype=QT.Q4_1, tie=True)
    greedy = SamplingParams(max_new_tokens=40, temperature=0.0)
    ids = [5 + (i * 7) % 200 for i in range(VISIBLE_BLOCK - 20)]  # decoding crosses position VISIBLE_BLOCK
    loaded = load_model(path, dtype="float32", device="cpu", max_seq_len=256, codes=True)
    llama = loaded.model.llama
    coded = [m for m in llama.modules() if isinstance(m, AdaptedLinear) and m.codes is not None]
    assert len(coded) == 2 * 7 + 1  # every linear layer, the tied output head (the embedding's codes) included
    assert llama.output.codes.dtype == llama.layers[0].attention.wq.codes.dtype == torch.uint8  # Q4_1
    assert all(isinstance(b.attention.fused_qkv, CodedProduct) and isinstance(b.feed_forward.fused_w13, CodedProduct)
               for b in llama.layers)
    assert llama.layers[0].attention.wk.codes.data_ptr() != llama.layers[0].attention.fused_qkv.codes.data_ptr()
    assert llama.layers[0].attention.wk.codes.untyped_storage().data_ptr() == \
        llama.layers[0].attention.fused_qkv.codes.untyped_storage().data_ptr()  # views: stored once

    # the step's logits at each position equal the eager forward's (dense float32 weights)
    step = StepRunner(compile_step(llama), torch.device("cpu"), 256)
    with torch.inference_mode():
        llama.setup_cache(max_seq_len=256)
        logits = llama(torch.tensor([ids]), 0, None, last_only=True)
        steps, eager_steps = [], []
        for i in range(40):
            pos, token = len(ids) + i, logits.argmax(-1).view(1, 1)
            steps.append(step(token, torch.tensor([pos]), pos, None))
            logits = llama(token, pos, None, last_only=True)  # overwrites the same cache slot, same values
            eager_steps.append(logits)
    got, expected = torch.cat(steps), torch.cat(eager_steps)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4 * float(expected.abs().max()))
    assert not torch.equal(expected[1:], expected[:-1])  # the steps saw different positions, not one input

    eager = Engine(load_model(path, dtype="float32", device="cpu", max_seq_len=256)).complete(ids, None, greedy)
    engine = Engine(loaded, compile=True)
    engine.warm_up()
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    stats = GenerationStats()
    assert engine.complete(ids, None, greedy, stats=stats) == eager and stats.new_tokens == 40
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs  # no graph per visible length


def test_codes_need_plain_weights(tmp_path: Path) -> None:
    path = write_gguf(tmp_path / "tiny.gguf", tiny_llama(), qtype=QT.Q8_0, tie=True)
    with pytest.raises(ValueError, match="codes need plain weights"):
        load_model(path, dtype="bfloat16", device="cpu", pack=True, codes=True)


def test_compiled_smollm2_answers_as_transformers_does() -> None:
    """The real file through the app's options (``--compile``: codes, float32): the greedy answer
    equals transformers' on the same file."""
    from multimodal.options import ModelOptions

    path = smol_path()
    engine = ModelOptions(model="smollm2", device="cpu", compile=True, max_seq_len=256).engine()
    assert engine.model.dtype == torch.float32 and engine.model.llama.output.codes is not None
    ours, expected = answers_beside_transformers(engine, path, "What is the capital of France?")
    assert ours == expected and "Paris" in ours


def answers_beside_transformers(engine: Engine, path: Path, question: str, tokens: int = 16) -> tuple[str, str]:
    """The engine's greedy answer to one chat question, and transformers' float32 answer on the same file."""
    from transformers import AutoModelForCausalLM

    ids = engine.tokenizer.encode_chat([{"role": "user", "content": question}])
    ours = engine.complete(ids, None, SamplingParams(max_new_tokens=tokens, temperature=0.0))
    ref = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    with torch.no_grad():
        out = ref.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                           max_new_tokens=tokens, do_sample=False, eos_token_id=2, pad_token_id=2)
    return ours, engine.tokenizer.decode([t for t in out[0, len(ids):].tolist() if t != 2])
