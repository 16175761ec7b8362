//! A worker serving more models than fit its memory budget: `--model` entries are a catalogue, loaded on first
//! use, the least recently used one evicted to make room; jobs for a model that is not resident wait for the
//! load (a `loading` progress event, `timings.load_ms`) and complete.

use crate::common;

use std::time::Duration;

use candle_core::DType;
use common::servers::{NatsServer, WorkerProcess};
use sd_rbee::bus::BusClient;
use sd_rbee::protocol::{self, Event, JobKind, JobRequest};
use sd_rbee::worker::catalogue::estimate_bytes;

fn job(model: &str, seed: u64) -> JobRequest {
    let mut job = JobRequest::new(JobKind::Txt2Img, model, "a lighthouse at dusk");
    (job.width, job.height, job.steps, job.seed) = (Some(64), Some(64), Some(2), Some(seed));
    job
}

async fn events(client: &BusClient, job: &JobRequest) -> Vec<Event> {
    let mut seen = Vec::new();
    client.wait(job.id, Duration::from_secs(90), |e| seen.push(e.clone())).await.unwrap_or_else(|e| panic!("{e:#}"));
    seen
}

async fn heartbeat(beats: &mut async_nats::Subscriber) -> protocol::Heartbeat {
    let msg = tokio::time::timeout(Duration::from_secs(10), futures::StreamExt::next(beats)).await.unwrap().unwrap();
    protocol::decode_heartbeat(&msg.payload).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_catalogue_models_in_a_budget_for_two_all_serve_their_jobs() {
    let sd15 = common::fixture("tiny-sd15");
    let file = common::fixture("single-file").join("tiny-sd15.safetensors");
    let xl = common::fixture("tiny-sdxl");
    let sizes: Vec<u64> =
        [&sd15, &file, &xl].iter().map(|p| estimate_bytes(p.to_str().unwrap(), DType::F32).unwrap()).collect();
    let (total, smallest) = (sizes.iter().sum::<u64>(), *sizes.iter().min().unwrap());
    // Any two fit, all three do not.
    let budget = total - smallest / 2;
    assert!(sizes.iter().all(|s| total - s <= budget) && total > budget, "{sizes:?}");

    let nats = NatsServer::start();
    let store = tempfile::tempdir().unwrap();
    let store_url = format!("file://{}", store.path().display());
    let file_model = format!("tiny-file={},config={}", file.display(), sd15.display());
    let xl_model = format!("tiny-xl={}", xl.display());
    let budget_arg = budget.to_string();
    let extra = ["--model", &file_model, "--model", &xl_model, "--max-resident-bytes", &budget_arg];
    let _worker = WorkerProcess::start("w-cat", &nats.url(), &store_url, &[], &extra);
    let client = BusClient::connect(&nats.url(), "sd").await.unwrap();
    let mut beats = client.nats().subscribe(client.subjects().heartbeat("w-cat").unwrap()).await.unwrap();

    // At start the first two (in name order) are loaded; the third waits for a job.
    let beat = heartbeat(&mut beats).await;
    assert_eq!(beat.models, ["tiny", "tiny-file", "tiny-xl"]);
    assert_eq!(beat.resident, ["tiny", "tiny-file"]);

    // tiny-xl evicts tiny (least recently used), tiny then evicts tiny-file, tiny-file then evicts tiny-xl.
    let order =
        [("tiny-xl", ["tiny-file", "tiny-xl"]), ("tiny", ["tiny", "tiny-xl"]), ("tiny-file", ["tiny", "tiny-file"])];
    for (i, (model, resident_after)) in order.iter().enumerate() {
        let job = job(model, i as u64);
        client.submit(&job).await.unwrap();
        let seen = events(&client, &job).await;
        let Some(Event::Completed(done)) = seen.last() else { panic!("{model}: {seen:?}") };
        let loading =
            seen.iter().any(|e| matches!(e, Event::Progress(p) if p.phase == Some(protocol::JobPhase::Loading)));
        assert!(loading, "{model}: no loading phase in {seen:?}");
        assert!(done.timings.load_ms > 0, "{model}: {:?}", done.timings);
        // The next heartbeat after the job shows what is resident now (one sent while the job was still queued
        // may wait in the subscription's buffer: it is skipped).
        let beat = loop {
            let b = heartbeat(&mut beats).await;
            if b.state == protocol::WorkerState::Idle && b.at >= done.at {
                break b;
            }
        };
        assert_eq!(beat.resident, resident_after, "after {model}");
    }

    // A job for a resident model does not load anything.
    let again = job("tiny-file", 9);
    client.submit(&again).await.unwrap();
    let seen = events(&client, &again).await;
    let Some(Event::Completed(done)) = seen.last() else { panic!("{seen:?}") };
    assert_eq!(done.timings.load_ms, 0);
    assert!(!seen.iter().any(|e| matches!(e, Event::Progress(p) if p.phase.is_some())));
}

/// With jobs queued for a resident model and for one that is not, the resident model's go first: the worker
/// does not evict and reload between every job of a mixed queue.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queued_jobs_of_the_resident_model_go_before_a_load() {
    let sd15 = common::fixture("tiny-sd15");
    let xl = common::fixture("tiny-sdxl");
    let largest = [&sd15, &xl].iter().map(|p| estimate_bytes(p.to_str().unwrap(), DType::F32).unwrap()).max().unwrap();
    let nats = NatsServer::start();
    let store = tempfile::tempdir().unwrap();
    let store_url = format!("file://{}", store.path().display());
    let xl_model = format!("tiny-xl={}", xl.display());
    let budget = (largest + 1).to_string();
    let extra =
        ["--model", &xl_model, "--max-resident-bytes", &budget, "--step-delay", "300ms", "--preview-every", "0"];
    let _worker = WorkerProcess::start("w-pref", &nats.url(), &store_url, &[], &extra);
    let client = BusClient::connect(&nats.url(), "sd").await.unwrap();

    let first = job("tiny", 1);
    client.submit(&first).await.unwrap();
    // Once the worker runs it, queue a job for the other model, then two more for this one.
    let mut sub = client.nats().subscribe(client.subjects().events(first.id)).await.unwrap();
    tokio::time::timeout(Duration::from_secs(30), futures::StreamExt::next(&mut sub)).await.unwrap();
    let other = job("tiny-xl", 2);
    let (second, third) = (job("tiny", 3), job("tiny", 4));
    for j in [&other, &second, &third] {
        client.submit(j).await.unwrap();
    }
    let accepted_at = |seen: &[Event]| {
        seen.iter().find_map(|e| if let Event::Accepted(a) = e { Some(a.at) } else { None }).expect("accepted")
    };
    let mut at = Vec::new();
    for j in [&first, &other, &second, &third] {
        let seen = events(&client, j).await;
        assert!(matches!(seen.last(), Some(Event::Completed(_))), "{seen:?}");
        at.push(accepted_at(&seen));
    }
    assert!(at[2] < at[1] && at[3] < at[1], "the other model's job went first: accepted at {at:?}");
}
