"""The app's handlers in plain Python: new image, experts, ask (streaming), regenerate, stop, clear, and
the API call. `app.ui` only lays out components and wires them to these methods, so everything the page
does can be tested without a browser.

Shared across sessions (one `ChatApp` per server): the engine (its lock serialises model use; it keeps
each image's visual prompt keys/values in an LRU keyed by pixel hash, so follow-up turns and
regenerations about the same picture skip the CLIP encoder and resampler) and one `ExpertRunner`
(cached by image hash).
Per session: a `ChatSession` (see `app.state`) and a cancel flag keyed by Gradio's session hash.

Errors a user can cause or meet are raised as `ChatError` (a `gr.Error`), whose message says what
happened and what to do; the UI shows it inline and as a toast, the API returns it to the client.
"""
from __future__ import annotations

import json
import logging
import re
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gradio as gr
import torch
from PIL import Image

from experts import ExpertResult, ExpertRunner, build_context, image_digest
from multimodal.card import ModelCard
from multimodal.generate import Engine, GenerationStats, PromptTooLongError, SamplingParams
from multimodal.image import ImageError, open_image

from .prompting import AUTO_STYLE, PromptBudgetError, PromptPlan, assemble, prompting_for, resolve_style
from .state import ChatSession, Turn

log = logging.getLogger("app")

EXPERT_LABELS = {"caption": "Caption", "ocr": "OCR (text in the image)", "detection": "Object detection",
                 "classification": "Image class (ImageNet)"}
OOM_MESSAGE = "out of memory: try a shorter question, fewer max new tokens or a smaller dtype (--dtype bfloat16)"
NO_IMAGE_NOTE = "No image attached: the question is answered from its text alone."
TOY_CAPTIONER = "demo captioner (toy world)"
_ABSOLUTE_PATH = re.compile(r"(?<![\w.:/])(?:/[^\s/'\"`()<>:,]+)+/([^\s/'\"`()<>:,]+)")
_BUSY_WINDOW_S = 600.0  # an armed request not started within this long is taken as abandoned


def scrub_paths(text: str) -> str:
    """Replace each absolute server path in a message with its last part: users and API clients learn
    which file, never where the server keeps it (/tmp/gradio/<hash>/photo.png -> photo.png)."""
    return _ABSOLUTE_PATH.sub(r"\1", text)


class ChatError(gr.Error):
    """A problem to show the user; the server carries on. Logged as one line (it is the user's
    input, not the server's fault: no traceback), with any server path taken out of the message."""

    def __init__(self, message: str) -> None:
        message = scrub_paths(message)
        super().__init__(message, duration=None, print_exception=False)
        log.info("user error: %s", message.splitlines()[0] if message else "")


@dataclass
class AppConfig:
    """Operator settings (see `python -m app --help`)."""

    max_question_chars: int = 2000
    default_max_new_tokens: int = 256  # the slider's starting value
    context_tokens: int | None = None  # expert context budget; None: a quarter of the context length
    default_experts: tuple[str, ...] = ("caption", "ocr", "detection", "classification")
    log_dir: Path | None = None  # None: no chat or image is written anywhere
    max_waiting: int | None = None  # more armed requests than this: "busy" (the server's queue size)
    prompt_style: str = AUTO_STYLE  # how a chat base is told the experts' findings (app.prompting)


@dataclass
class ExpertView:
    """What the expert panel shows for the current image."""

    context: str = ""
    caption: str = ""
    ocr_lines: str = ""
    detection: Image.Image | None = None
    status: str = ""
    results: list[ExpertResult] = field(default_factory=list)


class ChatApp:
    def __init__(self, engine: Engine | None, load_error: str | None = None, runner: ExpertRunner | None = None,
                 config: AppConfig | None = None) -> None:
        self.engine, self.load_error = engine, load_error
        self.runner = runner
        self.config = config or AppConfig()
        self.notices: list[str] = []  # server-wide lines for the page (e.g. why there is no share link)
        self._cancel: dict[str, threading.Event] = {}
        self._armed: dict[str, float] = {}  # session key -> when its request was armed (busy check)
        self._upload_lock = threading.Lock()
        adapter_config = engine.loaded.adapter_config if engine is not None else {}
        self.prompt_style = resolve_style(self.config.prompt_style, adapter_config)
        self.prompting = prompting_for(engine.prompt_format, self.prompt_style) if engine is not None else None
        self._log_lock = threading.Lock()

    # -- what is available ----------------------------------------------------------------

    @property
    def expert_names(self) -> list[str]:
        return self.runner.names if self.runner is not None else []

    def expert_availability(self) -> dict[str, str | None]:
        return self.runner.availability() if self.runner is not None else {}

    @property
    def context_budget(self) -> int:
        if self.config.context_tokens is not None:
            return self.config.context_tokens
        return self.engine.max_seq_len // 4 if self.engine is not None else 128

    def count(self, text: str) -> int:
        assert self.engine is not None
        return self.engine.tokenizer.count(text)

    def require_engine(self) -> Engine:
        if self.engine is None:
            raise ChatError(f"No model is loaded. {self.load_error or ''}".strip())
        return self.engine

    @property
    def card(self) -> ModelCard | None:
        return self.engine.card if self.engine is not None else None

    # -- image and experts ------------------------------------------------------------------

    @staticmethod
    def open_upload(upload: str | Path | Image.Image | None) -> tuple[Image.Image | None, str]:
        """Decode an upload with the project's checks (not an image, too large, broken)."""
        if upload is None:
            return None, ""
        try:
            image = open_image(upload)
        except ImageError as e:
            raise ChatError(f"Cannot use this upload: {e}.") from None
        name = Path(upload).name if isinstance(upload, (str, Path)) else ""
        return image, name

    def new_image(self, session: ChatSession, upload: str | Path | Image.Image | None,
                  selected: list[str] | None) -> ExpertView | None:
        """Make the upload the session's current image and run the selected experts on it. None when
        it is the image the session already has (e.g. the page putting it back after a rejected
        upload): nothing to redo, and the page keeps what it shows."""
        image, name = self.open_upload(upload)
        if not session.set_image(image, image_digest(image) if image is not None else None, name):
            return None
        return self.run_experts(session, selected)

    def claim_upload(self, session: ChatSession, upload: str) -> bool:
        """Whether this upload event is the first for its file: Gradio fires the image box's change
        event twice, milliseconds apart and on two threads, for a file it cannot display, and each
        would warn. The same file again later changes nothing either (same pixels)."""
        with self._upload_lock:
            if upload == session.last_upload:
                return False
            session.last_upload = upload
            return True

    def run_experts(self, session: ChatSession, selected: list[str] | None) -> ExpertView:
        """Selected experts on the current image (cached by image hash), and the context they make."""
        chosen = [n for n in (selected or []) if n in self.expert_names]
        if session.image is None or not chosen or self.runner is None:
            session.expert_results = {}
            return ExpertView(status="" if session.image is not None or not chosen else "Experts run once an image is uploaded.")
        results = self.runner.run(session.image, chosen)
        session.expert_results = {r.name: r for r in results}
        block = build_context(results, self.context_budget, self.count if self.engine is not None else _rough)
        session.auto_contexts.add(block.text)
        view = ExpertView(context=block.text, results=results)
        for r in results:
            if r.name == "caption" and r.ok:
                view.caption = r.data.get("caption", r.context)
            elif r.name == "ocr" and r.ok:
                view.ocr_lines = "\n".join(r.context.splitlines()) or "(no text found)"
            elif r.name == "detection" and r.ok:
                view.detection = r.annotated
        lines = []
        for r in results:
            if r.ok:
                lines.append(f"- **{r.name}**: ok ({'cached' if r.cached else f'{r.seconds:.1f} s'})")
            else:
                lines.append(f"- **{r.name}**: {r.status}: {r.error}")
        if block.dropped:
            lines.append(f"- context cut to {self.context_budget} tokens: " + ", ".join(f"{k} −{v} lines" for k, v in block.dropped.items()))
        view.status = "\n".join(lines)
        return view

    def expert_problems(self, session: ChatSession) -> str:
        bad = [f"{r.name} {r.status}: {r.error}" for r in session.expert_results.values() if not r.ok]
        return ("Expert problem: " + "; ".join(bad)) if bad else ""

    # -- asking ---------------------------------------------------------------------------

    def prepare(self, session: ChatSession, key: str, question: str) -> Turn:
        """Check the question and put it in the chat; arms this session's Stop flag before the
        request waits in the queue, so Stop also works on a request that has not started."""
        self.require_engine()
        question = (question or "").strip()
        if not question:
            raise ChatError("Please type a question.")
        if len(question) > self.config.max_question_chars:
            raise ChatError(f"The question is {len(question)} characters long; the limit is "
                            f"{self.config.max_question_chars}. Please shorten it.")
        self._check_busy(session)
        self._arm(key)
        turn = Turn(question=question, image_no=session.image_no)
        session.timeline.append(turn)
        session.requested = turn
        return turn

    def _check_busy(self, session: ChatSession) -> None:
        if self.pending(session) is not None:
            raise ChatError("The answer is still being written; wait for it or press Stop first.")
        limit = self.config.max_waiting
        if limit is None:
            return
        now = time.monotonic()
        waiting = sum(1 for t in list(self._armed.values()) if now - t < _BUSY_WINDOW_S)
        if waiting >= limit:
            raise ChatError(f"The server is busy: {waiting} questions are waiting for the model. "
                            "Please try again in a minute.")

    def _arm(self, key: str) -> None:
        """A fresh Stop flag for this session's next request, armed before it waits in the queue."""
        self._cancel[key] = threading.Event()
        self._armed[key] = time.monotonic()

    def take_request(self, session: ChatSession) -> Turn | None:
        """The turn that `prepare`/`prepare_regenerate` just accepted, once: the queued answering step
        runs after every Ask click, also after a rejected one, and must then do nothing at all."""
        turn, session.requested = session.requested, None
        return turn if turn is not None and turn is self.pending(session) else None

    def prepare_regenerate(self, session: ChatSession, key: str) -> Turn:
        """Forget the last answer and arm a new request for the same question."""
        self.require_engine()
        turn = session.last_turn()
        if turn is None:
            raise ChatError("There is no answer to regenerate yet.")
        if not turn.done:
            raise ChatError("The answer is still being written; stop it first.")
        if turn.image_no != session.image_no:
            raise ChatError("The image has changed since that answer; ask the question again instead.")
        self._check_busy(session)
        turn.answer, turn.footer, turn.done = "", "", False
        self._arm(key)
        session.requested = turn
        return turn

    def stop(self, key: str) -> bool:
        """Ask this session's running (or queued) generation to stop; it ends between two tokens."""
        event = self._cancel.get(key)
        if event is None:
            return False
        event.set()
        return True

    def clear(self, session: ChatSession, key: str) -> None:
        self.stop(key)
        session.clear()

    def pending(self, session: ChatSession) -> Turn | None:
        turn = session.last_turn()
        return turn if turn is not None and not turn.done else None

    def generate(self, session: ChatSession, key: str, selected: list[str] | None, context_text: str | None,
                 temperature: float, top_p: float, max_new_tokens: int, seed: int | None = None,
                 stats: GenerationStats | None = None) -> Iterator[str]:
        """Answer the pending turn, appending text to it as tokens arrive; yields a status line.

        `context_text` is the (possibly edited) context box: used as is unless it is one of the texts
        the experts produced, in which case the context is rebuilt for the current image and experts.
        On an error the pending turn is removed and ChatError raised.
        """
        turn = self.pending(session)
        if turn is None:
            return
        cancel = self._cancel.setdefault(key, threading.Event())
        try:
            yield from self._generate(session, turn, cancel, selected, context_text, temperature, top_p, max_new_tokens,
                                      seed, stats if stats is not None else GenerationStats())
        except BaseException:
            if turn in session.timeline and not turn.answer:
                session.timeline.remove(turn)
            raise
        finally:
            self._armed.pop(key, None)
            if self._cancel.get(key) is cancel:
                self._cancel.pop(key, None)

    def _generate(self, session: ChatSession, turn: Turn, cancel: threading.Event, selected: list[str] | None,
                  context_text: str | None, temperature: float, top_p: float, max_new_tokens: int,
                  seed: int | None, stats: GenerationStats) -> Iterator[str]:
        engine = self.require_engine()
        start = time.perf_counter()
        if cancel.is_set():
            turn.done, turn.footer = True, "stopped before it started"
            yield "Stopped."
            return
        try:
            params = SamplingParams(int(max_new_tokens), float(temperature), float(top_p), seed)
        except ValueError as e:
            raise ChatError(f"Sampling settings: {e}.") from None
        context, used, problems = self._context(session, selected, context_text)
        plan = self.plan(session, turn.question, context, params.max_new_tokens)
        session.last_prompt, session.last_context = plan.prompt, context
        status_bits = [b for b in (plan.dropped_note(), problems, NO_IMAGE_NOTE if session.image is None else "") if b]
        yield ("Writing… " + " · ".join(status_bits)).strip()

        params = SamplingParams(plan.answer_room, params.temperature, params.top_p, params.seed)
        try:
            # The engine caches the image's visual prompts by pixel hash (computed once per image, under
            # its lock) and reuses the keys/values of a prompt prefix it has already seen.
            for piece in engine.stream(plan.ids, session.image, params, cancel, stats):
                turn.answer += piece
                yield "Writing…"
        except PromptTooLongError as e:
            raise ChatError(f"{e}. Please shorten the question or the context.") from None
        except torch.OutOfMemoryError:
            _free_memory()
            raise ChatError(OOM_MESSAGE) from None
        except RuntimeError as e:
            if "out of memory" in str(e).lower():
                _free_memory()
                raise ChatError(OOM_MESSAGE) from None
            log.exception("generation failed")
            raise ChatError(f"Generation failed: {type(e).__name__}: {e}") from None
        turn.done = True
        turn.footer = self.footer(stats, time.perf_counter() - start, used, plan, self.card,
                                  no_image=session.image is None)
        self._log_turn(session, turn)
        yield " · ".join(["Stopped." if stats.stop_reason == "cancelled" else "Done."] + status_bits)

    def _context(self, session: ChatSession, selected: list[str] | None,
                 box: str | None) -> tuple[str, list[str], str]:
        """The expert context for this turn, the names of the experts it came from, and the problems
        of this turn's expert runs (so a failure is reported for the answer it affected, not after)."""
        if box is not None and box.strip() and box not in session.auto_contexts:
            return box, ["edited context"], ""
        if session.image is None or not selected:
            return "", [], ""
        view = self.run_experts(session, selected)
        used = [r.name for r in view.results if r.ok and f"[{r.name}]" in view.context]
        return view.context, used, self.expert_problems(session)

    def plan(self, session: ChatSession, question: str, context: str, max_new_tokens: int) -> PromptPlan:
        engine = self.require_engine()
        try:
            return assemble(question, session.history(), self.prompting.render(context), self.prompting.format,
                            engine.max_seq_len, max_new_tokens)
        except PromptBudgetError as e:
            raise ChatError(str(e)) from None

    @staticmethod
    def footer(stats: GenerationStats, latency: float, experts: list[str], plan: PromptPlan,
               card: ModelCard | None = None, no_image: bool = False) -> str:
        n = stats.new_tokens
        bits = [f"{latency:.1f} s", f"first token {stats.first_token_s:.2f} s", f"{n} token{'s' if n != 1 else ''}"]
        if stats.tokens_per_s > 0:  # decode speed; an answer of one token and no end token has none
            bits.append(f"{stats.tokens_per_s:.1f} tokens/s")
        if card is not None:
            bits.append(f"model: {card.short}")
        bits.append("no image" if no_image else "experts: " + (", ".join(experts) if experts else "none"))
        if stats.stop_reason == "cancelled":
            bits.append("stopped")
        if plan.dropped_note():
            bits.append(plan.dropped_note())
        return " · ".join(bits)

    def budget(self, session: ChatSession, question: str, context_text: str | None, max_new_tokens: int) -> str:
        """The context-budget indicator for what would be sent if the user asked now."""
        if self.engine is None:
            return ""
        context = context_text or ""
        try:
            plan = assemble(question or "", session.history(), self.prompting.render(context), self.prompting.format,
                            self.engine.max_seq_len, int(max_new_tokens))
        except PromptBudgetError as e:
            return f"**Context budget:** over the limit. {e}"
        used = plan.prompt_tokens + plan.answer_room
        filled = round(20 * used / plan.max_seq_len)
        line = f"**Context budget** `{'█' * filled}{'░' * (20 - filled)}` {plan.summary()}"
        if plan.dropped_note():
            line += f"  \n⚠️ Next question: {plan.dropped_note()}."
        return line

    # -- the API ----------------------------------------------------------------------------

    def api_chat(self, image: str | Path | Image.Image | None, message: str, history: Any = None,
                 experts: list[str] | None = None, temperature: float = 0.1, top_p: float = 0.75,
                 max_new_tokens: int = 256, key: str | None = None) -> tuple[str, dict[str, Any]]:
        """One turn, statelessly: image + message + earlier turns + expert switches -> answer and details
        (the prompt that was sent, the updated history, timing). Errors raise ChatError."""
        key = key or f"api-{uuid.uuid4().hex}"
        session = ChatSession()
        self.new_image(session, image, experts)  # a fresh session: always a change
        for q, a in _pairs(history):
            session.timeline.append(Turn(question=q, answer=a, image_no=session.image_no, done=True))
        turn = self.prepare(session, key, message)
        status = ""
        for status in self.generate(session, key, experts, None, temperature, top_p, max_new_tokens):
            pass
        history_out = [[q, a] for q, a in _pairs(history)] + [[turn.question, turn.answer]]
        return turn.answer, {"prompt": session.last_prompt, "history": history_out, "stats": turn.footer,
                             "status": status, "experts": {n: r.status for n, r in session.expert_results.items()},
                             "context": session.last_context}

    # -- opt-in chat log --------------------------------------------------------------------

    def _log_turn(self, session: ChatSession, turn: Turn) -> None:
        """Only with --log-chats DIR: one JSON line per answer, the image saved once by its hash."""
        if self.config.log_dir is None:
            return
        d = self.config.log_dir
        with self._log_lock:
            d.mkdir(parents=True, exist_ok=True)
            if session.image is not None and session.image_digest:
                path = d / "images" / f"{session.image_digest[:32]}.png"
                if not path.exists():
                    path.parent.mkdir(exist_ok=True)
                    session.image.save(path)
            with open(d / "chats.jsonl", "a", encoding="utf-8") as f:
                f.write(json.dumps({"time": time.time(), "image": (session.image_digest or "")[:32],
                                    "question": turn.question, "answer": turn.answer, "stats": turn.footer}) + "\n")


def _pairs(history: Any) -> list[tuple[str, str]]:
    """Earlier turns from the API: [[user, assistant], ...] or Gradio messages [{role, content}, ...]."""
    if not history:
        return []
    if not isinstance(history, list):
        raise ChatError("history must be a list of [question, answer] pairs")
    pairs: list[tuple[str, str]] = []
    if all(isinstance(m, dict) for m in history):
        user = None
        for m in history:
            if m.get("role") == "user":
                user = str(m.get("content", ""))
            elif m.get("role") == "assistant" and user is not None:
                pairs.append((user, str(m.get("content", ""))))
                user = None
        return pairs
    for item in history:
        if not (isinstance(item, (list, tuple)) and len(item) == 2):
            raise ChatError("history must be a list of [question, answer] pairs")
        pairs.append((str(item[0]), str(item[1] or "")))
    return pairs


def _rough(text: str) -> int:
    from experts import rough_token_count

    return rough_token_count(text)


def _free_memory() -> None:
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
