//! `sd-worker serve` end to end on a free loopback port with the tiny SD 1.x fixture model:
//! results equal to `generate`, events, previews, cancellation, queue bounds, input errors,
//! auth, late subscribers and graceful shutdown.

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::{b64decode, http, model, Server, Watch};
use serde_json::{json, Value};

/// A job that keeps the engine busy (150 steps at 64x64: several seconds on the tiny model)
/// until it is cancelled.
fn blocker() -> Value {
    json!({"operation": "image_generation", "prompt": "blocker", "width": 64, "height": 64,
           "steps": 150, "scheduler": "euler", "preview_every": 0})
}

fn tmp(name: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("sd-worker-serve-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir.join(name)
}

#[test]
fn result_equals_generate_and_events_arrive_in_order() {
    let server = Server::start(&[]);
    // Hold the engine so that the job is still queued when we subscribe.
    let busy = server.submit(&blocker());
    server.wait_state(&busy, &["running"]);
    let id = server.submit(&json!({
        "operation": "image_generation", "prompt": "a photo of a cat", "negative_prompt": "blurry",
        "steps": 10, "seed": 42, "scheduler": "euler", "guidance_scale": 6,
        "preview_every": 3, "hive_id": "hive-1", "worker_id": "w-7"
    }));
    let status = server.status(&id);
    assert_eq!(status["state"], "queued");
    assert_eq!(status["position"], 1);
    assert_eq!(status["hive_id"], "hive-1");
    assert_eq!(status["worker_id"], "w-7");
    let stream = Watch::open(
        &server.addr,
        &format!("/v1/jobs/{id}/stream"),
        "event: queued",
    );
    assert_eq!(server.delete(&format!("/v1/jobs/{busy}")).status, 202);
    let events = stream.finish();

    let names: Vec<&str> = events.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names[0], "queued");
    assert_eq!(events[0].1["position"], 1);
    assert_eq!(names[1], "started");
    assert_eq!(*names.last().unwrap(), "complete");
    for (name, data) in &events {
        assert_eq!(data["type"], name.as_str(), "every data has its type");
    }
    let steps: Vec<u64> = events
        .iter()
        .filter(|(n, _)| n == "progress")
        .map(|(_, d)| d["step"].as_u64().unwrap())
        .collect();
    assert_eq!(steps, (1..=10).collect::<Vec<_>>(), "one progress per step");
    let last_progress = events.iter().rfind(|(n, _)| n == "progress").unwrap();
    assert_eq!(last_progress.1["percent"], 100.0);
    let previews: Vec<&Value> = events
        .iter()
        .filter(|(n, _)| n == "preview")
        .map(|(_, d)| d)
        .collect();
    let preview_steps: Vec<u64> = previews
        .iter()
        .map(|d| d["step"].as_u64().unwrap())
        .collect();
    assert_eq!(
        preview_steps,
        [3, 6, 9],
        "a preview every 3 steps, none on the last"
    );
    for p in &previews {
        assert_eq!(p["format"], "png");
        let png = b64decode(p["image"].as_str().unwrap());
        assert_eq!(&png[1..4], b"PNG");
        // approx previews are at latent resolution (32 px / factor 2)
        assert_eq!(
            (p["width"].as_u64(), p["height"].as_u64()),
            (Some(16), Some(16))
        );
    }
    let complete = &events.last().unwrap().1;
    assert_eq!(complete["seed"], 42);
    assert_eq!(complete["format"], "png");
    let image = b64decode(complete["image"].as_str().unwrap());
    assert_eq!(complete["images"][0], complete["image"]);

    // The same request through the CLI writes the same bytes.
    let out = tmp("cat.png");
    let cli = Command::new(env!("CARGO_BIN_EXE_sd-worker"))
        .args([
            "generate",
            "--model",
            &model("tiny-sd1"),
            "--prompt",
            "a photo of a cat",
            "--negative-prompt",
            "blurry",
            "--steps",
            "10",
            "--seed",
            "42",
            "--scheduler",
            "euler",
            "--guidance",
            "6",
            "--output",
        ])
        .arg(&out)
        .env_clear()
        .output()
        .unwrap();
    assert!(
        cli.status.success(),
        "{}",
        String::from_utf8_lossy(&cli.stderr)
    );
    assert_eq!(
        image,
        std::fs::read(&out).unwrap(),
        "server and CLI images differ"
    );

    // Status and the image route agree.
    let status = server.status(&id);
    assert_eq!(status["state"], "completed");
    assert_eq!(status["seed"], 42);
    assert_eq!(status["step"], 10);
    assert!(status["timings"]["generation"].as_f64().unwrap() > 0.0);
    let url = status["images"][0].as_str().unwrap();
    let r = server.get(url);
    assert_eq!(r.status, 200);
    assert_eq!(r.header("content-type").as_deref(), Some("image/png"));
    assert_eq!(r.body, image);
    assert_eq!(server.get(&format!("/v1/jobs/{id}/images/1")).status, 404);

    // A late subscriber gets the result at once.
    let late = server.events(&id);
    assert_eq!(late.len(), 1);
    assert_eq!(late[0].0, "complete");
    assert_eq!(late[0].1["image"], complete["image"]);

    // The cancelled blocker ended cancelled, before its last step.
    let busy_status = server.status(&busy);
    assert_eq!(busy_status["state"], "cancelled");
    assert_eq!(busy_status["cancel_reason"], "client");
    assert!(busy_status["step"].as_u64().unwrap() < 150);
}

#[test]
fn full_previews_and_batches() {
    let server = Server::start(&[]);
    let id = server.submit(&json!({
        "operation": "image_generation", "prompt": "x", "steps": 4, "seed": 1, "batch": 2,
        "scheduler": "ddim", "preview_every": 2, "preview": "full", "width": 48, "height": 32
    }));
    server.wait_final(&id);
    let status = server.status(&id);
    assert_eq!(status["state"], "completed", "{status}");
    assert_eq!(status["images"].as_array().unwrap().len(), 2);
    for n in 0..2 {
        let r = server.get(&format!("/v1/jobs/{id}/images/{n}"));
        assert_eq!(r.status, 200);
        let text = String::from_utf8_lossy(&r.body).into_owned();
        assert!(text.contains(&format!("Batch size: 2, Batch pos: {n}")));
    }
    // Finished: the stream is the final event only; check a full preview on a new job.
    let busy = server.submit(&blocker());
    server.wait_state(&busy, &["running"]);
    let id = server.submit(&json!({
        "operation": "image_generation", "prompt": "x", "steps": 3, "scheduler": "euler",
        "preview_every": 1, "preview": "full", "width": 48, "height": 32
    }));
    let stream = Watch::open(
        &server.addr,
        &format!("/v1/jobs/{id}/events"),
        "event: queued",
    );
    server.delete(&format!("/v1/jobs/{busy}"));
    let events = stream.finish();
    let previews: Vec<&Value> = events
        .iter()
        .filter(|(n, _)| n == "preview")
        .map(|(_, d)| d)
        .collect();
    assert_eq!(previews.len(), 2, "steps 1 and 2, not the last");
    for p in previews {
        assert_eq!(
            (p["width"].as_u64(), p["height"].as_u64()),
            (Some(48), Some(32))
        );
    }
    let seed = events.last().unwrap().1["seed"].as_u64().unwrap();
    assert_eq!(
        server.status(&id)["seed"].as_u64().unwrap(),
        seed,
        "random seed reported"
    );
}

#[test]
fn cancel_queued_and_running_jobs() {
    let server = Server::start(&[]);
    let running = server.submit(&blocker());
    let queued =
        server.submit(&json!({"operation": "image_generation", "prompt": "q", "steps": 2}));
    server.wait_state(&running, &["running"]);

    let r = server.delete(&format!("/v1/jobs/{queued}"));
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["state"], "cancelled");
    let events = server.events(&queued);
    assert_eq!(events.len(), 1);
    assert_eq!(events[0].0, "cancelled");
    assert_eq!(events[0].1["reason"], "client");

    // Let it take a few steps, then stop it.
    let deadline = Instant::now() + Duration::from_secs(30);
    while server.status(&running)["step"].as_u64().unwrap() < 2 {
        assert!(Instant::now() < deadline);
        std::thread::sleep(Duration::from_millis(10));
    }
    let t = Instant::now();
    let r = server.delete(&format!("/v1/jobs/{running}"));
    assert_eq!(r.status, 202, "{}", r.text());
    assert_eq!(r.json()["cancel_requested"], true);
    let v = server.wait_final(&running);
    let stopped_in = t.elapsed();
    assert_eq!(v["state"], "cancelled");
    assert!(v["step"].as_u64().unwrap() < 150);
    assert!(stopped_in < Duration::from_secs(10), "took {stopped_in:?}");

    let r = server.delete(&format!("/v1/jobs/{running}"));
    assert_eq!(r.status, 409);
    assert_eq!(r.error().0, "conflict");
    let r = server.delete("/v1/jobs/nope");
    assert_eq!(r.status, 404);
    assert_eq!(r.error().0, "not_found");
}

#[test]
fn full_queue_answers_429_and_loses_nothing() {
    let server = Server::start(&["--max-queue", "2"]);
    let running = server.submit(&blocker());
    server.wait_state(&running, &["running"]);
    let small =
        json!({"operation": "image_generation", "prompt": "s", "steps": 2, "scheduler": "euler"});
    let a = server.submit(&small);
    let b = server.submit(&small);
    let r = server.post_json("/v1/jobs", &small);
    assert_eq!(r.status, 429, "{}", r.text());
    assert_eq!(r.error().0, "queue_full");
    assert!(r.error().1.contains("--max-queue"));
    let retry: u64 = r.header("retry-after").unwrap().parse().unwrap();
    assert!(retry >= 1);
    let list = server.get("/v1/jobs").json();
    let states: Vec<&str> = list["jobs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|j| j["state"].as_str().unwrap())
        .collect();
    assert_eq!(states, ["queued", "queued", "running"]);
    server.delete(&format!("/v1/jobs/{running}"));
    for id in [&a, &b] {
        assert_eq!(server.wait_final(id)["state"], "completed");
    }
    let metrics = server.get("/metrics").text();
    assert!(metrics.contains("sd_worker_jobs_rejected_total{reason=\"queue_full\"} 1"));
    assert!(metrics.contains("sd_worker_jobs_total{outcome=\"completed\"} 2"));
    assert!(metrics.contains("sd_worker_jobs_total{outcome=\"cancelled\"} 1"));
    assert!(metrics.contains("sd_worker_queue_depth 0"));
}

#[test]
fn bad_inputs_get_their_status_and_name_the_field() {
    let server = Server::start(&[
        "--max-pixels",
        "4096",
        "--max-body-bytes",
        "2048",
        "--max-steps",
        "40",
    ]);
    let base = json!({"operation": "image_generation", "prompt": "a"});
    let with = |k: &str, v: Value| {
        let mut b = base.clone();
        b[k] = v;
        b
    };
    let cases: Vec<(Value, Vec<&str>)> = vec![
        (
            with("width", json!(33)),
            vec!["`width`", "multiple of 2", "33"],
        ),
        (
            with("width", json!(256)),
            vec!["`width`", "4096", "256x32", "8192"],
        ),
        (with("steps", json!(0)), vec!["`steps`", "40", "0"]),
        (with("steps", json!(41)), vec!["`steps`", "40", "41"]),
        (
            with("guidance_scale", json!(100.5)),
            vec!["`guidance_scale`", "100", "100.5"],
        ),
        (with("batch", json!(9)), vec!["`batch`", "8", "9"]),
        (
            with("scheduler", json!("dpm-fast")),
            vec!["`scheduler`", "dpmpp-2m", "dpm-fast"],
        ),
        (with("prompt", json!("")), vec!["`prompt`", "empty"]),
        (
            with("colour", json!("red")),
            vec!["`colour`", "unknown field"],
        ),
        (with("seed", json!("x")), vec!["`seed`", "integer", "\"x\""]),
        (
            with("model", json!("sdxl")),
            vec!["`model`", "tiny-sd1", "sdxl"],
        ),
        (
            with("operation", json!("image_inpaint")),
            vec!["`init_image`", "required"],
        ),
        (json!({"prompt": "a"}), vec!["`operation`", "required"]),
    ];
    for (body, needles) in cases {
        let r = server.post_json("/v1/jobs", &body);
        assert_eq!(r.status, 422, "{body}: {}", r.text());
        let (kind, message) = r.error();
        assert_eq!(kind, "invalid_request");
        for n in needles {
            assert!(message.contains(n), "{body}: {message:?} lacks {n:?}");
        }
    }
    // A model named by folder name or path is accepted.
    let ok = server.post_json("/v1/jobs", &with("model", json!("tiny-sd1")));
    assert_eq!(ok.status, 202, "{}", ok.text());
    let ok = server.post_json("/v1/jobs", &with("model", json!(model("tiny-sd1"))));
    assert_eq!(ok.status, 202, "{}", ok.text());

    let r = server.request("POST", "/v1/jobs", Some(b"{\"operation\": "));
    assert_eq!(r.status, 400);
    assert_eq!(r.error().0, "malformed_json");
    let big = format!(
        "{{\"operation\": \"image_generation\", \"prompt\": \"{}\"}}",
        "a".repeat(4000)
    );
    let r = server.request("POST", "/v1/jobs", Some(big.as_bytes()));
    assert_eq!(r.status, 413);
    assert_eq!(r.error().0, "payload_too_large");
    assert!(r.error().1.contains("2048"));
    let r = server.get("/v1/jobs/0123");
    assert_eq!(r.status, 404);
    assert_eq!(r.error().0, "not_found");
    let r = server.get("/nowhere");
    assert_eq!(r.status, 404);
    let r = server.request("PUT", "/v1/jobs", Some(b"{}"));
    assert_eq!(r.status, 405);
    assert_eq!(r.error().0, "method_not_allowed");
    // The worker is unharmed.
    assert_eq!(server.get("/health").status, 200);
    assert!(server.log().iter().all(|l| !l.contains("internal error")));
}

#[test]
fn bearer_token_guards_everything_but_health_and_ready() {
    let server = Server::start(&["--api-key", "s3cret"]);
    let bare =
        |path: &str, headers: &[(&str, &str)]| http(&server.addr, "GET", path, headers, None);
    assert_eq!(bare("/health", &[]).status, 200);
    assert_eq!(bare("/ready", &[]).status, 200);
    for path in [
        "/v1/info",
        "/v1/jobs",
        "/metrics",
        "/openapi.json",
        "/v1/jobs/x",
    ] {
        let r = bare(path, &[]);
        assert_eq!(r.status, 401, "{path}");
        assert_eq!(r.error().0, "unauthorized");
        assert_eq!(r.header("www-authenticate").as_deref(), Some("Bearer"));
        assert_eq!(
            bare(path, &[("Authorization", "Bearer wrong")]).status,
            401,
            "{path}"
        );
        assert_eq!(
            bare(path, &[("Authorization", "Bearer s3cre")]).status,
            401,
            "{path}"
        );
    }
    let r = http(
        &server.addr,
        "POST",
        "/v1/jobs",
        &[],
        Some(
            json!({"operation": "image_generation", "prompt": "a"})
                .to_string()
                .as_bytes(),
        ),
    );
    assert_eq!(r.status, 401);
    let r = bare("/v1/info", &[("Authorization", "Bearer s3cret")]);
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["capabilities"]["auth"], true);
    // The test client sends the token.
    let id = server.submit(&json!({"operation": "image_generation", "prompt": "a", "steps": 2}));
    assert_eq!(server.wait_final(&id)["state"], "completed");
}

#[test]
fn info_metrics_and_openapi_describe_the_worker() {
    let server = Server::start(&[]);
    let info = server.get("/v1/info").json();
    assert_eq!(info["model"]["name"], "tiny-sd1");
    assert_eq!(info["model"]["family"], "sd1");
    assert_eq!(info["model"]["variant"], "base");
    assert_eq!(info["model"]["prediction_type"], "epsilon");
    assert_eq!(info["device"], "cpu");
    assert_eq!(info["dtype"], "f32");
    assert_eq!(info["defaults"]["width"], 32);
    assert_eq!(info["defaults"]["scheduler"], "pndm");
    assert_eq!(info["limits"]["max_queue"], 32);
    assert_eq!(info["limits"]["max_steps"], 150);
    assert_eq!(info["limits"]["max_body_bytes"], 32 << 20);
    assert_eq!(info["limits"]["max_prompt_chars"], 20_000);
    assert_eq!(info["limits"]["max_loras"], 0, "no --lora-dir");
    assert_eq!(info["limits"]["read_timeout_s"], 30.0);
    let kernels = &info["cpu_kernels"];
    assert!(kernels["threads"].as_u64().unwrap() >= 1, "{kernels}");
    let products = kernels["products"].as_str().unwrap_or_default();
    assert!(products.starts_with("f32"), "{kernels}");
    assert!(
        ["avx512f", "avx2+fma", "scalar"].contains(&kernels["elementwise"].as_str().unwrap()),
        "{kernels}"
    );
    assert_eq!(info["schedulers"].as_array().unwrap().len(), 18);
    assert_eq!(info["schedules"].as_array().unwrap().len(), 7);
    let samplers = server.get("/v1/samplers").json();
    let heun = samplers
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == "heun")
        .cloned()
        .unwrap();
    assert_eq!(heun["a1111_name"], "Heun");
    assert_eq!(heun["diffusers_class"], "HeunDiscreteScheduler");
    assert_eq!(heun["evals_per_step"], 2);
    assert_eq!(
        heun["schedules"],
        json!(["model", "karras", "exponential", "beta", "sgm-uniform"])
    );
    let schedules = server.get("/v1/schedules").json();
    assert_eq!(schedules[1]["diffusers_option"], "use_karras_sigmas=True");
    // A job with a sampler and a schedule echoes both.
    let id = server.submit(
        &json!({"operation": "image_generation", "prompt": "a", "steps": 2,
                                   "sampler": "DPM2 a", "schedule": "Karras"}),
    );
    let done = server.wait_final(&id);
    assert_eq!(done["state"], "completed", "{done}");
    assert_eq!(
        (&done["request"]["sampler"], &done["request"]["schedule"]),
        (&json!("dpm2-a"), &json!("karras"))
    );
    assert_eq!(info["capabilities"]["max_prompt_tokens"], 77);
    assert_eq!(info["capabilities"]["guidance"], "classifier-free");
    assert_eq!(info["version"], env!("CARGO_PKG_VERSION"));
    let ready = server.get("/ready").json();
    assert_eq!(ready["ready"], true);

    let r = server.get("/metrics");
    assert!(r.header("content-type").unwrap().starts_with("text/plain"));
    let text = r.text();
    for name in [
        "sd_worker_queue_depth",
        "sd_worker_jobs_total",
        "sd_worker_step_seconds_bucket",
        "sd_worker_job_seconds_count",
    ] {
        assert!(text.contains(name), "{name} missing");
    }
    let doc = server.get("/openapi.json").json();
    assert_eq!(doc["openapi"], "3.1.0");
    for path in [
        "/v1/jobs",
        "/v1/jobs/{id}",
        "/v1/jobs/{id}/events",
        "/v1/jobs/{id}/stream",
        "/v1/jobs/{id}/images/{n}",
        "/v1/info",
        "/metrics",
        "/health",
        "/ready",
        "/openapi.json",
    ] {
        assert!(doc["paths"][path].is_object(), "{path} not described");
    }
    // That every request field is described is checked against the parser's own field list
    // (`request::tests::every_field_is_described`).
}

#[test]
fn sigterm_drains_and_exits_zero() {
    let mut server = Server::start(&["--shutdown-grace", "30"]);
    let running = server.submit(
        &json!({"operation": "image_generation", "prompt": "r", "steps": 30,
        "scheduler": "euler", "width": 64, "height": 64, "preview_every": 0}),
    );
    let queued =
        server.submit(&json!({"operation": "image_generation", "prompt": "q", "steps": 2}));
    server.wait_state(&running, &["running"]);
    let running_events = Watch::open(
        &server.addr,
        &format!("/v1/jobs/{running}/events"),
        "event: started",
    );
    let queued_events = Watch::open(
        &server.addr,
        &format!("/v1/jobs/{queued}/events"),
        "event: queued",
    );
    server.signal("TERM");
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let r = http(&server.addr, "GET", "/ready", &[], None);
        if r.status == 503 {
            assert_eq!(r.json()["reason"], "draining");
            break;
        }
        assert!(Instant::now() < deadline, "never draining");
        std::thread::sleep(Duration::from_millis(5));
    }
    let status = server.wait_exit(Duration::from_secs(60));
    assert!(status.success(), "exit {status:?}: {:?}", server.log());
    let running = running_events.finish();
    assert_eq!(
        running.last().unwrap().0,
        "complete",
        "the running job finished within the grace"
    );
    let queued = queued_events.finish();
    assert_eq!(queued.last().unwrap().0, "cancelled");
    assert_eq!(queued.last().unwrap().1["reason"], "shutdown");
}

#[test]
fn shutdown_grace_cancels_a_long_job() {
    let mut server = Server::start(&["--shutdown-grace", "0"]);
    let running = server.submit(&blocker());
    server.wait_state(&running, &["running"]);
    let events = Watch::open(
        &server.addr,
        &format!("/v1/jobs/{running}/events"),
        "event: started",
    );
    server.signal("INT");
    let status = server.wait_exit(Duration::from_secs(60));
    assert!(status.success(), "exit {status:?}");
    let events = events.finish();
    assert_eq!(events.last().unwrap().0, "cancelled");
    assert_eq!(events.last().unwrap().1["reason"], "shutdown");
}

/// The port opens before the model is loaded: /ready says "loading" (503) and jobs get 503
/// until loading ends. Loading is held on a named pipe in place of the tokenizer's merges.txt
/// (read once).
#[cfg(unix)]
#[test]
fn ready_is_503_while_the_model_loads() {
    let dir = common::model_with_fifo("tiny-sd1", "tokenizer/merges.txt", "loading");
    let server = Server::spawn(&dir.display().to_string(), &[]);
    let r = server.get("/ready");
    assert_eq!(r.status, 503);
    assert_eq!(r.json(), json!({"ready": false, "reason": "loading"}));
    assert_eq!(server.get("/health").status, 200);
    let r = server.post_json(
        "/v1/jobs",
        &json!({"operation": "image_generation", "prompt": "a"}),
    );
    assert_eq!(r.status, 503);
    assert_eq!(r.error().0, "not_ready");
    assert_eq!(server.get("/v1/info").status, 503);
    assert!(server.get("/metrics").text().contains("sd_worker_ready 0"));

    // Let loading go on: feed the pipe the real file.
    let merges =
        std::fs::read(common::root().join("fixtures/models/tiny-sd1/tokenizer/merges.txt"))
            .unwrap();
    std::fs::write(dir.join("tokenizer/merges.txt"), merges).unwrap();
    server.wait_ready();
    let id = server.submit(&json!({"operation": "image_generation", "prompt": "a", "steps": 2}));
    assert_eq!(server.wait_final(&id)["state"], "completed");
}

/// A model that fails to load ends the process with one line and status 1.
#[test]
fn a_model_that_fails_to_load_exits_1() {
    let dir = std::env::temp_dir().join(format!("sd-worker-broken-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(
        dir.join("model_index.json"),
        "{\"_class_name\": \"StableDiffusionPipeline\"}",
    )
    .unwrap();
    let mut server = Server::spawn(&dir.display().to_string(), &[]);
    let status = server.wait_exit(Duration::from_secs(30));
    assert_eq!(status.code(), Some(1));
    let log = server.log();
    let last = log.last().unwrap();
    assert!(last.starts_with("error: cannot load the model:"), "{log:?}");
}

/// At the defaults (a cheap preview every 5 steps) previews cost under 5% of the job's time.
#[test]
fn default_previews_cost_under_5_percent() {
    let server = Server::start(&[]);
    let id = server.submit(&json!({"operation": "image_generation", "prompt": "a", "seed": 5}));
    let status = server.wait_final(&id);
    assert_eq!(status["state"], "completed");
    assert_eq!(status["request"]["preview_every"], 5);
    assert_eq!(status["request"]["steps"], 50);
    let preview = status["timings"]["preview"].as_f64().unwrap();
    let generation = status["timings"]["generation"].as_f64().unwrap();
    assert!(preview > 0.0, "previews were made");
    assert!(
        preview < 0.05 * generation,
        "previews took {preview:.4}s of a {generation:.4}s job"
    );
}

/// A subscriber to a queued job gets keep-alive comments while it waits, and several
/// subscribers can watch one job.
#[test]
fn queued_subscribers_get_keep_alive_comments() {
    use std::io::{Read, Write};
    let server = Server::start(&["--sse-keepalive", "1"]);
    let busy = server.submit(&blocker());
    server.wait_state(&busy, &["running"]);
    let id = server.submit(&json!({"operation": "image_generation", "prompt": "k", "steps": 2}));
    let mut stream = std::net::TcpStream::connect(&server.addr).unwrap();
    write!(
        stream,
        "GET /v1/jobs/{id}/events HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    stream
        .set_read_timeout(Some(Duration::from_millis(2500)))
        .unwrap();
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    let started = Instant::now();
    while started.elapsed() < Duration::from_millis(2400) {
        match stream.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => seen.extend_from_slice(&buf[..n]),
            Err(_) => break,
        }
    }
    let text = String::from_utf8_lossy(&seen).into_owned();
    assert!(text.contains("event: queued"), "{text}");
    assert!(
        text.lines().any(|l| l.starts_with(':')),
        "no keep-alive comment in {text:?}"
    );
    // A second watcher of the same job.
    let other = Watch::open(
        &server.addr,
        &format!("/v1/jobs/{id}/events"),
        "event: queued",
    );
    server.delete(&format!("/v1/jobs/{busy}"));
    let mut rest = String::new();
    stream
        .set_read_timeout(Some(Duration::from_secs(60)))
        .unwrap();
    let _ = stream.read_to_string(&mut rest);
    assert!(rest.contains("event: complete"), "{rest}");
    let other = other.finish();
    assert_eq!(other.last().unwrap().0, "complete");
}

/// `--job-timeout` cancels a job that runs too long, and the next job runs.
#[test]
fn job_timeout_cancels_a_long_job() {
    let server = Server::start(&["--job-timeout", "1"]);
    let long = server.submit(&blocker());
    let next = server.submit(&json!({"operation": "image_generation", "prompt": "n", "steps": 2}));
    let v = server.wait_final(&long);
    assert_eq!(v["state"], "cancelled");
    assert_eq!(v["cancel_reason"], "timeout");
    assert!(v["step"].as_u64().unwrap() < 150);
    let events = server.events(&long);
    assert_eq!(events[0].0, "cancelled");
    assert_eq!(events[0].1["reason"], "timeout");
    assert_eq!(server.wait_final(&next)["state"], "completed");
}
