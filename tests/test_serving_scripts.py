"""scripts/loadtest.py and scripts/bench_batch.py: they drive real servers and engines and report what
they measured in the documented shape. Speeds are their output, not checked here; correctness counts
(lost, errors, cross-talk) are."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from conftest import load_script, serve_app

loadtest = load_script("loadtest")
bench_batch = load_script("bench_batch")


def test_load_test_on_a_batching_server_loses_nothing_and_crosses_nothing(tmp_path: Path, tiny_files: dict[str, Path],
                                                                          tiny_adapter, capsys: pytest.CaptureFixture) -> None:
    from app.openai_api import ApiSettings
    from multimodal.batching import BatchEngine
    from multimodal.loading import load_model
    from test_app import make_app

    engine = BatchEngine(load_model(tiny_files["llama_dir"], tiny_files["tokenizer_path"], tiny_files["clip_path"],
                                    tiny_adapter(0, 5), preset="tiny", device="cpu", dtype="float32", max_seq_len=1024),
                         slots=4)
    with serve_app(make_app(engine), ApiSettings()) as url:
        status = loadtest.main(["--url", url, "--clients", "6", "--requests", "18", "--questions", "5",
                                "--max-tokens", "8", "--json", str(tmp_path / "load.json")])
    out = capsys.readouterr().out
    report = json.loads((tmp_path / "load.json").read_text())
    assert status == 0
    assert report["counts"]["lost"] == report["counts"]["error"] == report["counts"]["cross-talk"] == 0
    assert report["counts"]["ok"] + report["counts"]["differs"] == 18 and report["counts"]["ok"] > 0
    assert len(set(report["references"])) > 1  # distinct questions, distinct answers: cross-talk would show
    assert re.search(r"\| 18 \| \d+ \| \d+ \| 0 \| 0 \| 0 \|", out), out
    assert len(report["ttft_s"]) == 18 and all(t > 0 for t in report["ttft_s"])


def test_load_test_counts_what_it_never_got_as_lost(capsys: pytest.CaptureFixture) -> None:
    outcomes, _ = loadtest.run_load("http://127.0.0.1:9", {}, ["q"], ["a"],
                                    loadtest.argparse.Namespace(requests=3, clients=2, deadline=5, max_tokens=4))
    assert [o.status for o in outcomes] == ["lost"] * 3  # nothing listens on port 9


def test_bench_batch_reports_each_concurrency(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert bench_batch.main(["--shape", "tiny", "--dtype", "float32", "--concurrency", "1,3", "--repeats", "1",
                             "--new-tokens", "6", "--prompt-tokens", "8", "--json", str(tmp_path / "b.json")]) == 0
    out = capsys.readouterr().out
    rows = json.loads((tmp_path / "b.json").read_text())["rows"]
    assert [r["n"] for r in rows] == [1, 3] and [r["max_rows"] for r in rows] == [1, 3]
    assert "| 3 |" in out and "speed-up over 1" in out
