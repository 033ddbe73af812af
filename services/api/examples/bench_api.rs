//! Load benchmark of the API over real HTTP, against a fresh database and an embedded S3 server.
//!
//! 1. GET /v1/jobs/{id} from `--connections` concurrent clients for `--seconds`: first as fast
//!    as the clients can go (closed loop: throughput), then at a fixed `--rate` spread over the
//!    same connections (open loop: latency at that load, measured from each request's scheduled
//!    time, so a stalled server is not hidden by clients that stop sending). Requests/s, p50,
//!    p99.
//! 2. POST /v1/jobs with the five 768x768 dog6 photos from `--post-connections` clients for
//!    `--seconds`: jobs accepted per second.
//!
//! ```sh
//! cargo run -p sidbooth-api --example bench_api -- --seconds 10
//! ```
//!
//! Client and server share the machine's cores; the numbers include the client's own cost.

use std::{
    path::PathBuf,
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc,
    },
    time::Duration,
};

use reqwest::{
    multipart::{Form, Part},
    StatusCode,
};
use sidbooth_api::{ApiConfig, AppState};
use sidbooth_core::testing::{TestDb, TestStorage};
use tokio::time::{Instant, MissedTickBehavior};

struct Options {
    seconds: u64,
    connections: usize,
    post_connections: usize,
    rate: u64,
}

fn options() -> Options {
    let mut options = Options {
        seconds: 10,
        connections: 64,
        post_connections: 4,
        rate: 2000,
    };
    let args: Vec<String> = std::env::args().skip(1).collect();
    for pair in args.chunks(2) {
        let value = pair.get(1).and_then(|v| v.parse::<u64>().ok());
        match (pair[0].as_str(), value) {
            ("--seconds", Some(v)) => options.seconds = v,
            ("--connections", Some(v)) => options.connections = v.max(1) as usize,
            ("--post-connections", Some(v)) => options.post_connections = v.max(1) as usize,
            ("--rate", Some(v)) => options.rate = v.max(1),
            (flag, _) => panic!(
                "unknown or incomplete flag {flag}; use --seconds N --connections N \
                 --post-connections N --rate N"
            ),
        }
    }
    options
}

fn photos() -> Vec<(String, Vec<u8>)> {
    let dir =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../../shared/datasets/dreambooth/dog6");
    (0..5)
        .map(|i| {
            let name = format!("{i:02}.jpg");
            let bytes = std::fs::read(dir.join(&name))
                .unwrap_or_else(|e| panic!("reading {}: {e}", dir.join(&name).display()));
            (name, bytes)
        })
        .collect()
}

fn form(photos: &[(String, Vec<u8>)]) -> Form {
    let mut form = Form::new().text("spec", r#"{"subject_class":"dog"}"#);
    for (name, bytes) in photos {
        form = form.part("images", Part::bytes(bytes.clone()).file_name(name.clone()));
    }
    form
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let idx = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[idx]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

struct Get {
    client: reqwest::Client,
    url: String,
    key: String,
    connections: usize,
    duration: Duration,
}

struct GetResult {
    connections: usize,
    elapsed: Duration,
    latencies: Vec<Duration>,
    errors: u64,
}

impl Get {
    /// Closed loop without a rate; with one, each connection sends on a fixed schedule.
    async fn run(&self, rate: Option<u64>) -> GetResult {
        let start = Instant::now();
        let tasks: Vec<_> = (0..self.connections)
            .map(|i| {
                let (client, url, key) = (self.client.clone(), self.url.clone(), self.key.clone());
                let duration = self.duration;
                let mut schedule = rate.map(|rate| {
                    let period = Duration::from_secs_f64(self.connections as f64 / rate as f64);
                    let offset = period.mul_f64(i as f64 / self.connections as f64);
                    let mut ticker = tokio::time::interval_at(start + offset, period);
                    ticker.set_missed_tick_behavior(MissedTickBehavior::Burst);
                    ticker
                });
                tokio::spawn(async move {
                    let mut latencies = Vec::new();
                    let mut errors = 0u64;
                    while start.elapsed() < duration {
                        let sent = match schedule.as_mut() {
                            Some(ticker) => ticker.tick().await,
                            None => Instant::now(),
                        };
                        match client.get(&url).bearer_auth(&key).send().await {
                            Ok(r) if r.status() == StatusCode::OK => {
                                let _ = r.bytes().await;
                                latencies.push(sent.elapsed());
                            }
                            _ => errors += 1,
                        }
                    }
                    (latencies, errors)
                })
            })
            .collect();
        let mut result = GetResult {
            connections: self.connections,
            elapsed: Duration::ZERO,
            latencies: Vec::new(),
            errors: 0,
        };
        for task in tasks {
            let (latencies, errors) = task.await.unwrap();
            result.latencies.extend(latencies);
            result.errors += errors;
        }
        result.elapsed = start.elapsed();
        result.latencies.sort();
        result
    }
}

impl GetResult {
    fn print(&self, mode: &str) {
        println!(
            "GET /v1/jobs/{{id}} ({mode}): {} connections, {:.1} s: {} requests, {:.0} req/s, \
             p50 {:.2} ms, p99 {:.2} ms, errors {}",
            self.connections,
            self.elapsed.as_secs_f64(),
            self.latencies.len(),
            self.latencies.len() as f64 / self.elapsed.as_secs_f64(),
            ms(percentile(&self.latencies, 0.50)),
            ms(percentile(&self.latencies, 0.99)),
            self.errors,
        );
    }
}

#[tokio::main]
async fn main() {
    let options = options();
    let duration = Duration::from_secs(options.seconds);
    let db = TestDb::new().await;
    let storage = TestStorage::start().await;
    let state = AppState::new(db.pool.clone(), storage.store.clone(), ApiConfig::default());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(sidbooth_api::serve(listener, state, std::future::pending()));
    let key = sidbooth_core::tenants::create_key(&db.pool, "bench")
        .await
        .unwrap()
        .secret;
    let photos = photos();
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(options.connections.max(options.post_connections))
        .build()
        .unwrap();

    let created = client
        .post(format!("{base}/v1/jobs"))
        .bearer_auth(&key)
        .multipart(form(&photos))
        .send()
        .await
        .unwrap();
    assert_eq!(created.status(), StatusCode::ACCEPTED);
    let job: serde_json::Value = created.json().await.unwrap();

    // GET /v1/jobs/{id}
    let get = Get {
        client: client.clone(),
        url: format!("{base}/v1/jobs/{}", job["id"].as_str().unwrap()),
        key: key.clone(),
        connections: options.connections,
        duration,
    };
    get.run(None).await.print("closed loop");
    get.run(Some(options.rate))
        .await
        .print(&format!("open loop at {} req/s", options.rate));

    // POST /v1/jobs with 5 photos
    let accepted = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let start = Instant::now();
    let tasks: Vec<_> = (0..options.post_connections)
        .map(|_| {
            let (client, base, key) = (client.clone(), base.clone(), key.clone());
            let (accepted, failed, stop) = (accepted.clone(), failed.clone(), stop.clone());
            let photos = photos.clone();
            tokio::spawn(async move {
                while !stop.load(Ordering::Relaxed) {
                    match client
                        .post(format!("{base}/v1/jobs"))
                        .bearer_auth(&key)
                        .multipart(form(&photos))
                        .send()
                        .await
                    {
                        Ok(r) if r.status() == StatusCode::ACCEPTED => {
                            accepted.fetch_add(1, Ordering::Relaxed);
                        }
                        _ => {
                            failed.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
            })
        })
        .collect();
    tokio::time::sleep(duration).await;
    stop.store(true, Ordering::Relaxed);
    for task in tasks {
        task.await.unwrap();
    }
    let elapsed = start.elapsed();
    let accepted = accepted.load(Ordering::Relaxed);
    println!(
        "POST /v1/jobs (5 photos of 768x768, {:.0} KiB per request): {} connections, {:.1} s: \
         {accepted} jobs, {:.1} jobs/s, errors {}",
        photos.iter().map(|(_, b)| b.len()).sum::<usize>() as f64 / 1024.0,
        options.post_connections,
        elapsed.as_secs_f64(),
        accepted as f64 / elapsed.as_secs_f64(),
        failed.load(Ordering::Relaxed),
    );
}
