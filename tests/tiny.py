"""Tiny models written in the real file formats, for tests: Meta's consolidated LLaMA directory,
OpenAI's CLIP state dict, and adapter checkpoints with the released files' key names and shapes.

The adapter keys here are written from the key table in the reference notes
(../shared/reference/official-llama-adapter-v2.md, section 3.3), not from the project's own key
mapping, so tests that load them check the mapping against the format, not against itself.
"""
from __future__ import annotations

import json
from pathlib import Path

import open_clip
import sentencepiece as spm
import torch

from multimodal.config import ClipVisionConfig, LlamaConfig, ModelConfig

META_COLUMN = ("wq", "wk", "wv", "w1", "w3", "output")
META_ROW = ("wo", "w2")


def random_meta_state(cfg: LlamaConfig, seed: int = 0, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """Meta key names; norms near 1 and weights small enough that activations stay sane."""
    g = torch.Generator().manual_seed(seed)

    def w(*shape: int, std: float = 0.02) -> torch.Tensor:
        return (torch.randn(*shape, generator=g) * std).to(dtype)

    hd, kv, hidden = cfg.head_dim, cfg.kv_heads, cfg.ffn_hidden_dim
    sd = {"tok_embeddings.weight": w(cfg.vocab_size, cfg.dim, std=1.0), "norm.weight": 1 + w(cfg.dim, std=0.1),
          "output.weight": w(cfg.vocab_size, cfg.dim, std=0.2)}
    for i in range(cfg.n_layers):
        p = f"layers.{i}."
        sd |= {
            p + "attention.wq.weight": w(cfg.n_heads * hd, cfg.dim, std=0.2),
            p + "attention.wk.weight": w(kv * hd, cfg.dim, std=0.2),
            p + "attention.wv.weight": w(kv * hd, cfg.dim, std=0.2),
            p + "attention.wo.weight": w(cfg.dim, cfg.n_heads * hd, std=0.2),
            p + "feed_forward.w1.weight": w(hidden, cfg.dim, std=0.2),
            p + "feed_forward.w2.weight": w(cfg.dim, hidden, std=0.2),
            p + "feed_forward.w3.weight": w(hidden, cfg.dim, std=0.2),
            p + "attention_norm.weight": 1 + w(cfg.dim, std=0.1),
            p + "ffn_norm.weight": 1 + w(cfg.dim, std=0.1),
        }
    return sd


def split_meta_state(sd: dict[str, torch.Tensor], n: int) -> list[dict[str, torch.Tensor]]:
    """Split like Meta's model-parallel training: column-parallel by rows, row-parallel and the
    embedding by columns, norms replicated."""
    shards: list[dict[str, torch.Tensor]] = [{} for _ in range(n)]
    for k, v in sd.items():
        name = k.split(".")[-2]
        if name in META_COLUMN:
            parts = v.chunk(n, dim=0)
        elif name in META_ROW or name == "tok_embeddings":
            parts = v.chunk(n, dim=1)
        else:
            parts = [v] * n
        for shard, part in zip(shards, parts):
            shard[k] = part.clone()
    return shards


def write_meta_dir(path: Path, cfg: LlamaConfig, seed: int = 0, shards: int = 1,
                   dtype: torch.dtype = torch.float32, vocab_in_params: bool = True) -> dict[str, torch.Tensor]:
    path.mkdir(parents=True, exist_ok=True)
    params = {"dim": cfg.dim, "n_layers": cfg.n_layers, "n_heads": cfg.n_heads, "multiple_of": cfg.multiple_of,
              "norm_eps": cfg.norm_eps, "vocab_size": cfg.vocab_size if vocab_in_params else -1}
    if cfg.n_kv_heads is not None:
        params["n_kv_heads"] = cfg.n_kv_heads
    (path / "params.json").write_text(json.dumps(params))
    sd = random_meta_state(cfg, seed, dtype)
    for i, shard in enumerate(split_meta_state(sd, shards)):
        torch.save(shard, path / f"consolidated.{i:02d}.pth")
    return sd


def tiny_clip(cfg: ClipVisionConfig, seed: int = 0) -> open_clip.model.CLIP:
    """A whole (vision + text) CLIP in open_clip, whose state dict is in OpenAI's key format."""
    torch.manual_seed(seed)
    vision = open_clip.model.CLIPVisionCfg(layers=cfg.layers, width=cfg.width, head_width=cfg.width // cfg.heads,
                                           patch_size=cfg.patch_size, image_size=cfg.image_size, mlp_ratio=cfg.mlp_ratio)
    text = open_clip.model.CLIPTextCfg(context_length=8, vocab_size=64, width=64, heads=1, layers=1)
    model = open_clip.model.CLIP(embed_dim=cfg.output_dim, vision_cfg=vision, text_cfg=text, quick_gelu=True)
    with torch.no_grad():  # open_clip zero-inits nothing we care about, but make every tensor non-trivial
        for name, p in model.named_parameters():
            if "ln" in name or "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    return model.eval()


def write_openai_clip(path: Path, cfg: ClipVisionConfig, seed: int = 0) -> dict[str, torch.Tensor]:
    sd = tiny_clip(cfg, seed).state_dict()
    torch.save(sd, path)
    return sd


def official_adapter_state(cfg: ModelConfig, lora_rank: int = 0, seed: int = 0,
                           gate_all_layers: bool = True) -> dict[str, torch.Tensor]:
    """Random tensors under the released files' key names and shapes (BIAS, or LORA-BIAS if lora_rank)."""
    g = torch.Generator().manual_seed(seed)
    L, R, a = cfg.llama, cfg.resampler, cfg.adapter

    def r(*shape: int, std: float = 0.1) -> torch.Tensor:
        return torch.randn(*shape, generator=g) * std

    d, vd, hidden = L.dim, R.dim, L.ffn_hidden_dim
    sd: dict[str, torch.Tensor] = {}
    for i in range(R.depth):
        p = f"visual_blocks.{i}."
        sd |= {p + "norm1.weight": 1 + r(vd), p + "norm1.bias": r(vd), p + "attn.qkv.weight": r(3 * vd, vd),
               p + "attn.qkv.bias": r(3 * vd), p + "attn.proj.weight": r(vd, vd), p + "attn.proj.bias": r(vd),
               p + "norm2.weight": 1 + r(vd), p + "norm2.bias": r(vd), p + "mlp.fc1.weight": r(int(vd * R.mlp_ratio), vd),
               p + "mlp.fc1.bias": r(int(vd * R.mlp_ratio)), p + "mlp.fc2.weight": r(vd, int(vd * R.mlp_ratio)),
               p + "mlp.fc2.bias": r(vd)}
    gated = range(L.n_layers) if gate_all_layers else a.prompted_layers
    for i in range(L.n_layers):
        p = f"llama.layers.{i}."
        if i in gated:
            sd[p + "attention.gate"] = r(1, L.n_heads, 1, 1, std=0.5) if i in a.prompted_layers else torch.zeros(1, L.n_heads, 1, 1)
        sd |= {p + "attention.wq.bias": r(L.n_heads * L.head_dim, std=0.01), p + "attention.wo.bias": r(d, std=0.01),
               p + "feed_forward.w1.bias": r(hidden, std=0.01), p + "feed_forward.w2.bias": r(d, std=0.01),
               p + "feed_forward.w3.bias": r(hidden, std=0.01), p + "attention_norm.weight": 1 + r(d, std=0.01),
               p + "ffn_norm.weight": 1 + r(d, std=0.01)}
        if lora_rank:
            kv = L.kv_heads * L.head_dim
            outs = {"wq": L.n_heads * L.head_dim, "wk": kv, "wv": kv, "wo": d}
            for name, out in outs.items():
                ins = L.n_heads * L.head_dim if name == "wo" else d
                sd[p + f"attention.lora_{name}_l1.weight"] = r(lora_rank, ins)
                sd[p + f"attention.lora_{name}_l2.weight"] = r(out, lora_rank, std=0.01)
            for name, (ins, out) in {"w1": (d, hidden), "w2": (hidden, d), "w3": (d, hidden)}.items():
                sd[p + f"feed_forward.lora_{name}_l1.weight"] = r(lora_rank, ins)
                sd[p + f"feed_forward.lora_{name}_l2.weight"] = r(out, lora_rank, std=0.01)
            sd[p + "attention.new_gate"] = 1 + r(1, 1, 1, 1)
    sd |= {"clip_proj_norm.weight": 1 + r(vd), "clip_proj_norm.bias": r(vd), "visual_proj_norm.weight": 1 + r(d),
           "visual_proj_norm.bias": r(d), "visual_proj.weight": r(d, vd), "visual_proj.bias": r(d),
           "clip_proj.weight": r(vd, cfg.clip.output_dim), "clip_proj.bias": r(vd), "llama.norm.weight": 1 + r(d, std=0.01),
           "visual_query.weight": r(R.n_queries, vd, std=1.0),
           "adapter_query.weight": r(len(a.adapter_layers) * a.prompt_len, d, std=1.0)}
    return sd


def write_official_adapter(path: Path, cfg: ModelConfig, lora_rank: int = 0, with_config: bool = True,
                           seed: int = 0, extra: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    sd = official_adapter_state(cfg, lora_rank, seed) | (extra or {})
    if with_config:
        torch.save({"model": sd, "config": {"w_bias": True, "w_lora": bool(lora_rank), "lora_rank": lora_rank or 16}}, path)
    else:
        torch.save({"model": sd}, path)
    return sd


def train_tokenizer(path: Path, vocab_size: int = 300) -> Path:
    """A small SentencePiece model with Meta's conventions (bos 1, eos 2, unk 0, no pad)."""
    words = ("the a an bus person people red blue green big small left right centre image photo of "
             "with and is are on in there what colour shape count how many two three four one").split()
    g = torch.Generator().manual_seed(0)
    lines = [" ".join(words[int(i)] for i in torch.randint(len(words), (12,), generator=g)) for _ in range(400)]
    lines += ["Hello world, a bus with people.", "Once upon a time there was a little girl.", "café naïve 東京 🙂"]
    prefix = path.with_suffix("")
    spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_prefix=str(prefix), vocab_size=vocab_size,
                                   model_type="bpe", byte_fallback=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
                                   character_coverage=1.0, minloglevel=2)
    return prefix.with_suffix(".model")
