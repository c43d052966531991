"""Pretraining the demo's tiny LLaMA as a plain language model, and writing it in Meta's format.

After this stage the language model is frozen for good: the adapter stage loads it back from the
written ``consolidated.00.pth`` through the normal loader, so the adapter is trained against exactly the
weights the app will load.
"""
from __future__ import annotations

import json
import math
import random
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from ..config import AdapterConfig, LlamaConfig
from ..llama import Transformer


def init_weights(model: Transformer, seed: int) -> None:
    """GPT-2 style: N(0, 0.02), output projections of each residual branch scaled by 1/sqrt(2 * layers)
    so the residual stream does not grow with depth; norms at one."""
    g = torch.Generator().manual_seed(seed)
    residual_std = 0.02 / math.sqrt(2 * model.config.n_layers)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            else:
                std = residual_std if name.endswith(("wo.weight", "w2.weight")) else 0.02
                p.copy_(torch.randn(p.shape, generator=g) * std)


def pack(docs: list[list[int]], seq_len: int, seed: int) -> torch.Tensor:
    """Shuffle documents, concatenate them and cut rows of seq_len + 1 tokens: [N, seq_len + 1]. Packing
    wastes nothing on padding; each document starts with BOS so the model learns fresh starts too."""
    order = list(range(len(docs)))
    random.Random(seed).shuffle(order)
    stream = [t for i in order for t in docs[i]]
    n = len(stream) // (seq_len + 1)
    return torch.tensor(stream[: n * (seq_len + 1)]).view(n, seq_len + 1)


def pretrain_lm(docs: list[list[int]], cfg: LlamaConfig, steps: int, batch_size: int = 32, seq_len: int = 64,
                lr: float = 3e-3, warmup: int = 30, seed: int = 0, progress: bool = True) -> tuple[Transformer, list[float]]:
    """Train every weight of a fresh LLaMA on token documents (each BOS ... EOS). Returns the model
    (frozen, eval) and the loss per step."""
    torch.manual_seed(seed)
    model = Transformer(cfg, AdapterConfig(bias=False))
    init_weights(model, seed)
    rows = pack(docs, seq_len, seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.1)
    g = torch.Generator().manual_seed(seed)
    losses: list[float] = []
    bar = tqdm(range(steps), desc="language model", disable=not progress, dynamic_ncols=True)
    for step in bar:
        scale = (step + 1) / warmup if step < warmup else 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))
        for group in opt.param_groups:
            group["lr"] = lr * max(scale, 0.02)
        batch = rows[torch.randint(len(rows), (batch_size,), generator=g)]  # [B, seq_len + 1]
        logits = model(batch[:, :-1])  # [B, seq_len, vocab]
        loss = F.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
        bar.set_postfix(loss=f"{loss.item():.3f}")
    return model.eval().requires_grad_(False), losses


def save_meta_llama(model: Transformer, out_dir: str | Path, dtype: torch.dtype = torch.float16) -> None:
    """``params.json`` + ``consolidated.00.pth`` with Meta's key names (this model's own names are Meta's).
    Stored in fp16 like Meta's files; ``vocab_size`` is written, not -1, since the tokenizer is ours."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    c = model.config
    params = {"dim": c.dim, "n_layers": c.n_layers, "n_heads": c.n_heads, "multiple_of": c.multiple_of,
              "norm_eps": c.norm_eps, "vocab_size": c.vocab_size}
    if c.n_kv_heads is not None:
        params["n_kv_heads"] = c.n_kv_heads
    (out_dir / "params.json").write_text(json.dumps(params) + "\n")
    torch.save({k: v.detach().to(dtype).contiguous() for k, v in model.state_dict().items()},
               out_dir / "consolidated.00.pth")
