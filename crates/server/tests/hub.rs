//! `--model org/repo` against a loopback server that answers in the Hugging Face Hub's URL
//! layout (`/api/models/{repo}/revision/{rev}`, `/{repo}/resolve/{rev}/{file}` with ETags,
//! redirects with `X-Linked-Etag` for weights, `Range`), serving the tiny SD 1.x folder: the
//! files the pipeline needs land in the standard cache layout, an interrupted download resumes
//! where it stopped, the cache serves offline runs, gated repos need the token, and the image
//! equals the one from the local folder.

mod common;

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use common::{model, Server};
use serde_json::json;

const SHA: &str = "0123456789abcdef0123456789abcdef01234567";

struct FakeHub {
    addr: String,
    /// "METHOD path [range]" of every request.
    log: Arc<Mutex<Vec<String>>>,
    stop: Arc<AtomicBool>,
}

struct Repo {
    files: HashMap<String, Vec<u8>>,
    token: Option<String>,
    /// Serve only this many bytes of this file on its first GET, then hang up.
    cut: Option<(String, usize)>,
    /// Flip a byte of this file on its first GET (its ETag still names the right bytes).
    corrupt: Option<String>,
}

/// The Hub names LFS files by their SHA-256 (and small files by a git hash; the tests use
/// SHA-256 for both).
fn etag(bytes: &[u8]) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn tiny_sd1_files() -> HashMap<String, Vec<u8>> {
    let base = PathBuf::from(model("tiny-sd1"));
    let mut files = HashMap::new();
    fn walk(dir: &Path, base: &Path, out: &mut HashMap<String, Vec<u8>>) {
        for e in std::fs::read_dir(dir).unwrap().flatten() {
            let p = e.path();
            if p.is_dir() {
                walk(&p, base, out);
            } else {
                let rel = p
                    .strip_prefix(base)
                    .unwrap()
                    .to_string_lossy()
                    .replace('\\', "/");
                out.insert(rel, std::fs::read(&p).unwrap());
            }
        }
    }
    walk(&base, &base, &mut files);
    // Files a careful client leaves alone.
    for (name, bytes) in [
        ("unet/diffusion_pytorch_model.bin", b"pickle".to_vec()),
        (
            "unet/diffusion_pytorch_model.fp16.safetensors",
            b"not used".to_vec(),
        ),
        ("unet/diffusion_pytorch_model.onnx", b"onnx".to_vec()),
        ("safety_checker/model.safetensors", b"checker".to_vec()),
        ("README.md", b"# tiny".to_vec()),
    ] {
        files.insert(name.to_string(), bytes);
    }
    files
}

impl FakeHub {
    fn start(repo_id: &'static str, repo: Repo) -> FakeHub {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let addr = format!("http://{}", listener.local_addr().unwrap());
        let log = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (log2, stop2) = (log.clone(), stop.clone());
        let repo = Arc::new(Mutex::new(repo));
        std::thread::spawn(move || {
            while !stop2.load(Ordering::SeqCst) {
                match listener.accept() {
                    Ok((s, _)) => {
                        let _ = s.set_nonblocking(false);
                        let (log, repo) = (log2.clone(), repo.clone());
                        std::thread::spawn(move || handle(s, repo_id, &repo, &log));
                    }
                    Err(_) => std::thread::sleep(std::time::Duration::from_millis(5)),
                }
            }
        });
        FakeHub { addr, log, stop }
    }

    fn requests(&self) -> Vec<String> {
        self.log.lock().unwrap().clone()
    }
}

impl Drop for FakeHub {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

fn respond(s: &mut TcpStream, status: &str, headers: &[(String, String)], body: &[u8]) {
    let mut head = format!("HTTP/1.1 {status}\r\nConnection: close\r\n");
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    if !headers.iter().any(|(k, _)| k == "Content-Length") {
        head.push_str(&format!("Content-Length: {}\r\n", body.len()));
    }
    head.push_str("\r\n");
    let _ = s.write_all(head.as_bytes());
    let _ = s.write_all(body);
}

fn handle(mut s: TcpStream, repo_id: &str, repo: &Mutex<Repo>, log: &Mutex<Vec<String>>) {
    let mut reader = BufReader::new(s.try_clone().unwrap());
    let mut line = String::new();
    if reader.read_line(&mut line).is_err() {
        return;
    }
    let mut parts = line.split_whitespace();
    let (method, path) = (
        parts.next().unwrap_or("").to_string(),
        parts.next().unwrap_or("").to_string(),
    );
    let mut headers = HashMap::new();
    loop {
        let mut h = String::new();
        if reader.read_line(&mut h).is_err() || h.trim().is_empty() {
            break;
        }
        if let Some((k, v)) = h.split_once(':') {
            headers.insert(k.trim().to_ascii_lowercase(), v.trim().to_string());
        }
    }
    let range_from: Option<usize> = headers
        .get("range")
        .and_then(|r| r.strip_prefix("bytes="))
        .and_then(|r| r.trim_end_matches('-').parse().ok());
    log.lock().unwrap().push(format!(
        "{method} {path}{}",
        range_from
            .map(|r| format!(" range={r}"))
            .unwrap_or_default()
    ));
    let mut repo = repo.lock().unwrap();
    if let Some(t) = &repo.token {
        if headers.get("authorization") != Some(&format!("Bearer {t}"))
            && !path.starts_with("/cdn/")
        {
            return respond(&mut s, "401 Unauthorized", &[], b"{\"error\":\"gated\"}");
        }
    }
    let api = format!("/api/models/{repo_id}/revision/");
    if let Some(rev) = path.strip_prefix(&api) {
        if rev != "main" && rev != SHA {
            return respond(&mut s, "404 Not Found", &[], b"{}");
        }
        let mut names: Vec<&String> = repo.files.keys().collect();
        names.sort();
        let body = json!({"sha": SHA, "siblings": names.iter().map(|n| json!({"rfilename": n})).collect::<Vec<_>>()});
        return respond(
            &mut s,
            "200 OK",
            &[("Content-Type".into(), "application/json".into())],
            body.to_string().as_bytes(),
        );
    }
    let resolve = format!("/{repo_id}/resolve/");
    let (file, cdn) = if let Some(rest) = path.strip_prefix(&resolve) {
        match rest.split_once('/') {
            Some((rev, f)) if rev == SHA || rev == "main" => (f.to_string(), false),
            _ => return respond(&mut s, "404 Not Found", &[], b""),
        }
    } else if let Some(f) = path.strip_prefix("/cdn/") {
        (f.to_string(), true)
    } else {
        return respond(&mut s, "404 Not Found", &[], b"");
    };
    let Some(bytes) = repo.files.get(&file).cloned() else {
        return respond(&mut s, "404 Not Found", &[], b"");
    };
    let tag = etag(&bytes);
    let commit = ("X-Repo-Commit".to_string(), SHA.to_string());
    if !cdn && file.ends_with(".safetensors") {
        // Weights live in LFS: the Hub redirects, naming the blob in X-Linked-Etag.
        return respond(
            &mut s,
            "302 Found",
            &[
                ("Location".into(), format!("/cdn/{file}")),
                ("X-Linked-Etag".into(), format!("\"{tag}\"")),
                ("X-Linked-Size".into(), bytes.len().to_string()),
                commit,
            ],
            b"",
        );
    }
    let etag_h = ("ETag".to_string(), format!("\"{tag}\""));
    if method == "HEAD" {
        let head = format!(
            "HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: {}\r\nETag: \"{tag}\"\r\nX-Repo-Commit: {SHA}\r\n\r\n",
            bytes.len()
        );
        let _ = s.write_all(head.as_bytes());
        return;
    }
    let mut bytes = bytes;
    if repo.corrupt.as_deref() == Some(file.as_str()) {
        repo.corrupt = None;
        bytes[100] ^= 0xff;
    }
    let from = range_from.unwrap_or(0).min(bytes.len());
    let body = &bytes[from..];
    let status = if from > 0 {
        "206 Partial Content"
    } else {
        "200 OK"
    };
    let mut hs = vec![
        etag_h,
        commit,
        ("Content-Length".into(), body.len().to_string()),
    ];
    if from > 0 {
        hs.push((
            "Content-Range".into(),
            format!("bytes {from}-{}/{}", bytes.len() - 1, bytes.len()),
        ));
    }
    if let Some((cut_file, n)) = repo.cut.clone() {
        if cut_file == file {
            repo.cut = None;
            let mut head = format!("HTTP/1.1 {status}\r\nConnection: close\r\n");
            for (k, v) in &hs {
                head.push_str(&format!("{k}: {v}\r\n"));
            }
            head.push_str("\r\n");
            let _ = s.write_all(head.as_bytes());
            let _ = s.write_all(&body[..n.min(body.len())]);
            let _ = s.flush();
            let _ = s.shutdown(std::net::Shutdown::Both);
            return;
        }
    }
    respond(&mut s, status, &hs, body);
}

fn tmpdir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("sd-hub-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// `generate` with `model`, the given environment only; (success, stderr).
fn generate(model: &str, out: &Path, envs: &[(&str, &str)]) -> (bool, String) {
    let o = Command::new(env!("CARGO_BIN_EXE_sd-worker"))
        .args([
            "generate",
            "--model",
            model,
            "--prompt",
            "a photo of a cat",
            "--steps",
            "2",
            "--width",
            "32",
            "--height",
            "32",
            "--seed",
            "5",
            "--output",
        ])
        .arg(out)
        .env_clear()
        .envs(envs.iter().copied())
        .output()
        .unwrap();
    (
        o.status.success(),
        String::from_utf8_lossy(&o.stderr).to_string(),
    )
}

/// The same pixels as the local folder's image, and the repo id as the model name.
fn same_image(got: &Path, want: &Path, repo: &str) {
    let (gw, gh, gp, text) = common::read_png(got);
    let (ww, wh, wp, _) = common::read_png(want);
    assert_eq!((gw, gh), (ww, wh));
    assert!(gp == wp, "the pixels differ from the local folder's image");
    assert!(text.ends_with(&format!("Model: {repo}")), "{text}");
}

#[test]
fn download_resume_cache_layout_and_offline() {
    let unet = "unet/diffusion_pytorch_model.safetensors";
    let hub = FakeHub::start(
        "tiny/sd1",
        Repo {
            files: tiny_sd1_files(),
            token: None,
            cut: Some((unet.to_string(), 3000)),
            corrupt: None,
        },
    );
    let home = tmpdir("home");
    let home_s = home.to_str().unwrap().to_string();
    let env = [
        ("HF_ENDPOINT", hub.addr.as_str()),
        ("HF_HOME", home_s.as_str()),
    ];
    let want = tmpdir("want").join("local.png");
    let (ok, e) = generate(&model("tiny-sd1"), &want, &[]);
    assert!(ok, "{e}");

    // The first run is cut off in the middle of the UNet weights.
    let out = home.join("hub.png");
    let (ok, e) = generate("tiny/sd1", &out, &env);
    assert!(!ok);
    assert!(
        e.contains("was interrupted") || e.contains("arrived with"),
        "{e}"
    );
    assert!(e.contains("run again to resume"), "{e}");
    let repo_dir = home.join("hub/models--tiny--sd1");
    let partial: Vec<PathBuf> = std::fs::read_dir(repo_dir.join("blobs"))
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "incomplete"))
        .collect();
    assert_eq!(partial.len(), 1, "{partial:?}");
    assert_eq!(std::fs::metadata(&partial[0]).unwrap().len(), 3000);

    // The second run resumes at byte 3000 and gives the local folder's image.
    let (ok, e) = generate("tiny/sd1", &out, &env);
    assert!(ok, "{e}");
    same_image(&out, &want, "tiny/sd1");
    let requests = hub.requests();
    assert!(
        requests
            .iter()
            .any(|r| r == &format!("GET /cdn/{unet} range=3000")),
        "{requests:#?}"
    );
    for never in [
        "diffusion_pytorch_model.bin",
        ".fp16.",
        ".onnx",
        "safety_checker",
        "README",
    ] {
        assert!(
            !requests
                .iter()
                .any(|r| r.starts_with("GET") && r.contains(never)),
            "{never} was fetched: {requests:#?}"
        );
    }
    // The standard cache layout: refs/main, relative snapshot links to blobs named by ETag.
    assert_eq!(
        std::fs::read_to_string(repo_dir.join("refs/main")).unwrap(),
        SHA
    );
    let link = repo_dir.join("snapshots").join(SHA).join(unet);
    let target = std::fs::read_link(&link).unwrap();
    let unet_bytes = std::fs::read(PathBuf::from(model("tiny-sd1")).join(unet)).unwrap();
    assert_eq!(
        target,
        PathBuf::from(format!("../../../blobs/{}", etag(&unet_bytes)))
    );
    assert_eq!(std::fs::read(&link).unwrap(), unet_bytes);

    // A third run downloads nothing.
    let before = hub
        .requests()
        .iter()
        .filter(|r| r.starts_with("GET /cdn"))
        .count();
    let (ok, e) = generate("tiny/sd1", &out, &env);
    assert!(ok, "{e}");
    let after = hub
        .requests()
        .iter()
        .filter(|r| r.starts_with("GET /cdn"))
        .count();
    assert_eq!(before, after);

    // Offline: HF_HUB_OFFLINE, or the Hub unreachable, runs from the cache.
    drop(hub);
    std::thread::sleep(std::time::Duration::from_millis(50));
    let offline = [("HF_HUB_OFFLINE", "1"), ("HF_HOME", home_s.as_str())];
    let (ok, e) = generate("tiny/sd1", &out, &offline);
    assert!(ok, "{e}");
    same_image(&out, &want, "tiny/sd1");
    let gone = [
        ("HF_ENDPOINT", "http://127.0.0.1:9"),
        ("HF_HOME", home_s.as_str()),
    ];
    let (ok, e) = generate("tiny/sd1", &out, &gone);
    assert!(ok, "{e}");
    assert!(e.contains("using the cached snapshot"), "{e}");
    // Offline without the repo in the cache: a clear error.
    let (ok, e) = generate("tiny/other", &out, &offline);
    assert!(!ok);
    assert!(
        e.contains("tiny/other (revision main) is not in the Hugging Face cache"),
        "{e}"
    );
}

#[test]
fn gated_repos_need_the_token_and_serve_fetches_before_ready() {
    let hub = FakeHub::start(
        "gated/sd1",
        Repo {
            files: tiny_sd1_files(),
            token: Some("secret".into()),
            cut: None,
            corrupt: None,
        },
    );
    let home = tmpdir("gated");
    let home_s = home.to_str().unwrap().to_string();
    let out = home.join("g.png");
    let (ok, e) = generate(
        "gated/sd1",
        &out,
        &[
            ("HF_ENDPOINT", hub.addr.as_str()),
            ("HF_HOME", home_s.as_str()),
        ],
    );
    assert!(!ok);
    assert!(
        e.contains("answered 401") && e.contains("gated") && e.contains("HF_TOKEN"),
        "{e}"
    );
    assert_eq!(e.trim().lines().count(), 1, "{e}");
    let (ok, e) = generate(
        "gated/sd1@main",
        &out,
        &[
            ("HF_ENDPOINT", hub.addr.as_str()),
            ("HF_HOME", home_s.as_str()),
            ("HF_TOKEN", "secret"),
        ],
    );
    assert!(ok, "{e}");

    // serve fetches on its engine thread (the cache is warm now) and knows the repo id.
    let server = Server::spawn_env(
        "gated/sd1",
        &[],
        &[
            ("HF_ENDPOINT", hub.addr.as_str()),
            ("HF_HOME", home_s.as_str()),
            ("HF_TOKEN", "secret"),
        ],
    );
    server.wait_ready();
    let id = server.submit(
        &json!({"operation": "image_generation", "prompt": "a photo of a cat",
        "steps": 2, "width": 32, "height": 32, "seed": 5, "model": "gated/sd1"}),
    );
    let (name, data) = server.events(&id).last().unwrap().clone();
    assert_eq!(name, "complete", "{data}");
    assert_eq!(
        common::b64decode(data["image"].as_str().unwrap()),
        std::fs::read(&out).unwrap()
    );
}

#[test]
fn corrupted_downloads_are_refused_and_fetched_again() {
    let vae = "vae/diffusion_pytorch_model.safetensors";
    let hub = FakeHub::start(
        "bad/sd1",
        Repo {
            files: tiny_sd1_files(),
            token: None,
            cut: None,
            corrupt: Some(vae.to_string()),
        },
    );
    let home = tmpdir("corrupt");
    let home_s = home.to_str().unwrap().to_string();
    let env = [
        ("HF_ENDPOINT", hub.addr.as_str()),
        ("HF_HOME", home_s.as_str()),
    ];
    let out = home.join("c.png");
    let (ok, e) = generate("bad/sd1", &out, &env);
    assert!(!ok);
    assert!(
        e.contains("does not match its SHA-256") && e.contains(vae),
        "{e}"
    );
    let blobs = home.join("hub/models--bad--sd1/blobs");
    let leftovers = std::fs::read_dir(&blobs)
        .unwrap()
        .flatten()
        .filter(|e| e.path().extension().is_some_and(|x| x == "incomplete"))
        .count();
    assert_eq!(leftovers, 0, "the corrupt partial file stays");
    let (ok, e) = generate("bad/sd1", &out, &env);
    assert!(ok, "{e}");
}
