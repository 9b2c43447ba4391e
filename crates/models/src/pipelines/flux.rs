//! FLUX.1 text-to-image from prompt embeddings, with the semantics of diffusers'
//! `FluxPipeline`: seeded latents of shape (batch, C, 2 (H / 2f), 2 (W / 2f)) packed into
//! 2x2 patches, position ids (0, row, col), the flow-matching schedule shifted by the image
//! sequence length (dev) or not (schnell), the guidance embedding for dev models, unpacking
//! and `latents / scaling_factor + shift_factor` into the VAE.
//!
//! [`FluxPipeline`] adds the prompt encoding: the pooled output of CLIP (77 tokens) and the
//! last hidden state of T5 (`max_sequence_length` tokens, padding included, no mask).

use candle_core::{DType, Device, Tensor};

use super::sd::{to_rgb8, Progress, RgbImage};
use crate::modules::clip::ClipTextModel;
use crate::modules::flux::FluxTransformer;
use crate::modules::t5::T5Encoder;
use crate::modules::vae::Vae;
use crate::samplers::flow_match::{FlowMatchConfig, FlowMatchEuler};
use crate::samplers::TorchRng;
use crate::tokenizer::clip::ClipTokenizer;
use crate::tokenizer::t5::T5Tokenizer;
use crate::{Error, Result};

/// One FLUX request, resolved.
#[derive(Debug, Clone)]
pub struct FluxParams {
    pub width: usize,
    pub height: usize,
    pub steps: usize,
    /// The embedded guidance scale of dev models (ignored by models without a guidance
    /// embedding: callers must refuse it there).
    pub guidance: f64,
    pub seed: u64,
    pub batch: usize,
}

/// The denoising part of a FLUX pipeline: transformer, VAE and schedule config.
pub struct FluxCore {
    pub transformer: FluxTransformer,
    pub vae: Vae,
    pub scheduler: FlowMatchConfig,
    pub device: Device,
    pub dtype: DType,
}

/// (batch, c, h, w) -> (batch, (h/2)(w/2), 4c): diffusers' `_pack_latents`.
pub fn pack(latents: &Tensor) -> Result<Tensor> {
    let (b, c, h, w) = latents.dims4()?;
    Ok(latents
        .reshape((b, c, h / 2, 2, w / 2, 2))?
        .permute((0, 2, 4, 1, 3, 5))?
        .contiguous()?
        .reshape((b, (h / 2) * (w / 2), c * 4))?)
}

/// The inverse of [`pack`] for latents of (h, w).
pub fn unpack(latents: &Tensor, h: usize, w: usize) -> Result<Tensor> {
    let (b, _, c4) = latents.dims3()?;
    let c = c4 / 4;
    Ok(latents
        .reshape((b, h / 2, w / 2, c, 2, 2))?
        .permute((0, 3, 1, 4, 2, 5))?
        .contiguous()?
        .reshape((b, c, h, w))?)
}

/// Position ids (rows * cols, 3) of the packed grid: (0, row, col).
pub fn image_ids(rows: usize, cols: usize, device: &Device) -> Result<Tensor> {
    let ids: Vec<f32> = (0..rows)
        .flat_map(|r| (0..cols).flat_map(move |c| [0.0, r as f32, c as f32]))
        .collect();
    Ok(Tensor::from_vec(ids, (rows * cols, 3), device)?)
}

impl FluxCore {
    /// The pixel factor of the VAE.
    pub fn latent_factor(&self) -> usize {
        self.vae.config.scale_factor()
    }

    /// Checks a request's size and counts.
    pub fn validate(&self, p: &FluxParams) -> Result<()> {
        let m = 2 * self.latent_factor();
        for (field, v) in [("width", p.width), ("height", p.height)] {
            if v == 0 || !v.is_multiple_of(m) {
                return Err(Error::invalid(
                    field,
                    format!("must be a positive multiple of {m} (2 x the VAE factor, as FLUX packs 2x2 latents), got {v}"),
                ));
            }
        }
        if p.steps == 0 {
            return Err(Error::invalid("steps", "must be at least 1, got 0"));
        }
        if p.batch == 0 {
            return Err(Error::invalid("batch", "must be at least 1, got 0"));
        }
        Ok(())
    }

    /// The first step image-to-image runs, as `FluxImg2ImgPipeline.get_timesteps`:
    /// `t_start = int(steps - min(steps * strength, steps))` (a float product, unlike Stable
    /// Diffusion's); errors when `strength` is outside (0, 1] or no step is left.
    pub fn img2img_start(steps: usize, strength: f64) -> Result<usize> {
        if !(strength > 0.0 && strength <= 1.0) {
            return Err(Error::invalid(
                "strength",
                format!("must be in (0, 1], got {strength}"),
            ));
        }
        let init = (steps as f64 * strength).min(steps as f64);
        let start = (steps as f64 - init).max(0.0) as usize;
        if start >= steps {
            return Err(Error::invalid(
                "strength",
                format!("{strength} x {steps} steps runs no step; raise strength or steps"),
            ));
        }
        Ok(start)
    }

    /// Generates from T5 states `embeds` (1 or batch, tokens, dim) and pooled CLIP `pooled`
    /// (1 or batch, dim); both are repeated to the batch when given once.
    pub fn generate_from_embeddings(
        &self,
        embeds: &Tensor,
        pooled: &Tensor,
        p: &FluxParams,
        on_step: &mut dyn FnMut(Progress<'_>) -> Result<()>,
    ) -> Result<Vec<RgbImage>> {
        self.run(embeds, pooled, None, p, on_step)
    }

    /// Image-to-image with `FluxImg2ImgPipeline` semantics: the image resized to the job's
    /// size, one latent sample from the seeded generator (`(z - shift) * scale`, repeated for
    /// the batch), then noise mixed in at the first kept sigma (`scale_noise`).
    pub fn generate_from_image(
        &self,
        embeds: &Tensor,
        pooled: &Tensor,
        image: &RgbImage,
        strength: f64,
        p: &FluxParams,
        on_step: &mut dyn FnMut(Progress<'_>) -> Result<()>,
    ) -> Result<Vec<RgbImage>> {
        self.run(embeds, pooled, Some((image, strength)), p, on_step)
    }

    fn run(
        &self,
        embeds: &Tensor,
        pooled: &Tensor,
        input: Option<(&RgbImage, f64)>,
        p: &FluxParams,
        on_step: &mut dyn FnMut(Progress<'_>) -> Result<()>,
    ) -> Result<Vec<RgbImage>> {
        self.validate(p)?;
        let start = match input {
            Some((_, strength)) => {
                if !self.vae.has_encoder() {
                    return Err(Error::invalid(
                        "image",
                        "this model's VAE has no encoder weights; image-to-image needs them",
                    ));
                }
                Self::img2img_start(p.steps, strength)?
            }
            None => 0,
        };
        let f = self.latent_factor();
        let (lh, lw) = (2 * (p.height / (2 * f)), 2 * (p.width / (2 * f)));
        let c = self.transformer.config.in_channels / 4;
        let repeat = |t: &Tensor| -> Result<Tensor> {
            let n = t.dim(0)?;
            if n == p.batch {
                Ok(t.clone())
            } else if n == 1 {
                let mut dims = vec![1; t.rank()];
                dims[0] = p.batch;
                Ok(t.repeat(dims)?)
            } else {
                Err(Error::invalid(
                    "prompt_embeds",
                    format!("batch {n} does not match the job's batch {}", p.batch),
                ))
            }
        };
        let embeds = repeat(embeds)?.to_dtype(self.dtype)?;
        let pooled = repeat(pooled)?.to_dtype(self.dtype)?;
        let txt_ids = Tensor::zeros((embeds.dim(1)?, 3), DType::F32, &self.device)?;
        let img_ids = image_ids(lh / 2, lw / 2, &self.device)?;

        let mut rng = TorchRng::new(p.seed);
        let seq = (lh / 2) * (lw / 2);
        let schedule = FlowMatchEuler::new(&self.scheduler, p.steps, Some(self.scheduler.mu(seq)))?;
        let mut latents = match input {
            None => pack(&rng.randn(&[p.batch, c, lh, lw], &self.device)?)?,
            Some((image, _)) => {
                let x = super::sd::preprocess_image(image, p.width, p.height, &self.device)?;
                let (mean, std) = self.vae.encode(&x)?;
                let eps = rng.randn(mean.dims(), &self.device)?;
                let z = (mean + (std * eps)?)?;
                let cfg = &self.vae.config;
                let z = ((z - cfg.shift_factor)? * cfg.scaling_factor)?;
                let z = z.repeat((p.batch, 1, 1, 1))?;
                let noise = rng.randn(&[p.batch, c, lh, lw], &self.device)?;
                pack(&schedule.scale_noise(&z, &noise, start)?)?
            }
        };
        let guidance = if self.transformer.config.guidance_embeds {
            Some(Tensor::from_vec(
                vec![p.guidance as f32; p.batch],
                p.batch,
                &self.device,
            )?)
        } else {
            None
        };
        let total = schedule.timesteps.len() - start;
        for (i, &t) in schedule.timesteps.iter().enumerate().skip(start) {
            // FluxPipeline passes `t / 1000` in float32.
            let tt = Tensor::from_vec(vec![t / 1000.0f32; p.batch], p.batch, &self.device)?;
            let v = self.transformer.forward(
                &latents.to_dtype(self.dtype)?,
                &embeds,
                &pooled,
                &tt,
                guidance.as_ref(),
                &img_ids,
                &txt_ids,
            )?;
            // The step runs in f32; diffusers keeps the latents in the model's dtype.
            latents = schedule.step(&v, i, &latents)?.to_dtype(self.dtype)?;
            on_step(Progress {
                step: i - start + 1,
                total,
                latents: &latents,
            })?;
        }
        let z = unpack(&latents, lh, lw)?;
        let z = ((z / self.vae.config.scaling_factor)? + self.vae.config.shift_factor)?;
        let images = self.vae.decode_unscaled(&z)?;
        to_rgb8(&images)
    }
}

/// A loaded FLUX pipeline: text encoders, transformer, VAE and schedule.
pub struct FluxPipeline {
    pub clip_tokenizer: ClipTokenizer,
    pub clip: ClipTextModel,
    pub t5_tokenizer: T5Tokenizer,
    pub t5: T5Encoder,
    /// Where the text encoders live (the CPU keeps them off the accelerator, which then holds
    /// only the transformer and the VAE); their outputs move to the core's device.
    pub text_device: Device,
    pub core: FluxCore,
    /// The layers of the CLIP text encoder and the transformer that take LoRA adapters.
    pub lora_layers: Vec<crate::modules::adapter::LayerInfo>,
}

/// Prompt embeddings and how many tokens each encoder dropped.
pub struct FluxPrompt {
    /// T5 last hidden state (1, max_sequence_length, dim).
    pub embeds: Tensor,
    /// CLIP pooled output (1, dim).
    pub pooled: Tensor,
    /// Tokens cut by (CLIP, T5) truncation.
    pub truncated: (usize, usize),
}

impl FluxPipeline {
    /// Whether the transformer embeds the guidance scale (FLUX.1 dev) or not (schnell).
    pub fn is_guidance_distilled(&self) -> bool {
        self.core.transformer.config.guidance_embeds
    }

    /// The default T5 length: 512 for dev-like models, 256 for schnell-like ones.
    pub fn default_max_sequence_length(&self) -> usize {
        if self.is_guidance_distilled() {
            512
        } else {
            256
        }
    }

    /// diffusers' `FluxPipeline.encode_prompt` for one prompt.
    pub fn encode_prompt(&self, prompt: &str, max_sequence_length: usize) -> Result<FluxPrompt> {
        let dev = &self.text_device;
        let (ids, count) = self.clip_tokenizer.encode_padded(prompt);
        let kept = self.clip_tokenizer.max_length().saturating_sub(2);
        let n = ids.len();
        let t = Tensor::from_vec(ids.clone(), (1, n), dev)?;
        let hidden = self.clip.forward(&t)?;
        let pooled = self.clip.pooled(&hidden, &ids)?;
        let (ids5, dropped5) = self
            .t5_tokenizer
            .encode_padded(prompt, max_sequence_length)?;
        let n5 = ids5.len();
        let embeds = self.t5.forward(&Tensor::from_vec(ids5, (1, n5), dev)?)?;
        Ok(FluxPrompt {
            embeds: embeds.to_device(&self.core.device)?,
            pooled: pooled.to_device(&self.core.device)?,
            truncated: (count.saturating_sub(kept), dropped5),
        })
    }

    /// Text-to-image from a prompt.
    pub fn generate(
        &self,
        prompt: &str,
        max_sequence_length: usize,
        p: &FluxParams,
        on_step: &mut dyn FnMut(Progress<'_>) -> Result<()>,
    ) -> Result<(Vec<RgbImage>, (usize, usize))> {
        self.core.validate(p)?;
        let enc = self.encode_prompt(prompt, max_sequence_length)?;
        let images = self
            .core
            .generate_from_embeddings(&enc.embeds, &enc.pooled, p, on_step)?;
        Ok((images, enc.truncated))
    }

    /// Image-to-image from a prompt (`FluxImg2ImgPipeline`).
    pub fn generate_from_image(
        &self,
        prompt: &str,
        max_sequence_length: usize,
        image: &RgbImage,
        strength: f64,
        p: &FluxParams,
        on_step: &mut dyn FnMut(Progress<'_>) -> Result<()>,
    ) -> Result<(Vec<RgbImage>, (usize, usize))> {
        self.core.validate(p)?;
        FluxCore::img2img_start(p.steps, strength)?;
        let enc = self.encode_prompt(prompt, max_sequence_length)?;
        let images =
            self.core
                .generate_from_image(&enc.embeds, &enc.pooled, image, strength, p, on_step)?;
        Ok((images, enc.truncated))
    }
}
