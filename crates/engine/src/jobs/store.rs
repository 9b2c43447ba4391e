//! The job store: every job the worker knows (queued, running, finished within its time to
//! live), the FIFO queue, and the records the interfaces read. Guarded by one mutex in
//! [`super::Inner`]; nothing here blocks or runs a model.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;
use std::time::Instant;

use serde::Serialize;
use tokio::sync::broadcast;

use super::{CancelReason, EngineConfig, JobState, Phase};
use crate::events::{EventRef, FailureKind, JobError, JobEvent, Timings};
use crate::request::{GenerationRequest, Operation, PreviewKind};
use crate::spec::ModelSpec;

/// Events buffered per job for slow subscribers.
pub(super) const EVENT_BUFFER: usize = 64;

pub(super) struct Job {
    pub id: String,
    pub request: Arc<GenerationRequest>,
    pub state: JobState,
    pub step: usize,
    pub total: usize,
    pub created_unix: f64,
    pub queued_at: Instant,
    pub finished_at: Option<Instant>,
    pub timings: Timings,
    pub cancel: Arc<AtomicU8>,
    pub cancel_reason: Option<CancelReason>,
    pub error: Option<JobError>,
    /// The job's last step is done: it can no longer be cancelled.
    pub finishing: bool,
    pub events: broadcast::Sender<EventRef>,
    /// The `error` or `cancelled` event once the job failed or was cancelled (the `complete`
    /// event is rebuilt from `images` for late subscribers, so that results are kept once).
    pub final_event: Option<EventRef>,
    /// PNG bytes of each result image.
    pub images: Vec<Arc<Vec<u8>>>,
    /// Warnings of the completed job (LoRA keys not applied).
    pub warnings: Vec<String>,
    /// Prompt tokens the completed job dropped (see [`crate::events::Completion`]).
    pub truncated_tokens: [usize; 2],
    /// The PNG of the job's latest preview (one kept per job).
    pub last_preview: Option<Arc<Vec<u8>>>,
}

/// Job outcomes so far: the Retry-After estimate of a full queue is their mean duration.
#[derive(Debug, Clone, Default)]
pub struct Finished {
    pub completed: u64,
    pub failed: u64,
    pub cancelled: u64,
    /// Seconds from submission to the final state, summed over all of them.
    pub seconds: f64,
}

impl Finished {
    /// Mean seconds from submission to a final state over the finished jobs.
    pub fn mean_seconds(&self) -> Option<f64> {
        let count = self.completed + self.failed + self.cancelled;
        (count > 0).then(|| self.seconds / count as f64)
    }
}

pub(super) struct Store {
    pub phase: Phase,
    pub spec: Option<Arc<ModelSpec>>,
    pub jobs: HashMap<String, Job>,
    pub queue: VecDeque<String>,
    /// Finished job ids, oldest first.
    pub finished: VecDeque<String>,
    /// The engine thread should exit once the queue is empty.
    pub stopping: bool,
    /// False once the engine thread has ended.
    pub engine_alive: bool,
    pub outcomes: Finished,
}

/// A job's settings as its record echoes them.
#[derive(Debug, Clone, Serialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct RequestEcho {
    pub prompt: String,
    pub negative_prompt: Option<String>,
    /// `plain` or `a1111`.
    pub prompt_syntax: &'static str,
    pub width: usize,
    pub height: usize,
    pub steps: usize,
    pub guidance_scale: f64,
    pub seed: u64,
    /// The sampler (update rule); `flow-match-euler` for FLUX.
    pub sampler: &'static str,
    /// The sigma / timestep schedule (`model`: the model's own).
    pub schedule: &'static str,
    /// The sampler again, under the field name of earlier versions.
    pub scheduler: &'static str,
    /// DDIM's and TCD's `eta` (null for the other samplers).
    pub eta: Option<f64>,
    /// DPM++ SDE's and DPM++ 2S a's `s_noise` (null for the other samplers).
    pub s_noise: Option<f64>,
    pub max_sequence_length: Option<usize>,
    pub batch: usize,
    pub preview_every: usize,
    pub preview: PreviewKind,
    pub strength: Option<f64>,
    pub loras: Vec<LoraEcho>,
}

#[derive(Debug, Clone, Serialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct LoraEcho {
    pub path: String,
    pub strength: f64,
    pub strict: bool,
}

/// The record of one job, as `GET /v1/jobs/{id}` shows it (the HTTP layer adds the URLs).
#[derive(Debug, Clone, Serialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct JobView {
    pub job_id: String,
    pub operation: Operation,
    pub state: JobState,
    /// Place in the queue (1 runs next) while queued.
    pub position: Option<usize>,
    pub step: usize,
    pub total: usize,
    pub percent: f64,
    /// Unix seconds.
    pub created_at: f64,
    pub timings: Timings,
    pub seed: u64,
    pub error: Option<JobError>,
    pub cancel_reason: Option<CancelReason>,
    pub cancel_requested: bool,
    pub hive_id: Option<String>,
    pub worker_id: Option<String>,
    /// Result images kept (fetched by index).
    #[serde(skip)]
    pub image_count: usize,
    pub request: RequestEcho,
    pub warnings: Vec<String>,
}

impl Store {
    /// Drops finished jobs past their time to live, then the oldest beyond `max_results`.
    pub fn prune(&mut self, config: &EngineConfig, now: Instant) {
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

    pub fn position(&self, id: &str) -> Option<usize> {
        self.queue.iter().position(|q| q == id).map(|p| p + 1)
    }

    /// Tells every queued job from index `from` on its new position.
    pub fn announce_positions(&self, from: usize) {
        for (i, id) in self.queue.iter().enumerate().skip(from) {
            if let Some(job) = self.jobs.get(id) {
                let _ = job.events.send(JobEvent::Queued { position: i + 1 }.into());
            }
        }
    }

    /// Marks a job final and broadcasts its last event.
    pub fn finish(&mut self, id: &str, state: JobState, ev: EventRef, now: Instant) {
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
        crate::metrics::job_finished(state.name(), total);
        match state {
            JobState::Completed => self.outcomes.completed += 1,
            JobState::Failed => self.outcomes.failed += 1,
            _ => self.outcomes.cancelled += 1,
        }
        self.outcomes.seconds += total;
        self.finished.push_back(id.to_string());
    }

    /// Fails a job that is not final yet (queued or running).
    pub fn fail(&mut self, id: &str, kind: FailureKind, message: &str, now: Instant) {
        match self.jobs.get_mut(id) {
            Some(job) if !job.state.is_final() => {
                job.error = Some(JobError {
                    kind,
                    message: message.to_string(),
                });
            }
            _ => return,
        }
        self.queue.retain(|q| q != id);
        self.finish(
            id,
            JobState::Failed,
            JobEvent::failed(kind, message).into(),
            now,
        );
    }

    pub fn cancelled_event(reason: CancelReason) -> EventRef {
        JobEvent::Cancelled {
            reason: reason.name(),
        }
        .into()
    }

    /// Jobs running now.
    pub fn running(&self) -> usize {
        self.jobs
            .values()
            .filter(|j| j.state == JobState::Running)
            .count()
    }

    pub fn view(&self, job: &Job) -> JobView {
        let r = &job.request;
        let p = &r.params;
        let percent = if job.total > 0 {
            (job.step as f64 * 100.0 / job.total as f64 * 10.0).round() / 10.0
        } else {
            0.0
        };
        JobView {
            job_id: job.id.clone(),
            operation: r.operation,
            state: job.state,
            position: self.position(&job.id),
            step: job.step,
            total: job.total,
            percent,
            created_at: job.created_unix,
            timings: job.timings.clone(),
            seed: p.seed,
            error: job.error.clone(),
            cancel_reason: job.cancel_reason,
            cancel_requested: job.state == JobState::Running
                && job.cancel.load(Ordering::SeqCst) != 0,
            hive_id: r.hive_id.clone(),
            worker_id: r.worker_id.clone(),
            image_count: job.images.len(),
            request: RequestEcho {
                prompt: p.prompt.clone(),
                negative_prompt: p.negative_prompt.clone(),
                prompt_syntax: match p.prompt_syntax {
                    crate::request::PromptSyntax::Plain => "plain",
                    crate::request::PromptSyntax::A1111 => "a1111",
                },
                width: p.width,
                height: p.height,
                steps: p.steps,
                guidance_scale: p.guidance,
                seed: p.seed,
                sampler: if r.flux.is_some() {
                    "flow-match-euler"
                } else {
                    p.sampler.name()
                },
                schedule: p.schedule.name(),
                eta: p.sampler.takes_eta().then_some(p.eta),
                s_noise: p.sampler.takes_s_noise().then_some(p.s_noise),
                scheduler: if r.flux.is_some() {
                    "flow-match-euler"
                } else {
                    p.sampler.name()
                },
                max_sequence_length: r.max_sequence_length,
                batch: p.batch,
                preview_every: r.preview_every,
                preview: r.preview,
                strength: r.input.as_ref().map(|i| i.strength),
                loras: r
                    .loras
                    .iter()
                    .map(|l| LoraEcho {
                        path: l.name.clone(),
                        strength: l.strength,
                        strict: l.strict,
                    })
                    .collect(),
            },
            warnings: job.warnings.clone(),
        }
    }
}
