//! The result cache, through real nats-server, store and worker processes: a second identical seeded job is
//! answered in a small fraction of the first's time with the same bytes and no generation on any worker
//! (their batch counts say so), on another worker too; any pixel-deciding change, a job without a seed and a
//! job that opts out all generate; an entry naming another object of the store is not copied out.

use crate::common;

use std::time::{Duration, Instant};

use common::queen::{client, follow, start_queen, tiny};
use common::servers::{NatsServer, WorkerProcess};
use sd_rbee::api::{JobSubmission, QueenClient, WorkerInfo};
use sd_rbee::protocol::{self, Event};
use sd_rbee::vocab::ImageFormat;

/// Runs `job` to its end: (seconds it took, whether it came from the cache, image 0's bytes).
async fn run(c: &QueenClient, job: &JobSubmission) -> (f64, bool, Vec<u8>) {
    let start = Instant::now();
    let id = c.submit(job, None).await.unwrap().job_id;
    let events = follow(c, id).await;
    let elapsed = start.elapsed().as_secs_f64();
    let last = events.last().unwrap();
    assert_eq!(last.event, "completed", "{events:?}");
    let cached = last.data["cached"].as_bool().unwrap_or(false);
    assert_eq!(c.status(id).await.unwrap().status.cached, cached, "the status record says the same");
    (elapsed, cached, c.image(id, 0).await.unwrap())
}

/// The live worker `id` as the queen last heard it, once its heartbeat shows `cache_hits`.
async fn worker(c: &QueenClient, id: &str, cache_hits: u64) -> WorkerInfo {
    let start = Instant::now();
    loop {
        let workers = c.workers().await.unwrap();
        if let Some(w) = workers.iter().find(|w| w.heartbeat.worker_id == id && w.heartbeat.cache_hits == cache_hits) {
            return w.clone();
        }
        assert!(start.elapsed() < Duration::from_secs(10), "{id} never reported {cache_hits} cache hits: {workers:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn generated(w: &WorkerInfo) -> u64 {
    w.heartbeat.batches.iter().sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn identical_seeded_jobs_come_from_the_cache_and_any_change_misses() {
    let nats = NatsServer::start();
    let results = tempfile::tempdir().unwrap();
    let store = format!("file://{}", results.path().display());
    let queen = start_queen(&nats.url(), &store, &[], |c| c.api.model_catalogue = vec!["tiny".into()]).await;
    let slow = ["--step-delay", "150ms"];
    let mut first = WorkerProcess::start("cache-a", &nats.url(), &store, &[], &slow);
    let c = client(&queen);

    let long = tiny(20, 11);
    let (made_in, cached, made) = run(&c, &long).await;
    assert!(!cached);
    let (answered_in, cached, answered) = run(&c, &long).await;
    assert!(cached, "the second identical seeded job comes from the cache");
    assert_eq!(answered, made, "with the same bytes");
    eprintln!("generated in {made_in:.3} s, answered from the cache in {answered_in:.3} s");
    assert!(answered_in < made_in * 0.05, "in {answered_in:.3} s against {made_in:.3} s");
    let a = worker(&c, "cache-a", 1).await;
    assert_eq!(generated(&a), 1, "one generation for two jobs: {:?}", a.heartbeat.batches);

    // Any change to what decides the pixels misses; a job without a seed, or that opts out, generates.
    let base = tiny(2, 21);
    assert!(!run(&c, &base).await.1);
    let mut changed = Vec::new();
    for change in 0..8 {
        let mut job = base.clone();
        match change {
            0 => job.seed = Some(22),
            1 => job.prompt.push_str(", at night"),
            2 => job.negative_prompt = Some("blurry".into()),
            3 => job.guidance = Some(3.0),
            4 => job.scheduler = Some("euler".into()),
            5 => job.steps = Some(3),
            6 => job.width = Some(72),
            _ => job.output_format = Some(ImageFormat::Jpeg),
        }
        changed.push(job);
    }
    let unseeded = JobSubmission { seed: None, ..base.clone() };
    let opted_out = JobSubmission { cache: Some(false), ..base.clone() };
    for job in changed.iter().chain([&unseeded, &unseeded, &opted_out]) {
        assert!(!run(&c, job).await.1, "{job:?} must generate");
    }
    assert!(run(&c, &base).await.1, "the unchanged job still hits");
    let a = worker(&c, "cache-a", 2).await;
    assert_eq!(generated(&a), 1 + 1 + 8 + 3, "{:?}", a.heartbeat.batches);

    // Another worker, with nothing in memory, answers from the same store.
    first.terminate();
    first.wait(Duration::from_secs(30));
    let _second = WorkerProcess::start("cache-b", &nats.url(), &store, &[], &slow);
    let (_, cached, again) = run(&c, &long).await;
    assert!(cached && again == made, "another worker answers from the cache");
    let b = worker(&c, "cache-b", 1).await;
    assert_eq!(generated(&b), 0, "and generates nothing: {:?}", b.heartbeat.batches);

    // An entry that names another object of the store (anyone who can write there, or a bug, could make
    // one) is not copied out as the job's result: the job generates, and gets its own image.
    let secret = b"someone else's upload";
    std::fs::create_dir_all(results.path().join("uploads")).unwrap();
    std::fs::write(results.path().join("uploads/secret.png"), secret).unwrap();
    for entry in std::fs::read_dir(results.path().join("cache")).unwrap() {
        let path = entry.unwrap().path();
        let Ok(Event::Completed(mut c)) = protocol::decode_event(&std::fs::read(&path).unwrap()) else { continue };
        c.images.iter_mut().for_each(|i| i.key = "uploads/secret.png".into());
        std::fs::write(&path, protocol::encode(&Event::Completed(c))).unwrap();
    }
    let (_, cached, regenerated) = run(&c, &long).await;
    assert!(!cached && regenerated == made, "generated again, the same image");

    // An image the entry names, cut short on the disk, is a miss too (not copied out as the result).
    let mut cut = 0;
    for entry in std::fs::read_dir(results.path().join("cache")).unwrap() {
        let Ok(Event::Completed(c)) = protocol::decode_event(&std::fs::read(entry.unwrap().path()).unwrap()) else {
            continue;
        };
        for image in &c.images {
            let file = results.path().join(&image.key);
            let bytes = std::fs::read(&file).unwrap();
            std::fs::write(&file, &bytes[..bytes.len() / 2]).unwrap();
            cut += 1;
        }
    }
    assert!(cut > 0, "no cached image to cut");
    let (_, cached, regenerated) = run(&c, &long).await;
    assert!(!cached && regenerated == made, "generated again, the whole image");
}
