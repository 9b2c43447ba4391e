//! `--model org/repo[@revision]`: a diffusers repository on the Hugging Face Hub, fetched into
//! the standard Hugging Face cache (`models--org--repo/{blobs,snapshots,refs}`, shared with
//! Python tools) and loaded from its snapshot folder.
//!
//! Only what the pipeline reads is fetched: `model_index.json`, and in each component folder
//! the config, tokenizer and scheduler files and one set of safetensors weights (the requested
//! `--variant`, else the plain files, else `fp16`); pickles, ONNX, Flax and the safety checker
//! are skipped. Downloads go to `blobs/<etag>.incomplete` and resume from there with a `Range`
//! request. `HF_ENDPOINT` sets the server, `HF_TOKEN` the bearer token (gated repos such as FLUX
//! dev need one), `HF_HUB_OFFLINE=1` uses the cache only; when the Hub cannot be reached, a
//! cached snapshot of the revision is used.
//!
//! Why not the `hf-hub` crate: it was compared with this module on what `tests/hub.rs` checks,
//! in its 1.0.0 release (reqwest, tokio and hf-xet behind a blocking wrapper) and in 0.5.0, the
//! last release with a ureq-based sync API. Both write the cache layout shared with Python's
//! huggingface_hub (blobs named by ETag, relative snapshot links, `refs/<branch>`), take branch,
//! tag and commit revisions, read HF_HOME and HF_ENDPOINT, and list a revision's files with its
//! commit (`info()`). What they lack: neither checks the SHA-256 or the size of a finished
//! download, so a corrupt transfer becomes a cached blob; 1.0.0 never resumes (it recreates
//! `blobs/<etag>.incomplete` and sends no `Range`), and 0.5.0 appends whatever the server sends
//! to its partial file without checking for a 206; neither reads HF_HUB_OFFLINE; neither sets a
//! connect timeout, and 1.0.0 retries connection errors five times instead of failing fast;
//! there is no fallback to a cached snapshot when the Hub cannot be reached (1.0.0 falls back
//! one file at a time); 0.5.0 sends the token to the CDN host on redirects. 1.0.0 would also
//! bring an async runtime into this crate, which the engine layer does not own. Choosing the
//! files (model_index.json, component configs, one weight variant) and the 401/403/404 messages
//! would stay here with either.
//!
//! Its tests of repo-id parsing and file selection are at the end; the download behaviour is
//! tested against a loopback Hub in `crates/server/tests/hub.rs`.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use serde_json::Value;

/// `org/repo` and a revision (branch, tag or commit).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RepoRef {
    pub repo: String,
    pub revision: String,
}

/// `org/repo` or `org/repo@revision` (not an existing path).
pub fn parse_repo_id(s: &str) -> Option<RepoRef> {
    if Path::new(s).exists() {
        return None;
    }
    let (repo, revision) = match s.split_once('@') {
        Some((r, rev)) if !rev.is_empty() => (r, rev),
        Some(_) => return None,
        None => (s, "main"),
    };
    let (org, name) = repo.split_once('/')?;
    let ok = |p: &str| {
        !p.is_empty()
            && p.len() <= 96
            && !p.starts_with('.')
            && p.chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
    };
    let rev_ok = revision.len() <= 256
        && !revision.contains("..")
        && revision
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '/'));
    (ok(org) && ok(name) && rev_ok).then(|| RepoRef {
        repo: repo.to_string(),
        revision: revision.to_string(),
    })
}

/// Where and how to reach the Hub.
#[derive(Debug, Clone)]
pub struct HubConfig {
    pub endpoint: String,
    pub token: Option<String>,
    pub cache: PathBuf,
    pub offline: bool,
}

fn env(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.trim().is_empty())
}

impl HubConfig {
    /// `HF_ENDPOINT`, `HF_TOKEN` (or `HUGGING_FACE_HUB_TOKEN`, or the `token` file of
    /// `HF_HOME`), the cache of `HF_HUB_CACHE` / `HF_HOME`, `HF_HUB_OFFLINE`.
    pub fn from_env() -> Result<Self> {
        let cache = sd_models::loader::hf_cache_dir()
            .context("no Hugging Face cache folder: set HF_HOME (or HOME)")?;
        let home = env("HF_HOME")
            .map(PathBuf::from)
            .or_else(|| env("HOME").map(|h| PathBuf::from(h).join(".cache/huggingface")));
        let token = env("HF_TOKEN")
            .or_else(|| env("HUGGING_FACE_HUB_TOKEN"))
            .or_else(|| {
                let t = std::fs::read_to_string(home?.join("token")).ok()?;
                Some(t.trim().to_string()).filter(|t| !t.is_empty())
            });
        let offline = env("HF_HUB_OFFLINE").is_some_and(|v| {
            matches!(
                v.trim().to_ascii_lowercase().as_str(),
                "1" | "true" | "yes" | "on"
            )
        });
        Ok(Self {
            endpoint: env("HF_ENDPOINT")
                .unwrap_or_else(|| "https://huggingface.co".into())
                .trim_end_matches('/')
                .to_string(),
            token,
            cache,
            offline,
        })
    }

    fn repo_dir(&self, repo: &str) -> PathBuf {
        self.cache
            .join(format!("models--{}", repo.replace('/', "--")))
    }
}

/// How downloads report progress.
pub trait Progress {
    fn start(&mut self, file: &str, size: Option<u64>, resumed_from: u64);
    fn advance(&mut self, bytes: u64);
    fn finish(&mut self);
}

fn agent() -> ureq::Agent {
    ureq::AgentBuilder::new()
        .timeout_connect(Duration::from_secs(20))
        .timeout_read(Duration::from_secs(60))
        .redirects(0)
        .build()
}

/// A request with the token when there is one.
fn request(cfg: &HubConfig, method: &str, url: &str) -> ureq::Request {
    let r = agent().request(method, url);
    match &cfg.token {
        Some(t) => r.set("Authorization", &format!("Bearer {t}")),
        None => r,
    }
}

/// Why a Hub request failed, worded for the user.
fn hub_error(repo: &RepoRef, what: &str, e: ureq::Error) -> anyhow::Error {
    match e {
        ureq::Error::Status(code @ (401 | 403), _) => {
            anyhow::anyhow!(
                "{}: the Hub answered {code} for {what}: the repository is gated or private (FLUX.1 dev is gated): accept its terms on the Hub and set HF_TOKEN to a token that may read it",
                repo.repo
            )
        }
        ureq::Error::Status(404, _) => anyhow::anyhow!(
            "{}: no such repository, revision {:?} or file ({what}) on the Hub",
            repo.repo,
            repo.revision
        ),
        ureq::Error::Status(code, _) => {
            anyhow::anyhow!("{}: the Hub answered {code} for {what}", repo.repo)
        }
        ureq::Error::Transport(t) => anyhow::anyhow!("{}: cannot reach the Hub ({t})", repo.repo),
    }
}

/// Follows redirects by hand (so that the token only goes to the Hub itself).
fn call(
    cfg: &HubConfig,
    repo: &RepoRef,
    method: &str,
    url: &str,
    range_from: u64,
    what: &str,
) -> Result<ureq::Response> {
    let mut url = url.to_string();
    let mut with_token = true;
    for _ in 0..5 {
        let mut r = if with_token {
            request(cfg, method, &url)
        } else {
            agent().request(method, &url)
        };
        if range_from > 0 {
            r = r.set("Range", &format!("bytes={range_from}-"));
        }
        let resp = r.call().map_err(|e| hub_error(repo, what, e))?;
        if (300..400).contains(&resp.status()) {
            let loc = resp
                .header("Location")
                .context("a redirect without Location")?
                .to_string();
            let next = if loc.starts_with("http://") || loc.starts_with("https://") {
                loc
            } else {
                format!("{}{}", cfg.endpoint, loc)
            };
            with_token = next.starts_with(&cfg.endpoint);
            url = next;
            continue;
        }
        return Ok(resp);
    }
    bail!("{}: too many redirects for {what}", repo.repo)
}

/// The commit and file list of a revision.
fn revision_info(cfg: &HubConfig, repo: &RepoRef) -> Result<(String, Vec<String>)> {
    let url = format!(
        "{}/api/models/{}/revision/{}",
        cfg.endpoint, repo.repo, repo.revision
    );
    let resp = call(cfg, repo, "GET", &url, 0, "the revision")?;
    let mut text = String::new();
    resp.into_reader()
        .take(64 << 20)
        .read_to_string(&mut text)
        .with_context(|| format!("{}: cannot read the Hub's revision answer", repo.repo))?;
    let v: Value = serde_json::from_str(&text)
        .with_context(|| format!("{}: the Hub's revision answer is not JSON", repo.repo))?;
    let sha = v["sha"]
        .as_str()
        .context("the Hub's revision answer has no sha")?
        .to_string();
    let files = v["siblings"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|s| s["rfilename"].as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default();
    Ok((sha, files))
}

/// Components diffusers pipelines carry that the worker never loads.
const SKIPPED: [&str; 3] = ["safety_checker", "feature_extractor", "image_encoder"];

/// The precision variant in a weight file name (`model.fp16.safetensors`,
/// `x-00001-of-00002.fp16.safetensors`, `x.safetensors.index.fp16.json`).
fn variant_of(name: &str) -> Option<&str> {
    let parts: Vec<&str> = name.split('.').collect();
    if let Some(i) = parts.iter().position(|p| *p == "index") {
        // x.safetensors.index[.variant].json
        return (parts.len() == i + 3).then(|| parts[i + 1]);
    }
    (parts.len() >= 3 && parts.last() == Some(&"safetensors")).then(|| parts[parts.len() - 2])
}

fn is_safetensors(name: &str) -> bool {
    name.ends_with(".safetensors") || name.contains(".safetensors.index")
}

/// What to fetch from a component folder's files: the non-weight files (configs, tokenizer)
/// and one variant of the safetensors weights.
fn select_component(
    repo: &RepoRef,
    component: &str,
    files: &[&str],
    variant: Option<&str>,
) -> Result<Vec<String>> {
    let prefix = format!("{component}/");
    let local: Vec<&str> = files
        .iter()
        .filter_map(|f| f.strip_prefix(&prefix))
        .filter(|f| !f.contains('/'))
        .collect();
    let mut out: Vec<String> = local
        .iter()
        .filter(|f| {
            let ext = f.rsplit('.').next().unwrap_or("");
            matches!(ext, "json" | "txt" | "model") && !f.contains(".safetensors.index")
        })
        .map(|f| format!("{prefix}{f}"))
        .collect();
    let weights: Vec<&str> = local
        .iter()
        .copied()
        .filter(|f| is_safetensors(f))
        .collect();
    let pick = |v: Option<&str>| -> Vec<&str> {
        weights
            .iter()
            .copied()
            .filter(|f| variant_of(f) == v)
            .collect()
    };
    let chosen = match variant {
        Some(v) if !pick(Some(v)).is_empty() => pick(Some(v)),
        _ if !pick(None).is_empty() => pick(None),
        _ => pick(Some("fp16")),
    };
    let has_weights_elsewhere = local.iter().any(|f| {
        let ext = f.rsplit('.').next().unwrap_or("");
        matches!(
            ext,
            "bin" | "ckpt" | "pt" | "pth" | "msgpack" | "h5" | "onnx"
        )
    });
    if chosen.is_empty() && has_weights_elsewhere {
        bail!(
            "{}: {component}/ has no .safetensors weights (only pickle, Flax or ONNX files, which are not loaded)",
            repo.repo
        );
    }
    out.extend(chosen.into_iter().map(|f| format!("{prefix}{f}")));
    Ok(out)
}

/// The components of a `model_index.json`.
fn components(index: &Value) -> Vec<String> {
    index
        .as_object()
        .map(|o| {
            o.iter()
                .filter(|(k, v)| {
                    !k.starts_with('_')
                        && !SKIPPED.contains(&k.as_str())
                        && v.as_array().is_some_and(|a| a.iter().all(|x| !x.is_null()))
                })
                .map(|(k, _)| k.clone())
                .collect()
        })
        .unwrap_or_default()
}

/// Resolves `repo` to a snapshot folder in the cache, downloading what is missing.
pub fn fetch(
    repo: &RepoRef,
    cfg: &HubConfig,
    variant: Option<&str>,
    progress: &mut dyn Progress,
) -> Result<PathBuf> {
    let dir = cfg.repo_dir(&repo.repo);
    if cfg.offline {
        return cached_snapshot(&dir, repo).with_context(|| {
            format!(
                "{} (revision {}) is not in the Hugging Face cache {} and HF_HUB_OFFLINE is set",
                repo.repo,
                repo.revision,
                cfg.cache.display()
            )
        });
    }
    let (sha, files) = match revision_info(cfg, repo) {
        Ok(x) => x,
        Err(e) => {
            // The Hub cannot be reached: a cached snapshot of the revision does.
            if e.to_string().contains("cannot reach the Hub") {
                if let Some(snap) = cached_snapshot(&dir, repo) {
                    eprintln!("warning: {e}; using the cached snapshot {}", snap.display());
                    return Ok(snap);
                }
            }
            return Err(e);
        }
    };
    if sha.len() < 7 || !sha.chars().all(|c| c.is_ascii_hexdigit()) {
        bail!("{}: the Hub gave an invalid commit {sha:?}", repo.repo);
    }
    let snapshot = dir.join("snapshots").join(&sha);
    let names: Vec<&str> = files.iter().map(String::as_str).collect();
    if !names.contains(&"model_index.json") {
        bail!(
            "{}: not a diffusers repository (no model_index.json at revision {})",
            repo.repo,
            repo.revision
        );
    }
    download(cfg, repo, &dir, &sha, "model_index.json", progress)?;
    let index: Value = serde_json::from_str(
        &std::fs::read_to_string(snapshot.join("model_index.json"))
            .context("cannot read the downloaded model_index.json")?,
    )
    .with_context(|| format!("{}: model_index.json is not JSON", repo.repo))?;
    let mut wanted = Vec::new();
    for c in components(&index) {
        wanted.extend(select_component(repo, &c, &names, variant)?);
    }
    for f in &wanted {
        download(cfg, repo, &dir, &sha, f, progress)?;
    }
    if repo.revision != sha {
        let refs = dir.join("refs").join(&repo.revision);
        if let Some(parent) = refs.parent() {
            std::fs::create_dir_all(parent)?;
        }
        std::fs::write(&refs, &sha)?;
    }
    Ok(snapshot)
}

/// The cached snapshot of a revision (a branch or tag through `refs/`, or a commit), if it
/// holds a `model_index.json`.
pub fn cached_snapshot(dir: &Path, repo: &RepoRef) -> Option<PathBuf> {
    let sha = std::fs::read_to_string(dir.join("refs").join(&repo.revision))
        .ok()
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|| repo.revision.clone());
    let snap = dir.join("snapshots").join(sha);
    snap.join("model_index.json").is_file().then_some(snap)
}

fn etag(resp: &ureq::Response) -> Option<String> {
    let raw = resp
        .header("X-Linked-Etag")
        .or_else(|| resp.header("ETag"))?;
    let t = raw.trim().trim_start_matches("W/").trim_matches('"');
    (!t.is_empty() && t.chars().all(|c| c.is_ascii_alphanumeric() || c == '-'))
        .then(|| t.to_string())
}

/// Downloads `file` of commit `sha` into the cache (blob + snapshot link), resuming a partial
/// download.
fn download(
    cfg: &HubConfig,
    repo: &RepoRef,
    dir: &Path,
    sha: &str,
    file: &str,
    progress: &mut dyn Progress,
) -> Result<()> {
    if file
        .split('/')
        .any(|p| p.is_empty() || p == "." || p == "..")
        || file.starts_with('/')
    {
        bail!("{}: refusing the file name {file:?}", repo.repo);
    }
    let link = dir.join("snapshots").join(sha).join(file);
    if link.is_file() {
        return Ok(());
    }
    let url = format!("{}/{}/resolve/{sha}/{file}", cfg.endpoint, repo.repo);
    // The first answer carries the blob's id: a 200 for small files, a redirect with
    // X-Linked-Etag / X-Linked-Size for large (LFS) ones.
    let head = request(cfg, "HEAD", &url)
        .call()
        .map_err(|e| hub_error(repo, file, e))?;
    let tag = etag(&head).with_context(|| format!("{}: no ETag for {file}", repo.repo))?;
    let size: Option<u64> = head
        .header("X-Linked-Size")
        .or_else(|| head.header("Content-Length"))
        .and_then(|s| s.trim().parse().ok());
    let blobs = dir.join("blobs");
    std::fs::create_dir_all(&blobs)?;
    let blob = blobs.join(&tag);
    if !blob.is_file() {
        let partial = blobs.join(format!("{tag}.incomplete"));
        let have = std::fs::metadata(&partial).map(|m| m.len()).unwrap_or(0);
        let resp = call(cfg, repo, "GET", &url, have, file)?;
        let resumed = have > 0 && resp.status() == 206;
        let mut out = std::fs::OpenOptions::new()
            .create(true)
            .append(resumed)
            .write(true)
            .truncate(!resumed)
            .open(&partial)
            .with_context(|| format!("cannot write {}", partial.display()))?;
        progress.start(file, size, if resumed { have } else { 0 });
        let mut reader = resp.into_reader();
        let mut buf = vec![0u8; 1 << 16];
        loop {
            let n = match reader.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) => {
                    progress.finish();
                    bail!(
                        "{}: the download of {file} was interrupted ({e}); run again to resume",
                        repo.repo
                    );
                }
            };
            out.write_all(&buf[..n])?;
            progress.advance(n as u64);
        }
        out.flush()?;
        progress.finish();
        let got = std::fs::metadata(&partial)?.len();
        if let Some(s) = size {
            if got != s {
                bail!(
                    "{}: {file} arrived with {got} of {s} bytes; run again to resume",
                    repo.repo
                );
            }
        }
        // LFS files are named by their SHA-256: check it, resumed parts included.
        if tag.len() == 64 && tag.chars().all(|c| c.is_ascii_hexdigit()) {
            let sum = sha256_file(&partial)?;
            if !sum.eq_ignore_ascii_case(&tag) {
                let _ = std::fs::remove_file(&partial);
                bail!(
                    "{}: {file} does not match its SHA-256 (got {sum}, expected {tag}); the partial file was removed, run again",
                    repo.repo
                );
            }
        }
        std::fs::rename(&partial, &blob)?;
    }
    if let Some(parent) = link.parent() {
        std::fs::create_dir_all(parent)?;
    }
    // A relative link, as huggingface_hub makes them: snapshots/<sha>/<file> -> ../../blobs/<tag>.
    let depth = file.matches('/').count() + 2;
    let target = PathBuf::from("../".repeat(depth)).join("blobs").join(&tag);
    #[cfg(unix)]
    {
        let _ = std::fs::remove_file(&link);
        std::os::unix::fs::symlink(&target, &link)
            .with_context(|| format!("cannot link {}", link.display()))?;
    }
    #[cfg(not(unix))]
    {
        let _ = target;
        std::fs::copy(&blob, &link)?;
    }
    Ok(())
}

fn sha256_file(path: &Path) -> Result<String> {
    use sha2::Digest;
    let mut f = std::fs::File::open(path)?;
    let mut h = sha2::Sha256::new();
    let mut buf = vec![0u8; 1 << 16];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(h.finalize().iter().map(|b| format!("{b:02x}")).collect())
}

/// `--model`: a path as given, or the snapshot folder of a Hub repo id.
pub fn resolve_model(
    model: &Path,
    variant: Option<&str>,
    progress: &mut dyn Progress,
) -> Result<PathBuf> {
    let Some(repo) = model.to_str().and_then(parse_repo_id) else {
        if let Some(v) = variant {
            bail!("--variant {v} applies to Hugging Face repo ids (org/repo), not to local files");
        }
        return Ok(model.to_path_buf());
    };
    let cfg = HubConfig::from_env()?;
    fetch(&repo, &cfg, variant, progress)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repo_ids() {
        assert_eq!(
            parse_repo_id("org/name"),
            Some(RepoRef {
                repo: "org/name".into(),
                revision: "main".into()
            })
        );
        assert_eq!(parse_repo_id("org/name@v1.0").unwrap().revision, "v1.0");
        for bad in [
            "org",
            "org/name/x",
            "../x",
            "org/..",
            "org/name@",
            "org/na me",
            "/abs/path",
        ] {
            assert_eq!(parse_repo_id(bad), None, "{bad}");
        }
    }

    #[test]
    fn variants_and_selection() {
        assert_eq!(variant_of("model.safetensors"), None);
        assert_eq!(variant_of("model.fp16.safetensors"), Some("fp16"));
        assert_eq!(
            variant_of("m-00001-of-00002.fp16.safetensors"),
            Some("fp16")
        );
        assert_eq!(variant_of("m.safetensors.index.json"), None);
        assert_eq!(variant_of("m.safetensors.index.fp16.json"), Some("fp16"));
        let repo = parse_repo_id("o/r").unwrap();
        let files = [
            "unet/config.json",
            "unet/diffusion_pytorch_model.safetensors",
            "unet/diffusion_pytorch_model.fp16.safetensors",
            "unet/diffusion_pytorch_model.bin",
            "unet/diffusion_pytorch_model.onnx",
            "text_encoder/model.bin",
        ];
        let plain = select_component(&repo, "unet", &files, None).unwrap();
        assert_eq!(
            plain,
            [
                "unet/config.json",
                "unet/diffusion_pytorch_model.safetensors"
            ]
        );
        let half = select_component(&repo, "unet", &files, Some("fp16")).unwrap();
        assert_eq!(half[1], "unet/diffusion_pytorch_model.fp16.safetensors");
        let e = select_component(&repo, "text_encoder", &files, None).unwrap_err();
        assert!(e.to_string().contains("no .safetensors weights"), "{e}");
    }
}
