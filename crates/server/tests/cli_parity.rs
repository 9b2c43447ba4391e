//! `sd-worker parity`: the fixture cases run by the binary, the verdict against the tolerance,
//! the JSON report and the exit status.
//!
//! The expected images are the fixtures' own (diffusers' pipelines on the tiny weights, see
//! `scripts/make_fixtures.py`); the tolerance is the parity tests' max 3 / mean 0.5 levels.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::Value;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures")
}

fn parity(extra: &[&str], json: &Path) -> (Output, Option<Value>) {
    let _ = std::fs::remove_file(json);
    let out = Command::new(env!("CARGO_BIN_EXE_sd-worker"))
        .arg("parity")
        .arg("--fixtures")
        .arg(fixtures())
        .arg("--json")
        .arg(json)
        .args(extra)
        .env_clear()
        .output()
        .expect("run sd-worker");
    let report = std::fs::read_to_string(json)
        .ok()
        .map(|t| serde_json::from_str(&t).expect("report JSON"));
    (out, report)
}

fn tmp(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("sd-worker-parity-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir.join(name)
}

fn last_line(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .last()
        .unwrap_or_default()
        .to_string()
}

#[test]
fn cases_within_tolerance_pass_and_are_reported() {
    let json = tmp("pass.json");
    let (out, report) = parity(&["--cases", "ddim"], &json);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report = report.expect("a report");
    let cases = report["cases"].as_array().unwrap();
    // Every suite's DDIM cases: SD 1/2 text-to-image, image-to-image, inpainting, SDXL.
    assert!(cases.len() >= 6, "{report}");
    for c in cases {
        assert_eq!(c["status"], "pass", "{c}");
        assert!(c["error"]["max_levels"].as_u64().unwrap() <= 3, "{c}");
        assert!(c["error"]["mean_levels"].as_f64().unwrap() <= 0.5, "{c}");
    }
    assert_eq!(report["device"], "cpu");
    assert_eq!(report["dtype"], "f32");
    assert_eq!(report["passed"].as_u64().unwrap() as usize, cases.len());
    assert!(
        last_line(&out).starts_with(&format!("parity cpu f32: {} passed, 0 failed", cases.len())),
        "{}",
        last_line(&out)
    );
}

#[test]
fn a_case_over_the_tolerance_fails_the_run() {
    // With a zero tolerance, exactly the cases that are not bit-identical to diffusers fail
    // (which ones depends on the CPU's rounding, so the verdict is checked against each
    // case's reported error).
    let json = tmp("fail.json");
    let (out, report) = parity(
        &[
            "--cases",
            "sd/sd1-",
            "--max-levels",
            "0",
            "--mean-levels",
            "0",
        ],
        &json,
    );
    let report = report.expect("a report");
    let cases = report["cases"].as_array().unwrap();
    let inexact = cases
        .iter()
        .filter(|c| c["error"]["max_levels"].as_u64().unwrap() > 0)
        .count();
    for c in cases {
        let exact = c["error"]["max_levels"].as_u64().unwrap() == 0;
        assert_eq!(c["status"], if exact { "pass" } else { "fail" }, "{c}");
    }
    assert_eq!(report["failed"].as_u64().unwrap() as usize, inexact);
    assert_eq!(out.status.success(), inexact == 0);
    if inexact > 0 {
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains(&format!("{inexact} failed")), "{stderr}");
    }
}

#[test]
fn report_only_measures_f16_without_a_verdict() {
    let json = tmp("f16.json");
    let (out, report) = parity(
        &[
            "--cases",
            "sd/sd2-ddim-cfg",
            "--dtype",
            "f16",
            "--report-only",
        ],
        &json,
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report = report.expect("a report");
    assert_eq!(report["dtype"], "f16");
    assert_eq!(report["tolerance"], Value::Null);
    assert_eq!(report["cases"][0]["status"], "measured");
    assert!(report["cases"][0]["error"]["psnr_db"].as_f64().unwrap() > 30.0);
}

#[test]
fn no_matching_case_and_a_wrong_folder_are_errors() {
    let json = tmp("none.json");
    let (out, _) = parity(&["--cases", "no-such-case"], &json);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("no case ran"), "{stderr}");

    let out = Command::new(env!("CARGO_BIN_EXE_sd-worker"))
        .args(["parity", "--fixtures"])
        .arg(std::env::temp_dir())
        .env_clear()
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("invalid --fixtures") && stderr.lines().count() == 1,
        "{stderr}"
    );
}

/// The case whose UNet and VAE run 3x3 convolutions on images of 16 and more a side passes
/// with Winograd convolutions (the default) and with `--conv direct`, and each run reports the
/// convolution path it took.
#[test]
fn both_convolution_algorithms_pass() {
    for conv in ["winograd", "direct"] {
        let json = tmp(&format!("conv-{conv}.json"));
        let (out, report) = parity(&["--conv", conv, "--cases", "sd1-euler-large"], &json);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "--conv {conv}: {stderr}");
        let report = report.expect("a report");
        assert_eq!(report["passed"], 1, "--conv {conv}: {report}");
        let kernels = report["cpu_kernels"]["convolution"]
            .as_str()
            .unwrap_or_default();
        assert_eq!(
            kernels.starts_with("winograd"),
            conv == "winograd",
            "{report}"
        );
    }
}

/// `--dtype bf16` on the CPU: f32 weights with bf16 products, named in the report. The error
/// against diffusers' f32 images is bounded by what was measured on these fixtures (README,
/// "bf16 on the CPU": max 32 / mean 4.1 levels on the DDIM cases whose tiny random UNets
/// amplify it, max 3 / mean 0.5 on the others), with some margin.
#[test]
fn bf16_products_on_the_cpu() {
    let json = tmp("bf16.json");
    let (out, report) = parity(
        &["--dtype", "bf16", "--report-only", "--cases", "sd1-"],
        &json,
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let report = report.expect("a report");
    assert_eq!(report["dtype"], "bf16");
    let products = report["cpu_kernels"]["products"]
        .as_str()
        .unwrap_or_default();
    assert!(products.starts_with("bf16"), "{report}");
    let cases = report["cases"].as_array().unwrap();
    assert!(cases.len() >= 10, "{report}");
    let mut bf16_mean = 0.0;
    for case in cases {
        assert_eq!(case["status"], "measured", "{case}");
        let (max, mean) = (&case["error"]["max_levels"], &case["error"]["mean_levels"]);
        let (max, mean) = (max.as_u64().unwrap(), mean.as_f64().unwrap());
        let ddim = case["case"].as_str().unwrap().contains("ddim");
        let (max_bound, mean_bound) = if ddim { (40, 6.0) } else { (5, 0.75) };
        assert!(max <= max_bound && mean <= mean_bound, "{case}");
        bf16_mean += mean;
    }
    // The products do round: further from diffusers than the f32 products are.
    let json = tmp("bf16-f32.json");
    let (out, report) = parity(&["--report-only", "--cases", "sd1-"], &json);
    assert!(out.status.success());
    let report = report.expect("a report");
    let products = report["cpu_kernels"]["products"]
        .as_str()
        .unwrap_or_default();
    assert!(products.starts_with("f32"), "{report}");
    let f32_mean: f64 = report["cases"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["error"]["mean_levels"].as_f64().unwrap())
        .sum();
    assert!(
        bf16_mean > 2.0 * f32_mean,
        "bf16 {bf16_mean}, f32 {f32_mean}"
    );
}
