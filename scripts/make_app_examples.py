"""Draw the app's example images (app/examples/*.png). They are this project's own work, released
with it, so their licence is the project's. Run: .venv/bin/python scripts/make_app_examples.py"""
from __future__ import annotations

from pathlib import Path

import sys

from PIL import Image, ImageDraw, ImageFont

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

OUT = Path(__file__).resolve().parents[1] / "app" / "examples"


def font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    return ImageFont.load_default(size=size)  # Pillow's bundled font: same output everywhere


def street_sign() -> Image.Image:
    im = Image.new("RGB", (448, 336), (135, 190, 235))
    d = ImageDraw.Draw(im)
    d.rectangle((0, 270, 448, 336), fill=(90, 90, 90))
    d.rectangle((214, 150, 228, 300), fill=(110, 110, 110))
    r, cx, cy = 80, 221, 110
    k = r * 0.4142
    d.polygon([(cx - k, cy - r), (cx + k, cy - r), (cx + r, cy - k), (cx + r, cy + k), (cx + k, cy + r),
               (cx - k, cy + r), (cx - r, cy + k), (cx - r, cy - k)], fill=(200, 16, 30), outline="white", width=5)
    d.text((cx, cy), "STOP", font=font(44), fill="white", anchor="mm")
    d.rectangle((300, 200, 440, 240), fill=(0, 110, 60))
    d.text((370, 220), "MAIN ST", font=font(24), fill="white", anchor="mm")
    return im


def receipt() -> Image.Image:
    im = Image.new("RGB", (336, 448), (200, 185, 160))
    d = ImageDraw.Draw(im)
    d.rectangle((40, 20, 296, 428), fill="white")
    lines = ["CORNER CAFE", "", "COFFEE      3.50", "BAGEL       2.25", "JUICE       4.00", "", "TOTAL       9.75"]
    for i, line in enumerate(lines):
        d.text((60, 50 + i * 44), line, font=font(24), fill=(20, 20, 20))
    return im


# The demo model's examples: toy-world scenes at the 64 px it was trained on (the page shows them
# scaled up, pixelated). Each is one seeded draw of the world with the asked attribute pinned.
TOY_SCENES = {
    "red_circle_left": {"colour": "red", "shape": "circle", "position": "left"},
    "three_blue_squares": {"colour": "blue", "shape": "square", "count": "three"},
    "green_triangle_top": {"colour": "green", "shape": "triangle", "position": "top"},
    "purple_diamond": {"colour": "purple", "shape": "diamond", "position": "centre"},
}


def toy(fix: dict[str, str], seed: int = 0) -> Image.Image:
    import random

    from multimodal.toyworld import render, sample_scene

    return render(sample_scene(random.Random(seed), fix=fix), size=64)


if __name__ == "__main__":
    (OUT / "toy").mkdir(parents=True, exist_ok=True)
    drawn = [(f"{name}.png", draw()) for name, draw in (("street_sign", street_sign), ("receipt", receipt))]
    drawn += [(f"toy/{name}.png", toy(fix)) for name, fix in TOY_SCENES.items()]
    for name, image in drawn:
        path = OUT / name
        image.save(path, optimize=True)
        print(path, path.stat().st_size, "bytes")
