"""Opening user images safely, and CLIP's preprocessing (with the released checkpoints' BGR quirk)."""
from __future__ import annotations

import io
import os
from pathlib import Path

import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from torchvision import transforms

from .config import ClipVisionConfig

MAX_PIXELS = 40_000_000  # about 6300 x 6300; larger uploads are refused before decoding


class ImageError(ValueError):
    """An image that cannot be used, with a message fit to show a user (a file's name, never its path:
    the path is the server's business)."""


def _name(source: str | os.PathLike | bytes) -> str:
    return Path(source).name if not isinstance(source, bytes) else "(uploaded bytes)"


def open_image(source: str | os.PathLike | bytes | Image.Image, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """Decode an image into RGB, refusing unreadable files and decompression bombs with a clear message.

    The size is checked from the header before any pixel is decoded. EXIF rotation is applied so the
    model sees what the user sees.
    """
    if isinstance(source, Image.Image):
        img = source
    else:
        try:
            img = Image.open(io.BytesIO(source) if isinstance(source, bytes) else Path(source))
        except FileNotFoundError:
            raise ImageError(f"image file not found: {_name(source)}") from None
        except Image.DecompressionBombError:
            raise ImageError("image is too large to decode safely") from None
        except UnidentifiedImageError:
            raise ImageError(f"{_name(source)} is not an image that can be read (not a known image format)") from None
        except Exception as e:  # noqa: BLE001 - decoders raise many types; all mean "unreadable"
            detail = str(e).replace(str(source), _name(source)) if not isinstance(source, bytes) else str(e)
            raise ImageError(f"this file is not an image that can be read ({type(e).__name__}: {detail})") from None
    w, h = img.size
    if w * h > max_pixels:
        raise ImageError(f"image is {w}x{h} pixels; the limit is {max_pixels / 1e6:.0f} megapixels")
    if w == 0 or h == 0:
        raise ImageError("image is empty (zero width or height)")
    try:
        img = ImageOps.exif_transpose(img)
        return img.convert("RGB")  # drops alpha as cv2.imread does; grey becomes 3 channels
    except Exception as e:  # noqa: BLE001 - as above
        raise ImageError(f"image data is broken or truncated ({type(e).__name__}: {e})") from None


class ImagePreprocessor:
    """CLIP's transform: bicubic resize of the shorter side, centre crop, [0, 1], CLIP mean/std.

    ``bgr=True`` reverses the channels before normalising, reproducing the released checkpoints'
    training input (cv2.imread's BGR pixels with RGB statistics).
    """

    def __init__(self, cfg: ClipVisionConfig, bgr: bool = False) -> None:
        self.bgr = bgr
        self.resize_crop = transforms.Compose([
            transforms.Resize(cfg.image_size, interpolation=transforms.InterpolationMode.BICUBIC),
            transforms.CenterCrop(cfg.image_size),
            transforms.ToTensor(),
        ])
        self.normalize = transforms.Normalize(cfg.mean, cfg.std)

    def __call__(self, image: Image.Image) -> torch.Tensor:
        """PIL image -> float tensor [3, size, size]."""
        x = self.resize_crop(image.convert("RGB"))
        if self.bgr:
            x = x.flip(0)
        return self.normalize(x)
