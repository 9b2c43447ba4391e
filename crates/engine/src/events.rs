//! Job events: what subscribers of a job see, in order, from `queued` to one final event
//! (`complete`, `error` or `cancelled`). The HTTP layer sends each as a Server-Sent Event whose
//! name is [`JobEvent::name`] and whose data is the event's JSON (with a `type` field equal to
//! the name).

use std::sync::{Arc, OnceLock};

use serde::Serialize;

use crate::request::Operation;

/// Seconds spent in each phase of a job.
#[derive(Debug, Clone, Default, Serialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Timings {
    pub queue: Option<f64>,
    pub generation: Option<f64>,
    pub preview: f64,
    pub encode: Option<f64>,
    pub total: Option<f64>,
}

/// Why a job that was queued did not complete (validation refuses bad input before queueing;
/// these are what can still go wrong while it runs).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum FailureKind {
    /// A value the pipeline refused: a LoRA file that is not safetensors, or whose keys do
    /// not all match the model when strict.
    InvalidRequest,
    /// The pipeline failed (a model error).
    GenerationFailed,
    /// The result could not be encoded.
    EncodingFailed,
    /// A bug: a panic, or the engine thread stopped.
    Internal,
}

/// A failure and its message, as job records and `error` events carry them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct JobError {
    #[serde(rename = "type")]
    pub kind: FailureKind,
    pub message: String,
}

/// What a `complete` event reports.
#[derive(Debug, Clone, Serialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Completion {
    pub operation: Operation,
    /// Inpainting jobs: `inpaint-unet` or `latent-blend`.
    pub inpaint_method: Option<&'static str>,
    /// Base64 PNG of each image.
    pub images: Vec<String>,
    /// The first image (older clients read this one).
    pub image: String,
    pub format: &'static str,
    pub seed: u64,
    pub timings: Timings,
    /// LoRA keys not applied (LoRAs with `strict` false), one line each.
    pub warnings: Vec<String>,
    /// Prompt tokens dropped beyond the text encoder's limit: [prompt, negative prompt] for
    /// Stable Diffusion, [CLIP, T5] for FLUX.
    pub truncated_tokens: [usize; 2],
}

/// One event of a job.
#[derive(Debug, Clone, Serialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(tag = "type")]
pub enum JobEvent {
    /// Waiting; `position` 1 runs next.
    #[serde(rename = "queued")]
    Queued { position: usize },
    #[serde(rename = "started")]
    Started,
    #[serde(rename = "progress")]
    Progress {
        step: usize,
        total: usize,
        percent: f64,
    },
    /// A preview image (base64 PNG) of the first image of the batch.
    #[serde(rename = "preview")]
    Preview {
        step: usize,
        total: usize,
        width: usize,
        height: usize,
        image: String,
        format: &'static str,
    },
    #[serde(rename = "complete")]
    Completed(Completion),
    #[serde(rename = "error")]
    Failed { message: String, error: JobError },
    #[serde(rename = "cancelled")]
    Cancelled { reason: &'static str },
}

impl JobEvent {
    /// The event's name (the SSE `event:` field).
    pub fn name(&self) -> &'static str {
        match self {
            JobEvent::Queued { .. } => "queued",
            JobEvent::Started => "started",
            JobEvent::Progress { .. } => "progress",
            JobEvent::Preview { .. } => "preview",
            JobEvent::Completed(_) => "complete",
            JobEvent::Failed { .. } => "error",
            JobEvent::Cancelled { .. } => "cancelled",
        }
    }

    /// Whether nothing follows this event.
    pub fn is_final(&self) -> bool {
        matches!(
            self,
            JobEvent::Completed(_) | JobEvent::Failed { .. } | JobEvent::Cancelled { .. }
        )
    }

    pub fn progress(step: usize, total: usize) -> Self {
        let percent = if total > 0 {
            (step as f64 * 1000.0 / total as f64).round() / 10.0
        } else {
            0.0
        };
        JobEvent::Progress {
            step,
            total,
            percent,
        }
    }

    pub fn failed(kind: FailureKind, message: &str) -> Self {
        JobEvent::Failed {
            message: message.to_string(),
            error: JobError {
                kind,
                message: message.to_string(),
            },
        }
    }
}

/// An event shared by every subscriber of a job; its JSON is written once, by whichever
/// subscriber asks first (previews and results carry megabytes of base64).
#[derive(Debug)]
pub struct SharedEvent {
    pub event: JobEvent,
    json: OnceLock<String>,
}

impl SharedEvent {
    pub fn name(&self) -> &'static str {
        self.event.name()
    }

    /// The event as JSON text.
    pub fn json(&self) -> &str {
        self.json.get_or_init(|| {
            serde_json::to_string(&self.event).unwrap_or_else(|e| {
                // Our own types always serialise; say so rather than panic if one did not.
                let message = format!("cannot serialise the event: {e}");
                serde_json::json!({"type": "error", "message": message}).to_string()
            })
        })
    }
}

pub type EventRef = Arc<SharedEvent>;

impl From<JobEvent> for EventRef {
    fn from(event: JobEvent) -> Self {
        Arc::new(SharedEvent {
            event,
            json: OnceLock::new(),
        })
    }
}
