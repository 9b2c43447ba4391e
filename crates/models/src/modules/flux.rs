//! The FLUX.1 transformer (diffusers `FluxTransformer2DModel`): joint text-image attention
//! in "double stream" blocks, then "single stream" blocks over the concatenated sequence,
//! with 3-axis rotary position embeddings and adaptive layer norms conditioned on the
//! timestep, the guidance scale (dev) and the pooled CLIP text embedding.
//!
//! Why one long file: the transformer and the two weight layouts it loads from (diffusers'
//! names, and the original names and GGUF files renamed at the end of this file) are kept
//! together, because every rename follows the module's own layer list and a layer added to one
//! must be added to the other.

use candle_core::{DType, Module, Tensor, D};
use std::collections::HashMap;
use std::sync::{Arc, OnceLock};

use candle_core::quantized::QTensor;
use candle_nn::VarBuilder;

use super::activation::gelu_tanh;
use super::adapter::{self, LayerInfo, LayerShape};
use super::attention::{score_budget, sliced_attention};
use super::config::{numbered_count, JsonConfig};
use super::cpu_gemm::{takes_bf16, PackedLinear};
use crate::Result;

/// A linear layer whose weight is dense, or quantized (GGUF) and dequantized, together with
/// the rows it takes of a fused weight, each time the layer runs.
#[derive(Debug, Clone)]
pub struct Lin {
    weight: LinWeight,
    bias: Option<Tensor>,
    /// The layer's name when it takes adapters (see [`adapter`]).
    key: Option<Arc<str>>,
    /// A dense weight packed for the CPU's bf16 products at its first bf16 call (a layer loaded
    /// while the process runs them is [`LinWeight::Packed`] instead).
    bf16: OnceLock<Arc<PackedLinear>>,
}

#[derive(Debug, Clone)]
enum LinWeight {
    Dense(Tensor),
    /// Packed at load for the CPU's bf16 products ([`PackedLinear::at_load`]), bias included.
    Packed(Arc<PackedLinear>),
    Quant {
        q: Arc<QTensor>,
        /// Row ranges of `q` that make the weight, concatenated (empty: all rows).
        rows: Vec<(usize, usize)>,
    },
}

/// Rows `ranges` of `t`, concatenated (all of `t` for an empty list).
fn take_rows(t: Tensor, ranges: &[(usize, usize)]) -> candle_core::Result<Tensor> {
    if ranges.is_empty() {
        return Ok(t);
    }
    let parts = ranges
        .iter()
        .map(|&(s, n)| t.narrow(0, s, n))
        .collect::<candle_core::Result<Vec<_>>>()?;
    Tensor::cat(&parts, 0)
}

impl Lin {
    /// A layer of a dense weight: packed now where the CPU runs bf16 products.
    fn dense(
        weight: Tensor,
        bias: Option<Tensor>,
        key: Option<Arc<str>>,
    ) -> candle_core::Result<Self> {
        let (weight, bias) = match PackedLinear::at_load(&weight, bias.as_ref())? {
            Some(packed) => (LinWeight::Packed(packed), None),
            None => (LinWeight::Dense(weight), bias),
        };
        Ok(Lin {
            weight,
            bias,
            key,
            bf16: OnceLock::new(),
        })
    }

    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let w = match &self.weight {
            LinWeight::Packed(p) if takes_bf16(x) => {
                return adapter::adapt(&self.key, x, p.forward(x)?);
            }
            LinWeight::Packed(_) => candle_core::bail!(
                "linear layer: its weights are packed for the CPU's bf16 products only, not for {:?} {:?}",
                x.dtype(),
                x.device()
            ),
            LinWeight::Dense(w) => w.clone(),
            LinWeight::Quant { q, rows } => {
                take_rows(q.dequantize(x.device())?, rows)?.to_dtype(x.dtype())?
            }
        };
        let y = if !takes_bf16(x) {
            candle_nn::Linear::new(w, self.bias.clone()).forward(x)?
        } else if matches!(self.weight, LinWeight::Dense(_)) {
            PackedLinear::cached(&self.bf16, &w, self.bias.as_ref())?.forward(x)?
        } else {
            // A dequantized weight lives for this call only.
            PackedLinear::new(&w, self.bias.as_ref())?.forward(x)?
        };
        adapter::adapt(&self.key, x, y)
    }
}

/// Layers that read rows of one fused quantized weight (qkv, a single block's linear1), with
/// that weight dequantized once for all of them; `None` when they do not share one.
fn dequantize_group<const N: usize>(
    lins: [&Lin; N],
    x: &Tensor,
) -> candle_core::Result<Option<[Lin; N]>> {
    let first = match &lins[0].weight {
        LinWeight::Quant { q, .. } => q.clone(),
        LinWeight::Dense(_) | LinWeight::Packed(_) => return Ok(None),
    };
    let shared = lins.iter().all(|l| match &l.weight {
        LinWeight::Quant { q, .. } => Arc::ptr_eq(q, &first),
        LinWeight::Dense(_) | LinWeight::Packed(_) => false,
    });
    if !shared {
        return Ok(None);
    }
    let full = first.dequantize(x.device())?.to_dtype(x.dtype())?;
    let mut out = Vec::with_capacity(N);
    for l in lins {
        let rows = match &l.weight {
            LinWeight::Quant { rows, .. } => rows.as_slice(),
            LinWeight::Dense(_) | LinWeight::Packed(_) => &[],
        };
        out.push(Lin {
            weight: LinWeight::Dense(take_rows(full.clone(), rows)?),
            bias: l.bias.clone(),
            key: l.key.clone(),
            bf16: OnceLock::new(),
        });
    }
    Ok(out.try_into().ok())
}

/// One tensor of a GGUF transformer, renamed to diffusers' layout.
#[derive(Debug, Clone)]
enum GgufEntry {
    Dense(Tensor),
    Quant(Arc<QTensor>, Vec<(usize, usize)>),
}

/// The tensors of a GGUF FLUX transformer under diffusers' names.
#[derive(Debug)]
pub struct GgufWeights {
    entries: HashMap<String, GgufEntry>,
    /// Shapes (diffusers names) for config inference.
    pub shapes: HashMap<String, Vec<usize>>,
    dtype: DType,
    device: candle_core::Device,
}

impl GgufWeights {
    /// Renames the tensors of a GGUF file (original key names) as diffusers names them.
    /// Quantized tensors stay quantized; the others are read as `dtype`.
    pub fn new(
        tensors: HashMap<String, QTensor>,
        dtype: DType,
        device: &candle_core::Device,
    ) -> Result<Self> {
        let originals: HashMap<String, Vec<usize>> = tensors
            .iter()
            .map(|(k, q)| (k.clone(), q.shape().dims().to_vec()))
            .collect();
        let plan = original_plan(&originals)?;
        let mut stored: HashMap<String, GgufEntry> = HashMap::new();
        for (k, q) in tensors {
            let quantized = !matches!(
                q.dtype(),
                candle_core::quantized::GgmlDType::F32
                    | candle_core::quantized::GgmlDType::F16
                    | candle_core::quantized::GgmlDType::BF16
            );
            let entry = if quantized {
                GgufEntry::Quant(Arc::new(q), Vec::new())
            } else {
                GgufEntry::Dense(q.dequantize(device)?.to_dtype(dtype)?)
            };
            stored.insert(k, entry);
        }
        let mut entries = HashMap::new();
        let mut shapes = HashMap::new();
        for (new, old, rows) in plan {
            let (entry, shape) = match &stored[&old] {
                GgufEntry::Dense(t) => {
                    let t = take_rows(t.clone(), &rows)?;
                    let shape = t.dims().to_vec();
                    (GgufEntry::Dense(t), shape)
                }
                GgufEntry::Quant(q, _) => {
                    let mut shape = q.shape().dims().to_vec();
                    if !rows.is_empty() {
                        shape[0] = rows.iter().map(|r| r.1).sum();
                    }
                    (GgufEntry::Quant(q.clone(), rows), shape)
                }
            };
            shapes.insert(new.clone(), shape);
            entries.insert(new, entry);
        }
        Ok(Self {
            entries,
            shapes,
            dtype,
            device: device.clone(),
        })
    }
}

/// Where a transformer's weights come from, with a name prefix (as `VarBuilder::pp`).
#[derive(Clone)]
pub struct Src<'a> {
    kind: SrcKind<'a>,
    prefix: String,
}

#[derive(Clone)]
enum SrcKind<'a> {
    Vb(VarBuilder<'a>),
    Gguf(Arc<GgufWeights>),
}

impl<'a> Src<'a> {
    fn vb(vb: VarBuilder<'a>) -> Self {
        Self {
            kind: SrcKind::Vb(vb),
            prefix: String::new(),
        }
    }

    fn gguf(w: Arc<GgufWeights>) -> Self {
        Self {
            kind: SrcKind::Gguf(w),
            prefix: String::new(),
        }
    }

    fn pp(&self, s: impl ToString) -> Self {
        let s = s.to_string();
        let prefix = if self.prefix.is_empty() {
            s
        } else {
            format!("{}.{s}", self.prefix)
        };
        Self {
            kind: self.kind.clone(),
            prefix,
        }
    }

    fn name(&self, leaf: &str) -> String {
        if self.prefix.is_empty() {
            leaf.to_string()
        } else {
            format!("{}.{leaf}", self.prefix)
        }
    }

    fn get(&self, dim: usize, leaf: &str) -> candle_core::Result<Tensor> {
        match &self.kind {
            SrcKind::Vb(vb) => vb.get(dim, &self.name(leaf)),
            SrcKind::Gguf(w) => {
                let name = self.name(leaf);
                match w.entries.get(&name) {
                    Some(GgufEntry::Dense(t)) if t.dims() == [dim] => Ok(t.clone()),
                    Some(GgufEntry::Quant(q, rows)) => {
                        let t = take_rows(q.dequantize(&w.device)?, rows)?.to_dtype(w.dtype)?;
                        if t.dims() != [dim] {
                            return Err(candle_core::Error::Msg(format!(
                                "{name}: shape {:?}, expected [{dim}]",
                                t.dims()
                            )));
                        }
                        Ok(t)
                    }
                    Some(GgufEntry::Dense(t)) => Err(candle_core::Error::Msg(format!(
                        "{name}: shape {:?}, expected [{dim}]",
                        t.dims()
                    ))),
                    None => Err(candle_core::Error::Msg(format!("missing tensor {name}"))),
                }
            }
        }
    }
}

/// A linear layer (weight and bias) read from `src`.
fn linear(din: usize, dout: usize, src: Src) -> candle_core::Result<Lin> {
    let key = adapter::register(src.prefix.clone(), LayerShape::Linear { din, dout });
    match &src.kind {
        SrcKind::Vb(vb) => Lin::dense(
            vb.get((dout, din), &src.name("weight"))?,
            Some(vb.get(dout, &src.name("bias"))?),
            key,
        ),
        SrcKind::Gguf(w) => {
            let wname = src.name("weight");
            let shape = w.shapes.get(&wname).cloned().unwrap_or_default();
            if shape != [dout, din] {
                return Err(candle_core::Error::Msg(format!(
                    "{wname}: shape {shape:?}, expected [{dout}, {din}]"
                )));
            }
            let Some(entry) = w.entries.get(&wname) else {
                return Err(candle_core::Error::Msg(format!("missing tensor {wname}")));
            };
            let bias = Some(src.get(dout, "bias")?);
            match entry {
                GgufEntry::Dense(t) => Lin::dense(t.clone(), bias, key),
                GgufEntry::Quant(q, rows) => Ok(Lin {
                    weight: LinWeight::Quant {
                        q: q.clone(),
                        rows: rows.clone(),
                    },
                    bias,
                    key,
                    bf16: OnceLock::new(),
                }),
            }
        }
    }
}

/// The fields of a FLUX transformer `config.json` that we use.
#[derive(Debug, Clone, PartialEq)]
pub struct FluxConfig {
    pub patch_size: usize,
    pub in_channels: usize,
    pub out_channels: usize,
    pub num_layers: usize,
    pub num_single_layers: usize,
    pub attention_head_dim: usize,
    pub num_attention_heads: usize,
    pub joint_attention_dim: usize,
    pub pooled_projection_dim: usize,
    pub guidance_embeds: bool,
    pub axes_dims_rope: Vec<usize>,
}

impl FluxConfig {
    pub fn from_config(cfg: &JsonConfig) -> Result<Self> {
        let in_channels = cfg.usize_or("in_channels", 64)?;
        let out_channels = cfg.usize_opt("out_channels")?.unwrap_or(in_channels);
        let attention_head_dim = cfg.usize_or("attention_head_dim", 128)?;
        let axes_dims_rope = cfg
            .usize_list("axes_dims_rope")?
            .unwrap_or_else(|| vec![16, 56, 56]);
        let c = Self {
            patch_size: cfg.usize_or("patch_size", 1)?,
            in_channels,
            out_channels,
            num_layers: cfg.usize_or("num_layers", 19)?,
            num_single_layers: cfg.usize_or("num_single_layers", 38)?,
            attention_head_dim,
            num_attention_heads: cfg.usize_or("num_attention_heads", 24)?,
            joint_attention_dim: cfg.usize_or("joint_attention_dim", 4096)?,
            pooled_projection_dim: cfg.usize_or("pooled_projection_dim", 768)?,
            guidance_embeds: cfg.bool_or("guidance_embeds", false)?,
            axes_dims_rope,
        };
        if c.patch_size != 1 {
            return Err(cfg.err(format!(
                "field `patch_size` must be 1 (FLUX packs 2x2 latent patches itself), got {}",
                c.patch_size
            )));
        }
        let rope: usize = c.axes_dims_rope.iter().sum();
        if rope != c.attention_head_dim || c.axes_dims_rope.iter().any(|d| d % 2 == 1) {
            return Err(cfg.err(format!(
                "field `axes_dims_rope` {:?} must be even sizes adding up to attention_head_dim {}",
                c.axes_dims_rope, c.attention_head_dim
            )));
        }
        if c.num_attention_heads == 0 || c.attention_head_dim == 0 {
            return Err(cfg.err("attention heads and head size must be positive"));
        }
        Ok(c)
    }

    pub fn inner_dim(&self) -> usize {
        self.num_attention_heads * self.attention_head_dim
    }
}

/// LayerNorm without affine parameters, computed in f32 as torch does.
fn layer_norm(x: &Tensor, eps: f64) -> candle_core::Result<Tensor> {
    let dtype = x.dtype();
    let x = x.to_dtype(DType::F32)?;
    let mean = x.mean_keepdim(D::Minus1)?;
    let xc = x.broadcast_sub(&mean)?;
    let var = xc.sqr()?.mean_keepdim(D::Minus1)?;
    xc.broadcast_div(&(var + eps)?.sqrt()?)?.to_dtype(dtype)
}

/// diffusers `RMSNorm` with a weight: `x * rsqrt(mean(x^2) + eps) * w`, variance in f32.
#[derive(Debug)]
struct RmsNorm {
    weight: Tensor,
    eps: f64,
}

impl RmsNorm {
    fn new(dim: usize, vb: Src) -> candle_core::Result<Self> {
        Ok(Self {
            weight: vb.get(dim, "weight")?,
            eps: 1e-6,
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

/// Sinusoidal features of `t` (batch,) as diffusers' `Timesteps(256, flip_sin_to_cos=True,
/// downscale_freq_shift=0)`: [cos, sin], in f32.
fn timestep_features(t: &Tensor, dim: usize) -> candle_core::Result<Tensor> {
    let half = dim / 2;
    let ln = (10000f64).ln() as f32;
    let freqs: Vec<f32> = (0..half)
        .map(|i| (-ln * i as f32 / half as f32).exp())
        .collect();
    let freqs = Tensor::from_vec(freqs, (1, half), t.device())?;
    let args = t
        .to_dtype(DType::F32)?
        .unsqueeze(1)?
        .broadcast_mul(&freqs)?;
    Tensor::cat(&[args.cos()?, args.sin()?], 1)
}

#[derive(Debug)]
struct Mlp2 {
    linear_1: Lin,
    linear_2: Lin,
}

impl Mlp2 {
    fn new(din: usize, dout: usize, vb: Src) -> candle_core::Result<Self> {
        Ok(Self {
            linear_1: linear(din, dout, vb.pp("linear_1"))?,
            linear_2: linear(dout, dout, vb.pp("linear_2"))?,
        })
    }

    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        self.linear_2.forward(&self.linear_1.forward(x)?.silu()?)
    }
}

/// The rotary tables (cos, sin) of shape (seq, head_dim), on the CPU, from ids (seq, axes):
/// per axis, frequencies `1 / theta^(2i / d)` in f64, angles `pos * freq`, each repeated
/// twice (interleaved pairs), cast to f32.
fn rope_tables(ids: &Tensor, axes: &[usize], theta: f64) -> candle_core::Result<(Tensor, Tensor)> {
    let (seq, n_axes) = ids.dims2()?;
    let ids: Vec<f32> = ids.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
    let dim: usize = axes.iter().sum();
    let mut cos = vec![0f32; seq * dim];
    let mut sin = vec![0f32; seq * dim];
    for s in 0..seq {
        let mut off = 0;
        for (a, &d) in axes.iter().enumerate() {
            let pos = if a < n_axes {
                f64::from(ids[s * n_axes + a])
            } else {
                0.0
            };
            for i in 0..d / 2 {
                let exponent = (2 * i) as f64 / d as f64;
                let freq = 1.0 / theta.powf(exponent);
                let angle = pos * freq;
                let (c, sn) = (angle.cos() as f32, angle.sin() as f32);
                for j in 0..2 {
                    cos[s * dim + off + 2 * i + j] = c;
                    sin[s * dim + off + 2 * i + j] = sn;
                }
            }
            off += d;
        }
    }
    Ok((
        Tensor::from_vec(cos, (seq, dim), &candle_core::Device::Cpu)?,
        Tensor::from_vec(sin, (seq, dim), &candle_core::Device::Cpu)?,
    ))
}

/// `x * cos + rotate(x) * sin` for x (b, heads, seq, d), where rotate maps each pair
/// (x0, x1) to (-x1, x0); computed in f32.
fn apply_rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> candle_core::Result<Tensor> {
    let dtype = x.dtype();
    let (b, h, s, d) = x.dims4()?;
    let xf = x.to_dtype(DType::F32)?;
    let pairs = xf.reshape((b, h, s, d / 2, 2))?;
    let re = pairs.narrow(4, 0, 1)?;
    let im = pairs.narrow(4, 1, 1)?;
    let rotated = Tensor::cat(&[im.neg()?, re], 4)?.reshape((b, h, s, d))?;
    let out = (xf.broadcast_mul(cos)? + rotated.broadcast_mul(sin)?)?;
    out.to_dtype(dtype)
}

/// Multi-head attention over (b, seq, heads, d) queries/keys/values with scale 1/sqrt(d).
fn attention(q: &Tensor, k: &Tensor, v: &Tensor) -> candle_core::Result<Tensor> {
    let (b, h, s, d) = q.dims4()?;
    let scale = 1.0 / (d as f64).sqrt();
    let q = (q * scale)?.reshape((b * h, s, d))?;
    let k = k.reshape((b * h, s, d))?;
    let v = v.reshape((b * h, s, d))?;
    let o = sliced_attention(&q, &k, &v, false, score_budget(q.device()))?;
    // (b, h, s, d) -> (b, s, h * d)
    o.reshape((b, h, s, d))?
        .transpose(1, 2)?
        .contiguous()?
        .reshape((b, s, h * d))
}

#[derive(Debug)]
struct DoubleBlock {
    norm1: Lin,
    norm1_context: Lin,
    to_q: Lin,
    to_k: Lin,
    to_v: Lin,
    norm_q: RmsNorm,
    norm_k: RmsNorm,
    add_q: Lin,
    add_k: Lin,
    add_v: Lin,
    norm_added_q: RmsNorm,
    norm_added_k: RmsNorm,
    to_out: Lin,
    to_add_out: Lin,
    ff_in: Lin,
    ff_out: Lin,
    ffc_in: Lin,
    ffc_out: Lin,
    heads: usize,
    head_dim: usize,
}

/// (b, seq, h*d) -> (b, h, seq, d)
fn heads(x: &Tensor, h: usize, d: usize) -> candle_core::Result<Tensor> {
    let (b, s, _) = x.dims3()?;
    x.reshape((b, s, h, d))?.transpose(1, 2)?.contiguous()
}

/// `linear(silu(temb))` split into `n` chunks of the model width.
fn modulation(lin: &Lin, temb: &Tensor, n: usize) -> candle_core::Result<Vec<Tensor>> {
    let e = lin.forward(&temb.silu()?)?;
    let dim = e.dim(1)? / n;
    (0..n)
        .map(|i| e.narrow(1, i * dim, dim)?.unsqueeze(1))
        .collect()
}

/// `norm(x) * (1 + scale) + shift` with a LayerNorm without affine parameters (eps 1e-6).
fn modulate(x: &Tensor, shift: &Tensor, scale: &Tensor) -> candle_core::Result<Tensor> {
    layer_norm(x, 1e-6)?
        .broadcast_mul(&(scale + 1.0)?)?
        .broadcast_add(shift)
}

impl DoubleBlock {
    fn new(vb: Src, c: &FluxConfig) -> candle_core::Result<Self> {
        let dim = c.inner_dim();
        let hd = c.attention_head_dim;
        let a = vb.pp("attn");
        Ok(Self {
            norm1: linear(dim, 6 * dim, vb.pp("norm1").pp("linear"))?,
            norm1_context: linear(dim, 6 * dim, vb.pp("norm1_context").pp("linear"))?,
            to_q: linear(dim, dim, a.pp("to_q"))?,
            to_k: linear(dim, dim, a.pp("to_k"))?,
            to_v: linear(dim, dim, a.pp("to_v"))?,
            norm_q: RmsNorm::new(hd, a.pp("norm_q"))?,
            norm_k: RmsNorm::new(hd, a.pp("norm_k"))?,
            add_q: linear(dim, dim, a.pp("add_q_proj"))?,
            add_k: linear(dim, dim, a.pp("add_k_proj"))?,
            add_v: linear(dim, dim, a.pp("add_v_proj"))?,
            norm_added_q: RmsNorm::new(hd, a.pp("norm_added_q"))?,
            norm_added_k: RmsNorm::new(hd, a.pp("norm_added_k"))?,
            to_out: linear(dim, dim, a.pp("to_out").pp(0))?,
            to_add_out: linear(dim, dim, a.pp("to_add_out"))?,
            ff_in: linear(dim, 4 * dim, vb.pp("ff").pp("net").pp(0).pp("proj"))?,
            ff_out: linear(4 * dim, dim, vb.pp("ff").pp("net").pp(2))?,
            ffc_in: linear(dim, 4 * dim, vb.pp("ff_context").pp("net").pp(0).pp("proj"))?,
            ffc_out: linear(4 * dim, dim, vb.pp("ff_context").pp("net").pp(2))?,
            heads: c.num_attention_heads,
            head_dim: hd,
        })
    }

    fn forward(
        &self,
        img: &Tensor,
        txt: &Tensor,
        temb: &Tensor,
        rope: &(Tensor, Tensor),
    ) -> candle_core::Result<(Tensor, Tensor)> {
        let (h, d) = (self.heads, self.head_dim);
        let m = modulation(&self.norm1, temb, 6)?;
        let mc = modulation(&self.norm1_context, temb, 6)?;
        let img_n = modulate(img, &m[0], &m[1])?;
        let txt_n = modulate(txt, &mc[0], &mc[1])?;

        // A GGUF file fuses q, k and v: dequantize each fused weight once per step.
        let img_qkv = dequantize_group([&self.to_q, &self.to_k, &self.to_v], &img_n)?;
        let [to_q, to_k, to_v] = match &img_qkv {
            Some([a, b, c]) => [a, b, c],
            None => [&self.to_q, &self.to_k, &self.to_v],
        };
        let txt_qkv = dequantize_group([&self.add_q, &self.add_k, &self.add_v], &txt_n)?;
        let [add_q, add_k, add_v] = match &txt_qkv {
            Some([a, b, c]) => [a, b, c],
            None => [&self.add_q, &self.add_k, &self.add_v],
        };
        let q = self.norm_q.forward(&heads(&to_q.forward(&img_n)?, h, d)?)?;
        let k = self.norm_k.forward(&heads(&to_k.forward(&img_n)?, h, d)?)?;
        let v = heads(&to_v.forward(&img_n)?, h, d)?;
        let cq = self
            .norm_added_q
            .forward(&heads(&add_q.forward(&txt_n)?, h, d)?)?;
        let ck = self
            .norm_added_k
            .forward(&heads(&add_k.forward(&txt_n)?, h, d)?)?;
        let cv = heads(&add_v.forward(&txt_n)?, h, d)?;
        let q = apply_rope(&Tensor::cat(&[&cq, &q], 2)?, &rope.0, &rope.1)?;
        let k = apply_rope(&Tensor::cat(&[&ck, &k], 2)?, &rope.0, &rope.1)?;
        let v = Tensor::cat(&[&cv, &v], 2)?;
        let o = attention(&q, &k, &v)?;
        let t_len = txt.dim(1)?;
        let s_len = img.dim(1)?;
        let txt_attn = self.to_add_out.forward(&o.narrow(1, 0, t_len)?)?;
        let img_attn = self.to_out.forward(&o.narrow(1, t_len, s_len)?)?;

        let img = (img + img_attn.broadcast_mul(&m[2])?)?;
        let img_n = modulate(&img, &m[3], &m[4])?;
        let ff = self
            .ff_out
            .forward(&gelu_tanh(&self.ff_in.forward(&img_n)?)?)?;
        let img = (img + ff.broadcast_mul(&m[5])?)?;

        let txt = (txt + txt_attn.broadcast_mul(&mc[2])?)?;
        let txt_n = modulate(&txt, &mc[3], &mc[4])?;
        let ff = self
            .ffc_out
            .forward(&gelu_tanh(&self.ffc_in.forward(&txt_n)?)?)?;
        let txt = (txt + ff.broadcast_mul(&mc[5])?)?;
        // As diffusers: keep f16 activations finite.
        let txt = if txt.dtype() == DType::F16 {
            txt.clamp(-65504f32, 65504f32)?
        } else {
            txt
        };
        Ok((img, txt))
    }
}

#[derive(Debug)]
struct SingleBlock {
    norm: Lin,
    to_q: Lin,
    to_k: Lin,
    to_v: Lin,
    norm_q: RmsNorm,
    norm_k: RmsNorm,
    proj_mlp: Lin,
    proj_out: Lin,
    heads: usize,
    head_dim: usize,
}

impl SingleBlock {
    fn new(vb: Src, c: &FluxConfig) -> candle_core::Result<Self> {
        let dim = c.inner_dim();
        let hd = c.attention_head_dim;
        let a = vb.pp("attn");
        Ok(Self {
            norm: linear(dim, 3 * dim, vb.pp("norm").pp("linear"))?,
            to_q: linear(dim, dim, a.pp("to_q"))?,
            to_k: linear(dim, dim, a.pp("to_k"))?,
            to_v: linear(dim, dim, a.pp("to_v"))?,
            norm_q: RmsNorm::new(hd, a.pp("norm_q"))?,
            norm_k: RmsNorm::new(hd, a.pp("norm_k"))?,
            proj_mlp: linear(dim, 4 * dim, vb.pp("proj_mlp"))?,
            proj_out: linear(5 * dim, dim, vb.pp("proj_out"))?,
            heads: c.num_attention_heads,
            head_dim: hd,
        })
    }

    /// Over the concatenated [text, image] sequence.
    fn forward(
        &self,
        x: &Tensor,
        temb: &Tensor,
        rope: &(Tensor, Tensor),
    ) -> candle_core::Result<Tensor> {
        let (h, d) = (self.heads, self.head_dim);
        let m = modulation(&self.norm, temb, 3)?;
        let xn = modulate(x, &m[0], &m[1])?;
        // A GGUF file fuses q, k, v and the MLP input: dequantize it once per step.
        let group = dequantize_group([&self.to_q, &self.to_k, &self.to_v, &self.proj_mlp], &xn)?;
        let [to_q, to_k, to_v, proj_mlp] = match &group {
            Some([a, b, c, e]) => [a, b, c, e],
            None => [&self.to_q, &self.to_k, &self.to_v, &self.proj_mlp],
        };
        let mlp = gelu_tanh(&proj_mlp.forward(&xn)?)?;
        let q = self.norm_q.forward(&heads(&to_q.forward(&xn)?, h, d)?)?;
        let k = self.norm_k.forward(&heads(&to_k.forward(&xn)?, h, d)?)?;
        let v = heads(&to_v.forward(&xn)?, h, d)?;
        let q = apply_rope(&q, &rope.0, &rope.1)?;
        let k = apply_rope(&k, &rope.0, &rope.1)?;
        let o = attention(&q, &k, &v)?;
        let out = self.proj_out.forward(&Tensor::cat(&[&o, &mlp], 2)?)?;
        let x = (x + out.broadcast_mul(&m[2])?)?;
        // As diffusers: keep f16 activations finite.
        if x.dtype() == DType::F16 {
            x.clamp(-65504f32, 65504f32)
        } else {
            Ok(x)
        }
    }
}

/// A loaded FLUX transformer.
pub struct FluxTransformer {
    x_embedder: Lin,
    context_embedder: Lin,
    timestep_embedder: Mlp2,
    guidance_embedder: Option<Mlp2>,
    text_embedder: Mlp2,
    double: Vec<DoubleBlock>,
    single: Vec<SingleBlock>,
    norm_out: Lin,
    proj_out: Lin,
    pub config: FluxConfig,
}

impl FluxTransformer {
    /// From diffusers-named weights (a diffusers folder, or a renamed single file).
    pub fn new(vb: VarBuilder, c: &FluxConfig) -> Result<Self> {
        Self::from_src(Src::vb(vb), c)
    }

    /// From a GGUF file with the original key names: quantized weights stay quantized in
    /// memory and are dequantized by each layer when it runs.
    pub fn from_gguf(weights: Arc<GgufWeights>, c: &FluxConfig) -> Result<Self> {
        Self::from_src(Src::gguf(weights), c)
    }

    fn from_src(vb: Src, c: &FluxConfig) -> Result<Self> {
        let dim = c.inner_dim();
        let te = vb.pp("time_text_embed");
        let guidance_embedder = if c.guidance_embeds {
            Some(Mlp2::new(256, dim, te.pp("guidance_embedder"))?)
        } else {
            None
        };
        let double = (0..c.num_layers)
            .map(|i| DoubleBlock::new(vb.pp("transformer_blocks").pp(i), c))
            .collect::<candle_core::Result<Vec<_>>>()?;
        let single = (0..c.num_single_layers)
            .map(|i| SingleBlock::new(vb.pp("single_transformer_blocks").pp(i), c))
            .collect::<candle_core::Result<Vec<_>>>()?;
        Ok(Self {
            x_embedder: linear(c.in_channels, dim, vb.pp("x_embedder"))?,
            context_embedder: linear(c.joint_attention_dim, dim, vb.pp("context_embedder"))?,
            timestep_embedder: Mlp2::new(256, dim, te.pp("timestep_embedder"))?,
            guidance_embedder,
            text_embedder: Mlp2::new(c.pooled_projection_dim, dim, te.pp("text_embedder"))?,
            double,
            single,
            norm_out: linear(dim, 2 * dim, vb.pp("norm_out").pp("linear"))?,
            proj_out: linear(
                dim,
                c.patch_size * c.patch_size * c.out_channels,
                vb.pp("proj_out"),
            )?,
            config: c.clone(),
        })
    }

    /// The velocity for packed latents `img` (b, seq, in_channels), T5 states `txt`
    /// (b, tokens, joint_attention_dim), pooled CLIP `pooled` (b, pooled_dim), `timestep`
    /// (b,) in [0, 1] (sigma, as FluxPipeline passes `t / 1000`), `guidance` (b,) for dev
    /// models, and position ids (seq, 3) / (tokens, 3).
    #[allow(clippy::too_many_arguments)]
    pub fn forward(
        &self,
        img: &Tensor,
        txt: &Tensor,
        pooled: &Tensor,
        timestep: &Tensor,
        guidance: Option<&Tensor>,
        img_ids: &Tensor,
        txt_ids: &Tensor,
    ) -> Result<Tensor> {
        let dtype = img.dtype();
        let img = self.x_embedder.forward(img)?;
        let t = (timestep.to_dtype(dtype)? * 1000.0)?;
        let mut temb = self
            .timestep_embedder
            .forward(&timestep_features(&t, 256)?.to_dtype(dtype)?)?;
        match (&self.guidance_embedder, guidance) {
            (Some(g), Some(guidance)) => {
                let gv = (guidance.to_dtype(dtype)? * 1000.0)?;
                temb = (temb + g.forward(&timestep_features(&gv, 256)?.to_dtype(dtype)?)?)?;
            }
            (Some(_), None) => {
                return Err(crate::Error::invalid(
                    "guidance",
                    "this FLUX model embeds the guidance scale: it is required",
                ))
            }
            (None, _) => {}
        }
        let temb = (temb + self.text_embedder.forward(pooled)?)?;
        let txt = self.context_embedder.forward(txt)?;
        let ids = Tensor::cat(&[txt_ids, img_ids], 0)?;
        let (cos, sin) = rope_tables(&ids, &self.config.axes_dims_rope, 10000.0)?;
        let rope = (cos.to_device(img.device())?, sin.to_device(img.device())?);
        let (mut img, mut txt) = (img, txt);
        for block in &self.double {
            (img, txt) = block.forward(&img, &txt, &temb, &rope)?;
        }
        let t_len = txt.dim(1)?;
        let s_len = img.dim(1)?;
        let mut x = Tensor::cat(&[&txt, &img], 1)?;
        for block in &self.single {
            x = block.forward(&x, &temb, &rope)?;
        }
        let img = x.narrow(1, t_len, s_len)?;
        let m = modulation(&self.norm_out, &temb, 2)?;
        // AdaLayerNormContinuous: scale first, then shift.
        let img = modulate(&img, &m[1], &m[0])?;
        Ok(self.proj_out.forward(&img)?)
    }
}

/// One renamed tensor: (diffusers name, original key, row ranges of the original, empty for
/// all).
pub type RenameStep = (String, String, Vec<(usize, usize)>);

/// Layers of an original (Black Forest Labs) FLUX transformer outside the blocks that diffusers
/// renames one to one: (original, diffusers).
const GLOBAL_RENAMES: [(&str, &str); 7] = [
    (
        "time_in.in_layer",
        "time_text_embed.timestep_embedder.linear_1",
    ),
    (
        "time_in.out_layer",
        "time_text_embed.timestep_embedder.linear_2",
    ),
    (
        "vector_in.in_layer",
        "time_text_embed.text_embedder.linear_1",
    ),
    (
        "vector_in.out_layer",
        "time_text_embed.text_embedder.linear_2",
    ),
    ("txt_in", "context_embedder"),
    ("img_in", "x_embedder"),
    ("final_layer.linear", "proj_out"),
];
/// The guidance embedding of FLUX dev.
const GUIDANCE_RENAMES: [(&str, &str); 2] = [
    (
        "guidance_in.in_layer",
        "time_text_embed.guidance_embedder.linear_1",
    ),
    (
        "guidance_in.out_layer",
        "time_text_embed.guidance_embedder.linear_2",
    ),
];
/// The final modulation: (shift, scale) rows in the original, (scale, shift) in diffusers.
const FINAL_MODULATION: (&str, &str) = ("final_layer.adaLN_modulation.1", "norm_out.linear");
/// Layers of a double block renamed one to one.
const DOUBLE_RENAMES: [(&str, &str); 8] = [
    ("img_mod.lin", "norm1.linear"),
    ("txt_mod.lin", "norm1_context.linear"),
    ("img_attn.proj", "attn.to_out.0"),
    ("txt_attn.proj", "attn.to_add_out"),
    ("img_mlp.0", "ff.net.0.proj"),
    ("img_mlp.2", "ff.net.2"),
    ("txt_mlp.0", "ff_context.net.0.proj"),
    ("txt_mlp.2", "ff_context.net.2"),
];
/// A double block's fused qkv layers, split in three equal row ranges.
const DOUBLE_QKV: [(&str, [&str; 3]); 2] = [
    ("img_attn.qkv", ["attn.to_q", "attn.to_k", "attn.to_v"]),
    (
        "txt_attn.qkv",
        ["attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"],
    ),
];
/// Layers of a single block renamed one to one.
const SINGLE_RENAMES: [(&str, &str); 2] =
    [("linear2", "proj_out"), ("modulation.lin", "norm.linear")];
/// A single block's `linear1` = [q; k; v; mlp]: (diffusers layer, first row, rows) in widths.
const SINGLE_LINEAR1: [(&str, usize, usize); 4] = [
    ("attn.to_q", 0, 1),
    ("attn.to_k", 1, 1),
    ("attn.to_v", 2, 1),
    ("proj_mlp", 3, 4),
];

/// A layer of ours and the rows of an original layer's output it takes (empty: all).
pub type RowsOf = (String, Vec<(usize, usize)>);

/// The layers of an original-name FLUX transformer, each with the layers of ours it feeds and
/// the rows of its output each takes (empty: all), for the transformer layers in `layers`
/// (loaded with diffusers' names). Adapters written for the original layers (kohya and BFL
/// LoRAs) attach through this.
pub fn original_lora_targets(layers: &[LayerInfo]) -> Vec<(String, Vec<RowsOf>)> {
    let paths: HashMap<&str, LayerShape> = layers
        .iter()
        .filter(|l| l.component == "transformer")
        .map(|l| (l.path.as_str(), l.shape))
        .collect();
    let Some(dim) = paths.get("x_embedder").map(|s| s.dims().1) else {
        return Vec::new();
    };
    let count = |prefix: &str| numbered_count(paths.keys().copied(), prefix);
    let whole = |new: &str| vec![(new.to_string(), Vec::new())];
    let mut out = Vec::new();
    for (old, new) in GLOBAL_RENAMES.iter().chain(GUIDANCE_RENAMES.iter()) {
        out.push((old.to_string(), whole(new)));
    }
    out.push((
        FINAL_MODULATION.0.to_string(),
        vec![(FINAL_MODULATION.1.to_string(), vec![(dim, dim), (0, dim)])],
    ));
    for i in 0..count("transformer_blocks.") {
        let (o, b) = (
            format!("double_blocks.{i}."),
            format!("transformer_blocks.{i}."),
        );
        for (old, new) in DOUBLE_RENAMES {
            out.push((format!("{o}{old}"), whole(&format!("{b}{new}"))));
        }
        for (old, names) in DOUBLE_QKV {
            let parts = names
                .iter()
                .enumerate()
                .map(|(j, n)| (format!("{b}{n}"), vec![(j * dim, dim)]))
                .collect();
            out.push((format!("{o}{old}"), parts));
        }
    }
    for i in 0..count("single_transformer_blocks.") {
        let (o, b) = (
            format!("single_blocks.{i}."),
            format!("single_transformer_blocks.{i}."),
        );
        for (old, new) in SINGLE_RENAMES {
            out.push((format!("{o}{old}"), whole(&format!("{b}{new}"))));
        }
        let parts = SINGLE_LINEAR1
            .iter()
            .map(|(n, start, len)| (format!("{b}{n}"), vec![(start * dim, len * dim)]))
            .collect();
        out.push((format!("{o}linear1"), parts));
    }
    out
}

/// How diffusers names the tensors of a single-file FLUX transformer with the original
/// (Black Forest Labs) key names: (diffusers name, original key, row ranges of the original
/// concatenated, empty for all), as diffusers' `convert_flux_transformer_checkpoint_to_diffusers`
/// renames them: qkv split into q / k / v, the single blocks' `linear1` into q / k / v / mlp,
/// and the final modulation turned from (shift, scale) to (scale, shift). A
/// `model.diffusion_model.` prefix is accepted; a tensor that maps to nothing is an error.
pub fn original_plan(originals: &HashMap<String, Vec<usize>>) -> Result<Vec<RenameStep>> {
    let key: HashMap<String, String> = originals
        .keys()
        .map(|k| {
            let short = k.strip_prefix("model.diffusion_model.").unwrap_or(k);
            (short.to_string(), k.clone())
        })
        .collect();
    let mut used = std::collections::HashSet::new();
    let mut plan = Vec::new();
    let bad = |m: String| crate::Error::invalid("transformer", m);
    let mut add = |new: String, old: &str, rows: Vec<(usize, usize)>| -> Result<()> {
        let full = key
            .get(old)
            .ok_or_else(|| bad(format!("missing tensor {old:?}")))?;
        used.insert(full.clone());
        plan.push((new, full.clone(), rows));
        Ok(())
    };
    let rows0 = |old: &str| -> Result<usize> {
        key.get(old)
            .and_then(|k| originals.get(k))
            .and_then(|s| s.first().copied())
            .ok_or_else(|| bad(format!("missing tensor {old:?}")))
    };
    let mut renames = GLOBAL_RENAMES.to_vec();
    if key.contains_key("guidance_in.in_layer.weight") {
        renames.extend(GUIDANCE_RENAMES);
    }
    for (old, new) in renames {
        for p in ["weight", "bias"] {
            add(format!("{new}.{p}"), &format!("{old}.{p}"), Vec::new())?;
        }
    }
    for p in ["weight", "bias"] {
        let old = format!("{}.{p}", FINAL_MODULATION.0);
        let half = rows0(&old)? / 2;
        add(
            format!("{}.{p}", FINAL_MODULATION.1),
            &old,
            vec![(half, half), (0, half)],
        )?;
    }
    let count = |prefix: &str| numbered_count(key.keys().map(String::as_str), prefix);
    for i in 0..count("double_blocks.") {
        let (o, b) = (
            format!("double_blocks.{i}."),
            format!("transformer_blocks.{i}."),
        );
        for p in ["weight", "bias"] {
            for (old, new) in DOUBLE_RENAMES {
                add(
                    format!("{b}{new}.{p}"),
                    &format!("{o}{old}.{p}"),
                    Vec::new(),
                )?;
            }
            for (old, names) in DOUBLE_QKV {
                let old = format!("{o}{old}.{p}");
                let n = rows0(&old)?;
                if n % 3 != 0 {
                    return Err(bad(format!("{old}: {n} rows do not split in three")));
                }
                let d = n / 3;
                for (j, name) in names.into_iter().enumerate() {
                    add(format!("{b}{name}.{p}"), &old, vec![(j * d, d)])?;
                }
            }
        }
        for (old, new) in [
            ("img_attn.norm.query_norm.scale", "attn.norm_q.weight"),
            ("img_attn.norm.key_norm.scale", "attn.norm_k.weight"),
            ("txt_attn.norm.query_norm.scale", "attn.norm_added_q.weight"),
            ("txt_attn.norm.key_norm.scale", "attn.norm_added_k.weight"),
        ] {
            add(format!("{b}{new}"), &format!("{o}{old}"), Vec::new())?;
        }
    }
    for i in 0..count("single_blocks.") {
        let (o, b) = (
            format!("single_blocks.{i}."),
            format!("single_transformer_blocks.{i}."),
        );
        for p in ["weight", "bias"] {
            for (old, new) in SINGLE_RENAMES {
                add(
                    format!("{b}{new}.{p}"),
                    &format!("{o}{old}.{p}"),
                    Vec::new(),
                )?;
            }
            // linear1 = [q; k; v; mlp] with mlp = 4 x width.
            let old = format!("{o}linear1.{p}");
            let n = rows0(&old)?;
            if n % 7 != 0 {
                return Err(bad(format!(
                    "{old}: {n} rows are not 3 x width + 4 x width"
                )));
            }
            let d = n / 7;
            for (name, start, len) in SINGLE_LINEAR1 {
                add(format!("{b}{name}.{p}"), &old, vec![(start * d, len * d)])?;
            }
        }
        add(
            format!("{b}attn.norm_q.weight"),
            &format!("{o}norm.query_norm.scale"),
            Vec::new(),
        )?;
        add(
            format!("{b}attn.norm_k.weight"),
            &format!("{o}norm.key_norm.scale"),
            Vec::new(),
        )?;
    }
    if let Some(extra) = originals.keys().find(|k| !used.contains(*k)) {
        return Err(bad(format!(
            "unexpected tensor {extra:?} in a FLUX transformer file"
        )));
    }
    Ok(plan)
}

/// Renames a single-file FLUX transformer's tensors to diffusers' names (see
/// [`original_plan`]).
pub fn original_to_diffusers(tensors: HashMap<String, Tensor>) -> Result<HashMap<String, Tensor>> {
    let shapes: HashMap<String, Vec<usize>> = tensors
        .iter()
        .map(|(k, t)| (k.clone(), t.dims().to_vec()))
        .collect();
    let plan = original_plan(&shapes)?;
    let mut out = HashMap::new();
    for (new, old, rows) in plan {
        out.insert(new, take_rows(tensors[&old].clone(), &rows)?);
    }
    Ok(out)
}

/// A transformer config from the shapes of diffusers-named weights. The rotary axes are not
/// in the weights: `axes_dims_rope` must be given, or is FLUX.1's (16, 56, 56) when the head
/// size is 128.
pub fn infer_config(
    w: &std::collections::HashMap<String, Tensor>,
    axes_dims_rope: Option<Vec<usize>>,
) -> Result<FluxConfig> {
    let shapes: HashMap<String, Vec<usize>> = w
        .iter()
        .map(|(k, t)| (k.clone(), t.dims().to_vec()))
        .collect();
    infer_config_from_shapes(&shapes, axes_dims_rope)
}

/// As [`infer_config`], from the shapes alone.
pub fn infer_config_from_shapes(
    w: &HashMap<String, Vec<usize>>,
    axes_dims_rope: Option<Vec<usize>>,
) -> Result<FluxConfig> {
    // The shape of `name`, which must have `rank` dimensions.
    let shape = |name: &str, rank: usize| -> Result<Vec<usize>> {
        let s = w.get(name).cloned().ok_or_else(|| {
            crate::Error::invalid("transformer", format!("missing tensor {name:?}"))
        })?;
        if s.len() != rank {
            return Err(crate::Error::invalid(
                "transformer",
                format!("{name}: expected {rank} dimensions, got shape {s:?}"),
            ));
        }
        Ok(s)
    };
    let x = shape("x_embedder.weight", 2)?;
    let (inner, in_channels) = (x[0], x[1]);
    let head_dim = shape("transformer_blocks.0.attn.norm_q.weight", 1)
        .or_else(|_| shape("single_transformer_blocks.0.attn.norm_q.weight", 1))?[0];
    if head_dim == 0 || inner % head_dim != 0 {
        return Err(crate::Error::invalid(
            "transformer",
            format!("width {inner} is not a multiple of the head size {head_dim}"),
        ));
    }
    let count = |prefix: &str| numbered_count(w.keys().map(String::as_str), prefix);
    let axes = match axes_dims_rope {
        Some(a) => a,
        None if head_dim == 128 => vec![16, 56, 56],
        None => {
            return Err(crate::Error::invalid(
                "transformer",
                format!("head size {head_dim}: the rotary axes are unknown without a config (give --components with a transformer/config.json)"),
            ))
        }
    };
    let c = FluxConfig {
        patch_size: 1,
        in_channels,
        out_channels: shape("proj_out.weight", 2)?[0],
        num_layers: count("transformer_blocks."),
        num_single_layers: count("single_transformer_blocks."),
        attention_head_dim: head_dim,
        num_attention_heads: inner / head_dim,
        joint_attention_dim: shape("context_embedder.weight", 2)?[1],
        pooled_projection_dim: shape("time_text_embed.text_embedder.linear_1.weight", 2)?[1],
        guidance_embeds: w.contains_key("time_text_embed.guidance_embedder.linear_1.weight"),
        axes_dims_rope: axes,
    };
    if c.axes_dims_rope.iter().sum::<usize>() != c.attention_head_dim {
        return Err(crate::Error::invalid(
            "transformer",
            format!(
                "rotary axes {:?} do not add up to the head size {}",
                c.axes_dims_rope, c.attention_head_dim
            ),
        ));
    }
    Ok(c)
}
