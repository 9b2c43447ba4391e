//! UNets with the less common config options, one forward pass each against diffusers.
//!
//! `fixtures/unets/<name>/` and the expected outputs in `fixtures/reference/<name>.safetensors`
//! come from `scripts/make_fixtures.py` (diffusers 0.42.1 `UNet2DConditionModel`, f32, CPU),
//! on latents of odd size (7x5). Tolerance: 1e-4 relative to the output's largest magnitude.
//!
//! - `unet-mixed`: sample_size [h, w], center_input_sample, flip_sin_to_cos false,
//!   freq_shift 1, block types in mixed order, layers_per_block and
//!   transformer_layers_per_block as lists, 3 heads on 16 channels (inner dim 15),
//!   only_cross_attention on one block, downsample_padding 0, mid_block_scale_factor 1.5,
//!   resnet_out_scale_factor 1.25 (unused by these block types, as in diffusers),
//!   time_embedding_dim 48, 5x5 conv_in and 1x1 conv_out,
//!   act_fn "swish", norm_eps 1e-4.
//! - `unet-nomid-linear`: no mid block, linear projections, upcast attention.

mod common;

use candle_core::{DType, Device};
use common::fixtures;
use sd_models::loader::load_unet;

fn check(name: &str) {
    let unet = load_unet(
        &fixtures().join("unets").join(name),
        &Device::Cpu,
        DType::F32,
    )
    .unwrap_or_else(|e| panic!("{name}: {e}"));
    let r = candle_core::safetensors::load(
        fixtures()
            .join("reference")
            .join(format!("{name}.safetensors")),
        &Device::Cpu,
    )
    .unwrap();
    let t: Vec<f32> = r["timestep"].to_vec1().unwrap();
    let out = unet
        .forward(&r["sample"], t[0] as f64, &r["context"])
        .unwrap();
    common::assert_close(name, "UNet output", &out, &r["output"], 1e-4);
}

#[test]
fn mixed_config_options() {
    check("unet-mixed");
}

#[test]
fn no_mid_block_linear_projection() {
    check("unet-nomid-linear");
}

#[test]
fn sample_size_list_gives_default_size() {
    let unet = load_unet(
        &fixtures().join("unets/unet-mixed"),
        &Device::Cpu,
        DType::F32,
    )
    .unwrap();
    assert_eq!(unet.config.sample_size, (8, 12));
}
