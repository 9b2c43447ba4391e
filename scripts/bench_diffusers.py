#!/usr/bin/env python3
"""Times diffusers/PyTorch on the shapes of `sd-worker bench`: CLIP encode of 77 tokens,
one UNet step (batch 2 for CFG, 4x64x64 latents) and a VAE decode (64x64 latents to 512x512),
on the full-size Stable Diffusion 1.5 architecture with random weights, f32 on the CPU.

    python scripts/bench_diffusers.py [--runs 3] [--warmup 1] [--threads 2] [--stages clip,unet,vae]

Stage `unet-lora` (needs peft) adds a rank-16 LoRA to every linear and convolution layer.

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
