//! Engine tests with a fake pipeline: ordering, previews, cancellation, deadlines, panic
//! isolation, queue bounds, result lifetimes and shutdown. No model is loaded.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use candle_core::{Device, Tensor};
use sd_models::pipelines::{GenerateParams, Generated, Progress, RgbImage};
use sd_models::samplers::SamplerKind;
use serde_json::Value;

use super::*;
use crate::backend::Backend;
use crate::request::PreviewKind;

/// Runs `steps` steps of `step_ms` each; the prompt "panic" panics at step 2, "fail" errors
/// at step 2 and "slow-decode" takes 400 ms after its last step.
struct Fake {
    step_ms: u64,
    log: Arc<Mutex<Vec<String>>>,
}

impl Backend for Fake {
    fn generate(
        &self,
        request: &GenerationRequest,
        on_step: &mut dyn FnMut(Progress<'_>) -> sd_models::Result<()>,
    ) -> sd_models::Result<Generated> {
        let params = &request.params;
        self.log.lock().unwrap().push(params.prompt.clone());
        let latents = Tensor::zeros(
            (params.batch, 4, 2, 2),
            candle_core::DType::F32,
            &Device::Cpu,
        )?;
        for step in 1..=params.steps {
            std::thread::sleep(Duration::from_millis(self.step_ms));
            if params.prompt == "panic" && step == 2 {
                panic!("fake pipeline panicked");
            }
            if params.prompt == "fail" && step == 2 {
                return Err(sd_models::Error::Candle(candle_core::Error::Msg(
                    "boom".into(),
                )));
            }
            on_step(Progress {
                step,
                total: params.steps,
                latents: &latents,
            })?;
        }
        if params.prompt == "slow-decode" {
            std::thread::sleep(Duration::from_millis(400));
        }
        let image = RgbImage {
            width: params.width,
            height: params.height,
            pixels: vec![params.seed as u8; params.width * params.height * 3],
        };
        let warnings = if params.prompt == "warn" {
            vec!["x.safetensors: lora_unet_nothing.lora_down.weight (no such layer)".into()]
        } else {
            Vec::new()
        };
        Ok(Generated {
            images: vec![image; params.batch],
            truncated_tokens: (0, 0),
            warnings,
        })
    }

    fn preview(
        &self,
        _latents: &Tensor,
        _request: &GenerationRequest,
        _kind: PreviewKind,
    ) -> sd_models::Result<RgbImage> {
        Ok(RgbImage {
            width: 2,
            height: 2,
            pixels: vec![0; 12],
        })
    }
}

fn spec() -> ModelSpec {
    ModelSpec {
        name: "fake".into(),
        path: "/fake".into(),
        default_width: 16,
        default_height: 16,
        default_sampler: Ok(SamplerKind::Euler),
        ..ModelSpec::sd_example()
    }
}

fn config() -> EngineConfig {
    EngineConfig {
        max_queue: 8,
        result_ttl: Duration::from_secs(60),
        max_results: 100,
        job_timeout: Duration::from_secs(60),
        log_jobs: true,
    }
}

fn start(config: EngineConfig, step_ms: u64) -> (Engine, Arc<Mutex<Vec<String>>>) {
    let log = Arc::new(Mutex::new(Vec::new()));
    let fake = Fake {
        step_ms,
        log: log.clone(),
    };
    let loader: Loader<Fake> = Box::new(move || Ok((fake, spec())));
    let (engine, loaded) = Engine::start(config, loader);
    loaded.recv().unwrap().unwrap();
    (engine, log)
}

fn job(prompt: &str, steps: usize) -> GenerationRequest {
    GenerationRequest {
        operation: Operation::Generation,
        input: None,
        max_sequence_length: None,
        flux: None,
        params: GenerateParams {
            prompt: prompt.into(),
            negative_prompt: None,
            width: 16,
            height: 16,
            steps,
            guidance: 7.5,
            seed: 3,
            sampler: SamplerKind::Euler,
            schedule: Default::default(),
            eta: 0.0,
            s_noise: 1.0,
            batch: 1,
            prompt_syntax: Default::default(),
            micro: Default::default(),
        },
        preview_every: 0,
        preview: PreviewKind::Approx,
        hive_id: None,
        worker_id: None,
        loras: Vec::new(),
    }
}

/// The job's record as the HTTP layer serialises it.
fn status(engine: &Engine, id: &str) -> Option<Value> {
    engine.status(id).map(|v| serde_json::to_value(v).unwrap())
}

fn state(engine: &Engine, id: &str) -> String {
    status(engine, id).unwrap()["state"]
        .as_str()
        .unwrap()
        .to_string()
}

fn wait_final(engine: &Engine, id: &str) -> Value {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let v = status(engine, id).unwrap();
        if ["completed", "failed", "cancelled"].contains(&v["state"].as_str().unwrap()) {
            return v;
        }
        assert!(Instant::now() < deadline, "job {id} never finished: {v}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn wait_running(engine: &Engine, id: &str) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while state(engine, id) != "running" {
        assert!(Instant::now() < deadline);
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// Every event until the stream's final one.
fn collect_events(engine: &Engine, id: &str) -> Vec<(String, Value)> {
    let (first, live) = engine.subscribe(id).unwrap();
    let mut out: Vec<(String, Value)> = first
        .iter()
        .map(|e| {
            (
                e.name().to_string(),
                serde_json::from_str(e.json()).unwrap(),
            )
        })
        .collect();
    if let Some(mut rx) = live {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            while !out
                .last()
                .is_some_and(|(n, _)| ["complete", "error", "cancelled"].contains(&n.as_str()))
            {
                let ev = tokio::time::timeout(Duration::from_secs(20), rx.recv())
                    .await
                    .expect("event within 20 s")
                    .unwrap();
                out.push((
                    ev.name().to_string(),
                    serde_json::from_str(ev.json()).unwrap(),
                ));
            }
        });
    }
    out
}

#[test]
fn jobs_run_in_submission_order() {
    let (engine, log) = start(config(), 1);
    let ids: Vec<String> = ["a", "b", "c", "d"]
        .iter()
        .map(|p| engine.submit(job(p, 3)).unwrap())
        .collect();
    for id in &ids {
        let v = wait_final(&engine, id);
        assert_eq!(v["state"], "completed");
        assert_eq!(engine.status(id).unwrap().image_count, 1);
    }
    assert_eq!(*log.lock().unwrap(), vec!["a", "b", "c", "d"]);
    let png = engine.image(&ids[0], 0).unwrap().unwrap();
    assert_eq!(&png[1..4], b"PNG");
}

#[test]
fn progress_every_step_in_order_and_previews_at_the_interval() {
    let (engine, _) = start(config(), 5);
    let mut request = job("p", 6);
    request.preview_every = 3;
    let id = engine.submit(request).unwrap();
    let events = collect_events(&engine, &id);
    let names: Vec<&str> = events.iter().map(|(n, _)| n.as_str()).collect();
    // queued (or started, if the engine was quicker than the subscription) ... complete
    assert_eq!(*names.last().unwrap(), "complete");
    let steps: Vec<u64> = events
        .iter()
        .filter(|(n, _)| n == "progress")
        .map(|(_, v)| v["step"].as_u64().unwrap())
        .collect();
    let first_step = steps[0];
    assert_eq!(steps, (first_step..=6).collect::<Vec<_>>());
    // A subscriber that arrived mid-run may have missed the preview of its first step.
    let previews: Vec<u64> = events
        .iter()
        .filter(|(n, _)| n == "preview")
        .map(|(_, v)| v["step"].as_u64().unwrap())
        .filter(|&s| s > first_step)
        .collect();
    // None on the last step (6): its image is the result.
    let expected: Vec<u64> = [3u64].into_iter().filter(|&s| s > first_step).collect();
    assert_eq!(previews, expected);
    for (name, data) in &events {
        assert_eq!(data["type"], name.as_str());
    }
    let (_, complete) = events.last().unwrap();
    assert_eq!(complete["seed"], 3);
    assert_eq!(complete["format"], "png");
    assert_eq!(complete["images"][0], complete["image"]);
}

#[test]
fn queue_is_bounded_and_full_queue_loses_nothing() {
    let mut c = config();
    c.max_queue = 2;
    let (engine, _) = start(c, 20);
    let running = engine.submit(job("run", 50)).unwrap();
    wait_running(&engine, &running);
    let a = engine.submit(job("a", 1)).unwrap();
    let b = engine.submit(job("b", 1)).unwrap();
    match engine.submit(job("c", 1)) {
        Err(SubmitError::QueueFull { max, retry_after_s }) => {
            assert_eq!(max, 2);
            assert!(retry_after_s >= 1);
        }
        other => panic!("expected QueueFull, got {other:?}"),
    }
    assert_eq!(status(&engine, &a).unwrap()["position"], 1);
    assert_eq!(status(&engine, &b).unwrap()["position"], 2);
    assert!(matches!(
        engine.cancel(&running),
        CancelOutcome::Stopping(_)
    ));
    for id in [&a, &b] {
        assert_eq!(wait_final(&engine, id)["state"], "completed");
    }
}

#[test]
fn cancel_queued_and_running_jobs() {
    let (engine, log) = start(config(), 10);
    let running = engine.submit(job("run", 1000)).unwrap();
    let queued = engine.submit(job("queued", 1)).unwrap();
    let after = engine.submit(job("after", 1)).unwrap();
    wait_running(&engine, &running);
    assert_eq!(status(&engine, &after).unwrap()["position"], 2);
    let CancelOutcome::Cancelled(v) = engine.cancel(&queued) else {
        panic!("queued job not cancelled at once");
    };
    let v = serde_json::to_value(v).unwrap();
    assert_eq!(v["state"], "cancelled");
    assert_eq!(v["cancel_reason"], "client");
    assert_eq!(status(&engine, &after).unwrap()["position"], 1);
    let t = Instant::now();
    assert!(matches!(
        engine.cancel(&running),
        CancelOutcome::Stopping(_)
    ));
    let v = wait_final(&engine, &running);
    assert!(
        t.elapsed() < Duration::from_secs(2),
        "running job took {:?} to stop",
        t.elapsed()
    );
    assert_eq!(v["state"], "cancelled");
    assert!(v["step"].as_u64().unwrap() < 1000);
    assert_eq!(wait_final(&engine, &after)["state"], "completed");
    assert!(matches!(
        engine.cancel(&after),
        CancelOutcome::AlreadyFinished(JobState::Completed)
    ));
    assert!(matches!(engine.cancel("nope"), CancelOutcome::NotFound));
    assert_eq!(*log.lock().unwrap(), vec!["run", "after"]);
    let events = collect_events(&engine, &running);
    assert_eq!(events.len(), 1);
    assert_eq!(events[0].0, "cancelled");
    assert_eq!(events[0].1["reason"], "client");
}

#[test]
fn deadline_cancels_a_long_job() {
    let mut c = config();
    c.job_timeout = Duration::from_millis(100);
    let (engine, _) = start(c, 10);
    let id = engine.submit(job("slow", 10_000)).unwrap();
    let v = wait_final(&engine, &id);
    assert_eq!(v["state"], "cancelled");
    assert_eq!(v["cancel_reason"], "timeout");
    let next = engine.submit(job("next", 2)).unwrap();
    assert_eq!(wait_final(&engine, &next)["state"], "completed");
}

#[test]
fn a_panic_or_error_fails_only_its_job() {
    let (engine, _) = start(config(), 1);
    let panics = engine.submit(job("panic", 5)).unwrap();
    let fails = engine.submit(job("fail", 5)).unwrap();
    let fine = engine.submit(job("fine", 5)).unwrap();
    let v = wait_final(&engine, &panics);
    assert_eq!(v["state"], "failed");
    assert_eq!(v["error"]["type"], "internal");
    assert!(v["error"]["message"]
        .as_str()
        .unwrap()
        .contains("fake pipeline panicked"));
    let v = wait_final(&engine, &fails);
    assert_eq!(v["state"], "failed");
    assert_eq!(v["error"]["type"], "generation_failed");
    assert!(v["error"]["message"].as_str().unwrap().contains("boom"));
    assert_eq!(wait_final(&engine, &fine)["state"], "completed");
    let events = collect_events(&engine, &panics);
    assert_eq!(events[0].0, "error");
    assert_eq!(events[0].1["error"]["type"], "internal");
    assert_eq!(engine.outcomes().failed, 2);
}

#[test]
fn finished_jobs_expire_after_the_ttl_and_beyond_max_results() {
    let mut c = config();
    c.result_ttl = Duration::from_secs(1);
    let (engine, _) = start(c, 1);
    let id = engine.submit(job("a", 1)).unwrap();
    wait_final(&engine, &id);
    assert!(engine.status(&id).is_some());
    std::thread::sleep(Duration::from_millis(1200));
    assert!(engine.status(&id).is_none());
    assert!(engine.image(&id, 0).is_none());

    let mut c = config();
    c.max_results = 2;
    let (engine, _) = start(c, 1);
    let ids: Vec<String> = (0..4)
        .map(|i| engine.submit(job(&format!("j{i}"), 1)).unwrap())
        .collect();
    wait_final(&engine, &ids[3]);
    assert!(engine.status(&ids[0]).is_none());
    assert!(engine.status(&ids[1]).is_none());
    assert!(engine.status(&ids[2]).is_some());
    assert_eq!(engine.list().len(), 2);
}

#[test]
fn shutdown_cancels_the_queue_and_lets_the_running_job_finish_within_grace() {
    let (engine, log) = start(config(), 5);
    let running = engine.submit(job("run", 20)).unwrap();
    let queued = engine.submit(job("queued", 5)).unwrap();
    wait_running(&engine, &running);
    engine.shutdown(Duration::from_secs(10));
    assert_eq!(engine.phase(), Phase::Draining);
    assert_eq!(state(&engine, &running), "completed");
    let v = status(&engine, &queued).unwrap();
    assert_eq!(v["state"], "cancelled");
    assert_eq!(v["cancel_reason"], "shutdown");
    assert_eq!(engine.submit(job("late", 1)), Err(SubmitError::Draining));
    assert_eq!(*log.lock().unwrap(), vec!["run"]);
}

#[test]
fn shutdown_cancels_the_running_job_after_the_grace() {
    let (engine, _) = start(config(), 10);
    let running = engine.submit(job("run", 100_000)).unwrap();
    wait_running(&engine, &running);
    let t = Instant::now();
    engine.shutdown(Duration::from_millis(50));
    assert!(t.elapsed() < Duration::from_secs(2));
    let v = status(&engine, &running).unwrap();
    assert_eq!(v["state"], "cancelled");
    assert_eq!(v["cancel_reason"], "shutdown");
}

#[test]
fn a_failed_load_is_reported() {
    let loader: Loader<Fake> = Box::new(|| anyhow::bail!("no weights"));
    let (engine, loaded) = Engine::start(config(), loader);
    assert_eq!(loaded.recv().unwrap(), Err("no weights".to_string()));
    assert!(matches!(engine.phase(), Phase::Failed(_)));
    assert!(matches!(
        engine.submit(job("a", 1)),
        Err(SubmitError::NotReady(_))
    ));
}

#[test]
fn the_deadline_counts_from_the_start_not_the_submission() {
    let mut c = config();
    c.job_timeout = Duration::from_millis(1500);
    let (engine, _) = start(c, 10);
    // 1 s running, then 0.6 s: over the timeout from submission, under it from the start.
    let first = engine.submit(job("first", 100)).unwrap();
    let second = engine.submit(job("second", 60)).unwrap();
    assert_eq!(wait_final(&engine, &first)["state"], "completed");
    let v = wait_final(&engine, &second);
    assert_eq!(v["state"], "completed", "{v}");
    assert!(v["timings"]["total"].as_f64().unwrap() > 1.5);
}

#[test]
fn a_late_subscriber_to_a_running_job_gets_started_and_the_latest_progress() {
    let (engine, _) = start(config(), 10);
    let id = engine.submit(job("run", 60)).unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while status(&engine, &id).unwrap()["step"].as_u64().unwrap() < 3 {
        assert!(Instant::now() < deadline);
        std::thread::sleep(Duration::from_millis(5));
    }
    let events = collect_events(&engine, &id);
    assert_eq!(events[0].0, "started");
    assert_eq!(events[1].0, "progress");
    let first = events[1].1["step"].as_u64().unwrap();
    assert!(first >= 3);
    let steps: Vec<u64> = events
        .iter()
        .filter(|(n, _)| n == "progress")
        .map(|(_, v)| v["step"].as_u64().unwrap())
        .collect();
    assert_eq!(steps, (first..=60).collect::<Vec<_>>());
    assert_eq!(events.last().unwrap().0, "complete");
}

#[test]
fn a_job_past_its_last_step_cannot_be_cancelled() {
    let (engine, _) = start(config(), 1);
    let id = engine.submit(job("slow-decode", 3)).unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while status(&engine, &id).unwrap()["step"].as_u64().unwrap() < 3 {
        assert!(Instant::now() < deadline);
        std::thread::sleep(Duration::from_millis(2));
    }
    assert!(matches!(engine.cancel(&id), CancelOutcome::Finishing));
    assert_eq!(wait_final(&engine, &id)["state"], "completed");
}

#[test]
fn warnings_reach_the_complete_event_and_late_subscribers() {
    let (engine, _) = start(config(), 1);
    let id = engine.submit(job("warn", 2)).unwrap();
    let events = collect_events(&engine, &id);
    let (name, data) = events.last().unwrap();
    assert_eq!(name, "complete");
    assert_eq!(
        data["warnings"],
        serde_json::json!(["x.safetensors: lora_unet_nothing.lora_down.weight (no such layer)"])
    );
    wait_final(&engine, &id);
    // A subscriber after the end gets the same complete event.
    let late = collect_events(&engine, &id);
    assert_eq!(late.last().unwrap().1["warnings"], data["warnings"]);
    // Jobs without warnings report an empty list.
    let id = engine.submit(job("plain", 1)).unwrap();
    let events = collect_events(&engine, &id);
    assert_eq!(events.last().unwrap().1["warnings"], serde_json::json!([]));
}
