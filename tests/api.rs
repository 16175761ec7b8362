//! The HTTP contract's promises, through a real queen, nats-server and `sd-rbee worker`: a live event stream
//! ends right after the terminal event (completed, failed, cancelled), every frame has an id and
//! `Last-Event-ID` resumes without losing or repeating one, a model of the catalogue is accepted with no live
//! worker (the job runs when one starts), and a job without a size runs at the model's default size.

use crate::common;

use std::time::{Duration, Instant};

use common::queen::{cli, client, follow, names, start_queen, tiny, wait_state, OTHER_TOKEN, TOKEN};
use common::servers::{NatsServer, WorkerProcess};
use futures::StreamExt;
use sd_rbee::api::{ApiError, ApiErrorCode, JobSubmission, QueenClient, SseMessage};
use uuid::Uuid;

/// Reads the raw event stream of a job as `curl -N` would; returns the body and how long the response
/// stayed open after the chunk holding the terminal event arrived.
async fn read_events(base: &str, job_id: Uuid) -> (String, Duration) {
    let url = format!("{base}/v1/jobs/{job_id}/events");
    let response = reqwest::Client::new().get(url).bearer_auth(TOKEN).send().await.unwrap();
    assert_eq!(response.status(), 200);
    let mut body = response.bytes_stream();
    let (mut text, mut terminal_at) = (String::new(), None);
    let read = async {
        while let Some(chunk) = body.next().await {
            text.push_str(&String::from_utf8_lossy(&chunk.unwrap()));
            let ended = ["event: completed", "event: failed", "event: cancelled"].iter().any(|e| text.contains(e));
            if ended && terminal_at.is_none() {
                terminal_at = Some(Instant::now());
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(60), read).await.expect("the event stream never ended");
    let open_after = terminal_at.expect("no terminal event").elapsed();
    (text, open_after)
}

/// Waits until the job's record says a worker runs it.
async fn wait_running(c: &QueenClient, id: Uuid) {
    let start = Instant::now();
    while c.status(id).await.unwrap().status.state.name() == "queued" {
        assert!(start.elapsed() < Duration::from_secs(30), "job {id} never started");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_live_event_stream_ends_right_after_completed_failed_and_cancelled() {
    let nats = NatsServer::start();
    let store = tempfile::tempdir().unwrap();
    let store_url = format!("file://{}", store.path().display());
    let _worker = WorkerProcess::start("w-sse", &nats.url(), &store_url, &[], &["--step-delay", "250ms"]);
    let queen = start_queen(&nats.url(), &store_url, &[], |_| {}).await;
    let c = client(&queen);
    common::queen::wait_for_fleet(&c).await;

    // Completed: the stream is opened while the job is queued or running.
    let done = c.submit(&tiny(3, 1), None).await.unwrap();
    let (body, open_after) = read_events(&queen.base, done.job_id).await;
    assert!(body.trim_end().ends_with("event: completed"), "{body}");
    assert!(open_after < Duration::from_secs(1), "open {open_after:?} after completed");

    // Failed: its deadline passes while it runs (6 steps of 250 ms, 1 s allowed).
    let mut slow = tiny(6, 2);
    slow.timeout_s = Some(1);
    let failed = c.submit(&slow, None).await.unwrap();
    let (body, open_after) = read_events(&queen.base, failed.job_id).await;
    assert!(body.trim_end().ends_with("event: failed"), "{body}");
    assert!(body.contains("\"code\":\"TIMEOUT\""), "{body}");
    assert!(body.contains("event: progress"), "it failed while running: {body}");
    assert!(open_after < Duration::from_secs(1), "open {open_after:?} after failed");

    // Cancelled while running.
    let running = c.submit(&tiny(8, 3), None).await.unwrap();
    let reader = tokio::spawn({
        let base = queen.base.clone();
        async move { read_events(&base, running.job_id).await }
    });
    wait_running(&c, running.job_id).await;
    c.cancel(running.job_id).await.unwrap();
    let (body, open_after) = reader.await.unwrap();
    assert!(body.trim_end().ends_with("event: cancelled"), "{body}");
    assert!(open_after < Duration::from_secs(1), "open {open_after:?} after cancelled");

    // Every frame has an id, and the ids grow.
    let ids: Vec<&str> = body.lines().filter_map(|l| l.strip_prefix("id: ")).collect();
    assert_eq!(ids.len(), body.matches("event: ").count(), "{body}");
    let parsed: Vec<sd_rbee::api::EventId> = ids.iter().map(|i| i.parse().unwrap()).collect();
    assert!(parsed.windows(2).all(|w| w[0] < w[1]), "{ids:?}");
}

/// The frames of a job's stream from `last_event_id` on, read until `stop` says enough (or the end).
async fn frames(
    c: &QueenClient,
    id: Uuid,
    last_event_id: Option<&str>,
    mut stop: impl FnMut(&[SseMessage]) -> bool,
) -> Vec<SseMessage> {
    let stream = c.events(id, last_event_id).await.unwrap();
    tokio::pin!(stream);
    let mut seen = Vec::new();
    let read = async {
        while let Some(frame) = stream.next().await {
            seen.push(frame.unwrap());
            if stop(&seen) {
                break;
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(60), read).await.expect("the stream stalled");
    seen
}

fn ids(frames: &[SseMessage]) -> Vec<&str> {
    frames.iter().map(|f| f.id.as_str()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn last_event_id_resumes_without_losing_or_repeating_an_event() {
    let nats = NatsServer::start();
    let store = tempfile::tempdir().unwrap();
    let store_url = format!("file://{}", store.path().display());
    let flags = ["--step-delay", "200ms", "--preview-every", "1"];
    let _worker = WorkerProcess::start("w-resume", &nats.url(), &store_url, &[], &flags);
    let queen = start_queen(&nats.url(), &store_url, &[], |_| {}).await;
    let c = client(&queen);
    common::queen::wait_for_fleet(&c).await;

    let job = c.submit(&tiny(6, 5), None).await.unwrap();
    // A client drops after its second progress event, then comes back with the last id it saw.
    let progress = |seen: &[SseMessage]| seen.iter().filter(|f| f.event == "progress").count() >= 2;
    let first = frames(&c, job.job_id, None, progress).await;
    let last_id = first.last().unwrap().id.clone();
    let rest = frames(&c, job.job_id, Some(&last_id), |seen| seen.last().unwrap().is_terminal()).await;
    assert_eq!(rest.last().unwrap().event, "completed", "{:?}", names(&rest));

    // Together they are the whole story, in order: what a follower from the start sees.
    let whole = follow(&c, job.job_id).await;
    let mut joined = ids(&first);
    joined.extend(ids(&rest));
    assert_eq!(joined, ids(&whole), "lost or repeated events");
    let mut joined_names = names(&first);
    joined_names.extend(names(&rest));
    assert_eq!(joined_names, names(&whole));
    assert_eq!(first.last().unwrap().event, "progress");
    assert_eq!(rest[0].event, "preview", "the preview of the same step comes right after: {:?}", ids(&rest));
    assert_eq!(rest[0].id, format!("{last_id}.1"));

    // From a finished job: resuming anywhere gives what came after; after the last event, nothing.
    for (i, frame) in whole.iter().enumerate() {
        let after = frames(&c, job.job_id, Some(&frame.id), |_| false).await;
        assert_eq!(ids(&after), ids(&whole[i + 1..]), "after {}", frame.id);
    }
    // The query parameter does the same (for clients that cannot set headers).
    let url = format!("{}/v1/jobs/{}/events?last_event_id={}", queen.base, job.job_id, whole[2].id);
    let text = reqwest::Client::new().get(url).bearer_auth(TOKEN).send().await.unwrap().text().await.unwrap();
    assert!(!text.contains("event: queued") && text.contains("event: completed"), "{text}");
    // An id that is not one of ours is refused, naming the header.
    let err = c.events(job.job_id, Some("yesterday")).await.err().unwrap().downcast::<ApiError>().unwrap();
    assert_eq!(
        (err.status, err.code, err.field.as_deref()),
        (400, ApiErrorCode::MalformedRequest, Some("Last-Event-ID"))
    );
    // ... and the query parameter when it was that.
    let url = format!("{}/v1/jobs/{}/events?last_event_id=yesterday", queen.base, job.job_id);
    let answer = reqwest::Client::new().get(url).bearer_auth(TOKEN).send().await.unwrap();
    assert_eq!(answer.status(), 400);
    let body: serde_json::Value = answer.json().await.unwrap();
    assert_eq!(body["error"]["field"], "last_event_id", "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_catalogued_model_is_accepted_with_no_worker_and_runs_when_one_starts() {
    let nats = NatsServer::start();
    let store = tempfile::tempdir().unwrap();
    let store_url = format!("file://{}", store.path().display());
    let queen = start_queen(&nats.url(), &store_url, &[], |c| c.api.model_catalogue = vec!["tiny".into()]).await;
    let c = client(&queen);

    // No worker at all: the job is queued, and says what it waits for.
    let job = c.submit(&tiny(2, 9), None).await.unwrap();
    assert!(job.created);
    // (Once the queen has listened long enough to have heard every live worker: 3 s here.)
    let start = Instant::now();
    let status = loop {
        let status = c.status(job.job_id).await.unwrap();
        if status.waiting_for_worker || start.elapsed() > Duration::from_secs(10) {
            break status;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(status.status.state.name(), "queued");
    assert!(status.waiting_for_worker, "{status:?}");
    let models = c.models().await.unwrap();
    let tiny_model = models.iter().find(|m| m.name == "tiny").expect("the catalogue lists it");
    assert_eq!(tiny_model.workers, 0);
    assert_eq!(tiny_model.queued, Some(1), "counted on its subject before any worker made the consumer");
    // A model in no catalogue is still refused.
    let err = c.submit(&JobSubmission::new("nobody-serves-this", "x"), None).await.unwrap_err();
    let err = err.downcast::<ApiError>().unwrap();
    assert_eq!((err.status, err.field.as_deref()), (422, Some("model")));
    assert!(err.message.contains("--model-catalogue"), "{}", err.message);

    // A worker starts (as a scaler would start one on queue depth): the job completes.
    let _worker = WorkerProcess::start("w-late", &nats.url(), &store_url, &[], &[]);
    let events = follow(&c, job.job_id).await;
    assert_eq!(names(&events).last(), Some(&"completed"), "{:?}", names(&events));
    let done = wait_state(&c, job.job_id, "completed").await;
    assert!(!done.waiting_for_worker);
    let models = c.models().await.unwrap();
    assert_eq!(models.iter().find(|m| m.name == "tiny").unwrap().queued, Some(0), "read from the consumer");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_without_a_size_runs_at_the_models_default_size() {
    let nats = NatsServer::start();
    let store = tempfile::tempdir().unwrap();
    let store_url = format!("file://{}", store.path().display());
    let xl = format!("xl={}", common::fixture("tiny-sdxl").display());
    let _worker = WorkerProcess::start("w-size", &nats.url(), &store_url, &[], &["--model", &xl]);
    let queen = start_queen(&nats.url(), &store_url, &[], |_| {}).await;
    let c = client(&queen);
    common::queen::wait_for_fleet(&c).await;
    // What the model's own config gives (`sd-rbee generate` without --width/--height): its UNet's sample size
    // times the VAE's scale; tiny-sdxl's is 8 × 8 = 64, where a fixed 512 would be wrong.
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(common::fixture("tiny-sdxl/unet/config.json")).unwrap()).unwrap();
    let native = config["sample_size"].as_u64().unwrap() as u32 * 8;

    // Through the queen.
    let mut sub = JobSubmission::new("xl", "a kite");
    sub.steps = Some(2);
    let job = c.submit(&sub, None).await.unwrap();
    let events = follow(&c, job.job_id).await;
    assert_eq!(names(&events).last(), Some(&"completed"), "{events:?}");
    let status = wait_state(&c, job.job_id, "completed").await;
    let image = &status.status.images[0];
    assert_eq!((image.width, image.height), (native, native));
    assert_eq!(status.status.request.as_ref().unwrap().width, None, "the record does not invent a size");

    // Straight on the bus.
    let bus = sd_rbee::bus::BusClient::connect(&nats.url(), "sd").await.unwrap();
    let mut job = sd_rbee::protocol::JobRequest::new(sd_rbee::protocol::JobKind::Txt2Img, "xl", "a kite");
    job.steps = Some(2);
    bus.submit(&job).await.unwrap();
    let last = bus.wait(job.id, Duration::from_secs(60), |_| {}).await.unwrap();
    let sd_rbee::protocol::Event::Completed(done) = last else { panic!("{last:?}") };
    assert_eq!((done.images[0].width, done.images[0].height), (native, native));

    // An img2img job without a size takes its init image's, which the limits must allow: a 4160-pixel-wide
    // picture (a small PNG) is refused naming the image, before anything is loaded or converted.
    let mut png = Vec::new();
    image::RgbImage::new(4160, 16).write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png).unwrap();
    let mut wide = sd_rbee::protocol::JobRequest::new(sd_rbee::protocol::JobKind::Img2Img, "xl", "a kite");
    wide.init_image = Some(sd_rbee::protocol::ImageSource::Inline(png));
    bus.submit(&wide).await.unwrap();
    let last = bus.wait(wide.id, Duration::from_secs(60), |_| {}).await.unwrap();
    let sd_rbee::protocol::Event::Failed(failed) = last else { panic!("{last:?}") };
    assert_eq!(
        (failed.code, failed.field.as_deref()),
        (sd_rbee::protocol::ErrorCode::InvalidRequest, Some("init_image"))
    );
    assert!(failed.message.contains("4160×16"), "{}", failed.message);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_clients_name_their_path_say_what_they_wait_for_and_read_results_without_the_queen() {
    let nats = NatsServer::start();
    let store = tempfile::tempdir().unwrap();
    let store_url = format!("file://{}", store.path().display());
    let mut worker = WorkerProcess::start("w-cli", &nats.url(), &store_url, &[], &[]);
    let queen = start_queen(&nats.url(), &store_url, &[], |_| {}).await;
    let c = client(&queen);
    common::queen::wait_for_fleet(&c).await;
    let nowhere = [("SD_RBEE_QUEEN_URL", "http://127.0.0.1:9")];

    // An explicit --nats wins over SD_RBEE_QUEEN_URL and says so; waiting on a model no worker serves ends
    // with that reason.
    let url = nats.url();
    let out = cli(&["submit", "--nats", &url, "-m", "ghost", "-p", "x", "--wait", "--timeout", "3s"], &nowhere).await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(stderr.contains(&format!("publishing on the bus at {url} (--nats)")), "{stderr}");
    assert!(stderr.contains("did not finish within 3s"), "{stderr}");
    assert!(stderr.contains("no live worker serving model ghost"), "{stderr}");

    // A bus job whose prompt is over 77 tokens: its warning reaches the submitter, the events and the status,
    // and the queen lists the job with its model.
    let long = "a red kite over green hills ".repeat(20);
    let flags = ["--width", "64", "--height", "64", "--steps", "2", "--wait", "--json"];
    let mut args = vec!["submit", "--nats", &url, "-m", "tiny", "-p", &long];
    args.extend(flags);
    let out = cli(&args, &[]).await;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let result: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(result["warnings"][0].as_str().unwrap().contains("dropped"), "{result}");
    let id: Uuid = result["job_id"].as_str().unwrap().parse().unwrap();
    let status = wait_state(&c, id, "completed").await;
    assert_eq!(status.status.model, "tiny", "a job published on the bus is listed with its model");
    assert!(status.status.warnings[0].contains("77 tokens"), "{:?}", status.status.warnings);
    let events = follow(&c, id).await;
    assert!(events.last().unwrap().data["warnings"][0].as_str().unwrap().contains("dropped"), "{events:?}");
    let out = cli(&["jobs", "--queen", &queen.base], &[]).await;
    let listed = String::from_utf8_lossy(&out.stdout);
    assert!(listed.lines().any(|l| l.starts_with(&id.to_string()) && l.contains(" tiny ")), "{listed}");

    // fetch --store reads the results from the store alone (the queen is not asked, nor reachable).
    let dir = tempfile::tempdir().unwrap();
    let (id_text, out_dir) = (id.to_string(), dir.path().to_str().unwrap().to_string());
    let out = cli(&["fetch", &id_text, "--store", &store_url, "-o", &out_dir], &nowhere).await;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(dir.path().join(format!("{id}-0.png")).is_file());

    // A worker that stops cleanly is listed as stopped, not lost.
    worker.terminate();
    let exit = worker.wait(Duration::from_secs(30));
    let start = Instant::now();
    loop {
        let workers = c.workers().await.unwrap();
        let w = workers.iter().find(|w| w.heartbeat.worker_id == "w-cli").unwrap();
        if w.stopped {
            assert!(!w.lost);
            assert_eq!(w.liveness(), "stopped");
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(10), "{w:?}\n{exit:?}\n{}", worker.log_text());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let out = cli(&["workers", "--queen", &queen.base], &[]).await;
    assert!(String::from_utf8_lossy(&out.stdout).contains("w-cli stopped"), "{}", String::from_utf8_lossy(&out.stdout));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_job_list_pages_newest_first_by_offset_or_cursor() {
    let nats = NatsServer::start();
    let store = tempfile::tempdir().unwrap();
    let store_url = format!("file://{}", store.path().display());
    let queen =
        start_queen(&nats.url(), &store_url, &[], |c| c.api.model_catalogue = vec!["tiny".into(), "other".into()])
            .await;
    let c = client(&queen);
    // Seven jobs, no worker: they stay queued. Four of tiny, three of other, interleaved.
    let mut submitted = Vec::new();
    for i in 0..7u64 {
        let mut job = tiny(2, i);
        if i % 2 == 1 {
            job.model = "other".into();
        }
        submitted.push((c.submit(&job, None).await.unwrap().job_id, job.model));
    }
    let newest_first: Vec<Uuid> = submitted.iter().rev().map(|(id, _)| *id).collect();
    let ids = |list: &sd_rbee::api::JobList| list.jobs.iter().map(|j| j.job_id).collect::<Vec<_>>();

    let first = c.jobs("?limit=3").await.unwrap();
    assert_eq!(ids(&first), newest_first[..3]);
    assert_eq!((first.total, first.total_exact, first.next_offset), (7, true, Some(3)));
    let second = c.jobs("?limit=3&offset=3").await.unwrap();
    assert_eq!(ids(&second), newest_first[3..6]);

    // Following next_cursor reads every job once, in order.
    let (mut seen, mut cursor) = (Vec::new(), None::<u64>);
    loop {
        let query = cursor.map_or("?limit=2".to_string(), |c| format!("?limit=2&cursor={c}"));
        let page = c.jobs(&query).await.unwrap();
        seen.extend(ids(&page));
        match page.next_cursor {
            Some(next) => cursor = Some(next),
            None => break,
        }
        assert!(seen.len() <= 7, "{seen:?}");
    }
    assert_eq!(seen, newest_first);
    // A full page that ends the list points nowhere further (not to an empty page).
    let six = c.jobs("?limit=6").await.unwrap();
    let last = c.jobs(&format!("?limit=1&cursor={}", six.next_cursor.unwrap())).await.unwrap();
    assert_eq!(ids(&last), newest_first[6..]);
    assert_eq!((last.next_cursor, last.next_offset), (None, None));

    // Filters count what matches, exactly while the whole list is looked through.
    let others = c.jobs("?model=other").await.unwrap();
    let want: Vec<Uuid> = submitted.iter().rev().filter(|(_, m)| m == "other").map(|(id, _)| *id).collect();
    assert_eq!((ids(&others), others.total, others.total_exact), (want, 3, true));
    let queued = c.jobs("?state=queued&limit=2").await.unwrap();
    assert_eq!((queued.total, queued.next_offset), (7, Some(2)));
    assert_eq!(c.jobs("?state=completed").await.unwrap().total, 0);

    // 2100 newer index sequences that show no job: entries of jobs without a record, and the holes removed
    // entries leave (each would cost the request a read). One request looks through 2000 sequences at most:
    // it answers short, with the cursor that goes on.
    let js = async_nats::jetstream::new(async_nats::connect(nats.url()).await.unwrap());
    let subjects = sd_rbee::protocol::Subjects::new("sd").unwrap();
    let mut acks = Vec::new();
    for _ in 0..2100 {
        acks.push(js.publish(subjects.index(), Uuid::new_v4().to_string().into()).await.unwrap());
    }
    let mut seqs = Vec::new();
    for ack in acks {
        seqs.push(ack.await.unwrap().sequence);
    }
    let index = js.get_stream(subjects.index_stream()).await.unwrap();
    for seq in seqs.iter().step_by(2) {
        index.delete_message(*seq).await.unwrap();
    }
    let started = std::time::Instant::now();
    let page = c.jobs("?state=queued&limit=5").await.unwrap();
    assert!(started.elapsed() < Duration::from_secs(10), "{:?}", started.elapsed());
    assert_eq!((page.jobs.len(), page.total, page.total_exact, page.next_offset), (0, 0, false, None));
    let cursor = page.next_cursor.expect("a short page says where to go on");
    let on = c.jobs(&format!("?state=queued&limit=5&cursor={cursor}")).await.unwrap();
    assert_eq!(ids(&on), newest_first[..5], "the walk goes on to the jobs");
    assert_eq!((on.total, on.total_exact, on.next_offset), (7, false, Some(5)));
    let unfiltered = c.jobs("?limit=3").await.unwrap();
    assert_eq!((unfiltered.jobs.len(), unfiltered.total, unfiltered.next_offset), (0, 7 + 1050, None));
    assert!(unfiltered.next_cursor.is_some());
}

/// SSE reads the events stream, which is ahead of the status record the queen folds from it: a client that
/// fetches an image the moment it reads `completed` must get it, though the record may still say running.
/// Here no worker runs; the job's images and manifest are stored as a worker stores them before publishing
/// `completed`, and the record stays `queued`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_image_is_served_once_stored_even_before_the_status_record_says_completed() {
    use sd_rbee::protocol::{self, Completed, Event, ImageResult, Timings, PROTOCOL_VERSION};
    let nats = NatsServer::start();
    let store = tempfile::tempdir().unwrap();
    let store_url = format!("file://{}", store.path().display());
    let queen = start_queen(&nats.url(), &store_url, &[], |c| c.api.model_catalogue = vec!["tiny".into()]).await;
    let c = client(&queen);
    let job = c.submit(&tiny(2, 9), None).await.unwrap();
    let err = c.image(job.job_id, 0).await.unwrap_err().downcast::<ApiError>().unwrap();
    assert_eq!(err.code, ApiErrorCode::NotCompleted, "nothing stored yet");

    let key = format!("jobs/{}/0.png", job.job_id);
    let png = b"\x89PNG\r\n\x1a\n not really".to_vec();
    let image = ImageResult {
        index: 0,
        key: key.clone(),
        url: None,
        width: 64,
        height: 64,
        seed: 9,
        bytes: png.len() as u64,
        content_type: "image/png".into(),
    };
    let completed = Completed {
        cached: false,
        v: PROTOCOL_VERSION,
        job_id: job.job_id,
        at: protocol::now_millis(),
        images: vec![image],
        timings: Timings::default(),
        warnings: Vec::new(),
    };
    let write = |key: &str, bytes: &[u8]| {
        let path = store.path().join(key);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, bytes).unwrap();
    };
    write(&key, &png);
    write(&protocol::manifest_key(job.job_id), &protocol::encode(&Event::Completed(completed)));
    assert_eq!(c.status(job.job_id).await.unwrap().status.state.name(), "queued");
    assert_eq!(c.image(job.job_id, 0).await.unwrap(), png);
    let err = c.image(job.job_id, 1).await.unwrap_err().downcast::<ApiError>().unwrap();
    assert_eq!(err.code, ApiErrorCode::NotFound, "the manifest lists one image");
}

/// Each open event stream holds a consumer in NATS: one token holds at most `--max-streams-per-caller` of
/// them (and of OpenAI or A1111 requests waiting for their jobs); one more is `429 TOO_MANY_STREAMS`, before
/// anything is submitted, and a stream that closes frees its place.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_holds_at_most_its_share_of_event_streams() {
    let nats = NatsServer::start();
    let store = tempfile::tempdir().unwrap();
    let store_url = format!("file://{}", store.path().display());
    let queen = start_queen(&nats.url(), &store_url, &[], |c| {
        c.api.model_catalogue = vec!["tiny".into()];
        c.api.max_streams_per_caller = 2;
    })
    .await;
    let c = client(&queen);
    let id = c.submit(&tiny(2, 1), None).await.unwrap().job_id;
    let first = c.events(id, None).await.unwrap();
    let second = c.events(id, None).await.unwrap();
    let refused = c.events(id, None).await.err().expect("a third stream of the same token");
    let refused = refused.downcast::<ApiError>().expect("an API error");
    assert_eq!((refused.status, refused.code.as_str()), (429, "TOO_MANY_STREAMS"), "{}", refused.message);
    assert!(refused.message.contains("--max-streams-per-caller 2"), "{}", refused.message);
    let raw = reqwest::Client::new()
        .get(format!("{}/v1/jobs/{id}/events", queen.base))
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!((raw.status().as_u16(), raw.headers()["retry-after"].to_str().unwrap()), (429, "5"));

    // A compatible request would wait on a stream too: refused before its job is submitted.
    let jobs_before = c.jobs("").await.unwrap().total;
    let openai = reqwest::Client::new()
        .post(format!("{}/v1/images/generations", queen.base))
        .bearer_auth(TOKEN)
        .json(&serde_json::json!({"prompt": "a red fox", "model": "tiny", "size": "64x64"}))
        .send()
        .await
        .unwrap();
    assert_eq!(openai.status().as_u16(), 429);
    assert_eq!(c.jobs("").await.unwrap().total, jobs_before, "nothing was submitted");

    // Another token has its own share.
    let other = QueenClient::new(&queen.base, Some(OTHER_TOKEN.into())).unwrap();
    let _theirs = other.events(id, None).await.expect("another token's stream");

    // A stream the client closes frees its place.
    drop(first);
    let start = Instant::now();
    let third = loop {
        match c.events(id, None).await {
            Ok(stream) => break stream,
            Err(e) => assert_eq!(e.downcast::<ApiError>().unwrap().status, 429),
        }
        assert!(start.elapsed() < Duration::from_secs(10), "the closed stream's place was not freed");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    drop((second, third));
}
