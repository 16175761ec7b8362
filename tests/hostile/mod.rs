//! Hostile input against real servers (nats-server, moto, file stores) and `sd-rbee` processes: jobs at the
//! bus's size limit, values that would make reports too big to publish, object keys a store cannot hold,
//! a 16-bit PNG bomb with the processes' memory measured, a model name that breaks /metrics, a token that
//! crashed the queen; a seeded fuzz of the job subject and the HTTP API is in [`fuzz`], and what the queen
//! lets others read (a job's stored events, CORS headers) in [`reads`].

use crate::common;
use crate::common::tiny_job;

use std::process::Command;
use std::time::{Duration, Instant};

use async_nats::jetstream;
use common::hostile::{
    assert_error_body, dead_letters, failure, header, png_bomb, png_of_size, publish_raw, wait_for_empty_queue,
    wait_for_terminal, QueenChild,
};
use common::servers::{http_with, memory_mib, NatsServer, S3Server, WorkerProcess};
use sd_rbee::bus::BusClient;
use sd_rbee::protocol::{self, Event, ImageSource, JobKind, JobRequest};
use uuid::Uuid;

mod fuzz;
mod reads;

// ---------------------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------------------

// ---------------------------------------------------------------------------------------------------------
// Size limits
// ---------------------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jobs_at_the_size_limit_are_accepted_refused_or_dead_lettered_never_stuck() {
    let nats = NatsServer::start();
    let s3 = S3Server::start();
    let _worker = WorkerProcess::start("w-size", &nats.url(), &s3.store_url(), &s3.env(), &[]);
    let client = BusClient::connect(&nats.url(), "sd").await.unwrap();
    let max = client.nats().max_payload();
    assert_eq!(max, 1024 * 1024, "the test assumes NATS' default max_payload");

    // An invalid job (strength out of range) whose message just fits with its own header, but whose
    // dead-letter copy (the same bytes plus the reason and bookkeeping headers) does not.
    let mut bad = JobRequest::new(JobKind::Img2Img, "tiny", "a harbour at night");
    (bad.width, bad.height, bad.strength) = (Some(64), Some(64), Some(1.5));
    let headers = sd_rbee::bus::msg_id_headers(&bad.msg_id());
    bad.init_image = Some(ImageSource::Inline(vec![0]));
    let overhead = protocol::encode(&bad).len() - 1;
    let room = max - sd_rbee::bus::wire_size(&headers, 0) - overhead;
    // Inline bytes of n > 255 take a 3- or 5-byte bin header instead of 2: find n that fills the message.
    let n = (room - 8..=room).rev().find(|&n| {
        bad.init_image = Some(ImageSource::Inline(vec![7; n]));
        sd_rbee::bus::wire_size(&headers, protocol::encode(&bad).len()) <= max
    });
    bad.init_image = Some(ImageSource::Inline(vec![7; n.unwrap()]));
    let bytes = protocol::encode(&bad);
    assert!(max - sd_rbee::bus::wire_size(&headers, bytes.len()) < 8, "the job fills the message");
    let started = Instant::now();
    publish_raw(&client, "tiny", bytes.clone(), &bad.msg_id()).await;
    let events = wait_for_terminal(&client, bad.id, Duration::from_secs(20)).await;
    eprintln!("an invalid job at the size limit: failed and dead-lettered in {:?}", started.elapsed());
    let failed = failure(&events).expect("the oversized invalid job is reported failed");
    assert_eq!(failed.field.as_deref(), Some("strength"), "{failed:?}");
    assert!(started.elapsed() < Duration::from_secs(10), "took {:?}", started.elapsed());
    wait_for_empty_queue(&client, Duration::from_secs(10)).await;
    let letters = dead_letters(&client).await;
    let copy = letters.iter().find(|m| header(m, "Nats-Msg-Id").as_deref() == Some(&bad.msg_id()[..])).unwrap();
    assert_eq!(header(copy, protocol::DLQ_ORIGINAL_BYTES_HEADER), Some(bytes.len().to_string()));
    assert!(copy.payload.len() < bytes.len() && bytes.starts_with(&copy.payload), "a truncated copy");
    let key = header(copy, protocol::DLQ_BODY_KEY_HEADER).expect("the whole job is kept in the store");
    assert_eq!(s3.get(&key).expect("the kept job"), bytes, "the store keeps the job's bytes unchanged");
    assert!(header(copy, protocol::DLQ_REASON_HEADER).is_some_and(|r| r.contains("strength")));

    // A valid img2img job at the limit (with the headroom a requeued copy needs) is taken and completes;
    // one more byte is refused before it is sent.
    let mut good = JobRequest::new(JobKind::Img2Img, "tiny", "a harbour at dawn");
    (good.width, good.height, good.steps, good.seed) = (Some(64), Some(64), Some(2), Some(3));
    good.init_image = Some(ImageSource::Inline(vec![0]));
    let overhead = protocol::encode(&good).len() - 1;
    let limit_for = |job: &JobRequest| sd_rbee::bus::job_message_size(job.id, protocol::encode(job).len());
    let mut size = max - overhead - (limit_for(&good) - protocol::encode(&good).len()) - 4;
    loop {
        good.init_image = Some(ImageSource::Inline(png_of_size(size + 1)));
        if limit_for(&good) > max {
            break;
        }
        size += 1;
    }
    good.init_image = Some(ImageSource::Inline(png_of_size(size)));
    assert_eq!(limit_for(&good), max, "the job is exactly at the limit");
    client.submit(&good).await.expect("a job at the limit is accepted");
    let events = wait_for_terminal(&client, good.id, Duration::from_secs(60)).await;
    assert!(matches!(events.last(), Some(Event::Completed(_))), "{events:?}");
    let mut over = good.clone();
    over.id = Uuid::new_v4();
    over.init_image = Some(ImageSource::Inline(png_of_size(size + 1)));
    let started = Instant::now();
    let err = client.submit(&over).await.unwrap_err().to_string();
    assert!(err.contains("max_payload") && started.elapsed() < Duration::from_secs(1), "{err}");

    // The queen counts the same: 413 at once for a job whose payload alone is under the limit.
    let store = tempfile::tempdir().unwrap();
    let queen = QueenChild::start(&nats.url(), store.path().to_str().unwrap(), &[]);
    let mut sub = sd_rbee::api::JobSubmission::from(&over);
    sub.seed = Some(4);
    let payload_alone = protocol::encode(&over).len();
    assert!(payload_alone < max, "{payload_alone}");
    let started = Instant::now();
    let (status, json, raw) = queen.request("POST", "/v1/jobs", &serde_json::to_vec(&sub).unwrap());
    assert_eq!(status, 413, "{json}");
    assert_error_body(status, &json, &raw, "oversized job");
    assert!(started.elapsed() < Duration::from_secs(2), "answered after {:?}", started.elapsed());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_megabyte_field_fails_fast_with_a_short_message_and_the_worker_moves_on() {
    let nats = NatsServer::start();
    let store = tempfile::tempdir().unwrap();
    let store_url = format!("file://{}", store.path().display());
    let _worker = WorkerProcess::start("w-echo", &nats.url(), &store_url, &[], &[]);
    let client = BusClient::connect(&nats.url(), "sd").await.unwrap();

    let mut cases: Vec<(JobRequest, &str)> = Vec::new();
    let mut job = tiny_job(2, 1);
    job.scheduler = Some("\"".repeat(1_000_000));
    cases.push((job, "scheduler"));
    let mut job = tiny_job(2, 1);
    job.timestep_spacing = Some("é".repeat(400_000));
    cases.push((job, "timestep_spacing"));
    // An unknown enum name is quoted by the decoder itself.
    let mut raw = serde_json::to_value(tiny_job(2, 1)).unwrap();
    let decoder_id = Uuid::new_v4();
    raw["id"] = decoder_id.to_string().into();
    raw["kind"] = "k".repeat(900_000).into();
    let started = Instant::now();
    for (job, _) in &cases {
        publish_raw(&client, "tiny", protocol::encode(job), &job.msg_id()).await;
    }
    publish_raw(&client, "tiny", rmp_serde::to_vec_named(&raw).unwrap(), &decoder_id.to_string()).await;
    let valid = tiny_job(2, 9);
    client.submit(&valid).await.unwrap();

    for (job, field) in &cases {
        let events = wait_for_terminal(&client, job.id, Duration::from_secs(15)).await;
        let f = failure(&events).unwrap_or_else(|| panic!("{field}: {events:?}"));
        assert_eq!(f.field.as_deref(), Some(*field));
        assert!(f.message.len() <= 300, "{field}: a {} byte message", f.message.len());
    }
    let events = wait_for_terminal(&client, decoder_id, Duration::from_secs(15)).await;
    let f = failure(&events).unwrap();
    assert!(f.message.len() <= protocol::MAX_ERROR_MESSAGE_BYTES, "a {} byte message", f.message.len());
    let events = wait_for_terminal(&client, valid.id, Duration::from_secs(30)).await;
    assert!(matches!(events.last(), Some(Event::Completed(_))), "{events:?}");
    eprintln!("three megabyte-field jobs and a valid one after them: all done in {:?}", started.elapsed());
    assert!(started.elapsed() < Duration::from_secs(20), "the bad jobs held the queue for {:?}", started.elapsed());
    assert_eq!(dead_letters(&client).await.len(), 3, "each bad job is dead-lettered");
    wait_for_empty_queue(&client, Duration::from_secs(10)).await;

    // Through the queen: 422 with the same short message.
    let queen = QueenChild::start(&nats.url(), &store_url, &[]);
    let mut sub = sd_rbee::api::JobSubmission::new("tiny", "x");
    sub.scheduler = Some("\"".repeat(1_000_000));
    let (status, json, raw) = queen.request("POST", "/v1/jobs", &serde_json::to_vec(&sub).unwrap());
    assert_eq!(status, 422);
    assert_error_body(status, &json, &raw, "long scheduler");
    assert!(raw.len() < 1000, "a {} byte answer", raw.len());
    assert_eq!(json["error"]["field"], "scheduler");
}

// ---------------------------------------------------------------------------------------------------------
// Object keys, decoding, metrics, configuration
// ---------------------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_object_keys_are_422_on_a_file_store_and_reach_no_worker() {
    let nats = NatsServer::start();
    let store = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(store.path().join("uploads")).unwrap();
    std::fs::write(store.path().join("uploads/a.png"), png_of_size(2000)).unwrap();
    let queen = QueenChild::start(&nats.url(), &format!("file://{}", store.path().display()), &[]);
    let long_segment = format!("uploads/{}.png", "x".repeat(300));
    let keys = [
        String::new(),
        "k".repeat(5000),
        long_segment,
        "uploads//a.png".into(),
        "uploads/a.png/".into(),
        "/uploads/a.png".into(),
        "uploads/../a.png".into(),
        "uploads/./a.png".into(),
        "uploads/a\u{7}.png".into(),
        "uploads/a.png/inner.png".into(),
        "uploads".into(),
        "missing/nothing.png".into(),
        // Exists, but is larger than any input image may be (a sparse file: nothing is written).
        "uploads/huge.png".into(),
    ];
    let huge = std::fs::File::create(store.path().join("uploads/huge.png")).unwrap();
    huge.set_len(1 << 30).unwrap();
    for key in &keys {
        let body = serde_json::json!({"model": "tiny", "prompt": "p", "width": 64, "height": 64,
                                      "init_image": {"object_key": key}});
        let started = Instant::now();
        let (status, json, raw) = queen.request("POST", "/v1/jobs", body.to_string().as_bytes());
        let shown: String = key.chars().take(40).collect();
        assert_eq!(status, 422, "key {shown:?}: {json}");
        assert_error_body(status, &json, &raw, "object key");
        assert_eq!(json["error"]["field"], "init_image", "key {shown:?}: {json}");
        assert!(raw.len() < 1000 && started.elapsed() < Duration::from_secs(2), "key {shown:?}");
    }
    // The key that exists is accepted.
    let body = serde_json::json!({"model": "tiny", "prompt": "p", "width": 64, "height": 64,
                                  "init_image": {"object_key": "uploads/a.png"}});
    let (status, json, _) = queen.request("POST", "/v1/jobs", body.to_string().as_bytes());
    assert_eq!(status, 202, "{json}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_16_bit_png_bomb_is_refused_within_the_memory_limit_by_the_queen_and_the_worker() {
    let bomb = png_bomb(8192);
    assert!(bomb.len() < 1024 * 1024, "{} bytes", bomb.len());
    let nats = NatsServer::start();
    let store = tempfile::tempdir().unwrap();
    let store_url = format!("file://{}", store.path().display());
    let mut queen = QueenChild::start(&nats.url(), &store_url, &[]);
    let pid = queen.child.id();

    // Four at once, as uploads and as inline images.
    use base64::Engine;
    let inline = serde_json::json!({"model": "tiny", "prompt": "p", "width": 64, "height": 64,
        "init_image": base64::engine::general_purpose::STANDARD.encode(&bomb)})
    .to_string();
    let (_, before) = memory_mib(pid);
    let port = queen.port;
    let mut handles = Vec::new();
    for i in 0..4 {
        let (path, body) = if i % 2 == 0 { ("/v1/uploads", bomb.clone()) } else { ("/v1/jobs", inline.clone().into()) };
        handles.push(std::thread::spawn(move || {
            http_with("POST", port, path, &["Content-Type: application/json"], &body).unwrap()
        }));
    }
    for h in handles {
        let (status, body) = h.join().unwrap();
        let json: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(status, 422, "{json}");
        let message = json["error"]["message"].as_str().unwrap();
        assert!(message.contains("MiB limit"), "{message}");
    }
    let (_, after) = memory_mib(pid);
    assert!(queen.alive());
    eprintln!("queen peak memory: {before} MiB before four bombs, {after} MiB after");
    assert!(after - before < 96, "the queen's peak memory grew by {} MiB (from {before} MiB)", after - before);

    // A worker given the bomb inline: failed with the field, its memory bounded, and it keeps serving.
    let worker = WorkerProcess::start("w-bomb", &nats.url(), &store_url, &[], &[]);
    let client = BusClient::connect(&nats.url(), "sd").await.unwrap();
    let warm = tiny_job(2, 5);
    client.submit(&warm).await.unwrap();
    wait_for_terminal(&client, warm.id, Duration::from_secs(60)).await;
    let (_, before) = memory_mib(worker.pid().unwrap());
    let mut job = JobRequest::new(JobKind::Img2Img, "tiny", "a harbour");
    (job.width, job.height, job.steps) = (Some(64), Some(64), Some(2));
    job.init_image = Some(ImageSource::Inline(bomb));
    client.submit(&job).await.unwrap();
    let events = wait_for_terminal(&client, job.id, Duration::from_secs(30)).await;
    let f = failure(&events).expect("the bomb fails the job");
    assert_eq!(f.field.as_deref(), Some("init_image"), "{f:?}");
    let (_, after) = memory_mib(worker.pid().unwrap());
    eprintln!("worker peak memory: {before} MiB before the bomb, {after} MiB after");
    assert!(after - before < 96, "the worker's peak memory grew by {} MiB (from {before} MiB)", after - before);
    let again = tiny_job(2, 6);
    client.submit(&again).await.unwrap();
    let events = wait_for_terminal(&client, again.id, Duration::from_secs(60)).await;
    assert!(matches!(events.last(), Some(Event::Completed(_))));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_quoted_model_name_leaves_metrics_parseable() {
    let nats = NatsServer::start();
    let store = tempfile::tempdir().unwrap();
    let queen = QueenChild::start(&nats.url(), store.path().to_str().unwrap(), &[]);
    let client = BusClient::connect(&nats.url(), "sd").await.unwrap();
    // A quote is allowed in a model name (a backslash is not); it must not break the exposition.
    let model = r#"q"uote"#;
    protocol::validate_model_name(model).unwrap();
    protocol::validate_model_name(r#"q\uote"#).unwrap_err();
    let mut job = tiny_job(2, 1);
    job.model = model.into();
    client.submit(&job).await.unwrap();
    // A heartbeat claiming it, too.
    let beat = protocol::Heartbeat {
        cache_hits: 0,
        v: protocol::PROTOCOL_VERSION,
        at: protocol::now_millis(),
        worker_id: "w\"x".into(),
        hostname: "h\"".into(),
        device: "cpu".into(),
        models: vec![model.into()],
        loras: vec![],
        resident: vec![],
        state: protocol::WorkerState::Idle,
        jobs_done: 0,
        jobs_failed: 0,
        uptime_s: 1,
        version: "0".into(),
        stopping: false,
        max_batch: 1,
        batches: Vec::new(),
    };
    client.nats().publish("sd.workers.w\"x", protocol::encode(&beat).into()).await.unwrap();
    // A worker id may hold a backslash (a subject token), and workers are labels too.
    let slashed =
        protocol::Heartbeat { worker_id: r#"w\y"#.into(), jobs_done: 7, batches: vec![5, 0, 2], ..beat.clone() };
    client.nats().publish(r#"sd.workers.w\y"#, protocol::encode(&slashed).into()).await.unwrap();
    client.nats().flush().await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;

    let (status, text) = http_with("GET", queen.port, "/metrics", &[], b"").unwrap();
    assert_eq!(status, 200);
    let text = String::from_utf8(text).unwrap();
    let parsed = openmetrics_parser::prometheus::parse_prometheus(&text)
        .unwrap_or_else(|e| panic!("unparsable exposition: {e:?}\n{text}"));
    let depth = &parsed.families["sd_rbee_queue_depth"];
    let models: Vec<String> = depth
        .iter_samples()
        .filter_map(|s| s.get_labelset().ok()?.get_label_value("model").map(str::to_string))
        .collect();
    assert_eq!(models, [model.to_string()], "{text}");
    // Every worker label reads back as the id it was, quote and backslash included.
    let done = &parsed.families["sd_rbee_worker_jobs"];
    let mut workers: Vec<(String, String)> = done
        .iter_samples()
        .filter_map(|s| {
            let labels = s.get_labelset().ok()?;
            Some((labels.get_label_value("worker")?.to_string(), labels.get_label_value("outcome")?.to_string()))
        })
        .collect();
    workers.sort();
    let want = [
        ("w\"x", "cached"),
        ("w\"x", "done"),
        ("w\"x", "failed"),
        (r#"w\y"#, "cached"),
        (r#"w\y"#, "done"),
        (r#"w\y"#, "failed"),
    ];
    assert_eq!(workers, want.map(|(w, o)| (w.to_string(), o.to_string())), "{text}");
    // The batch sizes a worker ran, by size (sizes it never ran are not samples).
    let mut batches: Vec<(String, String, f64)> = parsed.families["sd_rbee_worker_batches"]
        .iter_samples()
        .filter_map(|s| {
            let labels = s.get_labelset().ok()?;
            let openmetrics_parser::PrometheusValue::Gauge(n) = &s.value else { return None };
            let (worker, size) = (labels.get_label_value("worker")?, labels.get_label_value("size")?);
            Some((worker.to_string(), size.to_string(), n.as_f64()))
        })
        .collect();
    batches.sort_by(|a, b| a.1.cmp(&b.1));
    let want = [(r#"w\y"#, "1", 5.0), (r#"w\y"#, "3", 2.0)];
    assert_eq!(batches, want.map(|(w, s, n)| (w.to_string(), s.to_string(), n)), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_poison_event_does_not_stop_the_status_updates() {
    let nats = NatsServer::start();
    let store = tempfile::tempdir().unwrap();
    let queen = QueenChild::start(&nats.url(), store.path().to_str().unwrap(), &[]);
    let client = BusClient::connect(&nats.url(), "sd").await.unwrap();
    let publish = |event: Event| {
        let js = client.jetstream().clone();
        let subject = client.subjects().events(event.job_id());
        async move { js.publish(subject, protocol::encode(&event).into()).await.unwrap().await.unwrap() }
    };
    // A completed event that fits a NATS message as MessagePack, but not as the JSON status record (each
    // control character takes six bytes there), and a failure with a megabyte of message.
    let poison = Uuid::new_v4();
    let image = protocol::ImageResult {
        index: 0,
        key: protocol::result_key(poison, 0, "png"),
        url: Some("\u{1}".repeat(300_000)),
        width: 64,
        height: 64,
        seed: 1,
        bytes: 1,
        content_type: "image/png".into(),
    };
    let timings = protocol::Timings::default();
    let at = protocol::now_millis();
    let v = protocol::PROTOCOL_VERSION;
    publish(Event::Completed(protocol::Completed {
        cached: false,
        v,
        job_id: poison,
        at,
        images: vec![image],
        timings,
        warnings: vec![],
    }))
    .await;
    let long = protocol::Failed {
        v,
        job_id: Uuid::new_v4(),
        at,
        code: protocol::ErrorCode::Internal,
        message: "m".repeat(1_000_000),
        field: None,
    };
    publish(Event::Failed(long.clone())).await;

    // A completed event whose URLs pass, but which makes a record too large to store: the job still ends,
    // its images kept without their URLs.
    let big = Uuid::new_v4();
    let images: Vec<protocol::ImageResult> = (0..20)
        .map(|i| protocol::ImageResult {
            index: i,
            key: protocol::result_key(big, i, "png"),
            url: Some(format!("https://bucket.example/{}", "u".repeat(4000))),
            width: 64,
            height: 64,
            seed: 1,
            bytes: 1,
            content_type: "image/png".into(),
        })
        .collect();
    let done = protocol::Completed { cached: false, v, job_id: big, at, images, timings, warnings: vec![] };
    publish(Event::Completed(done)).await;
    // A progress percent that is no number (JSON would write it as null, which no record reads back).
    let nan = Uuid::new_v4();
    publish(Event::Progress(protocol::Progress { percent: f32::NAN, ..protocol::Progress::new(nan, 3, 4, at) })).await;

    // A job submitted after them still has its status followed.
    let body = serde_json::json!({"model": "nobody", "prompt": "p", "width": 64, "height": 64});
    let (status, json, _) = queen.request("POST", "/v1/jobs", body.to_string().as_bytes());
    assert_eq!(status, 202, "{json}");
    let job_id: Uuid = json["job_id"].as_str().unwrap().parse().unwrap();
    let worker_id = "w-poison".to_string();
    let model = String::new();
    publish(Event::Accepted(protocol::Accepted {
        v,
        job_id,
        at: protocol::now_millis(),
        worker_id,
        model,
        tenant: None,
    }))
    .await;
    let start = Instant::now();
    loop {
        let (_, json, _) = queen.request("GET", &format!("/v1/jobs/{job_id}"), b"");
        if json["state"] == "running" {
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(10), "the status stopped following events: {json}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // ... and the poison is settled, not redelivered to the aggregator for ever.
    let events = client.jetstream().get_stream(client.subjects().events_stream()).await.unwrap();
    let start = Instant::now();
    loop {
        let mut consumer: jetstream::consumer::PullConsumer =
            events.get_consumer(sd_rbee::queen::aggregator::AGGREGATOR_CONSUMER).await.unwrap();
        let info = consumer.info().await.unwrap();
        if info.num_ack_pending == 0 && info.num_pending == 0 {
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(10), "events left unsettled: {info:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The poison and the large one ended, without the URLs; the NaN one reads back, and so do lists.
    for (id, images) in [(poison, 1), (big, 20)] {
        let (status, json, _) = queen.request("GET", &format!("/v1/jobs/{id}"), b"");
        assert_eq!((status, json["state"].as_str()), (200, Some("completed")), "{json}");
        let kept = json["images"].as_array().unwrap();
        assert_eq!(kept.len(), images, "{json}");
        assert!(kept.iter().all(|i| i.get("url").is_none()), "{json}");
    }
    let (status, json, _) = queen.request("GET", &format!("/v1/jobs/{nan}"), b"");
    assert_eq!((status, json["progress"]["percent"].as_f64()), (200, Some(75.0)), "{json}");
    for list in ["/v1/jobs", "/v1/jobs?state=running"] {
        let (status, json, _) = queen.request("GET", list, b"");
        assert_eq!(status, 200, "{list}: {json}");
        assert!(json["jobs"].as_array().unwrap().iter().any(|j| j["job_id"] == nan.to_string()), "{json}");
    }
    // The long failure is kept, its message cut to the limit.
    let (status, json, _) = queen.request("GET", &format!("/v1/jobs/{}", long.job_id), b"");
    assert_eq!((status, json["state"].as_str()), (200, Some("failed")), "{json}");
    let kept = json["error"]["message"].as_str().unwrap_or_default().len();
    assert_eq!(kept, protocol::MAX_ERROR_MESSAGE_BYTES, "the record keeps {kept} bytes of the message");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_message_size_limit_is_a_refusal_not_a_retry() {
    // An operator's dead-letter stream that takes messages of at most 64 KiB: a 200 KB invalid job cannot be
    // copied there, which is permanent, so the job is still failed and removed at once.
    let nats = NatsServer::start();
    let client = BusClient::connect(&nats.url(), "sd").await.unwrap();
    let mut dlq = client.jetstream().get_stream(client.subjects().dlq_stream()).await.unwrap();
    let mut config = dlq.info().await.unwrap().config.clone();
    config.max_message_size = 64 * 1024;
    client.jetstream().update_stream(config).await.unwrap();
    let store = tempfile::tempdir().unwrap();
    let store_url = format!("file://{}", store.path().display());
    let _worker = WorkerProcess::start("w-limit", &nats.url(), &store_url, &[], &["--max-deliver", "2"]);
    let mut bad = tiny_job(2, 1);
    bad.prompt = "p".repeat(200_000);
    let started = Instant::now();
    publish_raw(&client, "tiny", protocol::encode(&bad), &bad.msg_id()).await;
    let events = wait_for_terminal(&client, bad.id, Duration::from_secs(30)).await;
    assert_eq!(failure(&events).and_then(|f| f.field.as_deref()), Some("prompt"), "{events:?}");
    assert!(started.elapsed() < Duration::from_secs(10), "took {:?}", started.elapsed());
    wait_for_empty_queue(&client, Duration::from_secs(10)).await;
    assert!(dead_letters(&client).await.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trickled_body_is_cut_off_with_the_json_error() {
    use std::io::{Read, Write};
    let nats = NatsServer::start();
    let store = tempfile::tempdir().unwrap();
    let queen = QueenChild::start_with(&nats.url(), store.path().to_str().unwrap(), &[], &["--body-timeout", "1s"]);
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", queen.port)).unwrap();
    stream.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let head = "POST /v1/jobs HTTP/1.1\r\nHost: q\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n";
    stream.write_all(head.as_bytes()).unwrap();
    stream.write_all(b"{\"model\": ").unwrap();
    let started = Instant::now();
    let mut answer = vec![0u8; 4096];
    let n = stream.read(&mut answer).expect("the queen answers a body that never arrives");
    let answer = String::from_utf8_lossy(&answer[..n]).to_string();
    assert!(started.elapsed() < Duration::from_secs(5), "answered after {:?}", started.elapsed());
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(answer.contains("\"error\"") && answer.contains("application/json"), "{answer}");

    // A byte every 300 ms never lets an idle timer fire: the whole body has --body-timeout, on every route.
    for path in ["/v1/images/generations", "/sdapi/v1/txt2img", "/v1/jobs"] {
        let mut stream = std::net::TcpStream::connect(("127.0.0.1", queen.port)).unwrap();
        let head = format!(
            "POST {path} HTTP/1.1\r\nHost: q\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n"
        );
        stream.write_all(head.as_bytes()).unwrap();
        let mut trickle = stream.try_clone().unwrap();
        std::thread::spawn(move || {
            for _ in 0..30 {
                std::thread::sleep(Duration::from_millis(300));
                if trickle.write_all(b" ").is_err() {
                    return;
                }
            }
        });
        stream.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let started = Instant::now();
        let mut answer = vec![0u8; 4096];
        let n = stream.read(&mut answer).expect("the queen answers a trickled body");
        let answer = String::from_utf8_lossy(&answer[..n]).to_string();
        assert!(started.elapsed() < Duration::from_secs(5), "{path}: answered after {:?}", started.elapsed());
        assert!(answer.starts_with("HTTP/1.1 408") && answer.contains("REQUEST_TIMEOUT"), "{path}: {answer}");
    }
}

#[test]
fn a_non_ascii_or_short_token_is_a_clear_error_not_a_panic() {
    for (tokens, expected) in [
        ("é", "use at least 16"),
        ("ab€", "use at least 16"),
        ("🦀🦀🦀", "use at least 16"),
        ("🦀🦀🦀🦀🦀", "visible ASCII"),
        ("ééééééééééééééééééé", "visible ASCII"),
        ("a-token-with a space-inside", "visible ASCII"),
    ] {
        let out = Command::new(env!("CARGO_BIN_EXE_sd-rbee"))
            .args(["queen", "--nats", "nats://127.0.0.1:1", "--store", "memory://"])
            .env("SD_RBEE_API_TOKENS", tokens)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{tokens:?}: {stderr}");
        assert!(stderr.contains(expected) && !stderr.contains("panicked"), "{tokens:?}: {stderr}");
        // The message says where the token is, and shows none of it.
        let secret: String = tokens.chars().take(3).collect();
        assert!(stderr.contains("entry 1 of SD_RBEE_API_TOKENS") && !stderr.contains(&secret), "{tokens:?}: {stderr}");
    }
    // A token file line's priority options: a bad one names the line and the option, not the token.
    let dir = tempfile::tempdir().unwrap();
    for (line, expected) in [
        ("s3cret-token-0123456789 max_priority=urgent", "\"urgent\" is not a priority"),
        ("s3cret-token-0123456789 default_priority=high max_priority=low", "default_priority=high is above"),
        ("s3cret-token-0123456789 priority=low", "is not an option"),
    ] {
        let file = dir.path().join("tokens");
        std::fs::write(&file, format!("# the batch client\n{line}\n")).unwrap();
        let out = Command::new(env!("CARGO_BIN_EXE_sd-rbee"))
            .args(["queen", "--nats", "nats://127.0.0.1:1", "--store", "memory://", "--token-file"])
            .arg(&file)
            .env_remove("SD_RBEE_API_TOKENS")
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{line}: {stderr}");
        assert!(stderr.contains(expected) && stderr.contains("line 2 of --token-file"), "{line}: {stderr}");
        assert!(!stderr.contains("s3cret"), "{line}: {stderr}");
    }
    // Other configuration that used to panic or spin.
    for args in [
        &["worker", "--model", "tiny=x", "--heartbeat-interval", "0s"][..],
        &["worker", "--model", "tiny=x", "--ack-wait", "0s"][..],
        &["worker", "--model", "tiny=x", "--job-timeout", "99999999999999999999999d"][..],
        &["queen", "--no-auth", "--keep-status", "1e999"][..],
        &["queen", "--no-auth", "--limits", "{\"max_side\": -1}"][..],
    ] {
        let out = Command::new(env!("CARGO_BIN_EXE_sd-rbee"))
            .args(args)
            .args(["--nats", "nats://127.0.0.1:1", "--store", "memory://"])
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(matches!(out.status.code(), Some(1 | 2)), "{args:?}: {:?} {stderr}", out.status);
        assert!(!stderr.contains("panicked"), "{args:?}: {stderr}");
    }
}
