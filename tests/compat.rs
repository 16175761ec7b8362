//! The queen's compatible APIs give what its own API gives: OpenAI's official Python client
//! (`images.generate`, `images.edit`) and plain AUTOMATIC1111 requests (`/sdapi/v1/txt2img`, `img2img`,
//! `sd-models`, `samplers`, `progress`) get, for the same seed and parameters, the very bytes of a
//! `POST /v1/jobs` job, through a real nats-server and worker.

use crate::common;

use std::time::{Duration, Instant};

use base64::Engine as _;
use serde_json::{json, Value};

use common::queen::{client, follow, start_queen, tiny, TOKEN};
use common::servers::{tool, NatsServer, WorkerProcess};

const B64: base64::engine::GeneralPurpose = base64::engine::general_purpose::STANDARD;

/// What OpenAI's client does: a generation of two images (seeds 5 and 6) and an edit whose mask is
/// transparent on its left half, both as base64.
const OPENAI_SCRIPT: &str = r#"
import base64, json, sys
from openai import OpenAI

base, token, init_path, mask_path = sys.argv[1:5]
client = OpenAI(base_url=base + "/v1", api_key=token, max_retries=0, timeout=120)
made = client.images.generate(model="dall-e-2", prompt="a paper boat on a pond", n=2, size="64x64",
                              response_format="b64_json", extra_body={"seed": 5, "steps": 2})
edited = client.images.edit(image=open(init_path, "rb"), mask=open(mask_path, "rb"),
                            prompt="a paper boat on a pond", size="64x64", response_format="b64_json",
                            extra_body={"seed": 9, "steps": 2})
try:
    client.images.generate(prompt="x", size="huge")
    refused = None
except Exception as e:
    refused = getattr(e, "status_code", None)
print(json.dumps({"made": [d.b64_json for d in made.data], "seeds": [d.model_extra.get("seed") for d in made.data],
                  "edited": [d.b64_json for d in edited.data], "refused": refused}))
"#;

fn png(bytes: &[u8]) -> image::RgbaImage {
    image::load_from_memory(bytes).expect("a PNG").to_rgba8()
}

async fn post(base: &str, path: &str, body: Value, auth: (&str, &str)) -> (u16, Value) {
    let response =
        reqwest::Client::new().post(format!("{base}{path}")).header(auth.0, auth.1).json(&body).send().await.unwrap();
    (response.status().as_u16(), response.json().await.unwrap_or(Value::Null))
}

async fn get(base: &str, path: &str) -> Value {
    let response = reqwest::Client::new().get(format!("{base}{path}")).bearer_auth(TOKEN).send().await.unwrap();
    assert!(response.status().is_success(), "{path}: {}", response.status());
    response.json().await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openai_and_a1111_clients_get_the_images_the_native_api_gives() {
    let nats = NatsServer::start();
    let results = tempfile::tempdir().unwrap();
    let store = format!("file://{}", results.path().display());
    let queen = start_queen(&nats.url(), &store, &[], |c| c.api.model_catalogue = vec!["tiny".into()]).await;
    let _worker = WorkerProcess::start("compat", &nats.url(), &store, &[], &["--step-delay", "100ms"]);
    let c = client(&queen);

    // The reference: seeds 5 and 6 through the native API.
    let mut native = tiny(2, 5);
    native.num_images = 2;
    let job = c.submit(&native, None).await.unwrap();
    follow(&c, job.job_id).await;
    let (native0, native1) = (c.image(job.job_id, 0).await.unwrap(), c.image(job.job_id, 1).await.unwrap());

    // OpenAI's client, with an init image and a mask transparent on its left half.
    let dir = tempfile::tempdir().unwrap();
    let init_path = dir.path().join("init.png");
    std::fs::write(&init_path, &native0).unwrap();
    let mask = image::RgbaImage::from_fn(64, 64, |x, _| image::Rgba([0, 0, 0, if x < 32 { 0 } else { 255 }]));
    let mask_path = dir.path().join("mask.png");
    mask.save(&mask_path).unwrap();
    let script = dir.path().join("openai_client.py");
    std::fs::write(&script, OPENAI_SCRIPT).unwrap();
    let out = tokio::process::Command::new(tool("python"))
        .arg(&script)
        .args([&queen.base, TOKEN])
        .args([&init_path, &mask_path])
        .output()
        .await
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let answer: Value = serde_json::from_slice(&out.stdout).unwrap();
    let made: Vec<Vec<u8>> =
        answer["made"].as_array().unwrap().iter().map(|b| B64.decode(b.as_str().unwrap()).unwrap()).collect();
    assert_eq!(made, [native0.clone(), native1], "OpenAI's generations are the native job's bytes");
    assert_eq!(answer["seeds"], json!([5, 6]));
    assert_eq!(answer["refused"], 422, "a size that is not WIDTHxHEIGHT is refused");
    let edited = png(&B64.decode(answer["edited"][0].as_str().unwrap()).unwrap());
    let original = png(&native0);
    assert_eq!(edited.dimensions(), (64, 64));
    // Transparent = redraw (OpenAI's convention): the opaque right half, away from the blurred edge, is
    // pasted back untouched; the left half is redrawn.
    for (x, y) in [(60, 5), (63, 63), (48, 32)] {
        assert_eq!(edited.get_pixel(x, y), original.get_pixel(x, y), "kept at {x},{y}");
    }
    let changed = (0..64)
        .flat_map(|y| (0..20).map(move |x| (x, y)))
        .filter(|&(x, y)| edited.get_pixel(x, y) != original.get_pixel(x, y));
    assert!(changed.count() > 100, "the transparent half is redrawn");

    // A1111, as its clients send it: Basic auth with the token as the password, the model by checkpoint title.
    let basic = format!("Basic {}", B64.encode(format!("user:{TOKEN}")));
    let request = json!({
        "prompt": "a paper boat on a pond", "negative_prompt": "", "seed": 5, "steps": 2, "width": 64, "height": 64,
        "batch_size": 2, "n_iter": 1, "restore_faces": false, "tiling": false,
        "override_settings": {"sd_model_checkpoint": "tiny.safetensors [0123abcd]"}
    });
    let (status, body) = post(&queen.base, "/sdapi/v1/txt2img", request.clone(), ("authorization", &basic)).await;
    assert_eq!(status, 200, "{body}");
    let images: Vec<Vec<u8>> =
        body["images"].as_array().unwrap().iter().map(|b| B64.decode(b.as_str().unwrap()).unwrap()).collect();
    assert_eq!(images, made, "A1111's txt2img gives the native job's bytes");
    assert_eq!(body["parameters"]["seed"], 5);
    let info: Value = serde_json::from_str(body["info"].as_str().unwrap()).unwrap();
    assert_eq!((info["seed"].clone(), info["all_seeds"].clone()), (json!(5), json!([5, 6])));
    assert!(info["infotexts"][0].as_str().unwrap().contains("Seed: 5, Size: 64x64, Model: tiny"), "{info}");

    let bearer = format!("Bearer {TOKEN}");
    let img2img = json!({
        "prompt": "a paper boat on a pond", "seed": 3, "steps": 2, "width": 64, "height": 64,
        "init_images": [B64.encode(&native0)], "denoising_strength": 0.5
    });
    let (status, body) = post(&queen.base, "/sdapi/v1/img2img", img2img, ("authorization", &bearer)).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(png(&B64.decode(body["images"][0].as_str().unwrap()).unwrap()).dimensions(), (64, 64));
    for (path, body, field) in [
        ("/sdapi/v1/txt2img", json!({"prompt": "x", "sampler_name": "Heun"}), "sampler_name"),
        ("/sdapi/v1/img2img", json!({"prompt": "x"}), "init_images"),
        // Refused by the worker (the tiny model's text encoder has 5 layers): named as the client calls it too.
        (
            "/sdapi/v1/txt2img",
            json!({"prompt": "x", "steps": 2, "width": 64, "height": 64,
                   "override_settings": {"CLIP_stop_at_last_layers": 12}}),
            "override_settings.CLIP_stop_at_last_layers",
        ),
    ] {
        let (status, answer) = post(&queen.base, path, body, ("authorization", &bearer)).await;
        assert_eq!((status, answer["error"]["field"].as_str()), (422, Some(field)), "{answer}");
    }

    let models = get(&queen.base, "/sdapi/v1/sd-models").await;
    assert!(models.as_array().unwrap().iter().any(|m| m["title"] == "tiny"), "{models}");
    let samplers = get(&queen.base, "/sdapi/v1/samplers").await;
    assert!(samplers.as_array().unwrap().iter().any(|s| s["name"] == "Euler a"), "{samplers}");

    // progress follows the caller's running A1111 job (10 steps of 100 ms), then says nothing runs.
    let slow = json!({"prompt": "a slow boat", "seed": 1, "steps": 10, "width": 64, "height": 64});
    let base = queen.base.clone();
    let running = tokio::spawn(async move { post(&base, "/sdapi/v1/txt2img", slow, ("authorization", &bearer)).await });
    let start = Instant::now();
    loop {
        let progress = get(&queen.base, "/sdapi/v1/progress").await;
        if progress["state"]["sampling_steps"] == 10 && progress["progress"].as_f64().unwrap() > 0.0 {
            assert!(!progress["state"]["job"].as_str().unwrap().is_empty(), "{progress}");
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(20), "no progress seen: {progress}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(running.await.unwrap().0, 200);
    let idle = get(&queen.base, "/sdapi/v1/progress").await;
    assert_eq!((idle["progress"].clone(), idle["state"]["job"].clone()), (json!(0.0), json!("")), "{idle}");
}

/// OpenAI's client with its default retries, on a job no worker takes: one 504 after the queen's wait.
const OPENAI_WAIT_SCRIPT: &str = r#"
import json, sys, time
import openai

base, token = sys.argv[1:3]
client = openai.OpenAI(base_url=base + "/v1", api_key=token, timeout=60)
started = time.monotonic()
try:
    client.images.generate(prompt="a paper boat on a pond", size="64x64", extra_body={"steps": 2})
    print(json.dumps({"status": 200}))
except openai.APIStatusError as e:
    print(json.dumps({"status": e.status_code, "body": e.body, "seconds": time.monotonic() - started}))
"#;

/// A request whose job no worker takes is answered `WAIT_TIMEOUT` (504) after the queen's `--compat-wait`,
/// naming the job, which stays queued; OpenAI's client (retries on) does not submit it a second time. A wait
/// in progress when the queen shuts down is answered at once and does not hold the shutdown.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_compatible_request_stops_waiting_and_names_its_job() {
    let nats = NatsServer::start();
    let results = tempfile::tempdir().unwrap();
    let store = format!("file://{}", results.path().display());
    let queen = start_queen(&nats.url(), &store, &[], |c| {
        c.api.model_catalogue = vec!["tiny".into()];
        c.api.compat_wait = Duration::from_secs(2);
    })
    .await;
    let c = client(&queen);

    let dir = tempfile::tempdir().unwrap();
    let script = dir.path().join("openai_wait.py");
    std::fs::write(&script, OPENAI_WAIT_SCRIPT).unwrap();
    let out =
        tokio::process::Command::new(tool("python")).arg(&script).args([&queen.base, TOKEN]).output().await.unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let answer: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(answer["status"], 504, "{answer}");
    assert_eq!(answer["body"]["code"], "WAIT_TIMEOUT", "{answer}");
    let seconds = answer["seconds"].as_f64().unwrap();
    assert!((2.0..10.0).contains(&seconds), "answered after {seconds} s: {answer}");
    let listed = c.jobs("").await.unwrap();
    assert_eq!(listed.jobs.len(), 1, "a retry submitted the job again: {:?}", listed.jobs);
    let job = &listed.jobs[0];
    assert_eq!(job.state, sd_rbee::api::JobState::Queued);
    let message = answer["body"]["message"].as_str().unwrap();
    assert!(message.contains(&job.job_id.to_string()) && message.contains("2s"), "{message}");

    // A1111's endpoint, the same; then a wait cut short by the queen's shutdown.
    let (status, body) = post(
        &queen.base,
        "/sdapi/v1/txt2img",
        json!({"prompt": "x", "steps": 2, "width": 64, "height": 64}),
        ("authorization", &format!("Bearer {TOKEN}")),
    )
    .await;
    assert_eq!((status, body["error"]["code"].as_str()), (504, Some("WAIT_TIMEOUT")), "{body}");

    // A job that fails on its worker for another reason than the request is no bug of the queen's (500):
    // 502 JOB_FAILED, quoting the job's code and message.
    let before: Vec<_> = c.jobs("").await.unwrap().jobs.iter().map(|j| j.job_id).collect();
    let waiting = {
        let (base, auth) = (queen.base.clone(), format!("Bearer {TOKEN}"));
        tokio::spawn(async move {
            let body = json!({"prompt": "x", "steps": 2, "width": 64, "height": 64});
            post(&base, "/sdapi/v1/txt2img", body, ("authorization", &auth)).await
        })
    };
    let start = Instant::now();
    let failing = loop {
        assert!(start.elapsed() < Duration::from_secs(10), "the request's job never appeared");
        if let Some(job) = c.jobs("").await.unwrap().jobs.into_iter().find(|j| !before.contains(&j.job_id)) {
            break job.job_id;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let bus = sd_rbee::bus::BusClient::connect(&nats.url(), "sd").await.unwrap();
    let failed = sd_rbee::protocol::Event::Failed(sd_rbee::protocol::Failed {
        v: sd_rbee::protocol::PROTOCOL_VERSION,
        job_id: failing,
        at: sd_rbee::protocol::now_millis(),
        code: sd_rbee::protocol::ErrorCode::OutOfMemory,
        message: "CUDA out of memory".into(),
        field: None,
    });
    let subject = bus.subjects().events(failing);
    bus.jetstream().publish(subject, sd_rbee::protocol::encode(&failed).into()).await.unwrap().await.unwrap();
    let (status, body) = tokio::time::timeout(Duration::from_secs(10), waiting).await.expect("answered").unwrap();
    assert_eq!((status, body["error"]["code"].as_str()), (502, Some("JOB_FAILED")), "{body}");
    let message = body["error"]["message"].as_str().unwrap();
    assert!(
        message.contains(&failing.to_string()) && message.contains("OUT_OF_MEMORY") && message.contains("CUDA"),
        "{message}"
    );

    let mut config = sd_rbee::queen::QueenConfig::new(nats.url(), &store, "127.0.0.1:0".parse().unwrap());
    config.api.tokens = vec![TOKEN.into()];
    config.api.model_catalogue = vec!["tiny".into()];
    let second = sd_rbee::queen::Queen::start(config).await.unwrap();
    let base = format!("http://{}", second.addr);
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let served = tokio::spawn(second.serve(async move {
        let _ = stopped.await;
    }));
    let waiting = tokio::spawn(async move {
        let auth = format!("Bearer {TOKEN}");
        post(
            &base,
            "/sdapi/v1/txt2img",
            json!({"prompt": "x", "steps": 2, "width": 64, "height": 64}),
            ("authorization", &auth),
        )
        .await
    });
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(!waiting.is_finished(), "the request should wait for its job");
    let shutdown = Instant::now();
    stop.send(()).unwrap();
    let (status, body) =
        tokio::time::timeout(Duration::from_secs(5), waiting).await.expect("answered at shutdown").unwrap();
    assert_eq!((status, body["error"]["code"].as_str()), (504, Some("WAIT_TIMEOUT")), "{body}");
    assert!(body["error"]["message"].as_str().unwrap().contains("shutting down"), "{body}");
    tokio::time::timeout(Duration::from_secs(10), served).await.expect("the queen stops").unwrap().unwrap();
    assert!(shutdown.elapsed() < Duration::from_secs(10));
    assert_eq!(c.jobs("").await.unwrap().jobs.len(), 4, "the A1111 jobs are kept");
}

/// OpenAI's client with its default retries: an edit of an ordinary photo (over a megabyte of base64), then
/// a generation whose job is cancelled while the client waits for it.
const OPENAI_LARGE_AND_CANCELLED_SCRIPT: &str = r#"
import base64, json, sys
import openai

base, token, photo_path, flag_path = sys.argv[1:5]
client = openai.OpenAI(base_url=base + "/v1", api_key=token, timeout=60)
edited = client.images.edit(image=open(photo_path, "rb"), prompt="1984", size="64x64",
                            response_format="b64_json", extra_body={"seed": 9, "steps": 2})
open(flag_path, "w").write("edited")
try:
    client.images.generate(prompt="a slow boat", size="64x64", extra_body={"steps": 20})
    cancelled = {"status": 200}
except openai.APIStatusError as e:
    cancelled = {"status": e.status_code, "body": e.body}
print(json.dumps({"edited": edited.data[0].b64_json, "cancelled": cancelled}))
"#;

/// A noisy `side`² RGB PNG: it barely compresses (about 3 bytes a pixel).
fn photo(side: u32) -> Vec<u8> {
    let mut state = 12345u32;
    let img = image::RgbImage::from_fn(side, side, |_, _| {
        state = state.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
        image::Rgb([(state >> 24) as u8, (state >> 16) as u8, (state >> 8) as u8])
    });
    let mut out = Vec::new();
    img.write_to(&mut std::io::Cursor::new(&mut out), image::ImageFormat::Png).unwrap();
    out
}

/// Compatible clients cannot upload first: an init image too large for a job message goes by the store
/// (OpenAI's edit and A1111's img2img of a 512² photo, which used to be refused 413). And once a request's
/// job is submitted, its errors tell OpenAI's client not to retry: a job cancelled while the client waits
/// is answered 409 once, not submitted again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compatible_requests_take_large_images_and_are_not_retried_once_submitted() {
    let nats = NatsServer::start();
    let results = tempfile::tempdir().unwrap();
    let store = format!("file://{}", results.path().display());
    let queen = start_queen(&nats.url(), &store, &[], |c| c.api.model_catalogue = vec!["tiny".into()]).await;
    let _worker = WorkerProcess::start("compat-large", &nats.url(), &store, &[], &["--step-delay", "200ms"]);
    let c = client(&queen);

    let large = photo(512);
    assert!(large.len() * 4 / 3 > 1024 * 1024, "the base64 must be over NATS's 1 MiB: {} bytes", large.len());
    let dir = tempfile::tempdir().unwrap();
    let (photo_path, flag_path) = (dir.path().join("photo.png"), dir.path().join("edited"));
    std::fs::write(&photo_path, &large).unwrap();
    let script = dir.path().join("openai_large.py");
    std::fs::write(&script, OPENAI_LARGE_AND_CANCELLED_SCRIPT).unwrap();
    let client_run = tokio::process::Command::new(tool("python"))
        .arg(&script)
        .args([&queen.base, TOKEN])
        .args([&photo_path, &flag_path])
        .output();
    let client_run = tokio::spawn(client_run);

    // Once the edit is in, the client's generation runs (20 steps of 200 ms): cancel it mid-way.
    let start = Instant::now();
    let running = loop {
        assert!(start.elapsed() < Duration::from_secs(60), "the client's generation never ran");
        if flag_path.exists() {
            let listed = c.jobs("?state=running").await.unwrap();
            if let Some(job) = listed.jobs.first() {
                break job.job_id;
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    c.cancel(running).await.unwrap();
    let out = tokio::time::timeout(Duration::from_secs(60), client_run).await.unwrap().unwrap().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let answer: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(png(&B64.decode(answer["edited"].as_str().unwrap()).unwrap()).dimensions(), (64, 64));
    assert_eq!(answer["cancelled"]["status"], 409, "{answer}");
    let message = answer["cancelled"]["body"]["message"].as_str().unwrap_or_default();
    assert!(message.contains(&running.to_string()), "the answer names the job: {answer}");
    let jobs = c.jobs("").await.unwrap().jobs;
    assert_eq!(jobs.len(), 2, "the edit and the cancelled generation, nothing retried: {jobs:?}");

    // A1111's img2img, the photo inline as its clients send it.
    let bearer = format!("Bearer {TOKEN}");
    let img2img = json!({
        "prompt": "a paper boat on a pond", "seed": 3, "steps": 2, "width": 64, "height": 64,
        "init_images": [format!("data:image/png;base64,{}", B64.encode(&large))], "denoising_strength": 0.5
    });
    let (status, body) = post(&queen.base, "/sdapi/v1/img2img", img2img, ("authorization", &bearer)).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(png(&B64.decode(body["images"][0].as_str().unwrap()).unwrap()).dimensions(), (64, 64));
    let uploads = std::fs::read_dir(results.path().join("uploads")).unwrap().count();
    assert_eq!(uploads, 2, "each large input went by the store");

    // A job the queen refuses names the field as the client sent it (the edit's prompt "1984" above was
    // taken as text, not as a number).
    for (path, body, field) in [
        ("/v1/images/generations", json!({"prompt": "x", "n": 99}), "n"),
        ("/v1/images/generations", json!({"prompt": "x", "size": "99999999x8"}), "size"),
        ("/v1/images/generations", json!({"prompt": "x", "guidance_scale": 1000.0}), "guidance_scale"),
        ("/sdapi/v1/txt2img", json!({"prompt": "x", "batch_size": 4, "n_iter": 4}), "batch_size"),
        ("/sdapi/v1/txt2img", json!({"prompt": "x", "cfg_scale": 1000.0}), "cfg_scale"),
        (
            "/sdapi/v1/img2img",
            json!({"prompt": "x", "init_images": [B64.encode(&large)], "denoising_strength": 0.0}),
            "denoising_strength",
        ),
    ] {
        let (status, answer) = post(&queen.base, path, body.clone(), ("authorization", &bearer)).await;
        assert_eq!((status, answer["error"]["field"].as_str()), (422, Some(field)), "{body}: {answer}");
    }
    assert_eq!(c.jobs("").await.unwrap().jobs.len(), 3, "nothing refused was submitted");
    let uploads = std::fs::read_dir(results.path().join("uploads")).unwrap().count();
    assert_eq!(uploads, 2, "a refused request's large input is not left in the store");

    // An edit's form without a prompt: the form is at fault, and the message says what it lacks.
    let mut form = b"--XyZ\r\nContent-Disposition: form-data; name=\"image\"; filename=\"i.png\"\r\nContent-Type: image/png\r\n\r\n".to_vec();
    form.extend_from_slice(&photo(8));
    form.extend_from_slice(b"\r\n--XyZ\r\nContent-Disposition: form-data; name=\"n\"\r\n\r\n1\r\n--XyZ--\r\n");
    let response = reqwest::Client::new()
        .post(format!("{}/v1/images/edits", queen.base))
        .bearer_auth(TOKEN)
        .header("content-type", "multipart/form-data; boundary=XyZ")
        .body(form)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 422);
    let answer: Value = response.json().await.unwrap();
    assert_eq!(answer["error"]["field"], "multipart", "{answer}");
    assert!(answer["error"]["message"].as_str().unwrap().contains("prompt"), "{answer}");
}
