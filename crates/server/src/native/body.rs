//! The typed body of `POST /v1/jobs`. The reader in [`super`] builds these values field by
//! field; their `ToSchema` derives are the request schemas of the OpenAPI document; and each
//! becomes the engine's [`RequestDraft`].

use sd_engine::request::{
    ImageBytes, LoraDraft, MicroDraft, Operation, PreviewKind, PromptSyntax, RequestDraft,
};
use utoipa::ToSchema;

/// The body of `POST /v1/jobs`: one of three operations, told apart by `operation`.
#[derive(Debug, ToSchema)]
#[serde(untagged)]
#[schema(discriminator = "operation")]
pub enum JobBody {
    Generation(ImageGeneration),
    Transform(ImageTransform),
    Inpaint(ImageInpaint),
}

#[derive(Debug, Clone, Copy, ToSchema)]
pub enum GenerationOperation {
    #[serde(rename = "image_generation")]
    ImageGeneration,
}

#[derive(Debug, Clone, Copy, ToSchema)]
pub enum TransformOperation {
    #[serde(rename = "image_transform")]
    ImageTransform,
}

#[derive(Debug, Clone, Copy, ToSchema)]
pub enum InpaintOperation {
    #[serde(rename = "image_inpaint")]
    ImageInpaint,
}

/// Text-to-image. Unknown fields are refused; `null` counts as omitted.
#[derive(Debug, ToSchema)]
pub struct ImageGeneration {
    /// See ImageTransform and ImageInpaint for the other operations.
    #[schema(inline)]
    pub operation: GenerationOperation,
    #[serde(flatten)]
    pub fields: JobFields,
}

/// Image-to-image (diffusers' StableDiffusionImg2ImgPipeline, or FluxImg2ImgPipeline for FLUX
/// models): every field of ImageGeneration plus the ones here. Stable Diffusion: width/height
/// default to the input's size rounded down to the latent factor; FLUX: to the model's size.
/// The input is resized to width x height with Pillow's Lanczos.
#[derive(Debug, ToSchema)]
pub struct ImageTransform {
    #[schema(inline)]
    pub operation: TransformOperation,
    /// Base64 PNG, JPEG or WebP, or a data: URL. Grayscale is expanded to RGB, alpha dropped.
    /// At most --max-input-pixels (checked from the header).
    #[schema(value_type = String, required = true)]
    pub input_image: Option<Vec<u8>>,
    /// Share of the steps that run. Stable Diffusion: default 0.8, int(steps x strength) steps
    /// run and must be at least 1. FLUX: default 0.6, the run starts at
    /// int(steps - min(steps x strength, steps)).
    #[schema(exclusive_minimum = 0, maximum = 1, default = 0.8)]
    pub strength: Option<f64>,
    #[serde(flatten)]
    pub fields: JobFields,
}

/// Inpainting (diffusers' StableDiffusionInpaintPipeline): a 9-channel inpainting UNet, or a
/// regular UNet blending the unmasked region back after each step (see /v1/info
/// capabilities.inpaint_method). Every field of ImageGeneration plus the ones here.
/// width/height default to the model's size, as in diffusers; image and mask are resized to it.
#[derive(Debug, ToSchema)]
pub struct ImageInpaint {
    #[schema(inline)]
    pub operation: InpaintOperation,
    /// Base64 PNG, JPEG or WebP, or a data: URL.
    #[schema(value_type = String, required = true)]
    pub init_image: Option<Vec<u8>>,
    /// Base64 image of any size (resized to the output size: Lanczos, nearest for palette and
    /// 1-bit PNGs); converted to luma after resizing; luma >= 128 (white) is repainted. Alpha
    /// is dropped.
    #[schema(value_type = String, required = true)]
    pub mask_image: Option<Vec<u8>>,
    #[schema(exclusive_minimum = 0, maximum = 1, default = 1.0)]
    pub strength: Option<f64>,
    #[serde(flatten)]
    pub fields: JobFields,
}

/// The fields every operation takes.
#[derive(Debug, ToSchema)]
pub struct JobFields {
    /// Not empty; truncated to the text encoder's tokens (77 for CLIP) as in diffusers.
    #[schema(value_type = String, required = true, min_length = 1, max_length = 20000)]
    pub prompt: Option<String>,
    /// Default: the empty prompt. Used when guidance_scale > 1; refused for FLUX.
    #[schema(max_length = 20000)]
    pub negative_prompt: Option<String>,
    /// `plain` (default): the prompts as they are, truncated to 77 tokens, as diffusers.
    /// `a1111`: AUTOMATIC1111's syntax: `(word)` / `[word]` / `(word:1.3)` weights, `BREAK`,
    /// and prompts of any length in 75-token chunks. Stable Diffusion models only.
    #[schema(value_type = Option<String>, example = "a1111")]
    pub prompt_syntax: PromptSyntax,
    /// Multiple of the latent factor (GET /v1/info); default the model's size; width x height
    /// at most --max-pixels.
    #[schema(minimum = 1, maximum = 8192)]
    pub width: Option<u64>,
    #[schema(minimum = 1, maximum = 8192)]
    pub height: Option<u64>,
    /// At most --max-steps and the scheduler's num_train_timesteps. Default 50; FLUX dev 28,
    /// FLUX schnell 4.
    #[schema(minimum = 1, default = 50)]
    pub steps: Option<u64>,
    /// Stable Diffusion: classifier-free guidance (default 7.5). FLUX dev: the embedded
    /// guidance (default 3.5); refused for FLUX schnell.
    #[schema(minimum = 0, maximum = 100, default = 7.5)]
    pub guidance_scale: Option<f64>,
    /// Seed of the torch-compatible CPU generator; omitted, null or -1: random (reported in
    /// the status and the complete event).
    #[schema(value_type = Option<i64>, minimum = -1)]
    pub seed: Option<u64>,
    /// The sampler (update rule), by our name, A1111's or an alias (GET /v1/samplers); a
    /// combined name such as "DPM++ 2M Karras" also sets the schedule. Default: the model's
    /// own scheduler class. Refused for FLUX (flow-matching Euler).
    pub sampler: Option<String>,
    /// The sigma / timestep schedule (GET /v1/schedules): `model` (default: the model's own),
    /// `karras`, `exponential`, `beta`, `sgm-uniform`, `simple`, `normal`. A sampler that the
    /// reference does not define on the schedule is refused.
    pub schedule: Option<String>,
    /// The field of earlier versions: the same as `sampler` (give one of the two).
    pub scheduler: Option<String>,
    /// DDIM and TCD only: the share of fresh noise per step, as diffusers' pipelines' `eta`
    /// (DDIM: 0 deterministic, 1 DDPM-like; TCD: its gamma). Refused for other samplers.
    #[schema(minimum = 0, maximum = 1, default = 0)]
    pub eta: Option<f64>,
    /// `dpmpp-sde` and `dpmpp-2s-a` only: the scale of their fresh noise (k-diffusion's and
    /// diffusers' step `s_noise`). Refused for other samplers.
    #[schema(minimum = 0, maximum = 2, default = 1)]
    pub s_noise: Option<f64>,
    /// At most --max-batch.
    #[schema(minimum = 1, default = 1)]
    pub batch: Option<u64>,
    /// A preview event every this many steps, none on the last step; 0: none.
    #[schema(minimum = 0, default = 5)]
    pub preview_every: Option<u64>,
    /// approx: latent-to-RGB map at latent resolution; full: VAE decode.
    #[schema(default = "approx")]
    pub preview: Option<PreviewKind>,
    /// Recorded on the job and shown in its status.
    #[schema(max_length = 256)]
    pub hive_id: Option<String>,
    /// Recorded on the job and shown in its status.
    #[schema(max_length = 256)]
    pub worker_id: Option<String>,
    /// LoRA adapters for this job only (needs --lora-dir). Kohya (lora_unet_/lora_te_, .alpha,
    /// LoCon), diffusers/PEFT (lora_A/lora_B, scale from lora_adapter_metadata) and, for FLUX,
    /// kohya and original-name layouts; UNet/transformer and CLIP text encoder. The base
    /// weights are never changed.
    #[serde(default)]
    #[schema(max_items = 8)]
    pub loras: Vec<LoraEntry>,
    /// When given, must name the loaded model (folder name, path, or hub repo id of a Hugging
    /// Face cache snapshot).
    pub model: Option<String>,
    /// FLUX models only: T5 prompt tokens (default 512 dev, 256 schnell); a 422 for Stable
    /// Diffusion models.
    #[schema(minimum = 2, maximum = 512)]
    pub max_sequence_length: Option<u64>,
    /// SDXL only: the `original_size` id, [height, width] in pixels (default: the image
    /// size), each 1 to 16384. As diffusers' argument of the same name.
    #[schema(value_type = Option<Vec<u64>>, min_items = 2, max_items = 2, example = json!([1024, 1024]))]
    pub original_size: Option<[u64; 2]>,
    /// SDXL only: [top, left] in pixels (default [0, 0]), each 0 to 16384.
    #[schema(value_type = Option<Vec<u64>>, min_items = 2, max_items = 2)]
    pub crops_coords_top_left: Option<[u64; 2]>,
    /// SDXL only: [height, width] (default: the image size).
    #[schema(value_type = Option<Vec<u64>>, min_items = 2, max_items = 2)]
    pub target_size: Option<[u64; 2]>,
    /// SDXL only: the ids of the unconditional half. Without any negative_ field they equal
    /// the positive ids; a missing one takes its positive counterpart (the negative crop
    /// defaults to [0, 0] for image_generation, to crops_coords_top_left otherwise).
    #[schema(value_type = Option<Vec<u64>>, min_items = 2, max_items = 2)]
    pub negative_original_size: Option<[u64; 2]>,
    #[schema(value_type = Option<Vec<u64>>, min_items = 2, max_items = 2)]
    pub negative_crops_coords_top_left: Option<[u64; 2]>,
    #[schema(value_type = Option<Vec<u64>>, min_items = 2, max_items = 2)]
    pub negative_target_size: Option<[u64; 2]>,
    /// SDXL refiner-style models only (requires_aesthetics_score); refused with a 422 by every
    /// model this worker loads.
    pub aesthetic_score: Option<f64>,
    /// As aesthetic_score.
    pub negative_aesthetic_score: Option<f64>,
}

/// One LoRA of a job.
#[derive(Debug, ToSchema)]
pub struct LoraEntry {
    /// A .safetensors file inside --lora-dir (relative, no `..`; `.safetensors` may be left
    /// out). Symbolic links must stay inside the folder.
    #[schema(max_length = 1024)]
    pub path: String,
    /// Multiplies the adapter (alpha / rank from the file).
    #[schema(minimum = -10, maximum = 10, default = 1.0)]
    pub strength: Option<f64>,
    /// true: keys that match no layer (or do not fit it) fail the job, listed in its error.
    /// false: the rest applies and the complete event lists them in `warnings`.
    #[schema(default = true)]
    pub strict: Option<bool>,
}

impl From<JobBody> for RequestDraft {
    fn from(body: JobBody) -> Self {
        let image = |field: &str, bytes: Option<Vec<u8>>| {
            bytes.map(|bytes| ImageBytes {
                field: field.to_string(),
                bytes,
            })
        };
        let (operation, fields, init_image, mask_image, strength) = match body {
            JobBody::Generation(g) => (Operation::from(g.operation), g.fields, None, None, None),
            JobBody::Transform(t) => (
                Operation::from(t.operation),
                t.fields,
                image("input_image", t.input_image),
                None,
                t.strength,
            ),
            JobBody::Inpaint(i) => (
                Operation::from(i.operation),
                i.fields,
                image("init_image", i.init_image),
                image("mask_image", i.mask_image),
                i.strength,
            ),
        };
        let mut d = RequestDraft::new(operation);
        d.init_image = init_image;
        d.mask_image = mask_image;
        d.strength = strength;
        d.prompt = fields.prompt;
        d.negative_prompt = fields.negative_prompt;
        d.prompt_syntax = fields.prompt_syntax;
        d.width = fields.width;
        d.height = fields.height;
        d.steps = fields.steps;
        d.guidance_scale = fields.guidance_scale;
        d.seed = fields.seed;
        d.sampler = fields.sampler;
        d.schedule = fields.schedule;
        d.scheduler = fields.scheduler;
        d.eta = fields.eta;
        d.s_noise = fields.s_noise;
        d.batch = fields.batch;
        d.preview_every = fields.preview_every;
        d.preview = fields.preview;
        d.hive_id = fields.hive_id;
        d.worker_id = fields.worker_id;
        d.model = fields.model;
        d.max_sequence_length = fields.max_sequence_length;
        d.micro = MicroDraft {
            original_size: fields.original_size,
            crops_coords_top_left: fields.crops_coords_top_left,
            target_size: fields.target_size,
            negative_original_size: fields.negative_original_size,
            negative_crops_coords_top_left: fields.negative_crops_coords_top_left,
            negative_target_size: fields.negative_target_size,
            aesthetic_score: fields.aesthetic_score,
            negative_aesthetic_score: fields.negative_aesthetic_score,
        };
        d.loras = fields
            .loras
            .into_iter()
            .map(|l| LoraDraft {
                path: l.path,
                strength: l.strength,
                strict: l.strict,
            })
            .collect();
        d
    }
}

impl From<GenerationOperation> for Operation {
    fn from(_: GenerationOperation) -> Self {
        Operation::Generation
    }
}

impl From<TransformOperation> for Operation {
    fn from(_: TransformOperation) -> Self {
        Operation::Transform
    }
}

impl From<InpaintOperation> for Operation {
    fn from(_: InpaintOperation) -> Self {
        Operation::Inpaint
    }
}
