"""Object detection expert: Ultralytics YOLO, counts per class with rough positions.

Weights come from the weights folder (`weights.require("yolov8n")`, or an exported `yolov8n*.onnx`
beside it) or an explicit `model_path`; nothing is ever downloaded. Ultralytics is imported with
its online features switched off (see `_import_yolo`), and boxes are drawn with PIL because
Ultralytics' own plotting fetches a font from the internet.
"""
from __future__ import annotations

import os
import sys
import tempfile
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from PIL import Image, ImageDraw, ImageFont

from .base import Expert, Output, file_settings
from .colour import main_colour
from .describe import count_phrase, plural, region, regions_phrase
from .weightfiles import lookup

EXPORTED_SUFFIXES = (".onnx", ".torchscript")


@dataclass
class DetectionConfig:
    """Inference settings; all of them are part of the cache key."""

    weight: str = "yolov8n"  # manifest entry used when no model_path is given
    conf: float = 0.25  # minimum confidence for a box to count
    iou: float = 0.45  # NMS overlap; stricter than Ultralytics' 0.7, which double-counts a person in zidane.jpg
    imgsz: int = 640
    max_det: int = 100
    device: str | None = None  # None: Ultralytics picks (GPU when present)


def _import_yolo() -> Any:
    """Import `ultralytics.YOLO` with downloads, update checks, auto-install and telemetry off.

    These are read from the environment once, when Ultralytics is first imported (8.x source:
    `utils/__init__.py`: YOLO_OFFLINE makes `ONLINE` False, which disables events, pip-update checks
    and auto-install; YOLO_AUTOINSTALL and ULTRALYTICS_SKIP_REQUIREMENTS_CHECKS stop the pip step
    that loading an .onnx would otherwise try for the optional `onnx` package). Its settings file
    goes to a private temporary folder instead of the user's config folder unless YOLO_CONFIG_DIR
    is set.
    """
    if "ultralytics" not in sys.modules:
        os.environ["YOLO_OFFLINE"] = "1"
        os.environ["YOLO_AUTOINSTALL"] = "false"
        os.environ["ULTRALYTICS_SKIP_REQUIREMENTS_CHECKS"] = "1"
        os.environ.setdefault("YOLO_VERBOSE", "false")
        uid = os.getuid() if hasattr(os, "getuid") else "user"
        os.environ.setdefault("YOLO_CONFIG_DIR", str(Path(tempfile.gettempdir()) / f"experts-ultralytics-{uid}"))
    else:  # imported elsewhere first: switch the already computed flags off as far as we can
        import ultralytics.utils as uu
        import ultralytics.utils.checks as uc

        uu.ONLINE = uc.ONLINE = False
        uu.AUTOINSTALL = uc.AUTOINSTALL = False
        os.environ["ULTRALYTICS_SKIP_REQUIREMENTS_CHECKS"] = "1"
    from PIL import Image

    pil_open = Image.open
    from ultralytics import YOLO

    # Importing Ultralytics replaces PIL's Image.open process-wide with a wrapper that, on any file PIL
    # cannot identify, runs a requirements check and imports pi_heif. Put PIL's own back: the rest of
    # the process (the app's upload checks) must keep PIL's behaviour.
    if Image.open is not pil_open:
        Image.open = pil_open
    return YOLO


class DetectionExpert(Expert):
    """YOLO detector whose context reads like '4 people (2 bottom left, ...), 1 bus (centre)'."""

    name = "detection"

    def __init__(self, model_path: str | os.PathLike | None = None, config: DetectionConfig | None = None) -> None:
        super().__init__()
        self.config = config or DetectionConfig()
        self._explicit = Path(model_path) if model_path is not None else None
        self._model: Any = None
        self._model_file: Path | None = None

    # -- availability ----------------------------------------------------------------------

    def _resolve(self) -> tuple[Path | None, str | None]:
        if self._explicit is not None:
            if self._explicit.exists():
                return self._explicit, None
            return None, f"detector weights not found: {self._explicit}"
        found = lookup(self.config.weight)
        if found.path is not None:
            return found.path, None
        if found.expected is not None:  # an exported model beside the missing .pt also works
            folder, stem = found.expected.parent, found.expected.stem
            if folder.is_dir():
                for candidate in sorted(folder.glob(f"{stem}*")):
                    if candidate.suffix in EXPORTED_SUFFIXES:
                        return candidate, None
            return None, f"{found.reason} (an exported {stem}*.onnx in {folder} also works)"
        return None, found.reason

    def unavailable_reason(self) -> str | None:
        return self._resolve()[1]

    def settings(self) -> Mapping[str, Any]:
        return file_settings(self.config, self._resolve()[0])

    # -- running ---------------------------------------------------------------------------

    def _load(self) -> Any:
        path, reason = self._resolve()
        if path is None:
            raise FileNotFoundError(reason)
        if self._model is None or self._model_file != path:
            yolo = _import_yolo()
            self._model = yolo(str(path), task="detect")
            self._model_file = path
        return self._model

    def detect(self, image: Image.Image) -> list[dict[str, Any]]:
        """Boxes above the confidence threshold: label, score, box (x0, y0, x1, y1), position."""
        model = self._load()
        cfg = self.config
        kwargs: dict[str, Any] = dict(conf=cfg.conf, iou=cfg.iou, imgsz=cfg.imgsz, max_det=cfg.max_det, verbose=False)
        if cfg.device is not None:
            kwargs["device"] = cfg.device
        result = model.predict(image, **kwargs)[0]
        names = result.names
        boxes = result.boxes
        xyxy = boxes.xyxy.cpu().tolist()
        scores = boxes.conf.cpu().tolist()
        classes = [int(c) for c in boxes.cls.cpu().tolist()]
        width, height = image.size
        found = []
        for box, score, cls in sorted(zip(xyxy, scores, classes), key=lambda t: -t[1]):
            if score < cfg.conf:
                continue
            found.append({
                "label": str(names[cls]),
                "score": round(float(score), 4),
                "box": [round(float(v), 1) for v in box],
                "position": region(box, width, height),
                "colour": main_colour(image, box),
            })
        return found

    def _run(self, image: Image.Image) -> Output:
        found = self.detect(image)
        return Output(
            context="\n".join(filter(None, (describe_detections(found), describe_colours(found)))),
            data={"detections": found, "counts": class_counts(found), "conf": self.config.conf,
                  "model": str(self._model_file)},
            annotated=draw_boxes(image, found),
        )


def class_counts(found: list[dict[str, Any]]) -> dict[str, int]:
    counts: dict[str, int] = defaultdict(int)
    for det in found:
        counts[det["label"]] += 1
    return dict(counts)


def by_class(found: list[dict[str, Any]]) -> list[tuple[str, list[dict[str, Any]]]]:
    """The detections grouped by label, classes ordered by count, then by best score (most salient
    first); within a class, in the order given."""
    groups: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for det in found:
        groups[det["label"]].append(det)
    return sorted(groups.items(), key=lambda kv: (-len(kv[1]), -max(d["score"] for d in kv[1])))


def describe_detections(found: list[dict[str, Any]]) -> str:
    """'Objects detected: 4 people (2 bottom left, 2 bottom right), 1 bus (centre).'

    Classes are ordered by count, then by best score, so the most salient come first.
    """
    if not found:
        return "No objects detected."
    parts = [f"{count_phrase(len(dets), label)} ({regions_phrase(d['position'] for d in dets)})"
             for label, dets in by_class(found)]
    return "Objects detected: " + ", ".join(parts) + "."


def describe_colours(found: list[dict[str, Any]]) -> str:
    """'Colours: bus: blue; people: 2 black, 1 white.' (a detail line, experts/context.py): each class's
    objects' main colours, classes in the order of `describe_detections`; '' when nothing was found."""
    parts = []
    for label, dets in by_class([det for det in found if det.get("colour")]):
        if len(dets) == 1:
            parts.append(f"{label}: {dets[0]['colour']}")
            continue
        # most common first; among equals, the colour of the more certain object (found is by score)
        ranked = Counter(det["colour"] for det in dets).most_common()
        parts.append(f"{plural(label)}: " + ", ".join(f"{n} {colour}" for colour, n in ranked))
    return "Colours: " + "; ".join(parts) + "." if parts else ""


_PALETTE = [(230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48), (145, 30, 180),
            (70, 240, 240), (240, 50, 230), (210, 245, 60), (0, 128, 128), (170, 110, 40)]


def draw_boxes(image: Image.Image, found: list[dict[str, Any]]) -> Image.Image:
    """Copy of the image with one coloured box and 'label 0.91' tag per detection."""
    out = image.convert("RGB").copy()
    draw = ImageDraw.Draw(out)
    width, height = out.size
    line = max(2, round(min(width, height) / 250))
    font = ImageFont.load_default(size=max(12, round(min(width, height) / 40)))
    colours: dict[str, tuple[int, int, int]] = {}
    for det in found:
        colour = colours.setdefault(det["label"], _PALETTE[len(colours) % len(_PALETTE)])
        x0, y0, x1, y1 = det["box"]
        draw.rectangle((x0, y0, x1, y1), outline=colour, width=line)
        tag = f"{det['label']} {det['score']:.2f}"
        left, top, right, bottom = draw.textbbox((0, 0), tag, font=font)
        th, tw = bottom - top + 4, right - left + 6
        ty = y0 - th if y0 - th >= 0 else y0  # above the box, or inside it at the image edge
        draw.rectangle((x0, ty, x0 + tw, ty + th), fill=colour)
        draw.text((x0 + 3, ty + 2 - top), tag, fill=(255, 255, 255), font=font)
    return out
