//! What SDXL adds to the Stable Diffusion pipeline, with the semantics of diffusers'
//! `StableDiffusionXL{,Img2Img,Inpaint}Pipeline`: a second text encoder whose penultimate
//! hidden states are concatenated with the first's, its projected pooled embedding, and the
//! size / crop ids (micro-conditioning) that the UNet's `text_time` embedding takes.
//!
//! The denoising loop, image-to-image and inpainting are [`super::sd`]'s: SDXL only changes
//! what the UNet is conditioned on.

use candle_core::{DType, Device, Tensor};

use crate::modules::clip::ClipTextModel;
use crate::modules::unet::AddedCond;
use crate::tokenizer::clip::ClipTokenizer;
use crate::{Error, Result};

/// The second text encoder of an SDXL model and the pipeline options that go with it.
pub struct XlText {
    pub tokenizer: ClipTokenizer,
    /// A `CLIPTextModelWithProjection`.
    pub text_encoder: ClipTextModel,
    /// `model_index.json`'s `force_zeros_for_empty_prompt`: without a negative prompt the
    /// unconditional embeddings are zeros instead of the empty prompt's encoding.
    pub force_zeros_for_empty_prompt: bool,
}

/// The two text encoders of an SDXL pipeline, borrowed for one encoding.
pub struct XlEncoders<'a> {
    pub tokenizer: &'a ClipTokenizer,
    pub text_encoder: &'a ClipTextModel,
    pub xl: &'a XlText,
    pub device: &'a Device,
    /// The dtype the UNet takes the embeddings in.
    pub dtype: DType,
}

/// A (height, width) or (top, left) pair in pixels.
pub type Pair = (u32, u32);

/// SDXL's micro-conditioning, as diffusers' call arguments of the same names; `None` takes
/// diffusers' default (the image size for sizes, (0, 0) for crops).
///
/// The negative ids equal the positive ones unless a `negative_*` field is given; then each
/// missing negative value takes its positive counterpart, except the negative crop, which
/// defaults to (0, 0) for text-to-image and to `crops_coords_top_left` for image-to-image and
/// inpainting, as in diffusers. (diffusers' text-to-image pipeline ignores the negative fields
/// unless both negative sizes are given, and its image pipelines ignore
/// `negative_crops_coords_top_left`; here a given field is always used.)
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MicroConditioning {
    pub original_size: Option<Pair>,
    pub crops_coords_top_left: Option<Pair>,
    pub target_size: Option<Pair>,
    pub negative_original_size: Option<Pair>,
    pub negative_crops_coords_top_left: Option<Pair>,
    pub negative_target_size: Option<Pair>,
}

impl MicroConditioning {
    /// Whether any field is set (they only apply to SDXL models).
    pub fn is_set(&self) -> bool {
        *self != Self::default()
    }

    fn has_negative(&self) -> bool {
        self.negative_original_size.is_some()
            || self.negative_crops_coords_top_left.is_some()
            || self.negative_target_size.is_some()
    }

    /// The positive and negative ids: original (h, w), crop (top, left), target (h, w).
    /// `from_image`: image-to-image or inpainting.
    pub fn time_ids(&self, height: usize, width: usize, from_image: bool) -> ([f32; 6], [f32; 6]) {
        let size = (height as u32, width as u32);
        let orig = self.original_size.unwrap_or(size);
        let crop = self.crops_coords_top_left.unwrap_or((0, 0));
        let target = self.target_size.unwrap_or(size);
        let ids = |a: Pair, b: Pair, c: Pair| [a.0, a.1, b.0, b.1, c.0, c.1].map(|v| v as f32);
        let pos = ids(orig, crop, target);
        if !self.has_negative() {
            return (pos, pos);
        }
        let neg_crop_default = if from_image { crop } else { (0, 0) };
        let neg = ids(
            self.negative_original_size.unwrap_or(orig),
            self.negative_crops_coords_top_left
                .unwrap_or(neg_crop_default),
            self.negative_target_size.unwrap_or(target),
        );
        (pos, neg)
    }
}

/// What the UNet is conditioned on for a whole run.
pub struct Conditioning {
    /// (batch [x 2 with guidance], tokens, width): `[negative x batch, prompt x batch]`.
    pub context: Tensor,
    /// SDXL only.
    pub added: Option<AddedCond>,
}

/// One prompt through both encoders: the concatenated penultimate states (1, 77, w1 + w2)
/// and the second encoder's projected pooled embedding (1, p).
fn encode_text(enc: &XlEncoders, text: &str) -> Result<(Tensor, Tensor, usize)> {
    let device = enc.device;
    let (ids1, count) = enc.tokenizer.encode_padded(text);
    let n1 = ids1.len();
    let h1 = enc
        .text_encoder
        .forward_hidden(&Tensor::from_vec(ids1, (1, n1), device)?)?;
    let (ids2, _) = enc.xl.tokenizer.encode_padded(text);
    let n2 = ids2.len();
    let h2 =
        enc.xl
            .text_encoder
            .forward_hidden(&Tensor::from_vec(ids2.clone(), (1, n2), device)?)?;
    let pooled = enc.xl.text_encoder.projected_pooled(&h2.last, &ids2)?;
    let context = Tensor::cat(&[&h1.penultimate, &h2.penultimate], 2)?;
    let kept = enc.tokenizer.max_length().saturating_sub(2);
    Ok((context, pooled, count.saturating_sub(kept)))
}

/// A prompt read with A1111's syntax through both encoders, as A1111 conditions SDXL: each
/// 77-token chunk's penultimate states weighted (per encoder, "Original" emphasis) and
/// concatenated, chunks joined along the sequence; the pooled embedding is the first chunk's.
fn encode_chunks(enc: &XlEncoders, text: &str) -> Result<(Tensor, Tensor)> {
    use crate::tokenizer::a1111::{chunks, emphasis};
    let (c1, _) = chunks(enc.tokenizer, text);
    let (c2, _) = chunks(&enc.xl.tokenizer, text);
    if c1.len() != c2.len() {
        return Err(Error::invalid(
            "prompt",
            "the two tokenizers split this prompt into different chunks",
        ));
    }
    let device = enc.device;
    let ids = |t: &[u32]| Tensor::from_slice(t, (1, t.len()), device);
    let mut parts = Vec::with_capacity(c1.len());
    let mut pooled = None;
    for (a, b) in c1.iter().zip(&c2) {
        let h1 = enc.text_encoder.forward_hidden(&ids(&a.tokens)?)?;
        let h2 = enc.xl.text_encoder.forward_hidden(&ids(&b.tokens)?)?;
        if pooled.is_none() {
            pooled = Some(enc.xl.text_encoder.projected_pooled(&h2.last, &b.tokens)?);
        }
        let z1 = emphasis(&h1.penultimate, &a.multipliers)?;
        let z2 = emphasis(&h2.penultimate, &b.multipliers)?;
        parts.push(Tensor::cat(&[z1, z2], 2)?);
    }
    let pooled = pooled.ok_or_else(|| Error::invalid("prompt", "no token chunk"))?;
    Ok((Tensor::cat(&parts, 1)?, pooled))
}

/// As [`condition`] with A1111's prompt syntax: prompts of any length; an empty negative prompt
/// gives zeros (as A1111 conditions SDXL); the shorter of prompt and negative prompt is
/// extended with the empty prompt's chunk until both have as many chunks.
pub fn condition_a1111(
    enc: &XlEncoders,
    prompt: &str,
    negative: Option<&str>,
    batch: usize,
    guidance: bool,
    ids: ([f32; 6], [f32; 6]),
) -> Result<Conditioning> {
    let (ctx, pooled) = encode_chunks(enc, prompt)?;
    if !guidance {
        return assemble(enc, (ctx, pooled), None, batch, ids);
    }
    let negative = negative.unwrap_or("");
    // The empty prompt's encoding: the shape of the zeros, and what pads the shorter side.
    let mut empty = None;
    let (neg_ctx, neg_pooled) = if negative.is_empty() {
        let (c, p) = encode_chunks(enc, "")?;
        let zeros = (c.zeros_like()?, p.zeros_like()?);
        empty = Some(c);
        zeros
    } else {
        encode_chunks(enc, negative)?
    };
    let (ctx, neg_ctx) =
        crate::tokenizer::a1111::pad_to_same_length(ctx, neg_ctx, || match empty {
            Some(c) => Ok(c),
            None => Ok(encode_chunks(enc, "")?.0),
        })?;
    assemble(enc, (ctx, pooled), Some((neg_ctx, neg_pooled)), batch, ids)
}

/// The conditioning of `batch` images from one prompt's (context, pooled) and, with guidance,
/// the negative's: `[negative x batch, prompt x batch]`.
fn assemble(
    enc: &XlEncoders,
    cond: (Tensor, Tensor),
    uncond: Option<(Tensor, Tensor)>,
    batch: usize,
    ids: ([f32; 6], [f32; 6]),
) -> Result<Conditioning> {
    let rep = |t: &Tensor| -> Result<Tensor> {
        let mut dims = vec![batch];
        dims.extend(std::iter::repeat_n(1, t.rank() - 1));
        Ok(t.repeat(dims)?)
    };
    let device = enc.device;
    let (pos_ids, neg_ids) = ids;
    let pos_ids = Tensor::from_slice(&pos_ids, (1, 6), device)?;
    let (ctx, pooled) = cond;
    let Some((neg_ctx, neg_pooled)) = uncond else {
        return Ok(Conditioning {
            context: rep(&ctx)?.to_dtype(enc.dtype)?,
            added: Some(AddedCond {
                text_embeds: rep(&pooled)?.to_dtype(enc.dtype)?,
                time_ids: rep(&pos_ids)?,
            }),
        });
    };
    let neg_ids = Tensor::from_slice(&neg_ids, (1, 6), device)?;
    let context = Tensor::cat(&[rep(&neg_ctx)?, rep(&ctx)?], 0)?.to_dtype(enc.dtype)?;
    let text_embeds = Tensor::cat(&[rep(&neg_pooled)?, rep(&pooled)?], 0)?.to_dtype(enc.dtype)?;
    // diffusers repeats the (negative, positive) pair of ids per image, while the embeddings
    // are all negatives then all positives; kept as it is, so that batches match diffusers.
    let time_ids = Tensor::cat(&[&neg_ids, &pos_ids], 0)?.repeat((batch, 1))?;
    Ok(Conditioning {
        context,
        added: Some(AddedCond {
            text_embeds,
            time_ids,
        }),
    })
}

/// diffusers' SDXL `encode_prompt` and added conditioning for `batch` images: with guidance,
/// the unconditional half is the negative prompt's encoding, or zeros when there is no
/// negative prompt and the model forces zeros.
pub fn condition(
    enc: &XlEncoders,
    prompt: &str,
    negative: Option<&str>,
    batch: usize,
    guidance: bool,
    ids: ([f32; 6], [f32; 6]),
) -> Result<(Conditioning, (usize, usize))> {
    let (ctx, pooled, dropped) = encode_text(enc, prompt)?;
    if !guidance {
        let cond = assemble(enc, (ctx, pooled), None, batch, ids)?;
        return Ok((cond, (dropped, 0)));
    }
    let (neg_ctx, neg_pooled, neg_dropped) = match negative {
        None if enc.xl.force_zeros_for_empty_prompt => (ctx.zeros_like()?, pooled.zeros_like()?, 0),
        _ => encode_text(enc, negative.unwrap_or(""))?,
    };
    let cond = assemble(enc, (ctx, pooled), Some((neg_ctx, neg_pooled)), batch, ids)?;
    Ok((cond, (dropped, neg_dropped)))
}

/// Checks that the two encoders and the UNet fit together (at load time).
pub fn check_fit(
    pipe_text_width: usize,
    xl: &XlText,
    unet: &crate::modules::unet::UNetConfig,
) -> std::result::Result<(), String> {
    let w2 = xl.text_encoder.config.hidden_size;
    if let Some((i, d)) = unet
        .cross_attention_dim
        .iter()
        .enumerate()
        .find(|(_, &d)| d != pipe_text_width + w2)
    {
        return Err(format!(
            "cross_attention_dim[{i}] = {d} but the text encoders' hidden sizes add up to {} ({pipe_text_width} + {w2})",
            pipe_text_width + w2
        ));
    }
    let Some(tt) = unet.text_time else {
        return Err("an SDXL UNet needs addition_embed_type = \"text_time\"".into());
    };
    if !xl.text_encoder.has_projection() {
        return Err(
            "text_encoder_2 has no text_projection weights (CLIPTextModelWithProjection)".into(),
        );
    }
    let p = xl.text_encoder.config.projection_dim;
    match tt.id_count(p) {
        Some(6) => Ok(()),
        _ => Err(format!(
            "projection_class_embeddings_input_dim = {} does not fit text_encoder_2's projection_dim {p} and 6 ids of addition_time_embed_dim {} (expected {}); refiner-style models (aesthetic score) are not supported",
            tt.input_dim,
            tt.time_embed_dim,
            p + 6 * tt.time_embed_dim
        )),
    }
}
