//! The T5 encoder (transformers `T5EncoderModel`), as FLUX uses it for its long prompt
//! embeddings: RMS layer norms, unscaled attention with a learned relative position bias
//! (computed by the first layer, shared by all), and a gated-GELU (T5 v1.1) or ReLU
//! feed-forward.

use candle_core::{DType, Module, Tensor, D};
use candle_nn::{embedding, linear_no_bias, Embedding, Linear, VarBuilder};

use super::config::JsonConfig;
use crate::Result;

/// The fields of a T5 `config.json` that we use.
#[derive(Debug, Clone, PartialEq)]
pub struct T5Config {
    pub vocab_size: usize,
    pub d_model: usize,
    pub d_kv: usize,
    pub d_ff: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub relative_attention_num_buckets: usize,
    pub relative_attention_max_distance: usize,
    pub layer_norm_epsilon: f64,
    /// `gated-gelu` (T5 v1.1, FLUX) or `relu` (original T5).
    pub gated: bool,
}

impl T5Config {
    pub fn from_config(cfg: &JsonConfig) -> Result<Self> {
        let ff = cfg.str_or("feed_forward_proj", "relu")?.to_string();
        let gated = match ff.as_str() {
            "gated-gelu" => true,
            "relu" => false,
            other => {
                return Err(cfg.err(format!(
                    "field `feed_forward_proj` must be \"gated-gelu\" or \"relu\", got {other:?}"
                )))
            }
        };
        let c = Self {
            vocab_size: cfg.usize_or("vocab_size", 32128)?,
            d_model: cfg.usize_or("d_model", 512)?,
            d_kv: cfg.usize_or("d_kv", 64)?,
            d_ff: cfg.usize_or("d_ff", 2048)?,
            num_layers: cfg.usize_or("num_layers", 6)?,
            num_heads: cfg.usize_or("num_heads", 8)?,
            relative_attention_num_buckets: cfg.usize_or("relative_attention_num_buckets", 32)?,
            relative_attention_max_distance: cfg
                .usize_or("relative_attention_max_distance", 128)?,
            layer_norm_epsilon: cfg.f64_or("layer_norm_epsilon", 1e-6)?,
            gated,
        };
        // The logarithmic buckets need max_distance above the exact range (num_buckets / 4).
        if c.relative_attention_num_buckets < 4
            || c.relative_attention_max_distance <= c.relative_attention_num_buckets / 4
        {
            return Err(cfg.err(format!(
                "relative_attention_num_buckets {} / relative_attention_max_distance {} are not usable (need at least 4 buckets and a max distance above buckets / 4)",
                c.relative_attention_num_buckets, c.relative_attention_max_distance
            )));
        }
        Ok(c)
    }
}

/// `weight * x * rsqrt(mean(x^2) + eps)`, variance in f32.
#[derive(Debug)]
struct T5LayerNorm {
    weight: Tensor,
    eps: f64,
}

impl T5LayerNorm {
    fn new(dim: usize, eps: f64, vb: VarBuilder) -> candle_core::Result<Self> {
        Ok(Self {
            weight: vb.get(dim, "weight")?,
            eps,
        })
    }

    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let dtype = x.dtype();
        let xf = x.to_dtype(DType::F32)?;
        let var = xf.sqr()?.mean_keepdim(D::Minus1)?;
        let y = xf.broadcast_div(&(var + self.eps)?.sqrt()?)?;
        y.to_dtype(dtype)?.broadcast_mul(&self.weight)
    }
}

/// transformers' `_relative_position_bucket` (bidirectional), with its float32 log.
fn bucket(relative: i64, num_buckets: usize, max_distance: usize) -> usize {
    let half = (num_buckets / 2) as i64;
    let mut b = if relative > 0 { half } else { 0 };
    let rel = relative.abs();
    let max_exact = half / 2;
    if rel < max_exact {
        b += rel;
    } else {
        let ratio = rel as f32 / max_exact as f32;
        let scale = ((max_distance as f64) / (max_exact as f64)).ln() as f32;
        let large = max_exact + ((ratio.ln() / scale) * (half - max_exact) as f32) as i64;
        b += large.clamp(0, half - 1);
    }
    b.max(0) as usize
}

#[derive(Debug)]
struct Block {
    ln_attn: T5LayerNorm,
    q: Linear,
    k: Linear,
    v: Linear,
    o: Linear,
    ln_ff: T5LayerNorm,
    wi_0: Linear,
    wi_1: Option<Linear>,
    wo: Linear,
}

/// A loaded T5 encoder.
pub struct T5Encoder {
    embed: Embedding,
    relative_bias: Embedding,
    blocks: Vec<Block>,
    final_ln: T5LayerNorm,
    pub config: T5Config,
}

impl T5Encoder {
    pub fn new(vb: VarBuilder, c: &T5Config) -> Result<Self> {
        let embed = if vb.contains_tensor("shared.weight") {
            embedding(c.vocab_size, c.d_model, vb.pp("shared"))?
        } else {
            embedding(c.vocab_size, c.d_model, vb.pp("encoder").pp("embed_tokens"))?
        };
        let enc = vb.pp("encoder");
        let inner = c.num_heads * c.d_kv;
        let eps = c.layer_norm_epsilon;
        let relative_bias = embedding(
            c.relative_attention_num_buckets,
            c.num_heads,
            enc.pp("block")
                .pp(0)
                .pp("layer")
                .pp(0)
                .pp("SelfAttention")
                .pp("relative_attention_bias"),
        )?;
        let blocks = (0..c.num_layers)
            .map(|i| -> candle_core::Result<Block> {
                let l = enc.pp("block").pp(i).pp("layer");
                let a = l.pp(0).pp("SelfAttention");
                let f = l.pp(1).pp("DenseReluDense");
                let (wi_0, wi_1) = if c.gated {
                    (
                        linear_no_bias(c.d_model, c.d_ff, f.pp("wi_0"))?,
                        Some(linear_no_bias(c.d_model, c.d_ff, f.pp("wi_1"))?),
                    )
                } else {
                    (linear_no_bias(c.d_model, c.d_ff, f.pp("wi"))?, None)
                };
                Ok(Block {
                    ln_attn: T5LayerNorm::new(c.d_model, eps, l.pp(0).pp("layer_norm"))?,
                    q: linear_no_bias(c.d_model, inner, a.pp("q"))?,
                    k: linear_no_bias(c.d_model, inner, a.pp("k"))?,
                    v: linear_no_bias(c.d_model, inner, a.pp("v"))?,
                    o: linear_no_bias(inner, c.d_model, a.pp("o"))?,
                    ln_ff: T5LayerNorm::new(c.d_model, eps, l.pp(1).pp("layer_norm"))?,
                    wi_0,
                    wi_1,
                    wo: linear_no_bias(c.d_ff, c.d_model, f.pp("wo"))?,
                })
            })
            .collect::<candle_core::Result<Vec<_>>>()?;
        Ok(Self {
            embed,
            relative_bias,
            blocks,
            final_ln: T5LayerNorm::new(c.d_model, eps, enc.pp("final_layer_norm"))?,
            config: c.clone(),
        })
    }

    /// The position bias (1, heads, n, n) for a sequence of `n` tokens.
    fn position_bias(&self, n: usize) -> candle_core::Result<Tensor> {
        let c = &self.config;
        let ids: Vec<u32> = (0..n)
            .flat_map(|q| {
                (0..n).map(move |k| {
                    bucket(
                        k as i64 - q as i64,
                        c.relative_attention_num_buckets,
                        c.relative_attention_max_distance,
                    ) as u32
                })
            })
            .collect();
        let ids = Tensor::from_vec(ids, (n, n), self.relative_bias.embeddings().device())?;
        // (n, n, heads) -> (1, heads, n, n)
        self.relative_bias
            .forward(&ids)?
            .permute((2, 0, 1))?
            .unsqueeze(0)
    }

    /// The last hidden state (batch, tokens, d_model) for `input_ids` (batch, tokens); no
    /// attention mask (FLUX attends to the padding as well).
    pub fn forward(&self, input_ids: &Tensor) -> Result<Tensor> {
        let c = &self.config;
        let (b, n) = input_ids.dims2()?;
        let (h, d) = (c.num_heads, c.d_kv);
        let mut x = self.embed.forward(input_ids)?;
        let bias = self.position_bias(n)?.to_dtype(x.dtype())?;
        for blk in &self.blocks {
            let xn = blk.ln_attn.forward(&x)?;
            let split = |t: Tensor| -> candle_core::Result<Tensor> {
                t.reshape((b, n, h, d))?.transpose(1, 2)?.contiguous()
            };
            let q = split(blk.q.forward(&xn)?)?;
            let k = split(blk.k.forward(&xn)?)?;
            let v = split(blk.v.forward(&xn)?)?;
            let scores = q.matmul(&k.t()?)?.broadcast_add(&bias)?;
            let probs = super::softmax::softmax_last_dim(&scores.to_dtype(DType::F32)?)?
                .to_dtype(x.dtype())?;
            let o = probs
                .matmul(&v)?
                .transpose(1, 2)?
                .contiguous()?
                .reshape((b, n, h * d))?;
            x = (x + blk.o.forward(&o)?)?;
            let xn = blk.ln_ff.forward(&x)?;
            let ff = match &blk.wi_1 {
                Some(wi_1) => {
                    (super::activation::gelu_tanh(&blk.wi_0.forward(&xn)?)? * wi_1.forward(&xn)?)?
                }
                None => blk.wi_0.forward(&xn)?.relu()?,
            };
            x = (x + blk.wo.forward(&ff)?)?;
        }
        Ok(self.final_ln.forward(&x)?)
    }
}

#[cfg(test)]
mod tests {
    use super::bucket;

    /// Values of transformers' `_relative_position_bucket(rel, bidirectional=True,
    /// num_buckets=32, max_distance=128)`.
    #[test]
    fn buckets_match_transformers() {
        let cases = [
            (0, 0),
            (1, 17),
            (-1, 1),
            (7, 23),
            (-7, 7),
            (8, 24),
            (-8, 8),
            (12, 25),
            (-20, 10),
            (64, 30),
            (-100, 15),
            (500, 31),
            (-500, 15),
        ];
        for (rel, want) in cases {
            assert_eq!(bucket(rel, 32, 128), want, "relative position {rel}");
        }
    }
}
