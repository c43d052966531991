"""The shipped manifest: every artifact the issue lists, with checksums that agree with their sources."""
from __future__ import annotations

import hashlib
import importlib.util
import json
from pathlib import Path, PurePosixPath

import pytest

from tests.conftest import fixture_path
from weights import ManifestError, artifact, load_manifest
from weights.manifest import parse_manifest

EXPECTED = {
    "llama-7b", "clip-vit-l-14", "llama-adapter-bias-7b", "llama-adapter-lora-bias-7b",
    "llama-adapter-caption-7b", "llama-adapter-lora-bias-7b-v21", "easyocr-craft",
    "easyocr-english-g2", "yolov8n",
}


def test_manifest_lists_every_artifact_with_licence_and_component() -> None:
    manifest = load_manifest()
    assert set(manifest.artifacts) == EXPECTED
    for art in manifest:
        assert art.licence and art.component and art.title
        for f in art.files:
            assert not PurePosixPath(f.path).is_absolute()
            # an entry either says how it is checked or its notes say why it cannot be
            assert f.has_checksum or "checksum" in art.notes


def test_llama_layout_and_no_url() -> None:
    llama = artifact("llama-7b")
    assert [f.path for f in llama.files] == [
        "llama-7b/params.json", "llama-7b/consolidated.00.pth", "llama-7b/tokenizer.model"]
    assert not llama.fetchable and "Meta" in llama.obtain


def test_llama_params_json_checksums_match_the_7b_config() -> None:
    """Meta's 7B params.json, written the way Meta wrote it, must hash to the manifest's values."""
    params = {"dim": 4096, "multiple_of": 256, "n_heads": 32, "n_layers": 32, "norm_eps": 1e-06, "vocab_size": -1}
    data = json.dumps(params).encode()
    entry = artifact("llama-7b").files[0]
    assert (len(data), hashlib.sha256(data).hexdigest(), hashlib.md5(data).hexdigest()) == (
        entry.size, entry.sha256, entry.md5)


def test_llama_tokenizer_checksums_match_the_real_file() -> None:
    data = fixture_path("llama/tokenizer.model").read_bytes()
    entry = artifact("llama-7b").files[2]
    assert (len(data), hashlib.sha256(data).hexdigest(), hashlib.md5(data).hexdigest()) == (
        entry.size, entry.sha256, entry.md5)


@pytest.mark.parametrize("name", [n for n in sorted(EXPECTED) if n.startswith("llama-adapter")])
def test_adapter_sha256_is_the_release_file_name_prefix(name: str) -> None:
    [f] = artifact(name).files
    assert f.path.startswith("llama-adapter/") and f.url.endswith("/" + f.filename)
    assert f.filename.split("_", 1)[0] == f.sha256


def test_clip_sha256_is_the_one_in_openai_url() -> None:
    [f] = artifact("clip-vit-l-14").files
    assert f.path == "clip-vit-l-14/ViT-L-14.pt" and f.url.split("/")[-2] == f.sha256


def test_easyocr_entries_match_the_installed_package() -> None:
    """Same folder, EasyOCR's file names, and the url/md5 from easyocr's own config.py."""
    spec = importlib.util.find_spec("easyocr")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("easyocr is not installed")
    config_path = Path(list(spec.submodule_search_locations)[0]) / "config.py"
    config_spec = importlib.util.spec_from_file_location("easyocr_config_only", config_path)
    config = importlib.util.module_from_spec(config_spec)
    config_spec.loader.exec_module(config)  # config.py only imports os; easyocr itself stays unloaded
    expected = {
        "easyocr-craft": config.detection_models["craft"],
        "easyocr-english-g2": config.recognition_models["gen2"]["english_g2"],
    }
    for name, meta in expected.items():
        [f] = artifact(name).files
        assert f.path == f"easyocr/{meta['filename']}" and f.archive_member == meta["filename"]
        assert (f.url, f.md5) == (meta["url"], meta["md5sum"])


def test_yolo_entry() -> None:
    [f] = artifact("yolov8n").files
    assert f.path == "yolo/yolov8n.pt" and f.url.startswith("https://github.com/ultralytics/assets/releases/")
    assert "AGPL-3.0" in artifact("yolov8n").licence


@pytest.mark.parametrize("bad, message", [
    ({"artifact": [{"name": "x", "title": "t", "component": "c", "licence": "l",
                    "file": [{"path": "../escape.bin"}]}]}, "inside the weights folder"),
    ({"artifact": [{"name": "x", "title": "t", "component": "c", "licence": "l",
                    "file": [{"path": "a.bin", "sha256": "abc"}]}]}, "64 lowercase hex"),
    ({"artifact": [{"name": "x", "title": "t", "component": "c", "licence": "l", "file": []}]}, "no \\[\\[artifact.file"),
    ({"artifact": [{"name": "x", "component": "c", "licence": "l", "file": [{"path": "a"}]}]}, "missing 'title'"),
])
def test_malformed_manifest_is_rejected_with_the_reason(bad: dict, message: str) -> None:
    with pytest.raises(ManifestError, match=message):
        parse_manifest(bad)
