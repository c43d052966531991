"""The visual path: an open_clip ViT (every token after ln_post and proj), then the V2 resampler
(clip_proj + LayerNorm, learnable queries through ViT blocks, visual_proj + LayerNorm)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from open_clip.model import QuickGELU, VisionTransformer
from open_clip.transformer import LayerNorm
from torch import nn

from .config import ClipVisionConfig, ResamplerConfig


def build_clip_vision(cfg: ClipVisionConfig) -> VisionTransformer:
    """The architecture open_clip builds from OpenAI's files (QuickGELU, CLS-token pooling), so an
    OpenAI-format ``visual.*`` state dict loads into it key for key."""
    return VisionTransformer(
        image_size=cfg.image_size, patch_size=cfg.patch_size, width=cfg.width, layers=cfg.layers,
        heads=cfg.heads, mlp_ratio=cfg.mlp_ratio, output_dim=cfg.output_dim, act_layer=QuickGELU,
        norm_layer=LayerNorm,
    )


def clip_tokens(vit: VisionTransformer, pixels: torch.Tensor) -> torch.Tensor:
    """All final-layer tokens, CLS first, after ln_post and proj: [B, 3, H, W] -> [B, N, output_dim].

    open_clip's own forward pools to CLS (and returns patch tokens without ln_post/proj), so this walks
    its submodules the way the released model does.
    """
    x = vit.conv1(pixels.to(vit.conv1.weight.dtype))  # [B, width, g, g]
    x = x.flatten(2).transpose(1, 2)  # [B, g*g, width]
    cls = vit.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)  # [B, 1, width]
    x = torch.cat([cls, x], dim=1) + vit.positional_embedding.to(x.dtype)  # [B, N, width]
    x = vit.ln_pre(x)
    if not getattr(vit.transformer, "batch_first", True):
        x = vit.transformer(x.transpose(0, 1)).transpose(0, 1)
    else:
        x = vit.transformer(x)
    return vit.ln_post(x) @ vit.proj  # [B, N, output_dim]


class ResamplerAttention(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        qkv = self.qkv(x).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)  # [3, B, H, N, D/H]
        out = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])  # bidirectional, [B, H, N, D/H]
        return self.proj(out.transpose(1, 2).reshape(b, n, d))


class ResamplerMLP(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))  # exact GELU


class ResamplerBlock(nn.Module):
    """Pre-norm ViT block (LayerNorm eps 1e-5), names as in the released checkpoints."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = ResamplerAttention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = ResamplerMLP(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class VisualResampler(nn.Module):
    """CLIP tokens [B, N, clip_dim] -> visual tokens [B, n_queries, llama_dim]."""

    def __init__(self, clip_dim: int, cfg: ResamplerConfig, llama_dim: int) -> None:
        super().__init__()
        self.n_queries = cfg.n_queries
        self.clip_proj = nn.Linear(clip_dim, cfg.dim)
        self.clip_proj_norm = nn.LayerNorm(cfg.dim)
        self.visual_query = nn.Embedding(cfg.n_queries, cfg.dim)
        self.visual_blocks = nn.ModuleList(ResamplerBlock(cfg.dim, cfg.heads, cfg.mlp_ratio) for _ in range(cfg.depth))
        self.visual_proj = nn.Linear(cfg.dim, llama_dim)
        self.visual_proj_norm = nn.LayerNorm(llama_dim)

    def reset_adapter_parameters(self) -> None:
        """Everything here is tuned, so all of it gets its PyTorch default initialisation."""
        for module in self.modules():
            if module is not self and hasattr(module, "reset_parameters"):
                module.reset_parameters()

    def forward(self, clip_feats: torch.Tensor) -> torch.Tensor:
        x = self.clip_proj_norm(self.clip_proj(clip_feats.to(self.clip_proj.weight.dtype)))  # [B, N, dim]
        queries = self.visual_query.weight.expand(x.shape[0], -1, -1)  # [B, Q, dim]
        x = torch.cat([queries, x], dim=1)  # [B, Q + N, dim]
        for block in self.visual_blocks:
            x = block(x)
        return self.visual_proj_norm(self.visual_proj(x[:, : self.n_queries]))  # [B, Q, llama_dim]
