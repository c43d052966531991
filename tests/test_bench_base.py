"""scripts/bench_base.py end to end at a tiny scale: a random GGUF file and a random Hugging Face
folder, both written by independent writers (gguf's GGUFWriter as llama.cpp lays files out, and
transformers' save_pretrained), decoded by ours and by transformers in worker processes; and the
loading-memory mode on a tiny random folder. It checks the report's structure and that the greedy
tokens agreed, never how fast anything was."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers
from gguf import GGMLQuantizationType as QT

from test_format_gguf import CHATML, write_gguf  # tests/ is on sys.path, as for tiny.py
from test_format_hf import write_tokenizer

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "bench_base.py"
NEW_TOKENS = 12


def tiny_llama(vocab: int) -> "transformers.LlamaForCausalLM":
    """Random weights large enough that the greedy tokens are not all the same token."""
    cfg = transformers.LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5,
                                   max_position_embeddings=512, rope_theta=10000.0, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(1 + 0.1 * torch.randn_like(p) if name.endswith("norm.weight") else 0.3 * torch.randn_like(p))
    return model


def run(tmp_path: Path, *args: str) -> tuple[dict, str]:
    out, md = tmp_path / "bench.json", tmp_path / "bench.md"
    cmd = [sys.executable, str(SCRIPT), "--new-tokens", str(NEW_TOKENS), "--repeats", "2", "--check-tokens", "8",
           "--threads", "1", "--json", str(out), "--markdown", str(md), *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(out.read_text()), md.read_text()


def check_decode(result: dict, text: str, fmt: str) -> None:
    d = result["decode"]
    assert d["base"]["format"] == fmt and d["new_tokens"] == NEW_TOKENS
    assert d["check"]["tokens_match"] and d["check"]["common_prefix_float32"] >= 8
    assert d["check"]["prompt_ids_match"] is True  # ours = transformers' apply_chat_template
    models = d["models"]
    assert {"ours-float32", "transformers-float32"} <= set(models)
    for m in models.values():
        assert len(m["all_runs"]) == 2 and len(m["tokens"]) == NEW_TOKENS and m["tokens_stable"]
        assert m["tok_s"] > 0 and m["load_s"] > 0 and m["peak_rss_mib"] >= m["rss_start_mib"] > 0
    assert models["ours-float32"]["has_vision"] is False  # no adapter, no CLIP: text-only
    assert models["ours-float32"]["ratio_vs_transformers"] > 0
    assert "| **decode tok/s** (11 steps) |" in text and "Greedy tokens: our float32 **equals**" in text
    assert "Load average" in text


def test_gguf_base_and_loading_memory(tmp_path: Path) -> None:
    """A Q8_0 GGUF with tied embeddings (SmolLM2's kind) and the memory mode on a tiny folder."""
    write_gguf(tmp_path / "tiny.gguf", tiny_llama(vocab=320), tie=True, qtype=QT.Q8_0)
    result, text = run(tmp_path, "--base", str(tmp_path / "tiny.gguf"), "--memory", "--shape", "tiny",
                       "--shard-size", "100KB", "--folder-dir", str(tmp_path), "--dtypes", "float32,bfloat16")
    check_decode(result, text, "gguf")
    assert "ours-bfloat16" in result["decode"]["models"]  # asked for, whether or not the CPU has native bf16
    mem = result["memory"]
    assert mem["shards"] > 1 and mem["load"]["params"] > 0 and mem["load"]["weights_mib"] > 0
    ld = mem["load"]
    assert ld["peak_rss_mib"] >= ld["baseline_rss_mib"] > 0 and ld["load_over_weights"] == pytest.approx(
        (ld["peak_rss_mib"] - ld["baseline_rss_mib"]) / ld["weights_mib"])
    assert not list(tmp_path.glob("bench_base_hf_*"))  # the random folder is deleted afterwards
    assert "peak over the baseline" in text


def test_hf_folder_base(tmp_path: Path) -> None:
    folder = tmp_path / "hf"
    tiny_llama(vocab=300).save_pretrained(folder)
    write_tokenizer(folder)  # 300 tokens, <|im_end|> as eos; add the ChatML template
    config = json.loads((folder / "tokenizer_config.json").read_text()) | {"chat_template": CHATML}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    result, text = run(tmp_path, "--base", str(folder), "--dtypes", "float32")
    check_decode(result, text, "hf")
    assert set(result["decode"]["models"]) == {"ours-float32", "transformers-float32"}
