"""Hugging Face folders of LLaMA-family models: ``config.json``, safetensors or PyTorch ``.bin``
weights (single or sharded), and the tokenizer files.

Weights are served lazily in our names and RoPE layout: a tensor is read from its shard into memory
of its own (the file is not left mapped), converted and handed out only when the loader asks for it.
"""
from __future__ import annotations

import json
import os
import re
import sys
import zipfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from ..config import LlamaConfig, RopeScaling
from . import BaseFiles, BaseFormatError, one_line, read_json_object
from .hf_tokenizer import load_folder_tokenizer

_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
_LAYER_NAMES = {
    "self_attn.q_proj.weight": "attention.wq.weight",
    "self_attn.k_proj.weight": "attention.wk.weight",
    "self_attn.v_proj.weight": "attention.wv.weight",
    "self_attn.o_proj.weight": "attention.wo.weight",
    "mlp.gate_proj.weight": "feed_forward.w1.weight",
    "mlp.up_proj.weight": "feed_forward.w3.weight",
    "mlp.down_proj.weight": "feed_forward.w2.weight",
    "input_layernorm.weight": "attention_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
}
_TOP_NAMES = {"model.embed_tokens.weight": "tok_embeddings.weight", "model.norm.weight": "norm.weight",
              "lm_head.weight": "output.weight"}


# --- config.json ---------------------------------------------------------------------------------------


def llama_config(hf: dict[str, Any], path: Path, **overrides: Any) -> LlamaConfig:
    """Our config from a ``config.json`` dict. ``max_position_embeddings`` is not used: the loader
    picks ``max_seq_len`` (it sizes the KV cache), passed in ``overrides``."""
    model_type = hf.get("model_type")
    if model_type != "llama":
        raise BaseFormatError(f"{path}: model_type {model_type!r} is not a LLaMA-family model this project runs")
    if hf.get("hidden_act", "silu") != "silu":
        raise BaseFormatError(f"{path}: hidden_act {hf['hidden_act']!r}; this LLaMA runs SwiGLU (silu) only")
    for flag in ("attention_bias", "mlp_bias"):
        if hf.get(flag):
            raise BaseFormatError(f"{path}: {flag} is true; this LLaMA has no biases in the base weights")
    try:
        dim, n_heads = int(hf["hidden_size"]), int(hf["num_attention_heads"])
        args: dict[str, Any] = {
            "dim": dim,
            "n_layers": int(hf["num_hidden_layers"]),
            "n_heads": n_heads,
            "n_kv_heads": int(hf.get("num_key_value_heads") or n_heads),
            "vocab_size": int(hf["vocab_size"]),
            "norm_eps": float(hf.get("rms_norm_eps", 1e-6)),
            "hidden_dim": int(hf["intermediate_size"]),
            "tie_embeddings": bool(hf.get("tie_word_embeddings", False)),
        }
    except KeyError as e:
        raise BaseFormatError(f"{path}: missing {e.args[0]!r}") from None
    head_dim = hf.get("head_dim")
    if head_dim is not None and head_dim != dim // n_heads:
        raise BaseFormatError(f"{path}: head_dim {head_dim} differs from hidden_size / num_attention_heads "
                              f"= {dim // n_heads}; this LLaMA derives the head size from them")
    # transformers 5 nests theta and scaling under rope_parameters; 4.x has rope_theta and rope_scaling
    rope = hf.get("rope_parameters") or {}
    scaling = hf.get("rope_scaling") or rope
    args["rope_theta"] = float(hf.get("rope_theta") or rope.get("rope_theta") or 10000.0)
    args["rope_scaling"] = _rope_scaling(scaling, path)
    args.update(overrides)
    try:
        return LlamaConfig(**args)
    except ValueError as e:
        raise BaseFormatError(f"{path}: {e}") from None


def _rope_scaling(spec: dict[str, Any], path: Path) -> RopeScaling | None:
    kind = spec.get("rope_type") or spec.get("type")
    if kind in (None, "default"):
        return None
    if kind != "llama3":
        raise BaseFormatError(f"{path}: RoPE scaling type {kind!r} is not supported (only 'llama3')")
    try:
        return RopeScaling(factor=float(spec["factor"]), low_freq_factor=float(spec["low_freq_factor"]),
                           high_freq_factor=float(spec["high_freq_factor"]),
                           original_max_position_embeddings=int(spec["original_max_position_embeddings"]))
    except KeyError as e:
        raise BaseFormatError(f"{path}: llama3 RoPE scaling lacks {e.args[0]!r}") from None


# --- weights ---------------------------------------------------------------------------------------------


def rotate_half_to_interleaved(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """q_proj/k_proj rows from Hugging Face's RoPE order to Meta's.

    Hugging Face rotates each head's dimensions j and j + D/2 together (``rotate_half``); Meta's
    reference (and ``multimodal.llama.apply_rope``) rotates 2i and 2i+1. Both rotate the pair with
    frequency index i, so Meta's row 2i is HF's row i and Meta's row 2i+1 is HF's row i + D/2: per
    head, split the rows into the two halves and interleave them. (This undoes the permutation of
    transformers' LLaMA conversion script.)
    """
    rows, cols = w.shape
    head_dim = rows // n_heads
    halves = w.reshape(n_heads, 2, head_dim // 2, cols)  # [heads, half, D/2, dim]: row half*D/2 + i
    return halves.transpose(1, 2).reshape(rows, cols)  # [heads, D/2, 2, dim] -> row 2i + half


class _Shard:
    """One weight file whose tensors are read one at a time into fresh memory, never served from a
    mapping of the file: every page a tensor is read from through a mapping stays in the process's
    RSS until the mapping goes, so a loader reading whole memory-mapped shards peaked at twice the
    weights' size (docs/performance.md, "Real bases"). Only the header (safetensors) or the pickle's
    tensor metadata (``.bin``) is held; a tensor handed out owns its memory, and the model copies it
    and drops it."""

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            if path.suffix == ".safetensors":
                self._reader: _SafetensorsReader | _TorchZipReader = _SafetensorsReader(path)
            else:
                self._reader = _TorchZipReader(path)
        except BaseFormatError:
            raise
        except FileNotFoundError:
            raise BaseFormatError(f"{path}: weight file is missing") from None
        except Exception as e:  # safetensors' and torch's errors for truncated or corrupt files
            raise BaseFormatError(f"{path}: cannot read the weights ({one_line(e)})") from None

    def keys(self) -> list[str]:
        return self._reader.keys()

    def get(self, key: str) -> torch.Tensor:
        try:
            return self._reader.get(key)
        except BaseFormatError:
            raise
        except Exception as e:  # a file changed or damaged since it was opened
            raise BaseFormatError(f"{self.path}: cannot read {key} ({one_line(e)})") from None


class _SafetensorsReader:
    """safetensors' ``pread`` backend (its ``backend`` argument; 0.8 here): each tensor is read with
    pread(2) into a tensor of its own and the file is never mapped. (Its default ``mmap`` backend
    hands out views of the mapped file.) A safetensors without that argument only maps: there each
    tensor is read through a handle opened for it alone and copied out, so only that tensor's pages
    are ever mapped, at the cost of one header parse per tensor."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)
        try:
            self._file: Any = safe_open(self.path, framework="pt", device="cpu", backend="pread")
        except TypeError:  # a safetensors without the backend argument
            self._file = None
            with safe_open(self.path, framework="pt", device="cpu") as f:
                self._keys = list(f.keys())
        else:
            self._keys = list(self._file.keys())

    def keys(self) -> list[str]:
        return self._keys

    def get(self, key: str) -> torch.Tensor:
        if self._file is not None:
            return self._file.get_tensor(key)
        with safe_open(self.path, framework="pt", device="cpu") as f:
            return f.get_tensor(key).clone()  # [shape] copied out; the mapping goes with f and the view


class _TorchZipReader:
    """A ``torch.save`` zip file. ``torch.load(map_location="meta")`` unpickles the tensors' shapes,
    strides and dtypes without their data, and records where each storage's bytes start in the file
    (``_checkpoint_offset``: torch stores records uncompressed); each tensor is then read from there
    into fresh memory. A torch that records no offsets, or a file saved on a machine of the other
    byte order, gets the file memory-mapped once as before, each tensor copied out of the mapping
    (its pages then stay mapped until the load ends)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        state = torch.load(path, map_location="meta", weights_only=True)
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise BaseFormatError(f"{path}: expected a state dict of tensors, found {type(state).__name__}")
        self._meta: dict[str, torch.Tensor] = state
        self._mapped: dict[str, torch.Tensor] | None = None
        offsets = all(getattr(t.untyped_storage(), "_checkpoint_offset", None) is not None for t in state.values())
        if not offsets or _byteorder(path) != sys.byteorder:  # torch.load swaps bytes; a plain read would not
            self._mapped = torch.load(path, map_location="cpu", mmap=True, weights_only=True)

    def keys(self) -> list[str]:
        return list(self._meta)

    def get(self, key: str) -> torch.Tensor:
        if self._mapped is not None:
            return self._mapped[key].clone()
        meta = self._meta[key]
        storage = meta.untyped_storage()
        start = storage._checkpoint_offset
        if meta.is_contiguous():  # read just the tensor's own bytes, straight into its memory
            out = torch.empty(meta.shape, dtype=meta.dtype)
            _read_exact(self.path, start + meta.storage_offset() * meta.element_size(), out)
            return out
        # a strided view (e.g. a saved transpose): read its whole storage, then copy the view out
        whole = torch.empty(storage.nbytes() // meta.element_size(), dtype=meta.dtype)
        _read_exact(self.path, start, whole)
        return whole.as_strided(meta.shape, meta.stride(), meta.storage_offset()).contiguous()


def _byteorder(path: Path) -> str:
    """The byte order a ``torch.save`` zip was written in (its ``byteorder`` record; files older than
    the record are little-endian)."""
    with zipfile.ZipFile(path) as z:
        record = next((n for n in z.namelist() if n.endswith("/byteorder")), None)
        return z.read(record).decode().strip() if record is not None else "little"


def _read_exact(path: Path, offset: int, out: torch.Tensor) -> None:
    """Fill the contiguous ``out`` with the file's bytes from ``offset``; a short file is an error."""
    if out.numel() == 0:
        return
    view = memoryview(out.reshape(-1).view(torch.uint8).numpy())  # [bytes] of out's memory
    with open(path, "rb", buffering=0) as f:
        f.seek(offset)
        done = 0
        while done < len(view):  # one read returns at most ~2 GiB on Linux
            n = f.readinto(view[done:])
            if not n:
                raise BaseFormatError(f"{path}: ends inside the data of a tensor at byte {offset}")
            done += n


class HFWeights(Mapping[str, torch.Tensor]):
    """A Hugging Face folder's tensors in our names. Iterating yields names without reading a tensor;
    ``[name]`` reads that one tensor (q/k rows converted to Meta's RoPE order)."""

    def __init__(self, folder: Path, cfg: LlamaConfig) -> None:
        self.folder, self.cfg = folder, cfg
        self._where: dict[str, tuple[_Shard, str]] = {}  # our name -> (shard, HF name)
        for shard in self._open_shards(folder):
            for hf_name in shard.keys():
                ours = self._our_name(hf_name, shard.path)
                if ours is not None:
                    self._where[ours] = (shard, hf_name)
        if cfg.tie_embeddings:  # served from the embedding; transformers ties a stored lm_head away too
            self._where.pop("output.weight", None)
        served = set(self._where) | ({"output.weight"} if cfg.tie_embeddings else set())
        missing = [k for k in self._expected() if k not in served]
        if missing:
            missing = [_hf_name(k) for k in missing]
            shown = ", ".join(missing[:6]) + (f" and {len(missing) - 6} more" if len(missing) > 6 else "")
            raise BaseFormatError(f"{folder}: weights lack {shown}")
        self._names = self._expected()

    @staticmethod
    def _open_shards(folder: Path) -> list[_Shard]:
        for single, index in (("model.safetensors", "model.safetensors.index.json"),
                              ("pytorch_model.bin", "pytorch_model.bin.index.json")):
            if (folder / index).is_file():
                try:
                    weight_map = json.loads((folder / index).read_text())["weight_map"]
                except (json.JSONDecodeError, KeyError, TypeError) as e:
                    raise BaseFormatError(f"{folder / index}: not a shard index ({one_line(e)})") from None
                files = sorted(set(weight_map.values()))
                shards = [_Shard(folder / name) for name in files]  # every shard opened (checked) up front
                held = {k for s in shards for k in s.keys()}
                absent = [k for k in weight_map if k not in held]
                if absent:
                    raise BaseFormatError(f"{folder / index}: {absent[0]} is listed but in no shard")
                return shards
            if (folder / single).is_file():
                return [_Shard(folder / single)]
        raise BaseFormatError(f"{folder}: no model.safetensors, pytorch_model.bin or their .index.json")

    def _our_name(self, hf_name: str, path: Path) -> str | None:
        if hf_name in _TOP_NAMES:
            return _TOP_NAMES[hf_name]
        if m := _LAYER.match(hf_name):
            layer, rest = int(m[1]), m[2]
            if rest == "self_attn.rotary_emb.inv_freq":  # a buffer older versions saved; recomputed
                return None
            if rest in _LAYER_NAMES and layer < self.cfg.n_layers:
                return f"layers.{layer}.{_LAYER_NAMES[rest]}"
        raise BaseFormatError(f"{path}: tensor {hf_name!r} is not part of a LLaMA model of this config")

    def _expected(self) -> list[str]:
        names = ["tok_embeddings.weight"]
        for i in range(self.cfg.n_layers):
            names += [f"layers.{i}.{ours}" for ours in _LAYER_NAMES.values()]
        return names + ["norm.weight", "output.weight"]

    def __getitem__(self, key: str) -> torch.Tensor:
        if key == "output.weight" and self.cfg.tie_embeddings:
            key = "tok_embeddings.weight"
        shard, hf_name = self._where[key]
        w = shard.get(hf_name)
        if key.endswith("attention.wq.weight"):
            return rotate_half_to_interleaved(w, self.cfg.n_heads)
        if key.endswith("attention.wk.weight"):
            return rotate_half_to_interleaved(w, self.cfg.kv_heads)
        return w

    def __iter__(self) -> Iterator[str]:
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)


def _hf_name(ours: str) -> str:
    """Hugging Face's name of one of our tensors, for messages about the files."""
    for hf, name in _TOP_NAMES.items():
        if name == ours:
            return hf
    layer, rest = ours.removeprefix("layers.").split(".", 1)
    return f"model.layers.{layer}." + next(hf for hf, name in _LAYER_NAMES.items() if name == rest)


def read_hf_folder(path: str | os.PathLike, **overrides: Any) -> BaseFiles:
    """A Hugging Face LLaMA-family folder as config, lazy weights and tokenizer. ``overrides`` go into
    the config (e.g. ``max_seq_len``)."""
    folder = Path(path)
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise BaseFormatError(f"{folder}: no config.json (not a Hugging Face model folder)")
    hf = read_json_object(config_path)
    cfg = llama_config(hf, config_path, **overrides)
    weights = HFWeights(folder, cfg)
    tokenizer = load_folder_tokenizer(folder)
    return BaseFiles(cfg, weights, tokenizer, source=f"Hugging Face folder {folder}", format="hf")

