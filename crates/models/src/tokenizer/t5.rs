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
    /// Loads `dir/tokenizer.json` (a folder with only `spiece.model` is refused).
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let path = dir.join("tokenizer.json");
        if !path.is_file() {
            let hint = if dir.join("spiece.model").is_file() {
                " (only spiece.model is there: convert it with transformers' T5TokenizerFast and save_pretrained)"
            } else {
                ""
            };
            return Err(Error::config(dir, format!("no tokenizer.json{hint}")));
        }
        let mut inner = tokenizers::Tokenizer::from_file(&path)
            .map_err(|e| Error::config(&path, format!("cannot load the tokenizer: {e}")))?;
        let text = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
        let json: serde_json::Value = serde_json::from_str(&text)
            .map_err(|e| Error::config(&path, format!("not JSON: {e}")))?;
        let norm = &json["normalizer"];
        let precompiled = if norm["type"] == "Precompiled" {
            Some(norm.clone())
        } else {
            norm["normalizers"]
                .as_array()
                .and_then(|list| list.iter().find(|n| n["type"] == "Precompiled").cloned())
        };
        let normalizer = match precompiled {
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
