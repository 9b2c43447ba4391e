//! What the interfaces need to know about the loaded model to validate and describe requests.

use std::path::PathBuf;

use sd_models::samplers::{SamplerKind, SchedulerConfig};

/// The loaded model as validation, `/v1/info` and the job records see it.
#[derive(Debug, Clone)]
pub struct ModelSpec {
    /// Short name (the folder name), written into the PNG `parameters`.
    pub name: String,
    pub path: PathBuf,
    /// `org/name` when the folder is a snapshot in a Hugging Face hub cache
    /// (`.../models--org--name/snapshots/REV`).
    pub repo_id: Option<String>,
    pub family: String,
    /// `base`, `inpaint` or `turbo` for Stable Diffusion and SDXL; `dev` or `schnell` for
    /// FLUX.
    pub variant: String,
    pub pipeline_class: String,
    pub prediction_type: String,
    pub latent_factor: usize,
    /// An inpainting UNet: the model runs `image_inpaint` only.
    pub inpainting_model: bool,
    /// FLUX (flow matching, no negative prompt, no sampler choice; image_generation and
    /// image_transform).
    pub flux: bool,
    /// Defaults of omitted fields.
    pub default_steps: usize,
    pub default_guidance: f64,
    /// FLUX dev embeds a guidance scale; schnell takes none.
    pub guidance_embedded: bool,
    /// FLUX: default T5 prompt length.
    pub default_max_sequence_length: Option<usize>,
    /// Prompt tokens the model reads at most (CLIP's 77, FLUX's T5 limit 512).
    pub max_prompt_tokens: usize,
    /// How the model inpaints: `inpaint-unet` or `latent-blend` (reported by /v1/info and
    /// the `complete` event of inpainting jobs).
    pub inpaint_method: &'static str,
    pub default_width: usize,
    pub default_height: usize,
    /// The model's own scheduler, or why it cannot be used.
    pub default_sampler: Result<SamplerKind, String>,
    pub num_train_timesteps: usize,
    /// The model's scheduler config, to validate step counts against the chosen sampler.
    pub scheduler: SchedulerConfig,
    pub device: String,
    pub dtype: String,
    /// A single file without a tokenizer at hand runs on the built-in CLIP vocabulary.
    pub builtin_tokenizer: bool,
}

impl ModelSpec {
    /// A Stable Diffusion 1.5-shaped model (`tiny` at `/models/tiny`: 512x512, PNDM, 1000
    /// training steps, CLIP's 77 tokens) with no weights behind it: for tests of validation
    /// and of the job engine, which need a spec but no model.
    pub fn sd_example() -> ModelSpec {
        ModelSpec {
            name: "tiny".into(),
            path: "/models/tiny".into(),
            repo_id: None,
            family: "sd1".into(),
            variant: "base".into(),
            pipeline_class: "StableDiffusionPipeline".into(),
            prediction_type: "epsilon".into(),
            latent_factor: 8,
            inpainting_model: false,
            inpaint_method: "latent-blend",
            flux: false,
            default_steps: 50,
            default_guidance: 7.5,
            guidance_embedded: false,
            default_max_sequence_length: None,
            max_prompt_tokens: 77,
            default_width: 512,
            default_height: 512,
            default_sampler: Ok(SamplerKind::Pndm),
            num_train_timesteps: 1000,
            scheduler: SchedulerConfig::default(),
            device: "cpu".into(),
            dtype: "f32".into(),
            builtin_tokenizer: false,
        }
    }
}
