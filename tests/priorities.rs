//! Job priorities end to end, through a real nats-server and an `sd-rbee worker` process running one job at a
//! time: jobs queued before the worker starts are taken high before normal before low, and the worker's
//! `--priority-share` keeps low jobs moving under a stream of high ones. The queen reports a queued job's
//! position counting the higher priorities ahead of it.

use crate::common;

use std::time::Duration;

use common::servers::{NatsServer, WorkerProcess};
use futures::StreamExt;
use sd_rbee::bus::BusClient;
use sd_rbee::protocol::{self, Event, JobKind, JobRequest};
use sd_rbee::vocab::Priority;
use uuid::Uuid;

fn job(priority: Priority, i: usize) -> JobRequest {
    let mut job = JobRequest::new(JobKind::Txt2Img, "tiny", format!("job {i} at {}", priority.as_str()));
    job.width = Some(32);
    job.height = Some(32);
    job.steps = Some(2);
    job.seed = Some(i as u64);
    job.priority = priority;
    job
}

/// Submits `jobs` in order, then starts one worker (one job at a time) and returns the priorities of the
/// jobs in the order they completed.
async fn completion_order(jobs: &[JobRequest], extra: &[&str]) -> Vec<Priority> {
    let nats = NatsServer::start();
    let store = tempfile::tempdir().unwrap();
    let store_url = format!("file://{}", store.path().display());
    let client = BusClient::connect(&nats.url(), "sd").await.unwrap();
    for job in jobs {
        client.submit(job).await.unwrap();
    }
    let mut events = client.nats().subscribe(client.subjects().events_wildcard()).await.unwrap();
    client.nats().flush().await.unwrap();
    let env = [("RAYON_NUM_THREADS".to_string(), "1".to_string())];
    let mut args = vec!["--preview-every", "0"];
    args.extend_from_slice(extra);
    let mut worker = WorkerProcess::start("w-priorities", &nats.url(), &store_url, &env, &args);
    let priority_of = |id: Uuid| jobs.iter().find(|j| j.id == id).map(|j| j.priority).expect("one of ours");
    let mut order = Vec::new();
    while order.len() < jobs.len() {
        let msg = tokio::time::timeout(Duration::from_secs(120), events.next())
            .await
            .unwrap_or_else(|_| panic!("stalled after {} jobs:\n{}", order.len(), worker.log_text()))
            .unwrap();
        match protocol::decode_event(&msg.payload).unwrap() {
            Event::Completed(c) => order.push(priority_of(c.job_id)),
            e if e.is_terminal() => panic!("a job did not complete: {e:?}\n{}", worker.log_text()),
            _ => {}
        }
    }
    worker.terminate();
    worker.wait(Duration::from_secs(30));
    order
}

fn letters(order: &[Priority]) -> String {
    order.iter().map(|p| p.as_str().chars().next().unwrap()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn high_jobs_overtake_queued_low_ones() {
    let mut jobs: Vec<JobRequest> = (0..40).map(|i| job(Priority::Low, i)).collect();
    jobs.extend((40..45).map(|i| job(Priority::High, i)));
    jobs.extend((45..47).map(|i| job(Priority::Normal, i)));
    let order = completion_order(&jobs, &[]).await;
    println!("completion order (h/n/l): {}", letters(&order));
    assert_eq!(
        &order[..7],
        &[Priority::High; 5].into_iter().chain([Priority::Normal; 2]).collect::<Vec<_>>()[..],
        "the 5 high jobs, then the 2 normal ones, before any of the 40 low ones queued first: {}",
        letters(&order)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn low_jobs_keep_moving_under_a_stream_of_high_ones() {
    let mut jobs: Vec<JobRequest> = (0..10).map(|i| job(Priority::Low, i)).collect();
    jobs.extend((10..40).map(|i| job(Priority::High, i)));
    let order = completion_order(&jobs, &["--priority-share", "4"]).await;
    println!("completion order (h/l), --priority-share 4: {}", letters(&order));
    // One pick in four starts from the bottom: every fourth job is a low one while both queues hold jobs.
    let expected: String = (0..40).map(|i| if i % 4 == 3 { 'l' } else { 'h' }).collect();
    assert_eq!(letters(&order), expected, "the share holds");
    // Strict priority (share 0) would have run every high job first.
    let strict = completion_order(&jobs, &["--priority-share", "0"]).await;
    assert_eq!(letters(&strict), "h".repeat(30) + &"l".repeat(10));
}
