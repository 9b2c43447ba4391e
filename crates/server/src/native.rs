//! The native job API's wire format: the JSON body of `POST /v1/jobs`, read field by field into
//! the engine's [`RequestDraft`] so that every type error names its field and the value it got.
//! Limits and defaults are the engine's ([`sd_engine::validate`]); nothing is checked twice.

use serde_json::{Map, Value};

use sd_engine::images::input::decode_base64;
use sd_engine::request::{ImageBytes, LoraDraft, Operation, PreviewKind, RequestDraft};
use sd_engine::{GenerationRequest, InvalidField, Limits, ModelSpec};

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
fn base64_image(obj: &Map<String, Value>, name: &str) -> Result<Option<ImageBytes>> {
    match field(obj, name) {
        None => Ok(None),
        Some(Value::String(s)) => {
            let bytes = decode_base64(s).map_err(|e| invalid(name, e))?;
            Ok(Some(ImageBytes {
                field: name.to_string(),
                bytes,
            }))
        }
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
    let mut draft = RequestDraft::new(op);
    draft.init_image = match op {
        Operation::Generation => None,
        Operation::Transform => base64_image(obj, "input_image")?,
        Operation::Inpaint => base64_image(obj, "init_image")?,
    };
    draft.mask_image = base64_image(obj, "mask_image")?;
    draft.model = string(obj, "model")?;
    draft.prompt = string(obj, "prompt")?;
    draft.negative_prompt = string(obj, "negative_prompt")?;
    draft.max_sequence_length = uint(obj, "max_sequence_length")?;
    draft.width = uint(obj, "width")?;
    draft.height = uint(obj, "height")?;
    draft.steps = uint(obj, "steps")?;
    draft.guidance_scale = number(obj, "guidance_scale")?;
    draft.seed = seed(obj)?;
    draft.scheduler = string(obj, "scheduler")?;
    draft.batch = uint(obj, "batch")?;
    draft.strength = number(obj, "strength")?;
    draft.preview_every = uint(obj, "preview_every")?;
    draft.preview = match field(obj, "preview") {
        None => None,
        Some(v) => Some(v.as_str().and_then(PreviewKind::from_name).ok_or_else(|| {
            invalid(
                "preview",
                format!("must be \"approx\" or \"full\", got {}", describe(v)),
            )
        })?),
    };
    draft.hive_id = string(obj, "hive_id")?;
    draft.worker_id = string(obj, "worker_id")?;
    draft.loras = loras(obj)?;
    Ok(draft)
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
fn loras(obj: &Map<String, Value>) -> Result<Vec<LoraDraft>> {
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
        out.push(LoraDraft {
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
