#!/usr/bin/env python3
"""Tiny FLUX transformer fixtures and diffusers' reference outputs (CPU, float32).

Writes under fixtures/flux/:
  transformer-dev/       FluxTransformer2DModel, guidance_embeds=True, 2 double + 2 single
                         blocks, heads 2 x 8, axes_dims_rope (2, 2, 4)
                         (config.json + diffusion_pytorch_model.safetensors)
  transformer-schnell/   the same with guidance_embeds=False, 1 + 1 blocks, axes (4, 2, 2)
  reference/transformer-dev.safetensors, reference/transformer-schnell.safetensors
      inputs:  hidden_states (2, 24, 16)  packed latents of a 6 (rows) x 4 (cols) grid
               encoder_hidden_states (2, 7, 32), pooled_projections (2, 24)
               timestep (2,) = [0.9, 0.35]  (what FluxPipeline passes: t / 1000)
               guidance (2,) = [3.5, 3.5]   (dev only; the raw guidance scale)
               img_ids (24, 3)  FluxPipeline._prepare_latent_image_ids(2, 6, 4)
               txt_ids (7, 3)   zeros
      output:  sample (2, 24, 16)
      intermediates (for debugging): timestep_freqs (128,) torch's exp table of the sinusoidal
               embedding; temb (2, inner) the time_text_embed output; rope_cos / rope_sin
               (31, 8) FluxPosEmbed of cat(txt_ids, img_ids); per block
               block.{i}.hidden_states / block.{i}.encoder_hidden_states (double blocks) and
               single_block.{i}.hidden_states / single_block.{i}.encoder_hidden_states
  reference/scheduler.json  FlowMatchEulerDiscreteScheduler sigmas/timesteps for the FLUX.1
      dev and schnell scheduler configs, as FluxPipeline sets them (sigmas=linspace(1, 1/n, n),
      mu=calculate_shift(image_seq_len, ...)); every float32 value as the exact float64
      repr and as float.hex.

Run with the venv described in the README:  python scripts/make_flux_fixtures.py
Deterministic: reruns write the same bytes.
"""

import json
import math
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
from diffusers.pipelines.flux.pipeline_flux import calculate_shift, retrieve_timesteps

ROOT = Path(__file__).resolve().parent.parent / "fixtures" / "flux"
REF = ROOT / "reference"

BASE_CONFIG = dict(
    patch_size=1,
    in_channels=16,
    out_channels=None,
    num_layers=2,
    num_single_layers=2,
    attention_head_dim=8,
    num_attention_heads=2,
    joint_attention_dim=32,
    pooled_projection_dim=24,
    guidance_embeds=True,
    axes_dims_rope=(2, 2, 4),
)

MODELS = {
    "transformer-dev": dict(config=BASE_CONFIG, seed=1234),
    "transformer-schnell": dict(
        config=dict(BASE_CONFIG, guidance_embeds=False, num_layers=1, num_single_layers=1,
                    axes_dims_rope=(4, 2, 2)),
        seed=4321,
    ),
}

# Packed latent grid: rows (height // 2 of the latent) x cols (width // 2), i.e. a 12 x 8
# latent, a 96 x 64 (h x w) image with the VAE's factor 8.
GRID_H, GRID_W = 6, 4
TXT_LEN = 7
BATCH = 2
TIMESTEP = [0.9, 0.35]
GUIDANCE = [3.5, 3.5]

# FLUX.1-dev / FLUX.1-schnell scheduler/scheduler_config.json.
SCHEDULERS = {
    "dev": dict(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5,
                max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096),
    "schnell": dict(num_train_timesteps=1000, shift=1.0, use_dynamic_shifting=False,
                    base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
                    max_image_seq_len=4096),
}
# (num_inference_steps, image_seq_len): 24 is this fixture's grid, 1024 = 512x512,
# 4096 = 1024x1024, 4080 = 768x1360, 6144 extrapolates past max_image_seq_len, 256 = 256x256.
SCHEDULE_CASES = [(1, 1024), (2, 24), (4, 1024), (4, 4096), (10, 24), (20, 256), (28, 1024),
                  (28, 4080), (28, 4096), (50, 4096), (28, 6144)]


def perturb(model: torch.nn.Module, seed: int) -> None:
    """Make every vector parameter non-trivial: RMSNorm weights (init 1) become 1 + 0.2 N(0,1),
    biases get + 0.1 N(0,1). Matrices keep torch's default (uniform) init: diffusers does not
    zero-initialise FLUX's AdaLN linears, so modulations are non-zero already."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            noise = torch.randn(p.shape, generator=g, dtype=torch.float32)
            if p.ndim != 1:
                continue
            if name.endswith(("norm_q.weight", "norm_k.weight", "norm_added_q.weight",
                              "norm_added_k.weight")):
                p.copy_(1.0 + 0.2 * noise)
            else:
                p.add_(0.1 * noise)
    for name, p in model.named_parameters():
        assert not bool((p == 0).all()) and not bool((p == 1).all()), name


def build(name: str, spec: dict) -> FluxTransformer2DModel:
    torch.manual_seed(spec["seed"])
    model = FluxTransformer2DModel(**spec["config"]).eval()
    perturb(model, spec["seed"] + 1)
    out = ROOT / name
    if out.exists():
        shutil.rmtree(out)
    model.save_pretrained(out, safe_serialization=True)
    # Reference from the saved files, exactly as a loader would see them.
    loaded = FluxTransformer2DModel.from_pretrained(out, torch_dtype=torch.float32).eval()
    sd_a, sd_b = model.state_dict(), loaded.state_dict()
    assert sd_a.keys() == sd_b.keys()
    for k in sd_a:
        assert torch.equal(sd_a[k], sd_b[k]), k
    return loaded


def reference(name: str, model: FluxTransformer2DModel, seed: int) -> dict:
    cfg = model.config
    g = torch.Generator().manual_seed(seed)
    seq = GRID_H * GRID_W
    inputs = {
        "hidden_states": torch.randn(BATCH, seq, cfg.in_channels, generator=g),
        "encoder_hidden_states": torch.randn(BATCH, TXT_LEN, cfg.joint_attention_dim, generator=g),
        "pooled_projections": torch.randn(BATCH, cfg.pooled_projection_dim, generator=g),
        "timestep": torch.tensor(TIMESTEP, dtype=torch.float32),
        "img_ids": FluxPipeline._prepare_latent_image_ids(BATCH, GRID_H, GRID_W, "cpu",
                                                          torch.float32),
        "txt_ids": torch.zeros(TXT_LEN, 3, dtype=torch.float32),
    }
    if cfg.guidance_embeds:
        inputs["guidance"] = torch.tensor(GUIDANCE, dtype=torch.float32)

    captured = {}

    def keep(key):
        def hook(_module, _args, output):
            captured[key] = output
        return hook

    handles = [
        model.time_text_embed.register_forward_hook(keep("temb")),
        model.pos_embed.register_forward_hook(keep("rope")),
    ]
    for i, blk in enumerate(model.transformer_blocks):
        handles.append(blk.register_forward_hook(keep(f"block.{i}")))
    for i, blk in enumerate(model.single_transformer_blocks):
        handles.append(blk.register_forward_hook(keep(f"single_block.{i}")))
    with torch.no_grad():
        sample = model(**inputs, return_dict=True).sample
    for h in handles:
        h.remove()

    tensors = dict(inputs)
    tensors["sample"] = sample
    tensors["temb"] = captured["temb"]
    tensors["rope_cos"], tensors["rope_sin"] = captured["rope"]
    for key, val in captured.items():
        if key.startswith(("block.", "single_block.")):
            # blocks return (encoder_hidden_states, hidden_states)
            tensors[f"{key}.encoder_hidden_states"], tensors[f"{key}.hidden_states"] = val
    half = 128
    # exactly diffusers' get_timestep_embedding (embeddings.py:56-62)
    exponent = -math.log(10000) * torch.arange(start=0, end=half, dtype=torch.float32)
    tensors["timestep_freqs"] = torch.exp(exponent / (half - 0))

    tensors = {k: v.detach().to(torch.float32).contiguous() for k, v in tensors.items()}
    REF.mkdir(parents=True, exist_ok=True)
    save_file(tensors, REF / f"{name}.safetensors")
    s = tensors["sample"]
    print(f"{name}: sample {tuple(s.shape)} mean {s.mean():.4f} std {s.std():.4f} "
          f"max|.| {s.abs().max():.4f}; temb std {tensors['temb'].std():.4f}")
    assert torch.isfinite(s).all() and s.std() > 0.05
    return tensors


def f32_list(t) -> dict:
    vals = [float(np.float32(v)) for v in np.asarray(t, dtype=np.float32).reshape(-1)]
    return {"values": vals, "hex": [v.hex() for v in vals]}


def schedules() -> dict:
    out = {"configs": SCHEDULERS, "note": (
        "Per case: FluxPipeline sigmas = np.linspace(1.0, 1/n, n) (float64), "
        "mu = calculate_shift(image_seq_len, base_image_seq_len, max_image_seq_len, base_shift, "
        "max_shift) (float64, computed for schnell too but unused there), "
        "scheduler.set_timesteps(sigmas=..., mu=mu). `sigmas` has n+1 float32 values (final 0), "
        "`timesteps` = sigmas[:-1] * 1000 (float32), `model_timestep` = timesteps / 1000 in "
        "float32 (what the pipeline passes to the transformer), `embedded_timestep` = "
        "model_timestep * 1000 in float32 (what the sinusoidal embedding sees; not always "
        "equal to `timesteps`)."), "cases": []}
    for cfg_name, cfg in SCHEDULERS.items():
        for n, seq in SCHEDULE_CASES:
            sch = FlowMatchEulerDiscreteScheduler(**cfg)
            sigmas_in = np.linspace(1.0, 1 / n, n)
            mu = calculate_shift(
                seq,
                sch.config.get("base_image_seq_len", 256),
                sch.config.get("max_image_seq_len", 4096),
                sch.config.get("base_shift", 0.5),
                sch.config.get("max_shift", 1.15),
            )
            timesteps, steps = retrieve_timesteps(sch, n, "cpu", sigmas=sigmas_in, mu=mu)
            assert steps == n and timesteps.dtype == torch.float32
            assert sch.sigmas.dtype == torch.float32 and len(sch.sigmas) == n + 1
            model_t = timesteps / 1000
            embedded_t = model_t.to(torch.float32) * 1000
            out["cases"].append({
                "config": cfg_name,
                "num_inference_steps": n,
                "image_seq_len": seq,
                "mu": mu,
                "mu_hex": float(mu).hex(),
                "input_sigmas_f64": [float(v) for v in sigmas_in],
                "sigmas": f32_list(sch.sigmas.numpy()),
                "timesteps": f32_list(timesteps.numpy()),
                "model_timestep": f32_list(model_t.numpy()),
                "embedded_timestep": f32_list(embedded_t.numpy()),
            })
    return out


def main() -> None:
    torch.set_num_threads(1)  # reduction order independent of the machine's core count
    ROOT.mkdir(parents=True, exist_ok=True)
    for i, (name, spec) in enumerate(MODELS.items()):
        model = build(name, spec)
        reference(name, model, seed=100 + i)
    REF.mkdir(parents=True, exist_ok=True)
    with open(REF / "scheduler.json", "w") as f:
        json.dump(schedules(), f, indent=1)
        f.write("\n")
    total = sum(p.stat().st_size for p in ROOT.rglob("*") if p.is_file())
    print(f"wrote {ROOT} ({total} bytes)")
    assert total < 1_000_000


if __name__ == "__main__":
    main()
