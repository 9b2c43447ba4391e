//! The Stable Diffusion 1.x/2.x UNet (diffusers `UNet2DConditionModel`), built from its
//! `config.json`: any number of blocks, block types in any order, per-block head counts,
//! linear or convolutional projections, exact (erf) GELU in the feed-forward as diffusers.

use candle_core::{DType, Module, Tensor, D};
use candle_nn::{conv2d, group_norm, layer_norm, Conv2dConfig, GroupNorm, LayerNorm, VarBuilder};
use serde_json::json;

use super::adapter::{linear, linear_no_bias, Linear};
use super::attention::{score_budget, sliced_attention};
use super::config::JsonConfig;
use super::conv::Conv2d;
use super::resnet::{conv, ResnetBlock, ResnetSpec};
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
            ("addition_embed_type", vec![]),
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
        }
    }
}

#[derive(Debug)]
struct Attention {
    to_q: Linear,
    to_k: Linear,
    to_v: Linear,
    to_out: Linear,
    heads: usize,
    scale: f64,
    upcast: bool,
}

impl Attention {
    fn new(vb: VarBuilder, dim: usize, ctx_dim: usize, heads: usize, upcast: bool) -> Result<Self> {
        let head_dim = dim / heads;
        Ok(Self {
            to_q: linear_no_bias(dim, dim, vb.pp("to_q"))?,
            to_k: linear_no_bias(ctx_dim, dim, vb.pp("to_k"))?,
            to_v: linear_no_bias(ctx_dim, dim, vb.pp("to_v"))?,
            to_out: linear(dim, dim, vb.pp("to_out").pp("0"))?,
            heads,
            scale: (head_dim as f64).powf(-0.5),
            upcast,
        })
    }

    fn forward(&self, xs: &Tensor, ctx: Option<&Tensor>) -> candle_core::Result<Tensor> {
        let ctx = ctx.unwrap_or(xs);
        let (b, n, d) = xs.dims3()?;
        let m = ctx.dim(1)?;
        let hd = d / self.heads;
        // (b, len, heads * hd) -> (b * heads, len, hd)
        let heads = |t: Tensor, len: usize| -> candle_core::Result<Tensor> {
            t.reshape((b, len, self.heads, hd))?
                .transpose(1, 2)?
                .contiguous()?
                .reshape((b * self.heads, len, hd))
        };
        let q = heads((self.to_q.forward(xs)? * self.scale)?, n)?;
        let k = heads(self.to_k.forward(ctx)?, m)?;
        let v = heads(self.to_v.forward(ctx)?, m)?;
        let o = sliced_attention(&q, &k, &v, self.upcast, score_budget(q.device()))?;
        let o = o
            .reshape((b, self.heads, n, hd))?
            .transpose(1, 2)?
            .reshape((b, n, d))?;
        self.to_out.forward(&o)
    }
}

#[derive(Debug)]
struct TransformerBlock {
    norm1: LayerNorm,
    attn1: Attention,
    norm2: LayerNorm,
    attn2: Attention,
    norm3: LayerNorm,
    ff_proj: Linear,
    ff_out: Linear,
    only_cross: bool,
}

impl TransformerBlock {
    fn new(
        vb: VarBuilder,
        dim: usize,
        ctx: usize,
        heads: usize,
        only_cross: bool,
        upcast: bool,
    ) -> Result<Self> {
        let inner = dim * 4;
        let attn1_ctx = if only_cross { ctx } else { dim };
        Ok(Self {
            norm1: layer_norm(dim, 1e-5, vb.pp("norm1"))?,
            attn1: Attention::new(vb.pp("attn1"), dim, attn1_ctx, heads, upcast)?,
            norm2: layer_norm(dim, 1e-5, vb.pp("norm2"))?,
            attn2: Attention::new(vb.pp("attn2"), dim, ctx, heads, upcast)?,
            norm3: layer_norm(dim, 1e-5, vb.pp("norm3"))?,
            ff_proj: linear(dim, inner * 2, vb.pp("ff").pp("net").pp("0").pp("proj"))?,
            ff_out: linear(inner, dim, vb.pp("ff").pp("net").pp("2"))?,
            only_cross,
        })
    }

    fn forward(&self, xs: &Tensor, ctx: &Tensor) -> candle_core::Result<Tensor> {
        let n1 = self.norm1.forward(xs)?;
        let a1 = if self.only_cross {
            self.attn1.forward(&n1, Some(ctx))?
        } else {
            self.attn1.forward(&n1, None)?
        };
        let xs = (a1 + xs)?;
        let xs = (self.attn2.forward(&self.norm2.forward(&xs)?, Some(ctx))? + xs)?;
        let p = self.ff_proj.forward(&self.norm3.forward(&xs)?)?;
        let half = p.dim(D::Minus1)? / 2;
        let ff = (p.narrow(D::Minus1, 0, half)? * p.narrow(D::Minus1, half, half)?.gelu_erf()?)?;
        self.ff_out.forward(&ff)? + xs
    }
}

#[derive(Debug)]
enum Proj {
    Conv(Conv2d),
    Linear(Linear),
}

#[derive(Debug)]
struct Transformer2D {
    norm: GroupNorm,
    proj_in: Proj,
    blocks: Vec<TransformerBlock>,
    proj_out: Proj,
}

impl Transformer2D {
    fn new(
        vb: VarBuilder,
        ch: usize,
        layers: usize,
        ctx: usize,
        heads: usize,
        only_cross: bool,
        c: &UNetConfig,
    ) -> Result<Self> {
        // diffusers: inner_dim = heads * (channels // heads).
        let inner = heads * (ch / heads);
        let (proj_in, proj_out) = if c.use_linear_projection {
            (
                Proj::Linear(linear(ch, inner, vb.pp("proj_in"))?),
                Proj::Linear(linear(inner, ch, vb.pp("proj_out"))?),
            )
        } else {
            (
                Proj::Conv(conv(ch, inner, 1, 1, vb.pp("proj_in"))?),
                Proj::Conv(conv(inner, ch, 1, 1, vb.pp("proj_out"))?),
            )
        };
        let blocks = (0..layers)
            .map(|i| {
                TransformerBlock::new(
                    vb.pp("transformer_blocks").pp(i),
                    inner,
                    ctx,
                    heads,
                    only_cross,
                    c.upcast_attention,
                )
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            norm: group_norm(c.norm_num_groups, ch, 1e-6, vb.pp("norm"))?,
            proj_in,
            blocks,
            proj_out,
        })
    }

    fn forward(&self, xs: &Tensor, ctx: &Tensor) -> candle_core::Result<Tensor> {
        let (b, _, h, w) = xs.dims4()?;
        let normed = self.norm.forward(xs)?;
        let to_seq = |t: Tensor| -> candle_core::Result<Tensor> {
            let c = t.dim(1)?;
            t.permute((0, 2, 3, 1))?.reshape((b, h * w, c))
        };
        let mut hs = match &self.proj_in {
            Proj::Conv(p) => to_seq(p.forward(&normed)?)?,
            Proj::Linear(p) => p.forward(&to_seq(normed)?)?,
        };
        for block in &self.blocks {
            hs = block.forward(&hs, ctx)?;
        }
        let from_seq = |t: Tensor| -> candle_core::Result<Tensor> {
            let c = t.dim(2)?;
            t.reshape((b, h, w, c))?.permute((0, 3, 1, 2))?.contiguous()
        };
        let out = match &self.proj_out {
            Proj::Conv(p) => p.forward(&from_seq(hs)?)?,
            Proj::Linear(p) => from_seq(p.forward(&hs)?)?,
        };
        out + xs
    }
}

/// diffusers' `Downsample2D` with a convolution: stride 2; with `padding = 0` the input is
/// first zero-padded by one pixel on the right and bottom.
#[derive(Debug)]
struct Downsample {
    conv: Conv2d,
    pad_right_bottom: bool,
}

impl Downsample {
    fn forward(&self, xs: &Tensor) -> candle_core::Result<Tensor> {
        if self.pad_right_bottom {
            let xs = xs.pad_with_zeros(3, 0, 1)?.pad_with_zeros(2, 0, 1)?;
            self.conv.forward(&xs)
        } else {
            self.conv.forward(xs)
        }
    }
}

#[derive(Debug)]
struct DownBlock {
    resnets: Vec<ResnetBlock>,
    attentions: Vec<Transformer2D>,
    downsample: Option<Downsample>,
}

#[derive(Debug)]
struct UpBlock {
    resnets: Vec<ResnetBlock>,
    attentions: Vec<Transformer2D>,
    upsample: Option<Conv2d>,
}

#[derive(Debug)]
struct MidBlock {
    resnets: Vec<ResnetBlock>,
    attentions: Vec<Transformer2D>,
}

/// Layer `j` of a down or up block: a resnet, followed by a transformer in cross-attention
/// blocks. `b` indexes the per-block config lists (for up blocks, the mirrored down block).
#[allow(clippy::too_many_arguments)]
fn block_layer(
    vb: &VarBuilder,
    j: usize,
    cin: usize,
    cout: usize,
    temb: usize,
    kind: BlockKind,
    b: usize,
    c: &UNetConfig,
) -> Result<(ResnetBlock, Option<Transformer2D>)> {
    let resnet = ResnetBlock::new(
        vb.pp("resnets").pp(j),
        &ResnetSpec {
            cin,
            cout,
            temb: Some(temb),
            groups: c.norm_num_groups,
            eps: c.norm_eps,
            output_scale_factor: 1.0,
        },
    )?;
    let attn = match kind {
        BlockKind::CrossAttn => Some(Transformer2D::new(
            vb.pp("attentions").pp(j),
            cout,
            c.transformer_layers_per_block[b],
            c.cross_attention_dim[b],
            c.num_attention_heads[b],
            c.only_cross_attention[b],
            c,
        )?),
        BlockKind::Plain => None,
    };
    Ok((resnet, attn))
}

/// `UNet2DConditionModel` for SD 1.x / 2.x.
#[derive(Debug)]
pub struct UNet {
    conv_in: Conv2d,
    time_linear_1: Linear,
    time_linear_2: Linear,
    down: Vec<DownBlock>,
    mid: Option<MidBlock>,
    up: Vec<UpBlock>,
    norm_out: GroupNorm,
    conv_out: Conv2d,
    pub config: UNetConfig,
}

impl UNet {
    pub fn new(vb: VarBuilder, config: &UNetConfig) -> Result<Self> {
        let c = config;
        let n = c.block_out_channels.len();
        let ch0 = c.block_out_channels[0];
        let temb = c.time_embedding_dim;
        let conv_in = conv(c.in_channels, ch0, c.conv_in_kernel, 1, vb.pp("conv_in"))?;
        let time_linear_1 = linear(ch0, temb, vb.pp("time_embedding").pp("linear_1"))?;
        let time_linear_2 = linear(temb, temb, vb.pp("time_embedding").pp("linear_2"))?;

        let mut down = Vec::with_capacity(n);
        let mut out_ch = ch0;
        for (i, kind) in c.down_blocks.iter().enumerate() {
            let vb = vb.pp("down_blocks").pp(i);
            let in_ch = out_ch;
            out_ch = c.block_out_channels[i];
            let mut resnets = Vec::new();
            let mut attentions = Vec::new();
            for j in 0..c.layers_per_block[i] {
                let cin = if j == 0 { in_ch } else { out_ch };
                let (resnet, attn) = block_layer(&vb, j, cin, out_ch, temb, *kind, i, c)?;
                resnets.push(resnet);
                attentions.extend(attn);
            }
            let downsample = if i + 1 < n {
                let cfg = Conv2dConfig {
                    padding: c.downsample_padding,
                    stride: 2,
                    ..Default::default()
                };
                let dvb = vb.pp("downsamplers").pp("0").pp("conv");
                Some(Downsample {
                    conv: Conv2d::adaptable(conv2d(out_ch, out_ch, 3, cfg, dvb.clone())?, &dvb)?,
                    pad_right_bottom: c.downsample_padding == 0,
                })
            } else {
                None
            };
            down.push(DownBlock {
                resnets,
                attentions,
                downsample,
            });
        }

        let last = c.block_out_channels[n - 1];
        let mid = if c.mid_block {
            let vb = vb.pp("mid_block");
            let s = c.mid_block_scale_factor;
            let mut resnets = vec![ResnetBlock::new(
                vb.pp("resnets").pp(0),
                &ResnetSpec {
                    cin: last,
                    cout: last,
                    temb: Some(temb),
                    groups: c.norm_num_groups,
                    eps: c.norm_eps,
                    output_scale_factor: s,
                },
            )?];
            // diffusers' mid block has one attention + resnet pair (num_layers = 1).
            let attentions = vec![Transformer2D::new(
                vb.pp("attentions").pp(0),
                last,
                c.transformer_layers_per_block[n - 1],
                c.cross_attention_dim[n - 1],
                c.num_attention_heads[n - 1],
                false,
                c,
            )?];
            resnets.push(ResnetBlock::new(
                vb.pp("resnets").pp(1),
                &ResnetSpec {
                    cin: last,
                    cout: last,
                    temb: Some(temb),
                    groups: c.norm_num_groups,
                    eps: c.norm_eps,
                    output_scale_factor: s,
                },
            )?);
            Some(MidBlock {
                resnets,
                attentions,
            })
        } else {
            None
        };

        let rev_ch: Vec<usize> = c.block_out_channels.iter().rev().copied().collect();
        let mut up = Vec::with_capacity(n);
        let mut out_ch = rev_ch[0];
        for (i, kind) in c.up_blocks.iter().enumerate() {
            let vb = vb.pp("up_blocks").pp(i);
            let rev = n - 1 - i;
            let prev_out = out_ch;
            out_ch = rev_ch[i];
            let in_ch = rev_ch[(i + 1).min(n - 1)];
            let layers = c.layers_per_block[rev] + 1;
            let mut resnets = Vec::new();
            let mut attentions = Vec::new();
            for j in 0..layers {
                let skip = if j == layers - 1 { in_ch } else { out_ch };
                let rin = if j == 0 { prev_out } else { out_ch };
                let (resnet, attn) = block_layer(&vb, j, rin + skip, out_ch, temb, *kind, rev, c)?;
                resnets.push(resnet);
                attentions.extend(attn);
            }
            let upsample = if i + 1 < n {
                Some(conv(
                    out_ch,
                    out_ch,
                    3,
                    1,
                    vb.pp("upsamplers").pp("0").pp("conv"),
                )?)
            } else {
                None
            };
            up.push(UpBlock {
                resnets,
                attentions,
                upsample,
            });
        }
        Ok(Self {
            conv_in,
            time_linear_1,
            time_linear_2,
            down,
            mid,
            up,
            norm_out: group_norm(c.norm_num_groups, ch0, c.norm_eps, vb.pp("conv_norm_out"))?,
            conv_out: conv(ch0, c.out_channels, c.conv_out_kernel, 1, vb.pp("conv_out"))?,
            config: c.clone(),
        })
    }

    /// Sinusoidal timestep features (diffusers `Timesteps`), computed in f32.
    fn time_proj(
        &self,
        timestep: f64,
        batch: usize,
        device: &candle_core::Device,
    ) -> candle_core::Result<Tensor> {
        let dim = self.config.block_out_channels[0];
        let half = dim / 2;
        let t = timestep as f32;
        let shift = self.config.freq_shift as f32;
        let ln = (10000f64).ln() as f32;
        let mut sin = Vec::with_capacity(half);
        let mut cos = Vec::with_capacity(half);
        for i in 0..half {
            let exponent = -ln * (i as f32) / (half as f32 - shift);
            let arg = t * exponent.exp();
            sin.push(arg.sin());
            cos.push(arg.cos());
        }
        let mut emb = if self.config.flip_sin_to_cos {
            [cos, sin].concat()
        } else {
            [sin, cos].concat()
        };
        emb.resize(dim, 0.0);
        Tensor::from_vec(emb, (1, dim), device)?.repeat((batch, 1))
    }

    /// Predicts the noise (or v) for `sample` (batch, in_channels, h, w) at `timestep`
    /// conditioned on `context` (batch, tokens, cross_attention_dim).
    pub fn forward(&self, sample: &Tensor, timestep: f64, context: &Tensor) -> Result<Tensor> {
        let (b, _, _, _) = sample.dims4()?;
        let dtype = sample.dtype();
        let t_emb = self
            .time_proj(timestep, b, sample.device())?
            .to_dtype(dtype)?;
        let emb = self
            .time_linear_2
            .forward(&self.time_linear_1.forward(&t_emb)?.silu()?)?;

        let sample = if self.config.center_input_sample {
            ((sample * 2.0)? - 1.0)?
        } else {
            sample.clone()
        };
        let mut xs = self.conv_in.forward(&sample)?;
        let mut skips = vec![xs.clone()];
        for block in &self.down {
            for (j, resnet) in block.resnets.iter().enumerate() {
                xs = resnet.forward(&xs, Some(&emb))?;
                if let Some(attn) = block.attentions.get(j) {
                    xs = attn.forward(&xs, context)?;
                }
                skips.push(xs.clone());
            }
            if let Some(ds) = &block.downsample {
                xs = ds.forward(&xs)?;
                skips.push(xs.clone());
            }
        }
        if let Some(mid) = &self.mid {
            xs = mid.resnets[0].forward(&xs, Some(&emb))?;
            for (attn, resnet) in mid.attentions.iter().zip(&mid.resnets[1..]) {
                xs = attn.forward(&xs, context)?;
                xs = resnet.forward(&xs, Some(&emb))?;
            }
        }
        for block in &self.up {
            for (j, resnet) in block.resnets.iter().enumerate() {
                let skip = skips.pop().ok_or_else(|| {
                    candle_core::Error::Msg("unet skip connections exhausted".into())
                })?;
                xs = Tensor::cat(&[&xs, &skip], 1)?;
                xs = resnet.forward(&xs, Some(&emb))?;
                if let Some(attn) = block.attentions.get(j) {
                    xs = attn.forward(&xs, context)?;
                }
            }
            if let Some(us) = &block.upsample {
                // Upsample to the size of the next skip connection, as diffusers does
                // when the latent size is not a multiple of the total down factor.
                let (th, tw) = match skips.last() {
                    Some(s) => (s.dim(2)?, s.dim(3)?),
                    None => (xs.dim(2)? * 2, xs.dim(3)? * 2),
                };
                xs = us.forward(&xs.upsample_nearest2d(th, tw)?)?;
            }
        }
        let xs = self
            .conv_out
            .forward(&self.norm_out.forward(&xs)?.silu()?)?;
        Ok(xs)
    }

    /// The dtype of the weights.
    pub fn dtype(&self) -> DType {
        self.conv_in.weight().dtype()
    }
}
