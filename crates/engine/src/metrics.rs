//! The engine's metrics, recorded through the `metrics` facade: whichever exporter the binary
//! installs (the server installs Prometheus' at `GET /metrics`) sees them; without one they cost
//! nothing. Names and help texts are declared here once.

use metrics::{counter, describe_counter, describe_gauge, describe_histogram, gauge, histogram};

pub const QUEUE_DEPTH: &str = "sd_worker_queue_depth";
pub const JOBS_RUNNING: &str = "sd_worker_jobs_running";
pub const READY: &str = "sd_worker_ready";
pub const JOBS_SUBMITTED: &str = "sd_worker_jobs_submitted_total";
pub const JOBS_REJECTED: &str = "sd_worker_jobs_rejected_total";
pub const JOBS_FINISHED: &str = "sd_worker_jobs_total";
pub const STEP_SECONDS: &str = "sd_worker_step_seconds";
pub const JOB_SECONDS: &str = "sd_worker_job_seconds";
pub const QUEUE_WAIT_SECONDS: &str = "sd_worker_queue_wait_seconds";

/// Histogram bucket bounds (seconds) of each histogram, for exporters that need them.
pub const STEP_BUCKETS: [f64; 12] = [
    0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
];
pub const JOB_BUCKETS: [f64; 12] = [
    0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0,
];

/// Final states, as the `outcome` label says them.
const OUTCOMES: [&str; 3] = ["completed", "failed", "cancelled"];

/// Describes every metric and registers it at zero, so that an exporter shows them all
/// from the start (a scrape before the first job sees zeros, not missing series).
pub fn describe() {
    describe_gauge!(QUEUE_DEPTH, "Jobs waiting in the queue.");
    describe_gauge!(JOBS_RUNNING, "Jobs running now.");
    describe_gauge!(READY, "1 when the model is loaded and jobs are admitted.");
    describe_counter!(JOBS_SUBMITTED, "Jobs accepted into the queue.");
    describe_counter!(
        JOBS_REJECTED,
        "Submissions refused because the queue was full."
    );
    describe_counter!(
        JOBS_FINISHED,
        "Jobs that reached a final state, by outcome."
    );
    describe_histogram!(STEP_SECONDS, "Seconds per denoising step.");
    describe_histogram!(JOB_SECONDS, "Seconds from submission to a final state.");
    describe_histogram!(
        QUEUE_WAIT_SECONDS,
        "Seconds a job waited in the queue before it started."
    );
    counter!(JOBS_SUBMITTED).absolute(0);
    counter!(JOBS_REJECTED, "reason" => "queue_full").absolute(0);
    for outcome in OUTCOMES {
        counter!(JOBS_FINISHED, "outcome" => outcome).absolute(0);
    }
    for name in [STEP_SECONDS, JOB_SECONDS, QUEUE_WAIT_SECONDS] {
        // Registered: shown with zero counts until the first observation.
        let _ = histogram!(name);
    }
    gauges(0, 0, false);
}

pub(crate) fn gauges(queued: usize, running: usize, ready: bool) {
    gauge!(QUEUE_DEPTH).set(queued as f64);
    gauge!(JOBS_RUNNING).set(running as f64);
    gauge!(READY).set(if ready { 1.0 } else { 0.0 });
}

pub(crate) fn job_submitted() {
    counter!(JOBS_SUBMITTED).increment(1);
}

pub(crate) fn rejected_queue_full() {
    counter!(JOBS_REJECTED, "reason" => "queue_full").increment(1);
}

/// A job reached its final state (`completed`, `failed` or `cancelled`), `seconds` after it
/// was submitted.
pub(crate) fn job_finished(outcome: &'static str, seconds: f64) {
    if !OUTCOMES.contains(&outcome) {
        return;
    }
    counter!(JOBS_FINISHED, "outcome" => outcome).increment(1);
    histogram!(JOB_SECONDS).record(seconds);
}

pub(crate) fn step(seconds: f64) {
    histogram!(STEP_SECONDS).record(seconds);
}

pub(crate) fn queue_wait(seconds: f64) {
    histogram!(QUEUE_WAIT_SECONDS).record(seconds);
}
