//! Single-file Stable Diffusion 1.x / 2.x and SDXL checkpoints with the original (LDM / SGM)
//! key names, as published on model hubs: the UNet under `model.diffusion_model.`, the VAE
//! under `first_stage_model.`, the text encoder under `cond_stage_model.transformer.` (CLIP,
//! SD 1.x) or `cond_stage_model.model.` (OpenCLIP, SD 2.x); SDXL's two under
//! `conditioner.embedders.0.transformer.` (CLIP) and `conditioner.embedders.1.model.`
//! (OpenCLIP with `text_projection` stored as a (hidden, projection) matrix, all layers used),
//! and its added-conditioning MLP as `label_emb.0.{0,2}`. The tensors are renamed to diffusers' names
//! as diffusers' single-file conversion does (`convert_ldm_unet_checkpoint`,
//! `convert_ldm_vae_checkpoint`, `convert_open_clip_checkpoint`): resnet parts renamed, the VAE
//! attention's 1x1 convolutions taken as linear layers, OpenCLIP's fused `in_proj` split into
//! q / k / v.
//!
//! The configs come from a components folder (a diffusers folder whose config files, tokenizer
//! and scheduler are used, as diffusers' `config=`), or are inferred from the tensors' names and
//! shapes: block widths, layers per block, attention blocks, linear or convolutional
//! projections, cross-attention width, inpainting input channels, VAE and text-encoder sizes.
//! What the tensors do not tell is taken from the SD 1.x / 2.x releases: 8 attention heads (SD
//! 1.x) or 64-wide heads (SD 2.x), the VAE's 32 norm groups and 0.18215 scaling, quick-GELU CLIP
//! (SD 1.x) or GELU OpenCLIP without its last layer (SD 2.x), and the scheduler; the prediction
//! type (epsilon or v) is the caller's.
//!
//! Why one long file: the renaming of the three networks and the inference of their configs
//! read the same key and shape tables of a checkpoint; its tests are at the end.

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use serde_json::{json, Value};

use crate::modules::config::{numbered_count, JsonConfig};
use crate::samplers::PredictionType;
use crate::{Error, Result};

pub const UNET_PREFIX: &str = "model.diffusion_model.";
pub const VAE_PREFIX: &str = "first_stage_model.";
pub const CLIP_PREFIX: &str = "cond_stage_model.transformer.";
pub const OPEN_CLIP_PREFIX: &str = "cond_stage_model.model.";
/// SDXL's first (CLIP) and second (OpenCLIP) text encoders.
pub const XL_CLIP_PREFIX: &str = "conditioner.embedders.0.transformer.";
pub const XL_OPEN_CLIP_PREFIX: &str = "conditioner.embedders.1.model.";

/// Names and shapes of a safetensors file's tensors, read from its header only.
pub fn read_shapes(file: &Path) -> Result<HashMap<String, Vec<usize>>> {
    // SAFETY: the file is memory-mapped read-only and must not change while it is read.
    let st = unsafe { candle_core::safetensors::MmapedSafetensors::new(file) }.map_err(|e| {
        Error::config(
            file,
            format!("cannot read safetensors weights: {}", Error::from(e)),
        )
    })?;
    Ok(st
        .tensors()
        .into_iter()
        .map(|(name, view)| (name, view.shape().to_vec()))
        .collect())
}

/// Whether a file's tensors are a Stable Diffusion LDM checkpoint (a UNet under
/// `model.diffusion_model.`).
pub fn is_sd_checkpoint(shapes: &HashMap<String, Vec<usize>>) -> bool {
    shapes
        .keys()
        .any(|k| k.starts_with(UNET_PREFIX) && k.contains("input_blocks."))
}

/// The text encoder kind of a checkpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TextEncoderKind {
    /// transformers' CLIPTextModel names (SD 1.x).
    Clip,
    /// OpenCLIP names (SD 2.x).
    OpenClip,
    /// SDXL: CLIP names under `conditioner.embedders.0.transformer.` and OpenCLIP names (with
    /// its projection) under `conditioner.embedders.1.model.`.
    XlDual,
}

/// What the tensors of a checkpoint say.
#[derive(Debug, Clone)]
pub struct Checkpoint {
    pub path: PathBuf,
    pub shapes: HashMap<String, Vec<usize>>,
    pub text_encoder: TextEncoderKind,
    pub has_vae: bool,
    /// `first_stage_model.` in a full checkpoint; none in a separate VAE file.
    pub vae_prefix: &'static str,
}

impl Checkpoint {
    /// Reads a checkpoint's header and checks that it is one we load.
    pub fn open(path: &Path) -> Result<Self> {
        let shapes = read_shapes(path)?;
        if !is_sd_checkpoint(&shapes) {
            return Err(Error::config(
                path,
                "not a Stable Diffusion checkpoint: no UNet tensors under `model.diffusion_model.`",
            ));
        }
        let has = |prefix: &str| shapes.keys().any(|k| k.starts_with(prefix));
        let sgm = has("conditioner.embedders.");
        let label_emb = has(&format!("{UNET_PREFIX}label_emb."));
        let text_encoder = if sgm || label_emb {
            if !(has(XL_CLIP_PREFIX) && has(XL_OPEN_CLIP_PREFIX)) {
                return Err(Error::config(
                    path,
                    "an SDXL (SGM) checkpoint needs both text encoders (`conditioner.embedders.0.transformer.` and `conditioner.embedders.1.model.`); refiner checkpoints (one OpenCLIP encoder) are not loaded",
                ));
            }
            if !label_emb || has("cond_stage_model.") {
                return Err(Error::config(
                    path,
                    "mixed layouts: SDXL text encoders with an SD 1.x / 2.x UNet or text encoder (expected `model.diffusion_model.label_emb.` and no `cond_stage_model.`)",
                ));
            }
            TextEncoderKind::XlDual
        } else if shapes.keys().any(|k| k.starts_with(OPEN_CLIP_PREFIX)) {
            TextEncoderKind::OpenClip
        } else if shapes.keys().any(|k| k.starts_with(CLIP_PREFIX)) {
            TextEncoderKind::Clip
        } else {
            return Err(Error::config(
                path,
                "the checkpoint holds no text encoder (`cond_stage_model.`)",
            ));
        };
        let has_vae = shapes.keys().any(|k| k.starts_with(VAE_PREFIX));
        Ok(Self {
            path: path.to_path_buf(),
            shapes,
            text_encoder,
            has_vae,
            vae_prefix: VAE_PREFIX,
        })
    }

    /// Reads a separate VAE file with LDM names (`encoder.down.0...`, with or without
    /// `first_stage_model.`).
    pub fn open_vae(path: &Path) -> Result<Self> {
        let shapes = read_shapes(path)?;
        let vae_prefix = if shapes.keys().any(|k| k.starts_with(VAE_PREFIX)) {
            VAE_PREFIX
        } else if shapes.keys().any(|k| k.starts_with("decoder.up.")) {
            ""
        } else {
            return Err(Error::config(
                path,
                "not a VAE with the original names (`decoder.up.N...`)",
            ));
        };
        Ok(Self {
            path: path.to_path_buf(),
            shapes,
            text_encoder: TextEncoderKind::Clip,
            has_vae: true,
            vae_prefix,
        })
    }

    pub fn family(&self) -> &'static str {
        match self.text_encoder {
            TextEncoderKind::Clip => "sd1",
            TextEncoderKind::OpenClip => "sd2",
            TextEncoderKind::XlDual => "sdxl",
        }
    }

    fn shape(&self, key: &str) -> Result<&[usize]> {
        self.shapes
            .get(key)
            .map(Vec::as_slice)
            .ok_or_else(|| Error::config(&self.path, format!("missing tensor {key:?}")))
    }

    fn dim(&self, key: &str, i: usize) -> Result<usize> {
        self.shape(key)?
            .get(i)
            .copied()
            .ok_or_else(|| Error::config(&self.path, format!("tensor {key:?} has no dim {i}")))
    }

    fn has(&self, key: &str) -> bool {
        self.shapes.contains_key(key)
    }

    /// The largest `N + 1` over keys `<prefix>N.`.
    fn count(&self, prefix: &str) -> usize {
        numbered_count(self.shapes.keys().map(String::as_str), prefix)
    }

    /// Layers per UNet block: the resnets before the first downsampler.
    pub fn unet_layers_per_block(&self) -> Result<usize> {
        let p = format!("{UNET_PREFIX}input_blocks.");
        let n = self.count(&p);
        let first_op = (1..n).find(|i| self.has(&format!("{p}{i}.0.op.weight")));
        match first_op {
            Some(i) if i >= 2 => Ok(i - 1),
            Some(_) => Err(Error::config(&self.path, "a UNet block without resnets")),
            None if n >= 2 => Ok(n - 1),
            None => Err(Error::config(&self.path, "the UNet has no input blocks")),
        }
    }

    /// The UNet config diffusers' `UNet2DConditionModel` would have, from the shapes.
    pub fn infer_unet_config(&self, prediction: PredictionType) -> Result<Value> {
        let p = UNET_PREFIX;
        let l = self.unet_layers_per_block()?;
        let inputs = self.count(&format!("{p}input_blocks."));
        // 1 (conv_in) + blocks x (l + 1) - 1 (no downsampler after the last block).
        let blocks = inputs / (l + 1);
        if blocks == 0 || 1 + blocks * (l + 1) - 1 != inputs {
            return Err(Error::config(
                &self.path,
                format!("{inputs} UNet input blocks do not make blocks of {l} layers"),
            ));
        }
        let mut channels = Vec::new();
        let mut down_types = Vec::new();
        let mut depth = Vec::new();
        let mut cross = None;
        let mut linear = false;
        for b in 0..blocks {
            let i = 1 + b * (l + 1);
            channels.push(self.dim(&format!("{p}input_blocks.{i}.0.out_layers.3.weight"), 0)?);
            let attn = format!("{p}input_blocks.{i}.1.");
            depth.push(self.count(&format!("{attn}transformer_blocks.")).max(1));
            if self.has(&format!("{attn}proj_in.weight")) {
                down_types.push("CrossAttnDownBlock2D");
                linear = self.shape(&format!("{attn}proj_in.weight"))?.len() == 2;
                cross =
                    Some(self.dim(&format!("{attn}transformer_blocks.0.attn2.to_k.weight"), 1)?);
            } else {
                down_types.push("DownBlock2D");
            }
        }
        let up_types: Vec<&str> = (0..blocks)
            .map(|b| {
                let i = b * (l + 1);
                if self.has(&format!("{p}output_blocks.{i}.1.proj_in.weight")) {
                    "CrossAttnUpBlock2D"
                } else {
                    "UpBlock2D"
                }
            })
            .collect();
        let cross = cross.ok_or_else(|| Error::config(&self.path, "the UNet has no attention"))?;
        if self.text_encoder == TextEncoderKind::XlDual {
            return self.infer_xl_unet(channels, l, down_types, up_types, depth, cross, linear);
        }
        let sd2 = self.text_encoder == TextEncoderKind::OpenClip;
        // SD 2.x: 64-wide heads; SD 1.x: 8 heads (diffusers' `attention_head_dim` counts heads
        // there).
        let heads: Value = if sd2 {
            json!(channels.iter().map(|c| (c / 64).max(1)).collect::<Vec<_>>())
        } else {
            json!(8)
        };
        let v = prediction == PredictionType::VPrediction;
        Ok(json!({
            "_class_name": "UNet2DConditionModel",
            "in_channels": self.dim(&format!("{p}input_blocks.0.0.weight"), 1)?,
            "out_channels": self.dim(&format!("{p}out.2.weight"), 0)?,
            "block_out_channels": channels,
            "layers_per_block": l,
            "down_block_types": down_types,
            "up_block_types": up_types,
            "cross_attention_dim": cross,
            "attention_head_dim": heads,
            "use_linear_projection": linear,
            "upcast_attention": sd2 && v,
            "sample_size": if sd2 && v { 96 } else { 64 },
        }))
    }

    /// SDXL's UNet config: 64-wide heads, transformer depth per block from the tensors, and
    /// the `text_time` conditioning whose widths follow from `label_emb` and the second text
    /// encoder's projection (6 size / crop ids).
    #[allow(clippy::too_many_arguments)]
    fn infer_xl_unet(
        &self,
        channels: Vec<usize>,
        layers: usize,
        down_types: Vec<&str>,
        up_types: Vec<&str>,
        depth: Vec<usize>,
        cross: usize,
        linear: bool,
    ) -> Result<Value> {
        let p = UNET_PREFIX;
        let input_dim = self.dim(&format!("{p}label_emb.0.0.weight"), 1)?;
        let pooled = self.dim(&format!("{XL_OPEN_CLIP_PREFIX}text_projection"), 1)?;
        let time_dim = input_dim
            .checked_sub(pooled)
            .filter(|r| r % 6 == 0 && *r > 0)
            .map(|r| r / 6)
            .ok_or_else(|| {
                Error::config(
                    &self.path,
                    format!("label_emb takes {input_dim} values, which is not the pooled width {pooled} plus 6 ids (a refiner-style model?)"),
                )
            })?;
        Ok(json!({
            "_class_name": "UNet2DConditionModel",
            "in_channels": self.dim(&format!("{p}input_blocks.0.0.weight"), 1)?,
            "out_channels": self.dim(&format!("{p}out.2.weight"), 0)?,
            "block_out_channels": channels.clone(),
            "layers_per_block": layers,
            "down_block_types": down_types,
            "up_block_types": up_types,
            "transformer_layers_per_block": depth,
            "cross_attention_dim": cross,
            "attention_head_dim": channels.iter().map(|c| (c / 64).max(1)).collect::<Vec<_>>(),
            "use_linear_projection": linear,
            "addition_embed_type": "text_time",
            "addition_time_embed_dim": time_dim,
            "projection_class_embeddings_input_dim": input_dim,
            "sample_size": 128,
        }))
    }

    /// The VAE config, from the shapes.
    pub fn infer_vae_config(&self) -> Result<Value> {
        let vp = self.vae_prefix;
        let p = format!("{vp}encoder.down.");
        let n = self.count(&p);
        let channels = (0..n)
            .map(|i| self.dim(&format!("{p}{i}.block.0.conv1.weight"), 0))
            .collect::<Result<Vec<_>>>()?;
        let layers = self.count(&format!("{p}0.block."));
        let latent = self.dim(&format!("{vp}post_quant_conv.weight"), 0)?;
        Ok(json!({
            "_class_name": "AutoencoderKL",
            "in_channels": self.dim(&format!("{vp}encoder.conv_in.weight"), 1)?,
            "out_channels": self.dim(&format!("{vp}decoder.conv_out.weight"), 0)?,
            "block_out_channels": channels,
            "down_block_types": vec!["DownEncoderBlock2D"; n],
            "up_block_types": vec!["UpDecoderBlock2D"; n],
            "layers_per_block": layers,
            "latent_channels": latent,
            "norm_num_groups": 32,
            "scaling_factor": if self.text_encoder == TextEncoderKind::XlDual { 0.13025 } else { 0.18215 },
            "force_upcast": true,
        }))
    }

    /// The text encoder config, from the shapes (SDXL: the first one).
    pub fn infer_text_encoder_config(&self) -> Result<Value> {
        match self.text_encoder {
            TextEncoderKind::Clip | TextEncoderKind::XlDual => {
                let prefix = if self.text_encoder == TextEncoderKind::Clip {
                    CLIP_PREFIX
                } else {
                    XL_CLIP_PREFIX
                };
                let p = format!("{prefix}text_model.");
                let emb = self.shape(&format!("{p}embeddings.token_embedding.weight"))?;
                let (vocab, hidden) = (emb[0], emb[1]);
                Ok(json!({
                    "vocab_size": vocab,
                    "hidden_size": hidden,
                    "intermediate_size": self.dim(&format!("{p}encoder.layers.0.mlp.fc1.weight"), 0)?,
                    "num_hidden_layers": self.count(&format!("{p}encoder.layers.")),
                    "num_attention_heads": (hidden / 64).max(1),
                    "max_position_embeddings": self.dim(&format!("{p}embeddings.position_embedding.weight"), 0)?,
                    "hidden_act": "quick_gelu",
                    "layer_norm_eps": 1e-5,
                    "bos_token_id": 0,
                    "eos_token_id": 2,
                    "pad_token_id": 1,
                }))
            }
            TextEncoderKind::OpenClip => {
                // SD 2.x uses the penultimate layer: the last one is not part of the model.
                self.open_clip_config(OPEN_CLIP_PREFIX, 1)
            }
        }
    }

    /// SDXL's second text encoder (`CLIPTextModelWithProjection`), from the shapes.
    pub fn infer_text_encoder_2_config(&self) -> Result<Value> {
        let mut v = self.open_clip_config(XL_OPEN_CLIP_PREFIX, 0)?;
        v["projection_dim"] = json!(self.dim(&format!("{XL_OPEN_CLIP_PREFIX}text_projection"), 1)?);
        Ok(v)
    }

    /// An OpenCLIP text tower under `p` as a transformers config, without its last `drop`
    /// layers.
    fn open_clip_config(&self, p: &str, drop: usize) -> Result<Value> {
        let emb = self.shape(&format!("{p}token_embedding.weight"))?;
        let (vocab, hidden) = (emb[0], emb[1]);
        let layers = self
            .count(&format!("{p}transformer.resblocks."))
            .saturating_sub(drop);
        Ok(json!({
            "vocab_size": vocab,
            "hidden_size": hidden,
            "intermediate_size": self.dim(&format!("{p}transformer.resblocks.0.mlp.c_fc.weight"), 0)?,
            "num_hidden_layers": layers,
            "num_attention_heads": (hidden / 64).max(1),
            "max_position_embeddings": self.dim(&format!("{p}positional_embedding"), 0)?,
            "hidden_act": "gelu",
            "layer_norm_eps": 1e-5,
            "bos_token_id": 0,
            "eos_token_id": 2,
            "pad_token_id": 1,
        }))
    }

    /// The prediction type diffusers' `from_single_file` assumes without a config: SD 2.x
    /// checkpoints get stabilityai/stable-diffusion-2-1's (v_prediction, 768 pixels); the
    /// others epsilon. (SD 2.x base models need `--prediction-type epsilon`.)
    pub fn default_prediction(&self) -> PredictionType {
        match self.text_encoder {
            TextEncoderKind::OpenClip => PredictionType::VPrediction,
            _ => PredictionType::Epsilon,
        }
    }

    /// The scheduler of the SD 1.x (PNDM, as stable-diffusion-v1-5) or SD 2.x (DDIM, as
    /// stable-diffusion-2-1) releases, with `prediction`.
    pub fn default_scheduler(&self, prediction: PredictionType) -> Value {
        let prediction = prediction.as_str();
        let common = json!({
            "beta_start": 0.00085,
            "beta_end": 0.012,
            "beta_schedule": "scaled_linear",
            "num_train_timesteps": 1000,
            "set_alpha_to_one": false,
            "steps_offset": 1,
            "clip_sample": false,
            "prediction_type": prediction,
        });
        let mut v = common;
        match self.text_encoder {
            TextEncoderKind::Clip => {
                v["_class_name"] = json!("PNDMScheduler");
                v["skip_prk_steps"] = json!(true);
            }
            TextEncoderKind::OpenClip => {
                v["_class_name"] = json!("DDIMScheduler");
            }
            TextEncoderKind::XlDual => {
                // stable-diffusion-xl-base-1.0's scheduler.
                v["_class_name"] = json!("EulerDiscreteScheduler");
                v["timestep_spacing"] = json!("leading");
                v["interpolation_type"] = json!("linear");
                v["use_karras_sigmas"] = json!(false);
            }
        }
        v
    }
}

/// How one diffusers tensor is made from a checkpoint tensor.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Take {
    /// As stored.
    All,
    /// Rows `start..start + len`.
    Rows(usize, usize),
    /// A matrix transposed (OpenCLIP's `text_projection` as a linear weight).
    Transpose,
    /// A 1x1 convolution kernel taken as a linear weight.
    Squeeze,
}

/// diffusers name -> (checkpoint key, how).
pub(crate) type Plan = HashMap<String, (String, Take)>;

fn resnet_rest(rest: &str) -> String {
    for (a, b) in [
        ("in_layers.0.", "norm1."),
        ("in_layers.2.", "conv1."),
        ("emb_layers.1.", "time_emb_proj."),
        ("out_layers.0.", "norm2."),
        ("out_layers.3.", "conv2."),
        ("skip_connection.", "conv_shortcut."),
    ] {
        if let Some(r) = rest.strip_prefix(a) {
            return format!("{b}{r}");
        }
    }
    rest.to_string()
}

/// The diffusers name of a UNet key (without the prefix), for `l` layers per block.
fn unet_name(key: &str, l: usize) -> Option<String> {
    for (a, b) in [
        ("time_embed.0.", "time_embedding.linear_1."),
        ("time_embed.2.", "time_embedding.linear_2."),
        ("input_blocks.0.0.", "conv_in."),
        ("label_emb.0.0.", "add_embedding.linear_1."),
        ("label_emb.0.2.", "add_embedding.linear_2."),
        ("out.0.", "conv_norm_out."),
        ("out.2.", "conv_out."),
    ] {
        if let Some(r) = key.strip_prefix(a) {
            return Some(format!("{b}{r}"));
        }
    }
    let mut parts = key.splitn(4, '.');
    let (group, i, j, rest) = (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
    let i: usize = i.parse().ok()?;
    match (group, j) {
        ("input_blocks", _) if i >= 1 => {
            let (b, k) = ((i - 1) / (l + 1), (i - 1) % (l + 1));
            match j {
                "0" if rest.starts_with("op.") => Some(format!(
                    "down_blocks.{b}.downsamplers.0.conv.{}",
                    &rest["op.".len()..]
                )),
                "0" => Some(format!("down_blocks.{b}.resnets.{k}.{}", resnet_rest(rest))),
                "1" => Some(format!("down_blocks.{b}.attentions.{k}.{rest}")),
                _ => None,
            }
        }
        ("output_blocks", _) => {
            let (b, k) = (i / (l + 1), i % (l + 1));
            match j {
                "0" => Some(format!("up_blocks.{b}.resnets.{k}.{}", resnet_rest(rest))),
                "1" | "2" if rest.starts_with("conv.") => {
                    Some(format!("up_blocks.{b}.upsamplers.0.{rest}"))
                }
                "1" => Some(format!("up_blocks.{b}.attentions.{k}.{rest}")),
                _ => None,
            }
        }
        _ => None,
    }
    .or_else(|| {
        // middle_block.N.rest
        let rest = key.strip_prefix("middle_block.")?;
        let (n, rest) = rest.split_once('.')?;
        match n {
            "0" => Some(format!("mid_block.resnets.0.{}", resnet_rest(rest))),
            "1" => Some(format!("mid_block.attentions.0.{rest}")),
            "2" => Some(format!("mid_block.resnets.1.{}", resnet_rest(rest))),
            _ => None,
        }
    })
}

/// The original (LDM / SGM) name of a diffusers UNet module path, the inverse of
/// [`unet_name`]: `l` layers per down block, `up_has_attention(b)` whether up block `b` has
/// attentions (its upsampler then follows them). Kohya's SDXL LoRAs name UNet modules so.
pub fn ldm_unet_name(
    path: &str,
    l: usize,
    up_has_attention: &dyn Fn(usize) -> bool,
) -> Option<String> {
    for (a, b) in [
        ("time_embedding.linear_1", "time_embed.0"),
        ("time_embedding.linear_2", "time_embed.2"),
        ("add_embedding.linear_1", "label_emb.0.0"),
        ("add_embedding.linear_2", "label_emb.0.2"),
        ("conv_in", "input_blocks.0.0"),
        ("conv_norm_out", "out.0"),
        ("conv_out", "out.2"),
    ] {
        if let Some(r) = path.strip_prefix(a) {
            if r.is_empty() || r.starts_with('.') {
                return Some(format!("{b}{r}"));
            }
        }
    }
    let resnet = |rest: &str| -> String {
        for (a, b) in [
            ("norm1", "in_layers.0"),
            ("conv1", "in_layers.2"),
            ("time_emb_proj", "emb_layers.1"),
            ("norm2", "out_layers.0"),
            ("conv2", "out_layers.3"),
            ("conv_shortcut", "skip_connection"),
        ] {
            if let Some(r) = rest.strip_prefix(a) {
                if r.is_empty() || r.starts_with('.') {
                    return format!("{b}{r}");
                }
            }
        }
        rest.to_string()
    };
    if let Some(rest) = path.strip_prefix("mid_block.") {
        let (kind, rest) = rest.split_once('.')?;
        let (i, rest) = rest.split_once('.').unwrap_or((rest, ""));
        let tail = |r: &str| {
            if r.is_empty() {
                String::new()
            } else {
                format!(".{r}")
            }
        };
        return match (kind, i) {
            ("resnets", "0") => Some(format!("middle_block.0.{}", resnet(rest))),
            ("attentions", "0") => Some(format!("middle_block.1{}", tail(rest))),
            ("resnets", "1") => Some(format!("middle_block.2.{}", resnet(rest))),
            _ => None,
        };
    }
    let mut parts = path.splitn(5, '.');
    let (group, b, kind, k) = (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
    let rest = parts.next().unwrap_or("");
    let b: usize = b.parse().ok()?;
    let k: usize = k.parse().ok()?;
    let dotted = |r: &str| {
        if r.is_empty() {
            String::new()
        } else {
            format!(".{r}")
        }
    };
    match (group, kind) {
        ("down_blocks", "resnets") => Some(format!(
            "input_blocks.{}.0.{}",
            1 + b * (l + 1) + k,
            resnet(rest)
        )),
        ("down_blocks", "attentions") => Some(format!(
            "input_blocks.{}.1{}",
            1 + b * (l + 1) + k,
            dotted(rest)
        )),
        ("down_blocks", "downsamplers") => {
            let rest = rest.strip_prefix("conv")?;
            Some(format!("input_blocks.{}.0.op{rest}", (b + 1) * (l + 1)))
        }
        ("up_blocks", "resnets") => Some(format!(
            "output_blocks.{}.0.{}",
            b * (l + 1) + k,
            resnet(rest)
        )),
        ("up_blocks", "attentions") => Some(format!(
            "output_blocks.{}.1{}",
            b * (l + 1) + k,
            dotted(rest)
        )),
        ("up_blocks", "upsamplers") => {
            let slot = if up_has_attention(b) { 2 } else { 1 };
            Some(format!("output_blocks.{}.{slot}.{rest}", b * (l + 1) + l))
        }
        _ => None,
    }
}

/// The diffusers name of a VAE key (without the prefix), for `n` resolution levels.
fn vae_name(key: &str, n: usize) -> Option<(String, Take)> {
    let (side, rest) = key.split_once('.')?;
    if side != "encoder" && side != "decoder" {
        // quant_conv, post_quant_conv
        return Some((key.to_string(), Take::All));
    }
    let rest = rest.replace("nin_shortcut.", "conv_shortcut.");
    let renamed = if let Some(r) = rest.strip_prefix("norm_out.") {
        format!("conv_norm_out.{r}")
    } else if let Some(r) = rest.strip_prefix("mid.block_1.") {
        format!("mid_block.resnets.0.{r}")
    } else if let Some(r) = rest.strip_prefix("mid.block_2.") {
        format!("mid_block.resnets.1.{r}")
    } else if let Some(r) = rest.strip_prefix("mid.attn_1.") {
        let (name, leaf) = r.split_once('.')?;
        let new = match name {
            "norm" => "group_norm",
            "q" => "to_q",
            "k" => "to_k",
            "v" => "to_v",
            "proj_out" => "to_out.0",
            _ => return None,
        };
        let take = if leaf == "weight" && name != "norm" {
            Take::Squeeze
        } else {
            Take::All
        };
        return Some((format!("{side}.mid_block.attentions.0.{new}.{leaf}"), take));
    } else if let Some(r) = rest.strip_prefix("down.") {
        let (i, r) = r.split_once('.')?;
        let i: usize = i.parse().ok()?;
        if let Some(r) = r.strip_prefix("block.") {
            format!("down_blocks.{i}.resnets.{r}")
        } else {
            format!(
                "down_blocks.{i}.downsamplers.0.{}",
                r.strip_prefix("downsample.")?
            )
        }
    } else if let Some(r) = rest.strip_prefix("up.") {
        let (i, r) = r.split_once('.')?;
        let i: usize = i.parse().ok()?;
        let b = n.checked_sub(1 + i)?;
        if let Some(r) = r.strip_prefix("block.") {
            format!("up_blocks.{b}.resnets.{r}")
        } else {
            format!(
                "up_blocks.{b}.upsamplers.0.{}",
                r.strip_prefix("upsample.")?
            )
        }
    } else {
        rest
    };
    Some((format!("{side}.{renamed}"), Take::All))
}

/// The diffusers names of an OpenCLIP key (without the prefix), for `layers` used layers;
/// `projection`: `text_projection` becomes the linear weight of `CLIPTextModelWithProjection`.
fn open_clip_names(
    key: &str,
    layers: usize,
    shapes: &[usize],
    projection: bool,
) -> Option<Vec<(String, Take)>> {
    let t = "text_model.";
    let one = |n: String| Some(vec![(n, Take::All)]);
    match key {
        "text_projection" if projection => {
            return Some(vec![("text_projection.weight".into(), Take::Transpose)])
        }
        "logit_scale" if projection => return Some(Vec::new()),
        "token_embedding.weight" => return one(format!("{t}embeddings.token_embedding.weight")),
        "positional_embedding" => return one(format!("{t}embeddings.position_embedding.weight")),
        "ln_final.weight" | "ln_final.bias" => {
            return one(format!("{t}final_layer_norm.{}", &key["ln_final.".len()..]))
        }
        // Used by the image side of CLIP only.
        "text_projection" | "logit_scale" => return Some(Vec::new()),
        _ => {}
    }
    let rest = key.strip_prefix("transformer.resblocks.")?;
    let (i, rest) = rest.split_once('.')?;
    let i: usize = i.parse().ok()?;
    if i >= layers {
        // SD 2.x's unused last layer.
        return Some(Vec::new());
    }
    let o = format!("{t}encoder.layers.{i}.");
    if let Some(p) = rest.strip_prefix("attn.in_proj_") {
        let d = shapes.first()? / 3;
        return Some(
            ["q", "k", "v"]
                .iter()
                .enumerate()
                .map(|(j, x)| (format!("{o}self_attn.{x}_proj.{p}"), Take::Rows(j * d, d)))
                .collect(),
        );
    }
    let new = [
        ("ln_1.", "layer_norm1."),
        ("ln_2.", "layer_norm2."),
        ("attn.out_proj.", "self_attn.out_proj."),
        ("mlp.c_fc.", "mlp.fc1."),
        ("mlp.c_proj.", "mlp.fc2."),
    ]
    .iter()
    .find_map(|(a, b)| rest.strip_prefix(a).map(|r| format!("{o}{b}{r}")))?;
    one(new)
}

/// The diffusers names of one component's tensors. `unet_layers`, `vae_levels` and
/// `text_layers` come from the configs in use. A key under the component's prefix that maps to
/// nothing is an error naming it.
fn plan(
    ckpt: &Checkpoint,
    prefix: &str,
    name_of: impl Fn(&str, &[usize]) -> Option<Vec<(String, Take)>>,
) -> Result<Plan> {
    let mut out = Plan::new();
    let keys: BTreeSet<&String> = ckpt.shapes.keys().collect();
    for key in keys {
        let Some(short) = key.strip_prefix(prefix) else {
            continue;
        };
        // transformers' buffers, not weights.
        if short.ends_with("position_ids") {
            continue;
        }
        let names = name_of(short, &ckpt.shapes[key]).ok_or_else(|| {
            Error::config(
                &ckpt.path,
                format!("unexpected tensor {key:?} in a Stable Diffusion checkpoint"),
            )
        })?;
        for (n, take) in names {
            out.insert(n, (key.clone(), take));
        }
    }
    Ok(out)
}

pub(crate) fn unet_plan(ckpt: &Checkpoint, layers_per_block: usize) -> Result<Plan> {
    plan(ckpt, UNET_PREFIX, |k, _| {
        unet_name(k, layers_per_block).map(|n| vec![(n, Take::All)])
    })
}

/// A VAE plan for the tensors of `ckpt` under `prefix` (`first_stage_model.`, or none for a
/// separate VAE file).
pub(crate) fn vae_plan(ckpt: &Checkpoint, prefix: &str) -> Result<Plan> {
    let levels = ckpt.count(&format!("{prefix}decoder.up."));
    plan(ckpt, prefix, |k, _| vae_name(k, levels).map(|x| vec![x]))
}

pub(crate) fn text_encoder_plan(ckpt: &Checkpoint, layers: usize) -> Result<Plan> {
    match ckpt.text_encoder {
        TextEncoderKind::Clip | TextEncoderKind::XlDual => {
            let prefix = if ckpt.text_encoder == TextEncoderKind::Clip {
                CLIP_PREFIX
            } else {
                XL_CLIP_PREFIX
            };
            plan(ckpt, prefix, |k, _| {
                let n = if k.starts_with("text_model.") {
                    k.to_string()
                } else {
                    format!("text_model.{k}")
                };
                Some(vec![(n, Take::All)])
            })
        }
        TextEncoderKind::OpenClip => plan(ckpt, OPEN_CLIP_PREFIX, |k, shape| {
            open_clip_names(k, layers, shape, false)
        }),
    }
}

/// SDXL's second text encoder, all `layers` of it, with its projection.
pub(crate) fn text_encoder_2_plan(ckpt: &Checkpoint, layers: usize) -> Result<Plan> {
    plan(ckpt, XL_OPEN_CLIP_PREFIX, |k, shape| {
        open_clip_names(k, layers, shape, true)
    })
}

/// The tensors of `plan`, read from `file`'s `tensors` (loaded once) and renamed.
pub(crate) fn apply(
    plan: &Plan,
    tensors: &HashMap<String, Tensor>,
    file: &Path,
) -> Result<HashMap<String, Tensor>> {
    let mut out = HashMap::with_capacity(plan.len());
    for (name, (key, take)) in plan {
        let t = tensors
            .get(key)
            .ok_or_else(|| Error::config(file, format!("missing tensor {key:?}")))?;
        let t = match take {
            Take::All => t.clone(),
            Take::Rows(s, n) => t.narrow(0, *s, *n)?,
            Take::Transpose => t.t()?.contiguous()?,
            Take::Squeeze => {
                let d = t.dims();
                if d.len() == 4 && d[2] == 1 && d[3] == 1 {
                    t.reshape((d[0], d[1]))?
                } else {
                    t.clone()
                }
            }
        };
        out.insert(name.clone(), t);
    }
    Ok(out)
}

/// A component config from a components folder, or the inferred one (named after the file).
pub(crate) fn config_or(
    components: Option<&Path>,
    sub: &str,
    file: &Path,
    inferred: impl FnOnce() -> Result<Value>,
) -> Result<JsonConfig> {
    if let Some(dir) = components {
        let p = dir.join(sub).join("config.json");
        if p.is_file() {
            return JsonConfig::load(&p);
        }
        return Err(Error::config(dir, format!("missing {sub}/config.json")));
    }
    Ok(JsonConfig::from_value(file, inferred()?))
}

/// Loads every tensor of a checkpoint onto `device` (in its stored dtype).
pub(crate) fn load_tensors(file: &Path, device: &Device) -> Result<HashMap<String, Tensor>> {
    candle_core::safetensors::load(file, device).map_err(|e| {
        Error::config(
            file,
            format!("cannot read safetensors weights: {}", Error::from(e)),
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unet_names_follow_diffusers_conversion() {
        for (key, l, want) in [
            ("time_embed.0.weight", 2, "time_embedding.linear_1.weight"),
            ("input_blocks.0.0.bias", 2, "conv_in.bias"),
            (
                "input_blocks.2.0.in_layers.2.weight",
                2,
                "down_blocks.0.resnets.1.conv1.weight",
            ),
            (
                "input_blocks.3.0.op.weight",
                2,
                "down_blocks.0.downsamplers.0.conv.weight",
            ),
            (
                "input_blocks.4.1.proj_in.weight",
                2,
                "down_blocks.1.attentions.0.proj_in.weight",
            ),
            (
                "input_blocks.4.0.skip_connection.bias",
                2,
                "down_blocks.1.resnets.0.conv_shortcut.bias",
            ),
            (
                "middle_block.1.norm.weight",
                2,
                "mid_block.attentions.0.norm.weight",
            ),
            (
                "middle_block.2.emb_layers.1.weight",
                2,
                "mid_block.resnets.1.time_emb_proj.weight",
            ),
            (
                "output_blocks.5.1.transformer_blocks.0.attn2.to_k.weight",
                2,
                "up_blocks.1.attentions.2.transformer_blocks.0.attn2.to_k.weight",
            ),
            (
                "output_blocks.2.1.conv.weight",
                2,
                "up_blocks.0.upsamplers.0.conv.weight",
            ),
            (
                "output_blocks.5.2.conv.bias",
                2,
                "up_blocks.1.upsamplers.0.conv.bias",
            ),
            ("out.2.weight", 1, "conv_out.weight"),
            // SDXL's added conditioning.
            ("label_emb.0.0.weight", 2, "add_embedding.linear_1.weight"),
            ("label_emb.0.2.bias", 2, "add_embedding.linear_2.bias"),
        ] {
            assert_eq!(unet_name(key, l).as_deref(), Some(want), "{key}");
        }
        assert_eq!(unet_name("label_emb.0.1.weight", 2), None);
    }

    /// [`ldm_unet_name`] inverts [`unet_name`] on the SD 1.5 / SDXL layouts.
    #[test]
    fn ldm_names_invert_diffusers_names() {
        for (path, l, attn) in [
            (
                "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q",
                2,
                true,
            ),
            ("down_blocks.2.resnets.1.conv2", 2, true),
            ("down_blocks.0.resnets.0.time_emb_proj", 2, true),
            ("down_blocks.1.resnets.0.conv_shortcut", 2, true),
            ("down_blocks.0.downsamplers.0.conv", 2, true),
            ("mid_block.attentions.0.proj_in", 2, true),
            ("mid_block.resnets.1.norm1", 2, true),
            ("up_blocks.0.resnets.2.conv1", 2, true),
            (
                "up_blocks.1.attentions.2.transformer_blocks.1.ff.net.0.proj",
                2,
                true,
            ),
            ("up_blocks.0.upsamplers.0.conv", 2, true),
            ("up_blocks.2.upsamplers.0.conv", 2, false),
            ("add_embedding.linear_2", 2, true),
            ("time_embedding.linear_1", 1, true),
            ("conv_out", 1, true),
        ] {
            let ldm = ldm_unet_name(path, l, &|_| attn).unwrap_or_else(|| panic!("{path}"));
            let leaf = if path.ends_with("conv") {
                "weight"
            } else {
                "bias"
            };
            let back = unet_name(&format!("{ldm}.{leaf}"), l);
            assert_eq!(back, Some(format!("{path}.{leaf}")), "{path} -> {ldm}");
        }
        assert_eq!(
            ldm_unet_name(
                "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q",
                2,
                &|_| true
            )
            .as_deref(),
            Some("input_blocks.4.1.transformer_blocks.0.attn1.to_q")
        );
    }

    #[test]
    fn vae_names_follow_diffusers_conversion() {
        for (key, want, take) in [
            (
                "decoder.up.0.block.1.conv1.weight",
                "decoder.up_blocks.3.resnets.1.conv1.weight",
                Take::All,
            ),
            (
                "decoder.up.3.upsample.conv.bias",
                "decoder.up_blocks.0.upsamplers.0.conv.bias",
                Take::All,
            ),
            (
                "encoder.down.1.downsample.conv.weight",
                "encoder.down_blocks.1.downsamplers.0.conv.weight",
                Take::All,
            ),
            (
                "encoder.down.1.block.0.nin_shortcut.weight",
                "encoder.down_blocks.1.resnets.0.conv_shortcut.weight",
                Take::All,
            ),
            (
                "decoder.mid.attn_1.q.weight",
                "decoder.mid_block.attentions.0.to_q.weight",
                Take::Squeeze,
            ),
            (
                "decoder.mid.attn_1.proj_out.bias",
                "decoder.mid_block.attentions.0.to_out.0.bias",
                Take::All,
            ),
            (
                "encoder.norm_out.weight",
                "encoder.conv_norm_out.weight",
                Take::All,
            ),
            (
                "post_quant_conv.weight",
                "post_quant_conv.weight",
                Take::All,
            ),
        ] {
            assert_eq!(vae_name(key, 4), Some((want.to_string(), take)), "{key}");
        }
    }
}
