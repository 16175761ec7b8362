//! The queen through real HTTP, with a real nats-server, an S3-compatible server (moto) and `sd-rbee worker`
//! child processes on the tiny SD 1.5 fixture: submit → SSE → completed → fetch, replay for a late
//! subscriber, cancel, idempotency, authentication, validation, the CLI through the queen and SIGTERM; two
//! queens at once, a lost worker or server store, and a bounded load test are in [`fleet`].

use crate::common;

use std::time::{Duration, Instant};

use common::queen::{cli, client, follow, names, start_queen, tiny, wait_for_fleet, wait_state, OTHER_TOKEN, TOKEN};
use common::servers::{NatsServer, S3Server, WorkerProcess};
use sd_rbee::api::{ApiError, QueenClient};
use sd_rbee::queen::http::{PriorityPolicy, TokenPolicy};
use sd_rbee::vocab::Priority;
use uuid::Uuid;

mod fleet;

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
    assert!(text.contains("sd_rbee_model_workers{model=\"tiny\"} 1"), "{text}");
    assert!(text.contains("sd_rbee_jobs{state=\"queued\"} 1"), "entries into a state, never taken back: {text}");

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
        (with("quality", 0.into()), 422, "INVALID_REQUEST", Some("quality")),
        (with("timeout_s", 0.into()), 422, "INVALID_REQUEST", Some("timeout_s")),
        (with("ttl_s", 0.into()), 422, "INVALID_REQUEST", Some("ttl_s")),
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
        (serde_json::json!({"prompt": "no model"}), 422, "INVALID_REQUEST", Some("model")),
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
    // The media type is JSON's whatever its case, and only JSON's.
    for (content_type, status) in [("Application/JSON; charset=utf-8", 422), ("application/jsonp", 415)] {
        let r = http
            .post(format!("{}/v1/jobs", queen.base))
            .bearer_auth(TOKEN)
            .header("content-type", content_type)
            .body("{}")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), status, "{content_type}");
    }
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
        c.api.token_policies.insert(OTHER_TOKEN.into(), TokenPolicy { priority: batch, ..Default::default() });
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
    // The key sent with another request is a client's mistake, not a retry: 422, naming the key's job.
    let err = api_error(c.submit(&tiny(2, 4), Some("order-42")).await.unwrap_err());
    assert_eq!((err.status, err.field.as_deref()), (422, Some("Idempotency-Key")), "{}", err.message);
    assert!(err.message.contains(&first.job_id.to_string()), "{}", err.message);
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

    // `submit --priority normal` asks for normal, not for the token's default.
    let args = ["submit", "--queen", &queen.base, "--token", OTHER_TOKEN, "-m", "tiny", "-p", "a kite", "--json"];
    for (flags, expected) in [(&["--priority", "normal"][..], Priority::Normal), (&[][..], Priority::Low)] {
        let out = cli(&[&args[..], flags].concat(), &[]).await;
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let accepted: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        let id: Uuid = accepted["job_id"].as_str().unwrap().parse().unwrap();
        assert_eq!(c.status(id).await.unwrap().status.priority, expected, "{flags:?}");
    }
}

/// `watch --json` takes the stream up again after the last event it printed when its queen goes away (a
/// rolling update: another queen on the same address), printing each event once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_json_resumes_on_another_queen_without_repeating_an_event() {
    let nats = NatsServer::start();
    let store = tempfile::tempdir().unwrap();
    let store_url = format!("file://{}", store.path().display());
    let _worker = WorkerProcess::start("w-watch", &nats.url(), &store_url, &[], &["--step-delay", "300ms"]);
    let addr: std::net::SocketAddr = format!("127.0.0.1:{}", common::servers::free_port()).parse().unwrap();
    let first = start_queen(&nats.url(), &store_url, &[], |c| c.listen = addr).await;
    let c = client(&first);
    wait_for_fleet(&c).await;
    let job = c.submit(&tiny(16, 4), None).await.unwrap();
    let base = first.base.clone();
    let watch =
        tokio::spawn(async move { cli(&["watch", &job.job_id.to_string(), "--queen", &base, "--json"], &[]).await });
    let start = Instant::now();
    while c.status(job.job_id).await.unwrap().status.progress.is_none_or(|p| p.step < 3) {
        assert!(start.elapsed() < Duration::from_secs(60), "the job did not start");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    drop(first);
    while std::net::TcpListener::bind(addr).is_err() {
        assert!(start.elapsed() < Duration::from_secs(60), "the first queen still listens");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let second = start_queen(&nats.url(), &store_url, &[], |c| c.listen = addr).await;
    let out = tokio::time::timeout(Duration::from_secs(60), watch).await.expect("watch ends").unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let lines: Vec<serde_json::Value> =
        String::from_utf8_lossy(&out.stdout).lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    let ids: Vec<&str> = lines.iter().map(|l| l["id"].as_str().unwrap()).collect();
    let unique: std::collections::HashSet<&&str> = ids.iter().collect();
    assert_eq!(unique.len(), ids.len(), "an event printed twice: {ids:?}");
    assert_eq!(lines.iter().filter(|l| l["event"] == "completed").count(), 1, "{lines:?}");
    assert_eq!(lines.last().unwrap()["event"], "completed");
    // Nothing lost either: the same events as the whole story told again now that the job has ended.
    let again = cli(&["watch", &job.job_id.to_string(), "--queen", &second.base, "--json"], &[]).await;
    let told: Vec<String> = String::from_utf8_lossy(&again.stdout)
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["id"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(ids, told, "the followed story differs from the stored one");
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
