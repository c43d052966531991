"""Reading and writing the weight file formats: Meta's consolidated LLaMA directory, OpenAI's CLIP file
and the official LLaMA-Adapter V2 adapter checkpoints (PEFT's AdaptionPrompt folders: formats/peft.py),
and the shapes those files state. Tensors come back memory-mapped where the format allows, so a 7B file
is never held twice; pickled files are only read with ``weights_only=True``."""
from __future__ import annotations

import json
import math
import os
import re
import zipfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from .config import ClipVisionConfig, LlamaConfig, ResamplerConfig

StateDict = Mapping[str, torch.Tensor]


class CheckpointError(ValueError):
    """A weight file that does not match what the model expects; the message names the keys."""


def _load(path: Path) -> Any:
    return torch.load(path, map_location="cpu", mmap=True, weights_only=True)


def preview_names(keys: list[str], limit: int = 12) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f" and {len(keys) - limit} more" if len(keys) > limit else "")


# --- Meta's LLaMA ---------------------------------------------------------------------------------------

# How Meta's model-parallel training split each weight across consolidated.NN.pth shards:
# column-parallel layers along the output dimension, row-parallel along the input, the embedding along
# the model dimension; norms are replicated.
_SHARD_DIM = {"tok_embeddings": 1, "wq": 0, "wk": 0, "wv": 0, "w1": 0, "w3": 0, "output": 0, "wo": 1, "w2": 1}
_IGNORED_META_KEYS = {"rope.freqs"}  # a precomputed table; recomputed from rope_theta


def _shard_dim(key: str) -> int | None:
    for part in key.split(".")[::-1]:
        if part in _SHARD_DIM:
            return _SHARD_DIM[part]
    return None


class MergedShards(Mapping[str, torch.Tensor]):
    """Model-parallel shards seen as one state dict. Each tensor is joined only when asked for, so a
    loader copying key by key holds at most one joined tensor at a time, never a second model."""

    def __init__(self, shards: list[StateDict]) -> None:
        self.shards = shards
        self._keys = [k for k in shards[0] if k not in _IGNORED_META_KEYS]
        for i, shard in enumerate(shards[1:], start=1):
            if set(shard) != set(shards[0]):
                raise CheckpointError(f"shard {i} has different keys from shard 0")

    def __getitem__(self, key: str) -> torch.Tensor:
        parts = [s[key] for s in self.shards]
        dim = _shard_dim(key)
        if len(parts) == 1 or dim is None or parts[0].ndim == 1:
            return parts[0]
        return torch.cat(parts, dim=dim)

    def __iter__(self) -> Iterator[str]:
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)


def read_meta_llama(ckpt_dir: str | os.PathLike) -> tuple[dict[str, Any], MergedShards]:
    """``params.json`` and the merged ``consolidated.*.pth`` weights of a Meta LLaMA directory."""
    ckpt_dir = Path(ckpt_dir)
    params_path = ckpt_dir / "params.json"
    if not params_path.is_file():
        raise FileNotFoundError(f"params.json not found in {ckpt_dir} (expected Meta's consolidated layout)")
    shards = sorted(ckpt_dir.glob("consolidated.*.pth"))
    if not shards:
        raise FileNotFoundError(f"no consolidated.*.pth in {ckpt_dir} (expected Meta's consolidated layout)")
    params = json.loads(params_path.read_text())
    return params, MergedShards([_load(p) for p in shards])


# --- OpenAI's CLIP ------------------------------------------------------------------------------------


def _is_torchscript(path: Path) -> bool:
    try:
        with zipfile.ZipFile(path) as z:
            return any(name.endswith("/constants.pkl") or name.endswith("/code/__torch__.py") for name in z.namelist())
    except zipfile.BadZipFile:
        return False


def read_openai_clip_visual(path: str | os.PathLike) -> StateDict:
    """The ``visual.*`` weights of an OpenAI-format CLIP file, without the prefix.

    OpenAI distributes ``ViT-L-14.pt`` as a TorchScript archive; it is opened with ``torch.jit.load``
    (TorchScript deserialisation runs no pickled Python; the file is checked against the manifest's
    sha256 by ``python -m weights verify``). A plain state dict is read with ``weights_only=True``.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"CLIP weights not found: {path}")
    if _is_torchscript(path):
        state = torch.jit.load(str(path), map_location="cpu").state_dict()
    else:
        state = _load(path)
        if isinstance(state, dict) and "state_dict" in state:
            state = state["state_dict"]
    visual = {k.removeprefix("visual."): v for k, v in state.items() if k.startswith("visual.")}
    if "proj" not in visual or "conv1.weight" not in visual:
        raise CheckpointError(f"{path} is not an OpenAI-format CLIP file (no visual.proj / visual.conv1.weight)")
    return visual


def _block_count(state: StateDict, prefix: str) -> int:
    """Number of numbered blocks ``{prefix}{i}.`` among the keys (0 if none)."""
    ids = {int(k[len(prefix):].split(".", 1)[0]) for k in state if k.startswith(prefix)}
    return max(ids) + 1 if ids else 0


def clip_config_from_state(visual: StateDict, base: ClipVisionConfig, source: str) -> ClipVisionConfig:
    """The ViT's shapes as an OpenAI-format ``visual.*`` state dict states them; ``base`` keeps what the
    file cannot say (the normalisation statistics). Heads follow OpenAI's rule (``build_model`` in
    clip/model.py): one per 64 channels of width."""
    conv = visual["conv1.weight"]  # [width, 3, patch, patch]
    width, patch = conv.shape[0], conv.shape[-1]
    grid = math.isqrt(visual["positional_embedding"].shape[0] - 1)  # positions: CLS + grid * grid patches
    layers = _block_count(visual, "transformer.resblocks.")
    if grid * grid + 1 != visual["positional_embedding"].shape[0] or not layers or width % 64:
        raise CheckpointError(f"{source}: not an OpenAI ViT of a square grid with 64-wide heads (width {width}, "
                              f"{visual['positional_embedding'].shape[0]} positions, {layers} blocks)")
    mlp = visual["transformer.resblocks.0.mlp.c_fc.weight"].shape[0]  # [mlp, width]
    return replace(base, image_size=grid * patch, patch_size=patch, width=width, layers=layers, heads=width // 64,
                   mlp_ratio=mlp / width, output_dim=visual["proj"].shape[1])  # proj: [width, output_dim]


# --- LLaMA-Adapter V2 adapter checkpoints -----------------------------------------------------------

_RESAMPLER_PREFIXES = ("clip_proj.", "clip_proj_norm.", "visual_query.", "visual_blocks.", "visual_proj.", "visual_proj_norm.")
_LORA = re.compile(r"^(llama\.layers\.\d+\.(?:attention|feed_forward))\.lora_(w[qkvo123])_l([12])\.weight$")
_GATE = re.compile(r"^(llama\.layers\.\d+\.attention)\.(gate|new_gate)$")
_OUR_LORA = re.compile(r"^(llama\.layers\.\d+\.(?:attention|feed_forward))\.(w[qkvo123])\.lora_([ab])$")
_OUR_GATE = re.compile(r"^(llama\.layers\.\d+\.attention)\.prompt_gate\.(gate|new_gate)$")


def official_to_ours(key: str) -> str:
    """Map a key of the released checkpoints (module ``LLaMA_adapter``) to this model's name."""
    if key.startswith("llma."):  # older internal checkpoints
        key = "llama." + key[len("llma."):]
    if key.startswith(_RESAMPLER_PREFIXES):
        return "resampler." + key
    if m := _LORA.match(key):
        return f"{m[1]}.{m[2]}.lora_{'a' if m[3] == '1' else 'b'}"
    if m := _GATE.match(key):
        return f"{m[1]}.prompt_gate.{m[2]}"
    return key


def ours_to_official(key: str) -> str:
    if key.startswith("resampler."):
        return key[len("resampler."):]
    if m := _OUR_LORA.match(key):
        return f"{m[1]}.lora_{m[2]}_l{'1' if m[3] == 'a' else '2'}.weight"
    if m := _OUR_GATE.match(key):
        return f"{m[1]}.{m[2]}"
    return key


# The official code builds its resampler blocks with 16 heads (``v_num_heads=16`` for width 768) and the
# files do not record it; a width other than the preset's gets the official 16.
OFFICIAL_RESAMPLER_HEADS = 16


@dataclass
class AdapterCheckpoint:
    state: StateDict  # our key names
    config: dict[str, Any] = field(default_factory=dict)  # the file's 'config' entry, if any
    # AdapterConfig fields the format states outright (PEFT: its layers, prompt length, plain gate); an
    # official file leaves them to be derived from its tensors and the preset (loading.adapter_layout).
    layout: dict[str, Any] = field(default_factory=dict)

    @property
    def lora_rank(self) -> int:
        """From the tensors (the config's ``lora_rank`` is only a default in the official loader)."""
        ranks = {v.shape[0] for k, v in self.state.items() if k.endswith(".lora_a")}
        if len(ranks) > 1:
            raise CheckpointError(f"LoRA tensors of different ranks {sorted(ranks)}")
        return ranks.pop() if ranks else 0

    @property
    def has_new_gate(self) -> bool:
        # the official loader creates new_gate exactly when config says w_lora
        return bool(self.config.get("w_lora")) or any(k.endswith(".new_gate") for k in self.state)

    @property
    def has_scale(self) -> bool:
        return any(k.endswith(".scale") for k in self.state)

    @property
    def has_bias(self) -> bool:
        return any(k.startswith("llama.") and k.endswith(".bias") for k in self.state)

    @property
    def has_resampler(self) -> bool:
        """Whether the file has a visual part; without one the model it makes is text-only."""
        return any(k.startswith("resampler.") for k in self.state)

    @property
    def prompt_rows(self) -> int:
        """Rows of ``adapter_query``: adaption-prompt layers times prompt length (0: none)."""
        q = self.state.get("adapter_query.weight")
        return q.shape[0] if q is not None else 0

    @property
    def gated_layers(self) -> tuple[int, ...]:
        """Layers the file has a gate for (official files gate every layer, the unused layer 0 too)."""
        return tuple(sorted(int(m[1].split(".")[2]) for k in self.state if (m := _OUR_GATE.match(k)) and m[2] == "gate"))

    def resampler_config(self, base: ResamplerConfig, source: str) -> ResamplerConfig | None:
        """The resampler's shapes from its tensors (None: the file has none); ``base`` is the preset's.
        Heads are not stored: the preset's when its width is the file's, else OFFICIAL_RESAMPLER_HEADS."""
        if not self.has_resampler:
            return None
        need = ("resampler.visual_query.weight", "resampler.clip_proj.weight")
        missing = [ours_to_official(k) for k in need if k not in self.state]
        if missing:
            raise CheckpointError(f"{source} has part of a visual resampler but lacks {', '.join(missing)}")
        n_queries, dim = self.state["resampler.visual_query.weight"].shape  # [Q, dim]
        depth = _block_count(self.state, "resampler.visual_blocks.")
        fc1 = self.state.get("resampler.visual_blocks.0.mlp.fc1.weight")  # [hidden, dim]
        heads = base.heads if dim == base.dim else OFFICIAL_RESAMPLER_HEADS
        if dim % heads:
            raise CheckpointError(f"{source}: resampler width {dim} does not split into the official "
                                  f"{OFFICIAL_RESAMPLER_HEADS} heads (and no preset has that width)")
        return replace(base, dim=dim, depth=depth, heads=heads, n_queries=n_queries,
                       mlp_ratio=fc1.shape[0] / dim if fc1 is not None else base.mlp_ratio)


def read_adapter(path: str | os.PathLike, llama: LlamaConfig | None = None) -> AdapterCheckpoint:
    """An adapter: an official file (``{'model': state_dict, 'config': {...}}``, config optional, or a
    bare state dict) or a PEFT AdaptionPrompt folder (``llama``, the base's config, checks it against
    the base)."""
    path = Path(path)
    if path.is_dir():
        if (path / "adapter_config.json").is_file():
            from .formats.peft import read_peft_adaption_prompt

            return read_peft_adaption_prompt(path, llama)
        raise CheckpointError(f"{path} is a folder without adapter_config.json (expected an official adapter file "
                              "or a PEFT adapter folder)")
    if not path.is_file():
        raise FileNotFoundError(f"adapter checkpoint not found: {path}")
    raw = _load(path)
    if not isinstance(raw, dict):
        raise CheckpointError(f"{path}: expected a dict, found {type(raw).__name__}")
    if "model" in raw and isinstance(raw["model"], dict):
        state, config = raw["model"], raw.get("config") or {}
    else:
        state, config = raw, {}
    bad = [k for k, v in state.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise CheckpointError(f"{path}: entries that are not tensors: {preview_names(bad)}")
    ckpt = AdapterCheckpoint({official_to_ours(k): v for k, v in state.items()}, dict(config))
    if config.get("w_lora") and not ckpt.lora_rank:
        raise CheckpointError(f"{path}: config says w_lora but the file has no lora_* tensors")
    return ckpt


def save_adapter(state: StateDict, path: str | os.PathLike, config: dict[str, Any] | None = None) -> None:
    """Write trainable weights in the official format (official key names, ``{'model', 'config'}``),
    atomically, so a crash never leaves half a checkpoint."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    out = {"model": {ours_to_official(k): v.detach().cpu() for k, v in state.items()}, "config": dict(config or {})}
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(out, tmp)
    os.replace(tmp, path)
