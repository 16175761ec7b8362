//! A keyed submission whose publish the bus does not confirm (the jobs stream refuses messages for longer
//! than the queen waits): the key is kept, the queen publishes the job again in the background under its
//! message id, and ends it when the bus takes nothing in time, with a cancel stored first so that a copy
//! arriving later never runs; a queen that stops meanwhile leaves the end to another (the queued check).
//! Likewise a job cancelled while queued whose end the bus did not store before its queen stopped, a job the
//! bus took whose record lost its place, and a key claimed by a submission not recorded (yet, or ever).

use crate::common;

use std::time::{Duration, Instant};

use async_nats::jetstream::{self, stream};
use common::queen::{client, follow, names, start_queen, tiny, wait_for_fleet, wait_state};
use common::servers::{NatsServer, WorkerProcess};
use futures::StreamExt;
use sd_rbee::api::{ApiError, QueenClient};
use sd_rbee::protocol::Subjects;
use uuid::Uuid;

fn api_error(e: anyhow::Error) -> ApiError {
    e.downcast::<ApiError>().expect("an API error")
}

/// The jobs stream, made to refuse every new job (one filler message of a model nobody serves, and a cap
/// of one message that discards new ones); `reopen` takes the cap and the filler away.
struct FullQueue {
    js: jetstream::Context,
    stream: stream::Stream,
    open: stream::Config,
}

impl FullQueue {
    async fn fill(nats: &NatsServer) -> Self {
        let js = jetstream::new(async_nats::connect(nats.url()).await.unwrap());
        let mut stream = js.get_stream(Subjects::new("sd").unwrap().jobs_stream()).await.unwrap();
        js.publish("sd.jobs.nobody", "filler".into()).await.unwrap().await.unwrap();
        let open = stream.info().await.unwrap().config.clone();
        let full = stream::Config { max_messages: 1, discard: stream::DiscardPolicy::New, ..open.clone() };
        js.update_stream(&full).await.unwrap();
        Self { js, stream, open }
    }

    async fn reopen(&mut self) {
        self.js.update_stream(&self.open).await.unwrap();
        self.stream.purge().filter("sd.jobs.nobody").await.unwrap();
    }

    async fn messages(&mut self) -> u64 {
        self.stream.info().await.unwrap().state.messages
    }
}

/// A nats-server, a file store, one worker, and a queen that publishes a job the bus did not confirm again
/// for `window` (the default if `None`); once the worker is up, the jobs stream is made to refuse every new
/// job. (Fields drop in order: the queen before the worker before the server.)
struct Fleet {
    queue: FullQueue,
    c: QueenClient,
    queen: common::queen::QueenProcess,
    _worker: WorkerProcess,
    store_url: String,
    store: tempfile::TempDir,
    nats: NatsServer,
}

async fn full_fleet(worker: &str, window: Option<Duration>) -> Fleet {
    let nats = NatsServer::start();
    let store = tempfile::tempdir().unwrap();
    let store_url = format!("file://{}", store.path().display());
    let _worker = WorkerProcess::start(worker, &nats.url(), &store_url, &[], &[]);
    let queen = start_queen(&nats.url(), &store_url, &[], |c| {
        if let Some(window) = window {
            c.publish_confirm_window = window;
        }
    })
    .await;
    let c = client(&queen);
    wait_for_fleet(&c).await;
    let queue = FullQueue::fill(&nats).await;
    Fleet { queue, c, queen, _worker, store_url, store, nats }
}

/// The id a 503 names ("cannot queue job <id> now: …").
fn named_job(message: &str) -> Uuid {
    let id = message.split("cannot queue job ").nth(1).and_then(|rest| rest.split(' ').next());
    id.and_then(|id| id.parse().ok()).unwrap_or_else(|| panic!("no job id in {message:?}"))
}

/// Waits (up to `patience`) until the job's record is `state`.
async fn wait_long(c: &QueenClient, id: Uuid, state: &str, patience: Duration) -> sd_rbee::api::StatusView {
    let start = Instant::now();
    loop {
        let s = c.status(id).await.unwrap();
        if s.status.state.name() == state {
            return s;
        }
        assert!(start.elapsed() < patience, "job {id} is {:?}, not {state}", s.status.state);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_publish_keeps_its_idempotency_key_and_the_job_is_queued_once() {
    let mut f = full_fleet("w-confirm", None).await;
    let (c, queue) = (&f.c, &mut f.queue);

    let err = api_error(c.submit(&tiny(2, 31), Some("order-7")).await.unwrap_err());
    assert_eq!(err.status, 503, "{}", err.message);
    assert!(err.message.contains("same Idempotency-Key"), "{}", err.message);
    queue.reopen().await;

    let again = c.submit(&tiny(2, 31), Some("order-7")).await.unwrap();
    assert!(!again.created, "the retry answers the job the refused request made");
    assert_eq!(named_job(&err.message), again.job_id, "{}", err.message);
    let events = follow(c, again.job_id).await;
    assert_eq!(names(&events).iter().filter(|n| **n == "started").count(), 1, "{:?}", names(&events));
    assert_eq!(names(&events).last(), Some(&"completed"));
    assert!(wait_state(c, again.job_id, "completed").await.status.stream_seq.is_some(), "its record has its place");
    assert_eq!(c.jobs("").await.unwrap().total, 1, "one job");
    assert_eq!(queue.messages().await, 0, "and no copy of it left in the queue");
}

/// The bus takes nothing within the window: the job ends `failed`, its key still answers it, and a copy of
/// it that reaches the queue afterwards (one the NATS client still held) is cancelled by the worker that
/// takes it, without running.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_the_bus_never_takes_ends_failed_and_a_late_copy_of_it_never_runs() {
    // Longer than the first publish's own 10 s, so the queen's background tries run before it gives up.
    let mut f = full_fleet("w-late", Some(Duration::from_secs(15))).await;
    let (c, queue, nats, store) = (&f.c, &mut f.queue, &f.nats, &f.store);

    let err = api_error(c.submit(&tiny(2, 32), Some("order-8")).await.unwrap_err());
    assert_eq!(err.status, 503, "{}", err.message);
    let id = named_job(&err.message);
    let failed = wait_long(c, id, "failed", Duration::from_secs(30)).await.status;
    let error = failed.error.as_ref().expect("a failed job says why");
    assert!(error.message.contains("did not take the job"), "{error:?}");
    let ended_after = failed.finished_at.unwrap() - failed.created_at;
    assert!(ended_after < 17_500, "ended by its queen at the window's end (15 s), not at the check: {ended_after} ms");
    let again = c.submit(&tiny(2, 32), Some("order-8")).await.unwrap();
    assert_eq!((again.job_id, again.created), (id, false), "the key still answers the job");

    // The late copy: the same job, stored now that the queue takes messages again.
    queue.reopen().await;
    let subjects = Subjects::new("sd").unwrap();
    let mut job = sd_rbee::protocol::JobRequest::try_from(tiny(2, 32)).unwrap();
    job.id = id;
    let bus = sd_rbee::bus::BusClient::from_parts(async_nats::connect(nats.url()).await.unwrap(), subjects.clone());
    bus.submit(&job).await.unwrap();

    let events = queue.js.get_stream(subjects.events_stream()).await.unwrap();
    let follow = jetstream::consumer::pull::OrderedConfig { filter_subject: subjects.events(id), ..Default::default() };
    let mut messages = events.create_consumer(follow).await.unwrap().messages().await.unwrap();
    let mut kinds = Vec::new();
    while kinds.last() != Some(&"cancelled") {
        let message = tokio::time::timeout(Duration::from_secs(30), messages.next()).await;
        let message = message.unwrap_or_else(|_| panic!("the late copy was not settled: {kinds:?}")).unwrap().unwrap();
        let event = sd_rbee::protocol::decode_event(&message.payload).unwrap();
        kinds.push(<&'static str>::from(&event));
    }
    assert_eq!(kinds, ["failed", "cancelled"], "the worker cancels the copy before it starts");
    let deadline = Instant::now() + Duration::from_secs(10);
    while queue.messages().await > 0 {
        assert!(Instant::now() < deadline, "the copy is still queued");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(c.status(id).await.unwrap().status.state.name(), "failed", "the record keeps its first end");
    let results = store.path().join(sd_rbee::protocol::result_prefix(id));
    assert!(!results.exists(), "nothing stored for the copy");
}

/// The queen that was publishing the job stops within the window: whichever queen is up ends the job at its
/// queued check, instead of leaving it `queued` for ever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_left_unqueued_by_a_queen_that_stopped_is_ended_by_another() {
    // Longer than the first publish's own 10 s, so the window is still open when the 503 comes.
    let f = full_fleet("w-check", Some(Duration::from_secs(20))).await;
    let err = api_error(f.c.submit(&tiny(2, 33), Some("order-9")).await.unwrap_err());
    let id = named_job(&err.message);
    drop(f.queen);

    let second = start_queen(&f.nats.url(), &f.store_url, &[], |_| {}).await;
    let c = client(&second);
    assert_eq!(c.status(id).await.unwrap().status.state.name(), "queued", "not ended by the queen that stopped");
    let failed = wait_long(&c, id, "failed", Duration::from_secs(90)).await.status;
    let error = failed.error.as_ref().expect("a failed job says why");
    assert!(error.message.contains("did not take the job"), "{error:?}");
    let ended_after = failed.finished_at.unwrap() - failed.created_at;
    assert!(
        ended_after >= 23_900,
        "ended at its check (a fifth of the window after it), by the queen up: {ended_after} ms"
    );
}

/// A queen process killed while the bus has not confirmed an unkeyed job (nothing of it left to publish
/// again, and no client told of it) left its record `queued` for ever; whichever queen is up ends it at its
/// queued check, which every job has.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unkeyed_job_whose_queen_was_killed_before_the_bus_confirmed_it_is_ended_by_another() {
    let nats = NatsServer::start();
    let store = tempfile::tempdir().unwrap();
    let store_url = format!("file://{}", store.path().display());
    let port = common::servers::free_port();
    let base = format!("http://127.0.0.1:{port}");
    let listen = format!("127.0.0.1:{port}");
    let mut first = std::process::Command::new(env!("CARGO_BIN_EXE_sd-rbee"))
        .args(["queen", "--nats", &nats.url(), "--store", &store_url, "--listen", &listen])
        .args(["--accept-unserved-models", "--publish-confirm-window", "20s"])
        .env("SD_RBEE_API_TOKENS", common::queen::TOKEN)
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    common::queen::wait_ready(&base).await;
    let start = Instant::now();
    let _queue = FullQueue::fill(&nats).await;
    let c = QueenClient::new(&base, Some(common::queen::TOKEN.into())).unwrap();
    let submitting = tokio::spawn({
        let c = c.clone();
        async move { c.submit(&tiny(2, 35), None).await }
    });
    // Its record is written before the publish, which the full queue holds for 10 s.
    let id = loop {
        if let Some(job) = c.jobs("").await.unwrap().jobs.first() {
            break job.job_id;
        }
        assert!(start.elapsed() < Duration::from_secs(30), "no record of the submission");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    first.kill().unwrap();
    first.wait().unwrap();
    assert!(submitting.await.unwrap().is_err(), "its client was never told of the job");

    let serve_any = |q: &mut sd_rbee::queen::QueenConfig| q.api.require_served_model = false;
    let second = start_queen(&nats.url(), &store_url, &[], serve_any).await;
    let c = client(&second);
    let queued = c.status(id).await.unwrap().status;
    assert_eq!((queued.state.name(), queued.stream_seq), ("queued", None), "left as the killed queen wrote it");
    let failed = wait_long(&c, id, "failed", Duration::from_secs(90)).await.status;
    let error = failed.error.as_ref().expect("a failed job says why");
    let ended_after = failed.finished_at.unwrap() - failed.created_at;
    assert!(ended_after >= 23_900, "ended at its check (a fifth of the window after it): {ended_after} ms");
    let waited = format!("did not take the job within {} s of its submission", ended_after / 1000);
    assert!(error.message.contains(&waited), "says how long it waited: {error:?}");
}

/// A job the bus took whose record never got its place in the queue (the status bucket was out while its
/// queen tried to write it): its queued check finds it on its queue and records the place, instead of
/// ending a job that is about to run.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_queued_job_whose_place_was_not_recorded_is_found_on_its_queue_and_runs() {
    let nats = NatsServer::start();
    let store = tempfile::tempdir().unwrap();
    let store_url = format!("file://{}", store.path().display());
    let queen = start_queen(&nats.url(), &store_url, &[], |q| {
        q.api.require_served_model = false;
        q.publish_confirm_window = Duration::from_secs(5);
    })
    .await;
    let c = client(&queen);
    // Jobs ahead of it on the same queue, which the check reads past.
    for seed in 40..42 {
        c.submit(&tiny(2, seed), None).await.unwrap();
    }
    let id = c.submit(&tiny(2, 42), None).await.unwrap().job_id;
    let seq = c.status(id).await.unwrap().status.stream_seq.expect("queued, with its place");
    let js = jetstream::new(async_nats::connect(nats.url()).await.unwrap());
    let kv = js.get_key_value(Subjects::new("sd").unwrap().status_bucket()).await.unwrap();
    let mut record: serde_json::Value =
        serde_json::from_slice(&kv.get(id.to_string()).await.unwrap().unwrap()).unwrap();
    record.as_object_mut().unwrap().remove("stream_seq").expect("the record has its place");
    kv.put(id.to_string(), serde_json::to_vec(&record).unwrap().into()).await.unwrap();
    assert_eq!(c.status(id).await.unwrap().status.stream_seq, None, "its place lost");

    // Its check is due 6 s after the submission.
    let start = Instant::now();
    loop {
        let status = c.status(id).await.unwrap().status;
        assert_eq!(status.state.name(), "queued", "not ended: {:?}", status.error);
        if status.stream_seq.is_some() {
            assert_eq!(status.stream_seq, Some(seq), "its place found again");
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(30), "its place was never found again");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let _worker = WorkerProcess::start("w-placed", &nats.url(), &store_url, &[], &[]);
    assert_eq!(names(&follow(&c, id).await).last(), Some(&"completed"), "and it runs");
}

/// A stream made to refuse every message (a largest message size of one byte) until `reopen`.
struct Refusing {
    js: jetstream::Context,
    open: stream::Config,
}

impl Refusing {
    async fn close(js: &jetstream::Context, name: &str) -> Self {
        let open = js.get_stream(name).await.unwrap().info().await.unwrap().config.clone();
        js.update_stream(&stream::Config { max_message_size: 1, ..open.clone() }).await.unwrap();
        Self { js: js.clone(), open }
    }

    async fn reopen(self) {
        self.js.update_stream(&self.open).await.unwrap();
    }
}

/// A queued job is cancelled while the bus stores neither its end nor its record: its queen deletes it from
/// the queue and answers `cancelled`, then stops before it could store that end. The job, on no queue, would
/// stay `queued` for ever; whichever queen is up ends it at its check, 30 s after the cancel.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_cancelled_while_queued_whose_end_was_not_stored_is_ended_by_another_queen() {
    let nats = NatsServer::start();
    let store = tempfile::tempdir().unwrap();
    let store_url = format!("file://{}", store.path().display());
    let serve_tiny = |c: &mut sd_rbee::queen::QueenConfig| c.api.model_catalogue = vec!["tiny".into()];
    let first = start_queen(&nats.url(), &store_url, &[], serve_tiny).await;
    let c = client(&first);
    let id = c.submit(&tiny(2, 34), None).await.unwrap().job_id;
    assert!(c.status(id).await.unwrap().status.stream_seq.is_some(), "queued, with no worker to take it");

    let js = jetstream::new(async_nats::connect(nats.url()).await.unwrap());
    let subjects = Subjects::new("sd").unwrap();
    let events = Refusing::close(&js, &subjects.events_stream()).await;
    let records = Refusing::close(&js, &format!("KV_{}", subjects.status_bucket())).await;
    let (cancelled_at, cancelled) = (sd_rbee::protocol::now_millis(), Instant::now());
    let answer = c.cancel(id).await.unwrap();
    assert_eq!(answer.state.name(), "cancelled", "off the queue");
    drop(first);
    // Stopped (its NATS connection drained: its own tries at the end are over) before the bus takes it again.
    let stopped = Instant::now();
    while c.status(id).await.is_ok() {
        assert!(stopped.elapsed() < Duration::from_secs(30), "the first queen does not stop");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    events.reopen().await;
    records.reopen().await;

    let second = start_queen(&nats.url(), &store_url, &[], serve_tiny).await;
    let c = client(&second);
    assert_eq!(c.status(id).await.unwrap().status.state.name(), "queued", "no end stored by the queen that stopped");
    let ended = wait_long(&c, id, "cancelled", Duration::from_secs(90)).await.status;
    assert!(cancelled.elapsed() >= Duration::from_millis(29_900), "ended at its check, 30 s after the cancel");
    let finished_at = ended.finished_at.unwrap();
    assert!(
        (cancelled_at..cancelled_at + 5_000).contains(&finished_at),
        "the end says when the job was cancelled ({cancelled_at}), not when it was found: {finished_at}"
    );
    let jobs = js.get_stream(subjects.jobs_stream()).await.unwrap().info().await.unwrap().state.messages;
    assert_eq!(jobs, 0, "and it is on no queue");
}

/// An idempotency key is claimed just before its job's record is written: a retry that finds the claim but
/// no record waits for the record, or for the claim to be released (its submission was refused) and then
/// queues the job itself, instead of answering with a job id that never exists; after a few seconds of
/// neither it answers 503. A claim left without a record for long (its queen stopped) is taken over.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_never_answers_a_job_its_key_names_but_that_was_never_recorded() {
    let nats = NatsServer::start();
    let store = tempfile::tempdir().unwrap();
    let store_url = format!("file://{}", store.path().display());
    let queen = start_queen(&nats.url(), &store_url, &[], |q| q.api.require_served_model = false).await;
    let c = client(&queen);
    let first = c.submit(&tiny(2, 60), Some("order-60")).await.unwrap().job_id;
    let js = jetstream::new(async_nats::connect(nats.url()).await.unwrap());
    let bucket = Subjects::new("sd").unwrap().status_bucket();
    let kv = js.get_key_value(&bucket).await.unwrap();
    let mut keys = kv.keys().await.unwrap();
    let mut entry = None;
    while let Some(key) = keys.next().await {
        let key = key.unwrap();
        // (Not the request fingerprint kept beside it.)
        if key.starts_with("idem-") && !key.ends_with("-body") {
            entry = Some(key);
        }
    }
    let entry = entry.expect("the key's entry");
    // Held by a submission whose record is not written yet.
    let pending = Uuid::new_v4();
    kv.put(&entry, pending.to_string().into()).await.unwrap();
    let asked = Instant::now();
    let err = api_error(c.submit(&tiny(2, 60), Some("order-60")).await.unwrap_err());
    assert_eq!(err.status, 503, "{}", err.message);
    assert!(err.message.contains("still being submitted"), "{}", err.message);
    assert!(asked.elapsed() >= Duration::from_secs(4), "it waited for the record: {:?}", asked.elapsed());

    // That submission is refused meanwhile, and its claim released: the retry queues the job.
    let retry = tokio::spawn({
        let c = c.clone();
        async move { c.submit(&tiny(2, 60), Some("order-60")).await }
    });
    tokio::time::sleep(Duration::from_secs(1)).await;
    kv.delete(&entry).await.unwrap();
    let queued = retry.await.unwrap().unwrap();
    assert!(queued.created && queued.job_id != first && queued.job_id != pending, "{queued:?}");
    assert_eq!(c.status(queued.job_id).await.unwrap().status.state.name(), "queued");
    let again = c.submit(&tiny(2, 60), Some("order-60")).await.unwrap();
    assert_eq!((again.job_id, again.created), (queued.job_id, false), "the key answers that job from now on");

    // A claim without a record is taken over only once it is stale, and only from the job it names.
    use sd_rbee::queen::status::{KeyClaim, StatusStore};
    let status = StatusStore::open(&js, &bucket, Duration::from_secs(3600)).await.unwrap();
    kv.put(&entry, pending.to_string().into()).await.unwrap();
    let taker = KeyClaim::new(Uuid::new_v4(), "f".into());
    assert!(!status.take_over_idempotency(&entry, pending, &taker, Duration::from_secs(3600)).await.unwrap());
    assert!(!status.take_over_idempotency(&entry, first, &taker, Duration::ZERO).await.unwrap(), "not the holder");
    assert!(status.take_over_idempotency(&entry, pending, &taker, Duration::ZERO).await.unwrap());
    assert_eq!(status.idempotency_owner(&entry).await.unwrap(), Some(taker));
}
