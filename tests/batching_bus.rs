//! Cross-job batching end to end, through a real nats-server and `sd-rbee worker` processes: 32 compatible
//! jobs (tiny SD 1.5, 64 × 64, 20 steps, each its own prompt and seed) queued before the worker starts,
//! drained with `--max-batch 1` and with `--max-batch 4`, seven times each, alternating. The batched worker
//! must make the same images, report the batch sizes it ran in its heartbeats, and at least 1.2× the images
//! per second (the figure).
//!
//! The ratio is printed for each pair and as the median, which is what is asserted: on the 2-core machine
//! kind single pairs ranged 1.00–1.39 (a shared, noisy host) and medians of five 1.21–1.28, of seven 1.24
//! (2026-12-02; the README gives the figures and the command).

mod common;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use common::servers::{NatsServer, WorkerProcess};
use futures::StreamExt;
use sd_rbee::bus::BusClient;
use sd_rbee::protocol::{self, Event, JobKind, JobRequest};

const JOBS: usize = 32;
/// Drains with each setting, alternating; the median pair is asserted. Single pairs ranged 1.02-1.54 on the
/// shared 2-core host and the median of seven fell to 1.19 once in five runs (12-02): eleven narrow it.
const PAIRS: usize = 11;
const PROMPTS: [&str; 4] =
    ["a watercolor fox in the snow", "a lighthouse at dusk", "a bowl of ripe pears", "a red bicycle by a wall"];

fn jobs() -> Vec<JobRequest> {
    (0..JOBS)
        .map(|i| {
            let mut job = JobRequest::new(JobKind::Txt2Img, "tiny", PROMPTS[i % PROMPTS.len()]);
            job.width = Some(64);
            job.height = Some(64);
            job.steps = Some(20);
            job.seed = Some(1000 + i as u64);
            job
        })
        .collect()
}

/// What one drain of the queue gave: images per second (first `accepted` to last `completed`, as the
/// client saw them), each job's PNG in submission order, and the batch sizes the worker reported.
struct Drain {
    images_per_s: f64,
    pngs: Vec<image::RgbImage>,
    batches: Vec<u64>,
}

async fn drain(max_batch: &str) -> Drain {
    let nats = NatsServer::start();
    let store = tempfile::tempdir().unwrap();
    let store_url = format!("file://{}", store.path().display());
    let client = BusClient::connect(&nats.url(), "sd").await.unwrap();
    let jobs = jobs();
    for job in &jobs {
        client.submit(job).await.unwrap();
    }
    let mut events = client.nats().subscribe(client.subjects().events_wildcard()).await.unwrap();
    let mut beats = client.nats().subscribe(client.subjects().heartbeats_wildcard()).await.unwrap();
    client.nats().flush().await.unwrap();

    // Both Candle threads of this machine, previews every 5 steps as by default.
    let env = [("RAYON_NUM_THREADS".to_string(), "2".to_string())];
    let id = format!("w-batch-{max_batch}");
    let mut worker = WorkerProcess::start(
        &id,
        &nats.url(),
        &store_url,
        &env,
        &["--max-batch", max_batch, "--preview-every", "5", "--heartbeat-interval", "200ms"],
    );
    let mut first_accepted = None;
    let mut done: HashMap<uuid::Uuid, Instant> = HashMap::new();
    while done.len() < JOBS {
        let msg = tokio::time::timeout(Duration::from_secs(300), events.next())
            .await
            .unwrap_or_else(|_| panic!("stalled after {} jobs:\n{}", done.len(), worker.log_text()))
            .unwrap();
        match protocol::decode_event(&msg.payload).unwrap() {
            Event::Accepted(_) => {
                first_accepted.get_or_insert_with(Instant::now);
            }
            Event::Completed(c) => {
                done.insert(c.job_id, Instant::now());
            }
            e if e.is_terminal() => panic!("a job did not complete: {e:?}\n{}", worker.log_text()),
            _ => {}
        }
    }
    let first = first_accepted.expect("jobs were accepted");
    let last = *done.values().max().unwrap();
    let images_per_s = JOBS as f64 / last.duration_since(first).as_secs_f64();

    // A heartbeat sent after the last job reports every batch.
    let batches = loop {
        let msg = tokio::time::timeout(Duration::from_secs(10), beats.next()).await.expect("a heartbeat").unwrap();
        let hb = protocol::decode_heartbeat(&msg.payload).unwrap();
        if hb.worker_id == id && hb.jobs_done == JOBS as u64 {
            assert_eq!(hb.max_batch.to_string(), max_batch);
            break hb.batches;
        }
    };
    worker.terminate();
    worker.wait(Duration::from_secs(30));

    let pngs = jobs
        .iter()
        .map(|j| image::open(store.path().join(format!("jobs/{}/0.png", j.id))).unwrap().to_rgb8())
        .collect();
    Drain { images_per_s, pngs, batches }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn four_job_batches_make_more_images_per_second_and_the_same_images() {
    let mut ratios = Vec::new();
    for pair in 0..PAIRS {
        let alone = drain("1").await;
        let batched = drain("4").await;
        let ratio = batched.images_per_s / alone.images_per_s;
        println!(
            "pair {pair}: 32 jobs, tiny SD 1.5, 64×64, 20 steps: {:.2} images/s with --max-batch 1, {:.2} with --max-batch 4 ({ratio:.2}×); batches run {:?} and {:?}",
            alone.images_per_s, batched.images_per_s, alone.batches, batched.batches
        );
        ratios.push(ratio);
        assert_eq!(alone.batches, vec![JOBS as u64], "--max-batch 1 runs every job alone");
        let images_in_batches: u64 = batched.batches.iter().enumerate().map(|(i, n)| (i as u64 + 1) * n).sum();
        assert_eq!(images_in_batches, JOBS as u64, "every job ran in exactly one batch: {:?}", batched.batches);
        assert!(
            batched.batches.len() == 4 && batched.batches[3] >= 6,
            "mostly full batches of 4: {:?}",
            batched.batches
        );

        // The same images: the float images differ by at most 1e-5 (tests/batching.rs), so a PNG value may
        // round the other way now and then, by one level.
        let (mut worst, mut changed, mut values) = (0u8, 0usize, 0usize);
        for (a, b) in alone.pngs.iter().zip(&batched.pngs) {
            let (max, n) = common::png_diff(a, b);
            worst = worst.max(max);
            changed += n;
            values += a.as_raw().len();
        }
        println!("pair {pair}: PNG values that differ: {changed} of {values}, by at most {worst}");
        assert!(worst <= 1, "a batched image differs from the same job run alone by {worst} levels");
        assert!(changed * 1000 <= values, "{changed} of {values} PNG values differ");
    }
    ratios.sort_by(f64::total_cmp);
    let median = ratios[PAIRS / 2];
    println!("median images/s ratio, --max-batch 4 over 1: {median:.2}× (pairs: {ratios:.2?})");
    assert!(
        median >= 1.2,
        "batches of 4 made {median:.2}× the images per second of batches of 1 (median of {PAIRS} pairs)"
    );
}
