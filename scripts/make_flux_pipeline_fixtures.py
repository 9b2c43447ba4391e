#!/usr/bin/env python3
"""diffusers' FluxPipeline on the tiny FLUX transformers, from given prompt embeddings.

Needs the transformers written by make_flux_fixtures.py. Writes under fixtures/flux/:
  vae/                a tiny FLUX-like AutoencoderKL (no quant convs, scaling and shift factor)
  scheduler-dev/, scheduler-schnell/   FlowMatchEulerDiscreteScheduler configs as FLUX.1
                      dev (dynamic shifting) and schnell (shift 1) publish them
  reference/pipeline-<case>.safetensors  `prompt_embeds`, `pooled_prompt_embeds`, the packed
                      initial latents `latents_init`, the packed latents after step 1
                      `latents_step1` and at the end `latents_final`, and the final `images`
  reference/pipeline-cases.json
Text encoders are not involved: the pipeline is called with prompt_embeds and
pooled_prompt_embeds. Deterministic.
"""
import json
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

from diffusers import (AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline,
                       FluxTransformer2DModel)

ROOT = Path(__file__).resolve().parent.parent / "fixtures" / "flux"

SCHEDULERS = {
    "dev": dict(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5,
                max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096),
    "schnell": dict(num_train_timesteps=1000, shift=1.0, use_dynamic_shifting=False),
}

CASES = [
    dict(name="dev-48x32", model="dev", width=48, height=32, steps=4, guidance=3.5, seed=0, batch=1),
    dict(name="dev-batch-32x40", model="dev", width=32, height=40, steps=3, guidance=5.0, seed=5,
         batch=2),
    dict(name="schnell-32x32", model="schnell", width=32, height=32, steps=4, guidance=0.0, seed=1,
         batch=1),
]


def build_vae():
    torch.manual_seed(7)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, block_out_channels=(8, 16),
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        latent_channels=4, layers_per_block=1, norm_num_groups=4, sample_size=32,
        scaling_factor=0.3611, shift_factor=0.1159, use_quant_conv=False,
        use_post_quant_conv=False,
    ).eval()
    gen = torch.Generator().manual_seed(8)
    with torch.no_grad():
        for n, p in vae.named_parameters():
            if "norm" in n or n.endswith("bias"):
                p.add_(0.1 * torch.randn(p.shape, generator=gen))
    out = ROOT / "vae"
    if out.exists():
        shutil.rmtree(out)
    vae.save_pretrained(out, safe_serialization=True)
    return AutoencoderKL.from_pretrained(out).eval()


def main():
    torch.set_num_threads(2)
    vae = build_vae()
    scheds = {}
    for name, cfg in SCHEDULERS.items():
        s = FlowMatchEulerDiscreteScheduler(**cfg)
        out = ROOT / f"scheduler-{name}"
        if out.exists():
            shutil.rmtree(out)
        s.save_pretrained(out)
        scheds[name] = FlowMatchEulerDiscreteScheduler.from_pretrained(out)
    gen = torch.Generator().manual_seed(9)
    cases = []
    for case in CASES:
        transformer = FluxTransformer2DModel.from_pretrained(ROOT / f"transformer-{case['model']}").eval()
        pipe = FluxPipeline(scheduler=scheds[case["model"]], vae=vae, text_encoder=None,
                            tokenizer=None, text_encoder_2=None, tokenizer_2=None,
                            transformer=transformer)
        pipe.set_progress_bar_config(disable=True)
        embeds = torch.randn((1, 7, 32), generator=gen)
        pooled = torch.randn((1, 24), generator=gen)
        captured = {}

        def on_step_end(p, i, t, kw):
            if i == 0:
                captured["latents_step1"] = kw["latents"].detach().clone()
            captured["latents_final"] = kw["latents"].detach().clone()
            return {}

        orig = pipe.prepare_latents

        def prepare_latents(*a, **k):
            out = orig(*a, **k)
            captured["latents_init"] = out[0].detach().clone()
            return out

        pipe.prepare_latents = prepare_latents
        with torch.no_grad():
            result = pipe(
                prompt_embeds=embeds, pooled_prompt_embeds=pooled, width=case["width"],
                height=case["height"], num_inference_steps=case["steps"],
                guidance_scale=case["guidance"], num_images_per_prompt=case["batch"],
                generator=torch.Generator("cpu").manual_seed(case["seed"]), output_type="pil",
                callback_on_step_end=on_step_end, callback_on_step_end_tensor_inputs=["latents"],
            )
        images = np.stack([np.asarray(im.convert("RGB"), dtype=np.uint8) for im in result.images])
        save_file({
            "prompt_embeds": embeds, "pooled_prompt_embeds": pooled,
            "latents_init": captured["latents_init"], "latents_step1": captured["latents_step1"],
            "latents_final": captured["latents_final"], "images": torch.from_numpy(images),
        }, ROOT / "reference" / f"pipeline-{case['name']}.safetensors")
        print(f"{case['name']}: images {images.shape}, pixel std {images.std():.1f}")
        cases.append(case)
    (ROOT / "reference" / "pipeline-cases.json").write_text(json.dumps({"cases": cases}, indent=1) + "\n")


if __name__ == "__main__":
    main()
