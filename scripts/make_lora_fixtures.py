#!/usr/bin/env python3
"""Tiny LoRA files for the tiny SD and FLUX models, in each layout sd-worker reads, and the
images diffusers makes with them.

Needs make_fixtures.py and make_flux_models.py (and peft). Writes under fixtures/lora/:
  sd1-peft.safetensors     diffusers/PEFT layout written by diffusers' save_lora_weights from
                           peft adapters: UNet attention, projections, feed-forward, resnet
                           convolutions (conv LoRA) and time projections, CLIP attention and
                           MLP; lora_alpha 8 at rank 4 and an alpha_pattern, in the file's
                           `lora_adapter_metadata`
  sd1-kohya.safetensors    kohya layout (`lora_unet_*`, `lora_te_*`, `.alpha`) with LoCon
                           3x3 convolutions (resnets, down/upsamplers) and mixed ranks
  flux-peft.safetensors    diffusers layout for the FLUX transformer (every linear layer of
                           the blocks, embedders, norms) and its CLIP text encoder
  flux-kohya.safetensors   kohya layout on the original (BFL) layer names: fused qkv and
                           linear1, the final modulation, `lora_te1_*`, `.alpha`
  flux-original.safetensors the same adapters as flux-kohya under original names with PEFT
                           suffixes and the `diffusion_model.` prefix
  reference/<case>.safetensors  `images` (uint8) and `latents_final` per case
  cases.json
SD references come from diffusers' own `load_lora_weights` + `set_adapters`. diffusers' FLUX
kohya converter hard-codes FLUX.1's widths, so the FLUX kohya/original reference merges the
adapters into the original-name weights (W += scale * up @ down) and converts them with
diffusers' single-file converter; the result is checked against the diffusers-loaded PEFT
adapters on the layers both cover.
Deterministic.
"""
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import torch
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict
from safetensors import safe_open
from safetensors.torch import load_file, save_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
from make_flux_single_file import diffusers_converter, to_original  # noqa: E402

import transformers.integrations.peft as tf_peft  # noqa: E402
from diffusers import FluxPipeline, StableDiffusionPipeline  # noqa: E402

# transformers 5.24 asks for peft >= 0.22 for its adapter methods, but the package registry
# here has 0.21.2, whose LoRA layers are the same for what is used here (Linear and Conv2d).
tf_peft.MIN_PEFT_VERSION = "0.21.0"

FIX = Path(__file__).resolve().parent.parent / "fixtures"
OUT = FIX / "lora"

SD_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj",
              "ff.net.2", "conv1", "conv2", "time_emb_proj"]
TE_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]
FLUX_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj",
                "to_add_out", "proj_mlp", "proj_out", "norm1.linear", "norm1_context.linear",
                "norm.linear", "norm_out.linear", "ff.net.0.proj", "ff.net.2",
                "ff_context.net.0.proj", "ff_context.net.2", "x_embedder", "context_embedder",
                "linear_1", "linear_2"]

CASES = [
    dict(name="sd1-peft", model="tiny-sd1", loras=[["sd1-peft.safetensors", 0.8]],
         prompt="a photo of a cat", steps=4, guidance=7.5, seed=3, size=32),
    dict(name="sd1-kohya", model="tiny-sd1", loras=[["sd1-kohya.safetensors", 1.0]],
         prompt="a red chair", steps=4, guidance=5.0, seed=5, size=32),
    dict(name="sd1-two", model="tiny-sd1",
         loras=[["sd1-peft.safetensors", 0.6], ["sd1-kohya.safetensors", -0.5]],
         prompt="a photo of a cat", steps=3, guidance=7.5, seed=7, size=32),
    dict(name="sd2-peft", model="tiny-sd2", loras=[["sd2-peft.safetensors", 1.2]],
         prompt="green trees", steps=4, guidance=6.0, seed=2, size=32),
    dict(name="flux-peft", model="tiny-flux-dev", loras=[["flux-peft.safetensors", 0.9]],
         prompt="a photo of a cat", steps=3, guidance=3.5, seed=4, size=32),
    dict(name="flux-kohya", model="tiny-flux-dev", loras=[["flux-kohya.safetensors", 0.7]],
         prompt="a red chair", steps=3, guidance=3.5, seed=6, size=32),
    dict(name="flux-original", model="tiny-flux-dev",
         loras=[["flux-original.safetensors", 0.7]],
         prompt="a red chair", steps=3, guidance=3.5, seed=6, size=32),
]


def randomize_lora(model, seed, scale=0.15):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in sorted(model.named_parameters()):
            if "lora_A" in n or "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=gen) * scale)


def count_lora_modules(model):
    return sum(1 for n, _ in model.named_modules() if n.endswith(".lora_A"))


def peft_file(pipe_cls, pipe, denoiser_name, targets, seed, name, alpha_pattern):
    denoiser = getattr(pipe, denoiser_name)
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False,
                     alpha_pattern=alpha_pattern)
    denoiser.add_adapter(cfg)
    randomize_lora(denoiser, seed)
    te_cfg = LoraConfig(r=2, lora_alpha=2, target_modules=TE_TARGETS, init_lora_weights=False)
    pipe.text_encoder.add_adapter(te_cfg)
    randomize_lora(pipe.text_encoder, seed + 1, scale=0.3)
    kw = {f"{denoiser_name}_lora_layers": get_peft_model_state_dict(denoiser),
          f"{denoiser_name}_lora_adapter_metadata": cfg.to_dict(),
          "text_encoder_lora_layers": get_peft_model_state_dict(pipe.text_encoder),
          "text_encoder_lora_adapter_metadata": te_cfg.to_dict()}
    pipe_cls.save_lora_weights(OUT, weight_name=name, **kw)
    return count_lora_modules(denoiser), count_lora_modules(pipe.text_encoder)


def kohya_sd1(pipe, seed):
    """kohya keys over the UNet's diffusers module names, LoCon on the 3x3 convolutions."""
    gen = torch.Generator().manual_seed(seed)
    sd = {}
    mods = []
    for n, m in pipe.unet.named_modules():
        conv_targets = ("conv1", "conv2", "downsamplers.0.conv", "upsamplers.0.conv")
        if isinstance(m, torch.nn.Linear) and any(n.endswith(t) for t in SD_TARGETS):
            mods.append(("lora_unet_" + n.replace(".", "_"), m))
        elif isinstance(m, torch.nn.Conv2d) and (any(n.endswith(t) for t in conv_targets)
                                                 or n.endswith(("proj_in", "proj_out"))):
            mods.append(("lora_unet_" + n.replace(".", "_"), m))
    for n, m in pipe.text_encoder.named_modules():
        if isinstance(m, torch.nn.Linear) and any(n.endswith(t) for t in TE_TARGETS):
            full = n if n.startswith("text_model.") else "text_model." + n
            mods.append(("lora_te_" + full.replace(".", "_"), m))
    for i, (key, m) in enumerate(mods):
        r = 4 if i % 3 else 2
        if isinstance(m, torch.nn.Conv2d):
            k = m.kernel_size[0]
            down = torch.randn((r, m.in_channels, k, k), generator=gen) * 0.15
            up = torch.randn((m.out_channels, r, 1, 1), generator=gen) * 0.15
        else:
            down = torch.randn((r, m.in_features), generator=gen) * 0.15
            up = torch.randn((m.out_features, r), generator=gen) * 0.15
        sd[f"{key}.lora_down.weight"] = down
        sd[f"{key}.lora_up.weight"] = up
        # One alpha for the file: diffusers 0.42 drops per-module kohya alphas for SD
        # (its alpha_pattern keys keep the kohya suffixes), so mixed alphas would make the
        # reference wrong; the ranks still differ, so alpha / rank does.
        sd[f"{key}.alpha"] = torch.tensor(3.0)
    save_file(sd, OUT / "sd1-kohya.safetensors")
    te = sum(1 for k, _ in mods if k.startswith("lora_te_"))
    return len(mods) - te, te


def flux_original_adapters(pipe, seed):
    """Random adapters on the original (BFL) layer names of the tiny FLUX transformer and on
    its CLIP text encoder: {original module: (down, up, alpha)}."""
    gen = torch.Generator().manual_seed(seed)
    sd = {k: v for k, v in pipe.transformer.state_dict().items()}
    original = to_original(sd)
    out = {}
    for i, k in enumerate(sorted(k for k in original if k.endswith(".weight")
                                 and original[k].dim() == 2)):
        w = original[k]
        r = 4 if i % 2 else 3
        out[("transformer", k[: -len(".weight")])] = (
            torch.randn((r, w.shape[1]), generator=gen) * 0.3,
            torch.randn((w.shape[0], r), generator=gen) * 0.3,
            float([2, 3, 4][i % 3]))
    for n, m in pipe.text_encoder.named_modules():
        if isinstance(m, torch.nn.Linear) and any(n.endswith(t) for t in TE_TARGETS):
            full = n if n.startswith("text_model.") else "text_model." + n
            out[("te", full)] = (torch.randn((2, m.in_features), generator=gen) * 0.3,
                                 torch.randn((m.out_features, 2), generator=gen) * 0.3, 1.0)
    return out


def write_flux_files(adapters):
    kohya, orig = {}, {}
    for (part, name), (down, up, alpha) in adapters.items():
        if part == "te":
            key = "lora_te1_" + name.replace(".", "_")
            kohya[f"{key}.lora_down.weight"] = down
            kohya[f"{key}.lora_up.weight"] = up
            kohya[f"{key}.alpha"] = torch.tensor(alpha)
            orig[f"text_encoder.{name}.lora_A.weight"] = down
            orig[f"text_encoder.{name}.lora_B.weight"] = up
            orig[f"text_encoder.{name}.alpha"] = torch.tensor(alpha)
        else:
            key = "lora_unet_" + name.replace(".", "_")
            kohya[f"{key}.lora_down.weight"] = down
            kohya[f"{key}.lora_up.weight"] = up
            kohya[f"{key}.alpha"] = torch.tensor(alpha)
            orig[f"diffusion_model.{name}.lora_A.weight"] = down
            orig[f"diffusion_model.{name}.lora_B.weight"] = up
            orig[f"diffusion_model.{name}.alpha"] = torch.tensor(alpha)
    save_file({k: v.contiguous() for k, v in kohya.items()}, OUT / "flux-kohya.safetensors")
    save_file({k: v.contiguous() for k, v in orig.items()}, OUT / "flux-original.safetensors")


def merged_flux(pipe, adapters, strength):
    """The pipeline with the adapters merged: original-name transformer weights converted by
    diffusers' single-file converter, CLIP weights merged in place."""
    sd = {k: v.clone() for k, v in pipe.transformer.state_dict().items()}
    original = to_original(sd)
    te = dict(pipe.text_encoder.named_modules())
    with torch.no_grad():
        for (part, name), (down, up, alpha) in adapters.items():
            delta = strength * alpha / down.shape[0] * (up @ down)
            if part == "te":
                mod = te.get(name) or te[name[len("text_model."):]]
                mod.weight += delta
            else:
                original[f"{name}.weight"] = original[f"{name}.weight"] + delta
    inner = sd["x_embedder.weight"].shape[0]
    converted = diffusers_converter(inner)({k: v.contiguous() for k, v in original.items()})
    pipe.transformer.load_state_dict(converted, strict=True)
    return pipe


def split_text_encoder(path):
    """The denoiser's tensors of a LoRA file, and its text encoder adapters as
    {module: (down, up, scale at strength 1)}."""
    sd = load_file(path)
    te_keys = [k for k in sd if k.startswith(("text_encoder.", "lora_te_", "lora_te1_"))]
    te = {}
    for k in te_keys:
        for down_sfx, up_sfx in ((".lora_A.weight", ".lora_B.weight"),
                                 (".lora_down.weight", ".lora_up.weight")):
            if k.endswith(down_sfx):
                module = k[: -len(down_sfx)]
                down, up = sd[k], sd[module + up_sfx]
                alpha = sd.get(module + ".alpha")
                # PEFT text encoder adapters here have lora_alpha = r (scale 1).
                scale = 1.0 if alpha is None else float(alpha) / down.shape[0]
                te[module] = (down, up, scale)
    return {k: v for k, v in sd.items() if k not in te_keys}, te


def check_scales(denoiser, path):
    """diffusers took the file's lora_alpha / alpha_pattern (PEFT files) or alphas (kohya)."""
    with safe_open(path, "pt") as f:
        meta = json.loads((f.metadata() or {}).get("lora_adapter_metadata", "{}"))
    prefix = "transformer" if any(k.startswith("transformer.") for k in meta) else "unet"
    alpha, patterns = meta.get(f"{prefix}.lora_alpha"), meta.get(f"{prefix}.alpha_pattern", {})
    if alpha is None:
        return
    for n, mod in denoiser.named_modules():
        if hasattr(mod, "scaling") and mod.scaling:
            (scaling,) = mod.scaling.values()
            a = next((v for p, v in patterns.items() if n == p or n.endswith("." + p)), alpha)
            (r,) = mod.r.values()
            assert abs(scaling - a / r) < 1e-9, (n, scaling, a, r)


def merge_text_encoder(pipe, te, strength):
    mods = dict(pipe.text_encoder.named_modules())
    with torch.no_grad():
        for module, (down, up, scale) in te.items():
            for prefix in ("text_encoder.", "lora_te_", "lora_te1_"):
                if module.startswith(prefix):
                    name = module[len(prefix):]
            if "_" in name and "." not in name:
                # kohya: map the underscored name back through the module list.
                by_kohya = {("text_model." + n if not n.startswith("text_model.") else n)
                            .replace(".", "_"): n for n in mods}
                name = by_kohya[name]
            else:
                name = name if name in mods else name[len("text_model."):]
            mods[name].weight += strength * scale * (up @ down)


def run(pipe, case, flux, extra):
    pipe.set_progress_bar_config(disable=True)
    captured = {}

    def on_step_end(p, i, t, kw):
        captured["latents_final"] = kw["latents"].detach().clone()
        return {}

    kw = dict(prompt=case["prompt"], width=case["size"], height=case["size"],
              num_inference_steps=case["steps"], guidance_scale=case["guidance"],
              generator=torch.Generator("cpu").manual_seed(case["seed"]), output_type="pil",
              callback_on_step_end=on_step_end, callback_on_step_end_tensor_inputs=["latents"])
    if flux:
        kw["max_sequence_length"] = 16
    kw.update(extra)
    with torch.no_grad():
        result = pipe(**kw)
    images = np.stack([np.asarray(im.convert("RGB"), dtype=np.uint8) for im in result.images])
    save_file({"images": torch.from_numpy(images),
               "latents_final": captured["latents_final"].float().contiguous()},
              OUT / "reference" / f"{case['name']}.safetensors")
    return images


def sd_pipe(model):
    from make_fixtures import load_sd2
    path = FIX / "models" / model
    if model == "tiny-sd2":
        return load_sd2(path)
    return StableDiffusionPipeline.from_pretrained(path, safety_checker=None,
                                                   requires_safety_checker=False)


def flux_pipe():
    return FluxPipeline.from_pretrained(FIX / "flux" / "tiny-flux-dev")


def main():
    torch.set_num_threads(2)
    if OUT.exists():
        shutil.rmtree(OUT)
    (OUT / "reference").mkdir(parents=True)

    counts = {}
    counts["sd1-peft"] = peft_file(StableDiffusionPipeline, sd_pipe("tiny-sd1"), "unet",
                                   SD_TARGETS, 10, "sd1-peft.safetensors", {"proj_out": 2})
    counts["sd2-peft"] = peft_file(StableDiffusionPipeline, sd_pipe("tiny-sd2"), "unet",
                                   SD_TARGETS, 20, "sd2-peft.safetensors", {"to_k": 16})
    counts["sd1-kohya"] = kohya_sd1(sd_pipe("tiny-sd1"), 30)
    counts["flux-peft"] = peft_file(FluxPipeline, flux_pipe(), "transformer", FLUX_TARGETS, 40,
                                    "flux-peft.safetensors", {"proj_mlp": 2})
    adapters = flux_original_adapters(flux_pipe(), 50)
    write_flux_files(adapters)

    base_images = {}
    tmp = OUT / "tmp"
    tmp.mkdir()
    for case in CASES:
        flux = case["model"].startswith("tiny-flux")
        if case["name"] in ("flux-kohya", "flux-original"):
            ((_, strength),) = case["loras"]
            pipe = merged_flux(flux_pipe(), adapters, strength)
            kwargs = {}
        else:
            pipe = flux_pipe() if flux else sd_pipe(case["model"])
            names = []
            for i, (file, strength) in enumerate(case["loras"]):
                # The denoiser's adapters through diffusers; the text encoder's merged into its
                # weights (see the module docstring).
                denoiser_only, te = split_text_encoder(OUT / file)
                with safe_open(OUT / file, "pt") as f:
                    metadata = f.metadata()
                save_file(denoiser_only, tmp / file, metadata=metadata)
                pipe.load_lora_weights(tmp, weight_name=file, adapter_name=f"a{i}")
                names.append(f"a{i}")
                merge_text_encoder(pipe, te, strength)
            denoiser = pipe.transformer if flux else pipe.unet
            if len(names) == 1:
                # One LoRA: its scale through the call (set_adapters cannot expand per-block
                # scales for UNets with per-block layer counts).
                kwargs = {("joint_attention_kwargs" if flux else "cross_attention_kwargs"):
                          {"scale": case["loras"][0][1]}}
                want = counts[case["loras"][0][0].removesuffix(".safetensors")]
                assert count_lora_modules(denoiser) == want[0], (case["name"], want)
                check_scales(denoiser, OUT / case["loras"][0][0])
            else:
                denoiser.set_adapters(names, weights=[s for _, s in case["loras"]])
                kwargs = {}
        images = run(pipe, case, flux, kwargs)
        key = (case["model"], case["prompt"], case["seed"])
        print(f"{case['name']}: images {images.shape}, pixel std {images.std():.1f}")
        if key not in base_images:
            base = flux_pipe() if flux else sd_pipe(case["model"])
            base_images[key] = run(base, {**case, "name": "base-" + case["name"]}, flux, {})
        diff = np.abs(images.astype(np.int32) - base_images[key].astype(np.int32)).mean()
        print(f"  mean change from the base model: {diff:.1f} levels")
        assert diff > 2.0, "the LoRA must visibly change the image"
    shutil.rmtree(tmp)
    # The base-model runs only served the check above.
    for p in (OUT / "reference").glob("base-*"):
        p.unlink()
    (OUT / "cases.json").write_text(json.dumps({"cases": CASES}, indent=1) + "\n")
    total = sum(p.stat().st_size for p in OUT.rglob("*") if p.is_file())
    print(f"fixtures/lora: {total / 1e6:.2f} MB")


if __name__ == "__main__":
    main()
