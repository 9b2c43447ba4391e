//! A1111's infotext: the `info` JSON of a txt2img / img2img answer, and the fields
//! `/png-info` parses from a `parameters` text (`Steps: 20, Sampler: Euler a, ...`).

use serde_json::{json, Map, Value};

use sd_engine::{GenerationRequest, ModelSpec, Operation};

/// What the `info` of an answer reports.
pub struct InfoInput<'a> {
    pub request: &'a GenerationRequest,
    pub spec: &'a ModelSpec,
    /// The seed of the first image; image `i` used `seed + i`.
    pub seed: u64,
    pub images: usize,
    pub batch_size: usize,
    pub sampler_name: &'static str,
    pub schedule: &'static str,
    /// The `parameters` text of each image.
    pub infotexts: Vec<String>,
    pub timestamp: String,
}

/// The `info` string: A1111's `Processed.js()` keys, as a JSON text.
pub fn info_json(i: &InfoInput) -> String {
    let p = &i.request.params;
    let n = i.images;
    let prompt = p.prompt.clone();
    let negative = p.negative_prompt.clone().unwrap_or_default();
    let seeds: Vec<u64> = (0..n as u64).map(|k| i.seed.wrapping_add(k)).collect();
    let strength = i.request.input.as_ref().map(|input| input.strength);
    let mut extra = Map::new();
    extra.insert("Schedule type".into(), json!(i.schedule));
    if let Some(s) = strength {
        extra.insert("Denoising strength".into(), json!(s));
    }
    json!({
        "prompt": prompt,
        "all_prompts": vec![prompt.clone(); n],
        "negative_prompt": negative,
        "all_negative_prompts": vec![negative.clone(); n],
        "seed": i.seed,
        "all_seeds": seeds,
        "subseed": -1,
        "all_subseeds": vec![-1; n],
        "subseed_strength": 0,
        "width": p.width,
        "height": p.height,
        "sampler_name": i.sampler_name,
        "cfg_scale": p.guidance,
        "steps": p.steps,
        "batch_size": i.batch_size,
        "restore_faces": false,
        "face_restoration_model": null,
        "sd_model_name": i.spec.name,
        "sd_model_hash": null,
        "sd_vae_name": null,
        "sd_vae_hash": null,
        "seed_resize_from_w": -1,
        "seed_resize_from_h": -1,
        "denoising_strength": strength,
        "extra_generation_params": extra,
        "index_of_first_image": 0,
        "infotexts": i.infotexts,
        "styles": [],
        "job_timestamp": i.timestamp,
        "clip_skip": 1,
        "is_using_inpainting_conditioning": i.spec.inpainting_model && i.request.operation == Operation::Inpaint,
        "version": concat!("sd-worker ", env!("CARGO_PKG_VERSION")),
    })
    .to_string()
}

/// Splits a settings line `k: v, k: "v, with commas", ...` into pairs.
fn settings(line: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut rest = line.trim();
    while let Some((key, after)) = rest.split_once(':') {
        let after = after.trim_start();
        let (value, next) = if let Some(quoted) = after.strip_prefix('"') {
            // A JSON string: up to the closing quote that is not escaped.
            let mut end = None;
            let mut escaped = false;
            for (i, c) in quoted.char_indices() {
                match c {
                    '\\' if !escaped => escaped = true,
                    '"' if !escaped => {
                        end = Some(i);
                        break;
                    }
                    _ => escaped = false,
                }
            }
            let end = end.unwrap_or(quoted.len());
            let raw = format!("\"{}\"", &quoted[..end]);
            let value =
                serde_json::from_str::<String>(&raw).unwrap_or_else(|_| quoted[..end].to_string());
            let next = quoted.get(end + 1..).unwrap_or("");
            (value, next.trim_start().strip_prefix(',').unwrap_or(next))
        } else {
            match after.split_once(',') {
                Some((v, next)) => (v.trim().to_string(), next),
                None => (after.trim().to_string(), ""),
            }
        };
        out.push((key.trim().to_string(), value));
        rest = next.trim();
    }
    out
}

/// The fields of a `parameters` text, as A1111's `parse_generation_parameters` returns them:
/// `Prompt`, `Negative prompt`, every setting as a string, `Size` split into `Size-1` and
/// `Size-2`.
pub fn parse(text: &str) -> Value {
    let mut out = Map::new();
    if text.is_empty() {
        return Value::Object(out);
    }
    let mut lines: Vec<&str> = text.lines().collect();
    let last = lines.last().copied().unwrap_or("");
    let settings_line = if last.contains("Steps:") && settings(last).len() >= 3 {
        lines.pop()
    } else {
        None
    };
    let mut prompt = Vec::new();
    let mut negative: Vec<&str> = Vec::new();
    let mut in_negative = false;
    for line in lines {
        if let Some(rest) = line.strip_prefix("Negative prompt:") {
            in_negative = true;
            negative.push(rest.trim_start());
        } else if in_negative {
            negative.push(line);
        } else {
            prompt.push(line);
        }
    }
    out.insert("Prompt".into(), Value::String(prompt.join("\n")));
    out.insert("Negative prompt".into(), Value::String(negative.join("\n")));
    for (k, v) in settings_line.map(settings).unwrap_or_default() {
        if k == "Size" {
            if let Some((w, h)) = v.split_once('x') {
                out.insert("Size-1".into(), Value::String(w.to_string()));
                out.insert("Size-2".into(), Value::String(h.to_string()));
                continue;
            }
        }
        out.insert(k, Value::String(v));
    }
    Value::Object(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Hand-written infotexts, as A1111 and this worker write them.
    #[test]
    fn infotexts_parse_as_a1111_parses_them() {
        let v = parse("a cat, (blue:1.2)\nsecond line\nNegative prompt: blurry, dark\nSteps: 20, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7.0, Seed: 42, Size: 512x768, Model: m, Lora: \"a:0.8, b:-0.5\"");
        assert_eq!(v["Prompt"], "a cat, (blue:1.2)\nsecond line");
        assert_eq!(v["Negative prompt"], "blurry, dark");
        assert_eq!(v["Steps"], "20");
        assert_eq!(v["Sampler"], "DPM++ 2M");
        assert_eq!(v["Schedule type"], "Karras");
        assert_eq!(v["CFG scale"], "7.0");
        assert_eq!(
            (v["Size-1"].as_str(), v["Size-2"].as_str()),
            (Some("512"), Some("768"))
        );
        assert_eq!(v["Lora"], "a:0.8, b:-0.5");
        let v = parse("just a prompt");
        assert_eq!(v["Prompt"], "just a prompt");
        assert!(v.get("Steps").is_none());
        assert_eq!(parse(""), json!({}));
    }
}
