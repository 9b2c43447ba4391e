//! The generation engine: one thread owns the model and runs queued jobs one at a time.
//!
//! HTTP handlers only touch the job store (behind a mutex): they submit, cancel, read status
//! and subscribe to events. The engine thread pops jobs in FIFO order and runs them on its
//! [`Backend`]; every event of a running job (progress, preview, the result) goes through a
//! second thread, the publisher, which encodes images (PNG, base64) off the engine thread and
//! then updates the store and broadcasts, so events reach subscribers in order.

use std::collections::{HashMap, VecDeque};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{mpsc, Arc, Condvar, Mutex, MutexGuard};
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use candle_core::Tensor;
use sd_models::lora::LoraSpec;
use sd_models::pipelines::flux::{FluxParams, FluxPipeline};
use sd_models::pipelines::{GenerateParams, Generated, ImageInput, Progress, RgbImage, SdPipeline};
use sd_models::samplers::{SamplerKind, SchedulerConfig};
use serde_json::{json, Value};
use tokio::sync::broadcast;

use crate::metrics::Metrics;
use crate::png_out::{encode_png, Parameters};

/// What a preview shows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
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
}

/// What the engine runs jobs on: the loaded pipeline, or a fake one in tests.
pub trait Backend {
    /// Text-to-image, or image-to-image when `input` is given.
    fn generate(
        &self,
        request: &JobRequest,
        on_step: &mut dyn FnMut(Progress<'_>) -> sd_models::Result<()>,
    ) -> sd_models::Result<Generated>;
    /// A preview of the first image of a step's `latents`.
    fn preview(
        &self,
        latents: &Tensor,
        request: &JobRequest,
        kind: PreviewKind,
    ) -> sd_models::Result<RgbImage>;
}

impl Backend for SdPipeline {
    fn generate(
        &self,
        request: &JobRequest,
        on_step: &mut dyn FnMut(Progress<'_>) -> sd_models::Result<()>,
    ) -> sd_models::Result<Generated> {
        let run = || match request.input.as_deref() {
            Some(input) => self.generate_from_image(&request.params, input, on_step),
            None => SdPipeline::generate(self, &request.params, on_step),
        };
        let (mut generated, warnings) = sd_models::lora::run_with(
            &request.loras,
            &self.lora_layers,
            &self.device,
            self.dtype,
            run,
        )?;
        generated.warnings = warnings;
        Ok(generated)
    }

    fn preview(
        &self,
        latents: &Tensor,
        _request: &JobRequest,
        kind: PreviewKind,
    ) -> sd_models::Result<RgbImage> {
        let first = latents.narrow(0, 0, 1)?;
        let mut images = match kind {
            PreviewKind::Approx => sd_models::pipelines::latent_preview(&first)?,
            PreviewKind::Full => self.decode(&first)?,
        };
        images.pop().ok_or_else(|| {
            sd_models::Error::Candle(candle_core::Error::Msg("empty preview".into()))
        })
    }
}

impl Backend for FluxPipeline {
    fn generate(
        &self,
        request: &JobRequest,
        on_step: &mut dyn FnMut(Progress<'_>) -> sd_models::Result<()>,
    ) -> sd_models::Result<Generated> {
        let p = &request.params;
        let fp = flux_params(p);
        let max_seq = request
            .max_sequence_length
            .unwrap_or(self.default_max_sequence_length());
        let run = || match request.input.as_deref() {
            Some(input) if input.mask.is_some() => Err(sd_models::Error::invalid(
                "operation",
                "FLUX inpainting is not supported yet",
            )),
            Some(input) => self.generate_from_image(
                &p.prompt,
                max_seq,
                &input.image,
                input.strength,
                &fp,
                on_step,
            ),
            None => FluxPipeline::generate(self, &p.prompt, max_seq, &fp, on_step),
        };
        let ((images, truncated), warnings) = sd_models::lora::run_with(
            &request.loras,
            &self.lora_layers,
            &self.core.device,
            self.core.dtype,
            run,
        )?;
        Ok(Generated {
            images,
            truncated_tokens: truncated,
            warnings,
        })
    }

    fn preview(
        &self,
        latents: &Tensor,
        request: &JobRequest,
        kind: PreviewKind,
    ) -> sd_models::Result<RgbImage> {
        let f = self.core.latent_factor();
        let p = &request.params;
        let (lh, lw) = (2 * (p.height / (2 * f)), 2 * (p.width / (2 * f)));
        let z = sd_models::pipelines::flux::unpack(&latents.narrow(0, 0, 1)?, lh, lw)?;
        let mut images = match kind {
            PreviewKind::Approx => sd_models::pipelines::latent_preview(&z)?,
            PreviewKind::Full => {
                let cfg = &self.core.vae.config;
                let z = ((z / cfg.scaling_factor)? + cfg.shift_factor)?;
                sd_models::pipelines::sd::to_rgb8(&self.core.vae.decode_unscaled(&z)?)?
            }
        };
        images.pop().ok_or_else(|| {
            sd_models::Error::Candle(candle_core::Error::Msg("empty preview".into()))
        })
    }
}

/// A job's settings as FLUX takes them.
pub fn flux_params(p: &GenerateParams) -> FluxParams {
    FluxParams {
        width: p.width,
        height: p.height,
        steps: p.steps,
        guidance: p.guidance,
        seed: p.seed,
        batch: p.batch,
    }
}

/// The model a worker serves.
pub enum Model {
    Sd(Box<SdPipeline>),
    Flux(Box<FluxPipeline>),
}

impl Backend for Model {
    fn generate(
        &self,
        request: &JobRequest,
        on_step: &mut dyn FnMut(Progress<'_>) -> sd_models::Result<()>,
    ) -> sd_models::Result<Generated> {
        match self {
            Model::Sd(m) => Backend::generate(m.as_ref(), request, on_step),
            Model::Flux(m) => Backend::generate(m.as_ref(), request, on_step),
        }
    }

    fn preview(
        &self,
        latents: &Tensor,
        request: &JobRequest,
        kind: PreviewKind,
    ) -> sd_models::Result<RgbImage> {
        match self {
            Model::Sd(m) => m.as_ref().preview(latents, request, kind),
            Model::Flux(m) => m.as_ref().preview(latents, request, kind),
        }
    }
}

/// What the HTTP layer needs to know about the loaded model to validate requests.
#[derive(Debug, Clone)]
pub struct ModelSpec {
    /// Short name (the folder name), written into the PNG `parameters`.
    pub name: String,
    pub path: PathBuf,
    /// `org/name` when the folder is a snapshot in a Hugging Face hub cache
    /// (`.../models--org--name/snapshots/REV`).
    pub repo_id: Option<String>,
    pub family: String,
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
}

/// What a job does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Operation {
    Generation,
    Transform,
    Inpaint,
}

impl Operation {
    pub fn name(self) -> &'static str {
        match self {
            Operation::Generation => "image_generation",
            Operation::Transform => "image_transform",
            Operation::Inpaint => "image_inpaint",
        }
    }
}

/// A validated job, with every default already applied.
#[derive(Debug, Clone)]
pub struct JobRequest {
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
    /// LoRA adapters for this job only (resolved inside --lora-dir).
    pub loras: Vec<LoraSpec>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JobState {
    Queued,
    Running,
    Completed,
    Failed,
    Cancelled,
}

impl JobState {
    pub fn name(self) -> &'static str {
        match self {
            JobState::Queued => "queued",
            JobState::Running => "running",
            JobState::Completed => "completed",
            JobState::Failed => "failed",
            JobState::Cancelled => "cancelled",
        }
    }

    pub fn is_final(self) -> bool {
        matches!(
            self,
            JobState::Completed | JobState::Failed | JobState::Cancelled
        )
    }
}

/// Why a job was cancelled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CancelReason {
    /// `DELETE /v1/jobs/{id}`.
    Client,
    /// `--job-timeout` passed since the job started.
    Timeout,
    /// The worker is shutting down.
    Shutdown,
}

impl CancelReason {
    pub fn name(self) -> &'static str {
        match self {
            CancelReason::Client => "client",
            CancelReason::Timeout => "timeout",
            CancelReason::Shutdown => "shutdown",
        }
    }

    fn code(self) -> u8 {
        match self {
            CancelReason::Client => 1,
            CancelReason::Timeout => 2,
            CancelReason::Shutdown => 3,
        }
    }

    fn from_code(c: u8) -> Option<Self> {
        match c {
            1 => Some(CancelReason::Client),
            2 => Some(CancelReason::Timeout),
            3 => Some(CancelReason::Shutdown),
            _ => None,
        }
    }
}

/// One Server-Sent Event, serialised once and shared by every subscriber.
#[derive(Debug)]
pub struct JobEvent {
    /// The SSE `event:` name, also the `type` field of `data`.
    pub name: &'static str,
    /// JSON text.
    pub data: String,
}

pub type EventRef = Arc<JobEvent>;

fn event(name: &'static str, mut data: Value) -> EventRef {
    if let Value::Object(map) = &mut data {
        map.insert("type".into(), Value::String(name.into()));
    }
    Arc::new(JobEvent {
        name,
        data: data.to_string(),
    })
}

/// Limits and lifetimes of the engine.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// Waiting jobs at most (the running one is not counted).
    pub max_queue: usize,
    /// How long finished jobs are kept.
    pub result_ttl: Duration,
    /// Finished jobs kept at most.
    pub max_results: usize,
    /// A running job is cancelled this long after it started.
    pub job_timeout: Duration,
}

/// Seconds spent in each phase of a job.
#[derive(Debug, Clone, Default)]
struct Timings {
    queue: Option<f64>,
    generation: Option<f64>,
    preview: f64,
    encode: Option<f64>,
    total: Option<f64>,
}

impl Timings {
    fn to_json(&self) -> Value {
        json!({
            "queue": self.queue,
            "generation": self.generation,
            "preview": self.preview,
            "encode": self.encode,
            "total": self.total,
        })
    }
}

struct Job {
    id: String,
    request: Arc<JobRequest>,
    state: JobState,
    step: usize,
    total: usize,
    created_unix: f64,
    queued_at: Instant,
    started_at: Option<Instant>,
    finished_at: Option<Instant>,
    timings: Timings,
    cancel: Arc<AtomicU8>,
    cancel_reason: Option<CancelReason>,
    error: Option<(String, String)>,
    /// The job's last step is done: it can no longer be cancelled.
    finishing: bool,
    events: broadcast::Sender<EventRef>,
    /// The `error` or `cancelled` event once the job failed or was cancelled (the `complete`
    /// event is rebuilt from `images` for late subscribers, so that results are kept once).
    final_event: Option<EventRef>,
    /// PNG bytes of each result image.
    images: Vec<Arc<Vec<u8>>>,
    /// Warnings of the completed job (LoRA keys not applied).
    warnings: Vec<String>,
}

/// Events buffered per job for slow subscribers.
const EVENT_BUFFER: usize = 64;

/// Where the worker is in its life.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Phase {
    Loading,
    Ready,
    Draining,
    /// Loading the model failed; the process exits.
    Failed(String),
}

struct Store {
    phase: Phase,
    spec: Option<Arc<ModelSpec>>,
    jobs: HashMap<String, Job>,
    queue: VecDeque<String>,
    /// Finished job ids, oldest first.
    finished: VecDeque<String>,
    /// The engine thread should exit once the queue is empty.
    stopping: bool,
    /// False once the engine thread has ended.
    engine_alive: bool,
    metrics: Metrics,
}

impl Store {
    /// Drops finished jobs past their time to live, then the oldest beyond `max_results`.
    fn prune(&mut self, config: &EngineConfig, now: Instant) {
        while let Some(id) = self.finished.front() {
            let expired = match self.jobs.get(id) {
                Some(job) => job
                    .finished_at
                    .is_none_or(|t| now.duration_since(t) >= config.result_ttl),
                None => true,
            };
            if !expired && self.finished.len() <= config.max_results {
                break;
            }
            if let Some(id) = self.finished.pop_front() {
                self.jobs.remove(&id);
            }
        }
    }

    fn position(&self, id: &str) -> Option<usize> {
        self.queue.iter().position(|q| q == id).map(|p| p + 1)
    }

    /// Tells every queued job from index `from` on its new position.
    fn announce_positions(&self, from: usize) {
        for (i, id) in self.queue.iter().enumerate().skip(from) {
            if let Some(job) = self.jobs.get(id) {
                let _ = job
                    .events
                    .send(event("queued", json!({ "position": i + 1 })));
            }
        }
    }

    /// Marks a job final and broadcasts its last event.
    fn finish(&mut self, id: &str, state: JobState, ev: EventRef, now: Instant) {
        let Some(job) = self.jobs.get_mut(id) else {
            return;
        };
        job.state = state;
        job.finished_at = Some(now);
        job.timings.total = Some(now.duration_since(job.queued_at).as_secs_f64());
        if job.timings.queue.is_none() {
            job.timings.queue = job.timings.total;
        }
        if state != JobState::Completed {
            job.final_event = Some(ev.clone());
        }
        let _ = job.events.send(ev);
        // Nothing follows the final event: drop the sender, so that buffered events are freed
        // once the current subscribers have read them.
        job.events = broadcast::channel(1).0;
        let total = job.timings.total.unwrap_or(0.0);
        self.metrics.job_finished(state, total);
        self.finished.push_back(id.to_string());
    }

    /// Fails a job that is not final yet (queued or running).
    fn fail(&mut self, id: &str, kind: &str, message: &str, now: Instant) {
        match self.jobs.get_mut(id) {
            Some(job) if !job.state.is_final() => {
                job.error = Some((kind.to_string(), message.to_string()));
            }
            _ => return,
        }
        self.queue.retain(|q| q != id);
        self.finish(id, JobState::Failed, error_event(kind, message), now);
    }

    fn cancelled_event(reason: CancelReason) -> EventRef {
        event("cancelled", json!({ "reason": reason.name() }))
    }

    fn view(&self, job: &Job) -> Value {
        let r = &job.request;
        let p = &r.params;
        let images: Vec<String> = (0..job.images.len())
            .map(|n| format!("/v1/jobs/{}/images/{n}", job.id))
            .collect();
        let percent = if job.total > 0 {
            (job.step as f64 * 100.0 / job.total as f64 * 10.0).round() / 10.0
        } else {
            0.0
        };
        json!({
            "job_id": job.id,
            "operation": r.operation.name(),
            "state": job.state.name(),
            "position": self.position(&job.id),
            "step": job.step,
            "total": job.total,
            "percent": percent,
            "created_at": job.created_unix,
            "timings": job.timings.to_json(),
            "seed": p.seed,
            "error": job.error.as_ref().map(|(t, m)| json!({"type": t, "message": m})),
            "cancel_reason": job.cancel_reason.map(CancelReason::name),
            "cancel_requested": job.state == JobState::Running
                && job.cancel.load(Ordering::SeqCst) != 0,
            "hive_id": r.hive_id,
            "worker_id": r.worker_id,
            "images": images,
            "status_url": format!("/v1/jobs/{}", job.id),
            "events_url": format!("/v1/jobs/{}/events", job.id),
            "request": {
                "prompt": p.prompt,
                "negative_prompt": p.negative_prompt,
                "width": p.width,
                "height": p.height,
                "steps": p.steps,
                "guidance_scale": p.guidance,
                "seed": p.seed,
                "scheduler": if r.flux.is_some() { "flow-match-euler" } else { p.sampler.name() },
                "max_sequence_length": r.max_sequence_length,
                "batch": p.batch,
                "preview_every": r.preview_every,
                "preview": r.preview.name(),
                "strength": r.input.as_ref().map(|i| i.strength),
                "loras": r.loras.iter().map(|l| json!({
                    "path": l.name,
                    "strength": l.strength,
                    "strict": l.strict,
                })).collect::<Vec<_>>(),
            },
            "warnings": job.warnings,
        })
    }
}

/// Why a submission was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SubmitError {
    NotReady(String),
    Draining,
    QueueFull { max: usize, retry_after_s: u64 },
}

/// Outcome of a cancel request.
#[derive(Debug)]
pub enum CancelOutcome {
    /// The job was queued and is now cancelled.
    Cancelled(Value),
    /// The job is running and stops after its current step.
    Stopping(Value),
    /// The job had already finished.
    AlreadyFinished(JobState),
    /// The job's last step is done; its images are being decoded and encoded.
    Finishing,
    NotFound,
}

struct Inner {
    store: Mutex<Store>,
    wake: Condvar,
    config: EngineConfig,
}

impl Inner {
    fn store(&self) -> MutexGuard<'_, Store> {
        // A panic while holding the lock is a bug in this file; the data stays usable.
        self.store.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// A handle on the engine, cheap to clone and share between handlers.
#[derive(Clone)]
pub struct Engine {
    inner: Arc<Inner>,
}

/// Loads the model on the engine thread.
pub type Loader<B> = Box<dyn FnOnce() -> anyhow::Result<(B, ModelSpec)> + Send>;

fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

fn new_job_id() -> String {
    let a: u64 = rand::random();
    let b: u64 = rand::random();
    format!("{a:016x}{b:016x}")
}

fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "panic".into()
    }
}

impl Engine {
    /// Starts the engine thread, which first runs `loader`. The returned receiver gets the
    /// loading outcome once.
    pub fn start<B: Backend + 'static>(
        config: EngineConfig,
        loader: Loader<B>,
    ) -> (Engine, mpsc::Receiver<Result<(), String>>) {
        let inner = Arc::new(Inner {
            store: Mutex::new(Store {
                phase: Phase::Loading,
                spec: None,
                jobs: HashMap::new(),
                queue: VecDeque::new(),
                finished: VecDeque::new(),
                stopping: false,
                engine_alive: true,
                metrics: Metrics::default(),
            }),
            wake: Condvar::new(),
            config,
        });
        let (loaded_tx, loaded_rx) = mpsc::channel();
        let thread_inner = inner.clone();
        let spawned = thread::Builder::new()
            .name("engine".into())
            .spawn(move || engine_main(thread_inner, loader, loaded_tx));
        if let Err(e) = spawned {
            let message = format!("cannot start the engine thread: {e}");
            inner.store().phase = Phase::Failed(message.clone());
            let (tx, rx) = mpsc::channel();
            let _ = tx.send(Err(message));
            return (Engine { inner }, rx);
        }
        (Engine { inner }, loaded_rx)
    }

    pub fn config(&self) -> &EngineConfig {
        &self.inner.config
    }

    pub fn phase(&self) -> Phase {
        self.inner.store().phase.clone()
    }

    pub fn spec(&self) -> Option<Arc<ModelSpec>> {
        self.inner.store().spec.clone()
    }

    /// Queues a job; returns its id.
    pub fn submit(&self, request: JobRequest) -> Result<String, SubmitError> {
        let mut s = self.inner.store();
        match &s.phase {
            Phase::Loading => return Err(SubmitError::NotReady("loading".into())),
            Phase::Failed(m) => return Err(SubmitError::NotReady(m.clone())),
            Phase::Draining => return Err(SubmitError::Draining),
            Phase::Ready => {}
        }
        let max = self.inner.config.max_queue;
        if s.queue.len() >= max {
            s.metrics.rejected_queue_full += 1;
            let per_job = s.metrics.mean_job_seconds().unwrap_or(1.0);
            return Err(SubmitError::QueueFull {
                max,
                retry_after_s: per_job.ceil().clamp(1.0, 3600.0) as u64,
            });
        }
        let id = new_job_id();
        // A reader more than this many events behind skips to the newest ones.
        let (events, _) = broadcast::channel(EVENT_BUFFER);
        let job = Job {
            id: id.clone(),
            request: Arc::new(request),
            state: JobState::Queued,
            step: 0,
            total: 0,
            created_unix: unix_now(),
            queued_at: Instant::now(),
            started_at: None,
            finished_at: None,
            timings: Timings::default(),
            cancel: Arc::new(AtomicU8::new(0)),
            cancel_reason: None,
            error: None,
            finishing: false,
            events,
            final_event: None,
            images: Vec::new(),
            warnings: Vec::new(),
        };
        s.jobs.insert(id.clone(), job);
        s.queue.push_back(id.clone());
        s.metrics.submitted += 1;
        drop(s);
        self.inner.wake.notify_all();
        Ok(id)
    }

    /// The status of one job.
    pub fn status(&self, id: &str) -> Option<Value> {
        let mut s = self.inner.store();
        s.prune(&self.inner.config, Instant::now());
        s.jobs.get(id).map(|job| s.view(job))
    }

    /// Queued (in queue order), running, then finished jobs (newest first).
    pub fn list(&self) -> Value {
        let mut s = self.inner.store();
        s.prune(&self.inner.config, Instant::now());
        let mut out = Vec::new();
        for id in &s.queue {
            if let Some(job) = s.jobs.get(id) {
                out.push(s.view(job));
            }
        }
        for job in s.jobs.values().filter(|j| j.state == JobState::Running) {
            out.push(s.view(job));
        }
        for id in s.finished.iter().rev() {
            if let Some(job) = s.jobs.get(id) {
                out.push(s.view(job));
            }
        }
        Value::Array(out)
    }

    /// Cancels a queued job at once, or asks a running one to stop after its current step.
    pub fn cancel(&self, id: &str) -> CancelOutcome {
        let mut s = self.inner.store();
        let now = Instant::now();
        s.prune(&self.inner.config, now);
        let Some(job) = s.jobs.get(id) else {
            return CancelOutcome::NotFound;
        };
        match job.state {
            JobState::Queued => {
                let index = s.queue.iter().position(|q| q == id);
                if let Some(i) = index {
                    s.queue.remove(i);
                }
                if let Some(job) = s.jobs.get_mut(id) {
                    job.cancel_reason = Some(CancelReason::Client);
                }
                s.finish(
                    id,
                    JobState::Cancelled,
                    Store::cancelled_event(CancelReason::Client),
                    now,
                );
                s.announce_positions(index.unwrap_or(0));
                match s.jobs.get(id) {
                    Some(job) => CancelOutcome::Cancelled(s.view(job)),
                    None => CancelOutcome::NotFound,
                }
            }
            JobState::Running if job.finishing => CancelOutcome::Finishing,
            JobState::Running => {
                let _ = job.cancel.compare_exchange(
                    0,
                    CancelReason::Client.code(),
                    Ordering::SeqCst,
                    Ordering::SeqCst,
                );
                CancelOutcome::Stopping(s.view(job))
            }
            state => CancelOutcome::AlreadyFinished(state),
        }
    }

    /// The events a new subscriber starts with (the job's current state, or its final event),
    /// and the live feed unless the job is already final. `None` for an unknown job.
    pub fn subscribe(
        &self,
        id: &str,
    ) -> Option<(Vec<EventRef>, Option<broadcast::Receiver<EventRef>>)> {
        let mut s = self.inner.store();
        s.prune(&self.inner.config, Instant::now());
        let job = s.jobs.get(id)?;
        let mut first = Vec::new();
        match job.state {
            JobState::Queued => {
                let position = s.position(id).unwrap_or(0);
                first.push(event("queued", json!({ "position": position })));
            }
            JobState::Running => {
                first.push(event("started", json!({})));
                if job.step > 0 {
                    first.push(progress_event(job.step, job.total));
                }
            }
            JobState::Completed => {
                let images = job.images.clone();
                let seed = job.request.params.seed;
                let operation = job.request.operation;
                let method = (operation == Operation::Inpaint)
                    .then(|| s.spec.as_ref().map(|m| m.inpaint_method))
                    .flatten();
                let timings = job.timings.to_json();
                let warnings = job.warnings.clone();
                drop(s);
                // Base64 outside the lock.
                let encoded: Vec<String> = images.iter().map(|p| b64(p)).collect();
                first.push(complete_event(Completion {
                    encoded,
                    operation,
                    inpaint_method: method,
                    seed,
                    timings,
                    warnings,
                }));
                return Some((first, None));
            }
            _ => {
                if let Some(ev) = &job.final_event {
                    first.push(ev.clone());
                }
                return Some((first, None));
            }
        }
        Some((first, Some(job.events.subscribe())))
    }

    /// PNG bytes of result image `n`.
    pub fn image(&self, id: &str, n: usize) -> Option<Result<Arc<Vec<u8>>, JobState>> {
        let mut s = self.inner.store();
        s.prune(&self.inner.config, Instant::now());
        let job = s.jobs.get(id)?;
        if job.state != JobState::Completed {
            return Some(Err(job.state));
        }
        job.images.get(n).cloned().map(Ok)
    }

    /// Prometheus text exposition.
    pub fn metrics_text(&self) -> String {
        let s = self.inner.store();
        let running = s
            .jobs
            .values()
            .filter(|j| j.state == JobState::Running)
            .count();
        s.metrics.render(s.queue.len(), running, &s.phase)
    }

    /// Stops admitting jobs and cancels the queued ones.
    pub fn begin_drain(&self) {
        let mut s = self.inner.store();
        if matches!(s.phase, Phase::Ready | Phase::Loading) {
            s.phase = Phase::Draining;
        }
        s.stopping = true;
        let now = Instant::now();
        let queued: Vec<String> = s.queue.drain(..).collect();
        for id in queued {
            if let Some(job) = s.jobs.get_mut(&id) {
                job.cancel_reason = Some(CancelReason::Shutdown);
            }
            s.finish(
                &id,
                JobState::Cancelled,
                Store::cancelled_event(CancelReason::Shutdown),
                now,
            );
        }
        drop(s);
        self.inner.wake.notify_all();
    }

    /// True while a job is queued or running (or its result is still being published).
    pub fn busy(&self) -> bool {
        let s = self.inner.store();
        s.engine_alive && s.jobs.values().any(|j| !j.state.is_final())
    }

    /// Asks running jobs to stop after their current step.
    pub fn cancel_running(&self, reason: CancelReason) {
        let s = self.inner.store();
        for job in s.jobs.values().filter(|j| j.state == JobState::Running) {
            let _ =
                job.cancel
                    .compare_exchange(0, reason.code(), Ordering::SeqCst, Ordering::SeqCst);
        }
    }

    /// Drains: cancels queued jobs, waits up to `grace` for the running job, then cancels it
    /// and waits for it to stop (it stops after its current step). Blocking.
    pub fn shutdown(&self, grace: Duration) {
        self.begin_drain();
        let deadline = Instant::now().checked_add(grace);
        while self.busy() && deadline.is_none_or(|d| Instant::now() < d) {
            thread::sleep(Duration::from_millis(20));
        }
        if self.busy() {
            self.cancel_running(CancelReason::Shutdown);
            while self.busy() {
                thread::sleep(Duration::from_millis(20));
            }
        }
    }
}

fn error_event(kind: &str, message: &str) -> EventRef {
    event(
        "error",
        json!({
            "message": message,
            "error": { "type": kind, "message": message },
        }),
    )
}

/// What a `complete` event reports.
struct Completion<'a> {
    encoded: Vec<String>,
    operation: Operation,
    inpaint_method: Option<&'a str>,
    seed: u64,
    timings: Value,
    warnings: Vec<String>,
}

fn complete_event(c: Completion<'_>) -> EventRef {
    let first = c.encoded.first().cloned().unwrap_or_default();
    event(
        "complete",
        json!({
            "operation": c.operation.name(),
            "inpaint_method": c.inpaint_method,
            "images": c.encoded,
            "image": first,
            "format": "png",
            "seed": c.seed,
            "timings": c.timings,
            "warnings": c.warnings,
        }),
    )
}

fn progress_event(step: usize, total: usize) -> EventRef {
    let percent = if total > 0 {
        (step as f64 * 1000.0 / total as f64).round() / 10.0
    } else {
        0.0
    };
    event(
        "progress",
        json!({ "step": step, "total": total, "percent": percent }),
    )
}

/// What the engine thread hands to the publisher.
enum Publish {
    Progress {
        id: String,
        step: usize,
        total: usize,
    },
    Preview {
        id: String,
        step: usize,
        total: usize,
        image: RgbImage,
        seconds: f64,
    },
    Finish {
        id: String,
        outcome: Outcome,
        generation: f64,
    },
}

enum Outcome {
    Completed(Generated),
    Failed { kind: &'static str, message: String },
    Cancelled(CancelReason),
}

/// Marks the engine thread gone when it ends, however it ends. If that was not asked for,
/// the worker stops being ready and the jobs it held fail instead of waiting forever.
struct EngineGuard(Arc<Inner>);

impl Drop for EngineGuard {
    fn drop(&mut self) {
        let mut s = self.0.store();
        s.engine_alive = false;
        if s.stopping {
            return;
        }
        if !matches!(s.phase, Phase::Failed(_)) {
            s.phase = Phase::Failed("the engine thread stopped unexpectedly".into());
            eprintln!("error: the engine thread stopped unexpectedly; no more jobs can run");
        }
        let now = Instant::now();
        let open: Vec<String> = s
            .jobs
            .values()
            .filter(|j| !j.state.is_final())
            .map(|j| j.id.clone())
            .collect();
        for id in open {
            s.fail(
                &id,
                "internal",
                "the engine thread stopped unexpectedly",
                now,
            );
        }
    }
}

fn engine_main<B: Backend + 'static>(
    inner: Arc<Inner>,
    loader: Loader<B>,
    loaded: mpsc::Sender<Result<(), String>>,
) {
    let _guard = EngineGuard(inner.clone());
    let backend = match catch_unwind(AssertUnwindSafe(loader)) {
        Ok(Ok((backend, spec))) => {
            let mut s = inner.store();
            s.spec = Some(Arc::new(spec));
            if s.phase == Phase::Loading {
                s.phase = Phase::Ready;
            }
            backend
        }
        Ok(Err(e)) => {
            let message = format!("{e:#}");
            inner.store().phase = Phase::Failed(message.clone());
            let _ = loaded.send(Err(message));
            return;
        }
        Err(panic) => {
            let message = format!(
                "internal error while loading: {}",
                panic_message(panic.as_ref())
            );
            inner.store().phase = Phase::Failed(message.clone());
            let _ = loaded.send(Err(message));
            return;
        }
    };
    let _ = loaded.send(Ok(()));

    let (tx, rx) = mpsc::channel();
    let publisher_inner = inner.clone();
    let publisher = thread::Builder::new()
        .name("publisher".into())
        .spawn(move || publisher_main(publisher_inner, rx));
    let publisher = match publisher {
        Ok(p) => p,
        Err(e) => {
            inner.store().phase = Phase::Failed(format!("cannot start the publisher: {e}"));
            return;
        }
    };

    loop {
        let next = {
            let mut s = inner.store();
            loop {
                s.prune(&inner.config, Instant::now());
                if let Some(id) = s.queue.pop_front() {
                    let now = Instant::now();
                    let started = s.jobs.get_mut(&id).map(|job| {
                        job.state = JobState::Running;
                        job.started_at = Some(now);
                        job.timings.queue = Some(now.duration_since(job.queued_at).as_secs_f64());
                        let _ = job.events.send(event("started", json!({})));
                        (job.request.clone(), job.cancel.clone())
                    });
                    s.announce_positions(0);
                    if let Some((request, cancel)) = started {
                        break Some((id, request, cancel, now));
                    }
                    continue;
                }
                if s.stopping {
                    break None;
                }
                s = inner
                    .wake
                    .wait_timeout(s, Duration::from_secs(1))
                    .map(|(g, _)| g)
                    .unwrap_or_else(|e| e.into_inner().0);
            }
        };
        let Some((id, request, cancel, started)) = next else {
            break;
        };
        run_job(&backend, &inner, &tx, id, &request, &cancel, started);
    }
    drop(tx);
    let _ = publisher.join();
}

fn run_job<B: Backend>(
    backend: &B,
    inner: &Inner,
    tx: &mpsc::Sender<Publish>,
    id: String,
    request: &JobRequest,
    cancel: &AtomicU8,
    started: Instant,
) {
    // A timeout too large to represent means no deadline.
    let deadline = started.checked_add(inner.config.job_timeout);
    let mut stop: Option<CancelReason> = None;
    let mut last = Instant::now();
    let result = catch_unwind(AssertUnwindSafe(|| {
        backend.generate(request, &mut |p| {
            let now = Instant::now();
            if p.step > 1 {
                // The first interval also holds prompt encoding: not a step time.
                inner
                    .store()
                    .metrics
                    .observe_step(now.duration_since(last).as_secs_f64());
            }
            let _ = tx.send(Publish::Progress {
                id: id.clone(),
                step: p.step,
                total: p.total,
            });
            if let Some(reason) = CancelReason::from_code(cancel.load(Ordering::SeqCst)) {
                stop = Some(reason);
                return Err(sd_models::Error::Cancelled);
            }
            if deadline.is_some_and(|d| now >= d) {
                stop = Some(CancelReason::Timeout);
                return Err(sd_models::Error::Cancelled);
            }
            if p.step == p.total {
                // Past the last check: from here the job completes (or fails).
                let mut s = inner.store();
                if let Some(job) = s.jobs.get_mut(&id) {
                    job.finishing = true;
                }
                // A cancel that raced with the lock still wins.
                if let Some(reason) = CancelReason::from_code(cancel.load(Ordering::SeqCst)) {
                    if let Some(job) = s.jobs.get_mut(&id) {
                        job.finishing = false;
                    }
                    stop = Some(reason);
                    return Err(sd_models::Error::Cancelled);
                }
            }
            let every = request.preview_every;
            if every > 0 && p.step % every == 0 && p.step < p.total {
                let t = Instant::now();
                match backend.preview(p.latents, request, request.preview) {
                    Ok(image) => {
                        let _ = tx.send(Publish::Preview {
                            id: id.clone(),
                            step: p.step,
                            total: p.total,
                            image,
                            seconds: t.elapsed().as_secs_f64(),
                        });
                    }
                    Err(e) => eprintln!("warning: job {id}: preview failed: {e}"),
                }
            }
            last = Instant::now();
            Ok(())
        })
    }));
    let generation = started.elapsed().as_secs_f64();
    let outcome = match result {
        Ok(Ok(generated)) => Outcome::Completed(generated),
        Ok(Err(sd_models::Error::Cancelled)) => {
            Outcome::Cancelled(stop.unwrap_or(CancelReason::Client))
        }
        Ok(Err(e)) => {
            let message = format!("{e}");
            Outcome::Failed {
                kind: match e {
                    sd_models::Error::Invalid { .. } => "invalid_request",
                    _ => "generation_failed",
                },
                message: message.split_whitespace().collect::<Vec<_>>().join(" "),
            }
        }
        Err(panic) => Outcome::Failed {
            kind: "internal",
            message: format!("internal error: {}", panic_message(panic.as_ref())),
        },
    };
    let _ = tx.send(Publish::Finish {
        id,
        outcome,
        generation,
    });
}

fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

/// PNG files of a finished job, with the same `parameters` text as `sd-worker generate`;
/// `flux` is Some(guidance embedded) for FLUX jobs, whose text is that of `sd-worker
/// generate` on a FLUX model; the job's LoRAs end the settings line.
pub fn encode_job_results(
    params: &GenerateParams,
    strength: Option<f64>,
    flux: Option<bool>,
    model: &str,
    loras: &[LoraSpec],
    images: &[RgbImage],
) -> anyhow::Result<Vec<Vec<u8>>> {
    let n = images.len();
    images
        .iter()
        .enumerate()
        .map(|(i, image)| {
            let batch = (n > 1).then_some((n, i));
            let text = match flux {
                Some(embedded) => crate::generate_flux::parameters_text(
                    &params.prompt,
                    &flux_params(params),
                    embedded,
                    model,
                    strength,
                    batch,
                ),
                None => {
                    let mut text = Parameters::for_job(params, model, batch);
                    text.strength = strength;
                    text.to_text()
                }
            };
            encode_png(image, &crate::png_out::with_loras(text, loras))
        })
        .collect()
}

fn publisher_main(inner: Arc<Inner>, rx: mpsc::Receiver<Publish>) {
    for message in rx {
        let (id, last) = match &message {
            Publish::Progress { id, .. } | Publish::Preview { id, .. } => (id.clone(), false),
            Publish::Finish { id, .. } => (id.clone(), true),
        };
        let handled = catch_unwind(AssertUnwindSafe(|| publish(&inner, message)));
        if let Err(panic) = handled {
            let message = format!("internal error: {}", panic_message(panic.as_ref()));
            eprintln!("error: job {id}: publishing failed: {message}");
            if last {
                inner
                    .store()
                    .fail(&id, "internal", &message, Instant::now());
            }
        }
    }
}

fn publish(inner: &Inner, message: Publish) {
    {
        match message {
            Publish::Progress { id, step, total } => {
                let mut s = inner.store();
                if let Some(job) = s.jobs.get_mut(&id) {
                    job.step = step;
                    job.total = total;
                    let _ = job.events.send(progress_event(step, total));
                }
            }
            Publish::Preview {
                id,
                step,
                total,
                image,
                seconds,
            } => {
                let t = Instant::now();
                let encoded = encode_png(&image, "");
                let seconds = seconds + t.elapsed().as_secs_f64();
                let mut s = inner.store();
                if let Some(job) = s.jobs.get_mut(&id) {
                    job.timings.preview += seconds;
                    match encoded {
                        Ok(png) => {
                            let ev = event(
                                "preview",
                                json!({
                                    "step": step,
                                    "total": total,
                                    "width": image.width,
                                    "height": image.height,
                                    "image": b64(&png),
                                    "format": "png",
                                }),
                            );
                            let _ = job.events.send(ev);
                        }
                        Err(e) => eprintln!("warning: job {id}: preview encoding failed: {e:#}"),
                    }
                }
            }
            Publish::Finish {
                id,
                outcome,
                generation,
            } => finish_job(inner, &id, outcome, generation),
        }
    }
}

fn finish_job(inner: &Inner, id: &str, outcome: Outcome, generation: f64) {
    let (request, model) = {
        let s = inner.store();
        let Some(job) = s.jobs.get(id) else {
            return;
        };
        let model = s.spec.as_ref().map(|m| m.name.clone()).unwrap_or_default();
        (job.request.clone(), model)
    };
    // Encode outside the lock: status requests keep being answered meanwhile.
    let t = Instant::now();
    let mut warnings = Vec::new();
    let (state, outcome) = match outcome {
        Outcome::Completed(generated) => {
            warnings = generated.warnings.clone();
            let strength = request.input.as_ref().map(|i| i.strength);
            match encode_job_results(
                &request.params,
                strength,
                request.flux,
                &model,
                &request.loras,
                &generated.images,
            ) {
                Ok(pngs) => {
                    let encoded: Vec<String> = pngs.iter().map(|p| b64(p)).collect();
                    (JobState::Completed, Ok((pngs, encoded)))
                }
                Err(e) => (
                    JobState::Failed,
                    Err(("encoding_failed", format!("cannot encode the image: {e:#}"))),
                ),
            }
        }
        Outcome::Failed { kind, message } => (JobState::Failed, Err((kind, message))),
        Outcome::Cancelled(reason) => {
            let mut s = inner.store();
            if let Some(job) = s.jobs.get_mut(id) {
                job.cancel_reason = Some(reason);
                job.timings.generation = Some(generation);
            }
            s.finish(
                id,
                JobState::Cancelled,
                Store::cancelled_event(reason),
                Instant::now(),
            );
            s.prune(&inner.config, Instant::now());
            eprintln!("job {id}: cancelled ({})", reason.name());
            return;
        }
    };
    let encode = t.elapsed().as_secs_f64();
    let mut s = inner.store();
    let now = Instant::now();
    let method = (request.operation == Operation::Inpaint)
        .then(|| s.spec.as_ref().map(|m| m.inpaint_method))
        .flatten();
    let Some(job) = s.jobs.get_mut(id) else {
        return;
    };
    job.timings.generation = Some(generation);
    job.timings.encode = Some(encode);
    job.timings.total = Some(now.duration_since(job.queued_at).as_secs_f64());
    let seed = job.request.params.seed;
    let operation = job.request.operation;
    let ev = match outcome {
        Ok((pngs, encoded)) => {
            job.images = pngs.into_iter().map(Arc::new).collect();
            job.warnings = warnings.clone();
            complete_event(Completion {
                encoded,
                operation,
                inpaint_method: method,
                seed,
                timings: job.timings.to_json(),
                warnings,
            })
        }
        Err((kind, message)) => {
            job.error = Some((kind.to_string(), message.clone()));
            error_event(kind, &message)
        }
    };
    s.finish(id, state, ev, now);
    s.prune(&inner.config, now);
    match state {
        JobState::Completed => eprintln!("job {id}: completed in {generation:.2}s"),
        _ => eprintln!(
            "job {id}: failed: {}",
            s.jobs
                .get(id)
                .and_then(|j| j.error.as_ref())
                .map(|e| e.1.as_str())
                .unwrap_or("")
        ),
    }
}

#[cfg(test)]
#[path = "engine_tests.rs"]
mod tests;
