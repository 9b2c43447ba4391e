//! The OpenAI Images API end to end, with the requests the official `openai` Python package
//! (3.63.0) sends: recorded by `scripts/clients/record_openai.py` into `fixtures/openai/` and
//! replayed here byte for byte (headers, JSON bodies, multipart forms). Each result is compared
//! with the same job through the native API or the CLI, whose pixels the parity tests tie to
//! diffusers; errors must come in OpenAI's shape and leave the worker serving.

mod common;

use std::io::Write;
use std::net::TcpStream;
use std::time::{Duration, Instant};

use common::{b64decode, http, model, root, sd_worker, tmp, Response, Server};
use serde_json::{json, Value};

const TOKEN: &str = "secret-token";

struct Recorded {
    method: String,
    path: String,
    content_type: Option<String>,
    body: Vec<u8>,
}

fn recorded(name: &str) -> Recorded {
    let path = root().join(format!("crates/server/tests/fixtures/openai/{name}.json"));
    let v: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    assert_eq!(v["authorization"], format!("Bearer {TOKEN}"));
    Recorded {
        method: v["method"].as_str().unwrap().into(),
        path: v["path"].as_str().unwrap().into(),
        content_type: v["content_type"].as_str().map(str::to_string),
        body: b64decode(v["body_b64"].as_str().unwrap()),
    }
}

/// Sends a recorded request as the client sent it.
fn replay(server: &Server, name: &str) -> Response {
    let r = recorded(name);
    let auth = format!("Bearer {TOKEN}");
    let mut headers = vec![("Authorization", auth.as_str())];
    if let Some(ct) = &r.content_type {
        headers.push(("Content-Type", ct.as_str()));
    }
    let body = (r.method == "POST").then_some(r.body.as_slice());
    http(&server.addr, &r.method, &r.path, &headers, body)
}

fn post(server: &Server, path: &str, body: &Value) -> Response {
    let auth = format!("Bearer {TOKEN}");
    http(
        &server.addr,
        "POST",
        path,
        &[("Authorization", &auth)],
        Some(body.to_string().as_bytes()),
    )
}

/// The base64 images of an OpenAI answer.
fn images(r: &Response) -> Vec<Vec<u8>> {
    assert_eq!(r.status, 200, "{}", r.text());
    r.json()["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| b64decode(d["b64_json"].as_str().unwrap()))
        .collect()
}

/// The PNG files of a native job.
fn native_images(server: &Server, body: Value) -> Vec<Vec<u8>> {
    let id = server.submit(&body);
    let done = server.wait_final(&id);
    assert_eq!(done["state"], "completed", "{done}");
    let n = done["images"].as_array().unwrap().len();
    (0..n)
        .map(|i| server.get(&format!("/v1/jobs/{id}/images/{i}")).body)
        .collect()
}

/// `(type, param, code)` of an OpenAI error answer.
fn openai_error(r: &Response) -> (String, String, String) {
    let v = r.json();
    let e = &v["error"];
    assert!(e["message"].as_str().is_some_and(|m| !m.is_empty()), "{v}");
    let s = |k: &str| e[k].as_str().unwrap_or("").to_string();
    (s("type"), s("param"), s("code"))
}

fn server() -> Server {
    Server::start(&["--api-key", TOKEN])
}

#[test]
fn generations_equal_the_native_job() {
    let server = server();
    let got = images(&replay(&server, "generations"));
    let want = native_images(
        &server,
        json!({"operation": "image_generation", "prompt": "a photo of a cat",
               "negative_prompt": "blurry", "width": 32, "height": 32, "steps": 4, "seed": 42,
               "guidance_scale": 6.0, "scheduler": "euler", "batch": 2, "preview_every": 0}),
    );
    assert_eq!(got.len(), 2);
    assert_eq!(got, want, "the same PNG bytes as /v1/jobs");

    let models = replay(&server, "models");
    assert_eq!(models.status, 200, "{}", models.text());
    let v = models.json();
    assert_eq!(v["object"], "list");
    assert_eq!(v["data"][0]["id"], "tiny-sd1");
    let one = server.get("/v1/models/tiny-sd1");
    assert_eq!(one.json()["id"], "tiny-sd1");
    let other = server.get("/v1/models/dall-e-3");
    assert_eq!(other.status, 404);
    assert_eq!(openai_error(&other).2, "model_not_found");
}

#[test]
fn url_answers_and_other_encodings() {
    let server = server();
    let r = replay(&server, "generations_url");
    assert_eq!(r.status, 200, "{}", r.text());
    let url = r.json()["data"][0]["url"].as_str().unwrap().to_string();
    let path = url
        .strip_prefix(&format!("http://{}", server.addr))
        .unwrap_or_else(|| panic!("{url} is not on this worker"));
    // A capability URL: fetched without the bearer token, as OpenAI's are.
    let file = http(&server.addr, "GET", path, &[], None);
    assert_eq!(file.status, 200);
    assert_eq!(&file.body[1..4], b"PNG");
    let missing = http(
        &server.addr,
        "GET",
        "/v1/images/files/nope/0.png",
        &[],
        None,
    );
    assert_eq!(
        (missing.status, openai_error(&missing).0.as_str()),
        (404, "invalid_request_error")
    );

    let jpeg = images(&replay(&server, "generations_jpeg"));
    assert_eq!(&jpeg[0][..3], &[0xFF, 0xD8, 0xFF], "a JPEG file");
    let r = post(
        &server,
        "/v1/images/generations",
        &json!({"prompt": "a", "size": "32x32", "steps": 1, "output_format": "webp"}),
    );
    let webp = images(&r);
    assert_eq!(&webp[0][..4], b"RIFF");
    assert_eq!(r.json()["output_format"], "webp");
    assert_eq!(r.json()["size"], "32x32");
}

/// A PNG mask, white where `inside(x, y)`.
fn white_mask(w: u32, h: u32, inside: impl Fn(u32, u32) -> bool) -> Vec<u8> {
    let mut out = Vec::new();
    let mut enc = png::Encoder::new(&mut out, w, h);
    enc.set_color(png::ColorType::Grayscale);
    let mut writer = enc.write_header().unwrap();
    let pixels: Vec<u8> = (0..h)
        .flat_map(|y| (0..w).map(move |x| (x, y)))
        .map(|(x, y)| if inside(x, y) { 255 } else { 0 })
        .collect();
    writer.write_image_data(&pixels).unwrap();
    writer.finish().unwrap();
    out
}

fn b64(bytes: &[u8]) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

#[test]
fn edits_with_a_transparent_mask_equal_native_inpainting() {
    let server = server();
    let got = images(&replay(&server, "edits_mask"));
    let square = std::fs::read(root().join("fixtures/inputs/square32.png")).unwrap();
    // The recorded mask is transparent on the 16x16 square in the middle.
    let mask = white_mask(32, 32, |x, y| (8..24).contains(&x) && (8..24).contains(&y));
    let want = native_images(
        &server,
        json!({"operation": "image_inpaint", "prompt": "a red hat", "width": 32, "height": 32,
               "steps": 4, "seed": 7, "scheduler": "euler", "preview_every": 0,
               "init_image": b64(&square), "mask_image": b64(&mask)}),
    );
    assert_eq!(got, want);
}

#[test]
fn variations_equal_the_cli_image_to_image() {
    let server = server();
    let got = images(&replay(&server, "variations"));
    let out = tmp("openai-variation.png");
    let init = root().join("fixtures/inputs/square32.png");
    let args: Vec<String> = [
        "generate",
        "--model",
        &model("tiny-sd1"),
        "--prompt",
        "",
        "--init-image",
        init.to_str().unwrap(),
        "--strength",
        "0.5",
        "--steps",
        "4",
        "--seed",
        "3",
        "--scheduler",
        "euler",
        "--width",
        "32",
        "--height",
        "32",
        "--output",
        out.to_str().unwrap(),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let o = sd_worker(&args);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(got, vec![std::fs::read(&out).unwrap()]);
}

#[test]
fn bad_requests_get_openai_errors_naming_the_param_and_the_worker_goes_on() {
    let server = server();
    let gen = "/v1/images/generations";
    let cases: Vec<(Value, u16, &str, &str)> = vec![
        (
            json!({"prompt": "a", "foo": 1}),
            400,
            "foo",
            "unknown_parameter",
        ),
        (json!({"prompt": "a", "n": 99}), 400, "n", "invalid_value"),
        (
            json!({"prompt": "a", "size": "33x32"}),
            400,
            "size",
            "invalid_value",
        ),
        (
            json!({"prompt": "a", "size": "big"}),
            400,
            "size",
            "invalid_value",
        ),
        (
            json!({"prompt": "a", "model": "dall-e-3"}),
            404,
            "model",
            "model_not_found",
        ),
        (
            json!({"prompt": "a", "quality": "hd"}),
            400,
            "quality",
            "invalid_value",
        ),
        (
            json!({"prompt": "a", "style": "vivid"}),
            400,
            "style",
            "invalid_value",
        ),
        (
            json!({"prompt": "a", "background": "transparent"}),
            400,
            "background",
            "invalid_value",
        ),
        (
            json!({"prompt": "a", "response_format": "url", "output_format": "jpeg"}),
            400,
            "response_format",
            "invalid_value",
        ),
        (
            json!({"prompt": "a", "output_compression": 101, "output_format": "jpeg"}),
            400,
            "output_compression",
            "invalid_value",
        ),
        (
            json!({"prompt": "a", "steps": 0}),
            400,
            "steps",
            "invalid_value",
        ),
        (
            json!({"prompt": "a", "sampler": "dpm-fast"}),
            400,
            "sampler",
            "invalid_value",
        ),
        (
            json!({"prompt": "a", "schedule": "exponential"}),
            400,
            "schedule",
            "invalid_value",
        ),
        (
            json!({"prompt": "a", "strength": 0.5}),
            400,
            "strength",
            "invalid_value",
        ),
        (
            json!({"prompt": "a", "seed": "x"}),
            400,
            "seed",
            "invalid_value",
        ),
        (
            json!({"prompt": "a", "loras": [{"path": "x"}]}),
            400,
            "loras",
            "invalid_value",
        ),
        (json!({"n": 1}), 400, "prompt", "invalid_value"),
        (json!({"prompt": ""}), 400, "prompt", "invalid_value"),
    ];
    for (body, status, param, code) in cases {
        let r = post(&server, gen, &body);
        assert_eq!(r.status, status, "{body}: {}", r.text());
        let (kind, got_param, got_code) = openai_error(&r);
        assert_eq!(kind, "invalid_request_error", "{body}");
        assert_eq!(
            (got_param.as_str(), got_code.as_str()),
            (param, code),
            "{body}: {}",
            r.text()
        );
        let message = r.json()["error"]["message"].as_str().unwrap().to_string();
        assert!(message.contains(param), "{body}: {message}");
    }
    let auth = format!("Bearer {TOKEN}");
    let malformed = http(
        &server.addr,
        "POST",
        gen,
        &[("Authorization", &auth)],
        Some(b"{"),
    );
    assert_eq!(malformed.status, 400);
    let unauthorized = http(&server.addr, "POST", gen, &[], Some(b"{\"prompt\": \"a\"}"));
    assert_eq!(unauthorized.status, 401);
    assert_eq!(openai_error(&unauthorized).2, "invalid_api_key");
    let no_route = http(
        &server.addr,
        "GET",
        "/v1/images/nothing",
        &[("Authorization", &auth)],
        None,
    );
    assert_eq!(
        (no_route.status, openai_error(&no_route).0.as_str()),
        (404, "invalid_request_error")
    );

    // A form without an image, with two, with a JSON body, with a mask that has no
    // transparency.
    let form = |parts: &[(&str, Option<&str>, &[u8])]| {
        let boundary = "XyZ";
        let mut body = Vec::new();
        for (name, file, data) in parts {
            write!(
                body,
                "--{boundary}\r\nContent-Disposition: form-data; name=\"{name}\""
            )
            .unwrap();
            if let Some(f) = file {
                write!(body, "; filename=\"{f}\"\r\nContent-Type: image/png").unwrap();
            }
            body.extend_from_slice(b"\r\n\r\n");
            body.extend_from_slice(data);
            body.extend_from_slice(b"\r\n");
        }
        write!(body, "--{boundary}--\r\n").unwrap();
        let ct = format!("multipart/form-data; boundary={boundary}");
        http(
            &server.addr,
            "POST",
            "/v1/images/edits",
            &[("Authorization", &auth), ("Content-Type", &ct)],
            Some(&body),
        )
    };
    let square = std::fs::read(root().join("fixtures/inputs/square32.png")).unwrap();
    let opaque_mask = white_mask(32, 32, |_, _| true);
    for (parts, param) in [
        (vec![("prompt", None, &b"a"[..])], "image"),
        (
            vec![
                ("prompt", None, &b"a"[..]),
                ("image", Some("a.png"), &square[..]),
                ("image", Some("b.png"), &square[..]),
            ],
            "image",
        ),
        (
            vec![
                ("prompt", None, &b"a"[..]),
                ("image", Some("a.png"), &square[..]),
                ("mask", Some("m.png"), &opaque_mask[..]),
            ],
            "mask",
        ),
        (
            vec![
                ("prompt", None, &b"a"[..]),
                ("image", Some("a.png"), &b"not an image"[..]),
            ],
            "image",
        ),
        (
            vec![
                ("prompt", None, &b"a"[..]),
                ("image", Some("a.png"), &square[..]),
                ("n", None, &b"two"[..]),
            ],
            "n",
        ),
    ] {
        let r = form(&parts);
        assert_eq!(r.status, 400, "{param}: {}", r.text());
        assert_eq!(openai_error(&r).1, param, "{}", r.text());
    }
    let json_edit = post(&server, "/v1/images/edits", &json!({"prompt": "a"}));
    assert_eq!(json_edit.status, 400, "{}", json_edit.text());

    // An opaque image and no mask: image-to-image of the whole image.
    let r = form(&[
        ("prompt", None, b"a"),
        ("image", Some("a.png"), &square),
        ("steps", None, b"2"),
        ("strength", None, b"0.5"),
    ]);
    assert_eq!(images(&r).len(), 1);
    // And the worker still serves.
    let ok = post(
        &server,
        gen,
        &json!({"prompt": "a", "size": "32x32", "steps": 1}),
    );
    assert_eq!(images(&ok).len(), 1);
}

#[test]
fn a_client_that_hangs_up_cancels_its_job() {
    let server = server();
    let body =
        json!({"prompt": "long", "size": "64x64", "steps": 150, "sampler": "euler"}).to_string();
    let mut stream = TcpStream::connect(&server.addr).unwrap();
    let head = format!(
        "POST /v1/images/generations HTTP/1.1\r\nHost: {}\r\nAuthorization: Bearer {TOKEN}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        server.addr,
        body.len()
    );
    stream.write_all(head.as_bytes()).unwrap();
    stream.write_all(body.as_bytes()).unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    let running = loop {
        let jobs = server.get("/v1/jobs").json();
        if let Some(j) = jobs["jobs"]
            .as_array()
            .unwrap()
            .iter()
            .find(|j| j["state"] == "running")
        {
            break j["job_id"].as_str().unwrap().to_string();
        }
        assert!(Instant::now() < deadline, "the job never started");
        std::thread::sleep(Duration::from_millis(20));
    };
    drop(stream);
    let done = server.wait_final(&running);
    assert_eq!(done["state"], "cancelled", "{done}");
    assert_eq!(done["cancel_reason"], "client");
}

/// The requests Open WebUI's OpenAI image engine sends (`backend/open_webui/routers/images.py`,
/// commit 02530d50): generations as `{model, prompt, n, size, response_format: "b64_json"}`
/// (plus the admin's extra parameters, here our `steps`), edits as a form with `model`,
/// `prompt`, `n`, `size`, `response_format` and the images as `image[]` parts.
#[test]
fn open_webui_requests_work() {
    let server = server();
    let body = json!({"model": "tiny-sd1", "prompt": "a photo of a cat", "n": 1, "size": "32x32",
                      "response_format": "b64_json", "steps": 2});
    assert_eq!(
        images(&post(&server, "/v1/images/generations", &body)).len(),
        1
    );

    let square = std::fs::read(root().join("fixtures/inputs/square32.png")).unwrap();
    let boundary = "OpenWebUIBoundary";
    let mut form = Vec::new();
    for (name, value) in [
        ("model", "tiny-sd1"),
        ("prompt", "a hat"),
        ("n", "1"),
        ("size", "32x32"),
        ("response_format", "b64_json"),
        ("steps", "2"),
    ] {
        write!(
            form,
            "--{boundary}\r\nContent-Disposition: form-data; name=\"{name}\"\r\n\r\n{value}\r\n"
        )
        .unwrap();
    }
    write!(form, "--{boundary}\r\nContent-Disposition: form-data; name=\"image[]\"; filename=\"a.png\"\r\nContent-Type: image/png\r\n\r\n").unwrap();
    form.extend_from_slice(&square);
    write!(form, "\r\n--{boundary}--\r\n").unwrap();
    let auth = format!("Bearer {TOKEN}");
    let ct = format!("multipart/form-data; boundary={boundary}");
    let r = http(
        &server.addr,
        "POST",
        "/v1/images/edits",
        &[("Authorization", &auth), ("Content-Type", &ct)],
        Some(&form),
    );
    assert_eq!(images(&r).len(), 1);
}
