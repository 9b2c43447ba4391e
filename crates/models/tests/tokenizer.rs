//! The CLIP tokenizer against transformers' `CLIPTokenizer` (ids written by
//! scripts/make_tokenizer_fixtures.py into tests/fixtures/clip-tokenizer/expected.json.gz).

use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use sd_models::tokenizer::clip::ClipTokenizer;
use serde_json::Value;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/clip-tokenizer")
}

/// The vocabulary and tokenizer configs built into the binary (`crates/models/assets`).
fn assets() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("assets")
}

fn expected() -> &'static Value {
    static EXPECTED: OnceLock<Value> = OnceLock::new();
    EXPECTED.get_or_init(|| {
        let bytes = gunzip(&fixtures().join("expected.json.gz"));
        serde_json::from_slice(&bytes).unwrap()
    })
}

fn gunzip(path: &Path) -> Vec<u8> {
    let mut out = Vec::new();
    flate2::read::GzDecoder::new(std::fs::File::open(path).unwrap())
        .read_to_end(&mut out)
        .unwrap();
    out
}

/// Writes `bytes` so that a concurrent reader never sees a partial file.
fn write_atomic(path: &Path, bytes: &[u8]) {
    let tmp = path.with_extension(format!("tmp{}", std::process::id()));
    std::fs::write(&tmp, bytes).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

/// A tokenizer folder under the target's test scratch space: the full CLIP vocabulary
/// (decompressed from the fixtures) with the config files of `configs` (a fixture folder).
fn full_tokenizer_dir(name: &str, configs: &Path) -> PathBuf {
    static VOCAB: OnceLock<(Vec<u8>, Vec<u8>)> = OnceLock::new();
    let (vocab, merges) = VOCAB.get_or_init(|| {
        (
            gunzip(&fixtures().join("vocab.json.gz")),
            gunzip(&assets().join("clip-merges.txt.gz")),
        )
    });
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join("clip-tokenizer")
        .join(name);
    if dir.exists() {
        std::fs::remove_dir_all(&dir).unwrap();
    }
    std::fs::create_dir_all(&dir).unwrap();
    write_atomic(&dir.join("vocab.json"), vocab);
    write_atomic(&dir.join("merges.txt"), merges);
    for file in ["tokenizer_config.json", "special_tokens_map.json"] {
        let src = configs.join(file);
        if src.exists() {
            std::fs::copy(&src, dir.join(file)).unwrap();
        }
    }
    dir
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

/// Compares every case of one expected tokenizer; returns the mismatches.
fn check(tok: &ClipTokenizer, name: &str, exp: &Value) -> Vec<String> {
    let mut bad = Vec::new();
    let mut expect = |what: &str, got: String, want: String| {
        if got != want {
            bad.push(format!("{name}: {what}: got {got}, want {want}"));
        }
    };
    let max_length = exp["max_length"].as_u64().map_or(77, |m| m as usize);
    expect(
        "max_length",
        tok.max_length().to_string(),
        max_length.to_string(),
    );
    for (what, got) in [
        ("bos_id", tok.bos_id()),
        ("eos_id", tok.eos_id()),
        ("pad_id", tok.pad_id()),
    ] {
        expect(what, got.to_string(), exp[what].to_string());
    }
    expect(
        "vocab_size",
        tok.vocab_size().to_string(),
        exp["vocab_size"].to_string(),
    );
    for case in exp["cases"].as_array().unwrap() {
        let prompt = case["prompt"].as_str().unwrap();
        let full = ids(&case["ids"]);
        expect(
            &format!("encode({prompt:?})"),
            format!("{:?}", tok.encode(prompt)),
            format!("{full:?}"),
        );
        let (padded, count) = tok.encode_padded(prompt);
        expect(
            &format!("count({prompt:?})"),
            count.to_string(),
            (full.len() - 2).to_string(),
        );
        if !case["padded"].is_null() {
            expect(
                &format!("encode_padded({prompt:?})"),
                format!("{padded:?}"),
                format!("{:?}", ids(&case["padded"])),
            );
        }
    }
    bad
}

fn assert_clean(bad: Vec<String>) {
    assert!(
        bad.is_empty(),
        "{} mismatches:\n{}",
        bad.len(),
        bad.join("\n")
    );
}

#[test]
fn reference_was_made_with_transformers_5() {
    let version = expected()["transformers"].as_str().unwrap();
    assert!(version.starts_with("5."), "{version}");
}

#[test]
fn sd1_full_vocab_matches_transformers() {
    let dir = full_tokenizer_dir("sd1", &assets().join("clip-sd1"));
    let tok = ClipTokenizer::from_dir(&dir).unwrap();
    assert_eq!(tok.vocab_size(), 49408);
    assert_eq!(tok.pad_id(), 49407);
    assert_eq!(
        tok.encode("a photo of a cat"),
        [49406, 320, 1125, 539, 320, 2368, 49407]
    );
    let mut bad = check(&tok, "sd1", &expected()["tokenizers"]["sd1"]);
    // 1500 random strings: mixed scripts, punctuation, whitespace, glued vocabulary pieces.
    let random = &expected()["random"];
    assert_eq!(random["cases"].as_array().unwrap().len(), 1500);
    bad.extend(check(&tok, "sd1-random", random));
    assert_clean(bad);
}

/// The built-in tokenizer (single files without a tokenizer): its vocabulary, built from the
/// merges alone, is the published vocab.json, and it tokenizes as transformers does in both
/// pad layouts.
#[test]
fn builtin_vocabulary_matches_the_published_tokenizers() {
    use sd_models::tokenizer::clip::BuiltinPad;
    let sd1 = ClipTokenizer::builtin(BuiltinPad::EndOfText).unwrap();
    let published = ClipTokenizer::from_dir(&full_tokenizer_dir(
        "sd1-builtin",
        &assets().join("clip-sd1"),
    ))
    .unwrap();
    let vocab: std::collections::HashMap<String, u32> =
        serde_json::from_slice(&gunzip(&fixtures().join("vocab.json.gz"))).unwrap();
    assert_eq!(vocab.len(), 49408);
    for (token, id) in &vocab {
        assert_eq!(sd1.token_to_id(token), Some(*id), "{token:?}");
    }
    assert_eq!(sd1.vocab_size(), published.vocab_size());
    let mut bad = check(&sd1, "builtin-sd1", &expected()["tokenizers"]["sd1"]);
    bad.extend(check(&sd1, "builtin-sd1-random", &expected()["random"]));
    let sd2 = ClipTokenizer::builtin(BuiltinPad::Exclamation).unwrap();
    bad.extend(check(&sd2, "builtin-sd2", &expected()["tokenizers"]["sd2"]));
    assert_clean(bad);
}

#[test]
fn long_words_take_linear_time() {
    let tok = ClipTokenizer::from_dir(&fixtures().join("tiny-sd1")).unwrap();
    let start = std::time::Instant::now();
    let word: String = "abcdefghij".repeat(20_000);
    let (ids, count) = tok.encode_padded(&word);
    assert_eq!(ids.len(), 77);
    assert!(count > 1000);
    let (_, count) = tok.encode_padded(&"a".repeat(200_000));
    assert!(count > 1000);
    let elapsed = start.elapsed();
    assert!(elapsed.as_secs() < 10, "{elapsed:?}");
}

#[test]
fn sd2_full_vocab_matches_transformers() {
    let dir = full_tokenizer_dir("sd2", &assets().join("clip-sd2"));
    let tok = ClipTokenizer::from_dir(&dir).unwrap();
    assert_eq!(tok.pad_id(), 0);
    // "!" is the pad token and so a special token: it is matched before BPE.
    assert_eq!(tok.encode("wow!"), [49406, 2781, 0, 49407]);
    assert_clean(check(&tok, "sd2", &expected()["tokenizers"]["sd2"]));
}

#[test]
fn tiny_vocab_matches_transformers() {
    let mut bad = Vec::new();
    for name in ["tiny-sd1", "tiny-sd2"] {
        let tok = ClipTokenizer::from_dir(&fixtures().join(name)).unwrap();
        assert_eq!(tok.vocab_size(), 1000);
        assert_eq!((tok.bos_id(), tok.eos_id()), (998, 999));
        bad.extend(check(&tok, name, &expected()["tokenizers"][name]));
    }
    assert_clean(bad);
}

#[test]
fn config_variants_match_transformers() {
    let variants = expected()["variants"].as_object().unwrap();
    assert!(variants.len() >= 10);
    let mut bad = Vec::new();
    for (name, exp) in variants {
        let dir = full_tokenizer_dir(
            &format!("variant-{name}"),
            &fixtures().join("variants").join(name),
        );
        match ClipTokenizer::from_dir(&dir) {
            Ok(tok) => bad.extend(check(&tok, name, exp)),
            Err(e) => bad.push(format!("{name}: {e}")),
        }
    }
    assert_clean(bad);
}

#[test]
fn padded_output_has_the_configured_length() {
    let tok = ClipTokenizer::from_dir(&fixtures().join("tiny-sd1")).unwrap();
    let (ids, count) = tok.encode_padded("");
    assert_eq!(count, 0);
    assert_eq!(ids.len(), 77);
    assert_eq!(&ids[..3], &[998, 999, 999]);
    let (ids, count) = tok.encode_padded(&"cat ".repeat(100));
    assert_eq!(count, 200); // "c" + "at</w>" in the tiny vocabulary
    assert_eq!(ids.len(), 77);
    assert_eq!(ids[76], 999);
}

#[test]
fn tokenizer_is_send_and_sync() {
    fn check<T: Send + Sync + Clone>() {}
    check::<ClipTokenizer>();
}

fn scratch(name: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join("clip-tokenizer-errors")
        .join(name);
    if dir.exists() {
        std::fs::remove_dir_all(&dir).unwrap();
    }
    std::fs::create_dir_all(&dir).unwrap();
    for file in ["vocab.json", "merges.txt"] {
        std::fs::copy(fixtures().join("tiny-sd1").join(file), dir.join(file)).unwrap();
    }
    dir
}

fn error_of(dir: &Path) -> String {
    match ClipTokenizer::from_dir(dir) {
        Ok(_) => panic!("{} loaded", dir.display()),
        Err(e) => e.to_string(),
    }
}

#[test]
fn errors_name_the_file() {
    let dir = scratch("missing-vocab");
    std::fs::remove_file(dir.join("vocab.json")).unwrap();
    let e = error_of(&dir);
    assert!(e.contains("vocab.json"), "{e}");

    let dir = scratch("bad-vocab");
    std::fs::write(dir.join("vocab.json"), "[1, 2]").unwrap();
    let e = error_of(&dir);
    assert!(e.contains("vocab.json"), "{e}");

    let dir = scratch("missing-merges");
    std::fs::remove_file(dir.join("merges.txt")).unwrap();
    let e = error_of(&dir);
    assert!(e.contains("merges.txt"), "{e}");

    let dir = scratch("bad-merges");
    std::fs::write(dir.join("merges.txt"), "#version: 0.2\ni n\nnot a merge\n").unwrap();
    let e = error_of(&dir);
    assert!(e.contains("merges.txt") && e.contains("line 3"), "{e}");

    let dir = scratch("merge-out-of-vocab");
    std::fs::write(dir.join("merges.txt"), "#version: 0.2\nq zzzz\n").unwrap();
    let e = error_of(&dir);
    assert!(e.contains("merges.txt") && e.contains("zzzz"), "{e}");

    let dir = scratch("bad-config");
    std::fs::write(dir.join("tokenizer_config.json"), "{not json").unwrap();
    let e = error_of(&dir);
    assert!(e.contains("tokenizer_config.json"), "{e}");

    let dir = scratch("bad-special-map");
    std::fs::write(
        dir.join("special_tokens_map.json"),
        r#"{"pad_token": {"lstrip": false}}"#,
    )
    .unwrap();
    let e = error_of(&dir);
    assert!(
        e.contains("special_tokens_map.json") && e.contains("pad_token"),
        "{e}"
    );

    let dir = scratch("unknown-pad");
    std::fs::write(
        dir.join("special_tokens_map.json"),
        r#"{"pad_token": "<pad>"}"#,
    )
    .unwrap();
    let e = error_of(&dir);
    assert!(
        e.contains("<pad>") && e.contains("special_tokens_map.json"),
        "{e}"
    );

    let dir = scratch("short-max-length");
    std::fs::write(
        dir.join("tokenizer_config.json"),
        r#"{"model_max_length": 1}"#,
    )
    .unwrap();
    let e = error_of(&dir);
    assert!(e.contains("model_max_length"), "{e}");
}
