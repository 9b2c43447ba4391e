#!/usr/bin/env python3
"""Single-file SDXL checkpoints (the original SGM / Stability generative-models key names, as
SDXL checkpoints are published on model hubs) of the tiny SDXL models, and diffusers'
`from_single_file` outputs on them.

Needs make_sdxl_fixtures.py (the folders) and make_img2img_fixtures.py / make_inpaint_fixtures.py
(the input image and mask). Writes under fixtures/single_file/ (and nothing else there):
  (checkpoints in f16, as most published ones; the references run in f32 on those values)
  tiny-sdxl.safetensors          tiny-sdxl as one SGM checkpoint: UNet `model.diffusion_model.`
                                 in LDM names with the added-conditioning MLP as `label_emb.0.*`,
                                 VAE `first_stage_model.`, CLIP `conditioner.embedders.0.transformer.`
                                 (transformers names), OpenCLIP `conditioner.embedders.1.model.`
                                 (fused in_proj, every layer, `text_projection` (hidden, proj) =
                                 the transpose of transformers' `text_projection.weight`,
                                 `logit_scale`)
  tiny-sdxl-inpaint.safetensors  the same with the 9-channel inpainting UNet
  reference/<case>.safetensors   `images` from diffusers' from_single_file pipelines (inpainting
                                 also `input`, and `mask` / `mask_nearest` as sd-worker decodes
                                 the mask, see make_inpaint_fixtures.py)
  sdxl_cases.json                the parameters of every case
Every checkpoint is checked to load through diffusers' own single-file conversion to exactly
the diffusers weights it was written from (rounded through f16).

Run with the venv described in the README:  python scripts/make_sdxl_single_file.py
Deterministic: reruns write the same bytes.
"""
import json
import sys
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
from diffusers import StableDiffusionXLInpaintPipeline, StableDiffusionXLPipeline  # noqa: E402
from make_inpaint_fixtures import as_decoded  # noqa: E402
from make_single_file_fixtures import (clip_to_ldm, clip_to_open_clip,  # noqa: E402
                                       folder_weights, same_weights, unet_to_ldm, vae_to_ldm)
from PIL import Image  # noqa: E402

FIX = Path(__file__).resolve().parent.parent / "fixtures"
OUT = FIX / "single_file"

CASES = [
    dict(name="sf-xl-euler", file="tiny-sdxl.safetensors", components="models/tiny-sdxl",
         prompt="a photo of a cat", negative_prompt=None, width=32, height=32, steps=5,
         guidance=5.0, seed=0, scheduler=None, batch=1),
    dict(name="sf-xl-inpaint-wide", file="tiny-sdxl-inpaint.safetensors",
         components="models/tiny-sdxl-inpaint", prompt="green trees", negative_prompt=None,
         width=48, height=32, steps=4, guidance=4.0, seed=3, scheduler=None, batch=1,
         image="wide48x32.png", mask="mask-p48x32.png", strength=1.0),
]

# diffusers UNet names of SDXL's added (text_time) conditioning -> SGM `label_emb` names.
ADD_EMBEDDING = {"add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2"}


def sdxl_unet_to_sgm(sd, cfg):
    """The LDM UNet names of make_single_file_fixtures.py plus SDXL's `label_emb`."""
    extra = {}
    rest = {}
    for k, v in sd.items():
        head, _, leaf = k.rpartition(".")
        if head in ADD_EMBEDDING:
            extra[f"model.diffusion_model.{ADD_EMBEDDING[head]}.{leaf}"] = v
        else:
            rest[k] = v
    assert len(extra) == 4, sorted(extra)
    return {**unet_to_ldm(rest, cfg), **extra}


def clip_to_sgm(sd):
    """CLIP ViT-L (text encoder 1): transformers names under `conditioner.embedders.0.transformer.`."""
    return {"conditioner.embedders.0.transformer." + k.removeprefix("cond_stage_model.transformer."): v
            for k, v in clip_to_ldm(sd).items()}


def open_clip_to_sgm(sd, cfg):
    """CLIPTextModelWithProjection (text encoder 2) -> OpenCLIP names under
    `conditioner.embedders.1.model.`: as SD 2.x's (fused in_proj), but with every layer and no
    extra one, and the real projection stored as OpenCLIP's (hidden, projection_dim) matrix."""
    layers = cfg["num_hidden_layers"]
    # The SD 2.x converter appends one unused (noisy) layer and a random square projection;
    # both are dropped here. Its generator only feeds those.
    full = clip_to_open_clip(sd, cfg, torch.Generator().manual_seed(0))
    out = {}
    for k, v in full.items():
        k = k.removeprefix("cond_stage_model.model.")
        if k.startswith(f"transformer.resblocks.{layers}.") or k == "text_projection":
            continue
        out[k] = v
    assert not any(k.startswith(f"transformer.resblocks.{layers + 1}.") for k in out)
    proj = sd["text_projection.weight"]  # (projection_dim, hidden), a bias-free Linear
    assert proj.shape == (cfg["projection_dim"], cfg["hidden_size"]), proj.shape
    out["text_projection"] = proj.t().contiguous()  # OpenCLIP: x @ text_projection
    return {"conditioner.embedders.1.model." + k: v for k, v in out.items()}


def write_checkpoint(folder, path):
    unet_cfg = json.loads((folder / "unet/config.json").read_text())
    vae_cfg = json.loads((folder / "vae/config.json").read_text())
    te2_cfg = json.loads((folder / "text_encoder_2/config.json").read_text())
    ckpt = sdxl_unet_to_sgm(folder_weights(folder, "unet", "diffusion_pytorch_model"), unet_cfg)
    ckpt.update({"first_stage_model." + k: v for k, v in
                 vae_to_ldm(folder_weights(folder, "vae", "diffusion_pytorch_model"), vae_cfg).items()})
    ckpt.update(clip_to_sgm(folder_weights(folder, "text_encoder", "model")))
    ckpt.update(open_clip_to_sgm(folder_weights(folder, "text_encoder_2", "model"), te2_cfg))
    # Stored in f16, as most published checkpoints (and half the fixture size).
    save_file({k: v.half().contiguous() for k, v in sorted(ckpt.items())}, path,
              metadata={"format": "pt"})
    return ckpt


def run(pipe, case):
    pipe.set_progress_bar_config(disable=True)
    kw = dict(prompt=case["prompt"], negative_prompt=case["negative_prompt"],
              width=case["width"], height=case["height"], num_inference_steps=case["steps"],
              guidance_scale=case["guidance"], num_images_per_prompt=case["batch"],
              generator=torch.Generator("cpu").manual_seed(case["seed"]), output_type="pil")
    extra = {}
    if "mask" in case:
        image = Image.open(FIX / "inputs" / case["image"]).convert("RGB")
        mask = Image.open(FIX / "inputs" / case["mask"])
        kw.update(image=image, mask_image=mask, strength=case["strength"])
        decoded, nearest = as_decoded(mask)
        extra["input"] = torch.from_numpy(np.asarray(image, dtype=np.uint8).copy())
        extra["mask"] = torch.from_numpy(decoded.copy())
        extra["mask_nearest"] = torch.tensor([nearest], dtype=torch.uint8)
    with torch.no_grad():
        result = pipe(**kw)
    images = np.stack([np.asarray(im.convert("RGB"), dtype=np.uint8) for im in result.images])
    assert images.shape == (case["batch"], case["height"], case["width"], 3), images.shape
    save_file({"images": torch.from_numpy(images), **extra},
              OUT / "reference" / f"{case['name']}.safetensors")
    print(f"{case['name']}: images {images.shape}, pixel std {images.astype(np.float32).std():.1f}")


def main():
    torch.set_num_threads(2)
    (OUT / "reference").mkdir(parents=True, exist_ok=True)
    for case in CASES:
        folder = FIX / case["components"]
        path = OUT / case["file"]
        ckpt = write_checkpoint(folder, path)
        unet_in = ckpt["model.diffusion_model.input_blocks.0.0.weight"].shape[1]
        assert unet_in == (9 if "mask" in case else 4), unet_in
        cls = StableDiffusionXLInpaintPipeline if "mask" in case else StableDiffusionXLPipeline
        pipe = cls.from_single_file(path, config=str(folder), torch_dtype=torch.float32,
                                    local_files_only=True)
        # diffusers' conversion gives back exactly the weights the file was written from.
        ref = cls.from_pretrained(folder, torch_dtype=torch.float32, local_files_only=True)
        for part in ("unet", "vae", "text_encoder", "text_encoder_2"):
            same_weights(getattr(pipe, part), getattr(ref, part), f"{case['name']} {part}")
        print(f"{case['file']}: {len(ckpt)} tensors, {path.stat().st_size} bytes, "
              "loads back through from_single_file exactly")
        run(pipe, case)
    (OUT / "sdxl_cases.json").write_text(json.dumps({"cases": CASES}, indent=1) + "\n")


if __name__ == "__main__":
    main()
