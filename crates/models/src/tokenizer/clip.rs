//! The CLIP BPE tokenizer.
//!
//! Produces the ids of transformers' `CLIPTokenizer.from_pretrained(<SD tokenizer folder>)`
//! (transformers 5, backed by the `tokenizers` library), which is what diffusers feeds to the
//! text encoder. The pipeline, in order:
//!
//! 1. Added tokens (the special tokens, and any other entry of `added_tokens_decoder`) whose
//!    `normalized` flag is false are cut out of the raw text (leftmost-longest match).
//! 2. Every other piece is normalized: NFC, each run of whitespace replaced by one space, then
//!    each character lower-cased on its own (no final-sigma rule).
//! 3. Added tokens whose `normalized` flag is true are cut out of the normalized pieces.
//! 4. The remaining text is split with CLIP's pattern (special-token strings, `'s 't 're 've 'm
//!    'll 'd`, runs of letters, single digits, runs of anything else but whitespace; whitespace
//!    is dropped), each piece again with GPT-2's byte-level pattern, and every piece is turned
//!    into bytes, one BPE symbol per byte, the last one carrying the `</w>` suffix.
//! 5. BPE: the adjacent pair with the lowest merge rank is merged (the leftmost one on ties)
//!    until no pair has a merge.
//!
//! `<|startoftext|>` and `<|endoftext|>` frame the ids; `encode_padded` truncates the text's
//! ids to `max_length - 2` and pads on the right with the pad token.
//!
//! Which special tokens are matched before or after normalization depends on the config files
//! exactly as in transformers: with an `added_tokens_decoder` in `tokenizer_config.json` its
//! flags rule (and `special_tokens_map.json` is ignored); otherwise `special_tokens_map.json`
//! overrides the `tokenizer_config.json` values, and for each token text the last of
//! bos/eos/unk/sep/pad/cls/mask naming it decides (a plain string means "not normalized", a
//! dict its `normalized` field, false when absent). In the SD 2.x layout the pad token `!` is
//! therefore a special token: every `!` in a prompt becomes id 0, as in diffusers.
//!
//! Why one long file: the steps above are one algorithm that must match transformers' output
//! token for token, and they share the vocabulary, merges and added-token tables; its tests are
//! at the end.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::path::{Path, PathBuf};

use regex::Regex;
use serde_json::{Map, Value};
// The NFC of the `tokenizers` library itself (Unicode 9 tables): newer crates reorder combining
// marks assigned since then, which would change ids.
use unicode_normalization_alignments::UnicodeNormalization;

use crate::{Error, Result};

const DEFAULT_MAX_LENGTH: usize = 77;
/// `model_max_length` values above this (transformers writes 1e30 for "unset") fall back to 77.
const MAX_SANE_MAX_LENGTH: u64 = 1 << 20;
const END_OF_WORD: &str = "</w>";
const BOS_DEFAULT: &str = "<|startoftext|>";
const EOS_DEFAULT: &str = "<|endoftext|>";

/// CLIP's pre-tokenization pattern (what transformers' `CLIPTokenizer` installs as a `Split`
/// pre-tokenizer, keeping the matches and dropping the rest).
const CLIP_PATTERN: &str =
    r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|\p{L}+|\p{N}|[^\s\p{L}\p{N}]+";
/// GPT-2's byte-level pattern, applied to each CLIP piece. CLIP pieces hold no whitespace, so
/// the optional leading space and the whitespace alternatives of the original pattern never
/// match and are left out (they need a look-ahead the `regex` crate lacks).
const BYTE_LEVEL_PATTERN: &str = r"'s|'t|'re|'ve|'m|'ll|'d|\p{L}+|\p{N}+|[^\s\p{L}\p{N}]+";

/// A token matched in the text before BPE (a special token or another added token).
#[derive(Debug, Clone)]
struct AddedToken {
    /// The text matched: the token's content, normalized when `normalized` is set.
    pattern: String,
    id: u32,
    single_word: bool,
    lstrip: bool,
    rstrip: bool,
}

/// A piece of text left after cutting out added tokens, or an added token's id.
enum Segment<'a> {
    Text(&'a str),
    Token(u32),
}

/// The CLIP byte-level BPE tokenizer of Stable Diffusion's `tokenizer/` folder.
#[derive(Debug, Clone)]
pub struct ClipTokenizer {
    vocab: HashMap<String, u32>,
    /// (left id, right id) -> (rank, merged id).
    merges: HashMap<(u32, u32), (u32, u32)>,
    /// Id of each byte's character, without and with the end-of-word suffix.
    byte_ids: [Option<u32>; 256],
    byte_eow_ids: [Option<u32>; 256],
    unk_id: Option<u32>,
    bos_id: u32,
    eos_id: u32,
    pad_id: u32,
    max_length: usize,
    vocab_size: usize,
    /// Added tokens matched in the raw text, and in the normalized text.
    raw_tokens: Vec<AddedToken>,
    normalized_tokens: Vec<AddedToken>,
    clip_re: Regex,
    byte_level_re: Regex,
    word_start_re: Regex,
    word_end_re: Regex,
}

/// A special or added token as the config files describe it.
#[derive(Debug, Clone, PartialEq)]
struct TokenSpec {
    content: String,
    normalized: bool,
    lstrip: bool,
    rstrip: bool,
    single_word: bool,
}

impl ClipTokenizer {
    /// Reads vocab.json + merges.txt (+ tokenizer_config.json / special_tokens_map.json for
    /// pad/bos/eos/unk tokens and model_max_length, default 77) from an SD `tokenizer/` folder.
    /// Clear errors naming the file for missing/malformed files.
    ///
    /// A folder with only `tokenizer.json` (what current transformers' `save_pretrained`
    /// writes) is read from it: the BPE vocabulary and merges of its `model`, and its
    /// `added_tokens` with their flags when `tokenizer_config.json` has no
    /// `added_tokens_decoder`, as the `tokenizers` backend of transformers loads it.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let mut vocab_path = dir.join("vocab.json");
        let merges_path = dir.join("merges.txt");
        let json_path = dir.join("tokenizer.json");
        let (vocab, merges, json_added) =
            if !(vocab_path.exists() && merges_path.exists()) && json_path.is_file() {
                let (vocab, merges, added) = read_tokenizer_json(&json_path)?;
                vocab_path = json_path;
                (vocab, merges, Some(added))
            } else {
                let vocab = read_vocab(&vocab_path)?;
                let merges = read_merges(&merges_path, &vocab)?;
                (vocab, merges, None)
            };
        let config_path = dir.join("tokenizer_config.json");
        let map_path = dir.join("special_tokens_map.json");
        Self::build(TokenizerFiles {
            vocab,
            merges,
            json_added,
            config: read_optional_json_object(&config_path)?.unwrap_or_default(),
            special_map: read_optional_json_object(&map_path)?,
            vocab_path,
            config_path,
            map_path,
        })
    }

    /// The CLIP tokenizer of the SD releases from the vocabulary built into the binary (OpenAI
    /// CLIP's BPE, MIT licensed): for single-file checkpoints that come with no tokenizer.
    /// `pad`: the SD 1.x layout pads with `<|endoftext|>`, the OpenCLIP layout (SD 2.x, SDXL's
    /// second encoder) with `!`, a special token there as in the published folders.
    pub fn builtin(pad: BuiltinPad) -> Result<Self> {
        let label = PathBuf::from(BUILTIN_LABEL);
        let merges_text = builtin_merges_text()?;
        let pairs = merges_text
            .lines()
            .filter(|l| !l.starts_with("#version"))
            .filter_map(|l| l.split_once(' '))
            .map(|(a, b)| (a.to_string(), b.to_string()))
            .collect::<Vec<_>>();
        let vocab = clip_vocab(&pairs);
        let mut merges = MergeTable::new();
        for (rank, (a, b)) in pairs.iter().enumerate() {
            let id = |t: &str| {
                vocab.get(t).copied().ok_or_else(|| {
                    Error::config(&label, format!("token {t:?} not in the vocabulary"))
                })
            };
            merges.insert((id(a)?, id(b)?), (rank as u32, id(&format!("{a}{b}"))?));
        }
        let (config, map) = match pad {
            BuiltinPad::EndOfText => (BUILTIN_SD1_CONFIG, BUILTIN_SD1_MAP),
            BuiltinPad::Exclamation => (BUILTIN_SD2_CONFIG, BUILTIN_SD2_MAP),
        };
        let parse = |text: &str| -> Result<Map<String, Value>> {
            serde_json::from_str(text).map_err(|e| Error::config(&label, e.to_string()))
        };
        Self::build(TokenizerFiles {
            vocab,
            merges,
            json_added: None,
            config: parse(config)?,
            special_map: Some(parse(map)?),
            vocab_path: label.clone(),
            config_path: label.clone(),
            map_path: label,
        })
    }

    fn build(files: TokenizerFiles) -> Result<Self> {
        let TokenizerFiles {
            vocab,
            merges,
            json_added,
            config,
            special_map,
            vocab_path,
            config_path,
            map_path,
        } = files;

        let max_length = match config.get("model_max_length") {
            None | Some(Value::Null) => DEFAULT_MAX_LENGTH,
            Some(Value::Number(n)) => match n.as_u64() {
                Some(v) if v <= MAX_SANE_MAX_LENGTH => v as usize,
                Some(_) => DEFAULT_MAX_LENGTH,
                // floats: 1e30 means "no limit" in transformers
                None if n.as_f64().is_some_and(|f| f >= MAX_SANE_MAX_LENGTH as f64) => {
                    DEFAULT_MAX_LENGTH
                }
                None => {
                    return Err(Error::config(
                        &config_path,
                        format!("model_max_length must be a positive integer, got {n}"),
                    ))
                }
            },
            Some(other) => {
                return Err(Error::config(
                    &config_path,
                    format!("model_max_length must be a positive integer, got {other}"),
                ))
            }
        };
        if max_length < 2 {
            return Err(Error::config(
                &config_path,
                format!(
                    "model_max_length {max_length} leaves no room for the start and end tokens"
                ),
            ));
        }

        // The tokens of `added_tokens_decoder` (modern layout), by id.
        let mut decoder: Vec<(u32, TokenSpec)> = Vec::new();
        let modern = match config.get("added_tokens_decoder") {
            None | Some(Value::Null) => match json_added {
                Some(added) => {
                    decoder = added;
                    true
                }
                None => false,
            },
            Some(Value::Object(entries)) => {
                for (key, value) in entries {
                    let id: u32 = key.parse().map_err(|_| {
                        Error::config(
                            &config_path,
                            format!("added_tokens_decoder: key {key:?} is not a token id"),
                        )
                    })?;
                    let spec = parse_token_spec(value, false).map_err(|msg| {
                        Error::config(&config_path, format!("added_tokens_decoder[{key}]: {msg}"))
                    })?;
                    decoder.push((id, spec));
                }
                decoder.sort_by_key(|(id, _)| *id);
                true
            }
            Some(_) => {
                return Err(Error::config(
                    &config_path,
                    "added_tokens_decoder must be an object",
                ))
            }
        };

        // The named special tokens: tokenizer_config.json, overridden by special_tokens_map.json
        // in the legacy layout only (as transformers does).
        const NAMES: [&str; 7] = [
            "bos_token",
            "eos_token",
            "unk_token",
            "sep_token",
            "pad_token",
            "cls_token",
            "mask_token",
        ];
        // name -> (token, the file that gave it)
        let mut named: HashMap<&str, (TokenSpec, &Path)> = HashMap::new();
        for name in NAMES {
            if let Some(value) = config.get(name) {
                if let Some(spec) = parse_named(value, name, &config_path)? {
                    named.insert(name, (spec, &config_path));
                }
            }
        }
        if !modern {
            if let Some(map) = special_map {
                for name in NAMES {
                    if let Some(value) = map.get(name) {
                        match parse_named(value, name, &map_path)? {
                            Some(spec) => named.insert(name, (spec, &map_path)),
                            None => named.remove(name),
                        };
                    }
                }
            }
        }
        // CLIPTokenizer's defaults.
        for (name, content) in [
            ("bos_token", BOS_DEFAULT),
            ("eos_token", EOS_DEFAULT),
            ("unk_token", EOS_DEFAULT),
            ("pad_token", EOS_DEFAULT),
        ] {
            named
                .entry(name)
                .or_insert_with(|| (TokenSpec::plain(content), &vocab_path));
        }
        // A named token that `added_tokens_decoder` lists takes the decoder's flags.
        for (spec, _) in named.values_mut() {
            if let Some((_, d)) = decoder.iter().find(|(_, d)| d.content == spec.content) {
                *spec = d.clone();
            }
        }

        // The added tokens in the order transformers adds them; for one text, the last wins.
        let mut added: Vec<(u32, TokenSpec)> = Vec::new();
        let mut push = |id: u32, spec: TokenSpec| {
            if let Some(slot) = added.iter_mut().find(|(_, s)| s.content == spec.content) {
                *slot = (id, spec);
            } else {
                added.push((id, spec));
            }
        };
        for (id, spec) in &decoder {
            // An entry whose text is in the vocabulary takes the vocabulary's id.
            let id = vocab.get(&spec.content).copied().unwrap_or(*id);
            push(id, spec.clone());
        }
        let token_id = |name: &str, (spec, path): &(TokenSpec, &Path)| -> Result<u32> {
            vocab
                .get(&spec.content)
                .copied()
                .or_else(|| {
                    decoder
                        .iter()
                        .find(|(_, d)| d.content == spec.content)
                        .map(|(id, _)| *id)
                })
                .ok_or_else(|| {
                    Error::config(
                        path,
                        format!(
                            "{name} {:?} is not in {}",
                            spec.content,
                            vocab_path.display()
                        ),
                    )
                })
        };
        for name in NAMES {
            if let Some(entry) = named.get(name) {
                if decoder.iter().any(|(_, d)| d.content == entry.0.content) {
                    continue;
                }
                let id = token_id(name, entry)?;
                push(id, entry.0.clone());
            }
        }
        let named_id = |name: &str| -> Result<u32> {
            let entry = named
                .get(name)
                .ok_or_else(|| Error::config(&config_path, format!("no {name}")))?;
            token_id(name, entry)
        };
        let bos_id = named_id("bos_token")?;
        let eos_id = named_id("eos_token")?;
        let pad_id = named_id("pad_token")?;
        let unk_id = named_id("unk_token").ok();

        let mut raw_tokens = Vec::new();
        let mut normalized_tokens = Vec::new();
        for (id, spec) in &added {
            if spec.content.is_empty() {
                continue;
            }
            let token = AddedToken {
                pattern: if spec.normalized {
                    normalize(&spec.content)
                } else {
                    spec.content.clone()
                },
                id: *id,
                single_word: spec.single_word,
                lstrip: spec.lstrip,
                rstrip: spec.rstrip,
            };
            if token.pattern.is_empty() {
                continue;
            }
            if spec.normalized {
                normalized_tokens.push(token);
            } else {
                raw_tokens.push(token);
            }
        }

        let mut byte_ids = [None; 256];
        let mut byte_eow_ids = [None; 256];
        for (b, c) in byte_chars().iter().enumerate() {
            let s = c.to_string();
            byte_ids[b] = vocab.get(&s).copied();
            byte_eow_ids[b] = vocab.get(&format!("{s}{END_OF_WORD}")).copied();
        }

        let vocab_size = vocab
            .values()
            .chain(added.iter().map(|(id, _)| id))
            .max()
            .map_or(0, |&m| m as usize + 1);

        Ok(Self {
            vocab,
            merges,
            byte_ids,
            byte_eow_ids,
            unk_id,
            bos_id,
            eos_id,
            pad_id,
            max_length,
            vocab_size,
            raw_tokens,
            normalized_tokens,
            clip_re: compile(CLIP_PATTERN)?,
            byte_level_re: compile(BYTE_LEVEL_PATTERN)?,
            word_start_re: compile(r"^\w")?,
            word_end_re: compile(r"\w$")?,
        })
    }

    /// The ids of `text` alone: no BOS, no EOS, untruncated.
    pub fn tokens(&self, text: &str) -> Vec<u32> {
        let mut ids = Vec::new();
        self.tokenize_into(text, &mut ids);
        ids
    }

    /// ids with BOS and EOS, untruncated.
    pub fn encode(&self, text: &str) -> Vec<u32> {
        let mut ids = vec![self.bos_id];
        self.tokenize_into(text, &mut ids);
        ids.push(self.eos_id);
        ids
    }

    /// Exactly transformers' `tokenizer(text, padding="max_length", max_length=self.max_length(),
    /// truncation=True).input_ids`; also returns the untruncated token count (without specials)
    /// so callers can warn about truncation.
    pub fn encode_padded(&self, text: &str) -> (Vec<u32>, usize) {
        let mut tokens = Vec::new();
        self.tokenize_into(text, &mut tokens);
        let count = tokens.len();
        tokens.truncate(self.max_length - 2);
        let mut ids = Vec::with_capacity(self.max_length);
        ids.push(self.bos_id);
        ids.extend_from_slice(&tokens);
        ids.push(self.eos_id);
        ids.resize(self.max_length, self.pad_id);
        (ids, count)
    }

    /// The padded length (`model_max_length`, 77 for Stable Diffusion).
    pub fn max_length(&self) -> usize {
        self.max_length
    }

    pub fn pad_id(&self) -> u32 {
        self.pad_id
    }

    pub fn bos_id(&self) -> u32 {
        self.bos_id
    }

    pub fn eos_id(&self) -> u32 {
        self.eos_id
    }

    /// `len(tokenizer)`: one more than the largest id (49408 for CLIP).
    pub fn vocab_size(&self) -> usize {
        self.vocab_size
    }

    /// The id of a vocabulary entry (e.g. `"cat</w>"`).
    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.vocab.get(token).copied()
    }

    /// The ids of `text` without the start and end tokens.
    fn tokenize_into(&self, text: &str, out: &mut Vec<u32>) {
        for segment in self.split_added(text, &self.raw_tokens) {
            match segment {
                Segment::Token(id) => out.push(id),
                Segment::Text(raw) => {
                    let normalized = normalize(raw);
                    for segment in self.split_added(&normalized, &self.normalized_tokens) {
                        match segment {
                            Segment::Token(id) => out.push(id),
                            Segment::Text(text) => self.tokenize_normalized(text, out),
                        }
                    }
                }
            }
        }
    }

    /// Pre-tokenization and BPE of normalized text holding no added token.
    fn tokenize_normalized(&self, text: &str, out: &mut Vec<u32>) {
        for piece in self.clip_re.find_iter(text) {
            for word in self.byte_level_re.find_iter(piece.as_str()) {
                self.bpe(word.as_str().as_bytes(), out);
            }
        }
    }

    /// Byte-level BPE of one word; the last byte carries the end-of-word suffix.
    ///
    /// Repeatedly merges the adjacent pair of lowest rank, the leftmost one among equals. A
    /// heap of candidate pairs keeps this O(n log n) in the word length (prompts are user
    /// input: one 100 kB "word" must not take quadratic time).
    fn bpe(&self, word: &[u8], out: &mut Vec<u32>) {
        const NONE: usize = usize::MAX;
        let last = word.len().saturating_sub(1);
        let mut ids: Vec<u32> = Vec::with_capacity(word.len());
        for (i, &b) in word.iter().enumerate() {
            let id = if i == last {
                self.byte_eow_ids[b as usize]
            } else {
                self.byte_ids[b as usize]
            };
            // A byte outside the vocabulary becomes the unknown token (never with CLIP's own
            // vocabularies, which hold all 512 byte symbols); without one it is dropped.
            if let Some(id) = id.or(self.unk_id) {
                ids.push(id);
            }
        }
        if ids.len() < 2 {
            out.extend_from_slice(&ids);
            return;
        }
        // Doubly linked list over `ids`; a merged-away symbol is marked dead.
        let n = ids.len();
        let mut next: Vec<usize> = (1..=n).map(|i| if i == n { NONE } else { i }).collect();
        let mut prev: Vec<usize> = (0..n).map(|i| i.wrapping_sub(1)).collect();
        prev[0] = NONE;
        let mut alive = vec![true; n];
        // Min-heap on (rank, position of the left symbol), with the merged id.
        let mut heap: BinaryHeap<Reverse<(u32, usize, u32)>> = BinaryHeap::new();
        for i in 0..n - 1 {
            if let Some(&(rank, merged)) = self.merges.get(&(ids[i], ids[i + 1])) {
                heap.push(Reverse((rank, i, merged)));
            }
        }
        while let Some(Reverse((_, pos, merged))) = heap.pop() {
            let right = next[pos];
            if !alive[pos] || right == NONE {
                continue;
            }
            // Skip stale entries: the pair at `pos` must still produce `merged`.
            match self.merges.get(&(ids[pos], ids[right])) {
                Some(&(_, m)) if m == merged => {}
                _ => continue,
            }
            ids[pos] = merged;
            alive[right] = false;
            next[pos] = next[right];
            if next[pos] != NONE {
                prev[next[pos]] = pos;
            }
            if prev[pos] != NONE {
                let p = prev[pos];
                if let Some(&(rank, m)) = self.merges.get(&(ids[p], ids[pos])) {
                    heap.push(Reverse((rank, p, m)));
                }
            }
            if next[pos] != NONE {
                if let Some(&(rank, m)) = self.merges.get(&(ids[pos], ids[next[pos]])) {
                    heap.push(Reverse((rank, pos, m)));
                }
            }
        }
        let mut i = 0;
        while i != NONE {
            out.push(ids[i]);
            i = next[i];
        }
    }

    /// Cuts the added tokens out of `text`: leftmost-longest, non-overlapping matches (as the
    /// `tokenizers` library's Aho-Corasick matcher), honouring `single_word`, `lstrip` and
    /// `rstrip`.
    fn split_added<'a>(&self, text: &'a str, tokens: &[AddedToken]) -> Vec<Segment<'a>> {
        let mut segments = Vec::new();
        if tokens.is_empty() {
            segments.push(Segment::Text(text));
            return segments;
        }
        let bytes = text.as_bytes();
        let mut done = 0; // end of the last emitted segment
        let mut pos = 0; // where the next match search starts
        while pos < bytes.len() {
            let found = tokens
                .iter()
                .filter(|t| bytes[pos..].starts_with(t.pattern.as_bytes()))
                .max_by_key(|t| t.pattern.len());
            let Some(token) = found else {
                pos += 1;
                continue;
            };
            let mut start = pos;
            let mut stop = pos + token.pattern.len();
            pos = stop;
            if token.single_word {
                let free_before = start == 0 || !self.word_end_re.is_match(&text[..start]);
                let free_after = stop == text.len() || !self.word_start_re.is_match(&text[stop..]);
                if !(free_before && free_after) {
                    continue;
                }
            }
            if token.lstrip {
                let trimmed = text[..start].trim_end_matches(char::is_whitespace).len();
                start = trimmed.max(done);
            }
            if token.rstrip {
                let rest = &text[stop..];
                stop += rest.len() - rest.trim_start_matches(char::is_whitespace).len();
                pos = stop;
            }
            if done < start {
                segments.push(Segment::Text(&text[done..start]));
            }
            segments.push(Segment::Token(token.id));
            done = stop;
        }
        if done < text.len() {
            segments.push(Segment::Text(&text[done..]));
        }
        segments
    }
}

impl TokenSpec {
    /// A token given as a plain string: special, so not normalized.
    fn plain(content: &str) -> Self {
        Self {
            content: content.to_owned(),
            normalized: false,
            lstrip: false,
            rstrip: false,
            single_word: false,
        }
    }
}

/// NFC, whitespace runs to one space, per-character lower-casing (the normalizer of
/// transformers' `CLIPTokenizer`).
fn normalize(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut in_space = false;
    for (c, _) in text.nfc() {
        if c.is_whitespace() {
            if !in_space {
                out.push(' ');
            }
            in_space = true;
        } else {
            in_space = false;
            out.extend(c.to_lowercase());
        }
    }
    out
}

/// GPT-2's byte-to-character table: printable Latin-1 bytes map to themselves, the others to
/// U+0100 upwards in byte order.
fn byte_chars() -> [char; 256] {
    let printable = |b: u8| matches!(b, b'!'..=b'~' | 0xA1..=0xAC | 0xAE..=0xFF);
    let mut chars = ['\0'; 256];
    let mut next = 256u32;
    for b in 0..=255u8 {
        chars[b as usize] = if printable(b) {
            char::from(b)
        } else {
            let c = char::from_u32(next).unwrap_or('\0');
            next += 1;
            c
        };
    }
    chars
}

/// The patterns are constants of this file: an error here is a bug, caught by every test.
fn compile(pattern: &str) -> Result<Regex> {
    Regex::new(pattern).map_err(|e| Error::invalid("tokenizer pattern", e.to_string()))
}

fn read_text(path: &Path) -> Result<String> {
    std::fs::read_to_string(path).map_err(|e| Error::io(path, e))
}

fn read_vocab(path: &Path) -> Result<HashMap<String, u32>> {
    let text = read_text(path)?;
    serde_json::from_str(&text)
        .map_err(|e| Error::config(path, format!("expected a JSON object of token -> id: {e}")))
}

/// merges.txt as the `tokenizers` library reads it: lines starting with `#version` are skipped,
/// every other line is two tokens separated by one space; a later duplicate wins.
fn read_merges(
    path: &Path,
    vocab: &HashMap<String, u32>,
) -> Result<HashMap<(u32, u32), (u32, u32)>> {
    let text = read_text(path)?;
    let mut merges = HashMap::new();
    let mut rank = 0u32;
    for (n, line) in text.lines().enumerate() {
        if line.starts_with("#version") {
            continue;
        }
        let bad = |msg: String| Error::config(path, format!("line {}: {msg}", n + 1));
        let mut parts = line.split(' ');
        let (Some(a), Some(b), None) = (parts.next(), parts.next(), parts.next()) else {
            return Err(bad(format!(
                "expected two tokens separated by a space, got {line:?}"
            )));
        };
        let id = |t: &str| {
            vocab
                .get(t)
                .copied()
                .ok_or_else(|| bad(format!("token {t:?} is not in vocab.json")))
        };
        let merged = id(&format!("{a}{b}"))?;
        merges.insert((id(a)?, id(b)?), (rank, merged));
        rank += 1;
    }
    Ok(merges)
}

/// What a tokenizer is built from, read from a folder or built in.
struct TokenizerFiles {
    vocab: HashMap<String, u32>,
    merges: MergeTable,
    /// `tokenizer.json`'s added tokens, when the vocabulary came from it.
    json_added: Option<Vec<(u32, TokenSpec)>>,
    config: Map<String, Value>,
    special_map: Option<Map<String, Value>>,
    /// Where each part came from (for error messages).
    vocab_path: PathBuf,
    config_path: PathBuf,
    map_path: PathBuf,
}

/// The pad token of the built-in tokenizer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BuiltinPad {
    /// `<|endoftext|>`: SD 1.x, SDXL's first encoder.
    EndOfText,
    /// `!`: OpenCLIP (SD 2.x, SDXL's second encoder).
    Exclamation,
}

/// How the built-in vocabulary is named in messages and `inspect`.
pub const BUILTIN_LABEL: &str = "<built-in CLIP BPE vocabulary>";

/// OpenAI CLIP's 48894 BPE merges (`bpe_simple_vocab_16e6.txt.gz`, MIT licensed) in the
/// layout of the published `merges.txt`, gzip-compressed.
const BUILTIN_MERGES_GZ: &[u8] = include_bytes!("../../assets/clip-merges.txt.gz");
/// The tokenizer config files of the SD 1.x (`openai/clip-vit-large-patch14`) and SD 2.x
/// (`stabilityai/stable-diffusion-2-1`) tokenizer folders.
const BUILTIN_SD1_CONFIG: &str = include_str!("../../assets/clip-sd1/tokenizer_config.json");
const BUILTIN_SD1_MAP: &str = include_str!("../../assets/clip-sd1/special_tokens_map.json");
const BUILTIN_SD2_CONFIG: &str = include_str!("../../assets/clip-sd2/tokenizer_config.json");
const BUILTIN_SD2_MAP: &str = include_str!("../../assets/clip-sd2/special_tokens_map.json");

fn builtin_merges_text() -> Result<String> {
    use std::io::Read;
    let mut text = String::new();
    flate2::read::GzDecoder::new(BUILTIN_MERGES_GZ)
        .read_to_string(&mut text)
        .map_err(|e| Error::config(BUILTIN_LABEL, format!("corrupt built-in merges: {e}")))?;
    Ok(text)
}

/// CLIP's vocabulary from its merges, in OpenAI's order: the 256 byte symbols (in
/// `bytes_to_unicode`'s order: the printable bytes, then the others, which is code point
/// order), the same with `</w>`, one token per merge, then `<|startoftext|>` and
/// `<|endoftext|>`.
fn clip_vocab(merges: &[(String, String)]) -> HashMap<String, u32> {
    let mut chars = byte_chars();
    chars.sort_unstable();
    let bytes: Vec<String> = chars.iter().map(|c| c.to_string()).collect();
    let words = bytes.iter().map(|b| format!("{b}{END_OF_WORD}"));
    let merged = merges.iter().map(|(a, b)| format!("{a}{b}"));
    let specials = [BOS_DEFAULT.to_string(), EOS_DEFAULT.to_string()];
    bytes
        .iter()
        .cloned()
        .chain(words)
        .chain(merged)
        .chain(specials)
        .enumerate()
        .map(|(i, t)| (t, i as u32))
        .collect()
}

/// The parts of `tokenizer.json` a CLIP tokenizer needs.
#[derive(serde::Deserialize)]
struct TokenizerJson {
    model: BpeJson,
    #[serde(default)]
    added_tokens: Vec<Value>,
}

#[derive(serde::Deserialize)]
struct BpeJson {
    #[serde(rename = "type")]
    kind: Option<String>,
    vocab: HashMap<String, u32>,
    merges: Vec<MergeJson>,
    end_of_word_suffix: Option<String>,
}

/// A merge as `tokenizers` writes it: `"a b"` (older files) or `["a", "b"]`.
#[derive(serde::Deserialize)]
#[serde(untagged)]
enum MergeJson {
    Pair([String; 2]),
    Line(String),
}

type MergeTable = HashMap<(u32, u32), (u32, u32)>;
/// Vocabulary, merges and added tokens by id.
type BpeParts = (HashMap<String, u32>, MergeTable, Vec<(u32, TokenSpec)>);

/// The vocabulary, merges and added tokens (by id) of a `tokenizer.json`.
fn read_tokenizer_json(path: &Path) -> Result<BpeParts> {
    let text = read_text(path)?;
    let json: TokenizerJson = serde_json::from_str(&text)
        .map_err(|e| Error::config(path, format!("not a BPE tokenizer.json: {e}")))?;
    let model = json.model;
    if model.kind.as_deref().is_some_and(|k| k != "BPE")
        || model.end_of_word_suffix.as_deref() != Some("</w>")
    {
        return Err(Error::config(
            path,
            "expected a CLIP BPE model (type BPE, end_of_word_suffix \"</w>\")",
        ));
    }
    let pairs = model.merges.into_iter().map(|m| match m {
        MergeJson::Pair([a, b]) => Some((a, b)),
        MergeJson::Line(line) => {
            let mut parts = line.split(' ');
            match (parts.next(), parts.next(), parts.next()) {
                (Some(a), Some(b), None) => Some((a.to_string(), b.to_string())),
                _ => None,
            }
        }
    });
    let mut merges = HashMap::new();
    for (rank, pair) in pairs.enumerate() {
        let bad = |msg: String| Error::config(path, format!("model.merges[{rank}]: {msg}"));
        let (a, b) = pair.ok_or_else(|| bad("expected two tokens".into()))?;
        let id = |t: &str| {
            model
                .vocab
                .get(t)
                .copied()
                .ok_or_else(|| bad(format!("token {t:?} is not in model.vocab")))
        };
        let merged = id(&format!("{a}{b}"))?;
        merges.insert((id(&a)?, id(&b)?), (rank as u32, merged));
    }
    let mut added = Vec::with_capacity(json.added_tokens.len());
    for (i, value) in json.added_tokens.iter().enumerate() {
        let id = value
            .get("id")
            .and_then(Value::as_u64)
            .and_then(|v| u32::try_from(v).ok())
            .ok_or_else(|| Error::config(path, format!("added_tokens[{i}]: missing id")))?;
        let spec = parse_token_spec(value, false)
            .map_err(|msg| Error::config(path, format!("added_tokens[{i}]: {msg}")))?;
        added.push((id, spec));
    }
    added.sort_by_key(|(id, _)| *id);
    let mut vocab = model.vocab;
    for (id, spec) in &added {
        vocab.entry(spec.content.clone()).or_insert(*id);
    }
    Ok((vocab, merges, added))
}

fn read_optional_json_object(path: &Path) -> Result<Option<Map<String, Value>>> {
    let text = match std::fs::read_to_string(path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(Error::io(path, e)),
    };
    match serde_json::from_str(&text) {
        Ok(Value::Object(map)) => Ok(Some(map)),
        Ok(_) => Err(Error::config(path, "expected a JSON object")),
        Err(e) => Err(Error::config(path, format!("invalid JSON: {e}"))),
    }
}

/// A named special token (`"bos_token": ...`); `null` means none.
fn parse_named(value: &Value, name: &str, path: &Path) -> Result<Option<TokenSpec>> {
    if value.is_null() {
        return Ok(None);
    }
    parse_token_spec(value, true)
        .map(Some)
        .map_err(|msg| Error::config(path, format!("{name}: {msg}")))
}

/// A token as a plain string or an AddedToken dict. A missing `normalized` defaults to "not
/// special" (named special tokens are always special).
fn parse_token_spec(value: &Value, named: bool) -> std::result::Result<TokenSpec, String> {
    match value {
        Value::String(s) => Ok(TokenSpec::plain(s)),
        Value::Object(m) => {
            let content = m
                .get("content")
                .and_then(Value::as_str)
                .ok_or("expected a \"content\" string")?;
            let flag = |key: &str| -> std::result::Result<Option<bool>, String> {
                match m.get(key) {
                    None | Some(Value::Null) => Ok(None),
                    Some(Value::Bool(b)) => Ok(Some(*b)),
                    Some(other) => Err(format!("{key} must be a boolean, got {other}")),
                }
            };
            let special = named || flag("special")?.unwrap_or(false);
            Ok(TokenSpec {
                content: content.to_owned(),
                normalized: flag("normalized")?.unwrap_or(!special),
                lstrip: flag("lstrip")?.unwrap_or(false),
                rstrip: flag("rstrip")?.unwrap_or(false),
                single_word: flag("single_word")?.unwrap_or(false),
            })
        }
        other => Err(format!("expected a string or a token object, got {other}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_table_matches_gpt2() {
        let chars = byte_chars();
        assert_eq!(chars[b'a' as usize], 'a');
        assert_eq!(chars[0], '\u{100}');
        assert_eq!(chars[b' ' as usize], '\u{120}');
        assert_eq!(chars[0xAD], '\u{143}');
        let mut sorted: Vec<char> = chars.to_vec();
        sorted.sort_unstable();
        sorted.dedup();
        assert_eq!(sorted.len(), 256);
    }

    #[test]
    fn normalize_collapses_whitespace_and_lowercases() {
        assert_eq!(normalize("  A\t\nB\u{a0}C  "), " a b c ");
        assert_eq!(normalize("Cafe\u{301}"), "caf\u{e9}");
        assert_eq!(normalize("\u{130}"), "i\u{307}");
        assert_eq!(normalize("\u{3a3}\u{3a3}"), "\u{3c3}\u{3c3}");
    }

    /// Per-code-point reference written by scripts/make_tokenizer_fixtures.py from the
    /// `tokenizers` library: normalizer output and pre-tokenizer character class.
    fn unicode_tables() -> Value {
        use std::io::Read;
        let path = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/clip-tokenizer/unicode.json.gz");
        let file = std::fs::File::open(&path).unwrap();
        let mut text = String::new();
        flate2::read::GzDecoder::new(file)
            .read_to_string(&mut text)
            .unwrap();
        serde_json::from_str(&text).unwrap()
    }

    fn code_points() -> impl Iterator<Item = char> {
        (0u32..0x11_0000).filter_map(char::from_u32)
    }

    #[test]
    fn normalizer_matches_tokenizers_for_every_code_point() {
        let tables = unicode_tables();
        let changed: HashMap<u32, String> = tables["changed"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| {
                (
                    e[0].as_u64().unwrap() as u32,
                    e[1].as_str().unwrap().to_owned(),
                )
            })
            .collect();
        let mut bad = Vec::new();
        for c in code_points() {
            let expected = changed
                .get(&(c as u32))
                .cloned()
                .unwrap_or_else(|| c.to_string());
            let got = normalize(&c.to_string());
            if got != expected {
                bad.push(format!("U+{:04X}: {got:?} != {expected:?}", c as u32));
            }
        }
        for seq in tables["sequences"].as_array().unwrap() {
            let (input, expected) = (seq[0].as_str().unwrap(), seq[1].as_str().unwrap());
            let got = normalize(input);
            if got != expected {
                bad.push(format!("{input:?}: {got:?} != {expected:?}"));
            }
        }
        assert!(
            bad.is_empty(),
            "{} mismatches: {:#?}",
            bad.len(),
            &bad[..bad.len().min(50)]
        );
    }

    #[test]
    fn pre_tokenizer_classes_match_tokenizers_for_every_code_point() {
        let tables = unicode_tables();
        let mut class: HashMap<u32, String> = HashMap::new();
        for run in tables["classes"].as_array().unwrap() {
            let (first, last) = (
                run[0].as_u64().unwrap() as u32,
                run[1].as_u64().unwrap() as u32,
            );
            for cp in first..=last {
                class.insert(cp, run[2].as_str().unwrap().to_owned());
            }
        }
        let re = compile(CLIP_PATTERN).unwrap();
        let mut bad = Vec::new();
        for c in code_points() {
            let s = format!("a{c}{c}a");
            let pieces: Vec<&str> = re.find_iter(&s).map(|m| m.as_str()).collect();
            let cc = format!("{c}{c}");
            let cs = c.to_string();
            let got = if pieces == [s.as_str()] {
                "L"
            } else if pieces == ["a", cs.as_str(), cs.as_str(), "a"] {
                "N"
            } else if pieces == ["a", "a"] {
                "S"
            } else if pieces == ["a", cc.as_str(), "a"] {
                "O"
            } else {
                "?"
            };
            let expected = class.get(&(c as u32)).map_or("-", String::as_str);
            if got != expected {
                bad.push(format!("U+{:04X}: {got} != {expected}", c as u32));
            }
        }
        assert!(
            bad.is_empty(),
            "{} mismatches: {:#?}",
            bad.len(),
            &bad[..bad.len().min(50)]
        );
    }
}
