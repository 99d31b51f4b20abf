"""The editing grid of docs/editing.md, made by the CLI (`mmdit generate --image/--mask/--strength`)
with the embedded demo model: a red circle recoloured to blue, by img2img (top row) and by inpainting
with a mask around the circle (bottom row), at strengths 0.3, 0.6 and 0.9.

    cargo build --release && python scripts/edit_grid.py

Writes docs/edit/: the input, the mask, every output (PNGs with their generation metadata) and
grid.png (4x nearest-neighbour upscale; columns: input, mask, 0.3, 0.6, 0.9).
"""

import os
import subprocess

from PIL import Image, ImageFilter

ROOT = os.path.join(os.path.dirname(__file__), "..")
OUT = os.path.join(ROOT, "docs", "edit")
MMDIT = os.path.join(ROOT, "target", "release", "mmdit")
STRENGTHS = ["0.3", "0.6", "0.9"]
SEED = "7"


def mmdit(*args):
    subprocess.run([MMDIT, "generate", "--overwrite", *args], check=True)


def main():
    os.makedirs(OUT, exist_ok=True)
    src = os.path.join(OUT, "input.png")
    mmdit("--prompt", "a red circle on a white background", "--seed", "1", "--output", src)
    # The mask: pixels far from white, grown by 3 pixels.
    img = Image.open(src).convert("L")
    mask = img.point(lambda v: 255 if v < 200 else 0).filter(ImageFilter.MaxFilter(7))
    mask_path = os.path.join(OUT, "mask.png")
    mask.save(mask_path)
    rows = []
    for name, extra in [("img2img", []), ("inpaint", ["--mask", mask_path])]:
        row = [Image.open(src).convert("RGB"), mask.convert("RGB") if extra else Image.new("RGB", img.size, "white")]
        for s in STRENGTHS:
            out = os.path.join(OUT, f"{name}-{s}.png")
            mmdit("--prompt", "a blue circle on a white background", "--image", src, *extra, "--strength", s,
                  "--seed", SEED, "--output", out)
            row.append(Image.open(out).convert("RGB"))
        rows.append(row)
    w, h = img.size
    gap = 4
    grid = Image.new("RGB", (len(rows[0]) * (w + gap) - gap, len(rows) * (h + gap) - gap), (128, 128, 128))
    for r, row in enumerate(rows):
        for c, im in enumerate(row):
            grid.paste(im, (c * (w + gap), r * (h + gap)))
    grid.resize((grid.width * 4, grid.height * 4), Image.NEAREST).save(os.path.join(OUT, "grid.png"))


if __name__ == "__main__":
    main()
