//! The bad-input corpus: every file in `fixtures/bad-inputs` is one hostile or mistaken request
//! to one interface (the native job API, the A1111 API, the OpenAI API or the CLI) with the
//! answer it must get: the status (or exit code), the field the answer must name and words its
//! message must hold. After every case a valid job must still complete, no answer may carry an
//! absolute path, and the worker's log must hold no internal error (the panic hook's line).
//!
//! A case file is JSON:
//! - `interface`: `native`, `a1111`, `openai` or `cli`; `about`: what it tries.
//! - The request: `method` and `path` (defaults: POST to the interface's generation route),
//!   and one of `json` (a JSON body), `raw` (body text, or a list of pieces), `raw_hex` (body bytes), `form`
//!   (multipart parts `{name, filename?, data}`), or `args` (CLI flags after `generate --model
//!   M --output O`); `content_type` overrides the header. `behaviour` names a misbehaving
//!   client instead: `slow_head`, `slow_body`, `silent_connection`, `unread_events`.
//! - Generated values: a string `"$b64:IMG"` is replaced by the base64 of image IMG, `"$IMG"`
//!   (in a form part or CLI argument) by its bytes or a file holding them, and
//!   `"$repeat:N:TEXT"` by TEXT repeated N times. IMG is `png:WxH`, `png-rgba:WxH` (transparent
//!   left half), `jpeg:WxH`, `webp:WxH`, `png-truncated`, `jpeg-truncated`, `webp-truncated`,
//!   `png-header:WxH` (a PNG that only claims that size) or `text:...` (those bytes).
//! - `expect`: `status` (HTTP) or `exit` (CLI), `field` (native: the message names it in
//!   backquotes; A1111: `detail[0].loc`; OpenAI: `error.param`; CLI: stderr holds it) and
//!   `contains` (substrings of the message).

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use base64::Engine as _;
use common::{http, model, root, tmp, Response, Server};
use serde::Deserialize;
use serde_json::{json, Value};

/// The server's read timeout in this test, in seconds: the slow clients must be cut off by it.
const READ_TIMEOUT_S: u64 = 2;
/// The server's body limit in this test.
const MAX_BODY: usize = 3 << 20;

#[derive(Debug, Deserialize, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
enum Interface {
    Native,
    A1111,
    Openai,
    Cli,
}

#[derive(Debug, Deserialize, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
enum Behaviour {
    /// Sends half a request head, then nothing: the connection must be closed.
    SlowHead,
    /// Sends the head and part of the body, then nothing: 408.
    SlowBody,
    /// Connects and sends nothing: the connection must be closed.
    SilentConnection,
    /// Follows a job's events with previews at every step and never reads them: the job and
    /// the next ones still complete.
    UnreadEvents,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Case {
    interface: Interface,
    about: String,
    method: Option<String>,
    path: Option<String>,
    json: Option<Value>,
    raw: Option<Raw>,
    raw_hex: Option<String>,
    form: Option<Vec<Part>>,
    args: Option<Vec<String>>,
    content_type: Option<String>,
    behaviour: Option<Behaviour>,
    expect: Expect,
}

/// Body text, or pieces of it (each expanded on its own) joined.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum Raw {
    Text(String),
    Pieces(Vec<String>),
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Part {
    name: String,
    filename: Option<String>,
    data: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Expect {
    status: Option<u16>,
    exit: Option<i32>,
    field: Option<String>,
    #[serde(default)]
    contains: Vec<String>,
}

fn corpus() -> Vec<(String, Case)> {
    let dir = root().join("fixtures/bad-inputs");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .expect("fixtures/bad-inputs")
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "json"))
        .collect();
    files.sort();
    files
        .into_iter()
        .map(|p| {
            let name = p.file_stem().unwrap().to_string_lossy().into_owned();
            let text = std::fs::read_to_string(&p).unwrap();
            let case = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{name}: {e}"));
            (name, case)
        })
        .collect()
}

// ---- generated inputs ----

fn rgb(w: u32, h: u32) -> image::RgbImage {
    image::RgbImage::from_fn(w, h, |x, y| image::Rgb([(x * 7) as u8, (y * 5) as u8, 90]))
}

fn encode(img: image::DynamicImage, format: image::ImageFormat) -> Vec<u8> {
    let mut out = std::io::Cursor::new(Vec::new());
    img.write_to(&mut out, format).unwrap();
    out.into_inner()
}

fn size(spec: &str) -> (u32, u32) {
    let (w, h) = spec.split_once('x').expect("WxH");
    (w.parse().unwrap(), h.parse().unwrap())
}

/// A PNG whose header claims `w` x `h` RGB pixels, followed by one tiny compressed row: a
/// decoder that trusts the header before checking it allocates w*h*3 bytes.
fn png_header(w: u32, h: u32) -> Vec<u8> {
    let mut out = b"\x89PNG\r\n\x1a\n".to_vec();
    let mut chunk = |kind: &[u8], data: &[u8]| {
        out.extend_from_slice(&(data.len() as u32).to_be_bytes());
        let mut body = kind.to_vec();
        body.extend_from_slice(data);
        out.extend_from_slice(&body);
        out.extend_from_slice(&crc32fast::hash(&body).to_be_bytes());
    };
    let mut ihdr = Vec::new();
    ihdr.extend_from_slice(&w.to_be_bytes());
    ihdr.extend_from_slice(&h.to_be_bytes());
    ihdr.extend_from_slice(&[8, 2, 0, 0, 0]);
    chunk(b"IHDR", &ihdr);
    chunk(b"IDAT", &[0x78, 0x9c, 0x03, 0x00, 0x00, 0x00, 0x00, 0x01]);
    chunk(b"IEND", &[]);
    out
}

fn image_bytes(spec: &str) -> Vec<u8> {
    use image::ImageFormat as F;
    let (kind, arg) = spec.split_once(':').unwrap_or((spec, ""));
    let half = |v: Vec<u8>| v[..v.len() / 2].to_vec();
    match kind {
        "png" => {
            let (w, h) = size(arg);
            encode(rgb(w, h).into(), F::Png)
        }
        "png-rgba" => {
            let (w, h) = size(arg);
            let img = image::RgbaImage::from_fn(w, h, |x, _| {
                image::Rgba([200, 200, 200, if x < w / 2 { 0 } else { 255 }])
            });
            encode(img.into(), F::Png)
        }
        "jpeg" => {
            let (w, h) = size(arg);
            encode(rgb(w, h).into(), F::Jpeg)
        }
        "webp" => {
            let (w, h) = size(arg);
            encode(rgb(w, h).into(), F::WebP)
        }
        "png-truncated" => half(encode(rgb(32, 32).into(), F::Png)),
        "jpeg-truncated" => half(encode(rgb(32, 32).into(), F::Jpeg)),
        "webp-truncated" => half(encode(rgb(32, 32).into(), F::WebP)),
        "png-header" => {
            let (w, h) = size(arg);
            png_header(w, h)
        }
        "text" => arg.as_bytes().to_vec(),
        other => panic!("unknown generated input {other:?}"),
    }
}

/// Replaces the `$b64:` and `$repeat:` strings in a JSON value.
fn expand_json(v: &Value) -> Value {
    match v {
        Value::String(s) => Value::String(expand_text(s)),
        Value::Array(a) => Value::Array(a.iter().map(expand_json).collect()),
        Value::Object(o) => {
            Value::Object(o.iter().map(|(k, v)| (k.clone(), expand_json(v))).collect())
        }
        other => other.clone(),
    }
}

fn expand_text(s: &str) -> String {
    if let Some(spec) = s.strip_prefix("$b64:") {
        base64::engine::general_purpose::STANDARD.encode(image_bytes(spec))
    } else if let Some(rest) = s.strip_prefix("$repeat:") {
        let (n, text) = rest.split_once(':').expect("$repeat:N:TEXT");
        text.repeat(n.parse().unwrap())
    } else {
        s.to_string()
    }
}

fn expand_bytes(s: &str) -> Vec<u8> {
    match s.strip_prefix('$') {
        Some(spec) if !spec.starts_with("b64:") && !spec.starts_with("repeat:") => {
            image_bytes(spec)
        }
        _ => expand_text(s).into_bytes(),
    }
}

/// The LoRA folder of the test: one real LoRA, a file that is not safetensors, a text file, and
/// a link that leads out of the folder.
fn lora_dir() -> PathBuf {
    let base = tmp("corpus-loras");
    let dir = base.join("loras");
    if dir.is_dir() {
        return dir;
    }
    std::fs::create_dir_all(&dir).unwrap();
    let lora = root().join("fixtures/lora/sd1-peft.safetensors");
    std::fs::copy(&lora, dir.join("style.safetensors")).unwrap();
    std::fs::write(
        dir.join("fake.safetensors"),
        b"PK\x03\x04 a zip, not safetensors",
    )
    .unwrap();
    std::fs::write(dir.join("notes.txt"), b"not a LoRA").unwrap();
    std::fs::copy(&lora, base.join("outside.safetensors")).unwrap();
    #[cfg(unix)]
    std::os::unix::fs::symlink(
        base.join("outside.safetensors"),
        dir.join("escape.safetensors"),
    )
    .unwrap();
    dir
}

// ---- sending a case ----

fn default_path(interface: Interface) -> &'static str {
    match interface {
        Interface::Native => "/v1/jobs",
        Interface::A1111 => "/sdapi/v1/txt2img",
        Interface::Openai => "/v1/images/generations",
        Interface::Cli => unreachable!(),
    }
}

fn send(server: &Server, case: &Case) -> Response {
    let method = case.method.as_deref().unwrap_or("POST");
    let path = case
        .path
        .as_deref()
        .unwrap_or_else(|| default_path(case.interface));
    let mut content_type = case.content_type.clone();
    let body: Option<Vec<u8>> = if let Some(j) = &case.json {
        Some(expand_json(j).to_string().into_bytes())
    } else if let Some(r) = &case.raw {
        Some(match r {
            Raw::Text(t) => expand_text(t).into_bytes(),
            Raw::Pieces(p) => p
                .iter()
                .map(|t| expand_text(t))
                .collect::<String>()
                .into_bytes(),
        })
    } else if let Some(h) = &case.raw_hex {
        Some(hex(h))
    } else if let Some(parts) = &case.form {
        let boundary = "corpusBoundary7";
        content_type.get_or_insert(format!("multipart/form-data; boundary={boundary}"));
        Some(multipart(boundary, parts))
    } else {
        None
    };
    let mut headers = Vec::new();
    if let Some(ct) = &content_type {
        headers.push(("Content-Type", ct.as_str()));
    }
    http(&server.addr, method, path, &headers, body.as_deref())
}

fn hex(s: &str) -> Vec<u8> {
    let s: String = s.split_whitespace().collect();
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).expect("hex"))
        .collect()
}

fn multipart(boundary: &str, parts: &[Part]) -> Vec<u8> {
    let mut body = Vec::new();
    for p in parts {
        write!(
            body,
            "--{boundary}\r\nContent-Disposition: form-data; name=\"{}\"",
            p.name
        )
        .unwrap();
        if let Some(f) = &p.filename {
            write!(body, "; filename=\"{f}\"\r\nContent-Type: image/png").unwrap();
        }
        body.extend_from_slice(b"\r\n\r\n");
        body.extend_from_slice(&expand_bytes(&p.data));
        body.extend_from_slice(b"\r\n");
    }
    write!(body, "--{boundary}--\r\n").unwrap();
    body
}

/// (field named, message) of an error answer, in the shape of its API.
fn read_error(interface: Interface, r: &Response) -> (Option<String>, String) {
    let v: Value = serde_json::from_slice(&r.body)
        .unwrap_or_else(|e| panic!("the answer is not JSON ({e}): {}", r.text()));
    match interface {
        Interface::Native => {
            let m = v["error"]["message"].as_str().unwrap_or_default();
            (None, m.to_string())
        }
        Interface::A1111 => match &v["detail"] {
            Value::Array(items) => {
                let loc = &items[0]["loc"];
                let field = loc
                    .as_array()
                    .and_then(|l| l.get(1))
                    .and_then(Value::as_str)
                    .map(str::to_string);
                (field, items[0]["msg"].as_str().unwrap_or_default().into())
            }
            d => (None, d.as_str().unwrap_or_default().to_string()),
        },
        Interface::Openai => (
            v["error"]["param"].as_str().map(str::to_string),
            v["error"]["message"]
                .as_str()
                .unwrap_or_default()
                .to_string(),
        ),
        Interface::Cli => unreachable!(),
    }
}

fn check_http(name: &str, case: &Case, r: &Response) {
    let want = case.expect.status.expect("an HTTP case has expect.status");
    assert_eq!(r.status, want, "{name}: {}", r.text());
    assert!(
        (400..500).contains(&r.status),
        "{name}: a bad input must get a 4xx"
    );
    let (field, message) = read_error(case.interface, r);
    if let Some(want) = &case.expect.field {
        match case.interface {
            Interface::Native => assert!(
                message.contains(&format!("`{want}")),
                "{name}: {message:?} does not name `{want}`"
            ),
            _ if r.status == 422 || case.interface == Interface::Openai => assert_eq!(
                field.as_deref(),
                Some(want.as_str()),
                "{name}: {}",
                r.text()
            ),
            _ => assert!(message.contains(want), "{name}: {message:?} lacks {want}"),
        }
    }
    for needle in &case.expect.contains {
        assert!(
            message.contains(needle.as_str()),
            "{name}: {message:?} lacks {needle:?}"
        );
    }
    no_paths(name, &r.text());
}

/// Error answers never show where things are on the worker's disk.
fn no_paths(name: &str, text: &str) {
    let root = root().canonicalize().unwrap();
    for path in [root.as_path(), &lora_dir(), &std::env::temp_dir()] {
        let p = path.display().to_string();
        assert!(!text.contains(&p), "{name}: the answer shows {p}: {text}");
    }
}

fn run_cli(name: &str, case: &Case) {
    let out = tmp(&format!("{name}.png"));
    let mut args = vec![
        "generate".to_string(),
        "--model".into(),
        model("tiny-sd1"),
        "--output".into(),
        out.display().to_string(),
    ];
    for a in case.args.as_ref().expect("a CLI case has args") {
        args.push(match a.strip_prefix("$file:") {
            Some(spec) => {
                let path = tmp(&format!("{name}-input"));
                std::fs::write(&path, image_bytes(spec)).unwrap();
                path.display().to_string()
            }
            None => expand_text(a),
        });
    }
    let o = common::sd_worker(&args);
    let stderr = String::from_utf8_lossy(&o.stderr);
    let want = case.expect.exit.expect("a CLI case has expect.exit");
    assert_eq!(o.status.code(), Some(want), "{name}: {stderr}");
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(lines.len(), 1, "{name}: one line expected: {stderr}");
    assert!(lines[0].starts_with("error: "), "{name}: {stderr}");
    assert!(!stderr.contains("internal error"), "{name}: {stderr}");
    let needles = case.expect.field.iter().chain(&case.expect.contains);
    for n in needles {
        assert!(
            stderr.contains(n.as_str()),
            "{name}: {stderr:?} lacks {n:?}"
        );
    }
    assert!(!Path::new(&out).exists(), "{name}: an image was written");
}

// ---- misbehaving clients ----

fn connect(server: &Server) -> TcpStream {
    let s = TcpStream::connect(&server.addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(READ_TIMEOUT_S * 5)))
        .unwrap();
    s
}

/// Reads until the server closes the connection; returns what it sent and how long it took.
fn read_until_closed(mut s: TcpStream) -> (Vec<u8>, Duration) {
    let t = Instant::now();
    let mut got = Vec::new();
    let _ = s.read_to_end(&mut got);
    (got, t.elapsed())
}

fn misbehave(name: &str, server: &Server, case: &Case, behaviour: Behaviour) {
    let limit = Duration::from_secs(READ_TIMEOUT_S * 3);
    match behaviour {
        Behaviour::SlowHead | Behaviour::SilentConnection => {
            let opened = Instant::now();
            let mut s = connect(server);
            if behaviour == Behaviour::SlowHead {
                // A byte every 100 ms for a second, then nothing.
                for b in b"POST /v1/j" {
                    s.write_all(&[*b]).unwrap();
                    std::thread::sleep(Duration::from_millis(100));
                }
            }
            // Meanwhile the worker serves others.
            assert_eq!(server.get("/health").status, 200, "{name}");
            let _ = read_until_closed(s);
            let took = opened.elapsed();
            // Closed by the read timeout: not before it, not long after.
            let timeout = Duration::from_secs(READ_TIMEOUT_S);
            assert!(
                took >= timeout - Duration::from_millis(200) && took < limit,
                "{name}: closed after {took:?}, the read timeout is {timeout:?}"
            );
        }
        Behaviour::SlowBody => {
            let mut s = connect(server);
            let path = case
                .path
                .as_deref()
                .unwrap_or_else(|| default_path(case.interface));
            write!(
                s,
                "POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n\
                 Content-Length: 1000\r\nConnection: close\r\n\r\n{{\"prompt\": \"a"
            )
            .unwrap();
            let (got, took) = read_until_closed(s);
            assert!(took < limit, "{name}: answered after {took:?}");
            let text = String::from_utf8_lossy(&got).into_owned();
            let status = format!(" {} ", case.expect.status.unwrap_or(408));
            assert!(
                text.starts_with("HTTP/1.1") && text.contains(&status),
                "{name}: {text}"
            );
            for needle in &case.expect.contains {
                assert!(
                    text.contains(needle.as_str()),
                    "{name}: {text} lacks {needle:?}"
                );
            }
        }
        Behaviour::UnreadEvents => {
            // Full previews at every step: about 0.9 MB of events, more than the socket buffers
            // take once the client's receive window is kept small (measured: 0.7 MB stay
            // queued on the worker's side, its writer blocked).
            let id = server.submit(&json!({"operation": "image_generation", "prompt": "unread",
                "steps": 40, "width": 64, "height": 64, "preview_every": 1,
                "preview": "full"}));
            let s = small_window(server);
            write!(&s, "GET /v1/jobs/{id}/events HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
            let state = server.wait_final(&id);
            assert_eq!(state["state"], "completed", "{name}: {state}");
            // The other jobs go on while that stream is still open and unread.
            valid_job_completes(name, server);
            drop(s);
        }
    }
}

/// A connection to the worker whose receive buffer is 4 KB, so that the worker's writes to it
/// block as soon as the kernel's send buffer is full.
fn small_window(server: &Server) -> TcpStream {
    use socket2::{Domain, Socket, Type};
    let addr: std::net::SocketAddr = server.addr.parse().unwrap();
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, None).unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    socket.connect(&addr.into()).unwrap();
    socket.into()
}

fn valid_job_completes(name: &str, server: &Server) {
    let id = server.submit(
        &json!({"operation": "image_generation", "prompt": "still here",
        "steps": 1, "width": 32, "height": 32}),
    );
    let state = server.wait_final(&id);
    assert_eq!(state["state"], "completed", "after {name}: {state}");
}

#[test]
fn every_bad_input_gets_its_error_and_the_worker_goes_on() {
    let cases = corpus();
    assert!(cases.len() >= 60, "the corpus has {} cases", cases.len());
    let read_timeout = READ_TIMEOUT_S.to_string();
    let max_body = MAX_BODY.to_string();
    let loras = lora_dir().display().to_string();
    let server = Server::start(&[
        "--lora-dir",
        &loras,
        "--read-timeout",
        &read_timeout,
        "--max-body-bytes",
        &max_body,
        "--max-pixels",
        "65536",
        "--max-input-pixels",
        "1048576",
    ]);
    let mut per_interface = std::collections::BTreeMap::new();
    let mut failed = Vec::new();
    for (name, case) in &cases {
        *per_interface
            .entry(format!("{:?}", case.interface))
            .or_insert(0) += 1;
        // Every case is tried, and the failures listed together.
        let run = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            run_case(name, case, &server)
        }));
        if run.is_err() {
            failed.push(name.clone());
        }
    }
    println!("bad-input cases per interface: {per_interface:?}");
    assert!(failed.is_empty(), "failed cases: {failed:?}");
}

fn run_case(name: &str, case: &Case, server: &Server) {
    assert!(!case.about.is_empty(), "{name}: say what the case tries");
    if let Some(b) = case.behaviour {
        misbehave(name, server, case, b);
    } else if case.interface == Interface::Cli {
        run_cli(name, case);
    } else {
        let r = send(server, case);
        check_http(name, case, &r);
    }
    valid_job_completes(name, server);
    let log = server.log();
    assert!(
        log.iter()
            .all(|l| !l.contains("internal error") && !l.contains("panicked")),
        "after {name}: {log:?}"
    );
}
