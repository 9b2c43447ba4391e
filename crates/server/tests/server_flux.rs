//! `sd-worker serve` with the tiny FLUX folders: jobs stream progress and previews and
//! complete with the CLI's bytes; FLUX-inappropriate fields get a 422 naming them.

mod common;

use std::path::PathBuf;
use std::process::Command;

use common::{b64decode, root, Server, Watch};
use serde_json::json;

fn flux(kind: &str) -> String {
    root()
        .join(format!("fixtures/flux/tiny-flux-{kind}"))
        .display()
        .to_string()
}

fn b64_file(name: &str) -> String {
    use base64::Engine as _;
    let bytes = std::fs::read(root().join("fixtures/inputs").join(name)).unwrap();
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

fn tmp(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("sd-worker-serve-flux-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir.join(name)
}

#[test]
fn flux_jobs_stream_and_equal_the_cli() {
    let model = flux("dev");
    let server = Server::spawn(&model, &[]);
    server.wait_ready();
    let info = server.get("/v1/info").json();
    assert_eq!(info["model"]["family"], "flux");
    assert_eq!(info["model"]["variant"], "dev");
    assert_eq!(info["defaults"]["steps"], 28);
    assert_eq!(info["defaults"]["guidance_scale"], 3.5);
    assert_eq!(info["defaults"]["max_sequence_length"], 512);
    assert_eq!(info["capabilities"]["max_prompt_tokens"], 512);
    assert_eq!(info["capabilities"]["negative_prompt"], false);
    assert_eq!(info["capabilities"]["guidance"], "embedded");
    assert_eq!(
        info["capabilities"]["operations"],
        json!(["image_generation", "image_transform"])
    );
    // Hold the engine so that the job's events are all seen.
    let busy = server.submit(&json!({"operation": "image_generation", "prompt": "busy",
        "width": 64, "height": 64, "steps": 150, "preview_every": 0}));
    server.wait_state(&busy, &["running"]);
    let id = server.submit(
        &json!({"operation": "image_generation", "prompt": "a photo of a cat",
        "width": 32, "height": 32, "steps": 4, "seed": 0, "guidance_scale": 3.5,
        "max_sequence_length": 24, "preview_every": 2, "preview": "full"}),
    );
    let watch = Watch::open(
        &server.addr,
        &format!("/v1/jobs/{id}/events"),
        "event: queued",
    );
    server.delete(&format!("/v1/jobs/{busy}"));
    let events = watch.finish();
    let steps: Vec<u64> = events
        .iter()
        .filter(|(n, _)| n == "progress")
        .map(|(_, d)| d["step"].as_u64().unwrap())
        .collect();
    assert_eq!(steps, [1, 2, 3, 4]);
    let previews: Vec<&serde_json::Value> = events
        .iter()
        .filter(|(n, _)| n == "preview")
        .map(|(_, d)| d)
        .collect();
    assert_eq!(previews.len(), 1, "a preview at step 2, none on the last");
    assert_eq!(
        (
            previews[0]["width"].as_u64(),
            previews[0]["height"].as_u64()
        ),
        (Some(32), Some(32))
    );
    let (name, data) = events.last().unwrap();
    assert_eq!(name, "complete");
    let image = b64decode(data["image"].as_str().unwrap());
    let out = tmp("cat.png");
    let o = Command::new(env!("CARGO_BIN_EXE_sd-worker"))
        .args([
            "generate",
            "--model",
            &model,
            "--prompt",
            "a photo of a cat",
            "--width",
            "32",
            "--height",
            "32",
            "--steps",
            "4",
            "--seed",
            "0",
            "--guidance",
            "3.5",
            "--max-sequence-length",
            "24",
            "--output",
        ])
        .arg(&out)
        .env_clear()
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(
        image,
        std::fs::read(&out).unwrap(),
        "server and CLI images differ"
    );
}

#[test]
fn flux_inappropriate_fields_get_422() {
    let server = Server::spawn(&flux("schnell"), &[]);
    server.wait_ready();
    let base = json!({"operation": "image_generation", "prompt": "a", "width": 32, "height": 32});
    let with = |k: &str, v: serde_json::Value| {
        let mut b = base.clone();
        b[k] = v;
        b
    };
    let cases = [
        (
            with("negative_prompt", json!("x")),
            "negative_prompt",
            "negative prompt",
        ),
        (
            with("scheduler", json!("euler")),
            "scheduler",
            "flow-matching",
        ),
        (
            with("guidance_scale", json!(3.5)),
            "guidance_scale",
            "no guidance embedding",
        ),
        (
            with("max_sequence_length", json!(1000)),
            "max_sequence_length",
            "512",
        ),
        (with("width", json!(34)), "width", "multiple of 4"),
        (
            with("operation", json!("image_inpaint")),
            "operation",
            "FLUX",
        ),
        (
            json!({"operation": "image_transform", "prompt": "a", "strength": 0,
                   "input_image": b64_file("square32.png")}),
            "strength",
            "(0, 1]",
        ),
    ];
    for (body, field, needle) in cases {
        let r = server.post_json("/v1/jobs", &body);
        assert_eq!(r.status, 422, "{body}: {}", r.text());
        let (_, message) = r.error();
        assert!(
            message.contains(&format!("`{field}`")) && message.contains(needle),
            "{message}"
        );
    }
    // Defaults: schnell's 4 steps.
    let id = server.submit(&base);
    let status = server.wait_final(&id);
    assert_eq!(status["state"], "completed", "{status}");
    assert_eq!(status["request"]["steps"], 4);
}

#[test]
fn flux_image_transform_equals_the_cli() {
    let model = flux("dev");
    let server = Server::spawn(&model, &[]);
    server.wait_ready();
    let id = server.submit(
        &json!({"operation": "image_transform", "prompt": "green trees",
        "input_image": b64_file("odd37x29.png"), "width": 48, "height": 32, "steps": 4,
        "strength": 0.75, "seed": 8, "guidance_scale": 4.0, "max_sequence_length": 16}),
    );
    let events = server.events(&id);
    let (name, data) = events.last().unwrap();
    assert_eq!(name, "complete", "{events:?}");
    assert_eq!(data["operation"], "image_transform");
    let input = root()
        .join("fixtures/inputs/odd37x29.png")
        .display()
        .to_string();
    let out = tmp("i2i.png");
    let o = Command::new(env!("CARGO_BIN_EXE_sd-worker"))
        .args([
            "generate",
            "--model",
            &model,
            "--prompt",
            "green trees",
            "--init-image",
            &input,
            "--width",
            "48",
            "--height",
            "32",
            "--steps",
            "4",
            "--strength",
            "0.75",
            "--seed",
            "8",
            "--guidance",
            "4",
            "--max-sequence-length",
            "16",
            "--output",
        ])
        .arg(&out)
        .env_clear()
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(
        b64decode(data["image"].as_str().unwrap()),
        std::fs::read(&out).unwrap()
    );
}
