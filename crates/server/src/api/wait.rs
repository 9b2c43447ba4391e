//! Waiting for a job from a synchronous endpoint (the compatibility APIs answer when the image
//! is made): the job's PNG files, or how it ended; and the guard that cancels the job when the
//! client hangs up before that.

use std::collections::VecDeque;
use std::sync::Arc;

use sd_engine::events::{FailureKind, JobEvent};
use sd_engine::Engine;
use tokio::sync::broadcast::error::RecvError;

/// How a job ended without images.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JobEnd {
    Failed {
        kind: FailureKind,
        message: String,
    },
    /// Cancelled, with the reason (`client`, `timeout`, `shutdown`).
    Cancelled(&'static str),
    /// The job's record went away before it finished (a bug, or a store too small).
    Lost,
}

/// The PNG files of job `id` once it completed.
pub async fn images(engine: &Engine, id: &str) -> Result<Vec<Arc<Vec<u8>>>, JobEnd> {
    let (first, mut live) = engine.subscribe(id).ok_or(JobEnd::Lost)?;
    let mut pending: VecDeque<_> = first.into();
    loop {
        let ev = match pending.pop_front() {
            Some(ev) => ev,
            None => match live.as_mut().ok_or(JobEnd::Lost)?.recv().await {
                Ok(ev) => ev,
                Err(RecvError::Lagged(_)) => continue,
                Err(RecvError::Closed) => return Err(JobEnd::Lost),
            },
        };
        match &ev.event {
            JobEvent::Completed(_) => break,
            JobEvent::Failed { error, .. } => {
                return Err(JobEnd::Failed {
                    kind: error.kind,
                    message: error.message.clone(),
                })
            }
            JobEvent::Cancelled { reason } => return Err(JobEnd::Cancelled(reason)),
            _ => {}
        }
    }
    let count = engine.status(id).map_or(0, |v| v.image_count);
    (0..count)
        .map(|n| match engine.image(id, n) {
            Some(Ok(png)) => Ok(png),
            _ => Err(JobEnd::Lost),
        })
        .collect()
}

/// Cancels the job when dropped while armed: a handler future is dropped when its client hangs
/// up, and the job should not run on for nobody.
pub struct CancelOnDrop {
    engine: Engine,
    id: String,
    armed: bool,
}

impl CancelOnDrop {
    pub fn new(engine: &Engine, id: &str) -> Self {
        CancelOnDrop {
            engine: engine.clone(),
            id: id.to_string(),
            armed: true,
        }
    }

    /// The job finished: nothing to cancel.
    pub fn disarm(mut self) {
        self.armed = false;
    }
}

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        if self.armed {
            let _ = self.engine.cancel(&self.id);
        }
    }
}
