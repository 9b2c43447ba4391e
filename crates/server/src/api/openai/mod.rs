//! The OpenAI Images API: `POST /v1/images/generations`, `/v1/images/edits`,
//! `/v1/images/variations`, `GET /v1/models`, and the files that `url` answers point to. Each
//! request becomes one engine job (the same validation, queue and engine as `/v1/jobs`) that
//! the handler waits for; a client that hangs up cancels it. Errors come in OpenAI's shape
//! ([`error`]).

pub mod error;
mod request;

use std::io::Cursor;
use std::time::{SystemTime, UNIX_EPOCH};

use axum::body::Bytes;
use axum::extract::multipart::MultipartRejection;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Multipart, Path, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use sd_engine::events::FailureKind;
use sd_engine::jobs::SubmitError;
use sd_engine::validate::names_model;
use sd_engine::{Engine, ModelSpec};
use serde::Serialize;
use utoipa::ToSchema;

use super::wait::{CancelOnDrop, JobEnd};
use super::Shared;
use error::{Kind, OpenAiError};
use request::{Endpoint, Output, OutputFormat, Params, ResponseFormat};

type Result<T> = std::result::Result<T, OpenAiError>;

/// The routes that need the bearer token (when there is one).
pub(super) fn routes() -> Router<Shared> {
    Router::new()
        .route("/v1/images/generations", post(generations))
        .route("/v1/images/edits", post(edits))
        .route("/v1/images/variations", post(variations))
        .route("/v1/models", get(models))
        .route("/v1/models/{id}", get(model))
}

/// The files of `url` answers: capability URLs (the job id is 128 random bits), fetched
/// without the bearer token as OpenAI's are.
pub(super) fn file_routes() -> Router<Shared> {
    Router::new().route("/v1/images/files/{id}/{file}", get(file))
}

/// Whether a path belongs to this API (its errors take OpenAI's shape).
pub(super) fn owns(path: &str) -> bool {
    path.starts_with("/v1/images/") || path == "/v1/models" || path.starts_with("/v1/models/")
}

fn ready_spec(engine: &Engine) -> Result<std::sync::Arc<ModelSpec>> {
    engine.ready_spec().map_err(submit_error)
}

fn too_large(max: usize) -> OpenAiError {
    OpenAiError::new(
        Kind::PayloadTooLarge,
        format!("the body is over this worker's limit of {max} bytes (--max-body-bytes)"),
    )
}

/// Create images from a prompt.
#[utoipa::path(post, path = "/v1/images/generations", tag = "openai",
    request_body(content = Object, description = "OpenAI's CreateImageRequest: prompt, model, n, size, response_format, output_format, output_compression, quality, background, user; and our extensions negative_prompt, seed, steps, guidance_scale, sampler, schedule, loras."),
    responses(
        (status = 200, description = "The images.", body = ImagesResponse),
        (status = 400, description = "A parameter is invalid, unknown or not available; `param` names it.", body = error::OpenAiErrorBody),
        (status = 401, description = "Missing or wrong bearer token.", body = error::OpenAiErrorBody),
        (status = 404, description = "`model` is not the loaded model.", body = error::OpenAiErrorBody),
        (status = 408, description = "The body did not arrive within --read-timeout.", body = error::OpenAiErrorBody),
        (status = 413, description = "The body is over --max-body-bytes.", body = error::OpenAiErrorBody),
        (status = 429, description = "The queue is full.", body = error::OpenAiErrorBody),
        (status = 503, description = "The model is loading, or the worker is draining.", body = error::OpenAiErrorBody),
    ))]
pub(super) async fn generations(
    State(st): State<Shared>,
    headers: HeaderMap,
    body: std::result::Result<Bytes, BytesRejection>,
) -> Result<Response> {
    let spec = ready_spec(&st.engine)?;
    let body = body.map_err(|r| {
        if r.status() == StatusCode::PAYLOAD_TOO_LARGE {
            too_large(st.max_body_bytes)
        } else {
            OpenAiError::new(Kind::BadBody, format!("cannot read the body: {r}"))
        }
    })?;
    let params = Params::from_json(&body)?;
    run(&st, spec, &headers, params, Endpoint::Generations).await
}

/// Edit an image: the transparent pixels of `mask` (or of the image itself) are repainted; an
/// image with no transparency and no mask is transformed as a whole (image-to-image).
#[utoipa::path(post, path = "/v1/images/edits", tag = "openai",
    request_body(content = Object, content_type = "multipart/form-data", description = "image (one file), mask (file), prompt, model, n, size, response_format, output_format, output_compression, background, user; and our extensions."),
    responses(
        (status = 200, description = "The images.", body = ImagesResponse),
        (status = 400, description = "A parameter is invalid, unknown or not available.", body = error::OpenAiErrorBody),
        (status = 401, description = "Missing or wrong bearer token.", body = error::OpenAiErrorBody),
    ))]
pub(super) async fn edits(
    State(st): State<Shared>,
    headers: HeaderMap,
    form: std::result::Result<Multipart, MultipartRejection>,
) -> Result<Response> {
    form_request(st, headers, form, Endpoint::Edits).await
}

/// Variations of an image (image-to-image; `prompt` may be given as our extension).
#[utoipa::path(post, path = "/v1/images/variations", tag = "openai",
    request_body(content = Object, content_type = "multipart/form-data", description = "image (one file), model, n, size, response_format, user; and our extensions (prompt included)."),
    responses(
        (status = 200, description = "The images.", body = ImagesResponse),
        (status = 400, description = "A parameter is invalid, unknown or not available.", body = error::OpenAiErrorBody),
        (status = 401, description = "Missing or wrong bearer token.", body = error::OpenAiErrorBody),
    ))]
pub(super) async fn variations(
    State(st): State<Shared>,
    headers: HeaderMap,
    form: std::result::Result<Multipart, MultipartRejection>,
) -> Result<Response> {
    form_request(st, headers, form, Endpoint::Variations).await
}

async fn form_request(
    st: Shared,
    headers: HeaderMap,
    form: std::result::Result<Multipart, MultipartRejection>,
    endpoint: Endpoint,
) -> Result<Response> {
    let spec = ready_spec(&st.engine)?;
    let form = form.map_err(|r| {
        OpenAiError::new(
            Kind::BadBody,
            format!(
                "the body must be a multipart/form-data form: {}",
                r.body_text()
            ),
        )
    })?;
    let params = Params::from_multipart(form).await.map_err(|e| {
        if e.kind == Kind::PayloadTooLarge {
            too_large(st.max_body_bytes)
        } else {
            e
        }
    })?;
    run(&st, spec, &headers, params, endpoint).await
}

/// One image of the answer.
#[derive(Serialize, ToSchema)]
pub(super) struct ImageData {
    #[serde(skip_serializing_if = "Option::is_none")]
    b64_json: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    url: Option<String>,
}

/// The answer of the image endpoints.
#[derive(Serialize, ToSchema)]
pub(super) struct ImagesResponse {
    /// Unix seconds.
    created: u64,
    data: Vec<ImageData>,
    /// `png`, `jpeg` or `webp`.
    output_format: &'static str,
    /// `WIDTHxHEIGHT`.
    size: String,
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// The job of a request, and the answer's format.
fn prepare(
    params: Params,
    endpoint: Endpoint,
    spec: &ModelSpec,
    limits: &sd_engine::Limits,
    seed: u64,
) -> Result<(sd_engine::GenerationRequest, Output)> {
    let (draft, output, model) = request::read(params, endpoint)?;
    if let Some(m) = model.filter(|m| !names_model(spec, m)) {
        return Err(OpenAiError::param(
            Kind::ModelNotFound,
            "model",
            format!(
                "The model `{m}` does not exist here: this worker serves `{}` (see GET /v1/models)",
                spec.name
            ),
        ));
    }
    let request = sd_engine::validate(draft, spec, limits, seed).map_err(|e| {
        let param = request::param_of(&e.field);
        OpenAiError::param(
            Kind::InvalidValue,
            &param,
            format!("invalid `{param}`: {}", e.reason),
        )
    })?;
    Ok((request, output))
}

async fn run(
    st: &Shared,
    spec: std::sync::Arc<ModelSpec>,
    headers: &HeaderMap,
    params: Params,
    endpoint: Endpoint,
) -> Result<Response> {
    let mut limits = st.limits.clone();
    // Variations have no prompt of their own.
    limits.empty_prompt = endpoint == Endpoint::Variations;
    let seed = rand::random::<u32>() as u64;
    // Reading (an edit's transparency) and validation decode images: off the async workers.
    let (request, output) =
        tokio::task::spawn_blocking(move || prepare(params, endpoint, &spec, &limits, seed))
            .await
            .map_err(|e| {
                OpenAiError::new(
                    Kind::Server,
                    format!("internal error while reading the request: {e}"),
                )
            })??;
    let size = format!("{}x{}", request.params.width, request.params.height);
    let id = st.engine.submit(request).map_err(submit_error)?;
    let guard = CancelOnDrop::new(&st.engine, &id);
    let pngs = wait(&st.engine, &id).await?;
    guard.disarm();
    let data = answer(pngs, output, &id, headers).await?;
    let body = ImagesResponse {
        created: unix_now(),
        data,
        output_format: output.format.name(),
        size,
    };
    Ok(Json(body).into_response())
}

fn submit_error(e: SubmitError) -> OpenAiError {
    let message = e.message();
    match e {
        SubmitError::QueueFull { retry_after_s, .. } => OpenAiError {
            retry_after: Some(retry_after_s),
            ..OpenAiError::new(Kind::RateLimited, message)
        },
        SubmitError::Draining | SubmitError::NotReady(_) => {
            OpenAiError::new(Kind::Unavailable, message)
        }
    }
}

/// The PNG images of a finished job, or its end in this API's terms.
async fn wait(engine: &Engine, id: &str) -> Result<Vec<std::sync::Arc<Vec<u8>>>> {
    super::wait::images(engine, id)
        .await
        .map_err(|end| match end {
            JobEnd::Failed { kind, message } => {
                let kind = match kind {
                    FailureKind::InvalidRequest => Kind::InvalidValue,
                    _ => Kind::Server,
                };
                OpenAiError::new(kind, message)
            }
            JobEnd::Cancelled(reason) => {
                OpenAiError::new(Kind::Server, format!("the job was cancelled ({reason})"))
            }
            JobEnd::Lost => {
                OpenAiError::new(Kind::Server, "the job disappeared before it finished")
            }
        })
}

/// The answer's images: base64 in the requested encoding, or URLs of the PNG files.
async fn answer(
    pngs: Vec<std::sync::Arc<Vec<u8>>>,
    output: Output,
    id: &str,
    headers: &HeaderMap,
) -> Result<Vec<ImageData>> {
    if output.response_format == ResponseFormat::Url {
        let host = headers
            .get(header::HOST)
            .and_then(|h| h.to_str().ok())
            .unwrap_or("localhost");
        return Ok((0..pngs.len())
            .map(|n| ImageData {
                b64_json: None,
                url: Some(format!("http://{host}/v1/images/files/{id}/{n}.png")),
            })
            .collect());
    }
    // Encoding is CPU work: off the async workers.
    tokio::task::spawn_blocking(move || {
        pngs.iter()
            .map(|png| {
                let bytes = transcode(png, output)?;
                Ok(ImageData {
                    b64_json: Some(base64_encode(&bytes)),
                    url: None,
                })
            })
            .collect()
    })
    .await
    .map_err(|e| OpenAiError::new(Kind::Server, format!("internal error while encoding: {e}")))?
}

fn base64_encode(bytes: &[u8]) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

/// The PNG, or its pixels in JPEG / lossless WebP (which carry no `parameters` text).
fn transcode(png: &[u8], output: Output) -> Result<Vec<u8>> {
    if output.format == OutputFormat::Png {
        return Ok(png.to_vec());
    }
    let failed = |e: image::ImageError| {
        OpenAiError::new(Kind::Server, format!("cannot encode the image: {e}"))
    };
    let rgb = image::load_from_memory_with_format(png, image::ImageFormat::Png)
        .map_err(failed)?
        .into_rgb8();
    let mut out = Cursor::new(Vec::new());
    match output.format {
        OutputFormat::Jpeg => {
            image::codecs::jpeg::JpegEncoder::new_with_quality(&mut out, output.quality.max(1))
                .encode_image(&rgb)
                .map_err(failed)?;
        }
        _ => {
            image::codecs::webp::WebPEncoder::new_lossless(&mut out)
                .encode(
                    rgb.as_raw(),
                    rgb.width(),
                    rgb.height(),
                    image::ExtendedColorType::Rgb8,
                )
                .map_err(failed)?;
        }
    }
    Ok(out.into_inner())
}

/// A result file of a `url` answer (`{n}.png`).
pub(super) async fn file(
    State(st): State<Shared>,
    Path((id, file)): Path<(String, String)>,
) -> Result<Response> {
    let not_found = || {
        OpenAiError::new(
            Kind::NotFound,
            format!("no file {file:?} for {id:?} (unknown, or expired)"),
        )
    };
    let n: usize = file
        .strip_suffix(".png")
        .and_then(|n| n.parse().ok())
        .ok_or_else(not_found)?;
    match st.engine.image(&id, n) {
        Some(Ok(png)) => Ok((
            [(header::CONTENT_TYPE, HeaderValue::from_static("image/png"))],
            Bytes::from(png.as_ref().clone()),
        )
            .into_response()),
        _ => Err(not_found()),
    }
}

/// One model, as OpenAI lists them.
#[derive(Serialize, ToSchema)]
pub(super) struct ModelObject {
    id: String,
    object: &'static str,
    /// Always 0: when the weights were made is not known here.
    created: u64,
    owned_by: &'static str,
}

#[derive(Serialize, ToSchema)]
pub(super) struct ModelList {
    object: &'static str,
    data: Vec<ModelObject>,
}

fn model_object(spec: &ModelSpec) -> ModelObject {
    ModelObject {
        id: spec.name.clone(),
        object: "model",
        created: 0,
        owned_by: "sd-worker",
    }
}

/// The loaded model, as OpenAI lists models.
#[utoipa::path(get, path = "/v1/models", tag = "openai",
    responses((status = 200, description = "The loaded model.", body = ModelList)))]
pub(super) async fn models(State(st): State<Shared>) -> Result<Json<ModelList>> {
    let spec = ready_spec(&st.engine)?;
    Ok(Json(ModelList {
        object: "list",
        data: vec![model_object(&spec)],
    }))
}

/// One model by id: the loaded one (by its name, path or repo id), else 404.
#[utoipa::path(get, path = "/v1/models/{id}", tag = "openai",
    params(("id" = String, Path, description = "The model id.")),
    responses(
        (status = 200, description = "The model.", body = ModelObject),
        (status = 404, description = "Not the loaded model.", body = error::OpenAiErrorBody),
    ))]
pub(super) async fn model(
    State(st): State<Shared>,
    Path(id): Path<String>,
) -> Result<Json<ModelObject>> {
    let spec = ready_spec(&st.engine)?;
    if !names_model(&spec, &id) {
        return Err(OpenAiError::param(
            Kind::ModelNotFound,
            "model",
            format!(
                "The model `{id}` does not exist here: this worker serves `{}`",
                spec.name
            ),
        ));
    }
    Ok(Json(model_object(&spec)))
}
