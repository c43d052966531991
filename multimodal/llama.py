"""LLaMA with LLaMA-Adapter V2's gated prompts.

Semantics follow Meta's reference ``llama/model.py`` (RMSNorm, interleaved-pair RoPE, grouped-query
attention, SwiGLU); the adapter adds a second, separately normalised attention over a per-layer prompt
whose output is scaled by a zero-initialised gate and added before ``wo``.
"""
from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from .adapter import AdaptedLinear, PromptGate, PromptKV
from .coded import CodedProduct
from .config import AdapterConfig, LlamaConfig, RopeScaling
from .int4 import Int4Product, first_serving


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x / sqrt(mean(x^2) + eps) in fp32, as Meta's reference; F.rms_norm is that formula in one call
        return F.rms_norm(x.float(), x.shape[-1:], None, self.eps).type_as(x) * self.weight


def scale_frequencies(inv_freq: torch.Tensor, s: RopeScaling) -> torch.Tensor:
    """Llama 3.1's scaling: low frequencies (long wavelengths) divided by ``factor``, high ones kept,
    a linear blend in wavelength-ratio between the two bands."""
    wavelen = 2 * math.pi / inv_freq
    ratio = s.original_max_position_embeddings / wavelen  # periods that fit in the original context
    blend = ((ratio - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor)).clamp(0.0, 1.0)
    return (1 - blend) * inv_freq / s.factor + blend * inv_freq


def rope_table(head_dim: int, n_positions: int, theta: float, device: torch.device | None = None,
               scaling: RopeScaling | None = None) -> torch.Tensor:
    """cos/sin of every (position, frequency) pair, fp32: [n_positions, head_dim // 2, 2]."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim))
    if scaling is not None:
        inv_freq = scale_frequencies(inv_freq, scaling)
    angles = torch.outer(torch.arange(n_positions, device=device, dtype=torch.float32), inv_freq)
    return torch.stack([angles.cos(), angles.sin()], dim=-1)


def apply_rope(x: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """Rotate adjacent pairs (x[2i], x[2i+1]) as Meta's complex formulation does, in fp32.

    x: [B, S, H, D]; table: [S, D // 2, 2], or [B, S, D // 2, 2] for positions that differ by row.
    Eagerly on a CPU the pairs are multiplied as complex numbers (one kernel instead of a dozen: a
    SmolLM2 decoding step makes 60 of these calls); compiled graphs and other devices get the same
    products written out in real arithmetic, which every backend compiles.
    """
    if table.dim() == 3:
        table = table[None]  # [1, S, D/2, 2]
    if x.device.type == "cpu" and not torch.compiler.is_compiling():
        pairs = torch.view_as_complex(x.float().unflatten(-1, (-1, 2)))  # [B, S, H, D/2] complex
        turns = torch.view_as_complex(table)[:, :, None]  # [B or 1, S, 1, D/2]: cos + i sin
        return torch.view_as_real(pairs * turns).flatten(-2).type_as(x)
    xf = x.float().unflatten(-1, (-1, 2))  # [B, S, H, D/2, 2]
    x0, x1 = xf.unbind(-1)  # [B, S, H, D/2] each
    cos, sin = table[:, :, None, :, 0], table[:, :, None, :, 1]  # [B or 1, S, 1, D/2]
    out = torch.stack([x0 * cos - x1 * sin, x0 * sin + x1 * cos], dim=-1)  # [B, S, H, D/2, 2]
    return out.flatten(-2).type_as(x)


class KVCache(nn.Module):
    """Preallocated keys/values of one layer, written in place: [B, n_kv_heads, max_seq_len + 1, head_dim].

    The one spare position is never written: it keeps every visible prefix a compiled step asks for
    (at most max_seq_len keys) shorter than the buffer, so the prefix's length stays one symbolic size
    in the compiled graph instead of specialising on "the whole buffer"."""

    def __init__(self, batch: int, max_seq_len: int, n_kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device) -> None:
        super().__init__()
        self.max_seq_len = max_seq_len
        shape = (batch, n_kv_heads, max_seq_len + 1, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def rows(self, start: int, n: int) -> "KVCache":
        """A cache over rows start..start+n of this one (views: writes land here), e.g. one request's
        slot of a batched cache."""
        view = KVCache.__new__(KVCache)
        nn.Module.__init__(view)
        view.max_seq_len = self.max_seq_len
        view.register_buffer("k", self.k[start:start + n], persistent=False)
        view.register_buffer("v", self.v[start:start + n], persistent=False)
        return view

    def update(self, start_pos: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v ([B, n_kv_heads, S, head_dim]) at start_pos; return all keys/values so far."""
        batch, end = k.shape[0], start_pos + k.shape[2]
        if end > self.max_seq_len:
            raise ValueError(f"sequence of {end} tokens exceeds the cache of {self.max_seq_len}")
        self.k[:batch, :, start_pos:end] = k
        self.v[:batch, :, start_pos:end] = v
        return self.k[:batch, :, :end], self.v[:batch, :, :end]

    def write_at(self, pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                 visible: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Store one token's k, v ([B, n_kv_heads, 1, head_dim], B the cache's batch) at the device-side
        position ``pos`` ([1] long: every row; [B]: one per row); return the cache's first
        ``len(visible)`` positions (all of it when None): [B, n_kv_heads, T, head_dim]."""
        if pos.shape[0] == 1:
            self.k.index_copy_(2, pos, k)
            self.v.index_copy_(2, pos, v)
        else:  # row b at pos[b] (continuous batching: every request at its own length)
            rows = torch.arange(k.shape[0], device=k.device)
            self.k[rows, :, pos] = k[:, :, 0]  # [B, n_kv_heads, head_dim] at (row, :, pos[row])
            self.v[rows, :, pos] = v[:, :, 0]
        if visible is None:
            return self.k, self.v
        return self.k[:, :, :visible.shape[0]], self.v[:, :, :visible.shape[0]]


def one_query_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                        mask: torch.Tensor | None = None) -> torch.Tensor:
    """Attention of one query per head, written out in float32: scores, softmax, weighted values.
    q: [B, H, 1, D]; k, v: [B, Hkv, T, D]; mask broadcastable to [B, 1, 1, T] (True: attend) -> [B, H, 1, D]
    in q's dtype.

    For 16-bit decoding on a CPU: PyTorch's fused attention kernel is built for many queries, and in
    bfloat16 a decoding step's single query took 210-430 us per call on this project's 2-core machine
    (1B shape: 32 heads over 270 keys; SmolLM2: 9 over 450), where these few float32 products take
    about 50 us. In float32 the fused kernel is as fast (25-60 us) and stays in use. The query heads
    that share a KV head are grouped, so keys and values are read as stored (no repeat)."""
    b, h, _, d = q.shape
    hkv = k.shape[1]
    qg = q.view(b, hkv, h // hkv, d).float() * d ** -0.5  # [B, Hkv, G, D]: the G query heads of each KV head
    scores = torch.matmul(qg, k.float().transpose(-1, -2))  # [B, Hkv, G, T]
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))  # mask [B or 1, 1, 1, T] broadcasts over Hkv, G
    out = torch.matmul(torch.softmax(scores, dim=-1), v.float())  # [B, Hkv, G, D]
    return out.view(b, h, 1, d).to(q.dtype)


def _one_query_kernel(q: torch.Tensor) -> bool:
    """Whether one_query_attention serves a single query better than the fused kernel: 16-bit on a CPU."""
    return q.device.type == "cpu" and q.dtype != torch.float32


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, start_pos: int) -> torch.Tensor:
    """Attention of S new queries (at start_pos..) over all T keys so far. q: [B, H, S, D]; k, v: [B, Hkv, T, D]."""
    s, t = q.shape[2], k.shape[2]
    gqa = q.shape[1] != k.shape[1]
    if s == 1:  # one new token sees every cached key
        if _one_query_kernel(q):
            return one_query_attention(q, k, v)
        return F.scaled_dot_product_attention(q, k, v, enable_gqa=gqa)
    if start_pos == 0 and s == t:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
    # a chunk after a cached prefix: query i sits at start_pos + i and sees keys 0..start_pos + i
    mask = torch.arange(t, device=q.device)[None, :] <= (start_pos + torch.arange(s, device=q.device))[:, None]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)


def step_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """One new query at position ``pos`` ([1] or [B] long, on the device) over T cached positions (the whole
    cache, or a visible prefix of it), keys after ``pos`` masked out. Shapes do not depend on the
    position, so one compiled (or CUDA-graph captured) step serves every position.
    q: [B, H, 1, D]; k, v: [B, Hkv, T, D]."""
    mask = torch.arange(k.shape[2], device=q.device)[None, :] <= pos[:, None]  # [1 or B, T]: the one query row
    mask = mask[:, None, None, :]  # [1 or B, 1, 1, T]
    if _one_query_kernel(q):
        return one_query_attention(q, k, v, mask)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=q.shape[1] != k.shape[1])


class Attention(nn.Module):
    def __init__(self, cfg: LlamaConfig, acfg: AdapterConfig, prompted: bool) -> None:
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.kv_heads, cfg.head_dim
        tuned = {"bias": acfg.bias, "scale": acfg.scale, "lora_rank": acfg.lora_rank}
        frozen_kv = {"lora_rank": acfg.lora_rank}  # no bias or scale on wk/wv: prompts share them
        self.wq = AdaptedLinear(cfg.dim, self.n_heads * self.head_dim, **tuned)
        self.wk = AdaptedLinear(cfg.dim, self.n_kv_heads * self.head_dim, **frozen_kv)
        self.wv = AdaptedLinear(cfg.dim, self.n_kv_heads * self.head_dim, **frozen_kv)
        self.wo = AdaptedLinear(self.n_heads * self.head_dim, cfg.dim, **tuned)
        self.prompt_gate = PromptGate(self.n_heads, acfg.new_gate) if prompted else None
        self.kv_cache: KVCache | None = None
        self.fused_qkv: CodedProduct | None = None  # GGUF codes of wq, wk, wv stacked (coded.attach_codes)
        self.int4_qkv: Int4Product | None = None  # their 4-bit codes for eager decoding (int4.attach_int4)

    def prompt_kv(self, prompt: torch.Tensor) -> PromptKV:
        """Keys/values of a raw prompt ([B, P, dim]) through this layer's frozen wk/wv: no norm, no
        RoPE (prompts hold no position), no LoRA."""
        b, p, _ = prompt.shape
        k = self.wk.base(prompt).view(b, p, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.wv.base(prompt).view(b, p, self.n_kv_heads, self.head_dim).transpose(1, 2)
        return PromptKV(k, v, self.prompt_gate().to(prompt.dtype))

    def forward(self, x: torch.Tensor, rope: torch.Tensor, start_pos: int | torch.Tensor,
                prompt: PromptKV | None, visible: torch.Tensor | None = None) -> torch.Tensor:
        b, s, _ = x.shape
        stacked = first_serving(x, self.fused_qkv, self.int4_qkv)
        if stacked is not None:
            yq, yk, yv = stacked(x)
            xq, xk, xv = self.wq.finish(x, yq), self.wk.finish(x, yk), self.wv.finish(x, yv)
        else:
            xq, xk, xv = self.wq(x), self.wk(x), self.wv(x)
        q = apply_rope(xq.view(b, s, self.n_heads, self.head_dim), rope)
        k = apply_rope(xk.view(b, s, self.n_kv_heads, self.head_dim), rope)
        v = xv.view(b, s, self.n_kv_heads, self.head_dim)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [B, heads, S, D]
        if isinstance(start_pos, torch.Tensor):  # Transformer.step: one token, fixed shapes
            k, v = self.kv_cache.write_at(start_pos, k, v, visible)
            out = step_attention(q, k, v, start_pos)  # [B, H, 1, D]
        else:
            if self.kv_cache is not None:
                k, v = self.kv_cache.update(start_pos, k, v)
            out = causal_attention(q, k, v, start_pos)  # [B, H, S, D]
        if prompt is not None:
            # the prompt gets its own softmax (no mask: every token sees the whole prompt)
            if s == 1 and _one_query_kernel(q):
                p_out = one_query_attention(q, prompt.k, prompt.v)
            else:
                p_out = F.scaled_dot_product_attention(q, prompt.k, prompt.v, enable_gqa=self.n_heads != self.n_kv_heads)
            out = out + prompt.gate * p_out
        return self.wo(out.transpose(1, 2).reshape(b, s, self.n_heads * self.head_dim))


class FeedForward(nn.Module):
    def __init__(self, cfg: LlamaConfig, acfg: AdapterConfig) -> None:
        super().__init__()
        tuned = {"bias": acfg.bias, "scale": acfg.scale, "lora_rank": acfg.lora_rank}
        hidden = cfg.ffn_hidden_dim
        self.w1 = AdaptedLinear(cfg.dim, hidden, **tuned)
        self.w2 = AdaptedLinear(hidden, cfg.dim, **tuned)
        self.w3 = AdaptedLinear(cfg.dim, hidden, **tuned)
        self.fused_w13: CodedProduct | None = None  # GGUF codes of w1, w3 stacked (coded.attach_codes)
        self.int4_w13: Int4Product | None = None  # their 4-bit codes for eager decoding (int4.attach_int4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        stacked = first_serving(x, self.fused_w13, self.int4_w13)
        if stacked is not None:
            y1, y3 = stacked(x)
            return self.w2(F.silu(self.w1.finish(x, y1)) * self.w3.finish(x, y3))
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class TransformerBlock(nn.Module):
    def __init__(self, cfg: LlamaConfig, acfg: AdapterConfig, prompted: bool) -> None:
        super().__init__()
        self.attention_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attention = Attention(cfg, acfg, prompted)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.feed_forward = FeedForward(cfg, acfg)

    def forward(self, x: torch.Tensor, rope: torch.Tensor, start_pos: int | torch.Tensor,
                prompt: PromptKV | None, visible: torch.Tensor | None = None) -> torch.Tensor:
        h = x + self.attention(self.attention_norm(x), rope, start_pos, prompt, visible)
        return h + self.feed_forward(self.ffn_norm(h))


class Transformer(nn.Module):
    """The language model. Prompted layers (adapter or visual) get a gate; the prompts themselves are
    passed in as per-layer :class:`PromptKV`, computed once per image by :meth:`prompt_kv`."""

    def __init__(self, cfg: LlamaConfig, acfg: AdapterConfig | None = None) -> None:
        super().__init__()
        acfg = acfg or AdapterConfig(bias=False)
        self.config, self.adapter_config = cfg, acfg
        prompted = set(acfg.prompted_layers)
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(TransformerBlock(cfg, acfg, i in prompted) for i in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.output = AdaptedLinear(cfg.dim, cfg.vocab_size)  # frozen; AdaptedLinear so it can be packed
        self.register_buffer("rope", torch.empty(0), persistent=False)
        self._row_views: dict[tuple[int, int], list[KVCache]] = {}  # cache_rows' views, by (start, n)
        self.reset_rope()

    def reset_rope(self) -> None:
        """(Re)compute the RoPE table on the model's device, e.g. after building on the meta device."""
        device = self.tok_embeddings.weight.device
        # one position more than the context: the KV cache's spare slot, where idle rows of a batched
        # step write (multimodal/batching.py)
        self.rope = rope_table(self.config.head_dim, self.config.max_seq_len + 1, self.config.rope_theta, device,
                               self.config.rope_scaling)

    def setup_cache(self, batch: int = 1, max_seq_len: int | None = None) -> None:
        """Allocate each layer's KV cache (model dtype and device); decoding then costs one token's work."""
        w = self.output.weight
        length = max_seq_len or self.config.max_seq_len
        if length > self.config.max_seq_len:
            raise ValueError(f"cache of {length} exceeds max_seq_len {self.config.max_seq_len}")
        for layer in self.layers:
            layer.attention.kv_cache = KVCache(batch, length, self.config.kv_heads, self.config.head_dim, w.dtype, w.device)
        self._row_views = {}  # cache_rows' views of the old buffers are stale

    @contextmanager
    def cache_rows(self, start: int, n: int) -> Iterator[None]:
        """Run with every layer's cache limited to rows start..start+n (views of the same buffers): a
        prefill into one slot of a batched cache, or a step over its first n rows. The views are made
        once per (start, n) and kept until the cache is set up again: a batched step asks every token."""
        full = [layer.attention.kv_cache for layer in self.layers]
        views = self._row_views.get((start, n))
        if views is None:
            views = self._row_views[(start, n)] = [cache.rows(start, n) for cache in full]
        try:
            for layer, view in zip(self.layers, views):
                layer.attention.kv_cache = view
            yield
        finally:
            for layer, cache in zip(self.layers, full):
                layer.attention.kv_cache = cache

    def clear_cache(self) -> None:
        for layer in self.layers:
            layer.attention.kv_cache = None
        self._row_views = {}

    def prompt_kv(self, prompts: dict[int, torch.Tensor]) -> list[PromptKV | None]:
        """Per-layer prompt keys/values from raw prompts {layer: [B, P, dim]}."""
        out: list[PromptKV | None] = [None] * len(self.layers)
        for i, prompt in prompts.items():
            if self.layers[i].attention.prompt_gate is None:
                raise ValueError(f"layer {i} has no gate: it is not a prompted layer of this configuration")
            out[i] = self.layers[i].attention.prompt_kv(prompt)
        return out

    def forward(self, tokens: torch.Tensor, start_pos: int = 0, prompts: list[PromptKV | None] | None = None,
                last_only: bool = False) -> torch.Tensor:
        """tokens: [B, S] at positions start_pos.. -> float logits [B, S, vocab] (or [B, vocab] if last_only)."""
        s = tokens.shape[1]
        if start_pos + s > self.config.max_seq_len:
            raise ValueError(f"{start_pos + s} tokens exceed max_seq_len {self.config.max_seq_len}")
        rope = self.rope[start_pos:start_pos + s]
        h = self.tok_embeddings(tokens)
        for i, layer in enumerate(self.layers):
            h = layer(h, rope, start_pos, prompts[i] if prompts is not None else None)
        if last_only:
            h = h[:, -1]
        return self.output(self.norm(h)).float()

    def step(self, token: torch.Tensor, pos: torch.Tensor, prompts: list[PromptKV | None] | None = None,
             visible: torch.Tensor | None = None) -> torch.Tensor:
        """One decoding step with fixed shapes: token [B, 1] at device-side position ``pos`` ([1] long,
        or [B]: each row at its own position) -> float logits [B, vocab]. Same result as ``forward(token, int(pos), prompts, last_only=True)``,
        but nothing depends on the position's value on the host: no slicing by it, no host check (the
        caller keeps pos < max_seq_len), attention over the cache with later keys masked. That is
        what lets ``torch.compile`` / CUDA graphs reuse one step for the whole answer.

        ``visible`` ([T] any dtype, T > pos, at most max_seq_len; None: the whole cache) limits
        attention to the cache's first T positions; only its length is used. A compiled step with
        that length marked dynamic serves every T with one graph (Engine passes T rounded up to a
        multiple of 128), so early tokens do not pay for attending over the whole context."""
        rope = self.rope.index_select(0, pos)[:, None]  # [1 or B, 1, D/2, 2]
        h = self.tok_embeddings(token)  # [B, 1, dim]
        for i, layer in enumerate(self.layers):
            h = layer(h, rope, pos, prompts[i] if prompts is not None else None, visible)
        return self.output(self.norm(h[:, -1])).float()
