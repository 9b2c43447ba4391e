//! The AUTOMATIC1111 web UI API (`/sdapi/v1`, as A1111 1.10 and the `webuiapi` client speak
//! it). txt2img and img2img become engine jobs, one per image with seeds `seed + i` as A1111
//! numbers them, run one request at a time as A1111 does; the other routes describe the worker
//! in A1111's shapes. Fields, policies and what differs from A1111 are in the README.

pub(super) mod error;
mod infotext;
mod request;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, QueryRejection};
use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use sd_engine::jobs::{JobState, SubmitError};
use sd_engine::validate::{names_model, LoraFiles};
use sd_engine::{Engine, ModelSpec};
use serde_json::{json, Map, Value};

use super::wait::{CancelOnDrop, JobEnd};
use super::Shared;
pub use error::A1111Error;
use error::Kind;
use request::Mode;

type Result<T> = std::result::Result<T, A1111Error>;

/// What the A1111 routes share: one generation at a time, and what it is doing for
/// `/progress`, `/interrupt` and `/skip`.
#[derive(Default)]
pub struct A1111State {
    turn: tokio::sync::Mutex<()>,
    /// Bumped by `/interrupt`: a request that sees it change stops after its current image.
    interrupts: AtomicU64,
    task: Mutex<Option<Task>>,
}

struct Task {
    job: &'static str,
    timestamp: String,
    started: Instant,
    done: usize,
    total: usize,
    current: Option<String>,
    interrupted: bool,
    skipped: bool,
}

impl A1111State {
    fn task(&self) -> std::sync::MutexGuard<'_, Option<Task>> {
        self.task.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The running request's task, cleared however the request ends (a client that hangs up
/// drops the handler).
struct TaskGuard(Shared);

impl TaskGuard {
    fn start(st: &Shared, task: Task) -> Self {
        *st.a1111.task() = Some(task);
        TaskGuard(st.clone())
    }
}

impl Drop for TaskGuard {
    fn drop(&mut self) {
        *self.0.a1111.task() = None;
    }
}

pub(super) fn routes() -> Router<Shared> {
    let empty_list = || async { Json(json!([])) };
    let null = || async { Json(Value::Null) };
    Router::new()
        .route("/sdapi/v1/txt2img", post(txt2img))
        .route("/sdapi/v1/img2img", post(img2img))
        .route("/sdapi/v1/progress", get(progress))
        .route("/sdapi/v1/interrupt", post(interrupt))
        .route("/sdapi/v1/skip", post(skip))
        .route("/sdapi/v1/options", get(options).post(set_options))
        .route("/sdapi/v1/sd-models", get(sd_models))
        .route("/sdapi/v1/samplers", get(samplers))
        .route("/sdapi/v1/schedulers", get(schedulers))
        .route("/sdapi/v1/loras", get(loras))
        .route("/sdapi/v1/cmd-flags", get(cmd_flags))
        .route("/sdapi/v1/memory", get(memory))
        .route("/sdapi/v1/png-info", post(png_info))
        .route(
            "/sdapi/v1/embeddings",
            get(|| async { Json(json!({"loaded": {}, "skipped": {}})) }),
        )
        .route(
            "/sdapi/v1/scripts",
            get(|| async { Json(json!({"txt2img": [], "img2img": []})) }),
        )
        .route("/sdapi/v1/upscalers", get(empty_list))
        .route("/sdapi/v1/latent-upscale-modes", get(empty_list))
        .route("/sdapi/v1/sd-vae", get(empty_list))
        .route("/sdapi/v1/hypernetworks", get(empty_list))
        .route("/sdapi/v1/face-restorers", get(empty_list))
        .route("/sdapi/v1/realesrgan-models", get(empty_list))
        .route("/sdapi/v1/prompt-styles", get(empty_list))
        .route("/sdapi/v1/script-info", get(empty_list))
        .route("/sdapi/v1/extensions", get(empty_list))
        .route("/sdapi/v1/refresh-checkpoints", post(null))
        .route("/sdapi/v1/refresh-loras", post(null))
        .route("/sdapi/v1/refresh-embeddings", post(null))
        .route("/sdapi/v1/refresh-vae", post(null))
}

/// Whether a path belongs to this API (its errors take A1111's shapes).
pub(super) fn owns(path: &str) -> bool {
    path.starts_with("/sdapi/")
}

/// An unknown route or method, in FastAPI's shape (`{"detail": "Not Found"}`).
pub(super) fn no_route(status: StatusCode) -> Response {
    let detail = status.canonical_reason().unwrap_or("Not Found");
    (status, Json(json!({ "detail": detail }))).into_response()
}

/// A refused credential, as A1111 with `--api-auth` answers it.
pub(super) fn unauthorized(message: &str) -> Response {
    A1111Error::new(Kind::Unauthorized, message).into_response()
}

fn ready_spec(engine: &Engine) -> Result<Arc<ModelSpec>> {
    engine.ready_spec().map_err(submit_error)
}

fn json_body(body: std::result::Result<Bytes, BytesRejection>, max: usize) -> Result<Value> {
    let body = body.map_err(|r| {
        if r.status() == StatusCode::PAYLOAD_TOO_LARGE {
            A1111Error::new(
                Kind::PayloadTooLarge,
                format!("the body is over this worker's limit of {max} bytes (--max-body-bytes)"),
            )
        } else {
            A1111Error::new(Kind::Json, format!("cannot read the body: {r}"))
        }
    })?;
    crate::json::parse(&body)
        .map_err(|e| A1111Error::new(Kind::Json, format!("the body is not valid JSON: {e}")))
}

async fn txt2img(
    State(st): State<Shared>,
    body: std::result::Result<Bytes, BytesRejection>,
) -> Result<Response> {
    generate(st, body, Mode::Txt2Img).await
}

async fn img2img(
    State(st): State<Shared>,
    body: std::result::Result<Bytes, BytesRejection>,
) -> Result<Response> {
    generate(st, body, Mode::Img2Img).await
}

/// UTC `%Y%m%d%H%M%S`, as A1111 stamps jobs.
fn timestamp() -> String {
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Days to a civil date (proleptic Gregorian).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}{m:02}{d:02}{:02}{:02}{:02}",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

async fn generate(
    st: Shared,
    body: std::result::Result<Bytes, BytesRejection>,
    mode: Mode,
) -> Result<Response> {
    let spec = ready_spec(&st.engine)?;
    let value = json_body(body, st.max_body_bytes)?;
    let mut limits = st.limits.clone();
    // A1111 runs an empty prompt (an unconditional image).
    limits.empty_prompt = true;
    let max_images = limits.max_batch;
    let spec_for_read = spec.clone();
    // Reading and validation decode the input images: off the async workers.
    let (req, request) = tokio::task::spawn_blocking(move || {
        let req = request::read(value, mode, &spec_for_read, max_images)?;
        let request =
            sd_engine::validate(req.draft.clone(), &spec_for_read, &limits, 0).map_err(|e| {
                let field = request::field_of(&e.field);
                A1111Error::field(field, format!("invalid `{field}`: {}", e.reason))
            })?;
        Ok::<_, A1111Error>((req, request))
    })
    .await
    .map_err(|e| {
        A1111Error::new(
            Kind::Server,
            format!("internal error while reading the request: {e}"),
        )
    })??;
    let seed = req
        .seed
        .unwrap_or_else(|| rand::random::<u32>() as u64 % 4_294_967_294);
    let _turn = st.a1111.turn.lock().await;
    let interrupts = st.a1111.interrupts.load(Ordering::SeqCst);
    let job = match mode {
        Mode::Txt2Img => "scripts_txt2img",
        Mode::Img2Img => "scripts_img2img",
    };
    let stamp = timestamp();
    let task = TaskGuard::start(
        &st,
        Task {
            job,
            timestamp: stamp.clone(),
            started: Instant::now(),
            done: 0,
            total: req.images,
            current: None,
            interrupted: false,
            skipped: false,
        },
    );
    let pngs = run_images(&st, &request, seed, req.images, interrupts).await?;
    drop(task);
    let infotexts: Vec<String> = pngs
        .iter()
        .map(|png| {
            sd_engine::images::png::text_chunks(png)
                .into_iter()
                .find(|(k, _)| k == "parameters")
                .map(|(_, v)| v)
                .unwrap_or_default()
        })
        .collect();
    let info = infotext::info_json(&infotext::InfoInput {
        request: &request,
        spec: &spec,
        seed,
        images: pngs.len(),
        batch_size: req.batch_size,
        sampler_name: req.sampler_name,
        schedule: req.schedule,
        infotexts,
        timestamp: stamp,
    });
    let images: Vec<Value> = if req.send_images {
        pngs.iter().map(|p| Value::String(b64(p))).collect()
    } else {
        Vec::new()
    };
    Ok(
        Json(json!({"images": images, "parameters": Value::Object(req.echo), "info": info}))
            .into_response(),
    )
}

fn b64(bytes: &[u8]) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

/// Runs the images one job each, with seeds `seed + i`; `/skip` drops the current image,
/// `/interrupt` the rest; the images made so far are the answer.
async fn run_images(
    st: &Shared,
    request: &sd_engine::GenerationRequest,
    seed: u64,
    count: usize,
    interrupts: u64,
) -> Result<Vec<Arc<Vec<u8>>>> {
    let mut out = Vec::with_capacity(count);
    for i in 0..count {
        if st.a1111.interrupts.load(Ordering::SeqCst) != interrupts {
            break;
        }
        let mut one = request.clone();
        one.params.seed = seed.wrapping_add(i as u64);
        let id = st.engine.submit(one).map_err(submit_error)?;
        if let Some(t) = st.a1111.task().as_mut() {
            t.current = Some(id.clone());
            t.skipped = false;
        }
        let guard = CancelOnDrop::new(&st.engine, &id);
        let ended = super::wait::images(&st.engine, &id).await;
        guard.disarm();
        match ended {
            Ok(pngs) => out.extend(pngs),
            // Skipped or interrupted (`DELETE` of the job counts the same).
            Err(JobEnd::Cancelled("client")) => {}
            Err(JobEnd::Cancelled(reason)) => {
                return Err(A1111Error::new(
                    Kind::Unavailable,
                    format!("the job was cancelled ({reason})"),
                ))
            }
            Err(JobEnd::Failed { message, .. }) => {
                return Err(A1111Error::new(Kind::Server, message))
            }
            Err(JobEnd::Lost) => {
                return Err(A1111Error::new(
                    Kind::Server,
                    "the job disappeared before it finished",
                ))
            }
        }
        if let Some(t) = st.a1111.task().as_mut() {
            t.done = i + 1;
            t.current = None;
        }
    }
    Ok(out)
}

fn submit_error(e: SubmitError) -> A1111Error {
    let message = e.message();
    match e {
        SubmitError::QueueFull { retry_after_s, .. } => A1111Error {
            retry_after: Some(retry_after_s),
            ..A1111Error::new(Kind::QueueFull, message)
        },
        SubmitError::Draining | SubmitError::NotReady(_) => {
            A1111Error::new(Kind::Unavailable, message)
        }
    }
}

/// The query of `GET /progress`.
#[derive(serde::Deserialize)]
struct ProgressQuery {
    #[serde(default)]
    skip_current_image: bool,
}

async fn progress(
    State(st): State<Shared>,
    query: std::result::Result<Query<ProgressQuery>, QueryRejection>,
) -> Json<Value> {
    let skip_image = query.is_ok_and(|q| q.skip_current_image);
    let task = st.a1111.task();
    let Some(t) = task.as_ref() else {
        let state = json!({"skipped": false, "interrupted": false, "stopping_generation": false, "job": "",
            "job_count": 0, "job_timestamp": "0", "job_no": 0, "sampling_step": 0, "sampling_steps": 0});
        return Json(
            json!({"progress": 0.0, "eta_relative": 0.0, "state": state, "current_image": null, "textinfo": null}),
        );
    };
    let (step, steps) = t
        .current
        .as_deref()
        .and_then(|id| st.engine.status(id))
        .filter(|v| v.state == JobState::Running)
        .map_or((0, 0), |v| (v.step, v.total));
    let total = t.total.max(1) as f64;
    let within = if steps > 0 {
        step as f64 / steps as f64
    } else {
        0.0
    };
    let progress = (0.01 + t.done as f64 / total + within / total).min(1.0);
    let elapsed = t.started.elapsed().as_secs_f64();
    let eta = elapsed / progress - elapsed;
    let state = json!({"skipped": t.skipped, "interrupted": t.interrupted, "stopping_generation": false,
        "job": t.job, "job_count": t.total, "job_timestamp": t.timestamp, "job_no": t.done,
        "sampling_step": step, "sampling_steps": steps});
    let image = if skip_image {
        None
    } else {
        t.current
            .as_deref()
            .and_then(|id| st.engine.preview(id))
            .map(|png| b64(&png))
    };
    Json(
        json!({"progress": progress, "eta_relative": eta, "state": state, "current_image": image, "textinfo": null}),
    )
}

/// Stops the running A1111 request after cancelling its current image.
async fn interrupt(State(st): State<Shared>) -> Json<Value> {
    st.a1111.interrupts.fetch_add(1, Ordering::SeqCst);
    let current = {
        let mut task = st.a1111.task();
        task.as_mut().and_then(|t| {
            t.interrupted = true;
            t.current.clone()
        })
    };
    if let Some(id) = current {
        let _ = st.engine.cancel(&id);
    }
    Json(json!({}))
}

/// Drops the current image of the running A1111 request; the request goes on.
async fn skip(State(st): State<Shared>) -> Json<Value> {
    let current = {
        let mut task = st.a1111.task();
        task.as_mut().and_then(|t| {
            t.skipped = true;
            t.current.clone()
        })
    };
    if let Some(id) = current {
        let _ = st.engine.cancel(&id);
    }
    Json(Value::Null)
}

/// The settings this worker has, at the values it runs with.
fn current_options(spec: &ModelSpec) -> Map<String, Value> {
    let v = json!({
        "sd_model_checkpoint": spec.name,
        "sd_checkpoint_hash": null,
        "CLIP_stop_at_last_layers": 1,
        "sd_vae": "Automatic",
        "samples_format": "png",
        "eta_noise_seed_delta": 0,
    });
    match v {
        Value::Object(m) => m,
        _ => Map::new(),
    }
}

async fn options(State(st): State<Shared>) -> Result<Json<Value>> {
    let spec = ready_spec(&st.engine)?;
    Ok(Json(Value::Object(current_options(&spec))))
}

/// Takes settings at the values this worker runs (a client may post back what it read);
/// any other value gets a 422 naming the setting.
async fn set_options(
    State(st): State<Shared>,
    body: std::result::Result<Bytes, BytesRejection>,
) -> Result<Json<Value>> {
    let spec = ready_spec(&st.engine)?;
    let Value::Object(given) = json_body(body, st.max_body_bytes)? else {
        return Err(A1111Error::new(
            Kind::Json,
            "the body must be a JSON object of settings",
        ));
    };
    let current = current_options(&spec);
    for (key, value) in &given {
        let ok = match (key.as_str(), current.get(key)) {
            ("sd_model_checkpoint", _) => value.as_str().is_some_and(|m| names_model(&spec, m)),
            (_, Some(have)) => have == value,
            (_, None) => false,
        };
        if !ok {
            let why = if current.contains_key(key) {
                format!(
                    "this worker runs {} (it serves one model; start another worker for another)",
                    current[key]
                )
            } else {
                format!(
                    "is not a setting of this worker; it has {}",
                    current.keys().cloned().collect::<Vec<_>>().join(", ")
                )
            };
            return Err(A1111Error::field(
                key,
                format!("invalid `{key}`: {why}, got {value}"),
            ));
        }
    }
    Ok(Json(Value::Null))
}

async fn sd_models(State(st): State<Shared>) -> Result<Json<Value>> {
    let spec = ready_spec(&st.engine)?;
    Ok(Json(json!([{
        "title": spec.name,
        "model_name": spec.name,
        "hash": null,
        "sha256": null,
        "filename": spec.path.display().to_string(),
        "config": null,
    }])))
}

/// A1111's sampler list: name, aliases and the options its UI reads (`scheduler`: the
/// schedule "Automatic" stands for).
async fn samplers() -> Json<Value> {
    use sd_models::samplers::{SamplerKind, Schedule};
    let list: Vec<Value> = SamplerKind::all()
        .map(|k| {
            let mut options = serde_json::Map::new();
            let auto = request::a1111_automatic(k);
            if auto != Schedule::Model {
                options.insert("scheduler".into(), json!(auto.a1111_name()));
            }
            if k.evals_per_step() == 2 {
                options.insert("second_order".into(), json!(true));
            }
            let mut aliases = vec![k.name()];
            aliases.extend(k.aliases());
            json!({"name": k.a1111_name(), "aliases": aliases, "options": options})
        })
        .collect();
    Json(Value::Array(list))
}

/// A1111's schedule list (`/sdapi/v1/schedulers`).
async fn schedulers() -> Json<Value> {
    use sd_models::samplers::Schedule;
    let list: Vec<Value> = Schedule::ALL
        .iter()
        .map(|s| {
            let rho = if *s == Schedule::Karras { 7.0 } else { -1.0 };
            json!({
                "name": s.a1111_name(),
                "label": s.a1111_label(),
                "aliases": null,
                "default_rho": rho,
                "need_inner_model": false,
            })
        })
        .collect();
    Json(Value::Array(list))
}

/// The LoRA files of `--lora-dir` (none without one).
async fn loras(State(st): State<Shared>) -> Json<Value> {
    let LoraFiles::InFolder(dir) = st.limits.loras.clone() else {
        return Json(json!([]));
    };
    // A walk of the file system: off the async workers.
    let list = tokio::task::spawn_blocking(move || lora_files(&dir))
        .await
        .unwrap_or_default();
    Json(Value::Array(list))
}

/// The `.safetensors` files under `dir`, bounded: at most 1,000 folders are read (symbolic
/// link loops included) and 10,000 files listed.
fn lora_files(dir: &std::path::Path) -> Vec<Value> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    let mut folders = 0;
    while let Some(d) = stack.pop() {
        folders += 1;
        if folders > 1_000 {
            break;
        }
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for path in entries.flatten().map(|e| e.path()) {
            if path.is_dir() {
                if stack.len() < 1_000 {
                    stack.push(path);
                }
            } else if path.extension().is_some_and(|e| e == "safetensors") && out.len() < 10_000 {
                let stem = path
                    .file_stem()
                    .map(|s| s.to_string_lossy().into_owned())
                    .unwrap_or_default();
                out.push(json!({"name": stem, "alias": stem, "path": path.display().to_string(), "metadata": {}}));
            }
        }
    }
    out
}

async fn cmd_flags(State(st): State<Shared>) -> Json<Value> {
    let lora_dir = match &st.limits.loras {
        LoraFiles::InFolder(d) => Some(d.display().to_string()),
        _ => None,
    };
    Json(
        json!({"api": true, "nowebui": true, "api_auth": st.api_key.is_some(), "lora_dir": lora_dir}),
    )
}

/// RAM of the machine (from /proc/meminfo on Linux); no CUDA statistics.
async fn memory() -> Json<Value> {
    let kb = |key: &str, text: &str| -> Option<u64> {
        text.lines()
            .find(|l| l.starts_with(key))?
            .split_whitespace()
            .nth(1)?
            .parse::<u64>()
            .ok()
            .map(|k| k * 1024)
    };
    let ram = match std::fs::read_to_string("/proc/meminfo") {
        Ok(text) => match (kb("MemTotal:", &text), kb("MemAvailable:", &text)) {
            (Some(total), Some(free)) => {
                json!({"free": free, "used": total.saturating_sub(free), "total": total})
            }
            _ => json!({"error": "unreadable"}),
        },
        Err(_) => json!({"error": "unavailable"}),
    };
    Json(json!({"ram": ram, "cuda": {"error": "unavailable"}}))
}

/// The `parameters` text of an image and the fields A1111 parses from it.
async fn png_info(
    State(st): State<Shared>,
    body: std::result::Result<Bytes, BytesRejection>,
) -> Result<Json<Value>> {
    let body = json_body(body, st.max_body_bytes)?;
    let image = match body.get("image") {
        Some(Value::String(s)) if !s.is_empty() => s.clone(),
        _ => return Err(A1111Error::new(Kind::NotFound, "Image not found")),
    };
    let bytes = sd_engine::images::input::decode_base64(&image)
        .map_err(|e| A1111Error::field("image", format!("invalid `image`: {e}")))?;
    let chunks = sd_engine::images::png::text_chunks(&bytes);
    let info = chunks
        .iter()
        .find(|(k, _)| k == "parameters")
        .map(|(_, v)| v.clone())
        .unwrap_or_default();
    let items: Map<String, Value> = chunks
        .into_iter()
        .filter(|(k, _)| k != "parameters")
        .map(|(k, v)| (k, Value::String(v)))
        .collect();
    let parameters = infotext::parse(&info);
    Ok(Json(
        json!({"info": info, "items": items, "parameters": parameters}),
    ))
}
