//! The Stable Diffusion 1.x/2.x UNet (diffusers `UNet2DConditionModel`), built from its
//! `config.json`: any number of blocks, block types in any order, per-block head counts,
//! linear or convolutional projections, exact (erf) GELU in the feed-forward as diffusers.
//!
//! The config is read in [`config`]; this file builds the network from it.

mod config;

use candle_core::{DType, Module, Tensor, D};
use candle_nn::{conv2d, layer_norm, Conv2dConfig, LayerNorm, VarBuilder};

use crate::modules::adapter::{linear, linear_no_bias, Linear};
use crate::modules::attention::{score_budget, sliced_attention};
use crate::modules::conv::Conv2d;
use crate::modules::group_norm::{group_norm, GroupNorm};
use crate::modules::resnet::{conv, ResnetBlock, ResnetSpec};
use crate::Result;

pub use config::{BlockKind, TextTimeConfig, UNetConfig};

/// SDXL's added conditioning of one UNet call (diffusers' `added_cond_kwargs`).
#[derive(Debug, Clone)]
pub struct AddedCond {
    /// The pooled, projected text embedding (batch, pooled width).
    pub text_embeds: Tensor,
    /// The micro-conditioning ids (batch, ids), f32: original size, crop top-left and target
    /// size (or aesthetic score), each as (height, width) / (top, left).
    pub time_ids: Tensor,
}

/// The MLP of the `text_time` conditioning (`add_embedding`).
#[derive(Debug)]
struct TextTimeEmbedding {
    linear_1: Linear,
    linear_2: Linear,
    config: TextTimeConfig,
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
        let ff = (p.narrow(D::Minus1, 0, half)?
            * crate::modules::activation::gelu_erf(&p.narrow(D::Minus1, half, half)?)?)?;
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
    add_embedding: Option<TextTimeEmbedding>,
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
        let add_embedding = match c.text_time {
            Some(config) => Some(TextTimeEmbedding {
                linear_1: linear(
                    config.input_dim,
                    temb,
                    vb.pp("add_embedding").pp("linear_1"),
                )?,
                linear_2: linear(temb, temb, vb.pp("add_embedding").pp("linear_2"))?,
                config,
            }),
            None => None,
        };

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
            add_embedding,
            norm_out: group_norm(c.norm_num_groups, ch0, c.norm_eps, vb.pp("conv_norm_out"))?,
            conv_out: conv(ch0, c.out_channels, c.conv_out_kernel, 1, vb.pp("conv_out"))?,
            config: c.clone(),
        })
    }

    /// Sinusoidal features of `values` (diffusers `Timesteps`), computed in f32: one row of
    /// `dim` per value.
    fn sinusoidal(&self, values: &[f32], dim: usize) -> Vec<f32> {
        let half = dim / 2;
        let shift = self.config.freq_shift as f32;
        let ln = (10000f64).ln() as f32;
        let freqs: Vec<f32> = (0..half)
            .map(|i| (-ln * (i as f32) / (half as f32 - shift)).exp())
            .collect();
        let mut out = Vec::with_capacity(values.len() * dim);
        for &t in values {
            let args = freqs.iter().map(|f| t * f);
            let (sin, cos): (Vec<f32>, Vec<f32>) = args.map(|a| (a.sin(), a.cos())).unzip();
            let start = out.len();
            if self.config.flip_sin_to_cos {
                out.extend(cos.into_iter().chain(sin));
            } else {
                out.extend(sin.into_iter().chain(cos));
            }
            out.resize(start + dim, 0.0);
        }
        out
    }

    /// The timestep embedding plus, for SDXL, the `text_time` embedding of `added`.
    fn embedding(
        &self,
        timestep: f64,
        batch: usize,
        dtype: DType,
        added: Option<&AddedCond>,
        device: &candle_core::Device,
    ) -> Result<Tensor> {
        let dim = self.config.block_out_channels[0];
        let t_emb = Tensor::from_vec(self.sinusoidal(&[timestep as f32], dim), (1, dim), device)?
            .repeat((batch, 1))?
            .to_dtype(dtype)?;
        let emb = self
            .time_linear_2
            .forward(&self.time_linear_1.forward(&t_emb)?.silu()?)?;
        match (&self.add_embedding, added) {
            (None, None) => Ok(emb),
            (Some(add), Some(added)) => {
                let (b, n) = added.time_ids.dims2()?;
                let ids: Vec<f32> = added
                    .time_ids
                    .to_dtype(DType::F32)?
                    .flatten_all()?
                    .to_vec1()?;
                let d = add.config.time_embed_dim;
                let time = Tensor::from_vec(self.sinusoidal(&ids, d), (b, n * d), device)?;
                let input = Tensor::cat(&[&added.text_embeds.to_dtype(dtype)?, &time.to_dtype(dtype)?], 1)?;
                if input.dim(1)? != add.config.input_dim {
                    return Err(crate::Error::Candle(candle_core::Error::Msg(format!(
                        "the UNet's added conditioning takes {} values, got {} ({} pooled + {n} ids x {d})",
                        add.config.input_dim,
                        input.dim(1)?,
                        added.text_embeds.dim(1)?
                    ))));
                }
                let aug = add
                    .linear_2
                    .forward(&add.linear_1.forward(&input)?.silu()?)?;
                Ok((emb + aug)?)
            }
            (Some(_), None) => Err(crate::Error::Candle(candle_core::Error::Msg(
                "this UNet (addition_embed_type text_time, SDXL) needs a pooled text embedding and size ids".into(),
            ))),
            (None, Some(_)) => Err(crate::Error::Candle(candle_core::Error::Msg(
                "this UNet takes no added conditioning (it is not an SDXL UNet)".into(),
            ))),
        }
    }

    /// Predicts the noise (or v) for `sample` (batch, in_channels, h, w) at `timestep`
    /// conditioned on `context` (batch, tokens, cross_attention_dim).
    pub fn forward(&self, sample: &Tensor, timestep: f64, context: &Tensor) -> Result<Tensor> {
        self.forward_with(sample, timestep, context, None)
    }

    /// [`Self::forward`] with SDXL's added conditioning.
    pub fn forward_with(
        &self,
        sample: &Tensor,
        timestep: f64,
        context: &Tensor,
        added: Option<&AddedCond>,
    ) -> Result<Tensor> {
        let (b, _, _, _) = sample.dims4()?;
        let emb = self.embedding(timestep, b, sample.dtype(), added, sample.device())?;

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
        let xs = self.conv_out.forward(&self.norm_out.forward_silu(&xs)?)?;
        Ok(xs)
    }

    /// The dtype of the weights.
    pub fn dtype(&self) -> DType {
        self.conv_in.weight().dtype()
    }
}
