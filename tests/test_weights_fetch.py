"""`fetch` against a local HTTP server on 127.0.0.1: progress, verification, resume, offline.

No test here reaches the internet: an autouse guard refuses every connection that is not to
the loopback interface.
"""
from __future__ import annotations

import hashlib
import io
import random
import socket
import threading
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from weights import ChecksumError, FetchError, InterruptedDownload, OfflineError, fetch_artifact, load_manifest
from weights.cli import main

BLOB = random.Random(0).randbytes(300_000)
SMALL = random.Random(1).randbytes(50_000)


class FileServer(ThreadingHTTPServer):
    """Serves `files` with Range support; can cut a transfer half-way or ignore Range once."""

    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), Handler)
        self.files: dict[str, bytes] = {}
        self.cut_next: set[str] = set()  # paths whose next transfer stops half-way
        self.ignore_range: set[str] = set()  # paths served whole even when a Range is asked
        self.log: list[tuple[str, str | None, int]] = []  # (path, Range header, bytes sent)

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class Handler(BaseHTTPRequestHandler):
    server: FileServer

    def do_GET(self) -> None:  # noqa: N802 (http.server naming)
        data = self.server.files.get(self.path)
        rng = self.headers.get("Range")
        if data is None:
            self.send_error(404)
            self.server.log.append((self.path, rng, 0))
            return
        start = 0
        if rng and self.path not in self.server.ignore_range:
            start = int(rng.removeprefix("bytes=").split("-")[0])
            if start >= len(data):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(data)}")
                self.end_headers()
                self.server.log.append((self.path, rng, 0))
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            self.send_response(200)
        body = data[start:]
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.path in self.server.cut_next:
            self.server.cut_next.discard(self.path)
            body = body[: len(body) // 2]  # promised more than we send, then hang up
            self.close_connection = True
        self.wfile.write(body)
        self.server.log.append((self.path, rng, len(body)))

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def server():
    srv = FileServer()
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()


def _zip_bytes(member: str, payload: bytes) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr(member, payload)
    return buf.getvalue()


def closed_port() -> int:
    """A port on 127.0.0.1 that nothing listens on, so a connection is refused."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_manifest(path: Path, base: str) -> Path:
    sha = hashlib.sha256(BLOB).hexdigest()
    path.write_text(f"""
[[artifact]]
name = "blob"
title = "Test blob"
component = "test loader"
licence = "CC0"
[[artifact.file]]
path = "blobs/blob.bin"
url = "{base}/blob.bin"
size = {len(BLOB)}
sha256 = "{sha}"

[[artifact]]
name = "bad"
title = "Blob with a wrong checksum"
component = "test loader"
licence = "CC0"
[[artifact.file]]
path = "bad/bad.bin"
url = "{base}/bad.bin"
sha256 = "{'0' * 64}"

[[artifact]]
name = "zipped"
title = "Zipped model"
component = "OCR test"
licence = "CC0"
[[artifact.file]]
path = "ocr/model.pth"
url = "{base}/model.zip"
archive_member = "model.pth"
md5 = "{hashlib.md5(SMALL).hexdigest()}"

[[artifact]]
name = "zipped-bad"
title = "Zipped model, wrong md5"
component = "OCR test"
licence = "CC0"
[[artifact.file]]
path = "ocr/other.pth"
url = "{base}/model.zip"
archive_member = "model.pth"
md5 = "{'f' * 32}"

[[artifact]]
name = "nosum"
title = "File without published checksum"
component = "detector test"
licence = "AGPL-3.0"
[[artifact.file]]
path = "yolo/n.pt"
url = "{base}/small.bin"

[[artifact]]
name = "gone"
title = "404 on the server"
component = "test loader"
licence = "CC0"
[[artifact.file]]
path = "gone/x.bin"
url = "{base}/does-not-exist.bin"

[[artifact]]
name = "unreachable"
title = "Server down"
component = "test loader"
licence = "CC0"
[[artifact.file]]
path = "down/x.bin"
url = "http://127.0.0.1:{closed_port()}/x.bin"
""")
    return path


@pytest.fixture
def env(server: FileServer, tmp_path: Path):
    server.files.update({
        "/blob.bin": BLOB,
        "/bad.bin": SMALL,
        "/model.zip": _zip_bytes("model.pth", SMALL),
        "/small.bin": SMALL,
    })
    manifest = load_manifest(write_manifest(tmp_path / "manifest.toml", server.base))
    root = tmp_path / "weights"
    return server, manifest, root


def test_fetch_downloads_with_progress_bar_and_verifies(env) -> None:
    server, manifest, root = env
    bar = io.StringIO()
    [result] = fetch_artifact(manifest.get("blob"), root, progress=bar)
    dest = root / "blobs" / "blob.bin"
    assert result.action == "downloaded" and result.checked == "sha256"
    assert dest.read_bytes() == BLOB
    assert sorted(p.name for p in dest.parent.iterdir()) == ["blob.bin"]  # no .part left behind
    assert "blob.bin" in bar.getvalue() and "100%" in bar.getvalue()
    # asking again does not touch the network
    requests = len(server.log)
    [again] = fetch_artifact(manifest.get("blob"), root, progress=None)
    assert again.action == "already present" and len(server.log) == requests


def test_fetch_resumes_after_interrupted_transfer(env) -> None:
    server, manifest, root = env
    server.cut_next.add("/blob.bin")
    with pytest.raises(InterruptedDownload, match="run the same command again to resume"):
        fetch_artifact(manifest.get("blob"), root, retries=0, progress=None)
    dest, part = root / "blobs" / "blob.bin", root / "blobs" / "blob.bin.part"
    assert not dest.exists()
    half = len(BLOB) // 2
    assert part.stat().st_size == half

    [result] = fetch_artifact(manifest.get("blob"), root, progress=None)
    assert result.action == "downloaded" and dest.read_bytes() == BLOB and not part.exists()
    path, rng, sent = server.log[-1]
    assert rng == f"bytes={half}-" and sent == len(BLOB) - half  # only the rest was transferred


def test_fetch_retries_and_resumes_within_one_call(env) -> None:
    server, manifest, root = env
    server.cut_next.add("/blob.bin")
    out = io.StringIO()
    fetch_artifact(manifest.get("blob"), root, retries=2, retry_wait=0, progress=out)
    assert (root / "blobs" / "blob.bin").read_bytes() == BLOB
    assert [r for _, r, _ in server.log] == [None, f"bytes={len(BLOB) // 2}-"]
    assert "resuming" in out.getvalue()


def test_fetch_restarts_when_server_ignores_range(env) -> None:
    server, manifest, root = env
    part = root / "blobs" / "blob.bin.part"
    part.parent.mkdir(parents=True)
    part.write_bytes(b"x" * 1000)  # junk that a Range-less server forces us to discard
    server.ignore_range.add("/blob.bin")
    fetch_artifact(manifest.get("blob"), root, progress=None)
    assert (root / "blobs" / "blob.bin").read_bytes() == BLOB


def test_fetch_rejects_sha256_mismatch_and_leaves_nothing(env) -> None:
    _, manifest, root = env
    with pytest.raises(ChecksumError) as info:
        fetch_artifact(manifest.get("bad"), root, progress=None)
    message = str(info.value)
    assert "sha256" in message and "0" * 64 in message and "nothing was installed" in message
    assert list((root / "bad").iterdir()) == []  # neither the file nor a .part


def test_fetch_unpacks_zip_member_and_verifies_md5(env) -> None:
    _, manifest, root = env
    [result] = fetch_artifact(manifest.get("zipped"), root, progress=None)
    assert result.checked == "md5"
    assert (root / "ocr" / "model.pth").read_bytes() == SMALL
    assert sorted(p.name for p in (root / "ocr").iterdir()) == ["model.pth"]  # zip removed


def test_fetch_zip_with_wrong_md5_leaves_nothing(env) -> None:
    _, manifest, root = env
    with pytest.raises(ChecksumError, match="md5"):
        fetch_artifact(manifest.get("zipped-bad"), root, progress=None)
    assert list((root / "ocr").iterdir()) == []


def test_fetch_without_checksum_reports_sha256(env, capsys: pytest.CaptureFixture[str]) -> None:
    _, manifest, root = env
    code = main(["--dir", str(root), "--manifest", str(manifest.source), "fetch", "nosum"])
    assert code == 0
    out = capsys.readouterr().out
    assert "no checksum in the manifest" in out and hashlib.sha256(SMALL).hexdigest() in out


def test_refused_connection_is_reported_offline_with_url(env, capsys: pytest.CaptureFixture[str]) -> None:
    _, manifest, root = env
    url = manifest.get("unreachable").files[0].url
    with pytest.raises(OfflineError) as info:
        fetch_artifact(manifest.get("unreachable"), root, progress=None)
    assert str(info.value).startswith("offline") and url in str(info.value)
    assert not (root / "down" / "x.bin").exists()

    code = main(["--dir", str(root), "--manifest", str(manifest.source), "fetch", "unreachable"])
    err = capsys.readouterr().err
    assert code == 1 and "offline" in err and url in err


def test_http_error_is_not_mistaken_for_offline(env) -> None:
    _, manifest, root = env
    with pytest.raises(FetchError, match="HTTP 404") as info:
        fetch_artifact(manifest.get("gone"), root, progress=None)
    assert not isinstance(info.value, OfflineError)


def test_cli_fetch_all_then_verify(env, capsys: pytest.CaptureFixture[str]) -> None:
    _, manifest, root = env
    base = ["--dir", str(root), "--manifest", str(manifest.source)]
    assert main([*base, "fetch", "blob", "zipped"]) == 0
    assert main([*base, "verify", "blob", "zipped"]) == 0
    out = capsys.readouterr().out
    assert "blobs/blob.bin (sha256 matches)" in out and "ocr/model.pth (md5 matches)" in out
