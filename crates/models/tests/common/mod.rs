//! Helpers shared by the parity tests: fixture paths and comparisons against reference
//! tensors and images with stated tolerances.

#![allow(dead_code)]

use std::path::{Path, PathBuf};

use candle_core::{DType, Tensor};

/// `fixtures/` at the repository root.
pub fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures")
}

/// (max |got - want|, max |want|), in f32.
pub fn max_rel_diff(got: &Tensor, want: &Tensor) -> (f32, f32) {
    let got = got.to_dtype(DType::F32).unwrap().flatten_all().unwrap();
    let want = want.to_dtype(DType::F32).unwrap().flatten_all().unwrap();
    let diff: f32 = (&got - &want)
        .unwrap()
        .abs()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar()
        .unwrap();
    let scale: f32 = want.abs().unwrap().max(0).unwrap().to_scalar().unwrap();
    (diff, scale)
}

/// Same shape, and max |got - want| <= `rel` x max(1, max |want|).
pub fn assert_close(name: &str, what: &str, got: &Tensor, want: &Tensor, rel: f64) {
    assert_eq!(got.dims(), want.dims(), "{name}: {what} shape");
    let (diff, scale) = max_rel_diff(got, want);
    let tol = rel * (scale as f64).max(1.0);
    assert!(
        (diff as f64) <= tol,
        "{name}: {what} differs from the reference by {diff:e} (tolerance {tol:e}, scale {scale})"
    );
}

/// 8-bit images within max 3 and mean 0.5 levels of 255.
pub fn assert_images_close(name: &str, got: &[u8], want: &[u8]) {
    assert_eq!(got.len(), want.len(), "{name}: pixel count");
    let mut max = 0u8;
    let mut sum = 0u64;
    for (a, b) in got.iter().zip(want) {
        let d = a.abs_diff(*b);
        max = max.max(d);
        sum += u64::from(d);
    }
    let mean = sum as f64 / got.len() as f64;
    assert!(
        max <= 3 && mean <= 0.5,
        "{name}: images differ from the reference by max {max}, mean {mean:.3}"
    );
}

/// The bytes of a u8 tensor.
pub fn bytes(t: &Tensor) -> Vec<u8> {
    t.flatten_all().unwrap().to_vec1::<u8>().unwrap()
}

/// (width, height, RGB bytes) of an 8-bit RGB PNG.
pub fn read_rgb_png(path: &Path) -> (usize, usize, Vec<u8>) {
    let file = std::fs::File::open(path).unwrap();
    let mut reader = png::Decoder::new(std::io::BufReader::new(file))
        .read_info()
        .unwrap();
    let mut buf = vec![0; reader.output_buffer_size()];
    let info = reader.next_frame(&mut buf).unwrap();
    assert_eq!(
        (info.color_type, info.bit_depth),
        (png::ColorType::Rgb, png::BitDepth::Eight),
        "{}: not 8-bit RGB",
        path.display()
    );
    buf.truncate(info.buffer_size());
    (info.width as usize, info.height as usize, buf)
}

/// A FLUX transformer on the inputs stored in a reference file.
pub fn flux_forward(
    model: &sd_models::modules::flux::FluxTransformer,
    r: &std::collections::HashMap<String, Tensor>,
) -> Tensor {
    model
        .forward(
            &r["hidden_states"],
            &r["encoder_hidden_states"],
            &r["pooled_projections"],
            &r["timestep"],
            r.get("guidance"),
            &r["img_ids"],
            &r["txt_ids"],
        )
        .unwrap()
}

/// The tiny FLUX transformer `fixtures/flux/transformer-{name}` (`dev` or `schnell`) in f32 on
/// the CPU, and its config.
pub fn flux_transformer(
    name: &str,
) -> (
    sd_models::modules::flux::FluxTransformer,
    sd_models::modules::flux::FluxConfig,
) {
    use sd_models::modules::config::JsonConfig;
    use sd_models::modules::flux::{FluxConfig, FluxTransformer};
    let dir = fixtures().join(format!("flux/transformer-{name}"));
    let cfg =
        FluxConfig::from_config(&JsonConfig::load(&dir.join("config.json")).unwrap()).unwrap();
    // SAFETY: the fixture is not modified while mapped.
    let vb = unsafe {
        candle_nn::VarBuilder::from_mmaped_safetensors(
            &[dir.join("diffusion_pytorch_model.safetensors")],
            DType::F32,
            &candle_core::Device::Cpu,
        )
        .unwrap()
    };
    (FluxTransformer::new(vb, &cfg).unwrap(), cfg)
}

/// The dense FLUX transformer of a GGUF file: every tensor dequantized at load, renamed to
/// diffusers' names.
pub fn dequantized_flux(
    file: &Path,
    cfg: &sd_models::modules::flux::FluxConfig,
) -> sd_models::modules::flux::FluxTransformer {
    let device = candle_core::Device::Cpu;
    let mut reader = std::fs::File::open(file).unwrap();
    let content = candle_core::quantized::gguf_file::Content::read(&mut reader).unwrap();
    let mut dense = std::collections::HashMap::new();
    for name in content.tensor_infos.keys() {
        let q = content.tensor(&mut reader, name, &device).unwrap();
        dense.insert(name.clone(), q.dequantize(&device).unwrap());
    }
    let vb = candle_nn::VarBuilder::from_tensors(
        sd_models::modules::flux::original_to_diffusers(dense).unwrap(),
        DType::F32,
        &device,
    );
    sd_models::modules::flux::FluxTransformer::new(vb, cfg).unwrap()
}

/// The sampler and schedule of a reference case: its `scheduler` name (which may be a
/// combined name such as `dpmpp-2m-karras`) or the model's own, and its `schedule` if any.
#[allow(dead_code)]
pub fn sampler_of(
    case: &serde_json::Value,
    pipe: &sd_models::pipelines::SdPipeline,
) -> (
    sd_models::samplers::SamplerKind,
    sd_models::samplers::Schedule,
) {
    use sd_models::samplers::{SamplerKind, Schedule};
    let (kind, named) = match case["scheduler"].as_str().or(case["sampler"].as_str()) {
        Some(s) => SamplerKind::parse(s).expect("sampler name"),
        None => (pipe.default_sampler().expect("default sampler"), None),
    };
    let schedule = match case["schedule"].as_str() {
        Some(s) => Schedule::from_name(s).expect("schedule name"),
        None => named.unwrap_or_default(),
    };
    (kind, schedule)
}
