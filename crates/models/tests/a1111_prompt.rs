//! A1111's prompt syntax through the real text encoder of the tiny SD 1.x and SD 2.x models:
//! a plain prompt within 75 tokens gives exactly diffusers' embeddings (same ids, weights of
//! 1); longer prompts give one 77-token block per chunk; weights change the tokens they cover;
//! prompt and negative prompt are brought to the same length with the empty prompt's chunk.

mod common;

use candle_core::{DType, Device, IndexOp, Tensor};
use common::fixtures;
use sd_models::loader::load_sd;
use sd_models::pipelines::SdPipeline;

fn pipeline(model: &str) -> SdPipeline {
    load_sd(
        &fixtures().join("models").join(model),
        &Device::Cpu,
        DType::F32,
    )
    .expect("tiny model")
    .0
}

/// The largest absolute difference.
fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
    common::max_rel_diff(a, b).0
}

#[test]
fn plain_prompts_encode_as_diffusers_does() {
    for model in ["tiny-sd1", "tiny-sd2"] {
        let p = pipeline(model);
        let (plain, _) = p
            .encode_prompt("a photo of a cat", Some("blurry"), 1, true)
            .unwrap();
        let a1111 = p
            .encode_prompt_a1111("a photo of a cat", Some("blurry"), 1, true)
            .unwrap();
        assert_eq!(plain.dims(), a1111.dims(), "{model}");
        assert!(
            max_diff(&plain, &a1111) < 1e-6,
            "{model}: {}",
            max_diff(&plain, &a1111)
        );
    }
}

#[test]
fn long_prompts_weights_and_padding() {
    let p = pipeline("tiny-sd1");
    let long = vec!["day"; 100].join(" ");
    let emb = p.encode_prompt_a1111(&long, None, 2, true).unwrap();
    let (_, seq, dim) = emb.dims3().unwrap();
    assert_eq!(
        (emb.dim(0).unwrap(), seq),
        (4, 154),
        "two chunks, batch 2 x (uncond, cond)"
    );
    // The negative prompt (one chunk) is padded with the empty prompt's chunk.
    let empty = p.encode_prompt_a1111("", None, 1, false).unwrap();
    let pad = emb.i((0, 77..154, ..)).unwrap();
    assert!(max_diff(&pad, &empty.i((0, .., ..)).unwrap()) < 1e-6);
    assert_eq!(dim, empty.dim(2).unwrap());

    // A weight changes the hidden states (the whole chunk, through the mean restore) and
    // weights of 1 do not.
    let plain = p
        .encode_prompt_a1111("a photo of a cat", None, 1, false)
        .unwrap();
    let same = p
        .encode_prompt_a1111("(a photo of a cat:1)", None, 1, false)
        .unwrap();
    let heavy = p
        .encode_prompt_a1111("a photo of a (cat:1.5)", None, 1, false)
        .unwrap();
    assert!(max_diff(&plain, &same) < 1e-6);
    assert!(max_diff(&plain, &heavy) > 1e-3);
}
