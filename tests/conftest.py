"""Shared test helpers: where the real fixtures live, and skipping when one is absent."""
from __future__ import annotations

from types import ModuleType

import contextlib
import os
import socket
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

# Libraries that phone home (huggingface_hub's telemetry and agent detection, used by gradio_client)
# are told the machine is offline before any of them is imported; the guard below catches the rest.
for _var in ("HF_HUB_OFFLINE", "HF_HUB_DISABLE_TELEMETRY", "DO_NOT_TRACK"):
    os.environ.setdefault(_var, "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

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


@pytest.fixture(scope="session")
def tiny_adapter(tmp_path_factory: pytest.TempPathFactory) -> Callable[[int, int], Path]:
    """(LoRA rank, seed) -> a random adapter for the ``tiny`` preset in the released files' format,
    written once per session."""
    from multimodal.config import build_preset
    from tiny import write_official_adapter

    root = tmp_path_factory.mktemp("adapters")

    def make(lora_rank: int, seed: int) -> Path:
        path = root / f"lora{lora_rank}-seed{seed}.pth"
        if not path.exists():
            write_official_adapter(path, build_preset("tiny"), lora_rank=lora_rank, seed=seed)
        return path

    return make


# --- no test touches the internet ------------------------------------------------------------------------


def _is_local(host: object) -> bool:
    return host in (None, "", "localhost", "::1") or str(host).startswith("127.")


@pytest.fixture(scope="session", autouse=True)
def no_network() -> Iterator[list[object]]:
    """Refuse, and record, every non-loopback connection or DNS lookup for the whole suite; the
    session fails at the end if anything tried (a library phoning home is a bug here)."""
    attempts: list[object] = []

    def record(target: object) -> None:  # where it came from, so the failure names the culprit
        frames = [f"{f.filename.split('site-packages/')[-1]}:{f.lineno}" for f in traceback.extract_stack()[-24:-2]]
        attempts.append((target, os.environ.get("PYTEST_CURRENT_TEST", "?"), frames))

    real_connect, real_connect_ex, real_gai = socket.socket.connect, socket.socket.connect_ex, socket.getaddrinfo

    def connect(self: socket.socket, address: object) -> None:
        if isinstance(address, tuple) and not _is_local(address[0]):
            record(address)
            raise OSError(f"network disabled in tests: connect to {address}")
        return real_connect(self, address)

    def connect_ex(self: socket.socket, address: object) -> int:
        if isinstance(address, tuple) and not _is_local(address[0]):
            record(address)
            return 111  # ECONNREFUSED
        return real_connect_ex(self, address)

    def getaddrinfo(host: object, *args: object, **kwargs: object) -> list:
        if not _is_local(host):
            record(host)
            raise socket.gaierror(f"network disabled in tests: lookup of {host}")
        return real_gai(host, *args, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(socket.socket, "connect", connect)
        mp.setattr(socket.socket, "connect_ex", connect_ex)
        mp.setattr(socket, "getaddrinfo", getaddrinfo)
        yield attempts
    assert not attempts, f"network access was attempted: {attempts}"


# --- the app on a local server ----------------------------------------------------------------------------


@contextlib.contextmanager
def serve_app(app: object, api: object | None = None) -> Iterator[str]:
    """The chat page for ``app`` (an app.chat.ChatApp) on 127.0.0.1 at a free port; yields its URL.
    With ``api`` (app.openai_api.ApiSettings) the OpenAI-compatible routes are served too."""
    from app.ui import build_demo, page_assets

    demo = build_demo(app)
    demo.queue(default_concurrency_limit=2)
    routes = None
    if api is not None:
        from app.openai_api import api_routes

        routes = {"routes": api_routes(app, api)}  # type: ignore[arg-type]
    _, url, _ = demo.launch(server_name="127.0.0.1", server_port=None, prevent_thread_lock=True, quiet=True,
                            run_history=False, app_kwargs=routes, **page_assets())
    try:
        yield url
    finally:
        demo.close()


def load_script(name: str) -> "ModuleType":
    """scripts/NAME.py as a module, for tests of a script's functions (scripts/ is not a package)."""
    import importlib.util
    import sys

    spec = importlib.util.spec_from_file_location(name, REPO_ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module
