#!/usr/bin/env python3
"""diffusers' image-to-image references on the tiny fixture models.

Needs the folders written by make_fixtures.py. Writes:
  fixtures/inputs/<name>.png                    the input images (also stored in each case file)
  fixtures/reference/img2img/<case>.safetensors  per case: `input` (H, W, 3) uint8, `images`
        (final uint8 images), `preprocessed` (the VAE input), `image_latents` (the scaled latent
        sample of the input), `latents_start` (after add_noise), `latents_step1`,
        `latents_final`
  fixtures/reference/img2img/cases.json

Run with the venv described in the README:  python scripts/make_img2img_fixtures.py
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
from make_fixtures import ROOT, SCHEDULERS, load_sd2  # noqa: E402

from diffusers import StableDiffusionImg2ImgPipeline  # noqa: E402

OUT = ROOT / "reference" / "img2img"
INPUTS = ROOT / "inputs"

# Input images: (width, height, seed).
IMAGES = {
    "square32": (32, 32, 1),
    "odd37x29": (37, 29, 2),
    "wide48x32": (48, 32, 3),
    "wide40x24": (40, 24, 4),
}

CASES = [
    dict(name="i2i-sd1-pndm-s08", model="tiny-sd1", image="square32", scheduler=None,
         prompt="a photo of a cat", steps=10, strength=0.8, guidance=7.5, seed=0),
    dict(name="i2i-sd1-euler-a-s05-batch", model="tiny-sd1", image="square32", scheduler="euler-a",
         prompt="a blue sky", negative_prompt="dark", steps=10, strength=0.5, guidance=6.0, seed=7,
         batch=2),
    dict(name="i2i-sd1-ddim-odd", model="tiny-sd1", image="odd37x29", scheduler="ddim",
         prompt="green trees", steps=8, strength=0.6, guidance=7.5, seed=3),
    dict(name="i2i-sd1-dpmpp-2m-karras-s1", model="tiny-sd1", image="wide48x32",
         scheduler="dpmpp-2m-karras", prompt="a red chair", steps=9, strength=1.0, guidance=5.0,
         seed=11),
    dict(name="i2i-sd1-euler-resized", model="tiny-sd1", image="wide40x24", scheduler="euler",
         prompt="a cat on a chair", steps=7, strength=0.9, guidance=1.0, seed=5, width=32,
         height=32),
    dict(name="i2i-sd2-ddim-s07", model="tiny-sd2", image="square32", scheduler=None,
         prompt="a photo of a cat", steps=8, strength=0.7, guidance=7.5, seed=1),
    dict(name="i2i-sd2-dpmpp-2m-s03", model="tiny-sd2", image="wide48x32", scheduler="dpmpp-2m",
         prompt="blue sky with trees", steps=10, strength=0.3, guidance=7.5, seed=21),
    dict(name="i2i-sd2-pndm-odd", model="tiny-sd2", image="odd37x29", scheduler="pndm",
         prompt="a chair", steps=8, strength=0.75, guidance=3.0, seed=2),
]


def make_image(w, h, seed):
    """A gradient with shapes and noise, so that resizing and encoding see structure."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    r = 255 * xx / max(w - 1, 1)
    g = 255 * yy / max(h - 1, 1)
    b = 128 + 100 * np.sin(xx / 3.0) * np.cos(yy / 4.0)
    img = np.stack([r, g, b], axis=-1)
    img[h // 4: h // 2, w // 5: w // 2] = [250, 240, 30]
    img += rng.normal(0, 12, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def run_case(pipes, case):
    pipe = pipes[case["model"]]
    base = pipe.base_config
    if case["scheduler"] is not None:
        cls, overrides = SCHEDULERS[case["scheduler"]]
        pipe.scheduler = cls.from_config(base, **overrides)
    else:
        pipe.scheduler = type(pipe.scheduler).from_config(base)
    w, h, _ = IMAGES[case["image"]]
    pixels = np.asarray(Image.open(INPUTS / f"{case['image']}.png").convert("RGB"))
    image = Image.fromarray(pixels)
    batch = case.get("batch", 1)
    if "width" in case:
        # diffusers' img2img takes no size: resize with its own image processor first.
        pre = pipe.image_processor.preprocess(image, height=case["height"], width=case["width"])
        call_image = pre
    else:
        pre = pipe.image_processor.preprocess(image)
        call_image = image
    gen = torch.Generator("cpu").manual_seed(case["seed"])
    with torch.no_grad():
        dist = pipe.vae.encode(pre).latent_dist
        image_latents = dist.sample(gen) * pipe.vae.config.scaling_factor
    captured = {}

    def on_step_end(p, i, t, kw):
        if i == 0:
            captured["latents_step1"] = kw["latents"].detach().clone()
        captured["latents_final"] = kw["latents"].detach().clone()
        return {}

    with torch.no_grad():
        result = pipe(
            prompt=case["prompt"],
            negative_prompt=case.get("negative_prompt"),
            image=call_image,
            strength=case["strength"],
            num_inference_steps=case["steps"],
            guidance_scale=case["guidance"],
            num_images_per_prompt=batch,
            generator=torch.Generator("cpu").manual_seed(case["seed"]),
            output_type="pil",
            callback_on_step_end=on_step_end,
            callback_on_step_end_tensor_inputs=["latents"],
        )
    # Replay: first draw = latent sample, second = the noise of add_noise.
    gen = torch.Generator("cpu").manual_seed(case["seed"])
    sample_draw = torch.randn(image_latents.shape, generator=gen)
    assert torch.allclose(dist.mean + dist.std * sample_draw,
                          image_latents / pipe.vae.config.scaling_factor)
    init = torch.cat([image_latents] * batch, dim=0)
    noise = torch.randn(init.shape, generator=gen)
    init_timestep = min(int(case["steps"] * case["strength"]), case["steps"])
    t_start = max(case["steps"] - init_timestep, 0)
    sched = type(pipe.scheduler).from_config(pipe.scheduler.config)
    sched.set_timesteps(case["steps"])
    if hasattr(sched, "set_begin_index"):
        sched.set_begin_index(t_start * sched.order)
    timesteps = sched.timesteps[t_start * sched.order:]
    latents_start = sched.add_noise(init, noise, timesteps[:1].repeat(batch))

    images = np.stack([np.asarray(im.convert("RGB"), dtype=np.uint8) for im in result.images])
    tensors = {
        "input": torch.from_numpy(pixels.copy()),
        "images": torch.from_numpy(images),
        "preprocessed": pre.float(),
        "image_latents": image_latents.float(),
        "latents_start": latents_start.float(),
        "latents_step1": captured["latents_step1"].float(),
        "latents_final": captured["latents_final"].float(),
    }
    save_file({k: v.contiguous() for k, v in tensors.items()}, OUT / f"{case['name']}.safetensors")
    print(f"{case['name']}: {images.shape}, {len(timesteps)} of {len(sched.timesteps)} timesteps")
    return {
        "name": case["name"],
        "model": case["model"],
        "image": f"{case['image']}.png",
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
    if OUT.exists():
        shutil.rmtree(OUT)
    OUT.mkdir(parents=True)
    INPUTS.mkdir(parents=True, exist_ok=True)
    for name, (w, h, seed) in IMAGES.items():
        Image.fromarray(make_image(w, h, seed)).save(INPUTS / f"{name}.png", optimize=False)
    pipes = {
        "tiny-sd1": StableDiffusionImg2ImgPipeline.from_pretrained(
            ROOT / "models" / "tiny-sd1", safety_checker=None, requires_safety_checker=False),
        "tiny-sd2": StableDiffusionImg2ImgPipeline.from_pipe(load_sd2(ROOT / "models" / "tiny-sd2")),
    }
    for pipe in pipes.values():
        pipe.set_progress_bar_config(disable=True)
        pipe.base_config = dict(pipe.scheduler.config)
    cases = [run_case(pipes, c) for c in CASES]
    (OUT / "cases.json").write_text(json.dumps({"cases": cases}, indent=1) + "\n")
    total = sum(p.stat().st_size for p in OUT.rglob("*") if p.is_file())
    print(f"img2img references: {total / 1e6:.2f} MB")


if __name__ == "__main__":
    main()
