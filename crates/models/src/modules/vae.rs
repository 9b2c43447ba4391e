//! The KL autoencoder (diffusers `AutoencoderKL`) configured from its `config.json`.
//! The network itself is candle-transformers' `AutoEncoderKL`, which matches diffusers.

use candle_core::{DType, Tensor};
use candle_nn::VarBuilder;
use candle_transformers::models::stable_diffusion::vae::{AutoEncoderKL, AutoEncoderKLConfig};
use serde_json::json;

use super::config::JsonConfig;
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
    pub use_quant_conv: bool,
    pub use_post_quant_conv: bool,
    pub force_upcast: bool,
}

/// More blocks than any published VAE; bounds the latent factor.
pub const MAX_VAE_BLOCKS: usize = 8;

impl VaeConfig {
    pub fn from_config(cfg: &JsonConfig) -> Result<Self> {
        // `shift_factor`, `latents_mean` and `latents_std` are not used by the SD 1.x/2.x
        // pipelines (diffusers decodes `latents / scaling_factor` only).
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
            use_quant_conv: true,
            use_post_quant_conv: true,
            force_upcast: true,
        }
    }
}

/// The autoencoder with its latent scaling.
pub struct Vae {
    inner: AutoEncoderKL,
    pub config: VaeConfig,
    dtype: DType,
}

impl Vae {
    pub fn new(vb: VarBuilder, config: &VaeConfig) -> Result<Self> {
        let dtype = vb.dtype();
        let inner = AutoEncoderKL::new(
            vb,
            config.in_channels,
            config.out_channels,
            AutoEncoderKLConfig {
                block_out_channels: config.block_out_channels.clone(),
                layers_per_block: config.layers_per_block,
                latent_channels: config.latent_channels,
                norm_num_groups: config.norm_num_groups,
                use_quant_conv: config.use_quant_conv,
                use_post_quant_conv: config.use_post_quant_conv,
            },
        )?;
        Ok(Self {
            inner,
            config: config.clone(),
            dtype,
        })
    }

    /// Decodes denoised latents (in the UNet's scaled space) to images in [-1, 1]
    /// of shape (batch, 3, h * f, w * f), as f32.
    pub fn decode(&self, latents: &Tensor) -> Result<Tensor> {
        let z = (latents.to_dtype(DType::F32)? / self.config.scaling_factor)?;
        // One image at a time: bounds the decoder's peak memory, and candle-transformers'
        // VAE attention gives wrong results for the second image of a batch on some
        // shapes (observed with 8x8 latents; single-image decodes match diffusers).
        let z = z.to_dtype(self.dtype)?;
        let images = (0..z.dim(0)?)
            .map(|i| self.inner.decode(&z.narrow(0, i, 1)?)?.to_dtype(DType::F32))
            .collect::<candle_core::Result<Vec<_>>>()?;
        Ok(Tensor::cat(&images, 0)?)
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }
}
