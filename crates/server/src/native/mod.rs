//! The native job API's wire format: the JSON body of `POST /v1/jobs`. It is read field by field
//! (so that every type error names its field and the value it got) into the typed [`JobBody`],
//! whose types also generate the request schemas of the OpenAPI document, and then becomes the
//! engine's [`RequestDraft`]. Limits and defaults are the engine's ([`sd_engine::validate`]);
//! the limits written into the schema attributes of [`body`] are checked against them by tests.

use serde_json::{Map, Value};

use sd_engine::images::input::decode_base64;
use sd_engine::request::{Operation, PreviewKind, PromptSyntax, RequestDraft};
use sd_engine::{GenerationRequest, InvalidField, Limits, ModelSpec};

mod body;

pub use body::JobBody;
use body::{
    GenerationOperation, ImageGeneration, ImageInpaint, ImageTransform, InpaintOperation,
    JobFields, LoraEntry, TransformOperation,
};

/// The fields every operation takes.
pub const FIELDS: [&str; 30] = [
    "loras",
    "prompt_syntax",
    "max_sequence_length",
    "operation",
    "prompt",
    "negative_prompt",
    "width",
    "height",
    "steps",
    "guidance_scale",
    "seed",
    "sampler",
    "schedule",
    "scheduler",
    "eta",
    "s_noise",
    "batch",
    "preview_every",
    "preview",
    "hive_id",
    "model",
    "worker_id",
    "original_size",
    "crops_coords_top_left",
    "target_size",
    "negative_original_size",
    "negative_crops_coords_top_left",
    "negative_target_size",
    "aesthetic_score",
    "negative_aesthetic_score",
];
/// The fields `image_transform` adds.
pub const TRANSFORM_FIELDS: [&str; 2] = ["input_image", "strength"];
/// The fields `image_inpaint` adds.
pub const INPAINT_FIELDS: [&str; 3] = ["init_image", "mask_image", "strength"];
/// The fields of one `loras` entry.
pub const LORA_FIELDS: [&str; 3] = ["path", "strength", "strict"];

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

/// A `[a, b]` pair of non-negative integers (SDXL's size and crop ids).
fn pair(obj: &Map<String, Value>, name: &str) -> Result<Option<[u64; 2]>> {
    match field(obj, name) {
        None => Ok(None),
        Some(v) => match v.as_array().map(|a| a.as_slice()) {
            Some([a, b]) => match (a.as_u64(), b.as_u64()) {
                (Some(a), Some(b)) => Ok(Some([a, b])),
                _ => Err(invalid(
                    name,
                    format!("must be two non-negative integers, got {}", describe(v)),
                )),
            },
            _ => Err(invalid(
                name,
                format!("must be a list of two integers, got {}", describe(v)),
            )),
        },
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
    crate::json::parse(body).map_err(|e| RequestError {
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
    let prompt_syntax = match string(obj, "prompt_syntax")?.as_deref() {
        None | Some("plain") => PromptSyntax::Plain,
        Some("a1111") => PromptSyntax::A1111,
        Some(other) => {
            return Err(invalid(
                "prompt_syntax",
                format!("must be \"plain\" (diffusers) or \"a1111\" (AUTOMATIC1111's weights, BREAK and 75-token chunks), got {other:?}"),
            ))
        }
    };
    let max_sequence_length = uint(obj, "max_sequence_length")?;
    let width = uint(obj, "width")?;
    let height = uint(obj, "height")?;
    let steps = uint(obj, "steps")?;
    let guidance_scale = number(obj, "guidance_scale")?;
    let seed = seed(obj)?;
    let sampler = string(obj, "sampler")?;
    let schedule = string(obj, "schedule")?;
    let scheduler = string(obj, "scheduler")?;
    let eta = number(obj, "eta")?;
    let s_noise = number(obj, "s_noise")?;
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
        prompt_syntax,
        width,
        height,
        steps,
        guidance_scale,
        seed,
        sampler,
        schedule,
        scheduler,
        eta,
        s_noise,
        batch,
        preview_every,
        preview,
        hive_id: string(obj, "hive_id")?,
        worker_id: string(obj, "worker_id")?,
        loras: loras(obj)?,
        model,
        max_sequence_length,
        original_size: pair(obj, "original_size")?,
        crops_coords_top_left: pair(obj, "crops_coords_top_left")?,
        target_size: pair(obj, "target_size")?,
        negative_original_size: pair(obj, "negative_original_size")?,
        negative_crops_coords_top_left: pair(obj, "negative_crops_coords_top_left")?,
        negative_target_size: pair(obj, "negative_target_size")?,
        aesthetic_score: number(obj, "aesthetic_score")?,
        negative_aesthetic_score: number(obj, "negative_aesthetic_score")?,
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
mod tests;
