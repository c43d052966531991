"""The language model against independent references: the stories260K fixture's float64 reference,
Meta's tokenizer ids, and transformers' LlamaForCausalLM."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import fixture_path
from multimodal.checkpoint import CheckpointError
from multimodal.config import LlamaConfig
from multimodal.loading import load_llama_only
from multimodal.tokenizer import Tokenizer
from tiny import write_meta_dir


def test_stories260k_reproduces_reference() -> None:
    ckpt = fixture_path("stories260K/consolidated.00.pth").parent
    ref = json.loads(fixture_path("stories260K/reference.json").read_text())
    case = ref["Once upon a time"]
    model = load_llama_only(ckpt)
    assert model.config.n_kv_heads == 4 and model.config.ffn_hidden_dim == 172

    ids = torch.tensor([case["prompt_ids"]])
    logits = model(ids)[0, -1, :16]
    torch.testing.assert_close(logits, torch.tensor(ref["logits_last_Once upon a time"]), atol=1e-4, rtol=0)

    # greedy decoding through the KV cache, one token at a time
    model.setup_cache(batch=1)
    out, pos = [], ids.shape[1]
    next_logits = model(ids, start_pos=0, last_only=True)
    for _ in range(len(case["greedy_ids"])):
        token = next_logits.argmax(-1)
        out.append(int(token))
        next_logits = model(token[:, None], start_pos=pos, last_only=True)
        pos += 1
    assert out == case["greedy_ids"]
    tok = Tokenizer(ckpt / "tokenizer.model")
    assert tok.encode("Once upon a time", bos=True) == case["prompt_ids"]
    assert tok.decode(out) == case["greedy_text"]


def test_llama_tokenizer_fixture_ids() -> None:
    tok = Tokenizer(fixture_path("llama/tokenizer.model"))
    assert (tok.n_words, tok.bos_id, tok.eos_id, tok.pad_id) == (32000, 1, 2, -1)
    ids = tok.encode("Hello world, a bus with people.", bos=False)
    assert ids == [15043, 3186, 29892, 263, 3593, 411, 2305, 29889]
    assert tok.encode("Hello", bos=True, eos=True) == [1, 15043, 2]
    assert tok.decode(ids) == "Hello world, a bus with people."


def meta_to_hf(sd: dict[str, torch.Tensor], cfg: LlamaConfig) -> dict[str, torch.Tensor]:
    """Meta -> Hugging Face names. HF's RoPE rotates the two halves of each head instead of adjacent
    pairs, so wq/wk rows are reordered within each head: pair i's (even, odd) rows go to (i, i + D/2)."""

    def halves(w: torch.Tensor, heads: int) -> torch.Tensor:
        d = cfg.head_dim
        return w.view(heads, d // 2, 2, -1).transpose(1, 2).reshape(heads * d, -1)

    out = {"model.embed_tokens.weight": sd["tok_embeddings.weight"], "model.norm.weight": sd["norm.weight"],
           "lm_head.weight": sd["output.weight"]}
    for i in range(cfg.n_layers):
        m, h = f"layers.{i}.", f"model.layers.{i}."
        out |= {
            h + "self_attn.q_proj.weight": halves(sd[m + "attention.wq.weight"], cfg.n_heads),
            h + "self_attn.k_proj.weight": halves(sd[m + "attention.wk.weight"], cfg.kv_heads),
            h + "self_attn.v_proj.weight": sd[m + "attention.wv.weight"],
            h + "self_attn.o_proj.weight": sd[m + "attention.wo.weight"],
            h + "mlp.gate_proj.weight": sd[m + "feed_forward.w1.weight"],
            h + "mlp.down_proj.weight": sd[m + "feed_forward.w2.weight"],
            h + "mlp.up_proj.weight": sd[m + "feed_forward.w3.weight"],
            h + "input_layernorm.weight": sd[m + "attention_norm.weight"],
            h + "post_attention_layernorm.weight": sd[m + "ffn_norm.weight"],
        }
    return out


@pytest.mark.parametrize("n_kv_heads,theta", [(2, 10000.0), (None, 500000.0)])
def test_matches_transformers_llama(tmp_path: Path, n_kv_heads: int | None, theta: float) -> None:
    transformers = pytest.importorskip("transformers")
    cfg = LlamaConfig(dim=64, n_layers=3, n_heads=4, n_kv_heads=n_kv_heads, vocab_size=97, multiple_of=32,
                      ffn_dim_multiplier=1.3, norm_eps=1e-5, rope_theta=theta, max_seq_len=64)
    sd = write_meta_dir(tmp_path, cfg, seed=3)
    params = json.loads((tmp_path / "params.json").read_text()) | {"rope_theta": theta, "ffn_dim_multiplier": 1.3}
    (tmp_path / "params.json").write_text(json.dumps(params))
    ours = load_llama_only(tmp_path, max_seq_len=64)
    assert ours.config.ffn_hidden_dim == cfg.ffn_hidden_dim

    hf_cfg = transformers.LlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.dim, intermediate_size=cfg.ffn_hidden_dim,
        num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.kv_heads,
        rms_norm_eps=cfg.norm_eps, rope_theta=theta, max_position_embeddings=64, tie_word_embeddings=False,
        attention_bias=False, mlp_bias=False)
    hf_cfg.rope_parameters = {"rope_type": "default", "rope_theta": theta}
    hf = transformers.LlamaForCausalLM(hf_cfg).eval()
    missing, unexpected = hf.load_state_dict(meta_to_hf(sd, cfg), strict=False)
    assert not unexpected and all("rotary" in k for k in missing)

    tokens = torch.randint(cfg.vocab_size, (2, 23), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = hf(tokens).logits.float()
        got = ours(tokens)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_sharded_checkpoint_merges_to_same_model(tmp_path: Path) -> None:
    cfg = LlamaConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=50, multiple_of=16, max_seq_len=32)
    write_meta_dir(tmp_path / "one", cfg, seed=5, shards=1)
    write_meta_dir(tmp_path / "two", cfg, seed=5, shards=2)
    assert len(list((tmp_path / "two").glob("consolidated.*.pth"))) == 2
    tokens = torch.randint(50, (1, 9), generator=torch.Generator().manual_seed(0))
    a = load_llama_only(tmp_path / "one")(tokens)
    b = load_llama_only(tmp_path / "two")(tokens)
    assert torch.equal(a, b)


def test_params_json_is_checked(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="vocab_size -1"):
        LlamaConfig.from_params({"dim": 64, "n_layers": 1, "n_heads": 4, "vocab_size": -1})
    with pytest.raises(ValueError, match="does not know.*'wrong'"):
        LlamaConfig.from_params({"dim": 64, "n_layers": 1, "n_heads": 4, "vocab_size": 9, "wrong": 1})
    assert LlamaConfig(dim=4096, multiple_of=256).ffn_hidden_dim == 11008  # LLaMA-7B


def test_missing_and_incomplete_checkpoints_are_named(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="params.json"):
        load_llama_only(tmp_path)
    cfg = LlamaConfig(dim=64, n_layers=2, n_heads=4, vocab_size=50, multiple_of=16, max_seq_len=32)
    write_meta_dir(tmp_path, cfg)
    sd = torch.load(tmp_path / "consolidated.00.pth", weights_only=True)
    del sd["layers.1.feed_forward.w2.weight"]
    torch.save(sd, tmp_path / "consolidated.00.pth")
    with pytest.raises(CheckpointError, match=r"layers\.1\.feed_forward\.w2\.weight"):
        load_llama_only(tmp_path)
