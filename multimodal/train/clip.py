"""Training the demo's tiny CLIP: an open_clip ``CLIP`` (QuickGELU, so its state dict has OpenAI's key
names) trained contrastively on the toy world's image-caption pairs, with a tiny text tower that reads
the demo's own SentencePiece ids.

The toy world repeats captions (many images are "A small red circle on the left."), so plain CLIP
targets would call identical captions negatives. Targets are instead spread evenly over every pair in
the batch whose captions are identical: a supervised-contrastive form of the same loss.
"""
from __future__ import annotations

import math
from pathlib import Path

import open_clip
import torch
import torch.nn.functional as F
from tqdm import tqdm

from ..config import ClipVisionConfig
from ..tokenizer import Tokenizer


def build_clip(cfg: ClipVisionConfig, vocab_size: int, eos_id: int, context_length: int = 24,
               text_width: int = 64, seed: int = 0) -> open_clip.model.CLIP:
    torch.manual_seed(seed)
    vision = open_clip.model.CLIPVisionCfg(layers=cfg.layers, width=cfg.width, head_width=cfg.width // cfg.heads,
                                           patch_size=cfg.patch_size, image_size=cfg.image_size, mlp_ratio=cfg.mlp_ratio)
    text = open_clip.model.CLIPTextCfg(context_length=context_length, vocab_size=vocab_size, width=text_width,
                                       heads=max(1, text_width // 64), layers=2, pool_type="eos", eos_id=eos_id)
    return open_clip.model.CLIP(embed_dim=cfg.output_dim, vision_cfg=vision, text_cfg=text, quick_gelu=True)


def text_ids(tokenizer: Tokenizer, captions: list[str], context_length: int) -> torch.Tensor:
    """[N, context_length]: caption ids + EOS (the pooled position), zero-padded; truncated captions
    keep their EOS."""
    out = torch.zeros(len(captions), context_length, dtype=torch.long)
    for i, c in enumerate(captions):
        ids = tokenizer.encode(c, bos=False)[: context_length - 1] + [tokenizer.eos_id]
        out[i, : len(ids)] = torch.tensor(ids)
    return out


def train_clip(model: open_clip.model.CLIP, pixels: torch.Tensor, texts: torch.Tensor, caption_ids: torch.Tensor,
               steps: int, batch_size: int = 128, lr: float = 2e-3, warmup: int = 20, seed: int = 0,
               progress: bool = True) -> list[float]:
    """pixels [N, 3, H, W] (preprocessed), texts [N, L] token ids, caption_ids [N] (equal for identical
    captions). Returns the loss per step; the model is left frozen in eval mode."""
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.98), weight_decay=0.05)
    losses: list[float] = []
    model.train()
    bar = tqdm(range(steps), desc="clip", disable=not progress, dynamic_ncols=True)
    for step in bar:
        scale = (step + 1) / warmup if step < warmup else 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))
        for group in opt.param_groups:
            group["lr"] = lr * max(scale, 0.02)
        idx = torch.randint(len(pixels), (batch_size,), generator=g)
        image_emb, text_emb, logit_scale = model(pixels[idx], texts[idx])  # [B, E], [B, E] (normalised), scalar
        logits = logit_scale * image_emb @ text_emb.T  # [B, B]
        same = (caption_ids[idx][:, None] == caption_ids[idx][None, :]).float()  # [B, B]
        target = same / same.sum(1, keepdim=True)
        loss = 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        losses.append(loss.item())
        bar.set_postfix(loss=f"{loss.item():.3f}")
    model.eval().requires_grad_(False)
    return losses


def save_openai_clip(model: open_clip.model.CLIP, path: str | Path, dtype: torch.dtype = torch.float16) -> None:
    """The whole CLIP state dict (OpenAI key names; ``visual.*`` is what the multimodal loader reads),
    in fp16 like OpenAI's files."""
    torch.save({k: v.detach().to(dtype).contiguous() for k, v in model.state_dict().items()}, Path(path))
