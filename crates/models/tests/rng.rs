//! `TorchRng` against torch's CPU generator.
//!
//! Reference: `tests/fixtures/samplers/rng.json`, written by `scripts/make_sampler_fixtures.py`
//! from `torch.randn(n, generator=torch.Generator("cpu").manual_seed(seed))` (torch 2.15 on
//! an x86 CPU), one generator per seed and several draws in a row, so the generator state
//! carrying over between calls (and torch's cached scalar-path sample) is checked too.
//! Values are float32 bit patterns and must match exactly (tolerance 0).

use std::path::PathBuf;

use candle_core::Device;
use sd_models::samplers::TorchRng;
use serde_json::Value;

fn fixture() -> Value {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/samplers/rng.json");
    let text = std::fs::read_to_string(&path).expect("read rng.json");
    serde_json::from_str(&text).expect("parse rng.json")
}

fn bits_of(v: &Value) -> Vec<u32> {
    v.as_array()
        .expect("bits array")
        .iter()
        .map(|b| b.as_u64().expect("u32") as u32)
        .collect()
}

#[test]
fn randn_matches_torch_bit_for_bit() {
    let fx = fixture();
    let cases = fx["cases"].as_array().expect("cases");
    assert!(cases.len() >= 8);
    let mut checked = 0;
    for case in cases {
        let seed = case["seed"].as_u64().expect("seed");
        let mut rng = TorchRng::new(seed);
        for (k, draw) in case["draws"].as_array().expect("draws").iter().enumerate() {
            let n = draw["n"].as_u64().expect("n") as usize;
            let want = bits_of(&draw["bits"]);
            let got: Vec<u32> = rng.randn_vec(n).iter().map(|v| v.to_bits()).collect();
            assert_eq!(got.len(), n);
            for (j, (g, w)) in got.iter().zip(&want).enumerate() {
                assert_eq!(
                    g,
                    w,
                    "seed {seed}, draw #{k} (n = {n}), element {j}: got {}, torch {}",
                    f32::from_bits(*g),
                    f32::from_bits(*w)
                );
            }
            checked += n;
        }
    }
    assert!(checked > 3000, "only {checked} values checked");
}

#[test]
fn shaped_randn_tensor_matches_torch() {
    let fx = fixture();
    let shaped = &fx["shaped"];
    let seed = shaped["seed"].as_u64().expect("seed");
    let shape: Vec<usize> = shaped["shape"]
        .as_array()
        .expect("shape")
        .iter()
        .map(|d| d.as_u64().expect("dim") as usize)
        .collect();
    let t = TorchRng::new(seed)
        .randn(&shape, &Device::Cpu)
        .expect("randn");
    assert_eq!(t.dims(), shape.as_slice());
    assert_eq!(t.dtype(), candle_core::DType::F32);
    let got: Vec<u32> = t
        .flatten_all()
        .and_then(|t| t.to_vec1::<f32>())
        .expect("to_vec")
        .iter()
        .map(|v| v.to_bits())
        .collect();
    assert_eq!(got, bits_of(&shaped["bits"]));
}

#[test]
fn empty_draw_consumes_nothing() {
    let mut a = TorchRng::new(3);
    assert!(a.randn_vec(0).is_empty());
    let mut b = TorchRng::new(3);
    assert_eq!(a.randn_vec(20), b.randn_vec(20));
}
