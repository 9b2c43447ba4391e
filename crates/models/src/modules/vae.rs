//! The KL autoencoder (diffusers `AutoencoderKL`) configured from its `config.json`.

use candle_core::{DType, Module, Tensor};
use candle_nn::{Linear, VarBuilder};
use serde_json::json;

use super::attention::{score_budget, sliced_attention};
use super::config::JsonConfig;
use super::conv::Conv2d;
use super::group_norm::{group_norm, GroupNorm};
use super::resnet::{conv, ResnetBlock, ResnetSpec};
use crate::Result;

/// The fields of a VAE `config.json` that we use.
#[derive(Debug, Clone)]
pub struct VaeConfig {
    pub block_out_channels: Vec<usize>,
    pub layers_per_block: usize,
    pub latent_channels: usize,
    pub norm_num_groups: usize,
    pub in_channels: usize,
    pub out_channels: usize,
    pub scaling_factor: f64,
    /// Added after unscaling by FLUX (`shift_factor`); the SD pipelines ignore it.
    pub shift_factor: f64,
    pub use_quant_conv: bool,
    pub use_post_quant_conv: bool,
    pub force_upcast: bool,
}

/// More blocks than any published VAE; bounds the latent factor.
pub const MAX_VAE_BLOCKS: usize = 8;

impl VaeConfig {
    pub fn from_config(cfg: &JsonConfig) -> Result<Self> {
        // `latents_mean` and `latents_std` are not used by the SD 1.x/2.x and FLUX pipelines;
        // `shift_factor` by FLUX only (diffusers' SD pipelines decode `latents /
        // scaling_factor`).
        cfg.expect_default("act_fn", &[json!("silu"), json!("swish")])?;
        cfg.expect_default("mid_block_add_attention", &[json!(true)])?;
        let block_out_channels = cfg
            .usize_list("block_out_channels")?
            .unwrap_or_else(|| vec![64]);
        if block_out_channels.is_empty() || block_out_channels.len() > MAX_VAE_BLOCKS {
            return Err(cfg.err(format!(
                "field `block_out_channels` must have 1 to {MAX_VAE_BLOCKS} entries, got {}",
                block_out_channels.len()
            )));
        }
        let n = block_out_channels.len();
        for (key, want) in [
            ("down_block_types", "DownEncoderBlock2D"),
            ("up_block_types", "UpDecoderBlock2D"),
        ] {
            if let Some(types) = cfg.str_list(key)? {
                if types.len() != n || types.iter().any(|t| t != want) {
                    return Err(cfg.err(format!(
                        "field `{key}` must be {n} x \"{want}\", got {types:?}"
                    )));
                }
            }
        }
        let norm_num_groups = cfg.usize_or("norm_num_groups", 32)?;
        if let Some(&bad) = block_out_channels
            .iter()
            .find(|&&c| c == 0 || norm_num_groups == 0 || !c.is_multiple_of(norm_num_groups))
        {
            return Err(cfg.err(format!(
                "block_out_channels entry {bad} is not divisible by norm_num_groups {norm_num_groups}"
            )));
        }
        let out_channels = cfg.usize_or("out_channels", 3)?;
        if out_channels != 3 {
            return Err(cfg.err(format!(
                "field `out_channels` must be 3 (RGB), got {out_channels}"
            )));
        }
        Ok(Self {
            layers_per_block: cfg.usize_or("layers_per_block", 1)?,
            latent_channels: cfg.usize_or("latent_channels", 4)?,
            norm_num_groups,
            in_channels: cfg.usize_or("in_channels", 3)?,
            out_channels,
            scaling_factor: cfg.f64_or("scaling_factor", 0.18215)?,
            shift_factor: cfg.f64_opt("shift_factor")?.unwrap_or(0.0),
            use_quant_conv: cfg.bool_or("use_quant_conv", true)?,
            use_post_quant_conv: cfg.bool_or("use_post_quant_conv", true)?,
            force_upcast: cfg.bool_or("force_upcast", true)?,
            block_out_channels,
        })
    }

    /// The spatial factor between pixels and latents: 2^(blocks - 1).
    pub fn scale_factor(&self) -> usize {
        1 << (self.block_out_channels.len() - 1)
    }

    /// The Stable Diffusion 1.x VAE (used by the benchmark).
    pub fn sd15() -> Self {
        Self {
            block_out_channels: vec![128, 256, 512, 512],
            layers_per_block: 2,
            latent_channels: 4,
            norm_num_groups: 32,
            in_channels: 3,
            out_channels: 3,
            scaling_factor: 0.18215,
            shift_factor: 0.0,
            use_quant_conv: true,
            use_post_quant_conv: true,
            force_upcast: true,
        }
    }
}

/// diffusers' single-head spatial self-attention of the VAE mid block.
#[derive(Debug)]
struct SpatialAttention {
    norm: GroupNorm,
    q: Linear,
    k: Linear,
    v: Linear,
    out: Linear,
    channels: usize,
}

impl SpatialAttention {
    fn new(vb: VarBuilder, ch: usize, groups: usize) -> Result<Self> {
        // Weights saved before diffusers 0.14 use query/key/value/proj_attn.
        let names = if vb.contains_tensor("to_q.weight") {
            ["to_q", "to_k", "to_v", "to_out.0"]
        } else {
            ["query", "key", "value", "proj_attn"]
        };
        let lin = |name: &str| -> Result<Linear> {
            let vb = vb.pp(name);
            // Some single-file conversions store these as 1x1 convolutions.
            let w = match vb.get((ch, ch), "weight") {
                Ok(w) => w,
                Err(_) => vb.get((ch, ch, 1, 1), "weight")?.reshape((ch, ch))?,
            };
            Ok(Linear::new(w, Some(vb.get(ch, "bias")?)))
        };
        Ok(Self {
            norm: group_norm(groups, ch, 1e-6, vb.pp("group_norm"))?,
            q: lin(names[0])?,
            k: lin(names[1])?,
            v: lin(names[2])?,
            out: lin(names[3])?,
            channels: ch,
        })
    }

    fn forward(&self, xs: &Tensor) -> candle_core::Result<Tensor> {
        let (b, c, h, w) = xs.dims4()?;
        let seq = self
            .norm
            .forward(xs)?
            .reshape((b, c, h * w))?
            .transpose(1, 2)?
            .contiguous()?;
        let scale = (self.channels as f64).powf(-0.5);
        let q = (self.q.forward(&seq)? * scale)?;
        let k = self.k.forward(&seq)?;
        let v = self.v.forward(&seq)?;
        let o = sliced_attention(&q, &k, &v, true, score_budget(xs.device()))?;
        let o = self
            .out
            .forward(&o)?
            .transpose(1, 2)?
            .reshape((b, c, h, w))?;
        o + xs
    }
}

/// diffusers' VAE `Decoder`: conv_in, mid block (resnet, attention, resnet), up blocks of
/// `layers_per_block + 1` resnets with a nearest-2x upsampler, norm, SiLU, conv_out.
#[derive(Debug)]
struct Decoder {
    conv_in: Conv2d,
    mid_resnets: [ResnetBlock; 2],
    mid_attention: SpatialAttention,
    up: Vec<(Vec<ResnetBlock>, Option<Conv2d>)>,
    norm_out: GroupNorm,
    conv_out: Conv2d,
}

impl Decoder {
    fn new(vb: VarBuilder, c: &VaeConfig) -> Result<Self> {
        let g = c.norm_num_groups;
        let spec = |cin, cout| vae_resnet(cin, cout, g);
        let rev: Vec<usize> = c.block_out_channels.iter().rev().copied().collect();
        let top = rev[0];
        let mid = vb.pp("mid_block");
        let mid_resnets = [
            ResnetBlock::new(mid.pp("resnets").pp(0), &spec(top, top))?,
            ResnetBlock::new(mid.pp("resnets").pp(1), &spec(top, top))?,
        ];
        let mid_attention = SpatialAttention::new(mid.pp("attentions").pp(0), top, g)?;
        let mut up = Vec::with_capacity(rev.len());
        let mut out_ch = top;
        for (i, &ch) in rev.iter().enumerate() {
            let vb = vb.pp("up_blocks").pp(i);
            let prev = out_ch;
            out_ch = ch;
            let resnets = (0..=c.layers_per_block)
                .map(|j| {
                    let cin = if j == 0 { prev } else { out_ch };
                    ResnetBlock::new(vb.pp("resnets").pp(j), &spec(cin, out_ch))
                })
                .collect::<Result<Vec<_>>>()?;
            let upsample = if i + 1 < rev.len() {
                Some(conv(
                    out_ch,
                    out_ch,
                    3,
                    1,
                    vb.pp("upsamplers").pp(0).pp("conv"),
                )?)
            } else {
                None
            };
            up.push((resnets, upsample));
        }
        let ch0 = c.block_out_channels[0];
        Ok(Self {
            conv_in: conv(c.latent_channels, top, 3, 1, vb.pp("conv_in"))?,
            mid_resnets,
            mid_attention,
            up,
            norm_out: group_norm(g, ch0, 1e-6, vb.pp("conv_norm_out"))?,
            conv_out: conv(ch0, c.out_channels, 3, 1, vb.pp("conv_out"))?,
        })
    }

    fn forward(&self, z: &Tensor) -> candle_core::Result<Tensor> {
        let mut xs = self.conv_in.forward(z)?;
        xs = self.mid_resnets[0].forward(&xs, None)?;
        xs = self.mid_attention.forward(&xs)?;
        xs = self.mid_resnets[1].forward(&xs, None)?;
        for (resnets, upsample) in &self.up {
            for r in resnets {
                xs = r.forward(&xs, None)?;
            }
            if let Some(conv) = upsample {
                let (_, _, h, w) = xs.dims4()?;
                xs = conv.forward(&xs.upsample_nearest2d(h * 2, w * 2)?)?;
            }
        }
        self.conv_out.forward(&self.norm_out.forward_silu(&xs)?)
    }
}

/// diffusers' VAE `Encoder`: conv_in, down blocks of `layers_per_block` resnets with a
/// stride-2 convolution (after a right/bottom zero pad) on all but the last, mid block
/// The VAE's resnet blocks: no time embedding, eps 1e-6, no output scaling.
fn vae_resnet(cin: usize, cout: usize, groups: usize) -> ResnetSpec {
    ResnetSpec {
        cin,
        cout,
        temb: None,
        groups,
        eps: 1e-6,
        output_scale_factor: 1.0,
    }
}

/// (resnet, attention, resnet), norm, SiLU, conv_out to mean and log-variance.
#[derive(Debug)]
struct Encoder {
    conv_in: Conv2d,
    down: Vec<(Vec<ResnetBlock>, Option<Conv2d>)>,
    mid_resnets: [ResnetBlock; 2],
    mid_attention: SpatialAttention,
    norm_out: GroupNorm,
    conv_out: Conv2d,
}

impl Encoder {
    fn new(vb: VarBuilder, c: &VaeConfig) -> Result<Self> {
        let g = c.norm_num_groups;
        let spec = |cin, cout| vae_resnet(cin, cout, g);
        let chans = &c.block_out_channels;
        let mut down = Vec::with_capacity(chans.len());
        let mut out_ch = chans[0];
        for (i, &ch) in chans.iter().enumerate() {
            let vb = vb.pp("down_blocks").pp(i);
            let prev = out_ch;
            out_ch = ch;
            let resnets = (0..c.layers_per_block)
                .map(|j| {
                    let cin = if j == 0 { prev } else { out_ch };
                    ResnetBlock::new(vb.pp("resnets").pp(j), &spec(cin, out_ch))
                })
                .collect::<Result<Vec<_>>>()?;
            let downsample = if i + 1 < chans.len() {
                let cfg = candle_nn::Conv2dConfig {
                    padding: 0,
                    stride: 2,
                    ..Default::default()
                };
                let vb = vb.pp("downsamplers").pp(0).pp("conv");
                Some(Conv2d::new(candle_nn::conv2d(out_ch, out_ch, 3, cfg, vb)?)?)
            } else {
                None
            };
            down.push((resnets, downsample));
        }
        let top = out_ch;
        let mid = vb.pp("mid_block");
        let mid_resnets = [
            ResnetBlock::new(mid.pp("resnets").pp(0), &spec(top, top))?,
            ResnetBlock::new(mid.pp("resnets").pp(1), &spec(top, top))?,
        ];
        let mid_attention = SpatialAttention::new(mid.pp("attentions").pp(0), top, g)?;
        Ok(Self {
            conv_in: conv(c.in_channels, chans[0], 3, 1, vb.pp("conv_in"))?,
            down,
            mid_resnets,
            mid_attention,
            norm_out: group_norm(g, top, 1e-6, vb.pp("conv_norm_out"))?,
            conv_out: conv(top, 2 * c.latent_channels, 3, 1, vb.pp("conv_out"))?,
        })
    }

    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let mut xs = self.conv_in.forward(x)?;
        for (resnets, downsample) in &self.down {
            for r in resnets {
                xs = r.forward(&xs, None)?;
            }
            if let Some(conv) = downsample {
                // diffusers pads (0, 1, 0, 1) before a padding-0 stride-2 convolution.
                let padded = xs.pad_with_zeros(3, 0, 1)?.pad_with_zeros(2, 0, 1)?;
                xs = conv.forward(&padded)?;
            }
        }
        xs = self.mid_resnets[0].forward(&xs, None)?;
        xs = self.mid_attention.forward(&xs)?;
        xs = self.mid_resnets[1].forward(&xs, None)?;
        self.conv_out.forward(&self.norm_out.forward_silu(&xs)?)
    }
}

/// The KL autoencoder with its latent scaling. The encoder is loaded when the weights have
/// one (image-to-image and inpainting need it; text-to-image does not).
pub struct Vae {
    quant_conv: Option<Conv2d>,
    encoder: Option<Encoder>,
    post_quant_conv: Option<Conv2d>,
    decoder: Decoder,
    pub config: VaeConfig,
    dtype: DType,
    /// Tiled decoding (diffusers' `enable_tiling`): tiles of this many pixels a side, 25%
    /// overlap, blended linearly; `None` decodes whole images.
    pub tile_size: Option<usize>,
}

/// Blends the last `extent` rows (`dim` 2) or columns (`dim` 3) of `a` into the first ones of
/// `b`, linearly, as diffusers' `blend_v` / `blend_h`.
fn blend(a: &Tensor, b: &Tensor, extent: usize, dim: usize) -> candle_core::Result<Tensor> {
    let extent = extent.min(a.dim(dim)?).min(b.dim(dim)?);
    if extent == 0 {
        return Ok(b.clone());
    }
    let w: Vec<f32> = (0..extent).map(|y| y as f32 / extent as f32).collect();
    let shape = if dim == 2 {
        (1, 1, extent, 1)
    } else {
        (1, 1, 1, extent)
    };
    let w = Tensor::from_vec(w, shape, b.device())?;
    let tail = a.narrow(dim, a.dim(dim)? - extent, extent)?;
    let head = b.narrow(dim, 0, extent)?;
    let mixed = (tail.broadcast_mul(&(1.0 - &w)?)? + head.broadcast_mul(&w)?)?;
    let rest = b.narrow(dim, extent, b.dim(dim)? - extent)?;
    Tensor::cat(&[mixed, rest], dim)
}

impl Vae {
    pub fn new(vb: VarBuilder, config: &VaeConfig) -> Result<Self> {
        let dtype = vb.dtype();
        let lc = config.latent_channels;
        let post_quant_conv = if config.use_post_quant_conv {
            Some(conv(lc, lc, 1, 1, vb.pp("post_quant_conv"))?)
        } else {
            None
        };
        let (encoder, quant_conv) = if vb.contains_tensor("encoder.conv_in.weight") {
            let quant_conv = if config.use_quant_conv {
                Some(conv(2 * lc, 2 * lc, 1, 1, vb.pp("quant_conv"))?)
            } else {
                None
            };
            (Some(Encoder::new(vb.pp("encoder"), config)?), quant_conv)
        } else {
            (None, None)
        };
        Ok(Self {
            quant_conv,
            encoder,
            post_quant_conv,
            decoder: Decoder::new(vb.pp("decoder"), config)?,
            config: config.clone(),
            dtype,
            tile_size: None,
        })
    }

    /// Whether the weights had an encoder.
    pub fn has_encoder(&self) -> bool {
        self.encoder.is_some()
    }

    /// The latent distribution of images in [-1, 1] (batch, 3, H, W): diffusers'
    /// `DiagonalGaussianDistribution` as (mean, std), unscaled, f32. H and W must be
    /// multiples of the latent factor.
    pub fn encode(&self, images: &Tensor) -> Result<(Tensor, Tensor)> {
        let Some(encoder) = &self.encoder else {
            return Err(crate::Error::Candle(candle_core::Error::Msg(
                "this VAE has no encoder weights (needed for image-to-image and inpainting)".into(),
            )));
        };
        let x = images.to_dtype(self.dtype)?;
        let moments = (0..x.dim(0)?)
            .map(|i| {
                let m = encoder.forward(&x.narrow(0, i, 1)?)?;
                let m = match &self.quant_conv {
                    Some(c) => c.forward(&m)?,
                    None => m,
                };
                m.to_dtype(DType::F32)
            })
            .collect::<candle_core::Result<Vec<_>>>()?;
        let moments = Tensor::cat(&moments, 0)?;
        let lc = self.config.latent_channels;
        let mean = moments.narrow(1, 0, lc)?;
        let logvar = moments.narrow(1, lc, lc)?.clamp(-30f32, 20f32)?;
        let std = (logvar * 0.5)?.exp()?;
        Ok((mean, std))
    }

    /// Decodes denoised latents (in the UNet's scaled space) to images in [-1, 1]
    /// of shape (batch, 3, h * f, w * f), as f32. One image at a time, which bounds the
    /// decoder's peak memory.
    pub fn decode(&self, latents: &Tensor) -> Result<Tensor> {
        let z = (latents.to_dtype(DType::F32)? / self.config.scaling_factor)?;
        self.decode_unscaled(&z)
    }

    /// Decodes latents already in the VAE's own space (FLUX computes
    /// `latents / scaling_factor + shift_factor` itself).
    pub fn decode_unscaled(&self, z: &Tensor) -> Result<Tensor> {
        let z = z.to_dtype(self.dtype)?;
        let images = (0..z.dim(0)?)
            .map(|i| {
                let zi = z.narrow(0, i, 1)?;
                let (h, w) = (zi.dim(2)?, zi.dim(3)?);
                match self.tile_size {
                    Some(ts)
                        if h > ts / self.config.scale_factor()
                            || w > ts / self.config.scale_factor() =>
                    {
                        self.decode_tiled(&zi, ts)
                    }
                    _ => self.decode_one(&zi),
                }
            })
            .collect::<candle_core::Result<Vec<_>>>()?;
        Ok(Tensor::cat(&images, 0)?)
    }

    fn decode_one(&self, z: &Tensor) -> candle_core::Result<Tensor> {
        let z = match &self.post_quant_conv {
            Some(c) => c.forward(z)?,
            None => z.clone(),
        };
        self.decoder.forward(&z)?.to_dtype(DType::F32)
    }

    /// diffusers' `AutoencoderKL.tiled_decode` for one image: latent tiles of
    /// `tile / factor` with a 75% stride, each decoded alone, every tile blended with the
    /// (already blended) tiles above and to its left over 25% of a tile, then cropped to the
    /// stride and joined. Peak memory follows the tile, not the image.
    fn decode_tiled(&self, z: &Tensor, tile: usize) -> candle_core::Result<Tensor> {
        let tile_latent = (tile / self.config.scale_factor()).max(1);
        let overlap = ((tile_latent as f64 * 0.75) as usize).max(1);
        let extent = (tile as f64 * 0.25) as usize;
        let limit = tile - extent;
        let (h, w) = (z.dim(2)?, z.dim(3)?);
        let mut rows: Vec<Vec<Tensor>> = Vec::new();
        for i in (0..h).step_by(overlap) {
            let mut row = Vec::new();
            for j in (0..w).step_by(overlap) {
                let t =
                    z.narrow(2, i, tile_latent.min(h - i))?
                        .narrow(3, j, tile_latent.min(w - j))?;
                row.push(self.decode_one(&t)?);
            }
            rows.push(row);
        }
        let mut out_rows = Vec::with_capacity(rows.len());
        for i in 0..rows.len() {
            let mut out_row = Vec::with_capacity(rows[i].len());
            for j in 0..rows[i].len() {
                let mut t = rows[i][j].clone();
                if i > 0 {
                    t = blend(&rows[i - 1][j], &t, extent, 2)?;
                }
                if j > 0 {
                    t = blend(&rows[i][j - 1], &t, extent, 3)?;
                }
                rows[i][j] = t.clone();
                let th = limit.min(t.dim(2)?);
                let tw = limit.min(t.dim(3)?);
                out_row.push(t.narrow(2, 0, th)?.narrow(3, 0, tw)?);
            }
            out_rows.push(Tensor::cat(&out_row, 3)?);
        }
        Tensor::cat(&out_rows, 2)
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }
}
