//! AUTOMATIC1111's prompt syntax, as its web UI (1.10) reads prompts for CLIP text encoders:
//! attention weights, `BREAK`, and prompts of any length in chunks of 75 tokens.
//!
//! - [`parse_attention`]: `(text)` multiplies the weight of `text` by 1.1, `[text]` by 1 / 1.1,
//!   `(text:1.3)` by 1.3; brackets nest and multiply; `\(`, `\)`, `\[`, `\]`, `\\` are literal;
//!   an unclosed bracket applies to the end; a bracket closed without an opening is text;
//!   `BREAK` (a word of its own) ends the current chunk. Runs of equal weight are merged.
//! - [`chunks`]: each piece is tokenized on its own (no BOS/EOS, no truncation) and the tokens
//!   fill chunks of 75; a chunk that fills up moves the tokens after its last comma (if that
//!   comma is within the last 20 tokens) to the next chunk; each chunk becomes BOS + 75 tokens
//!   (EOS-padded) + EOS, and after its first EOS the tokenizer's pad id (EOS for SD 1.x, `!` for
//!   SD 2.x). Every token carries its weight; the specials and padding weigh 1.
//! - [`emphasis`]: A1111's default ("Original") emphasis on one encoded chunk: the hidden
//!   states are multiplied by their tokens' weights, then scaled so that their mean is the
//!   mean before (over the whole chunk).
//!
//! Written from A1111's documented behaviour and checked against hand-computed cases (the
//! tests below). The pieces the text encoder needs are here; encoding the chunks and joining
//! their hidden states (with the negative prompt padded to the same chunk count by the empty
//! prompt's chunk, as A1111 does) is the pipeline's part.

use candle_core::Tensor;

use super::clip::ClipTokenizer;

/// A piece of a prompt and its weight; `BREAK` is `("BREAK", -1.0)`.
pub type Piece = (String, f64);

const ROUND: f64 = 1.1;
const SQUARE: f64 = 1.0 / 1.1;
/// Tokens per chunk, without BOS and EOS.
pub const CHUNK: usize = 75;
/// How far back a full chunk looks for a comma to break at (A1111's
/// `comma_padding_backtrack` default).
const COMMA_BACKTRACK: usize = 20;

/// One lexical token of the syntax.
enum Lex<'a> {
    /// An escaped character, taken literally.
    Literal(&'a str),
    Open(char),
    /// `:1.3)`: the weight, and the text as written (taken as text when no `(` is open).
    Weight(f64, &'a str),
    Close(char),
    Text(&'a str),
}

/// The next token of `s` and its length in bytes.
fn lex(s: &str) -> (Lex<'_>, usize) {
    let b = s.as_bytes();
    if b[0] == b'\\' {
        return match b.get(1) {
            Some(b'(' | b')' | b'[' | b']' | b'\\') => (Lex::Literal(&s[1..2]), 2),
            _ => (Lex::Literal(""), 1),
        };
    }
    match b[0] {
        b'(' => return (Lex::Open('('), 1),
        b'[' => return (Lex::Open('['), 1),
        b')' => return (Lex::Close(')'), 1),
        b']' => return (Lex::Close(']'), 1),
        b':' => {
            // `:\s*([+-]?[.\d]+)\s*\)`
            let rest = &s[1..];
            let trimmed = rest.trim_start();
            let skipped = rest.len() - trimmed.len();
            let sign = usize::from(trimmed.starts_with(['+', '-']));
            let digits = trimmed[sign..]
                .bytes()
                .take_while(|c| c.is_ascii_digit() || *c == b'.')
                .count();
            if digits > 0 {
                let number = &trimmed[..sign + digits];
                let after = &trimmed[sign + digits..];
                let after_trim = after.trim_start();
                if after_trim.starts_with(')') {
                    let len = 1 + skipped + sign + digits + (after.len() - after_trim.len()) + 1;
                    if let Ok(w) = number.parse::<f64>() {
                        return (Lex::Weight(w, &s[..len]), len);
                    }
                }
            }
            return (Lex::Text(":"), 1);
        }
        _ => {}
    }
    let len = s.find(['\\', '(', ')', '[', ']', ':']).unwrap_or(s.len());
    (Lex::Text(&s[..len]), len)
}

/// Splits a text run at `BREAK` words (with the whitespace around them).
fn push_text(out: &mut Vec<Piece>, text: &str) {
    let mut rest = text;
    loop {
        let found = rest.match_indices("BREAK").find(|(i, _)| {
            let before = rest[..*i].chars().next_back();
            let after = rest[i + 5..].chars().next();
            let word = |c: Option<char>| c.is_some_and(|c| c.is_alphanumeric() || c == '_');
            !word(before) && !word(after)
        });
        let Some((i, _)) = found else {
            out.push((rest.to_string(), 1.0));
            return;
        };
        out.push((rest[..i].trim_end().to_string(), 1.0));
        out.push(("BREAK".to_string(), -1.0));
        rest = rest[i + 5..].trim_start();
    }
}

/// The pieces of a prompt and their weights, as A1111's `parse_prompt_attention`.
pub fn parse_attention(text: &str) -> Vec<Piece> {
    let mut res: Vec<Piece> = Vec::new();
    let mut round: Vec<usize> = Vec::new();
    let mut square: Vec<usize> = Vec::new();
    let multiply = |res: &mut Vec<Piece>, from: usize, by: f64| {
        for p in &mut res[from..] {
            p.1 *= by;
        }
    };
    let mut pos = 0;
    while pos < text.len() {
        let (token, len) = lex(&text[pos..]);
        pos += len;
        match token {
            Lex::Literal(t) => res.push((t.to_string(), 1.0)),
            Lex::Open('(') => round.push(res.len()),
            Lex::Open(_) => square.push(res.len()),
            Lex::Weight(w, _) if !round.is_empty() => {
                let from = round.pop().unwrap_or(0);
                multiply(&mut res, from, w);
            }
            Lex::Close(')') if !round.is_empty() => {
                let from = round.pop().unwrap_or(0);
                multiply(&mut res, from, ROUND);
            }
            Lex::Close(']') if !square.is_empty() => {
                let from = square.pop().unwrap_or(0);
                multiply(&mut res, from, SQUARE);
            }
            Lex::Weight(_, t) | Lex::Text(t) => push_text(&mut res, t),
            Lex::Close(c) => push_text(&mut res, if c == ')' { ")" } else { "]" }),
        }
    }
    for from in round {
        multiply(&mut res, from, ROUND);
    }
    for from in square {
        multiply(&mut res, from, SQUARE);
    }
    if res.is_empty() {
        res.push((String::new(), 1.0));
    }
    let mut merged: Vec<Piece> = Vec::with_capacity(res.len());
    for (text, weight) in res {
        match merged.last_mut() {
            Some(last) if last.1 == weight => last.0.push_str(&text),
            _ => merged.push((text, weight)),
        }
    }
    merged
}

/// One 77-token chunk and the weight of each token.
#[derive(Debug, Clone, PartialEq)]
pub struct Chunk {
    pub tokens: Vec<u32>,
    pub multipliers: Vec<f32>,
}

/// The chunks of a prompt, as A1111's `tokenize_line`, and the number of prompt tokens.
pub fn chunks(tokenizer: &ClipTokenizer, text: &str) -> (Vec<Chunk>, usize) {
    let comma = tokenizer.token_to_id(",</w>");
    let (bos, eos, pad) = (tokenizer.bos_id(), tokenizer.eos_id(), tokenizer.pad_id());
    let mut done: Vec<Chunk> = Vec::new();
    let mut tokens: Vec<u32> = Vec::new();
    let mut weights: Vec<f32> = Vec::new();
    let mut last_comma: Option<usize> = None;
    let mut count = 0;
    let finish = |tokens: &mut Vec<u32>, weights: &mut Vec<f32>, done: &mut Vec<Chunk>| {
        let mut t = Vec::with_capacity(CHUNK + 2);
        t.push(bos);
        t.append(tokens);
        t.resize(CHUNK + 1, eos);
        t.push(eos);
        // After the first EOS, the tokenizer's pad id.
        if let Some(first) = t.iter().position(|x| *x == eos) {
            t[first + 1..].iter_mut().for_each(|x| *x = pad);
        }
        let mut m = Vec::with_capacity(CHUNK + 2);
        m.push(1.0);
        m.append(weights);
        m.resize(CHUNK + 2, 1.0);
        done.push(Chunk {
            tokens: t,
            multipliers: m,
        });
    };
    for (piece, weight) in parse_attention(text) {
        if piece == "BREAK" && weight == -1.0 {
            count += CHUNK;
            finish(&mut tokens, &mut weights, &mut done);
            last_comma = None;
            continue;
        }
        for token in tokenizer.tokens(&piece) {
            if Some(token) == comma {
                last_comma = Some(tokens.len());
            } else if let Some(c) =
                last_comma.filter(|c| tokens.len() == CHUNK && CHUNK - c <= COMMA_BACKTRACK)
            {
                let moved_tokens = tokens.split_off(c + 1);
                let moved_weights = weights.split_off(c + 1);
                count += CHUNK;
                finish(&mut tokens, &mut weights, &mut done);
                last_comma = None;
                tokens = moved_tokens;
                weights = moved_weights;
            }
            if tokens.len() == CHUNK {
                count += CHUNK;
                finish(&mut tokens, &mut weights, &mut done);
                last_comma = None;
            }
            tokens.push(token);
            weights.push(weight as f32);
        }
    }
    if !tokens.is_empty() || done.is_empty() {
        count += tokens.len();
        finish(&mut tokens, &mut weights, &mut done);
    }
    (done, count)
}

/// A1111's "Original" emphasis on one encoded chunk `z` (1, tokens, dim): each token's hidden
/// state times its weight, then the whole rescaled to the mean it had before.
pub fn emphasis(z: &Tensor, multipliers: &[f32]) -> candle_core::Result<Tensor> {
    let original = z.mean_all()?;
    let m = Tensor::from_slice(multipliers, multipliers.len(), z.device())?
        .to_dtype(z.dtype())?
        .reshape((1, multipliers.len(), 1))?;
    let weighted = z.broadcast_mul(&m)?;
    let new = weighted.mean_all()?;
    weighted.broadcast_mul(&(original / new)?)
}

/// Extends the shorter of `cond` and `uncond` (1, tokens, width) with copies of the empty
/// prompt's chunk until both have as many tokens, as A1111 pads them; `empty` (that chunk's
/// encoding) is only asked for when the lengths differ.
pub fn pad_to_same_length(
    cond: Tensor,
    uncond: Tensor,
    empty: impl FnOnce() -> crate::Result<Tensor>,
) -> crate::Result<(Tensor, Tensor)> {
    let (a, b) = (cond.dim(1)?, uncond.dim(1)?);
    if a == b {
        return Ok((cond, uncond));
    }
    let empty = empty()?;
    let chunk = empty.dim(1)?;
    let pad = |t: Tensor, missing: usize| -> crate::Result<Tensor> {
        Ok(Tensor::cat(
            &[t, empty.repeat((1, missing / chunk, 1))?],
            1,
        )?)
    };
    if a < b {
        Ok((pad(cond, b - a)?, uncond))
    } else {
        Ok((cond, pad(uncond, a - b)?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn pieces(text: &str) -> Vec<(String, f64)> {
        parse_attention(text)
    }

    fn close(got: &[Piece], want: &[(&str, f64)]) {
        assert_eq!(got.len(), want.len(), "{got:?}");
        for ((gt, gw), (wt, ww)) in got.iter().zip(want) {
            assert_eq!(gt, wt, "{got:?}");
            assert!((gw - ww).abs() < 1e-12, "{got:?}: {gw} != {ww}");
        }
    }

    /// Cases worked out by hand from the rules in the module documentation.
    #[test]
    fn weights_follow_the_brackets() {
        close(&pieces("a cat"), &[("a cat", 1.0)]);
        close(
            &pieces("a (cat) dog"),
            &[("a ", 1.0), ("cat", 1.1), (" dog", 1.0)],
        );
        close(&pieces("((cat))"), &[("cat", 1.1 * 1.1)]);
        close(&pieces("[cat]"), &[("cat", 1.0 / 1.1)]);
        close(&pieces("(cat:1.5)"), &[("cat", 1.5)]);
        close(&pieces("( cat : 0.5 )"), &[(" cat ", 0.5)]);
        close(
            &pieces("(a [b] c:2)"),
            &[("a ", 2.0), ("b", 2.0 / 1.1), (" c", 2.0)],
        );
        close(&pieces("\\(cat\\)"), &[("(cat)", 1.0)]);
        close(&pieces("(unclosed"), &[("unclosed", 1.1)]);
        close(&pieces("closed) only"), &[("closed) only", 1.0)]);
        close(&pieces("time: 10:30"), &[("time: 10:30", 1.0)]);
        close(&pieces("x:1.2) y"), &[("x:1.2) y", 1.0)]);
        close(&pieces(""), &[("", 1.0)]);
        close(
            &pieces("a cat BREAK a dog"),
            &[("a cat", 1.0), ("BREAK", -1.0), ("a dog", 1.0)],
        );
        close(&pieces("BREAKFAST"), &[("BREAKFAST", 1.0)]);
    }

    #[test]
    fn emphasis_multiplies_then_restores_the_mean() {
        // z = [[1, 2], [3, 4]] (one chunk of 2 tokens, dim 2): mean 2.5. Weights [1, 2]:
        // [[1, 2], [6, 8]], mean 4.25; times 2.5 / 4.25.
        let z = Tensor::new(&[[[1f32, 2.], [3., 4.]]], &Device::Cpu).unwrap();
        let got: Vec<f32> = emphasis(&z, &[1.0, 2.0])
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let k = 2.5 / 4.25;
        let want = [k, 2.0 * k, 6.0 * k, 8.0 * k];
        for (g, w) in got.iter().zip(want) {
            assert!((g - w).abs() < 1e-6, "{got:?}");
        }
        // Weights of 1 change nothing.
        let same: Vec<f32> = emphasis(&z, &[1.0, 1.0])
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        assert_eq!(same, vec![1.0, 2.0, 3.0, 4.0]);
    }

    fn tokenizer() -> ClipTokenizer {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../fixtures/models/tiny-sd1/tokenizer");
        ClipTokenizer::from_dir(&dir).unwrap()
    }

    #[test]
    fn long_prompts_fill_chunks_of_75_and_break_at_commas() {
        let tok = tokenizer();
        let day = tok.tokens("day")[0];
        let comma = tok.token_to_id(",</w>").unwrap();
        let (eos, bos) = (tok.eos_id(), tok.bos_id());
        // 80 words: 75 in the first chunk, 5 in the second.
        let (c, count) = chunks(&tok, &vec!["day"; 80].join(" "));
        assert_eq!((c.len(), count), (2, 80));
        assert_eq!(c[0].tokens.len(), 77);
        assert_eq!((c[0].tokens[0], c[0].tokens[76]), (bos, eos));
        assert!(c[0].tokens[1..76].iter().all(|t| *t == day));
        assert_eq!(&c[1].tokens[1..6], &[day; 5]);
        assert_eq!(c[1].tokens[6], eos);
        // A comma 10 tokens before the end: the 10 tokens after it move to the next chunk.
        let mut words = vec!["day"; 64];
        words.push("day,");
        words.extend(vec!["day"; 20]);
        let (c, _) = chunks(&tok, &words.join(" "));
        assert_eq!(c[0].tokens[66], comma);
        assert_eq!(c[0].tokens[67], eos, "the chunk ends after the comma");
        assert_eq!(&c[1].tokens[1..21], &[day; 20]);
        // BREAK starts a new chunk; weights follow the tokens.
        let (c, _) = chunks(&tok, "(day:1.5) BREAK day");
        assert_eq!(c.len(), 2);
        assert_eq!((c[0].tokens[1], c[0].multipliers[1]), (day, 1.5));
        assert_eq!((c[0].tokens[2], c[0].multipliers[2]), (eos, 1.0));
        assert_eq!((c[1].tokens[1], c[1].multipliers[1]), (day, 1.0));
        // An empty prompt is one chunk of BOS, EOS and padding.
        let (c, count) = chunks(&tok, "");
        assert_eq!((c.len(), count), (1, 0));
        assert_eq!(&c[0].tokens[..2], &[bos, eos]);
    }
}
