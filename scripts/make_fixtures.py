#!/usr/bin/env python3
"""Generates the tiny Stable Diffusion test models and diffusers' reference outputs.

Writes, under fixtures/ at the repository root:
  models/tiny-sd1/   an SD 1.x-like diffusers folder (epsilon, PNDM, CLIP quick_gelu, pad <|endoftext|>)
  models/tiny-sd2/   an SD 2.x-like diffusers folder (v_prediction, DDIM trailing, gelu, pad "!",
                     linear projections, upcast attention, fp16 VAE variant, text_model. prefix)
  reference/<case>.safetensors  diffusers' outputs: final uint8 images, the initial noise,
                     the first UNet call's inputs and output, the latents after step 1, the
                     final latents and the VAE's float decode of them
  reference/cases.json          the parameters of every case
  unets/<name>/      UNets with the less common config options (lists per block, heads that
                     do not divide the channels, no mid block, padding 0, ...), and
  reference/<name>.safetensors  one diffusers forward pass of each

Run with the venv described in the README:  python scripts/make_fixtures.py
Weights are random (seeded), so the folders are only useful for parity tests.
"""

import json
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
from make_tokenizer_fixtures import write_tiny_clip_tokenizer  # noqa: E402

from diffusers import (  # noqa: E402
    AutoencoderKL,
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    PNDMScheduler,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent / "fixtures"

SCHEDULERS = {
    "ddim": (DDIMScheduler, {}),
    "pndm": (PNDMScheduler, {}),
    "euler": (EulerDiscreteScheduler, {}),
    "euler-a": (EulerAncestralDiscreteScheduler, {}),
    "dpmpp-2m": (DPMSolverMultistepScheduler,
                 {"algorithm_type": "dpmsolver++", "solver_order": 2, "use_karras_sigmas": False}),
    "dpmpp-2m-karras": (DPMSolverMultistepScheduler,
                        {"algorithm_type": "dpmsolver++", "solver_order": 2, "use_karras_sigmas": True}),
}

LONG_PROMPT = " ".join(
    ["a photo of a cat sitting on a red chair in the garden, with a blue sky and green trees"] * 6
)


def jitter_norms(module, gen):
    """Random affine parameters for the norm layers, so that loading them is tested."""
    for m in module.modules():
        if isinstance(m, (torch.nn.GroupNorm, torch.nn.LayerNorm)) and m.weight is not None:
            with torch.no_grad():
                m.weight.copy_(1.0 + 0.2 * torch.randn(m.weight.shape, generator=gen))
                m.bias.copy_(0.2 * torch.randn(m.bias.shape, generator=gen))


def build(kind):
    gen = torch.Generator().manual_seed(1 if kind == "sd1" else 2)
    torch.manual_seed(1 if kind == "sd1" else 2)
    out = ROOT / "models" / f"tiny-{kind}"
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    pad = "<|endoftext|>" if kind == "sd1" else "!"
    write_tiny_clip_tokenizer(out / "tokenizer", pad)
    tokenizer = CLIPTokenizer.from_pretrained(out / "tokenizer")

    te_cfg = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=77,
        hidden_act="quick_gelu" if kind == "sd1" else "gelu",
        layer_norm_eps=1e-5,
        projection_dim=32,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    text_encoder = CLIPTextModel(te_cfg).eval()
    jitter_norms(text_encoder, gen)

    if kind == "sd1":
        unet = UNet2DConditionModel(
            sample_size=16,
            in_channels=4,
            out_channels=4,
            block_out_channels=(16, 32),
            layers_per_block=1,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=32,
            attention_head_dim=4,
            norm_num_groups=8,
        )
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
            scaling_factor=0.18215,
        )
        scheduler = PNDMScheduler(
            beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
            num_train_timesteps=1000, set_alpha_to_one=False, skip_prk_steps=True,
            steps_offset=1, prediction_type="epsilon",
        )
    else:
        unet = UNet2DConditionModel(
            sample_size=8,
            in_channels=4,
            out_channels=4,
            block_out_channels=(16, 16, 32),
            layers_per_block=(2, 1, 1),
            down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=32,
            attention_head_dim=(2, 4, 4),
            use_linear_projection=True,
            upcast_attention=True,
            norm_num_groups=8,
        )
        vae = AutoencoderKL(
            in_channels=3,
            out_channels=3,
            block_out_channels=(8, 8, 16),
            down_block_types=("DownEncoderBlock2D",) * 3,
            up_block_types=("UpDecoderBlock2D",) * 3,
            latent_channels=4,
            layers_per_block=1,
            norm_num_groups=4,
            sample_size=32,
            scaling_factor=0.13025,
        )
        scheduler = DDIMScheduler(
            beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
            num_train_timesteps=1000, set_alpha_to_one=False, clip_sample=False,
            steps_offset=1, prediction_type="v_prediction", timestep_spacing="trailing",
        )
    jitter_norms(unet, gen)
    jitter_norms(vae, gen)
    if kind == "sd2":
        # The VAE ships as an fp16 variant only: round its weights so the reference uses
        # exactly what the file holds.
        vae = vae.half().float()

    pipe = StableDiffusionPipeline(
        vae=vae.eval(), text_encoder=text_encoder, tokenizer=tokenizer, unet=unet.eval(),
        scheduler=scheduler, safety_checker=None, feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(out, safe_serialization=True)
    if kind == "sd2":
        # fp16 variant file for the VAE, and the `text_model.` key prefix of published repos.
        (out / "vae" / "diffusion_pytorch_model.safetensors").unlink()
        vae.half().save_pretrained(out / "vae", variant="fp16", safe_serialization=True)
        vae.float()
        te_file = out / "text_encoder" / "model.safetensors"
        tensors = load_file(te_file)
        save_file({("text_model." + k if not k.startswith("text_model.") else k): v
                   for k, v in tensors.items()}, te_file, metadata={"format": "pt"})
    for junk in ["feature_extractor", "safety_checker"]:
        if (out / junk).exists():
            shutil.rmtree(out / junk)
    return pipe


SD1_CASES = [
    dict(name="sd1-pndm-cfg", scheduler=None, prompt="a photo of a cat", steps=10, guidance=7.5, seed=0),
    dict(name="sd1-ddim-neg", scheduler="ddim", prompt="a red chair in the garden",
         negative_prompt="blurry, dark", steps=8, guidance=5.0, seed=42),
    dict(name="sd1-euler-nocfg-wide", scheduler="euler", prompt="green trees", steps=9, guidance=1.0,
         seed=7, width=48, height=32),
    dict(name="sd1-euler-a-batch", scheduler="euler-a", prompt="a blue sky", steps=7, guidance=7.5,
         seed=1234, batch=2),
    dict(name="sd1-dpmpp-2m-long", scheduler="dpmpp-2m", prompt=LONG_PROMPT, steps=12, guidance=6.0,
         seed=3),
    dict(name="sd1-dpmpp-2m-karras-tall", scheduler="dpmpp-2m-karras", prompt="a cat on a chair",
         steps=10, guidance=7.5, seed=99, width=32, height=48),
    # Latents of 36 x 32, 18 x 16 in the UNet's second block: Winograd convolutions (images of
    # 16 and more a side in the worker) with partial edge tiles.
    dict(name="sd1-euler-large", scheduler="euler", prompt="a photo of a cat", steps=5,
         guidance=7.5, seed=17, width=72, height=64),
]

SD2_CASES = [
    dict(name="sd2-ddim-cfg", scheduler=None, prompt="a photo of a cat", steps=8, guidance=7.5, seed=0),
    dict(name="sd2-euler-odd", scheduler="euler", prompt="a red chair", steps=10, guidance=7.5, seed=5,
         width=40, height=24),
    dict(name="sd2-euler-a-batch-neg", scheduler="euler-a", prompt="green garden",
         negative_prompt="a cat", steps=6, guidance=4.0, seed=11, batch=2),
    dict(name="sd2-dpmpp-2m-nocfg", scheduler="dpmpp-2m", prompt="blue sky with trees", steps=9,
         guidance=1.0, seed=21),
    dict(name="sd2-dpmpp-2m-karras", scheduler="dpmpp-2m-karras", prompt=LONG_PROMPT, steps=10,
         guidance=7.5, seed=8),
    dict(name="sd2-pndm-wide", scheduler="pndm", prompt="a chair", steps=7, guidance=3.0, seed=2,
         width=48, height=32),
]


def run_case(pipe, base_sched_config, case, default_size):
    if case["scheduler"] is not None:
        cls, overrides = SCHEDULERS[case["scheduler"]]
        pipe.scheduler = cls.from_config(base_sched_config, **overrides)
    else:
        pipe.scheduler = type(pipe.scheduler).from_config(base_sched_config)
    width = case.get("width", default_size)
    height = case.get("height", default_size)
    batch = case.get("batch", 1)
    captured = {}

    def hook(module, args, kwargs, output):
        if "unet_in" in captured:
            return
        captured["unet_in"] = args[0].detach().clone()
        t = args[1]
        captured["timestep"] = torch.tensor([float(t)], dtype=torch.float64)
        captured["prompt_embeds"] = kwargs["encoder_hidden_states"].detach().clone()
        captured["unet_out"] = output[0].detach().clone()

    handle = pipe.unet.register_forward_hook(hook, with_kwargs=True)

    def on_step_end(p, i, t, kw):
        if i == 0:
            captured["latents_step1"] = kw["latents"].detach().clone()
        captured["latents_final"] = kw["latents"].detach().clone()
        return {}

    f = pipe.vae_scale_factor
    noise = torch.randn((batch, 4, height // f, width // f),
                        generator=torch.Generator("cpu").manual_seed(case["seed"]))
    with torch.no_grad():
        result = pipe(
            prompt=case["prompt"],
            negative_prompt=case.get("negative_prompt"),
            width=width,
            height=height,
            num_inference_steps=case["steps"],
            guidance_scale=case["guidance"],
            num_images_per_prompt=batch,
            generator=torch.Generator("cpu").manual_seed(case["seed"]),
            output_type="pil",
            callback_on_step_end=on_step_end,
            callback_on_step_end_tensor_inputs=["latents"],
        )
    handle.remove()
    with torch.no_grad():
        captured["decoded"] = pipe.vae.decode(
            captured["latents_final"] / pipe.vae.config.scaling_factor
        ).sample
    images = np.stack([np.asarray(im.convert("RGB"), dtype=np.uint8) for im in result.images])
    tensors = {
        "images": torch.from_numpy(images),
        "noise": noise,
        **{k: v.float().contiguous() for k, v in captured.items() if k != "timestep"},
        "timestep": captured["timestep"].float(),
    }
    save_file({k: v.contiguous() for k, v in tensors.items()},
              ROOT / "reference" / f"{case['name']}.safetensors")
    spread = images.astype(np.float32).std()
    print(f"{case['name']}: {images.shape}, pixel std {spread:.1f}, timesteps {len(pipe.scheduler.timesteps)}")
    return {
        "name": case["name"],
        "model": None,
        "prompt": case["prompt"],
        "negative_prompt": case.get("negative_prompt"),
        "width": width,
        "height": height,
        "steps": case["steps"],
        "guidance": case["guidance"],
        "seed": case["seed"],
        "scheduler": case["scheduler"],
        "batch": batch,
    }


# UNets with the less common config options, checked with one forward pass each.
UNET_CONFIGS = {
    "unet-mixed": dict(
        sample_size=(8, 12),
        in_channels=4,
        out_channels=4,
        center_input_sample=True,
        flip_sin_to_cos=False,
        freq_shift=1,
        block_out_channels=(8, 16, 16),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D", "CrossAttnUpBlock2D"),
        layers_per_block=(1, 2, 1),
        transformer_layers_per_block=(1, 2, 1),
        attention_head_dim=(2, 3, 4),
        only_cross_attention=(False, True, False),
        downsample_padding=0,
        mid_block_scale_factor=1.5,
        resnet_out_scale_factor=1.25,
        time_embedding_dim=48,
        conv_in_kernel=5,
        conv_out_kernel=1,
        cross_attention_dim=12,
        act_fn="swish",
        norm_num_groups=4,
        norm_eps=1e-4,
    ),
    "unet-nomid-linear": dict(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(8, 16),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        mid_block_type=None,
        layers_per_block=1,
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        upcast_attention=True,
        cross_attention_dim=12,
        norm_num_groups=4,
    ),
}


def build_unets():
    """Writes fixtures/unets/<name>/ and a reference forward pass for each."""
    out = {}
    for i, (name, cfg) in enumerate(UNET_CONFIGS.items()):
        gen = torch.Generator().manual_seed(100 + i)
        torch.manual_seed(100 + i)
        unet = UNet2DConditionModel(**cfg).eval()
        jitter_norms(unet, gen)
        folder = ROOT / "unets" / name
        if folder.exists():
            shutil.rmtree(folder)
        unet.save_pretrained(folder, safe_serialization=True)
        # Odd latent sizes exercise the upsampling to the skip connections' sizes.
        sample = torch.randn((2, 4, 7, 5), generator=gen)
        context = torch.randn((2, 6, 12), generator=gen)
        t = torch.tensor(617)
        with torch.no_grad():
            y = unet(sample, t, encoder_hidden_states=context).sample
        save_file({"sample": sample, "context": context, "timestep": torch.tensor([617.0]),
                   "output": y.contiguous()}, ROOT / "reference" / f"{name}.safetensors")
        print(f"{name}: output std {y.std():.3f}")
        out[name] = True
    return out


def main():
    torch.set_num_threads(2)
    ref = ROOT / "reference"
    if ref.exists():
        shutil.rmtree(ref)
    ref.mkdir(parents=True)
    build_unets()
    cases = []
    for kind, kind_cases in [("sd1", SD1_CASES), ("sd2", SD2_CASES)]:
        build(kind)
        pipe = StableDiffusionPipeline.from_pretrained(
            ROOT / "models" / f"tiny-{kind}",
            variant=None,
            safety_checker=None,
            requires_safety_checker=False,
        ) if kind == "sd1" else None
        if pipe is None:
            pipe = load_sd2(ROOT / "models" / "tiny-sd2")
        pipe.set_progress_bar_config(disable=True)
        base = dict(pipe.scheduler.config)
        size = pipe.unet.config.sample_size * pipe.vae_scale_factor
        for case in kind_cases:
            entry = run_case(pipe, base, case, size)
            entry["model"] = f"tiny-{kind}"
            cases.append(entry)
    (ref / "cases.json").write_text(json.dumps({"cases": cases}, indent=1) + "\n")
    total = sum(p.stat().st_size for p in ROOT.rglob("*") if p.is_file())
    print(f"fixtures: {total / 1e6:.2f} MB")


def load_sd2(path):
    """Loads the SD2 folder the way a user would (fp16 VAE variant upcast to f32)."""
    vae = AutoencoderKL.from_pretrained(path / "vae", variant="fp16", torch_dtype=torch.float32)
    return StableDiffusionPipeline.from_pretrained(
        path, vae=vae, safety_checker=None, requires_safety_checker=False
    )


if __name__ == "__main__":
    main()
