#!/usr/bin/env python3
"""Tiny FLUX pipelines in the diffusers folder layout, and diffusers' FluxPipeline outputs
from prompts (text encoders included).

Needs make_flux_fixtures.py, make_flux_pipeline_fixtures.py and make_t5_tokenizer_fixtures.py.
Writes under fixtures/flux/:
  tiny-flux-dev/, tiny-flux-schnell/   model_index.json (FluxPipeline), scheduler/,
        text_encoder/ (CLIP, hidden 24, legacy eos_token_id 2 as in FLUX's CLIP-L config),
        tokenizer/ (tiny CLIP BPE), text_encoder_2/ (T5 v1.1-like, d_model 32),
        tokenizer_2/ (the tiny T5 tokenizer), transformer/ and vae/ (the tiny ones)
  reference/flux-<case>.safetensors  `pooled_prompt_embeds`, `prompt_embeds`, `images`
  reference/flux-cases.json
Deterministic.
"""
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
from make_tokenizer_fixtures import write_tiny_clip_tokenizer  # noqa: E402

from diffusers import FluxImg2ImgPipeline, FluxPipeline  # noqa: E402
from PIL import Image  # noqa: E402
from transformers import (CLIPTextConfig, CLIPTextModel, CLIPTokenizer, T5Config,  # noqa: E402
                          T5EncoderModel, T5TokenizerFast)

ROOT = Path(__file__).resolve().parent.parent / "fixtures" / "flux"

CASES = [
    dict(name="dev-cat", model="dev", prompt="a photo of a cat", width=32, height=32, steps=4,
         guidance=3.5, seed=0, batch=1, max_sequence_length=24),
    dict(name="dev-wide-batch", model="dev", prompt="watercolor mountain river at night",
         width=48, height=32, steps=3, guidance=5.0, seed=11, batch=2, max_sequence_length=16),
    dict(name="schnell-tall", model="schnell", prompt="A red chair in the garden!", width=32,
         height=40, steps=2, guidance=0.0, seed=3, batch=1, max_sequence_length=20),
]


I2I_CASES = [
    dict(name="i2i-dev-s06", model="dev", prompt="a photo of a cat", image="square32.png",
         width=32, height=32, steps=5, strength=0.6, guidance=3.5, seed=2, batch=1,
         max_sequence_length=16),
    dict(name="i2i-dev-resize-batch", model="dev", prompt="green trees", image="odd37x29.png",
         width=48, height=32, steps=4, strength=0.75, guidance=4.0, seed=8, batch=2,
         max_sequence_length=16),
    dict(name="i2i-schnell-s1", model="schnell", prompt="a chair", image="wide48x32.png",
         width=None, height=None, steps=3, strength=1.0, guidance=0.0, seed=4, batch=1,
         max_sequence_length=12),
]


def perturb(model, seed):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "norm" in n or n.endswith("bias"):
                p.add_(0.1 * torch.randn(p.shape, generator=gen))


def build(kind):
    out = ROOT / f"tiny-flux-{kind}"
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    write_tiny_clip_tokenizer(out / "tokenizer", "<|endoftext|>")
    tok = CLIPTokenizer.from_pretrained(out / "tokenizer")
    torch.manual_seed(30)
    clip = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tok), hidden_size=24, intermediate_size=40, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=77, hidden_act="quick_gelu",
        projection_dim=24, bos_token_id=0, eos_token_id=2, pad_token_id=1)).eval()
    perturb(clip, 31)
    clip.save_pretrained(out / "text_encoder", safe_serialization=True)
    shutil.copytree(ROOT / "tokenizer_2", out / "tokenizer_2")
    t5tok = T5TokenizerFast.from_pretrained(out / "tokenizer_2")
    torch.manual_seed(32)
    t5 = T5EncoderModel(T5Config(
        vocab_size=len(t5tok), d_model=32, d_kv=8, d_ff=48, num_layers=2, num_heads=4,
        feed_forward_proj="gated-gelu", relative_attention_num_buckets=32,
        relative_attention_max_distance=128)).eval()
    perturb(t5, 33)
    t5.save_pretrained(out / "text_encoder_2", safe_serialization=True)
    shutil.copytree(ROOT / f"transformer-{kind}", out / "transformer")
    shutil.copytree(ROOT / "vae", out / "vae")
    shutil.copytree(ROOT / f"scheduler-{kind}", out / "scheduler")
    index = {
        "_class_name": "FluxPipeline", "_diffusers_version": "0.42.1",
        "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "text_encoder_2": ["transformers", "T5EncoderModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "tokenizer_2": ["transformers", "T5TokenizerFast"],
        "transformer": ["diffusers", "FluxTransformer2DModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }
    (out / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
    return FluxPipeline.from_pretrained(out)


def main():
    torch.set_num_threads(2)
    pipes = {kind: build(kind) for kind in ("dev", "schnell")}
    cases = []
    for case in CASES:
        pipe = pipes[case["model"]]
        pipe.set_progress_bar_config(disable=True)
        with torch.no_grad():
            embeds, pooled, _ = pipe.encode_prompt(
                prompt=case["prompt"], prompt_2=None,
                max_sequence_length=case["max_sequence_length"])
            result = pipe(
                prompt=case["prompt"], width=case["width"], height=case["height"],
                num_inference_steps=case["steps"], guidance_scale=case["guidance"],
                num_images_per_prompt=case["batch"],
                max_sequence_length=case["max_sequence_length"],
                generator=torch.Generator("cpu").manual_seed(case["seed"]), output_type="pil")
        images = np.stack([np.asarray(im.convert("RGB"), dtype=np.uint8) for im in result.images])
        save_file({"prompt_embeds": embeds.contiguous(), "pooled_prompt_embeds": pooled.contiguous(),
                   "images": torch.from_numpy(images)},
                  ROOT / "reference" / f"flux-{case['name']}.safetensors")
        print(f"{case['name']}: images {images.shape}, embeds {tuple(embeds.shape)}")
        cases.append(case)
    (ROOT / "reference" / "flux-cases.json").write_text(json.dumps({"cases": cases}, indent=1) + "\n")
    inputs = ROOT.parent / "inputs"
    i2i = []
    for case in I2I_CASES:
        pipe = FluxImg2ImgPipeline.from_pipe(pipes[case["model"]])
        pipe.set_progress_bar_config(disable=True)
        image = Image.open(inputs / case["image"]).convert("RGB")
        with torch.no_grad():
            result = pipe(
                prompt=case["prompt"], image=image, strength=case["strength"],
                width=case["width"], height=case["height"], num_inference_steps=case["steps"],
                guidance_scale=case["guidance"], num_images_per_prompt=case["batch"],
                max_sequence_length=case["max_sequence_length"],
                generator=torch.Generator("cpu").manual_seed(case["seed"]), output_type="pil")
        images = np.stack([np.asarray(im.convert("RGB"), dtype=np.uint8) for im in result.images])
        save_file({"images": torch.from_numpy(images)},
                  ROOT / "reference" / f"flux-{case['name']}.safetensors")
        print(f"{case['name']}: images {images.shape}")
        i2i.append(case)
    (ROOT / "reference" / "flux-i2i-cases.json").write_text(json.dumps({"cases": i2i}, indent=1) + "\n")
    total = sum(p.stat().st_size for p in ROOT.rglob("*") if p.is_file())
    print(f"fixtures/flux: {total / 1e6:.2f} MB")


if __name__ == "__main__":
    main()
