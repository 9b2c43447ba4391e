"""Pillow's LANCZOS resize on small random images, for crates/models/tests/resize.rs.

Writes crates/models/tests/fixtures/resize/resize.safetensors: `src_rgb` (H, W, 3) and
`src_l` (H, W) uint8 sources, and `rgb_WxH` / `l_WxH` results of
`Image.resize((W, H), Image.LANCZOS)`, and `nearest_WxH` of a "P" (palette) image, which
Pillow resizes with NEAREST whatever the filter asked. Deterministic.
"""
from pathlib import Path

import numpy as np
import PIL
from PIL import Image
from safetensors.numpy import save_file

OUT = Path(__file__).resolve().parent.parent / "crates/models/tests/fixtures/resize/resize.safetensors"
# (16, 4), (12, 3), (15, 9): the height shrinks by more than twice the width, so Pillow 13 runs
# the vertical pass first; (14, 7): exactly twice, horizontal first.
SIZES = [(8, 6), (24, 20), (16, 13), (17, 8), (5, 29), (64, 48), (3, 2), (16, 12), (16, 4),
         (12, 3), (15, 9), (14, 7)]


def main():
    rng = np.random.default_rng(1234)
    # A smooth gradient plus noise, so that ringing and clipping both happen.
    yy, xx = np.mgrid[0:13, 0:17]
    base = (xx * 15 + yy * 9)[..., None] + np.array([0, 60, 120])
    rgb = np.clip(base + rng.integers(-60, 60, (13, 17, 3)), 0, 255).astype(np.uint8)
    rgb[2:5, 3:7] = 255
    rgb[8:11, 10:14] = 0
    gray = rng.integers(0, 256, (13, 17), dtype=np.uint8)
    tensors = {"src_rgb": rgb, "src_l": gray}
    for w, h in SIZES:
        tensors[f"rgb_{w}x{h}"] = np.array(Image.fromarray(rgb).resize((w, h), Image.LANCZOS))
        tensors[f"l_{w}x{h}"] = np.array(Image.fromarray(gray).resize((w, h), Image.LANCZOS))
    # A palette image: Pillow resizes "P" and "1" images with NEAREST.
    pal = Image.fromarray(gray).convert("P")
    tensors["src_p"] = np.array(pal)
    for w, h in [(8, 6), (24, 20), (7, 30), (5, 3)]:
        tensors[f"nearest_{w}x{h}"] = np.array(pal.resize((w, h), Image.LANCZOS))
    OUT.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(OUT), metadata={"pillow": PIL.__version__})
    print(f"wrote {OUT} (Pillow {PIL.__version__})")


if __name__ == "__main__":
    main()
