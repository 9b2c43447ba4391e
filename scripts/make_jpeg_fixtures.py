"""JPEG and WebP files and Pillow's decoded pixels, for crates/engine/src/images/jpeg.rs and
input.rs (webp.safetensors: lossy and lossless WebP, the same layout).

Writes crates/engine/tests/fixtures/jpeg.safetensors: for each case, `<name>.jpg` (the file's
bytes, uint8) and `<name>.rgb` (Pillow's `Image.open(f).convert("RGB")`, (H, W, 3) uint8, or
(H, W) for grayscale files kept as "L"). Cases: 4:2:0, 4:2:2 and 4:4:4 chroma subsampling,
grayscale, progressive, optimised Huffman tables, restart intervals, odd sizes, low and high
quality. Deterministic.
"""
import io
from pathlib import Path

import numpy as np
import PIL
from PIL import Image, features
from safetensors.numpy import save_file

OUT = Path(__file__).resolve().parent.parent / "crates/engine/tests/fixtures/jpeg.safetensors"
WEBP_OUT = OUT.with_name("webp.safetensors")


def picture(w, h, seed):
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    img = np.stack([xx * 255 / w, yy * 255 / h, 128 + 90 * np.sin(xx / 2.5) * np.cos(yy / 3.5)], -1)
    img[h // 3: h // 2, w // 4: w // 2] = [255, 20, 40]
    img += rng.normal(0, 25, img.shape)
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))


CASES = {
    "q90_420_37x29": (37, 29, dict(quality=90, subsampling=2)),
    "q75_422_40x24": (40, 24, dict(quality=75, subsampling=1)),
    "q95_444_33x17": (33, 17, dict(quality=95, subsampling=0)),
    "q50_420_64x48_opt": (64, 48, dict(quality=50, subsampling=2, optimize=True)),
    "prog_420_45x31": (45, 31, dict(quality=85, subsampling=2, progressive=True)),
    "prog_444_24x40": (24, 40, dict(quality=92, subsampling=0, progressive=True)),
    "restart_420_50x34": (50, 34, dict(quality=80, subsampling=2, restart_marker_blocks=3)),
    "q30_420_9x7": (9, 7, dict(quality=30, subsampling=2)),
    "q100_420_17x3": (17, 3, dict(quality=100, subsampling=2)),
}


def main():
    tensors = {}
    for i, (name, (w, h, opts)) in enumerate(CASES.items()):
        buf = io.BytesIO()
        picture(w, h, i).save(buf, "JPEG", **opts)
        data = buf.getvalue()
        tensors[f"{name}.jpg"] = np.frombuffer(data, dtype=np.uint8).copy()
        tensors[f"{name}.rgb"] = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
    for i, (name, (w, h)) in enumerate({"gray_31x23": (31, 23), "gray_prog_16x16": (16, 16)}.items()):
        buf = io.BytesIO()
        picture(w, h, 50 + i).convert("L").save(buf, "JPEG", quality=85, progressive="prog" in name)
        data = buf.getvalue()
        tensors[f"{name}.jpg"] = np.frombuffer(data, dtype=np.uint8).copy()
        tensors[f"{name}.rgb"] = np.asarray(Image.open(io.BytesIO(data)))
    OUT.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(OUT), metadata={"pillow": PIL.__version__,
                                            "libjpeg_turbo": str(features.version("libjpeg_turbo"))})
    webp = {}
    for i, (name, opts) in enumerate({"lossy_q80_45x31": dict(quality=80),
                                      "lossy_q40_33x17": dict(quality=40),
                                      "lossless_20x12": dict(lossless=True)}.items()):
        w, h = (int(x) for x in name.rsplit("_", 1)[1].split("x"))
        buf = io.BytesIO()
        picture(w, h, 70 + i).save(buf, "WEBP", **opts)
        data = buf.getvalue()
        webp[f"{name}.webp"] = np.frombuffer(data, dtype=np.uint8).copy()
        webp[f"{name}.rgb"] = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
    save_file(webp, str(WEBP_OUT), metadata={"pillow": PIL.__version__,
                                             "libwebp": str(features.version("webp"))})
    print(f"wrote {OUT}: {len(tensors) // 2} cases, Pillow {PIL.__version__}, "
          f"libjpeg-turbo {features.version('libjpeg_turbo')}")


if __name__ == "__main__":
    main()
