"""Eager bfloat16 decoding from a GGUF file's 4-bit codes (multimodal/int4.py): the int4 product equals
the file's dequantized weights (pinned to transformers' dequantizer in test_coded.py) times the input,
it serves decoding rows only, the model gets it where the file's weights are 4-bit, and the real
SmolLM2 answers as transformers does on the same file."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

gguf = pytest.importorskip("gguf")
from gguf import GGMLQuantizationType as QT  # noqa: E402

from multimodal.coded import read_codes  # noqa: E402
from multimodal.formats import read_base  # noqa: E402
from multimodal.int4 import MAX_ROWS, Int4Product, attach_int4, int4_available, kernel_form  # noqa: E402
from multimodal.loading import load_model  # noqa: E402
from test_coded import answers_beside_transformers, quantized, tiny_llama  # noqa: E402
from test_format_gguf import smol_path, write_gguf  # noqa: E402

pytestmark = pytest.mark.skipif(not int4_available("cpu", torch.bfloat16),
                                reason="this PyTorch has no int4 CPU kernel (aten._weight_int4pack_mm_for_cpu)")


def codes_of(qt: QT, rows: int, cols: int, seed: int):
    dense = np.random.default_rng(seed).standard_normal((rows, cols)).astype(np.float32)
    return read_codes(quantized(dense, qt), qt, (rows, cols))


def products(model: torch.nn.Module) -> list[Int4Product]:
    return [m for m in model.modules() if isinstance(m, Int4Product)]


@pytest.mark.parametrize("qt", [QT.Q4_0, QT.Q4_1], ids=lambda q: q.name)
def test_int4_product_is_the_files_weights_times_the_input(qt: QT) -> None:
    """Three layers of different widths stacked (as q, k and v are): each output is the dequantized
    weight times the input, up to bfloat16 rounding of the input, the group scales and the result."""
    parts = [codes_of(qt, rows, 128, seed) for rows, seed in ((96, 0), (32, 1), (64, 2))]
    product = Int4Product(parts)
    x = torch.randn(1, 1, 128, generator=torch.Generator().manual_seed(3)).bfloat16()  # a decoding step's row
    outs = product(x)
    assert [tuple(o.shape) for o in outs] == [(1, 1, 96), (1, 1, 32), (1, 1, 64)] and outs[0].dtype == torch.bfloat16
    for got, c in zip(outs, parts):
        expected = F.linear(x.float(), c.dequantize())  # float32 products of the file's exact weights
        scale = float(expected.abs().max())
        torch.testing.assert_close(got.float(), expected, rtol=0.0, atol=0.02 * scale)
        assert (got.float() - expected).abs().mean() < 0.004 * scale  # not merely inside the bound: close


def test_kernel_form_keeps_every_code() -> None:
    """The kernel's (q - 8) * scale + zero is the file's weight for every code, computed in float32."""
    for qt in (QT.Q4_0, QT.Q4_1):
        c = codes_of(qt, 8, 64, seed=4)
        q, scale, zero = kernel_form(c)
        assert q.min() >= 0 and q.max() <= 15
        weight = ((q.float() - 8).view(8, 2, 32) * scale[..., None] + zero[..., None]).view(8, 64)
        torch.testing.assert_close(weight, c.dequantize(), rtol=1e-6, atol=1e-6)


def test_eight_bit_codes_have_no_int4_form() -> None:
    q8 = codes_of(QT.Q8_0, 8, 64, seed=5)
    assert not Int4Product.fits([q8]) and not Int4Product.fits([codes_of(QT.Q4_1, 8, 64, 6), q8])
    assert not Int4Product.fits([codes_of(QT.Q4_1, 8, 64, 6), codes_of(QT.Q4_1, 8, 96, 7)])  # input widths differ
    with pytest.raises(ValueError, match="no int4 form"):
        kernel_form(q8)


def test_the_product_serves_decoding_rows_only() -> None:
    product = Int4Product([codes_of(QT.Q4_1, 32, 64, seed=8)])
    assert product.serves(torch.zeros(1, 1, 64, dtype=torch.bfloat16))
    assert product.serves(torch.zeros(MAX_ROWS, 1, 64, dtype=torch.bfloat16))  # a small batched step
    assert not product.serves(torch.zeros(1, MAX_ROWS + 1, 64, dtype=torch.bfloat16))  # prefill: dense weights
    assert not product.serves(torch.zeros(1, 1, 64))  # float32: not the kernel's dtype


def test_tiny_gguf_decodes_from_its_codes(tmp_path: Path) -> None:
    """A tiny Q4_1 GGUF in bfloat16: every linear layer gets codes (q/k/v and gate/up stacked), prefill
    is exactly the dense model's, and a decoding step is as close to the float32 model as the dense
    bfloat16 step is."""
    path = write_gguf(tmp_path / "tiny-q4_1.gguf", tiny_llama(), qtype=QT.Q4_1, tie=True)
    kw = {"device": "cpu", "max_seq_len": 256}
    fp32 = load_model(path, dtype="float32", **kw).model.llama
    dense = load_model(path, dtype="bfloat16", pack=False, **kw).model.llama
    coded = load_model(path, dtype="bfloat16", pack=False, int4=True, **kw).model.llama
    assert not products(dense)
    assert len(products(coded)) == 2 * 4 + 1  # per block: q/k/v, wo, gate/up, w2; and the tied head
    assert all(b.attention.int4_qkv.sizes == [64, 32, 32] and b.feed_forward.int4_w13.sizes == [128, 128]
               for b in coded.layers)
    assert coded.layers[0].attention.wq.int4 is None and coded.layers[0].attention.wo.int4 is not None

    ids = torch.tensor([[5 + (i * 7) % 200 for i in range(40)]])
    errors = {}
    with torch.inference_mode():
        for m in (fp32, dense, coded):
            m.setup_cache(max_seq_len=256)
        prefill = {name: m(ids, 0, None) for name, m in (("dense", dense), ("coded", coded))}
        assert torch.equal(prefill["coded"], prefill["dense"])  # many rows: the dense weights
        token = ids[:, -1:] + 1
        for name, m in (("fp32", fp32), ("dense", dense), ("coded", coded)):
            if name == "fp32":
                m(ids, 0, None)
            errors[name] = m(token, ids.shape[1], None, last_only=True)
    err_dense = (errors["dense"] - errors["fp32"]).abs().max()
    err_coded = (errors["coded"] - errors["fp32"]).abs().max()
    assert not torch.equal(errors["coded"], errors["dense"])  # the step did go through the codes
    assert err_coded <= 2 * err_dense + 1e-3, (float(err_coded), float(err_dense))


def test_layers_with_lora_stay_dense(tmp_path: Path) -> None:
    path = write_gguf(tmp_path / "tiny-q4_0.gguf", tiny_llama(), qtype=QT.Q4_0, tie=True)
    llama = load_model(path, dtype="bfloat16", device="cpu", max_seq_len=64, pack=False).model.llama
    wk = llama.layers[0].attention.wk
    wk.lora_a = torch.nn.Parameter(torch.zeros(2, wk.in_features, dtype=torch.bfloat16))  # as a LoRA adapter gives it
    n = attach_int4(llama, read_base(path).weights.codes)
    block0, block1 = llama.layers
    assert block0.attention.int4_qkv is None and wk.int4 is None  # no stack without wk, which keeps its dense weight
    assert block0.attention.wq.int4 is not None and block0.attention.wv.int4 is not None
    assert block1.attention.int4_qkv is not None
    assert n == 2 * 7 + 1 - 1


def test_smollm2_decodes_from_its_codes_and_answers_as_transformers_does() -> None:
    """The app's default for the real file (bfloat16 on a CPU with int4): 120 stacked or single products
    (the Q8_0 head stays dense), and the greedy answer equals transformers' float32 one on the same file."""
    from multimodal.options import ModelOptions

    path = smol_path()
    engine = ModelOptions(model="smollm2", device="cpu", dtype="bfloat16", max_seq_len=256).engine()
    llama = engine.model.llama
    assert len(products(llama)) == 30 * 4 and llama.output.int4 is None
    ours, expected = answers_beside_transformers(engine, path, "What is the capital of France?")
    assert ours == expected and "Paris" in ours
    plain = ModelOptions(model="smollm2", device="cpu", dtype="bfloat16", max_seq_len=256, int4=False).engine()
    assert not products(plain.model.llama)  # --no-int4


def test_int4_is_on_unless_turned_off(monkeypatch: pytest.MonkeyPatch) -> None:
    import argparse

    from multimodal.options import add_model_args, options_from_args

    def options(*argv: str):
        parser = argparse.ArgumentParser()
        add_model_args(parser)
        return options_from_args(parser.parse_args(list(argv)))

    monkeypatch.delenv("MM_INT4", raising=False)
    assert options().int4 and options("--int4").int4 and not options("--no-int4").int4
    monkeypatch.setenv("MM_INT4", "0")
    assert not options().int4 and options("--int4").int4
