#!/usr/bin/env python3
"""Generates the tiny SDXL test models and diffusers' reference outputs.

Writes, under fixtures/ at the repository root:
  models/tiny-sdxl/          an SDXL-like diffusers folder: two text encoders of different
                             widths (CLIP quick_gelu 32 wide, pad <|endoftext|>; CLIP with
                             projection, gelu, 48 wide, pad "!"), a UNet with `text_time`
                             added conditioning and a list `transformer_layers_per_block`,
                             VAE scaling factor 0.13025 with force_upcast, Euler (leading)
  models/tiny-sdxl-inpaint/  the same text encoders, tokenizers and VAE with a 9-channel
                             inpainting UNet
  reference/sdxl/<case>.safetensors  per case: the final uint8 images, the prompt embeddings,
                             pooled embeddings and time ids of the first UNet call, its input
                             and output, the latents after step 1 (and for image cases the
                             input image, and the mask as sd-worker decodes it, see
                             make_inpaint_fixtures.py)
  reference/sdxl/cases.json  the parameters of every case
  reference/sdxl/vae-tiled.safetensors  the tiny SDXL VAE's tiled decode (diffusers'
                             enable_tiling with 16-pixel tiles) and whole decode of random
                             latents `z` (unscaled, 20x28)
  reference/sdxl/tokens.json transformers' ids for test prompts from the tokenizer folders of
                             tiny-sdxl-inpaint, which hold only tokenizer.json and
                             tokenizer_config.json (as current transformers saves them)

Run with the venv described in the README:  python scripts/make_sdxl_fixtures.py
Weights are random (seeded), so the folders are only useful for parity tests.
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
from make_fixtures import jitter_norms, load_sd2  # noqa: E402
from make_inpaint_fixtures import as_decoded  # noqa: E402
from make_tokenizer_fixtures import PROMPTS, write_tiny_clip_tokenizer  # noqa: E402

from diffusers import (  # noqa: E402
    AutoencoderKL,
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    StableDiffusionXLImg2ImgPipeline,
    StableDiffusionXLInpaintPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from transformers import (  # noqa: E402
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
)

ROOT = Path(__file__).resolve().parent.parent / "fixtures"
REF = ROOT / "reference" / "sdxl"

SCHEDULERS = {
    "euler": (EulerDiscreteScheduler, {}),
    "euler-a": (EulerAncestralDiscreteScheduler, {}),
    "ddim": (DDIMScheduler, {}),
    "dpmpp-2m": (DPMSolverMultistepScheduler,
                 {"algorithm_type": "dpmsolver++", "solver_order": 2, "use_karras_sigmas": False}),
}

LONG_PROMPT = " ".join(
    ["a photo of a cat sitting on a red chair in the garden, with a blue sky and green trees"] * 6
)


def text_encoder_config(tokenizer, hidden, heads, act, layers, projection):
    return CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=hidden + 16,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        max_position_embeddings=77,
        hidden_act=act,
        layer_norm_eps=1e-5,
        projection_dim=projection,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def unet(in_channels, seed):
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    u = UNet2DConditionModel(
        sample_size=16,
        in_channels=in_channels,
        out_channels=4,
        block_out_channels=(8, 16),
        layers_per_block=2,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 2),
        attention_head_dim=(2, 4),
        cross_attention_dim=32 + 48,
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=8 * 6 + 24,
        norm_num_groups=4,
    ).eval()
    jitter_norms(u, gen)
    return u


def build():
    torch.manual_seed(3)
    gen = torch.Generator().manual_seed(3)
    out = ROOT / "models" / "tiny-sdxl"
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    write_tiny_clip_tokenizer(out / "tokenizer", "<|endoftext|>")
    write_tiny_clip_tokenizer(out / "tokenizer_2", "!")
    tok = CLIPTokenizer.from_pretrained(out / "tokenizer")
    tok2 = CLIPTokenizer.from_pretrained(out / "tokenizer_2")
    te = CLIPTextModel(text_encoder_config(tok, 32, 4, "quick_gelu", 2, 32)).eval()
    te2 = CLIPTextModelWithProjection(text_encoder_config(tok2, 48, 4, "gelu", 2, 24)).eval()
    jitter_norms(te, gen)
    jitter_norms(te2, gen)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        block_out_channels=(8, 16),
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        latent_channels=4,
        layers_per_block=1,
        norm_num_groups=4,
        sample_size=32,
        scaling_factor=0.13025,
        force_upcast=True,
    ).eval()
    jitter_norms(vae, gen)
    scheduler = EulerDiscreteScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        num_train_timesteps=1000, steps_offset=1, timestep_spacing="leading",
        interpolation_type="linear", prediction_type="epsilon", use_karras_sigmas=False,
    )
    pipe = StableDiffusionXLPipeline(
        vae=vae, text_encoder=te, text_encoder_2=te2, tokenizer=tok, tokenizer_2=tok2,
        unet=unet(4, 4), scheduler=scheduler, force_zeros_for_empty_prompt=True,
    )
    pipe.save_pretrained(out, safe_serialization=True)

    inp = ROOT / "models" / "tiny-sdxl-inpaint"
    if inp.exists():
        shutil.rmtree(inp)
    ipipe = StableDiffusionXLInpaintPipeline(
        vae=vae, text_encoder=te, text_encoder_2=te2, tokenizer=tok, tokenizer_2=tok2,
        unet=unet(9, 5), scheduler=scheduler, requires_aesthetics_score=False,
        force_zeros_for_empty_prompt=True,
    )
    ipipe.save_pretrained(inp, safe_serialization=True)


TXT2IMG = [
    dict(name="xl-euler-cfg", scheduler=None, prompt="a photo of a cat", steps=6, guidance=5.0,
         seed=0),
    dict(name="xl-euler-a-neg-wide-batch", scheduler="euler-a", prompt="a red chair in the garden",
         negative_prompt="blurry, dark", steps=5, guidance=7.0, seed=42, width=48, height=32,
         batch=2),
    dict(name="xl-dpmpp-2m-long-empty-neg", scheduler="dpmpp-2m", prompt=LONG_PROMPT,
         negative_prompt="", steps=8, guidance=4.0, seed=3, width=32, height=40),
    dict(name="xl-ddim-nocfg-micro", scheduler="ddim", prompt="green trees", steps=5,
         guidance=1.0, seed=7, original_size=(64, 96), crops_coords_top_left=(4, 8),
         target_size=(40, 24)),
    dict(name="xl-euler-negative-micro", scheduler=None, prompt="a blue sky",
         negative_prompt="a cat", steps=5, guidance=6.0, seed=11, original_size=(128, 128),
         negative_original_size=(16, 24), negative_crops_coords_top_left=(2, 3),
         negative_target_size=(32, 32)),
]

IMG2IMG = [
    dict(name="xl-i2i-euler-s06", scheduler=None, prompt="a photo of a cat", steps=10,
         guidance=5.0, seed=1, image="square32", strength=0.6),
    dict(name="xl-i2i-dpmpp-2m-s08-wide-micro", scheduler="dpmpp-2m", prompt="a red chair",
         negative_prompt="dark", steps=6, guidance=3.0, seed=5, image="wide48x32", strength=0.8,
         original_size=(300, 200), crops_coords_top_left=(1, 2)),
]

INPAINT = [
    dict(name="xl-inp-blend-euler-a", model="tiny-sdxl", scheduler="euler-a",
         prompt="a photo of a cat", steps=8, guidance=5.0, seed=2, image="square32",
         mask="mask-rgb32", strength=0.9),
    dict(name="xl-inp-unet-euler-s1-wide", model="tiny-sdxl-inpaint", scheduler=None,
         prompt="green trees", negative_prompt="blurry", steps=6, guidance=4.0, seed=9,
         image="wide48x32", mask="mask-p48x32", strength=1.0, width=48, height=32),
]

# Turbo models: the tiny folders with the scheduler SD-Turbo and SDXL-Turbo ship (Euler
# ancestral, trailing spacing), run as their model cards run them (1-4 steps, guidance 0). The
# test builds the same folders from tiny-sdxl / tiny-sd2 with that scheduler config.
TURBO = [
    dict(name="xl-turbo-1step", model="tiny-sdxl-turbo", scheduler=None, prompt="a photo of a cat",
         steps=1, guidance=0.0, seed=4),
    dict(name="xl-turbo-4step-wide", model="tiny-sdxl-turbo", scheduler=None,
         prompt="a red chair in the garden", steps=4, guidance=0.0, seed=6, width=48, height=32),
    dict(name="sd2-turbo-1step", model="tiny-sd2-turbo", scheduler=None, prompt="green trees",
         steps=1, guidance=0.0, seed=8, width=32, height=32),
]

MICRO = ["original_size", "crops_coords_top_left", "target_size", "negative_original_size",
         "negative_crops_coords_top_left", "negative_target_size"]


def set_scheduler(pipe, base, name):
    if name is None:
        pipe.scheduler = pipe.own_scheduler.from_config(base)
    else:
        cls, overrides = SCHEDULERS[name]
        pipe.scheduler = cls.from_config(base, **overrides)


def run(pipe, case, kind):
    if not hasattr(pipe, "own_scheduler"):
        pipe.own_scheduler = type(pipe.scheduler)
    base = dict(pipe.scheduler.config)
    set_scheduler(pipe, base, case["scheduler"])
    captured = {}

    def hook(module, args, kwargs, output):
        if "unet_in" in captured:
            return
        captured["unet_in"] = args[0].detach().clone()
        captured["timestep"] = torch.tensor([float(args[1])])
        captured["prompt_embeds"] = kwargs["encoder_hidden_states"].detach().clone()
        added = kwargs.get("added_cond_kwargs")
        if added is not None:
            captured["text_embeds"] = added["text_embeds"].detach().clone()
            captured["time_ids"] = added["time_ids"].detach().clone().float()
        captured["unet_out"] = output[0].detach().clone()

    handle = pipe.unet.register_forward_hook(hook, with_kwargs=True)

    def on_step_end(p, i, t, kw):
        if i == 0:
            captured["latents_step1"] = kw["latents"].detach().clone()
        captured["latents_final"] = kw["latents"].detach().clone()
        return {}

    kwargs = dict(
        prompt=case["prompt"],
        negative_prompt=case.get("negative_prompt"),
        num_inference_steps=case["steps"],
        guidance_scale=case["guidance"],
        num_images_per_prompt=case.get("batch", 1),
        generator=torch.Generator("cpu").manual_seed(case["seed"]),
        output_type="pil",
        callback_on_step_end=on_step_end,
        callback_on_step_end_tensor_inputs=["latents"],
    )
    for key in MICRO:
        if key in case:
            kwargs[key] = tuple(case[key])
    extra = {}
    if kind in ("img2img", "inpaint"):
        image = Image.open(ROOT / "inputs" / f"{case['image']}.png").convert("RGB")
        kwargs["image"] = image
        kwargs["strength"] = case["strength"]
        extra["input"] = torch.from_numpy(np.asarray(image, dtype=np.uint8).copy())
    if kind == "inpaint":
        mask = Image.open(ROOT / "inputs" / f"{case['mask']}.png")
        kwargs["mask_image"] = mask
        decoded, nearest = as_decoded(mask)
        extra["mask"] = torch.from_numpy(decoded.copy())
        extra["mask_nearest"] = torch.tensor([nearest], dtype=torch.uint8)
    if kind in ("txt2img", "inpaint"):
        kwargs["width"] = case.get("width", 32)
        kwargs["height"] = case.get("height", 32)
    with torch.no_grad():
        result = pipe(**kwargs)
    handle.remove()
    images = np.stack([np.asarray(im.convert("RGB"), dtype=np.uint8) for im in result.images])
    tensors = {"images": torch.from_numpy(images), **extra,
               **{k: v.float().contiguous() for k, v in captured.items()}}
    save_file({k: v.contiguous() for k, v in tensors.items()}, REF / f"{case['name']}.safetensors")
    print(f"{case['name']}: {images.shape}, pixel std {images.astype(np.float32).std():.1f}")
    entry = {k: v for k, v in case.items()}
    entry["kind"] = kind
    entry.setdefault("model", "tiny-sdxl")
    entry.setdefault("negative_prompt", None)
    entry.setdefault("batch", 1)
    entry["width"] = images.shape[2]
    entry["height"] = images.shape[1]
    pipe.scheduler = pipe.own_scheduler.from_config(base)
    return entry


def vae_tiled():
    vae = AutoencoderKL.from_pretrained(ROOT / "models" / "tiny-sdxl" / "vae").eval()
    z = torch.randn((1, 4, 20, 28), generator=torch.Generator().manual_seed(12))
    with torch.no_grad():
        full = vae.decode(z).sample
        vae.enable_tiling()
        # 16-pixel tiles (8 latents) so that the tiny image has 3 x 4 of them.
        vae.tile_sample_min_size = 16
        vae.tile_latent_min_size = 8
        tiled = vae.decode(z).sample
    save_file({"z": z, "full": full.contiguous(), "tiled": tiled.contiguous()},
              REF / "vae-tiled.safetensors")
    print(f"vae tiled: max |tiled - full| {float((tiled - full).abs().max()):.4f}")


def main():
    torch.set_num_threads(2)
    if REF.exists():
        shutil.rmtree(REF)
    REF.mkdir(parents=True)
    build()
    cases = []
    path = ROOT / "models" / "tiny-sdxl"
    pipe = StableDiffusionXLPipeline.from_pretrained(path)
    pipe.set_progress_bar_config(disable=True)
    for case in TXT2IMG:
        cases.append(run(pipe, case, "txt2img"))
    pipe = StableDiffusionXLImg2ImgPipeline.from_pretrained(path)
    pipe.set_progress_bar_config(disable=True)
    for case in IMG2IMG:
        cases.append(run(pipe, case, "img2img"))
    for case in TURBO:
        if case["model"] == "tiny-sdxl-turbo":
            pipe = StableDiffusionXLPipeline.from_pretrained(path)
        else:
            pipe = load_sd2(ROOT / "models" / "tiny-sd2")
        pipe.scheduler = EulerAncestralDiscreteScheduler.from_config(
            pipe.scheduler.config, timestep_spacing="trailing")
        pipe.set_progress_bar_config(disable=True)
        cases.append(run(pipe, case, "txt2img"))
    for case in INPAINT:
        pipe = StableDiffusionXLInpaintPipeline.from_pretrained(ROOT / "models" / case["model"])
        pipe.set_progress_bar_config(disable=True)
        cases.append(run(pipe, case, "inpaint"))
    tokens = {}
    for sub in ["tokenizer", "tokenizer_2"]:
        d = ROOT / "models" / "tiny-sdxl-inpaint" / sub
        assert not (d / "vocab.json").exists(), "expected a tokenizer.json-only folder"
        tok = CLIPTokenizer.from_pretrained(d)
        tokens[sub] = [{"prompt": p, "ids": tok(p, padding="max_length", max_length=77,
                                                 truncation=True).input_ids}
                       for p in PROMPTS]
    (REF / "tokens.json").write_text(json.dumps(tokens) + "\n")
    vae_tiled()
    (REF / "cases.json").write_text(json.dumps({"cases": cases}, indent=1) + "\n")
    total = sum(p.stat().st_size for p in ROOT.rglob("*") if p.is_file())
    print(f"fixtures: {total / 1e6:.2f} MB")


if __name__ == "__main__":
    main()
