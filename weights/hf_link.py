"""`python -m weights link llama-7b PATH` for a Hugging Face copy of LLaMA-1 7B.

Meta no longer hands out its consolidated layout; most people who have LLaMA-7B have a Hugging Face
folder (config.json, *.safetensors or pytorch_model-*.bin shards, tokenizer.model). Such a folder has
no published checksums to compare with, so it is recognised by what its config states and how large its
weights are, and told apart from the models it is most often confused with: Llama-2-7B (same shapes,
4096 positions and rms eps 1e-5) and other LLaMA-family models (other shapes)."""
from __future__ import annotations

import json
import os
from pathlib import Path

from .link import LinkError

HF_LINK = "llama-7b-hf"  # the link's name in the weights folder
_LLAMA1_7B = {"hidden_size": 4096, "num_hidden_layers": 32, "num_attention_heads": 32, "intermediate_size": 11008,
              "vocab_size": 32000}
_WEIGHT_FILES = ("*.safetensors", "pytorch_model*.bin")
_FP16_BYTES = (12.5e9, 14.5e9)  # 6.74 B parameters in 16 bits, with a margin; fp32 copies are twice that


def is_hf_folder(path: Path) -> bool:
    return path.is_dir() and (path / "config.json").is_file()


def check_hf_llama1_7b(folder: Path) -> None:
    """Raise LinkError saying what the folder holds when it is not LLaMA-1 7B."""
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError) as e:
        raise LinkError(f"{folder / 'config.json'} cannot be read: {e}") from None
    kind = config.get("model_type")
    if kind != "llama":
        raise LinkError(f"{folder} holds a {kind!r} model, not LLaMA: the released adapters need LLaMA-1 7B")
    shape = {k: config.get(k) for k in _LLAMA1_7B}
    if shape != _LLAMA1_7B:
        described = ", ".join(f"{k} {v}" for k, v in shape.items())
        raise LinkError(f"{folder} holds a LLaMA-family model of another size ({described}), not LLaMA-1 7B; the "
                        "released adapters need LLaMA-1 7B. Run it as a base of its own with --llama-dir")
    positions, eps = config.get("max_position_embeddings"), config.get("rms_norm_eps")
    if positions == 4096 or eps == 1e-5:
        raise LinkError(f"{folder} is Llama-2-7B (max_position_embeddings {positions}, rms_norm_eps {eps}), not "
                        "LLaMA-1 (2048 and 1e-6): with Llama-2 the released adapters give blank or meaningless "
                        "answers. Nothing was linked")
    files = [f for pattern in _WEIGHT_FILES for f in folder.glob(pattern)]
    if not files:
        raise LinkError(f"{folder} has a config.json but no weights (*.safetensors or pytorch_model*.bin)")
    total = sum(f.stat().st_size for f in files)
    low, high = _FP16_BYTES
    if not (low <= total <= high or 2 * low <= total <= 2 * high):
        raise LinkError(f"{folder}: its weight files add up to {total / 1e9:.1f} GB; LLaMA-1 7B is about 13.5 GB "
                        "in 16 bits (27 GB in 32): a file is missing or truncated")
    if not ((folder / "tokenizer.model").is_file() or (folder / "tokenizer.json").is_file()):
        raise LinkError(f"{folder} has no tokenizer.model or tokenizer.json")


def link_hf_llama1_7b(folder: str | os.PathLike, root: Path, force: bool = False) -> Path:
    """Check the folder, then make weights/llama-7b-hf a link to it (no copy). Returns the link."""
    source = Path(folder).expanduser().absolute()
    check_hf_llama1_7b(source)
    dest = root / HF_LINK
    if dest.exists() and not dest.is_symlink() and not force:
        raise LinkError(f"{dest} is a real folder; move it away or pass --force to replace it with a link")
    root.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(dest.name + ".link.tmp")
    tmp.unlink(missing_ok=True)
    os.symlink(source, tmp, target_is_directory=True)
    os.replace(tmp, dest)
    return dest


def linked_hf_llama1_7b(root: Path) -> Path | None:
    """The linked Hugging Face LLaMA-1 7B folder, if there is one and it still looks right."""
    dest = root / HF_LINK
    if not is_hf_folder(dest):
        return None
    try:
        check_hf_llama1_7b(dest)
    except LinkError:
        return None
    return dest
