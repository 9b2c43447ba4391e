#!/usr/bin/env python3
"""Times diffusers/PyTorch on the shapes of `sd-worker bench`: CLIP encode of 77 tokens,
one UNet step (batch 2 for CFG, 4x64x64 latents) and a VAE decode (64x64 latents to 512x512),
on the full-size Stable Diffusion 1.5 architecture with random weights, f32 on the CPU.

    python scripts/bench_diffusers.py [--runs 3] [--warmup 1] [--threads 2] [--stages clip,unet,vae]

Stage `unet-lora` (needs peft) adds a rank-16 LoRA to every linear and convolution layer.
Stages `sdxl-unet` and `sdxl-vae` time the SDXL base UNet (with its text_time conditioning) and
VAE at `--sdxl-size` (default 1024: 128x128 latents).

Stage `flux` times one FLUX.1-dev transformer call (`FluxTransformer2DModel`, batch 1, 512
T5 tokens, guidance embedded) at `--flux-size` (default 1024) with `--flux-layers D,S` blocks
(default 19,38, the full model; fewer blocks fit a machine with less memory).

Prints one JSON object, like `sd-worker bench --json`.
"""

import argparse
import json
import statistics
import time

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

UNET = dict(
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
    block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    cross_attention_dim=768, attention_head_dim=8,
)
VAE = dict(
    in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2,
    block_out_channels=(128, 256, 512, 512),
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
    sample_size=512,
)
SDXL_UNET = dict(
    sample_size=128, in_channels=4, out_channels=4, layers_per_block=2,
    block_out_channels=(320, 640, 1280),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20),
    cross_attention_dim=2048, use_linear_projection=True, addition_embed_type="text_time",
    addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816,
)
CLIP = dict(
    vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
    num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu",
)


def timed(fn, warmup, runs):
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(runs):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--stages", default="clip,unet,vae")
    ap.add_argument("--sdxl-size", type=int, default=1024)
    ap.add_argument("--flux-size", type=int, default=1024)
    ap.add_argument("--flux-layers", default="19,38")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    stages = {}
    with torch.inference_mode():
        for stage in [s.strip() for s in a.stages.split(",") if s.strip()]:
            if stage == "clip":
                model = CLIPTextModel(CLIPTextConfig(**CLIP)).eval()
                ids = torch.arange(77).unsqueeze(0)
                times = timed(lambda: model(ids), a.warmup, a.runs)
                shape = "1x77 tokens"
            elif stage in ("unet", "unet-lora"):
                model = UNet2DConditionModel(**UNET).eval()
                if stage == "unet-lora":
                    # As `sd-worker bench --stages unet-lora`: a rank-16 PEFT LoRA (unmerged)
                    # on every linear and convolution layer.
                    from peft import LoraConfig
                    names = [n for n, m in model.named_modules()
                             if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))]
                    model.add_adapter(LoraConfig(r=16, lora_alpha=16, target_modules=names,
                                                 init_lora_weights=False))
                x = torch.randn(2, 4, 64, 64)
                ctx = torch.randn(2, 77, 768)
                t = torch.tensor(999)
                times = timed(lambda: model(x, t, encoder_hidden_states=ctx), a.warmup, a.runs)
                shape = "batch 2 (CFG), 4x64x64 latents"
                if stage == "unet-lora":
                    shape += f", rank-16 LoRA on all {len(names)} layers"
            elif stage == "vae":
                model = AutoencoderKL(**VAE).eval()
                z = torch.randn(1, 4, 64, 64)
                times = timed(lambda: model.decode(z), a.warmup, a.runs)
                shape = "1x4x64x64 latents -> 512x512"
            elif stage == "sdxl-unet":
                model = UNet2DConditionModel(**SDXL_UNET).eval()
                lat, s = a.sdxl_size // 8, float(a.sdxl_size)
                x = torch.randn(2, 4, lat, lat)
                ctx = torch.randn(2, 77, 2048)
                added = {"text_embeds": torch.randn(2, 1280),
                         "time_ids": torch.tensor([[s, s, 0.0, 0.0, s, s]] * 2)}
                t = torch.tensor(999)
                times = timed(lambda: model(x, t, encoder_hidden_states=ctx,
                                            added_cond_kwargs=added), a.warmup, a.runs)
                shape = f"batch 2 (CFG), 4x{lat}x{lat} latents"
            elif stage == "sdxl-vae":
                model = AutoencoderKL(**VAE, scaling_factor=0.13025).eval()
                lat = a.sdxl_size // 8
                z = torch.randn(1, 4, lat, lat)
                times = timed(lambda: model.decode(z), a.warmup, a.runs)
                shape = f"1x4x{lat}x{lat} latents -> {a.sdxl_size}x{a.sdxl_size}"
            elif stage == "flux":
                from diffusers import FluxTransformer2DModel
                from diffusers.pipelines.flux.pipeline_flux import FluxPipeline
                double, single = (int(x) for x in a.flux_layers.split(","))
                model = FluxTransformer2DModel(
                    num_layers=double, num_single_layers=single, guidance_embeds=True,
                ).eval()
                side = a.flux_size // 16
                img = torch.randn(1, side * side, 64)
                txt = torch.randn(1, 512, 4096)
                pooled = torch.randn(1, 768)
                img_ids = FluxPipeline._prepare_latent_image_ids(1, side, side, "cpu", torch.float32)
                txt_ids = torch.zeros(512, 3)
                call = lambda: model(
                    hidden_states=img, encoder_hidden_states=txt, pooled_projections=pooled,
                    timestep=torch.tensor([1.0]), guidance=torch.tensor([3.5]),
                    img_ids=img_ids, txt_ids=txt_ids, return_dict=False,
                )
                times = timed(call, a.warmup, a.runs)
                shape = (f"{a.flux_size}x{a.flux_size}: {side * side} image + 512 text tokens, "
                         f"{double}+{single} blocks")
            else:
                raise SystemExit(f"unknown stage {stage!r}")
            stages[stage] = {"shape": shape, "median_s": statistics.median(times), "times_s": times}
            del model
    print(json.dumps({
        "impl": f"diffusers {__import__('diffusers').__version__} / torch {torch.__version__}",
        "device": "cpu", "dtype": "f32", "threads": a.threads, "stages": stages,
    }))


if __name__ == "__main__":
    main()
