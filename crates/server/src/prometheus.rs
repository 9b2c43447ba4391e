//! `GET /metrics`: the Prometheus exporter of the `metrics` facade, which the engine records
//! into (names, help texts and buckets are the engine's, `sd_engine::metrics`).

use anyhow::{Context, Result};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use sd_engine::metrics::{
    JOB_BUCKETS, JOB_SECONDS, QUEUE_WAIT_SECONDS, STEP_BUCKETS, STEP_SECONDS,
};

/// Installs the process-wide recorder and returns the handle that renders the text format.
pub fn install() -> Result<PrometheusHandle> {
    let handle = PrometheusBuilder::new()
        .set_buckets_for_metric(Matcher::Full(STEP_SECONDS.into()), &STEP_BUCKETS)?
        .set_buckets_for_metric(Matcher::Full(JOB_SECONDS.into()), &JOB_BUCKETS)?
        .set_buckets_for_metric(Matcher::Full(QUEUE_WAIT_SECONDS.into()), &JOB_BUCKETS)?
        .install_recorder()
        .context("cannot install the metrics recorder")?;
    sd_engine::metrics::describe();
    Ok(handle)
}
