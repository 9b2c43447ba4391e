//! Bounded load check: many jobs from concurrent clients on loopback against the tiny model.
//! Every job must be accepted once, reach `completed` with its own seed, every refusal must be
//! a 429 with `Retry-After`, the queue must stay within `--max-queue`, and the worker's memory
//! must stay flat from one round to the next.
//!
//! `SD_LOAD_JOBS` (default 300) and `SD_LOAD_CLIENTS` (default 30) size each of the two rounds;
//! run with `--nocapture` to see the figures (jobs/s, submit latency, RSS).

mod common;

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{http, parse_sse, rss_kb, Server};
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
                    let after = r.header("retry-after").unwrap_or_default();
                    assert!(
                        after.parse::<u64>().is_ok_and(|s| s >= 1),
                        "a 429 without a Retry-After in seconds: {after:?}"
                    );
                    assert_eq!(r.json()["error"]["type"], "queue_full");
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
    let server = Server::start(&["--max-queue", "8", "--max-results", &keep]);
    let addr = Arc::new(server.addr.clone());
    let mut all_ids = HashSet::new();
    let mut rss_after = Vec::new();
    let mut total_retries = 0;
    // Watches the queue depth through /metrics while the clients run.
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let monitor = {
        let (addr, stop) = (addr.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut deepest = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let metrics = http(&addr, "GET", "/metrics", &[], None).text();
                let depth = metrics
                    .lines()
                    .find_map(|l| l.strip_prefix("sd_worker_queue_depth "))
                    .and_then(|v| v.trim().parse::<f64>().ok())
                    .unwrap_or(0.0);
                deepest = deepest.max(depth as u64);
                std::thread::sleep(Duration::from_millis(20));
            }
            deepest
        })
    };
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
        total_retries += retries;
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
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let deepest = monitor.join().expect("monitor");
    println!("deepest queue seen: {deepest} (limit 8)");
    assert!(deepest <= 8, "the queue grew to {deepest}");
    if clients > 9 {
        assert!(
            total_retries > 0,
            "{clients} clients on a queue of 8 meet a full queue at least once"
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

fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count())
}

fn median_of(mut v: Vec<u64>) -> u64 {
    v.sort_unstable();
    v.get(v.len() / 2).copied().unwrap_or(0)
}

/// The soak run (`scripts/soak.sh`, not CI): `SD_SOAK_JOBS` (default 10,000) tiny jobs from
/// `SD_SOAK_CLIENTS` (default 4) clients. Resident memory after the first 500 jobs and after
/// the last differ by less than 5%, no file descriptor leaks, and results expire by TTL.
///
/// The worker runs with `MIMALLOC_PURGE_DELAY` = `SD_SOAK_PURGE_DELAY` (default 0: freed
/// memory goes back to the system at once), so that its RSS follows live memory, which a leak
/// would grow. With its own setting (never purge; `SD_SOAK_PURGE_DELAY=keep`) RSS only steps up
/// to the most memory ever freed and held, whatever leaks. Live memory moves with the jobs in
/// flight, so each figure is the median of RSS samples (every 20 ms) over 500 jobs. The first
/// thousand jobs warm the allocator's per-thread pages up (measured: 55 MB over the first
/// thousand, 66 MB from there to 10,000 within 1%), so the check compares jobs 1,000 to 1,500
/// with the last 500; the figure from job 500 is printed too.
#[test]
#[ignore = "soak: run by scripts/soak.sh"]
fn soak() {
    let jobs = env_usize("SD_SOAK_JOBS", 10_000).max(2000);
    let clients = env_usize("SD_SOAK_CLIENTS", 4).clamp(1, jobs);
    let purge = std::env::var("SD_SOAK_PURGE_DELAY").unwrap_or_else(|_| "0".into());
    let ttl = 5u64;
    let ttl_arg = ttl.to_string();
    let args = ["--result-ttl", &ttl_arg, "--max-results", "256"];
    let env: Vec<(&str, &str)> = match purge.as_str() {
        "keep" => Vec::new(),
        delay => vec![("MIMALLOC_PURGE_DELAY", delay)],
    };
    let server = Server::spawn_env(&common::model("tiny-sd1"), &args, &env);
    server.wait_ready();
    let addr = Arc::new(server.addr.clone());
    let pid = server.pid();
    let done = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    // The first and the latest job ids.
    let ids = Arc::new(std::sync::Mutex::new((None::<String>, None::<String>)));
    let started = Instant::now();
    let handles: Vec<_> = (0..clients)
        .map(|c| {
            let (addr, done, ids) = (addr.clone(), done.clone(), ids.clone());
            std::thread::spawn(move || {
                let n = jobs / clients + usize::from(c < jobs % clients);
                for j in 0..n {
                    let body = json!({"operation": "image_generation", "prompt": "soak",
                        "steps": 1, "width": 32, "height": 32, "seed": j,
                        "preview_every": 0})
                    .to_string();
                    let r = loop {
                        let r = http(&addr, "POST", "/v1/jobs", &[], Some(body.as_bytes()));
                        if r.status != 429 {
                            break r;
                        }
                        std::thread::sleep(Duration::from_millis(20));
                    };
                    assert_eq!(r.status, 202, "{}", r.text());
                    let id = r.json()["job_id"].as_str().unwrap().to_string();
                    {
                        let mut ids = ids.lock().unwrap();
                        ids.0.get_or_insert_with(|| id.clone());
                        ids.1 = Some(id.clone());
                    }
                    let stream = http(&addr, "GET", &format!("/v1/jobs/{id}/events"), &[], None);
                    let events = parse_sse(&stream.text());
                    assert_eq!(events.last().map(|e| e.0.as_str()), Some("complete"));
                    done.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }
            })
        })
        .collect();
    let mut fds_500 = None;
    // (jobs done, RSS) every 20 ms.
    let mut samples: Vec<(usize, u64)> = Vec::new();
    while handles.iter().any(|h| !h.is_finished()) {
        let n = done.load(std::sync::atomic::Ordering::Relaxed);
        samples.push((n, rss_kb(pid)));
        if fds_500.is_none() && n >= 500 {
            fds_500 = Some(open_fds(pid));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    for h in handles {
        h.join().expect("soak client");
    }
    let wall = started.elapsed().as_secs_f64();
    let total = done.load(std::sync::atomic::Ordering::Relaxed);
    let fds_500 = fds_500.expect("500 jobs done");
    let fds_end = open_fds(pid);
    let window = |from: usize, to: usize| {
        median_of(
            samples
                .iter()
                .filter(|(n, _)| (from..to).contains(n))
                .map(|(_, r)| *r)
                .collect(),
        )
    };
    let trajectory: Vec<String> = (0..total / 1000)
        .map(|k| format!("{:.1}", window(k * 1000, (k + 1) * 1000) as f64 / 1024.0))
        .collect();
    println!(
        "soak: median RSS per 1000 jobs (MB): {}",
        trajectory.join(" ")
    );
    let rss_500 = window(500, 1000);
    let rss_1000 = window(1000, 1500);
    let rss_end = window(total - 500, total + 1);
    let change = |from: u64| (rss_end as f64 / from as f64 - 1.0) * 100.0;
    println!(
        "soak: {total} jobs from {clients} clients in {wall:.0}s ({:.1} jobs/s), \
         MIMALLOC_PURGE_DELAY {purge}; median RSS over jobs 500-1000 {:.1} MB, 1000-1500 \
         {:.1} MB, the last 500 {:.1} MB ({:+.2}% from 1000-1500, {:+.2}% from 500-1000), \
         peak {:.1} MB; open fds {fds_500} -> {fds_end}",
        total as f64 / wall,
        rss_500 as f64 / 1024.0,
        rss_1000 as f64 / 1024.0,
        rss_end as f64 / 1024.0,
        change(rss_1000),
        change(rss_500),
        vm_hwm_kb(pid) as f64 / 1024.0,
    );
    assert!(
        change(rss_1000).abs() < 5.0,
        "RSS went from {rss_1000} kB to {rss_end} kB"
    );
    assert!(
        fds_end <= fds_500 + 2,
        "fds went from {fds_500} to {fds_end}"
    );
    // Results expire: after the TTL, the last job is gone as the first is.
    let (first, last) = ids.lock().unwrap().clone();
    let (first, last) = (first.unwrap(), last.unwrap());
    assert_eq!(server.get(&format!("/v1/jobs/{last}")).status, 200);
    std::thread::sleep(Duration::from_secs(ttl + 2));
    for id in [first, last] {
        assert_eq!(server.get(&format!("/v1/jobs/{id}")).status, 404, "{id}");
    }
    println!("results expired {ttl}s after their job");
}
