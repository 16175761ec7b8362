//! The worker against real servers: a nats-server with JetStream and an S3-compatible server (moto), both
//! started by the tests on free loopback ports, and `sd-rbee worker` child processes on the tiny SD 1.5
//! fixture. Covers the happy path (events in order, the stored PNG equal to `sd-rbee generate`), invalid
//! jobs (failed + dead letter), cancel, a worker killed mid-job, SIGTERM, a NATS restart and an S3 outage.

use crate::common;

use std::collections::HashSet;
use std::time::Duration;

use async_nats::jetstream;
use common::servers::{NatsServer, S3Server, WorkerProcess};
use futures::StreamExt;
use sd_rbee::bus::BusClient;
use sd_rbee::protocol::{self, ErrorCode, Event, JobKind, JobRequest};
use uuid::Uuid;

fn tiny_job(steps: u32, seed: u64) -> JobRequest {
    let mut job = JobRequest::new(JobKind::Txt2Img, "tiny", "a watercolor fox in the snow");
    job.width = Some(64);
    job.height = Some(64);
    job.steps = Some(steps);
    job.seed = Some(seed);
    job
}

async fn events_of(client: &BusClient, job_id: Uuid, timeout: Duration) -> Vec<Event> {
    let mut seen = Vec::new();
    client.wait(job_id, timeout, |e| seen.push(e.clone())).await.unwrap_or_else(|e| panic!("{e:#}: {seen:?}"));
    seen
}

/// Every event of a job stored so far (does not wait for more).
async fn stored_events(client: &BusClient, job_id: Uuid) -> Vec<Event> {
    client.stored_events(job_id).await.unwrap().into_iter().map(|(_, e)| e).collect()
}

/// The dead-letter stream's messages: (reason header, payload).
async fn dead_letters(client: &BusClient) -> Vec<(String, Vec<u8>)> {
    let stream = client.jetstream().get_stream(client.subjects().dlq_stream()).await.unwrap();
    let all = client.subjects().dead_letter_wildcard();
    let messages = sd_rbee::bus::stored_messages(&stream, all, jetstream::consumer::DeliverPolicy::All).await.unwrap();
    let mut out = Vec::new();
    for m in messages {
        let reason = m
            .headers
            .as_ref()
            .and_then(|h| h.get(protocol::DLQ_REASON_HEADER))
            .map(|v| v.to_string())
            .unwrap_or_default();
        out.push((reason, m.payload.to_vec()));
    }
    out
}

/// Waits (briefly) until the work queue holds no job: every job was settled.
async fn wait_for_empty_queue(client: &BusClient) {
    let mut jobs = client.jetstream().get_stream(client.subjects().jobs_stream()).await.unwrap();
    let start = std::time::Instant::now();
    loop {
        let left = jobs.info().await.unwrap().state.messages;
        if left == 0 {
            return;
        }
        assert!(start.elapsed() < Duration::from_secs(10), "{left} jobs are still in the work queue");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn completed(events: &[Event]) -> Vec<&protocol::Completed> {
    events.iter().filter_map(|e| if let Event::Completed(c) = e { Some(c) } else { None }).collect()
}

fn accepted_by(events: &[Event]) -> Vec<String> {
    events.iter().filter_map(|e| if let Event::Accepted(a) = e { Some(a.worker_id.clone()) } else { None }).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn end_to_end_job_events_and_stored_png_match_generate() {
    let nats = NatsServer::start();
    let s3 = S3Server::start();
    let _worker = WorkerProcess::start("w-e2e", &nats.url(), &s3.store_url(), &s3.env(), &[]);
    let client = BusClient::connect(&nats.url(), "sd").await.unwrap();

    let job = tiny_job(4, 7);
    client.submit(&job).await.unwrap();
    let events = events_of(&client, job.id, Duration::from_secs(60)).await;

    // accepted → progress 1..=4 → completed, nothing else.
    let kinds: Vec<&str> = events.iter().map(|e| e.type_name()).collect();
    assert_eq!(kinds, ["accepted", "progress", "progress", "progress", "progress", "completed"], "{events:?}");
    let steps: Vec<(u32, u32)> =
        events.iter().filter_map(|e| if let Event::Progress(p) = e { Some((p.step, p.total)) } else { None }).collect();
    assert_eq!(steps, [(1, 4), (2, 4), (3, 4), (4, 4)]);
    assert!(events.iter().all(|e| e.job_id() == job.id));
    assert_eq!(accepted_by(&events), ["w-e2e"]);
    let has_preview = events.iter().any(|e| matches!(e, Event::Progress(p) if p.preview_jpeg.is_some()));
    assert!(has_preview, "previews every 2 steps were asked for");

    let done = completed(&events)[0];
    assert_eq!(done.images.len(), 1);
    let image = &done.images[0];
    assert_eq!(image.key, format!("jobs/{}/0.png", job.id));
    assert_eq!((image.width, image.height, image.seed), (64, 64, 7));
    let url = image.url.as_deref().expect("S3 results have presigned URLs");
    assert!(url.contains(&image.key) && url.contains("X-Amz-Signature="), "{url}");

    let stored = s3.get(&image.key).expect("the PNG is in the bucket");
    assert_eq!(s3.get_url(url), (200, stored.clone()), "the presigned URL serves the image");
    assert_eq!(stored.len() as u64, image.bytes);
    let decoded = image::load_from_memory(&stored).unwrap();
    assert_eq!((decoded.width(), decoded.height()), (64, 64));

    // The same request through `sd-rbee generate` gives the same bytes.
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("direct.png");
    let status = std::process::Command::new(env!("CARGO_BIN_EXE_sd-rbee"))
        .args(["generate", "--model"])
        .arg(common::fixture("tiny-sd15"))
        .args(["--prompt", &job.prompt, "--width", "64", "--height", "64", "--steps", "4", "--seed", "7", "--out"])
        .arg(&out)
        .status()
        .unwrap();
    assert!(status.success());
    assert!(std::fs::read(&out).unwrap() == stored, "the worker's PNG differs from sd-rbee generate's");

    // Publishing the same job again inside the duplicate window is not a second job.
    client.submit(&job).await.unwrap();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let again = stored_events(&client, job.id).await;
    assert_eq!(completed(&again).len(), 1, "{again:?}");
}

/// Runs `sd-rbee worker` that is expected to refuse to start: (exit status, stderr).
fn worker_refusing_to_start(nats: &str, store: &str, env: &[(String, String)]) -> (std::process::ExitStatus, String) {
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_sd-rbee"))
        .args(["worker", "--nats", nats, "--store", store, "--model"])
        .arg(format!("tiny={}", common::fixture("tiny-sd15").display()))
        .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .env("RUST_LOG", "error")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let start = std::time::Instant::now();
    while child.try_wait().unwrap().is_none() {
        if start.elapsed() > Duration::from_secs(60) {
            child.kill().unwrap();
            panic!("the worker started although it should not have");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let output = child.wait_with_output().unwrap();
    (output.status, String::from_utf8_lossy(&output.stderr).to_string())
}

/// Against s3s-fs, which checks the SigV4 signature of every request: the worker's signed uploads are
/// accepted, the completed event's presigned URL serves the PNG, and the same URL with its signature changed,
/// its expiry stretched or pointed at another key is refused, as is an unsigned GET. A worker with a wrong
/// secret, or a bucket that does not exist, refuses to start and says why.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn signed_s3_checks_uploads_and_presigned_urls_and_a_wrong_key_stops_the_worker_at_start() {
    let nats = NatsServer::start();
    let s3 = S3Server::start_signed();

    let mut wrong_secret = s3.env();
    wrong_secret.retain(|(k, _)| k != "AWS_SECRET_ACCESS_KEY");
    wrong_secret.push(("AWS_SECRET_ACCESS_KEY".into(), "not-the-secret".into()));
    let (status, stderr) = worker_refusing_to_start(&nats.url(), &s3.store_url(), &wrong_secret);
    assert!(!status.success());
    assert!(stderr.contains("--store") && stderr.contains("access denied"), "{stderr}");
    let (status, stderr) = worker_refusing_to_start(&nats.url(), "s3://no-such-bucket", &s3.env());
    assert!(!status.success());
    assert!(stderr.contains("s3://no-such-bucket") && stderr.contains("does not exist"), "{stderr}");

    let _worker = WorkerProcess::start("w-signed", &nats.url(), &s3.store_url(), &s3.env(), &[]);
    let client = BusClient::connect(&nats.url(), "sd").await.unwrap();
    let job = tiny_job(2, 11);
    client.submit(&job).await.unwrap();
    let events = events_of(&client, job.id, Duration::from_secs(60)).await;
    let done = completed(&events);
    assert_eq!(done.len(), 1, "{events:?}");
    let image = &done[0].images[0];
    let stored = s3.get(&image.key).expect("the PNG is in the bucket");
    assert_eq!(stored.len() as u64, image.bytes);
    assert!(s3.get(&format!("jobs/{}/completed.msgpack", job.id)).is_some(), "the manifest is stored too");

    let url = image.url.as_deref().expect("S3 results have presigned URLs");
    assert_eq!(s3.get_url(url), (200, stored), "the presigned URL serves the image");
    let signature = url.split("X-Amz-Signature=").nth(1).unwrap().split('&').next().unwrap();
    let flipped = format!("{}{}", if signature.starts_with('0') { "1" } else { "0" }, &signature[1..]);
    let forged = [
        url.replace(signature, &flipped),
        url.replace("X-Amz-Expires=", "X-Amz-Expires=9"),
        url.replace(&image.key, &format!("jobs/{}/completed.msgpack", job.id)),
        url.split('?').next().unwrap().to_string(),
    ];
    for forged in forged {
        let (status, _) = s3.get_url(&forged);
        assert!(status == 403 || status == 400, "{forged} was answered {status}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_jobs_are_failed_and_dead_lettered_and_the_worker_keeps_serving() {
    let nats = NatsServer::start();
    let store = tempfile::tempdir().unwrap();
    let store_url = format!("file://{}", store.path().display());
    let _worker = WorkerProcess::start("w-invalid", &nats.url(), &store_url, &[], &[]);
    let client = BusClient::connect(&nats.url(), "sd").await.unwrap();
    let js = client.jetstream();
    let subject = client.subjects().jobs("tiny").unwrap();
    let publish_raw = |id: Uuid, payload: Vec<u8>| {
        let subject = subject.clone();
        async move {
            js.publish_with_headers(subject, sd_rbee::bus::msg_id_headers(&id.to_string()), payload.into())
                .await
                .unwrap()
                .await
                .unwrap();
        }
    };

    // 1. Garbage bytes: the id comes from the Nats-Msg-Id header.
    let garbage_id = Uuid::new_v4();
    publish_raw(garbage_id, b"\x00\x01 definitely not msgpack".to_vec()).await;
    // 2. A well-formed job with a width the protocol rejects (bypassing the client's validation).
    let mut bad_width = tiny_job(2, 1);
    bad_width.width = Some(100);
    publish_raw(bad_width.id, protocol::encode(&bad_width)).await;
    // 3. A job only the model can reject: img2img whose strength leaves no step to run.
    let mut no_steps = tiny_job(2, 1);
    no_steps.kind = JobKind::Img2Img;
    let mut png = Vec::new();
    image::RgbImage::from_pixel(64, 64, image::Rgb([200, 30, 30]))
        .write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png)
        .unwrap();
    no_steps.init_image = Some(protocol::ImageSource::Inline(png));
    no_steps.strength = Some(0.1);
    publish_raw(no_steps.id, protocol::encode(&no_steps)).await;
    // 4. A job of a newer protocol version.
    let mut future = tiny_job(2, 1);
    future.v = 99;
    publish_raw(future.id, protocol::encode(&future)).await;

    let cases =
        [(garbage_id, None), (bad_width.id, Some("width")), (no_steps.id, Some("strength")), (future.id, Some("v"))];
    for (id, field) in cases {
        let events = events_of(&client, id, Duration::from_secs(30)).await;
        match events.last() {
            Some(Event::Failed(f)) => {
                assert_eq!(f.code, ErrorCode::InvalidRequest, "{f:?}");
                assert_eq!(f.field.as_deref(), field, "{f:?}");
            }
            other => panic!("job {id}: expected failed, got {other:?}"),
        }
    }

    // Each was copied, bytes unchanged, to the dead-letter stream with its reason.
    let letters = dead_letters(&client).await;
    assert_eq!(letters.len(), 4, "{:?}", letters.iter().map(|l| &l.0).collect::<Vec<_>>());
    assert_eq!(letters[0].1, b"\x00\x01 definitely not msgpack");
    assert!(letters[1].0.contains("width"), "{}", letters[1].0);
    assert_eq!(letters[1].1, protocol::encode(&bad_width));
    assert!(letters[2].0.contains("strength"), "{}", letters[2].0);
    assert!(letters[3].0.contains("version 99"), "{}", letters[3].0);

    // None of it is left in the work queue, and the worker still serves.
    let good = tiny_job(2, 3);
    client.submit(&good).await.unwrap();
    let events = events_of(&client, good.id, Duration::from_secs(60)).await;
    assert!(matches!(events.last(), Some(Event::Completed(_))), "{events:?}");
    wait_for_empty_queue(&client).await;
}

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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_worker_hands_its_job_to_another() {
    let nats = NatsServer::start();
    let s3 = S3Server::start();
    let flags = ["--ack-wait", "2s", "--step-delay", "150ms"];
    let mut workers = [
        WorkerProcess::start("w-a", &nats.url(), &s3.store_url(), &s3.env(), &flags),
        WorkerProcess::start("w-b", &nats.url(), &s3.store_url(), &s3.env(), &flags),
    ];
    let client = BusClient::connect(&nats.url(), "sd").await.unwrap();
    let job = tiny_job(20, 11);
    client.submit(&job).await.unwrap();

    // Wait until some worker is a few steps in, then SIGKILL it.
    let events = client.events(job.id).await.unwrap();
    tokio::pin!(events);
    let mut first = None;
    while let Some(e) = tokio::time::timeout(Duration::from_secs(30), events.next()).await.unwrap() {
        match e.unwrap() {
            Event::Accepted(a) => first = Some(a.worker_id),
            Event::Progress(p) if p.step >= 3 => break,
            _ => {}
        }
    }
    let first = first.expect("a worker accepted the job");
    let victim = workers.iter().position(|w| w.id == first).unwrap();
    workers[victim].kill();

    let events = events_of(&client, job.id, Duration::from_secs(60)).await;
    let takers = accepted_by(&events);
    assert_eq!(takers.len(), 2, "{events:?}");
    assert_eq!(takers[0], first);
    assert_ne!(takers[1], first, "the other worker took the job over");
    assert_eq!(completed(&events).len(), 1, "completed once: only the second delivery finished");
    assert_eq!(
        s3.list(&format!("jobs/{}/", job.id)),
        [format!("jobs/{}/0.png", job.id), format!("jobs/{}/completed.msgpack", job.id)],
        "exactly one set of outputs"
    );
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

/// The job consumer is the fleet's: a worker started later with a shorter `--ack-wait` gives it its own, and
/// a worker already running a job with a long one still keeps its job (in-progress acks at least every 5 s),
/// and says in its log that the settings differ.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_with_a_shorter_ack_wait_does_not_take_over_a_running_job() {
    let nats = NatsServer::start();
    let store = tempfile::tempdir().unwrap();
    let store_url = format!("file://{}", store.path().display());
    let long = ["--ack-wait", "60s", "--step-delay", "400ms"];
    let first = WorkerProcess::start("w-long", &nats.url(), &store_url, &[], &long);
    let client = BusClient::connect(&nats.url(), "sd").await.unwrap();
    let job = tiny_job(40, 12);
    client.submit(&job).await.unwrap();
    wait_for_step(&client, job.id, 1).await;
    let second = WorkerProcess::start("w-short", &nats.url(), &store_url, &[], &["--ack-wait", "10s"]);
    let events = events_of(&client, job.id, Duration::from_secs(60)).await;
    assert_eq!(accepted_by(&events), ["w-long"], "{events:?}");
    assert_eq!(completed(&events).len(), 1);
    let warned = second.log_text();
    assert!(warned.contains("the job consumer had other settings") && warned.contains("60s"), "{warned}");
    drop(first);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_finishes_the_running_job_or_hands_it_over() {
    let nats = NatsServer::start();
    let store = tempfile::tempdir().unwrap();
    let store_url = format!("file://{}", store.path().display());
    let client = BusClient::connect(&nats.url(), "sd").await.unwrap();

    // A grace period long enough: the job finishes on the worker that got SIGTERM, which then exits 0.
    let mut patient = WorkerProcess::start("w-patient", &nats.url(), &store_url, &[], &["--step-delay", "100ms"]);
    let job = tiny_job(10, 21);
    client.submit(&job).await.unwrap();
    wait_for_step(&client, job.id, 2).await;
    patient.terminate();
    let events = events_of(&client, job.id, Duration::from_secs(60)).await;
    assert_eq!(accepted_by(&events), ["w-patient"]);
    assert_eq!(completed(&events).len(), 1);
    assert!(patient.wait(Duration::from_secs(30)).success(), "{}", patient.log_text());

    // A short grace period: the job is handed to another worker.
    let flags = ["--step-delay", "150ms", "--grace", "500ms"];
    let mut leaving = WorkerProcess::start("w-leaving", &nats.url(), &store_url, &[], &flags);
    let job = tiny_job(30, 22);
    client.submit(&job).await.unwrap();
    wait_for_step(&client, job.id, 2).await;
    let _stays = WorkerProcess::start("w-stays", &nats.url(), &store_url, &[], &[]);
    leaving.terminate();
    assert!(leaving.wait(Duration::from_secs(30)).success(), "{}", leaving.log_text());
    let events = events_of(&client, job.id, Duration::from_secs(60)).await;
    assert_eq!(accepted_by(&events), ["w-leaving", "w-stays"], "{events:?}");
    assert_eq!(completed(&events).len(), 1);
    assert!(store.path().join(format!("jobs/{}/0.png", job.id)).is_file());
}

/// With `--max-deliver 1` every delivery is the last: a worker that stops mid-job cannot hand the job back
/// with a nak (JetStream would give it up), so it queues the job again; another worker completes it, and
/// nothing is failed or dead-lettered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_on_the_last_delivery_queues_the_job_again() {
    let nats = NatsServer::start();
    let store = tempfile::tempdir().unwrap();
    let store_url = format!("file://{}", store.path().display());
    let client = BusClient::connect(&nats.url(), "sd").await.unwrap();
    let flags = ["--step-delay", "150ms", "--grace", "300ms", "--max-deliver", "1"];
    let mut leaving = WorkerProcess::start("w-last-leaving", &nats.url(), &store_url, &[], &flags);
    let job = tiny_job(30, 23);
    client.submit(&job).await.unwrap();
    wait_for_step(&client, job.id, 2).await;
    leaving.terminate();
    assert!(leaving.wait(Duration::from_secs(30)).success(), "{}", leaving.log_text());
    assert!(leaving.log_text().contains("queued again"), "{}", leaving.log_text());

    let _stays = WorkerProcess::start("w-last-stays", &nats.url(), &store_url, &[], &["--max-deliver", "1"]);
    let events = events_of(&client, job.id, Duration::from_secs(60)).await;
    assert_eq!(accepted_by(&events), ["w-last-leaving", "w-last-stays"], "{events:?}");
    assert_eq!(completed(&events).len(), 1);
    assert!(!events.iter().any(|e| matches!(e, Event::Failed(_))), "{events:?}");
    // The second delivery's progress events were all stored: none taken for a duplicate of the first's.
    let second_run: Vec<u32> = events
        .iter()
        .skip_while(|e| !matches!(e, Event::Accepted(a) if a.worker_id == "w-last-stays"))
        .filter_map(|e| if let Event::Progress(p) = e { Some(p.step) } else { None })
        .collect();
    assert_eq!(second_run, (1..=30).collect::<Vec<u32>>());
    assert!(dead_letters(&client).await.is_empty());
    wait_for_empty_queue(&client).await;
}

async fn wait_for_step(client: &BusClient, job_id: Uuid, step: u32) {
    let events = client.events(job_id).await.unwrap();
    tokio::pin!(events);
    while let Some(e) = tokio::time::timeout(Duration::from_secs(30), events.next()).await.unwrap() {
        if matches!(e.unwrap(), Event::Progress(p) if p.step >= step) {
            return;
        }
    }
    panic!("job {job_id} ended before step {step}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_restart_mid_run_loses_no_job() {
    let mut nats = NatsServer::start();
    let store = tempfile::tempdir().unwrap();
    let store_url = format!("file://{}", store.path().display());
    let _worker = WorkerProcess::start("w-restart", &nats.url(), &store_url, &[], &["--step-delay", "50ms"]);
    let jobs: Vec<JobRequest> = (0..5).map(|i| tiny_job(6, 100 + i)).collect();
    {
        let client = BusClient::connect(&nats.url(), "sd").await.unwrap();
        for job in &jobs {
            client.submit(job).await.unwrap();
        }
        wait_for_step(&client, jobs[0].id, 3).await;
    }
    nats.restart();

    let client = BusClient::connect(&nats.url(), "sd").await.unwrap();
    let mut ok = HashSet::new();
    for job in &jobs {
        let events = events_of(&client, job.id, Duration::from_secs(90)).await;
        assert!(matches!(events.last(), Some(Event::Completed(_))), "job {}: {events:?}", job.id);
        assert!(store.path().join(format!("jobs/{}/0.png", job.id)).is_file());
        ok.insert(job.id);
    }
    assert_eq!(ok.len(), jobs.len());
}

/// An operator deletes the job consumer, then the server comes back with an empty store (its volume lost):
/// each time the worker binds or creates what it needs again and goes on serving, with no restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deleted_consumer_or_a_lost_server_store_is_recreated() {
    let mut nats = NatsServer::start();
    let store = tempfile::tempdir().unwrap();
    let store_url = format!("file://{}", store.path().display());
    let _worker = WorkerProcess::start("w-rebind", &nats.url(), &store_url, &[], &[]);
    async fn run(client: &BusClient, job: JobRequest, store: &std::path::Path) {
        client.submit(&job).await.unwrap();
        let events = events_of(client, job.id, Duration::from_secs(60)).await;
        assert!(matches!(events.last(), Some(Event::Completed(_))), "job {}: {events:?}", job.id);
        assert!(store.join(format!("jobs/{}/0.png", job.id)).is_file());
    }

    let client = BusClient::connect(&nats.url(), "sd").await.unwrap();
    run(&client, tiny_job(2, 1), store.path()).await;
    let jobs = client.jetstream().get_stream(client.subjects().jobs_stream()).await.unwrap();
    jobs.delete_consumer(&sd_rbee::bus::consumer_name("tiny")).await.unwrap();
    run(&client, tiny_job(2, 2), store.path()).await;

    nats.restart_empty();
    let client = BusClient::connect(&nats.url(), "sd").await.unwrap();
    run(&client, tiny_job(2, 3), store.path()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_outage_during_upload_completes_once_s3_is_back() {
    let nats = NatsServer::start();
    let mut s3 = S3Server::start();
    let _worker = WorkerProcess::start("w-s3", &nats.url(), &s3.store_url(), &s3.env(), &["--store-retry", "60s"]);
    let client = BusClient::connect(&nats.url(), "sd").await.unwrap();

    s3.kill();
    let job = tiny_job(3, 31);
    client.submit(&job).await.unwrap();
    // Generation finishes; the upload cannot.
    wait_for_step(&client, job.id, 3).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(completed(&stored_events(&client, job.id).await).is_empty());
    s3.restart();

    let events = events_of(&client, job.id, Duration::from_secs(90)).await;
    let done = completed(&events);
    assert_eq!(done.len(), 1, "{events:?}");
    let stored = s3.get(&done[0].images[0].key).expect("stored once S3 was back");
    assert_eq!(stored.len() as u64, done[0].images[0].bytes);
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

fn failure(events: &[Event]) -> &protocol::Failed {
    match events.last() {
        Some(Event::Failed(f)) => f,
        other => panic!("expected failed, got {other:?} in {events:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transient_failures_retry_then_dead_letter_after_max_deliver() {
    let nats = NatsServer::start();
    let mut s3 = S3Server::start();
    let flags = ["--store-retry", "300ms", "--max-deliver", "2", "--retry-backoff", "200ms"];
    let _worker = WorkerProcess::start("w-flaky", &nats.url(), &s3.store_url(), &s3.env(), &flags);
    let client = BusClient::connect(&nats.url(), "sd").await.unwrap();
    s3.kill();
    let job = tiny_job(2, 41);
    client.submit(&job).await.unwrap();
    let events = events_of(&client, job.id, Duration::from_secs(60)).await;
    let failed = failure(&events);
    assert_eq!(failed.code, ErrorCode::Storage, "{failed:?}");
    assert!(failed.message.contains("after 2 deliveries"), "{}", failed.message);
    assert_eq!(accepted_by(&events), ["w-flaky", "w-flaky"], "retried once, then given up");
    let letters = dead_letters(&client).await;
    assert_eq!(letters.len(), 1);
    assert_eq!(letters[0].1, protocol::encode(&job));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_whose_workers_all_crashed_is_failed_not_lost() {
    let nats = NatsServer::start();
    let store = tempfile::tempdir().unwrap();
    let store_url = format!("file://{}", store.path().display());
    // One delivery only: when its worker dies, JetStream gives up on the job and says so in an advisory.
    let flags = ["--max-deliver", "1", "--ack-wait", "1s", "--step-delay", "200ms"];
    let mut workers = [
        WorkerProcess::start("w-x", &nats.url(), &store_url, &[], &flags),
        WorkerProcess::start("w-y", &nats.url(), &store_url, &[], &flags),
    ];
    let client = BusClient::connect(&nats.url(), "sd").await.unwrap();
    let job = tiny_job(30, 51);
    client.submit(&job).await.unwrap();
    wait_for_step(&client, job.id, 1).await;
    let taker = accepted_by(&stored_events(&client, job.id).await)[0].clone();
    workers.iter_mut().find(|w| w.id == taker).unwrap().kill();

    let events = events_of(&client, job.id, Duration::from_secs(30)).await;
    let failed = failure(&events);
    assert_eq!(failed.code, ErrorCode::Internal);
    assert!(failed.message.contains("delivered 1 times"), "{}", failed.message);
    assert_eq!(dead_letters(&client).await.len(), 1);
    wait_for_empty_queue(&client).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deadlines_and_the_worker_time_limit_fail_jobs_with_timeout() {
    let nats = NatsServer::start();
    let store = tempfile::tempdir().unwrap();
    let store_url = format!("file://{}", store.path().display());
    let flags = ["--step-delay", "200ms", "--job-timeout", "2s"];
    let _worker = WorkerProcess::start("w-slow", &nats.url(), &store_url, &[], &flags);
    let client = BusClient::connect(&nats.url(), "sd").await.unwrap();

    // The job's own deadline, mid-run.
    let mut job = tiny_job(30, 61);
    job.deadline = Some(job.created_at + 1000);
    client.submit(&job).await.unwrap();
    let events = events_of(&client, job.id, Duration::from_secs(30)).await;
    let failed = failure(&events);
    assert_eq!(failed.code, ErrorCode::Timeout);
    assert!(failed.message.contains("deadline"), "{}", failed.message);
    let ran = events.iter().filter(|e| matches!(e, Event::Progress(_))).count();
    assert!((1..15).contains(&ran), "{ran} steps ran before the 1 s deadline");

    // The worker's own limit.
    let job = tiny_job(30, 62);
    client.submit(&job).await.unwrap();
    let failed = failure(&events_of(&client, job.id, Duration::from_secs(30)).await).clone();
    assert_eq!(failed.code, ErrorCode::Timeout);
    assert!(failed.message.contains("time limit"), "{}", failed.message);

    // A job whose deadline passed while it waited in the queue never starts.
    let mut stale = tiny_job(2, 63);
    stale.created_at -= 60_000;
    stale.deadline = Some(stale.created_at + 1000);
    client.submit(&stale).await.unwrap();
    let events = events_of(&client, stale.id, Duration::from_secs(30)).await;
    assert_eq!(failure(&events).code, ErrorCode::Timeout);
    assert!(accepted_by(&events).is_empty());
}

/// A step that never returns (a hung device; here a 600 s pause inside the first step, which no cancel flag
/// interrupts): once the job's time limit stops it and its batch has been silent for `--stall-timeout`, the
/// job is failed `TIMEOUT` (not left running for ever), and the worker drains and exits with an error so that
/// its supervisor restarts it, without waiting for the hung thread.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_step_fails_its_job_and_stops_the_worker() {
    let nats = NatsServer::start();
    let store = tempfile::tempdir().unwrap();
    let store_url = format!("file://{}", store.path().display());
    let flags = ["--step-delay", "600s", "--job-timeout", "2s", "--stall-timeout", "3s"];
    let mut worker = WorkerProcess::start("w-hung", &nats.url(), &store_url, &[], &flags);
    let client = BusClient::connect(&nats.url(), "sd").await.unwrap();
    let job = tiny_job(4, 90);
    client.submit(&job).await.unwrap();
    let started = std::time::Instant::now();
    let events = events_of(&client, job.id, Duration::from_secs(40)).await;
    let failed = failure(&events);
    assert_eq!(failed.code, ErrorCode::Timeout, "{}", failed.message);
    assert!(started.elapsed() < Duration::from_secs(30), "reported after {:?}", started.elapsed());
    let exit = tokio::task::block_in_place(|| worker.wait(Duration::from_secs(30)));
    assert!(!exit.success(), "{exit:?}");
    assert!(worker.log_text().contains("generation step hung"), "{}", worker.log_text());
    wait_for_empty_queue(&client).await;
}

/// The worker's time limit is on running: a job waiting here behind other batches is not timed out for it, and
/// one that waits a whole limit without starting is handed back and tried again (here by the same worker,
/// after the retry backoff), not failed. Three jobs that cannot share a batch (their step counts differ), each
/// running 1.5-2.1 s of a 3 s limit, one after another: the second waits up to 2.1 s, the third at least 3.3 s.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_time_limit_counts_from_a_jobs_start_and_a_job_that_cannot_start_is_handed_back() {
    let nats = NatsServer::start();
    let store = tempfile::tempdir().unwrap();
    let store_url = format!("file://{}", store.path().display());
    let flags = ["--step-delay", "300ms", "--job-timeout", "3s", "--max-batch", "2"];
    let _worker = WorkerProcess::start("w-wait", &nats.url(), &store_url, &[], &flags);
    let client = BusClient::connect(&nats.url(), "sd").await.unwrap();
    let jobs: Vec<JobRequest> = [7, 6, 5].into_iter().map(|steps| tiny_job(steps, 80 + u64::from(steps))).collect();
    for job in &jobs {
        client.submit(job).await.unwrap();
    }
    let mut handed_back = 0;
    for job in &jobs {
        let events = events_of(&client, job.id, Duration::from_secs(60)).await;
        assert!(matches!(events.last(), Some(Event::Completed(_))), "{events:?}");
        assert!(!events.iter().any(|e| matches!(e, Event::Failed(_))), "{events:?}");
        if accepted_by(&events).len() > 1 {
            handed_back += 1;
        }
    }
    assert!(handed_back >= 1, "the job that waited past the limit was handed back and taken again");
}

async fn next_heartbeat(beats: &mut async_nats::Subscriber) -> protocol::Heartbeat {
    let msg = tokio::time::timeout(Duration::from_secs(10), beats.next()).await.unwrap().unwrap();
    assert_eq!(msg.subject.as_str(), "sd.workers.w-beat");
    protocol::decode_heartbeat(&msg.payload).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heartbeats_say_who_the_worker_is_and_what_it_does() {
    let nats = NatsServer::start();
    let store = tempfile::tempdir().unwrap();
    let store_url = format!("file://{}", store.path().display());
    let client = BusClient::connect(&nats.url(), "sd").await.unwrap();
    let mut beats = client.nats().subscribe(client.subjects().heartbeats_wildcard()).await.unwrap();
    let _worker = WorkerProcess::start("w-beat", &nats.url(), &store_url, &[], &["--step-delay", "300ms"]);
    let hb = next_heartbeat(&mut beats).await;
    assert_eq!(hb.worker_id, "w-beat");
    assert_eq!(hb.models, ["tiny"]);
    assert!(hb.device.starts_with("cpu"), "{}", hb.device);
    assert_eq!(hb.version, env!("CARGO_PKG_VERSION"));
    assert!(!hb.hostname.is_empty());
    assert_eq!(hb.state, protocol::WorkerState::Idle);

    let job = tiny_job(12, 71);
    client.submit(&job).await.unwrap();
    let mut busy = false;
    for _ in 0..10 {
        if next_heartbeat(&mut beats).await.state == (protocol::WorkerState::Busy { job_id: job.id }) {
            busy = true;
            break;
        }
    }
    assert!(busy, "a heartbeat during the job says busy with it");
    events_of(&client, job.id, Duration::from_secs(30)).await;
    let mut done = None;
    for _ in 0..5 {
        let hb = next_heartbeat(&mut beats).await;
        if hb.state == protocol::WorkerState::Idle {
            done = Some(hb);
            break;
        }
    }
    let done = done.expect("idle again after the job");
    assert_eq!((done.jobs_done, done.jobs_failed), (1, 0));
}

fn png_of(img: &image::RgbImage) -> Vec<u8> {
    let mut png = Vec::new();
    img.write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png).unwrap();
    png
}

/// `sd-rbee generate` on the tiny fixture with `args`; the PNG it wrote.
fn generate_png(args: &[&str]) -> Vec<u8> {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out.png");
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_sd-rbee"))
        .args(["generate", "--model"])
        .arg(common::fixture("tiny-sd15"))
        .args(args)
        .arg("--out")
        .arg(&out)
        .output()
        .unwrap();
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    std::fs::read(&out).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn img2img_from_an_object_key_and_inline_inpainting_match_generate() {
    let nats = NatsServer::start();
    let s3 = S3Server::start();
    let _worker = WorkerProcess::start("w-img", &nats.url(), &s3.store_url(), &s3.env(), &[]);
    let client = BusClient::connect(&nats.url(), "sd").await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    // A picture of another size than the job's: the worker resizes it as generate does.
    let picture = image::RgbImage::from_fn(80, 72, |x, y| image::Rgb([(x * 3) as u8, (y * 3) as u8, 120]));
    let mask = image::RgbImage::from_fn(64, 64, |x, _| if x < 32 { image::Rgb([255; 3]) } else { image::Rgb([0; 3]) });
    let (picture_png, mask_png) = (png_of(&picture), png_of(&mask));
    std::fs::write(dir.path().join("init.png"), &picture_png).unwrap();
    std::fs::write(dir.path().join("mask.png"), &mask_png).unwrap();
    s3.put("uploads/init.png", &picture_png);

    let mut img2img = tiny_job(5, 9);
    img2img.kind = JobKind::Img2Img;
    img2img.init_image = Some(protocol::ImageSource::ObjectKey("uploads/init.png".into()));
    img2img.strength = Some(0.6);
    let mut inpaint = tiny_job(4, 10);
    inpaint.kind = JobKind::Inpaint;
    inpaint.init_image = Some(protocol::ImageSource::Inline(picture_png.clone()));
    inpaint.mask = Some(protocol::ImageSource::Inline(mask_png.clone()));
    inpaint.strength = Some(0.75);
    let mut missing = tiny_job(2, 11);
    missing.kind = JobKind::Img2Img;
    missing.init_image = Some(protocol::ImageSource::ObjectKey("uploads/nope.png".into()));
    for job in [&img2img, &inpaint, &missing] {
        client.submit(job).await.unwrap();
    }

    let init = dir.path().join("init.png");
    let init = init.to_str().unwrap();
    let mask_path = dir.path().join("mask.png");
    let expected = [
        generate_png(&[
            "--prompt",
            &img2img.prompt,
            "--width",
            "64",
            "--height",
            "64",
            "--steps",
            "5",
            "--seed",
            "9",
            "--init-image",
            init,
            "--strength",
            "0.6",
        ]),
        generate_png(&[
            "--prompt",
            &inpaint.prompt,
            "--width",
            "64",
            "--height",
            "64",
            "--steps",
            "4",
            "--seed",
            "10",
            "--init-image",
            init,
            "--mask",
            mask_path.to_str().unwrap(),
            "--strength",
            "0.75",
        ]),
    ];
    for (job, expected) in [&img2img, &inpaint].into_iter().zip(expected) {
        let events = events_of(&client, job.id, Duration::from_secs(60)).await;
        let done = completed(&events);
        assert_eq!(done.len(), 1, "{events:?}");
        let stored = s3.get(&done[0].images[0].key).unwrap();
        assert!(stored == expected, "job {:?}: the worker's PNG differs from sd-rbee generate's", job.kind);
    }
    let failed = failure(&events_of(&client, missing.id, Duration::from_secs(30)).await).clone();
    assert_eq!((failed.code, failed.field.as_deref()), (ErrorCode::InvalidRequest, Some("init_image")));
    assert!(failed.message.contains("uploads/nope.png"), "{}", failed.message);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workers_pull_only_the_models_they_serve() {
    let nats = NatsServer::start();
    let store = tempfile::tempdir().unwrap();
    let store_url = format!("file://{}", store.path().display());
    let _tiny = WorkerProcess::start("w-tiny", &nats.url(), &store_url, &[], &[]);
    let client = BusClient::connect(&nats.url(), "sd").await.unwrap();
    let mut xl_job = tiny_job(2, 81);
    xl_job.model = "tiny-xl".into();
    client.submit(&xl_job).await.unwrap();
    let tiny_job_ = tiny_job(2, 82);
    client.submit(&tiny_job_).await.unwrap();
    events_of(&client, tiny_job_.id, Duration::from_secs(30)).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(stored_events(&client, xl_job.id).await.is_empty(), "nobody serves tiny-xl yet: the job waits");

    // A worker for both models (the second one the tiny SDXL fixture) takes it.
    let xl = format!("tiny-xl={}", common::fixture("tiny-sdxl").display());
    let _both = WorkerProcess::start("w-both", &nats.url(), &store_url, &[], &["--model", &xl]);
    let events = events_of(&client, xl_job.id, Duration::from_secs(60)).await;
    assert_eq!(accepted_by(&events), ["w-both"]);
    assert_eq!(completed(&events).len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn submit_waits_and_prints_the_result_as_json() {
    let nats = NatsServer::start();
    let store = tempfile::tempdir().unwrap();
    let store_url = format!("file://{}", store.path().display());
    let _worker = WorkerProcess::start("w-submit", &nats.url(), &store_url, &[], &[]);
    let submit = |extra: &[&str]| {
        let nats = nats.url();
        let extra: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
        tokio::task::spawn_blocking(move || {
            std::process::Command::new(env!("CARGO_BIN_EXE_sd-rbee"))
                .args(["submit", "--nats", &nats, "--model", "tiny", "--prompt", "a blue door"])
                .args(["--height", "64", "--steps", "3"])
                .args(&extra)
                .output()
                .unwrap()
        })
    };
    let out = submit(&["--width", "64", "--seed", "5", "--wait", "--json"]).await.unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let result: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(result["status"], "completed", "{result}");
    let job_id = result["job_id"].as_str().unwrap();
    assert_eq!(result["images"][0]["key"], format!("jobs/{job_id}/0.png"));
    assert_eq!(result["images"][0]["seed"], 5);
    assert!(store.path().join(format!("jobs/{job_id}/0.png")).is_file());

    // A job the worker rejects: exit status 1 and the error in the JSON.
    let out = submit(&["--width", "64", "--init-image", "Cargo.toml", "--wait", "--json"]).await.unwrap();
    assert!(!out.status.success());
    let result: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(result["status"], "failed");
    assert_eq!(result["error"]["field"], "init_image", "{result}");

    // Bad parameters never reach the bus: the error names the field.
    let out = submit(&["--width", "100"]).await.unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("width") && stderr.contains("multiple of 8"), "{stderr}");
}
