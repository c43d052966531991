"""The demo command end to end, at miniature scale (``--smoke``): every stage runs and writes the five
files in the formats the app loads, plus a README with the measured numbers."""
from __future__ import annotations

from pathlib import Path

import torch

from multimodal.adapter import is_trainable
from multimodal.checkpoint import read_adapter
from multimodal.loading import load_model
from multimodal.options import DEMO_FILES
from multimodal.train.__main__ import main


def test_demo_command_smoke_writes_a_loadable_model(tmp_path: Path, capsys) -> None:
    threads = torch.get_num_threads()
    try:
        assert main(["demo", "--out", str(tmp_path), "--seed", "1", "--smoke", "--no-progress", "--threads", "1"]) == 0
    finally:
        torch.set_num_threads(threads)
    printed = capsys.readouterr().out
    assert "with gates" in printed and "demo model written" in printed
    assert all((tmp_path / f).is_file() for f in DEMO_FILES)
    readme = (tmp_path / "README.md").read_text()
    assert "python -m multimodal.train demo --out weights/demo --seed 1" in readme and "gates zeroed" in readme
    assert all(is_trainable(k) for k in read_adapter(tmp_path / "adapter.pth").state)
    loaded = load_model(tmp_path, tmp_path / "tokenizer.model", tmp_path / "clip.pt", tmp_path / "adapter.pth",
                        preset="demo", device="cpu", dtype="float32", bgr=False)
    assert loaded.tokenizer.n_words == loaded.config.llama.vocab_size
