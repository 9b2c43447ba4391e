//! The native job API's wire format: the JSON body of `POST /v1/jobs`. It is read field by field
//! (so that every type error names its field and the value it got) into the typed [`JobBody`],
//! whose types also generate the request schemas of the OpenAPI document, and then becomes the
//! engine's [`RequestDraft`]. Limits and defaults are the engine's ([`sd_engine::validate`]);
//! the limits written into the schema attributes below are checked against them by tests.

use serde_json::{Map, Value};

use sd_engine::images::input::decode_base64;
use sd_engine::request::{ImageBytes, LoraDraft, Operation, PreviewKind, RequestDraft};
use sd_engine::{GenerationRequest, InvalidField, Limits, ModelSpec};
use utoipa::ToSchema;

/// The fields every operation takes.
pub const FIELDS: [&str; 17] = [
    "loras",
    "max_sequence_length",
    "operation",
    "prompt",
    "negative_prompt",
    "width",
    "height",
    "steps",
    "guidance_scale",
    "seed",
    "scheduler",
    "batch",
    "preview_every",
    "preview",
    "hive_id",
    "model",
    "worker_id",
];
/// The fields `image_transform` adds.
pub const TRANSFORM_FIELDS: [&str; 2] = ["input_image", "strength"];
/// The fields `image_inpaint` adds.
pub const INPAINT_FIELDS: [&str; 3] = ["init_image", "mask_image", "strength"];
/// The fields of one `loras` entry.
pub const LORA_FIELDS: [&str; 3] = ["path", "strength", "strict"];

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
    /// Default: the model's own scheduler. One of GET /v1/info `schedulers`; refused for FLUX
    /// (flow-matching Euler).
    pub scheduler: Option<String>,
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
        d.width = fields.width;
        d.height = fields.height;
        d.steps = fields.steps;
        d.guidance_scale = fields.guidance_scale;
        d.seed = fields.seed;
        d.scheduler = fields.scheduler;
        d.batch = fields.batch;
        d.preview_every = fields.preview_every;
        d.preview = fields.preview;
        d.hive_id = fields.hive_id;
        d.worker_id = fields.worker_id;
        d.model = fields.model;
        d.max_sequence_length = fields.max_sequence_length;
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

/// A request the worker refuses. `malformed` marks JSON that does not parse (400);
/// everything else is a bad field (422).
#[derive(Debug, Clone, PartialEq)]
pub struct RequestError {
    pub malformed: bool,
    pub message: String,
}

impl From<InvalidField> for RequestError {
    fn from(e: InvalidField) -> Self {
        RequestError {
            malformed: false,
            message: e.message(),
        }
    }
}

type Result<T> = std::result::Result<T, RequestError>;

fn invalid(field: &str, reason: impl std::fmt::Display) -> RequestError {
    InvalidField::new(field, reason).into()
}

fn describe(v: &Value) -> String {
    let s = v.to_string();
    if s.chars().count() > 60 {
        let cut: String = s.chars().take(60).collect();
        format!("{cut}...")
    } else {
        s
    }
}

/// The value of an optional field; JSON `null` counts as omitted.
fn field<'a>(obj: &'a Map<String, Value>, name: &str) -> Option<&'a Value> {
    obj.get(name).filter(|v| !v.is_null())
}

fn uint(obj: &Map<String, Value>, name: &str) -> Result<Option<u64>> {
    match field(obj, name) {
        None => Ok(None),
        Some(v) => v.as_u64().map(Some).ok_or_else(|| {
            invalid(
                name,
                format!("must be a non-negative integer, got {}", describe(v)),
            )
        }),
    }
}

fn number(obj: &Map<String, Value>, name: &str) -> Result<Option<f64>> {
    match field(obj, name) {
        None => Ok(None),
        Some(v) => v
            .as_f64()
            .map(Some)
            .ok_or_else(|| invalid(name, format!("must be a number, got {}", describe(v)))),
    }
}

fn string(obj: &Map<String, Value>, name: &str) -> Result<Option<String>> {
    match field(obj, name) {
        None => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(v) => Err(invalid(
            name,
            format!("must be a string, got {}", describe(v)),
        )),
    }
}

/// The bytes of the base64 field `name`, if given.
fn base64_image(obj: &Map<String, Value>, name: &str) -> Result<Option<Vec<u8>>> {
    match field(obj, name) {
        None => Ok(None),
        Some(Value::String(s)) => decode_base64(s).map(Some).map_err(|e| invalid(name, e)),
        Some(v) => Err(invalid(
            name,
            format!("must be a base64 string, got {}", describe(v)),
        )),
    }
}

/// Parses the JSON text of a job submission.
pub fn parse_json(body: &[u8]) -> Result<Value> {
    serde_json::from_slice(body).map_err(|e| RequestError {
        malformed: true,
        message: format!("the body is not valid JSON: {e}"),
    })
}

/// Reads a submission, then validates it against the loaded model and the worker's limits.
/// `random_seed` is used when the request has no seed (or seed -1).
pub fn parse_job(
    body: &Value,
    spec: &ModelSpec,
    limits: &Limits,
    random_seed: u64,
) -> Result<GenerationRequest> {
    let draft = read_draft(body)?;
    Ok(sd_engine::validate(draft, spec, limits, random_seed)?)
}

fn operation(obj: &Map<String, Value>) -> Result<Operation> {
    let name = match field(obj, "operation") {
        None => {
            return Err(invalid(
                "operation",
                "is required: \"image_generation\", \"image_transform\" or \"image_inpaint\"",
            ))
        }
        Some(Value::String(s)) => s.as_str(),
        Some(v) => {
            return Err(invalid(
                "operation",
                format!("must be a string, got {}", describe(v)),
            ))
        }
    };
    Operation::from_name(name).ok_or_else(|| {
        let all: Vec<&str> = Operation::ALL.iter().map(|o| o.name()).collect();
        invalid(
            "operation",
            format!(
                "unknown operation {name:?}; expected one of {}",
                all.join(", ")
            ),
        )
    })
}

/// The draft of a submission: each field of the right JSON type, no unknown fields.
pub fn read_draft(body: &Value) -> Result<RequestDraft> {
    read_body(body).map(RequestDraft::from)
}

/// The typed body of a submission.
pub fn read_body(body: &Value) -> Result<JobBody> {
    let Value::Object(obj) = body else {
        return Err(RequestError {
            malformed: false,
            message: format!("the body must be a JSON object, got {}", describe(body)),
        });
    };
    let op = operation(obj)?;
    let extra: &[&str] = match op {
        Operation::Generation => &[],
        Operation::Transform => &TRANSFORM_FIELDS,
        Operation::Inpaint => &INPAINT_FIELDS,
    };
    if let Some(unknown) = obj
        .keys()
        .find(|k| !FIELDS.contains(&k.as_str()) && !extra.contains(&k.as_str()))
    {
        let all: Vec<&str> = FIELDS.iter().chain(extra).copied().collect();
        return Err(invalid(
            unknown,
            format!(
                "unknown field; the fields of {} are {}",
                op.name(),
                all.join(", ")
            ),
        ));
    }
    Ok(match op {
        Operation::Generation => JobBody::Generation(ImageGeneration {
            operation: GenerationOperation::ImageGeneration,
            fields: read_fields(obj)?,
        }),
        Operation::Transform => {
            let input_image = base64_image(obj, "input_image")?;
            JobBody::Transform(ImageTransform {
                operation: TransformOperation::ImageTransform,
                input_image,
                fields: read_fields(obj)?,
                strength: number(obj, "strength")?,
            })
        }
        Operation::Inpaint => {
            let init_image = base64_image(obj, "init_image")?;
            let mask_image = base64_image(obj, "mask_image")?;
            JobBody::Inpaint(ImageInpaint {
                operation: InpaintOperation::ImageInpaint,
                init_image,
                mask_image,
                fields: read_fields(obj)?,
                strength: number(obj, "strength")?,
            })
        }
    })
}

/// The fields every operation takes.
fn read_fields(obj: &Map<String, Value>) -> Result<JobFields> {
    let model = string(obj, "model")?;
    let prompt = string(obj, "prompt")?;
    let negative_prompt = string(obj, "negative_prompt")?;
    let max_sequence_length = uint(obj, "max_sequence_length")?;
    let width = uint(obj, "width")?;
    let height = uint(obj, "height")?;
    let steps = uint(obj, "steps")?;
    let guidance_scale = number(obj, "guidance_scale")?;
    let seed = seed(obj)?;
    let scheduler = string(obj, "scheduler")?;
    let batch = uint(obj, "batch")?;
    let preview_every = uint(obj, "preview_every")?;
    let preview = match field(obj, "preview") {
        None => None,
        Some(v) => Some(v.as_str().and_then(PreviewKind::from_name).ok_or_else(|| {
            invalid(
                "preview",
                format!("must be \"approx\" or \"full\", got {}", describe(v)),
            )
        })?),
    };
    Ok(JobFields {
        prompt,
        negative_prompt,
        width,
        height,
        steps,
        guidance_scale,
        seed,
        scheduler,
        batch,
        preview_every,
        preview,
        hive_id: string(obj, "hive_id")?,
        worker_id: string(obj, "worker_id")?,
        loras: loras(obj)?,
        model,
        max_sequence_length,
    })
}

/// `seed`: an integer, or -1 (or omitted) for a random one.
fn seed(obj: &Map<String, Value>) -> Result<Option<u64>> {
    match field(obj, "seed") {
        None => Ok(None),
        Some(v) if v.as_i64() == Some(-1) => Ok(None),
        Some(v) => v.as_u64().map(Some).ok_or_else(|| {
            invalid(
                "seed",
                format!(
                    "must be an integer from 0 to {} (or -1 for a random seed), got {}",
                    u64::MAX,
                    describe(v)
                ),
            )
        }),
    }
}

/// The `loras` field: `[{"path": name inside --lora-dir, "strength": 1.0, "strict": true}]`.
fn loras(obj: &Map<String, Value>) -> Result<Vec<LoraEntry>> {
    let list = match field(obj, "loras") {
        None => return Ok(Vec::new()),
        Some(Value::Array(list)) => list,
        Some(v) => {
            return Err(invalid(
                "loras",
                format!(
                    "must be a list of {{\"path\", \"strength\", \"strict\"}} objects, got {}",
                    describe(v)
                ),
            ))
        }
    };
    let max = sd_models::lora::MAX_STRENGTH;
    let mut out = Vec::with_capacity(list.len());
    for (i, entry) in list.iter().enumerate() {
        let name = |f: &str| format!("loras[{i}].{f}");
        let Value::Object(e) = entry else {
            return Err(invalid(
                &format!("loras[{i}]"),
                format!(
                    "must be an object with \"path\" and optional \"strength\", \"strict\", got {}",
                    describe(entry)
                ),
            ));
        };
        if let Some(k) = e.keys().find(|k| !LORA_FIELDS.contains(&k.as_str())) {
            return Err(invalid(
                &name(k),
                format!("unknown field; a LoRA has {}", LORA_FIELDS.join(", ")),
            ));
        }
        let path = match field(e, "path") {
            Some(Value::String(p)) => p.clone(),
            None => {
                return Err(invalid(
                    &name("path"),
                    "is required: a file name inside the worker's LoRA folder",
                ))
            }
            Some(v) => {
                return Err(invalid(
                    &name("path"),
                    format!("must be a string, got {}", describe(v)),
                ))
            }
        };
        let strength = match field(e, "strength") {
            None => None,
            Some(v) => Some(v.as_f64().ok_or_else(|| {
                invalid(
                    &name("strength"),
                    format!(
                        "must be a number between -{max} and {max}, got {}",
                        describe(v)
                    ),
                )
            })?),
        };
        let strict = match field(e, "strict") {
            None => None,
            Some(Value::Bool(b)) => Some(*b),
            Some(v) => {
                return Err(invalid(
                    &name("strict"),
                    format!("must be true or false, got {}", describe(v)),
                ))
            }
        };
        out.push(LoraEntry {
            path,
            strength,
            strict,
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use sd_engine::validate::{hub_repo_id, names_model};
    use sd_models::samplers::{SamplerKind, SchedulerConfig};
    use serde_json::json;
    use std::path::Path;

    fn spec() -> ModelSpec {
        ModelSpec {
            name: "tiny".into(),
            path: "/models/tiny".into(),
            repo_id: Some("org/tiny".into()),
            family: "sd1".into(),
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
        }
    }

    fn limits() -> Limits {
        Limits {
            max_pixels: 1024 * 1024,
            max_input_pixels: 4096 * 4096,
            max_steps: 150,
            max_batch: 8,
            loras: sd_engine::validate::LoraFiles::Refused,
            from_flags: true,
            empty_prompt: false,
        }
    }

    fn parse(v: Value) -> Result<GenerationRequest> {
        parse_job(&v, &spec(), &limits(), 7)
    }

    fn err(v: Value) -> String {
        let e = parse(v).unwrap_err();
        assert!(!e.malformed);
        e.message
    }

    #[test]
    fn defaults_come_from_the_model() {
        let r = parse(json!({"operation": "image_generation", "prompt": "a cat"})).unwrap();
        let p = &r.params;
        assert_eq!((p.width, p.height, p.steps, p.batch), (512, 512, 50, 1));
        assert_eq!(p.guidance, 7.5);
        assert_eq!(p.seed, 7);
        assert_eq!(p.sampler, SamplerKind::Pndm);
        assert_eq!(r.preview_every, 5);
        assert_eq!(r.preview, PreviewKind::Approx);
        let r = parse(
            json!({"operation": "image_generation", "prompt": "a", "seed": -1, "width": null}),
        )
        .unwrap();
        assert_eq!((r.params.seed, r.params.width), (7, 512));
    }

    #[test]
    fn every_field_is_read() {
        let r = parse(json!({
            "operation": "image_generation", "prompt": "a", "negative_prompt": "b",
            "width": 256, "height": 128, "steps": 20, "guidance_scale": 3, "seed": 42,
            "scheduler": "euler-a", "batch": 2, "preview_every": 0, "preview": "full",
            "hive_id": "h", "worker_id": "w", "model": "tiny"
        }))
        .unwrap();
        let p = &r.params;
        assert_eq!(p.negative_prompt.as_deref(), Some("b"));
        assert_eq!(
            (p.width, p.height, p.steps, p.batch, p.seed),
            (256, 128, 20, 2, 42)
        );
        assert_eq!(p.guidance, 3.0);
        assert_eq!(p.sampler, SamplerKind::EulerAncestral);
        assert_eq!((r.preview_every, r.preview), (0, PreviewKind::Full));
        assert_eq!(
            (r.hive_id.as_deref(), r.worker_id.as_deref()),
            (Some("h"), Some("w"))
        );
    }

    #[test]
    fn errors_name_the_field_the_limit_and_the_value() {
        let base = |extra: Value| {
            let mut v = json!({"operation": "image_generation", "prompt": "a"});
            for (k, x) in extra.as_object().unwrap() {
                v[k] = x.clone();
            }
            v
        };
        let cases = [
            (json!({"width": 100}), ["`width`", "multiple of 8", "100"]),
            (
                json!({"width": 2048, "height": 2048}),
                ["`width`", "1048576", "4194304"],
            ),
            (json!({"steps": 0}), ["`steps`", "150", "0"]),
            (json!({"steps": 151}), ["`steps`", "150", "151"]),
            (
                json!({"guidance_scale": 101}),
                ["`guidance_scale`", "100", "101"],
            ),
            (json!({"batch": 9}), ["`batch`", "8", "9"]),
            (json!({"scheduler": "lms"}), ["`scheduler`", "euler", "lms"]),
            (json!({"prompt": "  "}), ["`prompt`", "empty", ""]),
            (json!({"foo": 1}), ["`foo`", "unknown field", "prompt"]),
            (json!({"width": "512"}), ["`width`", "integer", "\"512\""]),
            (json!({"seed": 1.5}), ["`seed`", "integer", "1.5"]),
            (json!({"model": "other"}), ["`model`", "tiny", "other"]),
            (json!({"preview": "vae"}), ["`preview`", "full", "vae"]),
            (
                json!({"operation": "image_inpaint"}),
                ["`init_image`", "required", "base64"],
            ),
            (
                json!({"operation": "paint"}),
                ["`operation`", "image_generation", "paint"],
            ),
        ];
        for (extra, needles) in cases {
            let message = err(base(extra.clone()));
            for n in needles {
                assert!(message.contains(n), "{extra}: {message:?} lacks {n:?}");
            }
        }
        assert!(err(json!({"prompt": "a"})).contains("`operation`"));
        assert!(err(json!({"operation": "image_generation"})).contains("`prompt`"));
        assert!(err(json!([1])).contains("JSON object"));
        assert!(parse_json(b"{").unwrap_err().malformed);
    }

    #[test]
    fn hub_cache_folders_have_a_repo_id() {
        let p = Path::new("/c/hub/models--runwayml--stable-diffusion-v1-5/snapshots/abc");
        assert_eq!(
            hub_repo_id(p).as_deref(),
            Some("runwayml/stable-diffusion-v1-5")
        );
        assert_eq!(hub_repo_id(Path::new("/models/tiny")), None);
    }

    #[test]
    fn what_the_sampler_refuses_is_refused_before_queueing() {
        let mut spec = spec();
        spec.scheduler.skip_prk_steps = false;
        let body = json!({"operation": "image_generation", "prompt": "a", "scheduler": "pndm", "steps": 3});
        let e = parse_job(&body, &spec, &limits(), 1).unwrap_err();
        assert!(
            e.message.contains("`steps`") && e.message.contains("at least 4"),
            "{}",
            e.message
        );
        let body = json!({"operation": "image_generation", "prompt": "a", "scheduler": "pndm", "steps": 4});
        assert!(parse_job(&body, &spec, &limits(), 1).is_ok());
    }

    #[test]
    fn the_model_is_named_by_folder_or_path() {
        assert!(names_model(&spec(), "tiny"));
        assert!(names_model(&spec(), "org/tiny"));
        assert!(names_model(&spec(), "/models/tiny"));
        assert!(!names_model(&spec(), "tiny2"));
    }
}
