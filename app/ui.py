"""The page: layout and wiring only. What each control does lives in `app.chat.ChatApp`.

Event design (why it looks like this):
- Ask and Regenerate are two steps: a quick step puts the question in the chat and arms the session's
  Stop flag, then a streaming step writes the answer. Both are queued (only queued events can send the
  toast of a rejected question to the page); the quick one has no concurrency limit, so it never waits
  behind an answer. A rejected question leaves every output as it was (`gr.skip()`), and the answering
  step, which Gradio runs after every click, acts only on a request the quick step accepted
  (`ChatApp.take_request`): a step that returned nothing would blank the chat. Stop is unqueued and
  sets the flag, which the engine checks between tokens, so generation really ends within one token,
  the partial answer stays with a "stopped" footer, and a request still waiting in the queue ends
  before it starts. (Gradio's `cancels=` alone closes the generator only at its next yield and drops
  the final update; the flag does both jobs.)
- Uploads go through `upload_image`, which hands the raw file to the app instead of letting Gradio
  decode it, so a non-image or a decompression bomb gets the project's specific message. A rejected
  upload puts the session's current image (or none) back in the box, so the box always shows what the
  next answer is about.
- UI events are private to the API; the one public endpoint is `/chat` (see README).
"""
from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import gradio as gr

from .chat import EXPERT_LABELS, ChatApp, ChatError, scrub_paths
from .page_examples import PHOTO_LICENCE, examples_for
from .state import ChatSession
from .upload import RawImageUpload

PRIVATE: Any = "private"
# Narrow screens: the image column (upload) comes first, above the chat. Small images (the demo's 64 px
# toy world) are shown scaled up with hard pixel edges instead of a blur; photos scale as usual.
CSS = """
@media (max-width: 720px) { #image-column { order: -1; } }
#image img.small-image { image-rendering: pixelated; min-width: 256px; min-height: 256px; object-fit: contain; }
"""
# Marks images under 160 px on a side, whenever the image box shows a new one.
JS = """
() => {
  const mark = () => document.querySelectorAll('#image img').forEach(img => {
    const small = img.naturalWidth > 0 && img.naturalWidth < 160 && img.naturalHeight < 160;
    img.classList.toggle('small-image', small);
  });
  new MutationObserver(mark).observe(document.body, {subtree: true, childList: true, attributes: true,
                                                     attributeFilter: ['src']});
  document.addEventListener('load', mark, true);
}
"""


def page_assets() -> dict[str, str]:
    """What `launch` must be given for the page's layout (Gradio 6 takes css and js at launch)."""
    return {"css": CSS, "js": JS}


def upload_image(**kwargs: Any) -> RawImageUpload:
    """An image input that hands the app the uploaded file's path, undecoded (see app/upload.py)."""
    # PNG, not Gradio's default WebP, when the app puts an image back in the box: lossless, so the
    # image comes back with the same pixels (the same digest) and counts as unchanged
    return RawImageUpload(type="filepath", format="png", **kwargs)


def _key(request: gr.Request | None) -> str:
    return getattr(request, "session_hash", None) or "local"


def build_demo(app: ChatApp) -> gr.Blocks:
    names = app.expert_names
    available = app.expert_availability()
    # Unavailable experts are not offered as choices at all; the line under the toggles says why.
    choices = [(EXPERT_LABELS.get(n, n), n) for n in names if available.get(n) is None]
    unavailable = "\n".join(f"- {EXPERT_LABELS.get(n, n)}: unavailable: {scrub_paths(r)}"
                            for n, r in available.items() if r is not None)
    default = [n for n in app.config.default_experts if n in names and available.get(n) is None]
    max_new_limit = min(1024, app.engine.max_seq_len) if app.engine is not None else 512
    examples = [e for e in examples_for(app.card) if e.path.exists()]

    with gr.Blocks(title="LLaMA-Adapter V2 image chat") as demo:
        state = gr.State(ChatSession())  # Gradio deep-copies it for each browser session
        banner = gr.Markdown(_banner(app), elem_id="banner")
        gr.Markdown("An image chat built on LLaMA-Adapter V2, with expert systems (caption, OCR, object detection, "
                    "image class) whose findings you can see and edit before they are sent. Nothing you upload or "
                    "type is logged unless the operator turned chat logging on.")
        with gr.Row():
            with gr.Column(scale=5, min_width=320):
                chatbot = gr.Chatbot(label="Chat", height=480, elem_id="chat", buttons=["copy"],
                                     feedback_options=None, placeholder="Upload an image and ask about it.",
                                     group_consecutive_messages=False)
                with gr.Row():
                    question = gr.Textbox(label="Question", placeholder="What is in this image?", lines=1, max_lines=6,
                                          scale=5, elem_id="question", autofocus=True)
                    ask = gr.Button("Ask", variant="primary", scale=1, elem_id="ask")
                with gr.Row():
                    stop = gr.Button("Stop", elem_id="stop")
                    regen = gr.Button("Regenerate", elem_id="regenerate")
                    clear = gr.Button("Clear", elem_id="clear")
                status = gr.Markdown("", elem_id="status")
                budget = gr.Markdown("", elem_id="budget")
            with gr.Column(scale=3, min_width=320, elem_id="image-column"):
                image = upload_image(label="Image", sources=["upload", "clipboard"], elem_id="image",
                                    height=300)
                experts = gr.CheckboxGroup(choices=choices, value=default, label="Experts (their text is added as context)",
                                           elem_id="experts")
                gr.Markdown(unavailable, elem_id="experts-unavailable", visible=bool(unavailable))
                with gr.Accordion("Sampling", open=False):
                    temperature = gr.Slider(0.0, 1.5, value=0.1, step=0.05, label="Temperature (0: greedy)")
                    top_p = gr.Slider(0.05, 1.0, value=0.75, step=0.05, label="Top p")
                    max_new = gr.Slider(1, max_new_limit, value=min(app.config.default_max_new_tokens, max_new_limit), step=1, label="Max new tokens")
                gr.Examples([[str(e.path), e.question] for e in examples], inputs=[image, question],
                            label="Examples: " + (PHOTO_LICENCE if app.card is None or app.card.photos
                                                  else "the demo model's toy world, drawn for this project"))
        with gr.Accordion("Expert output and context", open=True):
            with gr.Row():
                detection = gr.Image(label="Detection", type="pil", interactive=False, height=260)
                with gr.Column():
                    caption = gr.Textbox(label="Caption", interactive=False, lines=2)
                    ocr = gr.Textbox(label="OCR lines", interactive=False, lines=4, max_lines=12)
                    expert_status = gr.Markdown("")
            context = gr.Textbox(label="Context sent with the next question (edit it before asking; changing the "
                                       "experts or the image rebuilds it)", lines=4, max_lines=16, elem_id="context")

        panel = [detection, caption, ocr, expert_status, context]

        def view_outputs(view: Any) -> list[Any]:
            return [view.detection, view.caption, view.ocr_lines, view.status, view.context]

        def on_image(session: ChatSession, upload: str | None, selected: list[str], q: str, n: int):
            if upload is not None and not app.claim_upload(session, upload):
                return [gr.skip()] * 9  # Gradio reports a file it cannot show twice, at once: handle it once
            try:
                view = app.new_image(session, upload, selected)
            except ChatError as e:
                gr.Warning(e.message)
                # Put back the image the next answer is about (or none); the change event this fires
                # finds the session's image unchanged and leaves the error on the status line.
                return [session.messages(), f"⚠️ {e.message}", gr.skip(), session.image] + [gr.skip()] * 5
            if view is None:  # the image box now shows the session's image again: nothing changed
                return [gr.skip()] * 9
            note = app.expert_problems(session)
            if session.image is not None:
                msg = f"⚠️ {note}" if note else f"Image: {session.image_name}"
            else:
                msg = "No image attached: questions are answered from their text alone."
            return [session.messages(), msg, app.budget(session, q, view.context, n), gr.skip()] + view_outputs(view)

        def on_experts(session: ChatSession, selected: list[str], q: str, n: int):
            view = app.run_experts(session, selected)
            note = app.expert_problems(session)
            return [f"⚠️ {note}" if note else "", app.budget(session, q, view.context, n)] + view_outputs(view)

        def on_prepare(session: ChatSession, q: str, request: gr.Request):
            try:
                app.prepare(session, _key(request), q)
            except ChatError as e:  # the chat, the question and the budget stay exactly as they were
                gr.Warning(e.message)
                return gr.skip(), gr.skip(), f"⚠️ {e.message}"
            return session.messages(), "", "Waiting for the model…"

        def on_prepare_regen(session: ChatSession, request: gr.Request):
            try:
                app.prepare_regenerate(session, _key(request))
            except ChatError as e:
                gr.Warning(e.message)
                return gr.skip(), f"⚠️ {e.message}"
            return session.messages(), "Waiting for the model…"

        def on_generate(session: ChatSession, selected: list[str], ctx: str, t: float, p: float, n: int,
                        request: gr.Request) -> Iterator[list[Any]]:
            turn = app.take_request(session)
            if turn is None:  # the quick step rejected the question: change nothing
                yield [gr.skip()] * 4
                return
            try:
                for line in app.generate(session, _key(request), selected, ctx, t, p, n):
                    yield [session.messages(), line, gr.skip(), gr.skip()]
            except ChatError as e:
                gr.Warning(e.message)
                yield [session.messages(), f"⚠️ {e.message}", turn.question, app.budget(session, turn.question, ctx, n)]
                return
            yield [session.messages(), gr.skip(), gr.skip(), app.budget(session, "", ctx, n)]

        def on_stop(request: gr.Request) -> str:
            return "Stopping…" if app.stop(_key(request)) else gr.skip()

        def on_clear(session: ChatSession, ctx: str, n: int, request: gr.Request):
            app.clear(session, _key(request))
            return session.messages(), "", app.budget(session, "", ctx, n)

        def on_budget(session: ChatSession, q: str, ctx: str, n: int) -> str:
            return app.budget(session, q, ctx, n)

        def on_load() -> str:
            return _banner(app)

        gen_in = [state, experts, context, temperature, top_p, max_new]
        gen_out = [chatbot, status, question, budget]
        image.change(on_image, [state, image, experts, question, max_new], [chatbot, status, budget, image] + panel,
                     api_visibility=PRIVATE)
        experts.change(on_experts, [state, experts, question, max_new], [status, budget] + panel, api_visibility=PRIVATE)
        quick = {"concurrency_limit": None, "show_progress": "hidden", "api_visibility": PRIVATE}
        for trigger in (ask.click, question.submit):
            trigger(on_prepare, [state, question], [chatbot, question, status], **quick
                    ).then(on_generate, gen_in, gen_out, api_visibility=PRIVATE)
        regen.click(on_prepare_regen, [state], [chatbot, status], **quick
                    ).then(on_generate, gen_in, gen_out, api_visibility=PRIVATE)
        stop.click(on_stop, None, status, queue=False, api_visibility=PRIVATE)
        clear.click(on_clear, [state, context, max_new], [chatbot, status, budget], queue=False, api_visibility=PRIVATE)
        chatbot.clear(on_clear, [state, context, max_new], [chatbot, status, budget], queue=False, api_visibility=PRIVATE)
        for box in (question, context):
            box.input(on_budget, [state, question, context, max_new], budget, queue=False, show_progress="hidden",
                      trigger_mode="always_last", api_visibility=PRIVATE)
        max_new.release(on_budget, [state, question, context, max_new], budget, queue=False, api_visibility=PRIVATE)
        demo.load(on_load, None, banner, queue=False, api_visibility=PRIVATE)

        # The public API: one stateless call per turn; the client keeps the history.
        with gr.Column(visible=False):
            api_image = upload_image(label="image")
            api_message = gr.Textbox(label="message")
            api_history = gr.JSON(label="history")
            api_experts = gr.CheckboxGroup(choices=names, value=[], label="experts")
            api_answer = gr.Textbox(label="answer")
            api_details = gr.JSON(label="details")
            api_button = gr.Button("api")

        def api_chat(image_path: str | None, message: str, history: Any, expert_names: list[str], t: float, p: float,
                     n: int) -> tuple[str, dict[str, Any]]:
            return app.api_chat(image_path, message, history, expert_names, t, p, int(n))

        api_button.click(api_chat, [api_image, api_message, api_history, api_experts, temperature, top_p, max_new],
                         [api_answer, api_details], api_name="chat",
                         api_description="One chat turn: image, message, earlier [question, answer] pairs and expert "
                                         "names in; the answer and details (prompt sent, updated history, timing) out.")
    return demo


def _banner(app: ChatApp) -> str:
    """The first thing on the page: which model answers and, in one sentence, what it can do."""
    lines = ["## Chat about an image"]
    if app.card is not None:
        lines.append(f"**Model: {app.card.name}** — {app.card.summary}.")
    elif app.engine is None:
        lines.append(f"**No model is loaded.** {scrub_paths(app.load_error or '')}")
    lines += [f"**Note:** {scrub_paths(n)}" for n in app.notices]
    return "\n\n".join(lines)
