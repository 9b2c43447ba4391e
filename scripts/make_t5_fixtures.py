#!/usr/bin/env python3
"""Tiny random T5 encoders and transformers' outputs, for crates/models/tests/t5.rs.

Writes fixtures/t5/<name>/ (config.json + model.safetensors, as save_pretrained writes a
T5EncoderModel) and fixtures/t5/<name>.safetensors with `input_ids` (2, 19) and the
`last_hidden_state`. `gated` is T5 v1.1-like (gated-gelu, as FLUX's text_encoder_2),
`relu` the original layout. Deterministic.
"""
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import T5Config, T5EncoderModel

ROOT = Path(__file__).resolve().parent.parent / "fixtures" / "t5"

CONFIGS = {
    "gated": dict(vocab_size=96, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_heads=4,
                  relative_attention_num_buckets=32, relative_attention_max_distance=128,
                  feed_forward_proj="gated-gelu", layer_norm_epsilon=1e-6),
    "relu": dict(vocab_size=96, d_model=24, d_kv=6, d_ff=40, num_layers=3, num_heads=2,
                 relative_attention_num_buckets=16, relative_attention_max_distance=20,
                 feed_forward_proj="relu", layer_norm_epsilon=1e-6),
}


def main():
    torch.set_num_threads(2)
    if ROOT.exists():
        shutil.rmtree(ROOT)
    ROOT.mkdir(parents=True)
    for i, (name, cfg) in enumerate(CONFIGS.items()):
        torch.manual_seed(10 + i)
        model = T5EncoderModel(T5Config(**cfg)).eval()
        gen = torch.Generator().manual_seed(20 + i)
        with torch.no_grad():
            for n, p in model.named_parameters():
                if "layer_norm" in n:
                    p.add_(0.1 * torch.randn(p.shape, generator=gen))
        model.save_pretrained(ROOT / name, safe_serialization=True)
        ids = torch.randint(0, cfg["vocab_size"], (2, 19), generator=gen)
        with torch.no_grad():
            out = model(input_ids=ids).last_hidden_state
        save_file({"input_ids": ids.to(torch.int64), "last_hidden_state": out.contiguous()},
                  ROOT / f"{name}.safetensors")
        print(f"{name}: output std {out.std():.3f}")


if __name__ == "__main__":
    main()
