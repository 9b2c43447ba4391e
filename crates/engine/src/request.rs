//! The one internal request every interface builds: [`RequestDraft`] is what a wire format
//! (the native job API, a compatibility API, the CLI) read from its input, with its own field
//! names already mapped; [`crate::validate`] turns it into a [`GenerationRequest`] with every
//! default applied and every limit checked, or an error naming the field.

use std::sync::Arc;

use sd_models::lora::LoraSpec;
pub use sd_models::pipelines::PromptSyntax;
use sd_models::pipelines::{GenerateParams, ImageInput};
use serde::Serialize;

/// What a job does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub enum Operation {
    #[serde(rename = "image_generation")]
    Generation,
    #[serde(rename = "image_transform")]
    Transform,
    #[serde(rename = "image_inpaint")]
    Inpaint,
}

impl Operation {
    pub const ALL: [Operation; 3] = [
        Operation::Generation,
        Operation::Transform,
        Operation::Inpaint,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Operation::Generation => "image_generation",
            Operation::Transform => "image_transform",
            Operation::Inpaint => "image_inpaint",
        }
    }

    pub fn from_name(name: &str) -> Option<Operation> {
        Operation::ALL.into_iter().find(|o| o.name() == name)
    }
}

/// What a preview shows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "lowercase")]
pub enum PreviewKind {
    /// A linear latent-to-RGB map at latent resolution (no VAE).
    Approx,
    /// A full VAE decode at image resolution.
    Full,
}

impl PreviewKind {
    pub fn name(self) -> &'static str {
        match self {
            PreviewKind::Approx => "approx",
            PreviewKind::Full => "full",
        }
    }

    pub fn from_name(name: &str) -> Option<PreviewKind> {
        [PreviewKind::Approx, PreviewKind::Full]
            .into_iter()
            .find(|k| k.name() == name)
    }
}

/// A validated job, with every default already applied.
#[derive(Debug, Clone)]
pub struct GenerationRequest {
    pub operation: Operation,
    pub params: GenerateParams,
    /// The init image, strength and (inpainting) mask.
    pub input: Option<Arc<ImageInput>>,
    /// FLUX: the T5 prompt length (None: the model's default).
    pub max_sequence_length: Option<usize>,
    /// FLUX jobs: whether the model embeds the guidance scale (for the PNG text).
    pub flux: Option<bool>,
    /// A preview every this many steps (0: none).
    pub preview_every: usize,
    pub preview: PreviewKind,
    pub hive_id: Option<String>,
    pub worker_id: Option<String>,
    /// LoRA adapters for this job only (resolved inside the worker's LoRA folder).
    pub loras: Vec<LoraSpec>,
}

/// Which pixels of a mask are the area to repaint.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum MaskRule {
    /// White (luma >= 128 after resizing), as diffusers and A1111 read masks.
    #[default]
    White,
    /// Fully transparent (alpha 0), as the OpenAI Images API reads them; the mask may be the
    /// init image itself.
    Transparent,
    /// Black (luma < 128): the white rule inverted, as A1111's `inpainting_mask_invert`.
    Black,
}

/// An encoded input image and the wire field it came from (named in errors).
#[derive(Debug, Clone)]
pub struct ImageBytes {
    pub field: String,
    pub bytes: Vec<u8>,
}

/// SDXL's size and crop conditioning as a request gave it: pairs of (height, width) or (top,
/// left) pixels.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct MicroDraft {
    pub original_size: Option<[u64; 2]>,
    pub crops_coords_top_left: Option<[u64; 2]>,
    pub target_size: Option<[u64; 2]>,
    pub negative_original_size: Option<[u64; 2]>,
    pub negative_crops_coords_top_left: Option<[u64; 2]>,
    pub negative_target_size: Option<[u64; 2]>,
    /// Refiner-style SDXL models only (`requires_aesthetics_score`).
    pub aesthetic_score: Option<f64>,
    pub negative_aesthetic_score: Option<f64>,
}

/// One LoRA a request names, before it is resolved in the LoRA folder.
#[derive(Debug, Clone, Default)]
pub struct LoraDraft {
    /// A file name inside the worker's LoRA folder.
    pub path: String,
    pub strength: Option<f64>,
    pub strict: Option<bool>,
}

/// A request as an interface read it, before defaults and limits. `None` means the field was
/// omitted; every present value is checked by [`crate::validate::validate`].
#[derive(Debug, Clone)]
pub struct RequestDraft {
    pub operation: Operation,
    pub prompt: Option<String>,
    pub negative_prompt: Option<String>,
    /// How the prompts are read (diffusers' plain text, or A1111's syntax).
    pub prompt_syntax: PromptSyntax,
    pub width: Option<u64>,
    pub height: Option<u64>,
    pub steps: Option<u64>,
    pub guidance_scale: Option<f64>,
    /// None: a random seed.
    pub seed: Option<u64>,
    /// The sampler (update rule); a combined name such as "DPM++ 2M Karras" also sets the
    /// schedule.
    pub sampler: Option<String>,
    /// The sigma / timestep schedule.
    pub schedule: Option<String>,
    /// The earlier single field: a sampler name, or a combined sampler-and-schedule name.
    pub scheduler: Option<String>,
    /// DDIM's and TCD's `eta`.
    pub eta: Option<f64>,
    /// DPM++ SDE's and DPM++ 2S a's `s_noise`.
    pub s_noise: Option<f64>,
    pub batch: Option<u64>,
    pub max_sequence_length: Option<u64>,
    /// image_transform: the init image; image_inpaint: the image to repaint.
    pub init_image: Option<ImageBytes>,
    /// image_inpaint: the mask.
    pub mask_image: Option<ImageBytes>,
    /// Which pixels of `mask_image` are repainted.
    pub mask_rule: MaskRule,
    pub strength: Option<f64>,
    pub preview_every: Option<u64>,
    pub preview: Option<PreviewKind>,
    pub hive_id: Option<String>,
    pub worker_id: Option<String>,
    /// The model the client expects (refused when it is not the loaded one).
    pub model: Option<String>,
    pub loras: Vec<LoraDraft>,
    /// SDXL's size and crop conditioning.
    pub micro: MicroDraft,
}

impl RequestDraft {
    /// A draft of `operation` with every field omitted.
    pub fn new(operation: Operation) -> Self {
        RequestDraft {
            operation,
            prompt: None,
            negative_prompt: None,
            prompt_syntax: PromptSyntax::Plain,
            width: None,
            height: None,
            steps: None,
            guidance_scale: None,
            seed: None,
            sampler: None,
            schedule: None,
            scheduler: None,
            eta: None,
            s_noise: None,
            batch: None,
            max_sequence_length: None,
            init_image: None,
            mask_image: None,
            mask_rule: MaskRule::White,
            strength: None,
            preview_every: None,
            preview: None,
            hive_id: None,
            worker_id: None,
            model: None,
            loras: Vec::new(),
            micro: MicroDraft::default(),
        }
    }
}
