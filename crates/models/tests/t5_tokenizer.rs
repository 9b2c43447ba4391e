//! The T5 tokenizer gives transformers' ids.
//!
//! Expected ids come from `scripts/make_t5_tokenizer_fixtures.py`: transformers 5.24
//! `T5TokenizerFast` on `fixtures/flux/tokenizer_2/` (a SentencePiece unigram model trained
//! with T5's nmt_nfkc normalisation, in the tokenizer.json layout of FLUX's tokenizer_2),
//! called as FluxPipeline calls it (`padding="max_length"`, `truncation=True`), on prompts
//! with ligatures, full-width and accented letters, runs of spaces, tabs and newlines, unknown
//! symbols, special-token text, the empty prompt, and prompts longer than `max_length`.

use std::path::Path;

use sd_models::tokenizer::t5::T5Tokenizer;
use serde_json::Value;

#[test]
fn t5_ids_equal_transformers() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/flux");
    let tok = T5Tokenizer::from_dir(&root.join("tokenizer_2")).unwrap();
    let text = std::fs::read_to_string(root.join("reference/t5-tokenizer.json")).unwrap();
    let v: Value = serde_json::from_str(&text).unwrap();
    let cases = v["cases"].as_array().unwrap();
    assert_eq!(cases.len(), 22);
    let mut truncated = 0;
    for case in cases {
        let prompt = case["prompt"].as_str().unwrap();
        let n = case["max_length"].as_u64().unwrap() as usize;
        let want: Vec<u32> = case["ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap() as u32)
            .collect();
        let (got, dropped) = tok.encode_padded(prompt, n).unwrap();
        assert_eq!(got, want, "{prompt:?} at max_length {n}");
        truncated += usize::from(dropped > 0);
    }
    assert!(truncated >= 2, "some prompts must be truncated");
}

#[test]
fn a_folder_without_tokenizer_json_is_refused() {
    let e = T5Tokenizer::from_dir(Path::new("/nonexistent"))
        .err()
        .unwrap()
        .to_string();
    assert!(
        e.contains("tokenizer.json") && e.contains("spiece.model"),
        "{e}"
    );
}

/// A tokenizer_2 folder with only `spiece.model` (and `tokenizer_config.json` with
/// `extra_ids`) gives the same ids (transformers 5 builds the same tokenizer from it; checked
/// by the fixture script).
#[test]
fn spiece_model_only_gives_the_same_ids() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/flux");
    let tok = T5Tokenizer::from_dir(&root.join("tokenizer_2_spm")).unwrap();
    let text = std::fs::read_to_string(root.join("reference/t5-tokenizer.json")).unwrap();
    let v: Value = serde_json::from_str(&text).unwrap();
    for case in v["cases"].as_array().unwrap() {
        let prompt = case["prompt"].as_str().unwrap();
        let n = case["max_length"].as_u64().unwrap() as usize;
        let want: Vec<u32> = case["ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap() as u32)
            .collect();
        assert_eq!(tok.encode_padded(prompt, n).unwrap().0, want, "{prompt:?}");
    }
    assert_eq!(tok.vocab_size(), 304);
}
