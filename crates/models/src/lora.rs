//! Reads LoRA files and attaches them to the adaptable layers of a loaded model.
//!
//! Layouts read (any mix, in one `.safetensors` file):
//! - diffusers / PEFT: `<component>.<path>.lora_A.weight` / `.lora_B.weight`, components
//!   `unet.`, `text_encoder.`, `transformer.` (or none: the denoiser), PEFT's
//!   `base_model.model.` prefix; the scale from the file's `lora_adapter_metadata`
//!   (`lora_alpha`, `alpha_pattern`, `use_rslora`), else 1;
//! - older diffusers: `.lora.down.weight` / `.lora.up.weight`, `.lora_linear_layer.*` and the
//!   attention-processor names (`processor.to_q_lora`);
//! - kohya: `lora_unet_<path with _>` (diffusers paths, or for SDXL the original SGM ones:
//!   `input_blocks_4_1_...`), `lora_te_` / `lora_te1_<path>` for the CLIP text encoder,
//!   `lora_te2_<path>` for SDXL's second,
//!   `.lora_down.weight` / `.lora_up.weight` / `.alpha` (scale alpha / rank), including LoCon
//!   convolution adapters;
//! - FLUX: the diffusers names, and kohya / original (BFL) names, whose fused layers (`qkv`,
//!   `linear1`) are split over the separate layers the model was loaded with.
//!
//! A key that matches no layer, or whose shape does not fit its layer, is an error that lists the
//! keys (or, when not strict, a warning that lists them). Tensors other than LoRA down / up /
//! alpha (DoRA magnitudes, LoHa, LoKr, biases) are unmatched keys too.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use serde_json::Value;

use crate::modules::adapter::{with_adapters, AdapterSet, LayerInfo, LayerShape};
use crate::modules::flux::original_lora_targets;
use crate::{Error, Result};

/// Largest |strength| accepted.
pub const MAX_STRENGTH: f64 = 10.0;
/// How many unmatched modules (each with its keys) an error message names.
const LINES_IN_ERROR: usize = 12;

/// One LoRA to apply: its file, a name to report it by, its strength, and whether keys that
/// match no layer are an error (`strict`) or warnings.
#[derive(Debug, Clone, PartialEq)]
pub struct LoraSpec {
    pub name: String,
    pub path: PathBuf,
    pub strength: f64,
    pub strict: bool,
}

/// What attaching a list of LoRAs did.
#[derive(Debug, Clone, Default)]
pub struct Attached {
    pub set: AdapterSet,
    /// One line per key that was not applied (only when not strict).
    pub warnings: Vec<String>,
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Role {
    Down,
    Up,
    Alpha,
}

const SUFFIXES: [(&str, Role); 9] = [
    (".lora_A.weight", Role::Down),
    (".lora_B.weight", Role::Up),
    (".lora_down.weight", Role::Down),
    (".lora_up.weight", Role::Up),
    (".lora.down.weight", Role::Down),
    (".lora.up.weight", Role::Up),
    (".lora_linear_layer.down.weight", Role::Down),
    (".lora_linear_layer.up.weight", Role::Up),
    (".alpha", Role::Alpha),
];

/// The module a key belongs to and its role, or `None` for tensors that are not LoRA weights.
fn parse_key(key: &str) -> Option<(String, Role)> {
    let k = key.strip_prefix("base_model.model.").unwrap_or(key);
    let (module, role) = SUFFIXES
        .iter()
        .find_map(|(suffix, role)| k.strip_suffix(suffix).map(|m| (m, *role)))?;
    // diffusers' attention-processor LoRA: `<attn>.processor.to_q_lora` is `<attn>.to_q`.
    if let Some((attn, proj)) = module.split_once(".processor.") {
        let proj = proj.strip_suffix("_lora")?;
        let proj = if proj == "to_out" { "to_out.0" } else { proj };
        return Some((format!("{attn}.{proj}"), role));
    }
    Some((module.to_string(), role))
}

fn underscored(path: &str) -> String {
    path.replace('.', "_")
}

/// Where the adapter of a LoRA module goes: a layer, and the rows of the module's output that
/// belong to it (a fused original FLUX layer feeds several of ours), in order.
#[derive(Debug, Clone)]
struct Target {
    layer: usize,
    /// Row ranges of the module's `up` weight that make this layer's `up`, concatenated.
    rows: Vec<(usize, usize)>,
}

/// The names a LoRA file may use for each layer, mapped to where its adapter goes.
fn alias_map(layers: &[LayerInfo]) -> HashMap<String, Vec<Target>> {
    let mut map: HashMap<String, Vec<Target>> = HashMap::new();
    let whole = |i| {
        vec![Target {
            layer: i,
            rows: Vec::new(),
        }]
    };
    let sgm = SgmLayout::of(layers);
    for (i, l) in layers.iter().enumerate() {
        let p = &l.path;
        let names = match l.component {
            "text_encoder" => {
                let bare = p.strip_prefix("text_model.").unwrap_or(p);
                let canon = format!("text_model.{bare}");
                vec![
                    format!("text_encoder.{canon}"),
                    format!("text_encoder.{bare}"),
                    format!("lora_te_{}", underscored(&canon)),
                    format!("lora_te1_{}", underscored(&canon)),
                ]
            }
            "text_encoder_2" => {
                let bare = p.strip_prefix("text_model.").unwrap_or(p);
                let canon = format!("text_model.{bare}");
                vec![
                    format!("text_encoder_2.{canon}"),
                    format!("text_encoder_2.{bare}"),
                    format!("lora_te2_{}", underscored(&canon)),
                ]
            }
            c => {
                let mut names = vec![
                    format!("{c}.{p}"),
                    p.clone(),
                    format!("lora_unet_{}", underscored(p)),
                    format!("lora_transformer_{}", underscored(p)),
                ];
                // Kohya's SDXL LoRAs name UNet modules by their original (SGM) names.
                if let (Some(sgm), "unet") = (&sgm, c) {
                    if let Some(name) = sgm.name(p) {
                        names.push(format!("lora_unet_{}", underscored(&name)));
                    }
                }
                names
            }
        };
        for n in names {
            map.entry(n).or_insert_with(|| whole(i));
        }
    }
    // FLUX transformers loaded with diffusers names also answer to the original names.
    let index: HashMap<(&str, &str), usize> = layers
        .iter()
        .enumerate()
        .map(|(i, l)| ((l.component, l.path.as_str()), i))
        .collect();
    for (original, parts) in original_lora_targets(layers) {
        let targets: Option<Vec<Target>> = parts
            .into_iter()
            .map(|(path, rows)| {
                let layer = *index.get(&("transformer", path.as_str()))?;
                Some(Target { layer, rows })
            })
            .collect();
        let Some(targets) = targets else { continue };
        for n in [
            format!("transformer.{original}"),
            format!("diffusion_model.{original}"),
            original.clone(),
            format!("lora_unet_{}", underscored(&original)),
        ] {
            map.entry(n).or_insert_with(|| targets.clone());
        }
    }
    map
}

/// What the original (SGM) names of a UNet's modules depend on, read from its layer paths:
/// the resnets per down block (all equal, else no original names) and which up blocks have
/// attentions.
struct SgmLayout {
    layers_per_block: usize,
    up_attention: Vec<usize>,
}

impl SgmLayout {
    fn of(layers: &[LayerInfo]) -> Option<Self> {
        let mut per_block: BTreeMap<usize, usize> = BTreeMap::new();
        let mut up_attention = Vec::new();
        for l in layers.iter().filter(|l| l.component == "unet") {
            let mut parts = l.path.split('.');
            match (parts.next(), parts.next(), parts.next(), parts.next()) {
                (Some("down_blocks"), Some(b), Some("resnets"), Some(k)) => {
                    let (b, k) = (b.parse().ok()?, k.parse::<usize>().ok()?);
                    let n = per_block.entry(b).or_default();
                    *n = (*n).max(k + 1);
                }
                (Some("up_blocks"), Some(b), Some("attentions"), _) => {
                    up_attention.push(b.parse().ok()?);
                }
                _ => {}
            }
        }
        let first = *per_block.values().next()?;
        per_block.values().all(|&n| n == first).then_some(Self {
            layers_per_block: first,
            up_attention,
        })
    }

    fn name(&self, path: &str) -> Option<String> {
        crate::single_file::ldm_unet_name(path, self.layers_per_block, &|b| {
            self.up_attention.contains(&b)
        })
    }
}

/// The scale rules of a diffusers LoRA file (`lora_adapter_metadata`), per component.
#[derive(Debug, Default)]
struct PeftScales {
    by_component: HashMap<String, PeftConfig>,
}

#[derive(Debug)]
struct PeftConfig {
    alpha: Option<f64>,
    patterns: Vec<(String, f64)>,
    rslora: bool,
}

impl PeftScales {
    fn parse(name: &str, metadata: Option<&HashMap<String, String>>) -> Result<Self> {
        let Some(raw) = metadata.and_then(|m| m.get("lora_adapter_metadata")) else {
            return Ok(Self::default());
        };
        let bad = |m: String| Error::invalid("loras", format!("{name}: {m}"));
        let v: Value = serde_json::from_str(raw)
            .map_err(|e| bad(format!("lora_adapter_metadata is not JSON: {e}")))?;
        let obj = v
            .as_object()
            .ok_or_else(|| bad("lora_adapter_metadata is not a JSON object".into()))?;
        let mut by_component: HashMap<String, PeftConfig> = HashMap::new();
        for (k, v) in obj {
            // Keys are `<component>.<LoraConfig field>`.
            let Some((component, field)) = k.split_once('.') else {
                continue;
            };
            let cfg = by_component
                .entry(component.to_string())
                .or_insert(PeftConfig {
                    alpha: None,
                    patterns: Vec::new(),
                    rslora: false,
                });
            match field {
                "lora_alpha" => cfg.alpha = v.as_f64(),
                "alpha_pattern" => {
                    if let Some(p) = v.as_object() {
                        cfg.patterns = p
                            .iter()
                            .filter_map(|(k, v)| Some((k.clone(), v.as_f64()?)))
                            .collect();
                    }
                }
                "use_rslora" => cfg.rslora = v.as_bool().unwrap_or(false),
                "use_dora" if v.as_bool() == Some(true) => {
                    return Err(bad("DoRA adapters (use_dora) are not supported".into()))
                }
                _ => {}
            }
        }
        Ok(Self { by_component })
    }

    /// The scale of module `path` of `component` with `rank`, when the metadata sets one.
    fn scale(&self, component: &str, path: &str, rank: usize) -> Option<f64> {
        let cfg = self.by_component.get(component)?;
        let alpha = cfg
            .patterns
            .iter()
            .find(|(p, _)| path == p || path.ends_with(&format!(".{p}")))
            .map(|(_, a)| *a)
            .or(cfg.alpha)?;
        let r = rank as f64;
        Some(if cfg.rslora {
            alpha / r.sqrt()
        } else {
            alpha / r
        })
    }
}

#[derive(Default)]
struct Group {
    down: Option<(String, Tensor)>,
    up: Option<(String, Tensor)>,
    alpha: Option<(String, f64)>,
}

impl Group {
    fn keys(&self) -> Vec<String> {
        [
            self.down.as_ref().map(|d| d.0.clone()),
            self.up.as_ref().map(|u| u.0.clone()),
            self.alpha.as_ref().map(|a| a.0.clone()),
        ]
        .into_iter()
        .flatten()
        .collect()
    }
}

/// `t` reshaped to the layout `shape` takes: 2D for a linear layer, 4D for a convolution;
/// `None` if it cannot be (the dims must agree, with 1x1 kernels interchangeable with 2D).
fn fit(t: &Tensor, rows: usize, cols: usize, k: usize, conv: bool) -> Option<Tensor> {
    let dims = t.dims();
    let ok = match dims {
        [r, c] => *r == rows && *c == cols && (!conv || k == 1),
        [r, c, kh, kw] => *r == rows && *c == cols && *kh == k && *kw == k && (conv || k == 1),
        _ => false,
    };
    if !ok {
        return None;
    }
    if conv {
        t.reshape((rows, cols, k, k)).ok()
    } else {
        t.reshape((rows, cols)).ok()
    }
}

fn shape_of(t: &Tensor) -> String {
    format!("{:?}", t.dims())
}

/// Reads every LoRA of `specs` and attaches it to `layers` on `device` in `dtype`.
pub fn attach(
    specs: &[LoraSpec],
    layers: &[LayerInfo],
    device: &Device,
    dtype: DType,
) -> Result<Attached> {
    let aliases = alias_map(layers);
    let mut out = Attached::default();
    for spec in specs {
        attach_one(spec, layers, &aliases, device, dtype, &mut out)?;
    }
    Ok(out)
}

/// Runs `f` with the LoRAs of `specs` attached to `layers` (none: the base model), and returns
/// its result with the warnings of LoRAs that are not strict.
pub fn run_with<T>(
    specs: &[LoraSpec],
    layers: &[LayerInfo],
    device: &Device,
    dtype: DType,
    f: impl FnOnce() -> Result<T>,
) -> Result<(T, Vec<String>)> {
    if specs.is_empty() {
        return Ok((f()?, Vec::new()));
    }
    let attached = attach(specs, layers, device, dtype)?;
    let out = with_adapters(Some(std::sync::Arc::new(attached.set)), f)?;
    Ok((out, attached.warnings))
}

/// A safetensors file's `__metadata__`.
type Metadata = Option<HashMap<String, String>>;

/// Refuses pickle files by their extension: they can run code when loaded.
fn refuse_pickle(name: &str, path: &Path) -> Result<()> {
    let ext = path
        .extension()
        .and_then(|e| e.to_str())
        .unwrap_or("")
        .to_ascii_lowercase();
    if matches!(ext.as_str(), "ckpt" | "pt" | "pth" | "bin") {
        return Err(Error::invalid(
            "loras",
            format!("{name}: pickle files are not loaded (they can run code); use .safetensors"),
        ));
    }
    Ok(())
}

/// Checks that the file `name` is a safetensors file, from its header alone (the file is
/// mapped, not read), so that a request naming anything else is refused when it arrives rather
/// than failing on the engine. Loading checks again: the file may change in between.
pub fn check_file(name: &str, path: &Path) -> Result<()> {
    refuse_pickle(name, path)?;
    // SAFETY: the file is memory-mapped read-only; only its header is parsed.
    unsafe { candle_core::safetensors::MmapedSafetensors::new(path) }
        .map(drop)
        .map_err(|e| {
            // The reason alone: candle's error adds the file's absolute path.
            let mut e = &e;
            while let candle_core::Error::WithPath { inner, .. } = e {
                e = inner;
            }
            let why = match e {
                candle_core::Error::Io(e) => e.kind().to_string(),
                other => other.to_string(),
            };
            Error::invalid("loras", format!("{name}: not a safetensors file ({why})"))
        })
}

fn read_file(spec: &LoraSpec) -> Result<(Vec<u8>, Metadata)> {
    let name = &spec.name;
    refuse_pickle(name, &spec.path)?;
    let bytes = std::fs::read(&spec.path).map_err(|e| {
        let why = if e.kind() == std::io::ErrorKind::NotFound {
            "no such file".to_string()
        } else {
            e.to_string()
        };
        Error::invalid("loras", format!("{name}: cannot read: {why}"))
    })?;
    let metadata = safetensors::SafeTensors::read_metadata(&bytes)
        .map_err(|e| Error::invalid("loras", format!("{name}: not a safetensors file ({e})")))?
        .1
        .metadata()
        .clone();
    Ok((bytes, metadata))
}

fn attach_one(
    spec: &LoraSpec,
    layers: &[LayerInfo],
    aliases: &HashMap<String, Vec<Target>>,
    device: &Device,
    dtype: DType,
    out: &mut Attached,
) -> Result<()> {
    let name = &spec.name;
    if !spec.strength.is_finite() || spec.strength.abs() > MAX_STRENGTH {
        return Err(Error::invalid(
            "loras",
            format!(
                "{name}: strength must be between -{MAX_STRENGTH} and {MAX_STRENGTH}, got {}",
                spec.strength
            ),
        ));
    }
    let (bytes, metadata) = read_file(spec)?;
    let st = safetensors::SafeTensors::deserialize(&bytes)
        .map_err(|e| Error::invalid("loras", format!("{name}: not a safetensors file ({e})")))?;
    let peft = PeftScales::parse(name, metadata.as_ref())?;
    let bad = |m: String| Error::invalid("loras", format!("{name}: {m}"));

    let mut groups: BTreeMap<String, Group> = BTreeMap::new();
    // Keys not applied, by module, with the reason.
    let mut unmatched: Vec<(Vec<String>, String)> = Vec::new();
    let mut names: Vec<String> = st.names().into_iter().map(str::to_string).collect();
    names.sort();
    for key in names {
        let Some((module, role)) = parse_key(&key) else {
            unmatched.push((vec![key], "not a LoRA down, up or alpha weight".into()));
            continue;
        };
        let view = st
            .tensor(&key)
            .map_err(|e| bad(format!("cannot read {key}: {e}")))?;
        let t = candle_core::safetensors::Load::load(&view, device)
            .map_err(|e| bad(format!("cannot read {key}: {e}")))?;
        let g = groups.entry(module).or_default();
        match role {
            Role::Down => g.down = Some((key, t.to_dtype(dtype)?)),
            Role::Up => g.up = Some((key, t.to_dtype(dtype)?)),
            Role::Alpha => {
                let a = t
                    .to_dtype(DType::F64)?
                    .flatten_all()?
                    .to_vec1::<f64>()?
                    .first()
                    .copied()
                    .ok_or_else(|| bad(format!("{key} is empty")))?;
                g.alpha = Some((key, a));
            }
        }
    }

    let mut applied = 0usize;
    for (module, g) in &groups {
        let Some(targets) = aliases.get(module) else {
            unmatched.push((g.keys(), "no such layer".into()));
            continue;
        };
        let ((down_key, down), (up_key, up)) = match (&g.down, &g.up) {
            (Some(d), Some(u)) => (d, u),
            _ => {
                unmatched.push((g.keys(), "its down or up weight is missing".into()));
                continue;
            }
        };
        let rank = down.dim(0)?;
        if up.dims().get(1) != Some(&rank) {
            return Err(bad(format!(
                "{up_key} has shape {} but {down_key} has rank {rank}",
                shape_of(up)
            )));
        }
        let first = &layers[targets[0].layer];
        let scale = match g.alpha {
            Some((_, alpha)) => alpha / rank as f64,
            None => peft
                .scale(first.component, &first.path, rank)
                .unwrap_or(1.0),
        } * spec.strength;
        // Check every target before attaching any.
        let total_rows: usize = up.dim(0)?;
        let mut fitted = Vec::with_capacity(targets.len());
        let mut misfit = None;
        for t in targets {
            let layer = &layers[t.layer];
            let (din, dout) = layer.shape.dims();
            let (k, conv) = match layer.shape {
                LayerShape::Linear { .. } => (1, false),
                LayerShape::Conv { k, .. } => (k, true),
            };
            let want_rows: usize = if t.rows.is_empty() {
                dout
            } else {
                t.rows.iter().map(|r| r.1).sum()
            };
            let rows_fit = want_rows == dout
                && t.rows.iter().all(|&(s, n)| s + n <= total_rows)
                && (!t.rows.is_empty() || total_rows == dout);
            let d = fit(down, rank, din, k, conv);
            let u = if rows_fit {
                let u = if t.rows.is_empty() {
                    up.clone()
                } else {
                    let parts = t
                        .rows
                        .iter()
                        .map(|&(s, n)| up.narrow(0, s, n))
                        .collect::<candle_core::Result<Vec<_>>>()?;
                    Tensor::cat(&parts, 0)?
                };
                fit(&u, dout, rank, 1, conv)
            } else {
                None
            };
            match (d, u) {
                (Some(d), Some(u)) => fitted.push((layer, d, u)),
                _ => {
                    let want = match layer.shape {
                        LayerShape::Linear { .. } => format!("[r, {din}] / [{dout}, r]"),
                        LayerShape::Conv { k, .. } => {
                            format!("[r, {din}, {k}, {k}] / [{dout}, r, 1, 1]")
                        }
                    };
                    misfit = Some(format!(
                        "shapes {} / {} do not fit layer {} of {}: {want}",
                        shape_of(down),
                        shape_of(up),
                        layer.path,
                        layer.component
                    ));
                    break;
                }
            }
        }
        if let Some(m) = misfit {
            unmatched.push((g.keys(), m));
            continue;
        }
        for (layer, d, u) in fitted {
            out.set.attach(layer, d, u, scale)?;
        }
        applied += 1;
    }

    if unmatched.is_empty() {
        return Ok(());
    }
    let keys: usize = unmatched.iter().map(|(k, _)| k.len()).sum();
    let summary = if applied == 0 {
        format!("no key matches this model ({keys} keys)")
    } else {
        format!("{keys} keys match no layer of this model ({applied} layers matched)")
    };
    let lines: Vec<String> = unmatched
        .into_iter()
        .map(|(k, why)| format!("{} ({why})", k.join(", ")))
        .collect();
    if spec.strict {
        let more = lines.len().saturating_sub(LINES_IN_ERROR);
        let tail = if more > 0 {
            format!("; and {more} more")
        } else {
            String::new()
        };
        let shown = lines[..lines.len().min(LINES_IN_ERROR)].join("; ");
        return Err(bad(format!("{summary}: {shown}{tail}")));
    }
    out.warnings
        .push(format!("{name}: {summary}; not applied:"));
    out.warnings
        .extend(lines.into_iter().map(|l| format!("{name}: {l}")));
    Ok(())
}

/// The path of a LoRA named `name` inside `dir`: a relative path of plain components that stays
/// inside `dir` after symbolic links are resolved, naming an existing file.
pub fn resolve(dir: &Path, name: &str) -> Result<PathBuf> {
    let refuse = |m: &str| Error::invalid("loras", format!("{name:?}: {m}"));
    if name.is_empty() {
        return Err(refuse("empty name"));
    }
    let rel = Path::new(name);
    let plain = rel
        .components()
        .all(|c| matches!(c, std::path::Component::Normal(_)));
    if !plain || name.contains('\\') || name.contains('\0') {
        return Err(refuse(
            "must be a relative path inside the LoRA folder, without `..`",
        ));
    }
    let root = dir
        .canonicalize()
        .map_err(|e| Error::invalid("loras", format!("the LoRA folder cannot be read: {e}")))?;
    let mut candidates = vec![root.join(rel)];
    if rel.extension().is_none() {
        candidates.push(root.join(format!("{name}.safetensors")));
    }
    for c in candidates {
        if let Ok(real) = c.canonicalize() {
            if !real.starts_with(&root) {
                return Err(refuse("resolves outside the LoRA folder"));
            }
            if real.is_file() {
                return Ok(real);
            }
        }
    }
    Err(refuse("no such file in the LoRA folder"))
}
