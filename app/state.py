"""Per-browser-session chat state.

Gradio keeps one `ChatSession` per browser tab (`gr.State(ChatSession)` builds a fresh one for each
session) and hands the same object to every event of that tab, so handlers mutate it in place. Nothing
here is shared between sessions; what is shared (the model, the expert runner, the image-prompt cache)
lives in `app.chat.ChatApp`.

The conversation is a timeline of turns and notices. A notice marks an image change in the chat
("New image: bus.jpg (image 2)"). Each turn records which image it was about (`image_no`), so the
prompt for a question sends only the earlier turns about the *current* image: answers about a
previous picture would otherwise leak into answers about this one (the failure users report for
LLaVA-family demos), and the released checkpoints were trained one image, one question at a time.
The chat still shows every turn, with the markers, so the user sees where each image began.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from PIL import Image

from experts import ExpertResult


@dataclass
class Turn:
    """One question and its answer (partial while streaming)."""

    question: str
    answer: str = ""
    image_no: int = 0  # which image of the session it was about; 0: no image
    footer: str = ""  # latency, tokens/s, experts used, what was dropped
    done: bool = False  # False while streaming or when it failed before any text


@dataclass
class Notice:
    """A line in the chat that is not a turn: an image change."""

    text: str


@dataclass
class ChatSession:
    """Everything one browser session knows: its timeline, current image and expert output."""

    timeline: list[Turn | Notice] = field(default_factory=list)
    image: Image.Image | None = None  # current image, decoded and checked (RGB)
    image_digest: str | None = None  # sha256 of its pixels: key of the shared caches
    image_name: str = ""
    image_no: int = 0  # 1 for the first image of the session, 2 for the next, ...
    expert_results: dict[str, ExpertResult] = field(default_factory=dict)  # for the current image
    auto_contexts: set[str] = field(default_factory=lambda: {""})  # context texts the experts produced
    last_prompt: str = ""  # the last prompt sent to the model (the API returns it)
    last_context: str = ""  # the expert context it carried
    requested: Turn | None = None  # the turn an accepted Ask/Regenerate handed to the answering step
    last_upload: str | None = None  # the file of the last upload event handled (its event can come twice)

    # -- the conversation --------------------------------------------------------------------

    @property
    def turns(self) -> list[Turn]:
        return [t for t in self.timeline if isinstance(t, Turn)]

    def history(self) -> list[tuple[str, str]]:
        """Finished earlier turns about the current image, oldest first: what the prompt may carry."""
        return [(t.question, t.answer) for t in self.turns if t.done and t.image_no == self.image_no and t.answer.strip()]

    def last_turn(self) -> Turn | None:
        turns = self.turns
        return turns[-1] if turns else None

    def clear(self) -> None:
        """Forget the conversation; keep the image and its expert output (the user may ask again)."""
        self.timeline.clear()
        self.last_prompt = ""

    # -- the image ---------------------------------------------------------------------------

    def set_image(self, image: Image.Image | None, digest: str | None, name: str = "") -> bool:
        """Make `image` current. Returns True if it changed; an image change mid-conversation adds
        a notice to the chat so the user can see which turns were about which picture."""
        if digest == self.image_digest:
            return False
        had_turns = any(isinstance(t, Turn) for t in self.timeline)
        self.image, self.image_digest, self.expert_results = image, digest, {}
        if image is None:
            self.image_name = ""
            self.image_no = 0 if not had_turns else self.image_no + 1  # text-only turns form their own group
            if had_turns:
                self.timeline.append(Notice("Image removed. Later questions are answered without an image."))
            return True
        self.image_no += 1
        self.image_name = name or f"image {self.image_no}"
        if had_turns:
            self.timeline.append(Notice(
                f"New image: {self.image_name} (image {self.image_no}). Later questions are about this image; "
                "earlier turns stay here but are not sent to the model."))
        return True

    # -- rendering ---------------------------------------------------------------------------

    def messages(self) -> list[dict[str, Any]]:
        """The chat as Gradio "messages" (role/content dicts)."""
        out: list[dict[str, Any]] = []
        for item in self.timeline:
            if isinstance(item, Notice):  # its own row (the chatbot does not group consecutive messages)
                out.append({"role": "assistant", "content": f"🖼️ *{item.text}*"})
                continue
            out.append({"role": "user", "content": item.question})
            answer = item.answer if item.answer else ("…" if not item.done else "(no answer)")
            if item.footer:
                answer += f"\n\n<sub>{item.footer}</sub>"
            out.append({"role": "assistant", "content": answer})
        return out
