"""The image upload box: a `gr.Image` whose upload reaches the app as the file's path, undecoded.

`ChatApp` opens it with `multimodal.image.open_image`, whose errors say what is wrong with the file (a
truncated JPEG, a decompression bomb, a text file); Gradio's own decoding would fail first with a
generic error. It is a subclass, not a patched instance, because Gradio rebuilds a session's copy of a
component from its class whenever a handler updates it (`gr.skip()` included), and a patched method
would be lost then. (Gradio's component metaclass writes a typing stub, `upload.pyi`, beside this file
the first time; it is committed so that nothing is written at run time.)
"""
from __future__ import annotations

from typing import Any

import gradio as gr


class RawImageUpload(gr.Image):
    is_template = True  # Gradio's mark for a subclass drawn by its parent's frontend (gr.Image's)

    def preprocess(self, payload: Any) -> Any:
        if payload is None:
            return None
        if getattr(payload, "path", None):
            return str(payload.path)
        return super().preprocess(payload)  # a data: URL (pasted image): Gradio writes it to a file
