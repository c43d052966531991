"""Shared test helpers: where the real fixtures live, and skipping when one is absent."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
FIXTURES = Path(os.environ.get("MM_FIXTURES", REPO_ROOT.parent / "shared" / "fixtures"))


def fixture_path(relative: str) -> Path:
    """Path of a file under ../shared/fixtures; skips the test, naming the file, when it is absent."""
    path = FIXTURES / relative
    if not path.exists():
        pytest.skip(f"fixture file missing: {path} (set MM_FIXTURES to the fixtures folder)")
    return path


@pytest.fixture
def fixtures() -> Path:
    return FIXTURES


# --- tiny models in the real file formats, built once per test session --------------------------------


@pytest.fixture(scope="session")
def tiny_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A Meta LLaMA directory, an OpenAI-format CLIP file and a SentencePiece tokenizer, all tiny and
    random, shaped for the ``tiny`` presets."""
    from multimodal.config import TINY_CLIP, TINY_LLAMA
    from tiny import train_tokenizer, write_meta_dir, write_openai_clip

    root = tmp_path_factory.mktemp("tiny")
    tokenizer = train_tokenizer(root / "tokenizer.model", vocab_size=TINY_LLAMA.vocab_size)
    write_meta_dir(root / "llama", TINY_LLAMA, seed=0, vocab_in_params=False)
    write_openai_clip(root / "clip.pt", TINY_CLIP, seed=0)
    return {"llama_dir": root / "llama", "tokenizer_path": tokenizer, "clip_path": root / "clip.pt", "root": root}
