#!/usr/bin/env python3
"""Single-file Stable Diffusion checkpoints (original LDM key names, as published on model hubs)
of the tiny models, and diffusers' `from_single_file` outputs on them.

Needs make_fixtures.py and make_inpaint_fixtures.py. Writes under fixtures/single_file/:
  (checkpoints in f16, as most published ones; the references run in f32 on those values)
  tiny-sd1.safetensors          tiny-sd1 as one LDM checkpoint (UNet `model.diffusion_model.`,
                                VAE `first_stage_model.`, CLIP `cond_stage_model.transformer.`)
  tiny-sd1-inpaint.safetensors  the 9-channel inpainting model
  tiny-sd2.safetensors          an SD 2.x-like model (v-prediction, linear projections, OpenCLIP
                                text encoder `cond_stage_model.model.` with fused in_proj and one
                                layer more than the pipeline uses, as SD 2.x checkpoints)
  tiny-sd2-components/          its configs, tokenizer and scheduler without weights (what
                                diffusers takes as `config=`)
  vae-ldm.safetensors           another VAE with LDM names and no prefix (an A1111 .vae file)
  reference/<case>.safetensors  `images` from diffusers' from_single_file pipelines
  cases.json
Every checkpoint is checked to load through diffusers' own single-file conversion to exactly
the diffusers weights it was written from.
Deterministic.
"""
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
from diffusers import (AutoencoderKL, StableDiffusionInpaintPipeline,  # noqa: E402
                       StableDiffusionPipeline, UNet2DConditionModel)
from make_fixtures import load_sd2  # noqa: E402
from PIL import Image  # noqa: E402

FIX = Path(__file__).resolve().parent.parent / "fixtures"
OUT = FIX / "single_file"

CASES = [
    dict(name="sd1", file="tiny-sd1.safetensors", components="models/tiny-sd1",
         prompt="a photo of a cat", steps=4, guidance=7.5, seed=3, size=32),
    dict(name="sd2", file="tiny-sd2.safetensors", components="single_file/tiny-sd2-components",
         prompt="green trees", steps=4, guidance=6.0, seed=5, size=32),
    dict(name="sd1-vae", file="tiny-sd1.safetensors", components="models/tiny-sd1",
         vae="vae-ldm.safetensors", prompt="a red chair", steps=3, guidance=7.5, seed=8, size=32),
    dict(name="sd1-inpaint", file="tiny-sd1-inpaint.safetensors",
         components="models/tiny-sd1-inpaint", prompt="a red chair", steps=4, guidance=7.5,
         seed=2, size=32, image="square32.png", mask="mask-rgb32.png"),
]


def unet_to_ldm(sd, cfg):
    """diffusers UNet2DConditionModel names -> LDM `UNetModel` names."""
    L = cfg["layers_per_block"]
    n = len(cfg["block_out_channels"])
    out = {}

    def put(new_prefix, old_prefix, renames=()):
        for k, v in sd.items():
            if k.startswith(old_prefix + "."):
                rest = k[len(old_prefix) + 1:]
                for a, b in renames:
                    if rest.startswith(a + "."):
                        rest = b + rest[len(a):]
                out[f"{new_prefix}.{rest}"] = v

    resnet = [("norm1", "in_layers.0"), ("conv1", "in_layers.2"), ("time_emb_proj", "emb_layers.1"),
              ("norm2", "out_layers.0"), ("conv2", "out_layers.3"), ("conv_shortcut", "skip_connection")]
    put("time_embed.0", "time_embedding.linear_1")
    put("time_embed.2", "time_embedding.linear_2")
    put("input_blocks.0.0", "conv_in")
    put("out.0", "conv_norm_out")
    put("out.2", "conv_out")
    for b in range(n):
        for j in range(L):
            i = 1 + b * (L + 1) + j
            put(f"input_blocks.{i}.0", f"down_blocks.{b}.resnets.{j}", resnet)
            put(f"input_blocks.{i}.1", f"down_blocks.{b}.attentions.{j}")
        if b < n - 1:
            put(f"input_blocks.{1 + b * (L + 1) + L}.0.op", f"down_blocks.{b}.downsamplers.0.conv")
    put("middle_block.0", "mid_block.resnets.0", resnet)
    put("middle_block.1", "mid_block.attentions.0")
    put("middle_block.2", "mid_block.resnets.1", resnet)
    for b in range(n):
        has_attn = any(k.startswith(f"up_blocks.{b}.attentions.") for k in sd)
        for j in range(L + 1):
            i = b * (L + 1) + j
            put(f"output_blocks.{i}.0", f"up_blocks.{b}.resnets.{j}", resnet)
            put(f"output_blocks.{i}.1", f"up_blocks.{b}.attentions.{j}")
        if b < n - 1:
            i = b * (L + 1) + L
            put(f"output_blocks.{i}.{2 if has_attn else 1}.conv", f"up_blocks.{b}.upsamplers.0.conv")
    assert len(out) == len(sd), (len(out), len(sd))
    return {f"model.diffusion_model.{k}": v for k, v in out.items()}


def vae_to_ldm(sd, cfg):
    """diffusers AutoencoderKL names -> LDM `AutoencoderKL` names (attention as 1x1 convs)."""
    n = len(cfg["block_out_channels"])
    out = {}
    attn = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
    for k, v in sd.items():
        new = k
        for a, b in [("conv_norm_out", "norm_out"), ("mid_block.resnets.0", "mid.block_1"),
                     ("mid_block.resnets.1", "mid.block_2"), ("mid_block.attentions.0", "mid.attn_1"),
                     ("conv_shortcut", "nin_shortcut")]:
            new = new.replace(a, b)
        for i in range(n):
            new = new.replace(f"encoder.down_blocks.{i}.resnets.", f"encoder.down.{i}.block.")
            new = new.replace(f"encoder.down_blocks.{i}.downsamplers.0.conv", f"encoder.down.{i}.downsample.conv")
            new = new.replace(f"decoder.up_blocks.{i}.resnets.", f"decoder.up.{n - 1 - i}.block.")
            new = new.replace(f"decoder.up_blocks.{i}.upsamplers.0.conv", f"decoder.up.{n - 1 - i}.upsample.conv")
        if ".mid.attn_1." in new:
            head, leaf = new.split(".mid.attn_1.")
            name, p = leaf.rsplit(".", 1)
            new = f"{head}.mid.attn_1.{attn[name]}.{p}"
            if p == "weight" and v.dim() == 2:
                v = v[:, :, None, None]
        out[new] = v
    return out


def clip_to_ldm(sd):
    return {"cond_stage_model.transformer." + (k if k.startswith("text_model.") else "text_model." + k): v
            for k, v in sd.items()}


def clip_to_open_clip(sd, cfg, gen):
    """transformers CLIPTextModel names -> OpenCLIP names, plus one more (unused) layer."""
    sd = {k.removeprefix("text_model."): v for k, v in sd.items()}
    out = {"token_embedding.weight": sd["embeddings.token_embedding.weight"],
           "positional_embedding": sd["embeddings.position_embedding.weight"],
           "ln_final.weight": sd["final_layer_norm.weight"],
           "ln_final.bias": sd["final_layer_norm.bias"]}
    d = cfg["hidden_size"]
    layers = cfg["num_hidden_layers"]
    for i in range(layers + 1):
        src = f"encoder.layers.{min(i, layers - 1)}."
        o = f"transformer.resblocks.{i}."
        noise = (lambda t: t + 0.1 * torch.randn(t.shape, generator=gen)) if i == layers else (lambda t: t)
        for p in ("weight", "bias"):
            out[o + f"ln_1.{p}"] = noise(sd[src + f"layer_norm1.{p}"])
            out[o + f"ln_2.{p}"] = noise(sd[src + f"layer_norm2.{p}"])
            out[o + f"attn.in_proj_{p}"] = noise(torch.cat(
                [sd[src + f"self_attn.{x}_proj.{p}"] for x in "qkv"]))
            out[o + f"attn.out_proj.{p}"] = noise(sd[src + f"self_attn.out_proj.{p}"])
            out[o + f"mlp.c_fc.{p}"] = noise(sd[src + f"mlp.fc1.{p}"])
            out[o + f"mlp.c_proj.{p}"] = noise(sd[src + f"mlp.fc2.{p}"])
    out["text_projection"] = torch.randn((d, d), generator=gen)
    out["logit_scale"] = torch.tensor(4.6)
    return {"cond_stage_model.model." + k: v for k, v in out.items()}


def folder_weights(folder, name, stem):
    d = folder / name
    for f in (f"{stem}.safetensors", f"{stem}.fp16.safetensors"):
        if (d / f).is_file():
            return {k: v.float() for k, v in load_file(d / f).items()}
    raise FileNotFoundError(d)


def write_checkpoint(folder, path, open_clip=False, unet_sd=None, unet_cfg=None):
    unet_cfg = unet_cfg or json.loads((folder / "unet/config.json").read_text())
    unet_sd = unet_sd or folder_weights(folder, "unet", "diffusion_pytorch_model")
    vae_cfg = json.loads((folder / "vae/config.json").read_text())
    te_cfg = json.loads((folder / "text_encoder/config.json").read_text())
    ckpt = unet_to_ldm(unet_sd, unet_cfg)
    ckpt.update({"first_stage_model." + k: v for k, v in
                 vae_to_ldm(folder_weights(folder, "vae", "diffusion_pytorch_model"), vae_cfg).items()})
    te = folder_weights(folder, "text_encoder", "model")
    if open_clip:
        ckpt.update(clip_to_open_clip(te, te_cfg, torch.Generator().manual_seed(9)))
    else:
        ckpt.update(clip_to_ldm(te))
    # Stored in f16, as most published checkpoints (and half the fixture size).
    save_file({k: v.half().contiguous() for k, v in ckpt.items()}, path)


def same_weights(a, b, what):
    sa, sb = a.state_dict(), b.state_dict()
    assert set(sa) == set(sb), (what, set(sa) ^ set(sb))
    for k in sa:
        # The checkpoints hold f16 values of the diffusers weights.
        assert torch.equal(sa[k].float(), sb[k].half().float()), (what, k)


def sd2_components():
    """tiny-sd2 with a UNet of one layer count for every block (LDM checkpoints have one)."""
    src = FIX / "models" / "tiny-sd2"
    dst = OUT / "tiny-sd2-components"
    for name in ("tokenizer", "scheduler"):
        shutil.copytree(src / name, dst / name)
    for name in ("text_encoder", "vae"):
        (dst / name).mkdir(parents=True)
        shutil.copy(src / name / "config.json", dst / name / "config.json")
    shutil.copy(src / "model_index.json", dst / "model_index.json")
    cfg = json.loads((src / "unet/config.json").read_text())
    cfg["layers_per_block"] = 1
    cfg.pop("_name_or_path", None)
    torch.manual_seed(12)
    unet = UNet2DConditionModel(**{k: v for k, v in cfg.items() if not k.startswith("_")})
    gen = torch.Generator().manual_seed(13)
    with torch.no_grad():
        for _, p in sorted(unet.named_parameters()):
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    (dst / "unet").mkdir(parents=True)
    (dst / "unet/config.json").write_text(json.dumps(dict(unet.config), indent=2, default=list) + "\n")
    return dst, {k: v.contiguous() for k, v in unet.state_dict().items()}, dict(unet.config)


def other_vae(components):
    vae = AutoencoderKL.from_pretrained(components / "vae")
    gen = torch.Generator().manual_seed(21)
    with torch.no_grad():
        for _, p in sorted(vae.named_parameters()):
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    sd = vae_to_ldm({k: v.contiguous() for k, v in vae.state_dict().items()}, dict(vae.config))
    save_file({k: v.half().contiguous() for k, v in sd.items()}, OUT / "vae-ldm.safetensors")
    return vae


def run(pipe, case):
    pipe.set_progress_bar_config(disable=True)
    kw = dict(prompt=case["prompt"], width=case["size"], height=case["size"],
              num_inference_steps=case["steps"], guidance_scale=case["guidance"],
              generator=torch.Generator("cpu").manual_seed(case["seed"]), output_type="pil")
    if "mask" in case:
        kw["image"] = Image.open(FIX / "inputs" / case["image"]).convert("RGB")
        kw["mask_image"] = Image.open(FIX / "inputs" / case["mask"])
    with torch.no_grad():
        result = pipe(**kw)
    images = np.stack([np.asarray(im.convert("RGB"), dtype=np.uint8) for im in result.images])
    save_file({"images": torch.from_numpy(images)}, OUT / "reference" / f"{case['name']}.safetensors")
    print(f"{case['name']}: images {images.shape}, pixel std {images.std():.1f}")


def main():
    torch.set_num_threads(2)
    if OUT.exists():
        shutil.rmtree(OUT)
    (OUT / "reference").mkdir(parents=True)
    models = FIX / "models"
    write_checkpoint(models / "tiny-sd1", OUT / "tiny-sd1.safetensors")
    write_checkpoint(models / "tiny-sd1-inpaint", OUT / "tiny-sd1-inpaint.safetensors")
    comp, unet_sd, unet_cfg = sd2_components()
    write_checkpoint(models / "tiny-sd2", OUT / "tiny-sd2.safetensors", open_clip=True,
                     unet_sd=unet_sd, unet_cfg=unet_cfg)
    vae = other_vae(models / "tiny-sd1")

    for case in CASES:
        components = FIX / case["components"]
        cls = StableDiffusionInpaintPipeline if "mask" in case else StableDiffusionPipeline
        pipe = cls.from_single_file(OUT / case["file"], config=str(components),
                                    torch_dtype=torch.float32, safety_checker=None,
                                    requires_safety_checker=False)
        # diffusers' conversion gives back exactly the weights the file was written from.
        if case["name"] == "sd2":
            assert all(torch.equal(pipe.unet.state_dict()[k], v.half().float())
                       for k, v in unet_sd.items())
            ref = load_sd2(models / "tiny-sd2")
            same_weights(pipe.text_encoder, ref.text_encoder, "open_clip text encoder")
            same_weights(pipe.vae, ref.vae, "vae")
        else:
            ref = cls.from_pretrained(components, safety_checker=None, requires_safety_checker=False)
            for part in ("unet", "vae", "text_encoder"):
                same_weights(getattr(pipe, part), getattr(ref, part), f"{case['name']} {part}")
        if "vae" in case:
            single_vae = AutoencoderKL.from_single_file(OUT / case["vae"], config=str(components),
                                                        subfolder="vae", torch_dtype=torch.float32)
            same_weights(single_vae, vae, "vae file")
            pipe.vae = single_vae
        run(pipe, case)
    (OUT / "cases.json").write_text(json.dumps({"cases": CASES}, indent=1) + "\n")
    total = sum(p.stat().st_size for p in OUT.rglob("*") if p.is_file())
    print(f"fixtures/single_file: {total / 1e6:.2f} MB")


if __name__ == "__main__":
    main()
