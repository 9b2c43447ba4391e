//! CLIP text encoder (transformers `CLIPTextModel`), built from its `config.json`.

use candle_core::{DType, Device, Module, Tensor};
use candle_nn::{embedding, layer_norm, Embedding, LayerNorm, VarBuilder};

use super::adapter::{linear, Linear};

use super::config::JsonConfig;
use crate::Result;

/// The activation of the MLP blocks (`hidden_act`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClipActivation {
    QuickGelu,
    /// Exact (erf) GELU, as `torch.nn.functional.gelu`.
    Gelu,
    /// The tanh approximation (`gelu_new`, `gelu_pytorch_tanh`).
    GeluTanh,
}

impl ClipActivation {
    fn forward(self, xs: &Tensor) -> candle_core::Result<Tensor> {
        match self {
            ClipActivation::QuickGelu => super::activation::quick_gelu(xs),
            ClipActivation::Gelu => super::activation::gelu_erf(xs),
            ClipActivation::GeluTanh => super::activation::gelu_tanh(xs),
        }
    }
}

/// The fields of a transformers `CLIPTextConfig` that shape the network.
#[derive(Debug, Clone)]
pub struct ClipTextConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub max_position_embeddings: usize,
    pub hidden_act: ClipActivation,
    pub layer_norm_eps: f64,
    /// Where the pooled output is taken: the first token with this id, or with the legacy
    /// value 2, the token with the highest id (transformers' `pooler_output`).
    pub eos_token_id: usize,
    /// Width of `text_projection` (`CLIPTextModelWithProjection`), when the weights have one.
    pub projection_dim: usize,
}

impl ClipTextConfig {
    pub fn from_config(cfg: &JsonConfig) -> Result<Self> {
        // Some checkpoints nest the text settings under `text_config` (full CLIPModel).
        let cfg = match cfg.value.get("text_config") {
            Some(v) if v.is_object() => JsonConfig::from_value(&cfg.path, v.clone()),
            _ => cfg.clone(),
        };
        if cfg.bool_or("use_attention_mask", false)? {
            return Err(
                cfg.err("field `use_attention_mask` = true is not supported (padding-masked CLIP)")
            );
        }
        let hidden_act = match cfg.str_or("hidden_act", "quick_gelu")? {
            "quick_gelu" => ClipActivation::QuickGelu,
            "gelu" => ClipActivation::Gelu,
            "gelu_new" | "gelu_pytorch_tanh" => ClipActivation::GeluTanh,
            other => {
                return Err(cfg.err(format!(
                    "field `hidden_act` = \"{other}\" is not supported (quick_gelu, gelu, gelu_new)"
                )))
            }
        };
        let c = Self {
            vocab_size: cfg.usize_or("vocab_size", 49408)?,
            hidden_size: cfg.usize_or("hidden_size", 512)?,
            intermediate_size: cfg.usize_or("intermediate_size", 2048)?,
            num_hidden_layers: cfg.usize_or("num_hidden_layers", 12)?,
            num_attention_heads: cfg.usize_or("num_attention_heads", 8)?,
            max_position_embeddings: cfg.usize_or("max_position_embeddings", 77)?,
            hidden_act,
            layer_norm_eps: cfg.f64_or("layer_norm_eps", 1e-5)?,
            eos_token_id: cfg.usize_or("eos_token_id", 49407)?,
            projection_dim: cfg.usize_or("projection_dim", 512)?,
        };
        if c.num_attention_heads == 0 || !c.hidden_size.is_multiple_of(c.num_attention_heads) {
            return Err(cfg.err(format!(
                "hidden_size {} is not divisible by num_attention_heads {}",
                c.hidden_size, c.num_attention_heads
            )));
        }
        Ok(c)
    }

    /// The CLIP ViT-L/14 text tower of Stable Diffusion 1.x (used by the benchmark).
    pub fn sd15() -> Self {
        Self {
            vocab_size: 49408,
            hidden_size: 768,
            intermediate_size: 3072,
            num_hidden_layers: 12,
            num_attention_heads: 12,
            max_position_embeddings: 77,
            hidden_act: ClipActivation::QuickGelu,
            layer_norm_eps: 1e-5,
            eos_token_id: 2,
            projection_dim: 768,
        }
    }
}

#[derive(Debug, Clone)]
struct Attention {
    q: Linear,
    k: Linear,
    v: Linear,
    out: Linear,
    heads: usize,
    scale: f64,
}

impl Attention {
    fn new(vb: VarBuilder, c: &ClipTextConfig) -> Result<Self> {
        let d = c.hidden_size;
        Ok(Self {
            q: linear(d, d, vb.pp("q_proj"))?.with_panels(),
            k: linear(d, d, vb.pp("k_proj"))?.with_panels(),
            v: linear(d, d, vb.pp("v_proj"))?.with_panels(),
            out: linear(d, d, vb.pp("out_proj"))?.with_panels(),
            heads: c.num_attention_heads,
            scale: ((d / c.num_attention_heads) as f64).powf(-0.5),
        })
    }

    fn forward(&self, xs: &Tensor, mask: &Tensor) -> candle_core::Result<Tensor> {
        let (b, t, d) = xs.dims3()?;
        let hd = d / self.heads;
        let split = |x: Tensor| -> candle_core::Result<Tensor> {
            x.reshape((b, t, self.heads, hd))?
                .transpose(1, 2)?
                .contiguous()
        };
        let q = split((self.q.forward(xs)? * self.scale)?)?;
        let k = split(self.k.forward(xs)?)?;
        let v = split(self.v.forward(xs)?)?;
        let in_dtype = q.dtype();
        let scores = q
            .to_dtype(DType::F32)?
            .matmul(&k.to_dtype(DType::F32)?.t()?)?
            .broadcast_add(mask)?;
        let probs = super::softmax::softmax_last_dim(&scores)?.to_dtype(in_dtype)?;
        let o = probs.matmul(&v)?.transpose(1, 2)?.reshape((b, t, d))?;
        self.out.forward(&o)
    }
}

#[derive(Debug, Clone)]
struct EncoderLayer {
    ln1: LayerNorm,
    attn: Attention,
    ln2: LayerNorm,
    fc1: Linear,
    fc2: Linear,
    act: ClipActivation,
}

impl EncoderLayer {
    fn new(vb: VarBuilder, c: &ClipTextConfig) -> Result<Self> {
        Ok(Self {
            ln1: layer_norm(c.hidden_size, c.layer_norm_eps, vb.pp("layer_norm1"))?,
            attn: Attention::new(vb.pp("self_attn"), c)?,
            ln2: layer_norm(c.hidden_size, c.layer_norm_eps, vb.pp("layer_norm2"))?,
            fc1: linear(c.hidden_size, c.intermediate_size, vb.pp("mlp").pp("fc1"))?.with_panels(),
            fc2: linear(c.intermediate_size, c.hidden_size, vb.pp("mlp").pp("fc2"))?.with_panels(),
            act: c.hidden_act,
        })
    }

    fn forward(&self, xs: &Tensor, mask: &Tensor) -> candle_core::Result<Tensor> {
        let h = (xs + self.attn.forward(&self.ln1.forward(xs)?, mask)?)?;
        let m = self.fc2.forward(
            &self
                .act
                .forward(&self.fc1.forward(&self.ln2.forward(&h)?)?)?,
        )?;
        h + m
    }
}

/// What [`ClipTextModel::forward_hidden`] returns.
#[derive(Debug, Clone)]
pub struct ClipHidden {
    /// `last_hidden_state` (after the final layer norm).
    pub last: Tensor,
    /// `hidden_states[-2]`: the input of the last layer, without the final layer norm (what
    /// SDXL conditions on).
    pub penultimate: Tensor,
}

/// `CLIPTextModel`: token + position embeddings, causal encoder, final layer norm; with
/// `text_projection` weights, `CLIPTextModelWithProjection`.
#[derive(Debug, Clone)]
pub struct ClipTextModel {
    token_embedding: Embedding,
    position_embedding: Embedding,
    layers: Vec<EncoderLayer>,
    final_layer_norm: LayerNorm,
    text_projection: Option<candle_nn::Linear>,
    pub config: ClipTextConfig,
}

impl ClipTextModel {
    /// Builds the model; accepts weights saved with or without the `text_model.` prefix.
    pub fn new(vb: VarBuilder, config: &ClipTextConfig) -> Result<Self> {
        let text_projection = if vb.contains_tensor("text_projection.weight") {
            Some(candle_nn::linear_no_bias(
                config.hidden_size,
                config.projection_dim,
                vb.pp("text_projection"),
            )?)
        } else {
            None
        };
        let vb = if vb.contains_tensor("text_model.embeddings.token_embedding.weight") {
            vb.pp("text_model")
        } else {
            vb
        };
        let c = config;
        let emb = vb.pp("embeddings");
        let token_embedding = embedding(c.vocab_size, c.hidden_size, emb.pp("token_embedding"))?;
        let position_embedding = embedding(
            c.max_position_embeddings,
            c.hidden_size,
            emb.pp("position_embedding"),
        )?;
        let layers = (0..c.num_hidden_layers)
            .map(|i| EncoderLayer::new(vb.pp("encoder").pp("layers").pp(i), c))
            .collect::<Result<Vec<_>>>()?;
        let final_layer_norm =
            layer_norm(c.hidden_size, c.layer_norm_eps, vb.pp("final_layer_norm"))?;
        Ok(Self {
            token_embedding,
            position_embedding,
            layers,
            final_layer_norm,
            text_projection,
            config: c.clone(),
        })
    }

    fn causal_mask(t: usize, device: &Device) -> candle_core::Result<Tensor> {
        let mask: Vec<f32> = (0..t)
            .flat_map(|i| (0..t).map(move |j| if j > i { f32::NEG_INFINITY } else { 0.0 }))
            .collect();
        Tensor::from_vec(mask, (1, 1, t, t), device)
    }

    /// `last_hidden_state` for token ids of shape (batch, seq).
    pub fn forward(&self, input_ids: &Tensor) -> Result<Tensor> {
        Ok(self.forward_hidden(input_ids)?.last)
    }

    /// The last hidden state and the penultimate layer's output.
    pub fn forward_hidden(&self, input_ids: &Tensor) -> Result<ClipHidden> {
        let (_, t) = input_ids.dims2()?;
        if t > self.config.max_position_embeddings {
            return Err(crate::Error::invalid(
                "prompt",
                format!(
                    "{t} tokens exceed the text encoder's {} positions",
                    self.config.max_position_embeddings
                ),
            ));
        }
        let positions = Tensor::arange(0u32, t as u32, input_ids.device())?;
        let mut xs = self
            .token_embedding
            .forward(input_ids)?
            .broadcast_add(&self.position_embedding.forward(&positions)?)?;
        let mask = Self::causal_mask(t, input_ids.device())?;
        let mut penultimate = xs.clone();
        for layer in &self.layers {
            penultimate = xs;
            xs = layer.forward(&penultimate, &mask)?;
        }
        Ok(ClipHidden {
            last: self.final_layer_norm.forward(&xs)?,
            penultimate,
        })
    }

    /// `CLIPTextModelWithProjection`'s `text_embeds`: the pooled output of `hidden` (1, seq,
    /// dim) for `ids` through `text_projection`. Errors when the weights have no projection.
    pub fn projected_pooled(&self, hidden: &Tensor, ids: &[u32]) -> Result<Tensor> {
        let proj = self.text_projection.as_ref().ok_or_else(|| {
            crate::Error::Candle(candle_core::Error::Msg(
                "this text encoder has no text_projection weights (CLIPTextModelWithProjection)"
                    .into(),
            ))
        })?;
        Ok(proj.forward(&self.pooled(hidden, ids)?)?)
    }

    /// Whether the weights hold `text_projection` (`CLIPTextModelWithProjection`).
    pub fn has_projection(&self) -> bool {
        self.text_projection.is_some()
    }

    /// transformers' `pooler_output` of one sequence: the row of `hidden` (1, seq, dim) at the
    /// end-of-text token of `ids`.
    pub fn pooled(&self, hidden: &Tensor, ids: &[u32]) -> Result<Tensor> {
        let pos = if self.config.eos_token_id == 2 {
            // Legacy configs: argmax of the ids (its first occurrence).
            let max = ids.iter().copied().max().unwrap_or(0);
            ids.iter().position(|&i| i == max).unwrap_or(0)
        } else {
            let eos = self.config.eos_token_id as u32;
            ids.iter().position(|&i| i == eos).unwrap_or(0)
        };
        Ok(hidden.narrow(1, pos, 1)?.squeeze(1)?)
    }

    /// The dtype of the weights.
    pub fn dtype(&self) -> DType {
        self.token_embedding.embeddings().dtype()
    }

    /// Hidden size of the output embeddings.
    pub fn hidden_size(&self) -> usize {
        self.config.hidden_size
    }
}
