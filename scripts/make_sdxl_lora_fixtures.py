#!/usr/bin/env python3
"""Tiny SDXL LoRA files for fixtures/models/tiny-sdxl (make_sdxl_fixtures.py) and the images
diffusers makes with them.

Needs make_sdxl_fixtures.py (and peft). Writes under fixtures/lora/ (other files there are left
alone; make_lora_fixtures.py writes those):
  sdxl-kohya.safetensors   kohya layout as sd-scripts' sdxl_train_network saves it: UNet modules
                           under the ORIGINAL (SGM) names (`lora_unet_input_blocks_4_1_...`,
                           `middle_block_1`, `output_blocks_2_2_conv`), LoCon adapters on resnet
                           3x3 convolutions (4-D down (r, cin, 3, 3), up (cout, r, 1, 1)), the
                           1x1 skip connection, the down/upsampler and the time embedding
                           projections, `lora_te1_*` / `lora_te2_*` on both text encoders;
                           `.alpha` per module, different from the rank and between modules
  sdxl-peft.safetensors    diffusers/PEFT layout written by diffusers' save_lora_weights from
                           peft adapters (`unet.`, `text_encoder.`, `text_encoder_2.`), with
                           `lora_adapter_metadata`: lora_alpha != r for each of the three parts,
                           an alpha_pattern and a rank_pattern for the UNet
  reference/sdxl-{kohya,peft}.safetensors  `images` (uint8) and `latents_final`
  sdxl_cases.json          the parameters of these two cases (fixtures/lora/cases.json untouched)

References: StableDiffusionXLPipeline.from_pretrained(tiny-sdxl) with the UNet adapters loaded by
diffusers' own `load_lora_weights` (it maps the SGM names itself through
`_maybe_map_sgm_blocks_to_diffusers` / `_convert_non_diffusers_lora_to_diffusers`; the kohya
file is loaded as one adapter per alpha value because diffusers keeps only the most common kohya
alpha, see load_unet_adapters) and the strength passed as `cross_attention_kwargs={"scale": s}`.
The text-encoder adapters are merged into the two text encoders' weights
(W += s * alpha / r * up @ down) instead, as make_lora_fixtures.py does, because transformers 5
with the peft 0.21 available here does not load them through diffusers (from the kohya file it
drops te2's attention k/v adapters, `..._lora.down.weight` keys it reports as unexpected, and
ignores the per-module alphas). Before the references are kept, every UNet adapter diffusers
created is checked against the file (delta = scaling * B @ A equal to up @ down * alpha / r, the
set of adapted layers equal to the file's modules), again after `fuse_lora` at the case's
strength on a second copy (the changed UNet weights are exactly the file's modules, by
strength * alpha / r * up @ down), and the case is rerun with every adapter merged by hand
(same latents within 1e-5 relative). The SGM -> diffusers module table is printed.
Deterministic.
"""
import json
import re
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict
from safetensors import safe_open
from safetensors.torch import load_file, save_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
# Importing make_lora_fixtures also relaxes transformers' peft version check (see there).
from make_lora_fixtures import count_lora_modules, randomize_lora, run  # noqa: E402

from diffusers import StableDiffusionXLPipeline  # noqa: E402

FIX = Path(__file__).resolve().parent.parent / "fixtures"
OUT = FIX / "lora"
MODEL = FIX / "models" / "tiny-sdxl"

CASES = [
    dict(name="sdxl-kohya", model="tiny-sdxl", loras=[["sdxl-kohya.safetensors", 0.8]],
         prompt="a photo of a cat", steps=5, guidance=5.0, seed=3, size=32),
    dict(name="sdxl-peft", model="tiny-sdxl", loras=[["sdxl-peft.safetensors", 1.0]],
         prompt="a red chair", steps=5, guidance=5.0, seed=5, size=32),
]

# kohya UNet modules, SGM names (without `lora_unet_`), with (rank, alpha). The tiny UNet has two
# levels and layers_per_block 2, so input_blocks 1-2 are down_blocks.0's resnets, 3 its
# downsampler, 4-5 down_blocks.1 (resnet .0, transformer .1); middle_block 0/1/2 = resnet,
# transformer, resnet; output_blocks 0-2 up_blocks.0 (resnet .0, transformer .1, upsampler 2.2),
# 3-5 up_blocks.1.
KOHYA_UNET = [
    ("input_blocks_1_0_in_layers_2", 4, 2.0),
    ("input_blocks_2_0_emb_layers_1", 4, 8.0),
    ("input_blocks_2_0_out_layers_3", 2, 1.0),
    ("input_blocks_3_0_op", 2, 4.0),
    ("input_blocks_4_0_skip_connection", 4, 2.0),
    ("input_blocks_4_1_proj_in", 4, 2.0),
    ("input_blocks_4_1_transformer_blocks_0_attn1_to_q", 4, 2.0),
    ("input_blocks_4_1_transformer_blocks_0_attn1_to_k", 4, 8.0),
    ("input_blocks_4_1_transformer_blocks_1_attn2_to_v", 4, 2.0),
    ("input_blocks_5_1_transformer_blocks_0_attn1_to_out_0", 4, 2.0),
    ("input_blocks_5_1_transformer_blocks_1_ff_net_2", 2, 1.0),
    ("input_blocks_5_1_proj_out", 4, 8.0),
    ("middle_block_0_in_layers_2", 2, 4.0),
    ("middle_block_1_transformer_blocks_0_attn2_to_q", 4, 2.0),
    ("middle_block_1_transformer_blocks_1_attn2_to_k", 4, 2.0),
    ("middle_block_1_transformer_blocks_1_attn1_to_v", 4, 8.0),
    ("middle_block_2_out_layers_3", 2, 1.0),
    ("output_blocks_0_0_in_layers_2", 2, 4.0),
    ("output_blocks_0_1_proj_in", 4, 2.0),
    ("output_blocks_0_1_transformer_blocks_1_attn2_to_out_0", 4, 2.0),
    ("output_blocks_1_0_skip_connection", 2, 1.0),
    ("output_blocks_1_1_transformer_blocks_0_ff_net_0_proj", 4, 8.0),
    ("output_blocks_2_1_transformer_blocks_1_attn1_to_v", 4, 2.0),
    ("output_blocks_2_1_transformer_blocks_0_attn1_to_out_0", 2, 4.0),
    ("output_blocks_2_1_proj_out", 4, 2.0),
    ("output_blocks_2_2_conv", 2, 1.0),
    ("output_blocks_3_0_out_layers_3", 4, 2.0),
    ("output_blocks_4_0_emb_layers_1", 4, 8.0),
    ("output_blocks_5_0_in_layers_2", 2, 4.0),
]
# kohya text-encoder modules (transformers names, `text_model.` included, as kohya writes them).
KOHYA_TE = [
    ("lora_te1_text_model_encoder_layers_0_self_attn_q_proj", 4, 2.0),
    ("lora_te1_text_model_encoder_layers_1_self_attn_out_proj", 2, 4.0),
    ("lora_te1_text_model_encoder_layers_1_mlp_fc2", 4, 8.0),
    ("lora_te2_text_model_encoder_layers_0_self_attn_k_proj", 4, 8.0),
    ("lora_te2_text_model_encoder_layers_0_self_attn_v_proj", 2, 1.0),
    ("lora_te2_text_model_encoder_layers_1_mlp_fc1", 4, 2.0),
]

PEFT_UNET = [
    "down_blocks.0.resnets.0.conv1",
    "down_blocks.0.resnets.1.time_emb_proj",
    "down_blocks.0.downsamplers.0.conv",
    "down_blocks.1.resnets.0.conv_shortcut",
    "down_blocks.1.attentions.0.proj_in",
    "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q",
    "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_v",
    "down_blocks.1.attentions.1.transformer_blocks.1.attn1.to_out.0",
    "down_blocks.1.attentions.1.transformer_blocks.1.ff.net.0.proj",
    "mid_block.attentions.0.transformer_blocks.1.attn2.to_k",
    "mid_block.attentions.0.transformer_blocks.0.ff.net.2",
    "mid_block.attentions.0.proj_out",
    "mid_block.resnets.1.conv2",
    "up_blocks.0.attentions.0.transformer_blocks.0.attn1.to_k",
    "up_blocks.0.attentions.1.proj_out",
    "up_blocks.0.attentions.2.transformer_blocks.1.attn2.to_out.0",
    "up_blocks.0.resnets.2.conv1",
    "up_blocks.0.upsamplers.0.conv",
    "up_blocks.1.resnets.1.conv2",
    "up_blocks.1.resnets.2.time_emb_proj",
    "add_embedding.linear_1",
]
PEFT_TE1 = ["encoder.layers.0.self_attn.k_proj", "encoder.layers.1.self_attn.q_proj",
            "encoder.layers.1.mlp.fc1"]
PEFT_TE2 = ["text_model.encoder.layers.0.self_attn.out_proj",
            "text_model.encoder.layers.1.self_attn.v_proj", "text_model.encoder.layers.0.mlp.fc2"]

RESNET = {"in_layers_2": "conv1", "emb_layers_1": "time_emb_proj", "out_layers_3": "conv2",
          "skip_connection": "conv_shortcut"}
TRANSFORMER_LEAF = [("attn1_to_out_0", "attn1.to_out.0"), ("attn2_to_out_0", "attn2.to_out.0"),
                    ("ff_net_0_proj", "ff.net.0.proj"), ("ff_net_2", "ff.net.2")]


def sgm_to_diffusers(name, layers_per_block=2):
    """Our own SGM -> diffusers name mapping (checked against what diffusers does below)."""
    m = re.fullmatch(r"(input_blocks|middle_block|output_blocks)_(\d+)_(.*)", name)
    kind, i, rest = m.group(1), int(m.group(2)), m.group(3)
    if kind == "input_blocks":
        block, layer = (i - 1) // (layers_per_block + 1), (i - 1) % (layers_per_block + 1)
        if rest == "0_op":
            return f"down_blocks.{block}.downsamplers.0.conv"
        inner, leaf = rest.split("_", 1)
        base = f"down_blocks.{block}.{['resnets', 'attentions'][int(inner)]}.{layer}"
    elif kind == "middle_block":
        base = ["mid_block.resnets.0", "mid_block.attentions.0", "mid_block.resnets.1"][i]
        leaf = rest
    else:
        block, layer = i // (layers_per_block + 1), i % (layers_per_block + 1)
        inner, leaf = rest.split("_", 1)
        if inner == "2" or (leaf == "conv" and inner != "0"):
            return f"up_blocks.{block}.upsamplers.0.conv"
        base = f"up_blocks.{block}.{['resnets', 'attentions'][int(inner)]}.{layer}"
    if leaf in RESNET:
        return f"{base}.{RESNET[leaf]}"
    if leaf in ("proj_in", "proj_out"):
        return f"{base}.{leaf}"
    m = re.fullmatch(r"transformer_blocks_(\d+)_(.*)", leaf)
    tb, op = m.group(1), m.group(2)
    op = dict(TRANSFORMER_LEAF).get(op) or re.sub(r"^(attn\d)_(to_[qkv])$", r"\1.\2", op)
    return f"{base}.transformer_blocks.{tb}.{op}"


def te_module(pipe, kohya_name):
    """(text encoder, its module path) of a `lora_te1_` / `lora_te2_` module name."""
    enc = pipe.text_encoder if kohya_name.startswith("lora_te1_") else pipe.text_encoder_2
    by_kohya = {}
    for n, m in enc.named_modules():
        if isinstance(m, torch.nn.Linear):
            full = n if n.startswith("text_model.") else "text_model." + n
            by_kohya[full.replace(".", "_")] = n
    return enc, by_kohya[kohya_name.split("_", 2)[2]]


def low_rank(m, r, gen, scale):
    if isinstance(m, torch.nn.Conv2d):
        k = m.kernel_size[0]
        down = torch.randn((r, m.in_channels, k, k), generator=gen) * scale
        up = torch.randn((m.out_channels, r, 1, 1), generator=gen) * scale
    else:
        down = torch.randn((r, m.in_features), generator=gen) * scale
        up = torch.randn((m.out_features, r), generator=gen) * scale
    return down, up


def delta(down, up):
    """up @ down in the layer's weight shape."""
    if down.dim() == 4:
        return (up.flatten(1) @ down.flatten(1)).reshape(up.shape[0], *down.shape[1:])
    return up @ down


def kohya_file(pipe, seed):
    """Writes sdxl-kohya; returns ({unet module: (down, up, scale)}, {(encoder, module): ...})."""
    gen = torch.Generator().manual_seed(seed)
    unet_mods = dict(pipe.unet.named_modules())
    sd, unet, te = {}, {}, {}
    for name, r, alpha in KOHYA_UNET:
        path = sgm_to_diffusers(name)
        down, up = low_rank(unet_mods[path], r, gen, 0.3)
        key = "lora_unet_" + name
        sd[f"{key}.lora_down.weight"] = down
        sd[f"{key}.lora_up.weight"] = up
        sd[f"{key}.alpha"] = torch.tensor(alpha)
        unet[path] = (down, up, alpha / r)
    for key, r, alpha in KOHYA_TE:
        enc, path = te_module(pipe, key)
        down, up = low_rank(dict(enc.named_modules())[path], r, gen, 0.3)
        sd[f"{key}.lora_down.weight"] = down
        sd[f"{key}.lora_up.weight"] = up
        sd[f"{key}.alpha"] = torch.tensor(alpha)
        te[(key[:8], path)] = (down, up, alpha / r)
    save_file(sd, OUT / "sdxl-kohya.safetensors")
    return unet, te


def plain_metadata(cfg):
    """cfg.to_dict() with no machine path and sets as sorted lists (a deterministic file)."""
    d = cfg.to_dict()
    d["base_model_name_or_path"] = None
    return {k: sorted(v) if isinstance(v, set) else v for k, v in d.items()}


def sort_metadata(path):
    """Rewrites the safetensors header with its `__metadata__` entries in sorted order: the
    safetensors library writes them from a Rust HashMap, in a different order in each process
    ("format" / "lora_adapter_metadata"), which would make the file differ between runs."""
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8: 8 + n])
    header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    path.write_bytes(len(text).to_bytes(8, "little") + text + raw[8 + n:])


def peft_file(pipe, seed):
    """Writes sdxl-peft through diffusers' save_lora_weights; returns the adapters as
    kohya_file does."""
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=PEFT_UNET, init_lora_weights=False,
                     rank_pattern={"conv2": 2, "ff.net.0.proj": 2},
                     alpha_pattern={"proj_out": 2, "time_emb_proj": 16})
    pipe.unet.add_adapter(cfg)
    randomize_lora(pipe.unet, seed, scale=0.3)
    te1_cfg = LoraConfig(r=2, lora_alpha=4, target_modules=PEFT_TE1, init_lora_weights=False)
    pipe.text_encoder.add_adapter(te1_cfg)
    randomize_lora(pipe.text_encoder, seed + 1, scale=0.3)
    te2_cfg = LoraConfig(r=4, lora_alpha=2, target_modules=PEFT_TE2, init_lora_weights=False)
    pipe.text_encoder_2.add_adapter(te2_cfg)
    randomize_lora(pipe.text_encoder_2, seed + 2, scale=0.3)
    StableDiffusionXLPipeline.save_lora_weights(
        OUT, weight_name="sdxl-peft.safetensors",
        unet_lora_layers=get_peft_model_state_dict(pipe.unet),
        unet_lora_adapter_metadata=plain_metadata(cfg),
        text_encoder_lora_layers=get_peft_model_state_dict(pipe.text_encoder),
        text_encoder_lora_adapter_metadata=plain_metadata(te1_cfg),
        text_encoder_2_lora_layers=get_peft_model_state_dict(pipe.text_encoder_2),
        text_encoder_2_lora_adapter_metadata=plain_metadata(te2_cfg))
    sort_metadata(OUT / "sdxl-peft.safetensors")
    assert count_lora_modules(pipe.unet) == len(PEFT_UNET)
    # The adapters as the file holds them, scales from its metadata.
    sd = load_file(OUT / "sdxl-peft.safetensors")
    with safe_open(OUT / "sdxl-peft.safetensors", "pt") as f:
        meta = json.loads(f.metadata()["lora_adapter_metadata"])
    unet, te = {}, {}
    for k in sorted(sd):
        if not k.endswith(".lora_A.weight"):
            continue
        module = k[: -len(".lora_A.weight")]
        part, path = module.split(".", 1)
        down, up = sd[k], sd[module + ".lora_B.weight"]
        alpha = meta[f"{part}.lora_alpha"]
        for pat, a in meta[f"{part}.alpha_pattern"].items():
            if path == pat or path.endswith("." + pat):
                alpha = a
        if part == "unet":
            unet[path] = (down, up, alpha / down.shape[0])
        else:
            te[("lora_te1" if part == "text_encoder" else "lora_te2", path)] = (
                down, up, alpha / down.shape[0])
    assert len(unet) == len(PEFT_UNET) and len(te) == len(PEFT_TE1) + len(PEFT_TE2)
    return unet, te


def merge_text_encoders(pipe, te, strength):
    with torch.no_grad():
        for (which, path), (down, up, scale) in te.items():
            enc = pipe.text_encoder if which == "lora_te1" else pipe.text_encoder_2
            dict(enc.named_modules())[path].weight += strength * scale * delta(down, up)


def check_loaded(unet, expected, name):
    """Every adapter diffusers created is active and equals the file's (scale included), and no
    module is missing or extra."""
    got = {}
    for n, m in unet.named_modules():
        if hasattr(m, "lora_A") and len(m.lora_A):
            (adapter,) = m.lora_A.keys()
            assert adapter in m.active_adapters, (n, adapter, m.active_adapters)
            a, b = m.lora_A[adapter].weight, m.lora_B[adapter].weight
            got[n] = m.scaling[adapter] * delta(a.detach(), b.detach())
    assert set(got) == set(expected), (name, sorted(set(got) ^ set(expected)))
    for path, (down, up, scale) in expected.items():
        want = scale * delta(down, up)
        assert got[path].shape == want.shape and torch.allclose(got[path], want, atol=1e-7), path
        assert want.abs().max() > 0
    print(f"{name}: diffusers created all {len(got)} UNet adapters with the file's scales")


def check_fused(file_sd, metadata, expected, strength, name):
    """fuse_lora at `strength` on a fresh pipeline changes exactly the file's UNet modules, by
    strength * scale * up @ down."""
    base = StableDiffusionXLPipeline.from_pretrained(MODEL)
    before = {k: v.clone() for k, v in base.unet.state_dict().items()}
    names = load_unet_adapters(base, file_sd, metadata)
    base.fuse_lora(components=["unet"], lora_scale=strength, adapter_names=names)
    base.unload_lora_weights()
    after = base.unet.state_dict()
    assert set(after) == set(before)
    changed = {k[: -len(".weight")] for k in before if not torch.equal(before[k], after[k])}
    assert changed == set(expected), (name, sorted(changed ^ set(expected)))
    for path, (down, up, scale) in expected.items():
        d = after[path + ".weight"] - before[path + ".weight"]
        want = strength * scale * delta(down, up)
        assert torch.allclose(d, want, atol=1e-5, rtol=1e-4), (path, (d - want).abs().max())
    print(f"{name}: fuse_lora({strength}) changed exactly the {len(changed)} UNet modules")


def load_unet_adapters(pipe, file_sd, metadata):
    """The file's UNet adapters through diffusers' load_lora_weights; returns the adapter names.

    diffusers 0.42 keeps only the most common kohya alpha: the others go to an alpha_pattern
    whose keys keep the kohya suffixes (`...attn1.processor.to_k_lora.down.weight`), which PEFT
    then ignores (it warns), so those modules would get the wrong scale. A kohya file is
    therefore loaded as one adapter per alpha value (each group then has a single alpha, which
    diffusers applies right), then all are activated; every adapted layer holds one adapter and
    the strength in cross_attention_kwargs scales them all. check_loaded verifies the result per
    module, and the hand-merged run in main the whole reference."""
    groups = {}
    for k in sorted(file_sd):
        module = k.split(".")[0]
        if k.startswith("lora_unet_"):
            groups.setdefault(float(file_sd[module + ".alpha"]), []).append(k)
        else:
            groups.setdefault(None, []).append(k)
    names = []
    with tempfile.TemporaryDirectory() as tmp:
        for i, (_, keys) in enumerate(sorted(groups.items(), key=lambda g: str(g[0]))):
            save_file({k: file_sd[k] for k in keys}, Path(tmp) / f"g{i}.safetensors",
                      metadata=metadata)
            pipe.load_lora_weights(tmp, weight_name=f"g{i}.safetensors", adapter_name=f"a{i}")
            names.append(f"a{i}")
    # Each load makes its adapter the only active one: activate them all (no weights: the
    # strength comes with the call).
    pipe.unet.set_adapter(names)
    return names


def check_merged(case, unet, te, strength):
    """The same case with every adapter merged by hand (W += strength * scale * up @ down, UNet
    and text encoders) gives the reference's latents and image: diffusers applied the strength
    to all the UNet adapters."""
    pipe = sdxl_pipe()
    mods = dict(pipe.unet.named_modules())
    with torch.no_grad():
        for path, (down, up, scale) in unet.items():
            mods[path].weight += strength * scale * delta(down, up)
    merge_text_encoders(pipe, te, strength)
    images = run(pipe, {**case, "name": "merged-" + case["name"]}, False, {})
    merged = OUT / "reference" / f"merged-{case['name']}.safetensors"
    got = load_file(merged)["latents_final"]
    merged.unlink()
    ref = load_file(OUT / "reference" / f"{case['name']}.safetensors")
    rel = ((got - ref["latents_final"]).abs().max() / ref["latents_final"].abs().max()).item()
    px = np.abs(images.astype(np.int32) - ref["images"].numpy().astype(np.int32)).max()
    print(f"{case['name']}: hand-merged run: latents within {rel:.1e} relative, images {px} levels")
    assert rel < 1e-5 and px <= 1


def unet_only(path):
    sd = load_file(path)
    with safe_open(path, "pt") as f:
        metadata = f.metadata()
    return {k: v for k, v in sd.items() if k.startswith(("lora_unet_", "unet."))}, metadata


def sdxl_pipe():
    pipe = StableDiffusionXLPipeline.from_pretrained(MODEL)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def main():
    torch.set_num_threads(2)
    (OUT / "reference").mkdir(parents=True, exist_ok=True)
    adapters = {"sdxl-kohya": kohya_file(sdxl_pipe(), 60),
                "sdxl-peft": peft_file(sdxl_pipe(), 70)}

    print("kohya module -> diffusers module")
    pipe = sdxl_pipe()
    for name, _, _ in KOHYA_UNET:
        print(f"  {name} -> {sgm_to_diffusers(name)}")
    for key, _, _ in KOHYA_TE:
        enc = "text_encoder" if key.startswith("lora_te1_") else "text_encoder_2"
        print(f"  {key[5:]} -> {enc}.{te_module(pipe, key)[1]}")

    for case in CASES:
        ((file, strength),) = case["loras"]
        unet, te = adapters[case["name"]]
        file_sd, metadata = unet_only(OUT / file)
        pipe = sdxl_pipe()
        load_unet_adapters(pipe, file_sd, metadata)
        check_loaded(pipe.unet, unet, case["name"])
        check_fused(file_sd, metadata, unet, strength, case["name"])
        # Text-encoder adapters merged into the weights (see the module docstring).
        merge_text_encoders(pipe, te, strength)
        images = run(pipe, case, False, {"cross_attention_kwargs": {"scale": strength}})
        base_images = run(sdxl_pipe(), {**case, "name": "base-" + case["name"]}, False, {})
        (OUT / "reference" / f"base-{case['name']}.safetensors").unlink()
        check_merged(case, unet, te, strength)
        diff = np.abs(images.astype(np.int32) - base_images.astype(np.int32)).mean()
        std = images.astype(np.float32).std()
        extreme = np.mean((images == 0) | (images == 255))
        print(f"{case['name']}: images {images.shape}, pixel std {std:.1f} (base "
              f"{base_images.astype(np.float32).std():.1f}), saturated {extreme:.0%}, mean change "
              f"from the base model {diff:.1f} levels")
        assert diff > 4.0, "the LoRA must visibly change the image"
        assert std > 15.0 and extreme < 0.25, "the image must stay non-degenerate"

    (OUT / "sdxl_cases.json").write_text(json.dumps({"cases": CASES}, indent=1) + "\n")
    for p in [OUT / "sdxl-kohya.safetensors", OUT / "sdxl-peft.safetensors"]:
        print(f"{p.name}: {p.stat().st_size} bytes")


if __name__ == "__main__":
    main()
