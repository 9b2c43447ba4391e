//! PNG output with the AUTOMATIC1111-style `parameters` text chunk.

use std::io::BufWriter;

use anyhow::Result;
use sd_models::lora::LoraSpec;
use sd_models::pipelines::{GenerateParams, RgbImage};
use sd_models::samplers::{SamplerKind, Schedule};

/// The generation settings, written in AUTOMATIC1111's `parameters` format.
pub struct Parameters<'a> {
    pub prompt: &'a str,
    pub negative_prompt: Option<&'a str>,
    pub steps: usize,
    pub sampler: &'a str,
    /// A1111's label of the schedule ("Karras"), when it is not the model's own.
    pub schedule: Option<&'a str>,
    /// `eta` and `s_noise` where they are not their defaults, with A1111's keys ("Eta DDIM"
    /// for DDIM, "Eta" for TCD, "Sigma noise").
    pub sampler_options: Vec<(&'static str, f64)>,
    pub guidance: f64,
    pub seed: u64,
    pub width: usize,
    pub height: usize,
    pub model: &'a str,
    /// (batch size, position) when more than one image was generated.
    pub batch: Option<(usize, usize)>,
    /// Image-to-image strength (A1111's "Denoising strength").
    pub strength: Option<f64>,
}

impl<'a> Parameters<'a> {
    /// The settings of a generation job; `batch` is (batch size, position) when the job made
    /// more than one image.
    pub fn for_job(
        params: &'a GenerateParams,
        model: &'a str,
        batch: Option<(usize, usize)>,
    ) -> Self {
        Parameters {
            prompt: &params.prompt,
            negative_prompt: params.negative_prompt.as_deref(),
            steps: params.steps,
            sampler: params.sampler.a1111_name(),
            schedule: (params.schedule != Schedule::Model).then(|| params.schedule.a1111_label()),
            sampler_options: sampler_options(params),
            guidance: params.guidance,
            seed: params.seed,
            width: params.width,
            height: params.height,
            model,
            batch,
            strength: None,
        }
    }

    pub fn to_text(&self) -> String {
        let mut s = String::new();
        s.push_str(self.prompt);
        s.push('\n');
        if let Some(neg) = self.negative_prompt.filter(|n| !n.is_empty()) {
            s.push_str("Negative prompt: ");
            s.push_str(neg);
            s.push('\n');
        }
        // A1111 prints the scale as a Python float: 7.0, 7.5.
        let cfg = py_float(self.guidance);
        s.push_str(&format!("Steps: {}, Sampler: {}", self.steps, self.sampler));
        if let Some(schedule) = self.schedule {
            s.push_str(&format!(", Schedule type: {schedule}"));
        }
        s.push_str(&format!(
            ", CFG scale: {cfg}, Seed: {}, Size: {}x{}, Model: {}",
            self.seed, self.width, self.height, self.model
        ));
        for (key, value) in &self.sampler_options {
            s.push_str(&format!(", {key}: {}", py_float(*value)));
        }
        if let Some(strength) = self.strength {
            s.push_str(&format!(", Denoising strength: {}", py_float(strength)));
        }
        if let Some((size, pos)) = self.batch {
            s.push_str(&format!(", Batch size: {size}, Batch pos: {pos}"));
        }
        s
    }
}

/// The sampler options that change the image from the defaults, as A1111 writes them.
fn sampler_options(p: &GenerateParams) -> Vec<(&'static str, f64)> {
    let mut out = Vec::new();
    if p.eta != 0.0 {
        let key = if p.sampler == SamplerKind::Ddim {
            "Eta DDIM"
        } else {
            "Eta"
        };
        out.push((key, p.eta));
    }
    if p.s_noise != 1.0 {
        out.push(("Sigma noise", p.s_noise));
    }
    out
}

/// `text` with the LoRAs of the run appended to its settings line:
/// `, Lora: "name:strength, name:strength"` (names are file stems).
pub fn with_loras(mut text: String, loras: &[LoraSpec]) -> String {
    if loras.is_empty() {
        return text;
    }
    let list: Vec<String> = loras
        .iter()
        .map(|l| {
            let stem = l
                .path
                .file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_else(|| l.name.clone());
            format!("{stem}:{}", py_float(l.strength))
        })
        .collect();
    text.push_str(&format!(", Lora: \"{}\"", list.join(", ")));
    text
}

/// The `parameters` text of a FLUX image: FLUX has no CFG scale and no sampler choice; a
/// guidance-distilled model (dev) reports its embedded guidance as Forge does.
pub fn flux_parameters_text(
    params: &GenerateParams,
    guidance_embedded: bool,
    model: &str,
    strength: Option<f64>,
    batch: Option<(usize, usize)>,
) -> String {
    let p = params;
    let mut s = format!("{}\nSteps: {}, Sampler: Euler", p.prompt, p.steps);
    if guidance_embedded {
        s.push_str(&format!(", Distilled CFG Scale: {}", py_float(p.guidance)));
    }
    s.push_str(&format!(
        ", Seed: {}, Size: {}x{}, Model: {model}",
        p.seed, p.width, p.height
    ));
    if let Some(strength) = strength {
        s.push_str(&format!(", Denoising strength: {}", py_float(strength)));
    }
    if let Some((n, i)) = batch {
        s.push_str(&format!(", Batch size: {n}, Batch pos: {i}"));
    }
    s
}

/// What the PNG text of a job's images says beyond its parameters.
pub struct ResultInfo<'a> {
    /// Image-to-image / inpainting strength.
    pub strength: Option<f64>,
    /// FLUX jobs: Some(whether the model embeds the guidance scale).
    pub flux: Option<bool>,
    pub model: &'a str,
    pub loras: &'a [LoraSpec],
}

/// PNG files of a finished job, each with its `parameters` text; the job's LoRAs end the
/// settings line. The CLI and the HTTP APIs write the same text for the same settings.
pub fn encode_job_results(
    params: &GenerateParams,
    info: &ResultInfo<'_>,
    images: &[RgbImage],
) -> Result<Vec<Vec<u8>>> {
    let n = images.len();
    images
        .iter()
        .enumerate()
        .map(|(i, image)| {
            let batch = (n > 1).then_some((n, i));
            let text = match info.flux {
                Some(embedded) => {
                    flux_parameters_text(params, embedded, info.model, info.strength, batch)
                }
                None => {
                    let mut text = Parameters::for_job(params, info.model, batch);
                    text.strength = info.strength;
                    text.to_text()
                }
            };
            encode_png(image, &with_loras(text, info.loras))
        })
        .collect()
}

/// A float as Python prints it: `7.0`, `7.5`.
pub fn py_float(v: f64) -> String {
    if v.fract() == 0.0 {
        format!("{v:.1}")
    } else {
        format!("{v}")
    }
}

/// Encodes an RGB image as PNG bytes with a `parameters` text chunk (tEXt when the text is
/// Latin-1, iTXt otherwise; none when `parameters` is empty).
pub fn encode_png(image: &RgbImage, parameters: &str) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    {
        let mut enc = png::Encoder::new(
            BufWriter::new(&mut out),
            image.width as u32,
            image.height as u32,
        );
        enc.set_color(png::ColorType::Rgb);
        enc.set_depth(png::BitDepth::Eight);
        if parameters.is_empty() {
            // Previews: no text chunk.
        } else if parameters.chars().all(|c| (c as u32) < 256) {
            enc.add_text_chunk("parameters".into(), parameters.into())?;
        } else {
            enc.add_itxt_chunk("parameters".into(), parameters.into())?;
        }
        let mut writer = enc.write_header()?;
        writer.write_image_data(&image.pixels)?;
        writer.finish()?;
    }
    Ok(out)
}

/// The text chunks of a PNG file (tEXt, zTXt and iTXt), in file order; an empty list for a
/// file that is not a PNG. Reading the header and chunks allocates no pixel buffer.
pub fn text_chunks(bytes: &[u8]) -> Vec<(String, String)> {
    let mut decoder = png::Decoder::new(std::io::Cursor::new(bytes));
    decoder.set_ignore_text_chunk(false);
    let Ok(reader) = decoder.read_info() else {
        return Vec::new();
    };
    let info = reader.info();
    let mut out: Vec<(String, String)> = info
        .uncompressed_latin1_text
        .iter()
        .map(|t| (t.keyword.clone(), t.text.clone()))
        .collect();
    out.extend(
        info.compressed_latin1_text
            .iter()
            .filter_map(|t| Some((t.keyword.clone(), t.get_text().ok()?))),
    );
    out.extend(
        info.utf8_text
            .iter()
            .filter_map(|t| Some((t.keyword.clone(), t.get_text().ok()?))),
    );
    out
}
