//! The bus overhead of a job, with real servers on loopback: `cargo bench --bench bus [-- JOBS [WORKERS...]]`
//! (scripts/test.sh installs the servers first).
//!
//! 1. Latency, one job at a time through one worker: end-to-end time at the client (publish → `completed`
//!    event received) minus the worker's generation time, p50 and p99. That is what NATS, the worker's
//!    bookkeeping, the PNG upload and the events cost on top of the model.
//! 2. Throughput: JOBS jobs published at once, drained by 1 and by several workers (child processes,
//!    one Candle thread each); jobs/s from the first publish to the last `completed`.
//!
//! The model is the tiny SD 1.5 fixture at 32 × 32 px with one step, so generation is a few milliseconds
//! and the bus dominates. Results go to a `file://` store.

#[path = "../tests/common/mod.rs"]
mod common;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use common::servers::{NatsServer, WorkerProcess};
use futures::StreamExt;
use sd_rbee::bus::BusClient;
use sd_rbee::protocol::{self, Event, JobKind, JobRequest};
use uuid::Uuid;

fn job(i: u64) -> JobRequest {
    let mut job = JobRequest::new(JobKind::Txt2Img, "tiny", "a lighthouse at dusk");
    job.width = Some(32);
    job.height = Some(32);
    job.steps = Some(1);
    job.seed = Some(i);
    // What is measured is the bus and a generation, not the result cache.
    job.cache = false;
    job
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    let idx = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[idx.min(sorted.len() - 1)]
}

/// Publishes `jobs` and waits for each one's terminal event, seen on one subscription to every event.
async fn run_batch(client: &BusClient, jobs: &[JobRequest]) -> (Duration, HashMap<Uuid, Event>) {
    let mut events = client.nats().subscribe(client.subjects().events_wildcard()).await.unwrap();
    client.nats().flush().await.unwrap();
    let start = Instant::now();
    for j in jobs {
        client.submit(j).await.unwrap();
    }
    let mut done = HashMap::new();
    while done.len() < jobs.len() {
        let msg = tokio::time::timeout(Duration::from_secs(120), events.next()).await.expect("stalled").unwrap();
        let event = protocol::decode_event(&msg.payload).unwrap();
        if event.is_terminal() {
            assert!(done.insert(event.job_id(), event).is_none(), "a job finished twice");
        }
    }
    (start.elapsed(), done)
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let args: Vec<String> = std::env::args().skip(1).filter(|a| !a.starts_with("--")).collect();
    let jobs: u64 = args.first().and_then(|a| a.parse().ok()).unwrap_or(200);
    let fleets: Vec<usize> = match args.get(1..) {
        Some(rest) if !rest.is_empty() => rest.iter().filter_map(|a| a.parse().ok()).collect(),
        _ => vec![1, 3],
    };
    let nats = NatsServer::start();
    let store = tempfile::tempdir().unwrap();
    let store_url = format!("file://{}", store.path().display());
    let client = BusClient::connect(&nats.url(), "sd").await.unwrap();

    // 1. Latency, one job at a time.
    {
        let _worker = WorkerProcess::start("bench-0", &nats.url(), &store_url, &[], &["--preview-every", "0"]);
        // Warm-up.
        run_batch(&client, &[job(0)]).await;
        let mut overhead = Vec::new();
        let mut total = Vec::new();
        for i in 0..100 {
            let j = job(1000 + i);
            let started = Instant::now();
            let (_, done) = run_batch(&client, std::slice::from_ref(&j)).await;
            let e2e = started.elapsed().as_secs_f64() * 1000.0;
            let Some(Event::Completed(c)) = done.get(&j.id) else { panic!("job {} did not complete", j.id) };
            overhead.push(e2e - c.timings.generation_ms as f64);
            total.push(e2e);
        }
        overhead.sort_by(f64::total_cmp);
        total.sort_by(f64::total_cmp);
        println!(
            "bench: bus latency, 1 worker, 100 sequential jobs: end-to-end p50 {:.1} ms p99 {:.1} ms; \
             overhead (end-to-end minus generation) p50 {:.1} ms p99 {:.1} ms",
            percentile(&total, 0.5),
            percentile(&total, 0.99),
            percentile(&overhead, 0.5),
            percentile(&overhead, 0.99)
        );
    }

    // 2. Throughput.
    for (round, &n) in fleets.iter().enumerate() {
        let workers: Vec<WorkerProcess> = (0..n)
            .map(|w| {
                WorkerProcess::start(
                    &format!("bench-{round}-{w}"),
                    &nats.url(),
                    &store_url,
                    &[],
                    &["--preview-every", "0"],
                )
            })
            .collect();
        let batch: Vec<JobRequest> = (0..jobs).map(|i| job(10_000 * (round as u64 + 1) + i)).collect();
        let (elapsed, done) = run_batch(&client, &batch).await;
        let completed = done.values().filter(|e| matches!(e, Event::Completed(_))).count();
        assert_eq!(completed, batch.len(), "every job completes exactly once");
        println!(
            "bench: bus throughput, {n} worker(s), {jobs} jobs published at once: {:.1} jobs/s ({:.2} s)",
            jobs as f64 / elapsed.as_secs_f64(),
            elapsed.as_secs_f64()
        );
        drop(workers);
    }
}
