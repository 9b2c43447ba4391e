//! Loading the model a worker serves: from `--model` (a diffusers folder, a single-file
//! checkpoint, a FLUX transformer file, or a Hugging Face repo id fetched into the cache) to
//! the pipeline and the [`ModelSpec`] that validation and `/v1/info` read.

use std::path::{Path, PathBuf};

use anyhow::{bail, Result};
use candle_core::{DType, Device};
use sd_models::modules::cpu_gemm::{products_in_bf16, set_cpu_bf16, weights_dtype};
use sd_models::pipelines::flux::FluxPipeline;

use crate::backend::Model;
use crate::hub::Progress;
use crate::source::{model_kind, ModelKind, SourceOptions};
use crate::spec::ModelSpec;
use crate::validate::{
    hub_repo_id, DEFAULT_GUIDANCE, DEFAULT_STEPS, MAX_SEQUENCE_LENGTH, SDXL_DEFAULT_GUIDANCE,
    TURBO_DEFAULTS,
};

/// Defaults of FLUX jobs: (steps, guidance) for dev-like and schnell-like models.
pub const FLUX_DEV_DEFAULTS: (usize, f64) = (28, 3.5);
pub const FLUX_SCHNELL_STEPS: usize = 4;
/// diffusers' `default_sample_size` for FLUX: the default image side is this times the VAE
/// factor.
pub const FLUX_DEFAULT_SAMPLE_SIZE: usize = 128;

/// What to load, and where.
#[derive(Debug, Clone)]
pub struct LoadRequest {
    /// As given: a path, or a Hugging Face repo id `org/repo[@revision]`.
    pub model: PathBuf,
    /// With a single-file model: the diffusers folder that provides the rest.
    pub components: Option<PathBuf>,
    pub source: SourceOptions,
    pub device: Device,
    /// The device as the user named it (`cpu`, `cuda:0`), for records.
    pub device_name: String,
    /// FLUX: where the text encoders live (None: `device`).
    pub text_device: Option<Device>,
    /// On the CPU, bf16 loads f32 weights and rounds the operands of the matrix products to
    /// bf16 (`sd_models::modules::cpu_gemm`).
    pub dtype: DType,
}

/// Sets the process's CPU matrix products to bf16 or f32 as the request's dtype says (bf16 on
/// the CPU: f32 weights, bf16 products); [`load`] does it before loading.
pub fn apply_cpu_precision(request: &LoadRequest) {
    set_cpu_bf16(products_in_bf16(request.dtype, &request.device));
}

pub fn dtype_name(dtype: DType) -> &'static str {
    match dtype {
        DType::F16 => "f16",
        DType::BF16 => "bf16",
        _ => "f32",
    }
}

/// Fetches a repo id into the cache when it is one (reporting to `progress`), then loads the
/// model it names.
pub fn load(request: &LoadRequest, progress: &mut dyn Progress) -> Result<(Model, ModelSpec)> {
    apply_cpu_precision(request);
    let model =
        crate::hub::resolve_model(&request.model, request.source.variant.as_deref(), progress)?;
    let kind = model_kind(&model)?;
    let sd_opts = request
        .source
        .sd_options(kind, request.components.as_deref())?;
    if kind == ModelKind::Flux {
        return load_flux_model(request, model);
    }
    if request.text_device.is_some() {
        bail!("--text-encoder-device applies to FLUX models only");
    }
    if let Some(ts) = request.source.vae_tile_size {
        if !(64..=4096).contains(&ts) || !ts.is_multiple_of(8) {
            bail!("invalid --vae-tile-size {ts}: must be a multiple of 8 between 64 and 4096");
        }
    }
    let weights = weights_dtype(request.dtype, &request.device);
    let (mut pipeline, info) =
        sd_models::loader::load_sd_with(&model, &sd_opts, &request.device, weights)?;
    pipeline.vae.tile_size = request.source.vae_tile_size;
    let (default_width, default_height) = pipeline.default_size();
    let (default_steps, default_guidance) = sd_defaults(info.family, info.variant);
    let spec = ModelSpec {
        name: info.name.clone(),
        repo_id: hub_repo_id(&model),
        path: model,
        family: info.family.to_string(),
        variant: info.variant.to_string(),
        pipeline_class: info.pipeline_class.clone(),
        prediction_type: info.prediction_type.as_str().to_string(),
        latent_factor: pipeline.latent_factor(),
        inpainting_model: pipeline.is_inpainting_model(),
        inpaint_method: pipeline.inpaint_method().name(),
        flux: false,
        default_steps,
        default_guidance,
        guidance_embedded: false,
        default_max_sequence_length: None,
        max_prompt_tokens: pipeline.tokenizer.max_length(),
        default_width,
        default_height,
        default_sampler: pipeline.default_sampler().map_err(|e| e.to_string()),
        num_train_timesteps: pipeline.scheduler.num_train_timesteps,
        scheduler: pipeline.scheduler.clone(),
        device: request.device_name.clone(),
        dtype: dtype_name(request.dtype).to_string(),
        builtin_tokenizer: info.builtin_tokenizer,
    };
    Ok((Model::Sd(Box::new(pipeline)), spec))
}

/// Steps and guidance of jobs that leave them out: diffusers' pipeline defaults (50 steps;
/// guidance 7.5, SDXL 5.0), and for turbo models the 1 step without guidance they are
/// distilled for.
pub fn sd_defaults(family: &str, variant: &str) -> (usize, f64) {
    match (family, variant) {
        (_, "turbo") => TURBO_DEFAULTS,
        ("sdxl", _) => (DEFAULT_STEPS, SDXL_DEFAULT_GUIDANCE),
        _ => (DEFAULT_STEPS, DEFAULT_GUIDANCE),
    }
}

fn load_flux_model(request: &LoadRequest, model: PathBuf) -> Result<(Model, ModelSpec)> {
    let (pipeline, name) = load_flux(
        &model,
        request.components.as_deref(),
        &request.device,
        request.text_device.as_ref(),
        weights_dtype(request.dtype, &request.device),
    )?;
    let dev = pipeline.is_guidance_distilled();
    let side = FLUX_DEFAULT_SAMPLE_SIZE * pipeline.core.latent_factor();
    let spec = ModelSpec {
        name,
        repo_id: hub_repo_id(&model),
        path: model,
        family: "flux".into(),
        variant: if dev { "dev" } else { "schnell" }.into(),
        pipeline_class: "FluxPipeline".into(),
        prediction_type: if dev { "dev" } else { "schnell" }.into(),
        // Sizes are multiples of twice the VAE factor (2x2 packing).
        latent_factor: 2 * pipeline.core.latent_factor(),
        inpainting_model: false,
        inpaint_method: "none",
        flux: true,
        default_steps: if dev {
            FLUX_DEV_DEFAULTS.0
        } else {
            FLUX_SCHNELL_STEPS
        },
        default_guidance: if dev { FLUX_DEV_DEFAULTS.1 } else { 0.0 },
        guidance_embedded: dev,
        default_max_sequence_length: Some(pipeline.default_max_sequence_length()),
        max_prompt_tokens: MAX_SEQUENCE_LENGTH,
        default_width: side,
        default_height: side,
        default_sampler: Err("FLUX runs its flow-matching Euler schedule".into()),
        num_train_timesteps: pipeline.core.scheduler.num_train_timesteps,
        scheduler: sd_models::samplers::SchedulerConfig::default(),
        device: request.device_name.clone(),
        dtype: dtype_name(request.dtype).to_string(),
        builtin_tokenizer: false,
    };
    Ok((Model::Flux(Box::new(pipeline)), spec))
}

/// Loads a FLUX folder, or a single-file transformer with `components`; and the model's
/// short name (folder name, or file stem).
pub fn load_flux(
    model: &Path,
    components: Option<&Path>,
    device: &Device,
    text_device: Option<&Device>,
    dtype: DType,
) -> Result<(FluxPipeline, String)> {
    match components {
        None => {
            let pipe = sd_models::loader::load_flux_with(model, None, device, text_device, dtype)?;
            let name = sd_models::loader::model_name(model);
            Ok((pipe, name))
        }
        Some(dir) => {
            if !model.is_file() {
                bail!(
                    "invalid --model {}: with --components it must be a transformer file",
                    model.display()
                );
            }
            if !sd_models::loader::is_flux_folder(dir) {
                bail!(
                    "invalid --components {}: not a diffusers FLUX folder (model_index.json with a Flux pipeline class)",
                    dir.display()
                );
            }
            let pipe =
                sd_models::loader::load_flux_with(dir, Some(model), device, text_device, dtype)?;
            let name = model
                .file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_else(|| model.display().to_string());
            Ok((pipe, name))
        }
    }
}
