"""GGUF files (llama.cpp's single-file format) of LLaMA-family models: config from the metadata,
lazily dequantized weights, and the byte-level BPE tokenizer the metadata describes.

The file is memory-mapped by ``gguf.GGUFReader``; a tensor is dequantized (``gguf.quants``) to
float32 only when the loader asks for it, so a quantized file is never held twice in full.

Row order of q/k: the file already holds Meta's interleaved-pair RoPE order, so no conversion is
made here. llama.cpp's converter takes Hugging Face's ``q_proj``/``k_proj`` (rotate-half order: a
head's row ``half * D/2 + i`` pairs with frequency i) and regroups each head's rows from
``[2, D/2]`` to ``[D/2, 2]``, i.e. row ``half * D/2 + i`` moves to ``2i + half``; that is exactly
Meta's layout (rows 2i and 2i+1 rotate together), which llama.cpp's "normal" RoPE mode for the
llama architecture expects. transformers applies the inverse when it loads a GGUF; the tests pin
this against it.
"""
from __future__ import annotations

import os
import re
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import tokenizers
import torch
from gguf import GGMLQuantizationType as QT
from gguf import GGUFReader, ReaderTensor
from gguf.quants import dequantize

from ..coded import GroupCodes, read_codes
from ..config import LlamaConfig, RopeScaling
from ..llama import scale_frequencies
from . import BaseFiles, BaseFormatError, one_line
from .hf_tokenizer import END_OF_TURN, HFTokenizer

# Types ``gguf.quants.dequantize`` turns into float32 (the list the project promises, and neighbours).
SUPPORTED_TYPES = frozenset({QT.F32, QT.F16, QT.BF16, QT.Q4_0, QT.Q4_1, QT.Q5_0, QT.Q5_1, QT.Q8_0,
                             QT.Q2_K, QT.Q3_K, QT.Q4_K, QT.Q5_K, QT.Q6_K})

_LAYER = re.compile(r"^blk\.(\d+)\.(\w+)\.weight$")
_LAYER_NAMES = {
    "attn_q": "attention.wq.weight",
    "attn_k": "attention.wk.weight",
    "attn_v": "attention.wv.weight",
    "attn_output": "attention.wo.weight",
    "ffn_gate": "feed_forward.w1.weight",
    "ffn_up": "feed_forward.w3.weight",
    "ffn_down": "feed_forward.w2.weight",
    "attn_norm": "attention_norm.weight",
    "ffn_norm": "ffn_norm.weight",
}
_TOP_NAMES = {"token_embd.weight": "tok_embeddings.weight", "output_norm.weight": "norm.weight",
              "output.weight": "output.weight"}
_ROPE_FREQS = "rope_freqs.weight"  # Llama 3.1's per-frequency divisors; turned into config.rope_scaling


# --- metadata --------------------------------------------------------------------------------------------


class Metadata:
    """The file's key/value metadata, each value decoded when asked for (the token list is long)."""

    def __init__(self, reader: GGUFReader, path: Path) -> None:
        self.reader, self.path = reader, path

    def get(self, key: str, default: Any = None) -> Any:
        field = self.reader.fields.get(key)
        if field is None:
            return default
        return field.contents()

    def need(self, key: str) -> Any:
        value = self.get(key)
        if value is None:
            raise BaseFormatError(f"{self.path}: metadata lacks {key!r}")
        return value


def _open(path: Path) -> GGUFReader:
    if not path.is_file():
        raise BaseFormatError(f"{path}: GGUF file not found")
    with path.open("rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise BaseFormatError(f"{path}: not a GGUF file (starts with {magic!r}, expected b'GGUF')")
    try:
        return GGUFReader(path, "r")  # memory-mapped, read-only
    except Exception as e:  # gguf raises ValueError/IndexError/... for truncated or corrupt headers
        raise BaseFormatError(f"{path}: cannot read the GGUF header ({one_line(e)})") from None


def llama_config(meta: Metadata, tensors: Mapping[str, ReaderTensor], **overrides: Any) -> LlamaConfig:
    """Our config from ``llama.*`` metadata. ``llama.context_length`` is not used: the loader picks
    ``max_seq_len`` (it sizes the KV cache), passed in ``overrides``."""
    path = meta.path
    if meta.get("llama.expert_count", 0):
        raise BaseFormatError(f"{path}: a mixture-of-experts model (llama.expert_count "
                              f"{meta.get('llama.expert_count')}); this LLaMA is dense")
    dim, n_heads = int(meta.need("llama.embedding_length")), int(meta.need("llama.attention.head_count"))
    kv = meta.get("llama.attention.head_count_kv", n_heads)
    if isinstance(kv, list):  # some converters write one count per layer
        if len(set(kv)) != 1:
            raise BaseFormatError(f"{path}: head_count_kv differs between layers ({sorted(set(kv))})")
        kv = kv[0]
    head_dim = dim // n_heads
    for key in ("llama.rope.dimension_count", "llama.attention.key_length", "llama.attention.value_length"):
        value = meta.get(key)
        if value is not None and int(value) != head_dim:
            raise BaseFormatError(f"{path}: {key} is {value}, but embedding_length / head_count is {head_dim}; "
                                  "this LLaMA rotates and attends over whole heads of that size")
    embd = tensors.get("token_embd.weight")
    if embd is None:
        raise BaseFormatError(f"{path}: no token_embd.weight tensor")
    tokens = meta.reader.fields.get("tokenizer.ggml.tokens")
    vocab = len(tokens.data) if tokens is not None else meta.get("llama.vocab_size")
    rows = int(embd.shape[1])  # GGUF dims are innermost-first: [dim, vocab]
    vocab = rows if vocab is None else int(vocab)
    if vocab != rows:
        raise BaseFormatError(f"{path}: the vocabulary has {vocab} tokens but token_embd.weight has {rows} rows")
    theta = float(meta.get("llama.rope.freq_base", 10000.0))
    args: dict[str, Any] = {
        "dim": dim,
        "n_layers": int(meta.need("llama.block_count")),
        "n_heads": n_heads,
        "n_kv_heads": int(kv),
        "vocab_size": vocab,
        "norm_eps": float(meta.get("llama.attention.layer_norm_rms_epsilon", 1e-5)),
        "rope_theta": theta,
        "hidden_dim": int(meta.need("llama.feed_forward_length")),
        "rope_scaling": _rope_scaling(meta, tensors, head_dim, theta),
        "tie_embeddings": "output.weight" not in tensors,  # llama.cpp omits output when it is the embedding
    }
    args.update(overrides)
    try:
        return LlamaConfig(**args)
    except (TypeError, ValueError) as e:
        raise BaseFormatError(f"{path}: {e}") from None


def _rope_scaling(meta: Metadata, tensors: Mapping[str, ReaderTensor], head_dim: int,
                  theta: float) -> RopeScaling | None:
    """Llama 3.1-style scaling, which llama.cpp stores as the ``rope_freqs.weight`` tensor (one divisor
    per frequency, no parameters in the metadata). Its four parameters cannot all be recovered from
    the divisors, so Llama 3.x's low/high factors (1, 4) are assumed, the factor taken as the largest
    divisor, and the result checked against the tensor. Linear, YaRN and LongRoPE are refused."""
    path = meta.path
    kind = meta.get("llama.rope.scaling.type")
    factor = float(meta.get("llama.rope.scaling.factor", 1.0) or 1.0)
    if kind not in (None, "none") and factor != 1.0:
        raise BaseFormatError(f"{path}: RoPE scaling type {kind!r} (factor {factor}) is not supported; this LLaMA "
                              "runs plain RoPE or Llama 3.1's rope_freqs scaling")
    t = tensors.get(_ROPE_FREQS)
    if t is None:
        return None
    divisors = torch.from_numpy(np.array(dequantize(t.data, t.tensor_type), dtype=np.float32).reshape(-1))
    if divisors.numel() != head_dim // 2:
        raise BaseFormatError(f"{path}: {_ROPE_FREQS} has {divisors.numel()} entries, expected {head_dim // 2}")
    if bool((divisors == 1).all()):
        return None
    original = int(meta.get("llama.rope.scaling.original_context_length", 8192) or 8192)
    s = RopeScaling(factor=float(divisors.max()), low_freq_factor=1.0, high_freq_factor=4.0,
                    original_max_position_embeddings=original)
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    expected = inv_freq / scale_frequencies(inv_freq, s)
    if not torch.allclose(divisors.double(), expected, rtol=1e-4, atol=0):
        raise BaseFormatError(f"{path}: {_ROPE_FREQS} does not follow Llama 3.1's scaling (factor {s.factor:g}, "
                              f"low/high frequency factors 1/4, original context {original}); not supported")
    return s


# --- weights ---------------------------------------------------------------------------------------------


def dequantize_tensor(t: ReaderTensor) -> torch.Tensor:
    """One tensor of the file as float32, in PyTorch's dim order.

    GGUF lists a tensor's dims innermost-first (ggml's ``ne[0]`` is the length of a row), so a
    ``[out, in]`` weight is stored with shape ``[in, out]``; reversing gives ours. The reader's
    ``data`` of a quantized tensor is ``[rows, bytes per row]`` (uint8); ``dequantize`` expands each
    row's blocks to ``[rows, in]``."""
    shape = tuple(int(n) for n in reversed(t.shape.tolist()))
    values = dequantize(t.data, t.tensor_type)
    if not values.flags.writeable:  # F32 comes back as a view of the read-only map: copy this one tensor
        values = values.copy()
    return torch.from_numpy(values.astype(np.float32, copy=False).reshape(shape))  # [out, in] (or [n])


class GGUFWeights(Mapping[str, torch.Tensor]):
    """The file's tensors in our names. Iterating yields names without reading a tensor; ``[name]``
    dequantizes that one tensor. Names, shapes and types are all checked up front, so a bad file
    fails before anything is copied. A tied output layer is served from the embedding."""

    def __init__(self, tensors: Mapping[str, ReaderTensor], cfg: LlamaConfig, path: Path) -> None:
        self.cfg, self.path = cfg, path
        self._where: dict[str, ReaderTensor] = {}
        for name, t in tensors.items():
            ours = self._our_name(name)
            if ours is not None:
                self._where[ours] = t
        expected = self._expected_shapes()
        missing = [k for k in expected if k not in self._where and not (k == "output.weight" and cfg.tie_embeddings)]
        if missing:
            shown = ", ".join(missing[:6]) + (f" and {len(missing) - 6} more" if len(missing) > 6 else "")
            raise BaseFormatError(f"{path}: tensors lack {shown}")
        for ours, t in self._where.items():
            shape = tuple(int(n) for n in reversed(t.shape.tolist()))  # innermost-first -> ours
            if shape != expected[ours]:
                raise BaseFormatError(f"{path}: {t.name} has shape {shape}, the config implies {expected[ours]}")
            if t.tensor_type not in SUPPORTED_TYPES:
                readable = ", ".join(sorted(q.name for q in SUPPORTED_TYPES))
                raise BaseFormatError(f"{path}: {t.name} is of type {t.tensor_type.name}, which this reader "
                                      f"cannot dequantize (it reads {readable})")
        self._names = list(expected)

    def _our_name(self, name: str) -> str | None:
        if name == _ROPE_FREQS:  # read into the config
            return None
        if name in _TOP_NAMES:
            return _TOP_NAMES[name]
        if (m := _LAYER.match(name)) and m[2] in _LAYER_NAMES and int(m[1]) < self.cfg.n_layers:
            return f"layers.{int(m[1])}.{_LAYER_NAMES[m[2]]}"
        raise BaseFormatError(f"{self.path}: tensor {name!r} is not part of a LLaMA model of this config")

    def _expected_shapes(self) -> dict[str, tuple[int, ...]]:
        c = self.cfg
        q, kv, h = c.n_heads * c.head_dim, c.kv_heads * c.head_dim, c.ffn_hidden_dim
        layer = {"attention.wq.weight": (q, c.dim), "attention.wk.weight": (kv, c.dim),
                 "attention.wv.weight": (kv, c.dim), "attention.wo.weight": (c.dim, q),
                 "feed_forward.w1.weight": (h, c.dim), "feed_forward.w3.weight": (h, c.dim),
                 "feed_forward.w2.weight": (c.dim, h), "attention_norm.weight": (c.dim,),
                 "ffn_norm.weight": (c.dim,)}
        shapes = {"tok_embeddings.weight": (c.vocab_size, c.dim)}
        for i in range(c.n_layers):
            shapes |= {f"layers.{i}.{k}": v for k, v in layer.items()}
        return shapes | {"norm.weight": (c.dim,), "output.weight": (c.vocab_size, c.dim)}

    def __getitem__(self, key: str) -> torch.Tensor:
        if key == "output.weight" and self.cfg.tie_embeddings:
            key = "tok_embeddings.weight"
        return dequantize_tensor(self._where[key])  # q/k rows: already Meta's order (module docstring)

    def codes(self, key: str) -> GroupCodes | None:
        """The tensor's codes as stored (coded.py), or None for a type kept only dense."""
        if key == "output.weight" and self.cfg.tie_embeddings:
            key = "tok_embeddings.weight"
        t = self._where[key]
        shape = tuple(int(n) for n in reversed(t.shape.tolist()))
        return read_codes(t.data, t.tensor_type, shape) if len(shape) == 2 else None

    def __iter__(self) -> Iterator[str]:
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)


# --- tokenizer -------------------------------------------------------------------------------------------

# How llama.cpp splits text before BPE, by ``tokenizer.ggml.pre`` (the merges were learned on text split
# that way). GPT-2's own pattern is ByteLevel's built-in one.
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = _LLAMA3_SPLIT.replace(r"\p{N}{1,3}", r"\p{N}")  # digits one by one
_GPT2_PRE = frozenset({"default", "gpt-2", "gpt2"})
_DIGITS_THEN_GPT2_PRE = frozenset({"smollm", "starcoder", "refact", "command-r", "codeshell"})
_LLAMA3_PRE = frozenset({"llama-bpe", "llama3", "llama-v3", "smaug-bpe", "dbrx"})
_QWEN2_PRE = frozenset({"qwen2", "deepseek-r1-qwen"})
# Llama 3's own pre-tokenizer types: a word that is itself in the vocabulary stays whole even where
# the merges would split it (llama.cpp's ``ignore_merges``, HF's tokenizer.json likewise), and a plain
# prompt starts with bos when the file does not say.
_WHOLE_WORDS_PRE = frozenset({"llama-bpe", "llama3", "llama-v3"})

_CONTROL, _USER_DEFINED = 3, 4  # tokenizer.ggml.token_type values (llama.cpp's llama_token_type)


def _pre_tokenizer(pre: str, path: Path) -> tokenizers.pre_tokenizers.PreTokenizer:
    pt = tokenizers.pre_tokenizers
    if pre in _GPT2_PRE:
        return pt.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre in _DIGITS_THEN_GPT2_PRE:  # every digit its own piece, then GPT-2's pattern
        return pt.Sequence([pt.Digits(individual_digits=True), pt.ByteLevel(add_prefix_space=False, use_regex=True)])
    for names, split in ((_LLAMA3_PRE, _LLAMA3_SPLIT), (_QWEN2_PRE, _QWEN2_SPLIT)):
        if pre in names:
            return pt.Sequence([pt.Split(tokenizers.Regex(split), behavior="isolated"),
                                pt.ByteLevel(add_prefix_space=False, use_regex=False)])
    known = sorted(_GPT2_PRE | _DIGITS_THEN_GPT2_PRE | _LLAMA3_PRE | _QWEN2_PRE)
    raise BaseFormatError(f"{path}: pre-tokenizer {pre!r} is not supported (known: {', '.join(known)})")


def gguf_tokenizer(meta: Metadata) -> HFTokenizer:
    """The byte-level BPE tokenizer (``tokenizer.ggml.model == "gpt2"``) the metadata describes, with
    its bos/eos convention, chat template and end-of-turn tokens, as a ``tokenizers.Tokenizer``.

    The vocabulary is stored already spelled in GPT-2's byte alphabet ("Ġthe"), merges as "a b".
    Control tokens become special added tokens and user-defined ones plain added tokens, so either
    written in a text is one token, as llama.cpp parses them."""
    path = meta.path
    model = meta.get("tokenizer.ggml.model")
    if model is None:
        raise BaseFormatError(f"{path}: no tokenizer in the metadata (tokenizer.ggml.model is missing)")
    if model == "llama":
        raise BaseFormatError(f"{path}: SentencePiece vocabulary (tokenizer.ggml.model 'llama') is not supported "
                              "yet; only byte-level BPE ('gpt2') files can be read")
    if model != "gpt2":
        raise BaseFormatError(f"{path}: tokenizer.ggml.model {model!r} is not supported (only 'gpt2')")
    tokens: list[str] = meta.need("tokenizer.ggml.tokens")
    types: list[int] = meta.get("tokenizer.ggml.token_type") or [1] * len(tokens)
    merges = []
    for m in meta.need("tokenizer.ggml.merges"):
        pair = tuple(m.split(" "))
        if len(pair) != 2:
            raise BaseFormatError(f"{path}: merge {m!r} is not two tokens separated by one space")
        merges.append(pair)
    pre = meta.get("tokenizer.ggml.pre", "default")
    vocab = {text: i for i, text in enumerate(tokens)}
    if len(vocab) != len(tokens):
        raise BaseFormatError(f"{path}: the token list repeats {len(tokens) - len(vocab)} token(s)")
    tok = tokenizers.Tokenizer(tokenizers.models.BPE(vocab, merges, ignore_merges=pre in _WHOLE_WORDS_PRE))
    tok.pre_tokenizer = _pre_tokenizer(pre, path)
    tok.decoder = tokenizers.decoders.ByteLevel()
    added = tokenizers.AddedToken
    tok.add_special_tokens([added(t, special=True, normalized=False) for t, k in zip(tokens, types) if k == _CONTROL])
    tok.add_tokens([added(t, special=False, normalized=False) for t, k in zip(tokens, types) if k == _USER_DEFINED])

    def token_id(key: str) -> int | None:
        i = meta.get(f"tokenizer.ggml.{key}")
        if i is not None and not 0 <= int(i) < len(tokens):
            raise BaseFormatError(f"{path}: tokenizer.ggml.{key} {i} is outside the vocabulary of {len(tokens)}")
        return None if i is None else int(i)

    bos_id, eos_id = token_id("bos_token_id"), token_id("eos_token_id")
    if eos_id is None:
        raise BaseFormatError(f"{path}: metadata lacks tokenizer.ggml.eos_token_id")
    turn_ends = {token_id("eot_token_id"), token_id("eom_token_id")} - {None}
    turn_ends |= {i for i, (t, k) in enumerate(zip(tokens, types)) if k == _CONTROL and t in END_OF_TURN}
    add_bos = meta.get("tokenizer.ggml.add_bos_token", pre in _WHOLE_WORDS_PRE)
    return HFTokenizer(tok, bos_id=bos_id, eos_id=eos_id, stop_ids=turn_ends, add_bos=bool(add_bos),
                       chat_template=meta.get("tokenizer.chat_template"),
                       bos_token=tokens[bos_id] if bos_id is not None else None, eos_token=tokens[eos_id])


# --- entry point -----------------------------------------------------------------------------------------


def read_gguf(path: str | os.PathLike, **overrides: Any) -> BaseFiles:
    """A LLaMA-architecture GGUF file as config, lazy weights and tokenizer. ``overrides`` go into
    the config (e.g. ``max_seq_len``)."""
    path = Path(path)
    reader = _open(path)
    meta = Metadata(reader, path)
    arch = meta.get("general.architecture")
    if arch != "llama":
        raise BaseFormatError(f"{path}: general.architecture is {arch!r}; this project runs 'llama' GGUF files only")
    tensors = {t.name: t for t in reader.tensors}
    cfg = llama_config(meta, tensors, **overrides)
    weights = GGUFWeights(tensors, cfg, path)
    tokenizer = gguf_tokenizer(meta)
    if tokenizer.n_words != cfg.vocab_size:
        raise BaseFormatError(f"{path}: the tokenizer has {tokenizer.n_words} tokens, the model {cfg.vocab_size}")
    return BaseFiles(cfg, weights, tokenizer, source=f"GGUF file {path}", format="gguf")



