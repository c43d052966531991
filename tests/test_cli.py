"""python -m multimodal end to end, in a subprocess, on tiny model files."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from conftest import REPO_ROOT, fixture_path
from multimodal.config import build_preset
from tiny import write_official_adapter


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "multimodal", *args], cwd=REPO_ROOT, capture_output=True, text=True,
                          timeout=300)


def test_cli_streams_an_answer_about_an_image(tiny_files: dict[str, Path], tmp_path: Path) -> None:
    write_official_adapter(tmp_path / "adapter.pth", build_preset("tiny"), lora_rank=2)
    out = run("What is in the image?", "--image", str(fixture_path("images/bus.jpg")), "--preset", "tiny",
              "--llama-dir", str(tiny_files["llama_dir"]), "--tokenizer", str(tiny_files["tokenizer_path"]),
              "--clip", str(tiny_files["clip_path"]), "--adapter", str(tmp_path / "adapter.pth"),
              "--max-new-tokens", "12", "--temperature", "0", "--device", "cpu")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip()  # random weights: some text, whatever it says
    assert "tokens/s" in out.stderr and "12 tokens" in out.stderr


def test_cli_names_the_missing_file_and_the_fetch_command(tmp_path: Path) -> None:
    out = run("hi", "--weights-dir", str(tmp_path), "--model", "official", "--adapter", "none")
    assert out.returncode == 2
    assert "params.json" in out.stderr and "python -m weights" in out.stderr and "link llama-7b" in out.stderr


def test_cli_rejects_a_broken_image(tiny_files: dict[str, Path], tmp_path: Path) -> None:
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    out = run("hi", "--image", str(tmp_path / "broken.jpg"), "--preset", "tiny", "--adapter", "none",
              "--llama-dir", str(tiny_files["llama_dir"]), "--clip", str(tiny_files["clip_path"]))
    assert out.returncode == 2 and "not an image" in out.stderr
