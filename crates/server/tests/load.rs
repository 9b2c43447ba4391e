//! Bounded load check: many jobs from concurrent clients on loopback against the tiny model.
//! Every job must be accepted once, reach `completed` with its own seed, and the worker's
//! memory must stay flat from one round to the next.
//!
//! `SD_LOAD_JOBS` (default 300) and `SD_LOAD_CLIENTS` (default 30) size each of the two rounds;
//! run with `--nocapture` to see the figures (jobs/s, submit latency, RSS).

mod common;

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{http, parse_sse, Server};
use serde_json::json;

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

struct Done {
    id: String,
    seed: u64,
    submit_s: f64,
    retries: usize,
}

/// One client: submits its jobs one after another and follows each to its end over SSE.
fn client(addr: &str, index: usize, jobs: usize) -> Vec<Done> {
    let mut out = Vec::with_capacity(jobs);
    for j in 0..jobs {
        let seed = (index * 100_000 + j) as u64;
        let body = json!({"operation": "image_generation", "prompt": format!("load {index} {j}"),
            "steps": 2, "scheduler": "euler", "seed": seed, "preview_every": 0})
        .to_string();
        let mut retries = 0;
        let (id, submit_s) = loop {
            let t = Instant::now();
            let r = http(addr, "POST", "/v1/jobs", &[], Some(body.as_bytes()));
            let elapsed = t.elapsed().as_secs_f64();
            match r.status {
                202 => break (r.json()["job_id"].as_str().unwrap().to_string(), elapsed),
                429 => {
                    retries += 1;
                    std::thread::sleep(Duration::from_millis(50));
                }
                s => panic!("submit answered {s}: {}", r.text()),
            }
        };
        let stream = http(addr, "GET", &format!("/v1/jobs/{id}/events"), &[], None);
        let events = parse_sse(&stream.text());
        let (name, data) = events.last().expect("events");
        assert_eq!(name, "complete", "job {id}: {events:?}");
        assert_eq!(
            data["seed"].as_u64(),
            Some(seed),
            "job {id} has another job's result"
        );
        out.push(Done {
            id,
            seed,
            submit_s,
            retries,
        });
    }
    out
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i]
}

fn vm_hwm_kb(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

#[test]
fn load_check_loses_and_duplicates_nothing_and_memory_stays_flat() {
    let jobs = env_usize("SD_LOAD_JOBS", 300);
    let clients = env_usize("SD_LOAD_CLIENTS", 30).clamp(1, jobs);
    // Keep exactly one round of results: the second round replaces the first.
    let keep = jobs.to_string();
    let server = Server::start(&["--max-queue", "32", "--max-results", &keep]);
    let addr = Arc::new(server.addr.clone());
    let mut all_ids = HashSet::new();
    let mut rss_after = Vec::new();
    for round in 0..2 {
        let started = Instant::now();
        let handles: Vec<_> = (0..clients)
            .map(|c| {
                let addr = addr.clone();
                let n = jobs / clients + usize::from(c < jobs % clients);
                std::thread::spawn(move || client(&addr, round * 1000 + c, n))
            })
            .collect();
        let done: Vec<Done> = handles
            .into_iter()
            .flat_map(|h| h.join().expect("client thread"))
            .collect();
        let wall = started.elapsed().as_secs_f64();
        assert_eq!(done.len(), jobs, "every job was submitted and finished");
        for d in &done {
            assert!(all_ids.insert(d.id.clone()), "job id {} given twice", d.id);
            let status = server.status(&d.id);
            assert_eq!(status["state"], "completed");
            assert_eq!(status["seed"].as_u64(), Some(d.seed));
        }
        let mut latencies: Vec<f64> = done.iter().map(|d| d.submit_s).collect();
        latencies.sort_by(|a, b| a.total_cmp(b));
        let retries: usize = done.iter().map(|d| d.retries).sum();
        let rss = server.rss_kb();
        rss_after.push(rss);
        println!(
            "round {round}: {jobs} jobs from {clients} clients in {wall:.1}s = {:.1} jobs/s; submit latency p50 {:.1} ms, p99 {:.1} ms; 429 retries {retries}; RSS after {:.1} MB, peak {:.1} MB",
            jobs as f64 / wall,
            percentile(&latencies, 0.5) * 1e3,
            percentile(&latencies, 0.99) * 1e3,
            rss as f64 / 1024.0,
            vm_hwm_kb(server.pid()) as f64 / 1024.0,
        );
    }
    let metrics = server.get("/metrics").text();
    let completed = format!("sd_worker_jobs_total{{outcome=\"completed\"}} {}", 2 * jobs);
    assert!(metrics.contains(&completed), "{metrics}");
    assert!(metrics.contains("sd_worker_queue_depth 0"));
    assert!(metrics.contains("sd_worker_jobs_running 0"));
    // Flat: the second round (which replaces the kept results) adds at most 10% + 16 MB.
    let (first, second) = (rss_after[0], rss_after[1]);
    assert!(
        second <= first + first / 10 + 16 * 1024,
        "RSS grew from {first} kB to {second} kB"
    );
}
