"""Draw the app's example images (app/examples/*.png). They are this project's own work, released
with it, so their licence is the project's. Run: .venv/bin/python scripts/make_app_examples.py"""
from __future__ import annotations

from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

OUT = Path(__file__).resolve().parents[1] / "app" / "examples"


def font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    return ImageFont.load_default(size=size)  # Pillow's bundled font: same output everywhere


def shapes() -> Image.Image:
    im = Image.new("RGB", (448, 336), (245, 240, 228))
    d = ImageDraw.Draw(im)
    d.ellipse((30, 60, 150, 180), fill=(214, 48, 49))
    d.rectangle((170, 60, 290, 180), fill=(9, 132, 227))
    d.polygon([(370, 60), (430, 180), (310, 180)], fill=(0, 168, 112))
    d.text((224, 260), "SHAPES", font=font(48), fill=(30, 30, 30), anchor="mm")
    return im


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


if __name__ == "__main__":
    OUT.mkdir(parents=True, exist_ok=True)
    for name, draw in (("shapes", shapes), ("street_sign", street_sign), ("receipt", receipt)):
        path = OUT / f"{name}.png"
        draw().save(path, optimize=True)
        print(path, path.stat().st_size, "bytes")
