"""A second adapter on the same loaded base (e.g. CAPTION-7B for the caption expert).

Adapters are small (tens of MB against 13 GB of base weights), so instead of loading a second model
the tuned tensors are swapped in for one request and swapped back after: pointer swaps, no copies
of base weights, and the engine's lock makes sure no other request sees the model meanwhile.
"""
from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from PIL import Image

from .checkpoint import read_adapter
from .generate import Engine, SamplingParams
from .loading import adapter_state
from .model import MultimodalLlama
from .prompt import CAPTION_INSTRUCTION, format_prompt


class AdapterSwap:
    """Tensors of another adapter, ready on the model's device and dtype."""

    def __init__(self, model: MultimodalLlama, path: str | os.PathLike) -> None:
        source = f"adapter checkpoint {path}"
        ckpt = read_adapter(path)
        own_names = {name for name, _ in model.named_parameters()}
        if any(".lora_" in k and k not in own_names for k in ckpt.state):
            raise ValueError(f"{source} has LoRA where the loaded model has none to swap it into: its adapter has "
                             "no LoRA, or its LoRA was merged into the weights (load with merge_lora=False)")
        state = adapter_state(model, ckpt, source)
        own = dict(model.named_parameters())
        self.tensors = {k: v.to(own[k].device, own[k].dtype).clone() for k, v in state.items()}
        wrong = [k for k, v in self.tensors.items() if v.shape != own[k].shape]
        if wrong:
            raise ValueError(f"{source}: shapes differ from the loaded model for {wrong[:5]}")
        self.model = model

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors.values())

    @contextmanager
    def applied(self) -> Iterator[None]:
        """Swap the tensors in, and back out even if generation fails. Tuned parameters the file does
        not have keep the main adapter's values."""
        own = dict(self.model.named_parameters())
        self._exchange(own)
        try:
            yield
        finally:
            self._exchange(own)

    def _exchange(self, own: dict[str, torch.nn.Parameter]) -> None:
        for k, t in self.tensors.items():
            own[k].data, self.tensors[k] = t, own[k].data


class Captioner:
    """A short caption for the caption expert: the caption adapter if one is given (swapped onto the
    loaded base), else the main model asked the caption instruction."""

    def __init__(self, engine: Engine, adapter: AdapterSwap | None = None,
                 params: SamplingParams = SamplingParams(max_new_tokens=48, temperature=0.0)) -> None:
        self.engine, self.adapter, self.params = engine, adapter, params

    def __call__(self, image: Image.Image) -> str:
        prompt = format_prompt(CAPTION_INSTRUCTION)
        return "".join(self.engine.stream(prompt, image, self.params, adapter=self.adapter)).strip()
