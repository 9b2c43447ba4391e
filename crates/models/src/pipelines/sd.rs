//! Stable Diffusion 1.x / 2.x text-to-image with the semantics of diffusers'
//! `StableDiffusionPipeline`: same prompt encoding, initial noise, guidance and decoding.

use candle_core::{DType, Device, Tensor};

use crate::modules::adapter::LayerInfo;
use crate::modules::clip::ClipTextModel;
use crate::modules::unet::UNet;
use crate::modules::vae::Vae;
use crate::samplers::{build_sampler, SamplerKind, Schedule, SchedulerConfig, TorchRng};
use crate::tokenizer::clip::ClipTokenizer;
use crate::{Error, Result};

use super::sdxl::{Conditioning, MicroConditioning, XlEncoders, XlText};

/// One generation request, already resolved against the model's defaults.
#[derive(Debug, Clone)]
pub struct GenerateParams {
    pub prompt: String,
    /// `None` guides away from the empty prompt, as diffusers does.
    pub negative_prompt: Option<String>,
    pub width: usize,
    pub height: usize,
    pub steps: usize,
    pub guidance: f64,
    pub seed: u64,
    pub sampler: SamplerKind,
    /// The sigma / timestep schedule the sampler walks.
    pub schedule: Schedule,
    /// The pipelines' `eta` (DDIM and TCD: the share of fresh noise per step, 0 to 1);
    /// must be 0 for the other samplers.
    pub eta: f64,
    /// The scale of the fresh noise of DPM++ SDE and DPM++ 2S a (their step's `s_noise`,
    /// default 1); must be 1 for the other samplers.
    pub s_noise: f64,
    pub batch: usize,
    /// How the prompts are read.
    pub prompt_syntax: PromptSyntax,
    /// SDXL's size and crop conditioning (SDXL models only).
    pub micro: MicroConditioning,
}

/// How prompts are read.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum PromptSyntax {
    /// As diffusers: the text as it is, truncated to the tokenizer's length.
    #[default]
    Plain,
    /// As AUTOMATIC1111's web UI: attention weights, `BREAK`, chunks of 75 tokens
    /// ([`crate::tokenizer::a1111`]).
    A1111,
}

/// Reported after every denoising step.
pub struct Progress<'a> {
    /// Steps completed so far (1-based).
    pub step: usize,
    pub total: usize,
    /// The current latents (batch, channels, h / f, w / f).
    pub latents: &'a Tensor,
}

/// An 8-bit RGB image, row-major.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RgbImage {
    pub width: usize,
    pub height: usize,
    pub pixels: Vec<u8>,
}

/// An inpainting mask as decoded: 1 (luma) or 3 (RGB) channels; white (>= 128 after
/// conversion to luma) is repainted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MaskImage {
    pub width: usize,
    pub height: usize,
    /// 1 or 3.
    pub channels: usize,
    pub pixels: Vec<u8>,
    /// Resize with nearest neighbour instead of Lanczos, as Pillow does for palette ("P")
    /// and 1-bit ("1") images.
    pub nearest: bool,
}

/// The input of image-to-image, and with a mask, of inpainting.
#[derive(Debug, Clone)]
pub struct ImageInput {
    /// The init image, any size: it is resized to the job's width x height (Lanczos, as
    /// Pillow).
    pub image: RgbImage,
    /// `strength` in (0, 1]: the share of the schedule that is run, from the noisiest end.
    pub strength: f64,
    /// Inpainting: the region to repaint, any size (resized to width x height).
    pub mask: Option<MaskImage>,
}

/// Which inpainting method a model runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InpaintMethod {
    /// An inpainting UNet (9 input channels: latents, mask, masked-image latents).
    Unet9,
    /// A regular UNet: after each step the unmasked region is reset to the init latents
    /// noised to the next timestep.
    Blend4,
}

impl InpaintMethod {
    pub fn name(self) -> &'static str {
        match self {
            InpaintMethod::Unet9 => "inpaint-unet",
            InpaintMethod::Blend4 => "latent-blend",
        }
    }
}

impl ImageInput {
    /// diffusers' default size for an input image: its own size rounded down to a multiple
    /// of the latent factor.
    pub fn default_size(&self, factor: usize) -> (usize, usize) {
        let f = factor.max(1);
        (
            self.image.width - self.image.width % f,
            self.image.height - self.image.height % f,
        )
    }
}

/// The result of one run.
#[derive(Debug, Clone)]
pub struct Generated {
    pub images: Vec<RgbImage>,
    /// How many prompt tokens were dropped by truncation (prompt, negative prompt).
    pub truncated_tokens: (usize, usize),
    /// Notes for the caller (LoRA keys that were not applied).
    pub warnings: Vec<String>,
}

/// A loaded Stable Diffusion pipeline.
pub struct SdPipeline {
    pub tokenizer: ClipTokenizer,
    pub text_encoder: ClipTextModel,
    pub unet: UNet,
    pub vae: Vae,
    /// The scheduler config as read from the folder; samplers are built from
    /// [`SchedulerConfig::for_pipeline`].
    pub scheduler: SchedulerConfig,
    pub device: Device,
    pub dtype: DType,
    /// The layers of the text encoder and UNet that take LoRA adapters.
    pub lora_layers: Vec<LayerInfo>,
    /// SDXL: the second text encoder (the UNet then takes `text_time` conditioning).
    pub xl: Option<XlText>,
}

/// Limits checked before any work is done.
pub const MAX_BATCH: usize = 64;
/// Largest image side in pixels.
pub const MAX_SIDE: usize = 8192;
pub const MAX_GUIDANCE: f64 = 100.0;

impl SdPipeline {
    /// The pixel factor between image and latents.
    pub fn latent_factor(&self) -> usize {
        self.vae.config.scale_factor()
    }

    /// Default image size (width, height): the UNet's `sample_size` times the latent factor.
    pub fn default_size(&self) -> (usize, usize) {
        let (h, w) = self.unet.config.sample_size;
        (w * self.latent_factor(), h * self.latent_factor())
    }

    /// Whether the UNet is an inpainting UNet (it then only runs inpainting).
    pub fn is_inpainting_model(&self) -> bool {
        self.unet.config.in_channels == 2 * self.vae.config.latent_channels + 1
    }

    /// The inpainting method of this model.
    pub fn inpaint_method(&self) -> InpaintMethod {
        if self.is_inpainting_model() {
            InpaintMethod::Unet9
        } else {
            InpaintMethod::Blend4
        }
    }

    /// The sampler named by the model's scheduler config, if we implement it.
    pub fn default_sampler(&self) -> Result<SamplerKind> {
        SamplerKind::from_config(&self.scheduler)
    }

    /// Checks a request against the model before running it.
    pub fn validate(&self, p: &GenerateParams) -> Result<()> {
        let f = self.latent_factor();
        for (field, v) in [("width", p.width), ("height", p.height)] {
            if v == 0 || !v.is_multiple_of(f) {
                return Err(Error::invalid(
                    field,
                    format!(
                        "must be a positive multiple of {f} (this model's latent factor), got {v}"
                    ),
                ));
            }
            if v > MAX_SIDE {
                return Err(Error::invalid(
                    field,
                    format!("must be at most {MAX_SIDE} pixels, got {v}"),
                ));
            }
        }
        let max_steps = self.scheduler.num_train_timesteps;
        if p.steps == 0 || p.steps > max_steps {
            return Err(Error::invalid(
                "steps",
                format!("must be between 1 and {max_steps}, got {}", p.steps),
            ));
        }
        if !p.guidance.is_finite() || p.guidance < 0.0 || p.guidance > MAX_GUIDANCE {
            return Err(Error::invalid(
                "guidance",
                format!("must be between 0 and {MAX_GUIDANCE}, got {}", p.guidance),
            ));
        }
        if p.batch == 0 || p.batch > MAX_BATCH {
            return Err(Error::invalid(
                "batch",
                format!("must be between 1 and {MAX_BATCH}, got {}", p.batch),
            ));
        }
        if self.xl.is_none() && p.micro.is_set() {
            return Err(Error::invalid(
                "original_size",
                "size and crop conditioning (original_size, crops_coords_top_left, target_size and their negative_ forms) applies to SDXL models only",
            ));
        }
        Ok(())
    }

    /// The UNet's conditioning for a run: text embeddings, and for SDXL the pooled embedding
    /// and size ids; with the prompt tokens dropped by truncation.
    pub fn condition(
        &self,
        p: &GenerateParams,
        guidance: bool,
        from_image: bool,
    ) -> Result<(Conditioning, (usize, usize))> {
        let negative = p.negative_prompt.as_deref();
        if let Some(xl) = &self.xl {
            let ids = p.micro.time_ids(p.height, p.width, from_image);
            let (prompt, batch) = (&p.prompt, p.batch);
            let enc = XlEncoders {
                tokenizer: &self.tokenizer,
                text_encoder: &self.text_encoder,
                xl,
                device: &self.device,
                dtype: self.dtype,
            };
            return match p.prompt_syntax {
                PromptSyntax::Plain => {
                    super::sdxl::condition(&enc, prompt, negative, batch, guidance, ids)
                }
                PromptSyntax::A1111 => Ok((
                    super::sdxl::condition_a1111(&enc, prompt, negative, batch, guidance, ids)?,
                    (0, 0),
                )),
            };
        }
        let (context, dropped) = match p.prompt_syntax {
            PromptSyntax::Plain => self.encode_prompt(&p.prompt, negative, p.batch, guidance)?,
            PromptSyntax::A1111 => (
                self.encode_prompt_a1111(&p.prompt, negative, p.batch, guidance)?,
                (0, 0),
            ),
        };
        Ok((
            Conditioning {
                context,
                added: None,
            },
            dropped,
        ))
    }

    /// Token ids padded to the tokenizer's max length, and how many tokens were dropped.
    fn tokenize(&self, text: &str) -> Result<(Tensor, usize)> {
        let (ids, count) = self.tokenizer.encode_padded(text);
        let kept = self.tokenizer.max_length().saturating_sub(2);
        let n = ids.len();
        let ids = Tensor::from_vec(ids, (1, n), &self.device)?;
        Ok((ids, count.saturating_sub(kept)))
    }

    /// The text embeddings the UNet is conditioned on: `[negative x batch, prompt x batch]`
    /// with guidance, `[prompt x batch]` without; as diffusers' `encode_prompt`.
    pub fn encode_prompt(
        &self,
        prompt: &str,
        negative: Option<&str>,
        batch: usize,
        guidance: bool,
    ) -> Result<(Tensor, (usize, usize))> {
        let (ids, dropped) = self.tokenize(prompt)?;
        let cond = self.text_encoder.forward(&ids)?.repeat((batch, 1, 1))?;
        if !guidance {
            return Ok((cond.to_dtype(self.dtype)?, (dropped, 0)));
        }
        let (neg_ids, neg_dropped) = self.tokenize(negative.unwrap_or(""))?;
        let uncond = self.text_encoder.forward(&neg_ids)?.repeat((batch, 1, 1))?;
        let emb = Tensor::cat(&[uncond, cond], 0)?.to_dtype(self.dtype)?;
        Ok((emb, (dropped, neg_dropped)))
    }

    /// The hidden states of a prompt read with A1111's syntax: each 77-token chunk encoded,
    /// weighted with A1111's "Original" emphasis, and joined along the sequence.
    fn encode_chunks(&self, text: &str) -> Result<Tensor> {
        let (chunks, _) = crate::tokenizer::a1111::chunks(&self.tokenizer, text);
        let mut parts = Vec::with_capacity(chunks.len());
        for c in chunks {
            let n = c.tokens.len();
            let ids = Tensor::from_vec(c.tokens, (1, n), &self.device)?;
            let z = self.text_encoder.forward(&ids)?;
            parts.push(crate::tokenizer::a1111::emphasis(&z, &c.multipliers)?);
        }
        Ok(Tensor::cat(&parts, 1)?)
    }

    /// As [`Self::encode_prompt`], with A1111's prompt syntax: prompts of any length, and the
    /// shorter of prompt and negative prompt extended with the empty prompt's chunk until both
    /// have as many chunks, as A1111 pads them.
    pub fn encode_prompt_a1111(
        &self,
        prompt: &str,
        negative: Option<&str>,
        batch: usize,
        guidance: bool,
    ) -> Result<Tensor> {
        let cond = self.encode_chunks(prompt)?;
        if !guidance {
            return Ok(cond.repeat((batch, 1, 1))?.to_dtype(self.dtype)?);
        }
        let uncond = self.encode_chunks(negative.unwrap_or(""))?;
        let (cond, uncond) =
            crate::tokenizer::a1111::pad_to_same_length(cond, uncond, || self.encode_chunks(""))?;
        let emb = Tensor::cat(
            &[uncond.repeat((batch, 1, 1))?, cond.repeat((batch, 1, 1))?],
            0,
        )?;
        Ok(emb.to_dtype(self.dtype)?)
    }

    /// The step image-to-image starts at, as diffusers' `get_timesteps`:
    /// `init = min(int(steps * strength), steps)`, `t_start = steps - init` (the loop index
    /// is `t_start * order`). Errors when `strength` is outside (0, 1] or runs no step.
    pub fn img2img_start(steps: usize, strength: f64) -> Result<usize> {
        if !(strength > 0.0 && strength <= 1.0) {
            return Err(Error::invalid(
                "strength",
                format!("must be in (0, 1], got {strength}"),
            ));
        }
        let init = ((steps as f64 * strength) as usize).min(steps);
        if init == 0 {
            return Err(Error::invalid(
                "strength",
                format!(
                    "{strength} x {steps} steps runs no step (int(steps x strength) must be at least 1); raise strength or steps"
                ),
            ));
        }
        Ok(steps - init)
    }

    /// An input image as the VAE takes it, as diffusers' `VaeImageProcessor.preprocess`:
    /// Lanczos resize to (width, height), `x / 255` in float32, then `2x - 1`; (1, 3, H, W).
    pub fn preprocess(&self, image: &RgbImage, width: usize, height: usize) -> Result<Tensor> {
        preprocess_image(image, width, height, &self.device)
    }

    /// The mask as diffusers' mask processor makes it: resized to (width, height) in its own
    /// channels (Lanczos, or nearest for palette / 1-bit images), then luma as Pillow's
    /// `convert("L")`, then 1 where luma >= 128 else 0; (1, 1, H, W) f32.
    pub fn preprocess_mask(&self, mask: &MaskImage, width: usize, height: usize) -> Result<Tensor> {
        let c = mask.channels;
        if !(c == 1 || c == 3) || mask.pixels.len() != mask.width * mask.height * c {
            return Err(Error::invalid(
                "mask",
                format!(
                    "{} bytes do not make a {}x{} image of {c} channels",
                    mask.pixels.len(),
                    mask.width,
                    mask.height
                ),
            ));
        }
        let resize = if mask.nearest {
            super::resize::resize_nearest
        } else {
            super::resize::resize_lanczos
        };
        let px = resize(&mask.pixels, mask.width, mask.height, c, width, height);
        let bin = |l: u32| if l >= 128 { 1.0f32 } else { 0.0 };
        let luma: Vec<f32> = if c == 3 {
            px.chunks_exact(3)
                .map(|p| {
                    bin((19595 * u32::from(p[0])
                        + 38470 * u32::from(p[1])
                        + 7471 * u32::from(p[2])
                        + 0x8000)
                        >> 16)
                })
                .collect()
        } else {
            px.iter().map(|&l| bin(u32::from(l))).collect()
        };
        Ok(Tensor::from_vec(luma, (1, 1, height, width), &self.device)?)
    }

    /// `vae.encode(image).latent_dist.sample(generator) * scaling_factor` (one draw of the
    /// latent shape from `rng`).
    pub fn encode_sample(&self, image: &Tensor, rng: &mut TorchRng) -> Result<Tensor> {
        let (mean, std) = self.vae.encode(image)?;
        let eps = rng.randn(mean.dims(), &self.device)?;
        let sample = (mean + (std * eps)?)?;
        Ok((sample * self.vae.config.scaling_factor)?)
    }

    /// Runs text-to-image. `on_step` is called after every step; returning
    /// `Err(Error::Cancelled)` (or any error) stops the run.
    pub fn generate(
        &self,
        p: &GenerateParams,
        on_step: &mut dyn FnMut(Progress<'_>) -> Result<()>,
    ) -> Result<Generated> {
        self.run(p, None, on_step)
    }

    /// Runs image-to-image with diffusers' `StableDiffusionImg2ImgPipeline` semantics: the
    /// input resized to `p.width` x `p.height`, encoded with one latent draw from the seeded
    /// generator, repeated for the batch, noised to the first timestep kept by `strength`.
    pub fn generate_from_image(
        &self,
        p: &GenerateParams,
        input: &ImageInput,
        on_step: &mut dyn FnMut(Progress<'_>) -> Result<()>,
    ) -> Result<Generated> {
        self.run(p, Some(input), on_step)
    }

    fn run(
        &self,
        p: &GenerateParams,
        input: Option<&ImageInput>,
        on_step: &mut dyn FnMut(Progress<'_>) -> Result<()>,
    ) -> Result<Generated> {
        self.validate(p)?;
        let inpaint = input.is_some_and(|i| i.mask.is_some());
        if self.is_inpainting_model() && !inpaint {
            return Err(Error::invalid(
                "mask",
                "this is an inpainting model (its UNet takes a mask): it only runs inpainting",
            ));
        }
        let start = match input {
            Some(input) => {
                if !self.vae.has_encoder() {
                    return Err(Error::invalid(
                        "image",
                        "this model's VAE has no encoder weights; image-to-image needs them",
                    ));
                }
                Self::img2img_start(p.steps, input.strength)?
            }
            None => 0,
        };
        let mut sampler = build_sampler(
            p.sampler,
            p.schedule,
            &self.scheduler.for_pipeline(inpaint),
            p.steps,
        )?;
        if p.eta != 0.0 || p.sampler.takes_eta() {
            sampler.set_eta(p.eta)?;
        }
        if p.s_noise != 1.0 || p.sampler.takes_s_noise() {
            sampler.set_s_noise(p.s_noise)?;
        }
        // diffusers' get_timesteps skips `order` timestep entries per skipped step.
        let start = start * sampler.order();
        let cfg = p.guidance > 1.0;
        let (cond, truncated_tokens) = self.condition(p, cfg, input.is_some())?;

        let f = self.latent_factor();
        let shape = [
            p.batch,
            self.vae.config.latent_channels,
            p.height / f,
            p.width / f,
        ];
        let mut rng = TorchRng::new(p.seed);
        // Inpainting: the latent mask, the masked image's latents, the init latents (4-channel
        // method) and the noise they are re-noised with.
        let mut inpaint_state: Option<(Tensor, Tensor, Option<Tensor>, Tensor)> = None;
        let mut latents = match input {
            None => {
                let noise = rng.randn(&shape, &self.device)?;
                (noise * sampler.init_noise_sigma())?
            }
            Some(ImageInput {
                image, mask: None, ..
            }) => {
                let image = self.preprocess(image, p.width, p.height)?;
                let init = self
                    .encode_sample(&image, &mut rng)?
                    .repeat((p.batch, 1, 1, 1))?;
                let noise = rng.randn(init.dims(), &self.device)?;
                sampler.add_noise(&init, &noise, start)?
            }
            Some(ImageInput {
                image,
                strength,
                mask: Some(mask),
            }) => {
                // diffusers' StableDiffusionInpaintPipeline, draw for draw: the init image's
                // latent sample (unless an inpainting UNet starts from pure noise), the noise,
                // then the masked image's latent sample.
                let image = self.preprocess(image, p.width, p.height)?;
                let full = *strength == 1.0;
                let init = if !self.is_inpainting_model() || !full {
                    Some(
                        self.encode_sample(&image, &mut rng)?
                            .repeat((p.batch, 1, 1, 1))?,
                    )
                } else {
                    None
                };
                let noise = rng.randn(&shape, &self.device)?;
                let latents = match (&init, full) {
                    (Some(init), false) => sampler.add_noise(init, &noise, start)?,
                    _ => (&noise * sampler.init_noise_sigma())?,
                };
                let mask = self.preprocess_mask(mask, p.width, p.height)?;
                let keep = mask.lt(0.5f32)?.to_dtype(DType::F32)?;
                let masked = image.broadcast_mul(&keep)?;
                // Nearest downsampling by an integer factor: the top-left pixel of each block.
                let m = mask
                    .reshape((1, 1, p.height / f, f, p.width / f, f))?
                    .narrow(3, 0, 1)?
                    .narrow(5, 0, 1)?
                    .reshape((1, 1, p.height / f, p.width / f))?
                    .repeat((p.batch, 1, 1, 1))?;
                let mil = self
                    .encode_sample(&masked, &mut rng)?
                    .repeat((p.batch, 1, 1, 1))?;
                inpaint_state = Some((m, mil, init, noise));
                latents
            }
        };

        let timesteps = sampler.timesteps()[start..].to_vec();
        let total = timesteps.len();
        let unet9 = self.is_inpainting_model();
        for (k, &t) in timesteps.iter().enumerate() {
            let i = start + k;
            let input = if cfg {
                Tensor::cat(&[&latents, &latents], 0)?
            } else {
                latents.clone()
            };
            let mut input = sampler.scale_model_input(&input, i)?;
            if let (true, Some((m, mil, _, _))) = (unet9, &inpaint_state) {
                let (m, mil) = if cfg {
                    (Tensor::cat(&[m, m], 0)?, Tensor::cat(&[mil, mil], 0)?)
                } else {
                    (m.clone(), mil.clone())
                };
                input = Tensor::cat(&[&input, &m, &mil], 1)?;
            }
            let out = self
                .unet
                .forward_with(
                    &input.to_dtype(self.dtype)?,
                    t,
                    &cond.context,
                    cond.added.as_ref(),
                )?
                .to_dtype(DType::F32)?;
            let noise_pred = if cfg {
                let uncond = out.narrow(0, 0, p.batch)?;
                let cond = out.narrow(0, p.batch, p.batch)?;
                (&uncond + ((cond - &uncond)? * p.guidance)?)?
            } else {
                out
            };
            latents = sampler.step(&noise_pred, i, &latents, &mut rng)?;
            if let (false, Some((m, _, Some(init), noise))) = (unet9, &inpaint_state) {
                // Keep the unmasked region: the init latents noised to the next timestep,
                // clean after the last step.
                let proper = if k + 1 < total {
                    sampler.add_noise(init, noise, i + 1)?
                } else {
                    init.clone()
                };
                let inv = (1.0 - m)?;
                latents = (proper.broadcast_mul(&inv)? + latents.broadcast_mul(m)?)?;
            }
            on_step(Progress {
                step: k + 1,
                total,
                latents: &latents,
            })?;
        }
        let images = self.decode(&latents)?;
        Ok(Generated {
            warnings: Vec::new(),
            images,
            truncated_tokens,
        })
    }

    /// VAE decode and conversion to 8-bit RGB like diffusers' image processor:
    /// `round(clamp(x / 2 + 0.5, 0, 1) * 255)`.
    pub fn decode(&self, latents: &Tensor) -> Result<Vec<RgbImage>> {
        let img = self.vae.decode(latents)?;
        to_rgb8(&img)
    }
}

/// An input image as the VAE takes it, as diffusers' `VaeImageProcessor.preprocess`:
/// Lanczos resize (as Pillow) to (width, height), `x / 255` in float32, then `2x - 1`;
/// (1, 3, H, W).
pub fn preprocess_image(
    image: &RgbImage,
    width: usize,
    height: usize,
    device: &Device,
) -> Result<Tensor> {
    if image.pixels.len() != image.width * image.height * 3 {
        return Err(Error::invalid(
            "image",
            format!(
                "{} bytes do not make a {}x{} RGB image",
                image.pixels.len(),
                image.width,
                image.height
            ),
        ));
    }
    let px =
        super::resize::resize_lanczos(&image.pixels, image.width, image.height, 3, width, height);
    let data: Vec<f32> = px
        .iter()
        .map(|&v| 2.0f32 * (f32::from(v) / 255.0f32) - 1.0f32)
        .collect();
    Ok(Tensor::from_vec(data, (1, height, width, 3), device)?
        .permute((0, 3, 1, 2))?
        .contiguous()?)
}

/// Converts a (batch, 3, h, w) f32 tensor in [-1, 1] to 8-bit images.
pub fn to_rgb8(img: &Tensor) -> Result<Vec<RgbImage>> {
    let (b, c, h, w) = img.dims4()?;
    if c != 3 {
        return Err(Error::Candle(candle_core::Error::Msg(format!(
            "decoder produced {c} channels, expected 3"
        ))));
    }
    let scaled = ((img.to_dtype(DType::F32)? / 2.0)? + 0.5)?
        .clamp(0f32, 1f32)?
        .permute((0, 2, 3, 1))?
        .contiguous()?;
    let mut out = Vec::with_capacity(b);
    for i in 0..b {
        let data: Vec<f32> = scaled.get(i)?.flatten_all()?.to_vec1()?;
        let pixels = data
            .iter()
            .map(|v| (v * 255.0).round_ties_even() as u8)
            .collect();
        out.push(RgbImage {
            width: w,
            height: h,
            pixels,
        });
    }
    Ok(out)
}
