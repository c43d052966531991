"""Locating weights: the weights folder, `require`'s errors, `status`, `link` and the .gitignore."""
from __future__ import annotations

import hashlib
import io
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from weights import (
    CorruptWeightError,
    LinkError,
    MissingWeightError,
    easyocr_reader_kwargs,
    link_artifact,
    load_manifest,
    require,
    weights_dir,
)
from weights.cli import main
from weights.store import DEFAULT_WEIGHTS_DIR

REPO = Path(__file__).resolve().parents[1]
PARAMS = b'{"dim": 64}'
MODEL = bytes(range(256)) * 40
TOKENIZER = b"sentencepiece-ish"


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture
def manifest_file(tmp_path: Path) -> Path:
    """A small manifest shaped like the real one: a URL-less 3-file model and a single file."""
    path = tmp_path / "manifest.toml"
    path.write_text(f"""
[[artifact]]
name = "tiny-llama"
title = "Tiny LLaMA"
component = "language model"
licence = "research only"
link_search = [".", "7B", ".."]
obtain = "Ask the publisher for a copy."
[[artifact.file]]
path = "tiny-llama/params.json"
size = {len(PARAMS)}
sha256 = "{sha(PARAMS)}"
[[artifact.file]]
path = "tiny-llama/consolidated.00.pth"
size = {len(MODEL)}
sha256 = "{sha(MODEL)}"
lookalikes = {{ "{len(MODEL) + 1}" = "the version 2 model" }}
[[artifact.file]]
path = "tiny-llama/tokenizer.model"
sha256 = "{sha(TOKENIZER)}"

[[artifact]]
name = "encoder"
title = "Tiny encoder"
component = "visual encoder"
licence = "MIT"
[[artifact.file]]
path = "enc/encoder.pt"
url = "http://127.0.0.1:9/encoder.pt"
size = 4
sha256 = "{sha(b'good')}"

[[artifact]]
name = "detector"
title = "Detector without checksum"
component = "object detection expert"
licence = "AGPL-3.0"
[[artifact.file]]
path = "det/det.pt"
url = "http://127.0.0.1:9/det.pt"
""")
    return path


@pytest.fixture
def meta_copy(tmp_path: Path) -> Path:
    """The user's own download in Meta's layout: LLaMA/7B/{params,consolidated}, LLaMA/tokenizer.model."""
    top = tmp_path / "downloads" / "LLaMA"
    (top / "7B").mkdir(parents=True)
    (top / "7B" / "params.json").write_bytes(PARAMS)
    (top / "7B" / "consolidated.00.pth").write_bytes(MODEL)
    (top / "tokenizer.model").write_bytes(TOKENIZER)
    return top


def run(*argv: str) -> tuple[int, str]:
    out = io.StringIO()
    code = main(list(argv), out=out)
    return code, out.getvalue()


def states(table: str) -> dict[str, str]:
    """NAME -> STATE from the status table."""
    rows = {}
    for line in table.splitlines():
        cells = line.split()
        if len(cells) >= 3 and cells[0] in ("tiny-llama", "encoder", "detector"):
            rows[cells[0]] = next(c for c in cells if c in ("present", "missing", "corrupt", "linked"))
    return rows


# --- weights folder -------------------------------------------------------------------------

def test_weights_dir_precedence(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("MM_WEIGHTS_DIR", raising=False)
    assert weights_dir() == DEFAULT_WEIGHTS_DIR == REPO / "weights"
    monkeypatch.setenv("MM_WEIGHTS_DIR", str(tmp_path / "env"))
    assert weights_dir() == tmp_path / "env"
    assert weights_dir(tmp_path / "flag") == tmp_path / "flag"


# --- require --------------------------------------------------------------------------------

def test_require_missing_file_names_it_and_the_fetch_command(
    manifest_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = tmp_path / "w"
    monkeypatch.setenv("MM_WEIGHTS_DIR", str(root))
    monkeypatch.setenv("MM_WEIGHTS_MANIFEST", str(manifest_file))
    with pytest.raises(MissingWeightError) as info:
        require("encoder")
    err = info.value
    assert isinstance(err, FileNotFoundError)
    assert err.artifact == "encoder" and err.path == root / "enc" / "encoder.pt"
    assert err.command == "python -m weights fetch encoder"
    assert "encoder.pt" in str(err) and err.command in str(err) and "visual encoder" in str(err)


def test_require_without_url_points_to_link_and_how_to_obtain(manifest_file: Path, tmp_path: Path) -> None:
    with pytest.raises(MissingWeightError) as info:
        require("tiny-llama", tmp_path / "w", manifest_file)
    message = str(info.value)
    assert "params.json" in message and "link tiny-llama" in message and "Ask the publisher" in message
    assert f"--dir {tmp_path / 'w'}" in info.value.command  # not the default folder: the command says which


def test_real_manifest_errors_name_file_and_command(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MM_WEIGHTS_DIR", str(tmp_path))
    monkeypatch.delenv("MM_WEIGHTS_MANIFEST", raising=False)
    with pytest.raises(MissingWeightError) as clip:
        require("clip-vit-l-14")
    assert "ViT-L-14.pt" in str(clip.value) and "python -m weights fetch clip-vit-l-14" in str(clip.value)
    with pytest.raises(MissingWeightError) as llama:
        require("llama-7b")
    assert "python -m weights link llama-7b /path/to/LLaMA" in str(llama.value) and "Meta" in str(llama.value)


def test_the_printed_command_really_fixes_the_problem(
    manifest_file: Path, meta_copy: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = tmp_path / "w"
    monkeypatch.setenv("MM_WEIGHTS_MANIFEST", str(manifest_file))
    with pytest.raises(MissingWeightError) as info:
        require("tiny-llama", root)
    argv = shlex.split(info.value.command)
    assert argv[:3] == ["python", "-m", "weights"] and argv[-3:-1] == ["link", "tiny-llama"]
    argv[-1] = str(meta_copy)  # the placeholder the user replaces with where their copy is
    assert main(argv[3:], out=io.StringIO()) == 0
    assert require("tiny-llama", root) == root / "tiny-llama"


def test_require_returns_file_or_folder(manifest_file: Path, tmp_path: Path, meta_copy: Path) -> None:
    root = tmp_path / "w"
    (root / "enc").mkdir(parents=True)
    (root / "enc" / "encoder.pt").write_bytes(b"good")
    assert require("encoder", root, manifest_file) == root / "enc" / "encoder.pt"
    link_artifact(load_manifest(manifest_file).get("tiny-llama"), meta_copy, root, progress=None)
    assert require("tiny-llama", root, manifest_file) == root / "tiny-llama"


def test_require_rejects_wrong_size_and_names_lookalike(manifest_file: Path, tmp_path: Path) -> None:
    root = tmp_path / "w"
    (root / "tiny-llama").mkdir(parents=True)
    (root / "tiny-llama" / "params.json").write_bytes(PARAMS)
    (root / "tiny-llama" / "consolidated.00.pth").write_bytes(MODEL + b"!")
    with pytest.raises(CorruptWeightError) as info:
        require("tiny-llama", root, manifest_file)
    assert "consolidated.00.pth" in str(info.value) and "the version 2 model" in str(info.value)


# --- status ---------------------------------------------------------------------------------

def test_status_reports_present_missing_and_corrupt(manifest_file: Path, tmp_path: Path) -> None:
    root = tmp_path / "w"
    base = ["--dir", str(root), "--manifest", str(manifest_file)]
    code, out = run(*base, "status")
    assert code == 0 and states(out) == {"tiny-llama": "missing", "encoder": "missing", "detector": "missing"}
    assert "python -m weights --dir" in out and "fetch encoder" in out

    (root / "enc").mkdir(parents=True)
    (root / "enc" / "encoder.pt").write_bytes(b"good")
    (root / "det").mkdir()
    (root / "det" / "det.pt").write_bytes(b"anything")
    assert states(run(*base, "status")[1]) == {"tiny-llama": "missing", "encoder": "present", "detector": "present"}

    (root / "enc" / "encoder.pt").write_bytes(b"evil")  # right size, wrong bytes
    assert states(run(*base, "status")[1])["encoder"] == "present"  # fast mode checks sizes only
    code, out = run(*base, "status", "--hash")
    assert states(out)["encoder"] == "corrupt" and "sha256" in out and "fetch encoder --force" in out
    code, out = run(*base, "verify", "encoder")
    assert code == 1 and "CORRUPT" in out

    (root / "enc" / "encoder.pt").write_bytes(b"too long")  # wrong size: corrupt even without hashing
    code, out = run(*base, "status")
    assert states(out)["encoder"] == "corrupt" and "size 8 bytes, expected 4" in out


# --- link -----------------------------------------------------------------------------------

@pytest.mark.parametrize("where", ["top", "7B"])
def test_link_uses_meta_layout_without_copying(
    manifest_file: Path, tmp_path: Path, meta_copy: Path, where: str
) -> None:
    root = tmp_path / "w"
    source = meta_copy if where == "top" else meta_copy / "7B"
    code, out = run("--dir", str(root), "--manifest", str(manifest_file), "link", "tiny-llama", str(source))
    assert code == 0 and "no files were copied" in out
    for name, original in [("params.json", meta_copy / "7B" / "params.json"),
                           ("consolidated.00.pth", meta_copy / "7B" / "consolidated.00.pth"),
                           ("tokenizer.model", meta_copy / "tokenizer.model")]:
        linked = root / "tiny-llama" / name
        assert linked.is_symlink() and Path(os.readlink(linked)) == original
        assert linked.stat().st_ino == original.stat().st_ino  # the same file, not a copy
    _, table = run("--dir", str(root), "--manifest", str(manifest_file), "status")
    assert states(table)["tiny-llama"] == "linked"
    assert run("--dir", str(root), "--manifest", str(manifest_file), "verify", "tiny-llama")[0] == 0


def test_link_refuses_wrong_files_and_links_nothing(manifest_file: Path, tmp_path: Path, meta_copy: Path) -> None:
    (meta_copy / "tokenizer.model").write_bytes(b"another tokenizer")
    root = tmp_path / "w"
    with pytest.raises(LinkError, match="tokenizer.model.*sha256.*Nothing was linked"):
        link_artifact(load_manifest(manifest_file).get("tiny-llama"), meta_copy, root, progress=None)
    assert not (root / "tiny-llama").exists()


def test_link_reports_missing_file_and_where_it_looked(manifest_file: Path, tmp_path: Path, meta_copy: Path) -> None:
    (meta_copy / "7B" / "params.json").unlink()
    code = main(["--dir", str(tmp_path / "w"), "--manifest", str(manifest_file),
                 "link", "tiny-llama", str(meta_copy)], out=io.StringIO())
    assert code == 1
    with pytest.raises(LinkError, match="params.json not found; looked at"):
        link_artifact(load_manifest(manifest_file).get("tiny-llama"), meta_copy, tmp_path / "w", progress=None)


def test_link_does_not_overwrite_a_real_file_without_force(manifest_file: Path, tmp_path: Path) -> None:
    mine = tmp_path / "elsewhere" / "encoder.pt"
    mine.parent.mkdir()
    mine.write_bytes(b"good")
    root = tmp_path / "w"
    (root / "enc").mkdir(parents=True)
    (root / "enc" / "encoder.pt").write_bytes(b"bad!")
    art = load_manifest(manifest_file).get("encoder")
    with pytest.raises(LinkError, match="--force"):
        link_artifact(art, mine, root, progress=None)
    assert (root / "enc" / "encoder.pt").read_bytes() == b"bad!"
    link_artifact(art, mine, root, force=True, progress=None)
    assert (root / "enc" / "encoder.pt").is_symlink() and require("encoder", root, manifest_file).read_bytes() == b"good"


def test_broken_link_counts_as_missing(manifest_file: Path, tmp_path: Path) -> None:
    mine = tmp_path / "encoder.pt"
    mine.write_bytes(b"good")
    root = tmp_path / "w"
    link_artifact(load_manifest(manifest_file).get("encoder"), mine, root, progress=None)
    mine.unlink()  # the user moved their copy away
    with pytest.raises(MissingWeightError, match="broken link"):
        require("encoder", root, manifest_file)


# --- libraries that would download on their own ----------------------------------------------

def test_easyocr_kwargs_use_our_folder_and_disable_downloads(tmp_path: Path) -> None:
    with pytest.raises(MissingWeightError, match="craft_mlt_25k.pth.*fetch easyocr-craft"):
        easyocr_reader_kwargs(tmp_path)
    (tmp_path / "easyocr").mkdir()
    for name in ("craft_mlt_25k.pth", "english_g2.pth"):
        (tmp_path / "easyocr" / name).write_bytes(b"x")
    kwargs = easyocr_reader_kwargs(tmp_path)
    assert kwargs["download_enabled"] is False and kwargs["model_storage_directory"] == str(tmp_path / "easyocr")


# --- git ------------------------------------------------------------------------------------

def test_gitignore_keeps_weights_out_and_code_in() -> None:
    if shutil.which("git") is None or not (REPO / ".git").exists():
        pytest.skip("not a git checkout")

    def ignored(rel: str) -> bool:
        return subprocess.run(["git", "check-ignore", "-q", rel], cwd=REPO).returncode == 0

    assert ignored("weights/clip-vit-l-14/ViT-L-14.pt")
    assert ignored("weights/llama-7b/consolidated.00.pth")
    assert ignored("weights/llama-adapter/x_BIAS-7B.pth.part")
    assert not ignored("weights/manifest.toml")
    assert not ignored("weights/fetch.py")
    assert not ignored("weights/demo/model.pt")
    assert not ignored("weights/demo/sub/config.json")


def test_python_dash_m_weights_status_runs_on_an_empty_folder(tmp_path: Path) -> None:
    """What a fresh clone shows: every artifact listed, all missing, with the commands to fix it."""
    env = {**os.environ, "MM_WEIGHTS_DIR": str(tmp_path)}
    env.pop("MM_WEIGHTS_MANIFEST", None)
    done = subprocess.run([sys.executable, "-m", "weights", "status"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    for name in ("llama-7b", "clip-vit-l-14", "llama-adapter-lora-bias-7b-v21", "easyocr-craft", "yolov8n"):
        assert any(line.startswith(name + " ") and " missing " in line for line in done.stdout.splitlines())
    assert "python -m weights fetch clip-vit-l-14" in done.stdout
    assert "python -m weights link llama-7b /path/to/LLaMA" in done.stdout
