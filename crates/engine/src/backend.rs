//! What the engine runs jobs on: the [`Backend`] trait, the loaded [`Model`] (Stable
//! Diffusion or FLUX), and how each pipeline takes a [`GenerationRequest`].

use candle_core::Tensor;
use sd_models::pipelines::flux::{FluxParams, FluxPipeline};
use sd_models::pipelines::{GenerateParams, Generated, Progress, RgbImage, SdPipeline};

use crate::request::{GenerationRequest, PreviewKind};

/// What the engine runs jobs on: the loaded pipeline, or a fake one in tests.
pub trait Backend {
    /// Text-to-image, or image-to-image when `input` is given.
    fn generate(
        &self,
        request: &GenerationRequest,
        on_step: &mut dyn FnMut(Progress<'_>) -> sd_models::Result<()>,
    ) -> sd_models::Result<Generated>;
    /// A preview of the first image of a step's `latents`.
    fn preview(
        &self,
        latents: &Tensor,
        request: &GenerationRequest,
        kind: PreviewKind,
    ) -> sd_models::Result<RgbImage>;
}

impl Backend for SdPipeline {
    fn generate(
        &self,
        request: &GenerationRequest,
        on_step: &mut dyn FnMut(Progress<'_>) -> sd_models::Result<()>,
    ) -> sd_models::Result<Generated> {
        let run = || match request.input.as_deref() {
            Some(input) => self.generate_from_image(&request.params, input, on_step),
            None => SdPipeline::generate(self, &request.params, on_step),
        };
        let (mut generated, warnings) = sd_models::lora::run_with(
            &request.loras,
            &self.lora_layers,
            &self.device,
            self.dtype,
            run,
        )?;
        generated.warnings = warnings;
        Ok(generated)
    }

    fn preview(
        &self,
        latents: &Tensor,
        _request: &GenerationRequest,
        kind: PreviewKind,
    ) -> sd_models::Result<RgbImage> {
        let first = latents.narrow(0, 0, 1)?;
        let mut images = match kind {
            PreviewKind::Approx => sd_models::pipelines::latent_preview(&first)?,
            PreviewKind::Full => self.decode(&first)?,
        };
        images.pop().ok_or_else(|| {
            sd_models::Error::Candle(candle_core::Error::Msg("empty preview".into()))
        })
    }
}

impl Backend for FluxPipeline {
    fn generate(
        &self,
        request: &GenerationRequest,
        on_step: &mut dyn FnMut(Progress<'_>) -> sd_models::Result<()>,
    ) -> sd_models::Result<Generated> {
        let p = &request.params;
        let fp = flux_params(p);
        let max_seq = request
            .max_sequence_length
            .unwrap_or(self.default_max_sequence_length());
        let run = || match request.input.as_deref() {
            Some(input) if input.mask.is_some() => Err(sd_models::Error::invalid(
                "operation",
                "FLUX inpainting is not supported yet",
            )),
            Some(input) => self.generate_from_image(
                &p.prompt,
                max_seq,
                &input.image,
                input.strength,
                &fp,
                on_step,
            ),
            None => FluxPipeline::generate(self, &p.prompt, max_seq, &fp, on_step),
        };
        let ((images, truncated), warnings) = sd_models::lora::run_with(
            &request.loras,
            &self.lora_layers,
            &self.core.device,
            self.core.dtype,
            run,
        )?;
        Ok(Generated {
            images,
            truncated_tokens: truncated,
            warnings,
        })
    }

    fn preview(
        &self,
        latents: &Tensor,
        request: &GenerationRequest,
        kind: PreviewKind,
    ) -> sd_models::Result<RgbImage> {
        let f = self.core.latent_factor();
        let p = &request.params;
        let (lh, lw) = (2 * (p.height / (2 * f)), 2 * (p.width / (2 * f)));
        let z = sd_models::pipelines::flux::unpack(&latents.narrow(0, 0, 1)?, lh, lw)?;
        let mut images = match kind {
            PreviewKind::Approx => sd_models::pipelines::latent_preview(&z)?,
            PreviewKind::Full => {
                let cfg = &self.core.vae.config;
                let z = ((z / cfg.scaling_factor)? + cfg.shift_factor)?;
                sd_models::pipelines::sd::to_rgb8(&self.core.vae.decode_unscaled(&z)?)?
            }
        };
        images.pop().ok_or_else(|| {
            sd_models::Error::Candle(candle_core::Error::Msg("empty preview".into()))
        })
    }
}

/// A job's settings as FLUX takes them.
pub fn flux_params(p: &GenerateParams) -> FluxParams {
    FluxParams {
        width: p.width,
        height: p.height,
        steps: p.steps,
        guidance: p.guidance,
        seed: p.seed,
        batch: p.batch,
    }
}

/// The model a worker serves.
pub enum Model {
    Sd(Box<SdPipeline>),
    Flux(Box<FluxPipeline>),
}

impl Backend for Model {
    fn generate(
        &self,
        request: &GenerationRequest,
        on_step: &mut dyn FnMut(Progress<'_>) -> sd_models::Result<()>,
    ) -> sd_models::Result<Generated> {
        match self {
            Model::Sd(m) => Backend::generate(m.as_ref(), request, on_step),
            Model::Flux(m) => Backend::generate(m.as_ref(), request, on_step),
        }
    }

    fn preview(
        &self,
        latents: &Tensor,
        request: &GenerationRequest,
        kind: PreviewKind,
    ) -> sd_models::Result<RgbImage> {
        match self {
            Model::Sd(m) => m.as_ref().preview(latents, request, kind),
            Model::Flux(m) => m.as_ref().preview(latents, request, kind),
        }
    }
}
