//! Signed webhooks through a real queen, nats-server, S3 (moto) and worker, delivered to receivers on
//! loopback (which the queen is told to allow): every requested event arrives exactly once per idempotency
//! key (started, progress, completed, failed, cancelled), signed, across a queen killed mid-job (SIGKILL) and
//! another started, and a receiver that fails its first 3 deliveries; progress is throttled; events not asked
//! for never come. A private or loopback address is refused at submit by a queen
//! that does not allow it; a receiver that keeps failing, hangs, or answers without end ends in dead letters
//! in the job's status, or is taken as delivered after reading only the start of its answer.

use crate::common;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::http::{HeaderMap, StatusCode};
use common::queen::{client, start_queen, tiny, wait_for_fleet, wait_state, TOKEN};
use common::servers::{NatsServer, S3Server, WorkerProcess};
use sd_rbee::api::{ApiError, QueenClient, WebhookBody, WebhookEvent, WebhookSecret, WebhookSpec};
use sd_rbee::queen::webhooks::{AddressPolicy, WebhookConfig};
use sd_rbee::queen::QueenConfig;
use uuid::Uuid;

const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";

/// One request a receiver got, and what it answered.
#[derive(Clone, Debug)]
struct Received {
    id: String,
    timestamp: String,
    signature: String,
    body: String,
    answered: u16,
}

/// How a receiver answers.
#[derive(Clone, Copy)]
enum Behaviour {
    /// 500 to the first N requests, 200 after.
    FailFirst(usize),
    /// 503 to every request.
    AlwaysFail,
    /// Answers after longer than the queen's timeout.
    Hang,
    /// 200 with a body of about 64 MiB.
    Endless,
}

struct Receiver {
    url: String,
    seen: Arc<Mutex<Vec<Received>>>,
}

impl Receiver {
    async fn start(behaviour: Behaviour) -> Self {
        let seen: Arc<Mutex<Vec<Received>>> = Arc::default();
        let count = Arc::new(AtomicUsize::new(0));
        let log = seen.clone();
        let hook = move |headers: HeaderMap, body: String| {
            let (log, count) = (log.clone(), count.clone());
            async move {
                let n = count.fetch_add(1, Ordering::SeqCst);
                let status = match behaviour {
                    Behaviour::FailFirst(k) if n < k => StatusCode::INTERNAL_SERVER_ERROR,
                    Behaviour::AlwaysFail => StatusCode::SERVICE_UNAVAILABLE,
                    _ => StatusCode::OK,
                };
                let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok()).unwrap_or("").to_string();
                log.lock().unwrap().push(Received {
                    id: header("webhook-id"),
                    timestamp: header("webhook-timestamp"),
                    signature: header("webhook-signature"),
                    body,
                    answered: status.as_u16(),
                });
                match behaviour {
                    Behaviour::Hang => tokio::time::sleep(Duration::from_secs(30)).await,
                    Behaviour::Endless => {
                        let chunks =
                            futures::stream::iter((0..1024).map(|_| Ok::<_, std::io::Error>(vec![b'x'; 64 << 10])));
                        return (status, axum::body::Body::from_stream(chunks));
                    }
                    _ => {}
                }
                (status, axum::body::Body::from("not yet"))
            }
        };
        let app = axum::Router::new().route("/hook", axum::routing::post(hook));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/hook", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        Self { url, seen }
    }

    fn seen(&self) -> Vec<Received> {
        self.seen.lock().unwrap().clone()
    }

    /// Waits until `done` holds for what the receiver got.
    async fn wait_for(&self, what: &str, timeout: Duration, done: impl Fn(&[Received]) -> bool) -> Vec<Received> {
        let start = Instant::now();
        loop {
            let seen = self.seen();
            if done(&seen) {
                return seen;
            }
            assert!(start.elapsed() < timeout, "{what}: not within {timeout:?}; got {seen:#?}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

fn body(r: &Received) -> WebhookBody {
    serde_json::from_str(&r.body).unwrap_or_else(|e| panic!("{e}: {}", r.body))
}

fn delivered(seen: &[Received], job: Uuid, event: &str) -> bool {
    seen.iter().any(|r| r.answered == 200 && body(r).job_id == job && body(r).event.name() == event)
}

/// `sd-rbee queen` as a process, set as [`webhooks_on_loopback`] sets an in-process one; SIGKILLed when
/// dropped.
struct QueenChild {
    base: String,
    child: std::process::Child,
}

impl QueenChild {
    async fn start(nats: &str, store: &str, env: &[(String, String)]) -> Self {
        let port = common::servers::free_port();
        let base = format!("http://127.0.0.1:{port}");
        let child = std::process::Command::new(env!("CARGO_BIN_EXE_sd-rbee"))
            .args(["queen", "--nats", nats, "--store", store, "--listen", &format!("127.0.0.1:{port}")])
            .args(["--webhook-timeout", "2s", "--webhook-backoff", "200ms", "--webhook-progress-interval", "600ms"])
            .env("SD_RBEE_API_TOKENS", TOKEN)
            .env("SD_RBEE_WEBHOOK_SECRET", SECRET)
            .env("SD_RBEE_WEBHOOK_ALLOW", "127.0.0.0/8")
            .envs(env.iter().map(|(k, v)| (k, v)))
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        common::queen::wait_ready(&base).await;
        Self { base, child }
    }
}

impl Drop for QueenChild {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Queens that sign with [`SECRET`], allow loopback, and retry quickly.
fn webhooks_on_loopback(c: &mut QueenConfig) {
    c.webhooks = WebhookConfig {
        secrets: vec![SECRET.parse().unwrap()],
        policy: AddressPolicy {
            allow: AddressPolicy::parse_ranges(&["127.0.0.0/8".into()], "--webhook-allow").unwrap(),
            deny: vec![],
        },
        timeout: Duration::from_secs(2),
        retry_for: Duration::from_secs(300),
        backoff: Duration::from_millis(200),
        progress_interval: Duration::from_millis(600),
    };
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_event_arrives_once_signed_across_a_queen_restart_and_failed_deliveries() {
    let nats = NatsServer::start();
    let s3 = S3Server::start();
    let receiver = Receiver::start(Behaviour::FailFirst(3)).await;
    // The first queen is a process, killed with SIGKILL mid-job: whatever it held (deliveries in flight or
    // waiting out a backoff, events pulled and not acknowledged) is the next queen's to finish.
    let first = QueenChild::start(&nats.url(), &s3.store_url(), &s3.env()).await;
    let _worker = WorkerProcess::start("w-hooks", &nats.url(), &s3.store_url(), &s3.env(), &["--step-delay", "150ms"]);
    let c = QueenClient::new(&first.base, Some(TOKEN.into())).unwrap();
    wait_for_fleet(&c).await;

    let steps = 30;
    let mut job = tiny(steps, 1);
    let asked = [WebhookEvent::Started, WebhookEvent::Progress, WebhookEvent::Completed];
    // A receiver's token in the query reaches the receiver, never a reader of the job's status.
    job.webhook = Some(WebhookSpec::new(format!("{}?token=S3CRET", receiver.url), &asked));
    let id = c.submit(&job, None).await.unwrap().job_id;
    let mut other = tiny(120, 2);
    other.webhook = Some(WebhookSpec::new(&receiver.url, &[WebhookEvent::Cancelled]));
    let cancelled = c.submit(&other, None).await.unwrap().job_id;
    // And one that fails: its 40 steps take longer than its timeout.
    let mut late = tiny(40, 3);
    late.timeout_s = Some(1);
    late.webhook = Some(WebhookSpec::new(&receiver.url, &[WebhookEvent::Completed, WebhookEvent::Failed]));
    let failed = c.submit(&late, None).await.unwrap().job_id;
    let view = c.status(id).await.unwrap();
    let origin = receiver.url.trim_end_matches("/hook");
    assert_eq!(view.status.webhook.as_ref().map(|w| w.url.clone()), Some(format!("{origin}/…")));
    let listed = c.jobs("").await.unwrap().jobs;
    assert!(listed.iter().all(|j| !j.webhook.as_ref().unwrap().url.contains("S3CRET")), "{listed:?}");

    receiver.wait_for("3 failed deliveries", Duration::from_secs(30), |s| s.len() >= 3).await;
    drop(first);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let queen = start_queen(&nats.url(), &s3.store_url(), &s3.env(), webhooks_on_loopback).await;
    let c = client(&queen);
    c.cancel(cancelled).await.unwrap();
    // Everything owed arrives: an attempt cut off by the kill comes back after --webhook-timeout + 30 s, an
    // event the killed queen had pulled after 30 s.
    let seen = receiver
        .wait_for("every event delivered", Duration::from_secs(90), |s| {
            delivered(s, id, "completed")
                && delivered(s, cancelled, "cancelled")
                && delivered(s, failed, "failed")
                && s.iter().all(|r| s.iter().any(|o| o.id == r.id && o.answered == 200))
        })
        .await;
    let secret: WebhookSecret = SECRET.parse().unwrap();
    let now = sd_rbee::protocol::now_millis() / 1000;
    let mut by_key: BTreeMap<String, Vec<&Received>> = BTreeMap::new();
    for r in &seen {
        secret
            .verify(&r.id, &r.timestamp, &r.signature, r.body.as_bytes(), now, 300)
            .unwrap_or_else(|e| panic!("delivery {}: {e}", r.id));
        let b = body(r);
        assert_eq!(b.id, r.id, "the body's id is the webhook-id header");
        by_key.entry(r.id.clone()).or_default().push(r);
    }
    assert!(seen[..3].iter().all(|r| r.answered == 500), "the receiver failed its first 3 deliveries");
    for (key, attempts) in &by_key {
        assert!(attempts.iter().all(|r| r.body == attempts[0].body), "{key}: every attempt sends the same body");
        assert!(attempts.iter().any(|r| r.answered == 200), "{key} was never delivered: {attempts:#?}");
    }
    let keys_of = |job: Uuid, event: &str| -> BTreeSet<&String> {
        by_key
            .iter()
            .filter(|(_, a)| body(a[0]).job_id == job && body(a[0]).event.name() == event)
            .map(|(k, _)| k)
            .collect()
    };
    assert_eq!(keys_of(id, "started").len(), 1, "one start: {by_key:#?}");
    assert_eq!(keys_of(id, "completed").len(), 1, "one completion: {by_key:#?}");
    let progress = keys_of(id, "progress");
    assert!(!progress.is_empty(), "progress was asked for");
    assert!(
        progress.len() < steps as usize / 2,
        "progress is throttled: {} deliveries for {steps} steps",
        progress.len()
    );
    let progress_steps: BTreeSet<u64> =
        progress.iter().map(|k| body(by_key[*k][0]).event.data()["step"].as_u64().unwrap()).collect();
    assert_eq!(progress_steps.len(), progress.len(), "each step's progress under one key");
    assert_eq!(keys_of(cancelled, "cancelled").len(), 1);
    eprintln!(
        "{} requests, {} keys ({} progress for {steps} steps), {} answered 500",
        seen.len(),
        by_key.len(),
        progress.len(),
        seen.iter().filter(|r| r.answered == 500).count()
    );
    let events_of_other: BTreeSet<&str> =
        seen.iter().filter(|r| body(r).job_id == cancelled).map(|r| body(r).event.name()).collect();
    assert_eq!(events_of_other, BTreeSet::from(["cancelled"]), "only the events asked for");
    let failure = keys_of(failed, "failed");
    assert_eq!(failure.len(), 1);
    let failure = body(by_key[*failure.iter().next().unwrap()][0]);
    assert_eq!((failure.kind.as_str(), failure.event.data()["code"].as_str()), ("job.failed", Some("TIMEOUT")));
    assert!(keys_of(failed, "completed").is_empty());
    let completed = keys_of(id, "completed").into_iter().next().unwrap().clone();
    assert_eq!(completed, format!("{id}.completed"));
    let done = body(by_key[&completed][0]);
    assert_eq!(done.kind, "job.completed");
    assert_eq!(done.event.data()["images"].as_array().map(Vec::len), Some(1), "{}", by_key[&completed][0].body);

    // The job's status shows no dead letters, and counts what its receiver took (approximately: a count is
    // written after its delivery is acknowledged, which a stopping queen may cut off).
    let start = Instant::now();
    loop {
        let hook = c.status(id).await.unwrap().status.webhook.expect("the job's webhook");
        assert!(hook.dead_letters.is_empty(), "{hook:?}");
        if hook.delivered > 0 {
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(10), "no delivery counted: {hook:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Anyone on the bus can publish events. An ending dated past what RFC 3339 can write (year 9999) is delivered
/// with the last time it can, and the queen goes on following events (formatting it once panicked the
/// aggregator, on every queen, for as long as the event stayed in the stream). A `completed` event that names
/// objects other than the job's own results (someone else's upload) keeps only the job's own, and the API
/// serves nothing else under the job's name.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_far_future_ending_or_a_foreign_object_from_the_bus_is_harmless() {
    use sd_rbee::protocol::{self, Cancelled, Completed, Event, ImageResult, Timings, PROTOCOL_VERSION};
    let nats = NatsServer::start();
    let store = tempfile::tempdir().unwrap();
    let store_url = format!("file://{}", store.path().display());
    let receiver = Receiver::start(Behaviour::FailFirst(0)).await;
    let queen = start_queen(&nats.url(), &store_url, &[], |c| {
        webhooks_on_loopback(c);
        c.api.model_catalogue = vec!["tiny".into()];
    })
    .await;
    let c = client(&queen);
    let bus = sd_rbee::bus::BusClient::connect(&nats.url(), "sd").await.unwrap();
    let publish = |event: Event| {
        let js = bus.jetstream().clone();
        let subject = bus.subjects().events(event.job_id());
        async move { js.publish(subject, protocol::encode(&event).into()).await.unwrap().await.unwrap() }
    };

    let mut far = tiny(2, 1);
    far.webhook = Some(WebhookSpec::new(&receiver.url, &[WebhookEvent::Cancelled]));
    let far = c.submit(&far, None).await.unwrap().job_id;
    publish(Event::Cancelled(Cancelled { v: PROTOCOL_VERSION, job_id: far, at: u64::MAX, at_step: None })).await;

    let mut done = tiny(2, 2);
    done.webhook = Some(WebhookSpec::new(&receiver.url, &[WebhookEvent::Completed]));
    let done = c.submit(&done, None).await.unwrap().job_id;
    let write = |key: &str, bytes: &[u8]| {
        let path = store.path().join(key);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, bytes).unwrap();
    };
    let own = protocol::result_key(done, 0, "png");
    write(&own, b"the job's own image");
    write("uploads/someone-elses.png", b"someone else's upload");
    let image = |index: u32, key: &str| ImageResult {
        index,
        key: key.into(),
        url: None,
        width: 64,
        height: 64,
        seed: 2,
        bytes: 19,
        content_type: "image/png".into(),
    };
    publish(Event::Completed(Completed {
        cached: false,
        v: PROTOCOL_VERSION,
        job_id: done,
        at: protocol::now_millis(),
        images: vec![image(0, &own), image(1, "uploads/someone-elses.png")],
        timings: Timings::default(),
        warnings: vec![],
    }))
    .await;

    let seen = receiver
        .wait_for("both endings delivered", Duration::from_secs(30), |s| {
            delivered(s, far, "cancelled") && delivered(s, done, "completed")
        })
        .await;
    let ending = seen.iter().find(|r| body(r).job_id == far).unwrap();
    assert_eq!(body(ending).timestamp, "9999-12-31T23:59:59.999Z");
    let status = wait_state(&c, done, "completed").await.status;
    assert_eq!(status.images, vec![image(0, &own)], "only the job's own result");
    assert!(status.warnings.iter().any(|w| w.contains("left out")), "{:?}", status.warnings);
    assert_eq!(c.image(done, 0).await.unwrap(), b"the job's own image");
    let err = c.image(done, 1).await.unwrap_err().downcast::<ApiError>().unwrap();
    assert_eq!(err.status, 404, "{err:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn private_addresses_are_refused_and_failing_receivers_end_in_dead_letters() {
    let nats = NatsServer::start();
    let s3 = S3Server::start();
    let receiver = Receiver::start(Behaviour::FailFirst(0)).await;

    // A queen with the default policy refuses loopback, private and link-local addresses, by name or not.
    let strict = start_queen(&nats.url(), &s3.store_url(), &s3.env(), |c| {
        c.webhooks.secrets = vec![SECRET.parse().unwrap()];
        c.api.require_served_model = false;
    })
    .await;
    let c = client(&strict);
    let port = receiver.url.split(':').nth(2).unwrap().split('/').next().unwrap().to_string();
    for (url, why) in [
        (receiver.url.clone(), "loopback"),
        (format!("http://localhost:{port}/hook"), "loopback"),
        ("http://10.1.2.3/hook".to_string(), "private"),
        ("https://192.168.0.10/hook".to_string(), "private"),
        ("http://169.254.169.254/latest/meta-data".to_string(), "link-local"),
        ("http://[::1]:8080/".to_string(), "loopback"),
        ("http://[::ffff:10.0.0.1]/".to_string(), "private"),
        ("ftp://example.com/hook".to_string(), "http or https"),
    ] {
        let mut job = tiny(2, 1);
        job.webhook = Some(WebhookSpec::new(&url, &[WebhookEvent::Completed]));
        let err = c.submit(&job, None).await.unwrap_err().downcast::<ApiError>().unwrap();
        assert_eq!((err.status, err.field.as_deref()), (422, Some("webhook.url")), "{url}: {}", err.message);
        assert!(err.message.contains(why), "{url}: {}", err.message);
    }
    drop(strict);
    let unsigned = start_queen(&nats.url(), &s3.store_url(), &s3.env(), |c| c.api.require_served_model = false).await;
    let mut job = tiny(2, 1);
    job.webhook = Some(WebhookSpec::new("https://hooks.example.com/x", &[WebhookEvent::Completed]));
    let err = client(&unsigned).submit(&job, None).await.unwrap_err().downcast::<ApiError>().unwrap();
    assert_eq!((err.status, err.field.as_deref()), (422, Some("webhook")), "{}", err.message);
    assert!(err.message.contains("--webhook-secret"), "{}", err.message);
    drop(unsigned);

    // Receivers that fail, hang or answer without end, with a queen that gives up after 3 s.
    let queen = start_queen(&nats.url(), &s3.store_url(), &s3.env(), |c| {
        webhooks_on_loopback(c);
        c.webhooks.timeout = Duration::from_secs(1);
        c.webhooks.retry_for = Duration::from_secs(3);
    })
    .await;
    let _worker = WorkerProcess::start("w-dead", &nats.url(), &s3.store_url(), &s3.env(), &[]);
    let c = client(&queen);
    wait_for_fleet(&c).await;
    let failing = Receiver::start(Behaviour::AlwaysFail).await;
    let hanging = Receiver::start(Behaviour::Hang).await;
    let endless = Receiver::start(Behaviour::Endless).await;
    let mut ids = Vec::new();
    for (seed, r) in [(1, &failing), (2, &hanging), (3, &endless)] {
        let mut job = tiny(2, seed);
        job.webhook = Some(WebhookSpec::new(&r.url, &[WebhookEvent::Completed]));
        ids.push(c.submit(&job, None).await.unwrap().job_id);
    }
    for id in &ids {
        wait_state(&c, *id, "completed").await;
    }
    let dead_letter = |id: Uuid| {
        let c = &c;
        async move {
            let start = Instant::now();
            loop {
                let hook = c.status(id).await.unwrap().status.webhook.unwrap();
                if let Some(d) = hook.dead_letters.first() {
                    return d.clone();
                }
                assert!(start.elapsed() < Duration::from_secs(30), "no dead letter for {id}: {hook:?}");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    };
    let d = dead_letter(ids[0]).await;
    assert_eq!((d.event, d.id.clone()), (WebhookEvent::Completed, format!("{}.completed", ids[0])));
    assert!(d.attempts >= 3 && d.last_error.contains("503"), "{d:?}");
    assert_eq!(failing.seen().len() as u32, d.attempts, "every attempt reached the receiver");
    let d = dead_letter(ids[1]).await;
    assert!(d.last_error.contains("timed out") || d.last_error.contains("timeout"), "{d:?}");
    // A 64 MiB answer: read only up to the cap, and taken as delivered at once.
    let start = Instant::now();
    loop {
        let hook = c.status(ids[2]).await.unwrap().status.webhook.unwrap();
        assert!(hook.dead_letters.is_empty(), "{hook:?}");
        if hook.delivered == 1 {
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(10), "{hook:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(endless.seen().len(), 1);
    assert!(receiver.seen().is_empty(), "the refused jobs were never queued");
}

/// A receiver that never answers holds no more than its share of a queen's attempts (a few, from the first
/// ones: it has not answered yet): two of them together leave slots for another receiver, whose delivery
/// goes out at once, not after the hanging ones' timeouts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn receivers_that_never_answer_do_not_hold_up_another() {
    let nats = NatsServer::start();
    let s3 = S3Server::start();
    let queen = start_queen(&nats.url(), &s3.store_url(), &s3.env(), |c| {
        webhooks_on_loopback(c);
        c.webhooks.timeout = Duration::from_secs(10);
        c.api.require_served_model = false;
    })
    .await;
    let c = client(&queen);
    let hanging = [Receiver::start(Behaviour::Hang).await, Receiver::start(Behaviour::Hang).await];
    let healthy = Receiver::start(Behaviour::FailFirst(0)).await;
    let cancelled_job = |url: &str, seed| {
        let mut job = tiny(2, seed);
        job.webhook = Some(WebhookSpec::new(url, &[WebhookEvent::Cancelled]));
        job
    };
    // Between them, more deliveries to the hanging receivers than the queen has attempts in flight.
    for seed in 0..40 {
        let id = c.submit(&cancelled_job(&hanging[seed as usize % 2].url, seed), None).await.unwrap().job_id;
        c.cancel(id).await.unwrap();
    }
    for receiver in &hanging {
        receiver.wait_for("the first attempts", Duration::from_secs(20), |seen| !seen.is_empty()).await;
    }
    let id = c.submit(&cancelled_job(&healthy.url, 99), None).await.unwrap().job_id;
    c.cancel(id).await.unwrap();
    healthy
        .wait_for("the other receiver's delivery", Duration::from_secs(5), |seen| delivered(seen, id, "cancelled"))
        .await;
    use sd_rbee::queen::webhooks::sender::PER_SLOW_RECEIVER;
    for receiver in &hanging {
        let held = receiver.seen().len();
        assert!(held <= PER_SLOW_RECEIVER, "{held} attempts to a hanging receiver at once");
    }
}
