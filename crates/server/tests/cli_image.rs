//! `sd-worker generate --init-image [--strength] [--mask]` end to end: every image-to-image
//! and inpainting reference case through the CLI flags, from the PNG files in
//! `fixtures/inputs/`, and one-line errors for bad image inputs.
//!
//! Expected images come from `scripts/make_img2img_fixtures.py` and
//! `scripts/make_inpaint_fixtures.py` (diffusers' StableDiffusionImg2ImgPipeline and
//! StableDiffusionInpaintPipeline on the same tiny weights and files); tolerance: max 3 and
//! mean 0.5 levels of 255.

mod common;

use std::path::Path;

use candle_core::Device;
use common::{root, sd_worker, tmp};
use serde_json::Value;

/// The CLI arguments of a reference case.
fn case_args(case: &Value, out: &Path) -> Vec<String> {
    let model = root()
        .join("fixtures/models")
        .join(case["model"].as_str().unwrap());
    let input = root()
        .join("fixtures/inputs")
        .join(case["image"].as_str().unwrap());
    let mut args: Vec<String> = vec![
        "generate".into(),
        "--model".into(),
        model.display().to_string(),
        "--prompt".into(),
        case["prompt"].as_str().unwrap().into(),
        "--init-image".into(),
        input.display().to_string(),
        "--strength".into(),
        case["strength"].to_string(),
        "--steps".into(),
        case["steps"].to_string(),
        "--guidance".into(),
        case["guidance"].to_string(),
        "--seed".into(),
        case["seed"].to_string(),
        "--batch".into(),
        case["batch"].to_string(),
        "--output".into(),
        out.display().to_string(),
    ];
    if let Some(m) = case["mask"].as_str() {
        args.push("--mask".into());
        args.push(root().join("fixtures/inputs").join(m).display().to_string());
    }
    for (key, flag) in [
        ("negative_prompt", "--negative-prompt"),
        ("scheduler", "--scheduler"),
    ] {
        if let Some(v) = case[key].as_str() {
            args.push(flag.into());
            args.push(v.into());
        }
    }
    for key in ["width", "height"] {
        if let Some(v) = case[key].as_u64() {
            args.push(format!("--{key}"));
            args.push(v.to_string());
        }
    }
    args
}

fn check_cases(kind: &str) -> usize {
    let dir = root().join("fixtures/reference").join(kind);
    let text = std::fs::read_to_string(dir.join("cases.json")).unwrap();
    let v: Value = serde_json::from_str(&text).unwrap();
    let mut n = 0;
    for case in v["cases"].as_array().unwrap() {
        let name = case["name"].as_str().unwrap();
        let out = tmp(&format!("{name}.png"));
        let o = sd_worker(&case_args(case, &out));
        assert!(
            o.status.success(),
            "{name}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        let r =
            candle_core::safetensors::load(dir.join(format!("{name}.safetensors")), &Device::Cpu)
                .unwrap();
        let strength = case["strength"].as_f64().unwrap();
        let expect = format!(
            "Denoising strength: {}",
            if strength.fract() == 0.0 {
                format!("{strength:.1}")
            } else {
                strength.to_string()
            }
        );
        common::check_written_images(name, &out, &r["images"], |text| {
            assert!(text.contains(&expect), "{name}: {text}")
        });
        n += 1;
    }
    n
}

#[test]
fn img2img_through_the_cli_matches_diffusers() {
    assert_eq!(check_cases("img2img"), 8);
}

#[test]
fn inpainting_through_the_cli_matches_diffusers() {
    assert_eq!(check_cases("inpaint"), 6);
}

fn one_line_error(args: &[&str]) -> String {
    let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
    let o = sd_worker(&args);
    assert_eq!(o.status.code(), Some(1), "{args:?}");
    let err = String::from_utf8_lossy(&o.stderr).into_owned();
    assert_eq!(err.trim_end().lines().count(), 1, "{err}");
    err
}

#[test]
fn bad_image_inputs_are_one_line_errors() {
    let tiny = root()
        .join("fixtures/models/tiny-sd1")
        .display()
        .to_string();
    let inpaint = root()
        .join("fixtures/models/tiny-sd1-inpaint")
        .display()
        .to_string();
    let image = root()
        .join("fixtures/inputs/square32.png")
        .display()
        .to_string();
    let mask = root()
        .join("fixtures/inputs/mask-rgb32.png")
        .display()
        .to_string();
    let out = tmp("bad.png").display().to_string();
    let text = tmp("not-an-image.png");
    std::fs::write(&text, "hello").unwrap();
    let text = text.display().to_string();
    let base = |extra: &[&str]| -> Vec<String> {
        let mut v: Vec<String> = [
            "generate", "--model", &tiny, "--prompt", "a", "--steps", "4", "--output", &out,
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        v.extend(extra.iter().map(|s| s.to_string()));
        v
    };
    let cases: Vec<(Vec<String>, Vec<&str>)> = vec![
        (base(&["--mask", &mask]), vec!["--mask", "--init-image"]),
        (
            base(&["--strength", "0.5"]),
            vec!["--strength", "--init-image"],
        ),
        (
            base(&["--init-image", &text]),
            vec!["--init-image", "PNG, JPEG or WebP"],
        ),
        (
            base(&["--init-image", "/nonexistent.png"]),
            vec!["--init-image", "/nonexistent.png"],
        ),
        (
            base(&["--init-image", &image, "--strength", "0"]),
            vec!["strength", "(0, 1]", "0"],
        ),
        (
            base(&["--init-image", &image, "--strength", "0.1"]),
            vec!["strength", "no step"],
        ),
        (
            base(&["--init-image", &image, "--strength", "1.5"]),
            vec!["strength", "1.5"],
        ),
        (
            base(&["--init-image", &image, "--mask", &text]),
            vec!["--mask", "PNG, JPEG or WebP"],
        ),
    ];
    for (args, needles) in cases {
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        let err = one_line_error(&refs);
        for n in needles {
            assert!(err.contains(n), "{args:?}: {err:?} lacks {n:?}");
        }
    }
    let err = one_line_error(&[
        "generate", "--model", &inpaint, "--prompt", "a", "--output", &out,
    ]);
    assert!(err.contains("inpainting model"), "{err}");
}
