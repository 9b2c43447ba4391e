//! The T5 tokenizer of FLUX's `tokenizer_2/`, run by Hugging Face's `tokenizers` library from
//! the folder's `tokenizer.json`, set up as transformers 5's `T5Tokenizer` sets it up: the
//! file's unigram vocabulary and its SentencePiece precompiled normaliser only (a trailing
//! `Replace(" {2,}", " ")` in the file is not used), then whitespace splitting and
//! `Metaspace("▁", prepend always)`, then `</s>`.

use std::path::{Path, PathBuf};

use crate::{Error, Result};

/// A loaded T5 tokenizer.
pub struct T5Tokenizer {
    inner: tokenizers::Tokenizer,
    pad_id: u32,
    eos_id: u32,
    path: PathBuf,
}

impl T5Tokenizer {
    /// Loads `dir/tokenizer.json`, or when the folder has only `spiece.model`, builds the same
    /// tokenizer from the SentencePiece model (its pieces and scores, its precompiled
    /// normaliser, and `extra_ids` sentinel tokens from `tokenizer_config.json`, 100 by
    /// default), as transformers 5 does.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let json_path = dir.join("tokenizer.json");
        let spm_path = dir.join("spiece.model");
        let (mut inner, normalizer, path) = if json_path.is_file() {
            let inner = tokenizers::Tokenizer::from_file(&json_path).map_err(|e| {
                Error::config(&json_path, format!("cannot load the tokenizer: {e}"))
            })?;
            let text = std::fs::read_to_string(&json_path).map_err(|e| Error::io(&json_path, e))?;
            let json: serde_json::Value = serde_json::from_str(&text)
                .map_err(|e| Error::config(&json_path, format!("not JSON: {e}")))?;
            let norm = &json["normalizer"];
            let precompiled = if norm["type"] == "Precompiled" {
                Some(norm.clone())
            } else {
                norm["normalizers"]
                    .as_array()
                    .and_then(|list| list.iter().find(|n| n["type"] == "Precompiled").cloned())
            };
            (inner, precompiled, json_path)
        } else if spm_path.is_file() {
            let (inner, normalizer) = from_sentencepiece(dir, &spm_path)?;
            (inner, normalizer, spm_path)
        } else {
            return Err(Error::config(dir, "no tokenizer.json or spiece.model"));
        };
        let normalizer = match normalizer {
            Some(p) => Some(
                serde_json::from_value::<tokenizers::NormalizerWrapper>(p).map_err(|e| {
                    Error::config(&path, format!("bad precompiled normaliser: {e}"))
                })?,
            ),
            None => None,
        };
        inner
            .with_normalizer(normalizer)
            .map_err(|e| Error::config(&path, format!("normaliser: {e}")))?;
        let pre: tokenizers::PreTokenizerWrapper = serde_json::from_value(serde_json::json!({
            "type": "Sequence",
            "pretokenizers": [
                {"type": "WhitespaceSplit"},
                {"type": "Metaspace", "replacement": "\u{2581}", "prepend_scheme": "always", "split": true}
            ]
        }))
        .map_err(|e| Error::config(&path, format!("pre-tokenizer: {e}")))?;
        inner.with_pre_tokenizer(Some(pre));
        let id = |token: &str| {
            inner
                .token_to_id(token)
                .ok_or_else(|| Error::config(&path, format!("the vocabulary has no {token} token")))
        };
        Ok(Self {
            pad_id: id("<pad>")?,
            eos_id: id("</s>")?,
            inner,
            path,
        })
    }

    pub fn pad_id(&self) -> u32 {
        self.pad_id
    }

    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// Ids as `tokenizer(text, padding="max_length", max_length=n, truncation=True)` gives
    /// them: the text's tokens cut to `n - 1`, then `</s>`, then `<pad>` up to `n`; and how
    /// many tokens were cut.
    pub fn encode_padded(&self, text: &str, max_length: usize) -> Result<(Vec<u32>, usize)> {
        if max_length < 2 {
            return Err(Error::invalid(
                "max_sequence_length",
                format!("must be at least 2, got {max_length}"),
            ));
        }
        let enc = self
            .inner
            .encode(text, false)
            .map_err(|e| Error::config(&self.path, format!("cannot tokenize: {e}")))?;
        let mut ids = enc.get_ids().to_vec();
        let keep = max_length - 1;
        let dropped = ids.len().saturating_sub(keep);
        ids.truncate(keep);
        ids.push(self.eos_id);
        ids.resize(max_length, self.pad_id);
        Ok((ids, dropped))
    }
}

/// Reads a protobuf varint.
fn varint(b: &[u8], pos: &mut usize) -> Option<u64> {
    let mut v = 0u64;
    for shift in (0..64).step_by(7) {
        let byte = *b.get(*pos)?;
        *pos += 1;
        v |= u64::from(byte & 0x7f) << shift;
        if byte & 0x80 == 0 {
            return Some(v);
        }
    }
    None
}

/// The fields of a protobuf message: (field number, wire type, value bytes or varint).
fn fields(b: &[u8]) -> Option<Vec<(u64, &[u8], u64)>> {
    let mut out = Vec::new();
    let mut pos = 0;
    while pos < b.len() {
        let key = varint(b, &mut pos)?;
        let (field, wire) = (key >> 3, key & 7);
        match wire {
            0 => out.push((field, &b[0..0], varint(b, &mut pos)?)),
            1 => {
                let v = b.get(pos..pos + 8)?;
                pos += 8;
                out.push((field, v, 0));
            }
            2 => {
                let n = usize::try_from(varint(b, &mut pos)?).ok()?;
                let v = b.get(pos..pos.checked_add(n)?)?;
                pos += n;
                out.push((field, v, 0));
            }
            5 => {
                let v = b.get(pos..pos + 4)?;
                pos += 4;
                out.push((field, v, 0));
            }
            _ => return None,
        }
    }
    Some(out)
}

/// Builds the tokenizer from a SentencePiece `ModelProto`: pieces (1: piece, 2: score),
/// trainer spec (40: unk_id), normaliser spec (2: precompiled charsmap).
fn from_sentencepiece(
    dir: &Path,
    path: &Path,
) -> Result<(tokenizers::Tokenizer, Option<serde_json::Value>)> {
    use base64::Engine as _;
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    let bad = || Error::config(path, "not a SentencePiece model (bad protobuf)");
    let mut vocab: Vec<(String, f32)> = Vec::new();
    let mut unk_id = 2u64;
    let mut charsmap: Option<&[u8]> = None;
    for (field, value, v) in fields(&bytes).ok_or_else(bad)? {
        match field {
            1 => {
                let mut piece = String::new();
                let mut score = 0f32;
                for (f, val, _) in fields(value).ok_or_else(bad)? {
                    match f {
                        1 => piece = String::from_utf8(val.to_vec()).map_err(|_| bad())?,
                        2 if val.len() == 4 => {
                            score = f32::from_le_bytes([val[0], val[1], val[2], val[3]])
                        }
                        _ => {}
                    }
                }
                vocab.push((piece, score));
            }
            2 => {
                for (f, _, val) in fields(value).ok_or_else(bad)? {
                    if f == 40 {
                        unk_id = val;
                    }
                }
            }
            3 => {
                for (f, val, _) in fields(value).ok_or_else(bad)? {
                    if f == 2 && !val.is_empty() {
                        charsmap = Some(val);
                    }
                }
            }
            _ => {
                let _ = v;
            }
        }
    }
    if vocab.is_empty() {
        return Err(bad());
    }
    // Sentinel tokens, as transformers appends them: <extra_id_{n-1}> ... <extra_id_0>.
    let config = std::fs::read_to_string(dir.join("tokenizer_config.json"))
        .ok()
        .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok());
    let extra = config
        .as_ref()
        .and_then(|c| c["extra_ids"].as_u64())
        .unwrap_or(100);
    if extra > 10_000 {
        return Err(Error::config(
            dir.join("tokenizer_config.json"),
            format!("extra_ids = {extra} is not plausible (at most 10000)"),
        ));
    }
    let extra = extra as usize;
    for i in (0..extra).rev() {
        vocab.push((format!("<extra_id_{i}>"), 0.0));
    }
    let index = |t: &str| vocab.iter().position(|(p, _)| p == t);
    let eos = index("</s>").ok_or_else(|| Error::config(path, "the model has no </s> piece"))?;
    let mut specials: Vec<String> = vec!["<pad>".into(), "</s>".into(), "<unk>".into()];
    specials.extend((0..extra).map(|i| format!("<extra_id_{i}>")));
    let added: Vec<serde_json::Value> = specials
        .iter()
        .filter_map(|t| {
            index(t).map(|id| {
                serde_json::json!({"id": id, "content": t, "single_word": false, "lstrip": false,
                    "rstrip": false, "normalized": false, "special": true})
            })
        })
        .collect();
    let json = serde_json::json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": null,
        "pre_tokenizer": null,
        "post_processor": {
            "type": "TemplateProcessing",
            "single": [{"Sequence": {"id": "A", "type_id": 0}}, {"SpecialToken": {"id": "</s>", "type_id": 0}}],
            "pair": [{"Sequence": {"id": "A", "type_id": 0}}, {"SpecialToken": {"id": "</s>", "type_id": 0}},
                     {"Sequence": {"id": "B", "type_id": 0}}, {"SpecialToken": {"id": "</s>", "type_id": 0}}],
            "special_tokens": {"</s>": {"id": "</s>", "ids": [eos], "tokens": ["</s>"]}}
        },
        "decoder": null,
        "model": {
            "type": "Unigram",
            "unk_id": unk_id,
            "vocab": vocab.iter().map(|(p, s)| serde_json::json!([p, s])).collect::<Vec<_>>(),
            "byte_fallback": false
        }
    });
    let inner: tokenizers::Tokenizer = json
        .to_string()
        .parse()
        .map_err(|e| Error::config(path, format!("cannot build the tokenizer: {e}")))?;
    let normalizer = charsmap.map(|c| {
        serde_json::json!({
            "type": "Precompiled",
            "precompiled_charsmap": base64::engine::general_purpose::STANDARD.encode(c)
        })
    });
    Ok((inner, normalizer))
}
