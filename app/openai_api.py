"""An OpenAI-compatible chat API on the page's own server: `POST /v1/chat/completions`, `GET /v1/models`.

Clients written for OpenAI's API (its Python client, curl scripts, chat front-ends) can ask the loaded
model about an image without learning Gradio's protocol. The routes are handed to Gradio's FastAPI app
at launch (`demo.launch(app_kwargs={"routes": api_routes(...)})`), so they share the page's process,
port, model and queue of waiting questions.

Every request goes through `ChatApp` exactly as the page's API does: a fresh `ChatSession` built from the
messages (the latest image, the earlier user/assistant turns as history), `prepare` (question checks and
the busy check) and `generate` (experts, prompt assembly, streaming). Only the wire format is new here.

Keys: with `--api-key` every request must send `Authorization: Bearer KEY`. Without one the API answers
only while the server is reachable from this machine alone (bound to loopback, no share link); the
page's login (`--auth`) is separate and does not cover these routes.
"""
from __future__ import annotations

import asyncio
import base64
import binascii
import hmac
import ipaddress
import json
import logging
import threading
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, StreamingResponse
from PIL import Image
from starlette.concurrency import run_in_threadpool
from starlette.routing import BaseRoute

from multimodal.generate import GenerationStats
from multimodal.image import ImageError, open_image

from .chat import ChatApp, ChatError, scrub_paths
from .state import ChatSession, Turn

log = logging.getLogger("app")

ROLES = ("system", "developer", "user", "assistant")  # system/developer text is not sent: the app has its own
MiB = 1 << 20


@dataclass
class ApiSettings:
    """Operator settings of the API (`python -m app --api-key/--api-fetch-images`)."""

    api_key: str | None = None
    host: str = "127.0.0.1"  # where the server listens: decides whether a key is required
    share: bool = False  # a share link makes even a loopback server public
    max_upload_bytes: int = 25 * MiB  # per image, decoded (the page's --max-upload-mb)
    fetch_images: bool = False  # allow http(s) image URLs, fetched by the server
    fetch_timeout_s: float = 10.0

    @property
    def private(self) -> bool:
        """Whether only this machine can reach the server."""
        if self.share:
            return False
        if self.host == "localhost":
            return True
        try:
            return ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            return False

    def warning(self) -> str | None:
        """The start-up warning for a public server without a key (its API then refuses everyone)."""
        if self.api_key or self.private:
            return None
        return ("the OpenAI-compatible API (/v1/chat/completions) is closed: the server is public "
                f"({'share link' if self.share else self.host}) and no key is set; start with --api-key KEY "
                "(or MM_API_KEY) to open it to clients that send 'Authorization: Bearer KEY'")


class ApiError(Exception):
    """An error in OpenAI's shape: {"error": {"message", "type", "code"}} with an HTTP status."""

    def __init__(self, status: int, message: str, code: str | None = None, type_: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.code = status, scrub_paths(message), code
        self.type = type_ or ("invalid_request_error" if status < 500 else "server_error")

    def response(self) -> JSONResponse:
        return JSONResponse({"error": self.body()}, status_code=self.status)

    def body(self) -> dict[str, Any]:
        return {"message": self.message, "type": self.type, "param": None, "code": self.code}


# ChatError messages (ChatApp's words) -> status and code; anything else is the request's fault (400).
_CHAT_ERRORS = (("The server is busy", 429, "rate_limit_exceeded", "rate_limit_error"),
                ("No model is loaded", 503, "model_not_loaded", "server_error"),
                ("out of memory", 503, "out_of_memory", "server_error"),
                ("Generation failed", 500, "generation_failed", "server_error"),
                ("characters long", 400, "context_length_exceeded", None),
                ("does not fit", 400, "context_length_exceeded", None),
                ("context holds", 400, "context_length_exceeded", None))


def from_chat_error(e: ChatError) -> ApiError:
    text = str(e.message if hasattr(e, "message") else e)
    for needle, status, code, type_ in _CHAT_ERRORS:
        if needle in text:
            return ApiError(status, text, code, type_)
    return ApiError(400, text)


# -- the request ------------------------------------------------------------------------------


@dataclass
class ChatRequest:
    """A chat completion request reduced to what ChatApp takes."""

    question: str
    history: list[tuple[str, str]]
    image_url: str | None  # the latest image in the conversation
    experts: list[str]
    temperature: float
    top_p: float
    max_tokens: int
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    stream: bool = False
    include_usage: bool = False


def _number(body: dict[str, Any], name: str, default: float, low: float, high: float, low_open: bool = False) -> float:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (
            (low < value if low_open else low <= value) and value <= high):
        side = "(" if low_open else "["
        raise ApiError(400, f"'{name}' must be a number in {side}{low}, {high}]; got {value!r}", "invalid_value")
    return float(value)


def _integer(body: dict[str, Any], name: str) -> int | None:
    value = body.get(name)
    if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
        raise ApiError(400, f"'{name}' must be an integer; got {value!r}", "invalid_value")
    return value


def _parts(content: Any, role: str, index: int) -> tuple[str, str | None]:
    """A message's text and its last image URL, from a string or a list of content parts."""
    if content is None or isinstance(content, str):
        return content or "", None
    if not isinstance(content, list):
        raise ApiError(400, f"messages[{index}].content must be a string or a list of parts")
    texts, image = [], None
    for part in content:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            texts.append(part["text"])
        elif kind == "image_url" and role == "user":
            url = part.get("image_url")
            url = url.get("url") if isinstance(url, dict) else url
            if not isinstance(url, str) or not url:
                raise ApiError(400, f"messages[{index}]: an image_url part needs {{'url': ...}}")
            image = url
        else:
            raise ApiError(400, f"messages[{index}]: unsupported content part {kind!r} for role {role!r} "
                                "(use 'text', and 'image_url' in user messages)")
    return "\n".join(texts), image


def parse_request(body: Any, app: ChatApp) -> ChatRequest:
    """Check a request body and fold its messages into question, history and image."""
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    n = _integer(body, "n")
    if n not in (None, 1):
        raise ApiError(400, f"'n' must be 1: this server writes one answer per request (got n={n})", "invalid_value")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "'messages' must be a non-empty list")
    history: list[tuple[str, str]] = []
    asked: list[str] = []  # user texts since the last assistant message
    image = None
    for i, m in enumerate(messages):
        role = m.get("role") if isinstance(m, dict) else None
        if role not in ROLES:
            raise ApiError(400, f"messages[{i}] has role {role!r}; this server accepts {', '.join(ROLES)}",
                           "invalid_role")
        text, url = _parts(m.get("content"), role, i)
        image = url or image
        if role == "user":
            asked.append(text)
        elif role == "assistant" and asked:
            history.append(("\n".join(asked), text))
            asked = []
    if messages[-1].get("role") != "user":
        raise ApiError(400, "the last message must be the user's question")
    experts = body.get("experts")
    if experts is None:
        available = app.expert_availability()
        experts = [e for e in app.config.default_experts if available.get(e, "missing") is None]
    elif not (isinstance(experts, list) and all(isinstance(e, str) for e in experts)):
        raise ApiError(400, "'experts' must be a list of expert names")
    unknown = [e for e in experts if e not in app.expert_names]
    if unknown:
        raise ApiError(400, f"unknown or not offered expert(s) {', '.join(unknown)}; this server offers "
                            f"{', '.join(app.expert_names) or 'none'}", "invalid_value")
    stop = body.get("stop")
    stop = [stop] if isinstance(stop, str) else (stop or [])
    if not (isinstance(stop, list) and all(isinstance(s, str) for s in stop)) or len(stop) > 4:
        raise ApiError(400, "'stop' must be a string or a list of up to 4 strings", "invalid_value")
    max_tokens = _integer(body, "max_completion_tokens")
    max_tokens = _integer(body, "max_tokens") if max_tokens is None else max_tokens
    if max_tokens is not None and max_tokens < 1:
        raise ApiError(400, "'max_tokens' must be at least 1", "invalid_value")
    options = body.get("stream_options") or {}
    return ChatRequest(
        question="\n".join(asked), history=history, image_url=image, experts=list(experts),
        temperature=_number(body, "temperature", 0.1, 0.0, 2.0), top_p=_number(body, "top_p", 0.75, 0.0, 1.0, True),
        max_tokens=max_tokens or app.config.default_max_new_tokens, stop=[s for s in stop if s],
        seed=_integer(body, "seed"), stream=bool(body.get("stream")),
        include_usage=bool(isinstance(options, dict) and options.get("include_usage")))


# -- the image --------------------------------------------------------------------------------


def load_image(url: str, settings: ApiSettings) -> Image.Image:
    """Decode a data URL (or, if the operator allows it, fetch an http(s) URL) with the page's checks."""
    if url.startswith(("http://", "https://")):
        if not settings.fetch_images:
            raise ApiError(400, "image URLs are not fetched by this server; send the image inline as "
                                "'data:image/png;base64,...' (the operator can allow URLs with --api-fetch-images)",
                           "image_url_not_allowed")
        data = _fetch(url, settings)
    elif url.startswith("data:"):
        head, comma, payload = url.partition(",")
        if not comma or not head.endswith(";base64"):
            raise ApiError(400, "an image data URL must look like 'data:image/png;base64,...'", "invalid_image")
        media = head[5:-7]
        if media and not media.startswith("image/"):
            raise ApiError(400, f"the data URL's type is {media!r}, not an image", "invalid_image")
        if len(payload) * 3 // 4 > settings.max_upload_bytes + 3:
            raise _too_large(len(payload) * 3 // 4, settings)
        try:
            data = base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError):
            raise ApiError(400, "the image data URL is not valid base64", "invalid_image") from None
    else:
        raise ApiError(400, "image_url must be a 'data:image/...;base64,' URL", "invalid_image")
    if len(data) > settings.max_upload_bytes:
        raise _too_large(len(data), settings)
    try:
        return open_image(data)
    except ImageError as e:
        status = 413 if "too large" in str(e) or "megapixels" in str(e) else 400
        raise ApiError(status, f"Cannot use this image: {e}.", "invalid_image") from None


def _size(n: int) -> str:
    return f"{n / MiB:.1f} MiB" if n >= MiB // 10 else f"{n / 1024:.0f} KiB"


def _too_large(size: int, settings: ApiSettings) -> ApiError:
    return ApiError(413, f"the image is {_size(size)}; this server takes images up to "
                         f"{_size(settings.max_upload_bytes)}", "image_too_large")


def _fetch(url: str, settings: ApiSettings) -> bytes:
    """Download an image with the upload cap and a timeout; reads no more than the cap allows."""
    import httpx

    try:
        with httpx.Client(timeout=settings.fetch_timeout_s, follow_redirects=True, max_redirects=3) as client:
            with client.stream("GET", url) as response:
                if response.status_code != 200:
                    raise ApiError(400, f"fetching the image URL gave HTTP {response.status_code}", "image_fetch_failed")
                data = bytearray()
                for chunk in response.iter_bytes():
                    data += chunk
                    if len(data) > settings.max_upload_bytes:
                        raise _too_large(len(data), settings)
                return bytes(data)
    except httpx.HTTPError as e:
        raise ApiError(400, f"could not fetch the image URL ({type(e).__name__})", "image_fetch_failed") from None


# -- answering --------------------------------------------------------------------------------


class StopScanner:
    """Cuts streamed text at the first stop string, holding back a tail that may begin one."""

    def __init__(self, stops: list[str]) -> None:
        self.stops, self.pending, self.stopped = stops, "", False

    def push(self, piece: str) -> str:
        """Text that is safe to send now."""
        if self.stopped:
            return ""
        text = self.pending + piece
        hits = [i for i in (text.find(s) for s in self.stops) if i >= 0]
        if hits:
            self.stopped, self.pending = True, ""
            return text[:min(hits)]
        keep = 0
        for s in self.stops:
            keep = max(keep, next((k for k in range(min(len(s) - 1, len(text)), 0, -1) if text.endswith(s[:k])), 0))
        self.pending = text[len(text) - keep:]
        return text[:len(text) - keep]

    def flush(self) -> str:
        out, self.pending = self.pending, ""
        return out


@dataclass
class Answer:
    """What a finished request reports besides its text."""

    finish_reason: str = "stop"
    usage: dict[str, int] = field(default_factory=dict)
    context: str = ""
    experts: dict[str, str] = field(default_factory=dict)


class Completion:
    """One request through ChatApp: a session built from the messages, then prepare and generate."""

    def __init__(self, app: ChatApp, request: ChatRequest, settings: ApiSettings) -> None:
        """Runs the checks that must answer with an HTTP error before any streaming starts."""
        engine = app.engine
        if engine is None:
            raise ApiError(503, f"No model is loaded. {app.load_error or ''}".strip(), "model_not_loaded", "server_error")
        self.app, self.request, self.key = app, request, f"openai-{uuid.uuid4().hex}"
        image = load_image(request.image_url, settings) if request.image_url else None
        self.stats = GenerationStats()  # the request's token counts, for `usage`
        self.session = ChatSession()
        app.new_image(self.session, image, request.experts)
        for q, a in request.history:
            self.session.timeline.append(Turn(question=q, answer=a, image_no=self.session.image_no, done=True))
        self.turn = app.prepare(self.session, self.key, request.question)  # length and busy checks

    def events(self) -> Iterator[tuple[str, Any]]:
        """("ready", None) once the prompt is planned, ("text", piece)..., then ("done", Answer)."""
        r, scanner, sent = self.request, StopScanner(self.request.stop), 0
        ready = False
        for _ in self.app.generate(self.session, self.key, r.experts, None, r.temperature, r.top_p, r.max_tokens,
                                   seed=r.seed, stats=self.stats):
            if not ready:
                ready = True
                yield "ready", None
            new, sent = self.turn.answer[sent:], len(self.turn.answer)
            if new and not scanner.stopped:
                text = scanner.push(new)
                if scanner.stopped:
                    self.app.stop(self.key)  # generation ends before the next token
                if text:
                    yield "text", text
        if not ready:
            yield "ready", None
        tail = scanner.flush()
        if tail:
            yield "text", tail
        stats = self.stats
        length = stats.stop_reason == "length" and not scanner.stopped
        yield "done", Answer(
            finish_reason="length" if length else "stop", context=self.session.last_context,
            usage={"prompt_tokens": stats.prompt_tokens, "completion_tokens": stats.new_tokens,
                   "total_tokens": stats.prompt_tokens + stats.new_tokens},
            experts={n: res.status for n, res in self.session.expert_results.items()})

    def cancel(self) -> None:
        self.app.stop(self.key)


# -- the routes -------------------------------------------------------------------------------


def model_id(app: ChatApp) -> str:
    return app.card.short if app.card is not None else "local-model"


def api_routes(app: ChatApp, settings: ApiSettings) -> list[BaseRoute]:
    """The API's routes, for `demo.launch(app_kwargs={"routes": ...})` (Gradio adds its own after them)."""
    router = APIRouter()

    def check_key(request: Request) -> None:
        if settings.api_key is None:
            if settings.private:
                return
            raise ApiError(401, "this server's API needs a key, and none is set: the operator must start the "
                                "server with --api-key (or MM_API_KEY)", "api_key_required")
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), settings.api_key.encode()):
            raise ApiError(401, "missing or incorrect API key: send 'Authorization: Bearer <key>'", "invalid_api_key")

    def model_entry() -> dict[str, Any]:
        return {"id": model_id(app), "object": "model", "created": 0, "owned_by": "local"}

    @router.get("/v1/models")
    async def list_models(request: Request) -> JSONResponse:
        try:
            check_key(request)
        except ApiError as e:
            return e.response()
        return JSONResponse({"object": "list", "data": [model_entry()] if app.engine is not None else []})

    @router.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Any:
        try:
            check_key(request)
            body = await _read_json(request, 4 * settings.max_upload_bytes + MiB)
            parsed = parse_request(body, app)
            completion = await run_in_threadpool(_start, app, parsed, settings)
            if parsed.stream:
                return await _stream(completion, model_id(app))
            return await run_in_threadpool(_complete, completion, model_id(app))
        except ApiError as e:
            return e.response()

    return list(router.routes)


def _start(app: ChatApp, request: ChatRequest, settings: ApiSettings) -> Completion:
    try:
        return Completion(app, request, settings)
    except ChatError as e:
        raise from_chat_error(e) from None


async def _read_json(request: Request, limit: int) -> Any:
    """The body, refused (413) past `limit` bytes without reading the rest."""
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise ApiError(413, f"the request body is over {_size(limit)}", "request_too_large")
    data = bytearray()
    async for chunk in request.stream():
        data += chunk
        if len(data) > limit:
            raise ApiError(413, f"the request body is over {_size(limit)}", "request_too_large")
    try:
        return json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise ApiError(400, "the request body is not valid JSON") from None


def _envelope(model: str, cid: str, created: int, kind: str) -> dict[str, Any]:
    return {"id": cid, "object": kind, "created": created, "model": model}


def _complete(completion: Completion, model: str) -> JSONResponse:
    """The whole answer as one chat.completion object."""
    text, answer = "", Answer()
    try:
        for kind, value in completion.events():
            if kind == "text":
                text += value
            elif kind == "done":
                answer = value
    except ChatError as e:
        raise from_chat_error(e) from None
    body = _envelope(model, f"chatcmpl-{uuid.uuid4().hex}", int(time.time()), "chat.completion")
    body.update(choices=[{"index": 0, "message": {"role": "assistant", "content": text},
                          "finish_reason": answer.finish_reason, "logprobs": None}],
                usage=answer.usage, context=answer.context, experts=answer.experts)
    return JSONResponse(body)


async def _stream(completion: Completion, model: str) -> Any:
    """Server-sent events: a role chunk, content chunks, a finish chunk (optionally usage), [DONE].
    Generation runs on its own thread; errors before the first token still get an HTTP status."""
    loop, queue = asyncio.get_running_loop(), asyncio.Queue()

    def produce() -> None:
        try:
            for event in completion.events():
                loop.call_soon_threadsafe(queue.put_nowait, event)
        except ChatError as e:
            loop.call_soon_threadsafe(queue.put_nowait, ("error", from_chat_error(e)))
        except Exception as e:  # noqa: BLE001 - reported to the client, logged here
            log.exception("API generation failed")
            loop.call_soon_threadsafe(queue.put_nowait, ("error", ApiError(500, f"Generation failed: {type(e).__name__}")))

    threading.Thread(target=produce, name="openai-api-stream", daemon=True).start()
    kind, value = await queue.get()
    if kind == "error":
        return value.response()
    cid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())

    def chunk(delta: dict[str, Any], finish: str | None = None, **extra: Any) -> str:
        body = _envelope(model, cid, created, "chat.completion.chunk")
        body.update(choices=[{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}], **extra)
        return f"data: {json.dumps(body)}\n\n"

    async def sse() -> AsyncIterator[str]:
        finished = False
        try:
            yield chunk({"role": "assistant", "content": ""})
            while True:
                kind, value = await queue.get()
                if kind == "text":
                    yield chunk({"content": value})
                elif kind == "error":
                    yield f"data: {json.dumps({'error': value.body()})}\n\n"
                    break
                elif kind == "done":
                    yield chunk({}, value.finish_reason, context=value.context, experts=value.experts)
                    if completion.request.include_usage:
                        body = _envelope(model, cid, created, "chat.completion.chunk")
                        yield f"data: {json.dumps(dict(body, choices=[], usage=value.usage))}\n\n"
                    break
            finished = True
            yield "data: [DONE]\n\n"
        finally:
            if not finished:  # the client went away: stop generating for nobody
                completion.cancel()

    return StreamingResponse(sse(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
