//! The `sd-worker` binary end to end: parity with diffusers through the CLI flags, the PNG
//! `parameters` chunk, and one-line errors with a non-zero exit for bad input.
//!
//! Expected images come from `scripts/make_fixtures.py` (diffusers' StableDiffusionPipeline on
//! the same tiny weights); tolerance: max 3 and mean 0.5 levels of 255.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use candle_core::Device;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn model(name: &str) -> String {
    root()
        .join("fixtures/models")
        .join(name)
        .display()
        .to_string()
}

fn sd_worker(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_sd-worker"))
        .args(args)
        .env_clear()
        .output()
        .expect("run sd-worker")
}

fn tmp(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("sd-worker-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir.join(name)
}

/// Decodes an 8-bit RGB PNG: (width, height, pixels, text chunks).
fn read_png(path: &Path) -> (usize, usize, Vec<u8>, Vec<(String, String)>) {
    let decoder = png::Decoder::new(std::io::BufReader::new(std::fs::File::open(path).unwrap()));
    let mut reader = decoder.read_info().unwrap();
    let mut buf = vec![0; reader.output_buffer_size()];
    let info = reader.next_frame(&mut buf).unwrap();
    assert_eq!(info.color_type, png::ColorType::Rgb);
    buf.truncate(info.buffer_size());
    let meta = reader.info();
    let mut texts: Vec<(String, String)> = meta
        .uncompressed_latin1_text
        .iter()
        .map(|t| (t.keyword.clone(), t.text.clone()))
        .collect();
    for t in &meta.utf8_text {
        texts.push((t.keyword.clone(), t.get_text().unwrap()));
    }
    (info.width as usize, info.height as usize, buf, texts)
}

fn reference_images(case: &str) -> (usize, usize, usize, Vec<u8>) {
    let t = candle_core::safetensors::load(
        root()
            .join("fixtures/reference")
            .join(format!("{case}.safetensors")),
        &Device::Cpu,
    )
    .unwrap();
    let images = &t["images"];
    let (b, h, w, _) = images.dims4().unwrap();
    (b, h, w, images.flatten_all().unwrap().to_vec1().unwrap())
}

fn assert_image_close(case: &str, got: &[u8], want: &[u8]) {
    assert_eq!(got.len(), want.len(), "{case}: pixel count");
    let mut max = 0u8;
    let mut sum = 0u64;
    for (a, b) in got.iter().zip(want) {
        max = max.max(a.abs_diff(*b));
        sum += a.abs_diff(*b) as u64;
    }
    let mean = sum as f64 / got.len() as f64;
    assert!(
        max <= 3 && mean <= 0.5,
        "{case}: CLI image differs from diffusers by max {max}, mean {mean:.3}"
    );
}

#[test]
fn generate_matches_diffusers_with_model_defaults() {
    // sd1-pndm-cfg: the model's own scheduler (PNDM), default size, guidance 7.5.
    let out = tmp("sd1-default.png");
    let o = sd_worker(&[
        "generate",
        "--model",
        &model("tiny-sd1"),
        "--prompt",
        "a photo of a cat",
        "--steps",
        "10",
        "--seed",
        "0",
        "--output",
        out.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let (b, h, w, want) = reference_images("sd1-pndm-cfg");
    assert_eq!(b, 1);
    let (gw, gh, pixels, texts) = read_png(&out);
    assert_eq!((gw, gh), (w, h));
    assert_image_close("sd1-pndm-cfg", &pixels, &want);
    let params = texts
        .iter()
        .find(|(k, _)| k == "parameters")
        .map(|(_, v)| v.clone())
        .expect("parameters chunk");
    assert_eq!(
        params,
        "a photo of a cat\nSteps: 10, Sampler: PLMS, CFG scale: 7.5, Seed: 0, Size: 32x32, Model: tiny-sd1"
    );
}

#[test]
fn generate_batch_with_sampler_negative_and_size() {
    // sd2-euler-a-batch-neg: v-prediction, euler-a, batch 2, negative prompt.
    let out = tmp("sd2-batch.png");
    let o = sd_worker(&[
        "generate",
        "--model",
        &model("tiny-sd2"),
        "--prompt",
        "green garden",
        "--negative-prompt",
        "a cat",
        "--steps",
        "6",
        "--guidance",
        "4",
        "--seed",
        "11",
        "--scheduler",
        "euler-a",
        "--batch",
        "2",
        "--width",
        "32",
        "--height",
        "32",
        "--output",
        out.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let (b, h, w, want) = reference_images("sd2-euler-a-batch-neg");
    assert_eq!(b, 2);
    for i in 0..2 {
        let path = out.with_file_name(format!("sd2-batch-{i}.png"));
        let (gw, gh, pixels, texts) = read_png(&path);
        assert_eq!((gw, gh), (w, h));
        assert_image_close(
            "sd2-euler-a-batch-neg",
            &pixels,
            &want[i * h * w * 3..(i + 1) * h * w * 3],
        );
        let params = &texts.iter().find(|(k, _)| k == "parameters").unwrap().1;
        assert!(params.contains("\nNegative prompt: a cat\n"), "{params}");
        assert!(
            params.contains("Sampler: Euler a, CFG scale: 4.0, Seed: 11, Size: 32x32"),
            "{params}"
        );
        assert!(
            params.ends_with(&format!("Batch size: 2, Batch pos: {i}")),
            "{params}"
        );
    }
}

#[test]
fn generate_non_square_dpmpp_karras() {
    let out = tmp("sd1-tall.png");
    let o = sd_worker(&[
        "generate",
        "--model",
        &model("tiny-sd1"),
        "--prompt",
        "a cat on a chair",
        "--steps",
        "10",
        "--seed",
        "99",
        "--scheduler",
        "dpmpp-2m-karras",
        "--width",
        "32",
        "--height",
        "48",
        "--output",
        out.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let (_, h, w, want) = reference_images("sd1-dpmpp-2m-karras-tall");
    let (gw, gh, pixels, _) = read_png(&out);
    assert_eq!((gw, gh), (w, h));
    assert_image_close("sd1-dpmpp-2m-karras-tall", &pixels, &want);
}

#[test]
fn unicode_prompt_is_stored_as_itxt() {
    let out = tmp("unicode.png");
    let o = sd_worker(&[
        "generate",
        "--model",
        &model("tiny-sd1"),
        "--prompt",
        "un café à Zürich 🐱",
        "--steps",
        "2",
        "--seed",
        "1",
        "--output",
        out.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let (_, _, _, texts) = read_png(&out);
    let params = &texts.iter().find(|(k, _)| k == "parameters").unwrap().1;
    assert!(params.starts_with("un café à Zürich 🐱\n"), "{params}");
}

#[test]
fn random_seed_is_reported() {
    let out = tmp("random-seed.png");
    let o = sd_worker(&[
        "generate",
        "--model",
        &model("tiny-sd1"),
        "--prompt",
        "a cat",
        "--steps",
        "1",
        "--output",
        out.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(stderr.contains("(seed "), "{stderr}");
}

/// Runs a command that must fail with exactly one line on stderr containing `needle`.
fn assert_one_line_error(args: &[&str], needle: &str) {
    let o = sd_worker(args);
    assert!(!o.status.success(), "expected failure for {args:?}");
    let stderr = String::from_utf8_lossy(&o.stderr);
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(lines.len(), 1, "expected one line, got: {stderr}");
    assert!(lines[0].starts_with("error: "), "{stderr}");
    assert!(
        lines[0].contains(needle),
        "expected {needle:?} in: {stderr}"
    );
    assert!(!stderr.contains("panicked"), "{stderr}");
}

#[test]
fn bad_inputs_are_one_line_errors() {
    let m = model("tiny-sd1");
    let out = tmp("never.png");
    let out = out.to_str().unwrap();
    let base = [
        "generate",
        "--model",
        m.as_str(),
        "--prompt",
        "a cat",
        "--output",
        out,
    ];
    let with = |extra: &[&'static str]| -> Vec<String> {
        base.iter()
            .map(|s| s.to_string())
            .chain(extra.iter().map(|s| s.to_string()))
            .collect()
    };
    let cases: Vec<(Vec<String>, &str)> = vec![
        (
            with(&["--width", "33"]),
            "width: must be a positive multiple of 2",
        ),
        (with(&["--height", "0"]), "height"),
        (
            with(&["--steps", "0"]),
            "steps: must be between 1 and 1000, got 0",
        ),
        (with(&["--steps", "1001"]), "got 1001"),
        (
            with(&["--scheduler", "dpm-fast"]),
            "--scheduler: unknown sampler \"dpm-fast\"",
        ),
        (
            with(&["--sampler", "euler-a", "--schedule", "karras"]),
            "--schedule: sampler euler-a does not take schedule karras",
        ),
        (
            with(&["--schedule", "cosine"]),
            "--schedule: unknown schedule \"cosine\"",
        ),
        (with(&["--steps", "abc"]), "--steps"),
        (
            with(&["--width", "16384"]),
            "width: must be at most 8192 pixels, got 16384",
        ),
        (with(&["--bogus-flag"]), "--bogus-flag"),
        (
            with(&["--batch", "0"]),
            "batch: must be between 1 and 64, got 0",
        ),
        (with(&["--guidance", "NaN"]), "guidance"),
        (with(&["--dtype", "f8"]), "--dtype"),
        (with(&["--device", "tpu"]), "--device"),
    ];
    for (args, needle) in cases {
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        assert_one_line_error(&refs, needle);
    }
    assert_one_line_error(
        &[
            "generate",
            "--model",
            "/nonexistent/model",
            "--prompt",
            "x",
            "--output",
            out,
        ],
        "/nonexistent/model",
    );
    assert_one_line_error(
        &[
            "generate",
            "--model",
            &m,
            "--prompt",
            "x",
            "--output",
            "/tmp/x.jpg",
        ],
        ".png",
    );
    assert_one_line_error(&["generate", "--model", &m, "--prompt", "x"], "--output");
}

#[test]
fn broken_model_folders_are_one_line_errors() {
    let src = root().join("fixtures/models/tiny-sd1");
    let dir = tmp("broken-model");
    let _ = std::fs::remove_dir_all(&dir);
    copy_dir(&src, &dir);
    let out = tmp("broken.png");
    let run = || {
        let m = dir.to_str().unwrap().to_string();
        let o = out.to_str().unwrap().to_string();
        move |needle: &str| {
            assert_one_line_error(
                &[
                    "generate", "--model", &m, "--prompt", "x", "--steps", "1", "--output", &o,
                ],
                needle,
            )
        }
    };
    // A config field of the wrong type.
    let cfg = dir.join("unet/config.json");
    let original = std::fs::read_to_string(&cfg).unwrap();
    let mut v: serde_json::Value = serde_json::from_str(&original).unwrap();
    v["layers_per_block"] = serde_json::json!("two");
    std::fs::write(&cfg, v.to_string()).unwrap();
    run()("layers_per_block");
    std::fs::write(&cfg, &original).unwrap();
    // Weights that do not match the config.
    v = serde_json::from_str(&original).unwrap();
    v["block_out_channels"] = serde_json::json!([16, 64]);
    std::fs::write(&cfg, v.to_string()).unwrap();
    run()("unet");
    std::fs::write(&cfg, &original).unwrap();
    // A missing weights file and a truncated one.
    let w = dir.join("vae/diffusion_pytorch_model.safetensors");
    let bytes = std::fs::read(&w).unwrap();
    std::fs::remove_file(&w).unwrap();
    run()("diffusion_pytorch_model.safetensors");
    std::fs::write(&w, &bytes[..bytes.len() / 2]).unwrap();
    run()("cannot read safetensors weights");
    std::fs::write(&w, &bytes).unwrap();
    // An unsupported scheduler class without --scheduler.
    let s = dir.join("scheduler/scheduler_config.json");
    let original = std::fs::read_to_string(&s).unwrap();
    let mut v: serde_json::Value = serde_json::from_str(&original).unwrap();
    v["_class_name"] = serde_json::json!("DPMSolverSinglestepScheduler");
    std::fs::write(&s, v.to_string()).unwrap();
    run()("DPMSolverSinglestepScheduler");
}

fn copy_dir(src: &Path, dst: &Path) {
    std::fs::create_dir_all(dst).unwrap();
    for entry in std::fs::read_dir(src).unwrap() {
        let entry = entry.unwrap();
        let to = dst.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &to);
        } else {
            std::fs::copy(entry.path(), to).unwrap();
        }
    }
}

#[test]
fn help_documents_every_flag() {
    let o = sd_worker(&["generate", "--help"]);
    assert!(o.status.success());
    let help = String::from_utf8_lossy(&o.stdout);
    for flag in [
        "--model",
        "--prompt",
        "--negative-prompt",
        "--width",
        "--height",
        "--steps",
        "--guidance",
        "--seed",
        "--scheduler",
        "--batch",
        "--device",
        "--dtype",
        "--output",
        "--init-image",
        "--strength",
        "--mask",
        "--max-sequence-length",
    ] {
        assert!(help.contains(flag), "--help lacks {flag}");
    }
    // Model-dependent defaults are spelled out in the help text.
    assert!(help.contains("Default: 50 for Stable Diffusion; 28 for FLUX dev, 4 for FLUX schnell"));
    assert!(help.contains("applied above 1 (default 7.5)"));
    assert!(help.contains("the embedded guidance (default 3.5)"));
}

#[test]
fn empty_prompt_is_unconditional_generation() {
    let out = tmp("empty-prompt.png");
    let o = sd_worker(&[
        "generate",
        "--model",
        &model("tiny-sd1"),
        "--prompt",
        "",
        "--steps",
        "2",
        "--seed",
        "3",
        "--output",
        out.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
}

#[test]
fn f16_stays_close_to_the_f32_reference() {
    // Half precision is not bit-compatible with diffusers' f32 run; this bounds the drift
    // (mean within 2 levels of 255) so that a broken f16 path is caught.
    let out = tmp("sd1-f16.png");
    let o = sd_worker(&[
        "generate",
        "--model",
        &model("tiny-sd1"),
        "--prompt",
        "a photo of a cat",
        "--steps",
        "10",
        "--seed",
        "0",
        "--dtype",
        "f16",
        "--output",
        out.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let (_, _, want) = {
        let (b, h, w, px) = reference_images("sd1-pndm-cfg");
        assert_eq!(b, 1);
        (h, w, px)
    };
    let (_, _, pixels, _) = read_png(&out);
    let mean = pixels
        .iter()
        .zip(&want)
        .map(|(a, b)| a.abs_diff(*b) as f64)
        .sum::<f64>()
        / want.len() as f64;
    assert!(
        mean <= 2.0,
        "f16 image drifts from the f32 reference by mean {mean:.2} levels"
    );
}

/// `--prompt-syntax a1111`: a plain prompt gives the same pixels as without it (the same
/// embeddings), a weight changes them, and FLUX models refuse it.
#[test]
fn prompt_syntax_a1111_from_the_cli() {
    let m = model("tiny-sd1");
    let run = |prompt: &str, extra: &[&str], out: &std::path::Path| {
        let mut args = vec![
            "generate", "--model", &m, "--prompt", prompt, "--steps", "2", "--seed", "3",
            "--output",
        ];
        let out = out.to_str().unwrap().to_string();
        args.push(&out);
        args.extend_from_slice(extra);
        let o = sd_worker(&args);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        read_png(std::path::Path::new(&out)).2
    };
    let plain = run("a photo of a cat", &[], &tmp("syntax-plain.png"));
    let a1111 = run(
        "a photo of a cat",
        &["--prompt-syntax", "a1111"],
        &tmp("syntax-a1111.png"),
    );
    let weighted = run(
        "a photo of a (cat:1.5)",
        &["--prompt-syntax", "a1111"],
        &tmp("syntax-weighted.png"),
    );
    assert_eq!(plain, a1111);
    assert_ne!(plain, weighted);
    let flux = root().join("fixtures/flux/tiny-flux-dev");
    let out = tmp("syntax-flux.png");
    assert_one_line_error(
        &[
            "generate",
            "--model",
            flux.to_str().unwrap(),
            "--prompt",
            "a",
            "--steps",
            "1",
            "--prompt-syntax",
            "a1111",
            "--output",
            out.to_str().unwrap(),
        ],
        "--prompt-syntax",
    );
}
