//! `sd-worker serve`: the HTTP job server.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Args;
use sd_engine::backend::Model;
use sd_engine::jobs::{EngineConfig, Loader};
use sd_engine::load::LoadRequest;
use sd_engine::validate::LoraFiles;
use sd_engine::{Engine, Limits};

use crate::api::{router, AppState};
use crate::model_args::ModelFlags;
use crate::register::{Registrar, Target};

#[derive(Args, Debug)]
pub struct ServeArgs {
    /// A Stable Diffusion 1.x/2.x or FLUX.1 diffusers folder (with model_index.json), a
    /// single-file SD checkpoint, a FLUX transformer file (with --components), or a Hugging
    /// Face repo id org/repo[@revision] (fetched into the HF cache).
    #[arg(long, env = "SD_MODEL")]
    pub model: PathBuf,
    /// FLUX with a single-file transformer: --model is the transformer file and this diffusers
    /// FLUX folder gives the text encoders, tokenizers, VAE and scheduler.
    #[arg(long, env = "SD_COMPONENTS")]
    pub components: Option<PathBuf>,
    /// FLUX: where the text encoders live (e.g. `cpu` to keep them off the GPU). Default:
    /// --device.
    #[arg(long, env = "SD_TEXT_ENCODER_DEVICE")]
    pub text_encoder_device: Option<String>,
    /// Address to listen on.
    #[arg(long, env = "SD_HOST", default_value = "127.0.0.1")]
    pub host: String,
    /// Port to listen on (0: any free port; the address is printed on stderr).
    #[arg(long, env = "SD_PORT", default_value_t = 8080)]
    pub port: u16,
    /// Device: cpu, cuda[:N] or metal[:N] (CUDA and Metal need the `cuda` / `metal` build features).
    #[arg(long, env = "SD_DEVICE", default_value = "cpu")]
    pub device: String,
    /// Precision: f32, f16 or bf16. On the CPU, bf16 keeps f32 weights and activations and
    /// rounds the operands of linear layers, attention and 1x1 convolutions to bf16 (README,
    /// "bf16 on the CPU").
    #[arg(long, env = "SD_DTYPE", default_value = "f32")]
    pub dtype: String,
    /// Waiting jobs at most (the running job is not counted); more get 429.
    #[arg(long, env = "SD_MAX_QUEUE", default_value_t = 32)]
    pub max_queue: usize,
    /// Seconds a finished job (and its images) is kept.
    #[arg(long, env = "SD_RESULT_TTL", default_value_t = 600)]
    pub result_ttl: u64,
    /// Finished jobs kept at most; the oldest are dropped first.
    #[arg(long, env = "SD_MAX_RESULTS", default_value_t = 256)]
    pub max_results: usize,
    /// Seconds a job may run before it is cancelled (checked after every step).
    #[arg(long, env = "SD_JOB_TIMEOUT", default_value_t = 600)]
    pub job_timeout: u64,
    /// Width x height of one image at most.
    #[arg(long, env = "SD_MAX_PIXELS", default_value_t = 1024 * 1024)]
    pub max_pixels: usize,
    /// Steps per job at most (also capped by the scheduler's num_train_timesteps).
    #[arg(long, env = "SD_MAX_STEPS", default_value_t = 150)]
    pub max_steps: usize,
    /// Pixels (width x height) of an input image at most, checked from its header before
    /// decoding.
    #[arg(long, env = "SD_MAX_INPUT_PIXELS", default_value_t = 4096 * 4096)]
    pub max_input_pixels: usize,
    /// Images per job at most.
    #[arg(long, env = "SD_MAX_BATCH", default_value_t = 8)]
    pub max_batch: usize,
    /// Largest request body in bytes; larger ones get 413.
    #[arg(long, env = "SD_MAX_BODY_BYTES", default_value_t = 32 << 20)]
    pub max_body_bytes: usize,
    /// Seconds a client has to send each request's head, and again its body; a connection
    /// that sends nothing for this long between requests is closed.
    #[arg(long, env = "SD_READ_TIMEOUT", default_value_t = 30)]
    pub read_timeout: u64,
    /// Bearer token required on every route but /health and /ready. Default: no auth.
    #[arg(long, env = "SD_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
    /// Seconds the running job may go on after SIGTERM/SIGINT before it is cancelled.
    #[arg(long, env = "SD_SHUTDOWN_GRACE", default_value_t = 30)]
    pub shutdown_grace: u64,
    /// Seconds between keep-alive comments on event streams.
    #[arg(long, env = "SD_SSE_KEEPALIVE", default_value_t = 15)]
    pub sse_keepalive: u64,
    #[command(flatten)]
    pub source: crate::model_args::SourceArgs,
    /// Folder of LoRA files (.safetensors) that jobs may name in `loras`; names resolve
    /// inside it only. Default: jobs take no LoRAs.
    #[arg(long, env = "SD_LORA_DIR")]
    pub lora_dir: Option<PathBuf>,
    /// Announce the worker to an orchestrator under this id (needs --callback-url).
    #[arg(long, env = "SD_WORKER_ID")]
    pub worker_id: Option<String>,
    /// The orchestrator URL that receives the worker's registration (JSON POST, `state:
    /// "ready"`) once the model is loaded, a heartbeat every --heartbeat-secs, and `state:
    /// "stopping"` on shutdown (needs --worker-id).
    #[arg(long, env = "SD_CALLBACK_URL")]
    pub callback_url: Option<String>,
    /// The worker's base URL as announced to the orchestrator. Default: http://ADDRESS:PORT
    /// that it listens on.
    #[arg(long, env = "SD_PUBLIC_URL")]
    pub public_url: Option<String>,
    /// Seconds between heartbeats to the orchestrator.
    #[arg(long, env = "SD_HEARTBEAT_SECS", default_value_t = 30)]
    pub heartbeat_secs: u64,
}

/// The orchestrator flags: both of --worker-id and --callback-url or neither, http(s) URLs.
fn check_registration(args: &ServeArgs) -> Result<()> {
    match (&args.worker_id, &args.callback_url) {
        (Some(_), None) => bail!("--worker-id needs --callback-url (where to announce the worker)"),
        (None, Some(_)) => bail!("--callback-url needs --worker-id (the name to announce)"),
        _ => {}
    }
    if let Some(id) = &args.worker_id {
        if id.trim().is_empty() || id.chars().count() > 256 {
            bail!("invalid --worker-id {id:?}: must be 1 to 256 characters");
        }
    }
    for (flag, url) in [
        ("--callback-url", &args.callback_url),
        ("--public-url", &args.public_url),
    ] {
        if let Some(u) = url {
            if !(u.starts_with("http://") || u.starts_with("https://")) {
                bail!("invalid {flag} {u}: must start with http:// or https://");
            }
        }
    }
    if args.heartbeat_secs == 0 || args.heartbeat_secs > 365 * 24 * 3600 {
        bail!(
            "invalid --heartbeat-secs {}: must be between 1 and one year of seconds",
            args.heartbeat_secs
        );
    }
    Ok(())
}

fn check_args(args: &ServeArgs) -> Result<()> {
    let positive = [
        ("--max-queue", args.max_queue as u64),
        ("--max-results", args.max_results as u64),
        ("--job-timeout", args.job_timeout),
        ("--max-pixels", args.max_pixels as u64),
        ("--max-input-pixels", args.max_input_pixels as u64),
        ("--max-steps", args.max_steps as u64),
        ("--max-batch", args.max_batch as u64),
        ("--max-body-bytes", args.max_body_bytes as u64),
        ("--sse-keepalive", args.sse_keepalive),
        ("--read-timeout", args.read_timeout),
    ];
    for (flag, v) in positive {
        if v == 0 {
            bail!("invalid {flag} 0: must be at least 1");
        }
    }
    if let Some(dir) = &args.lora_dir {
        if !dir.is_dir() {
            bail!(
                "invalid --lora-dir {}: not a folder that can be read",
                dir.display()
            );
        }
    }
    const YEAR_S: u64 = 365 * 24 * 3600;
    for (flag, v) in [
        ("--result-ttl", args.result_ttl),
        ("--job-timeout", args.job_timeout),
        ("--shutdown-grace", args.shutdown_grace),
        ("--sse-keepalive", args.sse_keepalive),
        ("--read-timeout", args.read_timeout),
    ] {
        if v > YEAR_S {
            bail!("invalid {flag} {v}: must be at most {YEAR_S} seconds (one year)");
        }
    }
    let max_batch = sd_models::pipelines::sd::MAX_BATCH;
    if args.max_batch > max_batch {
        bail!(
            "invalid --max-batch {}: must be at most {max_batch}",
            args.max_batch
        );
    }
    let max_side = sd_models::pipelines::sd::MAX_SIDE;
    if args.max_input_pixels > max_side * max_side {
        bail!(
            "invalid --max-input-pixels {}: must be at most {} ({max_side} x {max_side})",
            args.max_input_pixels,
            max_side * max_side
        );
    }
    if args.max_pixels > max_side * max_side {
        bail!(
            "invalid --max-pixels {}: must be at most {} ({max_side} x {max_side})",
            args.max_pixels,
            max_side * max_side
        );
    }
    if let Some(key) = &args.api_key {
        if key.trim().is_empty() {
            bail!("invalid --api-key: must not be empty (omit it to run without auth)");
        }
    }
    if args.model.is_dir() && !args.model.join("model_index.json").is_file() {
        bail!(
            "invalid --model {}: no model_index.json there (expected a diffusers folder)",
            args.model.display()
        );
    }
    let repo_id = args.model.to_str().and_then(sd_engine::hub::parse_repo_id);
    if !args.model.exists() && repo_id.is_none() {
        bail!(
            "invalid --model {}: no such file or folder",
            args.model.display()
        );
    }
    Ok(())
}

pub fn run(args: ServeArgs) -> Result<()> {
    check_args(&args)?;
    check_registration(&args)?;
    let load = ModelFlags {
        model: &args.model,
        components: args.components.as_deref(),
        source: &args.source,
        device: &args.device,
        dtype: &args.dtype,
        text_encoder_device: args.text_encoder_device.as_deref(),
    }
    .load_request()?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    let metrics = crate::prometheus::install()?;
    runtime.block_on(serve(args, load, metrics))
}

enum Exit {
    Signal(&'static str),
    LoadFailed(String),
}

async fn wait_for_signal() -> &'static str {
    let ctrl_c = async {
        match tokio::signal::ctrl_c().await {
            Ok(()) => "SIGINT",
            Err(_) => std::future::pending().await,
        }
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
                "SIGTERM"
            }
            Err(_) => std::future::pending().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<&'static str>();
    tokio::select! {
        s = ctrl_c => s,
        s = term => s,
    }
}

/// Loads the model on the engine thread, while the port already answers `/ready` with 503: a
/// Hub repo id is fetched into the cache first.
fn loader(load: LoadRequest) -> Loader<Model> {
    Box::new(move || {
        let started = Instant::now();
        let (model, spec) =
            sd_engine::load::load(&load, &mut crate::model_args::ConsoleProgress::new())?;
        eprintln!(
            "ready: {} ({}, {}, {}) loaded in {:.1}s{}",
            spec.name,
            spec.family,
            spec.device,
            spec.dtype,
            started.elapsed().as_secs_f64(),
            if spec.builtin_tokenizer {
                "; tokenizer: the built-in CLIP vocabulary (none in the checkpoint, its folder or the Hugging Face cache)"
            } else {
                ""
            }
        );
        Ok((model, spec))
    })
}

/// Starts the engine, and a watcher that resolves when loading the model failed.
fn start_engine(
    args: &ServeArgs,
    load: LoadRequest,
) -> (Engine, tokio::sync::oneshot::Receiver<String>) {
    let config = EngineConfig {
        max_queue: args.max_queue,
        result_ttl: Duration::from_secs(args.result_ttl),
        max_results: args.max_results,
        job_timeout: Duration::from_secs(args.job_timeout),
        log_jobs: true,
    };
    let (engine, loaded) = Engine::start(config, loader(load));
    let (fail_tx, fail_rx) = tokio::sync::oneshot::channel::<String>();
    std::thread::spawn(move || {
        if let Ok(Err(message)) = loaded.recv() {
            let _ = fail_tx.send(message);
        }
    });
    (engine, fail_rx)
}

fn app_state(
    args: &ServeArgs,
    engine: Engine,
    metrics: metrics_exporter_prometheus::PrometheusHandle,
) -> AppState {
    AppState {
        engine,
        limits: Limits {
            max_pixels: args.max_pixels,
            max_input_pixels: args.max_input_pixels,
            max_steps: args.max_steps,
            max_batch: args.max_batch,
            loras: match &args.lora_dir {
                Some(dir) => LoraFiles::InFolder(dir.clone()),
                None => LoraFiles::Refused,
            },
            from_flags: true,
            empty_prompt: false,
        },
        api_key: args.api_key.clone(),
        max_body_bytes: args.max_body_bytes,
        read_timeout: Duration::from_secs(args.read_timeout),
        keep_alive: Duration::from_secs(args.sse_keepalive),
        metrics,
        a1111: Default::default(),
    }
}

/// Starts announcing the worker to the orchestrator, when the flags name one.
fn start_registration(
    args: &ServeArgs,
    engine: &Engine,
    addr: std::net::SocketAddr,
) -> Result<Option<Registrar>> {
    let (Some(worker_id), Some(callback_url)) = (&args.worker_id, &args.callback_url) else {
        return Ok(None);
    };
    let target = Target {
        worker_id: worker_id.clone(),
        callback_url: callback_url.clone(),
        public_url: args
            .public_url
            .clone()
            .unwrap_or_else(|| format!("http://{addr}")),
        heartbeat: Duration::from_secs(args.heartbeat_secs),
    };
    let registrar = Registrar::start(target, engine.clone(), args.api_key.is_some())
        .context("cannot start the registration thread")?;
    Ok(Some(registrar))
}

/// Resolves when the worker should stop: on a signal, after draining the engine (a second
/// signal exits at once) and telling the orchestrator, or when the model failed to load.
async fn shutdown_signal(
    engine: Engine,
    grace: Duration,
    load_failed: tokio::sync::oneshot::Receiver<String>,
    registrar: Option<Registrar>,
) -> Exit {
    let load_failed = async {
        match load_failed.await {
            Ok(m) => m,
            // Loaded: only a signal ends the server.
            Err(_) => std::future::pending().await,
        }
    };
    let exit = tokio::select! {
        s = wait_for_signal() => Exit::Signal(s),
        m = load_failed => Exit::LoadFailed(m),
    };
    if let Exit::Signal(name) = &exit {
        // A second signal does not wait for the drain.
        tokio::spawn(async {
            let name = wait_for_signal().await;
            eprintln!("error: {name} while draining: exiting without waiting for the running job");
            std::process::exit(1);
        });
        eprintln!(
            "{name}: draining (no new jobs; the running job has {}s)",
            grace.as_secs()
        );
        let _ = tokio::task::spawn_blocking(move || engine.shutdown(grace)).await;
    }
    if let Some(r) = registrar {
        let _ = tokio::task::spawn_blocking(move || r.stop()).await;
    }
    exit
}

async fn serve(
    args: ServeArgs,
    load: LoadRequest,
    metrics: metrics_exporter_prometheus::PrometheusHandle,
) -> Result<()> {
    let listener = tokio::net::TcpListener::bind((args.host.as_str(), args.port))
        .await
        .with_context(|| format!("cannot listen on {}:{}", args.host, args.port))?;
    let addr = listener.local_addr()?;
    eprintln!("listening on http://{addr}");

    let (engine, load_failed) = start_engine(&args, load);
    let registrar = start_registration(&args, &engine, addr)?;
    let app = router(Arc::new(app_state(&args, engine.clone(), metrics)));
    let grace = Duration::from_secs(args.shutdown_grace);
    let (exit_tx, exit_rx) = tokio::sync::oneshot::channel::<Exit>();
    let shutdown = async move {
        let exit = shutdown_signal(engine, grace, load_failed, registrar).await;
        let _ = exit_tx.send(exit);
    };
    let read_timeout = Duration::from_secs(args.read_timeout);
    // Its output is the wait for the open connections to finish.
    let mut server = tokio::spawn(crate::listen::serve(listener, app, read_timeout, shutdown));
    let exit = tokio::select! {
        // The server ends only after the shutdown future has sent the reason.
        biased;
        exit = exit_rx => exit.context("the server stopped unexpectedly")?,
        result = &mut server => {
            drop(result.context("the server task failed")?);
            bail!("the server stopped unexpectedly");
        }
    };
    // The drain is over: give open connections a moment to close.
    if let Ok(Ok(drained)) = tokio::time::timeout(Duration::from_secs(5), server).await {
        let _ = tokio::time::timeout(Duration::from_secs(5), drained).await;
    }
    match exit {
        Exit::Signal(_) => {
            eprintln!("stopped");
            Ok(())
        }
        Exit::LoadFailed(m) => bail!("cannot load the model: {m}"),
    }
}
