//! Cancels reaching the worker: mid-job (within a step), between deliveries (kept on the bus for the next
//! worker), with the store down, heard only from the stored cancels, and the sweeper's `expired` cancel.
//! Same servers and fixture as [`super`].

use super::faults::wait_for_step;
use super::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_mid_job_stops_within_one_step() {
    let nats = NatsServer::start();
    let store = tempfile::tempdir().unwrap();
    let store_url = format!("file://{}", store.path().display());
    let _worker = WorkerProcess::start("w-cancel", &nats.url(), &store_url, &[], &["--step-delay", "250ms"]);
    let client = BusClient::connect(&nats.url(), "sd").await.unwrap();

    let job = tiny_job(40, 5);
    client.submit(&job).await.unwrap();
    let mut seen_step = 0;
    let mut sent = false;
    let events = client.events(job.id).await.unwrap();
    tokio::pin!(events);
    let mut last = None;
    let mut steps_after_cancel = 0;
    while let Some(e) = tokio::time::timeout(Duration::from_secs(60), events.next()).await.unwrap() {
        let e = e.unwrap();
        if let Event::Progress(p) = &e {
            if sent {
                steps_after_cancel += 1;
            }
            seen_step = p.step;
            if p.step == 3 && !sent {
                client.cancel(job.id, Some("test".into())).await.unwrap();
                sent = true;
            }
        }
        if e.is_terminal() {
            last = Some(e);
            break;
        }
    }
    match last {
        Some(Event::Cancelled(c)) => {
            let at = c.at_step.expect("a running job reports where it stopped");
            assert!((3..=4).contains(&at), "stopped at step {at}, cancel sent after step 3");
            assert_eq!(at, seen_step);
            assert!(steps_after_cancel <= 1, "{steps_after_cancel} steps ran after the cancel");
        }
        other => panic!("expected cancelled, got {other:?}"),
    }
    assert!(!store.path().join(format!("jobs/{}", job.id)).exists(), "a cancelled job stores nothing");

    // A cancel that arrives before the job is delivered also stops it.
    let early = tiny_job(2, 6);
    client.cancel(early.id, None).await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    client.submit(&early).await.unwrap();
    let events = events_of(&client, early.id, Duration::from_secs(30)).await;
    assert!(matches!(events.last(), Some(Event::Cancelled(c)) if c.at_step.is_none()), "{events:?}");
}

/// A cancel sent while no worker holds the job (its worker crashed and the job waits for redelivery) is
/// kept on the bus: the worker that takes the job later, which never heard the request, reports it
/// `cancelled` without running it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_cancelled_between_deliveries_is_not_run_by_a_worker_started_later() {
    let nats = NatsServer::start();
    let store = tempfile::tempdir().unwrap();
    let store_url = format!("file://{}", store.path().display());
    let flags = ["--ack-wait", "2s", "--step-delay", "150ms", "--checkpoint-every", "1"];
    let mut first = WorkerProcess::start("w-crash", &nats.url(), &store_url, &[], &flags);
    let client = BusClient::connect(&nats.url(), "sd").await.unwrap();
    let job = tiny_job(20, 12);
    client.submit(&job).await.unwrap();
    wait_for_step(&client, job.id, 2).await;
    first.kill();
    let checkpoint = store.path().join(protocol::resume_key(job.id));
    assert!(checkpoint.exists(), "the crashed worker left a checkpoint");
    client.cancel(job.id, Some("cancelled while between deliveries".into())).await.unwrap();

    let _later = WorkerProcess::start("w-later", &nats.url(), &store_url, &[], &flags);
    let events = events_of(&client, job.id, Duration::from_secs(60)).await;
    assert!(matches!(events.last(), Some(Event::Cancelled(c)) if c.at_step.is_none()), "{events:?}");
    assert_eq!(accepted_by(&events), ["w-crash"], "the later worker did not start it: {events:?}");
    assert!(!store.path().join(format!("jobs/{}", job.id)).exists(), "a cancelled job stores nothing");
    assert!(!checkpoint.exists(), "its checkpoint is deleted");
    wait_for_empty_queue(&client).await;
}

/// With the store down (and retried for a minute), a cancelled job is still reported within seconds: deleting
/// its checkpoint does not hold up the report.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_cancelled_while_the_store_is_down_is_reported_at_once() {
    let nats = NatsServer::start();
    let mut s3 = S3Server::start();
    let flags = ["--store-retry", "60s", "--step-delay", "300ms"];
    let _worker = WorkerProcess::start("w-s3-cancel", &nats.url(), &s3.store_url(), &s3.env(), &flags);
    let client = BusClient::connect(&nats.url(), "sd").await.unwrap();
    let job = tiny_job(40, 32);
    client.submit(&job).await.unwrap();
    wait_for_step(&client, job.id, 2).await;
    s3.kill();
    let asked = std::time::Instant::now();
    client.cancel(job.id, None).await.unwrap();
    let events = events_of(&client, job.id, Duration::from_secs(60)).await;
    assert!(matches!(events.last(), Some(Event::Cancelled(_))), "{events:?}");
    assert!(asked.elapsed() < Duration::from_secs(20), "cancelled after {:?}", asked.elapsed());
}

/// A worker that never hears a cancel's core message (its connection was down, or moving between servers)
/// still stops the running job: it reads the stored cancels while the job runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_running_job_whose_cancel_message_was_missed_is_stopped_by_the_stored_cancel() {
    let nats = NatsServer::start();
    let store = tempfile::tempdir().unwrap();
    let store_url = format!("file://{}", store.path().display());
    let _worker = WorkerProcess::start("w-missed", &nats.url(), &store_url, &[], &["--step-delay", "300ms"]);
    let client = BusClient::connect(&nats.url(), "sd").await.unwrap();
    let job = tiny_job(60, 53);
    client.submit(&job).await.unwrap();
    wait_for_step(&client, job.id, 2).await;
    // Stored only: published where no worker listens, and kept by SD_CANCELS under the cancel's subject.
    let js = jetstream::new(async_nats::connect(nats.url()).await.unwrap());
    let subjects = protocol::Subjects::new("sd").unwrap();
    let mut config = js.get_stream(subjects.cancels_stream()).await.unwrap().info().await.unwrap().config.clone();
    config.subjects.push("missed.cancel.*".into());
    config.subject_transform = Some(jetstream::stream::SubjectTransform {
        source: "missed.cancel.*".into(),
        destination: "sd.cancel.{{wildcard(1)}}".into(),
    });
    js.update_stream(&config).await.unwrap();
    let (v, at) = (protocol::PROTOCOL_VERSION, protocol::now_millis());
    let request = protocol::CancelRequest { v, job_id: job.id, at, reason: None, expired: false };
    js.publish(format!("missed.cancel.{}", job.id), protocol::encode(&request).into()).await.unwrap().await.unwrap();
    assert!(client.stored_cancel(job.id).await.unwrap().is_some(), "the cancel is stored");

    let sent = std::time::Instant::now();
    let events = events_of(&client, job.id, Duration::from_secs(30)).await;
    assert!(matches!(events.last(), Some(Event::Cancelled(_))), "{events:?}");
    assert!(sent.elapsed() < Duration::from_secs(10), "stopped {:?} after the cancel was stored", sent.elapsed());
}

/// The queens' sweeper stops a job whose ttl passed with a cancel marked `expired`: its worker ends it
/// timed out, not cancelled.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_cancel_ends_the_running_job_timed_out() {
    let nats = NatsServer::start();
    let store = tempfile::tempdir().unwrap();
    let store_url = format!("file://{}", store.path().display());
    let _worker = WorkerProcess::start("w-expired", &nats.url(), &store_url, &[], &["--step-delay", "300ms"]);
    let client = BusClient::connect(&nats.url(), "sd").await.unwrap();
    let job = tiny_job(60, 54);
    client.submit(&job).await.unwrap();
    wait_for_step(&client, job.id, 2).await;
    client.cancel_expired(job.id).await.unwrap();
    let events = events_of(&client, job.id, Duration::from_secs(30)).await;
    assert!(matches!(events.last(), Some(Event::Failed(f)) if f.code == ErrorCode::Timeout), "{events:?}");
}
