"""Loading a 16-bit checkpoint into a 16-bit model allocates the model once and never goes through
fp32: every tensor op during the load is recorded and checked."""
from __future__ import annotations

from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from multimodal.checkpoint import MergedShards
from multimodal.config import LlamaConfig
from multimodal.loading import load_llama_only
from tiny import random_meta_state, split_meta_state, write_meta_dir


class AllocationRecorder(TorchDispatchMode):
    """Every distinct storage an op creates: (op, dtype, bytes). ``set_`` is how torch.load(mmap=True)
    points tensors at the file's pages, so it allocates nothing and is not counted."""

    def __init__(self) -> None:
        super().__init__()
        self.created: dict[int, tuple[str, torch.dtype, int]] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        out = func(*args, **(kwargs or {}))
        if func is torch.ops.aten.set_.source_Storage_storage_offset:
            return out
        inputs = {a.untyped_storage().data_ptr() for a in args if isinstance(a, torch.Tensor) and a.device.type != "meta"}
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor) and t.device.type != "meta":
                ptr = t.untyped_storage().data_ptr()
                if ptr not in inputs:  # not an in-place op or a view
                    self.created.setdefault(ptr, (str(func), t.dtype, t.untyped_storage().nbytes()))
        return out


def test_fp16_checkpoint_loads_into_bf16_once_and_without_fp32(tmp_path: Path) -> None:
    cfg = LlamaConfig(dim=256, n_layers=2, n_heads=4, vocab_size=1000, multiple_of=64, max_seq_len=64)
    write_meta_dir(tmp_path, cfg, dtype=torch.float16)
    recorder = AllocationRecorder()
    with recorder:
        model = load_llama_only(tmp_path, dtype=torch.bfloat16)
    model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    rope_bytes = model.rope.numel() * 4
    created = recorder.created.values()
    big_fp32 = [(op, n) for op, dtype, n in created if dtype == torch.float32 and n >= 4 * cfg.dim * cfg.dim]
    assert not big_fp32, f"fp32 tensors as large as a weight matrix were made while loading: {big_fp32}"
    total = sum(n for _, _, n in created)
    assert model_bytes <= total <= model_bytes + 4 * rope_bytes, (total, model_bytes)  # one copy, no more
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())


def test_shards_are_joined_one_tensor_at_a_time() -> None:
    cfg = LlamaConfig(dim=64, n_layers=1, n_heads=4, vocab_size=50, multiple_of=16)
    shards = split_meta_state(random_meta_state(cfg), 2)
    recorder = AllocationRecorder()
    with recorder:
        merged = MergedShards(shards)
        keys = list(merged)  # listing keys joins nothing
        assert not recorder.created
        joined = merged["layers.0.attention.wo.weight"]  # row-parallel: joined along the input dim
    assert len(recorder.created) == 1 and joined.shape == (64, 64)
    assert "layers.0.attention_norm.weight" in keys and merged["layers.0.attention_norm.weight"].shape == (64,)
    assert merged["tok_embeddings.weight"].shape == (50, 64) and merged["layers.0.feed_forward.w1.weight"].shape[0] == cfg.ffn_hidden_dim
