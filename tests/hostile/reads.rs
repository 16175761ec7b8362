//! What the queen reads and lets others read: a job's stored events (anyone on the bus can publish them),
//! bounded; the headers a page on an allowed origin may read; a status record it cannot read, which still
//! lets its job end.

use crate::common::hostile::QueenChild;
use crate::common::servers::NatsServer;

use sd_rbee::bus::BusClient;
use sd_rbee::protocol::{self, Event};
use uuid::Uuid;

#[test]
fn a_page_on_an_allowed_origin_can_read_retry_after_and_x_should_retry() {
    let nats = NatsServer::start();
    let store = tempfile::tempdir().unwrap();
    let args = ["--cors-origin", "http://ui.example"];
    let queen = QueenChild::start_with(&nats.url(), store.path().to_str().unwrap(), &[], &args);
    let url = format!("http://127.0.0.1:{}/v1/jobs/{}", queen.port, Uuid::new_v4());
    let exposed = |origin: &str| {
        let response = reqwest::blocking::Client::new().get(&url).header("origin", origin).send().unwrap();
        let header = |name: &str| response.headers().get(name).map(|v| v.to_str().unwrap().to_ascii_lowercase());
        (header("access-control-allow-origin"), header("access-control-expose-headers"))
    };
    let (allowed, exposed_headers) = exposed("http://ui.example");
    assert_eq!(allowed.as_deref(), Some("http://ui.example"));
    let exposed_headers = exposed_headers.unwrap_or_default();
    for name in ["retry-after", "x-should-retry"] {
        assert!(exposed_headers.split(',').any(|h| h.trim() == name), "{name} not in {exposed_headers:?}");
    }
    assert_eq!(exposed("http://elsewhere.example").0, None, "another origin is not allowed");
}

/// What the queen replays of a finished job is read up to its end, and no more than a bound of any job:
/// anyone on the bus can publish a job's events, and each reader of the replay holds it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_jobs_stored_events_are_read_to_its_end_and_within_a_bound() {
    let nats = NatsServer::start();
    let client = BusClient::connect(&nats.url(), "sd").await.unwrap();
    let publish = |event: Event| {
        let js = client.jetstream().clone();
        let subject = client.subjects().events(event.job_id());
        async move { js.publish(subject, protocol::encode(&event).into()).await.unwrap().await.unwrap() }
    };
    let (v, at) = (protocol::PROTOCOL_VERSION, protocol::now_millis());
    let heavy = |job_id, step| {
        Event::Progress(protocol::Progress {
            preview_jpeg: Some(vec![7; 700_000]),
            ..protocol::Progress::new(job_id, step, 100, at)
        })
    };
    let ended = Uuid::new_v4();
    publish(Event::Progress(protocol::Progress::new(ended, 1, 2, at))).await;
    publish(Event::Cancelled(protocol::Cancelled { v, job_id: ended, at, at_step: Some(1) })).await;
    for step in 0..10 {
        publish(heavy(ended, step)).await;
    }
    let events = client.stored_events(ended).await.unwrap();
    assert_eq!(events.len(), 2, "read past the job's end");
    assert!(events[1].1.is_terminal());

    let flood = Uuid::new_v4();
    for step in 0..40 {
        publish(heavy(flood, step)).await;
    }
    let events = client.stored_events(flood).await.unwrap();
    let bound = sd_rbee::bus::MAX_STORED_EVENT_BYTES / 700_000 + 1;
    assert!((bound - 1..=bound).contains(&events.len()), "{} events read of 40, bound {bound}", events.len());

    // Tiny events count for what a reader holds of each, not for their few payload bytes.
    let tiny = Uuid::new_v4();
    let (js, subject) = (client.jetstream().clone(), client.subjects().events(tiny));
    let payload = bytes::Bytes::from(protocol::encode(&Event::Progress(protocol::Progress::new(tiny, 1, 2, at))));
    let count = sd_rbee::bus::MAX_STORED_EVENT_BYTES / 256 + 5_000;
    for _ in 0..count / 1000 {
        let mut acks = Vec::with_capacity(1000);
        for _ in 0..1000 {
            acks.push(js.publish(subject.clone(), payload.clone()).await.unwrap());
        }
        futures::future::try_join_all(acks.into_iter().map(std::future::IntoFuture::into_future)).await.unwrap();
    }
    let events = client.stored_events(tiny).await.unwrap();
    assert!(
        events.len() <= sd_rbee::bus::MAX_STORED_EVENT_BYTES / 256,
        "{} tiny events of {count} read, more than a reader may hold",
        events.len()
    );
}

/// An event about another job than the subject it is on is not this job's: the feed, a compat reply and the
/// check of a dequeued job would otherwise end job A with job B's outcome (B's images as A's result).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_about_another_job_is_not_told_as_this_jobs() {
    let nats = NatsServer::start();
    let client = BusClient::connect(&nats.url(), "sd").await.unwrap();
    let (a, b, at) = (Uuid::new_v4(), Uuid::new_v4(), protocol::now_millis());
    let on_a = |event: Event| {
        let js = client.jetstream().clone();
        let subject = client.subjects().events(a);
        async move { js.publish(subject, protocol::encode(&event).into()).await.unwrap().await.unwrap() }
    };
    on_a(Event::Progress(protocol::Progress::new(a, 1, 2, at))).await;
    let v = protocol::PROTOCOL_VERSION;
    on_a(Event::Cancelled(protocol::Cancelled { v, job_id: b, at, at_step: None })).await;

    let stored = client.stored_events(a).await.unwrap();
    assert_eq!(stored.len(), 1, "{stored:?}");
    assert_eq!(stored[0].1.job_id(), a);
    assert_eq!(client.last_event(a).await.unwrap(), None, "B's end is not A's last event");
    assert!(client.has_events(a).await.unwrap());
    let live = client.events_after(a, None).await.unwrap();
    futures::pin_mut!(live);
    use futures::StreamExt;
    assert_eq!(live.next().await.unwrap().unwrap().1.job_id(), a);
    let foreign = live.next().await.unwrap().unwrap_err();
    assert!(format!("{foreign:#}").contains(&format!("job {b}")), "{foreign:#}");
}

/// A record that does not read back (a NaN an older queen wrote as null, or a newer queen's field) is
/// changed only to end its job, made again from the event; an ended one is left as it is.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreadable_record_still_lets_its_job_end() {
    use sd_rbee::api::{JobState, JobStatus};
    use sd_rbee::queen::status::{StatusStore, UnreadableStatus};
    let nats = NatsServer::start();
    let client = BusClient::connect(&nats.url(), "sd").await.unwrap();
    let (js, subjects) = (client.jetstream().clone(), client.subjects().clone());
    let store = StatusStore::open(&js, &subjects.status_bucket(), std::time::Duration::from_secs(3600)).await.unwrap();
    let kv = js.get_key_value(subjects.status_bucket()).await.unwrap();
    let at = protocol::now_millis();
    let unreadable = |id: Uuid, state: &str| {
        let record = serde_json::json!({"job_id": id.to_string(), "state": state, "progress": {"step": "one"}});
        let kv = kv.clone();
        async move { kv.put(id.to_string(), serde_json::to_vec(&record).unwrap().into()).await.unwrap() }
    };
    let apply = |id: Uuid, event: Event| {
        let store = store.clone();
        async move { store.update(id, || JobStatus::unknown(id, at), |s| s.apply(&event)).await }
    };
    let cancelled =
        |id| Event::Cancelled(protocol::Cancelled { v: protocol::PROTOCOL_VERSION, job_id: id, at, at_step: None });

    let running = Uuid::new_v4();
    unreadable(running, "running").await;
    let err = apply(running, Event::Progress(protocol::Progress::new(running, 2, 4, at))).await.unwrap_err();
    assert!(err.is::<UnreadableStatus>(), "a step does not replace it: {err:#}");
    let ended = apply(running, cancelled(running)).await.unwrap().expect("the job's end is written");
    assert_eq!((ended.before, ended.status.state), (Some(JobState::Running), JobState::Cancelled));
    assert_eq!(store.get(running).await.unwrap().unwrap().state, JobState::Cancelled, "and reads back");

    let done = Uuid::new_v4();
    unreadable(done, "completed").await;
    assert!(apply(done, cancelled(done)).await.unwrap().is_none(), "an ended job is left as it is");
    assert!(store.get(done).await.is_err());
}
