//! Registration with an orchestrator against a loopback listener: `ready` once the model is
//! loaded, heartbeats with the queue, `stopping` on SIGTERM; an orchestrator that cannot be
//! reached is logged and the worker keeps serving.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::sync::mpsc;
use std::time::Duration;

use common::{model, Server};
use serde_json::{json, Value};

/// A loopback orchestrator: every POST body it receives, in order.
fn orchestrator() -> (String, mpsc::Receiver<(String, Value)>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/workers", listener.local_addr().unwrap());
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            let mut reader = BufReader::new(stream.try_clone().unwrap());
            let mut request_line = String::new();
            reader.read_line(&mut request_line).unwrap();
            let mut length = 0;
            loop {
                let mut line = String::new();
                reader.read_line(&mut line).unwrap();
                if line.trim().is_empty() {
                    break;
                }
                if let Some((k, v)) = line.split_once(':') {
                    if k.eq_ignore_ascii_case("content-length") {
                        length = v.trim().parse().unwrap();
                    }
                }
            }
            let mut body = vec![0; length];
            reader.read_exact(&mut body).unwrap();
            let mut stream = stream;
            let _ = stream.write_all(b"HTTP/1.1 204 No Content\r\nConnection: close\r\n\r\n");
            let value = serde_json::from_slice(&body).unwrap_or(Value::Null);
            if tx.send((request_line.trim().to_string(), value)).is_err() {
                break;
            }
        }
    });
    (url, rx)
}

fn next(rx: &mpsc::Receiver<(String, Value)>) -> Value {
    let (line, v) = rx
        .recv_timeout(Duration::from_secs(30))
        .expect("a post from the worker");
    assert_eq!(line, "POST /workers HTTP/1.1");
    v
}

#[test]
fn the_worker_announces_itself_heartbeats_and_says_it_stops() {
    let (url, rx) = orchestrator();
    let mut server = Server::spawn(
        &model("tiny-sd1"),
        &[
            "--worker-id",
            "w-1",
            "--callback-url",
            &url,
            "--heartbeat-secs",
            "1",
            "--public-url",
            "http://gpu-7.internal:8080",
        ],
    );
    server.wait_ready();
    let ready = next(&rx);
    assert_eq!(ready["state"], "ready");
    assert_eq!(ready["worker_id"], "w-1");
    assert_eq!(ready["url"], "http://gpu-7.internal:8080");
    assert_eq!(ready["model"]["name"], "tiny-sd1");
    assert_eq!(ready["model"]["family"], "sd1");
    assert_eq!(
        (ready["device"].as_str(), ready["dtype"].as_str()),
        (Some("cpu"), Some("f32"))
    );
    assert_eq!(ready["apis"], json!(["native", "openai", "a1111"]));
    assert_eq!(
        ready["operations"],
        json!(["image_generation", "image_transform", "image_inpaint"])
    );
    assert_eq!(
        (ready["queue_depth"].as_u64(), ready["max_queue"].as_u64()),
        (Some(0), Some(32))
    );
    let beat = next(&rx);
    assert_eq!(beat["state"], "ready");
    assert!(beat["sent_at"].as_u64() >= ready["sent_at"].as_u64());
    server.signal("TERM");
    let status = server.wait_exit(Duration::from_secs(30));
    assert!(status.success());
    let mut last = next(&rx);
    while last["state"] == "ready" {
        last = next(&rx);
    }
    assert_eq!(last["state"], "stopping");
}

#[test]
fn an_unreachable_orchestrator_does_not_stop_the_worker() {
    // A port nothing listens on.
    let closed = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/workers", closed.local_addr().unwrap());
    drop(closed);
    let server = Server::start(&[
        "--worker-id",
        "w-2",
        "--callback-url",
        &url,
        "--heartbeat-secs",
        "1",
    ]);
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while !server
        .log()
        .iter()
        .any(|l| l.contains("could not be reached"))
    {
        assert!(std::time::Instant::now() < deadline, "{:?}", server.log());
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(server.get("/ready").status, 200);
    let id = server.submit(&json!({"operation": "image_generation", "prompt": "a", "steps": 1}));
    assert_eq!(server.wait_final(&id)["state"], "completed");
}

#[test]
fn registration_flags_are_checked_at_start() {
    for (args, needle) in [
        (vec!["--worker-id", "w"], "--callback-url"),
        (vec!["--callback-url", "http://x/"], "--worker-id"),
        (
            vec!["--worker-id", "w", "--callback-url", "ftp://x/"],
            "http://",
        ),
        (
            vec![
                "--worker-id",
                "w",
                "--callback-url",
                "http://x/",
                "--heartbeat-secs",
                "0",
            ],
            "--heartbeat-secs",
        ),
    ] {
        let mut full = vec![
            "serve".to_string(),
            "--model".into(),
            model("tiny-sd1"),
            "--port".into(),
            "0".into(),
        ];
        full.extend(args.iter().map(|s| s.to_string()));
        let o = common::sd_worker(&full);
        assert_eq!(o.status.code(), Some(1), "{args:?}");
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(err.contains(needle), "{args:?}: {err}");
    }
}
