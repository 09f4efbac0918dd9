"""Draw the start frame the image-to-video workflows use: ``python tests/make_start_frame.py`` writes
``workflows/start_frame.png``.

The project makes its own picture (no downloaded image): a cartoon cat at Wan's 480p size, 832x480, in a handful
of flat colours so the PNG stays a few KB. ``tests/test_comfyui_user.py`` checks that the shipped file is this
drawing.
"""

from __future__ import annotations

import sys
from pathlib import Path

WIDTH, HEIGHT = 832, 480
TARGET = Path(__file__).resolve().parent.parent / "workflows" / "start_frame.png"


def draw():
    """The start frame as an RGB PIL image."""
    import PIL.Image
    import PIL.ImageDraw

    image = PIL.Image.new("RGB", (WIDTH, HEIGHT), (142, 192, 232))  # sky
    pen = PIL.ImageDraw.Draw(image)
    pen.rectangle((0, 330, WIDTH, HEIGHT), fill=(96, 156, 84))  # grass
    pen.ellipse((640, 40, 740, 140), fill=(250, 214, 92))  # sun
    fur, dark, pink = (232, 148, 62), (60, 44, 36), (236, 150, 160)
    pen.ellipse((300, 250, 560, 440), fill=fur)  # body
    pen.ellipse((520, 360, 640, 410), fill=fur)  # tail
    cx, cy, r = 400, 210, 110  # head
    pen.polygon([(cx - 95, cy - 50), (cx - 70, cy - 150), (cx - 20, cy - 95)], fill=fur)  # ears
    pen.polygon([(cx + 95, cy - 50), (cx + 70, cy - 150), (cx + 20, cy - 95)], fill=fur)
    pen.polygon([(cx - 78, cy - 70), (cx - 66, cy - 125), (cx - 38, cy - 92)], fill=pink)
    pen.polygon([(cx + 78, cy - 70), (cx + 66, cy - 125), (cx + 38, cy - 92)], fill=pink)
    pen.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fur)
    for side in (-1, 1):
        ex = cx + side * 42
        pen.ellipse((ex - 18, cy - 30, ex + 18, cy + 8), fill=(250, 250, 240))  # eyes
        pen.ellipse((ex - 8, cy - 22, ex + 8, cy + 4), fill=dark)
        for dy in (-6, 6):  # whiskers
            pen.line((cx + side * 30, cy + 40 + dy, cx + side * 105, cy + 30 + 2 * dy), fill=dark, width=3)
    pen.polygon([(cx - 12, cy + 28), (cx + 12, cy + 28), (cx, cy + 42)], fill=pink)  # nose
    return image


def write(path: Path = TARGET) -> Path:
    """Save the drawing as a palette PNG (its few colours keep it small)."""
    draw().quantize(colors=16, dither=0).save(path, optimize=True)
    return path


if __name__ == "__main__":
    target = write(Path(sys.argv[1]) if len(sys.argv) > 1 else TARGET)
    print(f"wrote {target} ({target.stat().st_size} bytes)")
