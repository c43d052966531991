"""The benchmark script runs end to end on the CPU at the tiny shape: both implementations in their
worker processes, the correctness check against transformers, packed and int8 weights. It checks
what the script reports, never how fast anything was (speed is the script's job, not the tests')."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from multimodal.config import TINY_LLAMA

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "benchmark.py"
LINEARS = 7 * TINY_LLAMA.n_layers + 1  # wq, wk, wv, wo, w1, w2, w3 per layer, and the output head


def run_benchmark(tmp_path: Path, *args: str) -> tuple[dict, str]:
    out, md = tmp_path / "bench.json", tmp_path / "bench.md"
    cmd = [sys.executable, str(SCRIPT), "--shape", "tiny", "--device", "cpu", "--prompt-tokens", "24",
           "--new-tokens", "6", "--repeats", "1", "--json", str(out), "--markdown", str(md), *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(out.read_text()), md.read_text()


def test_bf16_run_checks_against_transformers_and_reports_packing(tmp_path: Path) -> None:
    result, text = run_benchmark(tmp_path, "--dtype", "bfloat16", "--pack", "on")
    assert result["check"]["tokens_match"], result["check"]
    assert result["ours"]["packed_linears"] == LINEARS
    for variant in (result["ours"]["adapter"], result["ours"]["plain"], result["transformers"]["lm"]):
        assert variant["decode"] > 0 and variant["prefill"] > 0 and len(variant["all_runs"]) == 1
    assert result["ours"]["gate_effect_max_abs"] > 0  # the opened gates reach the logits
    assert "| **decode tok/s** (5 steps) |" in text
    assert "prepacked for oneDNN" in text


def test_int8_run_reports_the_logit_change_against_unquantised(tmp_path: Path) -> None:
    result, text = run_benchmark(tmp_path, "--dtype", "float32", "--quantize", "int8")
    q = result["ours"]["int8"]
    assert result["check"]["tokens_match"]  # the check runs before quantising, against transformers
    assert 0 < q["rel_l2"] < 0.05 and 0 < q["max_abs_logit_diff"] < q["logit_scale"]  # changed, but close
    assert q["greedy_same"] >= 6
    assert result["ours"]["packed_linears"] == 0  # int8 is never packed
    assert "**int8 weight-only**" in text


def test_compiled_run_checks_its_tokens_against_the_eager_path(tmp_path: Path) -> None:
    result, text = run_benchmark(tmp_path, "--dtype", "float32", "--compile")
    ours = result["ours"]
    assert ours["compiled"] and ours["compiled_tokens_match"] and result["check"]["tokens_match"]
    assert ours["compile_s"] > 0 and set(ours["warmup_s"]) == {"adapter", "plain"}
    assert ours["packed_linears"] == 0  # compiled steps take plain weights
    assert "**torch.compile**d" in text
