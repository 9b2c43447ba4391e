//! Faults on loopback with the tiny model: a cancel stops a running job within one step, a
//! client that leaves an event stream midway does not stall the engine, and a worker killed
//! with SIGKILL serves again as soon as it is restarted on the same port. (SIGTERM draining is
//! in `server.rs`, load in `load.rs`.)

mod common;

use std::time::{Duration, Instant};

use common::{model, Server, Watch};
use serde_json::{json, Value};

/// A job of many steps with a preview after each, so that events flow while it runs.
fn long_job(steps: u64) -> Value {
    json!({"operation": "image_generation", "prompt": "long", "width": 64, "height": 64,
           "steps": steps, "scheduler": "euler", "preview_every": 1})
}

fn quick_job_completes(server: &Server) {
    let id = server.submit(&json!({"operation": "image_generation", "prompt": "quick",
        "steps": 1, "width": 32, "height": 32}));
    assert_eq!(server.wait_final(&id)["state"], "completed");
}

fn no_internal_error(server: &Server) {
    let log = server.log();
    assert!(log.iter().all(|l| !l.contains("internal error")), "{log:?}");
}

#[test]
fn cancel_takes_effect_within_one_step() {
    let server = Server::start(&[]);
    let id = server.submit(&long_job(150));
    let deadline = Instant::now() + Duration::from_secs(30);
    while server.status(&id)["step"].as_u64().unwrap() < 3 {
        assert!(Instant::now() < deadline, "the job does not run");
        std::thread::sleep(Duration::from_millis(5));
    }
    let r = server.delete(&format!("/v1/jobs/{id}"));
    assert_eq!(r.status, 202, "{}", r.text());
    // The steps done when the request arrived, and the one then in flight: no more.
    let asked_at = r.json()["step"].as_u64().unwrap();
    let v = server.wait_final(&id);
    assert_eq!(v["state"], "cancelled");
    let stopped = v["step"].as_u64().unwrap();
    assert!(
        stopped <= asked_at + 1,
        "cancelled at step {stopped}, asked at step {asked_at}"
    );
    quick_job_completes(&server);
    no_internal_error(&server);
}

#[test]
fn a_client_that_leaves_an_event_stream_does_not_stall_the_engine() {
    let server = Server::start(&[]);
    // Long enough (several seconds) that it still runs when the last client arrives.
    let id = server.submit(&long_job(150));
    // Several clients follow the job and hang up after its first progress event.
    for _ in 0..4 {
        let watch = Watch::open(
            &server.addr,
            &format!("/v1/jobs/{id}/events"),
            "event: progress",
        );
        drop(watch);
    }
    let v = server.wait_final(&id);
    assert_eq!(v["state"], "completed", "{v}");
    // A stream opened afterwards replays the job to its end.
    let events = server.events(&id);
    assert_eq!(events.last().unwrap().0, "complete");
    quick_job_completes(&server);
    no_internal_error(&server);
}

#[test]
fn sigkill_then_restart_serves_again_at_once() {
    let mut first = Server::start(&[]);
    let port = first.addr.rsplit(':').next().unwrap().to_string();
    let id = first.submit(&long_job(150));
    first.wait_state(&id, &["running"]);
    first.signal("KILL");
    let status = first.wait_exit(Duration::from_secs(10));
    assert!(!status.success(), "killed: {status:?}");

    // Same port, at once: the listening socket is reusable while the killed connections
    // linger in TIME_WAIT.
    let t = Instant::now();
    let second = Server::spawn(&model("tiny-sd1"), &["--port", &port]);
    second.wait_ready();
    let ready_in = t.elapsed();
    println!("restarted and ready in {:.2}s", ready_in.as_secs_f64());
    assert!(
        ready_in < Duration::from_secs(10),
        "ready after {ready_in:?}"
    );
    // The killed worker's jobs are gone (results are kept in memory only); new ones run.
    assert_eq!(second.get(&format!("/v1/jobs/{id}")).status, 404);
    quick_job_completes(&second);
    no_internal_error(&second);
}
