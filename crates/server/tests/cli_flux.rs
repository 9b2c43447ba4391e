//! `sd-worker generate` on FLUX.1 folders: the tiny dev and schnell pipelines of
//! `scripts/make_flux_models.py` through the CLI flags, against diffusers' FluxPipeline images
//! (max 3 / mean 0.5 levels), and one-line errors for what FLUX does not take.

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use candle_core::{Device, Tensor};
use common::{read_png, sd_worker, tmp};
use serde_json::Value;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/flux")
}

/// Runs a reference case (`flux-cases.json` or `flux-i2i-cases.json`) through the CLI flags;
/// gives the output path and the reference tensors.
fn run_case(case: &Value) -> (PathBuf, HashMap<String, Tensor>) {
    let name = case["name"].as_str().unwrap();
    let model = root().join(format!("tiny-flux-{}", case["model"].as_str().unwrap()));
    let out = tmp(&format!("{name}.png"));
    let mut args: Vec<String> = vec![
        "generate".into(),
        "--model".into(),
        model.display().to_string(),
        "--prompt".into(),
        case["prompt"].as_str().unwrap().into(),
        "--steps".into(),
        case["steps"].to_string(),
        "--seed".into(),
        case["seed"].to_string(),
        "--batch".into(),
        case["batch"].to_string(),
        "--max-sequence-length".into(),
        case["max_sequence_length"].to_string(),
        "--output".into(),
        out.display().to_string(),
    ];
    if let Some(image) = case["image"].as_str() {
        let input = root().join("../inputs").join(image);
        args.extend([
            "--init-image".into(),
            input.display().to_string(),
            "--strength".into(),
            case["strength"].to_string(),
        ]);
    }
    for key in ["width", "height"] {
        if let Some(v) = case[key].as_u64() {
            args.push(format!("--{key}"));
            args.push(v.to_string());
        }
    }
    if case["model"] == "dev" {
        args.push("--guidance".into());
        args.push(case["guidance"].to_string());
    }
    let o = sd_worker(&args);
    assert!(
        o.status.success(),
        "{name}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    let r = candle_core::safetensors::load(
        root().join(format!("reference/flux-{name}.safetensors")),
        &Device::Cpu,
    )
    .unwrap();
    (out, r)
}

#[test]
fn flux_through_the_cli_matches_diffusers() {
    let text = std::fs::read_to_string(root().join("reference/flux-cases.json")).unwrap();
    let v: Value = serde_json::from_str(&text).unwrap();
    for case in v["cases"].as_array().unwrap() {
        let name = case["name"].as_str().unwrap();
        let (out, r) = run_case(case);
        common::check_written_images(name, &out, &r["images"], |text| {
            assert!(text.contains("Sampler: Euler"), "{text}");
            assert_eq!(
                text.contains("Distilled CFG Scale"),
                case["model"] == "dev",
                "{text}"
            );
        });
    }
}

#[test]
fn what_flux_does_not_take_is_a_one_line_error() {
    let dev = root().join("tiny-flux-dev").display().to_string();
    let schnell = root().join("tiny-flux-schnell").display().to_string();
    let out = tmp("bad.png").display().to_string();
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (
            vec!["--model", &dev, "--negative-prompt", "x"],
            "--negative-prompt",
        ),
        (vec!["--model", &dev, "--scheduler", "euler"], "--scheduler"),
        (
            vec!["--model", &dev, "--init-image", "/x.png"],
            "--init-image",
        ),
        (vec!["--model", &schnell, "--guidance", "3.5"], "--guidance"),
        (vec!["--model", &dev, "--width", "33"], "width"),
        (
            vec!["--model", &dev, "--max-sequence-length", "600"],
            "--max-sequence-length",
        ),
    ];
    for (extra, needle) in cases {
        let mut args: Vec<String> = vec![
            "generate".into(),
            "--prompt".into(),
            "a".into(),
            "--steps".into(),
            "1".into(),
        ];
        args.extend(extra.iter().map(|s| s.to_string()));
        args.push("--output".into());
        args.push(out.clone());
        let o = sd_worker(&args);
        assert_eq!(o.status.code(), Some(1), "{extra:?}");
        let err = String::from_utf8_lossy(&o.stderr).into_owned();
        assert_eq!(err.trim_end().lines().count(), 1, "{err}");
        assert!(err.contains(needle), "{extra:?}: {err}");
    }
}

/// A single-file transformer with the original key names plus `--components` gives the same
/// pixels as the diffusers folder; bad combinations are one-line errors.
#[test]
fn single_file_transformer_with_components() {
    let dev = root().join("tiny-flux-dev").display().to_string();
    let file = root()
        .join("transformer-dev-original.safetensors")
        .display()
        .to_string();
    let common = [
        "--prompt",
        "a photo of a cat",
        "--width",
        "32",
        "--height",
        "32",
        "--steps",
        "2",
        "--seed",
        "4",
        "--max-sequence-length",
        "24",
    ];
    let run = |extra: &[&str], out: &Path| -> Output {
        let mut args: Vec<String> = vec!["generate".into()];
        args.extend(extra.iter().map(|s| s.to_string()));
        args.extend(common.iter().map(|s| s.to_string()));
        args.push("--output".into());
        args.push(out.display().to_string());
        sd_worker(&args)
    };
    let a = tmp("folder.png");
    let b = tmp("single.png");
    let o = run(&["--model", &dev], &a);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let o = run(&["--model", &file, "--components", &dev], &b);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let (_, _, pa, ta) = read_png(&a);
    let (_, _, pb, tb) = read_png(&b);
    assert_eq!(pa, pb, "same weights, same pixels");
    assert!(ta.contains("Model: tiny-flux-dev") && tb.contains("Model: transformer-dev-original"));
    // Text encoders on an explicit device (the same CPU here): the same pixels.
    let c = tmp("text-device.png");
    let o = run(&["--model", &dev, "--text-encoder-device", "cpu"], &c);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(read_png(&c).2, pa);
    let sd = root().join("../models/tiny-sd1").display().to_string();
    for (extra, needle) in [
        (
            vec!["--model", &sd, "--text-encoder-device", "cpu"],
            "FLUX models only",
        ),
        (
            vec!["--model", &dev, "--components", &dev],
            "transformer file",
        ),
        (
            vec!["--model", &file, "--components", "/nonexistent"],
            "--components",
        ),
    ] {
        let o = run(&extra, &tmp("bad.png"));
        assert_eq!(o.status.code(), Some(1));
        let err = String::from_utf8_lossy(&o.stderr).into_owned();
        assert_eq!(err.trim_end().lines().count(), 1, "{err}");
        assert!(err.contains(needle), "{err}");
    }
}

/// FluxImg2ImgPipeline references (`scripts/make_flux_models.py`) through the CLI flags.
#[test]
fn flux_img2img_through_the_cli_matches_diffusers() {
    let text = std::fs::read_to_string(root().join("reference/flux-i2i-cases.json")).unwrap();
    let v: Value = serde_json::from_str(&text).unwrap();
    for case in v["cases"].as_array().unwrap() {
        let name = case["name"].as_str().unwrap();
        let (out, r) = run_case(case);
        common::check_written_images(name, &out, &r["images"], |text| {
            assert!(text.contains("Denoising strength"), "{text}");
        });
    }
}

#[test]
fn inspect_reports_folders_and_transformer_files() {
    let run = |args: &[&str]| -> (bool, String) {
        let o = Command::new(env!("CARGO_BIN_EXE_sd-worker"))
            .args(args)
            .env_clear()
            .output()
            .unwrap();
        (
            o.status.success(),
            String::from_utf8_lossy(if o.status.success() {
                &o.stdout
            } else {
                &o.stderr
            })
            .into_owned(),
        )
    };
    let dev = root().join("tiny-flux-dev").display().to_string();
    let (ok, out) = run(&["inspect", &dev]);
    assert!(ok, "{out}");
    assert!(
        out.contains("family:       flux") && out.contains("variant:      dev"),
        "{out}"
    );
    assert!(out.contains("transformer parameters: 38576"), "{out}");
    let gguf = root().join("transformer-q-Q8_0.gguf").display().to_string();
    let (ok, out) = run(&["inspect", &gguf, "--components", &dev]);
    assert!(ok, "{out}");
    assert!(
        out.contains("layout:       GGUF") && out.contains("Q8_0 x 22"),
        "{out}"
    );
    assert!(out.contains("1 double, 1 single, width 32"), "{out}");
    let single = root()
        .join("transformer-schnell-original.safetensors")
        .display()
        .to_string();
    let (ok, out) = run(&["inspect", &single]);
    assert!(ok, "{out}");
    assert!(
        out.contains("variant:      schnell") && out.contains("original key names"),
        "{out}"
    );
    let vae = root()
        .join("tiny-flux-dev/vae/diffusion_pytorch_model.safetensors")
        .display()
        .to_string();
    let (ok, out) = run(&["inspect", &vae]);
    assert!(!ok && out.contains("not a FLUX transformer"), "{out}");
    // GGUF headers that make candle's reader panic or claim impossible shapes (the fuzzer's
    // finds): one error line, no internal error, as through `generate` and `serve`.
    let crafted = root().join("../fuzz/gguf");
    for (file, why) in [
        ("regression-alignment-zero.gguf", "malformed header"),
        ("regression-no-elements.gguf", "has no elements"),
        ("regression-huge-shape.gguf", "overflows"),
    ] {
        let path = crafted.join(file).display().to_string();
        let (ok, out) = run(&["inspect", &path]);
        assert!(!ok, "{file}: {out}");
        assert_eq!(out.lines().count(), 1, "{file}: {out}");
        assert!(
            out.starts_with("error: ") && out.contains(why) && !out.contains("internal"),
            "{file}: {out}"
        );
    }
}

/// `--dtype f16` runs FLUX on the CPU and stays close to f32 (parity is proven for f32; f16 is
/// bounded: mean difference at most 2 levels, measured 0.06).
#[test]
fn flux_f16_stays_close_to_f32() {
    let dev = root().join("tiny-flux-dev").display().to_string();
    let mut images = Vec::new();
    for dtype in ["f32", "f16"] {
        let out = tmp(&format!("dtype-{dtype}.png"));
        let args: Vec<String> = [
            "generate",
            "--model",
            &dev,
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
            "--max-sequence-length",
            "24",
            "--dtype",
            dtype,
            "--output",
        ]
        .iter()
        .map(|s| s.to_string())
        .chain([out.display().to_string()])
        .collect();
        let o = sd_worker(&args);
        assert!(
            o.status.success(),
            "{dtype}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        images.push(read_png(&out).2);
    }
    let mean = images[0]
        .iter()
        .zip(&images[1])
        .map(|(a, b)| f64::from(a.abs_diff(*b)))
        .sum::<f64>()
        / images[0].len() as f64;
    assert!(mean <= 2.0, "f16 differs from f32 by mean {mean:.3} levels");
}
