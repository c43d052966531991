"""What the loaded model is and what it can do, in words for people: the page's banner, the server's
start-up line, the command line's stderr line and each answer's footer all read it from here, so they
never disagree about which model answers."""
from __future__ import annotations

from dataclasses import dataclass

LINK_COMMAND = "python -m weights link llama-7b /path/to/LLaMA"


@dataclass(frozen=True)
class ModelCard:
    name: str  # the model in full: "LLaMA-7B + llama-adapter-bias-7b"
    short: str  # for answer footers: "demo (toy world)"
    summary: str  # one sentence: what it can and cannot do
    photos: bool  # whether it can answer questions about real photos (decides the page's examples)
    toy_captions: bool = False  # its captioner only knows the toy world

    def line(self) -> str:
        """One line for logs and stderr: 'Model: <name>: <summary>'."""
        return f"Model: {self.name}: {self.summary}"


def demo_card() -> ModelCard:
    return ModelCard(
        name="the project's demo model (toy world)", short="demo (toy world)",
        summary=("a tiny model trained on a toy world of coloured shapes: it answers colour, shape, count and "
                 "position questions about such images, not about photos; link real weights for photos "
                 f"(`{LINK_COMMAND}`)"),
        photos=False, toy_captions=True)


def official_card(adapter: str | None) -> ModelCard:
    if adapter in (None, "", "none"):
        return ModelCard(name="LLaMA-7B (no adapter)", short="LLaMA-7B",
                         summary=("the bare language model: it continues text and does not see the image; "
                                  "the experts' text is its only view of a photo"), photos=True)
    return ModelCard(name=f"LLaMA-7B + {adapter}", short=f"LLaMA-7B + {adapter}",
                     summary=("LLaMA-Adapter V2: answers questions about photos from CLIP's visual tokens and the "
                              "experts' text; trained on single-turn English instructions, so long conversations "
                              "and fine print are beyond it"), photos=True)


def custom_card(base: str, adapter: str | None, sees_images: bool = True) -> ModelCard:
    name = base + (f" + {adapter}" if adapter not in (None, "", "none") else "")
    how = ("it sees the image and reads the experts' findings" if sees_images else
           "it does not see the image itself and answers from the experts' findings")
    return ModelCard(name=name, short=name, photos=True,
                     summary=f"a base you chose: {how}; how well depends on its weights and adapter")


def smollm2_card(adapter: str | None, tuned: bool = False) -> ModelCard:
    """``tuned``: the adapter is the project's own findings tuning (weights/smollm2-findings)."""
    if adapter and not tuned:
        return custom_card("SmolLM2-135M-Instruct", adapter, sees_images=False)
    how = ", bias-tuned by this project to answer from them," if tuned else ""
    return ModelCard(name="SmolLM2-135M-Instruct" + (" (tuned on findings)" if tuned else ""), short="SmolLM2-135M",
                     summary=("a small chat model (135M parameters) that does not see the image itself: it answers "
                              f"from the experts' findings (objects and their colours, text, image class){how} so it can "
                              "count, read and name what they report, not describe what they miss"), photos=True)
