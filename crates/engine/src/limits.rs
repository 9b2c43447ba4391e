//! Every limit and default a request meets, named once: the worker's [`Limits`] (from the
//! command line, or the pipeline's own for the CLI), the built-in bounds and the defaults of
//! omitted fields. [`crate::validate`] applies them; `/v1/info` and the OpenAPI document report
//! them.

use std::path::PathBuf;

use crate::request::Operation;
use crate::spec::ModelSpec;

/// Per-worker request limits (from the command line).
#[derive(Debug, Clone)]
pub struct Limits {
    /// Width x height of one image at most.
    pub max_pixels: usize,
    /// Width x height of an input image at most (checked from its header).
    pub max_input_pixels: usize,
    pub max_steps: usize,
    pub max_batch: usize,
    /// Where the files that `loras` names may be.
    pub loras: LoraFiles,
    /// The limits are `sd-worker serve`'s flags (errors name the flag), or the pipeline's own
    /// (`sd-worker generate`).
    pub from_flags: bool,
    /// An empty prompt is taken (an unconditional image, as diffusers makes it from ""). The
    /// CLI, where it is typed on purpose, takes it; the HTTP APIs refuse it as a likely
    /// client mistake.
    pub empty_prompt: bool,
}

/// Where the files of a request's LoRAs may be.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LoraFiles {
    /// The request may name none.
    Refused,
    /// Names are resolved inside this folder (the server's `--lora-dir`).
    InFolder(PathBuf),
    /// Any file the caller names (the CLI's `--lora FILE`: the user names their own files).
    AnyFile,
}

impl Limits {
    /// The limits of one `sd-worker generate` run: the pipeline's own (sides, batch, the
    /// scheduler's step count), no pixel budget beyond the largest side.
    pub fn pipeline() -> Self {
        Limits {
            max_pixels: MAX_SIDE * MAX_SIDE,
            max_input_pixels: MAX_SIDE * MAX_SIDE,
            max_steps: usize::MAX,
            max_batch: sd_models::pipelines::sd::MAX_BATCH,
            loras: LoraFiles::AnyFile,
            from_flags: false,
            empty_prompt: true,
        }
    }
}

/// Defaults for omitted fields that the model does not define.
pub const DEFAULT_STEPS: usize = 50;
pub const DEFAULT_GUIDANCE: f64 = 7.5;
/// diffusers' `StableDiffusionXLPipeline` default guidance.
pub const SDXL_DEFAULT_GUIDANCE: f64 = 5.0;
/// Turbo models (SD-Turbo, SDXL-Turbo): one step, no guidance, as their model cards run them.
pub const TURBO_DEFAULTS: (usize, f64) = (1, 0.0);
pub const DEFAULT_PREVIEW_EVERY: usize = 5;
/// Default image-to-image strength.
pub const DEFAULT_TRANSFORM_STRENGTH: f64 = 0.8;
/// Default inpainting strength.
pub const DEFAULT_INPAINT_STRENGTH: f64 = 1.0;
/// Default image-to-image strength of FLUX (diffusers' `FluxImg2ImgPipeline`: 0.6).
pub const DEFAULT_FLUX_STRENGTH: f64 = 0.6;
/// Largest classifier-free guidance scale accepted.
pub const MAX_GUIDANCE: f64 = sd_models::pipelines::sd::MAX_GUIDANCE;
/// Largest image side in pixels.
pub const MAX_SIDE: usize = sd_models::pipelines::sd::MAX_SIDE;
/// Longest prompt, negative prompt or id string, in characters.
pub const MAX_TEXT_CHARS: usize = 20_000;
pub const MAX_ID_CHARS: usize = 256;
/// Longest `model` string, in characters.
pub const MAX_MODEL_CHARS: usize = 4096;
/// LoRAs one job may apply at most.
pub const MAX_LORAS: usize = 8;
/// Longest LoRA path, in characters.
pub const MAX_LORA_PATH_CHARS: usize = 1024;
/// Largest value of an SDXL size or crop id (`original_size`, `crops_coords_top_left`, ...).
pub const MAX_MICRO_PIXELS: u64 = 16_384;
/// FLUX's T5 prompt length: at least 2, at most T5's position limit in diffusers.
pub const MIN_SEQUENCE_LENGTH: usize = 2;
pub const MAX_SEQUENCE_LENGTH: usize = 512;

/// Steps when the request has none: the model's default (50 for Stable Diffusion, 28 for
/// FLUX dev, 4 for schnell), or the worker's limit when that is lower.
pub fn default_steps(spec: &ModelSpec, limits: &Limits) -> usize {
    spec.default_steps
        .min(limits.max_steps)
        .min(spec.num_train_timesteps)
}

/// The default strength of `operation` on this model.
pub fn default_strength(spec: &ModelSpec, operation: Operation) -> f64 {
    match operation {
        Operation::Inpaint => DEFAULT_INPAINT_STRENGTH,
        _ if spec.flux => DEFAULT_FLUX_STRENGTH,
        _ => DEFAULT_TRANSFORM_STRENGTH,
    }
}

/// The operations the loaded model runs.
pub fn operations(spec: &ModelSpec) -> Vec<Operation> {
    if spec.inpainting_model {
        vec![Operation::Inpaint]
    } else if spec.flux {
        vec![Operation::Generation, Operation::Transform]
    } else {
        Operation::ALL.to_vec()
    }
}
