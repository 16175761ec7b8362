//! The worker against real servers: a nats-server with JetStream and an S3-compatible server (moto), both
//! started by the tests on free loopback ports, and `sd-rbee worker` child processes on the tiny SD 1.5
//! fixture. Here: the happy path (events in order, the stored PNG equal to `sd-rbee generate`), signed S3,
//! invalid jobs (failed + dead letter), heartbeats, img2img and inpainting, models and `submit`; what goes
//! wrong while a job runs (cancel, crashes, SIGTERM, NATS and S3 outages, deadlines) is in [`faults`].

use crate::common;
use crate::common::tiny_job;

use std::time::Duration;

use async_nats::jetstream;
use common::servers::{NatsServer, S3Server, WorkerProcess};
use futures::StreamExt;
use sd_rbee::bus::BusClient;
use sd_rbee::protocol::{self, ErrorCode, Event, JobKind, JobRequest};
use uuid::Uuid;

mod cancels;
mod faults;

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
    // 3. A job only the model can reject: img2img whose strength leaves no step of the model's default steps
    // (with its steps given, the protocol refuses it first).
    let mut no_steps = tiny_job(2, 1);
    no_steps.steps = None;
    no_steps.kind = JobKind::Img2Img;
    let mut png = Vec::new();
    image::RgbImage::from_pixel(64, 64, image::Rgb([200, 30, 30]))
        .write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png)
        .unwrap();
    no_steps.init_image = Some(protocol::ImageSource::Inline(png));
    no_steps.strength = Some(0.001);
    publish_raw(no_steps.id, protocol::encode(&no_steps)).await;
    // 4. A job of a newer protocol version.
    let mut future = tiny_job(2, 1);
    future.v = 99;
    publish_raw(future.id, protocol::encode(&future)).await;

    // 5. A job whose id is 16 raw bytes (as the protocol also reads it), with a bad width and no
    // Nats-Msg-Id: its failure is still reported under its id.
    let mut raw_id = tiny_job(2, 1);
    raw_id.width = Some(7);
    let mut value = serde_json::to_value(&raw_id).unwrap();
    value.as_object_mut().unwrap().remove("id");
    let mut raw_id_bytes = rmp_serde::to_vec_named(&value).unwrap();
    assert!((0x80..0x8f).contains(&raw_id_bytes[0]), "a fixmap with room for one more entry");
    raw_id_bytes[0] += 1;
    raw_id_bytes.extend(rmp_serde::to_vec("id").unwrap());
    raw_id_bytes.extend([0xc4, 16]);
    raw_id_bytes.extend(raw_id.id.as_bytes());
    js.publish(subject.clone(), raw_id_bytes.into()).await.unwrap().await.unwrap();
    // 6. A field of the wrong type deep in the job: named.
    let quality = tiny_job(2, 1);
    let mut value = serde_json::to_value(&quality).unwrap();
    value["output"] = serde_json::json!({"format": "jpeg", "quality": 300});
    publish_raw(quality.id, rmp_serde::to_vec_named(&value).unwrap()).await;

    let cases = [
        (garbage_id, None),
        (bad_width.id, Some("width")),
        (no_steps.id, Some("strength")),
        (future.id, Some("v")),
        (raw_id.id, Some("width")),
        (quality.id, Some("output.quality")),
    ];
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
    assert_eq!(letters.len(), 6, "{:?}", letters.iter().map(|l| &l.0).collect::<Vec<_>>());
    assert_eq!(letters[0].1, b"\x00\x01 definitely not msgpack");
    assert!(letters[1].0.contains("width"), "{}", letters[1].0);
    assert_eq!(letters[1].1, protocol::encode(&bad_width));
    assert!(letters[2].0.contains("strength"), "{}", letters[2].0);
    assert!(letters[3].0.contains("version 99"), "{}", letters[3].0);
    assert!(letters[5].0.contains("`output.quality`"), "{}", letters[5].0);

    // None of it is left in the work queue, and the worker still serves.
    let good = tiny_job(2, 3);
    client.submit(&good).await.unwrap();
    let events = events_of(&client, good.id, Duration::from_secs(60)).await;
    assert!(matches!(events.last(), Some(Event::Completed(_))), "{events:?}");
    wait_for_empty_queue(&client).await;
}

fn failure(events: &[Event]) -> &protocol::Failed {
    match events.last() {
        Some(Event::Failed(f)) => f,
        other => panic!("expected failed, got {other:?} in {events:?}"),
    }
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
