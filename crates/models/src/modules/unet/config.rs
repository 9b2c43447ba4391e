//! The UNet's `config.json` as diffusers reads it: block kinds, channels, heads, projections,
//! and the defaults of keys that older configs leave out.

use serde_json::json;

use crate::modules::config::JsonConfig;
use crate::Result;

/// The kind of one down or up block.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BlockKind {
    Plain,
    CrossAttn,
}

/// Everything in a UNet `config.json` that shapes the network.
#[derive(Debug, Clone)]
pub struct UNetConfig {
    /// Default latent size as (height, width); the config holds one int or `[h, w]`.
    pub sample_size: (usize, usize),
    pub in_channels: usize,
    pub out_channels: usize,
    pub center_input_sample: bool,
    pub flip_sin_to_cos: bool,
    pub freq_shift: f64,
    pub down_blocks: Vec<BlockKind>,
    pub up_blocks: Vec<BlockKind>,
    pub mid_block: bool,
    pub block_out_channels: Vec<usize>,
    pub layers_per_block: Vec<usize>,
    pub downsample_padding: usize,
    pub mid_block_scale_factor: f64,
    pub norm_num_groups: usize,
    pub norm_eps: f64,
    pub cross_attention_dim: Vec<usize>,
    pub transformer_layers_per_block: Vec<usize>,
    /// Number of attention heads per block (diffusers' `attention_head_dim` when
    /// `num_attention_heads` is absent: the config field name is historical).
    pub num_attention_heads: Vec<usize>,
    pub only_cross_attention: Vec<bool>,
    pub use_linear_projection: bool,
    pub upcast_attention: bool,
    pub conv_in_kernel: usize,
    pub conv_out_kernel: usize,
    /// Width of the time embedding (default 4 x block_out_channels[0]).
    pub time_embedding_dim: usize,
    /// SDXL's added conditioning (`addition_embed_type = "text_time"`).
    pub text_time: Option<TextTimeConfig>,
}

/// SDXL's `text_time` added conditioning: the pooled text embedding and the sinusoidal
/// features of the size / crop ids, through an MLP added to the time embedding.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TextTimeConfig {
    /// Sinusoidal width per id (`addition_time_embed_dim`).
    pub time_embed_dim: usize,
    /// Input width of the MLP (`projection_class_embeddings_input_dim`): pooled text width
    /// plus `time_embed_dim` x the number of ids.
    pub input_dim: usize,
}

impl TextTimeConfig {
    /// How many ids the MLP expects next to a pooled embedding of `pooled_dim`, if the widths
    /// fit.
    pub fn id_count(&self, pooled_dim: usize) -> Option<usize> {
        let rest = self.input_dim.checked_sub(pooled_dim)?;
        (self.time_embed_dim > 0 && rest.is_multiple_of(self.time_embed_dim))
            .then_some(rest / self.time_embed_dim)
    }
}

fn parse_text_time(cfg: &JsonConfig) -> Result<Option<TextTimeConfig>> {
    match cfg.str_opt("addition_embed_type")? {
        None => Ok(None),
        Some("text_time") => {
            let c = TextTimeConfig {
                time_embed_dim: cfg.usize_req("addition_time_embed_dim")?,
                input_dim: cfg.usize_req("projection_class_embeddings_input_dim")?,
            };
            if c.time_embed_dim == 0 || c.input_dim == 0 {
                return Err(cfg.err(
                    "fields `addition_time_embed_dim` and `projection_class_embeddings_input_dim` must be positive",
                ));
            }
            Ok(Some(c))
        }
        Some(other) => Err(cfg.err(format!(
            "field `addition_embed_type` = \"{other}\" is not supported (text_time)"
        ))),
    }
}

fn parse_down(cfg: &JsonConfig, name: &str) -> Result<BlockKind> {
    match name {
        "DownBlock2D" => Ok(BlockKind::Plain),
        "CrossAttnDownBlock2D" => Ok(BlockKind::CrossAttn),
        other => Err(cfg.err(format!(
            "down block type \"{other}\" is not supported (DownBlock2D, CrossAttnDownBlock2D)"
        ))),
    }
}

fn parse_up(cfg: &JsonConfig, name: &str) -> Result<BlockKind> {
    match name {
        "UpBlock2D" => Ok(BlockKind::Plain),
        "CrossAttnUpBlock2D" => Ok(BlockKind::CrossAttn),
        other => Err(cfg.err(format!(
            "up block type \"{other}\" is not supported (UpBlock2D, CrossAttnUpBlock2D)"
        ))),
    }
}

impl UNetConfig {
    /// The layer count of every block, when they are all the same.
    pub fn layers_per_block_uniform(&self) -> Option<usize> {
        let first = *self.layers_per_block.first()?;
        self.layers_per_block
            .iter()
            .all(|&l| l == first)
            .then_some(first)
    }

    pub fn from_config(cfg: &JsonConfig) -> Result<Self> {
        // Options with non-default values that change the network and that we do not build.
        for (key, ok) in [
            ("class_embed_type", vec![]),
            ("encoder_hid_dim", vec![]),
            ("encoder_hid_dim_type", vec![]),
            ("num_class_embeds", vec![]),
            ("time_cond_proj_dim", vec![]),
            ("time_embedding_act_fn", vec![]),
            ("timestep_post_act", vec![]),
            ("dual_cross_attention", vec![json!(false)]),
            ("class_embeddings_concat", vec![json!(false)]),
            ("resnet_skip_time_act", vec![json!(false)]),
            ("resnet_time_scale_shift", vec![json!("default")]),
            ("time_embedding_type", vec![json!("positional")]),
            ("act_fn", vec![json!("silu"), json!("swish")]),
            ("attention_type", vec![json!("default")]),
            ("reverse_transformer_layers_per_block", vec![]),
        ] {
            cfg.expect_default(key, &ok)?;
        }
        let down_types = cfg.str_list("down_block_types")?.unwrap_or_else(|| {
            vec![
                "CrossAttnDownBlock2D".into(),
                "CrossAttnDownBlock2D".into(),
                "CrossAttnDownBlock2D".into(),
                "DownBlock2D".into(),
            ]
        });
        let up_types = cfg.str_list("up_block_types")?.unwrap_or_else(|| {
            vec![
                "UpBlock2D".into(),
                "CrossAttnUpBlock2D".into(),
                "CrossAttnUpBlock2D".into(),
                "CrossAttnUpBlock2D".into(),
            ]
        });
        let down_blocks = down_types
            .iter()
            .map(|s| parse_down(cfg, s))
            .collect::<Result<Vec<_>>>()?;
        let up_blocks = up_types
            .iter()
            .map(|s| parse_up(cfg, s))
            .collect::<Result<Vec<_>>>()?;
        let n = down_blocks.len();
        if n == 0 || up_blocks.len() != n {
            return Err(cfg.err(format!(
                "down_block_types ({n}) and up_block_types ({}) must be non-empty and of equal length",
                up_blocks.len()
            )));
        }
        let block_out_channels = cfg
            .usize_list("block_out_channels")?
            .unwrap_or_else(|| vec![320, 640, 1280, 1280]);
        if block_out_channels.len() != n {
            return Err(cfg.err(format!(
                "block_out_channels has {} entries but there are {n} down blocks",
                block_out_channels.len()
            )));
        }
        let mid_block = match cfg.str_opt("mid_block_type")? {
            None if cfg.value.get("mid_block_type").is_some_and(|v| v.is_null()) => false,
            None | Some("UNetMidBlock2DCrossAttn") => true,
            Some(other) => {
                return Err(cfg.err(format!(
                    "mid_block_type \"{other}\" is not supported (UNetMidBlock2DCrossAttn)"
                )))
            }
        };
        let heads = if cfg.has("num_attention_heads") {
            cfg.usize_per_block("num_attention_heads", n, None)?
        } else {
            cfg.usize_per_block("attention_head_dim", n, Some(8))?
        };
        let norm_num_groups = cfg.usize_or("norm_num_groups", 32)?;
        let c = Self {
            sample_size: match cfg.usize_list("sample_size") {
                Ok(Some(list)) if list.len() == 2 => (list[0], list[1]),
                Ok(Some(list)) => {
                    return Err(cfg.err(format!(
                        "field `sample_size` must be an integer or [height, width], got {list:?}"
                    )))
                }
                _ => {
                    let s = cfg.usize_or("sample_size", 64)?;
                    (s, s)
                }
            },
            in_channels: cfg.usize_or("in_channels", 4)?,
            out_channels: cfg.usize_or("out_channels", 4)?,
            center_input_sample: cfg.bool_or("center_input_sample", false)?,
            flip_sin_to_cos: cfg.bool_or("flip_sin_to_cos", true)?,
            freq_shift: cfg.f64_or("freq_shift", 0.0)?,
            down_blocks,
            up_blocks,
            mid_block,
            layers_per_block: cfg.usize_per_block("layers_per_block", n, Some(2))?,
            downsample_padding: cfg.usize_or("downsample_padding", 1)?,
            mid_block_scale_factor: cfg.f64_or("mid_block_scale_factor", 1.0)?,
            norm_num_groups,
            norm_eps: cfg.f64_or("norm_eps", 1e-5)?,
            cross_attention_dim: cfg.usize_per_block("cross_attention_dim", n, Some(1280))?,
            transformer_layers_per_block: cfg.usize_per_block(
                "transformer_layers_per_block",
                n,
                Some(1),
            )?,
            num_attention_heads: heads,
            only_cross_attention: cfg.bool_per_block("only_cross_attention", n, false)?,
            use_linear_projection: cfg.bool_or("use_linear_projection", false)?,
            upcast_attention: cfg.bool_or("upcast_attention", false)?,
            conv_in_kernel: cfg.usize_or("conv_in_kernel", 3)?,
            conv_out_kernel: cfg.usize_or("conv_out_kernel", 3)?,
            time_embedding_dim: cfg.usize_or("time_embedding_dim", block_out_channels[0] * 4)?,
            text_time: parse_text_time(cfg)?,
            block_out_channels,
        };
        // `mid_block_only_cross_attention`, `cross_attention_norm` and
        // `resnet_out_scale_factor` only affect block types we do not build
        // (UNetMidBlock2DSimpleCrossAttn, SimpleCrossAttn and Resnet*sample blocks).
        if c.time_embedding_dim == 0 {
            return Err(cfg.err("field `time_embedding_dim` must be positive"));
        }
        for (i, &ch) in c.block_out_channels.iter().enumerate() {
            if norm_num_groups == 0 || !ch.is_multiple_of(norm_num_groups) {
                return Err(cfg.err(format!(
                    "block_out_channels[{i}] = {ch} is not divisible by norm_num_groups {norm_num_groups}"
                )));
            }
            let h = c.num_attention_heads[i];
            if h == 0 || h > ch {
                return Err(cfg.err(format!(
                    "block {i} has {h} attention heads for {ch} channels (must be 1 to {ch})"
                )));
            }
        }
        for (key, k) in [
            ("conv_in_kernel", c.conv_in_kernel),
            ("conv_out_kernel", c.conv_out_kernel),
        ] {
            if k.is_multiple_of(2) {
                return Err(cfg.err(format!("field `{key}` must be odd, got {k}")));
            }
        }
        Ok(c)
    }

    /// The cross-attention width expected from the text encoder.
    pub fn context_dim(&self) -> usize {
        self.cross_attention_dim[0]
    }

    /// The stable-diffusion-xl-base-1.0 UNet (used by the benchmark).
    pub fn sdxl() -> Self {
        use BlockKind::*;
        Self {
            sample_size: (128, 128),
            down_blocks: vec![Plain, CrossAttn, CrossAttn],
            up_blocks: vec![CrossAttn, CrossAttn, Plain],
            block_out_channels: vec![320, 640, 1280],
            layers_per_block: vec![2; 3],
            cross_attention_dim: vec![2048; 3],
            transformer_layers_per_block: vec![1, 2, 10],
            num_attention_heads: vec![5, 10, 20],
            only_cross_attention: vec![false; 3],
            use_linear_projection: true,
            text_time: Some(TextTimeConfig {
                time_embed_dim: 256,
                input_dim: 2816,
            }),
            ..Self::sd15()
        }
    }

    /// The Stable Diffusion 1.5 UNet (used by the benchmark).
    pub fn sd15() -> Self {
        use BlockKind::*;
        Self {
            sample_size: (64, 64),
            in_channels: 4,
            out_channels: 4,
            center_input_sample: false,
            flip_sin_to_cos: true,
            freq_shift: 0.0,
            down_blocks: vec![CrossAttn, CrossAttn, CrossAttn, Plain],
            up_blocks: vec![Plain, CrossAttn, CrossAttn, CrossAttn],
            mid_block: true,
            block_out_channels: vec![320, 640, 1280, 1280],
            layers_per_block: vec![2; 4],
            downsample_padding: 1,
            mid_block_scale_factor: 1.0,
            norm_num_groups: 32,
            norm_eps: 1e-5,
            cross_attention_dim: vec![768; 4],
            transformer_layers_per_block: vec![1; 4],
            num_attention_heads: vec![8; 4],
            only_cross_attention: vec![false; 4],
            use_linear_projection: false,
            upcast_attention: false,
            conv_in_kernel: 3,
            conv_out_kernel: 3,
            time_embedding_dim: 1280,
            text_time: None,
        }
    }
}
