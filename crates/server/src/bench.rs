//! `sd-worker bench`: times the three model stages on the full-size SD 1.5 architecture (and
//! the SDXL UNet and VAE, and the FLUX.1-dev transformer) with random weights made in-process (speed does not depend on the
//! weight values).
//! `scripts/bench_diffusers.py` times diffusers/PyTorch on the same shapes.

use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Result};
use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::VarBuilder;
use candle_transformers::models::clip::text_model as candle_clip;
use candle_transformers::models::stable_diffusion::unet_2d as candle_unet;
use candle_transformers::models::stable_diffusion::vae as candle_vae;
use clap::Args;
use sd_models::modules::adapter::{registering, with_adapters, AdapterSet, LayerInfo, LayerShape};
use sd_models::modules::clip::{ClipTextConfig, ClipTextModel};
use sd_models::modules::cpu_gemm::{cpu_bf16, products_in_bf16, set_cpu_bf16, weights_dtype};
use sd_models::modules::flux::{FluxConfig, FluxTransformer};
use sd_models::modules::unet::{AddedCond, UNet, UNetConfig};
use sd_models::modules::vae::{Vae, VaeConfig};

use crate::device::{dtype_name, parse_device, parse_dtype};

#[derive(Args, Debug)]
pub struct BenchArgs {
    /// Timed runs per stage (the median is reported).
    #[arg(long, env = "SD_BENCH_RUNS", default_value_t = 3)]
    pub runs: usize,
    /// Untimed warm-up runs per stage.
    #[arg(long, env = "SD_BENCH_WARMUP", default_value_t = 1)]
    pub warmup: usize,
    /// Stages to time, comma-separated: clip, unet, vae (ours); unet-lora (our UNet with a
    /// rank-16 LoRA on every linear and convolution layer); sdxl-unet, sdxl-vae (the SDXL base
    /// UNet with its text_time conditioning, and its VAE, at --sdxl-size); preview (the server's cheap
    /// latent-to-RGB preview of one image, PNG-encoded); candle-clip, candle-unet, candle-vae
    /// (candle-transformers' own modules, for comparison); flux (one FLUX.1-dev transformer
    /// call at --flux-size, 512 T5 tokens, --flux-layers blocks).
    #[arg(long, env = "SD_BENCH_STAGES", default_value = "clip,unet,vae")]
    pub stages: String,
    /// Device: cpu, cuda[:N] or metal[:N].
    #[arg(long, env = "SD_DEVICE", default_value = "cpu")]
    pub device: String,
    /// Precision: f32, f16 or bf16. On the CPU, bf16 keeps f32 weights and activations and
    /// rounds the operands of linear layers, attention and 1x1 convolutions to bf16 (README,
    /// "bf16 on the CPU").
    #[arg(long, env = "SD_DTYPE", default_value = "f32")]
    pub dtype: String,
    /// Image size in pixels (latents are size / 8); the SD 1.5 default is 512.
    #[arg(long, env = "SD_BENCH_SIZE", default_value_t = 512)]
    pub size: usize,
    /// Image size of the SDXL stages (sdxl-unet, sdxl-vae); SDXL's default is 1024.
    #[arg(long, env = "SD_BENCH_SDXL_SIZE", default_value_t = 1024)]
    pub sdxl_size: usize,
    /// Image size of the flux stage; FLUX's default is 1024.
    #[arg(long, env = "SD_BENCH_FLUX_SIZE", default_value_t = 1024)]
    pub flux_size: usize,
    /// The flux stage's double- and single-stream block counts, "D,S". FLUX.1-dev has 19,38
    /// (12 billion weights: 48 GB in f32, 24 GB in f16 / bf16); fewer blocks time the same
    /// shapes on a machine with less memory (the time grows linearly with the blocks).
    #[arg(long, env = "SD_BENCH_FLUX_LAYERS", default_value = "19,38")]
    pub flux_layers: String,
    /// The VAE stages decode in tiles of this many pixels (as `--vae-tile-size`).
    #[arg(long, env = "SD_VAE_TILE_SIZE")]
    pub vae_tile_size: Option<usize>,
    /// After timing the unet, sdxl-unet, vae and sdxl-vae stages, run each once more with
    /// direct convolutions (`--conv direct`) and f32 products (the `--dtype f32` arithmetic)
    /// and report how far the timed output is from that run's: the VAE's in 8-bit levels of the image, the UNet's relative to the RMS of
    /// its output.
    #[arg(long)]
    pub compare_direct: bool,
    /// Print one JSON object instead of a table.
    #[arg(long)]
    pub json: bool,
}

/// The rank of the `unet-lora` stage's adapters.
const BENCH_LORA_RANK: usize = 16;

const STAGES: [&str; 11] = [
    "clip",
    "unet",
    "unet-lora",
    "vae",
    "sdxl-unet",
    "sdxl-vae",
    "flux",
    "preview",
    "candle-clip",
    "candle-unet",
    "candle-vae",
];

/// candle-transformers' SD 1.5 UNet config.
fn candle_unet_config() -> candle_unet::UNet2DConditionModelConfig {
    let block = |out_channels, cross: bool| candle_unet::BlockConfig {
        out_channels,
        use_cross_attn: cross.then_some(1),
        attention_head_dim: 8,
    };
    candle_unet::UNet2DConditionModelConfig {
        center_input_sample: false,
        flip_sin_to_cos: true,
        freq_shift: 0.0,
        blocks: vec![
            block(320, true),
            block(640, true),
            block(1280, true),
            block(1280, false),
        ],
        layers_per_block: 2,
        downsample_padding: 1,
        mid_block_scale_factor: 1.0,
        norm_num_groups: 32,
        norm_eps: 1e-5,
        cross_attention_dim: 768,
        sliced_attention_size: None,
        use_linear_projection: false,
    }
}

/// Builds a model with random weights that are plain tensors, like weights loaded from a
/// file. (Weights that stay `Var`s make candle record every op for backpropagation, which
/// keeps all intermediate tensors of a forward pass alive.)
fn random_model<T>(
    dtype: DType,
    device: &Device,
    build: impl Fn(VarBuilder) -> candle_core::Result<T>,
) -> Result<T> {
    Ok(random_adaptable(dtype, device, &build)?.model)
}

/// Random weights drawn as the builder reads them, as the loader reads weights from a file: a
/// layer that keeps only a packed form (bf16 products on the CPU) frees its f32 tensor as it
/// is built, so the stage's peak RSS is what a loaded model holds, not every f32 weight at
/// once. Each tensor is drawn from a generator seeded by its name, so that `--compare-direct`
/// builds the same model again. The values are uniform with the mean and standard deviation of
/// the builder's initialiser (the products take the same time whatever the distribution); a
/// matrix or kernel whose initialiser is zero (FLUX's linear layers, the VAE's attention) gets
/// a standard deviation of 1 / sqrt(fan-in) instead, like the layers around it, so that it is
/// made of pages that are resident, as loaded weights are. No tensor is reported present
/// (`contains_tensor`), so builders leave out their optional parts (the VAE's encoder).
struct Drawn;

/// Values per independently seeded chunk: drawn in parallel, the same on any thread count.
const DRAW_CHUNK: usize = 1 << 16;

/// The (mean, half-width) of the uniform values that stand for `init` on `shape`.
fn uniform_for(init: candle_nn::Init, shape: &Shape) -> (f64, f64) {
    use candle_nn::init::FanInOut;
    use candle_nn::Init;
    let fan_in = FanInOut::FanIn.for_shape(shape).max(1) as f64;
    let from_std = |std: f64| 3f64.sqrt() * std;
    match init {
        Init::Const(c) if c == 0.0 && shape.rank() >= 2 => (0.0, from_std(1.0 / fan_in.sqrt())),
        Init::Const(c) => (c, 0.0),
        Init::Randn { mean, stdev } => (mean, from_std(stdev)),
        Init::Uniform { lo, up } => ((lo + up) / 2.0, (up - lo) / 2.0),
        // Normal or uniform, the same standard deviation.
        Init::Kaiming {
            fan, non_linearity, ..
        } => {
            let std = non_linearity.gain() / (fan.for_shape(shape).max(1) as f64).sqrt();
            (0.0, from_std(std))
        }
    }
}

/// FNV-1a of `name`: the seed of its tensor.
fn name_seed(name: &str) -> u64 {
    name.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ b as u64).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// `n` values uniform in `mean +- half`, from the seed's splitmix64 streams, one per chunk.
fn draw_uniform(seed: u64, n: usize, (mean, half): (f64, f64)) -> Vec<f32> {
    use rayon::prelude::*;
    let mut out = vec![mean as f32; n];
    if half == 0.0 {
        return out;
    }
    out.par_chunks_mut(DRAW_CHUNK)
        .enumerate()
        .for_each(|(chunk, values)| {
            let mut state = seed ^ (chunk as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15);
            for v in values {
                state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
                let mut z = state;
                z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
                z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
                z ^= z >> 31;
                // 24 random bits in [-1, 1).
                let unit = (z >> 40) as f64 / (1u64 << 23) as f64 - 1.0;
                *v = (mean + half * unit) as f32;
            }
        });
    out
}

impl SimpleBackend for Drawn {
    fn get(
        &self,
        shape: Shape,
        name: &str,
        init: candle_nn::Init,
        dtype: DType,
        device: &Device,
    ) -> candle_core::Result<Tensor> {
        let values = draw_uniform(
            name_seed(name),
            shape.elem_count(),
            uniform_for(init, &shape),
        );
        Tensor::from_vec(values, shape, &Device::Cpu)?
            .to_dtype(dtype)?
            .to_device(device)
    }

    fn get_unchecked(&self, name: &str, _: DType, _: &Device) -> candle_core::Result<Tensor> {
        candle_core::bail!("{name}: the bench draws only weights whose shape the model names")
    }

    fn contains_tensor(&self, _: &str) -> bool {
        false
    }
}

/// A model built from random weights, as the loader builds our networks (with adaptable
/// layers, listed in `layers`).
struct Random<T> {
    model: T,
    layers: Vec<LayerInfo>,
    /// Whether the linear layers hold bf16 pairs only, so that an f32 reference needs the model
    /// built again.
    packed: bool,
}

/// Builds a [`Random`] model from [`Drawn`] weights.
fn random_adaptable<T>(
    dtype: DType,
    device: &Device,
    build: &impl Fn(VarBuilder) -> candle_core::Result<T>,
) -> Result<Random<T>> {
    let vb = VarBuilder::from_backend(Box::new(Drawn), dtype, device.clone());
    let (model, layers) = registering("bench", || build(vb));
    Ok(Random {
        model: model?,
        layers,
        packed: cpu_bf16(),
    })
}

impl<T> Random<T> {
    /// `run` once with direct convolutions and f32 products: on this model, or where its
    /// linear layers hold bf16 pairs only, on the model built again from the same weights.
    fn direct(
        &mut self,
        dtype: DType,
        device: &Device,
        build: &impl Fn(VarBuilder) -> candle_core::Result<T>,
        run: impl Fn(&mut T) -> Result<Tensor>,
    ) -> Result<Tensor> {
        with_direct_convolutions(|| {
            if !self.packed {
                return run(&mut self.model);
            }
            let vb = VarBuilder::from_backend(Box::new(Drawn), dtype, device.clone());
            let (model, _) = registering("bench", || build(vb));
            run(&mut model?)
        })
    }
}

/// A random rank-`rank` adapter on every layer of `layers`.
fn random_adapters(
    layers: &[LayerInfo],
    rank: usize,
    dtype: DType,
    device: &Device,
) -> Result<AdapterSet> {
    let mut set = AdapterSet::default();
    for l in layers {
        let (din, dout) = l.shape.dims();
        let k = match l.shape {
            LayerShape::Linear { .. } => None,
            LayerShape::Conv { k, .. } => Some(k),
        };
        let randn = |shape: Vec<usize>| -> Result<Tensor> {
            Ok((Tensor::randn(0f32, 1f32, shape, device)? * 0.01)?.to_dtype(dtype)?)
        };
        let (down, up) = match k {
            None => (randn(vec![rank, din])?, randn(vec![dout, rank])?),
            Some(k) => (
                randn(vec![rank, din, k, k])?,
                randn(vec![dout, rank, 1, 1])?,
            ),
        };
        set.attach(l, down, up, 1.0)?;
    }
    Ok(set)
}

/// Our modules return the models crate's error; `random_model` wants candle's.
fn candle_error(e: sd_models::Error) -> candle_core::Error {
    match e {
        sd_models::Error::Candle(e) => e,
        other => candle_core::Error::Msg(other.to_string()),
    }
}

fn time<F: FnMut() -> Result<()>>(
    warmup: usize,
    runs: usize,
    device: &Device,
    mut f: F,
) -> Result<Vec<f64>> {
    for _ in 0..warmup {
        f()?;
        device.synchronize()?;
    }
    let mut times = Vec::with_capacity(runs);
    for _ in 0..runs {
        let t = Instant::now();
        f()?;
        device.synchronize()?;
        times.push(t.elapsed().as_secs_f64());
    }
    Ok(times)
}

/// How far decoded `images` are from `reference` ones, in 8-bit levels: max, mean and PSNR.
fn levels_error(images: &Tensor, reference: &Tensor, what: &str) -> Result<String> {
    let to8 = |t: &Tensor| -> Result<Vec<u8>> {
        Ok(sd_models::pipelines::sd::to_rgb8(t)?
            .into_iter()
            .flat_map(|i| i.pixels)
            .collect())
    };
    let (a, b) = (to8(images)?, to8(reference)?);
    let (mut max, mut sum, mut sq) = (0u8, 0f64, 0f64);
    for (x, y) in a.iter().zip(&b) {
        let d = x.abs_diff(*y);
        max = max.max(d);
        sum += f64::from(d);
        sq += f64::from(d) * f64::from(d);
    }
    let n = a.len().max(1) as f64;
    let psnr = 10.0 * (255f64 * 255.0 / (sq / n).max(1e-12)).log10();
    Ok(format!(
        "max {max} / mean {:.3} levels from {what}, PSNR {psnr:.1} dB",
        sum / n
    ))
}

/// How far `out` is from `reference`: max and mean absolute difference, relative to the RMS of
/// `reference`.
fn relative_error(out: &Tensor, reference: &Tensor, what: &str) -> Result<String> {
    let scalar = |t: Tensor| -> Result<f64> { Ok(t.to_dtype(DType::F64)?.to_scalar::<f64>()?) };
    let diff = (out.to_dtype(DType::F32)? - reference.to_dtype(DType::F32)?)?.abs()?;
    let max = scalar(diff.flatten_all()?.max(0)?)?;
    let mean = scalar(diff.mean_all()?)?;
    let rms = scalar(reference.to_dtype(DType::F32)?.sqr()?.mean_all()?)?.sqrt();
    Ok(format!(
        "max {:.2e} / mean {:.2e} of the output's RMS {rms:.3} from {what}",
        max / rms,
        mean / rms
    ))
}

/// Runs `f` once with direct convolutions and f32 products (the process's settings are
/// restored after).
fn with_direct_convolutions<F: FnMut() -> Result<Tensor>>(mut f: F) -> Result<Tensor> {
    use sd_models::modules::conv_kernel::{conv_algorithm, set_conv_algorithm, ConvAlgorithm};
    let (conv, bf16) = (conv_algorithm(), cpu_bf16());
    set_conv_algorithm(ConvAlgorithm::Direct);
    set_cpu_bf16(false);
    let out = f();
    set_conv_algorithm(conv);
    set_cpu_bf16(bf16);
    out
}

const DIRECT: &str = "direct convolutions in f32";

/// FLUX.1-dev's transformer with `blocks` (double, single) blocks.
fn flux_config(blocks: (usize, usize)) -> FluxConfig {
    FluxConfig {
        patch_size: 1,
        in_channels: 64,
        out_channels: 64,
        num_layers: blocks.0,
        num_single_layers: blocks.1,
        attention_head_dim: 128,
        num_attention_heads: 24,
        joint_attention_dim: 4096,
        pooled_projection_dim: 768,
        guidance_embeds: true,
        axes_dims_rope: vec![16, 56, 56],
    }
}

fn parse_flux_layers(spec: &str) -> Result<(usize, usize)> {
    let parsed = spec
        .split_once(',')
        .and_then(|(d, s)| Some((d.trim().parse().ok()?, s.trim().parse().ok()?)));
    match parsed {
        Some((d, s)) if d + s > 0 && d <= 19 && s <= 38 => Ok((d, s)),
        _ => bail!(
            "invalid --flux-layers {spec:?}: expected D,S with D <= 19, S <= 38 and D + S > 0"
        ),
    }
}

/// One transformer call on a 1024x1024 image's packed latents (batch 1, as FluxPipeline runs
/// dev models: the guidance is embedded, there is no second pass).
fn flux_stage(args: &BenchArgs, dtype: DType, device: &Device) -> Result<(String, Vec<f64>)> {
    if args.flux_size == 0 || !args.flux_size.is_multiple_of(16) || args.flux_size > 2048 {
        bail!(
            "invalid --flux-size {}: must be a multiple of 16 between 16 and 2048",
            args.flux_size
        );
    }
    let blocks = parse_flux_layers(&args.flux_layers)?;
    let cfg = flux_config(blocks);
    let model = random_model(dtype, device, |vb| {
        FluxTransformer::new(vb, &cfg).map_err(candle_error)
    })?;
    let side = args.flux_size / 16;
    let randn = |shape: &[usize]| -> Result<Tensor> {
        Ok(Tensor::randn(0f32, 1f32, shape, device)?.to_dtype(dtype)?)
    };
    let img = randn(&[1, side * side, 64])?;
    let txt = randn(&[1, 512, 4096])?;
    let pooled = randn(&[1, 768])?;
    let t = Tensor::new(&[1f32], device)?;
    let guidance = Tensor::new(&[3.5f32], device)?;
    let img_ids = sd_models::pipelines::flux::image_ids(side, side, device)?;
    let txt_ids = Tensor::zeros((512, 3), DType::F32, device)?;
    let times = time(args.warmup, args.runs, device, || {
        model.forward(&img, &txt, &pooled, &t, Some(&guidance), &img_ids, &txt_ids)?;
        Ok(())
    })?;
    Ok((
        format!(
            "{0}x{0}: {1} image + 512 text tokens, {2}+{3} blocks",
            args.flux_size,
            side * side,
            blocks.0,
            blocks.1
        ),
        times,
    ))
}

fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(|a, b| a.total_cmp(b));
    let n = s.len();
    if n % 2 == 1 {
        s[n / 2]
    } else {
        (s[n / 2 - 1] + s[n / 2]) / 2.0
    }
}

pub fn run(args: BenchArgs) -> Result<()> {
    for (flag, size) in [("--size", args.size), ("--sdxl-size", args.sdxl_size)] {
        if size == 0 || !size.is_multiple_of(64) || size > 2048 {
            bail!("invalid {flag} {size}: must be a multiple of 64 between 64 and 2048");
        }
    }
    let xl_lat = args.sdxl_size / 8;
    let lat = args.size / 8;
    if args.runs == 0 {
        bail!("invalid --runs 0: at least one timed run is needed");
    }
    let device = parse_device(&args.device)?;
    let requested = parse_dtype(&args.dtype)?;
    set_cpu_bf16(products_in_bf16(requested, &device));
    // The weights' dtype: f32 for bf16 on the CPU, whose products round to bf16.
    let dtype = weights_dtype(requested, &device);
    let stages: Vec<String> = args
        .stages
        .split(',')
        .map(|s| s.trim().to_ascii_lowercase())
        .filter(|s| !s.is_empty())
        .collect();
    for s in &stages {
        if !STAGES.contains(&s.as_str()) {
            bail!(
                "invalid --stages entry {s:?}: expected one of {}",
                STAGES.join(", ")
            );
        }
    }
    let mut results: Vec<(String, String, Vec<f64>)> = Vec::new();
    for stage in &stages {
        let (shape, times) = match stage.as_str() {
            "clip" => {
                let model = random_model(dtype, &device, |vb| {
                    ClipTextModel::new(vb, &ClipTextConfig::sd15()).map_err(candle_error)
                })?;
                let ids = Tensor::arange(0u32, 77, &device)?.unsqueeze(0)?;
                let times = time(args.warmup, args.runs, &device, || {
                    model.forward(&ids)?;
                    Ok(())
                })?;
                ("1x77 tokens".to_string(), times)
            }
            "unet" | "unet-lora" => {
                let build =
                    |vb: VarBuilder<'_>| UNet::new(vb, &UNetConfig::sd15()).map_err(candle_error);
                let mut random = random_adaptable(dtype, &device, &build)?;
                let (model, layers) = (&random.model, &random.layers);
                let lora = stage == "unet-lora";
                let set = if lora {
                    Some(Arc::new(random_adapters(
                        layers,
                        BENCH_LORA_RANK,
                        dtype,
                        &device,
                    )?))
                } else {
                    None
                };
                let x = Tensor::randn(0f32, 1f32, (2, 4, lat, lat), &device)?.to_dtype(dtype)?;
                let ctx = Tensor::randn(0f32, 1f32, (2, 77, 768), &device)?.to_dtype(dtype)?;
                let mut last = None;
                let times = with_adapters(set.clone(), || {
                    time(args.warmup, args.runs, &device, || {
                        last = Some(model.forward(&x, 999.0, &ctx)?);
                        Ok(())
                    })
                })?;
                let what = if lora {
                    format!(
                        ", rank-{BENCH_LORA_RANK} LoRA on all {} layers",
                        layers.len()
                    )
                } else {
                    String::new()
                };
                let mut shape = format!("batch 2 (CFG), 4x{lat}x{lat} latents{what}");
                if let (true, Some(out)) = (args.compare_direct, &last) {
                    let direct = with_adapters(set, || {
                        random.direct(dtype, &device, &build, |m| Ok(m.forward(&x, 999.0, &ctx)?))
                    })?;
                    shape += &format!(", {}", relative_error(out, &direct, DIRECT)?);
                }
                (shape, times)
            }
            "sdxl-unet" => {
                let build =
                    |vb: VarBuilder<'_>| UNet::new(vb, &UNetConfig::sdxl()).map_err(candle_error);
                let mut random = random_adaptable(dtype, &device, &build)?;
                let model = &random.model;
                let l = xl_lat;
                let x = Tensor::randn(0f32, 1f32, (2, 4, l, l), &device)?.to_dtype(dtype)?;
                let ctx = Tensor::randn(0f32, 1f32, (2, 77, 2048), &device)?.to_dtype(dtype)?;
                let s = args.sdxl_size as f32;
                let added = AddedCond {
                    text_embeds: Tensor::randn(0f32, 1f32, (2, 1280), &device)?.to_dtype(dtype)?,
                    time_ids: Tensor::new(&[[s, s, 0.0, 0.0, s, s]; 2], &device)?,
                };
                let mut last = None;
                let times = time(args.warmup, args.runs, &device, || {
                    last = Some(model.forward_with(&x, 999.0, &ctx, Some(&added))?);
                    Ok(())
                })?;
                let mut shape = format!("batch 2 (CFG), 4x{l}x{l} latents");
                if let (true, Some(out)) = (args.compare_direct, &last) {
                    let direct = random.direct(dtype, &device, &build, |m| {
                        Ok(m.forward_with(&x, 999.0, &ctx, Some(&added))?)
                    })?;
                    shape += &format!(", {}", relative_error(out, &direct, DIRECT)?);
                }
                (shape, times)
            }
            "sdxl-vae" => {
                let cfg = VaeConfig {
                    scaling_factor: 0.13025,
                    ..VaeConfig::sd15()
                };
                let build = |vb: VarBuilder<'_>| Vae::new(vb, &cfg).map_err(candle_error);
                let mut random = random_adaptable(dtype, &device, &build)?;
                let model = &mut random.model;
                model.tile_size = args.vae_tile_size;
                let l = xl_lat;
                let z = Tensor::randn(0f32, 1f32, (1, 4, l, l), &device)?;
                let mut last = None;
                let times = time(args.warmup, args.runs, &device, || {
                    last = Some(model.decode(&z)?);
                    Ok(())
                })?;
                let mut shape = format!("1x4x{l}x{l} latents -> {0}x{0}", args.sdxl_size);
                if let (Some(tile), Some(tiled)) = (args.vae_tile_size, &last) {
                    model.tile_size = None;
                    let whole = model.decode(&z)?;
                    model.tile_size = Some(tile);
                    shape += &format!(
                        ", {tile}px tiles: {}",
                        levels_error(tiled, &whole, "the whole decode")?
                    );
                }
                if let (true, Some(out)) = (args.compare_direct, &last) {
                    let tile = args.vae_tile_size;
                    let direct = random.direct(dtype, &device, &build, |m| {
                        m.tile_size = tile;
                        Ok(m.decode(&z)?)
                    })?;
                    shape += &format!(", {}", levels_error(out, &direct, DIRECT)?);
                }
                (shape, times)
            }
            "flux" => flux_stage(&args, dtype, &device)?,
            "preview" => {
                let z = Tensor::randn(0f32, 1f32, (1, 4, lat, lat), &device)?;
                let times = time(args.warmup, args.runs, &device, || {
                    let images = sd_models::pipelines::latent_preview(&z)?;
                    for image in &images {
                        sd_engine::images::png::encode_png(image, "")?;
                    }
                    Ok(())
                })?;
                (format!("1x4x{lat}x{lat} latents -> {lat}x{lat} PNG"), times)
            }
            "candle-clip" => {
                let cfg = candle_clip::ClipTextConfig {
                    vocab_size: 49408,
                    embed_dim: 768,
                    activation: candle_clip::Activation::QuickGelu,
                    intermediate_size: 3072,
                    max_position_embeddings: 77,
                    pad_with: None,
                    num_hidden_layers: 12,
                    num_attention_heads: 12,
                    projection_dim: 768,
                };
                let model = random_model(dtype, &device, |vb| {
                    candle_clip::ClipTextTransformer::new(vb, &cfg)
                })?;
                let ids = Tensor::arange(0u32, 77, &device)?.unsqueeze(0)?;
                let times = time(args.warmup, args.runs, &device, || {
                    model.forward_with_mask(&ids, usize::MAX)?;
                    Ok(())
                })?;
                ("1x77 tokens".to_string(), times)
            }
            "candle-unet" => {
                let model = random_model(dtype, &device, |vb| {
                    candle_unet::UNet2DConditionModel::new(vb, 4, 4, false, candle_unet_config())
                })?;
                let x = Tensor::randn(0f32, 1f32, (2, 4, lat, lat), &device)?.to_dtype(dtype)?;
                let ctx = Tensor::randn(0f32, 1f32, (2, 77, 768), &device)?.to_dtype(dtype)?;
                let times = time(args.warmup, args.runs, &device, || {
                    model.forward(&x, 999.0, &ctx)?;
                    Ok(())
                })?;
                (format!("batch 2 (CFG), 4x{lat}x{lat} latents"), times)
            }
            "candle-vae" => {
                let cfg = candle_vae::AutoEncoderKLConfig {
                    block_out_channels: vec![128, 256, 512, 512],
                    layers_per_block: 2,
                    latent_channels: 4,
                    norm_num_groups: 32,
                    use_quant_conv: true,
                    use_post_quant_conv: true,
                };
                let model = random_model(dtype, &device, |vb| {
                    candle_vae::AutoEncoderKL::new(vb, 3, 3, cfg.clone())
                })?;
                let z = Tensor::randn(0f32, 1f32, (1, 4, lat, lat), &device)?.to_dtype(dtype)?;
                let times = time(args.warmup, args.runs, &device, || {
                    model.decode(&z)?;
                    Ok(())
                })?;
                (
                    format!("1x4x{lat}x{lat} latents -> {0}x{0}", args.size),
                    times,
                )
            }
            _ => {
                let build =
                    |vb: VarBuilder<'_>| Vae::new(vb, &VaeConfig::sd15()).map_err(candle_error);
                let mut random = random_adaptable(dtype, &device, &build)?;
                let model = &mut random.model;
                model.tile_size = args.vae_tile_size;
                let z = Tensor::randn(0f32, 1f32, (1, 4, lat, lat), &device)?;
                let mut last = None;
                let times = time(args.warmup, args.runs, &device, || {
                    last = Some(model.decode(&z)?);
                    Ok(())
                })?;
                let mut shape = format!("1x4x{lat}x{lat} latents -> {0}x{0}", args.size);
                if let (true, Some(out)) = (args.compare_direct, &last) {
                    let tile = args.vae_tile_size;
                    let direct = random.direct(dtype, &device, &build, |m| {
                        m.tile_size = tile;
                        Ok(m.decode(&z)?)
                    })?;
                    shape += &format!(", {}", levels_error(out, &direct, DIRECT)?);
                }
                (shape, times)
            }
        };
        if !args.json {
            eprintln!(
                "{stage}: median {:.3}s over {} runs",
                median(&times),
                times.len()
            );
        }
        results.push((stage.clone(), shape, times));
    }
    if args.json {
        let stages: serde_json::Map<String, serde_json::Value> = results
            .iter()
            .map(|(name, shape, times)| {
                (
                    name.clone(),
                    serde_json::json!({"shape": shape, "median_s": median(times), "times_s": times}),
                )
            })
            .collect();
        let out = serde_json::json!({
            "impl": "sd-worker (candle)",
            "device": args.device,
            "dtype": dtype_name(requested),
            "cpu_kernels": sd_models::modules::cpu::cpu_kernels(),
            "stages": stages,
        });
        println!("{out}");
    } else {
        let k = sd_models::modules::cpu::cpu_kernels();
        println!(
            "CPU kernels: elementwise {}, gemm {}, products {}, convolution {}, {} threads (features: {})",
            k.elementwise,
            k.gemm,
            k.products,
            k.convolution,
            k.threads,
            k.features.join(" ")
        );
        println!("{:<6} {:<34} {:>10}", "stage", "shape", "median s");
        for (name, shape, times) in &results {
            println!("{name:<6} {shape:<34} {:>10.3}", median(times));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The same name draws the same values (what `--compare-direct` relies on), another name
    /// others; constants stay constant, zero-initialised matrices get the fan-in's scale.
    #[test]
    fn drawn_weights_follow_the_name_and_the_initialiser() {
        let dev = Device::Cpu;
        let get = |name: &str, dims: &[usize], init| {
            Drawn
                .get(Shape::from(dims), name, init, DType::F32, &dev)
                .and_then(|t| t.flatten_all()?.to_vec1::<f32>())
                .expect("drawn")
        };
        let kaiming = candle_nn::init::DEFAULT_KAIMING_NORMAL;
        let a = get("down.0.weight", &[64, 300], kaiming);
        assert_eq!(a, get("down.0.weight", &[64, 300], kaiming));
        assert_ne!(a, get("down.1.weight", &[64, 300], kaiming));
        let std = |v: &[f32]| {
            let mean = v.iter().map(|x| *x as f64).sum::<f64>() / v.len() as f64;
            (v.iter().map(|x| (*x as f64 - mean).powi(2)).sum::<f64>() / v.len() as f64).sqrt()
        };
        let want = 2f64.sqrt() / 300f64.sqrt();
        assert!((std(&a) / want - 1.0).abs() < 0.05, "{} vs {want}", std(&a));
        // Zero-initialised matrix: 1 / sqrt(fan-in), 200 x 3 x 3 here; more values than one
        // chunk.
        let w = get("proj.weight", &[40, 200, 3, 3], candle_nn::init::ZERO);
        assert!((std(&w) * (1800f64).sqrt() - 1.0).abs() < 0.05);
        assert!(w.iter().all(|x| x.abs() <= 3f32.sqrt() / 1800f32.sqrt()));
        let big = get("big.weight", &[3, DRAW_CHUNK], candle_nn::init::ZERO);
        assert_ne!(big[..DRAW_CHUNK], big[DRAW_CHUNK..2 * DRAW_CHUNK]);
        assert!(get("proj.bias", &[40], candle_nn::init::ZERO)
            .iter()
            .all(|x| *x == 0.0));
        assert!(get("norm.weight", &[40], candle_nn::init::ONE)
            .iter()
            .all(|x| *x == 1.0));
        assert!(!Drawn.contains_tensor("proj.weight"));
    }
}
