"""The Gradio page: upload an image, ask, watch the answer stream in.

A minimal page until the full chat app lands; it already keeps the promises that matter: errors are
shown on the page (missing weights, bad images, overlong questions) and the server keeps running.
"""
from __future__ import annotations

import threading
from collections.abc import Iterator

import gradio as gr
from PIL import Image

from multimodal.generate import Engine, GenerationStats, PromptTooLongError, SamplingParams
from multimodal.image import ImageError, open_image
from multimodal.prompt import format_prompt

MAX_QUESTION_CHARS = 2000


def answer_stream(engine: Engine | None, load_error: str | None, image: Image.Image | None, question: str,
                  temperature: float, top_p: float, max_new_tokens: int,
                  cancel: threading.Event | None = None) -> Iterator[str]:
    """The page's handler, without Gradio: yields the answer so far (and a status line at the end)."""
    if engine is None:
        raise gr.Error(f"No model is loaded. {load_error}", duration=None)
    question = (question or "").strip()
    if not question:
        raise gr.Error("Please type a question.")
    if len(question) > MAX_QUESTION_CHARS:
        raise gr.Error(f"The question is {len(question)} characters long; the limit is {MAX_QUESTION_CHARS}.")
    try:
        picture = open_image(image) if image is not None else None
        params = SamplingParams(int(max_new_tokens), float(temperature), float(top_p))
    except (ImageError, ValueError) as e:
        raise gr.Error(str(e)) from None
    stats = GenerationStats()
    text = ""
    try:
        for piece in engine.stream(format_prompt(question), picture, params, cancel, stats):
            text += piece
            yield text
    except PromptTooLongError as e:
        raise gr.Error(f"{e}. Please ask a shorter question.") from None
    yield f"{text}\n\n— {stats.new_tokens} tokens, {stats.tokens_per_s:.1f} tokens/s, first token after {stats.first_token_s:.2f} s"


def build_demo(engine: Engine | None, load_error: str | None = None) -> gr.Blocks:
    with gr.Blocks(title="LLaMA-Adapter V2 chat") as demo:
        gr.Markdown("## Ask about an image\nLLaMA-Adapter V2: a frozen LLaMA that looks at your image through gated visual prompts.")
        if engine is None:
            gr.Markdown(f"**No model is loaded.** {load_error}")
        with gr.Row():
            with gr.Column():
                image = gr.Image(type="pil", label="Image", sources=["upload", "clipboard"])
                question = gr.Textbox(label="Question", lines=2, max_lines=8, placeholder="What is in this image?")
                with gr.Row():
                    ask = gr.Button("Ask", variant="primary")
                    stop = gr.Button("Stop")
                with gr.Accordion("Sampling", open=False):
                    temperature = gr.Slider(0.0, 1.0, value=0.1, step=0.05, label="Temperature (0: greedy)")
                    top_p = gr.Slider(0.05, 1.0, value=0.75, step=0.05, label="Top p")
                    max_new = gr.Slider(1, 512, value=256, step=1, label="Max new tokens")
            with gr.Column():
                answer = gr.Textbox(label="Answer", lines=14, interactive=False)

        def respond(img: Image.Image | None, q: str, t: float, p: float, n: int) -> Iterator[str]:
            yield from answer_stream(engine, load_error, img, q, t, p, n)

        event = ask.click(respond, [image, question, temperature, top_p, max_new], answer, api_name="answer")
        question.submit(respond, [image, question, temperature, top_p, max_new], answer, api_name=False)
        # Gradio closes the generator on cancel, which ends the token loop between tokens.
        stop.click(None, cancels=[event], api_name=False)
    return demo
