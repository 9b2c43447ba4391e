//! A running `sd-worker serve` on a free loopback port, and a small blocking HTTP/1.1 client.

#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;

pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// A path in this test process's own temporary folder.
pub fn tmp(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("sd-worker-tests-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir.join(name)
}

/// `sd-worker` with `args` in an empty environment, output captured.
pub fn sd_worker(args: &[String]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_sd-worker"))
        .args(args)
        .env_clear()
        .output()
        .expect("run sd-worker")
}

/// (width, height, pixels, `parameters` text) of a PNG the worker wrote.
pub fn read_png(path: &Path) -> (usize, usize, Vec<u8>, String) {
    let decoder = png::Decoder::new(BufReader::new(std::fs::File::open(path).unwrap()));
    let mut reader = decoder.read_info().unwrap();
    let mut buf = vec![0; reader.output_buffer_size()];
    let info = reader.next_frame(&mut buf).unwrap();
    buf.truncate(info.buffer_size());
    let text = reader
        .info()
        .uncompressed_latin1_text
        .iter()
        .find(|t| t.keyword == "parameters")
        .map(|t| t.text.clone())
        .unwrap_or_default();
    (info.width as usize, info.height as usize, buf, text)
}

/// 8-bit images within max 3 and mean 0.5 levels of 255 of the reference.
pub fn assert_images_close(name: &str, got: &[u8], want: &[u8]) {
    assert_eq!(got.len(), want.len(), "{name}: pixel count");
    let mut max = 0u8;
    let mut sum = 0u64;
    for (a, b) in got.iter().zip(want) {
        let d = a.abs_diff(*b);
        max = max.max(d);
        sum += u64::from(d);
    }
    let mean = sum as f64 / got.len() as f64;
    assert!(
        max <= 3 && mean <= 0.5,
        "{name}: differs from diffusers by max {max}, mean {mean:.3}"
    );
}

/// The images `generate --output out` wrote for case `name` (`out` itself, or `<name>-<i>.png`
/// beside it for a batch) against the reference (B, H, W, 3) tensor, within
/// [`assert_images_close`]; each PNG's `parameters` text goes to `check_text`.
pub fn check_written_images(
    name: &str,
    out: &Path,
    want: &candle_core::Tensor,
    check_text: impl Fn(&str),
) {
    let (b, h, w, _) = want.dims4().unwrap();
    let want: Vec<u8> = want.flatten_all().unwrap().to_vec1().unwrap();
    let per = h * w * 3;
    for i in 0..b {
        let path = if b == 1 {
            out.to_path_buf()
        } else {
            out.with_file_name(format!("{name}-{i}.png"))
        };
        let (gw, gh, pixels, text) = read_png(&path);
        assert_eq!((gw, gh), (w, h), "{name}: size");
        assert_images_close(name, &pixels, &want[i * per..(i + 1) * per]);
        check_text(&text);
    }
}

pub fn model(name: &str) -> String {
    root()
        .join("fixtures/models")
        .join(name)
        .display()
        .to_string()
}

pub struct Server {
    pub child: Child,
    pub addr: String,
    pub log: Arc<Mutex<Vec<String>>>,
    log_reader: Option<std::thread::JoinHandle<()>>,
    pub token: Option<String>,
}

impl Server {
    /// Starts the worker on the tiny SD 1.x model and waits until it is ready.
    pub fn start(extra: &[&str]) -> Server {
        let server = Server::spawn(&model("tiny-sd1"), extra);
        server.wait_ready();
        server
    }

    pub fn wait_ready(&self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while self.get("/ready").status != 200 {
            assert!(Instant::now() < deadline, "not ready: {:?}", self.log());
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Starts the worker on `model_dir` once its port is open (the model may still be loading).
    pub fn spawn(model_dir: &str, extra: &[&str]) -> Server {
        Server::spawn_env(model_dir, extra, &[])
    }

    /// As `spawn`, with these environment variables (and no others).
    pub fn spawn_env(model_dir: &str, extra: &[&str], envs: &[(&str, &str)]) -> Server {
        let mut args = vec!["serve", "--model", model_dir];
        if !extra.contains(&"--port") {
            args.extend_from_slice(&["--port", "0"]);
        }
        args.extend_from_slice(extra);
        let mut child = Command::new(env!("CARGO_BIN_EXE_sd-worker"))
            .args(&args)
            .env_clear()
            .envs(envs.iter().copied())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start sd-worker serve");
        let stderr = child.stderr.take().unwrap();
        let mut lines = BufReader::new(stderr).lines();
        let first = lines.next().expect("a first line").unwrap();
        let addr = first
            .strip_prefix("listening on http://")
            .unwrap_or_else(|| panic!("unexpected first line {first:?}"))
            .to_string();
        let log = Arc::new(Mutex::new(vec![first]));
        let sink = log.clone();
        let log_reader = std::thread::spawn(move || {
            for line in lines.map_while(Result::ok) {
                sink.lock().unwrap().push(line);
            }
        });
        let token = args
            .iter()
            .position(|a| *a == "--api-key")
            .map(|i| args[i + 1].to_string());
        Server {
            child,
            addr,
            log,
            log_reader: Some(log_reader),
            token,
        }
    }

    pub fn log(&self) -> Vec<String> {
        self.log.lock().unwrap().clone()
    }

    pub fn request(&self, method: &str, path: &str, body: Option<&[u8]>) -> Response {
        let auth = self.token.as_ref().map(|t| format!("Bearer {t}"));
        let headers: Vec<(&str, &str)> = auth
            .as_deref()
            .map(|a| vec![("Authorization", a)])
            .unwrap_or_default();
        http(&self.addr, method, path, &headers, body)
    }

    pub fn get(&self, path: &str) -> Response {
        self.request("GET", path, None)
    }

    pub fn post_json(&self, path: &str, body: &Value) -> Response {
        self.request("POST", path, Some(body.to_string().as_bytes()))
    }

    pub fn delete(&self, path: &str) -> Response {
        self.request("DELETE", path, None)
    }

    /// Submits a job and returns its id (asserting 202).
    pub fn submit(&self, body: &Value) -> String {
        let r = self.post_json("/v1/jobs", body);
        assert_eq!(r.status, 202, "{}", r.text());
        r.json()["job_id"].as_str().unwrap().to_string()
    }

    pub fn status(&self, id: &str) -> Value {
        let r = self.get(&format!("/v1/jobs/{id}"));
        assert_eq!(r.status, 200, "{}", r.text());
        r.json()
    }

    pub fn wait_state(&self, id: &str, states: &[&str]) -> Value {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let v = self.status(id);
            if states.contains(&v["state"].as_str().unwrap()) {
                return v;
            }
            assert!(Instant::now() < deadline, "job {id} stuck: {v}");
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    pub fn wait_final(&self, id: &str) -> Value {
        self.wait_state(id, &["completed", "failed", "cancelled"])
    }

    /// Reads a job's event stream to its end: (event name, data) pairs.
    pub fn events(&self, id: &str) -> Vec<(String, Value)> {
        let r = self.get(&format!("/v1/jobs/{id}/events"));
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(
            r.header("content-type").as_deref(),
            Some("text/event-stream")
        );
        parse_sse(&r.text())
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn signal(&self, name: &str) {
        let status = Command::new("kill")
            .args([format!("-{name}"), self.pid().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
    }

    /// Waits for the process to exit (and for its last stderr line to be read).
    pub fn wait_exit(&mut self, limit: Duration) -> ExitStatus {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                if let Some(reader) = self.log_reader.take() {
                    let _ = reader.join();
                }
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "worker did not exit: {:?}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Resident memory of the worker in kB (Linux).
    pub fn rss_kb(&self) -> u64 {
        rss_kb(self.pid())
    }
}

pub fn rss_kb(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub struct Response {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Response {
    pub fn header(&self, name: &str) -> Option<String> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.clone())
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.text()))
    }

    /// The `{"error": {"type", "message"}}` body: (type, message).
    pub fn error(&self) -> (String, String) {
        let v = self.json();
        (
            v["error"]["type"].as_str().unwrap_or_default().to_string(),
            v["error"]["message"]
                .as_str()
                .unwrap_or_default()
                .to_string(),
        )
    }
}

/// An open event stream, read until some text was seen.
pub struct Watch {
    stream: TcpStream,
    raw: Vec<u8>,
}

impl Watch {
    /// Opens `path` and reads until the raw response contains `until` (e.g. `event: queued`).
    pub fn open(addr: &str, path: &str, until: &str) -> Watch {
        let mut stream = TcpStream::connect(addr).expect("connect");
        stream
            .set_read_timeout(Some(Duration::from_secs(120)))
            .unwrap();
        write!(
            stream,
            "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
        )
        .unwrap();
        let mut raw = Vec::new();
        let mut buf = [0u8; 8192];
        while !String::from_utf8_lossy(&raw).contains(until) {
            let n = stream.read(&mut buf).expect("read the event stream");
            assert!(
                n > 0,
                "stream ended before {until:?}: {}",
                String::from_utf8_lossy(&raw)
            );
            raw.extend_from_slice(&buf[..n]);
        }
        Watch { stream, raw }
    }

    /// Reads the rest of the stream and parses its events.
    pub fn finish(mut self) -> Vec<(String, Value)> {
        let _ = self.stream.read_to_end(&mut self.raw);
        let response = parse_response(&self.raw);
        assert_eq!(response.status, 200, "{}", response.text());
        parse_sse(&response.text())
    }
}

/// One request on a fresh connection (`Connection: close`), read to the end.
pub fn http(
    addr: &str,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Option<&[u8]>,
) -> Response {
    let mut stream = TcpStream::connect(addr).expect("connect");
    stream
        .set_read_timeout(Some(Duration::from_secs(120)))
        .unwrap();
    let mut head = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    if let Some(b) = body {
        // JSON unless the caller says otherwise.
        if !headers
            .iter()
            .any(|(k, _)| k.eq_ignore_ascii_case("content-type"))
        {
            head.push_str("Content-Type: application/json\r\n");
        }
        head.push_str(&format!("Content-Length: {}\r\n", b.len()));
    }
    head.push_str("\r\n");
    stream.write_all(head.as_bytes()).unwrap();
    if let Some(b) = body {
        // The server may answer (413) and close before reading it all.
        let _ = stream.write_all(b);
    }
    let mut raw = Vec::new();
    let _ = stream.read_to_end(&mut raw);
    parse_response(&raw)
}

fn parse_response(raw: &[u8]) -> Response {
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .unwrap_or_else(|| panic!("no header end in {:?}", String::from_utf8_lossy(raw)));
    let head = String::from_utf8_lossy(&raw[..split]).into_owned();
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap();
    let status: u16 = status_line.split(' ').nth(1).unwrap().parse().unwrap();
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .collect();
    let mut body = raw[split + 4..].to_vec();
    let chunked = headers.iter().any(|(k, v)| {
        k.eq_ignore_ascii_case("transfer-encoding") && v.eq_ignore_ascii_case("chunked")
    });
    if chunked {
        body = dechunk(&body);
    }
    Response {
        status,
        headers,
        body,
    }
}

fn dechunk(mut data: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    while let Some(eol) = data.windows(2).position(|w| w == b"\r\n") {
        let size_text = String::from_utf8_lossy(&data[..eol]);
        let size = usize::from_str_radix(size_text.split(';').next().unwrap().trim(), 16).unwrap();
        if size == 0 {
            break;
        }
        let start = eol + 2;
        out.extend_from_slice(&data[start..start + size]);
        data = &data[start + size + 2..];
    }
    out
}

/// Parses an SSE body into (event name, JSON data) pairs; comments are skipped.
pub fn parse_sse(text: &str) -> Vec<(String, Value)> {
    let mut out = Vec::new();
    for block in text.split("\n\n") {
        let mut name = String::from("message");
        let mut data = String::new();
        for line in block.lines() {
            if let Some(v) = line.strip_prefix("event:") {
                name = v.trim().to_string();
            } else if let Some(v) = line.strip_prefix("data:") {
                data.push_str(v.trim_start());
            }
        }
        if !data.is_empty() {
            out.push((name, serde_json::from_str(&data).unwrap()));
        }
    }
    out
}

pub fn b64decode(s: &str) -> Vec<u8> {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.decode(s).unwrap()
}

/// A copy of a fixture model made of symbolic links, with `replace` (a path inside the model)
/// swapped for a named pipe, so that loading blocks on it until the test writes the file.
#[cfg(unix)]
pub fn model_with_fifo(name: &str, replace: &str, tag: &str) -> PathBuf {
    let src = root().join("fixtures/models").join(name);
    let dst = std::env::temp_dir().join(format!("sd-worker-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dst);
    copy_links(&src, &dst);
    let target = dst.join(replace);
    std::fs::remove_file(&target).unwrap();
    let ok = Command::new("mkfifo").arg(&target).status().unwrap();
    assert!(ok.success());
    dst
}

#[cfg(unix)]
fn copy_links(src: &Path, dst: &Path) {
    std::fs::create_dir_all(dst).unwrap();
    for entry in std::fs::read_dir(src).unwrap() {
        let entry = entry.unwrap();
        let to = dst.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_links(&entry.path(), &to);
        } else {
            std::os::unix::fs::symlink(entry.path().canonicalize().unwrap(), &to).unwrap();
        }
    }
}
