//! The queen through real HTTP, with a real nats-server, an S3-compatible server (moto) and `sd-rbee worker`
//! child processes on the tiny SD 1.5 fixture: submit → SSE → completed → fetch, replay for a late
//! subscriber, cancel, idempotency, authentication, validation, two queens at once, a lost worker, and a
//! bounded load test.

use crate::common;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use common::queen::{cli, client, follow, names, start_queen, tiny, wait_for_fleet, wait_state, OTHER_TOKEN, TOKEN};
use common::servers::{NatsServer, S3Server, WorkerProcess};
use sd_rbee::api::{ApiError, QueenClient};
use sd_rbee::queen::http::PriorityPolicy;
use sd_rbee::vocab::Priority;
use uuid::Uuid;

fn api_error(e: anyhow::Error) -> ApiError {
    e.downcast::<ApiError>().expect("an API error")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn submit_follow_fetch_and_replay() {
    let nats = NatsServer::start();
    let s3 = S3Server::start_signed();
    let _worker = WorkerProcess::start("w-q1", &nats.url(), &s3.store_url(), &s3.env(), &[]);
    let queen = start_queen(&nats.url(), &s3.store_url(), &s3.env(), |_| {}).await;
    let c = client(&queen);
    wait_for_fleet(&c).await;

    let accepted = c.submit(&tiny(4, 12), None).await.unwrap();
    assert!(accepted.created);
    assert_eq!(accepted.status_url, format!("/v1/jobs/{}", accepted.job_id));
    let events = follow(&c, accepted.job_id).await;
    let kinds = names(&events);
    assert_eq!(kinds.first(), Some(&"queued"));
    assert_eq!(kinds.get(1), Some(&"started"));
    assert_eq!(kinds.last(), Some(&"completed"));
    let steps: Vec<u64> =
        events.iter().filter(|e| e.event == "progress").map(|e| e.data["step"].as_u64().unwrap()).collect();
    assert_eq!(steps, [1, 2, 3, 4]);
    assert!(kinds.contains(&"preview"), "{kinds:?}");
    assert_eq!(events[1].data["worker_id"], "w-q1");

    // Status: completed, with URLs; the bytes through the queen equal the object in S3.
    let status = wait_state(&c, accepted.job_id, "completed").await;
    assert_eq!(status.status.worker_id.as_deref(), Some("w-q1"));
    let key = &status.status.images[0].key;
    assert_eq!(key, &format!("jobs/{}/0.png", accepted.job_id));
    assert!(status.image_urls[0].contains("X-Amz-Signature="), "{:?}", status.image_urls);
    let through_queen = c.image(accepted.job_id, 0).await.unwrap();
    assert_eq!(Some(through_queen.clone()), s3.get(key));
    assert_eq!(s3.get_url(&status.image_urls[0]).1, through_queen);
    assert_eq!(events.last().unwrap().data["images"][0]["key"], key.as_str());

    // A subscriber who comes after the end gets the whole story, in order.
    let replay = follow(&c, accepted.job_id).await;
    assert_eq!(names(&replay), kinds);

    // Once the events stream no longer holds the job (it keeps a day), the status record ends the replay.
    let bus = sd_rbee::bus::BusClient::connect(&nats.url(), "sd").await.unwrap();
    let events_stream = bus.jetstream().get_stream(bus.subjects().events_stream()).await.unwrap();
    events_stream.purge().filter(bus.subjects().events(accepted.job_id)).await.unwrap();
    let after_expiry = follow(&c, accepted.job_id).await;
    assert_eq!(names(&after_expiry), ["queued", "completed"]);
    assert_eq!(after_expiry[1].data["images"][0]["key"], key.as_str());

    // Metrics (authenticated) count it.
    let metrics =
        reqwest::Client::new().get(format!("{}/metrics", queen.base)).bearer_auth(TOKEN).send().await.unwrap();
    let text = metrics.text().await.unwrap();
    assert!(text.contains("sd_rbee_jobs{state=\"completed\"} 1"), "{text}");
    assert!(text.contains("sd_rbee_workers{state=\"lost\"} 0"), "{text}");

    // Followed live, the response itself ends after the terminal event (as curl sees it), not only the
    // client's reading of it.
    let live = c.submit(&tiny(3, 14), None).await.unwrap();
    let body = tokio::time::timeout(Duration::from_secs(60), async {
        let url = format!("{}/v1/jobs/{}/events", queen.base, live.job_id);
        reqwest::Client::new().get(url).bearer_auth(TOKEN).send().await.unwrap().text().await.unwrap()
    })
    .await
    .expect("the live event stream did not end after the job did");
    assert!(body.trim_end().ends_with("event: completed"), "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_guard_everything_but_health_and_ready() {
    let nats = NatsServer::start();
    let store = tempfile::tempdir().unwrap();
    let queen = start_queen(&nats.url(), &format!("file://{}", store.path().display()), &[], |_| {}).await;
    let http = reqwest::Client::new();
    let job_path = format!("/v1/jobs/{}", Uuid::new_v4());
    for path in ["/v1/jobs", "/v1/workers", "/v1/models", "/v1/limits", "/metrics", job_path.as_str()] {
        let r = http.get(format!("{}{path}", queen.base)).send().await.unwrap();
        assert_eq!(r.status(), 401, "{path} without a token");
        assert_eq!(r.headers()["www-authenticate"], "Bearer");
        let body: serde_json::Value = r.json().await.unwrap();
        assert_eq!(body["error"]["code"], "UNAUTHORIZED");
        let r = http.get(format!("{}{path}", queen.base)).bearer_auth("wrong-token-0123456789").send().await.unwrap();
        assert_eq!(r.status(), 401, "{path} with a wrong token");
    }
    let r = http.post(format!("{}/v1/jobs", queen.base)).json(&tiny(2, 1)).send().await.unwrap();
    assert_eq!(r.status(), 401);
    for token in [TOKEN, OTHER_TOKEN] {
        let r = http.get(format!("{}/v1/workers", queen.base)).bearer_auth(token).send().await.unwrap();
        assert_eq!(r.status(), 200);
    }
    for path in ["/health", "/ready", "/openapi.json"] {
        let r = http.get(format!("{}{path}", queen.base)).send().await.unwrap();
        assert_eq!(r.status(), 200, "{path}");
    }
    let limits: serde_json::Value =
        http.get(format!("{}/v1/limits", queen.base)).bearer_auth(TOKEN).send().await.unwrap().json().await.unwrap();
    assert_eq!((limits["max_steps"].as_u64(), limits["size_multiple"].as_u64()), (Some(150), Some(8)));
    assert!(limits["schedulers"].as_array().unwrap().iter().any(|s| s == "dpmpp_2m_karras"), "{limits}");
    // The web UI is public (it asks for a token itself) and allows nothing from other hosts; what is neither
    // the UI nor the API is the API's JSON 404.
    let page = http.get(format!("{}/", queen.base)).send().await.unwrap();
    assert_eq!(page.status(), 200);
    let csp = page.headers()["content-security-policy"].to_str().unwrap().to_string();
    assert!(csp.contains("default-src 'self'") && csp.contains("connect-src 'self'"), "{csp}");
    assert!(page.text().await.unwrap().contains("<div id=\"root\">"));
    let missing = http.get(format!("{}/v1/nothing-here", queen.base)).bearer_auth(TOKEN).send().await.unwrap();
    assert_eq!(missing.status(), 404);
    assert_eq!(missing.json::<serde_json::Value>().await.unwrap()["error"]["code"], "NOT_FOUND");
    // Request ids: echoed when given, made when not.
    let r = http.get(format!("{}/health", queen.base)).header("x-request-id", "abc-123").send().await.unwrap();
    assert_eq!(r.headers()["x-request-id"], "abc-123");
    let r = http.get(format!("{}/health", queen.base)).send().await.unwrap();
    assert!(Uuid::parse_str(r.headers()["x-request-id"].to_str().unwrap()).is_ok());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_validation_error_names_its_field() {
    let nats = NatsServer::start();
    let store = tempfile::tempdir().unwrap();
    let store_url = format!("file://{}", store.path().display());
    let _worker = WorkerProcess::start("w-val", &nats.url(), &store_url, &[], &[]);
    let queen = start_queen(&nats.url(), &store_url, &[], |c| {
        c.api.max_body_bytes = 256 * 1024;
        c.api.limits.max_inline_image_bytes = 64 * 1024;
    })
    .await;
    let c = client(&queen);
    wait_for_fleet(&c).await;
    let http = reqwest::Client::new();
    let post = |body: serde_json::Value| {
        let http = http.clone();
        let url = format!("{}/v1/jobs", queen.base);
        async move {
            let r = http.post(url).bearer_auth(TOKEN).json(&body).send().await.unwrap();
            let status = r.status().as_u16();
            let body: serde_json::Value = r.json().await.unwrap();
            (
                status,
                body["error"]["code"].as_str().unwrap_or("").to_string(),
                body["error"]["field"].as_str().map(String::from),
            )
        }
    };
    let base = serde_json::json!({"model": "tiny", "prompt": "a cat", "width": 64, "height": 64, "steps": 2});
    let with = |k: &str, v: serde_json::Value| {
        let mut b = base.clone();
        b[k] = v;
        b
    };
    use base64::Engine;
    let b64 = |bytes: &[u8]| base64::engine::general_purpose::STANDARD.encode(bytes);
    let mut png = Vec::new();
    image::RgbImage::new(64, 64).write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png).unwrap();
    let noisy: Vec<u8> = (0..300 * 120 * 3u32).map(|i| (i.wrapping_mul(2654435761) >> 13) as u8).collect();
    let mut big_png = Vec::new();
    image::RgbImage::from_raw(300, 120, noisy)
        .unwrap()
        .write_to(&mut std::io::Cursor::new(&mut big_png), image::ImageFormat::Png)
        .unwrap();
    assert!(big_png.len() > 64 * 1024 && big_png.len() < 150 * 1024);

    let cases: Vec<(serde_json::Value, u16, &str, Option<&str>)> = vec![
        (with("width", 100.into()), 422, "INVALID_REQUEST", Some("width")),
        (with("height", 0.into()), 422, "INVALID_REQUEST", Some("height")),
        (with("width", 8192.into()), 422, "INVALID_REQUEST", Some("width")),
        (with("prompt", "   ".into()), 422, "INVALID_REQUEST", Some("prompt")),
        (with("prompt", "x".repeat(5000).into()), 422, "INVALID_REQUEST", Some("prompt")),
        (with("steps", 0.into()), 422, "INVALID_REQUEST", Some("steps")),
        (with("steps", 1000.into()), 422, "INVALID_REQUEST", Some("steps")),
        (with("guidance", 99.0.into()), 422, "INVALID_REQUEST", Some("guidance")),
        (with("num_images", 50.into()), 422, "INVALID_REQUEST", Some("num_images")),
        (with("scheduler", "plms".into()), 422, "INVALID_REQUEST", Some("scheduler")),
        (with("strength", 0.5.into()), 422, "INVALID_REQUEST", Some("strength")),
        (with("model", "nobody-serves-this".into()), 422, "INVALID_REQUEST", Some("model")),
        (with("model", "a.b".into()), 422, "INVALID_REQUEST", Some("model")),
        (with("quality", 0.into()), 422, "INVALID_REQUEST", Some("output.quality")),
        (with("init_image", "not base64 !!".into()), 422, "INVALID_REQUEST", Some("init_image")),
        (with("init_image", b64(b"GIF89a garbage").into()), 422, "INVALID_REQUEST", Some("init_image")),
        (with("init_image", b64(&big_png).into()), 413, "PAYLOAD_TOO_LARGE", Some("init_image")),
        (
            with("init_image", serde_json::json!({"object_key": "uploads/missing.png"})),
            422,
            "INVALID_REQUEST",
            Some("init_image"),
        ),
        (with("mask", b64(&png).into()), 422, "INVALID_REQUEST", Some("mask")),
        (with("unknown_knob", 1.into()), 422, "INVALID_REQUEST", Some("unknown_knob")),
        (with("width", "wide".into()), 422, "INVALID_REQUEST", Some("width")),
        (serde_json::json!({"prompt": "no model"}), 422, "INVALID_REQUEST", None),
    ];
    for (body, status, code, field) in cases {
        let got = post(body.clone()).await;
        assert_eq!(
            (got.0, got.1.as_str(), got.2.as_deref()),
            (status, code, field),
            "{}",
            &body.to_string()[..body.to_string().len().min(200)]
        );
    }
    // Not JSON, the wrong media type, a body over the limit.
    let r = http
        .post(format!("{}/v1/jobs", queen.base))
        .bearer_auth(TOKEN)
        .header("content-type", "application/json")
        .body("{oops")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let r = http
        .post(format!("{}/v1/jobs", queen.base))
        .bearer_auth(TOKEN)
        .header("content-type", "text/plain")
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 415);
    let huge = with("prompt", "y".repeat(300 * 1024).into());
    let r = http.post(format!("{}/v1/jobs", queen.base)).bearer_auth(TOKEN).json(&huge).send().await.unwrap();
    assert_eq!(r.status(), 413);
    // Nothing invalid reached the queue.
    assert_eq!(c.jobs("").await.unwrap().total, 0);

    // A valid img2img through an upload reference.
    let r = http.post(format!("{}/v1/uploads", queen.base)).bearer_auth(TOKEN).body(png.clone()).send().await.unwrap();
    assert_eq!(r.status(), 201);
    let upload: serde_json::Value = r.json().await.unwrap();
    let key = upload["object_key"].as_str().unwrap();
    let (status, ..) = post(with("init_image", serde_json::json!({"object_key": key}))).await;
    assert_eq!(status, 202);
    // The Rust client has both too.
    let uploaded = c.upload(png.clone(), "image/png").await.unwrap();
    assert!(uploaded.object_key.starts_with("uploads/") && uploaded.bytes == png.len(), "{uploaded:?}");
    assert_eq!(c.limits().await.unwrap().size_multiple, 8);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_running_and_queued_jobs_and_idempotency_keys() {
    let nats = NatsServer::start();
    let store = tempfile::tempdir().unwrap();
    let store_url = format!("file://{}", store.path().display());
    let _worker = WorkerProcess::start("w-cx", &nats.url(), &store_url, &[], &["--step-delay", "200ms"]);
    // The other token is a batch client's: low unless it asks, never high.
    let batch = PriorityPolicy { default: Priority::Low, max: Priority::Normal };
    let queen = start_queen(&nats.url(), &store_url, &[], |c| {
        c.api.token_priorities.insert(OTHER_TOKEN.into(), batch);
    })
    .await;
    let c = client(&queen);
    wait_for_fleet(&c).await;

    let running = c.submit(&tiny(40, 1), None).await.unwrap();
    let queued = c.submit(&tiny(40, 2), None).await.unwrap();
    // Wait until the first one runs; the second waits behind it.
    let start = Instant::now();
    while c.status(running.job_id).await.unwrap().status.state.name() != "running" {
        assert!(start.elapsed() < Duration::from_secs(20));
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let q = c.status(queued.job_id).await.unwrap();
    assert_eq!(q.status.state.name(), "queued");
    assert_eq!(q.queue_position, Some(0), "nothing waits ahead of it (the running job is not waiting)");
    // Callers asking at once for jobs all along a queue share one walk of it, and each job gets its place.
    let mut behind = Vec::new();
    for seed in 0..12 {
        behind.push(c.submit(&tiny(40, 100 + seed), None).await.unwrap().job_id);
    }
    let asked = std::iter::once(queued.job_id).chain(behind.iter().rev().copied()).map(|id| {
        let c = &c;
        async move { c.status(id).await.unwrap().queue_position }
    });
    let mut places = futures::future::join_all(asked).await;
    places[1..].reverse();
    assert_eq!(places, (0..=12).map(Some).collect::<Vec<_>>());
    for id in behind {
        assert_eq!(c.cancel(id).await.unwrap().state, "cancelled");
    }

    // Priorities: a high job goes ahead of the queued normal one, a low one behind both.
    let at = |priority| {
        let mut job = tiny(40, 4);
        job.priority = Some(priority);
        job
    };
    let high = c.submit(&at(Priority::High), None).await.unwrap();
    let low = c.submit(&at(Priority::Low), None).await.unwrap();
    let position = |id| {
        let c = &c;
        async move { c.status(id).await.unwrap().queue_position }
    };
    assert_eq!(position(high.job_id).await, Some(0), "nothing of higher priority waits");
    assert_eq!(position(queued.job_id).await, Some(1), "the high job is taken first");
    assert_eq!(position(low.job_id).await, Some(2));
    let status = c.status(low.job_id).await.unwrap().status;
    assert_eq!(status.priority, Priority::Low);
    for id in [high.job_id, low.job_id] {
        assert_eq!(c.cancel(id).await.unwrap().state, "cancelled");
    }

    let r = c.cancel(queued.job_id).await.unwrap();
    assert_eq!(r.state, "cancelled", "a queued job is removed at once");
    let r = c.cancel(running.job_id).await.unwrap();
    assert_eq!(r.state, "cancelling");
    let events = follow(&c, running.job_id).await;
    assert_eq!(events.last().unwrap().event, "cancelled");
    let events = follow(&c, queued.job_id).await;
    assert_eq!(names(&events), ["queued", "cancelled"], "the queued job never started");
    let err = api_error(c.cancel(running.job_id).await.unwrap_err());
    assert_eq!((err.status, err.code.as_str()), (409, "ALREADY_FINISHED"));
    let err = api_error(c.status(Uuid::new_v4()).await.unwrap_err());
    assert_eq!(err.status, 404);

    // The same idempotency key maps a retry to the same job; another caller's key does not collide.
    let first = c.submit(&tiny(2, 3), Some("order-42")).await.unwrap();
    let again = c.submit(&tiny(2, 3), Some("order-42")).await.unwrap();
    assert!(first.created && !again.created);
    assert_eq!(first.job_id, again.job_id);
    let other = QueenClient::new(&queen.base, Some(OTHER_TOKEN.into())).unwrap();
    let theirs = other.submit(&tiny(2, 3), Some("order-42")).await.unwrap();
    assert_ne!(theirs.job_id, first.job_id);
    assert_eq!(other.status(theirs.job_id).await.unwrap().status.priority, Priority::Low, "the token's default");
    let mut urgent = tiny(2, 5);
    urgent.priority = Some(Priority::High);
    let err = api_error(other.submit(&urgent, None).await.unwrap_err());
    assert_eq!((err.status, err.code.as_str(), err.field.as_deref()), (422, "INVALID_REQUEST", Some("priority")));
    assert!(err.message.contains("at most normal"), "{}", err.message);
    follow(&c, first.job_id).await;
    wait_state(&c, first.job_id, "completed").await;
    let list = c.jobs("?state=completed").await.unwrap();
    assert_eq!(list.jobs.iter().filter(|j| j.job_id == first.job_id).count(), 1);
    let all = c.jobs("?limit=2").await.unwrap();
    assert_eq!(all.total, 18, "the running, queued, 12 behind it, high, low, first and theirs");
    assert_eq!(all.jobs.len(), 2);
    assert_eq!(all.next_offset, Some(2));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_queens_give_the_same_answers_and_a_killed_worker_shows_as_lost() {
    let nats = NatsServer::start();
    let store = tempfile::tempdir().unwrap();
    let store_url = format!("file://{}", store.path().display());
    let flags = ["--step-delay", "150ms", "--ack-wait", "30s"];
    let mut worker = WorkerProcess::start("w-lost", &nats.url(), &store_url, &[], &flags);
    let a = start_queen(&nats.url(), &store_url, &[], |_| {}).await;
    let b = start_queen(&nats.url(), &store_url, &[], |_| {}).await;
    let (ca, cb) = (client(&a), client(&b));
    wait_for_fleet(&ca).await;
    wait_for_fleet(&cb).await;

    let done = ca.submit(&tiny(3, 7), None).await.unwrap();
    let via_b = follow(&cb, done.job_id).await;
    assert_eq!(via_b.last().unwrap().event, "completed");
    let start = Instant::now();
    loop {
        let (sa, sb) = (ca.status(done.job_id).await.unwrap(), cb.status(done.job_id).await.unwrap());
        if sa.status.state.name() == "completed" && sb.status.state.name() == "completed" {
            assert_eq!(sa.status, sb.status);
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(10));
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(ca.jobs("").await.unwrap().jobs, cb.jobs("").await.unwrap().jobs);

    // Kill the worker mid-job: both queens show it lost and the job waiting for redelivery.
    let held = ca.submit(&tiny(40, 8), None).await.unwrap();
    let start = Instant::now();
    while ca.status(held.job_id).await.unwrap().status.progress.is_none() {
        assert!(start.elapsed() < Duration::from_secs(20));
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    worker.kill();
    let start = Instant::now();
    for c in [&ca, &cb] {
        loop {
            let workers = c.workers().await.unwrap();
            let w = workers.iter().find(|w| w.heartbeat.worker_id == "w-lost").cloned().unwrap();
            if w.lost {
                break;
            }
            assert!(start.elapsed() < Duration::from_secs(15), "{w:?}");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        let s = c.status(held.job_id).await.unwrap();
        assert_eq!(s.status.state.name(), "running");
        assert!(s.waiting_for_redelivery, "{s:?}");
    }
}

/// The server comes back with an empty store (its volume lost): the queen creates the streams and its status
/// bucket again, the worker its consumer, and new jobs go through, with neither restarted. Submissions made
/// while that happens may be refused with 503 (and nothing published); a client retries them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_the_server_lost_its_store_new_jobs_go_through() {
    let mut nats = NatsServer::start();
    let store = tempfile::tempdir().unwrap();
    let store_url = format!("file://{}", store.path().display());
    let _worker = WorkerProcess::start("w-q-empty", &nats.url(), &store_url, &[], &[]);
    let queen = start_queen(&nats.url(), &store_url, &[], |_| {}).await;
    let c = client(&queen);
    wait_for_fleet(&c).await;
    let first = c.submit(&tiny(2, 1), None).await.unwrap();
    wait_state(&c, first.job_id, "completed").await;

    // Only the status bucket deleted: the next submission creates it again, and nothing is refused.
    let js = async_nats::jetstream::new(async_nats::connect(nats.url()).await.unwrap());
    js.delete_key_value(sd_rbee::protocol::Subjects::new("sd").unwrap().status_bucket()).await.unwrap();
    let after_bucket = c.submit(&tiny(2, 4), Some("after-the-bucket")).await.unwrap();
    wait_state(&c, after_bucket.job_id, "completed").await;

    nats.restart_empty();
    let start = Instant::now();
    let second = loop {
        match c.submit(&tiny(2, 2), None).await {
            Ok(accepted) => break accepted,
            Err(e) => {
                let e = api_error(e);
                assert_eq!(e.status, 503, "a refusal while NATS recovers is 503: {e:?}");
                assert!(start.elapsed() < Duration::from_secs(20), "the queen never recovered");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    };

    let status = wait_state(&c, second.job_id, "completed").await;

    assert!(store.path().join(&status.status.images[0].key).is_file());
    let events = follow(&c, second.job_id).await;
    assert_eq!(names(&events).last(), Some(&"completed"));
}

/// A queued job is taken out of the queue, then its `cancelled` event cannot be stored (the events stream
/// refuses new messages for longer than the queen waits): the job is still reported cancelled, at once in its
/// record and on its event stream once that takes messages again, never left `queued` for ever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_queued_job_cancelled_while_events_are_refused_still_ends_cancelled() {
    use async_nats::jetstream::stream::DiscardPolicy;
    let nats = NatsServer::start();
    let store = tempfile::tempdir().unwrap();
    let store_url = format!("file://{}", store.path().display());
    // No worker (the model is in the catalogue): the job stays queued. Live feeds read the record often.
    let recheck = Duration::from_millis(400);
    let queen = start_queen(&nats.url(), &store_url, &[], |c| {
        c.api.model_catalogue = vec!["tiny".into()];
        c.feed_recheck = recheck;
    })
    .await;
    let c = client(&queen);
    let job = c.submit(&tiny(2, 1), None).await.unwrap();
    assert_eq!(wait_state(&c, job.job_id, "queued").await.status.state.name(), "queued");
    // A follower of the job from before the cancel: its terminal event cannot reach the bus for now.
    let early = tokio::spawn(collect_feed(client(&queen), job.job_id));
    tokio::time::sleep(Duration::from_millis(300)).await;

    let js = async_nats::jetstream::new(async_nats::connect(nats.url()).await.unwrap());
    let subjects = sd_rbee::protocol::Subjects::new("sd").unwrap();
    let mut events = js.get_stream(subjects.events_stream()).await.unwrap();
    // One message (another job's, unreadable: the aggregator skips it) so the stream can be capped at "full".
    js.publish(subjects.events(Uuid::new_v4()), "filler".into()).await.unwrap().await.unwrap();
    let open = events.info().await.unwrap().config.clone();
    let held = events.info().await.unwrap().state.messages as i64;
    assert!(held > 0);
    let full =
        async_nats::jetstream::stream::Config { max_messages: held, discard: DiscardPolicy::New, ..open.clone() };
    js.update_stream(&full).await.unwrap();

    let r = c.cancel(job.job_id).await.expect("the job left the queue: the cancel is not refused");
    let cancelled = Instant::now();
    assert_eq!(r.state, "cancelled");
    assert_eq!(c.status(job.job_id).await.unwrap().status.state.name(), "cancelled", "the record says so at once");
    assert_eq!(events.info().await.unwrap().state.messages as i64, held, "no event could be stored yet");
    // The follower does not wait for ever on the lost event: its feed ends with the record's ending.
    let (frames, ended) = early.await.unwrap();
    let told: Vec<(&str, &str)> = frames.iter().map(|m| (m.event.as_str(), m.id.as_str())).collect();
    assert_eq!(told, [("queued", "0"), ("cancelled", "end")]);
    let waited = ended.duration_since(cancelled);
    assert!(waited < recheck * 2 + Duration::from_secs(2), "the feed ended {waited:?} after the cancel");
    assert_eq!(events.info().await.unwrap().state.messages as i64, held, "(the event was still not on the bus)");

    js.update_stream(&open).await.unwrap();
    // (SSE alone would not tell: for a record already ended it makes the last frame from the record.)
    let start = Instant::now();
    while events.info().await.unwrap().state.messages as i64 == held {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "the cancelled event is stored once the stream takes messages"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let stored = events.get_last_raw_message_by_subject(&subjects.events(job.job_id)).await.unwrap();
    assert!(matches!(sd_rbee::protocol::decode_event(&stored.payload), Ok(sd_rbee::protocol::Event::Cancelled(_))));
    assert_eq!(names(&follow(&c, job.job_id).await), ["queued", "cancelled"]);

    // A queued job whose record expired (its sweep could not stop it): its follower's feed ends too.
    let job = c.submit(&tiny(2, 2), None).await.unwrap();
    wait_state(&c, job.job_id, "queued").await;
    let late = tokio::spawn(collect_feed(client(&queen), job.job_id));
    tokio::time::sleep(Duration::from_millis(300)).await;
    let status = sd_rbee::queen::status::StatusStore::open(&js, &subjects.status_bucket(), Duration::from_secs(3600))
        .await
        .unwrap();
    let past = sd_rbee::protocol::now_millis() - 1;
    let expire = |s: &mut sd_rbee::api::JobStatus| {
        s.expires_at = Some(past);
        true
    };
    status.update(job.job_id, || unreachable!("the job has a record"), expire).await.unwrap();
    let expired = Instant::now();
    let (frames, ended) = late.await.unwrap();
    assert_eq!(names(&frames), ["queued"], "nothing more is told of an expired job");
    let waited = ended.duration_since(expired);
    assert!(waited < recheck * 2 + Duration::from_secs(2), "the feed ended {waited:?} after the job expired");
    assert_eq!(api_error(c.status(job.job_id).await.unwrap_err()).status, 410);
}

/// Every frame of a job's feed until the queen ends the response (within 30 s), and when it did.
async fn collect_feed(c: QueenClient, id: Uuid) -> (Vec<sd_rbee::api::SseMessage>, Instant) {
    use futures::StreamExt;
    let events = c.events(id, None).await.unwrap();
    let frames = tokio::time::timeout(Duration::from_secs(30), events.map(|m| m.unwrap()).collect::<Vec<_>>())
        .await
        .expect("the feed ended");
    (frames, Instant::now())
}

/// Hundreds of submissions through the HTTP API, several workers: every job completes exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn load_test_hundreds_of_jobs_complete_exactly_once() {
    let jobs: usize = std::env::var("SD_RBEE_LOAD_JOBS").ok().and_then(|v| v.parse().ok()).unwrap_or(300);
    let nats = NatsServer::start();
    let store = tempfile::tempdir().unwrap();
    let store_url = format!("file://{}", store.path().display());
    let quiet = ["--preview-every", "0"];
    let _workers: Vec<WorkerProcess> =
        (0..3).map(|i| WorkerProcess::start(&format!("w-load-{i}"), &nats.url(), &store_url, &[], &quiet)).collect();
    let queen = start_queen(&nats.url(), &store_url, &[], |_| {}).await;
    let c = client(&queen);
    wait_for_fleet(&c).await;

    let started = Instant::now();
    let mut latencies = Vec::with_capacity(jobs);
    let mut ids = Vec::with_capacity(jobs);
    let mut pending = futures::stream::FuturesUnordered::new();
    let mut next = 0;
    use futures::StreamExt;
    while next < jobs || !pending.is_empty() {
        while next < jobs && pending.len() < 16 {
            let c = c.clone();
            let mut job = tiny(1, next as u64);
            job.width = Some(32);
            job.height = Some(32);
            pending.push(async move {
                let t = Instant::now();
                let r = c.submit(&job, None).await;
                (t.elapsed(), r)
            });
            next += 1;
        }
        if let Some((latency, r)) = pending.next().await {
            latencies.push(latency.as_secs_f64() * 1000.0);
            ids.push(r.unwrap().job_id);
        }
    }
    let submitted = started.elapsed();
    // Every job completes, and exactly once: one `completed` in each job's event history.
    let deadline = Instant::now() + Duration::from_secs(240);
    let states: HashMap<Uuid, String> = loop {
        let list = c.jobs("?limit=500").await.unwrap();
        let states: HashMap<Uuid, String> = list.jobs.iter().map(|j| (j.job_id, j.state.name().to_string())).collect();
        if states.values().filter(|s| *s == "completed").count() == jobs {
            break states;
        }
        assert!(
            Instant::now() < deadline,
            "not all jobs completed: {:?}",
            states.values().filter(|s| *s != "completed").count()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let all_done = started.elapsed();
    assert_eq!(states.len(), jobs);
    // Exactly once: one `completed` event per job in the events stream (a second delivery that finished
    // would have published its own).
    let bus = sd_rbee::bus::BusClient::connect(&nats.url(), "sd").await.unwrap();
    let stream = bus.jetstream().get_stream(bus.subjects().events_stream()).await.unwrap();
    let consumer =
        stream.create_consumer(async_nats::jetstream::consumer::pull::OrderedConfig::default()).await.unwrap();
    let stored = consumer.cached_info().num_pending as usize;
    let mut messages = consumer.messages().await.unwrap().take(stored);
    let mut completions: HashMap<Uuid, usize> = HashMap::new();
    while let Some(m) = messages.next().await {
        if let sd_rbee::protocol::Event::Completed(c) = sd_rbee::protocol::decode_event(&m.unwrap().payload).unwrap() {
            *completions.entry(c.job_id).or_default() += 1;
        }
    }
    assert_eq!(completions.len(), jobs);
    assert!(ids.iter().all(|id| completions.get(id) == Some(&1)), "a job completed twice or never");
    latencies.sort_by(f64::total_cmp);
    let pct = |p: f64| latencies[((latencies.len() - 1) as f64 * p).round() as usize];
    println!(
        "load: {jobs} jobs via HTTP (16 in flight), 3 workers: submit latency p50 {:.1} ms p99 {:.1} ms; \
         submitted in {:.2} s ({:.0} submissions/s); all completed in {:.2} s ({:.1} jobs/s)",
        pct(0.5),
        pct(0.99),
        submitted.as_secs_f64(),
        jobs as f64 / submitted.as_secs_f64(),
        all_done.as_secs_f64(),
        jobs as f64 / all_done.as_secs_f64()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_submits_watches_fetches_and_lists_through_the_queen() {
    let nats = NatsServer::start();
    let store = tempfile::tempdir().unwrap();
    let store_url = format!("file://{}", store.path().display());
    let _worker = WorkerProcess::start("w-cli", &nats.url(), &store_url, &[], &[]);
    let queen = start_queen(&nats.url(), &store_url, &[], |_| {}).await;
    wait_for_fleet(&client(&queen)).await;

    let out = cli(
        &[
            "submit",
            "--via",
            &queen.base,
            "--model",
            "tiny",
            "--prompt",
            "a kite",
            "--width",
            "64",
            "--height",
            "64",
            "--steps",
            "3",
            "--seed",
            "9",
            "--idempotency-key",
            "cli-1",
            "--wait",
            "--json",
        ],
        &[],
    )
    .await;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let result: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(result["status"], "completed", "{result}");
    let id = result["job_id"].as_str().unwrap().to_string();
    assert_eq!(result["images"][0]["key"], format!("jobs/{id}/0.png"));
    assert_eq!(result["images"][0]["url"], format!("/v1/jobs/{id}/images/0"));

    let out = cli(&["watch", &id, "--queen", &queen.base, "--json"], &[]).await;
    assert!(out.status.success());
    let lines: Vec<serde_json::Value> =
        String::from_utf8_lossy(&out.stdout).lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(lines.first().unwrap()["event"], "queued");
    assert_eq!(lines.last().unwrap()["event"], "completed");

    let dir = tempfile::tempdir().unwrap();
    let out = cli(&["fetch", &id, "--queen", &queen.base, "-o", dir.path().to_str().unwrap()], &[]).await;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let fetched = std::fs::read(dir.path().join(format!("{id}-0.png"))).unwrap();
    assert_eq!(fetched, std::fs::read(store.path().join(format!("jobs/{id}/0.png"))).unwrap());

    let out = cli(&["jobs", "--queen", &queen.base, "--state", "completed", "--json"], &[]).await;
    let list: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(list["total"], 1);
    let out = cli(&["workers", "--queen", &queen.base], &[]).await;
    assert!(String::from_utf8_lossy(&out.stdout).contains("w-cli"));

    // Without a token the CLI says what went wrong, and fails.
    let out = tokio::task::spawn_blocking({
        let base = queen.base.clone();
        move || {
            std::process::Command::new(env!("CARGO_BIN_EXE_sd-rbee"))
                .args(["jobs", "--queen", &base])
                .env_remove("SD_RBEE_API_TOKEN")
                .output()
                .unwrap()
        }
    })
    .await
    .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("401"), "{}", String::from_utf8_lossy(&out.stderr));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_queen_process_shuts_down_on_sigterm_with_an_event_stream_open() {
    let nats = NatsServer::start();
    let store = tempfile::tempdir().unwrap();
    let store_url = format!("file://{}", store.path().display());
    let _worker = WorkerProcess::start("w-term", &nats.url(), &store_url, &[], &["--step-delay", "300ms"]);
    let port = common::servers::free_port();
    let base = format!("http://127.0.0.1:{port}");
    let mut queen = std::process::Command::new(env!("CARGO_BIN_EXE_sd-rbee"))
        .args(["queen", "--nats", &nats.url(), "--store", &store_url, "--listen", &format!("127.0.0.1:{port}")])
        .env("SD_RBEE_API_TOKENS", format!("{TOKEN},{OTHER_TOKEN}"))
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let c = QueenClient::new(&base, Some(TOKEN.into())).unwrap();
    let start = Instant::now();
    while reqwest::get(format!("{base}/ready")).await.map(|r| r.status() != 200).unwrap_or(true) {
        assert!(start.elapsed() < Duration::from_secs(20), "the queen did not become ready");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    wait_for_fleet(&c).await;
    let job = c.submit(&tiny(40, 3), None).await.unwrap();
    let follower = tokio::spawn({
        let c = c.clone();
        async move { c.follow(job.job_id, |_| {}).await }
    });
    tokio::time::sleep(Duration::from_millis(800)).await;
    unsafe { libc::kill(queen.id() as i32, libc::SIGTERM) };
    let start = Instant::now();
    let status = loop {
        if let Some(status) = queen.try_wait().unwrap() {
            break status;
        }
        assert!(start.elapsed() < Duration::from_secs(10), "the queen did not stop");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(status.success(), "{status}");
    // The open stream ended (before the job did), it was not left hanging.
    let ended = tokio::time::timeout(Duration::from_secs(5), follower).await.expect("the event stream was closed");
    assert!(ended.unwrap().is_err());
}
