//! Registration with an orchestrator (`serve --worker-id ID --callback-url URL`): once the model
//! is loaded the worker POSTs a [`Registration`] with `state: "ready"`, repeats it every
//! `--heartbeat-secs` with its queue, and posts `state: "stopping"` when it shuts down. Each
//! post is retried with exponential backoff and jitter; an orchestrator that cannot be reached
//! is logged and never stops the worker. The posts run on their own thread, with ureq's
//! blocking client (already in the engine for the Hub), off the async workers.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use sd_engine::jobs::Phase;
use sd_engine::Engine;
use serde::Serialize;
use utoipa::ToSchema;

/// Where and how often to announce the worker.
#[derive(Debug, Clone)]
pub struct Target {
    pub worker_id: String,
    pub callback_url: String,
    /// The worker's base URL as the orchestrator should call it.
    pub public_url: String,
    pub heartbeat: Duration,
}

/// What the worker posts to `--callback-url` (JSON).
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct Registration {
    /// `--worker-id`.
    pub worker_id: String,
    /// `ready` (the first post and every heartbeat) or `stopping` (on graceful shutdown).
    pub state: &'static str,
    /// The base URL of the worker's APIs (`--public-url`, else the address it listens on).
    pub url: String,
    pub model: RegisteredModel,
    pub device: String,
    pub dtype: String,
    /// The operations of the native job API the model runs.
    pub operations: Vec<&'static str>,
    /// The APIs the worker answers: `native` (`/v1/jobs`), `openai` (`/v1/images`),
    /// `a1111` (`/sdapi/v1`).
    pub apis: Vec<&'static str>,
    /// Jobs waiting (not counting the running one).
    pub queue_depth: usize,
    pub max_queue: usize,
    /// The id of the running job, if any.
    pub running_job: Option<String>,
    /// Whether the APIs need a bearer token.
    pub auth: bool,
    pub version: &'static str,
    /// Unix seconds when the post was made.
    pub sent_at: u64,
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct RegisteredModel {
    pub name: String,
    /// `sd1`, `sd2`, `sdxl` or `flux`.
    pub family: String,
    /// `base`, `inpaint` or `turbo`; `dev` / `schnell` for FLUX.
    pub variant: String,
    pub repo_id: Option<String>,
}

/// The registration thread; [`Registrar::stop`] posts `stopping` and ends it.
pub struct Registrar {
    stop: mpsc::Sender<()>,
    /// Set before the stop message, so that a retry wait that takes the message still stops.
    stopping: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

/// Attempts per post, and the first backoff (doubled each time, with up to 50% jitter).
const ATTEMPTS: u32 = 5;
const STOPPING_ATTEMPTS: u32 = 2;
const FIRST_BACKOFF: Duration = Duration::from_millis(500);

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn payload(
    target: &Target,
    engine: &Engine,
    auth: bool,
    state: &'static str,
) -> Option<Registration> {
    let spec = engine.spec()?;
    let (queue_depth, running_job) = engine.queue();
    Some(Registration {
        worker_id: target.worker_id.clone(),
        state,
        url: target.public_url.clone(),
        model: RegisteredModel {
            name: spec.name.clone(),
            family: spec.family.clone(),
            variant: spec.variant.clone(),
            repo_id: spec.repo_id.clone(),
        },
        device: spec.device.clone(),
        dtype: spec.dtype.clone(),
        operations: sd_engine::validate::operations(&spec)
            .iter()
            .map(|o| o.name())
            .collect(),
        apis: vec!["native", "openai", "a1111"],
        queue_depth,
        max_queue: engine.config().max_queue,
        running_job,
        auth,
        version: env!("CARGO_PKG_VERSION"),
        sent_at: unix_now(),
    })
}

/// Posts `body`, retrying with backoff; false (and a log line) if every attempt failed. A
/// stop request cuts the waits short.
fn post(
    agent: &ureq::Agent,
    url: &str,
    body: &str,
    attempts: u32,
    stop: &mpsc::Receiver<()>,
) -> bool {
    let mut backoff = FIRST_BACKOFF;
    let mut last = String::new();
    for attempt in 1..=attempts {
        let sent = agent
            .post(url)
            .set("Content-Type", "application/json")
            .send_string(body);
        match sent {
            Ok(_) => return true,
            Err(ureq::Error::Status(code, _)) => last = format!("it answered {code}"),
            Err(e) => last = e.to_string(),
        }
        if attempt < attempts {
            let jitter = backoff.mul_f64(rand::random::<f64>() * 0.5);
            if stop.recv_timeout(backoff + jitter).is_ok() {
                break;
            }
            backoff = (backoff * 2).min(Duration::from_secs(30));
        }
    }
    eprintln!(
        "warning: the orchestrator at {url} could not be reached ({last}); the worker goes on"
    );
    false
}

impl Registrar {
    /// Starts the thread: it waits for the model, posts `ready`, then heartbeats.
    pub fn start(target: Target, engine: Engine, auth: bool) -> std::io::Result<Registrar> {
        let (stop_tx, stop_rx) = mpsc::channel();
        let stopping = Arc::new(AtomicBool::new(false));
        let flag = stopping.clone();
        let thread = std::thread::Builder::new()
            .name("registration".into())
            .spawn(move || run(target, engine, auth, stop_rx, flag))?;
        Ok(Registrar {
            stop: stop_tx,
            stopping,
            thread: Some(thread),
        })
    }

    /// Posts `stopping` (when the worker had announced itself) and ends the thread.
    pub fn stop(mut self) {
        self.stopping.store(true, Ordering::SeqCst);
        let _ = self.stop.send(());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn run(
    target: Target,
    engine: Engine,
    auth: bool,
    stop: mpsc::Receiver<()>,
    stopping: Arc<AtomicBool>,
) {
    let agent = ureq::AgentBuilder::new()
        .timeout_connect(Duration::from_secs(5))
        .timeout(Duration::from_secs(10))
        .build();
    let send = |state: &'static str, attempts: u32| {
        if let Some(p) = payload(&target, &engine, auth, state) {
            match serde_json::to_string(&p) {
                Ok(body) => {
                    post(&agent, &target.callback_url, &body, attempts, &stop);
                }
                Err(e) => eprintln!("warning: cannot write the registration: {e}"),
            }
        }
    };
    // Wait for the model: nothing is announced before it is ready.
    loop {
        if stopping.load(Ordering::SeqCst) {
            return;
        }
        match engine.phase() {
            Phase::Ready => break,
            Phase::Failed(_) | Phase::Draining => return,
            Phase::Loading => {}
        }
        match stop.recv_timeout(Duration::from_millis(200)) {
            Ok(()) | Err(RecvTimeoutError::Disconnected) => return,
            Err(RecvTimeoutError::Timeout) => {}
        }
    }
    send("ready", ATTEMPTS);
    while !stopping.load(Ordering::SeqCst) {
        match stop.recv_timeout(target.heartbeat) {
            Err(RecvTimeoutError::Timeout) => send("ready", ATTEMPTS),
            Ok(()) | Err(RecvTimeoutError::Disconnected) => break,
        }
    }
    send("stopping", STOPPING_ATTEMPTS);
}
