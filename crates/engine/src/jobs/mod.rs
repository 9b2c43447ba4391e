//! The generation engine: one thread owns the model and runs queued jobs one at a time.
//!
//! The interfaces (HTTP handlers, the CLI) only touch the job store (behind a mutex): they
//! submit, cancel, read status and subscribe to events. The engine thread pops jobs in FIFO order and runs them on its
//! [`Backend`]; every event of a running job (progress, preview, the result) goes through a
//! second thread, the publisher, which encodes images (PNG, base64) off the engine thread and
//! then updates the store and broadcasts, so events reach subscribers in order.

mod runner;
mod store;
#[cfg(test)]
mod tests;

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{mpsc, Arc, Condvar, Mutex, MutexGuard};
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde::Serialize;
use tokio::sync::broadcast;

use crate::backend::Backend;
use crate::events::{EventRef, JobEvent, Timings};
use crate::request::{GenerationRequest, Operation};
use crate::spec::ModelSpec;
pub use store::{Finished, JobView, LoraEcho, RequestEcho};
use store::{Job, Store, EVENT_BUFFER};

/// Where a job is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "lowercase")]
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
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "lowercase")]
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

    pub(crate) fn code(self) -> u8 {
        match self {
            CancelReason::Client => 1,
            CancelReason::Timeout => 2,
            CancelReason::Shutdown => 3,
        }
    }

    pub(crate) fn from_code(c: u8) -> Option<Self> {
        match c {
            1 => Some(CancelReason::Client),
            2 => Some(CancelReason::Timeout),
            3 => Some(CancelReason::Shutdown),
            _ => None,
        }
    }
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
    /// One line on stderr per finished job (the server's log; the CLI reports for itself).
    pub log_jobs: bool,
}

impl EngineConfig {
    /// An engine for one job that the caller follows itself (`sd-worker generate`): no queue
    /// to speak of, no deadline, the result kept until the caller has read it.
    pub fn single_job() -> Self {
        const YEAR: Duration = Duration::from_secs(365 * 24 * 3600);
        EngineConfig {
            max_queue: 1,
            result_ttl: YEAR,
            max_results: 1,
            job_timeout: YEAR,
            log_jobs: false,
        }
    }
}

/// Where the worker is in its life.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Phase {
    Loading,
    Ready,
    Draining,
    /// Loading the model failed; the process exits.
    Failed(String),
}
/// Why a submission was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SubmitError {
    /// The model is loading, or failed to load; the message says which.
    NotReady(String),
    Draining,
    QueueFull {
        max: usize,
        retry_after_s: u64,
    },
}

impl SubmitError {
    /// What every interface tells its client (each adds its own status and shape).
    pub fn message(&self) -> String {
        match self {
            SubmitError::NotReady(m) => m.clone(),
            SubmitError::Draining => "the worker is shutting down and takes no new jobs".into(),
            SubmitError::QueueFull { max, .. } => {
                format!("the queue is full ({max} waiting jobs, --max-queue); retry later")
            }
        }
    }
}

/// Why a phase takes no job, as a submission would be refused.
fn not_ready(phase: &Phase) -> Option<SubmitError> {
    match phase {
        Phase::Ready => None,
        Phase::Loading => Some(SubmitError::NotReady("the model is still loading".into())),
        Phase::Failed(m) => Some(SubmitError::NotReady(format!(
            "the model failed to load: {m}"
        ))),
        Phase::Draining => Some(SubmitError::Draining),
    }
}

/// Outcome of a cancel request.
#[derive(Debug)]
pub enum CancelOutcome {
    /// The job was queued and is now cancelled.
    Cancelled(JobView),
    /// The job is running and stops after its current step.
    Stopping(JobView),
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
                outcomes: Finished::default(),
            }),
            wake: Condvar::new(),
            config,
        });
        let (loaded_tx, loaded_rx) = mpsc::channel();
        let thread_inner = inner.clone();
        let spawned = thread::Builder::new()
            .name("engine".into())
            .spawn(move || runner::engine_main(thread_inner, loader, loaded_tx));
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

    /// The loaded model while jobs are admitted; otherwise why they are not, as
    /// [`Engine::submit`] would refuse one.
    pub fn ready_spec(&self) -> Result<Arc<ModelSpec>, SubmitError> {
        let s = self.inner.store();
        match (not_ready(&s.phase), &s.spec) {
            (Some(e), _) => Err(e),
            (None, Some(spec)) => Ok(spec.clone()),
            // Ready always has a spec; say "loading" rather than panic if it had none.
            (None, None) => Err(SubmitError::NotReady("the model is still loading".into())),
        }
    }

    /// Queues a job; returns its id.
    pub fn submit(&self, request: GenerationRequest) -> Result<String, SubmitError> {
        let mut s = self.inner.store();
        if let Some(e) = not_ready(&s.phase) {
            return Err(e);
        }
        let max = self.inner.config.max_queue;
        if s.queue.len() >= max {
            crate::metrics::rejected_queue_full();
            let per_job = s.outcomes.mean_seconds().unwrap_or(1.0);
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
            truncated_tokens: [0, 0],
            last_preview: None,
        };
        s.jobs.insert(id.clone(), job);
        s.queue.push_back(id.clone());
        crate::metrics::job_submitted();
        drop(s);
        self.inner.wake.notify_all();
        Ok(id)
    }

    /// The status of one job.
    pub fn status(&self, id: &str) -> Option<JobView> {
        let mut s = self.inner.store();
        s.prune(&self.inner.config, Instant::now());
        s.jobs.get(id).map(|job| s.view(job))
    }

    /// Queued (in queue order), running, then finished jobs (newest first).
    pub fn list(&self) -> Vec<JobView> {
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
        out
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
                first.push(JobEvent::Queued { position }.into());
            }
            JobState::Running => {
                first.push(JobEvent::Started.into());
                if job.step > 0 {
                    first.push(JobEvent::progress(job.step, job.total).into());
                }
            }
            JobState::Completed => {
                let images = job.images.clone();
                let method = (job.request.operation == Operation::Inpaint)
                    .then(|| s.spec.as_ref().map(|m| m.inpaint_method))
                    .flatten();
                let completion = runner::completion(job, method);
                drop(s);
                // Base64 outside the lock.
                let encoded: Vec<String> = images.iter().map(|p| runner::b64(p)).collect();
                first.push(runner::with_images(completion, encoded));
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

    /// The PNG of the latest preview of a job that is still running (None once it ended, or
    /// before its first preview).
    pub fn preview(&self, id: &str) -> Option<Arc<Vec<u8>>> {
        let s = self.inner.store();
        let job = s.jobs.get(id)?;
        (job.state == JobState::Running)
            .then(|| job.last_preview.clone())
            .flatten()
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

    /// Jobs waiting, and the id of the running one.
    pub fn queue(&self) -> (usize, Option<String>) {
        let s = self.inner.store();
        let running = s
            .jobs
            .values()
            .find(|j| j.state == JobState::Running)
            .map(|j| j.id.clone());
        (s.queue.len(), running)
    }

    /// Jobs finished so far, by outcome.
    pub fn outcomes(&self) -> Finished {
        self.inner.store().outcomes.clone()
    }

    /// Sets the gauges of the queue (waiting, running, ready) to their values now; a
    /// metrics exporter calls this before it renders.
    pub fn update_gauges(&self) {
        let s = self.inner.store();
        crate::metrics::gauges(s.queue.len(), s.running(), s.phase == Phase::Ready);
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
