//! The engine thread, which owns the model and runs queued jobs one at a time, and the
//! publisher thread, which encodes their images (PNG, base64) off the engine thread and then
//! updates the store and broadcasts, so that events reach subscribers in order.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{mpsc, Arc};
use std::thread;
use std::time::{Duration, Instant};

use base64::Engine as _;
use sd_models::pipelines::{Generated, RgbImage};

use super::store::Store;
use super::{panic_message, CancelReason, Inner, JobState, Loader, Phase};
use crate::backend::Backend;
use crate::events::{Completion, EventRef, FailureKind, JobError, JobEvent};
use crate::images::png::{encode_job_results, encode_png, ResultInfo};
use crate::request::{GenerationRequest, Operation};

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
    Failed { kind: FailureKind, message: String },
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
                FailureKind::Internal,
                "the engine thread stopped unexpectedly",
                now,
            );
        }
    }
}

pub(super) fn engine_main<B: Backend + 'static>(
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
                        let wait = now.duration_since(job.queued_at).as_secs_f64();
                        job.timings.queue = Some(wait);
                        crate::metrics::queue_wait(wait);
                        let _ = job.events.send(JobEvent::Started.into());
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
    request: &GenerationRequest,
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
                crate::metrics::step(now.duration_since(last).as_secs_f64());
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
        Ok(Err(e)) => Outcome::Failed {
            kind: match e {
                sd_models::Error::Invalid { .. } => FailureKind::InvalidRequest,
                _ => FailureKind::GenerationFailed,
            },
            message: failure_message(&e),
        },
        Err(panic) => Outcome::Failed {
            kind: FailureKind::Internal,
            message: format!("internal error: {}", panic_message(panic.as_ref())),
        },
    };
    let _ = tx.send(Publish::Finish {
        id,
        outcome,
        generation,
    });
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
                    .fail(&id, FailureKind::Internal, &message, Instant::now());
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
                    let _ = job.events.send(JobEvent::progress(step, total).into());
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
                            let image_b64 = b64(&png);
                            job.last_preview = Some(Arc::new(png));
                            let ev = JobEvent::Preview {
                                step,
                                total,
                                width: image.width,
                                height: image.height,
                                image: image_b64,
                                format: "png",
                            };
                            let _ = job.events.send(ev.into());
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

/// A pipeline error as one line; a device out of memory says so first, with what to lower
/// (the device's own text, e.g. CUDA's `CUDA_ERROR_OUT_OF_MEMORY`, follows).
fn failure_message(e: &sd_models::Error) -> String {
    let text = format!("{e}")
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ");
    if text.contains("OUT_OF_MEMORY") || text.to_ascii_lowercase().contains("out of memory") {
        return format!(
            "the device ran out of memory for this job (lower width x height or batch, or run \
             in f16 / bf16): {text}"
        );
    }
    text
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
    let mut truncated = [0, 0];
    let (state, outcome) = match outcome {
        Outcome::Completed(generated) => {
            warnings = generated.warnings.clone();
            truncated = [generated.truncated_tokens.0, generated.truncated_tokens.1];
            let strength = request.input.as_ref().map(|i| i.strength);
            let info = ResultInfo {
                strength,
                flux: request.flux,
                model: &model,
                loras: &request.loras,
            };
            match encode_job_results(&request.params, &info, &generated.images) {
                Ok(pngs) => {
                    let encoded: Vec<String> = pngs.iter().map(|p| b64(p)).collect();
                    (JobState::Completed, Ok((pngs, encoded)))
                }
                Err(e) => (
                    JobState::Failed,
                    Err((
                        FailureKind::EncodingFailed,
                        format!("cannot encode the image: {e:#}"),
                    )),
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
            if inner.config.log_jobs {
                eprintln!("job {id}: cancelled ({})", reason.name());
            }
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
    let ev = match outcome {
        Ok((pngs, encoded)) => {
            job.images = pngs.into_iter().map(Arc::new).collect();
            job.warnings = warnings;
            job.truncated_tokens = truncated;
            with_images(completion(job, method), encoded)
        }
        Err((kind, message)) => {
            job.error = Some(JobError {
                kind,
                message: message.clone(),
            });
            JobEvent::failed(kind, &message).into()
        }
    };
    s.finish(id, state, ev, now);
    s.prune(&inner.config, now);
    if !inner.config.log_jobs {
        return;
    }
    match state {
        JobState::Completed => eprintln!("job {id}: completed in {generation:.2}s"),
        _ => eprintln!(
            "job {id}: failed: {}",
            s.jobs
                .get(id)
                .and_then(|j| j.error.as_ref())
                .map(|e| e.message.as_str())
                .unwrap_or("")
        ),
    }
}

/// What the `complete` event of `job` reports, but its images (see [`with_images`]).
pub(super) fn completion(
    job: &super::store::Job,
    inpaint_method: Option<&'static str>,
) -> Completion {
    Completion {
        operation: job.request.operation,
        inpaint_method,
        images: Vec::new(),
        image: String::new(),
        format: "png",
        seed: job.request.params.seed,
        timings: job.timings.clone(),
        warnings: job.warnings.clone(),
        truncated_tokens: job.truncated_tokens,
    }
}

/// The `complete` event with its images, `encoded` as base64 PNG.
pub(super) fn with_images(mut completion: Completion, encoded: Vec<String>) -> EventRef {
    completion.image = encoded.first().cloned().unwrap_or_default();
    completion.images = encoded;
    JobEvent::Completed(completion).into()
}

pub(super) fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

#[cfg(test)]
mod tests {
    use super::failure_message;

    #[test]
    fn device_out_of_memory_is_named() {
        let oom = sd_models::Error::Candle(candle_core::Error::Msg(
            "DriverError(CUDA_ERROR_OUT_OF_MEMORY, \"out of memory\")".into(),
        ));
        let m = failure_message(&oom);
        assert!(
            m.starts_with("the device ran out of memory") && m.contains("CUDA_ERROR_OUT_OF_MEMORY"),
            "{m}"
        );
        let other = sd_models::Error::Candle(candle_core::Error::Msg("shape\n mismatch".into()));
        assert_eq!(failure_message(&other), "shape mismatch");
    }
}
