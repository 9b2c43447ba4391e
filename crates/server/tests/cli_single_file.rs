//! Single-file SD checkpoints through `generate` and `serve`: images equal to diffusers'
//! `from_single_file` (references from `scripts/make_single_file_fixtures.py`, max 3 / mean
//! 0.5 levels), the server's result equal to the CLI's bytes, one-line errors for what does not
//! fit.

mod common;

use std::path::Path;

use candle_core::Device;
use common::{b64decode, check_written_images, root, sd_worker, tmp, Server};
use serde_json::{json, Value};

fn fixture(p: &str) -> String {
    root().join("fixtures").join(p).display().to_string()
}

fn reference(name: &str) -> candle_core::Tensor {
    let mut r = candle_core::safetensors::load(
        root().join(format!("fixtures/single_file/reference/{name}.safetensors")),
        &Device::Cpu,
    )
    .unwrap();
    r.remove("images").unwrap()
}

fn cases() -> Vec<Value> {
    let text = std::fs::read_to_string(root().join("fixtures/single_file/cases.json")).unwrap();
    serde_json::from_str::<Value>(&text).unwrap()["cases"]
        .as_array()
        .unwrap()
        .clone()
}

fn generate(case: &Value, out: &Path) -> std::process::Output {
    let mut args: Vec<String> = vec![
        "generate".into(),
        "--model".into(),
        fixture(&format!("single_file/{}", case["file"].as_str().unwrap())),
        "--components".into(),
        fixture(case["components"].as_str().unwrap()),
        "--prompt".into(),
        case["prompt"].as_str().unwrap().into(),
        "--width".into(),
        case["size"].to_string(),
        "--height".into(),
        case["size"].to_string(),
        "--steps".into(),
        case["steps"].to_string(),
        "--guidance".into(),
        case["guidance"].to_string(),
        "--seed".into(),
        case["seed"].to_string(),
        "--output".into(),
        out.display().to_string(),
    ];
    if let Some(v) = case["vae"].as_str() {
        args.extend(["--vae".into(), fixture(&format!("single_file/{v}"))]);
    }
    if let Some(m) = case["mask"].as_str() {
        args.extend([
            "--init-image".into(),
            fixture(&format!("inputs/{}", case["image"].as_str().unwrap())),
            "--mask".into(),
            fixture(&format!("inputs/{m}")),
        ]);
    }
    sd_worker(&args)
}

#[test]
fn checkpoints_through_the_cli_match_diffusers() {
    for case in cases() {
        let name = case["name"].as_str().unwrap();
        let out = tmp(&format!("single-{name}.png"));
        let o = generate(&case, &out);
        assert!(
            o.status.success(),
            "{name}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        check_written_images(name, &out, &reference(name), |text| {
            let stem = case["file"]
                .as_str()
                .unwrap()
                .trim_end_matches(".safetensors");
            assert!(text.contains(&format!("Model: {stem}")), "{name}: {text}");
        });
    }
}

#[test]
fn serve_runs_a_checkpoint_like_the_cli() {
    let case = cases().into_iter().find(|c| c["name"] == "sd2").unwrap();
    let out = tmp("single-serve-cli.png");
    let o = generate(&case, &out);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let server = Server::spawn(
        &fixture("single_file/tiny-sd2.safetensors"),
        &["--components", &fixture("single_file/tiny-sd2-components")],
    );
    server.wait_ready();
    let info = server.get("/v1/info").json();
    assert_eq!(info["model"]["family"], "sd2", "{info}");
    let id = server.submit(&json!({
        "operation": "image_generation", "prompt": case["prompt"], "width": 32, "height": 32,
        "steps": case["steps"], "guidance_scale": case["guidance"], "seed": case["seed"]}));
    let (name, data) = server.events(&id).last().unwrap().clone();
    assert_eq!(name, "complete", "{data}");
    assert_eq!(
        b64decode(data["image"].as_str().unwrap()),
        std::fs::read(&out).unwrap()
    );
}

#[test]
fn checkpoint_flag_errors_are_one_line() {
    let run = |args: &[&str]| -> String {
        let mut all: Vec<String> = vec!["generate".into(), "--prompt".into(), "x".into()];
        all.extend(args.iter().map(|s| s.to_string()));
        all.extend([
            "--output".into(),
            tmp("single-err.png").display().to_string(),
        ]);
        let o = sd_worker(&all);
        assert!(!o.status.success(), "{args:?} succeeded");
        let e = String::from_utf8_lossy(&o.stderr).to_string();
        assert_eq!(e.trim().lines().count(), 1, "{e}");
        e
    };
    let sd1 = fixture("single_file/tiny-sd1.safetensors");
    let comps = fixture("models/tiny-sd1");
    let e = run(&[
        "--model",
        &sd1,
        "--components",
        &comps,
        "--prediction-type",
        "x",
    ]);
    assert!(
        e.contains("invalid --prediction-type x: expected epsilon or v_prediction"),
        "{e}"
    );
    let e = run(&["--model", &comps, "--prediction-type", "v_prediction"]);
    assert!(e.contains("applies to single-file checkpoints"), "{e}");
    let e = run(&["--model", &comps, "--components", &comps]);
    assert!(e.contains("not a model folder"), "{e}");
    let flux = fixture("flux/tiny-flux-dev");
    let e = run(&[
        "--model",
        &flux,
        "--vae",
        &fixture("single_file/vae-ldm.safetensors"),
    ]);
    assert!(
        e.contains("--vae") && e.contains("Stable Diffusion models only"),
        "{e}"
    );
    let e = run(&[
        "--model",
        &sd1,
        "--components",
        &comps,
        "--vae",
        "/no/such.safetensors",
    ]);
    assert!(
        e.contains("invalid --vae /no/such.safetensors: not a file"),
        "{e}"
    );
    let pickle = tmp("model.ckpt");
    std::fs::write(&pickle, b"x").unwrap();
    let e = run(&["--model", pickle.to_str().unwrap()]);
    assert!(e.contains("pickle checkpoints are not loaded"), "{e}");
    // inspect reports the checkpoint from its header.
    let o = sd_worker(&[
        "inspect".into(),
        fixture("single_file/tiny-sd1-inpaint.safetensors"),
    ]);
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success());
    assert!(text.contains("family:       sd1"), "{text}");
    assert!(text.contains("inpainting (9 input channels)"), "{text}");
}
