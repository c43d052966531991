"""transformers' LlamaForCausalLM holding our base weights: Meta -> HF names, RoPE row order, config."""
from __future__ import annotations

from typing import Any

import torch

from multimodal.config import LlamaConfig

from .shapes import fill_base_tensor

# --- Meta -> Hugging Face ----------------------------------------------------------------------------

_HF_LAYER_NAMES = {
    "attention.wq.weight": "self_attn.q_proj.weight", "attention.wk.weight": "self_attn.k_proj.weight",
    "attention.wv.weight": "self_attn.v_proj.weight", "attention.wo.weight": "self_attn.o_proj.weight",
    "feed_forward.w1.weight": "mlp.gate_proj.weight", "feed_forward.w2.weight": "mlp.down_proj.weight",
    "feed_forward.w3.weight": "mlp.up_proj.weight", "attention_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
}
_HF_TOP_NAMES = {"tok_embeddings.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight",
                 "output.weight": "lm_head.weight"}


def hf_name(meta_name: str) -> str:
    """Meta's parameter name -> LlamaForCausalLM's."""
    if meta_name in _HF_TOP_NAMES:
        return _HF_TOP_NAMES[meta_name]
    _, index, rest = meta_name.split(".", 2)  # layers.{i}.{rest}
    return f"model.layers.{index}.{_HF_LAYER_NAMES[rest]}"


def rope_halves(w: torch.Tensor, heads: int) -> torch.Tensor:
    """Reorder wq/wk rows for HF's rotate-half RoPE: Meta rotates adjacent pairs (2i, 2i+1) of each
    head, HF rotates (i, i + head_dim/2), so within each head pair i's rows move to i and i + D/2."""
    d = w.shape[0] // heads
    return w.view(heads, d // 2, 2, -1).transpose(1, 2).reshape(w.shape)


def hf_config(cfg: LlamaConfig) -> Any:
    import transformers

    return transformers.LlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.dim, intermediate_size=cfg.ffn_hidden_dim,
        num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.kv_heads,
        rms_norm_eps=cfg.norm_eps, max_position_embeddings=cfg.max_seq_len, tie_word_embeddings=False,
        attention_bias=False, mlp_bias=False,
        rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta})


def build_hf(cfg: LlamaConfig, device: torch.device, dtype: torch.dtype, seed: int) -> torch.nn.Module:
    """LlamaForCausalLM holding exactly our base weights: built on the meta device, given storage in the
    target dtype, then each Meta tensor is drawn with our generator and copied in (wq/wk permuted)."""
    from transformers import LlamaForCausalLM
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    from multimodal.llama import Transformer

    hcfg = hf_config(cfg)
    with torch.device("meta"):
        hf = LlamaForCausalLM(hcfg)
        meta_shapes = {n: p.shape for n, p in Transformer(cfg).named_parameters()}
    hf = hf.to(dtype).to_empty(device=device)
    with torch.device(device):  # inv_freq was computed on meta; recompute it (fp32) for real
        hf.model.rotary_emb = LlamaRotaryEmbedding(hcfg)
    own = dict(hf.named_parameters())
    with torch.no_grad():
        for name, shape in meta_shapes.items():
            target = own.pop(hf_name(name))
            if name.endswith(("wq.weight", "wk.weight")):
                tmp = torch.empty(shape, dtype=dtype, device=device)
                fill_base_tensor(tmp, name, seed)
                heads = cfg.n_heads if name.endswith("wq.weight") else cfg.kv_heads
                target.copy_(rope_halves(tmp, heads))
                del tmp
            else:
                fill_base_tensor(target, name, seed)
    if own:
        raise RuntimeError(f"HF parameters left unset: {sorted(own)}")
    return hf.eval().requires_grad_(False)
