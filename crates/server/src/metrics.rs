//! Counters and histograms exposed at `GET /metrics` in the Prometheus text format.

use std::fmt::Write as _;

use crate::engine::{JobState, Phase};

/// Upper bounds (seconds) of the histogram buckets.
const STEP_BUCKETS: [f64; 12] = [
    0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
];
const JOB_BUCKETS: [f64; 12] = [
    0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0,
];

#[derive(Debug, Clone)]
struct Histogram {
    bounds: &'static [f64],
    counts: Vec<u64>,
    sum: f64,
    count: u64,
}

impl Histogram {
    fn new(bounds: &'static [f64]) -> Self {
        Histogram {
            bounds,
            counts: vec![0; bounds.len()],
            sum: 0.0,
            count: 0,
        }
    }

    fn observe(&mut self, v: f64) {
        for (b, c) in self.bounds.iter().zip(&mut self.counts) {
            if v <= *b {
                *c += 1;
            }
        }
        self.sum += v;
        self.count += 1;
    }

    fn render(&self, out: &mut String, name: &str, help: &str) {
        let _ = writeln!(out, "# HELP {name} {help}");
        let _ = writeln!(out, "# TYPE {name} histogram");
        for (b, c) in self.bounds.iter().zip(&self.counts) {
            let _ = writeln!(out, "{name}_bucket{{le=\"{b}\"}} {c}");
        }
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {}", self.count);
        let _ = writeln!(out, "{name}_sum {}", self.sum);
        let _ = writeln!(out, "{name}_count {}", self.count);
    }
}

#[derive(Debug, Clone)]
pub struct Metrics {
    pub submitted: u64,
    pub rejected_queue_full: u64,
    completed: u64,
    failed: u64,
    cancelled: u64,
    steps: Histogram,
    jobs: Histogram,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics {
            submitted: 0,
            rejected_queue_full: 0,
            completed: 0,
            failed: 0,
            cancelled: 0,
            steps: Histogram::new(&STEP_BUCKETS),
            jobs: Histogram::new(&JOB_BUCKETS),
        }
    }
}

impl Metrics {
    pub fn observe_step(&mut self, seconds: f64) {
        self.steps.observe(seconds);
    }

    /// Records a job reaching a final state, `seconds` after it was submitted.
    pub fn job_finished(&mut self, state: JobState, seconds: f64) {
        match state {
            JobState::Completed => self.completed += 1,
            JobState::Failed => self.failed += 1,
            JobState::Cancelled => self.cancelled += 1,
            _ => return,
        }
        self.jobs.observe(seconds);
    }

    /// Mean seconds from submission to a final state over the finished jobs.
    pub fn mean_job_seconds(&self) -> Option<f64> {
        (self.jobs.count > 0).then(|| self.jobs.sum / self.jobs.count as f64)
    }

    pub fn render(&self, queued: usize, running: usize, phase: &Phase) -> String {
        let mut out = String::new();
        let gauge = |out: &mut String, name: &str, help: &str, v: usize| {
            let _ = writeln!(out, "# HELP {name} {help}");
            let _ = writeln!(out, "# TYPE {name} gauge");
            let _ = writeln!(out, "{name} {v}");
        };
        gauge(
            &mut out,
            "sd_worker_queue_depth",
            "Jobs waiting in the queue.",
            queued,
        );
        gauge(
            &mut out,
            "sd_worker_jobs_running",
            "Jobs running now.",
            running,
        );
        gauge(
            &mut out,
            "sd_worker_ready",
            "1 when the model is loaded and jobs are admitted.",
            usize::from(*phase == Phase::Ready),
        );
        let _ = writeln!(
            out,
            "# HELP sd_worker_jobs_submitted_total Jobs accepted into the queue."
        );
        let _ = writeln!(out, "# TYPE sd_worker_jobs_submitted_total counter");
        let _ = writeln!(out, "sd_worker_jobs_submitted_total {}", self.submitted);
        let _ = writeln!(
            out,
            "# HELP sd_worker_jobs_rejected_total Submissions refused because the queue was full."
        );
        let _ = writeln!(out, "# TYPE sd_worker_jobs_rejected_total counter");
        let _ = writeln!(
            out,
            "sd_worker_jobs_rejected_total{{reason=\"queue_full\"}} {}",
            self.rejected_queue_full
        );
        let _ = writeln!(
            out,
            "# HELP sd_worker_jobs_total Jobs that reached a final state, by outcome."
        );
        let _ = writeln!(out, "# TYPE sd_worker_jobs_total counter");
        for (outcome, n) in [
            ("completed", self.completed),
            ("failed", self.failed),
            ("cancelled", self.cancelled),
        ] {
            let _ = writeln!(out, "sd_worker_jobs_total{{outcome=\"{outcome}\"}} {n}");
        }
        self.steps.render(
            &mut out,
            "sd_worker_step_seconds",
            "Seconds per denoising step.",
        );
        self.jobs.render(
            &mut out,
            "sd_worker_job_seconds",
            "Seconds from submission to a final state.",
        );
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_are_cumulative() {
        let mut m = Metrics::default();
        m.observe_step(0.02);
        m.observe_step(3.0);
        let text = m.render(0, 0, &Phase::Ready);
        assert!(text.contains("sd_worker_step_seconds_bucket{le=\"0.01\"} 0"));
        assert!(text.contains("sd_worker_step_seconds_bucket{le=\"0.025\"} 1"));
        assert!(text.contains("sd_worker_step_seconds_bucket{le=\"5\"} 2"));
        assert!(text.contains("sd_worker_step_seconds_bucket{le=\"+Inf\"} 2"));
        assert!(text.contains("sd_worker_step_seconds_count 2"));
    }
}
