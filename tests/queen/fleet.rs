//! The queen in a fleet and under load: two queens at once and a killed worker, a server that lost its store,
//! a queued job cancelled while the events stream refuses messages, and hundreds of jobs through the HTTP
//! API. Same servers and fixture as [`super`].

use super::*;

use std::collections::HashMap;

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

/// A scrape that cannot read the queue depth fails (Prometheus' `up` says so) rather than report an empty
/// queue, which would end the backlog alerts while jobs wait.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_without_nats_fail_the_scrape_rather_than_read_an_empty_queue() {
    let mut nats = NatsServer::start();
    let store = tempfile::tempdir().unwrap();
    let queen = start_queen(&nats.url(), &format!("file://{}", store.path().display()), &[], |_| {}).await;
    let scrape = || reqwest::Client::new().get(format!("{}/metrics", queen.base)).bearer_auth(TOKEN).send();
    let up = scrape().await.unwrap();
    assert_eq!(up.status(), 200);
    assert!(up.text().await.unwrap().contains("sd_rbee_workers"));
    nats.kill();
    let down = tokio::time::timeout(Duration::from_secs(60), scrape()).await.expect("an answer").unwrap();
    assert_eq!(down.status(), 503);
    let body: serde_json::Value = down.json().await.unwrap();
    assert_eq!(body["error"]["code"], "UNAVAILABLE", "{body}");
}
