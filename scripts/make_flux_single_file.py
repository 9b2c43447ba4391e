#!/usr/bin/env python3
"""The tiny FLUX transformers as single files with the original (Black Forest Labs) key names.

Needs make_flux_fixtures.py. Writes fixtures/flux/transformer-{dev,schnell}-original.safetensors:
the diffusers weights renamed and fused back (qkv, the single blocks' linear1, the final
layer's shift/scale order), the dev one with the `model.diffusion_model.` prefix of some
published checkpoints. Each file is checked to convert back to exactly the diffusers weights
with diffusers' own converter (`convert_flux_transformer_checkpoint_to_diffusers`, whose
hard-coded inner width 3072 is set to the tiny model's).
"""
import inspect
from pathlib import Path

import torch
from diffusers.loaders import single_file_utils
from safetensors.torch import load_file, save_file

ROOT = Path(__file__).resolve().parent.parent / "fixtures" / "flux"


def to_original(sd):
    out = {}
    pairs = {
        "time_text_embed.timestep_embedder.linear_1": "time_in.in_layer",
        "time_text_embed.timestep_embedder.linear_2": "time_in.out_layer",
        "time_text_embed.text_embedder.linear_1": "vector_in.in_layer",
        "time_text_embed.text_embedder.linear_2": "vector_in.out_layer",
        "time_text_embed.guidance_embedder.linear_1": "guidance_in.in_layer",
        "time_text_embed.guidance_embedder.linear_2": "guidance_in.out_layer",
        "context_embedder": "txt_in",
        "x_embedder": "img_in",
        "proj_out": "final_layer.linear",
    }
    for new, old in pairs.items():
        for p in ("weight", "bias"):
            if f"{new}.{p}" in sd:
                out[f"{old}.{p}"] = sd[f"{new}.{p}"]
    for p in ("weight", "bias"):
        shift_scale = sd[f"norm_out.linear.{p}"]
        scale, shift = shift_scale.chunk(2, dim=0)
        out[f"final_layer.adaLN_modulation.1.{p}"] = torch.cat([shift, scale])
    n_double = len({k.split(".")[1] for k in sd if k.startswith("transformer_blocks.")})
    n_single = len({k.split(".")[1] for k in sd if k.startswith("single_transformer_blocks.")})
    for i in range(n_double):
        b, o = f"transformer_blocks.{i}.", f"double_blocks.{i}."
        for p in ("weight", "bias"):
            out[f"{o}img_mod.lin.{p}"] = sd[f"{b}norm1.linear.{p}"]
            out[f"{o}txt_mod.lin.{p}"] = sd[f"{b}norm1_context.linear.{p}"]
            out[f"{o}img_attn.qkv.{p}"] = torch.cat([sd[f"{b}attn.to_{x}.{p}"] for x in "qkv"])
            out[f"{o}txt_attn.qkv.{p}"] = torch.cat(
                [sd[f"{b}attn.add_{x}_proj.{p}"] for x in "qkv"])
            out[f"{o}img_attn.proj.{p}"] = sd[f"{b}attn.to_out.0.{p}"]
            out[f"{o}txt_attn.proj.{p}"] = sd[f"{b}attn.to_add_out.{p}"]
            out[f"{o}img_mlp.0.{p}"] = sd[f"{b}ff.net.0.proj.{p}"]
            out[f"{o}img_mlp.2.{p}"] = sd[f"{b}ff.net.2.{p}"]
            out[f"{o}txt_mlp.0.{p}"] = sd[f"{b}ff_context.net.0.proj.{p}"]
            out[f"{o}txt_mlp.2.{p}"] = sd[f"{b}ff_context.net.2.{p}"]
        out[f"{o}img_attn.norm.query_norm.scale"] = sd[f"{b}attn.norm_q.weight"]
        out[f"{o}img_attn.norm.key_norm.scale"] = sd[f"{b}attn.norm_k.weight"]
        out[f"{o}txt_attn.norm.query_norm.scale"] = sd[f"{b}attn.norm_added_q.weight"]
        out[f"{o}txt_attn.norm.key_norm.scale"] = sd[f"{b}attn.norm_added_k.weight"]
    for i in range(n_single):
        b, o = f"single_transformer_blocks.{i}.", f"single_blocks.{i}."
        for p in ("weight", "bias"):
            out[f"{o}linear1.{p}"] = torch.cat(
                [sd[f"{b}attn.to_{x}.{p}"] for x in "qkv"] + [sd[f"{b}proj_mlp.{p}"]])
            out[f"{o}linear2.{p}"] = sd[f"{b}proj_out.{p}"]
            out[f"{o}modulation.lin.{p}"] = sd[f"{b}norm.linear.{p}"]
        out[f"{o}norm.query_norm.scale"] = sd[f"{b}attn.norm_q.weight"]
        out[f"{o}norm.key_norm.scale"] = sd[f"{b}attn.norm_k.weight"]
    return out


def diffusers_converter(inner_dim):
    src = inspect.getsource(single_file_utils.convert_flux_transformer_checkpoint_to_diffusers)
    assert "inner_dim = 3072" in src
    src = src.replace("inner_dim = 3072", f"inner_dim = {inner_dim}")
    scope = dict(vars(single_file_utils))
    exec(src, scope)
    return scope["convert_flux_transformer_checkpoint_to_diffusers"]


def main():
    for kind in ("dev", "schnell"):
        sd = load_file(ROOT / f"transformer-{kind}" / "diffusion_pytorch_model.safetensors")
        original = {k: v.contiguous() for k, v in to_original(sd).items()}
        inner = sd["x_embedder.weight"].shape[0]
        back = diffusers_converter(inner)(dict(original))
        assert set(back) == set(sd), set(back) ^ set(sd)
        for k in sd:
            assert torch.equal(back[k], sd[k]), k
        if kind == "dev":
            original = {f"model.diffusion_model.{k}": v for k, v in original.items()}
        save_file(original, ROOT / f"transformer-{kind}-original.safetensors")
        print(f"{kind}: {len(original)} tensors, converts back exactly")


if __name__ == "__main__":
    main()
