//! Parsing and validation of `POST /v1/jobs` bodies.
//!
//! Fields are read one by one from the JSON object so that every error names its field, the
//! limit and the value it got.

use std::path::{Path, PathBuf};

use std::sync::Arc;

use sd_models::lora::LoraSpec;
use sd_models::pipelines::{GenerateParams, ImageInput, MaskImage, RgbImage, SdPipeline};
use sd_models::samplers::SamplerKind;
use serde_json::{Map, Value};

use crate::engine::{JobRequest, ModelSpec, Operation, PreviewKind};
use crate::input_image::{decode_base64, decode_mask, decode_rgb};

/// Per-worker request limits (from the command line).
#[derive(Debug, Clone)]
pub struct Limits {
    /// Width x height of one image at most.
    pub max_pixels: usize,
    /// Width x height of an input image at most (checked from its header).
    pub max_input_pixels: usize,
    pub max_steps: usize,
    pub max_batch: usize,
    /// The folder `loras` names resolve in (none: jobs take no LoRAs).
    pub lora_dir: Option<PathBuf>,
}

/// Defaults for omitted fields that the model does not define.
pub const DEFAULT_STEPS: usize = 50;
pub const DEFAULT_GUIDANCE: f64 = 7.5;
pub const DEFAULT_PREVIEW_EVERY: usize = 5;
/// Largest classifier-free guidance scale accepted.
pub const MAX_GUIDANCE: f64 = sd_models::pipelines::sd::MAX_GUIDANCE;
/// Largest image side in pixels.
pub const MAX_SIDE: usize = sd_models::pipelines::sd::MAX_SIDE;
/// Longest prompt, negative prompt or id string, in characters.
pub const MAX_TEXT_CHARS: usize = 20_000;
pub const MAX_ID_CHARS: usize = 256;

pub const OPERATIONS: [&str; 3] = ["image_generation", "image_transform", "image_inpaint"];

/// The fields `image_transform` adds.
const TRANSFORM_FIELDS: [&str; 2] = ["input_image", "strength"];
/// The fields `image_inpaint` adds.
const INPAINT_FIELDS: [&str; 3] = ["init_image", "mask_image", "strength"];
/// Default image-to-image strength.
pub const DEFAULT_TRANSFORM_STRENGTH: f64 = 0.8;
/// Default inpainting strength.
pub const DEFAULT_INPAINT_STRENGTH: f64 = 1.0;

const FIELDS: [&str; 17] = [
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

/// A request the worker refuses. `malformed` marks JSON that does not parse (400);
/// everything else is a bad field (422).
#[derive(Debug, Clone, PartialEq)]
pub struct RequestError {
    pub malformed: bool,
    pub message: String,
}

fn invalid(field: &str, message: impl std::fmt::Display) -> RequestError {
    RequestError {
        malformed: false,
        message: format!("invalid `{field}`: {message}"),
    }
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

fn uint(obj: &Map<String, Value>, name: &str) -> Result<Option<u64>, RequestError> {
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

fn text(obj: &Map<String, Value>, name: &str, max: usize) -> Result<Option<String>, RequestError> {
    match field(obj, name) {
        None => Ok(None),
        Some(Value::String(s)) => {
            let n = s.chars().count();
            if n > max {
                return Err(invalid(
                    name,
                    format!("must be at most {max} characters, got {n}"),
                ));
            }
            Ok(Some(s.clone()))
        }
        Some(v) => Err(invalid(
            name,
            format!("must be a string, got {}", describe(v)),
        )),
    }
}

/// LoRAs one job may apply at most.
pub const MAX_LORAS: usize = 8;
/// Longest LoRA path, in characters.
pub const MAX_LORA_PATH_CHARS: usize = 1024;
/// The fields of one `loras` entry.
const LORA_FIELDS: [&str; 3] = ["path", "strength", "strict"];

/// The `loras` field: `[{"path": name inside --lora-dir, "strength": 1.0, "strict": true}]`.
/// Names are resolved (and must exist) here; the files are read when the job runs.
fn loras(obj: &Map<String, Value>, limits: &Limits) -> Result<Vec<LoraSpec>, RequestError> {
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
    if list.is_empty() {
        return Ok(Vec::new());
    }
    let Some(dir) = &limits.lora_dir else {
        return Err(invalid(
            "loras",
            "this worker takes no LoRAs (start it with --lora-dir DIR)",
        ));
    };
    if list.len() > MAX_LORAS {
        return Err(invalid(
            "loras",
            format!("at most {MAX_LORAS} LoRAs per job, got {}", list.len()),
        ));
    }
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
            Some(Value::String(p)) if p.chars().count() <= MAX_LORA_PATH_CHARS => p.clone(),
            Some(Value::String(p)) => {
                return Err(invalid(
                    &name("path"),
                    format!(
                        "must be at most {MAX_LORA_PATH_CHARS} characters, got {}",
                        p.chars().count()
                    ),
                ))
            }
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
            None => 1.0,
            Some(v) => match v.as_f64() {
                Some(s) if s.abs() <= sd_models::lora::MAX_STRENGTH => s,
                _ => {
                    return Err(invalid(
                        &name("strength"),
                        format!(
                            "must be a number between -{m} and {m}, got {}",
                            describe(v),
                            m = sd_models::lora::MAX_STRENGTH
                        ),
                    ))
                }
            },
        };
        let strict = match field(e, "strict") {
            None => true,
            Some(Value::Bool(b)) => *b,
            Some(v) => {
                return Err(invalid(
                    &name("strict"),
                    format!("must be true or false, got {}", describe(v)),
                ))
            }
        };
        let resolved = sd_models::lora::resolve(dir, &path).map_err(|e| match e {
            sd_models::Error::Invalid { message, .. } => invalid(&name("path"), message),
            other => invalid(&name("path"), other),
        })?;
        out.push(LoraSpec {
            name: path,
            path: resolved,
            strength,
            strict,
        });
    }
    Ok(out)
}

/// Steps when the request has none: the model's default (50 for Stable Diffusion, 28 for
/// FLUX dev, 4 for schnell), or the worker's limit when that is lower.
pub fn default_steps(spec: &ModelSpec, limits: &Limits) -> usize {
    spec.default_steps
        .min(limits.max_steps)
        .min(spec.num_train_timesteps)
}

/// The bytes of the required base64 field `name`; `what` says what it must hold.
fn base64_field(obj: &Map<String, Value>, name: &str, what: &str) -> Result<Vec<u8>, RequestError> {
    match field(obj, name) {
        None => Err(invalid(name, format!("is required ({what})"))),
        Some(Value::String(s)) => decode_base64(s).map_err(|e| invalid(name, e)),
        Some(v) => Err(invalid(
            name,
            format!("must be a base64 string, got {}", describe(v)),
        )),
    }
}

/// Decodes the base64 image of `name` (required).
fn input_image(
    obj: &Map<String, Value>,
    name: &str,
    limits: &Limits,
) -> Result<RgbImage, RequestError> {
    let bytes = base64_field(obj, name, "a base64 PNG, JPEG or WebP, or a data: URL")?;
    decode_rgb(&bytes, limits.max_input_pixels, MAX_SIDE).map_err(|e| invalid(name, e))
}

/// Decodes the base64 mask of `name` (required).
fn mask_image(
    obj: &Map<String, Value>,
    name: &str,
    limits: &Limits,
) -> Result<MaskImage, RequestError> {
    let bytes = base64_field(
        obj,
        name,
        "a base64 PNG, JPEG or WebP, or a data: URL; white = repaint",
    )?;
    decode_mask(&bytes, limits.max_input_pixels, MAX_SIDE).map_err(|e| invalid(name, e))
}

/// Parses the JSON text of a job submission.
pub fn parse_json(body: &[u8]) -> Result<Value, RequestError> {
    serde_json::from_slice(body).map_err(|e| RequestError {
        malformed: true,
        message: format!("the body is not valid JSON: {e}"),
    })
}

/// The hub repo id of a folder inside a Hugging Face cache
/// (`.../models--org--name/snapshots/REV`), if it is one.
pub fn hub_repo_id(path: &Path) -> Option<String> {
    let path = std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf());
    path.ancestors().find_map(|dir| {
        let name = dir.file_name()?.to_str()?;
        let rest = name.strip_prefix("models--")?;
        let parts: Vec<&str> = rest.split("--").collect();
        (!parts.iter().any(|p| p.is_empty())).then(|| parts.join("/"))
    })
}

/// Whether `given` names the loaded model: its hub repo id, its folder name, the path it was
/// loaded from, or that path made canonical.
pub fn names_model(spec: &ModelSpec, given: &str) -> bool {
    if given == spec.name || Path::new(given) == spec.path || spec.repo_id.as_deref() == Some(given)
    {
        return true;
    }
    match (
        std::fs::canonicalize(given),
        std::fs::canonicalize(&spec.path),
    ) {
        (Ok(a), Ok(b)) => a == b,
        _ => false,
    }
}

/// Validates a submission against the loaded model and the worker's limits, filling in
/// defaults. `random_seed` is used when the request has no seed (or seed -1).
pub fn parse_job(
    body: &Value,
    spec: &ModelSpec,
    limits: &Limits,
    random_seed: u64,
) -> Result<JobRequest, RequestError> {
    let Value::Object(obj) = body else {
        return Err(RequestError {
            malformed: false,
            message: format!("the body must be a JSON object, got {}", describe(body)),
        });
    };
    let operation = match field(obj, "operation") {
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
    let op = match operation {
        "image_generation" => Operation::Generation,
        "image_transform" => Operation::Transform,
        "image_inpaint" => Operation::Inpaint,
        other => {
            return Err(invalid(
                "operation",
                format!(
                    "unknown operation {other:?}; expected one of {}",
                    OPERATIONS.join(", ")
                ),
            ))
        }
    };
    if spec.flux && op == Operation::Inpaint {
        return Err(invalid(
            "operation",
            format!(
                "this worker's model ({}) is FLUX: it runs \"image_generation\" and \"image_transform\" (FLUX inpainting is not supported yet), got \"{operation}\"",
                spec.name
            ),
        ));
    }
    if spec.inpainting_model && op != Operation::Inpaint {
        return Err(invalid(
            "operation",
            format!(
                "this worker's model ({}) is an inpainting model: it runs \"image_inpaint\" only, got \"{operation}\"",
                spec.name
            ),
        ));
    }
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
                "unknown field; the fields of {operation} are {}",
                all.join(", ")
            ),
        ));
    }
    let (input, mask) = match op {
        Operation::Generation => (None, None),
        Operation::Transform => (Some(input_image(obj, "input_image", limits)?), None),
        Operation::Inpaint => {
            let image = input_image(obj, "init_image", limits)?;
            (Some(image), Some(mask_image(obj, "mask_image", limits)?))
        }
    };

    if let Some(model) = text(obj, "model", 4096)? {
        if !names_model(spec, &model) {
            return Err(invalid(
                "model",
                format!(
                    "this worker serves {:?}{} (loaded from {}), got {model:?}",
                    spec.name,
                    spec.repo_id
                        .as_ref()
                        .map(|r| format!(" = {r}"))
                        .unwrap_or_default(),
                    spec.path.display()
                ),
            ));
        }
    }

    let prompt = match field(obj, "prompt") {
        None => return Err(invalid("prompt", "is required")),
        Some(Value::String(s)) => s.clone(),
        Some(v) => {
            return Err(invalid(
                "prompt",
                format!("must be a string, got {}", describe(v)),
            ))
        }
    };
    if prompt.trim().is_empty() {
        return Err(invalid("prompt", "must not be empty"));
    }
    let n = prompt.chars().count();
    if n > MAX_TEXT_CHARS {
        return Err(invalid(
            "prompt",
            format!("must be at most {MAX_TEXT_CHARS} characters, got {n}"),
        ));
    }
    let negative_prompt = text(obj, "negative_prompt", MAX_TEXT_CHARS)?;
    if spec.flux && negative_prompt.is_some() {
        return Err(invalid(
            "negative_prompt",
            "FLUX models here run without a negative prompt (no true classifier-free guidance); omit it",
        ));
    }
    let max_sequence_length = match (uint(obj, "max_sequence_length")?, spec.flux) {
        (None, _) => None,
        (Some(n), true) => {
            if !(2..=512).contains(&n) {
                return Err(invalid(
                    "max_sequence_length",
                    format!("must be between 2 and 512 (T5 tokens), got {n}"),
                ));
            }
            Some(n as usize)
        }
        (Some(n), false) => {
            return Err(invalid(
                "max_sequence_length",
                format!(
                    "applies to FLUX models only (this worker serves {}), got {n}",
                    spec.family
                ),
            ))
        }
    };

    let f = spec.latent_factor;
    let size = |name: &str, default: usize| -> Result<usize, RequestError> {
        let v = uint(obj, name)?.map_or(default as u64, |v| v);
        if v == 0 || v % f as u64 != 0 {
            return Err(invalid(
                name,
                format!("must be a positive multiple of {f} (this model's latent factor), got {v}"),
            ));
        }
        if v > MAX_SIDE as u64 {
            return Err(invalid(
                name,
                format!("must be at most {MAX_SIDE} pixels, got {v}"),
            ));
        }
        Ok(v as usize)
    };
    // With an input image, the default size is the image's, rounded down to the factor.
    let (default_width, default_height) = match &input {
        // Inpainting (and FLUX image-to-image) default to the model's size, as diffusers'
        // pipelines do.
        Some(_) if mask.is_some() || spec.flux => (spec.default_width, spec.default_height),
        Some(image) => {
            let (w, h) = ImageInput {
                image: image.clone(),
                strength: 1.0,
                mask: None,
            }
            .default_size(f);
            if w == 0 || h == 0 {
                return Err(invalid(
                    "input_image",
                    format!(
                        "is {}x{}, smaller than this model's latent factor {f} on a side",
                        image.width, image.height
                    ),
                ));
            }
            (w, h)
        }
        None => (spec.default_width, spec.default_height),
    };
    let width = size("width", default_width)?;
    let height = size("height", default_height)?;
    if width * height > limits.max_pixels {
        return Err(invalid(
            if uint(obj, "width")?.is_some() { "width" } else { "height" },
            format!(
                "{width}x{height} = {} pixels is over this worker's budget of {} pixels per image (--max-pixels)",
                width * height,
                limits.max_pixels
            ),
        ));
    }

    let (max_steps, source) = if limits.max_steps <= spec.num_train_timesteps {
        (limits.max_steps, "this worker's --max-steps")
    } else {
        (
            spec.num_train_timesteps,
            "the scheduler's num_train_timesteps",
        )
    };
    let steps = uint(obj, "steps")?.unwrap_or(default_steps(spec, limits) as u64);
    if steps == 0 || steps > max_steps as u64 {
        return Err(invalid(
            "steps",
            format!("must be between 1 and {max_steps} ({source}), got {steps}"),
        ));
    }

    if spec.flux && !spec.guidance_embedded && field(obj, "guidance_scale").is_some() {
        return Err(invalid(
            "guidance_scale",
            format!(
                "{} has no guidance embedding (FLUX schnell-like): omit it",
                spec.name
            ),
        ));
    }
    let guidance = match field(obj, "guidance_scale") {
        None => spec.default_guidance,
        Some(v) => v.as_f64().ok_or_else(|| {
            invalid(
                "guidance_scale",
                format!("must be a number, got {}", describe(v)),
            )
        })?,
    };
    if !(0.0..=MAX_GUIDANCE).contains(&guidance) {
        return Err(invalid(
            "guidance_scale",
            format!("must be between 0 and {MAX_GUIDANCE}, got {guidance}"),
        ));
    }

    let seed = match field(obj, "seed") {
        None => random_seed,
        Some(v) if v.as_i64() == Some(-1) => random_seed,
        Some(v) => v.as_u64().ok_or_else(|| {
            invalid(
                "seed",
                format!(
                    "must be an integer from 0 to {} (or -1 for a random seed), got {}",
                    u64::MAX,
                    describe(v)
                ),
            )
        })?,
    };

    let sampler = match field(obj, "scheduler") {
        // FLUX runs its flow-matching schedule; the value only fills the job record.
        None if spec.flux => SamplerKind::Euler,
        Some(_) if spec.flux => {
            return Err(invalid(
                "scheduler",
                "FLUX runs its flow-matching Euler schedule: omit `scheduler`",
            ))
        }
        None => spec.default_sampler.clone().map_err(|e| {
            invalid(
                "scheduler",
                format!("is required: the model's own scheduler cannot be used ({e})"),
            )
        })?,
        Some(Value::String(s)) => SamplerKind::from_name(s).map_err(|e| match e {
            sd_models::Error::Invalid { message, .. } => invalid("scheduler", message),
            other => invalid("scheduler", other),
        })?,
        Some(v) => {
            return Err(invalid(
                "scheduler",
                format!("must be a string, got {}", describe(v)),
            ))
        }
    };

    let max_batch = limits.max_batch;
    let batch = uint(obj, "batch")?.unwrap_or(1);
    if batch == 0 || batch > max_batch as u64 {
        return Err(invalid(
            "batch",
            format!("must be between 1 and {max_batch} (this worker's --max-batch), got {batch}"),
        ));
    }
    // What the sampler itself refuses (e.g. PNDM with PRK warm-up needs 4 steps) is refused
    // here, not after queueing.
    if spec.flux {
        // FLUX sizes were checked against twice the VAE factor (its latent_factor here).
    } else if let Err(e) = sd_models::samplers::build_sampler(
        sampler,
        &spec.scheduler.for_pipeline(false),
        steps as usize,
    ) {
        return Err(match e {
            sd_models::Error::Invalid { field, message } => invalid(
                if field == "steps" {
                    "steps"
                } else {
                    "scheduler"
                },
                format!("{message} (sampler {})", sampler.name()),
            ),
            other => invalid(
                "scheduler",
                format!(
                    "{} cannot run with this model's scheduler config: {other}",
                    sampler.name()
                ),
            ),
        });
    }

    let input = match input {
        None => None,
        Some(image) => {
            let default = if mask.is_some() {
                DEFAULT_INPAINT_STRENGTH
            } else if spec.flux {
                crate::generate_flux::DEFAULT_STRENGTH
            } else {
                DEFAULT_TRANSFORM_STRENGTH
            };
            let strength = match field(obj, "strength") {
                None => default,
                Some(v) => v.as_f64().ok_or_else(|| {
                    invalid("strength", format!("must be a number, got {}", describe(v)))
                })?,
            };
            let start = if spec.flux {
                sd_models::pipelines::flux::FluxCore::img2img_start(steps as usize, strength)
            } else {
                SdPipeline::img2img_start(steps as usize, strength)
            };
            if let Err(e) = start {
                return Err(match e {
                    sd_models::Error::Invalid { message, .. } => invalid("strength", message),
                    other => invalid("strength", other),
                });
            }
            Some(Arc::new(ImageInput {
                image,
                strength,
                mask,
            }))
        }
    };

    let preview_every = uint(obj, "preview_every")?.unwrap_or(DEFAULT_PREVIEW_EVERY as u64);
    let preview_every = usize::try_from(preview_every).unwrap_or(usize::MAX);
    let preview = match field(obj, "preview") {
        None => PreviewKind::Approx,
        Some(Value::String(s)) if s == "approx" => PreviewKind::Approx,
        Some(Value::String(s)) if s == "full" => PreviewKind::Full,
        Some(v) => {
            return Err(invalid(
                "preview",
                format!("must be \"approx\" or \"full\", got {}", describe(v)),
            ))
        }
    };
    let hive_id = text(obj, "hive_id", MAX_ID_CHARS)?;
    let worker_id = text(obj, "worker_id", MAX_ID_CHARS)?;
    let loras = loras(obj, limits)?;

    Ok(JobRequest {
        operation: op,
        max_sequence_length,
        flux: spec.flux.then_some(spec.guidance_embedded),
        input,
        params: GenerateParams {
            prompt,
            negative_prompt,
            width,
            height,
            steps: steps as usize,
            guidance,
            seed,
            sampler,
            batch: batch as usize,
        },
        preview_every,
        preview,
        hive_id,
        worker_id,
        loras,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use sd_models::samplers::SchedulerConfig;
    use serde_json::json;

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
            lora_dir: None,
        }
    }

    fn parse(v: Value) -> Result<JobRequest, RequestError> {
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

    /// The OpenAPI document describes every field the parser takes.
    #[test]
    fn every_field_is_described() {
        let doc = crate::openapi::document();
        let schemas = &doc["components"]["schemas"];
        for (schema, fields) in [
            ("ImageGeneration", &FIELDS[..]),
            ("ImageTransform", &TRANSFORM_FIELDS[..]),
            ("ImageInpaint", &INPAINT_FIELDS[..]),
        ] {
            for f in fields {
                assert!(
                    schemas[schema]["properties"][f].is_object(),
                    "{schema}.{f} not described"
                );
            }
        }
        let lora = &schemas["ImageGeneration"]["properties"]["loras"]["items"]["properties"];
        for f in LORA_FIELDS {
            assert!(lora[f].is_object(), "loras[].{f} not described");
        }
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
