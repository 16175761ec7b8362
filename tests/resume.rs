//! Resuming from checkpoints, through real nats-server and worker processes: a worker killed with SIGKILL
//! at about 60 % of a 100-step job leaves a checkpoint every 10 steps; the next worker takes the job up from
//! the last one (its progress events say `resumed_from_step`), computes fewer than 100 + 10 steps in all
//! between them, ends with the bytes of an uninterrupted run, and the checkpoint is gone afterwards.

use crate::common;

use std::time::Duration;

use common::servers::{NatsServer, WorkerProcess};
use futures::StreamExt;
use sd_rbee::bus::BusClient;
use sd_rbee::protocol::{self, Event, JobKind, JobRequest};

const STEPS: u32 = 100;
const EVERY: u32 = 10;

fn job(steps: u32) -> JobRequest {
    let mut job = JobRequest::new(JobKind::Txt2Img, "tiny", "a lighthouse in a storm");
    job.width = Some(64);
    job.height = Some(64);
    job.steps = Some(steps);
    job.seed = Some(77);
    // DPM-Solver++ keeps a multistep history: the checkpoint must carry it for the bytes to match.
    job.scheduler = Some(sd_rbee::diffusion::SchedulerKind::DpmPp2m.name().to_string());
    job.cache = false;
    job
}

async fn events_of(client: &BusClient, job: &JobRequest) -> Vec<Event> {
    let mut seen = Vec::new();
    client.wait(job.id, Duration::from_secs(120), |e| seen.push(e.clone())).await.unwrap();
    seen
}

/// A delivery's progress: (step, resumed_from_step) for each step it reported.
type Steps = Vec<(u32, Option<u32>)>;

/// The progress events of each delivery, split at its `accepted` event: (worker, its steps).
fn deliveries(events: &[Event]) -> Vec<(String, Steps)> {
    let mut out: Vec<(String, Steps)> = Vec::new();
    for e in events {
        match e {
            Event::Accepted(a) => out.push((a.worker_id.clone(), Vec::new())),
            Event::Progress(p) if p.step > 0 => out.last_mut().unwrap().1.push((p.step, p.resumed_from_step)),
            _ => {}
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_workers_job_resumes_from_its_last_checkpoint_with_the_same_bytes() {
    let nats = NatsServer::start();
    let results = tempfile::tempdir().unwrap();
    let store = format!("file://{}", results.path().display());
    let every = EVERY.to_string();
    let flags = ["--ack-wait", "2s", "--checkpoint-every", &every, "--checkpoint-interval", "0s"];
    let slow: Vec<&str> = flags.iter().copied().chain(["--step-delay", "60ms"]).collect();
    let mut first = WorkerProcess::start("resume-a", &nats.url(), &store, &[], &slow);
    let client = BusClient::connect(&nats.url(), "sd").await.unwrap();
    let interrupted = job(STEPS);
    client.submit(&interrupted).await.unwrap();

    // SIGKILL at about 60 %.
    let events = client.events(interrupted.id).await.unwrap();
    tokio::pin!(events);
    while let Some(e) = tokio::time::timeout(Duration::from_secs(60), events.next()).await.unwrap() {
        if matches!(e.unwrap(), Event::Progress(p) if p.step >= STEPS * 6 / 10) {
            break;
        }
    }
    first.kill();
    let checkpoint = results.path().join(protocol::resume_key(interrupted.id));
    assert!(checkpoint.exists(), "a checkpoint was stored");
    let _second = WorkerProcess::start("resume-b", &nats.url(), &store, &[], &flags);

    let events = events_of(&client, &interrupted).await;
    let runs = deliveries(&events);
    assert_eq!(runs.len(), 2, "two deliveries: {runs:?}");
    let (ref a, ref a_steps) = runs[0];
    let (ref b, ref b_steps) = runs[1];
    assert_eq!((a.as_str(), b.as_str()), ("resume-a", "resume-b"));
    let killed_at = a_steps.iter().map(|(s, _)| *s).max().unwrap();
    assert!(a_steps.iter().all(|(_, r)| r.is_none()), "the first delivery started from the beginning");
    let resumed_from = b_steps[0].1.expect("the second delivery's progress says resumed_from_step");
    assert_eq!(resumed_from % EVERY, 0, "a checkpoint step");
    assert!(
        resumed_from <= killed_at && killed_at - resumed_from < EVERY + 2,
        "the last checkpoint: {resumed_from} (killed at {killed_at})"
    );
    let b_expected: Steps = (resumed_from + 1..=STEPS).map(|s| (s, Some(resumed_from))).collect();
    assert_eq!(b_steps, &b_expected, "the second delivery ran only the steps after the checkpoint");
    let computed = killed_at + (STEPS - resumed_from);
    println!("killed at step {killed_at}, resumed from {resumed_from}: {computed} steps computed for {STEPS}");
    assert!(
        computed < STEPS + EVERY,
        "{computed} steps computed in all (killed at {killed_at}, resumed from {resumed_from})"
    );
    assert!(matches!(events.last(), Some(Event::Completed(_))), "{events:?}");
    assert!(!checkpoint.exists(), "the checkpoint is deleted when the job ends");

    // The same job, uninterrupted (a new id: no checkpoint; no cache), gives the same bytes.
    let whole = job(STEPS);
    client.submit(&whole).await.unwrap();
    let events = events_of(&client, &whole).await;
    assert!(deliveries(&events).iter().all(|(_, steps)| steps.iter().all(|(_, r)| r.is_none())));
    let image = |j: &JobRequest| std::fs::read(results.path().join(protocol::result_key(j.id, 0, "png"))).unwrap();
    assert!(image(&whole) == image(&interrupted), "the resumed job's image equals the uninterrupted run's bytes");
}

/// A worker stopped by SIGTERM past its grace, on the job's last allowed delivery, requeues the job as a new
/// message (its delivery count starts again): the next worker still takes it up from the checkpoint.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_requeued_at_shutdown_resumes_from_its_checkpoint() {
    let nats = NatsServer::start();
    let results = tempfile::tempdir().unwrap();
    let store = format!("file://{}", results.path().display());
    let flags = ["--max-deliver", "1", "--grace", "0s", "--checkpoint-every", "5", "--checkpoint-interval", "0s"];
    let slow: Vec<&str> = flags.iter().copied().chain(["--step-delay", "100ms"]).collect();
    let mut first = WorkerProcess::start("requeue-a", &nats.url(), &store, &[], &slow);
    let client = BusClient::connect(&nats.url(), "sd").await.unwrap();
    let job = job(30);
    client.submit(&job).await.unwrap();
    let events = client.events(job.id).await.unwrap();
    tokio::pin!(events);
    while let Some(e) = tokio::time::timeout(Duration::from_secs(60), events.next()).await.unwrap() {
        if matches!(e.unwrap(), Event::Progress(p) if p.step >= 12) {
            break;
        }
    }
    first.terminate();
    first.wait(Duration::from_secs(30));
    let _second = WorkerProcess::start("requeue-b", &nats.url(), &store, &[], &flags);
    let events = events_of(&client, &job).await;
    let runs = deliveries(&events);
    let (ref b, ref b_steps) = runs.last().unwrap().clone();
    assert_eq!(b, "requeue-b", "{runs:?}");
    let resumed_from = b_steps[0].1.expect("the requeued job resumed from its checkpoint");
    assert!(resumed_from >= 10 && resumed_from % 5 == 0, "{resumed_from}");
    assert!(matches!(events.last(), Some(Event::Completed(_))), "{events:?}");
}
