//! `--dtype bf16` on the CPU: linear layers built while the process runs bf16 products pack
//! their weights into bf16 pairs as they load and drop the f32 tensors.
//!
//! The expected numbers are those of the same layers built with f32 weights and packed at
//! their first bf16 call, which is how the bf16 error in the README and `BENCHMARKS.md` was
//! measured: packing earlier must not change a single bit. The process-wide bf16 switch is set
//! and cleared here, so this file holds one test, and its binary runs no other.

mod common;

use std::collections::HashMap;

use candle_core::{DType, Device, Module, Tensor};
use candle_nn::VarBuilder;
use sd_models::modules::adapter::linear;
use sd_models::modules::cpu_gemm::set_cpu_bf16;

fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar()
        .unwrap()
}

#[test]
fn layers_packed_at_load_equal_layers_packed_at_first_use() {
    let dev = Device::Cpu;
    let mut rng = sd_models::samplers::TorchRng::new(5);
    let tensors = HashMap::from([
        ("weight".to_string(), rng.randn(&[45, 70], &dev).unwrap()),
        ("bias".to_string(), rng.randn(&[45], &dev).unwrap()),
    ]);
    let x = rng.randn(&[2, 9, 70], &dev).unwrap();
    let vb = || VarBuilder::from_tensors(tensors.clone(), DType::F32, &dev);
    let reference = common::flux_transformer("dev").0;
    let r = candle_core::safetensors::load(
        common::fixtures().join("flux/reference/transformer-dev.safetensors"),
        &dev,
    )
    .unwrap();

    // Built in f32, then run with bf16 products: packed at the first call.
    set_cpu_bf16(false);
    let lazy = linear(70, 45, vb()).unwrap();
    let lazy_panels = linear(70, 45, vb()).unwrap().with_panels();
    set_cpu_bf16(true);
    let want = lazy.forward(&x).unwrap();
    assert_eq!(max_diff(&lazy_panels.forward(&x).unwrap(), &want), 0.0);
    let flux_want = common::flux_forward(&reference, &r);

    // Built with bf16 products on: packed at load.
    let packed = linear(70, 45, vb()).unwrap();
    let packed_panels = linear(70, 45, vb()).unwrap().with_panels();
    assert_eq!(max_diff(&packed.forward(&x).unwrap(), &want), 0.0);
    assert_eq!(max_diff(&packed_panels.forward(&x).unwrap(), &want), 0.0);
    let flux_packed = common::flux_transformer("dev").0;
    let flux_got = common::flux_forward(&flux_packed, &r);
    assert_eq!(max_diff(&flux_got, &flux_want), 0.0);

    // The f32 weights are gone: an f32 call is an error that says why, where the layer built
    // in f32 still computes f32 products.
    set_cpu_bf16(false);
    let f32_out = lazy.forward(&x).unwrap();
    assert!(max_diff(&f32_out, &want) > 1e-3, "bf16 equals f32");
    for layer in [&packed, &packed_panels] {
        let err = layer.forward(&x).unwrap_err().to_string();
        assert!(err.contains("bf16 products only"), "{err}");
    }
}
