//! T5 encoder parity with transformers' `T5EncoderModel` on tiny random weights.
//!
//! Expected outputs come from `scripts/make_t5_fixtures.py` (transformers 5.24.0, torch
//! 2.15.0, CPU, f32): a gated-GELU (T5 v1.1, as FLUX's `text_encoder_2`) and a ReLU encoder,
//! 19 random token ids, batch 2. Tolerance: 1e-4 relative to the largest magnitude.

mod common;

use std::path::PathBuf;

use candle_core::{DType, Device};
use candle_nn::VarBuilder;
use sd_models::modules::config::JsonConfig;
use sd_models::modules::t5::{T5Config, T5Encoder};

fn fixtures() -> PathBuf {
    common::fixtures().join("t5")
}

#[test]
fn t5_encoder_matches_transformers() {
    for name in ["gated", "relu"] {
        let dir = fixtures().join(name);
        let cfg =
            T5Config::from_config(&JsonConfig::load(&dir.join("config.json")).unwrap()).unwrap();
        assert_eq!(cfg.gated, name == "gated");
        let vb = unsafe {
            VarBuilder::from_mmaped_safetensors(
                &[dir.join("model.safetensors")],
                DType::F32,
                &Device::Cpu,
            )
            .unwrap()
        };
        let model = T5Encoder::new(vb, &cfg).unwrap();
        let r = candle_core::safetensors::load(
            fixtures().join(format!("{name}.safetensors")),
            &Device::Cpu,
        )
        .unwrap();
        let ids = r["input_ids"].to_dtype(DType::U32).unwrap();
        let got = model.forward(&ids).unwrap();
        common::assert_close(
            name,
            "last hidden state",
            &got,
            &r["last_hidden_state"],
            1e-4,
        );
    }
}
