//! Reading the OpenAI Images requests (a JSON body for generations, a multipart form for edits
//! and variations) into the engine's [`RequestDraft`] and the answer's format. Both carry the
//! same parameters, as JSON values or as form text, so one reader serves both. OpenAI's own
//! parameters keep OpenAI's meaning; ours (`negative_prompt`, `seed`, `steps`,
//! `guidance_scale`, `sampler`, `schedule`, `strength`, `loras`) arrive the way the official
//! clients pass `extra_body`. A parameter we do not know, or an OpenAI value that would change
//! the result in a way we cannot honour, is refused with a 400 that names it.

use std::collections::BTreeMap;

use axum::extract::Multipart;
use sd_engine::request::{ImageBytes, LoraDraft, MaskRule, Operation, RequestDraft};
use serde_json::Value;

use super::error::{Kind, OpenAiError};

type Result<T> = std::result::Result<T, OpenAiError>;

/// Which endpoint a request came to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    Generations,
    Edits,
    Variations,
}

/// OpenAI's parameters each endpoint takes (ours are [`EXTENSIONS`]).
const GENERATION_PARAMS: [&str; 11] = [
    "prompt",
    "model",
    "n",
    "size",
    "response_format",
    "output_format",
    "output_compression",
    "quality",
    "style",
    "background",
    "user",
];
const EDIT_PARAMS: [&str; 11] = [
    "image",
    "mask",
    "prompt",
    "model",
    "n",
    "size",
    "response_format",
    "output_format",
    "output_compression",
    "background",
    "user",
];
const VARIATION_PARAMS: [&str; 6] = ["image", "model", "n", "size", "response_format", "user"];
/// Our parameters, on every endpoint (`prompt` too on variations, which OpenAI runs without
/// one).
pub const EXTENSIONS: [&str; 8] = [
    "negative_prompt",
    "seed",
    "steps",
    "guidance_scale",
    "sampler",
    "schedule",
    "strength",
    "loras",
];

/// How the answer carries the images.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResponseFormat {
    B64Json,
    Url,
}

/// The encoding of the answer's images.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutputFormat {
    Png,
    Jpeg,
    /// Lossless WebP.
    Webp,
}

impl OutputFormat {
    pub fn name(self) -> &'static str {
        match self {
            OutputFormat::Png => "png",
            OutputFormat::Jpeg => "jpeg",
            OutputFormat::Webp => "webp",
        }
    }
}

/// What the answer looks like.
#[derive(Debug, Clone, Copy)]
pub struct Output {
    pub response_format: ResponseFormat,
    pub format: OutputFormat,
    /// JPEG quality, 0 to 100.
    pub quality: u8,
}

/// A parameter as it arrived.
#[derive(Debug, Clone)]
enum Param {
    Json(Value),
    Text(String),
}

/// The parameters of one request, and its files (multipart only).
#[derive(Debug, Default)]
pub struct Params {
    values: BTreeMap<String, Param>,
    files: BTreeMap<String, Vec<Vec<u8>>>,
}

fn invalid(param: &str, message: impl std::fmt::Display) -> OpenAiError {
    OpenAiError::param(
        Kind::InvalidValue,
        param,
        format!("invalid `{param}`: {message}"),
    )
}

fn describe(p: &Param) -> String {
    let s = match p {
        Param::Json(v) => v.to_string(),
        Param::Text(t) => format!("{t:?}"),
    };
    if s.chars().count() > 60 {
        format!("{}...", s.chars().take(60).collect::<String>())
    } else {
        s
    }
}

impl Params {
    /// The members of a JSON object body (`null` counts as omitted).
    pub fn from_json(body: &[u8]) -> Result<Params> {
        let value: Value = crate::json::parse(body).map_err(|e| {
            OpenAiError::new(Kind::BadBody, format!("the body is not valid JSON: {e}"))
        })?;
        let Value::Object(map) = value else {
            return Err(OpenAiError::new(
                Kind::BadBody,
                "the body must be a JSON object",
            ));
        };
        let values = map
            .into_iter()
            .filter(|(_, v)| !v.is_null())
            .map(|(k, v)| (k, Param::Json(v)))
            .collect();
        Ok(Params {
            values,
            files: BTreeMap::new(),
        })
    }

    /// The fields of a multipart form: parts with a file name are files (`image` and
    /// `image[]` are one list), the others text.
    pub async fn from_multipart(mut form: Multipart) -> Result<Params> {
        let mut params = Params::default();
        let bad = |e: axum::extract::multipart::MultipartError| {
            let kind = if e.status() == axum::http::StatusCode::PAYLOAD_TOO_LARGE {
                Kind::PayloadTooLarge
            } else {
                Kind::BadBody
            };
            OpenAiError::new(kind, format!("cannot read the form: {}", e.body_text()))
        };
        while let Some(field) = form.next_field().await.map_err(bad)? {
            let name = field
                .name()
                .unwrap_or("")
                .trim_end_matches("[]")
                .to_string();
            if name.is_empty() {
                return Err(OpenAiError::new(Kind::BadBody, "a form part has no name"));
            }
            if field.file_name().is_some() {
                let bytes = field.bytes().await.map_err(bad)?;
                params.files.entry(name).or_default().push(bytes.to_vec());
            } else {
                let text = field.text().await.map_err(bad)?;
                if params
                    .values
                    .insert(name.clone(), Param::Text(text))
                    .is_some()
                {
                    return Err(invalid(&name, "is given twice: one value per parameter"));
                }
            }
        }
        Ok(params)
    }

    fn get(&self, name: &str) -> Option<&Param> {
        self.values.get(name)
    }

    fn text(&self, name: &str) -> Result<Option<String>> {
        match self.get(name) {
            None => Ok(None),
            Some(Param::Text(t)) => Ok(Some(t.clone())),
            Some(Param::Json(Value::String(s))) => Ok(Some(s.clone())),
            Some(p) => Err(invalid(
                name,
                format!("must be a string, got {}", describe(p)),
            )),
        }
    }

    fn uint(&self, name: &str) -> Result<Option<u64>> {
        let parsed = match self.get(name) {
            None => return Ok(None),
            Some(Param::Json(v)) => v.as_u64(),
            Some(Param::Text(t)) => t.trim().parse().ok(),
        };
        parsed.map(Some).ok_or_else(|| {
            let got = self.get(name).map(describe).unwrap_or_default();
            invalid(name, format!("must be a non-negative integer, got {got}"))
        })
    }

    fn number(&self, name: &str) -> Result<Option<f64>> {
        let parsed = match self.get(name) {
            None => return Ok(None),
            Some(Param::Json(v)) => v.as_f64(),
            Some(Param::Text(t)) => t.trim().parse().ok().filter(|f: &f64| f.is_finite()),
        };
        parsed.map(Some).ok_or_else(|| {
            let got = self.get(name).map(describe).unwrap_or_default();
            invalid(name, format!("must be a number, got {got}"))
        })
    }

    /// `seed`: an integer, or -1 for a random one.
    fn seed(&self) -> Result<Option<u64>> {
        let p = match self.get("seed") {
            None => return Ok(None),
            Some(p) => p,
        };
        let (signed, unsigned) = match p {
            Param::Json(v) => (v.as_i64(), v.as_u64()),
            Param::Text(t) => (t.trim().parse().ok(), t.trim().parse().ok()),
        };
        match (signed, unsigned) {
            (Some(-1), _) => Ok(None),
            (_, Some(s)) => Ok(Some(s)),
            _ => Err(invalid(
                "seed",
                format!(
                    "must be an integer from 0 to {} (or -1 for a random seed), got {}",
                    u64::MAX,
                    describe(p)
                ),
            )),
        }
    }

    /// `loras`: a list of `{"path", "strength", "strict"}`, as JSON (a JSON text in a form).
    fn loras(&self) -> Result<Vec<LoraDraft>> {
        let list = match self.get("loras") {
            None => return Ok(Vec::new()),
            Some(Param::Json(v)) => v.clone(),
            Some(Param::Text(t)) => crate::json::parse(t.as_bytes())
                .map_err(|e| invalid("loras", format!("is not a JSON list: {e}")))?,
        };
        let Value::Array(items) = list else {
            return Err(invalid(
                "loras",
                "must be a list of {\"path\", \"strength\", \"strict\"} objects",
            ));
        };
        items
            .iter()
            .enumerate()
            .map(|(i, item)| {
                let at = |f: &str| format!("loras[{i}].{f}");
                let Value::Object(o) = item else {
                    return Err(invalid(&format!("loras[{i}]"), "must be an object"));
                };
                if let Some(k) = o
                    .keys()
                    .find(|k| !["path", "strength", "strict"].contains(&k.as_str()))
                {
                    return Err(invalid(
                        &at(k),
                        "unknown field; a LoRA has path, strength, strict",
                    ));
                }
                let path = o.get("path").and_then(Value::as_str).ok_or_else(|| {
                    invalid(
                        &at("path"),
                        "is required: a file name inside the worker's LoRA folder",
                    )
                })?;
                let strength = match o.get("strength").filter(|v| !v.is_null()) {
                    None => None,
                    Some(v) => Some(
                        v.as_f64()
                            .ok_or_else(|| invalid(&at("strength"), "must be a number"))?,
                    ),
                };
                let strict = match o.get("strict").filter(|v| !v.is_null()) {
                    None => None,
                    Some(v) => Some(
                        v.as_bool()
                            .ok_or_else(|| invalid(&at("strict"), "must be true or false"))?,
                    ),
                };
                Ok(LoraDraft {
                    path: path.to_string(),
                    strength,
                    strict,
                })
            })
            .collect()
    }

    /// Refuses parameters the endpoint does not take.
    fn check_known(&self, endpoint: Endpoint) -> Result<()> {
        let openai: &[&str] = match endpoint {
            Endpoint::Generations => &GENERATION_PARAMS,
            Endpoint::Edits => &EDIT_PARAMS,
            Endpoint::Variations => &VARIATION_PARAMS,
        };
        let known = |k: &str| {
            openai.contains(&k)
                || EXTENSIONS.contains(&k)
                || (endpoint == Endpoint::Variations && k == "prompt")
        };
        let names = self.values.keys().chain(self.files.keys());
        for name in names {
            if !known(name) {
                return Err(OpenAiError::param(
                    Kind::UnknownParameter,
                    name,
                    format!(
                        "Unknown parameter: '{name}'. This endpoint takes {} and our extensions {}",
                        openai.join(", "),
                        EXTENSIONS.join(", ")
                    ),
                ));
            }
        }
        // A file where text is expected, or text where a file is.
        for name in self.files.keys() {
            if !["image", "mask"].contains(&name.as_str()) {
                return Err(invalid(name, "must be a text field, not a file"));
            }
        }
        for name in ["image", "mask"] {
            if self.values.contains_key(name) {
                return Err(invalid(name, "must be a file part of the form"));
            }
        }
        Ok(())
    }
}

/// The image size: `WxH`, or `auto` (the model's, or the input's for image-to-image).
fn size(params: &Params) -> Result<(Option<u64>, Option<u64>)> {
    let Some(size) = params.text("size")? else {
        return Ok((None, None));
    };
    if size == "auto" {
        return Ok((None, None));
    }
    let parsed = size
        .split_once('x')
        .and_then(|(w, h)| Some((w.trim().parse().ok()?, h.trim().parse().ok()?)));
    match parsed {
        Some((w, h)) => Ok((Some(w), Some(h))),
        None => Err(invalid(
            "size",
            format!("must be \"WIDTHxHEIGHT\" (e.g. \"512x512\") or \"auto\", got {size:?}"),
        )),
    }
}

/// A parameter that must be one of `accepted` when given; `why` says why the others are
/// refused.
fn one_of(params: &Params, name: &str, accepted: &[&str], why: &str) -> Result<Option<String>> {
    match params.text(name)? {
        Some(v) if !accepted.contains(&v.as_str()) => Err(invalid(
            name,
            format!(
                "{v:?} is not available: {why} (accepted: {})",
                accepted.join(", ")
            ),
        )),
        other => Ok(other),
    }
}

fn output(params: &Params, endpoint: Endpoint) -> Result<Output> {
    let response_format = match one_of(
        params,
        "response_format",
        &["b64_json", "url"],
        "the images come as base64 or as a URL",
    )?
    .as_deref()
    {
        Some("url") => ResponseFormat::Url,
        _ => ResponseFormat::B64Json,
    };
    let format = match one_of(
        params,
        "output_format",
        &["png", "jpeg", "webp"],
        "these are the encodings made here",
    )?
    .as_deref()
    {
        Some("jpeg") => OutputFormat::Jpeg,
        Some("webp") => OutputFormat::Webp,
        _ => OutputFormat::Png,
    };
    let compression = params.uint("output_compression")?;
    let quality = match (format, compression) {
        (_, None) => 100,
        (OutputFormat::Jpeg, Some(c)) if c <= 100 => c as u8,
        (OutputFormat::Webp, Some(100)) => 100,
        (OutputFormat::Jpeg, Some(c)) => {
            return Err(invalid(
                "output_compression",
                format!("must be between 0 and 100, got {c}"),
            ))
        }
        (OutputFormat::Webp, Some(c)) => {
            return Err(invalid(
                "output_compression",
                format!("WebP is written lossless here: only 100, got {c}"),
            ))
        }
        (OutputFormat::Png, Some(c)) => {
            return Err(invalid(
                "output_compression",
                format!("applies to jpeg and webp, not png, got {c}"),
            ))
        }
    };
    if response_format == ResponseFormat::Url && format != OutputFormat::Png {
        return Err(invalid(
            "response_format",
            format!(
                "url results are PNG files: use b64_json for {}",
                format.name()
            ),
        ));
    }
    if endpoint != Endpoint::Variations {
        one_of(
            params,
            "quality",
            &["auto", "standard"],
            "one quality is made here; set `steps` instead",
        )?;
        one_of(
            params,
            "background",
            &["auto", "opaque"],
            "images here have no transparency",
        )?;
    }
    if let Some(style) = params.text("style")? {
        return Err(invalid(
            "style",
            format!(
                "{style:?} is not available: this worker has no styles; describe it in the prompt"
            ),
        ));
    }
    Ok(Output {
        response_format,
        format,
        quality,
    })
}

/// The one image of an edit or a variation.
fn one_image(params: &mut Params) -> Result<Vec<u8>> {
    let mut images = params.files.remove("image").unwrap_or_default();
    match images.len() {
        0 => Err(invalid(
            "image",
            "is required: a PNG, JPEG or WebP file part",
        )),
        1 => Ok(images.remove(0)),
        n => Err(invalid(
            "image",
            format!("takes one image here (the init image), got {n}"),
        )),
    }
}

fn mask_file(params: &mut Params) -> Result<Option<Vec<u8>>> {
    let mut masks = params.files.remove("mask").unwrap_or_default();
    match masks.len() {
        0 => Ok(None),
        1 => Ok(Some(masks.remove(0))),
        n => Err(invalid("mask", format!("takes one mask, got {n}"))),
    }
}

/// What an edit without a mask does: inpaint the image's own transparent pixels, or, for an
/// image with none, image-to-image on all of it.
pub fn edit_has_transparency(image: &[u8]) -> bool {
    use sd_engine::validate::MAX_SIDE;
    matches!(
        sd_engine::images::input::decode_alpha_mask(image, MAX_SIDE * MAX_SIDE, MAX_SIDE),
        Ok(Some(m)) if m.pixels.contains(&255)
    )
}

/// The draft and the answer's format of a request to `endpoint`.
pub fn read(
    mut params: Params,
    endpoint: Endpoint,
) -> Result<(RequestDraft, Output, Option<String>)> {
    params.check_known(endpoint)?;
    let output = output(&params, endpoint)?;
    let (operation, init, mask, rule) = match endpoint {
        Endpoint::Generations => (Operation::Generation, None, None, MaskRule::White),
        Endpoint::Variations => (
            Operation::Transform,
            Some(one_image(&mut params)?),
            None,
            MaskRule::White,
        ),
        Endpoint::Edits => {
            let image = one_image(&mut params)?;
            match mask_file(&mut params)? {
                Some(mask) => (
                    Operation::Inpaint,
                    Some(image),
                    Some(("mask", mask)),
                    MaskRule::Transparent,
                ),
                None if edit_has_transparency(&image) => {
                    let mask = image.clone();
                    (
                        Operation::Inpaint,
                        Some(image),
                        Some(("image", mask)),
                        MaskRule::Transparent,
                    )
                }
                None => (Operation::Transform, Some(image), None, MaskRule::White),
            }
        }
    };
    let mut d = RequestDraft::new(operation);
    d.init_image = init.map(|bytes| ImageBytes {
        field: "image".into(),
        bytes,
    });
    d.mask_image = mask.map(|(field, bytes)| ImageBytes {
        field: field.into(),
        bytes,
    });
    d.mask_rule = rule;
    d.prompt = match (endpoint, params.text("prompt")?) {
        (Endpoint::Variations, None) => Some(String::new()),
        (_, prompt) => prompt,
    };
    d.negative_prompt = params.text("negative_prompt")?;
    d.batch = params.uint("n")?;
    (d.width, d.height) = size(&params)?;
    d.steps = params.uint("steps")?;
    d.guidance_scale = params.number("guidance_scale")?;
    d.seed = params.seed()?;
    d.sampler = params.text("sampler")?;
    d.schedule = params.text("schedule")?;
    d.strength = params.number("strength")?;
    d.loras = params.loras()?;
    d.preview_every = Some(0);
    let model = params.text("model")?;
    Ok((d, output, model))
}

/// The OpenAI parameter that an engine field came from.
pub fn param_of(field: &str) -> String {
    match field {
        "batch" => "n".into(),
        "width" | "height" => "size".into(),
        "init_image" | "input_image" => "image".into(),
        "mask_image" => "mask".into(),
        "operation" => "image".into(),
        other => other.into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Fuzz harness (`sd-fuzz`): any JSON body ends in a request or an error, never a panic.
    #[test]
    fn fuzz_openai_request() {
        let api: &[&[u8]] = &[
            b"\"size\":",
            b"\"n\":",
            b"\"response_format\":",
            b"\"output_compression\":",
            b"\"loras\":",
            b"\"steps\":",
            b"\"1024x1024\"",
            b"\"auto\"",
        ];
        let words = [api, sd_fuzz::JSON_WORDS].concat();
        let spec = sd_engine::ModelSpec::sd_example();
        let limits = crate::api::tests::served_limits();
        sd_fuzz::fuzz(
            "openai-request",
            &sd_fuzz::seeds("openai-request"),
            &words,
            |bytes| {
                let Ok(params) = Params::from_json(bytes) else {
                    return;
                };
                if let Ok((draft, _, _)) = read(params, Endpoint::Generations) {
                    let _ = sd_engine::validate(draft, &spec, &limits, 1);
                }
            },
        );
    }
}
