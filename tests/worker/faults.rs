//! The worker when things go wrong while a job runs: a worker killed or sent SIGTERM, a NATS restart or a
//! lost store, an S3 outage, transient failures up to the dead letter, deadlines and a hung step. Same
//! servers and fixture as [`super`].

use super::*;

use std::collections::HashSet;

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

pub(super) async fn wait_for_step(client: &BusClient, job_id: Uuid, step: u32) {
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

/// A dead-letter stream deleted under the fleet is made again: the job it could not take is failed and
/// dead-lettered at its next try, not handed back until its deliveries run out with nobody told.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deleted_dead_letter_stream_is_made_again() {
    let nats = NatsServer::start();
    let store = tempfile::tempdir().unwrap();
    let store_url = format!("file://{}", store.path().display());
    let _worker = WorkerProcess::start("w-dlq", &nats.url(), &store_url, &[], &["--publish-patience", "1s"]);
    let client = BusClient::connect(&nats.url(), "sd").await.unwrap();
    client.jetstream().delete_stream(client.subjects().dlq_stream()).await.unwrap();
    // A width the protocol refuses, published past the client's checks.
    let mut bad = tiny_job(2, 5);
    bad.width = Some(100);
    let subject = client.subjects().jobs("tiny").unwrap();
    let headers = sd_rbee::bus::msg_id_headers(&bad.id.to_string());
    let payload = protocol::encode(&bad);
    client.jetstream().publish_with_headers(subject, headers, payload.clone().into()).await.unwrap().await.unwrap();
    let events = events_of(&client, bad.id, Duration::from_secs(30)).await;
    assert_eq!(failure(&events).field.as_deref(), Some("width"), "{events:?}");
    let letters = dead_letters(&client).await;
    assert_eq!(letters.len(), 1);
    assert_eq!(letters[0].1, payload);
}

/// A job whose model gives NaN fails at once, dead-lettered: the run is the same at every delivery, so
/// retrying it (for ever, with no delivery limit) would only keep the device from other jobs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_whose_model_gives_nan_fails_at_once() {
    let models = tempfile::tempdir().unwrap();
    let poisoned = models.path().join("poisoned");
    common::copy_dir(&common::fixture("tiny-sd15"), &poisoned);
    let vae = poisoned.join("vae/diffusion_pytorch_model.safetensors");
    let mut tensors = candle_core::safetensors::load(&vae, &candle_core::Device::Cpu).unwrap();
    let bias = tensors["decoder.conv_out.bias"].clone();
    tensors.insert("decoder.conv_out.bias".into(), (bias.ones_like().unwrap() * f64::NAN).unwrap());
    candle_core::safetensors::save(&tensors, &vae).unwrap();

    let nats = NatsServer::start();
    let store = tempfile::tempdir().unwrap();
    let store_url = format!("file://{}", store.path().display());
    let model = format!("poisoned={}", poisoned.display());
    let flags = ["--model", &model, "--max-deliver", "0"];
    let _worker = WorkerProcess::start("w-nan", &nats.url(), &store_url, &[], &flags);
    let client = BusClient::connect(&nats.url(), "sd").await.unwrap();
    let mut job = tiny_job(2, 7);
    job.model = "poisoned".into();
    client.submit(&job).await.unwrap();
    let events = events_of(&client, job.id, Duration::from_secs(60)).await;
    let failed = failure(&events);
    assert_eq!(failed.code, ErrorCode::Internal, "{failed:?}");
    assert!(failed.message.contains("NaN") && failed.message.contains("in f32"), "{}", failed.message);
    assert_eq!(accepted_by(&events), ["w-nan"], "one delivery");
    let letters = dead_letters(&client).await;
    assert_eq!(letters.len(), 1);
    assert_eq!(letters[0].1, protocol::encode(&job));
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

/// A max-deliveries advisory names its message by stream sequence only: one from before the message now at
/// that sequence was stored (the stream was recreated since, counting again), or naming another model's
/// consumer, is about another job, and must not fail and remove this one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_or_foreign_max_deliveries_advisory_leaves_a_healthy_job_alone() {
    let nats = NatsServer::start();
    let store = tempfile::tempdir().unwrap();
    let store_url = format!("file://{}", store.path().display());
    let _worker = WorkerProcess::start("w-advised", &nats.url(), &store_url, &[], &[]);
    let client = BusClient::connect(&nats.url(), "sd").await.unwrap();
    // Jobs of models no worker serves: they wait in the queue.
    let queued = |model: &str, seed| {
        let mut job = tiny_job(2, seed);
        job.model = model.into();
        job
    };
    let (job, sentinel) = (queued("elsewhere", 71), queued("sentinel", 72));
    let seq = client.submit_with_seq(&job).await.unwrap();
    let sentinel_seq = client.submit_with_seq(&sentinel).await.unwrap();
    let advise = |consumer: &str, seq: u64, at: std::time::SystemTime| {
        let subject =
            format!("$JS.EVENT.ADVISORY.CONSUMER.MAX_DELIVERIES.{}.{consumer}", client.subjects().jobs_stream());
        let body = serde_json::json!({
            "type": "io.nats.jetstream.advisory.v1.max_deliver", "id": Uuid::new_v4().to_string(),
            "timestamp": humantime::format_rfc3339_nanos(at).to_string(), "stream": client.subjects().jobs_stream(),
            "consumer": consumer, "stream_seq": seq, "deliveries": 3
        });
        let js = client.jetstream().clone();
        async move { js.publish(subject, body.to_string().into()).await.unwrap().await.unwrap() }
    };
    let now = std::time::SystemTime::now();
    advise("workers-elsewhere", seq, now - Duration::from_secs(3600)).await;
    advise("workers-tiny", seq, now).await;
    // The advisories are taken in order: once the sentinel's has failed it, the two before were dealt with.
    advise("workers-sentinel", sentinel_seq, now).await;
    failure(&events_of(&client, sentinel.id, Duration::from_secs(30)).await);
    assert!(stored_events(&client, job.id).await.is_empty(), "an advisory about another job failed this one");
    let stream = client.jetstream().get_stream(client.subjects().jobs_stream()).await.unwrap();
    assert!(stream.get_raw_message(seq).await.is_ok(), "an advisory about another job removed this one");

    // The advisory about it ends it.
    advise("workers-elsewhere", seq, std::time::SystemTime::now()).await;
    let failed = failure(&events_of(&client, job.id, Duration::from_secs(30)).await).clone();
    assert!(failed.message.contains("delivered 3 times"), "{}", failed.message);
}

/// The job's last delivery stored its images and manifest, then its worker died before reporting them; the
/// store is down when the advisory comes. Failing the job is final, so the store is asked again until it
/// answers, and the job is reported `completed`, not `failed`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_undeliverable_job_waits_for_the_store_to_say_whether_it_finished() {
    let nats = NatsServer::start();
    let mut s3 = S3Server::start();
    let flags = ["--max-deliver", "1", "--ack-wait", "1s", "--step-delay", "200ms", "--store-retry", "1s"];
    let mut workers = [
        WorkerProcess::start("w-sx", &nats.url(), &s3.store_url(), &s3.env(), &flags),
        WorkerProcess::start("w-sy", &nats.url(), &s3.store_url(), &s3.env(), &flags),
    ];
    let client = BusClient::connect(&nats.url(), "sd").await.unwrap();
    let job = tiny_job(30, 52);
    client.submit(&job).await.unwrap();
    wait_for_step(&client, job.id, 1).await;
    let taker = accepted_by(&stored_events(&client, job.id).await)[0].clone();
    s3.kill();
    workers.iter_mut().find(|w| w.id == taker).unwrap().kill();
    // The advisory comes about a second later; the store cannot say for longer than one try waits.
    tokio::time::sleep(Duration::from_secs(15)).await;
    let so_far = stored_events(&client, job.id).await;
    assert!(!so_far.iter().any(|e| matches!(e, Event::Failed(_))), "not failed while the store cannot say: {so_far:?}");
    // What the dead worker stored before it died (written here, as the store restarts empty).
    s3.restart();
    let key = protocol::result_key(job.id, 0, "png");
    s3.put(&key, b"an image");
    let image = protocol::ImageResult {
        index: 0,
        key,
        url: None,
        width: 64,
        height: 64,
        seed: 1,
        bytes: 8,
        content_type: "image/png".into(),
    };
    let (v, at) = (protocol::PROTOCOL_VERSION, protocol::now_millis());
    let manifest = protocol::Completed {
        v,
        job_id: job.id,
        at,
        images: vec![image],
        timings: Default::default(),
        warnings: vec![],
        cached: false,
    };
    s3.put(&protocol::manifest_key(job.id), &protocol::encode(&Event::Completed(manifest)));

    let events = events_of(&client, job.id, Duration::from_secs(30)).await;
    assert!(matches!(events.last(), Some(Event::Completed(_))), "{events:?}");
    assert!(!events.iter().any(|e| matches!(e, Event::Failed(_))), "{events:?}");
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

    // The worker's own limit, also for a job whose deadline is far off.
    let job = tiny_job(30, 62);
    let mut far = tiny_job(30, 64);
    far.deadline = Some(far.created_at + 3_600_000);
    for job in [job, far] {
        client.submit(&job).await.unwrap();
        let failed = failure(&events_of(&client, job.id, Duration::from_secs(30)).await).clone();
        assert_eq!(failed.code, ErrorCode::Timeout);
        assert!(failed.message.contains("time limit"), "{}", failed.message);
    }

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

/// A slow step is not a hung one: a job cancelled 4 s into a first step that takes 6 s (twice
/// `--stall-timeout` already) is reported `cancelled` once that step ends, and the worker goes on serving;
/// the watchdog gives the step three times the time it had taken when the job was told to stop.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_first_step_stopped_late_is_not_taken_for_a_hung_device() {
    let nats = NatsServer::start();
    let store = tempfile::tempdir().unwrap();
    let store_url = format!("file://{}", store.path().display());
    let flags = ["--step-delay", "6s", "--stall-timeout", "2s"];
    let worker = WorkerProcess::start("w-slow", &nats.url(), &store_url, &[], &flags);
    let client = BusClient::connect(&nats.url(), "sd").await.unwrap();
    let job = tiny_job(3, 91);
    let events = client.events(job.id).await.unwrap();
    tokio::pin!(events);
    client.submit(&job).await.unwrap();
    while let Some(e) = tokio::time::timeout(Duration::from_secs(30), events.next()).await.unwrap() {
        if matches!(e.unwrap(), Event::Accepted(_)) {
            break;
        }
    }
    tokio::time::sleep(Duration::from_secs(4)).await;
    let asked = std::time::Instant::now();
    client.cancel(job.id, None).await.unwrap();
    let events = events_of(&client, job.id, Duration::from_secs(30)).await;
    let Some(Event::Cancelled(cancelled)) = events.last() else { panic!("{events:?}") };
    // Cancelled at the end of the first step, which the cancel reached more than the stall timeout into
    // it (its batch began within 2 s of `accepted`): the case the watchdog once took for a hang.
    assert_eq!(cancelled.at_step, Some(1), "{events:?}");
    let took = asked.elapsed();
    assert!(took < Duration::from_secs(4), "cancelled {took:?} after the request: the batch began too late");
    let next = tiny_job(1, 92);
    client.submit(&next).await.unwrap();
    let events = events_of(&client, next.id, Duration::from_secs(30)).await;
    assert_eq!(completed(&events).len(), 1, "{events:?}\n{}", worker.log_text());
    assert!(!worker.log_text().contains("generation step hung"), "{}", worker.log_text());
    assert_eq!(accepted_by(&events), ["w-slow"]);
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
