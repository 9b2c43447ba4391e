//! `sd-worker parity`: the repository's diffusers parity fixtures run by the binary itself, on
//! any device and dtype.
//!
//! The parity tests (`cargo test`) prove the CPU f32 path; a machine with a GPU often has no
//! Rust toolchain, so the same fixture cases (tiny random models in `fixtures/`, and the images
//! diffusers made from them) are run here through the engine's own request validation and
//! backends, as a job would be. Each case reports how far its images are from diffusers'
//! (max and mean levels of 255, PSNR), and, for f32, whether that is within the tests'
//! tolerance.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use candle_core::Device;
use clap::Args;
use serde::{Deserialize, Serialize};

use sd_engine::backend::{Backend, Model};
use sd_engine::load::LoadRequest;
use sd_engine::request::{ImageBytes, MicroDraft};
use sd_engine::{Limits, ModelSpec, Operation, RequestDraft};

use crate::model_args::{ConsoleProgress, ModelFlags, SourceArgs};

#[derive(Args, Debug)]
pub struct ParityArgs {
    /// The repository's `fixtures` folder.
    #[arg(long, default_value = "fixtures")]
    pub fixtures: PathBuf,
    /// Device: cpu, cuda[:N] or metal[:N].
    #[arg(long, env = "SD_DEVICE", default_value = "cpu")]
    pub device: String,
    /// Precision: f32, f16 or bf16. On the CPU, bf16 keeps f32 weights and activations and
    /// rounds the operands of linear layers, attention and 1x1 convolutions to bf16 (README,
    /// "bf16 on the CPU").
    #[arg(long, env = "SD_DTYPE", default_value = "f32")]
    pub dtype: String,
    /// Only the cases whose suite/name contains this text (e.g. `sdxl/`, `flux/dev`).
    #[arg(long)]
    pub cases: Option<String>,
    /// The largest per-pixel difference (levels of 255) a case may have.
    #[arg(long, default_value_t = 3)]
    pub max_levels: u8,
    /// The largest mean difference (levels of 255) a case may have.
    #[arg(long, default_value_t = 0.5)]
    pub mean_levels: f64,
    /// Measure only: no case fails for its error (for f16 / bf16, whose error against f32
    /// diffusers is reported, not bounded). Cases that cannot run still fail.
    #[arg(long)]
    pub report_only: bool,
    /// Write the report as JSON to this file.
    #[arg(long)]
    pub json: Option<PathBuf>,
}

/// One fixture suite: its case list, where its models and reference files are.
struct Suite {
    name: &'static str,
    cases: &'static str,
    /// The model folder of a case's `model`, `{}` standing for it.
    model: &'static str,
    /// The reference file of a case, `{}` standing for its name.
    reference: &'static str,
    /// FLUX cases write guidance 0 for schnell-like models, which take none.
    flux: bool,
}

const SUITES: [Suite; 6] = [
    Suite {
        name: "sd",
        cases: "reference/cases.json",
        model: "models/{}",
        reference: "reference/{}.safetensors",
        flux: false,
    },
    Suite {
        name: "img2img",
        cases: "reference/img2img/cases.json",
        model: "models/{}",
        reference: "reference/img2img/{}.safetensors",
        flux: false,
    },
    Suite {
        name: "inpaint",
        cases: "reference/inpaint/cases.json",
        model: "models/{}",
        reference: "reference/inpaint/{}.safetensors",
        flux: false,
    },
    Suite {
        name: "sdxl",
        cases: "reference/sdxl/cases.json",
        model: "models/{}",
        reference: "reference/sdxl/{}.safetensors",
        flux: false,
    },
    Suite {
        name: "flux",
        cases: "flux/reference/flux-cases.json",
        model: "flux/tiny-flux-{}",
        reference: "flux/reference/flux-{}.safetensors",
        flux: true,
    },
    Suite {
        name: "flux-i2i",
        cases: "flux/reference/flux-i2i-cases.json",
        model: "flux/tiny-flux-{}",
        reference: "flux/reference/flux-{}.safetensors",
        flux: true,
    },
];

/// A case as the fixture scripts write it (the fields this runner reads).
#[derive(Deserialize, Debug)]
struct Case {
    name: String,
    model: String,
    prompt: Option<String>,
    negative_prompt: Option<String>,
    width: Option<u64>,
    height: Option<u64>,
    steps: u64,
    guidance: f64,
    seed: u64,
    scheduler: Option<String>,
    batch: Option<u64>,
    image: Option<String>,
    mask: Option<String>,
    strength: Option<f64>,
    max_sequence_length: Option<u64>,
    original_size: Option<[u64; 2]>,
    crops_coords_top_left: Option<[u64; 2]>,
    target_size: Option<[u64; 2]>,
    negative_original_size: Option<[u64; 2]>,
    negative_crops_coords_top_left: Option<[u64; 2]>,
    negative_target_size: Option<[u64; 2]>,
}

impl Suite {
    fn model_folder(&self, fixtures: &Path, case: &Case) -> PathBuf {
        fixtures.join(self.model.replace("{}", &case.model))
    }

    fn reference_file(&self, fixtures: &Path, case: &Case) -> PathBuf {
        fixtures.join(self.reference.replace("{}", &case.name))
    }
}

#[derive(Deserialize)]
struct CaseFile {
    cases: Vec<Case>,
}

#[derive(Serialize, Debug, Clone, Copy, PartialEq)]
#[serde(rename_all = "lowercase")]
enum Status {
    Pass,
    Fail,
    /// Run and measured, not bounded (`--report-only`).
    Measured,
    Error,
    Skipped,
}

#[derive(Serialize, Debug)]
struct CaseReport {
    case: String,
    model: String,
    status: Status,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<ImageError>,
    #[serde(skip_serializing_if = "Option::is_none")]
    seconds: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    message: Option<String>,
}

/// How far an image set is from the reference, in levels of 255.
#[derive(Serialize, Debug, Clone, Copy, PartialEq)]
struct ImageError {
    max_levels: u8,
    mean_levels: f64,
    /// None when the images are identical.
    psnr_db: Option<f64>,
}

#[derive(Serialize, Debug)]
struct Report {
    device: String,
    dtype: String,
    /// The CPU kernels the run used (the convolution algorithm of `--conv` among them).
    cpu_kernels: sd_models::modules::cpu::CpuKernels,
    tolerance: Option<Tolerance>,
    passed: usize,
    failed: usize,
    measured: usize,
    errors: usize,
    skipped: usize,
    worst_max_levels: u8,
    worst_mean_levels: f64,
    seconds: f64,
    cases: Vec<CaseReport>,
}

#[derive(Serialize, Debug, Clone, Copy)]
struct Tolerance {
    max_levels: u8,
    mean_levels: f64,
}

fn image_error(got: &[u8], want: &[u8]) -> ImageError {
    let mut max = 0u8;
    let mut sum = 0u64;
    let mut squares = 0u64;
    for (a, b) in got.iter().zip(want) {
        let d = a.abs_diff(*b);
        max = max.max(d);
        sum += u64::from(d);
        squares += u64::from(d) * u64::from(d);
    }
    let n = got.len().max(1) as f64;
    let mse = squares as f64 / n;
    ImageError {
        max_levels: max,
        mean_levels: sum as f64 / n,
        psnr_db: (mse > 0.0).then(|| 10.0 * (255.0f64 * 255.0 / mse).log10()),
    }
}

fn read_cases(fixtures: &Path, suite: &Suite) -> Result<Vec<Case>> {
    let path = fixtures.join(suite.cases);
    let text = std::fs::read_to_string(&path)
        .with_context(|| format!("cannot read {}", path.display()))?;
    let file: CaseFile =
        serde_json::from_str(&text).with_context(|| format!("{}", path.display()))?;
    Ok(file.cases)
}

fn input(fixtures: &Path, field: &str, name: &str) -> Result<ImageBytes> {
    let file = if name.ends_with(".png") {
        name.to_string()
    } else {
        format!("{name}.png")
    };
    let path = fixtures.join("inputs").join(file);
    let bytes = std::fs::read(&path).with_context(|| format!("cannot read {}", path.display()))?;
    Ok(ImageBytes {
        field: field.into(),
        bytes,
    })
}

/// The request a case makes, as an interface would hand it to the engine.
fn draft(fixtures: &Path, suite: &Suite, case: &Case) -> Result<RequestDraft> {
    let operation = match (&case.image, &case.mask) {
        (None, _) => Operation::Generation,
        (Some(_), None) => Operation::Transform,
        (Some(_), Some(_)) => Operation::Inpaint,
    };
    let mut d = RequestDraft::new(operation);
    d.prompt = Some(case.prompt.clone().unwrap_or_default());
    d.negative_prompt = case.negative_prompt.clone();
    d.width = case.width;
    d.height = case.height;
    d.steps = Some(case.steps);
    d.guidance_scale = (!suite.flux || case.guidance != 0.0).then_some(case.guidance);
    d.seed = Some(case.seed);
    d.scheduler = case.scheduler.clone();
    d.batch = case.batch;
    d.max_sequence_length = case.max_sequence_length;
    d.strength = case.strength;
    d.init_image = case
        .image
        .as_deref()
        .map(|n| input(fixtures, "init_image", n))
        .transpose()?;
    d.mask_image = case
        .mask
        .as_deref()
        .map(|n| input(fixtures, "mask_image", n))
        .transpose()?;
    d.micro = MicroDraft {
        original_size: case.original_size,
        crops_coords_top_left: case.crops_coords_top_left,
        target_size: case.target_size,
        negative_original_size: case.negative_original_size,
        negative_crops_coords_top_left: case.negative_crops_coords_top_left,
        negative_target_size: case.negative_target_size,
        aesthetic_score: None,
        negative_aesthetic_score: None,
    };
    Ok(d)
}

/// The reference images of a case, as one byte run (batch, height, width, RGB).
fn reference_images(path: &Path) -> Result<Vec<u8>> {
    let tensors = candle_core::safetensors::load(path, &Device::Cpu)
        .with_context(|| format!("cannot read {}", path.display()))?;
    let images = tensors
        .get("images")
        .with_context(|| format!("{} has no `images` tensor", path.display()))?;
    Ok(images.flatten_all()?.to_vec1::<u8>()?)
}

/// The most recently loaded model: cases of one model run one after another.
struct Loaded {
    folder: PathBuf,
    model: Model,
    spec: ModelSpec,
}

struct Runner<'a> {
    args: &'a ParityArgs,
    load: LoadRequest,
    loaded: Option<Loaded>,
}

impl Runner<'_> {
    fn model(&mut self, folder: &Path) -> Result<&Loaded> {
        if self.loaded.as_ref().map(|l| l.folder.as_path()) != Some(folder) {
            self.loaded = None;
            let mut load = self.load.clone();
            load.model = folder.to_path_buf();
            let (model, spec) = sd_engine::load::load(&load, &mut ConsoleProgress::new())
                .with_context(|| format!("loading {}", folder.display()))?;
            self.loaded = Some(Loaded {
                folder: folder.to_path_buf(),
                model,
                spec,
            });
        }
        self.loaded.as_ref().context("no model loaded")
    }

    fn run_case(&mut self, suite: &Suite, case: &Case) -> Result<(ImageError, f64)> {
        let fixtures = &self.args.fixtures;
        let folder = suite.model_folder(fixtures, case);
        let want = reference_images(&suite.reference_file(fixtures, case))?;
        let draft = draft(fixtures, suite, case)?;
        let loaded = self.model(&folder)?;
        let request = sd_engine::validate(draft, &loaded.spec, &Limits::pipeline(), 0)
            .map_err(|e| anyhow::anyhow!(e.message()))?;
        let started = Instant::now();
        let generated = loaded.model.generate(&request, &mut |_| Ok(()))?;
        let seconds = started.elapsed().as_secs_f64();
        let got: Vec<u8> = generated
            .images
            .iter()
            .flat_map(|i| i.pixels.iter().copied())
            .collect();
        if got.len() != want.len() {
            bail!(
                "the images have {} bytes, the reference {}",
                got.len(),
                want.len()
            );
        }
        Ok((image_error(&got, &want), seconds))
    }

    fn status(&self, e: &ImageError) -> Status {
        if self.args.report_only {
            Status::Measured
        } else if e.max_levels <= self.args.max_levels && e.mean_levels <= self.args.mean_levels {
            Status::Pass
        } else {
            Status::Fail
        }
    }
}

/// Why a case of a suite is not run, if it is not.
fn skip_reason(fixtures: &Path, suite: &Suite, case: &Case) -> Option<String> {
    let folder = suite.model_folder(fixtures, case);
    (!folder.is_dir()).then(|| {
        format!(
            "no model folder {} (the tests build it from another fixture)",
            folder.display()
        )
    })
}

fn summary(r: &Report) -> String {
    format!(
        "parity {} {}: {} passed, {} failed, {} measured, {} errors, {} skipped; worst max {} / mean {:.3} levels; {:.1} s",
        r.device,
        r.dtype,
        r.passed,
        r.failed,
        r.measured,
        r.errors,
        r.skipped,
        r.worst_max_levels,
        r.worst_mean_levels,
        r.seconds
    )
}

fn print_case(suite: &str, c: &CaseReport) {
    let detail = match (&c.error, &c.message) {
        (Some(e), _) => format!(
            "max {:>3} mean {:.3} psnr {} ({:.2} s)",
            e.max_levels,
            e.mean_levels,
            e.psnr_db.map_or("inf".into(), |p| format!("{p:.1} dB")),
            c.seconds.unwrap_or(0.0)
        ),
        (None, Some(m)) => m.clone(),
        (None, None) => String::new(),
    };
    let status = format!("{:?}", c.status).to_lowercase();
    let id = format!("{suite}/{}", c.case);
    println!("{status:<8} {id:<44} {detail}");
}

pub fn run(args: ParityArgs) -> Result<()> {
    let source = SourceArgs::default();
    let load = ModelFlags {
        model: &args.fixtures,
        components: None,
        source: &source,
        device: &args.device,
        dtype: &args.dtype,
        text_encoder_device: None,
    }
    .load_request()?;
    if !args.fixtures.join("reference").is_dir() {
        bail!(
            "invalid --fixtures {}: not the repository's fixtures folder (no reference/ in it)",
            args.fixtures.display()
        );
    }
    sd_engine::load::apply_cpu_precision(&load);
    let started = Instant::now();
    let mut report = Report {
        device: load.device_name.clone(),
        dtype: sd_engine::load::dtype_name(load.dtype).into(),
        cpu_kernels: sd_models::modules::cpu::cpu_kernels(),
        tolerance: (!args.report_only).then_some(Tolerance {
            max_levels: args.max_levels,
            mean_levels: args.mean_levels,
        }),
        passed: 0,
        failed: 0,
        measured: 0,
        errors: 0,
        skipped: 0,
        worst_max_levels: 0,
        worst_mean_levels: 0.0,
        seconds: 0.0,
        cases: Vec::new(),
    };
    let mut runner = Runner {
        args: &args,
        load,
        loaded: None,
    };
    for suite in &SUITES {
        for case in read_cases(&args.fixtures, suite)? {
            let id = format!("{}/{}", suite.name, case.name);
            if args.cases.as_deref().is_some_and(|f| !id.contains(f)) {
                continue;
            }
            let mut c = CaseReport {
                case: case.name.clone(),
                model: case.model.clone(),
                status: Status::Skipped,
                error: None,
                seconds: None,
                message: skip_reason(&args.fixtures, suite, &case),
            };
            if c.message.is_none() {
                match runner.run_case(suite, &case) {
                    Ok((e, seconds)) => {
                        c.status = runner.status(&e);
                        c.error = Some(e);
                        c.seconds = Some(seconds);
                    }
                    Err(e) => {
                        c.status = Status::Error;
                        c.message = Some(format!("{e:#}"));
                    }
                }
            }
            print_case(suite.name, &c);
            tally(&mut report, c);
        }
    }
    report.seconds = started.elapsed().as_secs_f64();
    if let Some(path) = &args.json {
        let text = serde_json::to_string_pretty(&report)?;
        std::fs::write(path, text).with_context(|| format!("cannot write {}", path.display()))?;
    }
    let line = summary(&report);
    println!("{line}");
    if report.failed > 0 || report.errors > 0 {
        bail!("{line}");
    }
    if report.cases.iter().all(|c| c.status == Status::Skipped) {
        bail!("no case ran (--cases {:?})", args.cases.unwrap_or_default());
    }
    Ok(())
}

fn tally(report: &mut Report, c: CaseReport) {
    match c.status {
        Status::Pass => report.passed += 1,
        Status::Fail => report.failed += 1,
        Status::Measured => report.measured += 1,
        Status::Error => report.errors += 1,
        Status::Skipped => report.skipped += 1,
    }
    if let Some(e) = c.error {
        report.worst_max_levels = report.worst_max_levels.max(e.max_levels);
        report.worst_mean_levels = report.worst_mean_levels.max(e.mean_levels);
    }
    report.cases.push(c);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn image_error_counts_levels_and_psnr() {
        let e = image_error(&[10, 20, 30, 40], &[10, 22, 30, 36]);
        assert_eq!(e.max_levels, 4);
        assert!((e.mean_levels - 1.5).abs() < 1e-12);
        // mse = (4 + 16) / 4 = 5
        let psnr = 10.0 * (65025.0f64 / 5.0).log10();
        assert!((e.psnr_db.unwrap() - psnr).abs() < 1e-9);
        assert_eq!(image_error(&[1, 2], &[1, 2]).psnr_db, None);
    }

    #[test]
    fn every_suite_has_cases_and_references() {
        let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures");
        for suite in &SUITES {
            let cases = read_cases(&fixtures, suite).unwrap();
            assert!(!cases.is_empty(), "{}", suite.name);
            for case in &cases {
                let r = suite.reference_file(&fixtures, case);
                assert!(r.is_file(), "{}", r.display());
                draft(&fixtures, suite, case).unwrap();
            }
        }
    }
}
