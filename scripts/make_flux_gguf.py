#!/usr/bin/env python3
"""A tiny FLUX transformer as GGUF (Q8_0, Q5_0, Q5_1, Q4_0, Q4_1, as FLUX GGUFs are published: original key
names, 2-D weights whose rows are a multiple of 32 quantized, the rest F32), and references.

Writes under fixtures/flux/:
  transformer-q/                 the diffusers model (width 32 so that weights quantize)
  transformer-q-<type>.gguf
  reference/transformer-q.safetensors  inputs as in make_flux_fixtures.py, and `sample_f32`
      (the f32 model), `sample_<type>` (the model with its weights replaced by
      gguf's dequantisation of each file: dequantize-then-run)
Deterministic.
"""
import sys
from pathlib import Path

import numpy as np
import torch
import gguf
from gguf import GGMLQuantizationType, quants
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
from make_flux_single_file import to_original  # noqa: E402

from diffusers import FluxPipeline, FluxTransformer2DModel  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent / "fixtures" / "flux"
TYPES = {"Q8_0": GGMLQuantizationType.Q8_0, "Q5_0": GGMLQuantizationType.Q5_0,
         "Q5_1": GGMLQuantizationType.Q5_1, "Q4_0": GGMLQuantizationType.Q4_0,
         "Q4_1": GGMLQuantizationType.Q4_1}


def quantizable(name, arr):
    return arr.ndim == 2 and arr.shape[1] % 32 == 0 and not name.endswith(".bias")


def main():
    torch.manual_seed(40)
    model = FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32,
        guidance_embeds=True, axes_dims_rope=(4, 6, 6)).eval()
    gen = torch.Generator().manual_seed(41)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "norm" in n or n.endswith("bias"):
                p.add_(0.1 * torch.randn(p.shape, generator=gen))
    model.save_pretrained(ROOT / "transformer-q", safe_serialization=True)
    model = FluxTransformer2DModel.from_pretrained(ROOT / "transformer-q").eval()
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    original = to_original(sd)

    inputs = {
        "hidden_states": torch.randn((2, 24, 16), generator=gen),
        "encoder_hidden_states": torch.randn((2, 7, 32), generator=gen),
        "pooled_projections": torch.randn((2, 32), generator=gen),
        "timestep": torch.tensor([0.9, 0.35]),
        "guidance": torch.tensor([3.5, 3.5]),
        "img_ids": FluxPipeline._prepare_latent_image_ids(2, 6, 4, "cpu", torch.float32),
        "txt_ids": torch.zeros((7, 3)),
    }

    def run(m):
        with torch.no_grad():
            return m(hidden_states=inputs["hidden_states"], encoder_hidden_states=inputs["encoder_hidden_states"],
                     pooled_projections=inputs["pooled_projections"], timestep=inputs["timestep"],
                     guidance=inputs["guidance"], img_ids=inputs["img_ids"], txt_ids=inputs["txt_ids"],
                     return_dict=False)[0]

    out = {**inputs, "sample_f32": run(model)}
    for label, qtype in TYPES.items():
        writer = gguf.GGUFWriter(str(ROOT / f"transformer-q-{label}.gguf"), "flux")
        dequantized = {}
        for name, t in original.items():
            arr = t.numpy().astype(np.float32)
            if quantizable(name, arr):
                q = quants.quantize(arr, qtype)
                writer.add_tensor(name, q, raw_dtype=qtype)
                dequantized[name] = torch.from_numpy(quants.dequantize(q, qtype).astype(np.float32))
            else:
                writer.add_tensor(name, arr)
                dequantized[name] = torch.from_numpy(arr)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        # Back to diffusers names through diffusers' converter, then run.
        from make_flux_single_file import diffusers_converter  # noqa: E402
        back = diffusers_converter(32)({k: v.clone() for k, v in dequantized.items()})
        qmodel = FluxTransformer2DModel.from_pretrained(ROOT / "transformer-q").eval()
        qmodel.load_state_dict(back)
        out[f"sample_{label}"] = run(qmodel)
        diff = (out[f"sample_{label}"] - out["sample_f32"]).abs().max().item()
        print(f"{label}: max difference to f32 {diff:.3e} (scale {out['sample_f32'].abs().max():.3f})")
    save_file({k: v.contiguous().float() for k, v in out.items()}, ROOT / "reference" / "transformer-q.safetensors")


if __name__ == "__main__":
    main()
