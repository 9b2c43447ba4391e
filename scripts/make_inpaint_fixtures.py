#!/usr/bin/env python3
"""diffusers' inpainting references on the tiny fixture models.

Needs the folders written by make_fixtures.py and the input images of
make_img2img_fixtures.py. Writes:
  fixtures/models/tiny-sd1-inpaint/   tiny-sd1 with a 9-channel inpainting UNet (random weights)
  fixtures/inputs/mask-*.png          masks in several PNG modes (RGB, L, P, 1) and sizes
  fixtures/reference/inpaint/<case>.safetensors  per case: `input` (H, W, 3) uint8, `mask`
        (the mask as sd-worker decodes it: (H, W) luma or (H, W, 3) RGB, palette expanded,
        1-bit as 0/255), `mask_nearest` (1 for palette / 1-bit masks), `mask_bin` (the
        binarised mask at output size), `masked_image_latents`, `latents_start`,
        `latents_step1`, `latents_final`, `images`
  fixtures/reference/inpaint/cases.json

Run with the venv described in the README:  python scripts/make_inpaint_fixtures.py
Deterministic: reruns write the same bytes.
"""

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
from make_fixtures import ROOT, SCHEDULERS, jitter_norms, load_sd2  # noqa: E402

from diffusers import StableDiffusionInpaintPipeline, UNet2DConditionModel  # noqa: E402

OUT = ROOT / "reference" / "inpaint"
INPUTS = ROOT / "inputs"

# name: (mode, width, height)
MASKS = {
    "mask-rgb32": ("RGB", 32, 32),
    "mask-l20x28": ("L", 20, 28),
    "mask-p48x32": ("P", 48, 32),
    "mask-1bit32": ("1", 32, 32),
    "mask-rgb37x29": ("RGB", 37, 29),
}

CASES = [
    dict(name="inp-sd1-blend-ddim", model="tiny-sd1", image="square32", mask="mask-rgb32",
         scheduler="ddim", prompt="a red chair", steps=8, strength=1.0, guidance=7.5, seed=0),
    dict(name="inp-sd1-blend-euler-a-s07-batch", model="tiny-sd1", image="square32",
         mask="mask-l20x28", scheduler="euler-a", prompt="a blue sky", negative_prompt="dark",
         steps=10, strength=0.7, guidance=6.0, seed=4, batch=2),
    dict(name="inp-unet-pndm-s1", model="tiny-sd1-inpaint", image="odd37x29", mask="mask-rgb37x29",
         scheduler=None, prompt="a photo of a cat", steps=9, strength=1.0, guidance=7.5, seed=1),
    dict(name="inp-unet-dpmpp-karras-s06-nocfg", model="tiny-sd1-inpaint", image="wide48x32",
         mask="mask-p48x32", scheduler="dpmpp-2m-karras", prompt="green trees", steps=10,
         strength=0.6, guidance=1.0, seed=9, width=48, height=32),
    dict(name="inp-unet-euler-batch-1bit", model="tiny-sd1-inpaint", image="square32",
         mask="mask-1bit32", scheduler="euler", prompt="a chair", steps=7, strength=0.8,
         guidance=5.0, seed=12, batch=2),
    dict(name="inp-sd2-blend-ddim-s09", model="tiny-sd2", image="wide48x32", mask="mask-l20x28",
         scheduler=None, prompt="blue sky with trees", steps=8, strength=0.9, guidance=7.5,
         seed=6, width=48, height=32),
]


def make_mask(mode, w, h):
    yy, xx = np.mgrid[0:h, 0:w]
    inside = ((xx - w * 0.55) ** 2 / (w * 0.3) ** 2 + (yy - h * 0.45) ** 2 / (h * 0.35) ** 2) < 1
    soft = np.clip(255 * (1.2 - np.hypot(xx - w / 2, yy - h / 2) / (0.5 * min(w, h))), 0, 255)
    if mode == "RGB":
        m = np.stack([inside * 255, soft, inside * 200 + 30], axis=-1).astype(np.uint8)
        return Image.fromarray(m, "RGB")
    if mode == "L":
        return Image.fromarray((0.6 * soft + 100 * inside).clip(0, 255).astype(np.uint8), "L")
    if mode == "P":
        m = np.stack([inside * 255, inside * 255, soft], axis=-1).astype(np.uint8)
        return Image.fromarray(m, "RGB").quantize(colors=6)
    return Image.fromarray((inside * 255).astype(np.uint8), "L").convert("1")


def as_decoded(mask):
    """The mask as sd-worker's decoder gives it."""
    if mask.mode == "P":
        return np.asarray(mask.convert("RGB")), 1
    if mask.mode == "1":
        return np.asarray(mask.convert("L")), 1
    return np.asarray(mask), 0


def build_inpaint_model():
    src = ROOT / "models" / "tiny-sd1"
    out = ROOT / "models" / "tiny-sd1-inpaint"
    if out.exists():
        shutil.rmtree(out)
    shutil.copytree(src, out)
    shutil.rmtree(out / "unet")
    cfg = dict(UNet2DConditionModel.load_config(src / "unet"))
    cfg = {k: v for k, v in cfg.items() if not k.startswith("_")}
    cfg["in_channels"] = 9
    gen = torch.Generator().manual_seed(3)
    torch.manual_seed(3)
    unet = UNet2DConditionModel(**cfg).eval()
    jitter_norms(unet, gen)
    unet.save_pretrained(out / "unet", safe_serialization=True)
    index = json.loads((out / "model_index.json").read_text())
    index["_class_name"] = "StableDiffusionInpaintPipeline"
    (out / "model_index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


def run_case(pipes, case):
    pipe = pipes[case["model"]]
    base = pipe.base_config
    if case["scheduler"] is not None:
        cls, overrides = SCHEDULERS[case["scheduler"]]
        pipe.scheduler = cls.from_config(base, **overrides)
    else:
        pipe.scheduler = type(pipe.scheduler).from_config(base)
    image = Image.open(INPUTS / f"{case['image']}.png")
    mask = Image.open(INPUTS / f"{case['mask']}.png")
    batch = case.get("batch", 1)
    captured = {}
    orig_latents, orig_mask = pipe.prepare_latents, pipe.prepare_mask_latents

    def prepare_latents(*a, **k):
        out = orig_latents(*a, **k)
        captured["latents_start"] = out[0].detach().clone()
        return out

    def prepare_mask_latents(mask_t, masked, *a, **k):
        captured["mask_bin"] = mask_t.detach().clone()
        out = orig_mask(mask_t, masked, *a, **k)
        captured["masked_image_latents"] = out[1][:batch].detach().clone()
        return out

    pipe.prepare_latents, pipe.prepare_mask_latents = prepare_latents, prepare_mask_latents

    def on_step_end(p, i, t, kw):
        if i == 0:
            captured["latents_step1"] = kw["latents"].detach().clone()
        captured["latents_final"] = kw["latents"].detach().clone()
        return {}

    with torch.no_grad():
        result = pipe(
            prompt=case["prompt"],
            negative_prompt=case.get("negative_prompt"),
            image=image,
            mask_image=mask,
            height=case.get("height"),
            width=case.get("width"),
            strength=case["strength"],
            num_inference_steps=case["steps"],
            guidance_scale=case["guidance"],
            num_images_per_prompt=batch,
            generator=torch.Generator("cpu").manual_seed(case["seed"]),
            output_type="pil",
            callback_on_step_end=on_step_end,
            callback_on_step_end_tensor_inputs=["latents"],
        )
    pipe.prepare_latents, pipe.prepare_mask_latents = orig_latents, orig_mask
    images = np.stack([np.asarray(im.convert("RGB"), dtype=np.uint8) for im in result.images])
    decoded, nearest = as_decoded(mask)
    tensors = {
        "input": torch.from_numpy(np.asarray(image.convert("RGB")).copy()),
        "mask": torch.from_numpy(decoded.copy()),
        "mask_nearest": torch.tensor([nearest], dtype=torch.uint8),
        "mask_bin": captured["mask_bin"].float(),
        "masked_image_latents": captured["masked_image_latents"].float(),
        "latents_start": captured["latents_start"].float(),
        "latents_step1": captured["latents_step1"].float(),
        "latents_final": captured["latents_final"].float(),
        "images": torch.from_numpy(images),
    }
    save_file({k: v.contiguous() for k, v in tensors.items()}, OUT / f"{case['name']}.safetensors")
    print(f"{case['name']}: {images.shape}, mask {mask.mode} {mask.size}, "
          f"UNet in {pipe.unet.config.in_channels}")
    return {
        "name": case["name"],
        "model": case["model"],
        "image": f"{case['image']}.png",
        "mask": f"{case['mask']}.png",
        "prompt": case["prompt"],
        "negative_prompt": case.get("negative_prompt"),
        "width": case.get("width"),
        "height": case.get("height"),
        "steps": case["steps"],
        "strength": case["strength"],
        "guidance": case["guidance"],
        "seed": case["seed"],
        "scheduler": case["scheduler"],
        "batch": batch,
    }


def main():
    torch.set_num_threads(2)
    build_inpaint_model()
    if OUT.exists():
        shutil.rmtree(OUT)
    OUT.mkdir(parents=True)
    for name, (mode, w, h) in MASKS.items():
        make_mask(mode, w, h).save(INPUTS / f"{name}.png", optimize=False)
    kwargs = dict(safety_checker=None, requires_safety_checker=False)
    pipes = {
        "tiny-sd1": StableDiffusionInpaintPipeline.from_pretrained(ROOT / "models" / "tiny-sd1", **kwargs),
        "tiny-sd1-inpaint": StableDiffusionInpaintPipeline.from_pretrained(
            ROOT / "models" / "tiny-sd1-inpaint", **kwargs),
        "tiny-sd2": StableDiffusionInpaintPipeline.from_pipe(load_sd2(ROOT / "models" / "tiny-sd2")),
    }
    for pipe in pipes.values():
        pipe.set_progress_bar_config(disable=True)
        pipe.base_config = dict(pipe.scheduler.config)
    cases = [run_case(pipes, c) for c in CASES]
    (OUT / "cases.json").write_text(json.dumps({"cases": cases}, indent=1) + "\n")
    total = sum(p.stat().st_size for p in OUT.rglob("*") if p.is_file())
    print(f"inpaint references: {total / 1e6:.2f} MB")


if __name__ == "__main__":
    main()
